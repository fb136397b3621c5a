"""Receptive fields from the architecture: which input pixels a unit of a layer can see.

:func:`receptive_field` follows one real forward pass of the network on a blank image and, for every tensor
on the way, keeps the geometry of its positions in input pixels: a unit at position ``i`` covers
``[offset + i * stride, offset + i * stride + size)``. Each operation transforms that geometry:

- a convolution or pooling window of kernel ``k``, stride ``s``, left padding ``p`` and dilation ``d`` grows the
  field by ``(d * (k - 1)) * stride``, multiplies the stride by ``s`` and moves the offset by ``-p * stride``
  (ceil-mode pools add windows on the right, which the same formula covers: the extra window reads padding);
- an explicit pad (TF 'SAME' :class:`~atlas.models.SamePad`) moves the offset by its left/top amount, which
  depends on the map's size, hence the ``size`` argument;
- elementwise and channel operations (ReLU, batch norm, LRN, the inception concatenation, the residual sum)
  take the **union** of their inputs' fields: an inception block or a residual block gets its largest branch;
- a global pool, flatten or linear layer leaves no spatial positions.

Following the functions actually called (a ``torch.overrides.TorchFunctionMode``) rather than a table of
module types covers torchvision models and InceptionV1's own fast paths alike: the fused 1x1 convolution of
``Mixed.forward`` is a plain ``conv2d`` call; :class:`~atlas.models.SpaceToDepthConv2d` computes a strided
``Conv2d``'s function through a space-to-depth view, so it is read as the ``Conv2d`` it is (its zero-padded
kernel would otherwise count one pixel too many).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from atlas.errors import AtlasError
from atlas.models import Network, StopForward

# (size, stride, offset) per spatial axis (y, x) of a tensor.
_Axis = tuple[int, int, int]
_Geom = tuple[_Axis, _Axis]


@dataclass(frozen=True)
class Field:
    """A square receptive field: the unit at layer position ``i`` covers input pixels
    ``[offset + i * stride, offset + i * stride + size)`` (before clipping; ``offset`` may be negative)."""

    size: int
    stride: int
    offset: float

    def box(self, y: int, x: int, crop: int = 224) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) in input pixels of the unit at (y, x), clipped to [0, crop]; bottom/right exclusive."""
        top = math.floor(self.offset + int(y) * self.stride)
        left = math.floor(self.offset + int(x) * self.stride)

        def clip(v: int) -> int:
            return min(max(v, 0), crop)

        return clip(top), clip(left), clip(top + self.size), clip(left + self.size)

    def as_dict(self) -> dict:
        return {"size": self.size, "stride": self.stride, "offset": self.offset}


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return int(v), int(v)


def _window(g: _Geom, kernel, stride, pad, dilation=1) -> _Geom:
    """The geometry after a sliding window (conv or pool)."""
    k, s, p, d = _pair(kernel), _pair(stride), _pair(pad), _pair(dilation)
    return tuple((r + d[a] * (k[a] - 1) * j, j * s[a], o - p[a] * j) for a, (r, j, o) in enumerate(g))  # type: ignore[return-value]


def _union(geoms: list[_Geom]) -> _Geom:
    """The smallest field holding every branch's field (branches of one map share its stride)."""
    out = []
    for a in range(2):
        axes = [g[a] for g in geoms]
        strides = {j for _, j, _ in axes}
        if len(strides) > 1:
            raise _Unsupported("branches of different strides meet")
        start = min(o for _, _, o in axes)
        end = max(o + r for r, _, o in axes)
        out.append((end - start, axes[0][1], start))
    return tuple(out)  # type: ignore[return-value]


class _Unsupported(Exception):
    """An operation whose effect on positions is unknown."""


_GLOBAL = "global"  # marker: a tensor without spatial positions derived from tracked ones


