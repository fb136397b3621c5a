"""Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7): slide a grey square over one image and watch the network.

For every position of the square, :func:`occlusion_maps` records the four maps of the paper's figure:

(a) the total activation (sum over positions) of the *strongest feature map* of a layer: the channel with the
    largest single activation in the unoccluded image (or the channel asked for);
(b) that feature map's deconvnet projection for the unoccluded image, at the channel's maximal position
    (``atlas.units.project_units``), to show what the map responds to;
(c) the probability of the true class (or, when none is given, of the unoccluded image's top-1 class);
(d) the most probable class.

The occluded copies go through the network in batches. On the project's InceptionV1 (BVLC, Caffe style) the early
layers are computed *incrementally*, which is exact: a square changes a layer's output only where the layer's
receptive field meets it, so up to ``mixed3b`` (28 x 28) only a window around the square is recomputed, from the
unoccluded image's cached activations, and pasted into them; from the pooling before ``mixed4a`` on, where the
changed region covers most of the map, the whole batch runs. Everything else (other models, TF-style padding whose
pads depend on the input size, a layer inside the stem) takes the plain batched forward of
:mod:`atlas.inspect.engine`. :func:`occlusion_loop` is the reference: one forward per position, batch 1.

:func:`write_occlusion` draws the four panels into ``occlusion.png`` and writes the numbers to ``occlusion.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from atlas.errors import AtlasError
from atlas.inspect.engine import batched_forward, channels_last, forward, probabilities
from atlas.models import Network

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the module
    from matplotlib.figure import Figure

# The grey of the square: the ImageNet mean pixel (RGB in [0, 1], the torchvision normalisation mean). After the
# BVLC model's own mean subtraction (Caffe BGR 104, 117, 123) it is within 1/255 of zero, "no signal", as the paper's
# grey square is.
GREY = (0.485, 0.456, 0.406)


# --------------------------------------------------------------------------- the pure core


def _size_pair(size_px: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size_px, (int, np.integer)):
        return int(size_px), int(size_px)
    h, w = (int(v) for v in size_px)
    return h, w


def _axis(n: int, occluder: int, stride: int) -> np.ndarray:
    positions = list(range(0, n - occluder + 1, stride))
    if positions[-1] != n - occluder:  # the last square flush with the edge, so the whole image is covered
        positions.append(n - occluder)
    return np.asarray(positions, np.int64)


def occluder_grid(size_px: int | Sequence[int], occluder: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners ``(ys, xs)`` of the occluding square along each axis of a ``size_px`` image (an int or (H, W)).

    The square always lies **fully inside** the image: positions ``0, stride, 2 * stride, ...`` up to
    ``size - occluder``, and, when that last one is not on the stride, ``size - occluder`` is added so the square
    also touches the bottom and right edges (every pixel is covered by some position). The occluder positions are
    the product ``ys x xs``. A stride below 1 or larger than the image, an occluder below 1 or larger than the
    image: one-line AtlasError.
    """
    h, w = _size_pair(size_px)
    occluder, stride = int(occluder), int(stride)
    if h < 1 or w < 1:
        raise AtlasError(f"the image has no pixels ({h} x {w})")
    if occluder < 1:
        raise AtlasError(f"the occluder must be at least 1 px, got {occluder}")
    if occluder > min(h, w):
        raise AtlasError(f"the occluder ({occluder} px) is larger than the image ({h} x {w} px)")
    if stride < 1:
        raise AtlasError(f"the occluder stride must be at least 1 px, got {stride}")
    if stride > max(h, w):
        raise AtlasError(f"the occluder stride ({stride} px) is larger than the image ({h} x {w} px)")
    return _axis(h, occluder, stride), _axis(w, occluder, stride)


