"""Feature visualisation per unit: what image makes one channel of a layer fire (the unit lens, part 3).

:func:`unit_images` is the pure core: for each channel, ``n`` images optimised through the
shared render loop (:class:`atlas.render.optimize.Optimization`) with one of the kinds

- ``fft``: the project's FFT + decorrelated-colour parameterisation with Adam and random
  transforms (the atlas renderer's recipe);
- ``pixel``: plain pixel-space gradient ascent, no regulariser (the baseline the paper improves on);
- ``yosinski-1`` .. ``yosinski-4``: pixel-space ascent with Yosinski et al.'s (2015) regularisers,
  the four combinations of its Table 1 (:mod:`atlas.render.regularizers`);
- ``alpha``: a transparent (RGBA) image, composited over a new random background every step, the
  objective multiplied by (1 - mean alpha) so the unit must earn opacity (Lucid's recipe);
- ``diverse``: ``n`` images per channel pushed apart by Lucid's Gram-matrix diversity term.

:func:`write_visualizations` stores them in a run: ``units/{layer}/vis/{kind}/{image,objective,done}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from atlas import store
from atlas.errors import AtlasError
from atlas.models import Network
from atlas.render import objectives as obj
from atlas.render.optimize import Optimization, Settings, layer_output
from atlas.render.param import IMAGENET_MEAN, alpha_image, default_param, pixel_image
from atlas.render.regularizers import YOSINSKI_PRESETS, preset
from atlas.render.transforms import Transforms

KINDS = ("fft", "pixel", *YOSINSKI_PRESETS, "alpha", "diverse")
OBJECTIVES = ("channel", "neuron")
DIVERSITY_WEIGHT = 100.0  # Lucid's usual weight (its tests and examples: channel(...) - 100 * diversity(...))
PIXEL_KINDS = ("pixel", *YOSINSKI_PRESETS)
# No transforms: Yosinski et al. optimise the image as it is (grid_sample at scale 1, no shift, is the identity).
NO_TRANSFORMS = Transforms(pad=0, jitter=0, scales=(1.0,), angles=(0.0,), per_sample=False)


def input_mean(net: Network) -> tuple[float, float, float]:
    """The model's RGB input mean in [0, 1] (the origin of Yosinski et al.'s mean-subtracted pixel space).

    Read from the network's ``preprocess`` module (Caffe-style: BGR mean on the 0-255 scale;
    torchvision: RGB mean at scale 1); ImageNet's mean when the model has none.
    """
    pre = getattr(net.module, "preprocess", None)
    mean = getattr(pre, "mean", None)
    if mean is None:
        return IMAGENET_MEAN
    m = [float(v) for v in mean.flatten().tolist()]
    if getattr(pre, "bgr", False):
        m = m[::-1]
    scale = float(getattr(pre, "scale", 1.0) or 1.0)
    return tuple(v / scale for v in m)  # type: ignore[return-value]


def mean_alpha(param) -> obj.Objective:
    """Per-image mean opacity of an :class:`~atlas.render.param.AlphaImage`'s last call (for the alpha penalty)."""
    return obj.Objective(lambda state: param.last_alpha.flatten(1).mean(1), "mean_alpha()")