def _spatial(t) -> tuple[int, int] | None:
    return tuple(t.shape[-2:]) if isinstance(t, torch.Tensor) and t.dim() == 4 else None


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _arg(args, kwargs, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class _Tracker(TorchFunctionMode):
    """Follows one forward pass, keeping each tensor's field geometry (keyed by id; the tensors are kept alive)."""

    def __init__(self):
        super().__init__()
        self.geom: dict[int, _Geom | str] = {}
        self.alive: list[torch.Tensor] = []
        self.suppress = 0
        self.error: str | None = None

    def set(self, t: torch.Tensor, g: _Geom | str) -> None:
        self.geom[id(t)] = g
        self.alive.append(t)

    def get(self, t: torch.Tensor) -> _Geom | str | None:
        return self.geom.get(id(t))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suppress:
            return out
        ins = [t for t in _tensors(args) + _tensors(kwargs) if id(t) in self.geom]
        if not ins:
            return out
        outs = _tensors(out)
        if not outs:
            return out
        try:
            g = self._rule(func, args, kwargs, ins, outs)
        except _Unsupported as exc:
            g = f"unsupported: {exc}"
        for t in outs:
            self.set(t, g)
        return out

    def _rule(self, func, args, kwargs, ins, outs) -> _Geom | str:
        name = getattr(func, "__name__", str(func)).lstrip("_")
        first = args[0] if args else None
        fields = [self.get(t) for t in ins]
        if any(isinstance(f, str) and f.startswith("unsupported") for f in fields):
            return next(f for f in fields if isinstance(f, str) and f.startswith("unsupported"))
        spatial_in = [f for f, t in zip(fields, ins, strict=True) if not isinstance(f, str) and _spatial(t) is not None]
        if name in ("conv2d", "convolution") and isinstance(first, torch.Tensor) and id(first) in self.geom:
            g = self.get(first)
            if isinstance(g, str):
                return g
            weight = _arg(args, kwargs, 1, "weight", None)
            stride = _arg(args, kwargs, 3, "stride", 1)
            pad = _arg(args, kwargs, 4, "padding", 0)
            dilation = _arg(args, kwargs, 5, "dilation", 1)
            k = tuple(weight.shape[-2:])
            if isinstance(pad, str):  # 'valid' or 'same' (stride 1): PyTorch pads the smaller half on the left
                d = _pair(dilation)
                pad = (0, 0) if pad == "valid" else tuple((d[a] * (k[a] - 1)) // 2 for a in range(2))
            return _window(g, k, stride, pad, dilation)
        if name in ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "lp_pool2d") and id(first) in self.geom:
            g = self.get(first)
            if isinstance(g, str):
                return g
            if name == "lp_pool2d":
                kernel = _arg(args, kwargs, 2, "kernel_size", None)
                stride, pad, dilation = _arg(args, kwargs, 3, "stride", None), 0, 1
            else:
                kernel = _arg(args, kwargs, 1, "kernel_size", None)
                stride = _arg(args, kwargs, 2, "stride", None)
                pad = _arg(args, kwargs, 3, "padding", 0)
                dilation = _arg(args, kwargs, 4, "dilation", 1) if "max" in name else 1
            if stride is None or (isinstance(stride, (tuple, list)) and not len(stride)):
                stride = kernel
            return _window(g, kernel, stride, pad, dilation)
        if name == "pad" and id(first) in self.geom:
            g = self.get(first)
            if isinstance(g, str):
                return g
            pads = list(_arg(args, kwargs, 1, "pad", ()))
            left, top = (pads + [0, 0, 0, 0])[0], (pads + [0, 0, 0, 0])[2]
            (ry, jy, oy), (rx, jx, ox) = g
            return (ry, jy, oy - top * jy), (rx, jx, ox - left * jx)
        if name == "pixel_unshuffle" and id(first) in self.geom:
            g = self.get(first)
            if isinstance(g, str):
                return g
            s = int(_arg(args, kwargs, 1, "downscale_factor", 1))
            return _window(g, s, s, 0)
        if name.startswith("adaptive_") and _spatial(outs[0]) == (1, 1) and _spatial(first) != (1, 1):
            return _GLOBAL  # a global pool to 1 x 1 (torchvision's avgpool): every position pooled, none left
        if name in ("cat", "concat", "concatenate", "stack"):
            dim = _arg(args, kwargs, 1, "dim", 0)
            rank = outs[0].dim()
            if rank == 4 and dim % 4 in (2, 3):
                raise _Unsupported(f"{name} along a spatial axis")
        out_spatial = _spatial(outs[0])
        if out_spatial is None:
            return _GLOBAL  # mean over positions, flatten, linear, ...: no positions left
        same = [f for f, t in zip(fields, ins, strict=True) if not isinstance(f, str) and _spatial(t) == out_spatial]
        if not same:
            if spatial_in:
                raise _Unsupported(f"{name} changes the map's size")
            return _GLOBAL
        # Elementwise or channel-wise (ReLU, batch norm, LRN, sums, concatenation, views that keep the map): union.
        return _union(same)  # type: ignore[arg-type]


def _fields(net: Network, layers: list[str], size: int) -> dict[str, _Geom | str | None]:
    """The geometry of each layer's output, from one forward pass on a blank ``size`` image."""
    paths = {layer: net.resolve(layer) for layer in layers}
    tracker = _Tracker()
    captured: dict[str, _Geom | str | None] = {}
    handles = []
    remaining = set(layers)

    def layer_hook(layer: str):
        def hook(_module, _inputs, output):
            t = _tensors(output)
            captured[layer] = tracker.get(t[0]) if t else None
            grid = net.tokens_to_grid(output)
            if grid is not None and not isinstance(captured[layer], tuple):
                # A transformer's token: its own patch of the input, the pixels it was embedded from. Its true
                # receptive field is the whole image after the first attention layer; the patch is what is shown.
                py, px = size // grid.shape[2], size // grid.shape[3]
                captured[layer] = ((py, py, 0), (px, px, 0)) if py and px else None
            remaining.discard(layer)
            if not remaining:
                raise StopForward

        return hook

    def enter(_module, _inputs):
        tracker.suppress += 1

    def leave(module, inputs, output):
        # A Conv2d subclass computes a Conv2d's function by its own means (SpaceToDepthConv2d's zero-padded, regrouped
        # kernel would count a pixel too many): read it as the Conv2d it is.
        tracker.suppress -= 1
        if tracker.suppress:
            return
        g = tracker.get(inputs[0])
        if g is None:
            return
        if not isinstance(g, str):
            pad = module.padding
            if isinstance(pad, str):
                pad = (0, 0) if pad == "valid" else tuple((module.dilation[a] * (module.kernel_size[a] - 1)) // 2 for a in range(2))
            g = _window(g, module.kernel_size, module.stride, pad, module.dilation)
        tracker.set(output, g)

    try:
        for module in net.module.modules():
            if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d:
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave))
        for layer, path in paths.items():
            handles.append(net.module.get_submodule(path).register_forward_hook(layer_hook(layer)))
        param = next(net.module.parameters(), None)
        x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
        with torch.inference_mode(), tracker:
            tracker.set(x, ((1, 1, 0), (1, 1, 0)))
            try:
                net.module(x)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {layer: captured.get(layer) for layer in layers}


