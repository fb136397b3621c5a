"""atlas's deconvnet, guided backpropagation and occlusion against captum's, on the real BVLC InceptionV1 and shared photos.

captum (the PyTorch attribution library) implements the same three methods independently: ``NeuronDeconvolution``
and ``NeuronGuidedBackprop`` hook the backward of every ``nn.ReLU`` module, ``Occlusion`` slides a baseline-filled
window over the input. What is defined the same must agree to float tolerance; where the two differ by construction
the test pins exactly that difference (docs/units.md and docs/inspect.md explain it):

- **Seed.** atlas starts the backward pass at the unit as a one-hot times the unit's own activation; captum's neuron
  methods take the gradient of the neuron's value, i.e. a one-hot of 1. So atlas's projection is captum's attribution
  times the activation (a positive number per image); the comparison multiplies captum's by it.
- **Guided backpropagation**: the same rule (the signal where the forward input and the signal are positive) and
  both keep LRN's own backward: equal through the whole network (mixed4c).
- **Deconvnet and LRN**: atlas passes the signal through local response normalisation unchanged (Zeiler & Fergus's
  reverse pass has no normalisation step); captum, hooking ReLUs only, applies LRN's true backward. Where no LRN lies
  between the input and the layer (conv2d0) the two are equal; deeper (mixed4c, behind both stem LRNs) they are equal
  once captum's model is given the same identity backward for its LRN, and clearly different without it.
  Max-pool switches are the same on both sides (the max pool's own backward routes to the argmax).
- **Occlusion**: atlas returns one value per square position (Zeiler & Fergus's maps); captum returns, per pixel,
  the mean over the windows covering it of (unoccluded output - occluded output). The test builds that per-pixel
  mean from atlas's maps. captum's windows stop at the last full stride step while atlas adds a last position flush
  with the bottom/right edge when the stride does not reach it; the settings here (224 px, 80 px square, stride 48)
  put both on the same 4 x 4 grid of overlapping squares.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

captum_attr = pytest.importorskip("captum.attr", reason="captum (the dev extra) is not installed")

from atlas.inspect.engine import read_image  # noqa: E402
from atlas.inspect.occlusion import GREY, occlusion_maps  # noqa: E402
from atlas.units import max_positions, project_units  # noqa: E402

PHOTOS = ("n01440764_tench.JPEG", "n10565667_scuba_diver.JPEG")


@pytest.fixture(scope="module")
def images(photos) -> torch.Tensor:
    return torch.stack([read_image(str(photos / name))[0] for name in PHOTOS])


def _layer_output(net, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The layer's output by a plain forward hook on its module (independent of atlas's own hook machinery)."""
    grabbed = []
    handle = net.module_of(layer).register_forward_hook(lambda _m, _i, out: grabbed.append(out))
    try:
        with torch.no_grad():
            net.module(images)
    finally:
        handle.remove()
    return grabbed[0]


def _strongest_units(net, layer: str, images: torch.Tensor) -> list[tuple[tuple[int, int, int], float]]:
    """Per image: the channel with the largest single activation, at its maximal position, and that activation."""
    act = _layer_output(net, layer, images)
    values, pos = max_positions(act)
    units = []
    for i in range(len(images)):
        c = int(values[i].argmax())
        y, x = (int(v) for v in pos[i, c])
        units.append(((c, y, x), float(act[i, c, y, x])))
    return units


def _captum(net, layer: str, image: torch.Tensor, unit: tuple[int, int, int], method: str) -> torch.Tensor:
    cls = captum_attr.NeuronDeconvolution if method == "deconvnet" else captum_attr.NeuronGuidedBackprop
    with warnings.catch_warnings():  # captum announces its ReLU hooks and the input's requires_grad on every call
        warnings.simplefilter("ignore", UserWarning)
        return cls(net.module, net.module_of(layer)).attribute(image[None].clone(), neuron_selector=unit)[0]


class _IdentityBackward(torch.autograd.Function):
    """The wrapped forward's value, the signal passed back unchanged (the deconvnet's rule for LRN)."""

    @staticmethod
    def forward(ctx, x, forward):
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _assert_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = float(theirs.abs().max())
    assert scale > 0, "the projection is all zero: the comparison would be empty"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------- projections


@pytest.mark.parametrize("layer", ["conv2d0", "mixed4c"])
def test_guided_backprop_equals_captum(net, images, layer):
    for image, (unit, activation) in zip(images, _strongest_units(net, layer, images), strict=True):
        ours = project_units(net, layer, image[None], [unit], method="guided")[0]
        _assert_equal(ours, _captum(net, layer, image, unit, "guided") * activation)


