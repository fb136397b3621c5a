"""Top-k dataset examples per unit (Zeiler & Fergus 2014): one streamed pass over a run's images.

For every channel of the requested layers, the k images whose maximum activation over positions is highest, with
that position, its receptive-field box (:mod:`atlas.units.receptive`) and the box's pixels as a patch.

The pass reads the run's image list and decoding settings (model, weights, resize, crop, precision) from its store,
as ``atlas sample`` wrote them, and goes in the sampler's shards: each shard's top-k per channel is written (one chunk
per shard), then the shard's flag. The top-k of all images is the top-k of the shards' top-ks, so a killed pass
loses at most the shard in flight, and a rerun computes only the shards not flagged, then merges them all.

Ties are broken the same way everywhere, so the result does not depend on batch size, shard size or which
shards were resumed: a higher value first, then the lower image index, then the lower (y, x).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from atlas import store
from atlas.data import ImageDataset, ImageList, device_batch, image_loader, load_image, photo_reading, real_path
from atlas.engine import Engine, make_engine
from atlas.errors import AtlasError
from atlas.models import Network, load_run_model
from atlas.models.inference import run_activations, run_kernels
from atlas.settings import check_device, parse_channels
from atlas.units.receptive import receptive_field

GREY = 127
PATCH = 64
# Before the pass, up to this many of the first images are tried: none readable means the photos are not there.
PROBE = 8
# As the sampler: the pass stops, keeping what is done, when no image tried could be read, or fewer than
# MIN_READABLE of them once MIN_TRIED were tried.
MIN_READABLE = 0.5
MIN_TRIED = 64
_BIG = np.iinfo(np.int64).max


class Top(NamedTuple):
    """A running top-k per channel: ``value`` (C, k) float32 descending, ``image`` (C, k) int64, ``pos`` (C, k, 2) int32
    (y, x at the layer); unused slots hold value -inf, image -1, pos -1."""

    value: np.ndarray
    image: np.ndarray
    pos: np.ndarray


def empty_top(channels: int, k: int) -> Top:
    """A top-k holding nothing yet."""
    return Top(np.full((channels, k), -np.inf, np.float32), np.full((channels, k), -1, np.int64), np.full((channels, k, 2), -1, np.int32))


def max_positions(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's maximum activation per channel and where it is: ``acts`` (B, C, H, W) -> values (B, C) and
    pos (B, C, 2) int32 (y, x); among equal maxima the first in row-major order (lowest y, then x)."""
    b, c, h, w = acts.shape
    flat = acts.reshape(b, c, h * w)
    index = flat.argmax(dim=2)  # the first maximal index
    values = flat.gather(2, index.unsqueeze(2)).squeeze(2)
    pos = torch.stack([index // w, index % w], dim=2).to(torch.int32)
    return values, pos


def batch_top(values: np.ndarray, pos: np.ndarray, images: np.ndarray, k: int) -> Top:
    """The top-k of one batch: ``values`` (B, C), ``pos`` (B, C, 2), ``images`` (B,) image indices."""
    b, c = values.shape
    value = np.ascontiguousarray(values.T, dtype=np.float32)  # (C, B)
    image = np.broadcast_to(np.asarray(images, np.int64)[None, :], (c, b)).copy()
    position = np.ascontiguousarray(pos.transpose(1, 0, 2), dtype=np.int32)
    return merge_topk(Top(value, image, position), empty_top(c, 0), k)


def merge_topk(a: Top, b: Top, k: int) -> Top:
    """The top-k per channel of two top-ks (of disjoint images): higher value first, then lower image index, then
    lower (y, x); padded with -inf / -1 when they hold fewer than k. Associative and commutative, so shards merge in
    any order to the same result."""
    value = np.concatenate([a.value, b.value], axis=1).astype(np.float32)
    image = np.concatenate([a.image, b.image], axis=1).astype(np.int64)
    pos = np.concatenate([a.pos, b.pos], axis=1).astype(np.int32)
    empty = (image < 0) | np.isnan(value)
    value = np.where(empty, -np.inf, value)
    key_image = np.where(empty, _BIG, image)
    # lexsort: the last key is the primary one.
    order = np.lexsort((pos[..., 1], pos[..., 0], key_image, empty, -value.astype(np.float64)), axis=-1)[:, :k]
    value = np.take_along_axis(value, order, 1)
    image = np.take_along_axis(np.where(empty, -1, image), order, 1)
    pos = np.take_along_axis(np.where(empty[..., None], -1, pos), order[..., None], 1)
    c, n = value.shape
    if n < k:  # fewer candidates than k: pad
        pad = empty_top(c, k - n)
        value, image, pos = (np.concatenate([x, p], axis=1) for x, p in zip((value, image, pos), pad, strict=True))
    return Top(value.astype(np.float32), image.astype(np.int64), pos.astype(np.int32))


def fit_patch(image: Image.Image, box: Sequence[int], patch: int = PATCH) -> np.ndarray:
    """(patch, patch, 3) uint8: the box (top, left, bottom, right) of ``image`` scaled to fit, aspect kept, centred on grey."""
    top, left, bottom, right = (int(v) for v in box)
    out = Image.new("RGB", (patch, patch), (GREY, GREY, GREY))
    h, w = bottom - top, right - left
    if h <= 0 or w <= 0:
        return np.asarray(out, dtype=np.uint8)
    scale = patch / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    piece = image.crop((left, top, right, bottom))
    if piece.size != size:
        piece = piece.resize(size, Image.LANCZOS)
    out.paste(piece, ((patch - size[0]) // 2, (patch - size[1]) // 2))
    return np.asarray(out, dtype=np.uint8)


def _channels(channels, n: int, layer: str) -> list[int]:
    if channels is None or isinstance(channels, str):
        return parse_channels(channels, n, layer)
    chosen = sorted({int(c) for c in channels})
    bad = [c for c in chosen if c < 0 or c >= n]
    if bad:
        raise AtlasError(f"channel {bad[0]} is out of range of layer '{layer}': it has {n} channels (0-{n - 1})")
    if not chosen:
        raise AtlasError(f"no channels chosen for layer '{layer}'")
    return chosen


def _ranges(channels: Sequence[int]) -> str:
    """Sorted channels as ranges, e.g. "0-63,100" (the channel set the shard state belongs to)."""
    parts: list[str] = []
    run: list[int] = []
    for c in channels:
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def _check_photos(paths: Sequence[str], ok: np.ndarray, resize: int, crop: int) -> None:
    """A store copied without its photos is one line naming the missing folder, before the pass."""
    if not len(paths):
        raise AtlasError("the run's image list is empty; run `atlas sample` on some images first")
    first = Path(real_path(str(paths[0])))
    if not first.parent.is_dir():
        raise AtlasError(f"the run's photos are missing: folder {first.parent} does not exist (was the run copied without its photos?)")
    tried = [i for i in range(len(paths)) if ok[i]][:PROBE] or list(range(min(PROBE, len(paths))))
    for i in tried:
        try:
            load_image(str(paths[i]), resize, crop)
            return
        except (OSError, ValueError, SyntaxError):
            continue
    folder = Path(real_path(str(paths[tried[0]]))).parent
    raise AtlasError(f"the run's photos cannot be read: none of the first {len(tried)} images in {folder} opens (missing or moved?)")


def _key(meta: dict, k: int, patch: int) -> dict:
    """What the stored top-k depends on: a stored one with another key is recomputed, never mixed in."""
    prep = meta.get("preprocessing") or {}
    return {"k": k, "patch": patch, "model": meta.get("model"), "weights_sha256": meta.get("weights_sha256", ""),
            "image_list_hash": meta.get("image_list_hash"), "n_images": meta.get("n_images"), "resize": prep.get("resize", 256),
            "crop": prep.get("crop", 224), "precision": meta.get("precision", "float32"), "shard_size": meta.get("shard_size")} | (
                {"forward": meta["forward"]} if meta.get("forward") else {})


def _complete(root, layer: str, key: dict, chosen: list[int]) -> bool:
    """The stored top-k of ``layer`` has every chosen channel, computed with these settings."""
    group = root.get(f"units/{layer}/top")
    if group is None or dict(group.attrs).get("key") != key or "done" not in group:
        return False
    return bool(store.read_flags(group["done"])[chosen].all())


class _Layer:
    """One layer's store group and pass state."""

    def __init__(self, root, run: Path, layer: str, shape: tuple[int, int, int], chosen: list[int], key: dict, n_shards: int,
                 field, crop: int):
        self.name, self.chosen = layer, chosen
        c, h, w = shape
        self.c, self.hw, self.field = c, (h, w), field
        k, patch = key["k"], key["patch"]
        path = f"units/{layer}/top"
        group = root.get(path)
        if group is not None and dict(group.attrs).get("key") != key:
            del root[path]  # computed with other settings or from other images: recomputed, not mixed in
            group = None
        if group is None:
            group = root.require_group(path)
            store.create_array(group, "value", (c, k), np.float32, chunks=(c, k), fill_value=float("-inf"))
            store.create_array(group, "image", (c, k), np.int64, chunks=(c, k), fill_value=-1)
            store.create_array(group, "pos", (c, k, 2), np.int32, chunks=(c, k, 2), fill_value=-1)
            store.create_array(group, "box", (c, k, 4), np.int32, chunks=(c, k, 4), fill_value=-1)
            store.create_array(group, "patch", (c, k, patch, patch, 3), np.uint8, chunks=(min(c, 16), k, patch, patch, 3), fill_value=GREY)
            store.create_array(group, "done", (c,), bool, chunks=(c,), fill_value=False)
            group.attrs.update({"key": key, "k": k, "channels": c, "hw": [h, w], "field": field.as_dict(), "crop": crop,
                                "n_images": key["n_images"], "summary": {}})
        self.group = group
        done = store.read_flags(group["done"])
        self.todo = [ch for ch in chosen if not done[ch]]
        # The shard state belongs to one set of channels: another set starts it afresh.
        shards = group.get("shards")
        if self.todo and (shards is None or dict(group.attrs).get("shard_channels") != _ranges(self.todo)):
            if shards is not None:
                del group["shards"]
            if "shard_done" in group:
                del group["shard_done"]
            shards = group.require_group("shards")
            store.create_array(shards, "value", (n_shards, c, k), np.float32, chunks=(1, c, k), fill_value=float("-inf"))
            store.create_array(shards, "image", (n_shards, c, k), np.int64, chunks=(1, c, k), fill_value=-1)
            store.create_array(shards, "pos", (n_shards, c, k, 2), np.int32, chunks=(1, c, k, 2), fill_value=-1)
            store.create_array(group, "shard_done", (n_shards,), bool, chunks=(1,), fill_value=False)
            group.attrs["shard_channels"] = _ranges(self.todo)
        self.shard_done = store.read_flags(group["shard_done"]) if self.todo else np.ones(n_shards, bool)
        self.index = torch.tensor(self.todo, dtype=torch.long)

    def write_shard(self, shard: int, top: Top) -> None:
        full = empty_top(self.c, top.value.shape[1])
        full.value[self.todo], full.image[self.todo], full.pos[self.todo] = top
        shards = self.group["shards"]
        shards["value"][shard] = full.value
        shards["image"][shard] = full.image
        shards["pos"][shard] = full.pos
        self.group["shard_done"][shard] = True  # only after the shard's rows: a kill before it redoes the shard

    def merged(self, k: int) -> Top:
        shards = self.group["shards"]
        top = empty_top(len(self.todo), k)
        for shard in range(shards["value"].shape[0]):
            part = Top(shards["value"][shard][self.todo], shards["image"][shard][self.todo], shards["pos"][shard][self.todo])
            top = merge_topk(top, part, k)
        return top


def shard_tops(net: Network, images: ImageList, resize: int, crop: int, k: int, batch_size: int, workers: int, device: str,
               arithmetic: tuple[str, str], wanted: list[int], layer_todo: list[tuple[str, list[int]]], advance=None,
               interpolation: str = "bilinear") -> tuple[dict[str, Top], list[tuple[int, str]], int, int]:
    """One shard's top-k per (layer, channels to rank): arrays in memory, nothing written (the same here and on a Ray
    worker). ``arithmetic`` is the run's ``(precision, forward)`` (:func:`atlas.models.inference.run_kernels`): the maxima
    are the activations the sampler computes for the same photo and position. Returns (tops by layer, [(image index,
    error)] of unreadable images, images tried, images read). ``interpolation`` is the run's resampling of the resize
    (a wrapped model's own, e.g. bicubic for a ViT), so the photos are the pixels the sampler read."""
    tops = {name: empty_top(len(todo), k) for name, todo in layer_todo}
    errors: list[tuple[int, str]] = []
    tried = readable = 0
    if not wanted:
        return tops, errors, tried, readable
    dataset = ImageDataset(images, resize, crop, wanted, uint8=True, interpolation=interpolation)
    loader = image_loader(dataset, batch_size, workers, device)
    names = [name for name, _ in layer_todo]
    picks: dict[str, torch.Tensor] = {}  # per layer, the channels to rank when not all of them (made once, not per batch)
    for batch_index, batch, batch_errors in loader:
        good = np.array([not e for e in batch_errors])
        errors += [(index, error) for index, error in zip(batch_index.tolist(), batch_errors, strict=True) if error]
        if good.any():
            x = device_batch(batch, good, device)
            idx = batch_index.numpy()[good]
            out = run_activations(net, x, names, *arithmetic)  # the sampler's function: its kernels, chunks and precision
            for name, todo in layer_todo:
                act = out[name]
                if len(todo) < act.shape[1]:
                    if name not in picks:
                        picks[name] = torch.tensor(todo, dtype=torch.long, device=act.device)
                    act = act[:, picks[name]]
                values, pos = max_positions(act.float())
                top = batch_top(values.cpu().numpy(), pos.cpu().numpy(), idx, k)
                tops[name] = merge_topk(tops[name], top, k)
        tried, readable = tried + len(batch_errors), readable + int(good.sum())
        if advance is not None:
            advance(len(batch_index))
    return tops, errors, tried, readable


def topk_worker(meta: dict, paths, resize: int, crop: int, k: int, batch_size: int, workers: int, device: str,
                arithmetic: tuple[str, str]):
    """A Ray worker's shard function (``atlas.engine``): the run's model loaded once, then one call per shard."""
    net = load_run_model(meta, device)
    images = ImageList(paths=[str(p) for p in paths], labels=np.zeros(len(paths), np.int32))

    def run(unit: tuple[list[int], list[tuple[str, list[int]]]]):
        wanted, layer_todo = unit
        return shard_tops(net, images, resize, crop, k, batch_size, workers, device, arithmetic, wanted, layer_todo,
                          interpolation=photo_reading(meta.get("preprocessing"))[2])

    return run


@store.writer
def top_examples(run_dir: str | Path, layers: str | Sequence[str], k: int = 9, channels=None, patch: int = PATCH,
                 batch_size: int = 32, workers: int = 2, device: str = "cpu", progress: bool = True,
                 net: Network | None = None, engine: str | Engine = "local", ray_address: str | None = None) -> dict:
    """Find every channel's top-k dataset examples in the run's images and store them under ``units/{layer}/top``.

    One streamed pass over the run's image list (all ``layers`` in the same forward, which stops at the deepest),
    in the sampler's shards, resumable: shards and channels already done are not computed again.

    Parameters
    ----------
    run_dir : str or Path
        A sampled run folder (``atlas sample``); its image list and preprocessing are used.
    layers : str or sequence of str
        Layers of the run's model with spatial positions (sampled or not).
    k : int, default 9
        Examples per channel (at least 1).
    channels : sequence of int, str or None, default None
        Channels to compute (e.g. ``range(64)`` or ``"0-63"``); None: all. The arrays are full size either way.
    patch : int, default 64
        Side of the stored patches: each example's receptive-field box, scaled to fit, aspect kept, on grey.
    batch_size, workers, device : speed only
        Images per forward, DataLoader worker processes decoding images (0: in this process), where the model runs.
    progress : bool, default True
        A progress bar (only on a terminal).
    net : Network or None
        The run's model, already loaded; None: loaded from the store (``model``, ``weights``).
    engine, ray_address : "local" or "ray" (or an :class:`atlas.engine.Engine`), and the Ray cluster's address
        With "ray", the shards run on a pool of Ray actors (one model each) and come back here to be merged and written;
        the result is bit-identical to a local pass's (docs/ray.md).

    Returns
    -------
    dict
        Per layer: ``{"channels": n computed, "n_images", "n_skipped", "shards_computed", "seconds", "images_per_second"}``.

    Raises
    ------
    AtlasError
        One line: no run, an unknown layer or one without positions (the valid ones listed), channels out of range,
        k < 1, a run whose photos are missing (the folder named) or of which no image could be read.
    """
    k, patch = _checked(k, patch, batch_size, workers, device)
    run_on = engine if isinstance(engine, Engine) else make_engine(engine, ray_address)
    run = Path(run_dir)
    root = store.open_store(run)
    meta = store.attrs(root)
    if "images" not in root or "path" not in root["images"]:
        raise AtlasError(f"{run} has no image list yet; run `atlas sample` first")
    layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not layers:
        raise AtlasError("give at least one layer (--layer NAME)")
    resize, crop, interp = photo_reading(meta.get("preprocessing"))  # the model's own resampling (bicubic for a ViT)
    net = net if net is not None else load_run_model(meta, device)
    fields = {layer: receptive_field(net, layer, crop) for layer in layers}  # unknown / position-less layers: one line
    shapes = _map_shapes(net, layers, crop)
    chosen = {layer: _channels(channels, shapes[layer][0], layer) for layer in layers}

    paths = root["images/path"][:]
    n = len(paths)
    shard_size = int(meta.get("shard_size") or 256)
    n_shards = max(1, math.ceil(n / shard_size))
    # Images the sampler found unreadable are skipped without trying (only in the shards it finished).
    ok = np.ones(n, bool)
    if "ok" in root["images"] and "shard_done" in root["images"]:
        sampled = np.repeat(store.read_flags(root["images/shard_done"]), shard_size)[:n]
        ok = ~sampled | np.asarray(root["images/ok"][:], bool)
    key = _key(meta, k, patch)
    pending = [layer for layer in layers if not _complete(root, layer, key, chosen[layer])]
    if not pending:  # everything asked for is stored: nothing is rewritten, nothing downstream invalidated
        return {layer: dict(store.attrs(root[f"units/{layer}/top"]).get("summary") or {}) | {"channels": 0, "shards_computed": 0}
                for layer in layers}
    _check_photos(paths, ok, resize, crop)  # before anything is written
    root = store.open_for_update(run)
    node_paths = [f"units/{layer}/top" for layer in layers]
    store.begin_stage(run, "units", node_paths)
    start = time.perf_counter()
    states = [_Layer(root, run, layer, shapes[layer], chosen[layer], key, n_shards, fields[layer], crop) for layer in layers]
    active = [s for s in states if s.todo]
    todo = [sh for sh in range(n_shards) if any(not s.shard_done[sh] for s in active)]
    images = ImageList(paths=[str(p) for p in paths], labels=np.zeros(n, np.int32)) if todo else None
    total = sum(min(shard_size, n - sh * shard_size) for sh in todo)
    bar = tqdm(total=total, unit="img", disable=None if progress else True, desc=f"units top-{k} {','.join(layers)}", dynamic_ncols=True)
    units = shard_units(todo, active, ok, n, shard_size)
    with run_on.session():  # Ray started (or joined) for the pass, when the engine is ray
        spec = (paths, resize, crop, k, batch_size, workers, device, run_kernels(meta))
        if run_on.is_ray:
            # One model per Ray actor; each returns its shards' top-ks, written and flagged here in shard order.
            results = run_on.map(topk_worker, (meta, *spec), [(wanted, layer_todo) for _, wanted, layer_todo, _ in units],
                                 "units-top", gpus=1.0 if device.startswith("cuda") else 0.0)
        else:
            results = (shard_tops(net, images, *spec[1:], wanted, layer_todo, bar.update, interpolation=interp)
                       for _, wanted, layer_todo, _ in units)
        try:
            skipped, failed_now = _write_shards(run, units, results, paths, ok, shard_size, bar, run_on.is_ray)
        finally:
            bar.close()
            results.close()
    seconds = time.perf_counter() - start
    if run_on.is_ray and todo:
        store.log(run, f"units top-k on Ray: {run_on.last.describe()}")
    if todo and len(skipped) >= n:
        raise AtlasError(f"none of the run's {n:,} images is readable (the sampler could read none); nothing to rank")
    summary: dict = {}
    for s in states:
        if s.todo:
            _finish_layer(run, s, k, patch, paths, resize, crop, workers, interp)
        info = {"channels": len(s.todo), "n_images": n, "n_skipped": len(skipped), "n_failed_now": failed_now,
                "shards_computed": len(todo) if s.todo else 0, "seconds": round(seconds, 2),
                "images_per_second": round(total / seconds, 2) if total and seconds > 0 else 0.0}
        s.group.attrs["summary"] = info
        summary[s.name] = info
    store.finish_stage(run, "units", node_paths)
    return summary


def _checked(k: int, patch: int, batch_size: int, workers: int, device: str) -> tuple[int, int]:
    """``k`` and ``patch`` as integers; one line for a value out of range or a device this machine lacks."""
    if int(k) < 1:
        raise AtlasError(f"top-k must be at least 1 (got {k})")
    if int(patch) < 1:
        raise AtlasError(f"patch must be at least 1 pixel (got {patch})")
    if int(batch_size) < 1 or int(workers) < 0:
        raise AtlasError("batch_size must be at least 1 and workers at least 0")
    check_device(device)
    return int(k), int(patch)


def _map_shapes(net: Network, layers: list[str], crop: int) -> dict[str, tuple[int, ...]]:
    """(C, H, W) of each layer's map: one blank image through to the deepest layer."""
    with torch.inference_mode():
        param = next(net.module.parameters(), None)
        blank = net.activations(torch.zeros(1, 3, crop, crop, device=param.device if param is not None else "cpu"), layers)
    return {layer: tuple(int(v) for v in blank[layer].shape[1:]) for layer in layers}


def shard_units(todo: list[int], active: list, ok: np.ndarray, n: int, shard_size: int) -> list[tuple]:
    """The pass's work units: per shard still to do, the images to read there (those not known unreadable) and the
    (layer, channels) still to rank there.

    Parameters
    ----------
    todo : list of int
        The shards to compute.
    active : list of layer states
        The layers with channels to compute (``name``, ``todo``, ``shard_done``).
    ok : (n,) bool array
        False for images known unreadable.
    n, shard_size : int
        The run's image count and shard size.

    Returns
    -------
    list of (shard, images, [(layer, channels)], layer states)
    """
    units = []
    for shard in todo:
        lo, hi = shard * shard_size, min((shard + 1) * shard_size, n)
        needs = [s for s in active if not s.shard_done[shard]]
        units.append((shard, [i for i in range(lo, hi) if ok[i]], [(s.name, s.todo) for s in needs], needs))
    return units


def _write_shards(run: Path, units: list[tuple], results, paths, ok: np.ndarray, shard_size: int, bar,
                  is_ray: bool) -> tuple[set[int], int]:
    """Write and flag each shard's top-ks as they come back, in shard order; stop (one line, the shards before kept)
    when the photos went away during the pass. Returns the images skipped and how many failed in this pass."""
    n = len(paths)
    skipped: set[int] = {i for i in range(n) if not ok[i]}
    failed_now, tried, readable, first_error = 0, 0, 0, ""
    for (shard, wanted, _, needs), (tops, errors, shard_tried, shard_readable) in zip(units, results, strict=False):
        lo, hi = shard * shard_size, min((shard + 1) * shard_size, n)
        for index, error in errors:
            failed_now += 1
            skipped.add(index)
            first_error = first_error or f"{paths[index]}: {error}"
            store.log(run, f"units: skipped image {index} {paths[index]}: {error}")
        tried, readable = tried + shard_tried, readable + shard_readable
        bar.update(hi - lo - len(wanted) + (len(wanted) if is_ray else 0))
        if tried and (readable == 0 or (tried >= MIN_TRIED and readable < MIN_READABLE * tried)):
            # The photos went away during the pass: stop, keeping the shards done before; this one is not flagged.
            message = (f"stopped the top-k pass: {tried - readable:,} of the {tried:,} images tried could not be read; "
                       f"first error: {first_error}; every skipped file is listed in {run / 'log.txt'}")
            store.log(run, message)
            raise AtlasError(message)
        for s in needs:
            s.write_shard(shard, tops[s.name])
            s.shard_done[shard] = True
    return skipped, failed_now


def _finish_layer(run: Path, s: _Layer, k: int, patch: int, paths, resize: int, crop: int, workers: int,
                  interpolation: str = "bilinear") -> None:
    """Merge the shards, then write value, image, pos, box and patch of the computed channels and mark them done
    (the patches cut from the photos as the pass read them: ``interpolation`` is the run's)."""
    top = s.merged(k)
    rows = np.asarray(s.todo)
    box = np.full((len(rows), k, 4), -1, np.int32)
    for r in range(len(rows)):
        for j in range(k):
            if top.image[r, j] >= 0:
                box[r, j] = s.field.box(int(top.pos[r, j, 0]), int(top.pos[r, j, 1]), crop)
    patches = np.full((len(rows), k, patch, patch, 3), GREY, np.uint8)
    by_image: dict[int, list[tuple[int, int]]] = {}
    for r, j in zip(*np.nonzero(top.image >= 0), strict=True):
        by_image.setdefault(int(top.image[r, j]), []).append((int(r), int(j)))

    def one_image(item: tuple[int, list[tuple[int, int]]]) -> str | None:
        image_index, slots = item
        try:
            image = load_image(str(paths[image_index]), resize, crop, interpolation)
        except (OSError, ValueError, SyntaxError) as exc:  # gone since the pass: its patches stay grey
            return f"units: patch of image {image_index} {paths[image_index]} left grey: {exc}"
        made: dict[tuple[int, ...], np.ndarray] = {}  # channels often peak at the same place: one crop per distinct box
        for r, j in slots:
            b = tuple(int(v) for v in box[r, j])
            if b not in made:
                made[b] = fit_patch(image, b, patch)
            patches[r, j] = made[b]
        return None

    # Decoding and resampling release the GIL: threads, as many as the pass had decoding workers.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for problem in pool.map(one_image, sorted(by_image.items())):
            if problem:
                store.log(run, problem)
    g = s.group
    contiguous = bool(len(rows)) and rows[-1] - rows[0] + 1 == len(rows)
    where = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
    done = np.ones(len(rows), bool)
    # "done" last: a kill before it leaves the channels to be merged again from the shards, never half-written ones marked done
    for name, data in (("value", top.value), ("image", top.image), ("pos", top.pos), ("box", box), ("patch", patches), ("done", done)):
        if contiguous:
            g[name][where] = data
        else:
            g[name].set_orthogonal_selection((where,) + (slice(None),) * (data.ndim - 1), data)
