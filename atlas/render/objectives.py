"""What an icon maximises: objectives that compose with ``+``, ``-``, ``*`` and ``/``.

An :class:`Objective` maps the optimiser's per-step :class:`State` (the hooked layer
activations and the image batch) to one score per image, shape (n,), which the
optimiser *maximises* (it steps on ``-score.sum()``). So a batch optimises many
independent icons with one summed loss, and a penalty is subtracted::

    from atlas.render import objectives as obj

    goal = obj.direction("mixed4c", v, whitening=S) - 0.1 * obj.l2()
    goal.description  # 'direction(mixed4c) - 0.1 * l2()'
    goal.layers       # ('mixed4c',): what the optimiser hooks

Every objective declares the ``layers`` it reads (a term built without a layer reads the
layer being visualised, the ``layer`` argument of :func:`atlas.render.visualize`), the
``batch`` it is defined for (None: any) and, for the target terms (direction, channel,
neuron), the plain cosine of the centre activation to the target: the figure the paper
uses to say how well an icon represents its cell, reported as ``Result.cosine``. A direction
term also gives the cosine to the target it optimises, cos(h, S v) with whitening S
(``Result.cosine_whitened``): the figure that grows with optimisation compute.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atlas.errors import AtlasError

MIN_COS = 0.1  # floor on the cosine factor: keeps dot * cos**p increasing while h points away

# Precedence of a description's outermost operator, to parenthesise only where needed.
_SUM, _PRODUCT, _ATOM = 1, 2, 3


@dataclass
class State:
    """What an objective sees at one step (or at the final measurement).

    ``acts``: float32 outputs of the hooked layers for the network's input (the randomly
    transformed view of the icons during optimisation, the icons themselves when measured);
    ``images``: the parameterisation's output, (n, 3, P, P) in [0, 1], before transforms;
    ``layer``: the default layer, read by terms that name none (None: every term must name one).
    """

    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    images: torch.Tensor | None = None
    layer: str | None = None

    def activations(self, layer: str | None) -> torch.Tensor:
        """The outputs of ``layer`` (or of the default layer when None)."""
        name = layer or self.layer
        if name is None:
            raise AtlasError("an objective term names no layer and there is no default layer; pass layer=...")
        if name not in self.acts:
            raise AtlasError(f"layer '{name}' was not hooked for this objective (hooked: {', '.join(self.acts) or 'none'})")
        return self.acts[name]


def _as_state(x: State | torch.Tensor, layer: str | None) -> State:
    """A bare activation tensor is the state of a one-layer objective (the pre-composition call style)."""
    if isinstance(x, State):
        return x
    return State(acts={layer or "": x}, layer=layer or "")


def centre(acts: torch.Tensor) -> torch.Tensor:
    """(n, C) activation at the centre position of (n, C, H, W) (or (n, C) unchanged)."""
    if acts.dim() == 2:
        return acts
    return acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2]


def _number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fmt(k: float) -> str:
    return f"{float(k):g}"


class Objective:
    """A per-image score to maximise, with an algebra: ``a + b``, ``a - b``, ``-a``, ``k * a``, ``a * b``, ``a / k``.

    Parameters
    ----------
    fn : callable (State) -> torch.Tensor
        Returns the score of every image, a float tensor of shape (n,).
    description : str
        Readable name, e.g. ``"l2()"``; composites build theirs from their terms.
    layers : sequence of str or None, default ()
        Layers ``fn`` reads; None stands for the default (visualised) layer.
    batch : int or None, default None
        Number of images the term is defined for (e.g. one direction per image); None: any.
    terms : sequence of Objective, default ()
        Sub-objectives (composites), used for ``layers``, ``batch``, ``cosine``, ``to``, ``take`` and ``repeat_interleave``.

    Sums, differences and products of objectives are objectives; so is ``sum([...])``.
    Combining with anything but an objective or a real number raises ``TypeError``.
    """

    __array_ufunc__ = None  # numpy scalars defer to our reflected operators (np.float64(2) * obj is an Objective)

    def __init__(self, fn: Callable[[State], torch.Tensor], description: str, layers: Sequence[str | None] = (),
                 batch: int | None = None, terms: Sequence[Objective] = (), precedence: int = _ATOM):
        self.fn, self.description, self.terms, self.precedence = fn, description, tuple(terms), precedence
        self._layers, self._batch = tuple(layers), batch

    # -- what the optimiser asks -------------------------------------------------------------
    @property
    def layers(self) -> tuple[str | None, ...]:
        """Layers to hook, in first-use order, without repeats (None: the default layer)."""
        out = list(self._layers)
        for t in self.terms:
            out += t.layers
        return tuple(dict.fromkeys(out))

    @property
    def batch(self) -> int | None:
        """Number of images this objective is defined for (None: any); terms must agree."""
        sizes = {b for b in [self._batch, *(t.batch for t in self.terms)] if b is not None}
        if len(sizes) > 1:
            raise AtlasError(f"objective terms are defined for different batch sizes ({', '.join(map(str, sorted(sizes)))}): "
                             f"{self.description}")
        return sizes.pop() if sizes else None

    def __call__(self, state: State | torch.Tensor) -> torch.Tensor:
        """Score per image, shape (n,). A bare tensor is taken as the activations of this objective's one layer."""
        return self.fn(_as_state(state, self._single_layer()))

    def cosine(self, state: State | torch.Tensor) -> torch.Tensor | None:
        """cos(h, target) per image of the first target term (direction, channel, neuron), or None if there is none."""
        state = _as_state(state, self._single_layer())
        for t in self.terms:
            c = t.cosine(state)
            if c is not None:
                return c
        return None

    def cosine_whitened(self, state: State | torch.Tensor) -> torch.Tensor | None:
        """cos(h, S v) per image of the first direction term (the alignment it optimises), or None if there is none."""
        state = _as_state(state, self._single_layer())
        for t in self.terms:
            c = t.cosine_whitened(state)
            if c is not None:
                return c
        return None

    def to(self, device: torch.device | str) -> Objective:
        """Move the objective's tensors to ``device`` (in place); returns self."""
        for t in self.terms:
            t.to(device)
        return self

    def repeat_interleave(self, k: int) -> Objective:
        """The objective for a batch with every image repeated ``k`` times in a row (``attempts``)."""
        n = self.batch
        return self if k == 1 or n is None else self.take(torch.arange(n).repeat_interleave(k))

    def take(self, rows: torch.Tensor | Sequence[int]) -> Objective:
        """The objective for the images ``rows`` of its batch, in that order (terms defined for any batch unchanged):
        how a successive-halving render goes on with only the seeds it keeps."""
        if not self.terms:
            return self
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.terms = tuple(t.take(rows) for t in self.terms)
        clone.fn = _rebind(self, clone)
        return clone

    def _single_layer(self) -> str | None:
        layers = self.layers
        return layers[0] if len(layers) == 1 else None

    def __repr__(self) -> str:
        return f"<Objective {self.description}>"

    def __str__(self) -> str:
        return self.description

    # -- algebra ---------------------------------------------------------------------------------
    def _wrap(self, min_precedence: int) -> str:
        return f"({self.description})" if self.precedence < min_precedence else self.description

    @staticmethod
    def _check(other: object, op: str, self_: Objective, reflected: bool = False) -> None:
        if not (isinstance(other, Objective) or _number(other)):
            expr = f"{other!r} {op} {self_.description}" if reflected else f"{self_.description} {op} {other!r}"
            raise TypeError(f"cannot combine an objective with {type(other).__name__} by '{op}': "
                            f"use another objective or a real number ({expr})")

    def __add__(self, other: Objective | float) -> Objective:
        self._check(other, "+", self)
        if _number(other):
            k = float(other)
            return Objective(_Affine(self, 1.0, k), f"{self.description} + {_fmt(k)}", terms=[self], precedence=_SUM)
        return Objective(_Sum([self, other], [1.0, 1.0]), f"{self.description} + {other._wrap(_SUM)}", terms=[self, other],
                         precedence=_SUM)

    def __radd__(self, other: Objective | float) -> Objective:
        if isinstance(other, numbers.Real) and not isinstance(other, bool) and other == 0:
            return self  # sum([...]) starts from 0
        self._check(other, "+", self, reflected=True)
        k = float(other)
        return Objective(_Affine(self, 1.0, k), f"{_fmt(k)} + {self.description}", terms=[self], precedence=_SUM)

    def __sub__(self, other: Objective | float) -> Objective:
        self._check(other, "-", self)
        if _number(other):
            k = float(other)
            return Objective(_Affine(self, 1.0, -k), f"{self.description} - {_fmt(k)}", terms=[self], precedence=_SUM)
        return Objective(_Sum([self, other], [1.0, -1.0]), f"{self.description} - {other._wrap(_PRODUCT)}",
                         terms=[self, other], precedence=_SUM)

    def __rsub__(self, other: float) -> Objective:
        self._check(other, "-", self, reflected=True)
        k = float(other)
        return Objective(_Affine(self, -1.0, k), f"{_fmt(k)} - {self._wrap(_PRODUCT)}", terms=[self], precedence=_SUM)

    def __neg__(self) -> Objective:
        return Objective(_Affine(self, -1.0, 0.0), f"-{self._wrap(_ATOM)}", terms=[self], precedence=_ATOM)

    def __mul__(self, other: Objective | float) -> Objective:
        self._check(other, "*", self)
        if _number(other):
            k = float(other)
            return Objective(_Affine(self, k, 0.0), f"{self._wrap(_PRODUCT)} * {_fmt(k)}", terms=[self], precedence=_PRODUCT)
        return Objective(_Product(self, other), f"{self._wrap(_PRODUCT)} * {other._wrap(_ATOM)}", terms=[self, other],
                         precedence=_PRODUCT)

    def __rmul__(self, other: float) -> Objective:
        self._check(other, "*", self, reflected=True)
        k = float(other)
        return Objective(_Affine(self, k, 0.0), f"{_fmt(k)} * {self._wrap(_PRODUCT)}", terms=[self], precedence=_PRODUCT)

    def __truediv__(self, other: float) -> Objective:
        if not _number(other):
            raise TypeError(f"an objective can only be divided by a real number, not {type(other).__name__} "
                            f"({self.description} / {other!r})")
        if float(other) == 0:
            raise ZeroDivisionError(f"objective divided by zero ({self.description} / 0)")
        k = float(other)
        return Objective(_Affine(self, 1.0 / k, 0.0), f"{self._wrap(_PRODUCT)} / {_fmt(k)}", terms=[self], precedence=_PRODUCT)


