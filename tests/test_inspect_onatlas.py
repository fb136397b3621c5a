"""The image on the atlas (atlas.inspect.onatlas): its positions placed on a real tiny run's layout, their attributions,
the figure and numbers, bad input, and the viewer's overlay in headless Chromium."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import serving
from PIL import Image
from tiny_run import CONFIG, build_tiny

from atlas import store
from atlas.errors import AtlasError
from atlas.inspect.engine import read_image
from atlas.inspect.onatlas import cell_of, image_positions, nearest_samples, place_on_atlas, weighted_points, write_placement
from atlas.models.inference import run_kernels
from atlas.viewer import STATIC, VIEWER_FILES, install_viewer, url_of

LAYER = "mixed4c"
SIZES = (4, 8)


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos) -> Path:
    """The tiny real build (8 photos x 4 positions, t-SNE), with a 4x4 and an 8x8 grid."""
    cfg = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    cfg.write_text(CONFIG.replace("sizes = [4]", f"sizes = {list(SIZES)}"))
    return build_tiny(tmp_path_factory, photos, cfg)


def _image(run: Path, i: int) -> tuple[str, torch.Tensor]:
    root = store.open_store(run)
    prep = store.attrs(root).get("preprocessing") or {}
    path = str(root["images/path"][i])
    x, _ = read_image(path, int(prep.get("resize", 256)), int(prep.get("crop", 224)))
    return path, x


def test_a_sampled_image_lands_in_the_cells_of_its_own_samples(run, net):
    root = store.open_store(run)
    samples = root[f"samples/{LAYER}"]
    image_index, position = samples["image_index"][:], samples["position"][:]
    layout = root[f"layouts/{LAYER}/full"]
    rows, xy = layout["rows"][:], layout["xy"][:]
    arithmetic = run_kernels(store.attrs(root))  # the run's precision (bfloat16 under "auto" on a CPU with native bf16)
    for i in (0, 5):
        _, x = _image(run, i)
        acts, _, (h, w), _ = image_positions(net, x, LAYER, arithmetic=arithmetic)
        placement = place_on_atlas(run, LAYER, acts, k=8, net=net)
        assert placement.hw == (h, w) == (14, 14) and placement.xy.shape == (h * w, 2)
        mine = np.flatnonzero(image_index == i)
        assert mine.size == 4
        for row in mine:
            p = int(position[row, 0]) * w + int(position[row, 1])
            at = int(np.searchsorted(rows, row))
            assert rows[at] == row and placement.exact[p] and placement.neighbours[p, 0] == row
            np.testing.assert_allclose(placement.xy[p], xy[at], atol=1e-6)
            for s in SIZES:
                assert placement.cells[s][p] == root[f"grids/{LAYER}/full/{s}/cell"][at]
                gy, gx = divmod(int(placement.cells[s][p]), s)
                assert placement.counts[s][p] == root[f"grids/{LAYER}/full/{s}/count"][gy, gx] >= 1
                assert placement.has_icon[s][p] == root[f"icons/{LAYER}/full/{s}/done"][gy, gx]
        # only the sampled positions are the run's own activations; the others are placed between their neighbours
        assert placement.exact.sum() == 4
        assert placement.method == "tsne" and placement.metric == "cosine" and "no out-of-sample" in placement.transform
        assert placement.n_samples == rows.size == 32


def test_the_attribution_is_the_samplers_h_dot_gradient(run, net):
    """Each position's attribution equals the forward-mode JVP the sampler uses (for every class at once), and the
    activations are the layer's own."""
    _, x = _image(run, 2)
    acts, attribution, (h, w), target = image_positions(net, x, LAYER)
    y, xx = 7, 3

    def edit(name, out):
        tangent = torch.zeros_like(out)
        tangent[:, :, y, xx] = out[:, :, y, xx]
        return fwAD.make_dual(out, tangent)

    with torch.no_grad(), fwAD.dual_level(), net.hooks([LAYER], edit=edit, stop=False) as captured:
        logits, jvp = fwAD.unpack_dual(net.module(x[None]))
        layer = fwAD.unpack_dual(captured[LAYER]).primal[0]
    assert target == int(logits[0].argmax())
    np.testing.assert_allclose(acts, layer.permute(1, 2, 0).reshape(h * w, -1).numpy(), rtol=1e-4, atol=1e-4)
    assert attribution[y * w + xx] == pytest.approx(float(jvp[0, target]), rel=1e-3, abs=1e-4)
    other = int(jvp[0].argmin())
    _, attr_other, _, t2 = image_positions(net, x, LAYER, target=other)
    assert t2 == other and attr_other[y * w + xx] == pytest.approx(float(jvp[0, other]), rel=1e-3, abs=1e-4)
    assert jvp[0, other] < 0  # a class this position argues against: the sign is kept
    assert np.abs(attribution).max() > 0


