"""The unit gallery (atlas.units.gallery): its files from the store's units/{layer}/ parts, and its pages in headless
Chromium (the gallery page, the atlas cell's links to units, a unit's veil over the atlas), driven as
tests/test_viewer.py drives the atlas viewer."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import WEIGHTS, serving
from PIL import Image
from tiles_helpers import CLASSES, make_tile_run

from atlas import store
from atlas.errors import AtlasError
from atlas.server import make_server
from atlas.store import open_store, write_array
from atlas.tiles import BACKGROUND, BLOCK, highlight_veil, make_tiles
from atlas.units.gallery import cell_top_units, kind_order, unit_veils, write_gallery
from atlas.viewer import VIEWER_FILES, url_of

LAYER, BIG = "mixed4c", "mixed5b"
C, K, P, S = 12, 9, 24, 32  # channels, top-k, patch side, visualisation side
N_IMAGES = 20
SIZES = (8, 16)


def channel_colour(c: int) -> np.ndarray:
    return np.random.default_rng(1000 + c).integers(30, 226, 3).astype(np.uint8)


def centres(channels: int) -> np.ndarray:
    """(C, 2) fractions (x, y) of the atlas where each unit is strongest."""
    return np.random.default_rng(7).uniform(0.05, 0.95, (channels, 2))


def mean_activation(size: int, channels: int) -> np.ndarray:
    """(S, S, C): unit c peaks at its centre and falls off with distance; zero beyond half the atlas."""
    gy, gx = np.mgrid[0:size, 0:size]
    xy = np.stack([(gx + 0.5) / size, (gy + 0.5) / size], -1)  # (S, S, 2)
    d = np.linalg.norm(xy[:, :, None, :] - centres(channels)[None, None], axis=-1)
    return np.maximum(0.0, 1.0 - 2.0 * d).astype(np.float32) * (1.0 + np.arange(channels) / 100.0)


def write_units(run: Path, layer: str, channels: int, kinds=("fft", "yosinski-1", "alpha", "diverse"),
                methods=("deconvnet", "guided"), missing_top: tuple[int, ...] = ()) -> None:
    """units/{layer}/... in the spec's shapes: every part, every channel done (top/ except ``missing_top``)."""
    root = open_store(run, mode="a")
    g = root.require_group(f"units/{layer}")
    rng = np.random.default_rng(channels)
    value = -np.sort(-rng.uniform(1, 10, (channels, K)), axis=1).astype(np.float32)
    image = (np.arange(channels)[:, None] + np.arange(K)) % N_IMAGES
    value[1, -2:], image[1, -2:] = -np.inf, -1  # unit 1 saw only 7 images
    top = g.require_group("top")
    write_array(top, "value", value)
    write_array(top, "image", image.astype(np.int64))
    write_array(top, "pos", rng.integers(0, 14, (channels, K, 2)).astype(np.int32))
    write_array(top, "box", np.tile(np.array([0, 0, 100, 100], np.int32), (channels, K, 1)))
    patch = np.zeros((channels, K, P, P, 3), np.uint8)
    for c in range(channels):
        for j in range(K):
            patch[c, j] = (c * 20 + j * 3) % 256
    write_array(top, "patch", patch)
    done = np.ones(channels, bool)
    done[list(missing_top)] = False
    write_array(top, "done", done)
    top.attrs.update({"k": K, "channels": channels, "hw": [14, 14], "crop": 224})
    for m, method in enumerate(methods):
        pg = g.require_group(f"projection/{method}")
        write_array(pg, "image", np.full((channels, K, P, P, 3), 60 + 40 * m, np.uint8))
        write_array(pg, "scale", np.ones((channels, K), np.float32))
        write_array(pg, "done", done.copy())
    for kind in kinds:
        n = 3 if kind == "diverse" else 1
        depth = 4 if kind == "alpha" else 3
        vis = np.zeros((channels, n, S, S, depth), np.uint8)
        for c in range(channels):
            vis[c, ..., :3] = channel_colour(c) if kind == "fft" else (c * 7) % 256
            if depth == 4:
                vis[c, :, :, : S // 2, 3] = 255  # left half opaque, right half transparent
        vg = g.require_group(f"vis/{kind}")
        write_array(vg, "image", vis)
        write_array(vg, "objective", np.full((channels, n), 5.0, np.float32))
        write_array(vg, "done", np.ones(channels, bool))
        vg.attrs.update({"kind": kind, "settings": {}})
    cg = g.require_group("classes")
    write_array(cg, "top", (np.arange(channels)[:, None] + np.arange(5)) % len(CLASSES))
    write_array(cg, "score", np.tile(np.array([0.9, 0.5, 0.3, 0.2, 0.1], np.float32), (channels, 1)))


def make_run(path: Path) -> Path:
    """A tiled synthetic atlas of LAYER with mean activations, C units of LAYER and 40 of BIG, and an image list."""
    run = make_tile_run(path, sizes=SIZES, icon=32)
    root = open_store(run, mode="a")
    root.attrs.update({"weights": str(WEIGHTS)})
    images = root.require_group("images")
    write_array(images, "path", np.asarray([f"/photos/img_{i:03d}.jpg" for i in range(N_IMAGES)], dtype=str))
    write_array(images, "label", np.asarray([i % 10 if i % 4 else -1 for i in range(N_IMAGES)], np.int32))
    for s in SIZES:
        write_array(root[f"grids/{LAYER}/full/{s}"], "mean_activation", mean_activation(s, C))
    write_units(run, LAYER, C)
    write_units(run, BIG, 40, kinds=("pixel",), methods=())
    make_tiles(run, LAYER, examples=False)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("gallery") / "run")
    write_gallery(run, LAYER)
    write_gallery(run, BIG, dzi_above=16)
    return run


