"""The render stage: one icon per kept grid cell, written into the run's store.

Icons are cached per cell: the group's ``key`` hashes the model, its weights, the layer,
the mode and every setting that changes pixels, and the ``digest`` array holds a hash of
each cell's direction. A cell is skipped when it is ``done`` under the same key and
digest, so re-running renders nothing new, changing the grid re-renders only the cells
that changed, and a killed run loses at most the batch in flight (results are written,
then marked done, after every batch). Cells the grid no longer renders are cleared, and the
finished icons record the grid's ``grid_id``: ``store.verify`` refuses icons of an older grid
(``atlas tiles`` says to re-run ``atlas render``), and render itself refuses a grid built from
an older layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from atlas import store
from atlas.engine import Engine, make_engine
from atlas.errors import AtlasError
from atlas.models import Network, autocast_dtype, load_run_model
from atlas.render.examples import compose, sample_patches
from atlas.render.objectives import direction
from atlas.render.optimize import Settings, best_icons
from atlas.render.transforms import Transforms
from atlas.settings import PRESETS, RenderSettings, check_device  # noqa: F401 - PRESETS re-exported (see below)
from atlas.store import create_array, open_store, read_rows, require_layer

# PRESETS (the quality presets) live with the other render settings in atlas.settings; still importable from here.
DEFAULT_TRANSFORMS = Transforms()


def _digest(data: bytes) -> int:
    """A 63-bit content hash (fits int64, usable as a seed)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF


def optimizer_settings(chosen: RenderSettings) -> tuple[Settings, int]:
    """The optimiser's :class:`~atlas.render.optimize.Settings` and the batch size for checked render settings: the
    quality preset with ``chosen``'s overrides, the default transforms."""
    preset = chosen.preset()
    return Settings(size=preset["size"], steps=preset["steps"], attempts=preset["attempts"], p=chosen.p,
                    transforms=DEFAULT_TRANSFORMS, screen=preset["screen"]), preset["batch"]


def _open_icons(root: zarr.Group, path: str, shape: tuple[int, int], size: int, key: str, attrs: dict) -> zarr.Group:
    """The icons group for ``path``, reset when it was made with another key or shape."""
    group = root.get(path)
    fresh = (group is None or group.attrs.get("key") != key or "images" not in group
             or tuple(group["images"].shape) != (*shape, size, size, 3))
    if fresh:
        group = root.require_group(path)
        s0, s1 = shape
        create_array(group, "images", (s0, s1, size, size, 3), np.uint8, chunks=(1, s1, size, size, 3), overwrite=True)
        create_array(group, "done", shape, bool, chunks=shape, fill_value=False, overwrite=True)
        create_array(group, "cosine", shape, np.float32, chunks=shape, fill_value=np.nan, overwrite=True)
        create_array(group, "objective", shape, np.float32, chunks=shape, fill_value=np.nan, overwrite=True)
        create_array(group, "digest", shape, np.int64, chunks=shape, fill_value=-1, overwrite=True)
        group.attrs.update(attrs | {"key": key})
    if "cosine_whitened" not in group:
        # Added beside the raw cosine without touching the key: icons rendered before it keep their pixels and read
        # as "n/a" here until re-rendered (only cells rendered from now on get it).
        create_array(group, "cosine_whitened", shape, np.float32, chunks=shape, fill_value=np.nan, overwrite=True)
    return group


def _drop_outside(group: zarr.Group, mask: np.ndarray) -> None:
    """Forget the icons of cells this grid does not render (left by an older grid), so icons depend on the grid only."""
    done = group["done"][...]
    gone = done & ~mask
    if not gone.any():
        return
    done[gone] = False
    group["done"][...] = done  # first: an interrupted clean-up leaves cells "not done", never stale ones "done"
    for gy in np.unique(np.nonzero(gone)[0]):
        row = group["images"][int(gy)]
        row[gone[gy]] = 0
        group["images"][int(gy)] = row
    for name, fill in (("cosine", np.nan), ("cosine_whitened", np.nan), ("objective", np.nan), ("digest", -1)):
        if name not in group:
            continue
        arr = group[name][...]
        arr[gone] = fill
        group[name][...] = arr


