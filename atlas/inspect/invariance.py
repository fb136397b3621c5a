"""Invariance curves (Zeiler & Fergus 2014, Fig. 5): how far a photo's features move, and how its class probability
changes, as the photo is translated vertically, scaled and rotated.

The transforms act on the photo *before* the final centre crop, so real picture content comes into view: a photo
is read with its shorter side at 256 px as :func:`atlas.data.load_image` does, but not cropped; each transform
moves the photo about the centre of the 224 px crop the model would see, and the crop is then taken. What comes
from outside the photo is filled with ``fill`` (grey). The identity (shift 0, scale 1, angle 0) is not resampled:
it *is* the original crop (equal, pixel for pixel, to what :func:`atlas.inspect.engine.read_image` returns for a
JPEG), and its forward is not repeated, so its distance is exactly 0 and its probability the original's.

* **Translation** by whole pixels is exact (rows move, nothing is interpolated); positive ``s`` moves the content
  down.
* **Scale** ``f`` magnifies about the crop's centre (``f > 1``: zoom in); ``f < 1`` first shrinks the whole photo
  with an antialiased resize (so the small image does not alias), then both are bilinear.
* **Rotation** by ``a`` degrees turns the content counter-clockwise (as displayed) about the crop's centre,
  bilinear.

A transform that leaves less than :data:`MIN_COVER` (a quarter) of the crop showing the photo has cropped the image
away: one :class:`AtlasError` line names the value and the photo (rotation about the centre always keeps the crop's
inscribed disc, 78 %, so only shifts and scales can fail).

**Distances.** The paper plots the Euclidean distance between the feature vectors of the original and the
transformed image ("canonical distance" on its axes; it gives no normalisation). Raw distances of different layers
are not comparable (the layers differ in size and scale), so the curves here are the distance divided by the norm of
the original's feature vector: 0 means unchanged, 1 means a change as large as the vector itself. The raw distances
are kept too (``raw_low``, ``raw_high``).

**Layers.** Low: the model's first spatial layer (InceptionV1 ``conv2d0``, the first convolution after its ReLU:
the paper's layer 1), its whole map flattened. High: the model's last spatial layer (``mixed5b``) *averaged over
positions* (``pool_high=True``): that 1024-vector is exactly what InceptionV1's classifier reads, the counterpart of
the paper's layer 7 (AlexNet's last hidden layer, also the classifier's input; its FC layers see the whole image,
as the average does). ``pool_high=False`` flattens the map instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from atlas.errors import AtlasError
from atlas.inspect.engine import batched_forward, forward, probabilities, read_image
from atlas.models import Network

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the module
    from matplotlib.figure import Figure

MIN_COVER = 0.25  # a transformed crop must show at least this fraction of photo (the rest is fill)
KINDS = ("shift", "scale", "angle")
TITLES = {"shift": "vertical translation (px)", "scale": "scale (ratio)", "angle": "rotation (degrees)"}


# --------------------------------------------------------------------------------------
# Photos and transforms
# --------------------------------------------------------------------------------------
def load_photo(path: str | Path, resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> torch.Tensor:
    """A photo as ``(3, H, W)`` float32 in [0, 1], shorter side ``resize`` (resampled with the model's
    ``interpolation``), *not* cropped (its centre ``crop`` x ``crop`` is what :func:`read_image` returns). An
    unreadable file is one line naming it."""
    from atlas.data import decode_image

    read_image(path, resize, crop, interpolation)  # the checks and one-line messages of the engine (missing, FIFO, corrupt, too large)
    # The one decoder, uncropped: the same reduced decode and resampling as load_image, so the crops agree; the long
    # side of an extreme strip is cut to its centre (atlas.data.MAX_ASPECT), which keeps the crop where it was.
    array = np.array(decode_image(path, resize, None, interpolation=interpolation), dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def _origin(photo: torch.Tensor, crop: int) -> tuple[int, int]:
    """Top-left corner of the centre crop, as load_image computes it."""
    return (photo.shape[1] - crop) // 2, (photo.shape[2] - crop) // 2


def coverage(photo_shape: Sequence[int], kind: str, value: float, crop: int = 224) -> float:
    """Fraction of the ``crop`` x ``crop`` window that shows photo (not fill) after the transform."""
    h, w = int(photo_shape[-2]), int(photo_shape[-1])
    if kind == "shift":
        top = (h - crop) // 2
        rows = sum(1 for r in range(crop) if 0 <= top + r - int(value) < h)
        return rows / crop * min(1.0, w / crop)
    if kind == "scale":
        return min(1.0, h * value / crop) * min(1.0, w * value / crop)
    return 1.0 if value % 90 == 0 else math.pi / 4  # a rotation keeps at least the crop's inscribed disc


def _fill(fill: float | Sequence[float]) -> torch.Tensor:
    return torch.as_tensor(fill, dtype=torch.float32).reshape(-1, 1, 1).expand(3, 1, 1)


def _sample(image: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``image`` (3, h, w) at pixel coordinates (sy, sx) (crop, crop); outside is ``fill``."""
    h, w = image.shape[1:]
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1)[None].float()
    # sampling image - fill with zero padding, then adding fill back, blends the border into the fill colour
    out = F.grid_sample((image - fill)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return out + fill


def transform(photo: torch.Tensor, kind: str, value: float, crop: int = 224, fill: float | Sequence[float] = 0.5) -> torch.Tensor:
    """The ``crop`` x ``crop`` view of ``photo`` (3, H, W) after one transform: ``kind`` "shift" (whole pixels,
    positive moves the content down), "scale" (ratio) or "angle" (degrees, counter-clockwise). The identity returns
    the centre crop itself (no resampling)."""
    if photo.dim() != 3 or photo.shape[0] != 3 or min(photo.shape[1:]) < crop:
        raise AtlasError(f"a photo must be a (3, H, W) tensor with H, W >= {crop}, got {tuple(photo.shape)}")
    top, left = _origin(photo, crop)
    fill_t = _fill(fill)
    h, w = photo.shape[1:]
    if kind == "shift":
        s = int(value)
        out = fill_t.expand(3, crop, crop).clone()
        lo, hi = max(0, s - top), min(crop, h - top + s)  # crop rows whose source row top + r - s lies in the photo
        if lo < hi:
            out[:, lo:hi] = photo[:, top + lo - s:top + hi - s, left:left + crop]
        return out
    if (kind == "scale" and value == 1) or (kind == "angle" and value % 360 == 0):
        return photo[:, top:top + crop, left:left + crop].clone()
    if kind not in ("scale", "angle"):
        raise AtlasError(f"unknown transform '{kind}'; transforms: {', '.join(KINDS)}")
    cy, cx = top + (crop - 1) / 2, left + (crop - 1) / 2  # the crop's centre in photo pixels
    d = torch.arange(crop, dtype=torch.float64) - (crop - 1) / 2
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    image = photo
    if kind == "scale":
        ry = rx = 1.0
        if value < 1:  # shrink the whole photo with an antialiased resize first, then sample it (no aliasing)
            size = (max(1, round(h * value)), max(1, round(w * value)))
            image = F.interpolate(photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            ry, rx = size[0] / h, size[1] / w
        sy = (cy + dy / value + 0.5) * ry - 0.5
        sx = (cx + dx / value + 0.5) * rx - 0.5
    else:
        a = math.radians(value)
        sy = cy + math.sin(a) * dx + math.cos(a) * dy
        sx = cx + math.cos(a) * dx - math.sin(a) * dy
    return _sample(image, sy, sx, fill_t)


def _is_identity(kind: str, value: float) -> bool:
    return (kind == "shift" and value == 0) or (kind == "scale" and value == 1) or (kind == "angle" and value % 360 == 0)


def _checked_steps(shifts, scales, angles) -> dict[str, list[float]]:
    steps: dict[str, list[float]] = {}
    for kind, values in zip(KINDS, (shifts, scales, angles), strict=True):
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise AtlasError(f"{kind} {v!r} is not a finite number")
            if kind == "shift" and v != int(v):
                raise AtlasError(f"shift {v} is not a whole number of pixels")
            if kind == "scale" and v <= 0:
                raise AtlasError(f"scale {v} must be above 0")
            out.append(int(v) if kind == "shift" else float(v))
        steps[kind] = out
    return steps


# --------------------------------------------------------------------------------------
# The curves
# --------------------------------------------------------------------------------------
@dataclass
class InvarianceCurves:
    """Per transform kind ("shift", "scale", "angle"): ``steps[kind]`` the values, and arrays (n_images, n_steps) of
    the normalised low/high-layer distances, the raw distances and the true-class probabilities."""

    low_layer: str
    high_layer: str
    pool_high: bool
    targets: list[int]
    original_probability: list[float]
    steps: dict[str, list[float]] = field(default_factory=dict)
    low: dict[str, np.ndarray] = field(default_factory=dict)
    high: dict[str, np.ndarray] = field(default_factory=dict)
    raw_low: dict[str, np.ndarray] = field(default_factory=dict)
    raw_high: dict[str, np.ndarray] = field(default_factory=dict)
    probability: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self, kind: str) -> dict[str, list[float]]:
        """Means over the images of each step's normalised distances and probability."""
        return {"steps": list(self.steps[kind]), "low": np.nanmean(self.low[kind], 0).tolist() if self.targets else [],
                "high": np.nanmean(self.high[kind], 0).tolist() if self.targets else [],
                "probability": np.mean(self.probability[kind], 0).tolist() if self.targets else []}


_DEFAULTS: dict[int, tuple[str, str]] = {}  # id of the model's module -> its default layers (finding them runs the model)


def default_layers(net: Network) -> tuple[str, str]:
    """(first, last) layer with a spatial map: InceptionV1 ``conv2d0`` and ``mixed5b``."""
    key = id(net.module)
    if key not in _DEFAULTS:
        spatial = [name for name, shape in net.layer_shapes(net.input_size).items() if len(shape) == 3 and not name.startswith("net.")]
        if not spatial:
            raise AtlasError(f"model {net.name} has no layer with a spatial map; give low_layer and high_layer")
        _DEFAULTS[key] = (spatial[0], spatial[-1])
    return _DEFAULTS[key]


def _vector(act: torch.Tensor, pool: bool) -> torch.Tensor:
    act = act.double()
    if pool and act.dim() == 4:
        return act.mean((2, 3))
    return act.reshape(act.shape[0], -1)


def checked_photos(photos: Sequence[str | Path | torch.Tensor], names: Sequence[str], steps: dict[str, list[float]],
                   crop: int = 224, resize: int = 256, interpolation: str = "bilinear") -> list[torch.Tensor]:
    """The photos loaded uncropped (:func:`load_photo`, shorter side ``resize`` with ``interpolation``: the model's
    own), every shift and scale checked against each: a step that leaves less than :data:`MIN_COVER` of the crop
    showing the photo is one line, before any forward pass."""
    loaded = [p if isinstance(p, torch.Tensor) else load_photo(p, resize, crop, interpolation) for p in photos]
    for photo, name in zip(loaded, names, strict=True):
        if photo.dim() != 3 or photo.shape[0] != 3 or min(photo.shape[1:]) < crop:
            raise AtlasError(f"{name}: a photo must be a (3, H, W) tensor with H, W >= {crop}, got {tuple(photo.shape)}")
        for kind in ("shift", "scale"):
            for v in steps[kind]:
                cover = coverage(photo.shape, kind, v, crop)
                if cover < MIN_COVER:
                    unit = " px" if kind == "shift" else ""
                    raise AtlasError(f"{kind} {v:g}{unit} crops the image away: {cover:.0%} of the {crop} px crop would show {name} "
                                     f"(at least {MIN_COVER:.0%} must)")
    return loaded


def check_ranges(photos: Sequence[str | Path | torch.Tensor], shifts: Sequence[int], scales: Sequence[float], angles: Sequence[float],
                 names: Sequence[str], crop: int = 224, resize: int = 256, interpolation: str = "bilinear") -> list[torch.Tensor]:
    """:func:`checked_photos` for the ranges as given (what :func:`invariance_curves` checks first), so a caller can
    refuse a bad range before other work; returns the loaded photos, which :func:`invariance_curves` accepts."""
    return checked_photos(photos, names, _checked_steps(shifts, scales, angles), crop, resize, interpolation)


def invariance_curves(net: Network, photos: Sequence[str | Path | torch.Tensor], *, shifts: Sequence[int] = (),
                      scales: Sequence[float] = (), angles: Sequence[float] = (), low_layer: str | None = None,
                      high_layer: str | None = None, targets: Sequence[int] | None = None, pool_high: bool = True,
                      fill: float | Sequence[float] = 0.5, batch_size: int = 32, names: Sequence[str] | None = None) -> InvarianceCurves:
    """The invariance curves of ``photos`` (paths, or uncropped ``(3, H, W)`` tensors as :func:`load_photo` returns)
    under each shift, scale and angle (see the module docstring for the transforms, layers and normalisation).

    ``targets``: the true class index of each photo (None: each original's top-1 class). ``names`` (for messages)
    default to the paths. Every range is checked against every photo before the first forward.
    """
    steps = _checked_steps(shifts, scales, angles)
    if not photos:
        raise AtlasError("no photos given for the invariance curves")
    names = [str(p) if not isinstance(p, torch.Tensor) else f"photo {i}" for i, p in enumerate(photos)] if names is None else list(names)
    if targets is not None and len(targets) != len(photos):
        raise AtlasError(f"{len(targets)} targets given for {len(photos)} photos")
    for layer in (low_layer, high_layer):
        if layer is not None:
            net.resolve(layer)
    from atlas.data import photo_reading

    crop = net.input_size
    resize, _, interpolation = photo_reading(net.preprocess)  # photos given as paths: read as the model reads them
    loaded = checked_photos(photos, names, steps, crop, resize, interpolation)
    if low_layer is None or high_layer is None:  # after the checks: finding the defaults runs the model once
        lo_default, hi_default = default_layers(net)
        low_layer, high_layer = low_layer or lo_default, high_layer or hi_default
    curves = InvarianceCurves(low_layer, high_layer, pool_high, [], [], steps)
    n = len(loaded)
    for kind in KINDS:
        for table in (curves.low, curves.high, curves.raw_low, curves.raw_high, curves.probability):
            table[kind] = np.zeros((n, len(steps[kind])))
    layers = [low_layer, high_layer]
    for i, photo in enumerate(loaded):
        top, left = _origin(photo, crop)
        original = photo[:, top:top + crop, left:left + crop]
        acts, logits = forward(net, original[None], layers)
        v_low, v_high = _vector(acts[low_layer], False), _vector(acts[high_layer], pool_high)
        norm_low, norm_high = float(v_low.norm()), float(v_high.norm())
        p0 = probabilities(logits)[0]
        target = int(p0.argmax()) if targets is None else int(targets[i])
        if not 0 <= target < p0.numel():
            raise AtlasError(f"{names[i]}: class index {target} is out of range (0-{p0.numel() - 1})")
        curves.targets.append(target)
        curves.original_probability.append(float(p0[target]))
        jobs = [(kind, j) for kind in KINDS for j, v in enumerate(steps[kind]) if not _is_identity(kind, v)]
        for kind in KINDS:  # the identity is the original itself: distance 0, the original's probability
            for j, v in enumerate(steps[kind]):
                if _is_identity(kind, v):
                    curves.probability[kind][i, j] = float(p0[target])
        if not jobs:
            continue
        batch = torch.stack([transform(photo, kind, steps[kind][j], crop, fill) for kind, j in jobs])

        def distances(layer: str, act: torch.Tensor, v_low=v_low, v_high=v_high) -> torch.Tensor:
            # per batch, each row's (low, high) distances to the original (a layer that is both gives both), so the
            # full maps of a large batch are never all kept; row by row in float64 (32 conv2d0 maps are 200 MB so)
            rows = []
            for row in act:
                low = (_vector(row[None], False)[0] - v_low[0]).norm() if layer == low_layer else torch.tensor(math.nan)
                high = (_vector(row[None], pool_high)[0] - v_high[0]).norm() if layer == high_layer else torch.tensor(math.nan)
                rows.append(torch.stack([low.double(), high.double()]))
            return torch.stack(rows)

        out, logits = batched_forward(net, batch, list(dict.fromkeys(layers)), batch_size, reduce=distances)
        d_low, d_high = out[low_layer][:, 0], out[high_layer][:, 1]
        p = probabilities(logits)[:, target]
        for k, (kind, j) in enumerate(jobs):
            curves.raw_low[kind][i, j] = float(d_low[k])
            curves.raw_high[kind][i, j] = float(d_high[k])
            curves.low[kind][i, j] = float(d_low[k]) / norm_low if norm_low > 0 else math.nan
            curves.high[kind][i, j] = float(d_high[k]) / norm_high if norm_high > 0 else math.nan
            curves.probability[kind][i, j] = float(p[k])
    return curves


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------
def _finite(values) -> list:
    return [None if not math.isfinite(v) else round(float(v), 6) for v in np.asarray(values, dtype=float).ravel()]


def plot_invariance(curves: InvarianceCurves, names: Sequence[str]) -> Figure:
    """The paper's Fig. 5 layout: rows translation / scale / rotation, columns low-layer distance, high-layer distance,
    true-class probability, one line per image.

    Parameters
    ----------
    curves : InvarianceCurves
        What :func:`invariance_curves` returns.
    names : sequence of str
        One label per image (the legend), as many as ``curves.targets``.

    Returns
    -------
    matplotlib.figure.Figure
        A Figure of its own (no pyplot state; ``fig.savefig(path)`` writes it, a notebook shows it).
    """
    from matplotlib.figure import Figure

    names = list(names)
    if len(names) != len(curves.targets):
        raise AtlasError(f"{len(names)} names given for {len(curves.targets)} images")
    kinds = [k for k in KINDS if curves.steps.get(k)]
    high = f"{curves.high_layer} (spatial mean)" if curves.pool_high else curves.high_layer
    fig = Figure(figsize=(12, 3.1 * max(1, len(kinds))), layout="constrained")
    axes = fig.subplots(max(1, len(kinds)), 3, squeeze=False)
    for row, kind in enumerate(kinds):
        x = curves.steps[kind]
        for col, (table, title) in enumerate(((curves.low, f"{curves.low_layer}: normalised distance"),
                                              (curves.high, f"{high}: normalised distance"),
                                              (curves.probability, "probability of the true class"))):
            ax = axes[row][col]
            for i, name in enumerate(names):
                ax.plot(x, table[kind][i], marker=".", linewidth=1.2, label=name)
            ax.set_xlabel(TITLES[kind])
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            if col == 2:
                ax.set_ylim(-0.02, 1.02)
    if kinds:
        handles, labels = axes[0][2].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(5, len(names)), fontsize=8)
    return fig


