"""Projections of single units back to input pixels: Zeiler & Fergus's deconvnet, guided backpropagation, the gradient.

The pure core is :func:`project_units` (a batch of images, one unit each, to signed projections in the RGB
input's pixel space); :func:`to_display` turns one projection into the patch the unit lens shows beside its
dataset patch; :func:`write_projections` is the writer that does this for every top example of a layer
(``units/{layer}/top``) into ``units/{layer}/projection/{method}``.

How the three methods are computed
----------------------------------
All three are one backward pass from the unit, started (per image, in one batch) as a one-hot at the unit's
(channel, y, x) times the unit's own activation, so every other activation of the layer is zeroed and a unit whose
activation is 0 projects to exactly 0. They differ only in what replaces the backward of each ``nn.ReLU`` module:

- ``deconvnet`` (Zeiler & Fergus 2014): ``relu(incoming signal)``, the forward mask ignored (rectification on the way
  back). Max pooling is undone by the forward pass's switches (the backward of max pooling routes each value to its
  window's argmax, which is what the switches record), convolutions by their transposed filters (their backward).
- ``guided`` (Springenberg et al. 2015): the incoming signal where both the forward input and the signal are positive.
- ``gradient``: the plain gradient of the unit's activation times that activation.

The ReLU backward is swapped for the duration of the call only, on the model's own ``nn.ReLU`` modules (the style of
:func:`atlas.render.optimize.redirected_relus`) and restored afterwards, also on error. A model that applies ReLU as a
function (``F.relu``, e.g. torchvision's googlenet) instead of through modules is refused for ``deconvnet`` and
``guided`` in one line: its ReLUs could not be swapped and the result would silently be the gradient's. So is a model
that applies another nonlinearity (ReLU6, GELU, SiLU, sigmoid, ...) before the layer: the two methods have no rule for it.

Decisions
---------
- **LRN** (``atlas.models.layers.LocalResponseNorm``, ``nn.LocalResponseNorm``): the deconvnet passes the signal
  through it unchanged (identity backward). The deconvnet is an approximate inverse built from switches,
  rectification and transposed filters only (the paper's three operations: its reverse pass has no normalisation
  step). LRN's true backward depends on the forward activations and has negative
  cross-channel terms that would bring back the negative signals the rectification has just cut; it mixes channels
  at one position only, so passing it through moves nothing in space (the receptive field is the same). ``guided``
  and ``gradient`` are gradients and keep LRN's own backward.
- **Inception branches** (and any concatenation): each branch receives its slice of the signal (the backward of the
  concatenation) and the branch projections sum at the block's input (autograd sums the uses of a tensor). The
  pool branch's max pool is undone by its switches like any other. Residual additions (ResNet) likewise sum both
  paths.
- **Preprocessing** (RGB [0, 1] -> BGR * 255 - mean, or torchvision's mean/std) is part of the path, so the result is
  in the RGB input's pixel space: its backward (channel order back to RGB, times the scale) is applied last. The
  projection's overall magnitude therefore includes that constant scale; displays are scaled relative to the
  maximum, so only signs and relative sizes matter.
- A unit of a layer without a ReLU right before it (e.g. a ResNet ``conv1`` or a pre-ReLU convolution) can have a
  negative activation; the seed is still the activation (negative), which the deconvnet's first rectification cuts.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from atlas import store
from atlas.data import load_image, photo_reading, real_path
from atlas.errors import AtlasError
from atlas.models import LocalResponseNorm, Network, StopForward, load_run_model
from atlas.render.optimize import prepared
from atlas.units.receptive import spatial_layers
from atlas.units.topk import fit_patch

METHODS = ("deconvnet", "guided", "gradient")
GREY = 127
DEFAULT_PATCH = 64


# --------------------------------------------------------------------------- backward rules


class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward ``relu(grad)`` (Zeiler & Fergus's rectification of the signal on the way back)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward: the signal where the forward input and the signal are both positive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clamp(min=0)
        ctx.save_for_backward(y > 0)  # a bool mask: a quarter of the memory of the activation itself
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (alive,) = ctx.saved_tensors
        return grad.clamp(min=0) * alive


class _PassBackward(torch.autograd.Function):
    """Forward: ``y`` (the layer's own output, computed outside); backward: the signal unchanged, to ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _deconv_relu(x: torch.Tensor) -> torch.Tensor:
    return _DeconvReLU.apply(x)


def _guided_relu(x: torch.Tensor) -> torch.Tensor:
    return _GuidedReLU.apply(x)


def _passing(forward):
    def passed(x: torch.Tensor) -> torch.Tensor:
        return _PassBackward.apply(x, forward(x).detach())  # the exact forward of the layer, identity backward

    return passed


@contextlib.contextmanager
def _swapped(module: nn.Module, method: str) -> Iterator[None]:
    """Give the model's ReLU (and, for the deconvnet, LRN) modules the method's backward; put them back afterwards."""
    swaps: list[tuple[nn.Module, object]] = []
    if method in ("deconvnet", "guided"):
        new = _deconv_relu if method == "deconvnet" else _guided_relu
        swaps += [(m, new) for m in module.modules() if isinstance(m, nn.ReLU)]
    if method == "deconvnet":
        swaps += [(m, _passing(m.forward)) for m in module.modules() if isinstance(m, LocalResponseNorm | nn.LocalResponseNorm)]
    saved = [(m, m.__dict__.get("forward", None), "forward" in m.__dict__) for m, _ in swaps]
    try:
        for m, new in swaps:
            m.forward = new
        yield
    finally:
        for m, old, had in saved:
            if had:
                m.forward = old  # an instance-level forward someone else had set (e.g. a redirected ReLU)
            else:
                m.__dict__.pop("forward", None)


_FUNCTIONAL_RELUS = {torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}
# Other nonlinearities: the deconvnet and guided backpropagation define a rule for ReLUs only.
_OTHER_NONLINEARITIES = {F.relu6: "ReLU6", F.hardtanh: "ReLU6/hardtanh", F.leaky_relu: "leaky ReLU", F.elu: "ELU", F.selu: "SELU",
                         F.celu: "CELU", F.gelu: "GELU", F.silu: "SiLU", F.mish: "Mish", F.hardswish: "hardswish",
                         F.hardsigmoid: "hardsigmoid", F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
                         F.tanh: "tanh", torch.tanh: "tanh", torch.Tensor.tanh: "tanh", F.softplus: "softplus",
                         # a transformer's attention (timm's explicit form, which atlas.models.wrap selects)
                         F.softmax: "softmax attention", torch.softmax: "softmax attention",
                         torch.Tensor.softmax: "softmax attention"}


class _Nonlinearities(torch.overrides.TorchFunctionMode):
    """Notes what a forward applies that the module swap cannot reach: ReLUs called as functions, other nonlinearities."""

    def __init__(self):
        super().__init__()
        self.functional_relus = 0
        self.others: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FUNCTIONAL_RELUS:
            self.functional_relus += 1
        elif func in _OTHER_NONLINEARITIES and _OTHER_NONLINEARITIES[func] not in self.others:
            self.others.append(_OTHER_NONLINEARITIES[func])
        return func(*args, **(kwargs or {}))


def _refusal(net: Network, layer: str, method: str, seen: _Nonlinearities) -> str | None:
    """The one-line reason ``method`` cannot project ``layer`` of ``net`` (what its forward applied, ``seen``); None
    when it can. The gradient is defined for every model."""
    if method == "gradient":
        return None
    if seen.functional_relus:
        return (f"model {net.name} applies ReLU as a function, not as nn.ReLU modules, so the {method} projection "
                "cannot replace its backward; use the gradient method for this model")
    if seen.others:
        return (f"model {net.name} applies {', '.join(seen.others)} before layer '{layer}': the {method} projection "
                "is defined for ReLU networks only; use the gradient method for this model")
    return None


def projection_method(net: Network, layer: str, method: str = "auto", size: int | None = None) -> str:
    """The projection a unit of ``layer`` gets: ``method`` itself, checked, or for ``"auto"`` the deconvnet on a ReLU
    network and the gradient on any other (a Vision Transformer: GELU, softmax attention, LayerNorm).

    One forward of a blank image up to ``layer`` notes which nonlinearities come before it, so the answer holds for
    this layer (a ResNet's stem is a ReLU network even where later blocks would not be).

    Parameters
    ----------
    net : Network
        The model.
    layer : str
        A layer with spatial positions.
    method : {"auto", "deconvnet", "guided", "gradient"}, default "auto"
        The method asked for.
    size : int or None, default None
        Side of the probe image; None: the model's own input size (``preprocess["size"]``, else 224).

    Returns
    -------
    str
        "deconvnet", "guided" or "gradient".

    Raises
    ------
    AtlasError
        One line for an unknown method, or for "deconvnet" or "guided" on a model that is no ReLU network (naming
        what it applies instead) or that calls ReLU as a function.
    """
    if method != "auto" and method not in METHODS:
        raise AtlasError(f"unknown projection method '{method}'; choose one of: auto, {', '.join(METHODS)}")
    if method == "gradient":
        return method
    side = int(size or (net.preprocess or {}).get("size", 224))
    dtype = next((p.dtype for p in net.module.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in net.module.parameters()), torch.device("cpu"))
    probe = "deconvnet" if method == "auto" else method
    seen = _Nonlinearities()
    # with the method's ReLUs swapped in, as project_units runs it: a ReLU module left calling F.relu is one it missed
    with torch.inference_mode(), _swapped(net.module, probe), seen:
        _layer_output(net, layer, torch.zeros(1, 3, side, side, dtype=dtype, device=device))
    refusal = _refusal(net, layer, probe, seen)
    if method == "auto":
        return "gradient" if refusal else "deconvnet"
    if refusal:
        raise AtlasError(refusal)
    return method


# --------------------------------------------------------------------------- the pure core


def _layer_output(net: Network, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The layer's output, the forward stopped right after it (Network.hooks with stop)."""
    with net.hooks([layer], stop=True) as captured:
        try:
            net.module(images)
        except StopForward:
            pass
    if layer not in captured:
        raise AtlasError(f"layer '{layer}' of model {net.name} was not reached by the forward pass; choose a layer the model runs")
    out = captured[layer]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        valid = spatial_layers(net, images.shape[-1])
        listed = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
        raise AtlasError(f"layer '{layer}' has no spatial positions (shape {shape}); layers with positions: {listed}")
    return out


def project_units(net: Network, layer: str, images: torch.Tensor, units: torch.Tensor | np.ndarray | Sequence,
                  method: str = "deconvnet") -> torch.Tensor:
    """Project one unit per image back to input pixels, all images in one forward and one backward pass.

    Parameters
    ----------
    net : Network
        The model (in eval mode, as :func:`atlas.models.load_model` returns it); it is not modified.
    layer : str
        A layer with spatial positions, e.g. ``"mixed4c"`` or a torchvision path like ``"layer3.1"``.
    images : tensor (n, 3, H, W) float
        RGB in [0, 1], the model's input convention.
    units : (n, 3) ints
        ``units[i] = (channel, y, x)`` of ``layer`` for image i.
    method : {"deconvnet", "guided", "gradient"}
        See the module docstring.

    Returns
    -------
    tensor (n, 3, H, W) float32
        The signed projections in the RGB input's pixel space, on the images' device. Zero outside each unit's
        receptive field, and zero for a unit whose activation is 0.
    """
    if method not in METHODS:
        raise AtlasError(f"unknown projection method '{method}'; choose one of: {', '.join(METHODS)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AtlasError(f"images must be a (n, 3, H, W) tensor, got {got}")
    units = torch.as_tensor(np.asarray(units), dtype=torch.int64).reshape(-1, 3) if not isinstance(units, torch.Tensor) else units.long()
    if units.shape != (images.shape[0], 3):
        raise AtlasError(f"units must be (n, 3) = (channel, y, x) per image for n = {images.shape[0]} images, got {tuple(units.shape)}")
    net.resolve(layer)  # an unknown layer: one line listing the known ones
    n = images.shape[0]
    if n == 0:
        return torch.zeros(images.shape, dtype=torch.float32, device=images.device)
    dtype = next((p.dtype for p in net.module.parameters() if p.is_floating_point()), torch.float32)
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().clone().to(dtype).requires_grad_(True)
        seen = _Nonlinearities()
        with _swapped(net.module, method), seen:
            out = _layer_output(net, layer, x)
        refusal = _refusal(net, layer, method, seen)
        if refusal:
            raise AtlasError(refusal)
        c, h, w = out.shape[1:]
        ch, ys, xs = units[:, 0].to(out.device), units[:, 1].to(out.device), units[:, 2].to(out.device)
        bad = (ch < 0) | (ch >= c) | (ys < 0) | (ys >= h) | (xs < 0) | (xs >= w)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise AtlasError(f"unit {tuple(units[i].tolist())} (channel, y, x) is outside layer '{layer}' of shape ({c}, {h}, {w})")
        rows = torch.arange(n, device=out.device)
        seed = torch.zeros_like(out)
        seed[rows, ch, ys, xs] = out.detach()[rows, ch, ys, xs]  # the one-hot times the unit's own activation
        (grad,) = torch.autograd.grad(out, x, grad_outputs=seed)
    return grad.detach().float()


# --------------------------------------------------------------------------- display


# Display contrast: |values| up to this percentile of the box map to the full range and the rarer peaks saturate.
# With the plain maximum a few switch-routed pixels take the whole range and the projection's structure is left
# within a grey level or two of mid grey (seen on mixed4c's top examples); 99.5 shows eyes, text and edges.
DISPLAY_PERCENTILE = 99.5


def to_display(projection: torch.Tensor | np.ndarray, box: Sequence[int], patch: int = DEFAULT_PATCH,
               percentile: float = DISPLAY_PERCENTILE) -> np.ndarray:
    """One projection as the paper shows it: cropped to ``box``, signed values around grey, fitted into a patch.

    ``projection`` is (3, H, W) (a row of :func:`project_units`); ``box`` is (top, left, bottom, right), bottom/right
    exclusive (the unit's clipped receptive field). Values are scaled symmetrically: 0 -> 128 (mid grey), the
    ``percentile``-th percentile of |value| in the box (default 99.5; 100: the largest) -> 0 or 255, larger ones
    clipped; an all-zero projection is all 128 inside the box. The crop is then scaled
    to fit ``patch`` x ``patch`` with its aspect kept, centred, grey 127 around: the geometry of ``top/patch``.
    Returns (patch, patch, 3) uint8.
    """
    p = projection.detach().cpu().float().numpy() if isinstance(projection, torch.Tensor) else np.asarray(projection, np.float32)
    if p.ndim != 3 or p.shape[0] != 3:
        raise AtlasError(f"a projection is (3, H, W), got {p.shape}")
    top, left = max(int(box[0]), 0), max(int(box[1]), 0)
    bottom, right = min(int(box[2]), p.shape[1]), min(int(box[3]), p.shape[2])
    inside = p[:, top:bottom, left:right]
    magnitude = np.abs(inside)
    peak = float(np.percentile(magnitude, percentile)) if inside.size else 0.0
    if peak <= 0 and inside.size:  # sparser than the percentile: fall back to the largest value
        peak = float(magnitude.max())
    scaled = 127.5 + 127.5 * (p / peak) if peak > 0 else np.full(p.shape, 127.5, np.float32)
    image = np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    # the top-k pass's own crop-and-fit, so a projection sits exactly over its patch
    return fit_patch(Image.fromarray(np.ascontiguousarray(image)), (top, left, bottom, right), patch)


# --------------------------------------------------------------------------- the writer


def _channels(channels, n: int) -> list[int]:
    if channels is None:
        return list(range(n))
    out = sorted({int(c) for c in channels})
    outside = [c for c in out if c < 0 or c >= n]
    if outside:
        raise AtlasError(f"channel {outside[0]} is out of range: the layer has {n} channels (0-{n - 1})")
    return out


def _check_photos(paths: dict[int, str]) -> None:
    """A run whose photos are gone (a store copied without them) is one line naming the missing folder."""
    missing = [p for p in paths.values() if not Path(real_path(p)).exists()]
    folders = sorted({str(Path(real_path(p)).parent) for p in missing if not Path(real_path(p)).parent.exists()})
    if folders:
        more = f" (and {len(folders) - 1} more)" if len(folders) > 1 else ""
        raise AtlasError(f"the run's photos are missing: folder {folders[0]} not found{more}; "
                         "put the images back where `atlas sample` read them")


@store.writer
def write_projections(run_dir: str | Path, layer: str, method: str = "deconvnet", channels: Sequence[int] | None = None,
                      batch_size: int = 16, device: str = "cpu", progress: bool = True, net: Network | None = None,
                      patch: int | None = None) -> dict:
    """Project every top example of ``layer`` back to pixels with ``method``: ``units/{layer}/projection/{method}``.

    Reads ``units/{layer}/top/{image,pos,box}`` (the top-k pass), loads each example image with the run's resize
    and crop, and writes, per the unit lens's store layout:

    - ``image`` (C, k, P, P, 3) uint8: :func:`to_display` of each projection in its box (the geometry of
      ``top/patch``, so the two sit side by side); grey for padding rows and unreadable images;
    - ``scale`` (C, k) float32: the largest |projection| in the box before display scaling (0 for a unit whose
      activation is 0, a pad or an unreadable image);
    - ``done`` (C,) bool: per channel, set once its k projections are written; a rerun skips done channels;
    - ``source`` (C,) int64: crc32 of the channel's ``top`` row (images, positions, boxes) the projections were made
      from; a channel whose top row has changed since (the top-k pass re-run) is redone.

    Parameters
    ----------
    run_dir : str or Path
        The run folder, after the top-k pass (``atlas.units.topk.top_examples``).
    layer : str
        The layer whose top examples are projected.
    method : {"deconvnet", "guided", "gradient"}, default "deconvnet"
        See :func:`project_units`.
    channels : sequence of int or None, default None
        Compute only these channels (the arrays stay (C, ...) full size); None: all.
    batch_size : int, default 16
        Examples per forward/backward pass (speed and memory only).
    device : str, default "cpu"
        Where the model runs.
    progress : bool, default True
        Show a progress bar (only on a terminal).
    net : Network or None, default None
        The run's model, already loaded; None: loaded from the run's attributes.
    patch : int or None, default None
        Side P of the display patches; None: that of ``top/patch`` (64 when it has none).

    Returns
    -------
    dict
        A summary (also the ``projection/{method}`` group's ``summary`` attribute): ``method``, ``channels`` (done, in
        all), ``projections`` (stored, in all: earlier runs' included, unreadable examples' grey squares not),
        ``channels_computed`` and ``computed`` (by this call), ``skipped_images``, ``seconds``, ``projections_per_s``.
    """
    if method not in METHODS:
        raise AtlasError(f"unknown projection method '{method}'; choose one of: {', '.join(METHODS)}")
    if int(batch_size) < 1:
        raise AtlasError(f"batch_size must be at least 1, got {batch_size}")
    root = store.open_store(run_dir)
    tpath = f"units/{layer}/top"
    if tpath not in root:
        raise AtlasError(f"no top examples for layer '{layer}' in this run ({tpath}); run `atlas units {run_dir} --layer {layer}` "
                         "(the top-k pass) first")
    store.verify(root, [tpath, "images"])
    top = root[tpath]
    image_ids = top["image"][...].astype(np.int64)
    pos = top["pos"][...].astype(np.int64)
    box = top["box"][...].astype(np.int64)
    n_channels, k = image_ids.shape
    if patch is None:
        patch = int(top["patch"].shape[2]) if "patch" in top else DEFAULT_PATCH
    if int(patch) < 1:
        raise AtlasError(f"patch must be at least 1 pixel, got {patch}")
    patch = int(patch)
    wanted = _channels(channels, n_channels)
    prep = dict(root.attrs.get("preprocessing", {}) or {})
    reading = photo_reading(prep)  # (resize, crop, interpolation): the model's own resampling (bicubic for a ViT)
    paths_array = root["images/path"]
    ok = root["images/ok"][...] if "images/ok" in root else np.ones(paths_array.shape[0], bool)

    ppath = f"units/{layer}/projection/{method}"
    shape = (n_channels, k, patch, patch, 3)
    sources = top_sources(image_ids, pos, box)
    fresh, done = _done_channels(root, ppath, shape, sources)
    todo = [c for c in wanted if not done[c]]
    examples = [(c, j) for c in todo for j in range(k) if image_ids[c, j] >= 0]
    paths = {i: str(paths_array[i]) for i in sorted({int(image_ids[c, j]) for c, j in examples})}
    _check_photos(paths)  # before anything is written

    store.take_lock(run_dir)
    root = store.open_store(run_dir, mode="a")
    store.begin_stage(run_dir, "units", [ppath])
    group = _projection_group(root, ppath, shape, fresh)
    group.attrs.update({"method": method, "patch": patch, "k": k, "crop": reading[1]})
    started = time.perf_counter()
    if examples and net is None:
        net = load_run_model(store.attrs(root), device)
    top_rows = (image_ids, pos, box, sources)
    computed, skipped = _project_examples(net, layer, method, group, todo, examples, top_rows, patch,
                                          lambda i: _read(paths[i], *reading) if ok[i] else None, int(batch_size), device, progress)
    seconds = time.perf_counter() - started
    # What the node holds (a resumed run's summary counts what earlier runs stored too), then what this call added.
    held = group["done"][...]
    stored = int(((image_ids >= 0) & (group["scale"][...] > 0) & held[:, None]).sum())  # grey (unreadable) examples aside
    summary = {"method": method, "channels": int(held.sum()), "projections": stored, "channels_computed": len(todo),
               "computed": computed, "skipped_images": len(skipped), "seconds": round(seconds, 3),
               "projections_per_s": round(computed / seconds, 2) if computed and seconds > 0 else 0.0}
    if skipped:
        store.log(run_dir, f"units {layer} {method}: {len(skipped)} unreadable example images skipped (grey, scale 0)")
    group.attrs["summary"] = summary
    store.finish_stage(run_dir, "units", [ppath])
    return summary


def top_sources(image_ids: np.ndarray, pos: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A digest (crc32) of each channel's top row: the projections of a channel belong to the row they were made from.

    Parameters
    ----------
    image_ids : (C, k) int64 array
        The top examples' image indices.
    pos : (C, k, 2) int64 array
        Their positions in the layer's grid.
    box : (C, k, 4) int64 array
        Their receptive-field boxes.

    Returns
    -------
    (C,) int64 array
    """
    return np.array([zlib.crc32(image_ids[c].tobytes() + pos[c].tobytes() + box[c].tobytes()) for c in range(image_ids.shape[0])],
                    np.int64)


def project_examples(net: Network, layer: str, pictures: list[np.ndarray], units: list[tuple[int, int, int]],
                     boxes: np.ndarray, patch: int, method: str, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Project a batch of examples back to pixels and cut each to its receptive field for display.

    Parameters
    ----------
    net : Network
        The run's model.
    layer : str
        The layer of the units.
    pictures : list of (S, S, 3) uint8 arrays
        The example images, as the model reads them.
    units : list of (channel, y, x)
        The unit of each example.
    boxes : (n, 4) int array
        Each example's receptive-field box (top, left, bottom, right).
    patch : int
        Side of the display patches.
    method : str
        See :func:`project_units`.
    device : torch.device
        Where the model runs.

    Returns
    -------
    displays : (n, patch, patch, 3) uint8 array
        :func:`to_display` of each projection in its box.
    scales : (n,) float32 array
        The largest |projection| in the box (0 for an empty box).
    """
    x = torch.from_numpy(np.stack(pictures)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    proj = project_units(net, layer, x.contiguous(memory_format=torch.channels_last), torch.tensor(units), method).cpu()
    displays = np.empty((len(pictures), patch, patch, 3), np.uint8)
    scales = np.zeros(len(pictures), np.float32)
    for i, (p, b) in enumerate(zip(proj, boxes, strict=True)):
        displays[i] = to_display(p, b, patch)
        region = p[:, max(int(b[0]), 0):int(b[2]), max(int(b[1]), 0):int(b[3])]
        scales[i] = float(region.abs().max()) if region.numel() else 0.0
    return displays, scales


def _done_channels(root, ppath: str, shape: tuple[int, ...], sources: np.ndarray) -> tuple[bool, np.ndarray]:
    """Whether the node must be created anew, and which channels are done and still belong to their top row."""
    n_channels = shape[0]
    fresh = not (ppath in root and "done" in root[ppath] and "image" in root[ppath] and root[ppath]["done"].shape == (n_channels,)
                 and root[ppath]["image"].shape == shape)
    done = np.zeros(n_channels, bool) if fresh else root[ppath]["done"][...]
    # Each channel's projections belong to its top row (images, positions, boxes): a row the top-k pass has since
    # rewritten makes that channel's projections stale, so it is redone even though its flag is set.
    if not fresh and "source" in root[ppath] and root[ppath]["source"].shape == (n_channels,):
        done &= root[ppath]["source"][...] == sources
    elif not fresh:
        done[:] = False
    return fresh, done


def _projection_group(root, ppath: str, shape: tuple[int, ...], fresh: bool):
    """The node's group, its arrays created when ``fresh`` (and ``source`` when an older node lacks it)."""
    n_channels, k = shape[:2]
    group = root.require_group(ppath)
    if fresh:
        store.create_array(group, "image", shape, np.uint8, chunks=(1, *shape[1:]), fill_value=GREY, overwrite=True)
        store.create_array(group, "scale", (n_channels, k), np.float32, chunks=(n_channels, k), overwrite=True)
        store.create_array(group, "done", (n_channels,), bool, chunks=(n_channels,), fill_value=False, overwrite=True)
    if "source" not in group or group["source"].shape != (n_channels,):
        store.create_array(group, "source", (n_channels,), np.int64, chunks=(n_channels,), fill_value=-1, overwrite=True)
    return group


def _project_examples(net, layer: str, method: str, group, todo: list[int], examples: list[tuple[int, int]], top_rows: tuple,
                      patch: int, picture: Callable[[int], np.ndarray | None], batch_size: int, device: str,
                      progress: bool) -> tuple[int, set[int]]:
    """Project ``examples`` batch by batch and write each channel's row as soon as its last example is done (its flag
    last); returns the projections computed and the unreadable images skipped."""
    image_ids, pos, box, sources = top_rows
    k = image_ids.shape[1]
    skipped: set[int] = set()
    computed = 0
    images: dict[int, np.ndarray | None] = {}
    rows_image = {c: np.full((k, patch, patch, 3), GREY, np.uint8) for c in todo}
    rows_scale = {c: np.zeros(k, np.float32) for c in todo}
    left = {c: sum(1 for j in range(k) if image_ids[c, j] >= 0) for c in todo}
    bar = tqdm(total=len(examples), desc=f"{method} {layer}", unit="proj", disable=None if progress else True, leave=False)

    def finish(c: int) -> None:
        group["image"][c] = rows_image[c]
        scale = group["scale"][...]
        scale[c] = rows_scale[c]
        group["scale"][...] = scale
        flags = group["done"][...]
        source = group["source"][...]
        source[c] = sources[c]
        group["source"][...] = source
        flags[c] = True  # last: an interrupted write leaves the channel to redo
        group["done"][...] = flags

    for c in [c for c in todo if left[c] == 0]:
        finish(c)
    device_t = torch.device(device)
    with contextlib.ExitStack() as stack:
        if examples:
            # channels-last memory (the model's tensors are put back afterwards): the same arithmetic, ~1.3x faster on CPU
            stack.enter_context(prepared(net, device_t, channels_last=True))
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch, units, where = [], [], []
            for c, j in chunk:
                img = int(image_ids[c, j])
                if img not in images:
                    images[img] = picture(img)
                    if len(images) > 256:  # bounded: a channel's examples are adjacent, nearby channels' often shared
                        images.pop(next(iter(images)))
                if images[img] is None:
                    skipped.add(img)
                    continue
                batch.append(images[img])
                units.append((c, int(pos[c, j, 0]), int(pos[c, j, 1])))
                where.append((c, j))
            if batch:
                displays, scales = project_examples(net, layer, batch, units, np.stack([box[c, j] for c, j in where]), patch, method,
                                                    device_t)
                for (c, j), shown, s in zip(where, displays, scales, strict=True):
                    rows_image[c][j], rows_scale[c][j] = shown, s
                computed += len(batch)
            for c, _ in chunk:
                left[c] -= 1
                if left[c] == 0:
                    finish(c)
            bar.update(len(chunk))
    bar.close()
    return computed, skipped


def _read(path: str, resize: int, crop: int, interpolation: str) -> np.ndarray | None:
    try:
        return np.asarray(load_image(path, resize, crop, interpolation), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError):
        return None


__all__ = ["METHODS", "project_units", "to_display", "write_projections"]
