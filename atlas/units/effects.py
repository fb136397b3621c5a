"""The direct check of a unit's classes: how much the unit itself moves each logit on the images where it fires.

The card's class scores (:func:`atlas.units.class_scores`) are read from the run's stored attributions, which sum
over every channel at a sampled position: a unit that fires where the whole representation argues for "saltshaker"
inherits saltshaker, whatever the unit itself does. The direct measure isolates the unit: for unit c of a layer and
each top-k example image x of it (:mod:`atlas.units.topk`), the unit's whole activation map ``a_c(x)`` is the
tangent of one forward-mode Jacobian-vector product through the layers above, every other channel's tangent zero::

    effect[c, k] = mean over the unit's top examples x of  sum_p a_c(x)[p] * d logit_k(x) / d a_c(x)[p]

the first-order change of logit k were the unit switched off on that image (the gradient of the logit with respect
to the channel, times the activation), in logit units. Stored as ``units/{layer}/effects/value`` (C, K) float32 with
``done`` (C,) flags (resumable per channel) and ``source`` (C,) int64, the crc32 of the channel's top-k images a row
was computed from (a top-k pass that changed them redoes the row). The gallery shows the classes with the largest
effect and which of the attribution-based classes survive the check (:func:`check_classes`).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from tqdm.auto import tqdm

from atlas import store
from atlas.data import load_image, photo_reading
from atlas.errors import AtlasError
from atlas.models import Network, load_run_model

# An attribution-based class survives the direct check when the unit raises its logit (effect > 0) and the class is
# among the unit's SURVIVE_RANK largest effects (of 1,000 ImageNet classes: the top 5%).
SURVIVE_RANK = 50


def channel_effects(net: Network, images: torch.Tensor, layer: str, channel: int) -> torch.Tensor:
    """Per image, the first-order change of every logit from unit ``channel`` of ``layer`` (its whole map).

    Parameters
    ----------
    net : Network
        The model (``atlas.models.load_model``), in float32.
    images : torch.Tensor
        (B, 3, H, W) RGB in [0, 1], the run's preprocessing.
    layer : str
        A convolutional layer of ``net``.
    channel : int
        The unit, 0 to C - 1.

    Returns
    -------
    torch.Tensor
        (B, K) float32: ``sum_p a_c[p] * d logit_k / d a_c[p]`` for each image and class.
    """

    def edit(name: str, out: torch.Tensor):
        tangent = torch.zeros_like(out)
        tangent[:, channel] = out[:, channel]
        return fwAD.make_dual(out, tangent)

    with torch.no_grad(), fwAD.dual_level():
        with net.hooks([layer], edit=edit, stop=False):
            out = net.module(images.contiguous())
        return fwAD.unpack_dual(out).tangent.float()


def write_effects(run_dir: str | Path, layer: str, channels: Sequence[int] | None = None, *, net: Network | None = None,
                  device: str = "cpu", progress: bool = True) -> dict:
    """Compute and store the direct class effects of the units of ``layer`` (module docstring) from their top examples.

    Parameters
    ----------
    run_dir : str or Path
        The run folder, after the unit lens's top-k pass.
    layer : str
        The layer.
    channels : sequence of int or None, default None
        Only these channels (the array stays (C, K)); None: every channel whose top examples are done.
    net : Network or None, default None
        The run's model; None: loaded from the store's attributes.
    device : str, default "cpu"
        Where the model runs.
    progress : bool, default True
        A progress bar (only on a terminal).

    Returns
    -------
    dict
        Summary (also the group's ``summary`` attribute): ``channels`` (done, in all), ``computed`` (by this call),
        ``skipped_images`` (unreadable), ``seconds``.

    Raises
    ------
    AtlasError
        When the top-k pass has not run on ``layer``.
    """
    root = store.open_store(run_dir)
    tpath, epath = f"units/{layer}/top", f"units/{layer}/effects"
    if tpath not in root:
        raise AtlasError(f"no top examples for layer '{layer}' in this run; run `atlas units {run_dir} --layer {layer}` first")
    store.verify(root, [tpath, "images"])
    top = root[tpath]
    image_ids = top["image"][...].astype(np.int64)
    values = top["value"][...]
    top_done = top["done"][...] if "done" in top else np.isfinite(values[:, 0])
    n_channels = image_ids.shape[0]
    wanted = [c for c in (range(n_channels) if channels is None else sorted({int(c) for c in channels})) if top_done[c]]
    sources = np.array([zlib.crc32(image_ids[c].tobytes()) for c in range(n_channels)], np.int64)
    meta = store.attrs(root)
    if net is None:
        net = load_run_model(meta, device)
    n_classes = len(net.classes)
    fresh = not (epath in root and all(n in root[epath] for n in ("value", "done", "source"))
                 and root[epath]["value"].shape == (n_channels, n_classes))
    done = np.zeros(n_channels, bool) if fresh else root[epath]["done"][...] & (root[epath]["source"][...] == sources)
    todo = [c for c in wanted if not done[c]]
    prep = dict(meta.get("preprocessing") or {})
    resize, crop, interpolation = photo_reading(prep)  # the model's own resampling (bicubic for a ViT)
    paths = root["images/path"]
    ok = root["images/ok"][...] if "images/ok" in root else np.ones(paths.shape[0], bool)

    store.take_lock(run_dir)
    root = store.open_store(run_dir, mode="a")
    store.begin_stage(run_dir, "units", [epath])
    group = root.require_group(epath)
    if fresh:
        store.create_array(group, "value", (n_channels, n_classes), np.float32, chunks=(1, n_classes), fill_value=0.0, overwrite=True)
        store.create_array(group, "done", (n_channels,), bool, chunks=(n_channels,), fill_value=False, overwrite=True)
        store.create_array(group, "source", (n_channels,), np.int64, chunks=(n_channels,), fill_value=-1, overwrite=True)
    group.attrs.update({"method": "mean over the unit's top examples of sum_p a_c[p] * d logit_k / d a_c[p]", "layer": layer})
    started = time.perf_counter()
    cache: dict[int, torch.Tensor | None] = {}
    skipped: set[int] = set()
    device_t = torch.device(device)
    for c in tqdm(todo, desc=f"class effects {layer}", unit="unit", disable=None if progress else True, leave=False):
        batch = []
        for j in range(image_ids.shape[1]):
            i = int(image_ids[c, j])
            if i < 0 or not np.isfinite(values[c, j]) or values[c, j] <= 0:
                continue  # a pad, or an image where the unit does not fire
            if i not in cache:
                if len(cache) > 512:  # bounded: nearby channels often share their examples
                    cache.pop(next(iter(cache)))
                try:
                    picture = load_image(str(paths[i]), resize, crop, interpolation) if ok[i] else None
                except Exception:  # an unreadable file is skipped and counted, as everywhere else
                    picture = None
                cache[i] = None if picture is None else torch.from_numpy(np.asarray(picture, np.uint8).copy()).permute(2, 0, 1)
            if cache[i] is None:
                skipped.add(i)
                continue
            batch.append(cache[i])
        row = np.zeros(n_classes, np.float32)
        if batch:
            x = torch.stack(batch).to(device_t).float().div_(255.0)
            row = channel_effects(net, x, layer, c).mean(0).cpu().numpy().astype(np.float32)
        group["value"][c] = row
        source = group["source"][...]
        source[c] = sources[c]
        group["source"][...] = source
        flags = group["done"][...]
        flags[c] = True  # last: an interrupted write leaves the channel to redo
        group["done"][...] = flags
    seconds = time.perf_counter() - started
    summary = {"channels": int(group["done"][...].sum()), "computed": len(todo), "skipped_images": len(skipped),
               "seconds": round(seconds, 2)}
    group.attrs["summary"] = summary
    store.finish_stage(run_dir, "units", [epath])
    return summary


def check_classes(effect: np.ndarray, attribution_top: np.ndarray, top: int = 5,
                  survive_rank: int = SURVIVE_RANK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The direct effects' top classes and which attribution-based classes survive the check, for one unit.

    Parameters
    ----------
    effect : numpy.ndarray
        (K,) the unit's direct effect on every logit (``effects/value`` row).
    attribution_top : numpy.ndarray
        (T,) the unit's classes by activation-weighted attribution (``classes/top`` row; -1 pads).
    top : int, default 5
        Classes kept by direct effect (only those with a positive effect).
    survive_rank : int, default SURVIVE_RANK (50)
        An attribution-based class survives when its effect is positive and among the ``survive_rank`` largest.

    Returns
    -------
    (classes, values, survives) : (ndarray int, ndarray float, ndarray bool)
        The up to ``top`` classes with the largest positive effect and their effects; per entry of
        ``attribution_top``, whether it survives (False for pads).
    """
    order = np.argsort(-effect, kind="stable")
    classes = np.array([k for k in order[:top] if effect[k] > 0], np.int64)
    rank = np.empty(effect.size, np.int64)
    rank[order] = np.arange(effect.size)
    survives = np.array([0 <= k < effect.size and effect[k] > 0 and rank[k] < survive_rank for k in attribution_top.tolist()], bool)
    return classes, effect[classes].astype(np.float32), survives
