"""The reconstructed equivalent model of one input ("A Method to Visualize Deep Convolutional Networks
Based on Model Reconstruction"): the network with every non-linearity's state of one forward pass fixed, which is
exactly affine in its input, ``logits = W_x · x + b_x``, and the images its parameters make.

How it is built
---------------
:func:`reconstruct` deep-copies the network's module (in the requested dtype; the caller's model is never touched)
and runs it once on ``x`` while recording, in call order, the state of each non-linearity:

- **ReLU** (``nn.ReLU`` modules and ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` calls, in-place or not): the on/off
  mask ``x > 0``; replayed as ``x * mask``.
- **Max pooling** (``F.max_pool2d``, ``torch.max_pool2d``, with or without ``return_indices``): the switches (the
  argmax index of every window, as ``max_pool2d(..., return_indices=True)`` gives them); replayed as a ``gather`` of
  the input at those indices, i.e. a fixed selection matrix.
- **LRN** (``atlas.models.layers.LocalResponseNorm``, ``nn.LocalResponseNorm``): the per-position factor
  ``g = (k + a·Σ x²)^-β`` (the module is replaced in the copy by :class:`_Gain`); replayed as the fixed gain ``x * g``.

Everything else InceptionV1 does is affine already: the preprocessing (channel flip, scale, mean), the convolutions
and the classifier, ``SamePad``, concatenation, the global average pool, dropout in eval mode; so are BatchNorm in
eval mode, residual additions and adaptive average pooling (torchvision's ResNets, VGG, AlexNet...).

**Mechanism.** A ``torch.overrides.TorchFunctionMode`` (:class:`_States`) sees every torch function the forward
calls: in ``record`` it computes the real ReLU / max pool and stores the state, in ``replay`` it applies the stored
state instead; any other non-linear function (sigmoid, GELU, SiLU, softmax, LayerNorm, BatchNorm in training
mode, ...) is refused in one line. States are keyed by *which module called them and how often*: a global module
forward pre-hook keeps the stack of the copy's modules being run, and a state's key is (innermost module's path,
that module's call number in this forward, the event's number within that call). So a module used several times
(InceptionV1's one ``pool`` and ``lrn``, a ResNet block's ``relu``) gets one state per use, and a change of code path
that keeps the modules' calls (InceptionV1's ``Mixed`` fuses its three 1x1 convolutions unless its heads carry hooks)
replays the same states. Global hooks (``register_module_forward_pre_hook``) are used rather than per-module ones
because ``Mixed`` looks at its heads' own hooks to choose its path; they are active only during the copy's forward
and ignore every module that is not the copy's.

The states are buffers of the :class:`ReconstructedModel` (so ``.to()`` / ``.double()`` move them); they have the
recorded batch size (1 for one image), and the model takes any batch of inputs of the recorded size (the states
broadcast: each input goes through the same fixed masks, switches and gains).

Parameters, as the paper computes them: with orthogonal vectors
---------------------------------------------------------------
- ``b_x = f(0)``: one forward of the reconstructed model on the zero image (:meth:`ReconstructedModel.bias`).
- ``W_x``'s columns are the responses to the standard basis of the input space, ``W_x e_i``: computed as
  forward-mode products (JVPs, ``torch.func.jvp``) with a batch of basis vectors at a time under ``torch.func.vmap``
  (:meth:`ReconstructedModel.columns`). The JVP is the exact linear part (no ``f(e_i) - f(0)`` subtraction, which
  would lose float precision against the much larger ``b_x``); the primal is computed once per batch, only the
  tangents are batched. Because the model is affine, the JVP is the same at every point: it is taken at ``x``.
- For a 224 px input the full ``W_x`` is 1000 x 150,528 (600 MB in float32, 150,528 JVPs); the rows needed for
  display are computed by reverse mode instead (VJPs under ``vmap``: :meth:`ReconstructedModel.rows`), one backward
  per row. Both agree where both are computed (tests/test_reconstruct.py, on a 32x32 crop: the smallest useful size;
  InceptionV1 also runs at 16 px but its last pool then has nothing left to pool).
- A hidden unit's effective input filter (:meth:`ReconstructedModel.unit_filter`) is the same reverse-mode row for
  an activation of a hidden layer of the reconstructed model (which is affine in ``x`` too): the unit at the position
  where its channel is strongest, or the channel's total over all positions.

Display (:func:`reconstruct_report`, ``atlas reconstruct``): per image, each top class's row of ``W_x`` reshaped to
(3, H, W) as an RGB image (the template the network applies to this image for that class), ``W_x ⊙ x`` summed over
colour (each pixel's contribution to the logit) as red (positive) and blue (negative) evidence over the photo, the
unit's filters, and the paper's Table 1: the original model's and the reconstructed model's outputs side by side.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlas.errors import AtlasError
from atlas.models import LocalResponseNorm, Network, StopForward

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the module
    from matplotlib.figure import Figure

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# --------------------------------------------------------------------------- what the mode recognises

_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_MAX_POOLS = {F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices, torch._C._nn.max_pool2d_with_indices}
_WITH_INDICES = {F.max_pool2d_with_indices, torch._C._nn.max_pool2d_with_indices}
# Functions that are not affine in their input: a model that applies one cannot be reconstructed by fixing ReLU,
# max-pool and LRN states. (The product of two input-dependent tensors is not detected; no model of the zoo has one
# outside the LRN, which is handled.)
_NONLINEAR = {
    F.relu6: "ReLU6", F.hardtanh: "hardtanh", F.leaky_relu: "leaky ReLU", F.elu: "ELU", F.selu: "SELU", F.celu: "CELU",
    F.gelu: "GELU", F.silu: "SiLU", F.mish: "Mish", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", F.tanh: "tanh", torch.tanh: "tanh",
    torch.Tensor.tanh: "tanh", F.softplus: "softplus", F.prelu: "PReLU", F.rrelu: "RReLU", F.glu: "GLU", F.logsigmoid: "logsigmoid",
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax", F.log_softmax: "log-softmax",
    torch.log_softmax: "log-softmax", torch.Tensor.log_softmax: "log-softmax", F.layer_norm: "LayerNorm", F.group_norm: "GroupNorm",
    F.instance_norm: "InstanceNorm", F.normalize: "normalize", F.local_response_norm: "a functional LRN",
    F.adaptive_max_pool2d: "adaptive max pooling", F.adaptive_max_pool1d: "adaptive max pooling", F.max_pool1d: "1-D max pooling",
    F.max_pool3d: "3-D max pooling", F.lp_pool2d: "power-average pooling", F.scaled_dot_product_attention: "attention",
    torch.exp: "exp", torch.Tensor.exp: "exp", torch.log: "log", torch.Tensor.log: "log", torch.sqrt: "sqrt", torch.Tensor.sqrt: "sqrt",
    torch.rsqrt: "rsqrt", torch.Tensor.rsqrt: "rsqrt", torch.pow: "pow", torch.Tensor.pow: "pow", torch.Tensor.__pow__: "pow",
    torch.abs: "abs", torch.Tensor.abs: "abs", torch.clamp: "clamp", torch.Tensor.clamp: "clamp", torch.clip: "clamp",
    torch.Tensor.clip: "clamp", torch.clamp_min: "clamp", torch.Tensor.clamp_min: "clamp", torch.maximum: "maximum",
    torch.minimum: "minimum", torch.max: "max", torch.Tensor.max: "max", torch.min: "min", torch.Tensor.min: "min",
    torch.amax: "max", torch.Tensor.amax: "max", torch.amin: "min", torch.Tensor.amin: "min", torch.erf: "erf",
}  # fmt: skip


def _pool_args(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):  # noqa: A002
    """The arguments of ``F.max_pool2d`` (and of ``torch.max_pool2d``, whose default stride is ``[]``), normalised."""
    return input, kernel_size, (stride if stride not in (None, []) else kernel_size), padding, dilation, ceil_mode, return_indices


# --------------------------------------------------------------------------- recording and replaying the states


class _States(torch.overrides.TorchFunctionMode):
    """Records (``phase="record"``) or applies (``"replay"``) the states of one forward of the copy ``body``.

    ``store`` is the :class:`ReconstructedModel`'s buffer container: key -> buffer name via ``store.keys``.
    """

    def __init__(self, body: nn.Module, store: _Store, phase: str):
        super().__init__()
        self.body, self.store, self.phase = body, store, phase
        self.paths = {id(m): p for p, m in body.named_modules()}
        self.calls: dict[str, int] = {}
        self.stack: list[list] = []  # [path, call number, events so far in this call]

    # ------------------------------------------------------------------ the module stack (global hooks)

    def _pre(self, module: nn.Module, _args) -> None:
        path = self.paths.get(id(module))
        if path is None:  # another model's module (another thread): not ours
            return
        k = self.calls.get(path, 0)
        self.calls[path] = k + 1
        self.stack.append([path, k, 0, module])

    def _post(self, module: nn.Module, _args, _output) -> None:
        if self.stack and self.stack[-1][3] is module:
            self.stack.pop()

    def next_key(self) -> str:
        """The key of the next state at this point of the forward: (module path, its call number, event number)."""
        if not self.stack:
            raise AtlasError("a non-linearity ran outside the model's modules; the reconstructed model cannot place it")
        top = self.stack[-1]
        key = f"{top[0] or '<root>'}#{top[1]}.{top[2]}"
        top[2] += 1
        return key

    @contextlib.contextmanager
    def active(self) -> Iterator[_States]:
        pre = nn.modules.module.register_module_forward_pre_hook(self._pre)
        post = nn.modules.module.register_module_forward_hook(self._post)
        try:
            with self:
                yield self
        finally:
            pre.remove()
            post.remove()

    # ------------------------------------------------------------------ the functions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inside_gain = bool(self.stack) and isinstance(self.stack[-1][3], _Gain)
        if inside_gain:  # the LRN's own arithmetic (pow) while its gain is recorded: handled by _Gain
            return func(*args, **kwargs)
        if func in _RELUS:
            return self._relu(args[0])
        if func in _MAX_POOLS:
            return self._max_pool(func, *_pool_args(*args, **kwargs))
        if func in _NONLINEAR and _depends_on_input(args):
            where = f"'{self.stack[-1][0] or 'the root module'}', a {type(self.stack[-1][3]).__name__}" if self.stack else "its forward"
            raise AtlasError(f"the model applies {_NONLINEAR[func]} (in {where}), which is not ReLU, max pooling "
                             "or LRN: the reconstructed model fixes the states of those only and would not be affine")
        if func is F.batch_norm and (kwargs.get("training") or (len(args) > 5 and args[5])):
            raise AtlasError("the model runs BatchNorm in training mode (batch statistics are not affine); put it in eval mode")
        if func in (F.dropout, F.dropout2d, F.alpha_dropout) and (kwargs.get("training", True) if len(args) < 3 else args[2]):
            raise AtlasError("the model runs dropout in training mode (random masks); put it in eval mode")
        return func(*args, **kwargs)

    def _relu(self, x: torch.Tensor) -> torch.Tensor:
        key = self.next_key()
        if self.phase == "record":
            mask = x > 0
            self.store.put(key, "relu", mask)
            return x * mask  # not in place: the recorded copy's own tensors are never overwritten
        return x * self.store.get(key, "relu", x)

    def _max_pool(self, func, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        key = self.next_key()
        want_indices = return_indices or func in _WITH_INDICES
        if self.phase == "record":
            out, idx = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
            self.store.put(key, "pool", idx, source=tuple(x.shape[1:]))
            return (out, idx) if want_indices else out
        idx = self.store.get(key, "pool", x)
        flat = x.flatten(2)
        gather = idx.flatten(2)
        if gather.shape[0] != flat.shape[0]:
            gather = gather.expand(flat.shape[0], -1, -1)
        out = flat.gather(2, gather).view(flat.shape[0], *idx.shape[1:])  # the switches: a fixed selection of inputs
        return (out, idx) if want_indices else out


def _depends_on_input(args) -> bool:
    """Whether a call's first argument is a tensor (a non-tensor first argument, e.g. ``max(3, 4)``, is no layer)."""
    return bool(args) and isinstance(args[0], torch.Tensor)


