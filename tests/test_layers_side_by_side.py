"""Layers side by side (issue 18, part 2): corresponding positions across layers, AlignedUMAP layouts measured against
independent ones, the side-by-side page in headless Chromium with one class shading every layer, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from conftest import serving
from PIL import Image
from tiny_run import cli, one_line, snapshot

from atlas.errors import AtlasError
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
        grid(out, layer, sizes=[3], atlas="aligned", min_count=1)
        render(out, layer, [3], atlas="aligned", quality="draft", steps=2, size=48, net=net)  # mixed5a needs 48 px or more
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


def test_the_layers_settings_are_the_commands_and_the_library_functions_defaults(run):
    import dataclasses
    import inspect

    from atlas.layers import class_layers, side_by_side
    from atlas.layout.aligned import aligned_layouts
    from atlas.settings import STAGES, LayersSettings

    assert STAGES["layers"] is LayersSettings
    d = LayersSettings()

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}

    assert {k: v for k, v in defaults(aligned_layouts).items() if k != "compare"} == {
        "atlas": d.aligned_atlas, "n_neighbors": d.n_neighbors, "min_dist": d.min_dist, "seed": d.seed, "tolerance": d.tolerance,
        "alignment": d.alignment, "n_epochs": d.n_epochs}
    assert defaults(side_by_side)["atlas"] == d.atlas and defaults(side_by_side)["highlight"] == d.highlight
    # class_layers takes the settings object itself (None: these defaults) and repeats none of its fields
    params = inspect.signature(class_layers).parameters
    assert params["settings"].default is None and not {f.name for f in dataclasses.fields(LayersSettings)} & set(params)
    # bad options: one line naming the [layers] setting, before the store is touched
    out, _ = run
    before = snapshot(out / "store.zarr")
    two = ("--layer", LAYERS[0], "--layer", LAYERS[1])
    one_line(cli("align", out, *two, "--tolerance", "0"), "layers.tolerance must be a number > 0; got 0.0")
    one_line(cli("align", out, *two, "--neighbors", "1"), "layers.n_neighbors must be an integer >= 2; got 1")
    one_line(cli("align", out, *two, "--min-dist", "2"), "layers.min_dist must be a number in 0.0..1.0; got 2.0")
    one_line(cli("align", out, *two, "--n-epochs", "0"), "layers.n_epochs must be an integer >= 1; got 0")
    one_line(cli("class-layers", out, *two, "--class", HIGHLIGHT, "--top-k", "0"), "layers.top_k must be an integer >= 1; got 0")
    one_line(cli("class-layers", out, *two, "--class", HIGHLIGHT, "--method", "mds"), "layers.method must be one of umap, tsne, pca")
    one_line(cli("class-layers", out, *two, "--class", HIGHLIGHT, "--grid", "1"), "layers.sizes must be a list of integers in 2..2048")
    one_line(cli("class-layers", out, *two, "--class", HIGHLIGHT, "--quality", "ultra"), "layers.quality must be one of draft")
    one_line(cli("side-by-side", out, *two, "--atlas", " "), "layers.atlas must be an atlas name")
    with pytest.raises(AtlasError, match=r"layers.tolerance must be a number >= 0.0; got -1.0"):
        aligned_layouts(out, LAYERS, normalize=None, save=None, tolerance=-1.0)
    with pytest.raises(AtlasError, match="layers.quality must be one of draft"):
        class_layers(out, HIGHLIGHT, LAYERS, quality="ultra")
    assert snapshot(out / "store.zarr") == before


def test_align_command_writes_the_aligned_layouts_and_a_second_run_is_the_same(run):
    out, r = run
    args = ("align", out, "--layer", LAYERS[0], "--layer", LAYERS[1], "--atlas", "aligned-cli", "--n-epochs", "100")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    # the same correspondence as the library call of the fixture (same samples, same tolerance)
    assert lines[0].startswith(f"{LAYERS[0]} -> {LAYERS[1]}: {r['pairs'][0]} corresponding samples (of 48 and 48)"), lines
    assert lines[-1].startswith(f"layouts {LAYERS[0]}/aligned-cli, {LAYERS[1]}/aligned-cli in "), lines
    root = zarr.open_group(out / "store.zarr", mode="r")
    xy = {}
    for layer in LAYERS:
        node = root[f"layouts/{layer}/aligned-cli"]
        assert node.attrs["kind"] == "aligned" and node.attrs["layers"] == LAYERS and node.attrs["params"]["n_epochs"] == 100
        xy[layer] = node["xy"][:]
        assert xy[layer].shape == (48, 2) and np.isfinite(xy[layer]).all() and xy[layer].min() >= 0 and xy[layer].max() <= 1
    assert root[f"layouts/{LAYERS[1]}/aligned-cli"].attrs["pairs_before"] == r["pairs"][0]
    second = cli(*args)  # the same seed and settings: the same layouts, the same report
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[0] == lines[0]
    root = zarr.open_group(out / "store.zarr", mode="r")
    for layer in LAYERS:
        assert np.array_equal(root[f"layouts/{layer}/aligned-cli"]["xy"][:], xy[layer])


def test_class_layers_command_builds_a_class_atlas_per_layer_and_one_view(run):
    out, _ = run
    args = ("class-layers", out, "--layer", LAYERS[0], "--layer", LAYERS[1], "--class", HIGHLIGHT, "--top-k", "20", "--method", "pca",
            "--grid", "3", "--steps", "2", "--size", "48")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    name = "class-snorkel"
    assert first.stdout.splitlines()[-1].startswith(f"atlas {name} of {', '.join(LAYERS)} -> "), first.stdout
    root = zarr.open_group(out / "store.zarr", mode="r")
    for layer in LAYERS:
        assert f"layouts/{layer}/{name}" in root and root[f"layouts/{layer}/{name}"]["xy"].shape[0] >= 4
        entry = json.loads((out / "tiles" / layer / name / "atlas.json").read_text())
        assert entry["highlight"]["class"] == HIGHLIGHT
        assert (out / "tiles" / layer / name / "highlight" / "3.png").is_file()
    views = [v for v in json.loads((out / "tiles" / "layers.json").read_text())["views"] if v["atlas"] == name]
    assert len(views) == 1 and views[0]["layers"] == LAYERS and views[0]["highlight"] == HIGHLIGHT
    assert views[0]["ids"] == [f"{layer}/{name}" for layer in LAYERS]

    def arrays(layer: str) -> dict[str, int]:  # the layout's arrays (its group's attrs record the run and may be rewritten)
        return {k: v for k, v in snapshot(out / "store.zarr" / "layouts" / layer / name).items() if k != "zarr.json"}

    kept = {layer: arrays(layer) for layer in LAYERS}
    second = cli(*args)  # an identical second run: the same class atlases, the view listed once
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]
    assert {layer: arrays(layer) for layer in LAYERS} == kept
    views2 = [v for v in json.loads((out / "tiles" / "layers.json").read_text())["views"] if v["atlas"] == name]
    assert views2 == views


def test_aligned_positions_carry_the_first_layers_positions_to_the_others(run, net, photos, tmp_path):
    from atlas.sample import corresponding_positions, sample

    # the pure mapping: 14x14 centres 8 + 16k fall in the 7x7 cell k // 2; a 7x7 position to 14x14 is the cell below-right
    assert corresponding_positions(np.array([[0, 0], [5, 6], [13, 13]]), (14, 14), (7, 7), 224).tolist() == [[0, 0], [2, 3], [6, 6]]
    assert corresponding_positions(np.array([[0, 0], [6, 3]]), (7, 7), (14, 14), 224).tolist() == [[1, 1], [13, 7]]
    out = tmp_path / "run"
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{photos / n}\n" for n in PHOTOS[:3]))
    sample(listing, LAYERS, out, net=net, per_image=4, workers=0, progress=False, attribution=False, aligned_positions=True)
    root = zarr.open_group(out / "store.zarr", mode="r")
    assert root.attrs["aligned_positions"] is True
    pos = {layer: root[f"samples/{layer}/position"][:] for layer in LAYERS}
    images = {layer: root[f"samples/{layer}/image_index"][:] for layer in LAYERS}
    assert np.array_equal(images[LAYERS[0]], images[LAYERS[1]])
    assert np.array_equal(pos[LAYERS[1]], corresponding_positions(pos[LAYERS[0]], (14, 14), (7, 7), 224))
    # every sample finds its partner (8 px apart in both axes; the independent draw of the fixture pairs only part of them)
    pairs = corresponding_pairs(images[LAYERS[0]], input_centres(pos[LAYERS[0]], (14, 14)), images[LAYERS[1]],
                                input_centres(pos[LAYERS[1]], (7, 7)), 32.0)
    assert pairs.shape[0] == 12
    # the setting is part of what a resume must match, both ways; the refused run's store is unchanged
    kept = snapshot(out / "store.zarr")
    with pytest.raises(AtlasError, match=r"different settings \(aligned_positions: True there, False now\)"):
        sample(listing, LAYERS, out, net=net, per_image=4, workers=0, progress=False, attribution=False)
    assert snapshot(out / "store.zarr") == kept
    fixture_run, _ = run
    assert "aligned_positions" not in zarr.open_group(fixture_run / "store.zarr", mode="r").attrs  # off: the store as before
    kept = snapshot(fixture_run / "store.zarr")
    with pytest.raises(AtlasError, match=r"different settings \(aligned_positions: False there, True now\)"):
        sample(fixture_run.parent / "images.txt", LAYERS, fixture_run, net=net, per_image=6, workers=0, progress=False,
               batch_size=8, aligned_positions=True)
    assert snapshot(fixture_run / "store.zarr") == kept
