"""Grid stage: overlay S x S grids on a layout and average each cell's samples.

For every size, each kept layout point falls in exactly one cell: ``g = min(floor(v * S), S - 1)``
per axis, so points at exactly 1.0 (the clip edge) belong to the last cell rather than a
phantom cell S (Lucid's notebook bins them with ``np.digitize`` against an open last edge and
can count boundary points twice across sizes). Means are accumulated in float64 while the
activations stream from the store block by block, so memory stays at the grids' size.

Also computes the layer's whitening matrix, ``(X^T X / N + eps I)^-1`` over all valid samples,
once, for the renderer's objective.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlas import store
from atlas.errors import AtlasError
from atlas.settings import GRID_MAX, GridSettings
from atlas.store import FULL_ATLAS, log, open_for_update, require_layer, valid_rows, write_array

MIN_COUNT = GridSettings.min_count  # 5: Lucid's activation-atlas recipe discards cells with fewer samples
TOP = 5
BLOCK = 65536
WHITEN_EPS = 1e-3  # relative to the mean channel energy; keeps dead channels invertible


def cell_index(xy: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(gy, gx)`` of points in [0, 1]^2 on a ``size`` grid; 1.0 goes to the last cell, never past it."""
    xy = np.asarray(xy, dtype=np.float64)
    g = np.clip(np.floor(xy * size), 0, size - 1).astype(np.int64)
    return g[:, 1], g[:, 0]