# The composites' functions hold their terms; take (and so repeat_interleave) rebuilds them on the taken terms.
class _Sum:
    def __init__(self, terms: Sequence[Objective], weights: Sequence[float]):
        self.terms, self.weights = list(terms), list(weights)

    def __call__(self, state: State) -> torch.Tensor:
        total = None
        for t, w in zip(self.terms, self.weights, strict=True):
            value = t.fn(state) if w == 1.0 else w * t.fn(state)
            total = value if total is None else total + value
        return total


class _Affine:
    def __init__(self, term: Objective, scale: float, shift: float):
        self.terms, self.scale, self.shift = [term], scale, shift

    def __call__(self, state: State) -> torch.Tensor:
        return self.terms[0].fn(state) * self.scale + self.shift


class _Product:
    def __init__(self, a: Objective, b: Objective):
        self.terms = [a, b]

    def __call__(self, state: State) -> torch.Tensor:
        return self.terms[0].fn(state) * self.terms[1].fn(state)


def _rebind(old: Objective, new: Objective):
    fn = object.__new__(type(old.fn))
    fn.__dict__.update(old.fn.__dict__)
    fn.terms = list(new.terms)
    return fn


def wrap_objective(description: str | None = None, layers: Sequence[str | None] = ()):
    """Decorator: make an objective factory from a function ``f(state, *args, **kwargs) -> (n,) tensor``.

    Parameters
    ----------
    description : str or None, default None
        Format string for the description, filled with the call's arguments by name
        (e.g. ``"mean({layer})"``); None: ``"name(arg, ...)"`` from the function's name and arguments.
    layers : sequence of str or None, default ()
        Layers the objective reads; a string naming one of the factory's keyword arguments
        (e.g. ``"layer"``) takes the call's value of that argument.

    Returns
    -------
    callable
        A factory with the function's arguments (minus ``state``) that returns an :class:`Objective`.

    Example::

        @wrap_objective("mean({layer})", layers=["layer"])
        def mean(state, layer=None):
            return state.activations(layer).flatten(1).mean(1)

        goal = mean("mixed4a") - 0.05 * l2()
    """
    def decorate(f: Callable[..., torch.Tensor]) -> Callable[..., Objective]:
        signature = inspect.signature(f)

        @functools.wraps(f)
        def factory(*args, **kwargs) -> Objective:
            bound = signature.bind(None, *args, **kwargs)
            bound.apply_defaults()
            values = dict(list(bound.arguments.items())[1:])
            if description is None:
                text = f"{f.__name__}({', '.join(str(v) for v in values.values() if v is not None)})"
            else:
                text = description.format(**values)
            used = [values.get(name, name) if isinstance(name, str) else None for name in layers]
            return Objective(lambda state: f(state, **values), text, layers=used)

        return factory

    return decorate