def _as_field(g: _Geom) -> Field | None:
    (ry, jy, oy), (rx, jx, ox) = g
    if (ry, jy, oy) != (rx, jx, ox):
        return None
    return Field(size=int(ry), stride=int(jy), offset=float(oy))


def spatial_layers(net: Network, size: int = 224) -> list[str]:
    """The model's layer names whose units have positions (and so a receptive field)."""
    names = net.layer_names()
    geoms = _fields(net, names, size)
    return [n for n in names if isinstance(geoms.get(n), tuple)]


def check_unit_layers(net: Network, layers: Sequence[str], size: int = 224) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each of ``layers`` for a ``size`` px input, checked before any work: an unknown layer, or one
    without spatial positions (``logits``), is one line listing the layers that have them."""
    shapes = net.layer_shapes(size)
    out = {}
    for layer in layers:
        net.resolve(layer)  # unknown names: one line with the known ones
        shape = shapes.get(layer) or shapes.get(net.aliases.get(layer, layer))
        if shape is None or len(shape) != 3:
            valid = ", ".join(spatial_layers(net, size))
            raise AtlasError(f"layer '{layer}' of model {net.name} has no spatial positions; layers with positions: {valid}")
        out[layer] = tuple(int(v) for v in shape)
    return out


def receptive_field(net: Network, layer: str, size: int = 224) -> Field:
    """The receptive field of ``layer``'s units for a ``size`` x ``size`` input, computed from the architecture.

    Raises AtlasError (one line, listing the layers that have one) for an unknown layer or one without
    spatial positions (e.g. ``logits``).
    """
    net.resolve(layer)  # unknown names: one line with the known ones
    g = _fields(net, [layer], size)[layer]
    if isinstance(g, tuple):
        field = _as_field(g)
        if field is None:
            raise AtlasError(f"layer '{layer}' of model {net.name} has a non-square receptive field {g}; only square ones are supported")
        return field
    if isinstance(g, str) and g.startswith("unsupported"):
        raise AtlasError(f"cannot compute the receptive field of layer '{layer}' of model {net.name}: {g[len('unsupported: ') :]}")
    valid = ", ".join(spatial_layers(net, size))
    raise AtlasError(f"layer '{layer}' of model {net.name} has no spatial positions; layers with positions: {valid}")
