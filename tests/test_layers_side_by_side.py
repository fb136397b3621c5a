"""Layers side by side (issue 18, part 2): corresponding positions across layers, AlignedUMAP layouts measured against
independent ones, the side-by-side page in headless Chromium with one class shading every layer, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from conftest import serving
from PIL import Image
from tiny_run import cli, one_line

from atlas.layout.aligned import corresponding_pairs, input_centres, mean_displacement
from atlas.viewer import url_of

LAYERS = ["mixed4e", "mixed5a"]  # consecutive, 14x14 and 7x7: different resolutions
HIGHLIGHT = "snorkel"


def test_positions_correspond_through_input_pixel_centres():
    # a 14x14 and a 7x7 layer of a 224 px input: centres 8 + 16k and 16 + 32k
    fine = input_centres(np.array([[0, 0], [5, 6], [13, 13]]), (14, 14))
    assert np.allclose(fine, [[8, 8], [88, 104], [216, 216]])
    coarse = input_centres(np.array([[2, 3], [6, 6], [0, 0]]), (7, 7))
    assert np.allclose(coarse, [[80, 112], [208, 208], [16, 16]])
    # same image only, nearest first, one-to-one, within the tolerance (32 px = one coarse cell)
    pairs = corresponding_pairs(np.array([0, 0, 0]), fine, np.array([0, 0, 1]), coarse, 32.0)
    assert pairs.tolist() == [[1, 0], [2, 1]]  # (5,6) <-> (2,3): 8 px; (13,13) <-> (6,6): 8 px; (0,0)'s partner is image 1's
    assert corresponding_pairs(np.array([0]), fine[:1], np.array([0]), coarse[2:], 4.0).shape == (0, 2)  # 8 px > 4 px
    # the displacement measure: a rotated copy is far apart, and Procrustes sees through the rotation
    xy = np.random.default_rng(0).random((50, 2))
    rotated = (xy - 0.5) @ np.array([[0.0, -1.0], [1.0, 0.0]]) + 0.5
    p = np.stack([np.arange(50), np.arange(50)], 1)
    assert mean_displacement(xy, xy, p) == 0.0 and mean_displacement(xy, rotated, p) > 0.2
    assert mean_displacement(xy, rotated, p, procrustes=True) < 1e-9


PHOTOS = ["n04251144_snorkel.JPEG", "n10565667_scuba_diver.JPEG", "n02066245_grey_whale.JPEG", "n01484850_great_white_shark.JPEG",
          "n07714571_head_cabbage.JPEG", "n02799071_baseball.JPEG", "n04310018_steam_locomotive.JPEG", "n09428293_seashore.JPEG"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, net, photos):
    """8 photos, 6 positions each at two consecutive layers, with attribution; aligned layouts, gridded, rendered, tiled."""
    from atlas.grid import grid
    from atlas.layout import aligned_project
    from atlas.render import render
    from atlas.sample import sample
    from atlas.tiles import make_tiles

    out = tmp_path_factory.mktemp("layers") / "run"
    listing = out.parent / "images.txt"
    listing.write_text("".join(f"{photos / n}\n" for n in PHOTOS))
    sample(listing, LAYERS, out, net=net, per_image=6, workers=0, progress=False, batch_size=8)
    report = aligned_project(out, LAYERS, compare=True, n_epochs=200)
    for layer in LAYERS:
        grid(out, layer, [3], atlas="aligned", min_count=1)
        render(out, layer, [3], atlas="aligned", quality="draft", steps=2, size=48, network=net)  # mixed5a needs 48 px or more
        make_tiles(out, layer, atlas="aligned", examples=False)
    return out, report


def test_aligned_layouts_place_the_same_samples_closer_than_independent_ones(run):
    out, r = run
    assert r["layers"] == LAYERS and r["n"] == [48, 48]
    assert r["pairs"][0] >= 16  # most images find several corresponding samples
    # measured (18 photos): aligned ~0.1, independent ~0.4-0.5 and ~0.3 even after the best similarity transform
    assert r["displacement"][0] < r["independent_procrustes"][0] <= r["independent_displacement"][0] + 1e-9
    assert r["displacement"][0] < 0.75 * r["independent_procrustes"][0]
    root = zarr.open_group(out / "store.zarr", mode="r")
    for layer in LAYERS:
        node = root[f"layouts/{layer}/aligned"]
        assert node.attrs["kind"] == "aligned" and node.attrs["layers"] == LAYERS and node["xy"].shape == (48, 2)


@pytest.fixture(scope="module")
def view(run):
    out, _ = run
    result = cli("side-by-side", out, "--layer", LAYERS[0], "--layer", LAYERS[1], "--atlas", "aligned", "--highlight", HIGHLIGHT)
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "tiles" / "layers.json").read_text())["views"][0]


def test_the_view_is_listed_and_every_layer_carries_the_highlight(view):
    out, v = view
    assert v["layers"] == LAYERS and v["atlas"] == "aligned" and v["highlight"] == HIGHLIGHT
    for name in ("layers.html", "layers.js", "layers.css"):
        assert (out / "tiles" / name).is_file()
    for layer in LAYERS:
        entry = json.loads((out / "tiles" / layer / "aligned" / "atlas.json").read_text())
        assert entry["highlight"]["class"] == HIGHLIGHT
        veil = np.asarray(Image.open(out / "tiles" / layer / "aligned" / "highlight" / "3.png"))
        assert veil.shape == (3, 3, 4) and veil[..., 3].max() > 0  # it shades some cells


def test_the_page_loads_both_layers_tiles_and_shades_both(view, browser):
    out, v = view
    context = browser.new_context(viewport={"width": 1280, "height": 720}, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    tiles: set[str] = set()
    page.on("requestfinished", lambda req: tiles.add(req.url.split("/tiles/", 1)[1].split("/")[0]) if "atlas_files" in req.url else None)
    try:
        with serving(out) as srv:
            page.goto(url_of(srv).rsplit("/", 1)[0] + f"/{v['url']}")
            page.wait_for_function("document.body.dataset.loaded === '2'", timeout=30000)
            page.wait_for_function("document.body.dataset.veils === '2'", timeout=10000)
            shown = page.evaluate("[...document.querySelectorAll('.layer-col')].map(c => c.dataset.layer)")
            veils = page.evaluate("[...document.querySelectorAll('img.veil')].map(i => [i.dataset.layer, i.naturalWidth, "
                                  "new URL(i.src).pathname])")
    finally:
        context.close()
    assert shown == LAYERS and tiles == set(LAYERS), tiles  # both layers' tiles were fetched
    assert sorted(x[0] for x in veils) == LAYERS and all(w == 3 for _, w, _ in veils)
    assert {p.split("/tiles/")[1] for _, _, p in veils} == {f"{layer}/aligned/highlight/3.png" for layer in LAYERS}
    assert not errors, errors


def test_bad_input_is_one_line(run, tmp_path):
    out, _ = run
    one_line(cli("side-by-side", out, "--layer", LAYERS[0], "--layer", f"{tmp_path / 'other'}:{LAYERS[1]}"),
             "layers of different runs")
    one_line(cli("side-by-side", out, "--layer", LAYERS[0]), "2 or 3 layers")
    one_line(cli("side-by-side", out, "--layer", LAYERS[0], "--layer", "mixed3b"), "layer 'mixed3b' was not sampled")
    one_line(cli("align", out, "--layer", LAYERS[0]), "at least two layers")
    one_line(cli("class-layers", out, "--layer", LAYERS[0], "--layer", LAYERS[1], "--class", "snorkle"), "unknown class 'snorkle'")
