"""The sampler's kernels (issue 19): the fused and channels-last inference copies compute what the reference NCHW
model computes, to float rounding, at every named layer, for both InceptionV1 styles; a sampled store with the
default kernels agrees with one made with the reference kernels; a layer inside a block is never read from a fused
call; a bad ``--forward`` is one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from conftest import PHOTOS, require_shared

from atlas.data import ImageDataset, batch_to_float, list_images, load_image, to_tensor
from atlas.models import INCEPTION_LAYERS, LUCID_BLOCKS, InceptionV1, Network, as_input, inference, inference_net
from atlas.models.inference import ConvReLU, FusedLRN, FusedMixed, micro_batch
from atlas.models.layers import LocalResponseNorm
from atlas.sample import forward_samples, sample

NAMED = [name for name in INCEPTION_LAYERS if name != "logits"]


def _photos(n: int) -> torch.Tensor:
    require_shared()
    paths = sorted(PHOTOS.glob("*.JPEG"))[:: 97][:n]
    return torch.stack([to_tensor(load_image(p)) for p in paths])


def _agree(reference: torch.Tensor, other: torch.Tensor) -> None:
    scale = reference.abs().max()
    assert scale > 0
    assert (other - reference).abs().max() <= 2e-5 * scale, "beyond float rounding"
    cos = torch.nn.functional.cosine_similarity(other.flatten(1), reference.flatten(1))
    assert cos.min() > 0.99999


@pytest.mark.parametrize("forward", ["fused", "channels-last"])
def test_fast_kernels_equal_the_reference_at_every_named_layer(net, forward):
    x = _photos(3)
    with torch.inference_mode():
        reference = net.activations(x, NAMED)
        fast = inference_net(net, forward, NAMED)
        out = fast.activations(as_input(x, forward), NAMED)
    if forward == "fused":  # the copy really is the fused one, and the caller's model was left as it was
        assert isinstance(fast.module.mixed4c, FusedMixed) and isinstance(fast.module.conv2d0[0], ConvReLU)
        assert not isinstance(net.module.mixed4c, FusedMixed)
    for layer in NAMED:
        assert out[layer].shape == reference[layer].shape
        _agree(reference[layer], out[layer])


def test_fused_tf_style_inception_with_same_padding():
    """Lucid's inception5h layout (TF 'SAME' pads before each convolution, 1008 classes), random weights."""
    torch.manual_seed(0)
    module = InceptionV1(LUCID_BLOCKS, 1008, style="tf").eval()
    net = Network("inceptionv1", module, input_size=224)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        reference = net.activations(x, NAMED)
        out = inference_net(net, "fused", NAMED).activations(as_input(x, "fused"), NAMED)
    for layer in NAMED:
        _agree(reference[layer], out[layer])


def test_a_layer_inside_a_block_is_read_from_the_unfused_copy(net):
    """The 3x3 branch's convolution of mixed4c, before its ReLU: a fused call never produces it, so the copy used
    is the channels-last one, and the values (negative ones included) are the reference's."""
    inner = "mixed4c.b3.1.0"
    x = _photos(2)
    with torch.inference_mode():
        reference = net.activations(x, [inner])[inner]
        fast = inference_net(net, "fused", [inner])
        out = fast.activations(as_input(x, "fused"), [inner])[inner]
    assert not isinstance(fast.module.mixed4c, FusedMixed)
    assert (reference < 0).any()
    _agree(reference, out)


