"""Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7) on the real BVLC InceptionV1 and the shared photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from atlas.errors import AtlasError
from atlas.inspect import occlusion
from atlas.inspect.engine import batched_forward, forward, probabilities, read_image
from atlas.inspect.occlusion import GREY, occlude, occluder_grid, occlusion_loop, occlusion_maps, write_occlusion

LAYER = "mixed4c"


@pytest.fixture(scope="module")
def tench(photos):
    return read_image(str(photos / "n01440764_tench.JPEG"))


def _true_class(net, name: str) -> int:
    from atlas.classnames import resolve_class

    return resolve_class(name.split("_")[0], net.classes, net.weights).index


# --------------------------------------------------------------------------- the pure core


def test_grid_covers_the_image_with_the_square_inside():
    ys, xs = occluder_grid(224, 32, 8)
    assert ys.tolist() == list(range(0, 193, 8)) and xs.tolist() == ys.tolist()  # 25 positions, the last flush with the edge
    ys, xs = occluder_grid((100, 60), 30, 25)
    assert ys.tolist() == [0, 25, 50, 70] and xs.tolist() == [0, 25, 30]  # off-stride ends added so every pixel is covered
    covered = np.zeros((100, 60), bool)
    for y in ys:
        for x in xs:
            covered[y:y + 30, x:x + 30] = True
    assert covered.all() and ys.max() + 30 == 100 and xs.max() + 30 == 60


@pytest.mark.parametrize(("occluder", "stride", "words"), [(300, 8, "larger than the image"), (32, 0, "at least 1"),
                                                          (0, 8, "at least 1"), (32, 500, "larger than the image")])
def test_bad_grid_is_one_line(occluder, stride, words):
    with pytest.raises(AtlasError) as info:
        occluder_grid(224, occluder, stride)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_occlude_paints_only_the_box():
    image = torch.rand(3, 20, 30)
    out = occlude(image, [[2, 3, 7, 9], [15, 25, 40, 40]])
    assert out.shape == (2, 3, 20, 30)
    grey = torch.tensor(GREY).view(3, 1, 1)
    assert torch.equal(out[0, :, 2:7, 3:9], grey.expand(3, 5, 6)) and torch.equal(out[1, :, 15:, 25:], grey.expand(3, 5, 5))
    mask = torch.ones(20, 30, dtype=torch.bool)
    mask[2:7, 3:9] = False
    assert torch.equal(out[0][:, mask], image[:, mask])  # everything else untouched, and the input itself too
    assert not torch.equal(image[:, 2:7, 3:9], grey.expand(3, 5, 6))


# --------------------------------------------------------------------------- against the paper and the direct computation


def test_occluding_the_centre_hurts_more_than_the_corners(net, photos):
    """50 photos: the true class's probability with the central third grey is lower, on average, than with a corner
    third grey (the object is usually in the middle of an ImageNet photo)."""
    names = sorted(p.name for p in photos.glob("*.JPEG"))[::20][:50]
    assert len(names) == 50
    t = 224 // 3
    boxes = [[t, t, 2 * t, 2 * t], [0, 0, t, t], [0, 224 - t, t, 224], [224 - t, 0, 224, t], [224 - t, 224 - t, 224, 224]]
    images, targets = [], []
    for name in names:
        image, _ = read_image(str(photos / name))
        images.append(occlude(image, boxes))
        targets.append(_true_class(net, name))
    fast = occlusion._channels_last(net)  # the same network in channels-last memory, ~1.8x faster here
    _, logits = batched_forward(fast, torch.cat(images).contiguous(memory_format=torch.channels_last), batch_size=50)
    p = probabilities(logits).reshape(50, 5, -1)[torch.arange(50), :, torch.tensor(targets)].numpy()  # (50, 5)
    centre, corners = p[:, 0], p[:, 1:].mean(1)
    assert centre.mean() < corners.mean(), (centre.mean(), corners.mean())
    assert (centre < corners).mean() > 0.5  # and for most photos, not only on average


def test_the_map_equals_single_image_forwards(net, tench):
    """The batched (incremental) map at stride 24 equals one plain forward of a hand-occluded image, at the corners,
    an edge, the centre and the far corner: where the incremental crops touch the image border and where they don't."""
    image, _ = tench
    r = occlusion_maps(net, image, LAYER, occluder=32, stride=24, project=False)
    assert r.method == "incremental" and r.activation.shape == (9, 9)
    assert r.channel == int(forward(net, image[None], [LAYER])[0][LAYER][0].amax((1, 2)).argmax())  # the strongest map
    for i, j in [(0, 0), (0, 4), (4, 4), (8, 8), (3, 7)]:
        y, x = int(r.ys[i]), int(r.xs[j])
        manual = image.clone()
        manual[:, y:y + 32, x:x + 32] = torch.tensor(GREY).view(3, 1, 1)
        acts, logits = forward(net, manual[None], [LAYER])
        p = probabilities(logits)[0]
        total = float(acts[LAYER][0, r.channel].double().sum())
        assert r.activation[i, j] == pytest.approx(total, rel=1e-5)
        assert r.probability[i, j] == pytest.approx(float(p[r.target]), rel=1e-4, abs=1e-7)
        assert r.top_class[i, j] == int(p.argmax())