def occlude(images: torch.Tensor, boxes: torch.Tensor | np.ndarray | Sequence, fill: Sequence[float] = GREY) -> torch.Tensor:
    """Copies of ``images`` with box ``i`` painted ``fill`` in copy ``i``.

    ``images`` is one image (3, H, W), repeated once per box, or a batch (n, 3, H, W) with one box each; ``boxes``
    (n, 4) are (top, left, bottom, right) in pixels, bottom/right exclusive, clipped to the image. ``fill`` is an
    RGB colour in [0, 1] (default :data:`GREY`, the ImageNet mean pixel). The input is not modified.
    """
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    if images.dim() == 3:
        out = images.unsqueeze(0).repeat(len(boxes), 1, 1, 1)
    elif images.dim() == 4 and images.shape[0] == len(boxes):
        out = images.clone()
    else:
        raise AtlasError(f"occlude takes one (3, H, W) image or (n, 3, H, W) images with n boxes; got {tuple(images.shape)} "
                         f"and {len(boxes)} boxes")
    colour = torch.as_tensor(fill, dtype=out.dtype, device=out.device).view(3, 1, 1)
    h, w = out.shape[-2:]
    for i, (top, left, bottom, right) in enumerate(boxes):
        t, lft, b, r = max(int(top), 0), max(int(left), 0), min(int(bottom), h), min(int(right), w)
        if b > t and r > lft:
            out[i, :, t:b, lft:r] = colour
    return out


def _boxes(ys: np.ndarray, xs: np.ndarray, occluder: int) -> np.ndarray:
    """(n, 4) boxes of every position, row-major (y outer, x inner)."""
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    return np.stack([yy, xx, yy + occluder, xx + occluder], axis=1)


# --------------------------------------------------------------------------- the result


@dataclass
class OcclusionResult:
    """The four maps of Zeiler & Fergus's Fig. 7 for one image; maps are (len(ys), len(xs)), row-major by position."""

    layer: str
    channel: int
    target: int
    occluder: int
    stride: int
    size: tuple[int, int]
    ys: np.ndarray  # top rows of the square
    xs: np.ndarray  # left columns of the square
    activation: np.ndarray  # (a) the channel's total activation, float64
    probability: np.ndarray  # (c) the target's probability, float64
    top_class: np.ndarray  # (d) the most probable class, int64
    top_probability: np.ndarray  # (d)'s probability, float64
    unoccluded: dict  # {"activation", "probability", "top_class", "top_probability", "max_activation"} of the plain image
    projection: np.ndarray | None = None  # (b) (3, H, W) float32 signed deconvnet projection, None when not asked for
    unit: tuple[int, int, int] = (0, 0, 0)  # (channel, y, x) the projection starts from: the channel's maximal position
    projection_method: str = "deconvnet"  # "gradient" for a model that is no ReLU network (the deconvnet is undefined there)
    box: tuple[int, int, int, int] | None = None  # the unit's receptive field (top, left, bottom, right)
    method: str = "batched"  # "incremental", "batched" or "loop": how the maps were computed
    seconds: float = 0.0  # time of the occluded forwards
    extra: dict = field(default_factory=dict)

    @property
    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres (y, x) in pixels of the square at each row / column of the maps (where the paper plots a value)."""
        half = self.occluder / 2.0
        return self.ys + half, self.xs + half


# --------------------------------------------------------------------------- shared parts


def _check_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise AtlasError(f"the image must be a (3, H, W) tensor in [0, 1], got {got}")
    return image.detach().float()


def _spatial(net: Network, layer: str, act: torch.Tensor) -> None:
    if act.dim() != 4:
        raise AtlasError(f"layer '{layer}' has no spatial positions (shape {tuple(act.shape[1:])}); occlusion needs a feature-map layer")


def _reference(net: Network, image: torch.Tensor, layer: str, channel: int | None, target: int | None) -> tuple[int, int, dict, tuple]:
    """The unoccluded image's forward: the channel (strongest unless given), the target (given, else top-1), the
    plain numbers and the channel's maximal position."""
    from atlas.units import max_positions

    acts, logits = forward(net, image.unsqueeze(0), [layer])
    act = acts[layer]
    _spatial(net, layer, act)
    values, pos = max_positions(act)
    n_channels = act.shape[1]
    if channel is None:
        channel = int(values[0].argmax())
    elif not 0 <= int(channel) < n_channels:
        raise AtlasError(f"channel {channel} is outside layer '{layer}' ({n_channels} channels: 0-{n_channels - 1})")
    channel = int(channel)
    p = probabilities(logits)[0]
    if target is None:
        target = int(p.argmax())
    elif not 0 <= int(target) < p.numel():
        raise AtlasError(f"class {target} is outside the model's {p.numel()} classes")
    target = int(target)
    plain = {"activation": float(act[0, channel].double().sum()), "max_activation": float(values[0, channel]),
             "probability": float(p[target]), "top_class": int(p.argmax()), "top_probability": float(p.max())}
    y, x = (int(v) for v in pos[0, channel])
    return channel, target, plain, (channel, y, x)