# ---------------------------------------------------------------------------- pure pieces
def test_unit_veils_are_the_highlight_veil_of_each_unit():
    values = mean_activation(16, 6)
    values[..., 4] = 0.0  # a unit that never fires: no positive cell, so a uniform veil
    draw = np.ones((16, 16), bool)
    draw[3, 5] = draw[0, 0] = False
    veils = unit_veils(values, draw)
    for c in range(6):
        assert np.array_equal(veils[..., c], highlight_veil(values[..., c], draw)[..., 3]), c
    assert highlight_veil(values[..., 0], draw)[0, 0, :3].tolist() == list(BACKGROUND)


def test_cell_top_units_rank_the_cells_mean_activation():
    values = mean_activation(SIZES[1], C)
    count = np.ones(values.shape[:2], np.int32)
    count[2, 3] = 0
    blocks = cell_top_units(values, count, k=5)
    cells = {(cell["x"], cell["y"]): cell["units"] for block in blocks.values() for cell in block}
    assert (3, 2) not in cells and len(cells) == count.sum()
    for (x, y), units in cells.items():
        positive = [c for c in np.argsort(-values[y, x], kind="stable") if values[y, x, c] > 0][:5]
        assert [u[0] for u in units] == positive
        assert all(a[1] >= b[1] for a, b in zip(units, units[1:], strict=False))
    assert set(blocks) == {(x // BLOCK, y // BLOCK) for x, y in cells}


def test_kind_order_prefers_fft_then_presets_then_pixel():
    assert kind_order(["alpha", "pixel", "yosinski-2", "diverse", "fft", "yosinski-1"]) == [
        "fft", "yosinski-1", "yosinski-2", "pixel", "diverse", "alpha"]


# ---------------------------------------------------------------------------- files
def test_gallery_files(run):
    tiles = run / "tiles"
    meta = json.loads((tiles / "units" / LAYER / "gallery.json").read_text())
    assert meta["channels"] == C and meta["dzi"] is None and meta["thumbs"] == ["fft"] * C
    assert meta["kinds"] == ["fft", "yosinski-1", "diverse", "alpha"] and meta["methods"] == ["deconvnet", "guided"]
    assert meta["atlases"] == [{"atlas": "full", "sizes": list(SIZES)}] and meta["summary"]["skipped"] == []
    thumb = np.asarray(Image.open(tiles / "units" / LAYER / "thumbs" / "5.jpg").convert("RGB")).astype(int)
    assert np.abs(thumb.reshape(-1, 3).mean(0) - channel_colour(5)).max() < 4  # the fft image, the best kind
    alpha = Image.open(tiles / "units" / LAYER / "vis" / "alpha" / "5.png")
    assert alpha.mode == "RGBA" and alpha.getextrema()[3] == (0, 255)
    assert Image.open(tiles / "units" / LAYER / "vis" / "diverse" / "5.jpg").size == (3 * S, S)
    unit = json.loads((tiles / "units" / LAYER / "unit" / "1.json").read_text())
    assert len(unit["top"]["examples"]) == 7 and Image.open(tiles / "units" / LAYER / "top" / "1.jpg").size == (7 * P, P)
    assert Image.open(tiles / "units" / LAYER / "projection" / "guided" / "1.jpg").size == (7 * P, P)
    first = unit["top"]["examples"][0]
    assert first["image"] == 1 and first["file"] == "img_001.jpg" and first["label_name"] == "goldfish"
    assert unit["classes"][0] == [CLASSES[1], 0.9]
    veil = np.frombuffer(zlib.decompress(base64.b64decode(unit["cells"]["full"]["16"]["veil"])), np.uint8).reshape(16, 16)
    values = mean_activation(16, C)[..., 1]
    assert veil[np.unravel_index(np.argmax(values), values.shape)] == 0 and veil.max() > 150
    big = json.loads((tiles / "units" / BIG / "gallery.json").read_text())
    assert big["dzi"]["width"] == 7 * S and (tiles / "units" / BIG / "grid_files").is_dir()
    assert not (tiles / "units" / BIG / "thumbs").exists() and big["atlases"] == []
    listed = json.loads((tiles / "units.json").read_text())["layers"]
    assert [x["layer"] for x in listed] == [LAYER, BIG]
    for name in ("units.html", "units.js", "units.css", "atlas_units.js"):
        assert (tiles / name).is_file()
    assert '<script src="atlas_units.js"></script>' in (tiles / "index.html").read_text()
    assert "/photos/" not in (tiles / "units" / LAYER / "unit" / "1.json").read_text()  # no absolute paths served


def test_without_a_gallery_the_viewer_files_are_installed_unchanged(tmp_path):
    """A run without units gets the atlas viewer byte for byte (tests/test_reshape_digest.py relies on it)."""
    from atlas.viewer import STATIC, install_viewer

    install_viewer(tmp_path)
    for name in VIEWER_FILES:
        assert (tmp_path / name).read_bytes() == (STATIC / name).read_bytes()
    assert not (tmp_path / "units.html").exists() and not (tmp_path / "atlas_units.js").exists()


def test_missing_parts_are_left_out_and_damaged_ones_skipped(tmp_path):
    run = make_tile_run(tmp_path / "run", sizes=(8,), icon=16)
    write_units(run, LAYER, 6, kinds=("pixel",), methods=(), missing_top=(2,))
    root = open_store(run, mode="a")
    del root[f"units/{LAYER}/classes"]
    store.finish_stage(run, "units", [f"units/{LAYER}"])  # sealed, as a finished `atlas units` leaves them
    chunk = next(p for p in (run / "store.zarr" / "units" / LAYER / "vis" / "pixel" / "image" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-3])
    write_gallery(run, LAYER, viewer=False)
    meta = json.loads((run / "tiles" / "units" / LAYER / "gallery.json").read_text())
    assert meta["kinds"] == [] and meta["thumbs"] == [None] * 6 and meta["summary"]["skipped"] == ["vis/pixel"]
    assert meta["classes"] is False and meta["atlases"] == []  # the grids have no mean activation
    assert meta["summary"]["with_top"] == 5
    assert json.loads((run / "tiles" / "units" / LAYER / "unit" / "2.json").read_text())["top"] is None
    assert "units/mixed4c/vis/pixel skipped" in (run / "log.txt").read_text()


def test_a_layer_without_unit_data_is_one_line(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = sorted(p.relative_to(copy).as_posix() for p in (copy / "tiles").rglob("*"))
    with pytest.raises(AtlasError, match=r"layer 'mixed3a' has no unit data .*layers with unit data: mixed4c, mixed5b") as err:
        write_gallery(copy, "mixed3a")
    assert "\n" not in str(err.value)
    with pytest.raises(AtlasError, match="dzi_above"):
        write_gallery(copy, LAYER, dzi_above=-1)
    assert sorted(p.relative_to(copy).as_posix() for p in (copy / "tiles").rglob("*")) == before


def test_a_failed_rewrite_keeps_the_previous_gallery(run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    final = copy / "tiles" / "units" / LAYER
    before = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    import atlas.units.gallery as gallery

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gallery, "_write_dzi", boom)
    with pytest.raises(AtlasError, match="no space left"):
        write_gallery(copy, LAYER, dzi_above=0)
    assert {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    store.cleanup_partials(copy)
    assert not final.with_name(LAYER + ".partial").exists()


# ---------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def server(run):
    with serving(run) as srv:
        yield srv


def base_url(server) -> str:
    return url_of(server).rsplit("/", 1)[0]


def open_atlas(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)


def test_gallery_page_shows_every_unit_and_a_units_panel(page, server):
    page.goto(f"{base_url(server)}/units.html#{LAYER}")
    page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
    loaded = page.eval_on_selector_all("#units-grid .unit-cell img", "els => els.filter(e => e.complete && e.naturalWidth > 0).length")
    assert loaded == C and page.locator("#units-grid .unit-cell").count() == C
    page.click('.unit-cell[data-c="3"]')
    page.wait_for_function("document.body.dataset.unit === '3'", timeout=10000)
    assert "Unit 3" in page.inner_text("#unit-title")
    assert page.locator("#unit-top .patches .frame").count() == K
    for method in ("deconvnet", "guided"):
        assert page.locator(f"#unit-top .projection-{method} .frame").count() == K
    captions = page.eval_on_selector_all("#unit-top .patches figcaption .label", "els => els.map(e => e.textContent)")
    images = [(3 + j) % N_IMAGES for j in range(K)]
    assert captions == [CLASSES[i % 10] if i % 4 else "unlabelled" for i in images]
    kinds = page.eval_on_selector_all("#unit-vis .vis-row", "els => els.map(e => e.dataset.kind)")
    assert kinds == ["fft", "yosinski-1", "diverse", "alpha"]
    assert page.locator('.vis-row[data-kind="diverse"] .frame').count() == 3
    checker = page.eval_on_selector('.vis-row[data-kind="alpha"] .frame', "el => getComputedStyle(el).backgroundImage")
    assert "vis/alpha/3.png" in checker and "conic-gradient" in checker
    assert CLASSES[3] in page.inner_text("#unit-classes")
    href = page.get_attribute("#unit-atlas a.show-in-atlas", "href")
    assert href == f"index.html?unit={LAYER}%3A3#{LAYER}%2Ffull"
    page.screenshot(path=str(outputs() / "units_gallery.png"))
    page.click('.unit-cell[data-c="1"]')
    page.wait_for_function("document.body.dataset.unit === '1'", timeout=10000)
    assert page.locator("#unit-top .patches .frame").count() == 7 and page.text_content("#unit-top-title") == "Top 7 dataset examples"
    assert page.errors == []


def test_large_layer_grid_is_deep_zoom_and_a_click_opens_the_unit(page, server):
    page.goto(f"{base_url(server)}/units.html#{BIG}")
    page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
    assert page.locator("#units-grid").is_hidden() and page.locator("#units-osd canvas").count() >= 1
    at = page.evaluate("unitGallery.unitCenter(17)")
    page.mouse.click(at["x"], at["y"])
    page.wait_for_function("document.body.dataset.unit === '17'", timeout=10000)
    assert "Unit 17 · mixed5b" in page.inner_text("#unit-title")
    assert page.locator("#unit-top .patches .frame").count() == K and page.locator("#unit-top .projection").count() == 0
    assert page.errors == []


def test_atlas_menu_links_and_cell_popup_lists_its_top_units(page, server):
    open_atlas(page, url_of(server))
    page.wait_for_selector("#units-link:not([hidden])", timeout=10000)
    assert page.get_attribute("#units-link", "href") == f"units.html#{LAYER}"
    size, centre = page.evaluate("(() => { const g = atlasViewer.activeGrid(); return [g.size, atlasViewer.cellCenter(g.size, 4, 2)]; })()")
    page.mouse.click(centre["x"], centre["y"])
    page.wait_for_selector("#panel-units[data-ready='1']", timeout=10000)
    links = page.eval_on_selector_all("#panel-units a.unit-link", "els => els.map(e => e.getAttribute('href'))")
    values = mean_activation(size, C)[2, 4]
    expected = [c for c in np.argsort(-values, kind="stable") if values[c] > 0][:5]
    assert links == [f"units.html#{LAYER}/{c}" for c in expected] and links
    page.screenshot(path=str(outputs() / "units_atlas_cell.png"))
    page.click("#panel-units a.unit-link >> nth=0")
    page.wait_for_function(f"document.body.dataset.unit === '{expected[0]}'", timeout=10000)
    assert f"Unit {expected[0]}" in page.inner_text("#unit-title")
    assert page.errors == []


def test_show_in_atlas_veils_the_cells_where_the_unit_is_weak(page, server):
    unit, size = 5, 16  # unit 5 peaks at (0.32, 0.30) of the atlas, clear of the legend
    page.set_viewport_size({"width": 900, "height": 900})
    open_atlas(page, url_of(server))
    plain = screenshot(page)
    page.goto(f"{base_url(server)}/index.html?unit={LAYER}:{unit}#{LAYER}/full")
    page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
    page.wait_for_function("(document.body.dataset.unitVeil || '').startsWith('mixed4c/full:')", timeout=10000)
    grid = page.evaluate("atlasViewer.activeGrid().size")
    assert grid == size, grid
    assert page.locator("#unit-legend").is_visible() and f"unit {unit}" in page.inner_text("#unit-legend")
    veiled = screenshot(page)
    values = mean_activation(size, C)[..., unit]
    gy, gx = np.mgrid[0:size, 0:size]
    seen = (gy <= 10) & (gx >= 3) & (gx <= 13) & ((gy * size + gx) % 7 != 6)  # drawn, and clear of the legend and navigator
    strong = np.unravel_index(np.argmax(np.where(seen, values, -1)), values.shape)
    weak = np.unravel_index(np.argmin(np.where(seen, values, 9)), values.shape)
    assert values[strong] == values[seen].max() > 0.9 * values.max() and values[weak] == 0
    box = page.evaluate("(() => { const r = atlasViewer.viewer.container.getBoundingClientRect(); return [r.left, r.top]; })()")

    def cell_mean(shot, gy, gx):
        c = page.evaluate(f"atlasViewer.cellCenter({size}, {gx}, {gy})")
        x, y = int(c["x"] - box[0]), int(c["y"] - box[1])
        return shot[y - 16 : y + 17, x - 16 : x + 17].mean()  # most of a ~52 px cell: robust to a pixel of shift

    assert abs(cell_mean(veiled, *strong) - cell_mean(plain, *strong)) < 6  # the unit's strongest cell stays bright
    assert cell_mean(veiled, *weak) < 0.5 * cell_mean(plain, *weak)  # a cell where it is silent darkens
    page.set_viewport_size({"width": 240, "height": 400})  # the whole atlas in < 256 px: the 8 x 8 grid's level
    page.wait_for_timeout(200)
    page.evaluate("atlasViewer.viewer.viewport.goHome(true)")
    page.wait_for_function("document.body.dataset.unitVeil === 'mixed4c/full:8'", timeout=10000)  # the coarser grid's veil
    assert page.evaluate("atlasViewer.activeGrid().size") == 8 and page.locator("img.unit-veil").count() == 1
    assert page.errors == []


def screenshot(page) -> np.ndarray:
    page.wait_for_timeout(300)
    return np.asarray(Image.open(io.BytesIO(page.locator("#osd").screenshot())).convert("L")).astype(float)


def outputs() -> Path:
    out = Path(__file__).resolve().parents[1] / "outputs"
    out.mkdir(exist_ok=True)
    return out


# ---------------------------------------------------------------------------- the real pipeline
REAL_KINDS = ["fft", "yosinski-1", "alpha"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, net, photos) -> Path:
    """A tiny real build (8 photos, mixed4c), then the unit lens's writers on 3 channels with few steps, then the gallery."""
    from tiny_run import build_tiny

    from atlas.units.features import write_visualizations
    from atlas.units.projections import write_projections
    from atlas.units.topk import top_examples

    run = build_tiny(tmp_path_factory, photos)
    channels = [0, 1, 2]
    top_examples(run, [LAYER], k=9, channels=channels, batch_size=8, workers=0, progress=False, net=net)
    write_projections(run, LAYER, method="deconvnet", channels=channels, progress=False, net=net)
    write_visualizations(run, LAYER, kinds=REAL_KINDS, channels=channels, size=32, steps=4, progress=False, net=net)
    write_gallery(run, LAYER)
    return run


def test_gallery_of_the_real_unit_lens(real_run, browser):
    tiles = real_run / "tiles"
    meta = json.loads((tiles / "units" / LAYER / "gallery.json").read_text())
    assert meta["channels"] == 512 and meta["dzi"] is not None  # 512 > 256 channels: the Deep Zoom grid
    assert meta["thumbs"][:3] == ["fft"] * 3 and meta["thumbs"][3:] == [None] * 509
    assert meta["kinds"] == REAL_KINDS and meta["methods"] == ["deconvnet"]
    assert meta["summary"]["with_top"] == 3 and meta["summary"]["skipped"] == []
    assert [a["atlas"] for a in meta["atlases"]] == ["full"]
    root = open_store(real_run)
    top = root[f"units/{LAYER}/top"]
    unit = json.loads((tiles / "units" / LAYER / "unit" / "2.json").read_text())
    n = int((top["image"][2] >= 0).sum())
    assert len(unit["top"]["examples"]) == n == 8  # 8 photos: the 9th slot is padding
    assert [e["image"] for e in unit["top"]["examples"]] == top["image"][2][:n].tolist()
    names = [p.rsplit("/", 1)[-1] for p in root["images/path"][:]]
    for e in unit["top"]["examples"]:  # the shared photos are named by synset and class
        assert e["file"] == names[e["image"]] and e["label_name"].split()[0].lower() in e["file"].lower()
    srv = make_server(real_run, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    try:
        pg = context.new_page()
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(f"{base_url(srv)}/units.html#{LAYER}/2")
        pg.wait_for_function("document.body.dataset.unit === '2'", timeout=20000)
        assert pg.locator("#unit-top .patches .frame").count() == 8 and pg.locator("#unit-top .projection-deconvnet .frame").count() == 8
        assert pg.locator("#unit-vis .vis-row").count() == 3 and pg.locator('.vis-row[data-kind="alpha"] .frame.alpha').count() == 1
        pg.screenshot(path=str(outputs() / "units_gallery_real.png"))
        assert errors == []
    finally:
        context.close()
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------------- channels not visualised yet
@pytest.fixture(scope="module")
def partial_server(tmp_path_factory):
    """The synthetic run with only some channels visualised: LAYER's 0, 2, 4, 6 (thumbnails), BIG's 5..24 (Deep Zoom)."""
    run = make_run(tmp_path_factory.mktemp("partial") / "run")
    root = open_store(run, mode="a")
    for layer, channels, keep in ((LAYER, C, {0, 2, 4, 6}), (BIG, 40, set(range(5, 25)))):
        for kind in root[f"units/{layer}/vis"].group_keys():
            root[f"units/{layer}/vis/{kind}/done"][...] = np.isin(np.arange(channels), sorted(keep))
    write_gallery(run, LAYER)
    write_gallery(run, BIG, dzi_above=16)
    with serving(run) as srv:
        yield srv


def test_only_visualised_units_are_squares_and_the_rest_are_counted(page, partial_server):
    page.goto(f"{base_url(partial_server)}/units.html#{LAYER}")
    page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
    cells = page.eval_on_selector_all("#units-grid .unit-cell", "els => els.map(e => Number(e.dataset.c))")
    assert cells == [0, 2, 4, 6]
    assert page.inner_text("#units-missing-count") == f"{C - 4} of {C} units not visualised yet"
    page.click("#units-missing-count")
    page.click('.unit-chip[data-c="5"]')
    page.wait_for_function("document.body.dataset.unit === '5'", timeout=10000)
    assert page.locator("#unit-top .patches .frame").count() == K
    assert page.errors == []


def test_deep_zoom_grid_of_visualised_units_and_zoom_buttons_off_the_units(page, partial_server):
    page.goto(f"{base_url(partial_server)}/units.html#{BIG}")
    page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
    meta = page.evaluate("unitGallery.state.meta")
    assert meta["order"] == list(range(5, 25)) and page.inner_text("#units-missing-count") == "20 of 40 units not visualised yet"
    first = page.evaluate("unitGallery.unitCenter(5)")
    scale = page.evaluate("(() => { const m = unitGallery.state.meta, it = unitGallery.state.osd.world.getItemAt(0);"
                          " const a = unitGallery.state.osd.viewport.pixelFromPoint(it.imageToViewportCoordinates(0, 0), true);"
                          " const b = unitGallery.state.osd.viewport.pixelFromPoint(it.imageToViewportCoordinates(m.cell, m.cell), true);"
                          " return b.x - a.x; })()")
    square = (first["x"] - scale / 2, first["y"] - scale / 2, first["x"] + scale / 2, first["y"] + scale / 2)
    buttons = page.eval_on_selector_all("#units-osd [title]", "els => els.map(e => { const r = e.getBoundingClientRect();"
                                        " return [r.left, r.top, r.right, r.bottom]; }).filter(r => r[2] > r[0])")
    assert buttons, "no zoom buttons found"
    for left, top, right, bottom in buttons:
        assert right <= square[0] or left >= square[2] or bottom <= square[1] or top >= square[3], (buttons, square)
    page.screenshot(path=str(outputs() / "units_gallery_partial.png"))
    page.mouse.click(first["x"], first["y"])
    page.wait_for_function("document.body.dataset.unit === '5'", timeout=10000)
    assert page.errors == []