@pytest.fixture(scope="module")
def loop(net, tench):
    return occlusion_loop(net, tench[0], "mixed3b", occluder=48, stride=88, project=False)  # 3 x 3: corners, edges, centre


@pytest.mark.parametrize("incremental", [True, False])
def test_batched_paths_equal_the_loop(net, tench, loop, incremental):
    image, _ = tench
    maps = occlusion_maps(net, image, "mixed3b", occluder=48, stride=88, batch_size=4, project=False, incremental=incremental)
    assert maps.method == ("incremental" if incremental else "batched") and loop.method == "loop"
    assert (maps.channel, maps.target) == (loop.channel, loop.target)
    np.testing.assert_allclose(maps.activation, loop.activation, rtol=1e-5)
    np.testing.assert_allclose(maps.probability, loop.probability, rtol=1e-4, atol=1e-7)
    assert np.array_equal(maps.top_class, loop.top_class)
    assert loop.probability.min() < loop.unoccluded["probability"]  # the square does something


@pytest.mark.parametrize(("kwargs", "words"), [({"occluder": 300}, "larger than the image"), ({"stride": 0}, "at least 1"),
                                               ({"layer": "nope"}, "unknown layer"), ({"layer": "logits"}, "no spatial positions"),
                                               ({"channel": 5000}, "outside layer"), ({"target": 5000}, "outside the model")])
def test_bad_arguments_are_one_line(net, tench, kwargs, words):
    image, _ = tench
    kwargs = {"layer": LAYER, "stride": 64, **kwargs}
    with pytest.raises(AtlasError) as info:
        occlusion_maps(net, image, kwargs.pop("layer"), project=False, **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_writer_makes_a_figure_and_json(net, tench, tmp_path):
    image, picture = tench
    r = occlusion_maps(net, image, LAYER, occluder=32, stride=48, target=0)  # the true class of the tench photo is class 0
    assert r.projection.shape == (3, 224, 224) and np.abs(r.projection).sum() > 0 and r.box is not None
    summary = write_occlusion(r, picture, tmp_path / "out", net.classes)
    assert summary["figure"] == "occlusion.png" and summary["json"] == "occlusion.json"
    with Image.open(tmp_path / "out" / "occlusion.png") as png:
        assert png.format == "PNG" and png.size[0] > 1000
    numbers = json.loads((tmp_path / "out" / "occlusion.json").read_text())
    assert numbers["channel"] == r.channel == summary["channel"] and numbers["target"] == 0 == summary["target"]
    assert np.asarray(numbers["probability"]).shape == (5, 5) and numbers["ys"] == r.ys.tolist()
    assert summary["min_probability"] == pytest.approx(float(r.probability.min()))
    assert summary["target_name"] == net.classes[0] and sum(c["positions"] for c in summary["top_classes"]) <= 25
    json.dumps(summary)  # JSON-able, for the report
    with pytest.raises(AtlasError, match="computed on a 224 x 224"):
        write_occlusion(r, picture[:100], tmp_path / "bad", net.classes)