def _write(group: zarr.Group, cells: np.ndarray, images: np.ndarray, cosine: np.ndarray, objective: np.ndarray,
           digests: np.ndarray, cosine_whitened: np.ndarray) -> None:
    """Store one batch; ``done`` is set last, so an interrupted write leaves those cells to redo."""
    for gy in np.unique(cells[:, 0]):
        sel = cells[:, 0] == gy
        row = group["images"][int(gy)]
        row[cells[sel, 1]] = images[sel]
        group["images"][int(gy)] = row
    for name, values in (("cosine", cosine), ("cosine_whitened", cosine_whitened), ("objective", objective),
                         ("digest", digests)):
        arr = group[name][...]
        arr[cells[:, 0], cells[:, 1]] = values
        group[name][...] = arr
    done = group["done"][...]
    done[cells[:, 0], cells[:, 1]] = True
    group["done"][...] = done


def _load_network(root: zarr.Group, device: str) -> Network:
    return load_run_model(dict(root.attrs), device)


@store.writer
def render(run_dir: str | Path, layer: str, sizes: Sequence[int] | int, settings: RenderSettings | None = None, *,
           atlas: str = "full", progress: bool = True, net: Network | None = None, engine: str | Engine = "local",
           ray_address: str | None = None, **overrides) -> dict:
    """Render the icons of the cells with ``render`` set in ``grids/{layer}/{atlas}/{size}``, for each grid size.

    Every setting, its default and its range is :class:`atlas.settings.RenderSettings`' (checked first, before
    anything is loaded); a bad value is one :class:`~atlas.errors.AtlasError` line.

    Parameters
    ----------
    run_dir : str or Path
        The run folder (holding ``store.zarr``), after ``atlas grid``.
    layer : str
        Layer of the grid, e.g. ``"mixed4c"``.
    sizes : int or sequence of int
        Grid sizes to render; each ``grids/{layer}/{atlas}/{size}`` must exist.
    settings : RenderSettings or None, default None
        quality preset, steps, size, attempts, batch, p, device, icons, seed and whiten (docs/render.md);
        None: the defaults.
    atlas : str, default "full"
        Which atlas of the layer (``"full"`` or a class atlas's name).
    progress : bool, default True
        Show a progress bar.
    net : Network or None, default None
        The run's model, already loaded (tests, notebooks); None: load it from the run's attributes.
    engine : str or Engine, default "local"
        "local" or "ray": the cell batches of ``icons="optimize"`` run on a pool of Ray actors (one model each) and
        come back here to be written; icons equal a local run's for the same seeds and precision (docs/ray.md).
    ray_address : str or None, default None
        With ``engine="ray"``: "auto", "HOST:PORT" or "ray://HOST:PORT"; None starts Ray on this machine.
    **overrides
        Single fields of :class:`~atlas.settings.RenderSettings` replacing those of ``settings``, e.g. ``steps=64``
        (an unknown name is one line listing the known ones).

    Returns
    -------
    dict
        ``{grid size: summary}``, the summary (also the icons group's ``summary`` attribute) with
        ``n_render``, ``n_done``, ``rendered_now``, ``seconds``, ``icons_per_s``,
        ``image_steps_per_s``, ``mean_cosine`` (raw cos(h, v) to the cell mean) and ``mean_cosine_whitened``
        (cos(h, S v), what the optimiser aligns; None where some icon lacks it). Icons are written to ``icons/{layer}/{atlas}/{size}``.
    """
    chosen = RenderSettings.merged(settings, overrides)
    device, icons, seed = chosen.device, chosen.icons, chosen.seed
    check_device(device)
    run_on = engine if isinstance(engine, Engine) else make_engine(engine, ray_address)
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    open_store(run_dir)  # clear error when there is no run
    store.take_lock(run_dir)
    root = open_store(run_dir, mode="a")
    settings, batch = optimizer_settings(chosen)
    summaries = {}
    for grid_size in sizes:
        gpath = f"grids/{layer}/{atlas}/{grid_size}"
        store.verify(root, [gpath, f"whitening/{layer}"] + ([f"samples/{layer}", "images"] if icons == "examples" else []))
        if gpath not in root:
            raise AtlasError(f"no grid {gpath} in this run; run `atlas grid {run_dir} --layer {layer} --grid {grid_size}` first")
        grid = root[gpath]
        ipath = _begin_icons(run_dir, root, layer, atlas, grid_size)
        if icons == "examples":
            summaries[grid_size] = _render_examples(run_dir, root, grid, layer, atlas, grid_size, settings.size, progress)
        else:
            if net is None:  # on Ray too: the icons' key names the model and its weights (each actor loads its own copy)
                net = _load_network(root, device)
            with run_on.session():
                summaries[grid_size] = _render_optimize(root, grid, net, layer, atlas, grid_size, settings, batch, device, seed,
                                                        chosen.whiten, progress, run_on)
            if run_on.is_ray:
                store.log(run_dir, f"render {layer}/{atlas}/{grid_size} on Ray: {run_on.last.describe()}")
        root[ipath].attrs["grid_id"] = grid.attrs.get("grid_id")  # the lineage: these icons are this grid's (store.stale)
        store.finish_stage(run_dir, "render", [ipath])
    return summaries