def _project(net: Network, image: torch.Tensor, layer: str,
             unit: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int, int] | None, str]:
    """(b): the deconvnet projection of ``unit``, its receptive-field box and the method used. The deconvnet is
    defined for ReLU networks only; for any other (a Vision Transformer: GELU, softmax attention, LayerNorm) panel (b)
    is the plain gradient of the unit, and says so, rather than the report failing."""
    from atlas.units import project_units, receptive_field

    method = "deconvnet"
    try:
        projection = project_units(net, layer, image.unsqueeze(0), [list(unit)], method=method)[0].cpu().numpy()
    except AtlasError as exc:
        if "gradient method" not in str(exc):
            raise
        method = "gradient"
        projection = project_units(net, layer, image.unsqueeze(0), [list(unit)], method=method)[0].cpu().numpy()
    try:
        box = receptive_field(net, layer, size=image.shape[-1]).box(unit[1], unit[2], crop=image.shape[-1])
    except AtlasError:  # a model whose receptive field cannot be computed: the projection is still shown, without its box
        box = None
    return projection, box, method


def _result(layer, channel, target, occluder, stride, image, ys, xs, sums, logits, plain, unit, method, seconds) -> OcclusionResult:
    p = probabilities(logits).cpu()
    sums = sums.cpu()
    shape = (len(ys), len(xs))
    top_p, top = p.max(dim=1)
    return OcclusionResult(layer=layer, channel=channel, target=target, occluder=int(occluder), stride=int(stride),
                           size=(int(image.shape[-2]), int(image.shape[-1])), ys=ys, xs=xs,
                           activation=sums.double().numpy().reshape(shape), probability=p[:, target].numpy().reshape(shape),
                           top_class=top.numpy().astype(np.int64).reshape(shape), top_probability=top_p.numpy().reshape(shape),
                           unoccluded=plain, unit=unit, method=method, seconds=seconds)


# --------------------------------------------------------------------------- channels-last copies


def _channels_last(net: Network) -> Network:
    return channels_last(net)


# --------------------------------------------------------------------------- the incremental forward


@dataclass(frozen=True)
class _Stage:
    """A part of the network whose output row ``o`` depends on input rows ``[o * stride + lo, o * stride + hi]``."""

    name: str
    stride: int
    lo: int
    hi: int


# InceptionV1 (Caffe style), read off its layers: the stem conv2d0 (7x7/2, pad 3) -> pool (3/2, ceil) -> LRN ->
# conv2d1 (1x1) -> conv2d2 (3x3, pad 1) -> LRN -> pool (3/2, ceil) makes a 28 x 28 map whose cell o reads pixels
# [8o - 7, 8o + 19]; each inception block at stride 1 reads +-2 cells (its 5x5 branch, pad 2). Crops start on a
# multiple of each stage's stride so that a crop's output grid is the full map's grid shifted by a whole cell.
_STAGES = (_Stage("stem", 8, -7, 19), _Stage("mixed3a", 1, -2, 2), _Stage("mixed3b", 1, -2, 2))
_INCREMENTAL_LAYERS = ("mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e", "mixed5a", "mixed5b")


