"""Deep-zoom tiles: DZI structure, semantic zoom, metadata, manifest, bounded memory."""

from __future__ import annotations

import json
import math
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiles_helpers import CLASSES, expected_canvas, make_tile_run, synthetic_icons

import atlas.tiles as tiles
from atlas.errors import AtlasError
from atlas.store import open_store
from atlas.tiles import BACKGROUND, GridPlan, dzi_levels, make_tiles, plan_levels, tile_spans, write_pyramid

LAYER = "mixed4c"


def read_level(atlas_dir: Path, level: int, tile_size: int, overlap: int, fmt: str) -> np.ndarray:
    """Stitch one level back from its tiles, checking every tile's size and its overlaps on the way."""
    files = sorted((atlas_dir / "atlas_files" / str(level)).glob(f"*.{fmt}"))
    coords = [tuple(map(int, re.match(r"(\d+)_(\d+)", f.stem).groups())) for f in files]
    cols, rows = max(c for c, _ in coords) + 1, max(r for _, r in coords) + 1
    assert len(files) == cols * rows
    width = height = None
    tiles_ = {}
    for f, (c, r) in zip(files, coords, strict=True):
        tiles_[c, r] = np.asarray(Image.open(f).convert("RGB"))
    # the last tile of a row/column ends the image; its span gives the size
    last = tiles_[cols - 1, rows - 1]
    width = (cols - 1) * tile_size - (overlap if cols > 1 else 0) + last.shape[1]
    height = (rows - 1) * tile_size - (overlap if rows > 1 else 0) + last.shape[0]
    out = np.zeros((height, width, 3), np.uint8)
    xs, ys = tile_spans(width, tile_size, overlap), tile_spans(height, tile_size, overlap)
    for (c, r), t in tiles_.items():
        (x0, x1), (y0, y1) = xs[c], ys[r]
        assert t.shape[:2] == (y1 - y0, x1 - x0), f"tile {c}_{r} of level {level} has size {t.shape[:2]}"
        if fmt == "png":  # overlapping pixels must agree with the neighbour already placed
            placed = out[y0:y1, x0:x1]
            seen = placed.any(axis=2)
            assert np.array_equal(placed[seen], t[seen]) or not seen.any()
        out[y0:y1, x0:x1] = t
    return out


def test_level_geometry():
    assert len(dzi_levels(1, 1)) == 1
    assert len(dzi_levels(512, 512)) == 10
    levels = dzi_levels(12800, 12800)
    assert len(levels) == 15 and levels[0] == (1, 1) and levels[-1] == (12800, 12800) and levels[-2] == (6400, 6400)
    assert dzi_levels(300, 100)[-2] == (150, 50)
    assert tile_spans(512, 254, 1) == [(0, 255), (253, 509), (507, 512)]
    assert tile_spans(100, 254, 1) == [(0, 100)]
    full, levels, owners = plan_levels([GridPlan(20, 80, 1600), GridPlan(40, 80, 3200), GridPlan(160, 80, 12800)])
    assert full == 12800 and [(g.size, g.dim) for g in owners] == [(160, 12800), (40, 3200), (20, 1600)]


@pytest.fixture(scope="module")
def png_run(tmp_path_factory) -> tuple[Path, dict]:
    run = make_tile_run(tmp_path_factory.mktemp("png") / "run", sizes=(4, 8, 16), icon=16)
    entry = make_tiles(run, LAYER, format="png", tile_size=64, overlap=2, examples=False, viewer=False)
    return run, entry


def test_dzi_descriptor_and_levels(png_run):
    run, entry = png_run
    atlas_dir = run / "tiles" / LAYER / "full"
    dzi = (atlas_dir / "atlas.dzi").read_text()
    assert 'Format="png"' in dzi and 'Overlap="2"' in dzi and 'TileSize="64"' in dzi and 'Width="256" Height="256"' in dzi
    levels = sorted(int(p.name) for p in (atlas_dir / "atlas_files").iterdir())
    assert levels == list(range(9)) == list(range(entry["levels"]))  # 256 px: levels 0 (1x1) ... 8
    for level, (w, h) in enumerate(dzi_levels(256, 256)):
        n = len(list((atlas_dir / "atlas_files" / str(level)).iterdir()))
        assert n == math.ceil(w / 64) * math.ceil(h / 64)
        img = read_level(atlas_dir, level, 64, 2, "png")
        assert img.shape[:2] == (h, w)
    assert Image.open(atlas_dir / "atlas_files" / "0" / "0_0.png").size == (1, 1)


