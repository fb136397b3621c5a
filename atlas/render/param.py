"""Image parameterisations: small modules that hold a batch of images, composed, e.g. ``decorrelated(fft_image(...))``.

Optimising pixels directly lets high frequencies win (the network's gradients are
noisy there), which gives adversarial static. Scaling each frequency by 1/f makes all
frequencies equally easy to change, and decorrelating colour does the same across the
three channels; a sigmoid keeps the result in [0, 1] without clipping the gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class Parameterization(Protocol):
    """What the optimiser needs of an image parameterisation (any ``torch.nn.Module`` with a no-argument forward fits).

    ``parameters()`` are what Adam steps; calling it returns the current images,
    (n, 3, h, w) float32 in [0, 1]; ``to(device)`` moves it. A pixel or an alpha
    parameterisation is added by writing such an object, not by editing the optimiser.
    """

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def __call__(self) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> Parameterization: ...


class FFTImage(torch.nn.Module):
    """``n`` images of ``h`` x ``w`` as 1/f-scaled Fourier coefficients -> orthonormal inverse FFT (see :func:`fft_image`).

    Its output is unbounded and in decorrelated colour space: wrap it in :class:`Decorrelated`
    for an image. The spectrum is a plain real tensor (real and imaginary parts in the last dim),
    so any optimiser works on it; each image has its own coefficients and they never interact.
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

    def forward(self) -> torch.Tensor:
        """(n, 3, h, w) float32, unbounded (about 0 +- 0.1 at the start)."""
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        return torch.fft.irfft2(spectrum, s=(self.h, self.w), norm="ortho") / FFT_DIVISOR


class Decorrelated(torch.nn.Module):
    """Colour decorrelation and a sigmoid over an unbounded 3-channel parameterisation (see :func:`decorrelated`)."""

    def __init__(self, inner: torch.nn.Module, decorrelate: bool = True):
        super().__init__()
        self.inner, self.decorrelate = inner, decorrelate
        self.register_buffer("color", COLOR_MATRIX.clone(), persistent=False)

    def forward(self) -> torch.Tensor:
        """(n, 3, h, w) float32 in (0, 1)."""
        x = self.inner()
        if self.decorrelate:
            x = (self.color @ x.flatten(2)).view_as(x)  # colour mixing per pixel, as a matrix product (faster than einsum)
        return torch.sigmoid(x)


def fft_image(seeds: Sequence[tuple[int, ...]], size: int, width: int | None = None, sd: float = 0.01,
              decay_power: float = 1.0) -> FFTImage:
    """Fourier parameterisation of one image per seed tuple, started from the seed's own random spectrum.

    Parameters
    ----------
    seeds : sequence of tuple of int
        One seed tuple per image; an image's start depends only on its tuple, not on its batch.
    size : int, >= 1
        Image height in pixels (and width unless ``width`` is given).
    width : int or None, default None
        Image width in pixels; None: ``size``.
    sd : float, default 0.01, >= 0
        Standard deviation of the initial coefficients (before 1/f scaling).
    decay_power : float, default 1.0, >= 0
        Coefficients are scaled by 1 / f ** decay_power; 0 weights all frequencies alike.

    Returns
    -------
    FFTImage
        A module whose output is unbounded (wrap it in :func:`decorrelated` for images in (0, 1)).
    """
    if size < 1 or (width is not None and width < 1):
        raise ValueError(f"image size must be at least 1 px (got {size} x {width or size})")
    return FFTImage(len(seeds), size, width, sd=sd, decay_power=decay_power, init=init_spectra(list(seeds), size, width, sd))


def decorrelated(inner: torch.nn.Module, decorrelate: bool = True) -> Decorrelated:
    """Images in (0, 1) from an unbounded 3-channel parameterisation: ImageNet colour decorrelation, then a sigmoid.

    Parameters
    ----------
    inner : torch.nn.Module
        Its forward() returns (n, 3, h, w), e.g. :func:`fft_image`.
    decorrelate : bool, default True
        Mix the channels by the square root of ImageNet's colour correlation first; False: a sigmoid only.

    Returns
    -------
    Decorrelated
        A :class:`Parameterization` whose call returns (n, 3, h, w) float32 in (0, 1).
    """
    return Decorrelated(inner, decorrelate)