def _readable(root: zarr.Group, rel: str) -> bool:
    try:
        root[rel][...]
    except Exception:  # noqa: BLE001 - any decoding error means the flags are gone
        return False
    return True


def _begin_icons(run_dir: str | Path, root: zarr.Group, layer: str, atlas: str, grid_size: int) -> str:
    """Repair damaged icons before resuming (cells of a lost image row are redone; unreadable flags redo the grid), then
    mark the icons as being written. Returns their store path."""
    path = f"icons/{layer}/{atlas}/{grid_size}"
    bad = store.damaged(root, path)
    if bad:
        image_rows = {int(c[0]) for rel, coords in bad.items() if rel.endswith("/images") and coords for c in coords if c}
        # Flags that still read are trusted as they are (a lost chunk reads as "not done", which redoes those cells);
        # only unreadable ones restart this grid's icons.
        if not all(coords is not None and _readable(root, rel) for rel, coords in bad.items() if not rel.endswith("/images")):
            store.remove_node(root, path)
        elif image_rows:
            done = root[f"{path}/done"][...]
            done[sorted(image_rows)] = False
            root[f"{path}/done"][...] = done
        store.log(run_dir, f"render {layer}/{atlas}/{grid_size}: damaged icons ({', '.join(sorted(bad))}) are rendered again")
    store.begin_stage(run_dir, "render", [path], atlas)
    return path