def grouped_diversity(group: int, layer: str | None = None, gate: obj.Objective | None = None) -> obj.Objective:
    """Lucid's diversity (:func:`atlas.render.objectives.diversity`) within consecutive groups of ``group`` images.

    A batch holding several channels' sets (channel 0's n images, then channel 1's, ...)
    must push apart only the images of one set; for a batch of one group and no gate this is
    exactly ``objectives.diversity(layer)`` (tests/test_units_features.py checks it).

    ``gate``: an image joins its set's diversity only while ``gate`` (the unit objective) is
    positive for it. A set member whose unit is dead everywhere would otherwise still get the
    diversity's gradient, and the redirected ReLU (which rescues dead units only when a sample's
    gradient is entirely zero) would never wake it: measured, 2 of 3 images of mixed4c:300 stayed
    at exactly 0 for 128 steps. Its score is 0 until it fires.
    """

    def score(state: obj.State) -> torch.Tensor:
        acts = state.activations(layer)
        n = acts.shape[0]
        out = acts.new_zeros(n, dtype=torch.float32)
        if group < 2:
            return out
        alive = torch.ones(n, dtype=torch.bool, device=acts.device) if gate is None else gate.fn(state).detach() > 0
        for start in range(0, n, group):
            members = torch.arange(start, min(start + group, n), device=acts.device)[alive[start:start + group]]
            k = int(members.numel())
            if k < 2:
                continue
            cos = obj.gram_cosines(acts[members])
            out = out.index_put((members,), -(cos.sum(1) - cos.diagonal()) / (k - 1))
        return out

    return obj.Objective(score, f"grouped_diversity({layer or ''}, {group})", layers=[layer])


def _unit_objective(kind: str, layer: str, ids: torch.Tensor) -> obj.Objective:
    return (obj.channel if kind == "channel" else obj.neuron)(layer, ids)


def _score(net: Network, layer: str, images: torch.Tensor, ids: torch.Tensor, objective: str, device: torch.device) -> np.ndarray:
    """The unit's objective (channel mean or centre neuron) on finished images, float32, no transforms."""
    with torch.no_grad():
        acts = layer_output(net, layer, images.to(device).float())
        return _unit_objective(objective, layer, ids.to(device))(acts).float().cpu().numpy()


def _check(kind: str, objective: str, n: int, size: int, steps: int | None) -> None:
    if kind not in KINDS:
        raise AtlasError(f"unknown visualisation kind '{kind}'; known: {', '.join(KINDS)}")
    if objective not in OBJECTIVES:
        raise AtlasError(f"unknown unit objective '{objective}'; known: {', '.join(OBJECTIVES)}")
    if n < 1 or (kind == "diverse" and n < 2):
        raise AtlasError(f"n must be at least {2 if kind == 'diverse' else 1} for kind '{kind}' (got {n})")
    if size < 16:
        raise AtlasError(f"size must be at least 16 px (got {size})")
    if steps is not None and steps < 1:
        raise AtlasError(f"steps must be at least 1 (got {steps})")