def test_semantic_zoom_levels_show_their_own_grid(png_run):
    run, entry = png_run
    atlas_dir = run / "tiles" / LAYER / "full"
    root = open_store(run)
    assert [(g["size"], g["level"], g["canvas"]) for g in entry["grids"]] == [(4, 6, 64), (8, 7, 128), (16, 8, 256)]
    for g in entry["grids"]:
        render = root[f"grids/{LAYER}/full/{g['size']}/render"][:]
        level = read_level(atlas_dir, g["level"], 64, 2, "png")
        assert np.array_equal(level, expected_canvas(g["size"], 16, render, BACKGROUND)), f"level of grid {g['size']}"
    # the 8x8 level is NOT the 16x16 level shrunk: zooming in changes the icons
    fine = Image.fromarray(read_level(atlas_dir, 8, 64, 2, "png")).reduce(2)
    assert np.abs(np.asarray(fine).astype(int) - read_level(atlas_dir, 7, 64, 2, "png")).mean() > 10
    # levels below the coarsest grid are its 2x2 box means
    level6 = Image.fromarray(read_level(atlas_dir, 6, 64, 2, "png"))
    assert np.array_equal(read_level(atlas_dir, 5, 64, 2, "png"), np.asarray(level6.reduce(2)))


def test_levels_between_grids_are_downsampled(tmp_path):
    run = make_tile_run(tmp_path / "run", sizes=(4, 16), icon=16)
    entry = make_tiles(run, LAYER, format="png", tile_size=100, overlap=1, examples=False, viewer=False)
    atlas_dir = run / "tiles" / LAYER / "full"
    assert [g["level"] for g in entry["grids"]] == [6, 8]
    top = Image.fromarray(read_level(atlas_dir, 8, 100, 1, "png"))
    assert np.array_equal(read_level(atlas_dir, 7, 100, 1, "png"), np.asarray(top.reduce(2)))


def test_default_jpeg_tiles_are_254_with_overlap(tmp_path):
    run = make_tile_run(tmp_path / "run", sizes=(8,), icon=64)  # 512 px
    make_tiles(run, LAYER, examples=False, viewer=False)
    files = run / "tiles" / LAYER / "full" / "atlas_files" / "9"
    sizes = {f.name: Image.open(f).size for f in files.iterdir()}
    assert sizes["0_0.jpg"] == (255, 255) and sizes["1_1.jpg"] == (256, 256) and sizes["2_0.jpg"] == (5, 255)
    assert len(sizes) == 9
    level = read_level(files.parents[1], 9, 254, 1, "jpg").astype(int)
    render = open_store(run)[f"grids/{LAYER}/full/8/render"][:]
    want = expected_canvas(8, 64, render, BACKGROUND).astype(int)
    cell_means = [a.reshape(8, 64, 8, 64, 3).mean(axis=(1, 3)) for a in (level, want)]
    diff = np.abs(cell_means[0] - cell_means[1])
    assert diff.max() < 8 and diff.mean() < 1.5  # JPEG: each cell's colour, not every pixel


def test_icon_size_and_density_scale(tmp_path):
    run = make_tile_run(tmp_path / "run", sizes=(4,), icon=16)
    entry = make_tiles(run, LAYER, icon_size=32, density_scale=True, format="png", examples=False, viewer=False)
    assert entry["width"] == 128
    level = read_level(run / "tiles" / LAYER / "full", 7, 254, 1, "png")
    count = open_store(run)[f"grids/{LAYER}/full/4/count"][:]
    mean = count[count > 0].mean()
    sparse = np.argwhere((count > 0) & (count < mean / 2))[0]  # drawn smaller: background at its corner
    dense = np.argwhere(count >= mean)[0]  # full size: icon colour at its corner
    y, x = sparse * 32
    assert tuple(level[y, x]) == BACKGROUND and tuple(level[y + 16, x + 16]) != BACKGROUND
    y, x = dense * 32
    assert tuple(level[y + 1, x + 1]) != BACKGROUND