def test_the_streamed_search_is_the_exact_nearest_neighbours():
    rng = np.random.default_rng(0)
    data = np.maximum(rng.normal(size=(1000, 24)), 0).astype(np.float16)
    rows = np.sort(rng.choice(1000, 700, replace=False))
    q = np.maximum(rng.normal(size=(30, 24)), 0).astype(np.float32)
    x = data[rows].astype(np.float64)
    for metric in ("cosine", "euclidean", "correlation", "manhattan"):
        index, dist = nearest_samples(q, data, rows, 5, metric, block=128)
        if metric == "cosine":
            full = 1 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
        elif metric == "correlation":
            qc, xc = q - q.mean(1, keepdims=True), x - x.mean(1, keepdims=True)
            full = 1 - (qc / np.linalg.norm(qc, axis=1, keepdims=True)) @ (xc / np.linalg.norm(xc, axis=1, keepdims=True)).T
        elif metric == "manhattan":
            full = np.abs(q[:, None, :] - x[None]).sum(-1)
        else:
            full = np.linalg.norm(q[:, None, :] - x[None], axis=-1)
        want = np.argsort(full, axis=1, kind="stable")[:, :5]
        assert (index == want).mean() > 0.99, metric  # float32 against float64: a rare swap of near-ties at most
        np.testing.assert_allclose(dist, np.take_along_axis(full, index, 1), rtol=1e-3, atol=1e-4)


def test_inverse_distance_weights_and_the_grid_rule():
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]], np.float32)
    pts, exact = weighted_points(xy, np.array([[0, 1], [2, 0]]), np.array([[1.0, 3.0], [0.0, 2.0]]), np.full(2, 1e-5))
    np.testing.assert_allclose(pts[0], [0.1, 0.0], atol=1e-7)  # weights 1 and 1/9 (Shepard's power 2)
    np.testing.assert_allclose(weighted_points(xy, np.array([[0, 1]]), np.array([[1.0, 3.0]]), np.full(1, 1e-5), power=1)[0][0],
                               [0.25, 0.0], atol=1e-7)  # weights 1 and 1/3
    np.testing.assert_allclose(pts[1], [0.5, 1.0])  # distance 0: that neighbour's point exactly
    assert exact.tolist() == [False, True]
    assert cell_of(np.array([[0.0, 0.0], [1.0, 1.0], [0.26, 0.74], [0.999, 0.5]]), 4).tolist() == [0, 15, 2 * 4 + 1, 2 * 4 + 3]


def test_bad_input_is_one_line(run, net, tmp_path):
    acts = np.ones((196, 512), np.float32)
    cases = [
        (lambda: place_on_atlas(run, LAYER, acts, atlas="nope"), "no layout 'nope' for layer 'mixed4c'"),
        (lambda: place_on_atlas(run, "mixed3a", np.ones((784, 256), np.float32)), "layer 'mixed3a' was not sampled"),
        (lambda: place_on_atlas(run, LAYER, np.ones((196, 528), np.float32)), "its samples have 512 channels"),
        (lambda: place_on_atlas(run, LAYER, acts, k=0), "k (neighbours) must be a positive integer"),
        (lambda: place_on_atlas(run, LAYER, acts, net=dataclasses.replace(net, weights_sha256="0" * 64)), "other weights"),
        (lambda: image_positions(net, torch.zeros(3, 224, 224), "nolayer"), "unknown layer 'nolayer'"),
        (lambda: image_positions(net, torch.zeros(3, 224, 224), LAYER, target=5000), "target class 5000 is out of range"),
        (lambda: image_positions(net, torch.zeros(1, 3, 224, 224), LAYER), "must be a (3, H, W) tensor"),
        (lambda: place_on_atlas(tmp_path, LAYER, acts), "no atlas run"),
    ]
    for call, needle in cases:
        with pytest.raises(AtlasError) as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    root = store.open_store(other, mode="r+")
    root.attrs["model"] = "resnet18"
    with pytest.raises(AtlasError, match="sampled with model resnet18, not inceptionv1") as err:
        place_on_atlas(other, LAYER, acts, net=net)
    assert "\n" not in str(err.value)
    chunk = next(p for p in (other / "store.zarr" / "layouts" / LAYER / "full" / "xy" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-2])
    with pytest.raises(AtlasError, match=r"layouts/mixed4c/full/xy is damaged"):
        place_on_atlas(other, LAYER, acts)