def unit_images(net: Network, layer: str, channels: Sequence[int], kind: str, n: int = 1, size: int = 80, steps: int | None = None,
                seed: int = 0, device: str = "cpu", objective: str = "channel", diversity_weight: float = DIVERSITY_WEIGHT,
                on_step: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` visualisations of each of ``channels`` of ``layer``, optimised together in one batch.

    Parameters
    ----------
    net : atlas.models.Network
        The model.
    layer : str
        A layer with spatial positions, e.g. ``"mixed4c"``.
    channels : sequence of int
        Channels of ``layer``; the batch holds ``len(channels) * n`` images.
    kind : {"fft", "pixel", "yosinski-1", "yosinski-2", "yosinski-3", "yosinski-4", "alpha", "diverse"}
        How the image is parameterised and regularised (see the module docstring).
    n : int, default 1
        Images per channel (independent seeds; for "diverse" the set pushed apart, at least 2).
    size : int, default 80, >= 16
        Image side in pixels.
    steps : int or None, default None
        Optimisation steps; None: the kind's own (256 for fft, alpha and diverse; the toolbox's
        iterations for the pixel kinds: 500, 750, 1000, 1000, and 1000 for plain pixel).
    seed : int, default 0
        Image j of channel c starts from seed tuple (seed, c, j): it does not depend on the batch.
    device : str, default "cpu"
        Torch device.
    objective : {"channel", "neuron"}, default "channel"
        The unit: the channel's mean over positions, or its activation at the centre position.
    diversity_weight : float, default 100
        Weight of the diversity term (in [-1, 0] per image) against the unit objective, for "diverse".
    on_step : callable (step) -> None, or None
        Called after every step (progress bars).

    Returns
    -------
    (images, objective) : (ndarray (len(channels), n, size, size, 3 or 4) float32 in [0, 1], ndarray (len(channels), n) float32)
        RGB images (RGBA for "alpha"); the unit's objective measured on each finished image, without
        transforms (for "alpha" on the composite over grey, 0.5).
    """
    steps_given = steps
    _check(kind, objective, n, size, steps_given)
    chans = [int(c) for c in channels]
    if not chans:
        raise AtlasError("give at least one channel")
    device_t = torch.device(device)
    seeds = [(int(seed), c, j) for c in chans for j in range(n)]
    ids = torch.tensor(chans, dtype=torch.long).repeat_interleave(n)
    unit = _unit_objective(objective, layer, ids)
    base = Settings()
    hook = None
    if kind in PIXEL_KINDS:
        p = preset(kind)
        steps = steps_given or p.steps
        settings = Settings(size=size, steps=steps, lr=base.lr, transforms=NO_TRANSFORMS, redirect_relu=base.redirect_relu)
        param = pixel_image(seeds, size, mean=input_mean(net))
        goal = unit
        hook = p.regularization()
    else:
        steps = steps_given or base.steps
        settings = Settings(size=size, steps=steps)
        if kind == "alpha":
            param = alpha_image(seeds, size)
            goal = unit * (1.0 - mean_alpha(param))
        else:
            param = default_param(seeds, size)
            goal = unit
            if kind == "diverse":
                goal = unit + diversity_weight * grouped_diversity(n, layer, gate=unit)
    run = Optimization(net, layer, goal, seeds, settings, device_t, param)
    if kind in PIXEL_KINDS:
        run.optimizer = p.optimizer(run.param.parameters())  # the paper's plain gradient ascent instead of Adam

    def after(step: int, prm) -> None:
        if hook is not None:
            hook(step, prm)
        if on_step is not None:
            on_step(step)

    run.step(on_step=after)
    param = run.param
    param.eval()  # the alpha composite over grey from here on
    with torch.no_grad():
        shown = param().detach()
        images = param.rgba().detach() if kind == "alpha" else shown
    scores = _score(net, layer, shown, ids, objective, device_t)
    out = images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    return out.reshape(len(chans), n, size, size, out.shape[-1]), scores.reshape(len(chans), n)


def _open_kind(node, kind: str, c: int, n: int, size: int, settings: dict):
    """``vis/{kind}`` with its arrays, kept when made with the same settings (resume), else made afresh."""
    depth = 4 if kind == "alpha" else 3
    key = json.dumps(settings, sort_keys=True)
    if kind in node:
        g = node[kind]
        same = g.attrs.get("settings") == key and all(name in g for name in ("image", "objective", "done"))
        if same and g["image"].shape == (c, n, size, size, depth) and g["done"].shape == (c,):
            return g
        del node[kind]
    g = node.create_group(kind)
    store.create_array(g, "image", (c, n, size, size, depth), np.uint8, chunks=(1, n, size, size, depth))
    store.create_array(g, "objective", (c, n), np.float32, chunks=(1, n), fill_value=np.nan)
    store.create_array(g, "done", (c,), bool, chunks=(1,), fill_value=False)
    g.attrs.update({"settings": key, "kind": kind})
    return g


@store.writer
def write_visualizations(run_dir: str | Path, layer: str, kinds: Sequence[str] = ("fft", *YOSINSKI_PRESETS, "alpha", "diverse"),
                         channels: Sequence[int] | None = None, n_diverse: int = 4, size: int = 80, steps: int | None = 256,
                         seed: int = 0, batch: int = 16, device: str = "cpu", progress: bool = True, net: Network | None = None,
                         objective: str = "channel") -> dict:
    """Feature visualisations of ``layer``'s channels, stored as ``units/{layer}/vis/{kind}/{image,objective,done}``.

    ``image`` (C, n, S, S, 3) uint8 (RGBA, 4, for "alpha"; n = ``n_diverse`` for "diverse", else 1),
    ``objective`` (C, n) float32 (the unit's objective on the finished image; NaN where not computed),
    ``done`` (C,) bool; attrs ``settings`` (JSON) and ``kind``. Resumable: channels whose ``done``
    is set are skipped (a rerun with other settings recomputes the kind). Each batch of ``batch``
    channels is written, then flagged done, so a kill loses at most the batch in flight.

    Parameters
    ----------
    run_dir : str or Path
        A sampled run (its store names the model and weights).
    layer : str
        A layer with spatial positions.
    kinds : sequence of str
        Any of :data:`KINDS`.
    channels : sequence of int or None, default None
        Channels to compute (the arrays are always full size); None: all.
    n_diverse : int, default 4, >= 2
        Images per channel for "diverse".
    size : int, default 80
        Image side in pixels.
    steps : int or None, default 256
        Steps per image; None: each kind's own (see :func:`unit_images`).
    seed : int, default 0
        Base seed (image j of channel c starts from (seed, c, j)).
    batch : int, default 16, >= 1
        Channels optimised together.
    device : str, default "cpu"
        Torch device.
    progress : bool, default True
        A progress bar per kind.
    net : Network or None
        The run's model, loaded; None: from the store.
    objective : {"channel", "neuron"}, default "channel"
        The unit objective.

    Returns
    -------
    dict
        ``{kind: {"computed": channels computed now, "skipped": already done, "seconds": ...}}``.
    """
    import time

    from atlas.models import load_run_model
    from atlas.units.receptive import check_unit_layers

    kinds = list(dict.fromkeys(kinds))
    for kind in kinds:
        _check(kind, objective, n_diverse if kind == "diverse" else 1, size, steps)
    if n_diverse < 2:
        raise AtlasError(f"n_diverse must be at least 2 (got {n_diverse})")
    if batch < 1:
        raise AtlasError(f"batch must be at least 1 (got {batch})")
    root = store.open_for_update(run_dir)
    meta = store.attrs(root)
    net = net if net is not None else load_run_model(meta, device)
    crop = int((meta.get("preprocessing") or {}).get("crop", 224))
    c = check_unit_layers(net, [layer], crop)[layer][0]
    chosen = list(range(c)) if channels is None else sorted({int(ch) for ch in channels})
    bad = [ch for ch in chosen if not 0 <= ch < c]
    if bad:
        raise AtlasError(f"channel {bad[0]} is out of range: layer '{layer}' has {c} channels (0-{c - 1})")
    report: dict = {}
    for kind in kinds:
        n = n_diverse if kind == "diverse" else 1
        path = f"units/{layer}/vis/{kind}"
        settings = {"kind": kind, "n": n, "size": size, "steps": steps, "seed": seed, "objective": objective,
                    "diversity_weight": DIVERSITY_WEIGHT if kind == "diverse" else None,
                    "preset": preset(kind).as_dict() if kind in PIXEL_KINDS else None}
        store.begin_stage(run_dir, "units", [path])
        node = root.require_group("units").require_group(layer).require_group("vis")
        g = _open_kind(node, kind, c, n, size, settings)
        done = g["done"][:]
        todo = [ch for ch in chosen if not done[ch]]
        start = time.perf_counter()
        bar = tqdm(total=len(todo), unit="unit", desc=f"units {layer} {kind}", disable=not progress, leave=False)
        for lo in range(0, len(todo), batch):
            part = todo[lo:lo + batch]
            images, scores = unit_images(net, layer, part, kind, n=n, size=size, steps=steps, seed=seed, device=device,
                                         objective=objective)
            pixels = np.rint(images * 255).clip(0, 255).astype(np.uint8)
            for i, ch in enumerate(part):
                g["image"][ch] = pixels[i]
                g["objective"][ch] = scores[i]
            for ch in part:  # flags last: a kill before them redoes the batch, never leaves a flagged hole
                g["done"][ch] = True
            bar.update(len(part))
        bar.close()
        store.finish_stage(run_dir, "units", [path])
        report[kind] = {"computed": len(todo), "skipped": len(chosen) - len(todo), "seconds": round(time.perf_counter() - start, 1)}
    return report