def default_param(seeds: Sequence[tuple[int, ...]], size: int) -> Decorrelated:
    """The renderer's parameterisation: ``decorrelated(fft_image(seeds, size))``."""
    return decorrelated(fft_image(seeds, size))


def init_spectra(seeds: Sequence[tuple[int, ...]], h: int, w: int | None = None, sd: float = 0.01) -> torch.Tensor:
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


# -- pixel and RGBA parameterisations (the unit lens: atlas.units.features) -------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB in [0, 1]; the Caffe BVLC mean (123, 117, 104) / 255 within 0.002


class PixelImage(torch.nn.Module):
    """``n`` images stored as their pixels, (n, 3, h, w) in [0, 1] (see :func:`pixel_image`).

    Nothing keeps high frequencies in check: this is plain pixel-space ascent, the setting of
    Yosinski et al. (2015), whose regularisers (:mod:`atlas.render.regularizers`) act on
    ``pixels`` between steps. ``mean`` is the model's input mean, the origin of the paper's
    mean-subtracted pixel space (decay and the norm clip pull towards it).
    """

    def __init__(self, init: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN):
        super().__init__()
        if init.dim() != 4 or init.shape[1] != 3:
            raise ValueError(f"init must be (n, 3, h, w) (got {tuple(init.shape)})")
        self.pixels = torch.nn.Parameter(init.clone())
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1), persistent=False)

    def forward(self) -> torch.Tensor:
        """(n, 3, h, w) float32: the pixels themselves (the regularisers keep them in [0, 1])."""
        return self.pixels


def pixel_image(seeds: Sequence[tuple[int, ...]], size: int, width: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                sd: float = 10.0 / 255.0) -> PixelImage:
    """Pixel parameterisation of one image per seed tuple: the mean plus Gaussian noise (the DeepVis toolbox's start).

    Parameters
    ----------
    seeds : sequence of tuple of int
        One seed tuple per image; an image's start depends only on its tuple.
    size : int, >= 1
        Image height in pixels (and width unless ``width`` is given).
    width : int or None, default None
        Image width; None: ``size``.
    mean : sequence of 3 float in [0, 1], default ImageNet's
        RGB mean image colour (the model's input mean); the start is centred on it.
    sd : float, default 10 / 255, >= 0
        Noise standard deviation (the toolbox's ``mean_plus_rand`` start: N(0, 10) on the 0-255 scale).

    Returns
    -------
    PixelImage
        A :class:`Parameterization` whose ``pixels`` are the images, clipped to [0, 1] at the start.
    """
    if size < 1 or (width is not None and width < 1):
        raise ValueError(f"image size must be at least 1 px (got {size} x {width or size})")
    w = width or size
    m = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
    init = torch.empty(len(seeds), 3, size, w)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(_mix(seed))
        init[i] = (m + torch.randn(3, size, w, generator=g) * sd).clamp(0, 1)
    return PixelImage(init, mean)


BACKGROUNDS = ("fft", "noise", "solid")