def test_cell_metadata_and_highlight(tmp_path):
    run = make_tile_run(tmp_path / "run", sizes=(40,), icon=8)
    entry = make_tiles(run, LAYER, examples=False, viewer=False, highlight="Goldfish")
    atlas_dir = run / "tiles" / LAYER / "full"
    root = open_store(run)
    count = root[f"grids/{LAYER}/full/40/count"][:]
    blocks = sorted((atlas_dir / "meta" / "40").glob("*.json"))
    assert len(blocks) == 9  # 40 cells = 3 blocks of 16 per side
    cells = {}
    for f in blocks:
        for c in json.loads(f.read_text())["cells"]:
            bx, by = map(int, f.stem.split("_"))
            assert (c["x"] // 16, c["y"] // 16) == (bx, by)
            cells[c["x"], c["y"]] = c
    assert len(cells) == int((count > 0).sum())
    c = cells[4, 2]
    assert c["n"] == count[2, 4] and c["top"][0] == [CLASSES[6], 0.9] and len(c["top"]) == 5 and c["drawn"]
    assert c["hl"] == pytest.approx(float(root[f"grids/{LAYER}/full/40/mean_attribution"][2, 4, 1]), abs=1e-4)
    assert entry["highlight"] == {"class": "goldfish", "index": 1, "dir": "highlight"}
    veil = np.asarray(Image.open(atlas_dir / "highlight" / "40.png"))
    assert veil.shape == (40, 40, 4)
    strong, weak = (0, 1), (0, 5)  # top class goldfish (0.9) vs goldfish absent
    assert cells[strong]["hl"] > cells[weak]["hl"]
    assert veil[strong[1], strong[0], 3] < veil[weak[1], weak[0], 3]
    sprites = sorted(p.name for p in (atlas_dir / "icons" / "40").iterdir())
    assert sprites == sorted(f"{bx}_{by}.jpg" for bx in range(3) for by in range(3))
    corner = np.asarray(Image.open(atlas_dir / "icons" / "40" / "2_2.jpg")).astype(int)
    assert corner.shape == (8 * 8, 8 * 8, 3)  # the last block holds 8 x 8 cells
    sprite = np.asarray(Image.open(atlas_dir / "icons" / "40" / "0_0.jpg")).astype(int)
    want = expected_canvas(40, 8, root[f"grids/{LAYER}/full/40/render"][:], BACKGROUND)[: 16 * 8, : 16 * 8].astype(int)
    assert sprite.shape == want.shape
    per_cell = [a.reshape(16, 8, 16, 8, 3).mean(axis=(1, 3)) for a in (sprite, want)]
    assert np.abs(per_cell[0] - per_cell[1]).mean() < 8  # JPEG with 1 px stripes: compare each cell's colour
    assert not (atlas_dir / "examples").exists()  # no examples asked for


def test_example_patches_in_cell_strips(tmp_path, monkeypatch):
    run = make_tile_run(tmp_path / "run", sizes=(4,), icon=16)
    calls = []

    def fake_patches(run_dir, layer, rows, size=80):
        calls.append((layer, np.asarray(rows).copy(), size))
        return np.stack([np.full((size, size, 3), r % 256, np.uint8) for r in rows])

    monkeypatch.setattr(tiles.writer, "_sample_patches", lambda: fake_patches)
    entry = make_tiles(run, LAYER, viewer=False)
    assert entry["examples"] and calls and all(size == 16 and layer == LAYER for layer, _, size in calls)
    rows = np.concatenate([r for _, r, _ in calls])
    assert np.all(np.diff(calls[0][1]) > 0) and rows.min() >= 0  # sorted, unique, no -1 padding
    meta = json.loads((run / "tiles" / LAYER / "full" / "meta" / "4" / "0_0.json").read_text())
    cell = next(c for c in meta["cells"] if (c["x"], c["y"]) == (1, 0))
    assert cell["ex"] == 5
    strip = np.asarray(Image.open(run / "tiles" / LAYER / "full" / "examples" / "4" / "0" / "1.jpg"))
    assert strip.shape == (16, 16 * 5, 3)
    nearest = open_store(run)[f"grids/{LAYER}/full/4/nearest"][0, 1]
    assert abs(int(strip[8, 16 + 8, 0]) - int(nearest[1] % 256)) < 6  # the second patch is row nearest[1]
    assert not (run / "tiles" / LAYER / "full" / "examples" / "4" / "0" / "6.jpg").exists()  # empty cell: no strip

    monkeypatch.setattr(tiles.writer, "_sample_patches", lambda: None)
    with pytest.raises(AtlasError, match="--no-examples"):
        make_tiles(run, LAYER, viewer=False)


def test_manifest_lists_every_atlas(tmp_path):
    run = make_tile_run(tmp_path / "run", sizes=(4,), icon=8)
    make_tile_run(run, atlas="compare-snorkel-scuba_diver", sizes=(4,), icon=8, axis_labels=["snorkel", "scuba diver"])
    make_tiles(run, LAYER, examples=False, viewer=False)
    make_tiles(run, LAYER, atlas="compare-snorkel-scuba_diver", examples=False, viewer=False)
    make_tiles(run, LAYER, examples=False, viewer=False)  # again: replaced, not duplicated
    manifest = json.loads((run / "tiles" / "atlases.json").read_text())["atlases"]
    assert [a["id"] for a in manifest] == [f"{LAYER}/full", f"{LAYER}/compare-snorkel-scuba_diver"]
    full, compare = manifest
    assert full["model"] == "synthetic" and full["axis_labels"] is None and full["grids"][0]["size"] == 4
    assert compare["axis_labels"] == ["snorkel", "scuba diver"] and compare["kind"] == "compare"
    assert (run / "tiles" / compare["dzi"]).is_file()
    assert not list((run / "tiles" / LAYER).glob("*.partial")) and not list((run / "tiles" / LAYER).glob("*.old"))


def test_class_names_fall_back_to_imagenet(tmp_path):
    run = make_tile_run(tmp_path / "run", sizes=(4,), icon=8, n_classes=1000, classes=False)
    make_tiles(run, LAYER, examples=False, viewer=False, highlight="1")
    meta = json.loads((run / "tiles" / LAYER / "full" / "meta" / "4" / "0_0.json").read_text())
    assert meta["cells"][0]["top"][0][0] == "tench"


def test_clear_errors(tmp_path, monkeypatch):
    run = make_tile_run(tmp_path / "run", sizes=(4,), icon=8)
    with pytest.raises(AtlasError, match="atlases with icons: full"):
        make_tiles(run, LAYER, atlas="class-goldfish", viewer=False)
    with pytest.raises(AtlasError, match="no rendered icons for layer 'mixed5b'"):
        make_tiles(run, "mixed5b", viewer=False)
    with pytest.raises(AtlasError, match="available: 4"):
        make_tiles(run, LAYER, sizes=[8], viewer=False)
    with pytest.raises(AtlasError, match="unknown class 'goldfsh'"):
        make_tiles(run, LAYER, highlight="goldfsh", examples=False, viewer=False)
    with pytest.raises(AtlasError, match="^tiles.format must be one of jpg, png, webp; got 'gif'$"):
        make_tiles(run, LAYER, format="gif", viewer=False)
    import atlas.viewer as viewer

    monkeypatch.setenv("ATLAS_OPENSEADRAGON", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AtlasError, match=rf"ATLAS_OPENSEADRAGON=.*nowhere holds no openseadragon\.min\.js.*unset it to use the copy "
                                         rf"atlas ships \(OpenSeadragon {viewer.OSD_VERSION}\)"):
        make_tiles(run, LAYER, examples=False)
    assert not (run / "tiles" / LAYER).exists()  # failed before any work


def test_memory_stays_bounded(tmp_path):
    """A 128x128 grid of 64 px icons is an 8192 px (200 MB) canvas; the writer holds a few tile rows per level,
    the zarr chunks being read and the tiles in flight, never the canvas. Measured peaks: 28-37 MB, depending on
    thread timing and on what ran before in the process (33.2 MB alone, just under the old bound of 1/6)."""
    size, icon = 128, 64
    root = open_store(tmp_path / "run", mode="a")
    from atlas.store import create_array

    images = create_array(root.require_group("icons"), "images", (size, size, icon, icon, 3), np.uint8)
    rows = [synthetic_icons(size, icon, gy) for gy in range(4)]
    for gy in range(size):
        images[gy] = rows[gy % 4]
    flat_bytes = (size * icon) ** 2 * 3
    plan = plan_levels([GridPlan(size, icon, size * icon)])[2][0]
    tracemalloc.start()
    try:
        info = write_pyramid([(plan, images, np.ones((size, size), bool), None)], tmp_path / "out", tile_size=128, threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info["levels"] == 14 and info["tiles"] > 5000
    assert peak < flat_bytes / 4, f"peak {peak / 1e6:.1f} MB for a {flat_bytes / 1e6:.0f} MB canvas"


def test_cli_tiles(tmp_path):
    from typer.testing import CliRunner

    from atlas.cli import app

    run = make_tile_run(tmp_path / "run", sizes=(4, 8), icon=8)
    result = CliRunner().invoke(app, ["tiles", str(run), "--layer", LAYER, "--no-examples", "--format", "webp", "--density-scale"])
    assert result.exit_code == 0, result.output
    assert "64x64 px" in result.output and "atlas serve" in result.output
    assert (run / "tiles" / LAYER / "full" / "atlas_files" / "6" / "0_0.webp").is_file()
    assert (run / "tiles" / "index.html").is_file() and (run / "tiles" / "openseadragon" / "openseadragon.min.js").is_file()


def test_examples_from_real_images(tmp_path):
    """The render stage's sample_patches with real image files: each example shows its own image."""
    from synthetic import make_store

    from atlas.store import write_array

    run = tmp_path / "run"
    make_store(run, layer=LAYER, n=200, per_image=4)  # 50 images, rows 4i..4i+3 from image i
    colours = [tuple(int(v) for v in (40 + 4 * i, 200 - 3 * i, (90 + 37 * i) % 256)) for i in range(50)]
    paths = []
    for i, c in enumerate(colours):
        path = tmp_path / "images" / f"img_{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (96, 80), c).save(path)
        paths.append(str(path))
    root = open_store(run, mode="a")
    write_array(root["images"], "path", np.array(paths, dtype=str))
    root[f"samples/{LAYER}"].attrs.update({"grid_hw": [14, 14]})
    make_tile_run(run, sizes=(4,), icon=16, nearest_rows=200)
    make_tiles(run, LAYER, viewer=False)
    nearest = open_store(run)[f"grids/{LAYER}/full/4/nearest"][1, 1]  # cell (1, 1): 5 valid rows
    strip = np.asarray(Image.open(run / "tiles" / LAYER / "full" / "examples" / "4" / "1" / "1.jpg")).astype(int)
    assert strip.shape == (16, 16 * 5, 3)
    for k, row in enumerate(nearest[:5]):
        got = strip[7:9, 16 * k + 7 : 16 * k + 9].reshape(-1, 3).mean(axis=0)  # centre: inside the image even at its edge
        assert np.abs(got - colours[row // 4]).max() < 12, (k, row, got, colours[row // 4])


def test_tiles_of_a_run_sampled_without_attribution(tmp_path):
    """A --no-attribution run has no attribution arrays in its grids; tiles still work, highlight fails clearly."""
    from synthetic import make_store

    from atlas.grid import grid as make_grid
    from atlas.layout import project
    from atlas.store import write_array

    run = tmp_path / "run"
    make_store(run, layer=LAYER, n=300, c=16, attributions=False)
    project(run, LAYER, method="pca")
    make_grid(run, LAYER, sizes=[4], min_count=1)
    root = open_store(run, mode="a")
    s = 4
    icons = root.require_group(f"icons/{LAYER}/full/{s}")
    write_array(icons, "images", np.full((s, s, 8, 8, 3), 200, np.uint8))
    write_array(icons, "done", np.ones((s, s), bool))
    entry = make_tiles(run, LAYER, viewer=False, examples=False)
    assert entry["grids"][0]["cells"] > 0
    metas = list((run / "tiles" / LAYER / "full" / "meta" / "4").glob("*.json"))
    cells = [c for m in metas for c in json.loads(m.read_text())["cells"]]
    assert cells and all(c["top"] == [] for c in cells)
    with pytest.raises(AtlasError, match="needs attributions"):
        make_tiles(run, LAYER, viewer=False, examples=False, highlight=0)