def _incremental_ok(net: Network, layer: str) -> bool:
    from atlas.models.inception import InceptionV1

    m = net.module
    if not isinstance(m, InceptionV1) or getattr(m, "style", None) != "caffe" or layer not in _INCREMENTAL_LAYERS:
        return False
    # the geometry above, checked against the modules themselves (a changed architecture falls back to the plain path)
    c0, c2 = m.conv2d0[0], m.conv2d2[0]
    pool = m.pool
    return (c0.kernel_size == (7, 7) and c0.stride == (2, 2) and c0.padding == (3, 3) and c2.kernel_size == (3, 3)
            and c2.padding == (1, 1) and isinstance(pool, torch.nn.MaxPool2d) and pool.kernel_size == 3 and pool.stride == 2
            and pool.padding == 0 and pool.ceil_mode and all(getattr(m, n).b5[1][0].padding == (2, 2) for n in ("mixed3a", "mixed3b")))


def _stem(m, x: torch.Tensor) -> torch.Tensor:
    x = m.preprocess(x)
    x = m.lrn(m.pool(m.conv2d0(x)))
    return m.pool(m.lrn(m.conv2d2(m.conv2d1(x))))


def _affected(a0: int, a1: int, stage: _Stage, n_out: int) -> tuple[int, int]:
    """Output rows (inclusive) whose inputs meet the changed input rows [a0, a1]."""
    o0 = max(math.ceil((a0 - stage.hi) / stage.stride), 0)
    o1 = min(math.floor((a1 - stage.lo) / stage.stride), n_out - 1)
    return o0, o1


