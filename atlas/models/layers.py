"""Fast building blocks of the convolutional models: TF 'SAME' padding, local response normalisation,
space-to-depth strided convolution, and the RGB [0, 1] -> network-input preprocessing.

Each has the function of its plain PyTorch counterpart (or of TensorFlow's) and exists for speed
on CPU, in bf16 and channels-last memory; ``atlas.models.inception`` and ``atlas.models.zoo`` use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SamePad(nn.Module):
    """TensorFlow 'SAME' padding for a k x k window with the given stride (TF pads more on the bottom/right)."""

    def __init__(self, kernel: int, stride: int, value: float = 0.0):
        super().__init__()
        self.kernel, self.stride, self.value = kernel, stride, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            out = -(-size // self.stride)
            total = max((out - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=self.value)


def _lrn_base(x: torch.Tensor, band: torch.Tensor, scale: float, k: float) -> torch.Tensor:
    """k + scale * (sum of squares over each channel's window): what LRN raises to -beta."""
    return F.conv2d(x * x, band) * scale + k


class _LocalResponseNorm(torch.autograd.Function):
    """y = x * (k + a * band(x^2))^-beta, with a backward that reuses the forward's power.

    Autograd of the plain expression computes a second ``pow`` and keeps more
    intermediates; here d^(-beta-1) is (d^-beta) / d.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, band: torch.Tensor, scale: float, beta: float, k: float) -> torch.Tensor:
        d = _lrn_base(x, band, scale, k)
        r = torch.exp(torch.log(d) * -beta)
        ctx.save_for_backward(x, d, r, band)
        ctx.scale, ctx.beta = scale, beta
        return x * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, d, r, band = ctx.saved_tensors
        gr = grad * r
        back = F.conv2d(gr * x / d, band.transpose(0, 1))
        return gr - (2.0 * ctx.scale * ctx.beta) * x * back, None, None, None, None


class LocalResponseNorm(nn.Module):
    """Cross-channel local response normalisation: the function of ``nn.LocalResponseNorm``, faster.

    The sum of squares over each channel's window is a 1x1 convolution with a 0/1 band
    matrix, which oneDNN runs as one matrix product in either memory format (torch's own
    version average-pools a padded 5-D view, slow in channels-last and in bf16).
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self._bands: dict[tuple, torch.Tensor] = {}

    def _band(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        key = (channels, like.dtype, like.device)
        if key not in self._bands:
            # Made outside inference mode even when first asked for inside it (layer_shapes, sampling without
            # attribution): a cached inference tensor could not be saved for the renderer's backward pass.
            with torch.inference_mode(False):
                c = torch.arange(channels)
                offset = c[None, :] - c[:, None]  # input channel minus output channel
                band = ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)).to(like.dtype)
                self._bands[key] = band.view(channels, channels, 1, 1).to(like.device)
        return self._bands[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band = self._band(x.shape[1], x)
        if torch.is_grad_enabled() and x.requires_grad:  # backward-mode: the function above (forward-mode AD uses the plain path)
            return _LocalResponseNorm.apply(x, band, self.alpha / self.size, self.beta, self.k)
        return x * _lrn_base(x, band, self.alpha / self.size, self.k).pow(-self.beta)


class SpaceToDepthConv2d(nn.Conv2d):
    """A strided convolution computed as a stride-1 one on a space-to-depth view of its input.

    Same parameters and function as ``nn.Conv2d`` (kernel zero-padded to a multiple of the
    stride and regrouped; input padded to a multiple of the stride). It exists for the
    gradient with respect to the image, which feature visualisation needs every step: for
    InceptionV1's first layer (7x7, stride 2, 3 input channels) oneDNN computes that
    gradient 2x faster at stride 1 (bf16: 16.5 ms against 7.6 ms for 32 images of 80 px).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, k, p = self.stride[0], self.kernel_size[0], self.padding[0]
        if self.stride != (s, s) or self.kernel_size != (k, k) or self.padding != (p, p) or self.groups != 1 or s == 1:
            return super().forward(x)
        h, w = x.shape[-2:]
        x = F.pad(x, (p, p + (w + 2 * p) % s, p, p + (h + 2 * p) % s))
        kk = -(-k // s) * s
        weight = F.pad(self.weight, (0, kk - k, 0, kk - k))
        cout, cin = weight.shape[:2]
        weight = weight.view(cout, cin, kk // s, s, kk // s, s).permute(0, 1, 3, 5, 2, 4).reshape(cout, cin * s * s, kk // s, kk // s)
        return F.conv2d(F.pixel_unshuffle(x, s), weight, self.bias)


class Preprocess(nn.Module):
    """RGB [0, 1] -> the network's own input convention (channel order, scale, mean).

    In channels-last memory it is done as a 1x1 convolution (a permutation times ``scale``,
    minus ``mean``): the same arithmetic as flip, multiply and subtract, and 6x faster in
    bf16, since a flip along the channel axis has no fast kernel there.
    """

    def __init__(self, bgr: bool, mean: Sequence[float], scale: float = 255.0):
        super().__init__()
        self.bgr, self.scale = bgr, scale
        order = torch.eye(3).flip(1) if bgr else torch.eye(3)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("weight", (order * scale).view(3, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.conv2d(x, self.weight, -self.mean.view(3))
        return (x.flip(1) if self.bgr else x) * self.scale - self.mean