# -- target terms: direction, channel, neuron -------------------------------------------------------------------


class Direction(Objective):
    """dot(h, S v) * cos(h, S v) ** p at the centre position, one direction per image (see :func:`direction`).

    The cosine factor trades raw magnitude for alignment: without it, the optimiser
    inflates whichever channels are easiest, giving an icon that activates v's largest
    components rather than v. Whitening (S) divides out the layer's typical correlations,
    so the icon shows what is specific to v rather than what all images share.
    """

    def __init__(self, directions: torch.Tensor, whitening: torch.Tensor | None = None, p: float = 2.0, layer: str | None = None):
        v = torch.as_tensor(directions).float()
        v = v[None] if v.dim() == 1 else v
        if v.dim() != 2 or v.shape[0] == 0:
            raise AtlasError(f"directions must be (n, C) with n >= 1 (got shape {tuple(v.shape)})")
        if whitening is not None:
            s = torch.as_tensor(whitening).float()
            if tuple(s.shape) != (v.shape[1], v.shape[1]):
                raise AtlasError(f"whitening must be ({v.shape[1]}, {v.shape[1]}) for {v.shape[1]}-channel directions "
                                 f"(got {tuple(s.shape)})")
            target = v @ s.T
        else:
            target = v
        self.v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.u = target / target.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.p, self.layer, self.whitened = float(p), layer, whitening is not None
        name = f"direction({layer or ''})"
        super().__init__(self._score, name, layers=[layer], batch=self.v.shape[0])

    def to(self, device: torch.device | str) -> Direction:
        self.v, self.u = self.v.to(device), self.u.to(device)
        return self

    def take(self, rows: torch.Tensor | Sequence[int]) -> Direction:
        index = torch.as_tensor(rows, dtype=torch.long, device=self.v.device)
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.v, clone.u = self.v[index], self.u[index]
        clone._batch = clone.v.shape[0]
        clone.fn = clone._score
        return clone

    def _check_channels(self, h: torch.Tensor) -> None:
        if h.shape[1] != self.u.shape[1]:
            raise AtlasError(f"directions have {self.u.shape[1]} channels but layer '{self.layer or 'default'}' has {h.shape[1]}")

    def _score(self, state: State) -> torch.Tensor:
        h = centre(state.activations(self.layer)).float()
        self._check_channels(h)
        dot = (h * self.u).sum(1)
        if self.p == 0:
            return dot
        cos = dot / h.norm(dim=1).clamp(min=1e-6)
        return dot * cos.clamp(min=MIN_COS) ** self.p

    def cosine(self, state: State | torch.Tensor) -> torch.Tensor:
        """cos(h, v) to the unwhitened direction, at the centre position."""
        h = centre(_as_state(state, self.layer).activations(self.layer)).float()
        return (h * self.v).sum(1) / h.norm(dim=1).clamp(min=1e-6)

    def cosine_whitened(self, state: State | torch.Tensor) -> torch.Tensor:
        """cos(h, S v) at the centre position: the alignment the objective optimises (cos(h, v) without whitening)."""
        h = centre(_as_state(state, self.layer).activations(self.layer)).float()
        return (h * self.u).sum(1) / h.norm(dim=1).clamp(min=1e-6)