def _load_layout(root, layer: str, atlas: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    node = root.get(f"layouts/{layer}/{atlas}")
    if node is None:
        have = sorted(root["layouts"][layer].group_keys()) if f"layouts/{layer}" in root else []
        hint = f" (layouts of this layer: {', '.join(have)})" if have else ""
        raise AtlasError(f"no layout '{atlas}' for layer '{layer}'{hint}; run `atlas project RUN_DIR --layer {layer}` first")
    rows, xy, inside = node["rows"][:], node["xy"][:], node["inside"][:]
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise AtlasError(f"layout '{atlas}' of layer '{layer}' is not 2-D (shape {xy.shape}); grids need a 2-D layout")
    return rows, xy, inside, dict(node.attrs)


@store.writer
def whitening(run_dir: str | Path, layer: str, eps: float = WHITEN_EPS, force: bool = False) -> dict:
    """Compute and store ``whitening/{layer}/matrix``: inverse uncentred correlation of all valid samples.

    Accumulated in float64 over streamed blocks. ``eps`` is relative to the mean diagonal
    (mean channel energy). Skipped when a matrix from the same number of samples and the same
    ``eps`` is already stored, unless ``force``.
    """
    root = open_for_update(run_dir)
    store.take_lock(run_dir)
    rows = valid_rows(root, layer)
    node = root.get(f"whitening/{layer}")
    if not force and node is not None and "matrix" in node and not store.damaged(root, f"whitening/{layer}"):
        a = dict(node.attrs)
        if a.get("n_samples") == int(rows.size) and a.get("eps_relative") == eps:
            return {**a, "skipped": True}
    activations = require_layer(root, layer)["activations"]
    c = activations.shape[1]
    moment = np.zeros((c, c), dtype=np.float64)
    for start in range(0, activations.shape[0], BLOCK):
        block = activations[start : start + BLOCK]
        keep = rows[(rows >= start) & (rows < start + block.shape[0])] - start
        if keep.size:
            b = block[keep].astype(np.float64)
            moment += b.T @ b
    moment /= rows.size
    eps_abs = eps * float(np.trace(moment)) / c
    if eps_abs <= 0:
        eps_abs = eps
    vals, vecs = np.linalg.eigh(moment + eps_abs * np.eye(c))
    matrix = (vecs / vals) @ vecs.T  # symmetric inverse via eigendecomposition: stable for near-singular moments
    store.begin_stage(run_dir, "grid", [f"whitening/{layer}"])
    group = root.require_group("whitening").require_group(layer)
    write_array(group, "matrix", matrix.astype(np.float32))
    info = {"n_samples": int(rows.size), "eps_relative": eps, "eps": eps_abs, "condition": float(vals.max() / vals.min())}
    group.attrs.update({**info, "summary": {"n_samples": int(rows.size), "channels": c, "eps": eps_abs}})
    store.finish_stage(run_dir, "grid", [f"whitening/{layer}"])
    return {**info, "skipped": False}


@dataclass(frozen=True)
class Cells:
    """One ``size`` x ``size`` grid over a layout, as :func:`grid` stores it at ``grids/{layer}/{atlas}/{size}``.

    Cell arrays are indexed ``[gy, gx]``, gy from the top; ``cell`` and ``nearest`` refer to
    points by the ``rows`` given to :func:`bin_cells` (by position in ``xy`` when none were).
    """

    size: int
    cell: np.ndarray  # (M,) int32: flat cell gy * size + gx of each point, -1 if dropped
    count: np.ndarray  # (S, S) int32
    render: np.ndarray  # (S, S) bool: count >= min_count
    mean_activation: np.ndarray  # (S, S, C) float32 (accumulated in float64)
    mean_attribution: np.ndarray | None  # (S, S, K) float32; None without attributions
    top_classes: np.ndarray | None  # (S, S, top) int32, best first, -1 pads (and empty cells)
    top_attribution: np.ndarray | None  # (S, S, top) float32, the mean attribution of those classes
    nearest: np.ndarray  # (S, S, n_nearest) int64: rows closest in cosine to the cell's mean activation, -1 pads
    summary: dict  # size, min_count, n_kept, n_cells, n_render, n_dropped, has_attribution


def _check_grid_args(sizes, min_count: int, n_nearest: int, top: int) -> list[int]:
    """The sorted distinct sizes, or one clear line about the first bad argument."""
    sizes = sorted({int(s) for s in sizes})
    if not sizes:
        raise AtlasError("give at least one grid size, e.g. --grid 20 --grid 40")
    # The library also bins a 1x1 grid; `atlas grid`, `atlas build` and the configs ask for GridSettings' 2..2048.
    if sizes[0] < 1 or sizes[-1] > GRID_MAX:
        raise AtlasError(f"grid sizes must be between 1 and {GRID_MAX}, got {sizes}")
    if min_count < 1 or n_nearest < 0 or top < 1:
        raise AtlasError("min_count and top must be at least 1, n_nearest at least 0")
    return sizes


def bin_cells(xy: np.ndarray, acts, attrs=None, sizes=(20,), *, rows: np.ndarray | None = None, kept: np.ndarray | None = None,
              min_count: int = MIN_COUNT, n_nearest: int = GridSettings.n_nearest, top: int = TOP) -> dict[int, Cells]:
    """The pure core of the grid stage: bin laid-out points into square grids and average each cell.

    Parameters
    ----------
    xy : (M, 2) array
        Layout positions in [0, 1]^2 (x to the right, y downwards); 1.0 falls in the last cell.
    acts : (N, C) array-like
        Activations; point ``i`` is row ``rows[i]``. A numpy array or anything sliced like one
        (a zarr array): it is read ``BLOCK`` rows at a time, so it need not fit in memory.
    attrs : (N, K) array-like or None
        Class attributions, rows as ``acts``; None for a run sampled without attribution
        (then ``mean_attribution``, ``top_classes`` and ``top_attribution`` are None).
    sizes : iterable of int
        Grid sizes S, each 1..GRID_MAX; duplicates are merged.
    rows : (M,) int array, ascending, optional
        The row of ``acts`` behind each point (default ``arange(M)``); ``nearest`` lists these.
    kept : (M,) bool array, optional
        Points to bin (default all); the others get cell -1.
    min_count : int, >= 1
        Cells with fewer points are kept but get ``render`` False.
    n_nearest : int, >= 0
        How many points closest in cosine to each cell's mean activation to list (ties by row).
    top : int, >= 1
        How many classes by mean attribution to list per cell.

    Returns
    -------
    dict[int, Cells]
        One :class:`Cells` per size, ascending.
    """
    sizes = _check_grid_args(sizes, min_count, n_nearest, top)
    xy = np.asarray(xy)
    m = xy.shape[0]
    rows = np.arange(m, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    kept = np.ones(m, dtype=bool) if kept is None else np.asarray(kept, dtype=bool)
    if xy.ndim != 2 or xy.shape[1] != 2 or rows.shape != (m,) or kept.shape != (m,):
        raise AtlasError(f"bin_cells needs xy (M, 2) with rows and kept (M,), got {xy.shape}, {rows.shape}, {kept.shape}")
    if m and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= acts.shape[0]):
        raise AtlasError(f"bin_cells needs ascending distinct rows within the {acts.shape[0]} rows of acts")
    c = acts.shape[1]
    k = attrs.shape[1] if attrs is not None else 0

    cells = {}
    for s in sizes:
        gy, gx = cell_index(xy, s)
        flat = (gy * s + gx).astype(np.int64)
        flat[~kept] = -1
        cells[s] = flat
    sum_act = {s: np.zeros((s * s, c), dtype=np.float64) for s in sizes}
    sum_att = {s: np.zeros((s * s, k), dtype=np.float64) for s in sizes}

    # Pass 1: sums per cell, one streamed read of the laid-out rows for all sizes at once.
    for a, b, block_acts, block_atts in _blocks(acts, attrs, rows):
        for s in sizes:
            _accumulate(sum_act[s], cells[s][a:b], block_acts)
            if block_atts is not None:
                _accumulate(sum_att[s], cells[s][a:b], block_atts)
    counts = {s: np.bincount(cells[s][cells[s] >= 0], minlength=s * s).astype(np.int64) for s in sizes}
    means = {s: sum_act[s] / np.maximum(counts[s], 1)[:, None] for s in sizes}
    del sum_act

    # Pass 2: cosine of each sample to its cell's mean, for the nearest-sample lists.
    scores = {s: np.full(m, -np.inf, dtype=np.float64) for s in sizes}
    if n_nearest:
        unit = {s: means[s] / np.maximum(np.linalg.norm(means[s], axis=1, keepdims=True), 1e-30) for s in sizes}
        for a, b, block_acts, _ in _blocks(acts, None, rows):
            norms = np.maximum(np.linalg.norm(block_acts, axis=1), 1e-30)
            for s in sizes:
                cl = cells[s][a:b]
                ok = cl >= 0
                scores[s][a:b][ok] = np.einsum("ij,ij->i", block_acts[ok], unit[s][cl[ok]]) / norms[ok]

    return {s: _cells(s, cells[s], counts[s], means[s], sum_att[s] if attrs is not None else None, scores[s], rows, min_count,
                      n_nearest, top) for s in sizes}


@store.writer
def grid(run_dir: str | Path, layer: str, settings: GridSettings | None = None, *, sizes: Sequence[int] | None = None,
         atlas: str = FULL_ATLAS, top: int = TOP, whiten: bool = True, **overrides) -> dict:
    """Write ``grids/{layer}/{atlas}/{size}/*`` for every size (and the layer's whitening matrix): the grid stage.

    Per non-empty cell: count, float64-accumulated mean activation and mean attribution, the
    top classes by mean attribution, and the ``n_nearest`` samples of the cell closest in cosine
    to its mean activation (ties by row). Cells with fewer than ``min_count`` samples are kept
    but get ``render`` False. If the run has no attributions (``--no-attribution``) the
    attribution arrays are simply not written. The arrays are computed by :func:`bin_cells`;
    this function only reads and writes the store.

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store must hold ``layouts/{layer}/{atlas}`` (``atlas project``).
    layer : str
        A sampled and laid-out layer, e.g. "mixed4c".
    settings : GridSettings or None, default None
        The settings (:class:`atlas.settings.GridSettings`: sizes, min_count, n_nearest); None: the defaults.
    sizes : sequence of int or None, default None
        Grid sizes replacing ``settings.sizes``, 1 to 2048: the library also bins a 1 x 1 grid, which the settings'
        range (2 to 2048, what configs and the command line ask) leaves out. None: ``settings.sizes``.
    atlas : str, default "full"
        Which layout of the layer to grid (``FULL_ATLAS``; class atlases have their own names).
    top : int, default TOP (5)
        Classes kept per cell, by mean attribution.
    whiten : bool, default True
        Also compute the layer's whitening matrix (:func:`whitening`; skipped when it is up to date).
    **overrides
        Single fields of :class:`~atlas.settings.GridSettings` replacing those of ``settings``, e.g. ``min_count=1``
        (checked by the class; an unknown name is one line).

    Returns
    -------
    dict
        ``sizes`` ({size: summary of the stored grid}), ``whitening`` (:func:`whitening`'s summary, None without
        ``whiten``) and ``seconds``.

    Raises
    ------
    AtlasError
        For a setting out of range, a missing store, layer or layout.
    """
    s = GridSettings.merged(settings, overrides)
    min_count, n_nearest = s.min_count, s.n_nearest
    sizes = _check_grid_args(s.sizes if sizes is None else sizes, min_count, n_nearest, top)
    started = time.perf_counter()
    root = open_for_update(run_dir)
    store.take_lock(run_dir)
    samples = require_layer(root, layer)
    store.verify(root, [f"samples/{layer}", f"layouts/{layer}/{atlas}"])
    rows, xy, inside, layout_attrs = _load_layout(root, layer, atlas)
    drop = layout_attrs.get("outside", "edge") == "drop"
    kept = inside if drop else np.ones(rows.size, dtype=bool)
    attributions = samples.get("attributions") if "attributions" in samples else None
    cells = bin_cells(xy, samples["activations"], attributions, sizes, rows=rows, kept=kept, min_count=min_count,
                      n_nearest=n_nearest, top=top)

    written = [f"grids/{layer}/{atlas}/{s}" for s in sizes] + ([f"whitening/{layer}"] if whiten else [])
    for node in written:  # damaged output of an earlier grid is rewritten from scratch
        if store.damaged(root, node):
            store.remove_node(root, node)
    store.begin_stage(run_dir, "grid", written, atlas)
    group = root.require_group("grids").require_group(layer).require_group(atlas)
    out = {s: _write_cells(group, cells[s], layout_attrs) for s in sizes}
    group.attrs.update({"sizes": sorted({*group.attrs.get("sizes", []), *sizes}), "layout_id": layout_attrs.get("layout_id")})
    white = whitening(run_dir, layer) if whiten else None
    store.finish_stage(run_dir, "grid", written)
    seconds = round(time.perf_counter() - started, 2)
    log(run_dir, f"grid {layer}/{atlas}: sizes {sizes} over {int(kept.sum())} kept samples in {seconds} s"
                 + ("" if attributions is not None else " (no attributions in this run)"))
    return {"sizes": out, "whitening": white, "seconds": seconds}


def _blocks(activations, attributions, rows: np.ndarray):
    """Yield ``(a, b, activations[rows[a:b]], attributions[rows[a:b]] or None)`` as float64, streaming."""
    for a in range(0, rows.size, BLOCK):
        sel = rows[a : a + BLOCK]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        acts = activations[lo:hi][sel - lo].astype(np.float64)
        atts = attributions[lo:hi][sel - lo].astype(np.float64) if attributions is not None else None
        yield a, a + sel.size, acts, atts


def _accumulate(total: np.ndarray, cell: np.ndarray, values: np.ndarray) -> None:
    """``total[cell[i]] += values[i]`` for cell >= 0, in float64, via a sort and segment sums (fast, exact order-independent enough)."""
    ok = np.flatnonzero(cell >= 0)
    if ok.size == 0:
        return
    order = ok[np.argsort(cell[ok], kind="stable")]
    sorted_cells = cell[order]
    starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
    total[sorted_cells[starts]] += np.add.reduceat(values[order], starts, axis=0)


def _cells(s: int, cell: np.ndarray, count: np.ndarray, mean: np.ndarray, sum_att: np.ndarray | None, score: np.ndarray,
           rows: np.ndarray, min_count: int, n_nearest: int, top: int) -> Cells:
    """The :class:`Cells` of one size from its per-point cells, per-cell counts, means and attribution sums."""
    c = mean.shape[1]
    render = (count >= min_count).reshape(s, s)
    mean_att = top_classes = top_values = None
    if sum_att is not None:
        k = sum_att.shape[1]
        mean_att = sum_att / np.maximum(count, 1)[:, None]
        n_top = min(top, k)
        order = np.argsort(-mean_att, axis=1, kind="stable")[:, :n_top]
        top_classes = np.full((s * s, top), -1, dtype=np.int32)
        top_values = np.zeros((s * s, top), dtype=np.float32)
        top_classes[:, :n_top] = order
        top_values[:, :n_top] = np.take_along_axis(mean_att, order, axis=1)
        empty = count == 0
        top_classes[empty], top_values[empty] = -1, 0.0
        mean_att = mean_att.reshape(s, s, k).astype(np.float32)
        top_classes, top_values = top_classes.reshape(s, s, top), top_values.reshape(s, s, top)
    nearest = np.full((s * s, n_nearest), -1, dtype=np.int64)
    if n_nearest:
        members = np.flatnonzero(cell >= 0)
        # by cell, then best score first, then lowest row (deterministic ties)
        order = members[np.lexsort((rows[members], -score[members], cell[members]))]
        sorted_cells = cell[order]
        starts = np.searchsorted(sorted_cells, np.arange(s * s))
        rank = np.arange(order.size) - starts[sorted_cells]
        take = rank < n_nearest
        nearest[sorted_cells[take], rank[take]] = rows[order[take]]
    summary = {"size": s, "min_count": min_count, "n_kept": int((cell >= 0).sum()), "n_cells": int((count > 0).sum()),
               "n_render": int(render.sum()), "n_dropped": int((cell < 0).sum()), "has_attribution": sum_att is not None}
    return Cells(size=s, cell=cell.astype(np.int32), count=count.reshape(s, s).astype(np.int32), render=render,
                 mean_activation=mean.reshape(s, s, c).astype(np.float32), mean_attribution=mean_att, top_classes=top_classes,
                 top_attribution=top_values, nearest=nearest.reshape(s, s, n_nearest), summary=summary)


def _write_cells(group, cells: Cells, layout_attrs: dict) -> dict:
    """Replace ``group/{size}`` with the arrays of ``cells``; returns its summary."""
    node = group.require_group(str(cells.size))
    for name in list(node.array_keys()):
        del node[name]
    write_array(node, "count", cells.count)
    write_array(node, "render", cells.render)
    write_array(node, "mean_activation", cells.mean_activation)
    if cells.mean_attribution is not None:
        write_array(node, "mean_attribution", cells.mean_attribution)
        write_array(node, "top_classes", cells.top_classes)
        write_array(node, "top_attribution", cells.top_attribution)
    write_array(node, "nearest", cells.nearest)
    write_array(node, "cell", cells.cell)
    # The lineage store.verify checks: this grid was binned from the layout with ``layout_id``, and its own content
    # is ``grid_id``, which render records on the icons it draws from it (tiles then refuse icons of an older grid).
    h = hashlib.sha256(json.dumps([layout_attrs.get("layout_id"), cells.summary], sort_keys=True).encode())
    for part in (cells.count, cells.render, cells.mean_activation, cells.nearest, cells.mean_attribution, cells.top_classes):
        if part is not None:
            h.update(np.ascontiguousarray(part).tobytes())
    node.attrs.update({**cells.summary, "layout_id": layout_attrs.get("layout_id"), "grid_id": h.hexdigest()[:16],
                       "nearest_metric": "cosine to cell mean", "summary": cells.summary})
    return cells.summary