def test_deconvnet_equals_captum_where_no_lrn_lies_before_the_layer(net, images):
    for image, (unit, activation) in zip(images, _strongest_units(net, "conv2d0", images), strict=True):
        ours = project_units(net, "conv2d0", image[None], [unit], method="deconvnet")[0]
        _assert_equal(ours, _captum(net, "conv2d0", image, unit, "deconvnet") * activation)


def test_deconvnet_differs_from_captum_by_the_lrn_rule_only(net, images):
    lrn = net.module.lrn  # the stem's two LRNs are one module, applied twice
    assert type(lrn).__name__ == "LocalResponseNorm"
    for image, (unit, activation) in zip(images, _strongest_units(net, "mixed4c", images), strict=True):
        ours = project_units(net, "mixed4c", image[None], [unit], method="deconvnet")[0]
        true_lrn = _captum(net, "mixed4c", image, unit, "deconvnet") * activation
        forward = lrn.forward
        lrn.forward = lambda x, forward=forward: _IdentityBackward.apply(x, forward)
        try:
            passed_lrn = _captum(net, "mixed4c", image, unit, "deconvnet") * activation
        finally:
            del lrn.forward
        _assert_equal(ours, passed_lrn)
        # captum's true LRN backward gives another projection: far more than float noise apart
        assert float((ours - true_lrn).abs().max()) > 0.1 * float(ours.abs().max())


# --------------------------------------------------------------------------- occlusion


def _per_pixel_mean(result, diffs: np.ndarray) -> np.ndarray:
    """captum's aggregation of per-position differences: each pixel, the mean over the squares that cover it."""
    h, w = result.size
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for i, y in enumerate(result.ys):
        for j, x in enumerate(result.xs):
            total[y:y + result.occluder, x:x + result.occluder] += diffs[i, j]
            count[y:y + result.occluder, x:x + result.occluder] += 1
    assert count.min() > 0
    return total / count


OCCLUSION = {"occluder": 80, "stride": 48, "layer": "mixed4c"}  # 4 x 4 overlapping squares; on captum's grid too


@pytest.fixture(scope="module")
def captum_occlusion(net, images) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """captum's per-pixel occlusion attributions of image 0: the target's probability and the channel's total."""
    image, occluder, stride = images[0], OCCLUSION["occluder"], OCCLUSION["stride"]
    plain = occlusion_maps(net, image, OCCLUSION["layer"], occluder=occluder, stride=stride, project=False, incremental=False)
    chosen = {"channel": plain.channel, "target": plain.target}
    baseline = torch.tensor(GREY).view(1, 3, 1, 1).expand(1, 3, 224, 224).clone()

    def probability(x):
        return torch.softmax(net.module(x).double(), dim=-1)

    def channel_total(x):
        return _layer_output(net, OCCLUSION["layer"], x)[:, chosen["channel"]].double().sum((1, 2))

    settings = {"sliding_window_shapes": (3, occluder, occluder), "strides": (3, stride, stride), "baselines": baseline,
                "perturbations_per_eval": 16}
    with torch.no_grad():
        p = captum_attr.Occlusion(probability).attribute(image[None].clone(), target=chosen["target"], **settings)[0]
        a = captum_attr.Occlusion(channel_total).attribute(image[None].clone(), **settings)[0]
    return chosen, p, a


@pytest.mark.parametrize("incremental", [True, False])
def test_occlusion_equals_captum(net, images, captum_occlusion, incremental):
    chosen, theirs_p, theirs_a = captum_occlusion
    occluder, stride = OCCLUSION["occluder"], OCCLUSION["stride"]
    result = occlusion_maps(net, images[0], OCCLUSION["layer"], occluder=occluder, stride=stride, project=False, incremental=incremental)
    assert result.method == ("incremental" if incremental else "batched")
    assert (result.channel, result.target) == (chosen["channel"], chosen["target"])
    assert result.ys.tolist() == list(range(0, 224 - occluder + 1, stride)) == result.xs.tolist()  # captum's grid
    for theirs, plain, maps in ((theirs_p, result.unoccluded["probability"], result.probability),
                                (theirs_a, result.unoccluded["activation"], result.activation)):
        assert torch.equal(theirs[0], theirs[1]) and torch.equal(theirs[0], theirs[2])  # the window spans the channels
        ours = _per_pixel_mean(result, plain - maps)
        scale = float(np.abs(ours).max())
        assert scale > 0
        np.testing.assert_allclose(theirs[0].numpy(), ours, rtol=1e-4, atol=1e-5 * scale)