class Channel(Objective):
    """Mean activation of one channel per image over all positions (Lucid's 'channel' objective; see :func:`channel`)."""

    kind = "channel"

    def __init__(self, channels: torch.Tensor | Sequence[int] | int, layer: str | None = None):
        ids = torch.as_tensor(np.atleast_1d(np.asarray(channels)))
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or bool((ids < 0).any()):
            raise AtlasError(f"{self.kind} indices must be non-negative integers (got {np.asarray(channels).tolist()})")
        self.channels, self.layer, self._top = ids.long(), layer, int(ids.max())
        shown = ", ".join(map(str, self.channels.tolist()[:4])) + (", ..." if self.channels.numel() > 4 else "")
        super().__init__(self._score, f"{self.kind}({layer + ', ' if layer else ''}{shown})", layers=[layer],
                         batch=self.channels.numel())

    def to(self, device: torch.device | str) -> Channel:
        self.channels = self.channels.to(device)
        return self

    def take(self, rows: torch.Tensor | Sequence[int]) -> Channel:
        index = torch.as_tensor(rows, dtype=torch.long, device=self.channels.device)
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.channels = self.channels[index]
        clone._batch = clone.channels.numel()
        clone.fn = clone._score
        return clone

    def _acts(self, state: State) -> torch.Tensor:
        acts = state.activations(self.layer)
        if self._top >= acts.shape[1]:
            raise AtlasError(f"{self.kind} {self._top} does not exist: layer '{self.layer or state.layer}' has {acts.shape[1]} channels")
        return acts

    def _score(self, state: State) -> torch.Tensor:
        acts = self._acts(state)
        index = torch.arange(acts.shape[0], device=acts.device)
        return acts[index, self.channels].float().flatten(1).mean(1)

    def cosine(self, state: State | torch.Tensor) -> torch.Tensor:
        """cos(h, e_c): the centre activation's share of the channel, h[c] / |h|."""
        h = centre(self._acts(_as_state(state, self.layer))).float()
        index = torch.arange(h.shape[0], device=h.device)
        return h[index, self.channels] / h.norm(dim=1).clamp(min=1e-6)


