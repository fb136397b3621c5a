"""Correspondence analysis (issue 14, Zeiler & Fergus Sec. 5.1 / Table 1): the measure is the paper's formula, it
does not depend on how the forwards are batched, identical images agree exactly, random boxes follow the seed,
and every bad boxes file is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atlas.errors import AtlasError
from atlas.inspect.correspondence import RANDOM, correspondence, occlude, parse_boxes, random_boxes, sign_change, write_correspondence
from atlas.inspect.engine import forward, read_image

DOGS = ["n02088364_beagle.JPEG", "n02085936_Maltese_dog.JPEG", "n02088466_bloodhound.JPEG", "n02091467_Norwegian_elkhound.JPEG"]


@pytest.fixture(scope="module")
def dogs(photos):
    return torch.stack([read_image(photos / name)[0] for name in DOGS])


def test_sign_change_is_the_papers_sum_over_ordered_pairs():
    rng = np.random.default_rng(3)
    signs = rng.integers(-1, 2, size=(5, 40)).astype(np.int8)
    direct = sum(int(np.sum(signs[i] != signs[j])) for i in range(5) for j in range(5) if i != j)
    fractions = [np.mean(signs[i] != signs[j]) for i in range(5) for j in range(i + 1, 5)]
    delta, mean, std = sign_change(signs)
    assert delta == direct and mean == pytest.approx(np.mean(fractions)) and std == pytest.approx(np.std(fractions))
    assert sign_change(np.stack([signs[0], signs[0]]))[0] == 0


def test_the_measure_equals_a_direct_computation_and_ignores_the_batching(net, dogs):
    images, layer = dogs[:3], "mixed3b"
    boxes = {"patch": [(40, 40, 80, 90), (100, 60, 140, 110), (10, 150, 50, 200)]}
    one = correspondence(net, images, boxes, [layer], n_random=0, batch_size=1)
    three = correspondence(net, images, boxes, [layer], n_random=0, batch_size=3)
    # directly: each image alone through the model, occluded by hand, the formula written out
    eps = []
    for image, (top, left, bottom, right) in zip(images, boxes["patch"], strict=True):
        hidden = image.clone()
        hidden[:, top:bottom, left:right] = 0.5
        a, _ = forward(net, image[None], [layer])
        b, _ = forward(net, hidden[None], [layer])
        eps.append(np.sign((a[layer] - b[layer]).numpy().ravel()))
    direct = sum(int(np.sum(eps[i] != eps[j])) for i in range(3) for j in range(3) if i != j)
    assert one.parts["patch"][layer]["delta"] == direct
    # a batch of 3 rounds differently from a batch of 1: unchanged features must still give eps exactly 0
    assert three.parts["patch"][layer]["delta"] == pytest.approx(direct, rel=2e-4)
    assert one.dims[layer] == eps[0].size and 0 < one.parts["patch"][layer]["mean"] < 1


def test_two_identical_images_with_the_same_box_change_identically(net, dogs):
    images = torch.stack([dogs[0], dogs[0], dogs[1]])
    box = (60, 60, 120, 120)
    same = correspondence(net, images, {"eye": [box, box, None]}, ["conv2d0", "mixed4c"], n_random=0)
    assert all(same.parts["eye"][layer]["delta"] == 0 for layer in ("conv2d0", "mixed4c"))
    other = correspondence(net, images, {"eye": [box, None, box]}, ["mixed4c"], n_random=0)
    assert other.parts["eye"]["mixed4c"]["delta"] > 0


def test_a_real_run_gives_finite_numbers_in_the_papers_table(net, dogs, tmp_path):
    boxes = {"centre": [(88, 88, 136, 136)] * 3, "corner": [(0, 0, 40, 48), None, (184, 176, 224, 224)]}
    table = correspondence(net, dogs[:3], boxes, ["mixed4c", "mixed5b"], n_random=2, seed=7)
    summary = write_correspondence(table, tmp_path, DOGS[:3])
    assert summary["columns"] == ["mixed4c", "mixed5b"] and [r["part"] for r in summary["rows"]] == ["centre", "corner", RANDOM]
    for row in summary["rows"]:
        for layer in ("mixed4c", "mixed5b"):
            cell = row[layer]
            assert all(np.isfinite(cell[k]) for k in ("delta", "mean", "std")) and 0 < cell["mean"] < 1
    pairs = {"centre": 3 * 2, "corner": 2 * 1}  # ordered pairs among the images with a box
    for part, n_pairs in pairs.items():
        cell = table.parts[part]["mixed5b"]
        assert cell["delta"] == pytest.approx(cell["mean"] * n_pairs * table.dims["mixed5b"])
    assert len(table.random_boxes["corner"]) == 2 and table.random_boxes["corner"][0][1] is None
    for trial in table.random_boxes["centre"]:
        assert all(b[2] - b[0] == 48 and b[3] - b[1] == 48 and 0 <= b[0] and b[2] <= 224 for b in trial)
    data = json.loads((tmp_path / "correspondence.json").read_text())
    assert data["images"] == DOGS[:3] and data["rows"] == summary["rows"] and data["boxes"]["corner"][1] is None
    assert summary["markdown"].count("\n") == 4 and "| random |" in summary["markdown"] and "<table" in summary["html"]


def test_random_boxes_follow_the_seed(net, dogs):
    boxes = [(10, 20, 50, 80), None, (100, 100, 130, 120)]
    first = random_boxes(boxes, 4, np.random.default_rng(5), 224)
    assert first == random_boxes(boxes, 4, np.random.default_rng(5), 224)
    assert first != random_boxes(boxes, 4, np.random.default_rng(6), 224)
    assert all(t[1] is None and t[0][2] - t[0][0] == 40 and t[2][3] - t[2][1] == 20 for t in first)
    run = {"nose": [(90, 90, 130, 130), (80, 100, 120, 140)]}
    a = correspondence(net, dogs[:2], run, ["mixed4c"], n_random=1, seed=11)
    b = correspondence(net, dogs[:2], run, ["mixed4c"], n_random=1, seed=11)
    assert a.random_boxes == b.random_boxes and a.random == b.random and a.random_row == b.random_row


def test_occlude_fills_only_the_box():
    images = torch.rand(2, 3, 8, 8)
    out = occlude(images, [(1, 2, 3, 5), None], fill=0.5)
    assert out.shape == (1, 3, 8, 8) and torch.all(out[0, :, 1:3, 2:5] == 0.5)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[1:3, 2:5] = False
    assert torch.equal(out[0][:, mask], images[0][:, mask])


NAMES = ["/photos/dog1.jpg", "/photos/dog2.jpg", "/other/dog3.png"]


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json", "not JSON"),
    ("[]", "must be a JSON object"),
    ('{"eye": {"dog1.jpg": [0, 0, 10, 10], "dog2": [200, 200, 230, 230]}}', "box [200, 200, 230, 230] lies outside the 224 x 224 image"),
    ('{"eye": {"dog1.jpg": [0, 0, 10, 10], "cat.jpg": [0, 0, 10, 10]}}', "image 'cat.jpg' is not among the images given"),
    ('{"eye": {"dog1.jpg": [0, 0, 10, 10], "dog2": [5, 5, 5, 20]}}', "box [5, 5, 5, 20] has zero area"),
    ('{"eye": {"dog1.jpg": [0, 0, 10, 10], "dog2": [0, 0, 10]}}', "a box is [top, left, bottom, right]"),
    ('{"eye": {"dog1.jpg": [0, 0, 10, 10], "dog2": [0, 0, 10.5, 20]}}', "must be four whole pixel numbers"),
    ('{"eye": {"dog1.jpg": [0, 0, 10, 10]}}', "needs boxes in at least two images"),
    ('{"eye": {"dog1.jpg": [0, 0, 10, 10], "/photos/dog1.jpg": [0, 0, 10, 10]}}', "has two boxes"),
    ('{"random": {"dog1": [0, 0, 10, 10], "dog2": [0, 0, 10, 10]}}', "name of the baseline row"),
])
def test_a_bad_boxes_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "boxes.json"
    path.write_text(content)
    with pytest.raises(AtlasError) as info:
        parse_boxes(path, NAMES)
    assert expected in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


def test_boxes_name_images_by_path_file_name_or_stem(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"left eye": {"/photos/dog1.jpg": [1, 2, 3, 4], "dog2.jpg": [5, 6, 7, 8], "dog3": [0, 0, 224, 224]},
                                "nose": {"dog2": [10, 10, 20, 20], "dog3.png": [30, 30, 40, 40]}}))
    boxes = parse_boxes(path, NAMES)
    assert boxes == {"left eye": [(1, 2, 3, 4), (5, 6, 7, 8), (0, 0, 224, 224)], "nose": [None, (10, 10, 20, 20), (30, 30, 40, 40)]}
    with pytest.raises(AtlasError, match="no such file"):
        parse_boxes(tmp_path / "missing.json", NAMES)
    with pytest.raises(AtlasError, match="names several of the images"):
        parse_boxes({"eye": {"dog": [0, 0, 5, 5], "b": [0, 0, 5, 5]}}, ["a/dog.jpg", "b/dog.png", "b"])
