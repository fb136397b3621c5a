"""Transformation robustness: random pad, jitter, scale and rotation, applied every step.

An image that excites a unit only at one exact pixel alignment is an adversarial
pattern, not a feature; making the objective hold under small random shifts, zooms and
rotations removes that. All four transforms are one affine map, so they are done with a
single ``grid_sample`` per step (one interpolation instead of one per transform), each
image of the batch may get its own draw, and the output can be smaller than the icon:
the network then sees a shrunken view, which is where most of the speed comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Transforms:
    """Ranges of the random view of an icon, in icon pixels.

    ``pad``: grey border around the icon, so the view may slide past its edges;
    ``jitter``: maximum shift of the view centre; ``scales``: zoom factors drawn from;
    ``angles``: rotations in degrees drawn from; ``zoom``: network pixels per icon pixel
    at scale 1 (below 1 the network gets a shrunken, cheaper input); ``per_sample``: draw
    separately for every image (else one draw for the whole batch).
    """

    pad: int = 4
    jitter: int = 8
    scales: Sequence[float] = field(default_factory=lambda: tuple(0.998 ** n for n in range(20, 40)))
    angles: Sequence[float] = field(default_factory=lambda: tuple(range(-10, 11)))
    zoom: float = 1.0
    per_sample: bool = True
    fill: float = 0.5

    def out_size(self, size: int) -> int:
        """Network input size for an icon of ``size`` px: the padded, jittered view, zoomed."""
        return max(16, int(round((size + 2 * self.pad - self.jitter) * self.zoom)))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scales"] = [round(float(s), 6) for s in self.scales]
        d["angles"] = [float(a) for a in self.angles]
        return d


def draw(t: Transforms, steps: int, rng: np.random.Generator) -> np.ndarray:
    """(steps, 4) draws of (scale, angle in radians, shift x, shift y), shifts in icon pixels.

    One image's draws come from its own generator, so its result does not depend on which
    batch it is optimised in (resuming a run gives the same icons).
    """
    out = np.empty((steps, 4), dtype=np.float32)
    out[:, 0] = rng.choice(np.asarray(t.scales, dtype=np.float64), size=steps)
    out[:, 1] = np.deg2rad(rng.choice(np.asarray(t.angles, dtype=np.float64), size=steps))
    out[:, 2:] = rng.uniform(-t.jitter / 2, t.jitter / 2, size=(steps, 2)) if t.jitter else 0.0
    return out


def apply(images: torch.Tensor, params: torch.Tensor, size_out: int, zoom: float, fill: float = 0.5) -> torch.Tensor:
    """Resample ``images`` (n, 3, P, P) into (n, 3, Q, Q) views given per-image ``params`` (n, 4).

    A view shows ``Q / (zoom * scale)`` icon pixels around the icon centre shifted by
    (dx, dy), rotated by the angle; outside the icon it shows ``fill`` (the padding).
    """
    n, _, h, w = images.shape
    scale, angle, dx, dy = params.to(images.device, torch.float32).unbind(1)
    span = size_out / (zoom * scale)  # icon pixels covered by the view
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid's sampling grid, built by broadcasting (its batched matrix product is slow on CPU):
    # output pixel centres u, v in (-1, 1) map to x = a u + b v + c, y = d u + e v + f.
    u = (torch.arange(size_out, device=images.device, dtype=torch.float32) * 2 + 1) / size_out - 1
    a, b, c = (cos * span / w)[:, None, None], (-sin * span / w)[:, None, None], (2 * dx / w)[:, None, None]
    d, e, f = (sin * span / h)[:, None, None], (cos * span / h)[:, None, None], (2 * dy / h)[:, None, None]
    grid = torch.stack([a * u[None, None, :] + b * u[None, :, None] + c, d * u[None, None, :] + e * u[None, :, None] + f], -1)
    out = F.grid_sample(images - fill, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def centre_view(images: torch.Tensor, size_out: int, zoom: float, fill: float = 0.5) -> torch.Tensor:
    """The untransformed view (scale 1, no rotation or shift), e.g. for the final measurement."""
    params = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(images.shape[0], 4)
    return apply(images, params, size_out, zoom, fill)