class AlphaImage(torch.nn.Module):
    """RGBA images (FFT + decorrelated colour, and an FFT alpha channel) seen composited over a background.

    Lucid's transparency recipe: in training mode every call draws a new random background per
    image (``backgrounds``: "fft", a random 1/f**1.5 colour image like Lucid's ``image_sample(sd=0.2,
    decay_power=1.5)``; "noise", uniform per-pixel noise; "solid", one random colour) and returns
    ``rgb * alpha + background * (1 - alpha)``, so what the network sees depends on the image only
    where it is opaque. In eval mode the background is plain grey (0.5), to measure the result.
    ``last_alpha`` holds the alpha of the last call, for the penalty (:func:`mean_alpha`).
    """

    def __init__(self, seeds: Sequence[tuple[int, ...]], size: int, backgrounds: Sequence[str] = ("fft",), sd: float = 0.01,
                 background_sd: float = 0.2, background_decay: float = 1.5):
        super().__init__()
        unknown = [b for b in backgrounds if b not in BACKGROUNDS]
        if unknown or not backgrounds:
            raise ValueError(f"backgrounds must be a non-empty subset of {', '.join(BACKGROUNDS)} (got {list(backgrounds)})")
        seeds = list(seeds)
        self.rgb = decorrelated(fft_image(seeds, size, sd=sd))
        spectra = torch.empty(len(seeds), 1, size, size // 2 + 1, 2)
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(_mix((*seed, 0xA1FA)))
            spectra[i] = torch.randn(spectra.shape[1:], generator=g) * sd
        self.alpha_spectrum = torch.nn.Parameter(spectra)
        self.register_buffer("scale", frequency_scale(size, size), persistent=False)
        self.register_buffer("bg_scale", frequency_scale(size, size, background_decay), persistent=False)
        self.register_buffer("color", COLOR_MATRIX.clone(), persistent=False)
        self.size, self.backgrounds, self.background_sd = size, tuple(backgrounds), float(background_sd)
        # one generator per image, so an image's backgrounds do not depend on its batch
        self.generators = [torch.Generator().manual_seed(_mix((*seed, 0xB6))) for seed in seeds]
        self.last_alpha: torch.Tensor | None = None

    def alpha(self) -> torch.Tensor:
        """(n, 1, h, w) opacity in (0, 1) (0.5 at the start)."""
        spectrum = torch.view_as_complex(self.alpha_spectrum) * self.scale
        return torch.sigmoid(torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho") / FFT_DIVISOR)

    def rgba(self) -> torch.Tensor:
        """(n, 4, h, w) float32 in (0, 1): colour and alpha, not composited."""
        return torch.cat([self.rgb(), self.alpha()], 1)

    def background(self) -> torch.Tensor:
        """(n, 3, h, w) random backgrounds in (0, 1), a new draw per call."""
        s, out = self.size, []
        for g in self.generators:
            kind = self.backgrounds[int(torch.randint(len(self.backgrounds), (1,), generator=g))]
            if kind == "fft":
                spec = torch.randn(3, s, s // 2 + 1, 2, generator=g) * self.background_sd
                x = torch.fft.irfft2(torch.view_as_complex(spec) * self.bg_scale.cpu(), s=(s, s), norm="ortho")
                x = torch.sigmoid((self.color.cpu() @ x.flatten(1)).view(3, s, s))
            elif kind == "noise":
                x = torch.rand(3, s, s, generator=g)
            else:
                x = torch.rand(3, 1, 1, generator=g).expand(3, s, s)
            out.append(x)
        return torch.stack(out).to(self.alpha_spectrum.device)

    def forward(self) -> torch.Tensor:
        """(n, 3, h, w): the RGBA images composited over random backgrounds (training) or grey (eval)."""
        rgb, alpha = self.rgb(), self.alpha()
        self.last_alpha = alpha
        bg = self.background() if self.training else torch.full_like(rgb, 0.5)
        return rgb * alpha + bg * (1 - alpha)


def alpha_image(seeds: Sequence[tuple[int, ...]], size: int, backgrounds: Sequence[str] = ("fft",)) -> AlphaImage:
    """Transparent (RGBA) parameterisation of one image per seed tuple; see :class:`AlphaImage`.

    Parameters
    ----------
    seeds : sequence of tuple of int
        One seed tuple per image (its start and its backgrounds depend only on it).
    size : int, >= 1
        Image side in pixels.
    backgrounds : sequence of {"fft", "noise", "solid"}, default ("fft",)
        Kinds of random background, one drawn per image and step ("fft" is Lucid's).

    Returns
    -------
    AlphaImage
        Its call returns the composite (n, 3, h, w); ``rgba()`` the RGBA images.
    """
    if size < 1:
        raise ValueError(f"image size must be at least 1 px (got {size})")
    return AlphaImage(seeds, size, backgrounds)