@pytest.fixture(scope="module")
def written(run, net):
    """The placement of photo 1 written into the run's viewer (tiles/inspect/photo1), and photo 3's into a plain folder."""
    out = {}
    for i, folder in ((1, run / "tiles" / "inspect" / "photo1"), (3, run.parent / "plain")):
        path, x = _image(run, i)
        acts, attribution, _, target = image_positions(net, x, LAYER)
        placement = place_on_atlas(run, LAYER, acts, net=net)
        out[i] = (folder, placement, attribution,
                  write_placement(run, placement, attribution, folder, Path(path).name, target=target, classes=net.classes))
    # as the report writer (atlas.inspect) assembles a report: each image's parts in a sub-folder of NAME.partial, a
    # report.json naming them, the folder swapped in whole, and the report listed in tiles/inspect.json (no "points")
    folder, placement, attribution, _ = out[1]
    work = run / "tiles" / "inspect" / "report.partial"
    summary = write_placement(run, placement, attribution, work / "00-photo", "photo-one.jpg")
    (work / "report.json").write_text(json.dumps({"name": "report", "images": [{"atlas": {"points": "00-photo/points.json"}}]}))
    work.rename(work.with_name("report"))
    listing = run / "tiles" / "inspect.json"
    doc = json.loads(listing.read_text())
    doc["reports"].append({"name": "report", "layer": LAYER, "atlas": "full", "images": ["photo-one.jpg"],
                           "index": "inspect/report/index.html"})
    listing.write_text(json.dumps(doc))
    out["report"] = (work.with_name("report") / "00-photo", placement, attribution, summary)
    return out


def test_the_figure_strip_and_numbers(run, written):
    folder, placement, attribution, summary = written[3]
    assert summary["figure"] == "placement.png" and summary["strip"] == "placement_cells.png" and summary["json"] == "placement.json"
    assert summary["figure_size"] == 4 and summary["n_positions"] == 196 and summary["viewer"] is None  # mid of [4, 8]: 4
    fig = Image.open(folder / "placement.png")
    assert fig.size[0] > 800 and fig.size[1] > 700
    pixels = np.asarray(fig.convert("RGB")).astype(int)
    assert (np.abs(pixels - [17, 19, 24]).sum(-1) < 6).sum() > 1000  # the atlas's background, with icons and dots on it
    doc = json.loads((folder / "placement.json").read_text())
    assert len(doc["positions"]) == 196 and doc["sizes"] == list(SIZES) and doc["placement"] == "knn"
    p = doc["positions"][20]
    assert (p["y"], p["x"]) == (1, 6) and p["xy"] == pytest.approx(placement.xy[20].tolist(), abs=1e-6)
    assert p["attribution"] == pytest.approx(float(attribution[20])) and p["cells"]["8"] == int(placement.cells[8][20])
    cells = doc["cells"]["4"]
    assert sum(c["positions"] for c in cells) == 196 and cells == sorted(cells, key=lambda c: (-c["positions"], c["cell"]))
    assert summary["top_cells"] == cells[:5] and summary["n_cells"] == len(cells)
    strip = Image.open(folder / "placement_cells.png")
    assert strip.size[0] > 100 * min(len(cells), 12)
    assert (folder / "points.json").is_file() and not (run / "tiles" / "inspect" / "plain").exists()


def test_inside_the_runs_viewer_it_is_listed_and_the_page_loads_the_overlay(run, written):
    folder, placement, _, summary = written[1]
    assert summary["viewer"] == f"../../index.html?inspect=photo1#{LAYER}/full"
    points = json.loads((folder / "points.json").read_text())
    assert len(points["points"]) == 196 and points["layer"] == LAYER and len(points["ramp"]) == 9
    assert summary["viewer_in_tiles"] == f"index.html?inspect=photo1#{LAYER}/full"
    listing = json.loads((run / "tiles" / "inspect.json").read_text())["reports"]
    assert [r["name"] for r in listing] == ["photo1", "report"] and listing[0]["points"] == ["inspect/photo1/points.json"]
    inside = written["report"][3]  # written inside report.partial/00-photo: report "report", and listed by the report writer
    assert inside["viewer"] == f"../../index.html?inspect=report#{LAYER}/full" and "points" not in listing[1]
    assert "nearest of 32 sampled activations (cosine)" in inside["note"] and "no out-of-sample transform" in inside["note"]
    page = (run / "tiles" / "index.html").read_text()
    marker = '<script src="viewer.js"></script>'
    assert page == (STATIC / "index.html").read_text().replace(marker, marker + '\n  <script src="atlas_inspect.js"></script>')
    assert (run / "tiles" / "atlas_inspect.js").read_bytes() == (STATIC / "atlas_inspect.js").read_bytes()


def test_the_add_ons_compose_and_without_them_the_viewer_is_unchanged(tmp_path):
    install_viewer(tmp_path)
    for name in VIEWER_FILES:
        assert (tmp_path / name).read_bytes() == (STATIC / name).read_bytes()
    assert not (tmp_path / "atlas_inspect.js").exists()
    (tmp_path / "inspect.json").write_text('{"version": 1, "reports": []}')
    (tmp_path / "units.json").write_text('{"version": 1, "layers": []}')
    install_viewer(tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert page.index('src="viewer.js"') < page.index('src="atlas_units.js"') < page.index('src="atlas_inspect.js"')
    (tmp_path / "inspect.json").unlink()
    install_viewer(tmp_path)
    assert "atlas_inspect.js" not in (tmp_path / "index.html").read_text() and "atlas_units.js" in (tmp_path / "index.html").read_text()
    (tmp_path / "units.json").unlink()
    install_viewer(tmp_path)
    assert (tmp_path / "index.html").read_bytes() == (STATIC / "index.html").read_bytes()


def test_the_viewer_draws_the_images_dots_over_the_atlas(run, written, browser):
    folder, placement, attribution, _ = written[1]
    context = browser.new_context(viewport={"width": 1000, "height": 900}, device_scale_factor=1)
    try:
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        with serving(run) as srv:
            base = url_of(srv)
            page.goto(base)
            page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
            assert page.locator(".inspect-dot").count() == 0 and page.locator("#inspect-legend").count() == 0
            page.goto(f"{base}?inspect=photo1")
            page.wait_for_function("document.body.dataset.inspect === '196'", timeout=20000)
            assert page.locator(".inspect-dot").count() == 196
            legend = page.inner_text("#inspect-legend")
            assert Path(json.loads((folder / "points.json").read_text())["image"]).name in legend and "196 positions" in legend
            assert page.locator("#inspect-report").count() == 0  # written on its own: no report page to link to
            # a dot sits in the cell of the grid its position falls in, where the viewer draws that cell
            size = page.evaluate("atlasViewer.activeGrid().size")
            p = int(np.argmax(np.abs(attribution)))
            gy, gx = divmod(int(placement.cells[size][p]), size)
            centre = page.evaluate(f"atlasViewer.cellCenter({size}, {gx}, {gy})")
            step = page.evaluate(f"atlasViewer.cellCenter({size}, 1, 0).x - atlasViewer.cellCenter({size}, 0, 0).x")
            dot = page.evaluate(f"""(() => {{ const d = [...document.querySelectorAll('.inspect-dot')]
                .find((e) => Number(e.dataset.attribution) === {round(float(attribution[p]), 6)}).getBoundingClientRect();
                return {{ x: d.left + d.width / 2, y: d.top + d.height / 2 }}; }})()""")
            assert abs(dot["x"] - centre["x"]) <= step / 2 + 1 and abs(dot["y"] - centre["y"]) <= step / 2 + 1
            page.screenshot(path=str(_outputs() / "inspect_on_atlas.png"))
            page.goto(f"{base}?inspect=report")  # the points found through the report's report.json
            page.wait_for_function("document.body.dataset.inspect === '196'", timeout=20000)
            assert "photo-one.jpg" in page.inner_text("#inspect-legend")
            assert page.get_attribute("#inspect-report", "href") == "inspect/report/index.html"
            page.goto(f"{base}?inspect=nobody")
            page.wait_for_function("document.body.dataset.inspect === 'none'", timeout=20000)
            assert "no inspect report 'nobody'" in page.inner_text("#inspect-legend")
        assert errors == []
    finally:
        context.close()


def _outputs() -> Path:
    out = Path(__file__).resolve().parents[1] / "outputs"
    out.mkdir(exist_ok=True)
    return out