class Neuron(Channel):
    """Activation of one channel per image at the centre position only (see :func:`neuron`)."""

    kind = "neuron"

    def _score(self, state: State) -> torch.Tensor:
        acts = self._acts(state)
        index = torch.arange(acts.shape[0], device=acts.device)
        return centre(acts)[index, self.channels].float()


def direction(layer: str | None, vectors: torch.Tensor | np.ndarray, whitening: torch.Tensor | np.ndarray | None = None,
              p: float = 2.0) -> Direction:
    """The paper's direction objective: dot(h, S v) * max(cos(h, S v), 0.1) ** p at the centre position.

    Parameters
    ----------
    layer : str or None
        Layer whose centre activation h is read (e.g. ``"mixed4c"``); None: the visualised layer.
    vectors : array-like, shape (n, C) or (C,)
        One target direction v per image (C = the layer's channels); rows need not be unit length.
    whitening : array-like, shape (C, C), or None, default None
        S, e.g. the run's ``whitening/{layer}/matrix``; None: the identity.
    p : float, default 2.0, >= 0
        Exponent of the cosine factor; 0 gives the plain dot product.

    Returns
    -------
    Direction
        An objective for a batch of n images; its ``cosine`` is cos(h, v) to the unwhitened v.
    """
    if not p >= 0:
        raise AtlasError(f"p must be >= 0 (got {p})")
    return Direction(torch.as_tensor(np.asarray(vectors), dtype=torch.float32),
                     None if whitening is None else torch.as_tensor(np.asarray(whitening), dtype=torch.float32), p, layer)


def channel(layer: str | None, index: int | Sequence[int]) -> Channel:
    """Mean activation of channel ``index`` over all positions of ``layer``.

    Parameters
    ----------
    layer : str or None
        Layer to read; None: the visualised layer.
    index : int or sequence of int, each in [0, channels of the layer)
        One channel per image of the batch.

    Returns
    -------
    Channel
        An objective for a batch of ``len(index)`` images.
    """
    return Channel(index, layer)


