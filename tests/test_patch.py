"""Adversarial patches (issue 18, part 1): placements and pasting, the flip rate, the real model, atlas-guided
search on a class-difference atlas, and bad input through the real command line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from tiny_run import build_tiny, cli, one_line

from atlas.errors import AtlasError
from atlas.patches import (
    CellRef,
    augment_images,
    cell_patch,
    flip_rate,
    guided_search,
    outcome,
    parse_cell,
    paste,
    patch_images,
    placements,
    search_table,
)
from atlas.settings import PatchSettings, RenderSettings

SNORKEL, SCUBA = "n04251144_snorkel.JPEG", "n10565667_scuba_diver.JPEG"
# Photos of other classes to paste into (sea, people, objects): none of them is a scuba diver to the model.
OTHERS = ["n04251144_snorkel.JPEG", "n02066245_grey_whale.JPEG", "n01484850_great_white_shark.JPEG", "n09428293_seashore.JPEG",
          "n01443537_goldfish.JPEG", "n02799071_baseball.JPEG", "n04310018_steam_locomotive.JPEG", "n07714571_head_cabbage.JPEG"]


# ----------------------------------------------------------------------------- the pure core
def test_sizes_and_positions_are_honoured_patch_pixels_where_asked_and_nowhere_else():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, size=(224, 224, 3), dtype=np.uint8)
    places = placements(224, (40, 100), ("corners", "centre", "random"), n_random=3, seed=5, image_index=2)
    assert [(p.size, p.name) for p in places[:5]] == [(40, "top-left"), (40, "top-right"), (40, "bottom-left"), (40, "bottom-right"),
                                                       (40, "centre")]
    assert len(places) == 2 * (5 + 3)
    expected = {"top-left": (0, 0), "top-right": (0, 184), "bottom-left": (184, 0), "bottom-right": (184, 184), "centre": (92, 92)}
    for p in places[:5]:
        assert (p.top, p.left) == expected[p.name]
    for p in places:
        patch = np.full((p.size, p.size, 3), 250, np.uint8)  # 250: a value the image never holds
        out = paste(image, patch, p.top, p.left)
        mask = np.zeros((224, 224), bool)
        mask[p.top : p.top + p.size, p.left : p.left + p.size] = True
        assert (out[mask] == 250).all(), p
        assert np.array_equal(out[~mask], image[~mask]), p  # nowhere else
        assert 0 <= p.top <= 224 - p.size and 0 <= p.left <= 224 - p.size
    # random places: a function of (seed, image, size) only; another image gets others
    assert placements(224, (100,), ("random",), 3, seed=5, image_index=2) == [p for p in places if p.size == 100 and "random" in p.name]
    assert placements(224, (100,), ("random",), 3, seed=5, image_index=3) != placements(224, (100,), ("random",), 3, seed=5, image_index=2)
    assert not np.shares_memory(paste(image, patch, 0, 0), image)


def test_the_flip_rate_on_a_hand_made_case():
    # 3 images, 4 classes, target 2. Image 0 is class 0, image 1 class 1, image 2 already the target.
    before = np.array([[5.0, 1, 0, 0], [0, 4, 1, 0], [0, 0, 3, 1]])
    after = np.array([[1.0, 0, 6, 0],   # image 0: flipped to 2 (margin 2-0: -5 -> +5, delta 10)
                      [5.0, 0, 1, 0],   # image 0: stays class 0 (margin -5 -> -4, delta 1)
                      [0.0, 2, 3, 0],   # image 1: flipped (margin 2-1: -3 -> +1, delta 4)
                      [0.0, 4, 0, 5],   # image 1: changed to 3, not the target (margin -3 -> -4, delta -1)
                      [0.0, 0, 1, 2]])  # image 2: already the target, not eligible; changed to 3 (margin 2-2: 0 -> 0)
    image_of = np.array([0, 0, 1, 1, 2])
    got = outcome(before, after, image_of, target=2)
    assert got["original"].tolist() == [0, 1, 2]
    assert got["flipped"].tolist() == [True, False, True, False, False]
    assert got["eligible"].tolist() == [True, True, True, True, False]
    assert got["changed"].tolist() == [True, False, True, True, True]
    assert np.allclose(got["delta"], [10, 1, 4, -1, 0])
    assert flip_rate(got["flipped"], got["eligible"]) == 0.5  # 2 of the 4 eligible variants
    assert flip_rate(got["flipped"][4:], got["eligible"][4:]) is None  # only an image that already is the target


def test_augmentation_is_seeded_and_keeps_the_originals_first():
    images = np.random.default_rng(1).integers(0, 255, size=(2, 64, 64, 3), dtype=np.uint8)
    out = augment_images(images, 3, seed=4)
    assert out.shape == (8, 64, 64, 3) and np.array_equal(out[:2], images)
    assert np.array_equal(out, augment_images(images, 3, seed=4)) and not np.array_equal(out, augment_images(images, 3, seed=5))


def test_a_cell_is_parsed_from_the_right():
    ref = parse_cell("outputs/a:b:mixed4c:compare-x-vs-y:8:3,5")
    assert ref == CellRef(ref.run, "mixed4c", "compare-x-vs-y", 8, 3, 5) and str(ref.run) == "outputs/a:b"
    for bad in ("run:mixed4c:full:8", "run:mixed4c:full:8:3", "run:mixed4c:full:x:1,2", ":mixed4c:full:8:1,2"):
        with pytest.raises(AtlasError, match="RUN:LAYER:ATLAS:GRID:X,Y"):
            parse_cell(bad)


# ----------------------------------------------------------------------------- the real model
def test_a_large_crop_of_a_scuba_diver_photo_flips_some_photos_to_scuba_diver(net, photos, tmp_path):
    """The sanity bound: a 160 px piece of the shared scuba-diver photo (most of it) pasted into 8 photos of other
    classes turns some of them into 'scuba diver', and not every one everywhere; the report and figure are written."""
    from PIL import Image

    scuba = np.asarray(Image.open(photos / SCUBA).convert("RGB").resize((224, 224)))
    settings = PatchSettings(sizes=(160,), positions=("centre", "corners"), n_random=0, batch_size=8, figure=3)
    r = patch_images([photos / n for n in OTHERS], patch=scuba[20:200, 20:200], target="scuba diver", settings=settings,
                     out=tmp_path / "rep", net=net)
    assert r["target"] == "scuba diver" and r["n_images"] == 8 and r["n_variants"] == 40 and r["already_target"] == 0
    # measured: 18 of 40 (45%) here; the bound is loose on purpose (a sanity bound, not a benchmark)
    assert 0.15 <= r["flip_rate"] <= 0.9, r["flip_rate"]
    assert r["mean_delta"] > 3.0
    assert sum(row["flip_rate"] > 0 for row in r["per_image"]) >= 2
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["flip_rate"] == r["flip_rate"]
    assert (tmp_path / "rep" / "figure.png").stat().st_size > 10_000
    # a patch of the photo's own class changes nothing: pasting snorkel into snorkel keeps it snorkel
    own = patch_images([photos / SNORKEL], patch=photos / SNORKEL, target="scuba diver", settings=settings, net=net)
    assert own["flip_rate"] == 0.0 and own["per_image"][0]["after"] == "snorkel"


# ----------------------------------------------------------------------------- atlas-guided search
@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, net, photos):
    """mixed4c samples with attribution (4 per image) of 6 photos, and the atlas compare snorkel vs scuba diver (3x3)."""
    from atlas.classes import compare_atlas
    from atlas.sample import sample

    names = [SNORKEL, SCUBA, *OTHERS[1:5]]
    listing = tmp_path_factory.mktemp("cmp") / "images.txt"
    listing.write_text("".join(f"{photos / n}\n" for n in dict.fromkeys(names)))
    run = tmp_path_factory.mktemp("run") / "r"
    sample(listing, ["mixed4c"], run, net=net, per_image=4, workers=0, progress=False, batch_size=6)
    name = compare_atlas(run, "mixed4c", "snorkel", "scuba diver", top_k=20, sizes=(3,), quality="draft", tiles=False,
                         render=RenderSettings(quality="draft", steps=4, size=32), net=net)
    return run, name


def test_guided_search_ranks_cells_toward_b_and_measures_each(compare_run, photos, net, tmp_path):
    run, name = compare_run
    settings = PatchSettings(sizes=(96,), positions=("centre", "top-left"), n_random=0, top=2, augment=1, batch_size=8)
    r = guided_search(run, "mixed4c", name, images=[photos / SNORKEL], settings=settings, out=tmp_path / "s", net=net)
    assert r["classes"] == ["snorkel", "scuba diver"] and r["grid"] == 3 and r["n_images"] == 2
    root = zarr.open_group(run / "store.zarr", mode="r")
    g = root[f"grids/mixed4c/{name}/3"]
    score = np.where(g["count"][:] > 0, g["mean_attribution"][:, :, 983] - g["mean_attribution"][:, :, 801], -np.inf)
    best = {(int(f % 3), int(f // 3)) for f in np.argsort(-score, axis=None, kind="stable")[:2]}
    assert {(row["x"], row["y"]) for row in r["rows"]} == best  # the two cells of most attribution toward B were tried
    assert len(r["rows"]) + sum(r["skipped"].values()) == 4  # each with its icon and its dataset patch
    for row in r["rows"]:
        assert row["n_variants"] == 4 and np.isclose(row["attribution"], score[row["y"], row["x"]])
        assert row["flip_rate"] is None or 0.0 <= row["flip_rate"] <= 1.0
    keys = [(-(row["flip_rate"] or 0.0), -row["mean_delta"]) for row in r["rows"]]
    assert keys == sorted(keys)  # best first
    assert (tmp_path / "s" / "table.txt").read_text().splitlines()[0].startswith("rank")
    assert len(list((tmp_path / "s" / "cells").glob("*.png"))) == len(r["rows"])
    assert search_table(r["rows"]).count("\n") == len(r["rows"]) + 1
    # a cell's icon is the stored icon, its dataset patch a photo crop
    x, y = r["rows"][0]["x"], r["rows"][0]["y"]
    icon = cell_patch(CellRef(run, "mixed4c", name, 3, x, y), "icon")
    assert np.array_equal(icon, root[f"icons/mixed4c/{name}/3/images"][y, x])


def test_patch_search_prints_the_ranked_table(compare_run, photos):
    run, name = compare_run
    result = cli("patch-search", run, "--layer", "mixed4c", "--atlas", name, "--images", photos / SNORKEL, "--top", "2", "--size", "96",
                 "--position", "centre", "--random", "0", "--kind", "icon")
    assert result.returncode == 0, result.stderr
    assert "rank" in result.stdout and "flip rate" in result.stdout and "snorkel" in result.stdout
    # a full (non-compare) atlas, a missing atlas: one line each
    one_line(cli("patch-search", run, "--layer", "mixed4c", "--atlas", "nope", "--images", photos / SNORKEL), "no atlas 'nope'")


def test_a_cell_of_a_compare_atlas_targets_its_second_class(compare_run, photos, net, tmp_path):
    run, name = compare_run
    root = zarr.open_group(run / "store.zarr", mode="r")
    done = root[f"icons/mixed4c/{name}/3/done"][:]
    gy, gx = (int(v[0]) for v in np.nonzero(done))
    r = patch_images([photos / SNORKEL], cell=f"{run}:mixed4c:{name}:3:{gx},{gy}",
                     settings=PatchSettings(sizes=(64,), positions=("centre",)), net=net)
    assert r["target"] == "scuba diver" and r["n_variants"] == 1


# ----------------------------------------------------------------------------- bad input: one line each
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photo_list):
    return build_tiny(tmp_path_factory, photo_list)


def test_bad_input_is_one_line(tiny, photos, tmp_path):
    snorkel = photos / SNORKEL
    one_line(cli("patch", "--images", snorkel, "--patch", snorkel, "--size", "300"), "patch.sizes", "224")
    one_line(cli("patch", "--images", snorkel, "--patch", snorkel, "--position", "middle"), "patch.positions", "middle")
    one_line(cli("patch", "--images", snorkel, "--patch", snorkel, "--target", "scubadiverr", "--out", tmp_path / "o"),
             "unknown class 'scubadiverr'", "scuba diver")
    one_line(cli("patch", "--images", snorkel), "exactly one of --patch")
    one_line(cli("patch", "--images", snorkel, "--patch", tmp_path / "none.png"), "patch file not found")
    one_line(cli("patch", "--images", snorkel, "--cell", f"{tiny}:mixed4c:full:4"), "RUN:LAYER:ATLAS:GRID:X,Y")
    count = zarr.open_group(tiny / "store.zarr", mode="r")["grids/mixed4c/full/4/count"][:]
    ey, ex = (int(v[0]) for v in np.nonzero(count == 0))
    one_line(cli("patch", "--images", snorkel, "--cell", f"{tiny}:mixed4c:full:4:{ex},{ey}"), "is empty")
    one_line(cli("patch", "--images", snorkel, "--cell", f"{tiny}:mixed4c:full:4:9,1"), "outside the 4x4 grid")
    one_line(cli("patch", "--images", snorkel, "--cell", f"{tiny}:mixed4c:full:5:1,1"), "no 5x5 grid")
    # a grid binned but never rendered: its cells have no icon (the dataset patch is still there)
    run = tmp_path / "run"
    shutil.copytree(tiny, run)
    assert cli("grid", run, "--layer", "mixed4c", "--grid", "3", "--min-count", "1").returncode == 0
    count3 = zarr.open_group(run / "store.zarr", mode="r")["grids/mixed4c/full/3/count"][:]
    fy, fx = (int(v[0]) for v in np.nonzero(count3 > 0))
    one_line(cli("patch", "--images", snorkel, "--cell", f"{run}:mixed4c:full:3:{fx},{fy}"), "has no rendered icon", "atlas render")
    example = cell_patch(CellRef(run, "mixed4c", "full", 3, fx, fy), "example")
    assert example.shape == (112, 112, 3) and not (example == 127).all()
    one_line(cli("patch-search", tiny, "--layer", "mixed4c", "--atlas", "full"), "not a class-difference atlas")
