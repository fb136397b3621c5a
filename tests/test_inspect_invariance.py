"""Invariance curves (issue 14, Zeiler & Fergus Fig. 5) on the real weights and the shared photos: the transforms
are what they say, the identity is exact, the paper's finding (translation changes the first layer much more than
the top) is measured, bad ranges are one line each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atlas.classnames import resolve_class
from atlas.errors import AtlasError
from atlas.inspect.engine import forward, probabilities, read_image
from atlas.inspect.invariance import MIN_COVER, coverage, invariance_curves, load_photo, transform, write_invariance

SHIFTS = [0, 2, 5, 20, 40]


def _target(net, path) -> int:
    return resolve_class(path.name.split("_")[0], net.classes, net.weights).index


@pytest.fixture(scope="module")
def spread(photos):
    """Eight shared photos spread over the classes."""
    return sorted(photos.glob("*.JPEG"))[::125][:8]


def test_the_identity_transform_is_the_engines_crop(photos):
    path = photos / "n04251144_snorkel.JPEG"
    photo = load_photo(path)
    crop, _ = read_image(path)
    assert photo.shape[1:] != crop.shape[1:] and min(photo.shape[1:]) == 256  # uncropped, shorter side 256
    for kind, value in (("shift", 0), ("scale", 1.0), ("angle", 0.0), ("angle", 360.0)):
        assert torch.equal(transform(photo, kind, value), crop), (kind, value)


def test_the_transforms_move_the_content_as_documented():
    torch.manual_seed(0)
    photo = torch.rand(3, 230, 240)  # 3 rows above and below the 224 crop, 8 columns either side
    top, left = 3, 8
    down = transform(photo, "shift", 10, fill=0.5)
    assert torch.equal(down[:, 10:], photo[:, top:top + 214, left:left + 224])  # content moved down by 10 rows
    assert torch.all(down[:, :7] == 0.5) and torch.equal(down[:, 7:10], photo[:, :3, left:left + 224])  # the 3 rows above came in
    up = transform(photo, "shift", -5, fill=0.5)
    assert torch.equal(up[:, :219], photo[:, top + 5:top + 224, left:left + 224]) and torch.all(up[:, 222:] == 0.5)
    square = torch.rand(3, 224, 224)
    turned = transform(square, "angle", 90.0)
    assert torch.allclose(turned, torch.rot90(square, 1, dims=(1, 2)), atol=1e-5)  # counter-clockwise as displayed
    assert torch.allclose(transform(square, "angle", 180.0), torch.flip(square, dims=(1, 2)), atol=1e-5)
    small = transform(square, "scale", 0.5, fill=0.25)
    assert torch.all(small[:, :50] == 0.25) and torch.all(small[:, :, -50:] == 0.25)  # shrunk to the middle half
    assert abs(float(small[:, 60:164, 60:164].mean()) - float(square.mean())) < 0.02
    ramp = (torch.arange(224.0) / 223).reshape(1, 224, 1).expand(3, 224, 224).contiguous()  # brightness = row / 223
    rows = torch.arange(224.0)
    zoomed = (111.5 + (rows - 111.5) / 2) / 223  # twice as large about the centre: row r shows row 111.5 + (r - 111.5) / 2
    assert torch.allclose(transform(ramp, "scale", 2.0)[0, :, 100], zoomed, atol=1e-4)
    shrunk = (111.5 + (rows[70:154] - 111.5) * 2) / 223
    assert torch.allclose(transform(ramp, "scale", 0.5)[0, 70:154, 100], shrunk, atol=2e-3)
    assert coverage((3, 256, 300), "shift", 0) == 1.0 and coverage((3, 224, 224), "scale", 0.5) == 0.25


def test_identity_steps_give_distance_zero_and_the_original_probability(net, photos):
    paths = [photos / "n04251144_snorkel.JPEG", photos / "n02088364_beagle.JPEG"]
    targets = [_target(net, p) for p in paths]
    curves = invariance_curves(net, paths, shifts=[0, 3], scales=[1.0, 1.2], angles=[0, 20], targets=targets)
    assert curves.low_layer == "conv2d0" and curves.high_layer == "mixed5b" and curves.pool_high
    for kind, step in (("shift", 0), ("scale", 0), ("angle", 0)):
        assert np.all(curves.low[kind][:, step] == 0) and np.all(curves.high[kind][:, step] == 0)
        assert np.all(curves.raw_low[kind][:, step] == 0) and np.all(curves.raw_high[kind][:, step] == 0)
        assert np.array_equal(curves.probability[kind][:, step], curves.original_probability)
        assert np.all(curves.low[kind][:, 1] > 0) and np.all(curves.high[kind][:, 1] > 0)  # a real transform moves both
    crops = torch.stack([read_image(p)[0] for p in paths])
    _, logits = forward(net, crops)
    direct = probabilities(logits)[torch.arange(2), torch.tensor(targets)].numpy()
    assert np.allclose(curves.original_probability, direct, rtol=1e-4)
    assert curves.targets == targets


def test_translation_changes_the_first_layer_much_more_than_the_top(net, spread, tmp_path):
    """The paper's finding, measured on eight shared photos (InceptionV1 BVLC; conv2d0 flattened vs mixed5b's
    spatial mean; normalised distance at shifts 2 / 5 / 20 / 40 px): low 0.68 / 0.97 / 1.12 / 1.16, high 0.17 / 0.20 /
    0.22 / 0.30 (measured 14:30 UTC, 1 Dec 2026). The finding holds for InceptionV1."""
    targets = [_target(net, p) for p in spread]
    curves = invariance_curves(net, spread, shifts=SHIFTS, targets=targets)
    low, high = curves.mean("shift")["low"], curves.mean("shift")["high"]
    print("shifts", SHIFTS, "low", np.round(low, 3).tolist(), "high", np.round(high, 3).tolist())
    # larger at every shift, on average and for (nearly) every photo
    assert all(lo > 2 * hi for lo, hi in zip(low[1:], high[1:], strict=True))
    assert np.mean(curves.low["shift"][:, 1:] > curves.high["shift"][:, 1:]) >= 0.9
    # faster: two pixels already move the first layer most of the way to its 40-pixel distance, the top only partly
    assert low[1] / low[-1] > 0.5 and high[1] / high[-1] < low[1] / low[-1]
    assert low[1] - low[0] > 3 * (high[1] - high[0])
    summary = write_invariance(curves, tmp_path, [p.stem for p in spread])
    assert summary["figure"] == "invariance.png" and (tmp_path / "invariance.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "invariance.json").read_text())
    assert [im["name"] for im in data["images"]] == [p.stem for p in spread]
    assert data["images"][0]["shift"]["low"] == pytest.approx(curves.low["shift"][0].tolist(), abs=1e-6)
    assert summary["mean"]["shift"]["low"] == pytest.approx(low, abs=1e-6) and list(summary["mean"]) == ["shift"]


def test_one_layer_as_both_low_and_high_gives_the_same_curve(net, photos):
    beagle = photos / "n02088364_beagle.JPEG"
    curves = invariance_curves(net, [beagle], shifts=[0, 4], low_layer="conv2d1", high_layer="conv2d1", pool_high=False)
    assert curves.low["shift"][0, 1] > 0 and np.array_equal(curves.low["shift"], curves.high["shift"])
    _, logits = forward(net, read_image(beagle)[0][None])
    assert curves.targets == [int(logits.argmax())]  # no targets: the original's top-1 class


@pytest.mark.parametrize(("ranges", "expected"), [
    ({"shifts": [0, 300]}, "shift 300 px crops the image away"),
    ({"shifts": [-250]}, "shift -250 px crops the image away"),
    ({"scales": [1.0, 0.2]}, "scale 0.2 crops the image away"),
    ({"shifts": [2.5]}, "shift 2.5 is not a whole number of pixels"),
    ({"scales": [0]}, "scale 0 must be above 0"),
    ({"angles": [float("nan")]}, "angle nan is not a finite number"),
])
def test_a_range_that_crops_the_image_away_is_one_line(net, photos, ranges, expected):
    with pytest.raises(AtlasError) as info:
        invariance_curves(net, [photos / "n02088364_beagle.JPEG"], **ranges)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if "crops" in expected:
        assert f"{MIN_COVER:.0%}" in message and "beagle" in message


def test_bad_photos_and_layers_are_one_line(net, photos, tmp_path):
    beagle = photos / "n02088364_beagle.JPEG"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    for call, expected in ((lambda: invariance_curves(net, [bad], shifts=[0]), "broken.jpg"),
                           (lambda: invariance_curves(net, [beagle], shifts=[0], low_layer="nope"), "unknown layer 'nope'"),
                           (lambda: invariance_curves(net, [torch.rand(3, 100, 300)], shifts=[0]), "H, W >= 224"),
                           (lambda: invariance_curves(net, [], shifts=[0]), "no photos")):
        with pytest.raises(AtlasError) as info:
            call()
        assert expected in str(info.value) and "\n" not in str(info.value)
