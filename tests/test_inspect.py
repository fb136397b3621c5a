"""`atlas inspect` end to end (issue 14): the layer views' picture, the report (prediction, layer views, parts,
skipped images) written by the library and the CLI, and every bad input as one line.

The parts' own arithmetic is tested in test_inspect_occlusion.py, test_inspect_invariance.py,
test_inspect_correspondence.py and test_inspect_onatlas.py; here they run once with small settings inside a report.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import WEIGHTS
from tiny_run import build_tiny, cli, one_line

from atlas.inspect import report_name
from atlas.inspect.views import MARK, channel_grid, grid_layout, strongest_channel, view_layers

TENCH = "n01440764_tench.JPEG"
SMALL = ["--no-invariance", "--occluder", "112", "--stride", "112", "--layer", "conv2d0", "--layer", "mixed4c"]


# ----------------------------------------------------------------------------- the layer view picture


def test_the_channel_grid_places_each_map_on_one_scale_and_outlines_the_strongest():
    rng = np.random.default_rng(0)
    acts = rng.random((10, 5, 5)).astype(np.float32)
    acts[7, 2, 3] = 4.0  # the strongest channel
    acts[2] = -1.0  # negative values show as black
    picture, layout = channel_grid(acts, pad=1, min_tile=5)
    assert (layout.columns, layout.rows, layout.tile) == (4, 3, 5)
    assert picture.shape == (3 * 6 + 1, 4 * 6 + 1, 3)
    for c in (0, 7, 9):
        t, left, b, r = layout.box(c)
        want = np.rint(np.clip(acts[c], 0, None) / 4.0 * 255).astype(np.uint8)
        assert np.array_equal(picture[t:b, left:r, 0], want), c
    t, left, b, r = layout.box(2)
    assert not picture[t:b, left:r].any()
    assert strongest_channel(acts) == 7
    t, left, b, r = layout.box(7)
    assert (picture[t - 1, left] == MARK).all() and (picture[b, r - 1] == MARK).all()
    t, left, b, r = layout.box(0)
    assert not (picture[t - 1, left:r] == MARK).all(axis=-1).any(), "only the strongest channel is outlined"
    stretched, _ = channel_grid(acts, pad=1, min_tile=5, scale="channel")
    t, left, b, r = layout.box(0)
    assert stretched[t:b, left:r, 0].max() == 255


def test_small_maps_are_enlarged_by_whole_pixels():
    layout = grid_layout(1024, 7, 7)
    assert layout.tile == 14 and layout.columns == 32
    picture, layout = channel_grid(np.ones((3, 7, 7), np.float32))
    assert layout.tile == 14 and picture.shape[0] == 2 * 15 + 1


def test_the_default_views_are_every_spatial_layer(net):
    assert view_layers(net) == ["conv2d0", "conv2d1", "conv2d2", "mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c",
                                "mixed4d", "mixed4e", "mixed5a", "mixed5b"]


def test_report_names_are_safe_for_urls():
    assert report_name(["/x/n01440764_tench.JPEG"]) == "n01440764_tench"
    assert report_name(["a b?.png", "c.png", "d.png"]) == "a_b-and-2"
    assert report_name(["/x/..png"]) == "image"


# ----------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photos):
    """The tiny finished run of 8 photos (tests/tiny_run.py), with attribution off."""
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(photos.glob("*.JPEG"))[:8]:
        shutil.copy(path, folder / path.name)
    return build_tiny(tmp_path_factory, folder), folder


def test_a_report_without_a_run_names_the_bad_image_and_reports_the_others(tmp_path, photos):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "report"
    result = cli("inspect", photos / TENCH, bad, photos / "n01443537_goldfish.JPEG", "--out", out, "--weights", WEIGHTS, *SMALL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "broken.jpg" in result.stdout and "(1 skipped)" in result.stdout
    summary = json.loads((out / "report.json").read_text())
    assert [i["name"] for i in summary["images"]] == [TENCH, "n01443537_goldfish.JPEG"]
    assert summary["skipped"][0]["path"].endswith("broken.jpg")
    tench = summary["images"][0]
    assert tench["top"][0]["name"] == "tench" and tench["label"]["source"] == "the file name's synset"
    assert tench["target"] == tench["label"]["index"] == 0
    assert [v["layer"] for v in tench["layers"]] == ["conv2d0", "mixed4c"]
    for view in tench["layers"]:
        assert (out / view["figure"]).is_file()
        assert view["unit_card"] is None  # no run, no gallery
    page = (out / "index.html").read_text()
    assert "broken.jpg" in page and "tench" in page and "report.json" in page
    assert not list(tmp_path.glob("*.partial")), "the finished report was swapped in whole"


def test_a_report_inside_a_run_goes_into_its_viewer_and_is_listed(tiny, photos):
    run, folder = tiny
    result = cli("inspect", folder / TENCH, "--run", run, *SMALL)
    assert result.returncode == 0, result.stderr
    index = run / "tiles" / "inspect" / "n01440764_tench" / "index.html"
    assert index.is_file()
    listing = json.loads((run / "tiles" / "inspect.json").read_text())
    assert [r["name"] for r in listing["reports"]] == ["n01440764_tench"]
    summary = json.loads((index.parent / "report.json").read_text())
    assert summary["layer"] == "mixed4c" and summary["run"] == run.name  # a bare name: no path of the machine under tiles/
    assert summary["images"][0]["label"]["source"] == "the run's label"


# ----------------------------------------------------------------------------- bad input, one line each


def test_no_readable_image_is_one_line(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"GIF89a nope")
    one_line(cli("inspect", bad, "--out", tmp_path / "r", "--weights", WEIGHTS), "broken.jpg", "cannot read")
    one_line(cli("inspect", tmp_path / "missing.jpg", "--out", tmp_path / "r", "--weights", WEIGHTS), "missing.jpg", "no such file")
    assert not (tmp_path / "r").exists()


def test_an_unknown_layer_is_one_line_listing_the_layers(tmp_path, photos):
    one_line(cli("inspect", photos / TENCH, "--out", tmp_path / "r", "--weights", WEIGHTS, "--layer", "mixed9z"), "mixed9z", "mixed4c")
    one_line(cli("inspect", photos / TENCH, "--out", tmp_path / "r", "--weights", WEIGHTS, "--layer", "logits"),
             "logits", "no spatial positions")


def test_a_run_of_another_model_is_one_line(tiny, photos, tmp_path):
    run, _ = tiny
    one_line(cli("inspect", photos / TENCH, "--run", run, "--model", "resnet18"), "sampled with model inceptionv1", "not resnet18")


@pytest.mark.parametrize("args, needles", [
    (["--stride", "0"], ["inspect.stride"]),
    (["--scales", "1,x"], ["--scales", "comma-separated"]),
    (["--top", "0"], ["inspect.top"]),
    (["--device", "cuda:7"], ["cuda:7"]),
    ([], ["--run RUN", "--out DIR"]),
])
def test_bad_options_are_one_line(args, needles, photos):
    one_line(cli("inspect", photos / TENCH, *args, *([] if not args else ["--out", "/tmp/never-written-inspect"])), *needles)


def test_the_correspondence_table_of_the_dog_boxes_is_in_the_report(tmp_path, photos):
    """examples/dog_boxes.json (eyes and nose of three shared dogs, drawn by eye) through the CLI into the report."""
    from conftest import REPO

    dogs = [photos / f"{n}.JPEG" for n in ("n02088364_beagle", "n02085936_Maltese_dog", "n02110958_pug")]
    out = tmp_path / "dogs"
    result = cli("inspect", *dogs, "--out", out, "--weights", WEIGHTS, "--no-occlusion", "--no-invariance", "--layer", "mixed4c",
                 "--boxes", REPO / "examples" / "dog_boxes.json", "--n-random", "2")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "report.json").read_text())
    table = summary["correspondence"]
    assert [r["part"] for r in table["rows"]] == ["left eye", "right eye", "nose", "random"]
    assert table["columns"] == ["mixed4c", "mixed5b"]
    assert all(0.0 <= r[c]["mean"] <= 1.0 for r in table["rows"] for c in table["columns"])
    assert "left eye" in (out / "index.html").read_text()
    assert "left eye" in result.stdout and "random" in result.stdout  # the table is printed too
    one_line(cli("inspect", *dogs, "--out", tmp_path / "x", "--weights", WEIGHTS, "--boxes", tmp_path / "none.json"),
             "none.json", "no such file")


def test_bad_input_found_after_the_model_loads_is_one_line_and_leaves_no_folder(tmp_path, photos):
    """A range that crops the photo away, an unknown class, a folder given as an image: one line, before any part runs,
    and no report folder (nor its .partial) is left."""
    out = tmp_path / "r"
    one_line(cli("inspect", photos / TENCH, "--out", out, "--weights", WEIGHTS, "--shifts", "500"), "shift 500 px crops the image away")
    one_line(cli("inspect", photos / TENCH, "--out", out, "--weights", WEIGHTS, "--label", "no such class"), "unknown class")
    one_line(cli("inspect", photos, "--out", out, "--weights", WEIGHTS), "is a folder", "give image files")
    assert list(tmp_path.iterdir()) == []