def write_invariance(curves: InvarianceCurves, out: Path, names: Sequence[str]) -> dict:
    """``invariance.png`` (:func:`plot_invariance`) and ``invariance.json`` in ``out``.

    Returns ``{"figure", "json", "low_layer", "high_layer", "mean": {kind: {steps, low, high, probability}}}``.
    """
    fig = plot_invariance(curves, names)  # checks the names first, before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(names)
    kinds = [k for k in KINDS if curves.steps.get(k)]
    fig.savefig(out / "invariance.png", dpi=90)
    summary = {"figure": "invariance.png", "json": "invariance.json", "low_layer": curves.low_layer, "high_layer": curves.high_layer,
               "pool_high": curves.pool_high, "mean": {k: {key: _finite(v) if key != "steps" else v for key, v in curves.mean(k).items()}
                                                       for k in kinds}}
    data = {"low_layer": curves.low_layer, "high_layer": curves.high_layer, "pool_high": curves.pool_high,
            "normalisation": "Euclidean distance divided by the norm of the original's feature vector",
            "images": [{"name": name, "target": curves.targets[i], "original_probability": curves.original_probability[i],
                        **{kind: {"steps": curves.steps[kind], "low": _finite(curves.low[kind][i]), "high": _finite(curves.high[kind][i]),
                                  "raw_low": _finite(curves.raw_low[kind][i]), "raw_high": _finite(curves.raw_high[kind][i]),
                                  "probability": _finite(curves.probability[kind][i])} for kind in kinds}}
                       for i, name in enumerate(names)],
            "mean": summary["mean"]}
    (out / "invariance.json").write_text(json.dumps(data, indent=1))
    return summary