def test_uint8_batches_give_the_float_images_exactly(photo_list):
    images = list_images(photo_list)
    floats = ImageDataset(images, indices=[0, 1, 2])
    raw = ImageDataset(images, indices=[0, 1, 2], uint8=True)
    batch = torch.stack([raw[i][1] for i in range(3)])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 224, 224, 3)
    expected = torch.stack([floats[i][1] for i in range(3)])
    for channels_last in (True, False):
        x = batch_to_float(batch, channels_last)
        assert torch.equal(x, expected)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_sampled_store_with_the_default_kernels_agrees_with_the_reference(net, photo_list, tmp_path):
    kwargs = dict(per_image=2, seed=1, workers=0, progress=False, net=net, max_images=5, batch_size=3, shard_size=4)
    layers = ["mixed4c", "mixed5a"]  # two layers: the deeper one's activations come from the fused pass, each its own JVP
    sample(photo_list, layers, tmp_path / "ref", forward="nchw", **kwargs)
    sample(photo_list, layers, tmp_path / "fast", **kwargs)
    ref, fast = (zarr.open_group(str(tmp_path / name / "store.zarr"), mode="r") for name in ("ref", "fast"))
    assert np.array_equal(ref["images/ok"][:], fast["images/ok"][:]) and ref["images/ok"][:].all()
    assert np.array_equal(ref["images/top5"][:, 0], fast["images/top5"][:, 0])
    for layer in layers:
        for name in ("position", "image_index", "valid"):
            assert np.array_equal(ref[f"samples/{layer}/{name}"][:], fast[f"samples/{layer}/{name}"][:])
        for name in ("activations", "attributions"):
            a = ref[f"samples/{layer}/{name}"][:].astype(np.float32)
            b = fast[f"samples/{layer}/{name}"][:].astype(np.float32)
            assert np.abs(a).max() > 0
            assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()  # float16 storage: a unit in the last place at most
    assert fast.attrs["precision"] == ref.attrs["precision"] and "forward" not in fast.attrs  # speed only: not in the store


@pytest.mark.parametrize("size, beta", [(5, 0.75), (9, 0.5), (5, 0.6), (4, 0.75)])
def test_inference_lrn_equals_the_reference(size, beta):
    """The shifted-slice band sum and the rsqrt powers (Caffe's size 5 / beta 0.75, Lucid's 9 / 0.5, any other beta
    through pow, an even window), in both memory formats; with autograd recording it is the reference module."""
    torch.manual_seed(0)
    lrn = LocalResponseNorm(size, alpha=1e-4, beta=beta, k=1.0)
    x = torch.relu(torch.randn(3, 40, 7, 9) * 40)
    for memory in (torch.contiguous_format, torch.channels_last):
        with torch.inference_mode():
            reference, fast = lrn(x), FusedLRN(lrn)(x.contiguous(memory_format=memory))
        assert reference.shape == fast.shape and (fast - reference).abs().max() <= 1e-6 * reference.abs().max()
        assert (fast != x).any()  # the band really normalises
    with torch.inference_mode():  # a bfloat16 input (autocast) is normalised in float32 and handed back in bfloat16
        low = FusedLRN(lrn)(x.bfloat16())
        assert low.dtype == torch.bfloat16 and (low.float() - reference).abs().max() <= 1e-2 * reference.abs().max()
    graph = x.clone().requires_grad_()
    FusedLRN(lrn)(graph).sum().backward()
    assert graph.grad is not None and torch.isfinite(graph.grad).all()


def test_micro_batches_give_the_rows_of_one_call(net, monkeypatch):
    """11 images run as chunks of 8 + 3 on CPU: activations, attributions and logits those of one call of 11 (to
    float rounding), each row where it belongs; the reference kernels and other sizes keep or scale the chunk."""
    x = as_input(_photos(11), "fused")
    torch.manual_seed(1)
    positions = {"mixed4c": torch.randint(0, 14, (22, 2)), "mixed3b": torch.randint(0, 28, (11, 2))}
    assert micro_batch(x, "fused") == 8 and micro_batch(x, "nchw") == 11
    assert micro_batch(torch.zeros(11, 3, 448, 448), "fused") == 2 and micro_batch(torch.zeros(3, 3, 64, 64), "fused") == 3
    layers = ["mixed3b", "mixed4c"]
    for attribution in (False, True):
        chunked = forward_samples(net, x, layers, positions, attribution)
        monkeypatch.setattr(inference, "CPU_CHUNK_PIXELS", 10**9)
        whole = forward_samples(net, x, layers, positions, attribution)
        monkeypatch.undo()
        for i in (0, 1) if attribution else (0,):
            for layer in layers:
                assert chunked[i][layer].shape == whole[i][layer].shape == (positions[layer].shape[0], whole[i][layer].shape[1])
                _agree(whole[i][layer], chunked[i][layer])
        if attribution:
            _agree(whole[2], chunked[2])
        else:
            assert chunked[2] is None and whole[2] is None


def test_unknown_forward_is_one_line(tmp_path):
    command = [sys.executable, "-c", "from atlas.cli import main; main()", "sample", "--images", str(tmp_path), "--layer", "mixed4c",
               "--out", str(tmp_path / "r"), "--forward", "fastest"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "forward" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