class _Store(nn.Module):
    """The recorded states as buffers (``s0``, ``s1``, ...), with their keys, kinds and shapes."""

    def __init__(self):
        super().__init__()
        self.keys: dict[str, tuple[str, str, tuple]] = {}  # key -> (buffer name, kind, shape of the input it applies to)

    def put(self, key: str, kind: str, value: torch.Tensor, source: tuple | None = None) -> None:
        name = f"s{len(self.keys)}"
        self.register_buffer(name, value.detach().clone(), persistent=True)
        self.keys[key] = (name, kind, source if source is not None else tuple(value.shape[1:]))

    def get(self, key: str, kind: str, x: torch.Tensor) -> torch.Tensor:
        entry = self.keys.get(key)
        if entry is None or entry[1] != kind:
            raise AtlasError(f"the forward pass reached a {kind} at {key} that the recording did not see; "
                             "the reconstructed model replays the recorded forward only")
        name, _, shape = entry
        if tuple(x.shape[1:]) != shape:
            raise AtlasError(f"the {kind} at {key} gets an input of shape {tuple(x.shape[1:])}, recorded {shape}; "
                             "the reconstructed model takes inputs of the recorded size only")
        return self._buffers[name]

    def count(self, kind: str) -> int:
        return sum(1 for _, k, _ in self.keys.values() if k == kind)


