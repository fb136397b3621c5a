"""Image parameterisations: a batch of images held as scaled Fourier coefficients.

Optimising pixels directly lets high frequencies win (the network's gradients are
noisy there), which gives adversarial static. Scaling each frequency by 1/f makes all
frequencies equally easy to change, and decorrelating colour does the same across the
three channels; a sigmoid keeps the result in [0, 1] without clipping the gradient.
"""

from __future__ import annotations

import torch

# Square root of the colour correlation of ImageNet pixels (the matrix Lucid publishes),
# normalised so its largest column has unit norm.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_MATRIX = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()
FFT_DIVISOR = 4.0  # keeps the initial image near grey and the sigmoid out of saturation


def frequency_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """(h, w // 2 + 1) weights 1 / max(f, 1/max(h, w)) ** decay for a real 2-D FFT."""
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    f = torch.sqrt(fy * fy + fx * fx)
    return 1.0 / f.clamp(min=1.0 / max(h, w)) ** decay_power


class FFTImage(torch.nn.Module):
    """``n`` images of ``h`` x ``w``: spectrum -> orthonormal inverse FFT -> colour decorrelation -> sigmoid.

    The spectrum is a plain real tensor (real and imaginary parts in the last dim), so any
    optimiser works on it; each image has its own coefficients and they never interact.
    """

    def __init__(self, n: int, h: int, w: int | None = None, sd: float = 0.01, decay_power: float = 1.0,
                 generator: torch.Generator | None = None, init: torch.Tensor | None = None):
        super().__init__()
        w = w or h
        self.h, self.w = h, w
        shape = (n, 3, h, w // 2 + 1, 2)
        if init is None:
            init = torch.randn(shape, generator=generator) * sd
        if tuple(init.shape) != shape:
            raise ValueError(f"init has shape {tuple(init.shape)}, expected {shape}")
        self.spectrum = torch.nn.Parameter(init.clone())
        self.register_buffer("scale", frequency_scale(h, w, decay_power), persistent=False)
        self.register_buffer("color", COLOR_MATRIX.clone(), persistent=False)

    def forward(self) -> torch.Tensor:
        """(n, 3, h, w) float32 in (0, 1)."""
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        x = torch.fft.irfft2(spectrum, s=(self.h, self.w), norm="ortho") / FFT_DIVISOR
        x = (self.color @ x.flatten(2)).view_as(x)  # colour mixing per pixel, as a matrix product (faster than einsum)
        return torch.sigmoid(x)


def init_spectra(seeds: list[tuple[int, ...]], h: int, w: int | None = None, sd: float = 0.01) -> torch.Tensor:
    """Initial spectra, one per seed tuple, so an image does not depend on the batch it lands in."""
    w = w or h
    out = torch.empty(len(seeds), 3, h, w // 2 + 1, 2)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(_mix(seed))
        out[i] = torch.randn(out.shape[1:], generator=g) * sd
    return out


def _mix(seed: tuple[int, ...]) -> int:
    """A 63-bit seed from a tuple of ints (stable across processes, unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for s in seed:
        value = (value ^ (int(s) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF
