"""The optimisation loop shared by ``visualize`` (one-off directions, channels, neurons) and ``render``.

Many icons are optimised together: each has its own Fourier parameters, its own random
transforms (drawn from its own seed) and its own term of the summed loss, and Adam's
per-parameter step sizes keep them independent, so one batched forward/backward serves
them all. The forward stops at the layer being visualised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atlas.errors import AtlasError
from atlas.models import Network, StopForward, autocast_dtype
from atlas.render.objectives import Channel, Direction, Neuron
from atlas.render.param import FFTImage, init_spectra
from atlas.render.transforms import Transforms, apply, draw


@dataclass(frozen=True)
class Settings:
    """Everything that decides what an icon looks like (and so goes into its cache key), plus speed switches.

    ``precision``: "auto" runs the network in bf16 on CPUs with native bf16
    (AVX512-BF16/AMX) and on CUDA, else float32; "bf16" or "fp32" force it.
    ``channels_last``: NHWC convolutions (faster with oneDNN on CPU).
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

    def key_dict(self) -> dict:
        """The settings that change the pixels (speed switches excluded except precision)."""
        return {"size": self.size, "steps": self.steps, "attempts": self.attempts, "lr": self.lr, "p": self.p,
                "transforms": self.transforms.as_dict(), "precision": self.precision,
                "redirect_relu": self.redirect_relu}


@dataclass
class Result:
    """Icons (n, P, P, 3) float32 in [0, 1], final objective and cos(h, v) per icon, and the loss trace."""

    images: np.ndarray
    cosine: np.ndarray
    objective: np.ndarray
    trace: np.ndarray  # (steps, n) objective under the random transforms, per step


def layer_output(net: Network, layer: str, images: torch.Tensor) -> torch.Tensor:
    """Activations of one layer, computing nothing past it."""
    with net.hooks([layer]) as captured:
        try:
            net.module(images)
        except StopForward:
            pass
    out = captured[layer]
    if not isinstance(out, torch.Tensor):
        raise AtlasError(f"layer '{layer}' does not output a single tensor; pick another layer")
    return out


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

    Row i of ``objective`` belongs to image i, which starts from, and draws its
    transforms from, its own seed tuple ``seeds[i]``.
    """

    def __init__(self, net: Network, layer: str, objective: Direction, seeds: Sequence[tuple[int, ...]], settings: Settings,
                 device: torch.device | str = "cpu"):
        self.net, self.layer, self.settings = net, layer, settings
        self.device = torch.device(device)
        self.objective = objective.to(self.device)
        n, size, t = len(seeds), settings.size, settings.transforms
        self.dtype = autocast_dtype(settings.precision, self.device)  # the network's precision; None: float32
        self.fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.param = FFTImage(n, size, init=init_spectra(list(seeds), size)).to(self.device)
        self.optimizer = torch.optim.Adam(self.param.parameters(), lr=settings.lr)
        draws = torch.from_numpy(np.stack([draw(t, settings.steps, np.random.default_rng(list(s))) for s in seeds], 1))
        self.draws = draws if t.per_sample else draws[:, :1].expand(-1, n, -1)
        self.out_size = t.out_size(size)
        self.trace = np.empty((settings.steps, n), dtype=np.float32)
        self.done = 0

    @contextlib.contextmanager
    def _model(self, dtype: torch.dtype | None = None):
        redirect = redirected_relus(self.net.module_of(self.layer)) if self.settings.redirect_relu else contextlib.nullcontext()
        with prepared(self.net, self.device, self.settings.channels_last, dtype), redirect:
            yield

    def step(self, k: int | None = None, on_step: Callable[[int, FFTImage], None] | None = None) -> None:
        """Run ``k`` more steps (default: all that remain)."""
        t = self.settings.transforms
        last = self.settings.steps if k is None else min(self.settings.steps, self.done + k)
        with self._model(self.dtype):
            for step in range(self.done, last):
                self.optimizer.zero_grad(set_to_none=True)
                view = apply(self.param(), self.draws[step], self.out_size, t.zoom, t.fill)
                view = view.to(self.dtype or view.dtype).contiguous(memory_format=self.fmt)
                acts = layer_output(self.net, self.layer, view)
                values = self.objective(acts.float())
                (-values.sum()).backward()
                self.optimizer.step()
                self.trace[step] = values.detach().cpu().numpy()
                self.done = step + 1
                if on_step is not None:
                    on_step(step, self.param)

    def measure(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, objective, cos(h, v)) of the current icons: ``size`` px, no padding or transforms, float32."""
        with torch.no_grad(), self._model():
            images = self.param()
            acts = layer_output(self.net, self.layer, images.contiguous(memory_format=self.fmt)).float()
            return images, self.objective(acts), self.objective.cosine(acts)

    def result(self) -> Result:
        images, final, cosine = self.measure()
        return Result(images.permute(0, 2, 3, 1).cpu().numpy(), cosine.cpu().numpy(), final.cpu().numpy(), self.trace[: self.done])


def optimize(net: Network, layer: str, objective: Direction, seeds: Sequence[tuple[int, ...]], settings: Settings,
             device: torch.device | str = "cpu", on_step: Callable[[int, FFTImage], None] | None = None) -> Result:
    """Optimise one image per seed tuple for ``settings.steps`` steps; see :class:`Optimization`.

    ``on_step(step, param)`` is called after every step (progress bars). The returned
    cosine and objective are measured on the finished icons themselves.
    """
    run = Optimization(net, layer, objective, seeds, settings, device)
    run.step(on_step=on_step)
    return run.result()


def best_of(result: Result, attempts: int) -> Result:
    """Keep, for every icon, the attempt with the highest final objective (rows are icon-major)."""
    if attempts == 1:
        return result
    n = result.images.shape[0] // attempts
    pick = result.objective.reshape(n, attempts).argmax(1) + np.arange(n) * attempts
    return Result(result.images[pick], result.cosine[pick], result.objective[pick], result.trace[:, pick])


def visualize(net: Network, layer: str, directions: torch.Tensor | np.ndarray | None = None, *,
              channel: int | Sequence[int] | None = None, neuron: int | Sequence[int] | None = None,
              size: int = 80, steps: int = 256, attempts: int = 1, seed: int = 0,
              whitening: torch.Tensor | np.ndarray | None = None, p: float = 2.0, device: str = "cpu",
              settings: Settings | None = None, on_step: Callable[[int, FFTImage], None] | None = None) -> Result:
    """Feature visualisations of ``layer``: one icon per direction (rows of (n, C)), channel or neuron.

    Directions use dot(h, S v) * cos(h, S v)^p at the centre position (S = ``whitening``);
    a channel maximises its mean over all positions, a neuron its centre value. With
    ``attempts`` > 1 each icon keeps the best of that many seeds. Returns images
    (n, size, size, 3) in [0, 1], cos(h, target) and the final objective per icon.
    """
    given = [x is not None for x in (directions, channel, neuron)]
    if sum(given) != 1:
        raise AtlasError("give exactly one of directions, channel or neuron")
    base = settings or Settings()
    settings = Settings(size=size, steps=steps, attempts=attempts, lr=base.lr, p=p, transforms=base.transforms,
                        precision=base.precision, channels_last=base.channels_last, redirect_relu=base.redirect_relu)
    if directions is not None:
        d = torch.as_tensor(np.asarray(directions), dtype=torch.float32)
        d = d[None] if d.dim() == 1 else d
        n = d.shape[0]
        s = None if whitening is None else torch.as_tensor(np.asarray(whitening), dtype=torch.float32)
        objective: Direction = Direction(d.repeat_interleave(attempts, 0), s, p)
    else:
        chosen = channel if channel is not None else neuron
        ids = torch.as_tensor(np.atleast_1d(np.asarray(chosen)), dtype=torch.long)
        n = ids.numel()
        n_channels = layer_output(net, layer, torch.zeros(1, 3, size, size, device=device)).shape[1]
        kind = Channel if channel is not None else Neuron
        objective = kind(ids.repeat_interleave(attempts, 0), n_channels)
    seeds = [(seed, i, a) for i in range(n) for a in range(attempts)]
    return best_of(optimize(net, layer, objective, seeds, settings, device, on_step), attempts)