def neuron(layer: str | None, index: int | Sequence[int]) -> Neuron:
    """Activation of channel ``index`` at the centre position of ``layer`` (one neuron).

    Parameters
    ----------
    layer : str or None
        Layer to read; None: the visualised layer.
    index : int or sequence of int, each in [0, channels of the layer)
        One channel per image of the batch.

    Returns
    -------
    Neuron
        An objective for a batch of ``len(index)`` images.
    """
    return Neuron(index, layer)


# -- image regularisers and the batch-coupled diversity term ------------------------------------------------------


def _images(state: State) -> torch.Tensor:
    if state.images is None:
        raise AtlasError("this objective reads the images, but the state holds none")
    return state.images.float()


def l1(constant: float = 0.5) -> Objective:
    """Per-image L1 distance of the image from ``constant``: sum |x - constant| over channels and pixels.

    Parameters
    ----------
    constant : float, default 0.5, in [0, 1]
        Reference value; 0.5 is the grey the optimisation starts from.

    Returns
    -------
    Objective
        A non-negative score per image; subtract it (``... - 0.01 * l1()``) to penalise.
    """
    c = float(constant)
    return Objective(lambda s: (_images(s) - c).abs().flatten(1).sum(1), "l1()" if c == 0.5 else f"l1({_fmt(c)})")


def l2(constant: float = 0.5, epsilon: float = 1e-6) -> Objective:
    """Per-image L2 distance of the image from ``constant``: sqrt(epsilon + sum (x - constant)^2).

    Parameters
    ----------
    constant : float, default 0.5, in [0, 1]
        Reference value; 0.5 is the grey the optimisation starts from.
    epsilon : float, default 1e-6, > 0
        Keeps the gradient finite at the reference image.

    Returns
    -------
    Objective
        A non-negative score per image; subtract it (``... - 0.1 * l2()``) to penalise.
    """
    c, eps = float(constant), float(epsilon)
    return Objective(lambda s: ((_images(s) - c) ** 2).flatten(1).sum(1).add(eps).sqrt(), "l2()" if c == 0.5 else f"l2({_fmt(c)})")


def total_variation() -> Objective:
    """Per-image total variation: sum of absolute differences between neighbouring pixels (both axes, all channels).

    Returns
    -------
    Objective
        A non-negative score per image; subtract it to favour smooth images.
    """

    def tv(state: State) -> torch.Tensor:
        x = _images(state)
        dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).sum(1)
        dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).sum(1)
        return dy + dx

    return Objective(tv, "total_variation()")


def gram_cosines(acts: torch.Tensor) -> torch.Tensor:
    """(n, n) cosines between the images' Gram matrices G_i = F_i F_i^T, F_i the (C, H*W) activations of image i."""
    f = acts.float().flatten(2)
    grams = (f @ f.transpose(1, 2)).flatten(1)
    grams = grams / grams.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return grams @ grams.T


def diversity(layer: str | None = None) -> Objective:
    """Diversity across the batch (Lucid's): minus the mean cosine of an image's Gram matrix to the others'.

    This term couples the images of a batch: image i's score is
    -mean_{j != i} cos(G_i, G_j), G the channel Gram matrix of ``layer``'s activations
    (0 for a batch of one), so maximising the summed score pushes every pair apart in
    style. It only makes sense where the batch holds images that should differ (e.g. one
    channel visualised from several seeds); ``render`` never adds it to a run's icons.

    Parameters
    ----------
    layer : str or None, default None
        Layer whose activations give the Gram matrices; None: the visualised layer.

    Returns
    -------
    Objective
        A score per image in [-1, 1] (in [-1, 0] after a ReLU); add it with a weight, e.g.
        ``channel("mixed4c", [9] * 4) + 10 * diversity("mixed4c")``.
    """

    def score(state: State) -> torch.Tensor:
        acts = state.activations(layer)
        n = acts.shape[0]
        if n < 2:
            return acts.new_zeros(n, dtype=torch.float32)
        cos = gram_cosines(acts)
        return -(cos.sum(1) - cos.diagonal()) / (n - 1)

    return Objective(score, f"diversity({layer or ''})", layers=[layer])
