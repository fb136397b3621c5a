"""Receptive fields from the architecture against the empirical support of the input gradient of one unit.

The support of d act[c, y, x] / d input is exactly the set of input pixels the unit depends on, except where the
network happens to cut a path: a dead ReLU, or a max pool whose switch picks another pixel of its window. So for
each unit the test sums the gradient over all channels of the unit's position and over a few random images
(different images pick different switches and kill different ReLUs); the support of that sum must (1) lie inside
the computed box, always, and (2) equal it, i.e. the computed field is tight and not merely an upper bound. (2) holds
exactly for every layer here, also at the map's corners where the box is clipped and where Caffe's ceil-mode pools
add a window that reads past the image (the formula counts such a window's padding as field, and clipping to the
image removes it again).
"""

from __future__ import annotations

import pytest
import torch

from atlas.errors import AtlasError
from atlas.models import LUCID_BLOCKS, InceptionV1, Network, StopForward, load_model
from atlas.units.receptive import Field, receptive_field, spatial_layers


def gradient_support(net: Network, layer: str, size: int, where: str = "centre", n: int = 3) -> tuple[tuple[int, int], tuple]:
    """(y, x) of the unit and the bounding box (top, left, bottom, right) of its input gradient's nonzero pixels."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with net.hooks([layer]) as captured:
        try:
            net.module(x)
        except StopForward:
            pass
    act = captured[layer]
    h, w = act.shape[-2:]
    y, xx = {"centre": (h // 2, w // 2), "corner": (h - 1, w - 1), "origin": (0, 0)}[where]
    act[:, :, y, xx].sum().backward()
    nz = (x.grad.abs().sum((0, 1)) > 0).nonzero()
    assert len(nz), "the unit depends on no pixel"
    return (y, xx), (nz[:, 0].min().item(), nz[:, 1].min().item(), nz[:, 0].max().item() + 1, nz[:, 1].max().item() + 1)


def check(net: Network, layer: str, size: int, where: str = "centre") -> Field:
    field = receptive_field(net, layer, size)
    (y, x), support = gradient_support(net, layer, size, where)
    box = field.box(y, x, size)
    top, left, bottom, right = support
    assert box[0] <= top and box[1] <= left and bottom <= box[2] and right <= box[3], (layer, where, box, support)  # inside
    assert support == box, (layer, where, field, box, support)  # and tight
    return field


@pytest.mark.parametrize(("layer", "size", "expected"), [
    ("conv2d0", 64, 7), ("conv2d2", 96, 19), ("mixed3a", 128, 59), ("mixed4c", 448, 299),
])  # fmt: skip
def test_inception_caffe_fields_match_the_gradient_support(net, layer, size, expected):
    # mixed4c's field (299 px) is larger than 224: at 448 px the centre unit's box is whole, so the comparison is of sizes.
    field = check(net, layer, size)
    assert field.size == expected
    if layer != "mixed4c":
        check(net, layer, size, "corner")  # clipped box; the last ceil-mode pool window reads past the image
        check(net, layer, size, "origin")


def test_inception_tf_same_padding_fields():
    # Lucid's style pads 'SAME' (more on the bottom/right), so offsets differ from Caffe's by a pixel; random weights
    # (the architecture alone decides a field) and the real map sizes at 224.
    torch.manual_seed(0)
    net = Network(name="inceptionv1-tf", module=InceptionV1(LUCID_BLOCKS, 1008, style="tf").eval().requires_grad_(False))
    assert check(net, "conv2d0", 224) == Field(7, 2, -2.0)
    assert check(net, "mixed3a", 224) == Field(59, 8, -22.0)
    check(net, "mixed3a", 224, "corner")


@pytest.fixture(scope="module")
def resnet18() -> Network:
    torch.manual_seed(0)
    return load_model("resnet18", pretrained=False)  # torchvision's architecture, random weights (no download here)


@pytest.mark.parametrize(("layer", "size", "expected"), [
    ("layer1", 96, Field(43, 4, -21.0)), ("layer2.0.conv1", 128, Field(51, 8, -25.0)), ("layer3", 320, Field(211, 16, -105.0)),
])  # fmt: skip
def test_resnet_block_fields_match_the_gradient_support(resnet18, layer, size, expected):
    assert check(resnet18, layer, size) == expected
    check(resnet18, layer, size, "corner")


def test_resnet50_bottleneck_and_alias_names():
    net = load_model("resnet50", pretrained=False)
    assert receptive_field(net, "layer2.0.conv1") == Field(35, 4, -17.0)  # 1x1, the stride sits in conv2 (v1.5)
    assert receptive_field(net, "layer2.0.conv2") == Field(43, 8, -21.0)
    assert receptive_field(net, "net.layer4") == Field(427, 32, -213.0)  # the wrapper's own path names the same layer


def test_box_is_clipped_at_the_image_borders():
    field = Field(size=59, stride=8, offset=-23.0)
    assert field.box(0, 0, 224) == (0, 0, 36, 36)
    assert field.box(27, 27, 224) == (193, 193, 224, 224)
    assert field.box(13, 0, 224) == (81, 0, 140, 36)
    assert Field(715, 32, -327.0).box(3, 3, 224) == (0, 0, 224, 224)


def test_layers_without_positions_and_unknown_layers_are_one_line(net, resnet18):
    with pytest.raises(AtlasError) as err:
        receptive_field(net, "logits")
    msg = str(err.value)
    assert "\n" not in msg and "no spatial positions" in msg and "mixed4c" in msg and "mixed5b" in msg
    assert "logits" not in msg.split(";")[1]
    with pytest.raises(AtlasError) as err:
        receptive_field(net, "mixed9z")
    assert "\n" not in str(err.value) and "mixed4c" in str(err.value)
    assert "logits" not in spatial_layers(net) and "conv2d0" in spatial_layers(net)
    for layer in ("fc", "avgpool"):
        with pytest.raises(AtlasError, match="no spatial positions") as err:
            receptive_field(resnet18, layer)
        assert "layer4.1.conv2" in str(err.value) and "\n" not in str(err.value)