class _Gain(nn.Module):
    """Stands in for an LRN module in the copy: the real LRN outside recording, the recorded gain ``x * g`` in replay."""

    def __init__(self, lrn: nn.Module, owner: ReconstructedModel):
        super().__init__()
        self.lrn = lrn
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner contains this module

    def gain(self, x: torch.Tensor) -> torch.Tensor:
        """The per-position factor the LRN multiplies ``x`` by (the same arithmetic as the module's own forward)."""
        lrn = self.lrn
        if isinstance(lrn, LocalResponseNorm):
            band = lrn._band(x.shape[1], x)
            return (F.conv2d(x * x, band) * (lrn.alpha / lrn.size) + lrn.k).pow(-lrn.beta)
        # nn.LocalResponseNorm: y = x / (k + alpha/n * sum of squares over the channel window)^beta
        sizes = x.shape
        div = (x * x).view(sizes[0], 1, sizes[1], sizes[2], -1)
        div = F.pad(div, (0, 0, 0, 0, lrn.size // 2, (lrn.size - 1) // 2))
        div = F.avg_pool3d(div, (lrn.size, 1, 1), stride=1).squeeze(1).view(sizes)
        return 1.0 / (div * lrn.alpha + lrn.k).pow(lrn.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._owner._mode
        if mode is None:
            return self.lrn(x)
        key = mode.next_key()
        if mode.phase == "record":
            g = self.gain(x)
            mode.store.put(key, "lrn", g)
            return x * g
        return x * mode.store.get(key, "lrn", x)


# --------------------------------------------------------------------------- the reconstructed model


class ReconstructedModel(nn.Module):
    """The network with the non-linearities' states of one forward on ``x`` fixed: ``f(v) = W_x v + b_x`` exactly.

    Built by :func:`reconstruct`. ``forward(v)`` takes a batch ``(B, 3, H, W)`` of inputs of the recorded size;
    :meth:`bias`, :meth:`columns`, :meth:`jvp`, :meth:`rows`, :meth:`weight` and :meth:`unit_filter` give its
    parameters. ``x`` is the recorded input, ``recorded_logits`` the original network's logits on it (the recording
    pass runs the real non-linearities), ``counts`` how many states of each kind were fixed.
    """

    def __init__(self, net: Network, body: nn.Module, x: torch.Tensor):
        super().__init__()
        self.body = body
        self.states = _Store()
        self.register_buffer("x", x.detach().clone())
        self._mode: _States | None = None
        self.network = replace(net, module=body)  # layer names resolve against the copy
        self.recorded_logits: torch.Tensor | None = None
        for parent in list(body.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LocalResponseNorm | nn.LocalResponseNorm):
                    setattr(parent, name, _Gain(child, self))

    @contextlib.contextmanager
    def _phase(self, phase: str) -> Iterator[None]:
        mode = _States(self.body, self.states, phase)
        self._mode = mode
        try:
            with mode.active():
                yield
        finally:
            self._mode = None

    def _record(self) -> None:
        with torch.no_grad(), self._phase("record"):
            self.recorded_logits = self.body(self.x)

    @property
    def counts(self) -> dict[str, int]:
        return {"relu": self.states.count("relu"), "pool": self.states.count("pool"), "lrn": self.states.count("lrn")}

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def _check(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[1:]) != tuple(self.x.shape[1:]):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            shape = ", ".join(map(str, self.x.shape[1:]))
            raise AtlasError(f"the reconstructed model takes inputs (B, {shape}) like the recorded one; got {got}")
        n = self.x.shape[0]
        if n != 1 and v.shape[0] != n:
            raise AtlasError(f"this reconstructed model holds the states of {n} inputs: give a batch of {n} (input i through states i)")
        return v.to(self.x.dtype)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = self._check(v)
        with self._phase("replay"):
            return self.body(v)

    def _layer(self, v: torch.Tensor, layer: str) -> torch.Tensor:
        """The output of ``layer`` of the reconstructed model (affine in ``v`` as well), the forward stopped after it."""
        v = self._check(v)
        with self._phase("replay"), self.network.hooks([layer], stop=True) as captured:
            try:
                self.body(v)
            except StopForward:
                pass
        if layer not in captured or not isinstance(captured[layer], torch.Tensor):
            raise AtlasError(f"layer '{layer}' of model {self.network.name} was not reached by the forward pass or has no tensor output")
        return captured[layer]

    # ------------------------------------------------------------------ the parameters

    def bias(self) -> torch.Tensor:
        """``b_x = f(0)``: the reconstructed model's response to the zero image, shape ``(n_out,)`` (states of image 0)."""
        with torch.no_grad():
            return self.forward(torch.zeros_like(self.x[:1]))[0]

    def jvp(self, d: torch.Tensor) -> torch.Tensor:
        """``W_x d`` for directions ``d`` (B, 3, H, W): forward-mode products, one batched JVP (primal computed once)."""
        d = self._check(d)
        x0 = self.x[:1]

        def one(t: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(self.forward, (x0,), (t[None],))[1][0]

        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # torch's first forward-mode call registers its JVP decompositions with torch.jit.script, which warns
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
            return torch.func.vmap(one)(d)

    def columns(self, index: Sequence[int] | torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Columns ``W_x e_i`` for flat input indices ``i`` (into ``3*H*W``): responses to orthogonal basis vectors,
        ``batch`` JVPs at a time. Returns ``(n_out, len(index))``."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        size = self.x[0].numel()
        out = []
        for lo in range(0, len(index), batch):
            chunk = index[lo:lo + batch]
            basis = torch.zeros(len(chunk), size, dtype=self.x.dtype, device=self.x.device)
            basis[torch.arange(len(chunk)), chunk.to(self.x.device)] = 1.0
            out.append(self.jvp(basis.view(len(chunk), *self.x.shape[1:])))
        if not out:
            return torch.zeros(self.recorded_logits.shape[-1], 0, dtype=self.x.dtype)
        return torch.cat(out).T

    def weight(self, batch: int = 64, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The full ``W_x`` ``(n_out, 3*H*W)`` from all basis vectors (for small inputs: 3 x 64 x 64 = 12,288 JVPs)."""
        size = self.x[0].numel()
        cols = []
        for lo in range(0, size, batch):
            cols.append(self.columns(range(lo, min(size, lo + batch)), batch))
            if progress is not None:
                progress(min(size, lo + batch), size)
        return torch.cat(cols, 1)

    def _vjp_rows(self, fn: Callable[[torch.Tensor], torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        """Rows of the Jacobian of ``fn`` at ``x`` for cotangent ``seeds`` (k, *out shape): reverse mode, batched."""
        with torch.inference_mode(False), torch.enable_grad():
            _, pull = torch.func.vjp(fn, self.x[:1].clone())
            (rows,) = torch.func.vmap(pull)(seeds)
        return rows[:, 0]

    def rows(self, classes: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Rows of ``W_x`` for output indices ``classes``, reshaped to the input ``(k, 3, H, W)``: VJPs (reverse mode)."""
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        n_out = self.recorded_logits.shape[-1]
        if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= n_out):
            raise AtlasError(f"class indices must be in 0..{n_out - 1}; got {classes.tolist()}")
        seeds = F.one_hot(classes, n_out).to(self.x.dtype).to(self.x.device)
        return self._vjp_rows(lambda v: self.forward(v)[0], seeds)

    def unit_filter(self, layer: str, channel: int) -> dict:
        """A hidden unit's effective input filter for this input: the row of the (affine) map input -> ``layer`` for
        ``channel`` at the position where the channel is strongest (``"max"``), and for the channel's total over all
        positions (``"total"``), each ``(3, H, W)``; with the activation values and the position."""
        act = self._layer(self.x[:1], layer).detach()
        if act.dim() not in (2, 4):
            raise AtlasError(f"layer '{layer}' has output shape {tuple(act.shape[1:])}; give a convolutional or linear layer")
        c = act.shape[1]
        if not 0 <= channel < c:
            raise AtlasError(f"unit {layer}:{channel} does not exist: layer '{layer}' has channels 0..{c - 1}")
        if act.dim() == 2:
            seed = torch.zeros_like(act[0])
            seed[channel] = 1.0
            row = self._vjp_rows(lambda v: self._layer(v, layer)[0], seed[None])[0]
            return {"max": row, "total": row, "position": None, "value": float(act[0, channel]), "total_value": float(act[0, channel])}
        fmap = act[0, channel]
        flat = int(fmap.argmax())
        y, xx = divmod(flat, fmap.shape[1])
        seeds = torch.zeros(2, *act.shape[1:], dtype=act.dtype, device=act.device)
        seeds[0, channel, y, xx] = 1.0
        seeds[1, channel] = 1.0
        rows = self._vjp_rows(lambda v: self._layer(v, layer)[0], seeds)
        return {"max": rows[0], "total": rows[1], "position": (y, xx), "value": float(fmap[y, xx]), "total_value": float(fmap.sum()),
                "grid": tuple(fmap.shape)}


def _copy_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers share the original's memory (no 27 MB copy, no fresh pages):
    new ``Parameter`` objects over the same tensors, so converting the copy (``.to``, ``.double``), which replaces
    its parameters' ``.data``, never touches the original's. Nothing writes into them in place."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b
    return copy.deepcopy(module, memo)


def reconstruct(net: Network, x: torch.Tensor, dtype: str | torch.dtype = "float32") -> ReconstructedModel:
    """Record the non-linearities' states of ``net``'s forward on ``x`` and return the reconstructed model.

    ``x`` is one RGB [0, 1] image ``(3, H, W)`` or a batch ``(N, 3, H, W)`` (then the model holds N sets of states
    and input i goes through states i). ``dtype`` is ``"float32"`` or ``"float64"``: the copy of the network is made
    in it. ``net`` itself is not modified (its module is deep-copied). A model with another non-linearity, or in
    training mode, is one line (:class:`atlas.errors.AtlasError`).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise AtlasError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        dtype = DTYPES[dtype]
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise AtlasError(f"x must be an RGB image (3, H, W) or a batch (N, 3, H, W); got {got}")
    training = [name for name, m in net.module.named_modules() if m.training]
    if training:
        raise AtlasError(f"the model is in training mode ({training[0] or 'the root module'}); reconstruct an eval-mode model")
    device = next((p.device for p in net.module.parameters()), torch.device("cpu"))
    body = _copy_module(net.module).to(dtype)
    x = (x[None] if x.dim() == 3 else x).detach().to(device=device, dtype=dtype)
    model = ReconstructedModel(net, body, x)
    model._record()
    return model


# --------------------------------------------------------------------------- display


def signed_rgb(w: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """A signed (3, H, W) template as an RGB uint8 image: grey is 0, each channel scaled by the ``percentile`` of
    ``|w|`` over the whole template (one scale for all three colours, so hues are the template's own), clipped."""
    w = np.asarray(w, dtype=np.float64)
    scale = float(np.percentile(np.abs(w), percentile)) or 1.0
    return (np.clip(0.5 + 0.5 * w / scale, 0.0, 1.0).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def evidence_overlay(photo: np.ndarray, contribution: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Each pixel's contribution to a logit ``(H, W)`` over a dimmed grey photo: red where positive, blue where negative,
    opacity by size (scaled by the ``percentile`` of ``|contribution|``)."""
    grey = photo.astype(np.float64).mean(2, keepdims=True) / 255.0
    base = np.repeat(0.35 + 0.5 * grey, 3, axis=2)
    scale = float(np.percentile(np.abs(contribution), percentile)) or 1.0
    a = np.clip(np.abs(contribution) / scale, 0.0, 1.0)[..., None]
    colour = np.where(contribution[..., None] > 0, np.array([0.85, 0.05, 0.05]), np.array([0.05, 0.25, 0.95]))
    return ((base * (1 - a) + colour * a) * 255).round().astype(np.uint8)


def plot_reconstruction(photo: np.ndarray, name: str, classes: list[dict], templates: np.ndarray, contributions: np.ndarray,
                        unit: dict | None = None) -> Figure:
    """The figure of one image's reconstruction: each top class's template (its ``W_x`` row as an image) over its
    evidence (``W_x ⊙ x`` on the photo), and the unit's effective input filters when a unit is given.

    Parameters
    ----------
    photo : ndarray (H, W, 3) uint8
        The photo as the model saw it.
    name : str
        Its label (the file name).
    classes : list of dict
        The table's classes (:class:`ImageResult` ``table["classes"]``: name, reconstructed, positive, negative, bias).
    templates, contributions : ndarray (k, 3, H, W) and (k, H, W)
        :class:`ImageResult` ``templates`` and ``contributions``.
    unit : dict or None, default None
        :class:`ImageResult` ``unit``; None: no unit row.

    Returns
    -------
    matplotlib.figure.Figure
        A Figure of its own (no pyplot state; ``fig.savefig(path)`` writes it, a notebook shows it).
    """
    from matplotlib.figure import Figure

    k = len(classes)
    cols = k + 1
    rows = 3 if unit is not None else 2
    fig = Figure(figsize=(2.3 * cols, 2.6 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(photo)
    axes[0, 0].set_title(name[:28], fontsize=8)
    axes[1, 0].text(0.0, 0.5, "top: W_x row as image\n(template, grey = 0)\n\nbottom: W_x ⊙ x\nred +, blue −\n(logit = Σ + b_x)",
                    fontsize=7, va="center")
    for j, entry in enumerate(classes):
        axes[0, j + 1].imshow(signed_rgb(templates[j]))
        axes[0, j + 1].set_title(f"{entry['name'][:22]}\nlogit {entry['reconstructed']:.2f}", fontsize=7)
        axes[1, j + 1].imshow(evidence_overlay(photo, contributions[j]))
        axes[1, j + 1].set_title(f"+{entry['positive']:.1f}  {entry['negative']:.1f}  b {entry['bias']:.1f}", fontsize=7)
    if unit is not None:
        axes[2, 0].text(0.0, 0.5, f"unit {unit['unit']}\neffective input filter\nat its max position\n"
                        f"(act {unit['value']:.2f} at {unit['position']})\nand the channel's total", fontsize=7, va="center")
        axes[2, 1].imshow(signed_rgb(unit["max_filter"]))
        axes[2, 1].set_title("at max position", fontsize=7)
        axes[2, 2].imshow(signed_rgb(unit["total_filter"]))
        axes[2, 2].set_title("channel total", fontsize=7)
        axes[2, 3].imshow(evidence_overlay(photo, unit["max_contribution"]))
        axes[2, 3].set_title("filter ⊙ x (max position)", fontsize=7)
    fig.tight_layout()
    return fig


def read_photo(path: str | Path, resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> tuple[torch.Tensor, np.ndarray]:
    """One photo as the model sees it (shorter side ``resize`` with ``interpolation``, centre crop ``crop``: the
    model's own, :func:`atlas.data.photo_reading`): the (3, crop, crop) tensor in [0, 1] and the (crop, crop, 3) uint8
    picture. A missing or unreadable file is one line naming it."""
    from atlas.data import load_image, to_tensor

    try:
        image = load_image(Path(path), resize, crop, interpolation)
    except FileNotFoundError:
        raise AtlasError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise AtlasError(f"{path}: cannot read the image ({' '.join(str(exc).split())[:160]})") from None
    return to_tensor(image), np.asarray(image, dtype=np.uint8)


def parse_unit(text: str) -> tuple[str, int]:
    """``"mixed4c:447"`` -> ``("mixed4c", 447)``; anything else is one line."""
    match = re.fullmatch(r"\s*([^:\s]+)\s*:\s*(\d+)\s*", text or "")
    if not match:
        raise AtlasError(f"unit must be LAYER:CHANNEL, e.g. mixed4c:447; got {text!r}")
    return match.group(1), int(match.group(2))


@dataclass
class ImageResult:
    """What :func:`reconstruct_image` returns for one image: the table rows, the arrays drawn and the timings."""

    name: str
    table: dict
    templates: np.ndarray
    contributions: np.ndarray
    unit: dict | None
    seconds: dict


def reconstruct_image(net: Network, image: torch.Tensor, name: str = "", top: int = 5, unit: str | None = None,
                      dtype: str = "float32", original: nn.Module | None = None, check_columns: int = 16,
                      batch: int = 64) -> ImageResult:
    """The reconstructed model of one image (3, H, W) and what the report shows of it: top-``top`` class templates
    (VJP rows), their evidence ``W_x ⊙ x``, the optional unit's filters, and the Table 1 rows (original vs
    reconstructed logits and ``W_x · x + b_x``). ``original`` is the original module in ``dtype`` (default:
    ``net.module`` for float32, a float64 copy made here otherwise). ``check_columns`` columns of ``W_x`` at random
    input positions are also computed by forward mode (JVPs, ``batch`` at a time) and compared with the rows drawn."""
    t0 = time.perf_counter()
    layer_channel = parse_unit(unit) if unit else None
    if layer_channel:
        net.resolve(layer_channel[0])  # an unknown layer: one line, before any work
    model = reconstruct(net, image, dtype)
    t1 = time.perf_counter()
    reconstructed = model(model.x)[0].detach()
    t_fwd = time.perf_counter()
    if original is None:
        original = net.module if DTYPES[dtype] == torch.float32 else copy.deepcopy(net.module).to(DTYPES[dtype])
    with torch.no_grad():
        orig = original(model.x).detach()[0]
    k = min(top, orig.numel())
    order = orig.topk(k).indices
    t2 = time.perf_counter()
    rows = model.rows(order).detach()
    t3 = time.perf_counter()
    bias = model.bias().detach()
    contributions = (rows * model.x[0]).sum(1)  # (k, H, W): each pixel's share of W_x x
    from_params = contributions.flatten(1).sum(1) + bias[order]
    t4 = time.perf_counter()
    check = None
    if check_columns:
        picked = torch.randperm(model.x[0].numel(), generator=torch.Generator().manual_seed(0))[:check_columns]
        cols = model.columns(picked, batch)[order.to(model.x.device)]  # (k, m): forward mode
        from_rows = rows.flatten(1)[:, picked.to(rows.device)]  # the same entries from the reverse-mode rows
        check = {"columns": len(picked), "max_abs_diff": float((cols - from_rows).abs().max()),
                 "max_abs_entry": float(from_rows.abs().max())}
    t_check = time.perf_counter()
    classes = []
    for j, c in enumerate(order.tolist()):
        contrib = contributions[j]
        classes.append({"index": c, "name": net.classes[c] if c < len(net.classes) else str(c), "original": float(orig[c]),
                        "reconstructed": float(reconstructed[c]), "from_parameters": float(from_params[j]), "bias": float(bias[c]),
                        "positive": float(contrib.clamp(min=0).sum()), "negative": float(contrib.clamp(max=0).sum())})
    diff = (reconstructed - orig).abs()
    table = {"image": name, "dtype": dtype, "size": list(model.x.shape[2:]), "states": model.counts, "classes": classes,
             "max_abs_diff": float(diff.max()), "max_rel_diff": float((diff / orig.abs().max()).max()),
             "max_abs_diff_parameters": float((from_params - orig[order]).abs().max()), "jvp_vs_vjp": check}
    unit_out = None
    if layer_channel:
        layer, channel = layer_channel
        filt = model.unit_filter(layer, channel)
        unit_out = {"unit": f"{layer}:{channel}", "position": filt["position"], "value": filt["value"], "total_value": filt["total_value"],
                    "max_filter": filt["max"].detach().cpu().numpy(), "total_filter": filt["total"].detach().cpu().numpy(),
                    "max_contribution": (filt["max"] * model.x[0]).sum(0).detach().cpu().numpy()}
        table["unit"] = {k2: unit_out[k2] for k2 in ("unit", "position", "value", "total_value")}
        table["unit"]["position"] = list(filt["position"]) if filt["position"] is not None else None
        table["unit"]["grid"] = list(filt["grid"]) if filt.get("grid") else None
    t5 = time.perf_counter()
    seconds = {"record": t1 - t0, "replay": t_fwd - t1, "templates": t3 - t2, "bias_and_evidence": t4 - t3, "check": t_check - t4,
               "unit": t5 - t_check, "total": t5 - t0}
    return ImageResult(name, table, rows.cpu().numpy(), contributions.cpu().numpy(), unit_out, seconds)


def table_markdown(tables: Sequence[dict]) -> str:
    """The paper's Table 1 for the images: for each top class, the original model's logit, the reconstructed model's,
    and ``W_x · x + b_x`` from its parameters."""
    lines = ["| image | class | original | reconstructed | W_x·x + b_x |", "|---|---|---:|---:|---:|"]
    for t in tables:
        for j, c in enumerate(t["classes"]):
            label = t["image"] if j == 0 else ""
            lines.append(f"| {label} | {c['name'][:40]} | {c['original']:.4f} | {c['reconstructed']:.4f} | {c['from_parameters']:.4f} |")
    lines.append("")
    for t in tables:
        lines.append(f"- {t['image']} ({t['dtype']}, {t['size'][0]}x{t['size'][1]}, {t['states']['relu']} ReLU masks, "
                     f"{t['states']['pool']} pooling switches, {t['states']['lrn']} LRN gains): max |original − reconstructed| "
                     f"over all {t.get('n_out', 'the')} outputs {t['max_abs_diff']:.2e}; max |original − (W_x·x + b_x)| "
                     f"over the rows shown {t['max_abs_diff_parameters']:.2e}"
                     + (f"; {t['jvp_vs_vjp']['columns']} JVP columns vs the VJP rows: max |Δ| {t['jvp_vs_vjp']['max_abs_diff']:.2e} "
                        f"(entries up to {t['jvp_vs_vjp']['max_abs_entry']:.2e})" if t.get("jvp_vs_vjp") else ""))
    return "\n".join(lines) + "\n"


def reconstruct_report(images: Sequence[str | Path], out: str | Path, settings=None, model: str = "inceptionv1",
                       weights: str | Path | None = None, net: Network | None = None, echo: Callable[[str], None] | None = None) -> dict:
    """``atlas reconstruct``: for each image, the reconstructed model, its top-class templates, evidence overlays and
    the optional unit's filters as ``OUT/<stem>.png`` (+ ``<stem>.npz`` with the arrays drawn), and the paper's
    Table 1 for all images as ``OUT/table.md`` and ``OUT/table.json``. ``settings`` is a
    :class:`atlas.settings.ReconstructSettings` (default: its defaults). Returns the summary (also ``OUT/table.json``).

    Every image is decoded before any work: an unreadable one is one line and nothing is written.
    """
    from atlas.settings import ReconstructSettings, check_out_folder

    settings = settings or ReconstructSettings()
    if not images:
        raise AtlasError("give at least one image")
    check_out_folder(out)
    unit = settings.unit
    if unit:
        parse_unit(unit)
    loaded = [(Path(p), *read_photo(p)) for p in images]  # an unreadable image: one line, before any work
    if net is None:
        from atlas.models import load_model

        net = load_model(model, weights, settings.device)
    from atlas.data import photo_reading

    reading = photo_reading(net.preprocess)
    if reading != photo_reading(None):  # a wrapped model that reads photos its own way (size, resampling): read again
        loaded = [(path, *read_photo(path, *reading)) for path, _, _ in loaded]
    if unit:
        net.resolve(parse_unit(unit)[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    original = net.module if settings.dtype == "float32" else copy.deepcopy(net.module).to(DTYPES[settings.dtype])
    tables = []
    stems: dict[str, int] = {}
    for path, tensor, photo in loaded:
        stem = path.stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:
            stem = f"{stem}-{stems[stem]}"
        result = reconstruct_image(net, tensor, path.name, settings.top, unit, settings.dtype, original, settings.check_columns,
                                   settings.batch)
        plot_reconstruction(photo, path.name, result.table["classes"], result.templates, result.contributions,
                            result.unit).savefig(out / f"{stem}.png")
        arrays = {"templates": result.templates, "evidence": result.contributions,
                  "classes": np.array([c["index"] for c in result.table["classes"]])}
        if result.unit is not None:
            arrays |= {"unit_max_filter": result.unit["max_filter"], "unit_total_filter": result.unit["total_filter"]}
        np.savez_compressed(out / f"{stem}.npz", **arrays)
        result.table |= {"figure": f"{stem}.png", "arrays": f"{stem}.npz", "seconds": result.seconds,
                         "n_out": int(len(net.classes) or 0) or None}
        tables.append(result.table)
        if echo is not None:
            echo(f"{path.name}: reconstructed in {result.seconds['total']:.2f}s, max |Δlogit| {result.table['max_abs_diff']:.1e} "
                 f"-> {out / stem}.png")
    summary = {"model": net.name, "weights": net.weights, "dtype": settings.dtype, "top": settings.top, "unit": unit, "images": tables}
    (out / "table.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text("# Original vs reconstructed model (the paper's Table 1)\n\n" + table_markdown(tables))
    return summary