def _render_optimize(root: zarr.Group, grid: zarr.Group, net: Network, layer: str, atlas: str, grid_size: int,
                     settings: Settings, batch: int, device: str, seed: int, whiten: bool, progress: bool, engine: Engine) -> dict:
    mask = grid["render"][...]
    means = grid["mean_activation"]
    wpath = f"whitening/{layer}/matrix"
    whitening = root[wpath][...].astype(np.float32) if whiten and wpath in root else None
    old = root.get(f"icons/{layer}/{atlas}/{grid_size}")
    recorded = (dict(old.attrs).get("settings") or {}).get("precision") if old is not None else None
    if settings.precision == "auto" and recorded in ("float32", "bfloat16"):
        # "auto" resumes in the precision the grid's icons were started in, on any machine (docs/precision.md)
        settings = dataclasses.replace(settings, precision=recorded)
    autocast = autocast_dtype(settings.precision, torch.device(device))
    settings_attrs = settings.key_dict() | {"seed": seed, "whitened": whitening is not None,
                                            "precision": str(autocast).replace("torch.", "") if autocast else "float32"}
    key_source = {"model": net.name, "weights_sha256": net.weights_sha256 or net.weights, "layer": layer,
                  "mode": "optimize", "settings": settings_attrs,
                  "whitening": _digest(whitening.tobytes()) if whitening is not None else None}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()
    group = _open_icons(root, f"icons/{layer}/{atlas}/{grid_size}", mask.shape, settings.size, key,
                        {"mode": "optimize", "settings": settings_attrs})
    _drop_outside(group, mask)
    cells = np.argwhere(mask)
    vectors = np.stack([np.asarray(means[int(gy), int(gx)], dtype=np.float32) for gy, gx in cells]) if len(cells) else \
        np.zeros((0, 1), np.float32)
    digests = np.array([_digest(v.tobytes()) for v in vectors], dtype=np.int64)
    done, have = group["done"][...], group["digest"][...]
    todo = [i for i, (gy, gx) in enumerate(cells) if not (done[gy, gx] and have[gy, gx] == digests[i])]
    bar = tqdm(total=len(todo), unit="icon", desc=f"render {layer} {grid_size}x{grid_size}", disable=not progress,
               dynamic_ncols=True, smoothing=0.1, bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")
    start, rendered = time.perf_counter(), 0
    # The work units: batches of cells, each with its directions and seeds (the same batches on every engine).
    units = []
    for lo in range(0, len(todo), batch):
        idx = np.asarray(todo[lo : lo + batch])
        units.append((idx, vectors[idx], [(seed, int(digests[i]), k) for i in idx for k in range(settings.attempts)]))
    if engine.is_ray:
        # One model per Ray actor; each returns its batches' pixels, written here batch by batch as locally.
        results = engine.map(render_worker, (dict(root.attrs), device, layer, whitening, settings),
                             [(v, seeds) for _, v, seeds in units], f"render-{grid_size}",
                             gpus=1.0 if device.startswith("cuda") else 0.0)
    else:
        def local():
            for _, v, seeds in units:
                base, n = bar.n, len(v)

                def tick(step: int, _param, n=n, base=base) -> None:
                    if step % 8 == 7:
                        bar.n = base + n * (step + 1) / settings.steps
                        bar.refresh()

                yield render_batch(net, layer, v, whitening, seeds, settings, device, tick)

        results = local()
    try:
        for (idx, _, _), (pixels, cosine, objective, whitened) in zip(units, results, strict=False):
            _write(group, cells[idx], pixels, cosine, objective, digests[idx], whitened)
            rendered += len(idx)
            bar.n = rendered
            bar.refresh()
    finally:
        bar.close()
        results.close()
    return _summarise(group, mask, rendered, time.perf_counter() - start, settings.icon_steps)


def render_batch(net: Network, layer: str, vectors: np.ndarray, whitening: np.ndarray | None, seeds: list, settings: Settings,
                 device: str, tick=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One batch of icons (pixels uint8, raw cos(h, v), objective, whitened cos(h, S v)) for cell means ``vectors``:
    arrays in, arrays out, nothing written (the same on the driver and on a Ray worker)."""
    a = settings.attempts
    s = torch.as_tensor(whitening) if whitening is not None else None
    objective = direction(layer, torch.from_numpy(vectors).repeat_interleave(a, 0), s, settings.p)
    result = best_icons(net, layer, objective, seeds, settings, device, tick)
    pixels = np.clip(np.rint(result.images * 255.0), 0, 255).astype(np.uint8)
    return pixels, result.cosine, result.objective, result.cosine_whitened


def render_worker(attrs: dict, device: str, layer: str, whitening: np.ndarray | None, settings: Settings):
    """A Ray worker's batch function (``atlas.engine``): the run's model loaded once, then one call per cell batch."""
    net = load_run_model(attrs, device)

    def run(unit: tuple[np.ndarray, list]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        vectors, seeds = unit
        return render_batch(net, layer, vectors, whitening, seeds, settings, device)

    return run


def _render_examples(run_dir: str | Path, root: zarr.Group, grid: zarr.Group, layer: str, atlas: str, grid_size: int,
                     size: int, progress: bool) -> dict:
    mask, nearest, means = grid["render"][...], grid["nearest"][...], grid["mean_activation"]
    samples = require_layer(root, layer)
    settings_attrs = {"size": size, "per_icon": 4}
    key_source = {"model": root.attrs.get("model"), "weights_sha256": root.attrs.get("weights_sha256"), "layer": layer,
                  "mode": "examples", "settings": settings_attrs}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()
    group = _open_icons(root, f"icons/{layer}/{atlas}/{grid_size}", mask.shape, size, key,
                        {"mode": "examples", "settings": settings_attrs})
    _drop_outside(group, mask)
    cells = np.argwhere(mask)
    done, have = group["done"][...], group["digest"][...]
    digests = np.array([_digest(nearest[gy, gx].tobytes()) for gy, gx in cells], dtype=np.int64)
    todo = [i for i, (gy, gx) in enumerate(cells) if not (done[gy, gx] and have[gy, gx] == digests[i])]
    start = time.perf_counter()
    half = math.ceil(size / 2)
    per_batch = 64
    for lo in tqdm(range(0, len(todo), per_batch), desc=f"examples {layer} {grid_size}x{grid_size}", unit="batch",
                   disable=not progress):
        idx = np.asarray(todo[lo : lo + per_batch])
        images, cosines = [], []
        for i in idx:
            gy, gx = cells[i]
            rows = [int(r) for r in nearest[gy, gx] if r >= 0][:4]
            patch_size = half if len(rows) >= 4 else size
            images.append(compose(sample_patches(run_dir, layer, rows, patch_size), size))
            v = np.asarray(means[int(gy), int(gx)], dtype=np.float32)
            cosines.append(_mean_cosine(samples["activations"], rows, v))
        nan = np.full(len(idx), np.nan, np.float32)  # nothing optimised: no objective, no whitened alignment
        _write(group, cells[idx], np.stack(images), np.asarray(cosines, np.float32), nan, digests[idx], nan)
    return _summarise(group, mask, len(todo), time.perf_counter() - start, 0)


def _mean_cosine(activations: zarr.Array, rows: list[int], v: np.ndarray) -> float:
    """Mean cos(h, v) of the sample rows shown in an examples icon."""
    if not rows:
        return float("nan")
    h = read_rows(activations, np.sort(np.asarray(rows)))
    return float(np.mean(h @ v / np.maximum(np.linalg.norm(h, axis=1) * np.linalg.norm(v), 1e-12)))


def _mean(values: np.ndarray) -> float | None:
    """Mean of the done cells' figure, or None ("n/a") when some cell lacks it (icons rendered before it was stored)."""
    return round(float(np.mean(values)), 4) if values.size and np.isfinite(values).all() else None


def _summarise(group: zarr.Group, mask: np.ndarray, rendered: int, seconds: float, steps: int) -> dict:
    """Counts, speed and mean cosines of a grid's icons; ``steps`` is optimisation steps per icon (all attempts).

    ``mean_cosine`` is the raw cos(h, v) to the cell mean, ``mean_cosine_whitened`` cos(h, S v), the alignment the
    optimiser maximises (None for example icons and for icons rendered before it was stored)."""
    done = group["done"][...] & mask
    cosine = group["cosine"][...][done]
    whitened = group["cosine_whitened"][...][done] if "cosine_whitened" in group else np.full(1, np.nan)
    summary = {"n_render": int(mask.sum()), "n_done": int(done.sum()), "rendered_now": rendered,
               "seconds": round(seconds, 2), "icons_per_s": round(rendered / seconds, 3) if rendered and seconds else None,
               "image_steps_per_s": round(rendered * steps / seconds, 1) if rendered and seconds and steps else None,
               "mean_cosine": round(float(np.nanmean(cosine)), 4) if cosine.size and np.isfinite(cosine).any() else None,
               "mean_cosine_whitened": _mean(whitened)}
    group.attrs["summary"] = summary
    return summary
