"""Inference-only copies of a model, for the passes that only read activations (sampling, the unit lens' top-k
pass, one image under the microscope): the same function as the model, less memory traffic.

Three forwards, named by :data:`FORWARDS` (the sampler's ``forward`` setting):

- ``"nchw"``: the model itself, in the memory format it was loaded in (the reference arithmetic);
- ``"channels-last"``: a channels-last copy; oneDNN's convolutions read and write NHWC without reordering, about
  1.7x the NCHW forward of InceptionV1 to mixed4c on this CPU (bench/sample.py);
- ``"fused"``: channels-last, and for InceptionV1 also every convolution with the ReLU after it as one oneDNN call
  (the ReLU applied as the output is written: a whole pass over the activations fewer, which was 12% of the
  channels-last forward's time), the three 1x1 heads of each inception block as one convolution whose weights are
  concatenated once instead of every call, and the local response normalisation's band sum, scale and offset as
  one convolution with a bias. Without attribution nothing else is needed; forward-mode AD has no rule for the
  fused call, so :func:`inference_net` gives a channels-last copy when a pass needs dual numbers.

The copies are made once per module and kept as long as it lives (a weak-key cache), so calling these functions
for every batch costs a dictionary look-up. Their results equal the reference's to float rounding (the order of the
sums differs; tests/test_sample.py bounds the difference); a copy, because converting the caller's module would
change the arithmetic of every other user of it.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from atlas.errors import AtlasError
from atlas.models.inception import INCEPTION_LAYERS, InceptionV1, Mixed
from atlas.models.layers import LocalResponseNorm, SamePad
from atlas.models.network import Network
from atlas.models.precision import computing_in, run_precision
from atlas.settings import FORWARDS

_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pointwise_available() -> bool:
    """Whether this torch has oneDNN's fused convolution + activation op (built with mkldnn; every CPU wheel is)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class ConvReLU(nn.Module):
    """ReLU(conv(x)) for inference. On CPU, outside autograd, one oneDNN call that applies the ReLU as it writes the
    output; elsewhere (CUDA, a pass that records gradients) the two plain ops, so it is always correct."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stride, self.padding = stride, padding
        self.fused = _pointwise_available()

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvReLU:
        if conv.groups != 1 or conv.dilation != (1, 1) or len(set(conv.stride)) != 1 or len(set(conv.padding)) != 1:
            raise AtlasError(f"cannot fuse {conv}: only square, ungrouped, undilated convolutions")
        return cls(conv.weight, conv.bias, conv.stride[0], conv.padding[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == self.weight.dtype:
            p, s = [self.padding] * 2, [self.stride] * 2
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, p, s, [1, 1], 1, "relu", [], "")
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding))


def _fuse_conv(block: nn.Sequential) -> nn.Sequential:
    """``[SamePad,] conv, ReLU`` as ``[SamePad,] ConvReLU``."""
    *pad, conv, relu = block
    if not isinstance(relu, nn.ReLU) or not isinstance(conv, nn.Conv2d) or any(not isinstance(p, SamePad) for p in pad):
        raise AtlasError(f"cannot fuse {block}: expected [SamePad,] Conv2d, ReLU")
    return nn.Sequential(*pad, ConvReLU.of(conv))


class FusedMixed(nn.Module):
    """An inception block for inference: the three 1x1 heads that read the input as one fused convolution (weights
    concatenated once), each branch's convolution fused with its ReLU, the branches concatenated as in :class:`Mixed`."""

    def __init__(self, block: Mixed):
        super().__init__()
        heads = [block.b1, block.b3[0], block.b5[0]]
        convs = [h[-2] for h in heads]
        # A 1x1 'SAME' pad (TF style) pads nothing, so it may be dropped; any other padding of a head may not.
        if any(not all(isinstance(p, SamePad) and p.kernel == 1 and p.stride == 1 for p in h[:-2]) for h in heads):
            raise AtlasError("cannot fuse an inception block whose 1x1 heads are padded")
        self.split = [c.out_channels for c in convs]
        self.heads = ConvReLU(torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs]))
        self.b3, self.b5 = _fuse_conv(block.b3[1]), _fuse_conv(block.b5[1])
        self.pool, self.bp = block.bp[0], _fuse_conv(block.bp[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1, mid3, mid5 = self.heads(x).split(self.split, 1)
        return torch.cat([out1, self.b3(mid3), self.b5(mid5), self.bp(self.pool(x))], 1)


class FusedLRN(nn.Module):
    """Local response normalisation for inference, ``x * (k + alpha/size * band_sum(x^2))^-beta``, in fewer passes
    over memory than :class:`LocalResponseNorm`: the band sum as ``size`` shifted slices of the channel-padded squares
    added in place (channels are the contiguous axis in channels-last; 5 additions cost less than the dense
    channels x channels 1x1 convolution, which does 192/5 times the arithmetic), and the power as ``rsqrt`` (beta 0.5)
    or ``rsqrt * sqrt(rsqrt)`` (beta 0.75) instead of ``pow``, a third of its time here (docs/sample.md). Same values
    to float rounding (tests/test_sample_kernels.py); with autograd recording it is the reference module."""

    def __init__(self, lrn: LocalResponseNorm):
        super().__init__()
        self.lrn = lrn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lrn = self.lrn
        if torch.is_grad_enabled():  # the fused copy never carries dual numbers (inference_net), only maybe a graph
            return lrn(x)
        if x.dtype in (torch.bfloat16, torch.float16):  # under autocast: sums and powers in float32, as the band conv's
            return self.forward(x.float()).to(x.dtype)
        c, before = x.shape[1], lrn.size // 2
        squares = F.pad((x * x).permute(0, 2, 3, 1), (before, lrn.size - 1 - before))  # (n, h, w, c + size - 1)
        total = squares[..., :c].clone()
        for shift in range(1, lrn.size):
            total += squares[..., shift:shift + c]
        base = total.permute(0, 3, 1, 2).mul_(lrn.alpha / lrn.size).add_(lrn.k)
        if lrn.beta == 0.5:
            power = base.rsqrt_()
        elif lrn.beta == 0.75:
            root = base.rsqrt_()
            power = root.sqrt().mul_(root)
        else:
            power = base.pow_(-lrn.beta)
        return power.mul_(x)


def _fused_inception(module: InceptionV1) -> InceptionV1:
    fused = copy.deepcopy(module).to(memory_format=torch.channels_last).eval()
    for name in ("conv2d0", "conv2d1", "conv2d2"):
        block = getattr(fused, name)
        *pad, conv, relu = block
        if conv.stride != (1, 1):  # the space-to-depth first convolution is for the renderer's backward; a plain one here
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
            plain.load_state_dict(conv.state_dict())
            conv = plain
        setattr(fused, name, _fuse_conv(nn.Sequential(*pad, conv, relu)))
    fused.lrn = FusedLRN(fused.lrn)
    for name in INCEPTION_LAYERS:
        if name.startswith("mixed"):
            setattr(fused, name, FusedMixed(getattr(fused, name)))
    return fused


def _copy(net: Network, kind: str) -> nn.Module:
    copies = _COPIES.setdefault(net.module, {})
    if kind not in copies:
        if kind == "fused" and isinstance(net.module, InceptionV1):
            copies[kind] = _fused_inception(net.module)
        elif kind == "fused":  # other architectures: channels-last is the whole gain
            copies[kind] = _copy(net, "channels-last")
        else:
            copies[kind] = copy.deepcopy(net.module).to(memory_format=torch.channels_last).eval()
    return copies[kind]


def check_forward(forward: str) -> str:
    if forward not in FORWARDS:
        raise AtlasError(f"unknown forward '{forward}'; choose one of {', '.join(FORWARDS)}")
    return forward


def fusable(net: Network, layers) -> bool:
    """Whether the fused copy computes ``layers``: InceptionV1's named layers (blocks, not the convolutions inside
    them, whose pre-ReLU outputs a fused call never produces); any layer of another architecture."""
    if not isinstance(net.module, InceptionV1):
        return True
    return all(net.resolve(layer) in INCEPTION_LAYERS for layer in layers)


def inference_net(net: Network, forward: str = "fused", layers=(), dual: bool = False) -> Network:
    """The network a pass of kind ``forward`` (:data:`FORWARDS`) runs on, computing ``layers``: ``net`` itself for
    "nchw", else a cached channels-last copy, fused where that computes the same layers and no dual numbers
    (``dual``: forward-mode AD) flow through it. Feed it :func:`as_input` of the images."""
    check_forward(forward)
    if forward == "nchw":
        return net
    kind = "fused" if forward == "fused" and not dual and fusable(net, layers) else "channels-last"
    return replace(net, module=_copy(net, kind))


def channels_last(net: Network) -> Network:
    """The same network with a channels-last copy of its module (cached per module); feed it
    ``images.contiguous(memory_format=torch.channels_last)``. Its results equal the original's to float noise."""
    return inference_net(net, "channels-last")


# Images per forward call on CPU for the copies: a batch of 8 at 224 px keeps the largest activation (conv2d0's,
# 64 x 112 x 112 float32, 3.2 MB an image) within this CPU's 32 MB L3 cache, so the passes over memory between the
# convolutions (pooling, the LRN's pieces, concatenation; the ReLUs are fused) read cache, not DRAM: InceptionV1 to mixed4c
# ran at 40.0 images/s in chunks of 8 against 28.8 in one call of 32 (chunks of 2/4/6/12/16: 32/39/39/32/36;
# docs/sample.md). Scaled by the image area for other sizes.
CPU_CHUNK_PIXELS = 8 * 224 * 224


def micro_batch(images: torch.Tensor, forward: str) -> int:
    """How many of ``images`` (n, 3, H, W) a pass of kind ``forward`` runs at once: the whole batch for the reference
    kernels ("nchw", kept as they were) and on accelerators, where a larger batch is what fills the device; on CPU
    chunks of :data:`CPU_CHUNK_PIXELS` worth of pixels."""
    n, _, h, w = images.shape
    if forward == "nchw" or images.device.type != "cpu":
        return max(n, 1)
    return max(1, min(n, CPU_CHUNK_PIXELS // (h * w)))


def as_input(images: torch.Tensor, forward: str) -> torch.Tensor:
    """``images`` in the memory format the forward ``forward`` reads (no copy when they already are)."""
    fmt = torch.contiguous_format if forward == "nchw" else torch.channels_last
    return images.contiguous(memory_format=fmt)


def run_kernels(meta) -> tuple[str, str]:
    """``(precision, forward)``: the arithmetic a run's activations were computed with, from its store attributes.

    The precision is the recorded one (:func:`atlas.models.precision.run_precision`); the forward is recorded only for
    bfloat16 runs sampled with other kernels than the default "fused" (in float32 every forward gives the same values
    to float rounding; in bfloat16 the kernels' own roundings show)."""
    return run_precision(meta), str(meta.get("forward") or "fused")


def run_activations(net: Network, images: torch.Tensor, layers, precision: str = "float32", forward: str = "fused"
                    ) -> dict[str, torch.Tensor]:
    """The full activation maps (N, C, H, W) of ``layers`` for RGB [0, 1] ``images`` (N, 3, H, W), as every pass that
    reads a run's activations computes them: the inference copy of kind ``forward``, cache-sized micro-batches on
    CPU (:func:`micro_batch`), in the concrete ``precision`` ("float32" or "bfloat16", e.g. from :func:`run_kernels`).

    The sampler (without attribution), the unit lens's top-k pass and an image placed on a run all call this, so a
    photo gives the same numbers in each of them. The maps come back in the dtype they were computed in (bfloat16
    maps stay bfloat16, half the memory); widen with ``.float()`` where needed."""
    layers = list(layers)
    copy_ = inference_net(net, forward, layers)
    images = as_input(images, forward)
    chunk = micro_batch(images, forward)
    parts: list[dict[str, torch.Tensor]] = []
    with torch.inference_mode(), computing_in(precision, images.device.type):
        for lo in range(0, images.shape[0], chunk):
            parts.append(copy_.activations(images[lo:lo + chunk], layers))
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts]) for name in layers}
