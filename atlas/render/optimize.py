"""The optimisation loop shared by ``visualize`` (one-off objectives) and ``render``.

Many icons are optimised together: each has its own Fourier parameters, its own random
transforms (drawn from its own seed) and its own term of the summed loss, and Adam's
per-parameter step sizes keep them independent, so one batched forward/backward serves
them all. The loop knows nothing of particular objectives or parameterisations: it hooks
the layers the objective declares, stops the forward at the deepest, and steps whatever
parameters the parameterisation exposes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atlas.errors import AtlasError
from atlas.models import Network, StopForward, autocast_dtype
from atlas.render.objectives import Objective, State
from atlas.render.objectives import channel as make_channel
from atlas.render.objectives import direction as make_direction
from atlas.render.objectives import neuron as make_neuron
from atlas.render.param import Parameterization, default_param
from atlas.render.transforms import Transforms, apply, draw
from atlas.settings import icon_steps

SCHEDULES = ("constant", "cosine")  # Adam step-size schedules over an icon's steps (Settings.schedule)


@dataclass(frozen=True)
class Settings:
    """Everything that decides what an icon looks like (and so goes into its cache key), plus speed switches.

    Parameters
    ----------
    size : int, default 80, >= 1
        Icon side in pixels.
    steps : int, default 256, >= 1
        Optimisation steps.
    attempts : int, default 1, >= 1
        Seeds per icon (the caller keeps the best; see ``best_of``).
    lr : float, default 0.05, > 0
        Adam's learning rate on the parameterisation's parameters.
    p : float, default 2.0, >= 0
        Cosine exponent of the direction objective.
    transforms : Transforms, default Transforms()
        Ranges of the random pad, jitter, scale and rotation applied every step.
    precision : {"auto", "bf16", "bfloat16", "fp32", "float32"}, default "auto"
        "auto" runs the network in bf16 on CPUs with native bf16 (AVX512-BF16/AMX) and on CUDA,
        else float32; the others force it.
    channels_last : bool, default True
        NHWC convolutions (faster with oneDNN on CPU); speed only.
    redirect_relu : bool, default True
        Lucid's redirected ReLU gradient in the objective's layers, so dead units still get a gradient.
    schedule : {"constant", "cosine"}, default "constant"
        Adam's step size over the run: "constant" keeps ``lr``; "cosine" decays it from ``lr`` to 0 along half a cosine
        over ``steps`` (a large step early, small ones that settle the icon at the end).
    screen : int, default 0, in [0, steps)
        Successive halving of the attempts (see :func:`best_icons`): every seed runs the first ``screen`` steps, then
        only each icon's most promising seed goes on to ``steps``. 0: every seed runs all steps and the best final
        objective is kept. Ignored with one attempt.
    """

    size: int = 80
    steps: int = 256
    attempts: int = 1
    lr: float = 0.05
    p: float = 2.0
    transforms: Transforms = field(default_factory=Transforms)
    precision: str = "auto"
    channels_last: bool = True
    redirect_relu: bool = True
    schedule: str = "constant"
    screen: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise AtlasError(f"unknown lr schedule '{self.schedule}'; choose {', '.join(SCHEDULES)}")
        if self.screen < 0 or (self.screen and self.screen >= self.steps):
            raise AtlasError(f"screen must be at least 0 and less than steps ({self.steps}); got {self.screen}")

    @property
    def screens(self) -> bool:
        """Whether the attempts are screened (successive halving) rather than all run to the end."""
        return self.screen > 0 and self.attempts > 1

    @property
    def icon_steps(self) -> int:
        """Optimisation steps spent per icon, all attempts counted."""
        return icon_steps(self.steps, self.attempts, self.screen)

    def key_dict(self) -> dict:
        """The settings that change the pixels (speed switches excluded except precision)."""
        key = {"size": self.size, "steps": self.steps, "attempts": self.attempts, "lr": self.lr, "p": self.p,
               "transforms": self.transforms.as_dict(), "precision": self.precision,
               "redirect_relu": self.redirect_relu}
        if self.schedule != "constant":
            key["schedule"] = self.schedule  # only when set, so the keys of icons rendered before it stay valid
        if self.screens:
            key["screen"] = self.screen  # likewise
        return key

    def lr_at(self, step: int) -> float:
        """Adam's step size for step ``step`` (0-based) of ``steps``: a function of the step alone, so an icon does not
        depend on how its steps are sliced or batched."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr


@dataclass
class Result:
    """What an optimisation returns.

    ``images`` (n, P, P, 3) float32 in [0, 1]; ``cosine`` (n,) cos(h, target) of the objective's
    target term on the finished icon, for a direction the raw cos(h, v) (NaN when it has none);
    ``objective`` (n,) the objective's final score on the finished icon; ``trace`` (steps, n) its
    score under the random transforms, per step; ``cosine_whitened`` (n,) cos(h, S v) of the first
    direction term, the alignment the optimiser maximises (equal to ``cosine`` without whitening;
    NaN without a direction term).
    """

    images: np.ndarray
    cosine: np.ndarray
    objective: np.ndarray
    trace: np.ndarray  # (steps, n) objective under the random transforms, per step
    cosine_whitened: np.ndarray | None = None


def layer_outputs(net: Network, layers: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations of ``layers``, computing nothing past the deepest."""
    with net.hooks(layers) as captured:
        try:
            net.module(images)
        except StopForward:
            pass
    for layer in layers:
        if not isinstance(captured.get(layer), torch.Tensor):
            raise AtlasError(f"layer '{layer}' does not output a single tensor; pick another layer")
    return dict(captured)


def layer_output(net: Network, layer: str, images: torch.Tensor) -> torch.Tensor:
    """Activations of one layer, computing nothing past it."""
    return layer_outputs(net, [layer], images)[layer]


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose backward lets an image escape units that are dead everywhere.

    With a plain ReLU, a channel that is negative at every position of the start image
    gets no gradient at all and its icon stays grey. Where the usual gradient of a sample
    is entirely zero, this passes the incoming gradient through instead, except where it
    would push an already negative input lower (Lucid's redirected ReLU gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        negative = x < 0
        relu_grad = grad.masked_fill(negative, 0)
        alive = relu_grad.flatten(1).abs().amax(1) > 0
        if bool(alive.all()):
            return relu_grad
        redirected = grad.masked_fill(negative & (grad > 0), 0)
        return torch.where(alive.view(-1, *[1] * (grad.dim() - 1)), relu_grad, redirected)


def _redirected_forward(x: torch.Tensor) -> torch.Tensor:
    return _RedirectedReLU.apply(x)


@contextlib.contextmanager
def redirected_relus(module: torch.nn.Module):
    """Swap every ``nn.ReLU`` inside ``module`` (the visualised layer) for the redirected one while optimising.

    Only the target layer's ReLUs: that is where a channel or neuron objective meets dead
    units (a direction spans many channels and rarely does), and a Python backward on every
    ReLU of the network costs about a third of the step time on CPU.
    """
    relus = [m for m in module.modules() if isinstance(m, torch.nn.ReLU)]
    for m in relus:
        m.forward = _redirected_forward
    try:
        yield
    finally:
        for m in relus:
            del m.forward


@contextlib.contextmanager
def prepared(net: Network, device: torch.device, channels_last: bool, dtype: torch.dtype | None = None):
    """The model on ``device``, in the memory format (and, given ``dtype``, the precision) the loop feeds it.

    Its own tensors are put back afterwards, so a float32 model is never left rounded to
    bf16. Converting the weights once per slice of steps, instead of letting autocast cast
    every weight at every step, saves about 4% of a CPU step; the arithmetic is the same.
    """
    tensors = [*net.module.parameters(), *net.module.buffers()]
    saved = [t.data for t in tensors]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for t in tensors:
        data = t.data.to(device)
        if dtype is not None and data.is_floating_point():
            data = data.to(dtype)
        t.data = data.contiguous(memory_format=fmt) if data.dim() == 4 else data
    try:
        yield
    finally:
        for t, data in zip(tensors, saved, strict=True):
            t.data = data


class Optimization:
    """A batch of images being optimised, advanced in slices of steps (so benchmarks can interleave runs).

    Row i of the objective's score belongs to image i, which starts from, and draws its
    transforms from, its own seed tuple ``seeds[i]``. The layers to hook come from
    ``objective.layers`` (terms that name none read ``layer``, the default layer); the
    forward stops at the deepest of them, and with no layer at all (pure image terms)
    the network is not run. ``param`` is any :class:`~atlas.render.param.Parameterization`
    producing ``len(seeds)`` images of ``settings.size`` px; None: ``default_param(seeds, size)``.
    """

    def __init__(self, net: Network, layer: str | None, objective: Objective, seeds: Sequence[tuple[int, ...]],
                 settings: Settings, device: torch.device | str = "cpu", param: Parameterization | None = None):
        if not isinstance(objective, Objective):
            raise AtlasError(f"objective must be an atlas.render.objectives.Objective (got {type(objective).__name__})")
        self.net, self.layer, self.settings = net, layer, settings
        self.device = torch.device(device)
        n, size, t = len(seeds), settings.size, settings.transforms
        if objective.batch not in (None, n):
            raise AtlasError(f"the objective is defined for {objective.batch} images but {n} seeds were given ({objective.description})")
        if None in objective.layers and layer is None:
            raise AtlasError(f"a term of {objective.description} names no layer and no default layer was given")
        self.layers = list(dict.fromkeys(name or layer for name in objective.layers))
        for name in self.layers:
            net.resolve(name)  # an unknown layer fails here, in one line naming the known ones
        self.objective = objective.to(self.device)
        self.dtype = autocast_dtype(settings.precision, self.device)  # the network's precision; None: float32
        self.fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.param = (param if param is not None else default_param(list(seeds), size)).to(self.device)
        self.optimizer = torch.optim.Adam(self.param.parameters(), lr=settings.lr)
        draws = torch.from_numpy(np.stack([draw(t, settings.steps, np.random.default_rng(list(s))) for s in seeds], 1))
        self.draws = draws if t.per_sample else draws[:, :1].expand(-1, n, -1)
        self.out_size = t.out_size(size)
        self.trace = np.empty((settings.steps, n), dtype=np.float32)
        self.done = 0

    @contextlib.contextmanager
    def _model(self, dtype: torch.dtype | None = None):
        with contextlib.ExitStack() as stack:
            stack.enter_context(prepared(self.net, self.device, self.settings.channels_last, dtype))
            if self.settings.redirect_relu:
                for name in self.layers:
                    stack.enter_context(redirected_relus(self.net.module_of(name)))
            yield

    def _state(self, images: torch.Tensor, view: torch.Tensor) -> State:
        acts = layer_outputs(self.net, self.layers, view) if self.layers else {}
        return State({k: v.float() for k, v in acts.items()}, images, self.layer)

    def step(self, k: int | None = None, on_step: Callable[[int, Parameterization], None] | None = None) -> None:
        """Run ``k`` more steps (default: all that remain)."""
        t = self.settings.transforms
        last = self.settings.steps if k is None else min(self.settings.steps, self.done + k)
        with self._model(self.dtype):
            for step in range(self.done, last):
                self.optimizer.zero_grad(set_to_none=True)
                if self.settings.schedule != "constant":
                    for group in self.optimizer.param_groups:
                        group["lr"] = self.settings.lr_at(step)
                images = self.param()
                view = apply(images, self.draws[step], self.out_size, t.zoom, t.fill)
                view = view.to(self.dtype or view.dtype).contiguous(memory_format=self.fmt)
                values = self.objective.fn(self._state(images, view))
                (-values.sum()).backward()
                self.optimizer.step()
                self.trace[step] = values.detach().cpu().numpy()
                self.done = step + 1
                if on_step is not None:
                    on_step(step, self.param)

    def keep(self, rows: Sequence[int] | np.ndarray) -> None:
        """Go on with only the images ``rows`` (in that order): their parameters, Adam state, transform draws, trace
        and objective rows, exactly as they were (successive halving).

        A parameter (or Adam state tensor) whose first dimension is the batch is taken as one slice per image, as
        every parameterisation in :mod:`atlas.render.param` holds them; others are shared and kept whole.
        """
        index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        n = self.draws.shape[1]
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.dim() and p.shape[0] == n:
                    state = self.optimizer.state.get(p, {})
                    for k, v in list(state.items()):
                        if torch.is_tensor(v) and v.dim() and v.shape[0] == n:
                            state[k] = v[index.to(v.device)].clone()
                    p.data = p.data[index.to(p.device)].clone()
                    p.grad = None
        self.objective = self.objective.take(index.to(self.device))
        self.draws = self.draws[:, index]
        self.trace = self.trace[:, index.numpy()]

    def measure(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, objective, cos(h, target), cos(h, S v)) of the current icons: ``size`` px, no padding or transforms,
        float32.

        The cosine is the first target term's, the whitened cosine the first direction term's (NaN for objectives
        without one)."""
        with torch.no_grad(), self._model():
            images = self.param()
            state = self._state(images, images.contiguous(memory_format=self.fmt))
            values = self.objective.fn(state)
            nan = torch.full_like(values, float("nan"))
            cosine = self.objective.cosine(state)
            whitened = self.objective.cosine_whitened(state)
            return images, values, nan if cosine is None else cosine, nan if whitened is None else whitened

    def result(self) -> Result:
        images, final, cosine, whitened = self.measure()
        return Result(images.permute(0, 2, 3, 1).cpu().numpy(), cosine.cpu().numpy(), final.cpu().numpy(), self.trace[: self.done],
                      whitened.cpu().numpy())


def optimize(net: Network, layer: str | None, objective: Objective, seeds: Sequence[tuple[int, ...]], settings: Settings,
             device: torch.device | str = "cpu", on_step: Callable[[int, Parameterization], None] | None = None,
             param: Parameterization | None = None) -> Result:
    """Optimise one image per seed tuple for ``settings.steps`` steps; see :class:`Optimization`.

    ``on_step(step, param)`` is called after every step (progress bars). The returned
    cosine and objective are measured on the finished icons themselves.
    """
    run = Optimization(net, layer, objective, seeds, settings, device, param)
    run.step(on_step=on_step)
    return run.result()


def best_icons(net: Network, layer: str | None, objective: Objective, seeds: Sequence[tuple[int, ...]], settings: Settings,
               device: torch.device | str = "cpu", on_step: Callable[[int, Parameterization], None] | None = None,
               param: Parameterization | None = None) -> Result:
    """One icon per ``settings.attempts`` consecutive seeds (icon-major), the best of them; see :class:`Optimization`.

    Without ``settings.screen`` every seed runs all steps and the one with the highest final objective is kept
    (:func:`best_of`). With it (successive halving), every seed runs the first ``screen`` steps; then, for each icon,
    only the seed whose objective under the transforms was highest on average over the last ``screen // 2`` of them
    goes on, its parameters and Adam state carried, so the kept icon is exactly that seed's plain run and costs
    ``attempts * screen + steps - screen`` steps instead of ``attempts * steps``. Which seed goes on depends only on
    the icon's own seeds, so icons do not depend on their batch.
    """
    run = Optimization(net, layer, objective, seeds, settings, device, param)
    a = settings.attempts
    if not settings.screens:
        run.step(on_step=on_step)
        return best_of(run.result(), a)
    run.step(settings.screen, on_step)
    run.keep(screened_rows(run.trace, a, settings.screen))
    run.step(on_step=on_step)
    return run.result()


def screened_rows(trace: np.ndarray, attempts: int, trial: int) -> np.ndarray:
    """The row (icon-major, ``attempts`` per icon) of each icon's seed that goes on after a ``trial``-step screen: the
    highest mean objective under the transforms over trial steps [trial - trial // 2, trial) of ``trace`` (steps, rows)."""
    score = trace[trial - max(1, trial // 2): trial].mean(0).reshape(-1, attempts)
    return score.argmax(1) + np.arange(len(score)) * attempts


def best_of(result: Result, attempts: int) -> Result:
    """Keep, for every icon, the attempt with the highest final objective (rows are icon-major)."""
    if attempts == 1:
        return result
    n = result.images.shape[0] // attempts
    pick = result.objective.reshape(n, attempts).argmax(1) + np.arange(n) * attempts
    whitened = result.cosine_whitened[pick] if result.cosine_whitened is not None else None
    return Result(result.images[pick], result.cosine[pick], result.objective[pick], result.trace[:, pick], whitened)


def visualize(net: Network, layer: str, directions: torch.Tensor | np.ndarray | None = None, *,
              channel: int | Sequence[int] | None = None, neuron: int | Sequence[int] | None = None,
              objective: Objective | None = None, size: int = 80, steps: int = 256, attempts: int = 1, seed: int = 0,
              whitening: torch.Tensor | np.ndarray | None = None, p: float = 2.0, device: str = "cpu",
              settings: Settings | None = None, on_step: Callable[[int, Parameterization], None] | None = None,
              param: Parameterization | None = None) -> Result:
    """Feature visualisations of ``layer``: one icon per direction, channel or neuron, or for any objective.

    Give exactly one of ``directions``, ``channel``, ``neuron`` or ``objective``.

    Parameters
    ----------
    net : atlas.models.Network
        The model (e.g. ``atlas.models.load_model("inceptionv1")``).
    layer : str
        Layer visualised (e.g. ``"mixed4c"``); objective terms that name no layer read it.
    directions : array-like, shape (n, C) or (C,), or None, default None
        Target directions v: dot(h, S v) * max(cos(h, S v), 0.1) ** p at the centre position.
    channel : int or sequence of int, in [0, C), or None, default None
        Channels whose mean activation over all positions is maximised, one icon each.
    neuron : int or sequence of int, in [0, C), or None, default None
        Channels whose activation at the centre position is maximised, one icon each.
    objective : Objective or None, default None
        Any composed objective (:mod:`atlas.render.objectives`), e.g.
        ``direction("mixed4c", v) - 0.1 * l2()``; its ``batch`` (or 1) is the number of icons.
    size : int, default 80, >= 1
        Icon side in pixels.
    steps : int, default 256, >= 1
        Optimisation steps.
    attempts : int, default 1, >= 1
        Seeds per icon; the one with the highest final objective is kept.
    seed : int, default 0, >= 0
        Image i, attempt a starts from, and draws its transforms from, seed tuple (seed, i, a).
    whitening : array-like, shape (C, C), or None, default None
        S for ``directions``; None: identity.
    p : float, default 2.0, >= 0
        Cosine exponent for ``directions``.
    device : str, default "cpu"
        "cpu", "cuda" or "cuda:N".
    settings : Settings or None, default None
        Source of lr, transforms, precision, channels_last, redirect_relu, schedule and screen (its size, steps,
        attempts and p are replaced by the arguments above); None: ``Settings()``.
    on_step : callable (step, param) -> None, or None, default None
        Called after every step (progress bars, live previews).
    param : Parameterization or None, default None
        The images to optimise, n * attempts of them, ``size`` px; None: ``decorrelated(fft_image(seeds, size))``.

    Returns
    -------
    Result
        ``images`` (n, size, size, 3) float32 in [0, 1]; ``cosine`` (n,) cos(h, target) of the
        target term, for directions the raw cos(h, v) (NaN without one); ``objective`` (n,) final score;
        ``trace`` (steps, n * attempts); ``cosine_whitened`` (n,) cos(h, S v), what the optimiser aligns.
    """
    given = [x is not None for x in (directions, channel, neuron, objective)]
    if sum(given) != 1:
        raise AtlasError("give exactly one of directions, channel, neuron or objective")
    for name, value in (("size", size), ("steps", steps), ("attempts", attempts)):
        if int(value) < 1:
            raise AtlasError(f"{name} must be at least 1 (got {value})")
    if int(seed) < 0:
        raise AtlasError(f"seed must be >= 0 (got {seed})")
    base = settings or Settings()
    settings = Settings(size=size, steps=steps, attempts=attempts, lr=base.lr, p=p, transforms=base.transforms,
                        precision=base.precision, channels_last=base.channels_last, redirect_relu=base.redirect_relu,
                        schedule=base.schedule, screen=base.screen)
    if directions is not None:
        d = torch.as_tensor(np.asarray(directions), dtype=torch.float32)
        d = d[None] if d.dim() == 1 else d
        n = d.shape[0]
        s = None if whitening is None else torch.as_tensor(np.asarray(whitening), dtype=torch.float32)
        # repeat the raw rows, then build: the whitening product then sees the same matrix shape as a render batch
        goal: Objective = make_direction(layer, d.repeat_interleave(attempts, 0), s, p)
    elif objective is not None:
        if not isinstance(objective, Objective):
            raise AtlasError(f"objective must be an atlas.render.objectives.Objective (got {type(objective).__name__})")
        n = objective.batch or 1
        goal = objective.repeat_interleave(attempts)
    else:
        chosen = channel if channel is not None else neuron
        ids = torch.as_tensor(np.atleast_1d(np.asarray(chosen)))
        n = ids.numel()
        goal = (make_channel if channel is not None else make_neuron)(layer, ids.repeat_interleave(attempts, 0))
    seeds = [(seed, i, a) for i in range(n) for a in range(attempts)]
    return best_icons(net, layer, goal, seeds, settings, device, on_step, param)