class _Axis:
    """One axis of one stage for a batch of squares: the changed output rows and the input crop that computes them."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray, stage: _Stage, n_in: int, n_out: int):
        s = stage.stride
        self.o0, self.o1 = np.empty_like(starts), np.empty_like(starts)
        need0, need1 = np.empty_like(starts), np.empty_like(starts)
        for i, (a0, a1) in enumerate(zip(starts, ends, strict=True)):
            o0, o1 = _affected(int(a0), int(a1), stage, n_out)
            self.o0[i], self.o1[i] = o0, o1
            need0[i], need1[i] = max(o0 * s + stage.lo, 0), min(o1 * s + stage.hi, n_in - 1)
        # one crop length for the whole batch (crops are stacked): the widest need, from a start rounded down to the
        # stride, plus one stride of slack for the shift that keeps a crop inside the image
        length = int(max(n1 - (n0 // s) * s + 1 for n0, n1 in zip(need0, need1, strict=True)))
        length = min(-(-length // s) * s + s, n_in)
        self.length = length
        self.c0 = np.empty_like(starts)
        for i, (n0, n1) in enumerate(zip(need0, need1, strict=True)):
            c0 = (min(int(n0), n_in - length) // s) * s
            if c0 + length <= n1 or c0 < 0:  # cannot happen with the slack above; a wrong paste would be silent
                raise AtlasError(f"internal error: the incremental crop [{c0}, {c0 + length}) misses rows {n0}-{n1}")
            self.c0[i] = c0
        self.out_offset = self.c0 // s  # the crop's output row 0 is the full map's row c0 / s
        self.changed_end = self.o1 + 1


class _Incremental:
    """Occluded forwards of caffe-style InceptionV1 that recompute only what a square changes, up to mixed3b."""

    def __init__(self, net: Network, image: torch.Tensor, layer: str):
        self.m = net.module
        self.layer = layer
        self.image = image
        with torch.inference_mode():
            x = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
            stem = _stem(self.m, x)
            a = self.m.mixed3a(stem)
            b = self.m.mixed3b(a)
        self.cache = {"input": x, "stem": stem, "mixed3a": a, "mixed3b": b}

    def run(self, images: torch.Tensor, boxes: np.ndarray, channel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The channel's total activation at the layer and the logits for ``images`` (occluded copies with ``boxes``)."""
        n = images.shape[0]
        previous = images.contiguous(memory_format=torch.channels_last)
        rows = (boxes[:, 0], boxes[:, 2] - 1)  # the changed rows and columns of the input, inclusive
        cols = (boxes[:, 1], boxes[:, 3] - 1)
        grabbed = None
        with torch.inference_mode():
            for stage in _STAGES:
                fn = (lambda t: _stem(self.m, t)) if stage.name == "stem" else getattr(self.m, stage.name)
                full = self.cache[stage.name]
                n_in_h, n_in_w = previous.shape[-2:]
                n_out_h, n_out_w = full.shape[-2:]
                ay = _Axis(rows[0], rows[1], stage, n_in_h, n_out_h)
                ax = _Axis(cols[0], cols[1], stage, n_in_w, n_out_w)
                crops = torch.stack([previous[i, :, ay.c0[i]:ay.c0[i] + ay.length, ax.c0[i]:ax.c0[i] + ax.length] for i in range(n)])
                computed = fn(crops.contiguous(memory_format=torch.channels_last))
                out = full.expand(n, -1, -1, -1).clone(memory_format=torch.channels_last)
                for i in range(n):
                    y0, y1, x0, x1 = int(ay.o0[i]), int(ay.changed_end[i]), int(ax.o0[i]), int(ax.changed_end[i])
                    if y1 > y0 and x1 > x0:
                        oy, ox = int(ay.out_offset[i]), int(ax.out_offset[i])
                        out[i, :, y0:y1, x0:x1] = computed[i, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
                previous = out
                rows = (ay.o0, ay.o1)
                cols = (ax.o0, ax.o1)
                if stage.name == self.layer:
                    grabbed = out[:, channel].sum((1, 2))
            x = self.m.pool(previous)
            for name in ("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"):
                x = getattr(self.m, name)(x)
                if name == self.layer:
                    grabbed = x[:, channel].sum((1, 2))
            x = self.m.mixed5a(self.m.pool(x))
            if self.layer == "mixed5a":
                grabbed = x[:, channel].sum((1, 2))
            x = self.m.mixed5b(x)
            if self.layer == "mixed5b":
                grabbed = x[:, channel].sum((1, 2))
            logits = self.m.logits(x.mean((2, 3)))
        return grabbed.float(), logits.float()


# --------------------------------------------------------------------------- the maps


def occlusion_maps(net: Network, image: torch.Tensor, layer: str, *, occluder: int = 32, stride: int = 8, target: int | None = None,
                   batch_size: int = 32, channel: int | None = None, fill: Sequence[float] = GREY, project: bool = True,
                   incremental: bool = True) -> OcclusionResult:
    """The occlusion maps of Zeiler & Fergus's Fig. 7 for one image, the occluded copies in batches.

    Parameters
    ----------
    net : Network
        The model (eval mode, as :func:`atlas.models.load_model` returns it); not modified.
    image : tensor (3, H, W)
        RGB in [0, 1] (e.g. :func:`atlas.inspect.engine.read_image`).
    layer : str
        A layer with spatial positions whose strongest feature map is followed, e.g. ``"mixed4c"``.
    occluder : int, default 32
        Side of the grey square in pixels.
    stride : int, default 8
        Step between positions (:func:`occluder_grid`: the square always fully inside the image).
    target : int or None, default None
        The class whose probability map (c) shows; None: the unoccluded image's top-1 class.
    batch_size : int, default 32
        Occluded copies per forward.
    channel : int or None, default None
        The feature map of (a) and (b); None: the channel with the largest activation in the unoccluded image.
    fill : RGB in [0, 1], default :data:`GREY`
        The square's colour.
    project : bool, default True
        Also compute (b), the deconvnet projection (one forward and backward pass).
    incremental : bool, default True
        Recompute only the region a square changes in InceptionV1's early layers (exact; see the module docstring);
        False, or a model it does not apply to: the whole network per copy, in channels-last memory.

    Returns
    -------
    OcclusionResult
        Maps (len(ys), len(xs)): ``activation`` (a), ``probability`` (c), ``top_class`` / ``top_probability`` (d);
        ``projection`` (b); ``unoccluded`` numbers; ``method`` says which path ran.

    Raises
    ------
    AtlasError
        One line: an image that is not (3, H, W), an occluder larger than the image or below 1 px, a stride below 1 or
        larger than the image, an unknown layer or one without positions, a channel or class out of range.
    """
    image = _check_image(image)
    ys, xs = occluder_grid(image.shape[-2:], occluder, stride)
    if int(batch_size) < 1:
        raise AtlasError(f"batch_size must be at least 1, got {batch_size}")
    channel, target, plain, unit = _reference(net, image, layer, channel, target)
    boxes = _boxes(ys, xs, int(occluder))
    start = time.perf_counter()
    use_incremental = incremental and _incremental_ok(net, layer)
    fast = _channels_last(net)
    sums, logits = [], []
    if use_incremental:
        engine = _Incremental(fast, image, layer)
    for lo in range(0, len(boxes), int(batch_size)):
        chunk = boxes[lo:lo + int(batch_size)]
        batch = occlude(image, chunk, fill)
        if use_incremental:
            s, z = engine.run(batch, chunk, channel)
        else:
            def reduce(_layer, act):
                return act[:, channel].double().sum((1, 2))

            batch = batch.contiguous(memory_format=torch.channels_last)
            acts, z = batched_forward(fast, batch, [layer], batch_size=len(chunk), reduce=reduce)
            s = acts[layer]
        sums.append(s)
        logits.append(z)
    seconds = time.perf_counter() - start
    result = _result(layer, channel, target, occluder, stride, image, ys, xs, torch.cat(sums), torch.cat(logits), plain, unit,
                     "incremental" if use_incremental else "batched", seconds)
    if project:
        result.projection, result.box, result.projection_method = _project(net, image, layer, unit)
    return result


def occlusion_loop(net: Network, image: torch.Tensor, layer: str, *, occluder: int = 32, stride: int = 8, target: int | None = None,
                   channel: int | None = None, fill: Sequence[float] = GREY, project: bool = True) -> OcclusionResult:
    """The plain reference for :func:`occlusion_maps`: one forward of the unmodified model per occluder position,
    batch 1 (:func:`atlas.inspect.engine.forward`). Same parameters and result; ``method`` is ``"loop"``."""
    image = _check_image(image)
    ys, xs = occluder_grid(image.shape[-2:], occluder, stride)
    channel, target, plain, unit = _reference(net, image, layer, channel, target)
    boxes = _boxes(ys, xs, int(occluder))
    start = time.perf_counter()
    sums, logits = [], []
    for box in boxes:
        acts, z = forward(net, occlude(image, box[None], fill), [layer])
        sums.append(acts[layer][:, channel].double().sum((1, 2)))
        logits.append(z)
    seconds = time.perf_counter() - start
    result = _result(layer, channel, target, occluder, stride, image, ys, xs, torch.cat(sums), torch.cat(logits), plain, unit,
                     "loop", seconds)
    if project:
        result.projection, result.box, result.projection_method = _project(net, image, layer, unit)
    return result


# --------------------------------------------------------------------------- the writer


TOP_CLASSES_SHOWN = 9  # classes of map (d) with their own colour; the rest share one grey "other"


def _edges(centres: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Cell edges around each centre: half-way between neighbours, the outer ones at the image border."""
    c = np.asarray(centres, np.float64)
    mids = (c[1:] + c[:-1]) / 2.0
    return np.concatenate([[lo], mids, [hi]])


def _projection_display(projection: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Signed projection (3, H, W) -> uint8 (H, W, 3) around mid grey, scaled by the ``percentile`` of its non-zero
    magnitudes (the unit lens's contrast rule, over the pixels the unit sees rather than the whole image)."""
    magnitude = np.abs(projection)
    nonzero = magnitude[magnitude > 0]
    peak = float(np.percentile(nonzero, percentile)) if nonzero.size else 0.0
    scaled = 127.5 + 127.5 * projection / peak if peak > 0 else np.full(projection.shape, 127.5)
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _name(class_names: Sequence[str], index: int) -> str:
    return class_names[index] if 0 <= index < len(class_names) else str(index)


def _shown_classes(result: OcclusionResult) -> tuple[list[int], dict[int, int]]:
    """Map (d)'s :data:`TOP_CLASSES_SHOWN` most frequent classes, most frequent first, and every class's count."""
    classes, counts = np.unique(result.top_class, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    shown = [int(classes[i]) for i in order[:TOP_CLASSES_SHOWN]]
    return shown, {int(c): int(n) for c, n in zip(classes, counts, strict=True)}


def plot_occlusion(result: OcclusionResult, picture: np.ndarray, class_names: Sequence[str] = ()) -> Figure:
    """The four panels of Zeiler & Fergus's Fig. 7 for one :class:`OcclusionResult`.

    (a) the feature map's total activation per occluder position as a heat map over the image, (b) its deconvnet
    projection for the unoccluded image (the unit's receptive field outlined), (c) the target class's probability per
    position, (d) the most probable class per position, coloured, the :data:`TOP_CLASSES_SHOWN` most frequent named
    in a legend. Each value is drawn as the cell around the square's centre, where the paper plots it.

    Parameters
    ----------
    result : OcclusionResult
        What :func:`occlusion_maps` (or :func:`occlusion_loop`) returns.
    picture : ndarray (H, W, 3) uint8
        The image the result was computed on.
    class_names : sequence of str, default ()
        The model's class names; a class without a name is shown by its index.

    Returns
    -------
    matplotlib.figure.Figure
        A Figure of its own (no pyplot state; ``fig.savefig(path)`` writes it, a notebook shows it).
    """
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    picture = np.asarray(picture)
    h, w = result.size
    if picture.shape[:2] != (h, w) or picture.ndim != 3:
        raise AtlasError(f"the picture is {picture.shape}, the occlusion maps were computed on a {h} x {w} image")
    cy, cx = result.centres
    ey, ex = _edges(cy, 0, h), _edges(cx, 0, w)

    # (d): the most frequent classes get colours, the rest are "other"
    shown, freq = _shown_classes(result)
    code = np.full(result.top_class.shape, len(shown), np.int64)
    for k, c in enumerate(shown):
        code[result.top_class == c] = k
    palette = [colormaps["tab10"](k) for k in range(len(shown))] + [(0.6, 0.6, 0.6, 1.0)]

    fig = Figure(figsize=(17, 4.6), dpi=100)
    axes = fig.subplots(1, 4)
    target_name = _name(class_names, result.target)
    a0 = axes[0]
    a0.imshow(picture, extent=(0, w, h, 0))
    mesh = a0.pcolormesh(ex, ey, result.activation, cmap="jet", alpha=0.55, shading="flat")
    fig.colorbar(mesh, ax=a0, fraction=0.046, pad=0.03)
    a0.add_patch(Rectangle((0.5, 0.5), result.occluder, result.occluder, fill=False, edgecolor="white", linewidth=1.2))
    a0.set_title(f"(a) {result.layer} channel {result.channel}: total activation\n(unoccluded {result.unoccluded['activation']:.4g}; "
                 f"square {result.occluder} px, stride {result.stride})", fontsize=9)
    a1 = axes[1]
    if result.projection is not None:
        a1.imshow(_projection_display(result.projection), extent=(0, w, h, 0))
        if result.box is not None:
            top, left, bottom, right = result.box
            a1.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="yellow", linewidth=1.2))
        a1.set_title(f"(b) its {result.projection_method} projection, unit ({result.unit[1]}, {result.unit[2]})\n"
                     "(unoccluded image; yellow: receptive field)", fontsize=9)
    else:
        a1.text(0.5, 0.5, "projection not computed", ha="center", va="center", transform=a1.transAxes)
        a1.set_title("(b) projection", fontsize=9)
    a2 = axes[2]
    mesh = a2.pcolormesh(ex, ey, result.probability, cmap="jet", vmin=0.0, vmax=max(float(result.probability.max()), 1e-12), shading="flat")
    a2.set_xlim(0, w)
    a2.set_ylim(h, 0)
    fig.colorbar(mesh, ax=a2, fraction=0.046, pad=0.03)
    a2.set_title(f"(c) p({target_name[:28]})\n(unoccluded {result.unoccluded['probability']:.3f}, "
                 f"min {float(result.probability.min()):.3f})", fontsize=9)
    a3 = axes[3]
    cmap = ListedColormap(palette)
    a3.pcolormesh(ex, ey, code, cmap=cmap, norm=BoundaryNorm(np.arange(len(palette) + 1) - 0.5, len(palette)), shading="flat")
    a3.set_xlim(0, w)
    a3.set_ylim(h, 0)
    handles = [Patch(color=palette[k], label=f"{_name(class_names, c)[:24]}{' (target)' if c == result.target else ''} {freq[c]}")
               for k, c in enumerate(shown)]
    rest = int(code.size - sum(freq[c] for c in shown))
    if rest:
        handles.append(Patch(color=palette[-1], label=f"other classes {rest}"))
    a3.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False, title="positions", title_fontsize=7)
    a3.set_title("(d) most probable class", fontsize=9)
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.01, right=0.88, top=0.84, bottom=0.03, wspace=0.22)
    return fig


