"""Yosinski et al.'s (2015) image regularisers for pixel-space feature visualisation, and their four presets.

Plain gradient ascent on pixels finds high-frequency patterns no photo contains. The paper
applies, after every gradient step, an operator r(x) to the image: L2 decay (pulls every
pixel towards the mean), a Gaussian blur every few steps (removes high frequencies), and two
clips that set pixels to the mean (zero in the paper's mean-subtracted space): those of small
norm and those of small contribution |sum_c x_c * dA/dx_c| to the unit's activation A. The four
hyperparameter combinations of its Table 1 are :data:`YOSINSKI_PRESETS`, with the step size
rule and iteration count the DeepVis toolbox gives for them (``doc/running-optimize-image.md`` of
yosinski/deep-visualization-toolbox; the operators follow its ``optimize/gradient_optimizer.py``).

Pixel space. The paper works on 0-255 images minus the mean image (Caffe's convention);
atlas feeds RGB in [0, 1] and each model subtracts its own mean. With m the model's mean
colour in [0, 1] the paper's image is x_p = 255 (x - m): decay scales x - m, the clips set
pixels to m, percentiles and the blur are unchanged by the scale, and a step of size lr on
x_p is a step of lr / 255**2 on x (the gradient scales by 255 one way, the step back by 255).
For the BVLC GoogLeNet this is exactly the paper's space (its input is BGR*255 - mean).

The regularisers plug into the shared loop through ``Optimization.step(on_step=...)``:
:class:`Regularization` is such a callback, applying its list in order to ``param.pixels``
(using the gradient still held in ``param.pixels.grad``) and clipping to [0, 1] (the
toolbox clips to the valid pixel range every iteration). The paper's optimiser is plain
gradient ascent, not Adam: :class:`GradientAscent`, with the toolbox's "constant" and
"progress" learning-rate rules, replaces the loop's ``optimizer``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

PIXEL_SCALE = 255.0  # the paper's pixel units per unit of our [0, 1] input


def _percentile_mask(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """(n, 1, h, w) True where a pixel's value is below the image's ``percentile`` (numpy's linear percentile)."""
    flat = values.flatten(1)
    q = percentile / 100.0 * (flat.shape[1] - 1)
    lo, frac = int(math.floor(q)), q - math.floor(q)
    below = flat.kthvalue(lo + 1, dim=1, keepdim=True).values  # two order statistics: faster than a full sort
    above = flat.kthvalue(min(lo + 2, flat.shape[1]), dim=1, keepdim=True).values if frac else below
    cut = below + frac * (above - below)
    return (flat < cut).view_as(values)


@dataclass(frozen=True)
class L2Decay:
    """x_p <- (1 - decay) x_p: every pixel is pulled towards the mean colour (θ_decay)."""

    decay: float

    def __call__(self, step: int, d: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return d * (1.0 - self.decay) if self.decay else d


@dataclass(frozen=True)
class GaussianBlur:
    """A Gaussian blur of standard deviation ``radius`` px on steps 0, every, 2 every, ... (θ_b_width, θ_b_every).

    As scipy's ``gaussian_filter`` (which the toolbox calls): kernel truncated at 4 sigma,
    edges mirrored with the edge pixel repeated ('reflect' in scipy's terms).
    """

    radius: float
    every: int

    def __call__(self, step: int, d: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        if self.radius <= 0 or self.every <= 0 or step % self.every:
            return d
        r = int(4.0 * self.radius + 0.5)
        x = torch.arange(-r, r + 1, dtype=d.dtype, device=d.device)
        k = torch.exp(-0.5 * (x / self.radius) ** 2)
        k = k / k.sum()
        c = d.shape[1]
        for dim in (2, 3):
            n = d.shape[dim]
            idx = torch.arange(-r, n + r, device=d.device)
            idx = torch.where(idx < 0, -idx - 1, idx)
            idx = torch.where(idx >= n, 2 * n - idx - 1, idx).clamp(0, n - 1)
            padded = d.index_select(dim, idx)
            weight = k.view(1, 1, -1, 1) if dim == 2 else k.view(1, 1, 1, -1)
            d = F.conv2d(padded, weight.expand(c, 1, *weight.shape[2:]), groups=c)
        return d


@dataclass(frozen=True)
class ClipNorm:
    """Pixels whose colour norm ||x_p|| is below the image's ``percentile`` are set to the mean (θ_n_pct)."""

    percentile: float

    def __call__(self, step: int, d: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        if self.percentile <= 0:
            return d
        return d.masked_fill(_percentile_mask(d.norm(dim=1, keepdim=True), self.percentile), 0.0)


@dataclass(frozen=True)
class ClipContribution:
    """Pixels of small contribution are set to the mean (θ_c_pct).

    A pixel's contribution is |sum_c x_p[c] * dA/dx_p[c]|: the linear estimate of how much
    the activation A would change if the pixel were set to the mean (the toolbox's
    ``px_abs_benefit_percentile``). Needs the step's gradient.
    """

    percentile: float

    def __call__(self, step: int, d: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        if self.percentile <= 0:
            return d
        if grad is None:
            raise ValueError("ClipContribution needs the step's gradient (param.pixels.grad is None)")
        contribution = (d * grad).sum(1, keepdim=True).abs()
        return d.masked_fill(_percentile_mask(contribution, self.percentile), 0.0)


class Regularization:
    """An ``on_step(step, param)`` callback applying regularisers in order to a pixel parameterisation, then clipping.

    Each regulariser maps (step, d, grad) -> d, with d = x - mean the mean-subtracted image
    and grad the gradient of the summed objective with respect to x (sign irrelevant to
    every regulariser here). After them the image is clipped to [0, 1].
    """

    def __init__(self, regularizers: Iterable, clip: bool = True):
        self.regularizers, self.clip = list(regularizers), clip

    def __call__(self, step: int, param) -> None:
        pixels = param.pixels
        with torch.no_grad():
            mean = param.mean.to(pixels.device, pixels.dtype)
            d = pixels - mean
            grad = None if pixels.grad is None else pixels.grad.detach()
            for r in self.regularizers:
                d = r(step, d, grad)
            x = d + mean
            pixels.copy_(x.clamp(0.0, 1.0) if self.clip else x)


class GradientAscent(torch.optim.Optimizer):
    """Plain gradient steps in the paper's pixel units, per image (the DeepVis toolbox's optimiser).

    The loop minimises -objective, so the ascent direction is -grad. Per image, with g the
    gradient on the paper's scale (our gradient / 255): "constant" steps lr * g; "progress"
    steps min(max_lr, desired_progress / |g|**2) * g, the step that raises the objective by
    ``desired_progress`` if it were linear. The step is divided by 255 back into [0, 1] units.
    Row i of a parameter (its first dimension) is image i.
    """

    def __init__(self, params, lr: float = 100.0, policy: str = "constant", max_lr: float = 100.0,
                 desired_progress: float = 2.0, scale: float = PIXEL_SCALE):
        if policy not in ("constant", "progress"):
            raise ValueError(f"policy must be 'constant' or 'progress' (got {policy!r})")
        super().__init__(params, {"lr": lr, "policy": policy, "max_lr": max_lr, "desired_progress": desired_progress,
                                  "scale": scale})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            s = group["scale"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad / s
                if group["policy"] == "constant":
                    p.add_(g, alpha=group["lr"] / s)
                else:
                    sq = g.flatten(1).pow(2).sum(1).clamp(min=1e-30)
                    lr = (group["desired_progress"] / sq).clamp(max=group["max_lr"])
                    p.add_(g * (lr / s).view(-1, *[1] * (g.dim() - 1)))


@dataclass(frozen=True)
class YosinskiPreset:
    """One hyperparameter combination of Yosinski et al. (2015), Table 1, with the toolbox's step rule and iterations.

    ``decay`` θ_decay, ``blur_radius`` θ_b_width (px), ``blur_every`` θ_b_every (steps),
    ``norm_percentile`` θ_n_pct, ``contribution_percentile`` θ_c_pct; ``lr_policy`` "constant"
    (step ``lr``) or "progress" (``desired_progress`` per step, at most ``max_lr``), all in the
    paper's 0-255 pixel units; ``steps`` the toolbox's ``--max-iter``.
    """

    name: str
    decay: float
    blur_radius: float
    blur_every: int
    norm_percentile: float
    contribution_percentile: float
    steps: int
    lr_policy: str
    lr: float = 100.0
    max_lr: float = 100.0
    desired_progress: float = 2.0

    def regularizers(self) -> list:
        """The preset's operators in the toolbox's order: decay, blur, norm clip, contribution clip (only those in use)."""
        out: list = []
        if self.decay:
            out.append(L2Decay(self.decay))
        if self.blur_radius > 0 and self.blur_every > 0:
            out.append(GaussianBlur(self.blur_radius, self.blur_every))
        if self.norm_percentile > 0:
            out.append(ClipNorm(self.norm_percentile))
        if self.contribution_percentile > 0:
            out.append(ClipContribution(self.contribution_percentile))
        return out

    def regularization(self) -> Regularization:
        """The ``on_step`` callback for the loop."""
        return Regularization(self.regularizers())

    def optimizer(self, params) -> GradientAscent:
        """The preset's plain gradient ascent over ``params``."""
        return GradientAscent(params, lr=self.lr, policy=self.lr_policy, max_lr=self.max_lr,
                              desired_progress=self.desired_progress)

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in d.items()}


# Table 1 of the paper, in its order; step rules and iterations from the toolbox's doc/running-optimize-image.md.
YOSINSKI_PRESETS: dict[str, YosinskiPreset] = {p.name: p for p in (
    YosinskiPreset("yosinski-1", decay=0.0, blur_radius=0.5, blur_every=4, norm_percentile=50, contribution_percentile=0,
                   steps=500, lr_policy="progress", max_lr=100.0, desired_progress=2.0),
    YosinskiPreset("yosinski-2", decay=0.3, blur_radius=0.0, blur_every=0, norm_percentile=20, contribution_percentile=0,
                   steps=750, lr_policy="constant", lr=100.0),
    YosinskiPreset("yosinski-3", decay=0.0001, blur_radius=1.0, blur_every=4, norm_percentile=0, contribution_percentile=0,
                   steps=1000, lr_policy="constant", lr=100.0),
    YosinskiPreset("yosinski-4", decay=0.0, blur_radius=0.5, blur_every=4, norm_percentile=0, contribution_percentile=90,
                   steps=1000, lr_policy="progress", max_lr=1e8, desired_progress=2.0),
)}

# Plain pixel ascent for comparison: the constant step of yosinski-2/-3, no regulariser (only the [0, 1] clip).
PLAIN_PIXEL = YosinskiPreset("pixel", decay=0.0, blur_radius=0.0, blur_every=0, norm_percentile=0, contribution_percentile=0,
                             steps=1000, lr_policy="constant", lr=100.0)


def preset(name: str) -> YosinskiPreset:
    """A preset by name ("yosinski-1" .. "yosinski-4", or "pixel" for no regulariser)."""
    if name == PLAIN_PIXEL.name:
        return PLAIN_PIXEL
    if name not in YOSINSKI_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join([*YOSINSKI_PRESETS, PLAIN_PIXEL.name])}")
    return YOSINSKI_PRESETS[name]


__all__: Sequence[str] = ["PIXEL_SCALE", "PLAIN_PIXEL", "YOSINSKI_PRESETS", "ClipContribution", "ClipNorm", "GaussianBlur",
                          "GradientAscent", "L2Decay", "Regularization", "YosinskiPreset", "preset"]
