"""The article's search for a patch, automated: the cells of a class-difference atlas ranked by attribution toward
its second class, each tried as a patch on the first class's photos (:func:`guided_search`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from atlas import store
from atlas.data import photo_reading
from atlas.errors import AtlasError
from atlas.patches.cells import CellRef, _check_layer, _square, cell_patch
from atlas.patches.core import flip_rate
from atlas.patches.images import augment_images, load_source
from atlas.patches.measure import _evaluate, _figure, _logits, _net_for
from atlas.settings import PatchSettings


def search_table(rows: list[dict]) -> str:
    """The ranked table of :func:`guided_search` as fixed-width text."""
    head = f"{'rank':>4}  {'cell':>7}  {'kind':<7}  {'attr B-A':>9}  {'flip rate':>9}  {'changed':>7}  {'mean delta':>10}"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows, 1):
        rate = "n/a" if r["flip_rate"] is None else f"{r['flip_rate']:.1%}"
        lines.append(f"{i:>4}  {r['x']:>3},{r['y']:<3}  {r['kind']:<7}  {r['attribution']:>9.3f}  {rate:>9}  {r['changed_rate']:>7.1%}  "
                     f"{r['mean_delta']:>10.2f}")
    return "\n".join(lines)


def guided_search(run_dir: str | Path, layer: str, atlas: str, images: str | Path | Sequence[str | Path] | None = None,
                  grid: int | None = None, settings: PatchSettings | None = None, near: bool = False, out: str | Path | None = None,
                  net=None, echo: Callable[[str], None] | None = None) -> dict:
    """Rank the cells of a class-difference atlas by attribution toward its second class B and measure how often each
    top cell's icon and best dataset patch, pasted into images of its first class A, flips them to B.

    Parameters
    ----------
    run_dir, layer, atlas : the run, layer and a ``compare-A-vs-B`` atlas of it (``atlas compare RUN --layer L A B``).
    images : folder, list file or list of paths, optional
        A's images. Default: the run's images labelled A, and with ``near`` also those whose stored top-5 holds A
        (never those the model already calls B); ``settings.augment`` adds seeded crops and flips of each.
    grid : int, optional
        The atlas grid whose cells are tried (default: its largest grid with rendered icons, else its largest grid).
    settings : PatchSettings, optional
        ``top`` cells tried, ``kinds`` (icon, example), sizes, positions, seed, augmentation, batch, device.
    out : folder, optional
        ``search.json``, ``table.txt``, each tried patch as ``cells/X_Y-KIND.png`` and ``figure.png`` of the best one.
    net : Network, optional
        The run's model, already loaded (default: loaded from the run's record).

    Returns
    -------
    dict
        ``classes`` [A, B], ``grid``, ``n_images``, ``rows`` (cell x, y, kind, attribution toward B, flip rate, changed
        rate, mean delta, n variants; best first), ``skipped`` (cells without a rendered icon, per kind), ``seconds``.
    """
    settings = settings or PatchSettings()
    start = time.perf_counter()
    run_dir = Path(run_dir)
    root = store.open_store(run_dir)
    a, b, grid = _compare_atlas(root, run_dir, layer, atlas, grid)
    group = root[f"grids/{layer}/{atlas}/{grid}"]
    store.verify(root, [f"grids/{layer}/{atlas}/{grid}"])
    count = group["count"][:]
    score, cells = rank_cells(count, group["mean_attribution"].oindex[:, :, [a, b]], settings.top)

    net = net or _net_for(run_dir, "", None, settings.device)
    names = net.classes
    if images is None:
        images = _photos_of(root, a, b, near, names)
    arrays, paths = load_source(images, reading=photo_reading(net.preprocess))  # as the model reads photos
    arrays = augment_images(arrays, settings.augment, settings.seed)
    before = _logits(net, arrays, settings.batch_size, settings.device)
    if echo:
        echo(f"{len(cells)} cells of {layer}/{atlas} grid {grid} toward '{names[b]}', on {arrays.shape[0]} images of '{names[a]}' "
             f"({len(paths)} photos{f' x {settings.augment + 1} with crops and flips' if settings.augment else ''})")
    trials = _try_cells(CellRef(run_dir, layer, atlas, grid, 0, 0), cells, score, count, net, arrays, before, b, settings, echo)
    report = {"run": str(run_dir), "layer": layer, "atlas": atlas, "grid": grid, "classes": [names[a], names[b]],
              "n_images": int(arrays.shape[0]), "n_photos": len(paths), "already_target": int((before.argmax(1) == b).sum()),
              "rows": trials["rows"], "skipped": trials["skipped"], "settings": settings.as_table(), "files": {}}
    if out is not None:
        report["files"] = _write_search(Path(out), trials, arrays, before, b, names, settings.figure,
                                        f"{layer}/{atlas}", f"on '{names[a]}' -> '{names[b]}'")
    report["seconds"] = time.perf_counter() - start
    if out is not None:
        (Path(out) / "search.json").write_text(json.dumps(report, indent=1))
    return report


def rank_cells(count: np.ndarray, attribution: np.ndarray, top: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The cells of a class-difference grid ranked by attribution toward B minus toward A.

    Parameters
    ----------
    count : (S, S) int array
        Samples per cell (empty cells are never tried).
    attribution : (S, S, 2) float array
        Each cell's mean attribution toward A (``[..., 0]``) and B (``[..., 1]``).
    top : int
        How many cells to keep.

    Returns
    -------
    score : (S, S) float array
        B minus A per cell, ``-inf`` for empty cells.
    cells : list of (x, y)
        The ``top`` non-empty cells, best first (ties in row-major order).
    """
    score = np.where(count > 0, attribution[..., 1] - attribution[..., 0], -np.inf)
    order = np.argsort(-score, axis=None, kind="stable")[: min(top, int((count > 0).sum()))]
    size = count.shape[1]
    return score, [(int(f % size), int(f // size)) for f in order.tolist()]


def _compare_atlas(root, run_dir: Path, layer: str, atlas: str, grid: int | None) -> tuple[int, int, int]:
    """The classes A, B of a compare atlas and the grid to search (default: its largest grid with icons); one line
    for a layer, atlas or grid that is not there."""
    _check_layer(root, run_dir, layer)
    layout = root.get(f"layouts/{layer}/{atlas}")
    meta = store.attrs(layout) if layout is not None else {}
    if layout is None:
        raise AtlasError(f"no atlas '{atlas}' at layer '{layer}' in {run_dir}; build it with `atlas compare {run_dir} --layer {layer} A B`")
    if meta.get("kind") != "compare" or len(meta.get("classes") or []) != 2:
        raise AtlasError(f"atlas {layer}/{atlas} is not a class-difference atlas; "
                         f"build one with `atlas compare {run_dir} --layer {layer} A B`")
    a, b = (int(c) for c in meta["classes"])
    sizes = sorted(int(k) for k in root[f"grids/{layer}/{atlas}"].group_keys() if k.isdigit()) if f"grids/{layer}/{atlas}" in root else []
    if not sizes:
        raise AtlasError(f"atlas {layer}/{atlas} has no grid; run `atlas grid {run_dir} --layer {layer} --atlas {atlas} --grid 8`")
    rendered = [s for s in sizes if f"icons/{layer}/{atlas}/{s}" in root and bool(root[f"icons/{layer}/{atlas}/{s}/done"][:].any())]
    grid = grid if grid is not None else (rendered or sizes)[-1]  # default: the largest grid with icons
    if grid not in sizes:
        raise AtlasError(f"atlas {layer}/{atlas} has no {grid}x{grid} grid; grids: {', '.join(map(str, sizes))}")
    return a, b, grid


def _photos_of(root, a: int, b: int, near: bool, names: list[str]) -> list[str]:
    """The run's photos labelled A (with ``near`` also those whose stored top-5 holds A, never those already called B)."""
    labels = root["images/label"][:]
    chosen = labels == a
    if near and "top5" in root["images"]:
        top5 = root["images/top5"][:]
        chosen |= (top5 == a).any(1) & (top5[:, 0] != b)
    paths = [str(p) for p in np.asarray(root["images/path"][:])[chosen & root["images/ok"][:]]]
    if not paths:
        raise AtlasError(f"the run holds no image labelled '{names[a]}'{' or near it' if near else ''}; give its photos with --images")
    from atlas.data import real_path

    return [real_path(p) for p in paths]


def _try_cells(ref: CellRef, cells: list[tuple[int, int]], score: np.ndarray, count: np.ndarray, net, arrays: np.ndarray,
               before: np.ndarray, target: int, settings: PatchSettings, echo: Callable[[str], None] | None) -> dict:
    """Each cell's patch of each kind pasted into ``arrays``: ``rows`` (best first), ``skipped`` per kind, ``tried``
    [(x, y, kind, picture)] and ``best`` (row, evaluation) by flip rate then mean delta, or None. ``ref`` names the
    grid; each cell's reference is it with the cell's x and y."""
    rows, skipped, tried, best = [], {k: 0 for k in settings.kinds}, [], None
    for x, y in cells:
        for kind in settings.kinds:
            try:
                picture = cell_patch(replace(ref, x=x, y=y), kind)
            except AtlasError:
                skipped[kind] += 1  # an icon not rendered, an image no longer readable: counted, the others still tried
                continue
            result = _evaluate(net, arrays, before, picture, target, settings)
            row = {"x": x, "y": y, "kind": kind, "attribution": float(score[y, x]), "count": int(count[y, x]),
                   "flip_rate": flip_rate(result["flipped"], result["eligible"]), "changed_rate": float(result["changed"].mean()),
                   "mean_delta": float(result["delta"].mean()), "n_variants": int(result["image_of"].size)}
            rows.append(row)
            tried.append((x, y, kind, picture))
            key = ((row["flip_rate"] or 0.0), row["mean_delta"])
            if best is None or key > best[0]:
                best = (key, row, result)
            if echo:
                rate = "n/a" if row["flip_rate"] is None else f"{row['flip_rate']:.1%}"
                echo(f"  cell {x},{y} {kind}: flip rate {rate}, mean delta {row['mean_delta']:.2f}")
    rows.sort(key=lambda r: (-(r["flip_rate"] or 0.0), -r["mean_delta"]))
    return {"rows": rows, "skipped": skipped, "tried": tried, "best": best[1:] if best else None}


def _write_search(outdir: Path, trials: dict, arrays: np.ndarray, before: np.ndarray, target: int, names: list[str], k: int,
                  atlas: str, aim: str) -> dict:
    """Each tried patch as ``cells/X_Y-KIND.png``, ``table.txt`` and the best cell's figure; the files written."""
    outdir.mkdir(parents=True, exist_ok=True)
    if trials["tried"]:
        (outdir / "cells").mkdir(exist_ok=True)
    for x, y, kind, picture in trials["tried"]:
        Image.fromarray(_square(picture)).save(outdir / "cells" / f"{x}_{y}-{kind}.png")
    (outdir / "table.txt").write_text(search_table(trials["rows"]) + "\n")
    files = {}
    if trials["best"] is not None:
        row, result = trials["best"]
        title = f"{atlas} cell {row['x']},{row['y']} ({row['kind']}) {aim}"
        fig = _figure(outdir / "figure.png", arrays, before, result, target, names, k, title)
        files["figure"] = str(fig) if fig else None
    return files | {"table": str(outdir / "table.txt"), "report": str(outdir / "search.json")}