def write_occlusion(result: OcclusionResult, picture: np.ndarray, out: str | Path, class_names: Sequence[str] = (),
                    stem: str = "occlusion") -> dict:
    """Draw the four maps (:func:`plot_occlusion`) into ``out/occlusion.png`` and write the numbers to
    ``out/occlusion.json``. ``picture`` is the (H, W, 3) uint8 image the result was computed on.

    Returns a JSON-able summary: ``{"figure", "json"`` (names relative to ``out``), ``"layer", "channel", "target",
    "target_name", "unoccluded_probability", "min_probability", "min_at"`` (the square's centre, y, x),
    ``"positions", "top_classes"`` (class, name, positions)``}``.
    """
    fig = plot_occlusion(result, picture, class_names)  # checks the picture first, before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure = f"{stem}.png"
    fig.savefig(out / figure)
    cy, cx = result.centres
    shown, freq = _shown_classes(result)
    target_name = _name(class_names, result.target)

    i_min = int(np.argmin(result.probability))
    r_min, c_min = divmod(i_min, result.probability.shape[1])
    top_classes = [{"class": c, "name": _name(class_names, c), "positions": freq[c]} for c in shown]
    numbers = {
        "layer": result.layer, "channel": result.channel, "target": result.target, "target_name": target_name,
        "occluder": result.occluder, "stride": result.stride, "size": list(result.size), "fill": list(GREY),
        "ys": result.ys.tolist(), "xs": result.xs.tolist(), "unoccluded": result.unoccluded,
        "unit": list(result.unit), "projection_method": result.projection_method,
        "receptive_field": list(result.box) if result.box is not None else None,
        "activation": result.activation.tolist(), "probability": result.probability.tolist(),
        "top_class": result.top_class.tolist(), "top_probability": result.top_probability.tolist(),
        "top_classes": top_classes, "method": result.method, "seconds": round(result.seconds, 3),
        "note": "map[i][j] is the square with top-left corner (ys[i], xs[j]); activation = the channel's sum over positions",
    }
    name = f"{stem}.json"
    (out / name).write_text(json.dumps(numbers, indent=1))
    return {"figure": figure, "json": name, "layer": result.layer, "channel": result.channel, "target": result.target,
            "target_name": target_name, "unoccluded_probability": result.unoccluded["probability"],
            "probability": result.unoccluded["probability"],  # the same, under the name the report reads
            "min_probability": float(result.probability.min()),
            "min_at": [float(cy[r_min]), float(cx[c_min])], "positions": int(result.probability.size), "top_classes": top_classes}
