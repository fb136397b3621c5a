"""The project stage against the store: select a layer's rows, lay them out, store the layout (``save_layout``).

``project`` reads ``samples/{layer}/activations`` (valid rows, or a given subset) and writes
``layouts/{layer}/{atlas}/{rows,raw,xy,inside}`` as ``docs/architecture.md`` specifies; ``save_layout`` is public so
the class atlases (and a notebook) can store layouts computed elsewhere.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from atlas import store
from atlas.errors import AtlasError
from atlas.layout.embedding import embed
from atlas.layout.neighbors import check_backend
from atlas.layout.normalize import normalize_layout
from atlas.layout.quality import layout_quality
from atlas.settings import LayersSettings, ProjectSettings
from atlas.store import FULL_ATLAS, log, open_for_update, open_store, read_rows, require_layer, write_array


def _check_atlas_name(atlas: str) -> None:
    if not atlas or "/" in atlas or atlas.startswith("."):
        raise AtlasError(f"bad atlas name '{atlas}': use a non-empty name without '/'")


@store.writer
def save_layout(run_dir: str | Path, layer: str, atlas: str, rows: np.ndarray, raw: np.ndarray, xy: np.ndarray, inside: np.ndarray,
                attrs: dict) -> dict:
    """Store a layout at ``layouts/{layer}/{atlas}`` (replacing any old one), sorted by row.

    The project stage's store writer, also for layouts computed elsewhere (a notebook, another projection).
    The store's ledger marks the layout as being rewritten (``store.begin_stage``) until the write is finished,
    and drops the build records of this and later stages when the atlas is "full"; the old layout goes with what the
    store derived from it (``store.replace_node``: the atlas's grids and icons, the store's lineage rule, so this stage
    names no other stage's data). Grids also record the ``layout_id`` they were binned from, so ``store.verify``
    refuses a grid of an older layout written by any other route.

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store must hold ``samples/{layer}``.
    layer : str
        A sampled layer.
    atlas : str
        Name of the layout ("full" for the whole layer); a plain name, no "/".
    rows : int array of shape (m,)
        Distinct row indices into ``samples/{layer}``, each in 0..n_rows - 1 (any order; stored sorted).
    raw : float array of shape (m,) or (m, k)
        The embedding in its own units (stored float32).
    xy : float array, same shape as ``raw``
        The embedding mapped to [0, 1] (:func:`normalize_layout`).
    inside : bool array of shape (m,)
        False for points clipped to the edge of the box.
    attrs : dict
        JSON-able attributes stored as given (``outside`` defaults to "edge").

    Returns
    -------
    dict
        ``attrs`` plus ``n`` (rows), ``n_outside`` (points not inside) and ``layout_id`` (a digest of rows and
        ``raw``), as stored.

    Raises
    ------
    ValueError
        If the arrays disagree in length or ``rows`` repeat (a caller's bug).
    AtlasError
        If rows are out of range for the layer, the layer has no samples or ``atlas`` is not a plain name.
    """
    _check_atlas_name(atlas)
    rows = np.asarray(rows, dtype=np.int64)
    raw, xy, inside = np.asarray(raw, np.float32), np.asarray(xy, np.float32), np.asarray(inside, bool)
    if raw.ndim == 1:
        raw, xy = raw[:, None], xy[:, None]
    m = rows.shape[0]
    if not (raw.shape[0] == xy.shape[0] == inside.shape[0] == m) or rows.ndim != 1:
        raise ValueError(f"layout arrays disagree in length: rows {rows.shape}, raw {raw.shape}, xy {xy.shape}, inside {inside.shape}")
    order = np.argsort(rows, kind="stable")
    rows, raw, xy, inside = rows[order], raw[order], xy[order], inside[order]
    if m and np.any(np.diff(rows) == 0):
        raise ValueError("layout rows must be unique")
    root = open_for_update(run_dir)
    n_rows = require_layer(root, layer)["activations"].shape[0]
    if m and (rows[0] < 0 or rows[-1] >= n_rows):
        raise AtlasError(f"layout rows out of range for layer '{layer}' ({n_rows} rows)")
    written = store.derived_nodes(f"layouts/{layer}/{atlas}")  # the layout and what the store derives from it
    store.begin_stage(run_dir, "project", written, atlas)  # from here on the old layout and what was built on it are gone
    store.replace_node(run_dir, f"layouts/{layer}/{atlas}")  # the store's rule: what was built on the old layout goes with it
    layouts = root.require_group("layouts").require_group(layer)
    group = layouts.create_group(atlas)
    write_array(group, "rows", rows)
    write_array(group, "raw", raw)
    write_array(group, "xy", xy)
    write_array(group, "inside", inside)
    digest = hashlib.sha256(rows.tobytes() + raw.tobytes()).hexdigest()[:16]
    full = {**attrs, "n": int(m), "n_outside": int((~inside).sum()), "layout_id": digest}
    full.setdefault("outside", "edge")
    group.attrs.update(full)
    store.finish_stage(run_dir, "project", written)
    return full


def _select_rows(root, layer: str, rows) -> tuple[np.ndarray, int]:
    """Sorted valid rows to lay out, from all valid rows or a mask / index list; also the count of invalid rows dropped."""
    group = require_layer(root, layer)
    n_rows = group["activations"].shape[0]
    if n_rows == 0 or group["valid"].shape[0] == 0:
        raise AtlasError(f"layer '{layer}' has no samples yet; run or resume `atlas sample`")
    valid = group["valid"][:]
    if rows is None:
        chosen = np.flatnonzero(valid)
        if chosen.size == 0:
            raise AtlasError(f"layer '{layer}' has no samples yet; run or resume `atlas sample`")
        return chosen, 0
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n_rows,):
            raise AtlasError(f"row mask has length {rows.shape[0] if rows.ndim else 0}, layer '{layer}' has {n_rows} rows")
        chosen = np.flatnonzero(rows)
    else:
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise AtlasError("rows must be a boolean mask or a list of integer row indices")
        chosen = np.unique(rows.astype(np.int64))
        if chosen.size and (chosen[0] < 0 or chosen[-1] >= n_rows):
            raise AtlasError(f"row indices out of range: layer '{layer}' has {n_rows} rows")
    keep = valid[chosen]
    chosen, dropped = chosen[keep], int((~keep).sum())
    if chosen.size == 0:
        raise AtlasError(f"no valid samples among the selected rows of layer '{layer}'")
    return chosen, dropped


@store.writer
def project(run_dir: str | Path, layer: str, settings: ProjectSettings | None = None, *, atlas: str = FULL_ATLAS, rows=None,
            verbose: bool = False, progress: bool = False, **overrides) -> dict:
    """Lay out a layer's samples and store the layout at ``layouts/{layer}/{atlas}``: the project stage.

    Reads ``samples/{layer}/activations`` of the chosen valid rows, embeds them with :func:`embed`, maps the result
    to [0, 1] with :func:`normalize_layout`, measures its quality and writes it with :func:`save_layout`. Every
    setting is checked (by :class:`atlas.settings.ProjectSettings`) before any work.

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store must hold ``samples/{layer}`` (``atlas sample``).
    layer : str
        A sampled layer, e.g. "mixed4c".
    settings : ProjectSettings or None, default None
        The settings (:class:`atlas.settings.ProjectSettings`: method, n_neighbors, min_dist, metric, pca, seed,
        outside, knn, n_epochs, perplexity, margin); None: the defaults.
    atlas : str, default "full"
        Name of the layout (``FULL_ATLAS``; class atlases use their own names). A plain name, no "/".
    rows : bool mask of length n_rows, integer indices, or None, default None
        The rows to lay out; None means every valid row. Invalid rows among them are skipped and counted
        (``summary["invalid_rows_skipped"]``).
    verbose : bool, default False
        Let umap-learn and openTSNE print their logs.
    progress : bool, default False
        Show progress bars (the command line and ``atlas build`` turn them on).
    **overrides
        Single fields of :class:`~atlas.settings.ProjectSettings` replacing those of ``settings``, e.g.
        ``method="pca"`` (checked by the class; an unknown name is one line).

    Returns
    -------
    dict
        The layout's stored attributes (:func:`save_layout`): ``method``, ``params``, ``seed``, ``quality``
        (kNN recall@10, trustworthiness), ``outside``, ``kind`` ("full" or "subset"), ``n``, ``n_outside``,
        ``layout_id`` and ``summary`` (counts, seconds and timings per step).

    Raises
    ------
    AtlasError
        For a setting out of range, a missing layer or store, no valid rows, or rows out of range.
    """
    s = ProjectSettings.merged(settings, overrides)
    check_backend(s.knn)
    _check_atlas_name(atlas)
    started = time.perf_counter()
    root = open_store(run_dir)
    store.take_lock(run_dir)
    store.verify(root, [f"samples/{layer}"])
    chosen, dropped = _select_rows(root, layer, rows)
    x = read_rows(require_layer(root, layer)["activations"], chosen)
    timings = {"read": round(time.perf_counter() - started, 2)}
    t = time.perf_counter()
    raw = embed(x, s.method, 2, n_neighbors=s.n_neighbors, min_dist=s.min_dist, metric=s.metric, pca=s.pca, seed=s.seed,
                n_epochs=s.n_epochs, perplexity=s.perplexity, verbose=verbose, progress=progress, timings=timings, knn_backend=s.knn)
    timings["embed"] = round(time.perf_counter() - t, 2)
    xy, inside = normalize_layout(raw, margin=s.margin)
    t = time.perf_counter()
    quality = layout_quality(x, raw, metric=s.metric, seed=s.seed)
    timings["quality"] = round(time.perf_counter() - t, 2)
    n_outside = int((~inside).sum())
    shown = {k: quality[k] for k in ("knn_recall_10", "trustworthiness") if quality.get(k) is not None}
    summary = {"n": int(chosen.size), "method": s.method, "seconds": round(time.perf_counter() - started, 2),
               "timings": timings, "knn_recall_10": quality.get("knn_recall_10"),
               "trustworthiness": quality.get("trustworthiness"), "quality": shown, "n_outside": n_outside, "outside": s.outside,
               "invalid_rows_skipped": dropped}
    saved = save_layout(run_dir, layer, atlas, chosen, raw, xy, inside,
                        {"method": s.method, "params": layout_params(s), "seed": s.seed, "quality": quality, "outside": s.outside,
                         "kind": "full" if rows is None else "subset", "summary": summary})
    r = quality.get("knn_recall_10")
    log(run_dir, f"project {layer}/{atlas}: {s.method} of {chosen.size} samples in {summary['seconds']} s, "
                 f"knn recall@10 {r if r is None else round(r, 3)}, {n_outside} outside the clip ({s.outside})")
    return saved


def layout_params(settings: ProjectSettings) -> dict:
    """The parameters a layout records of its method (the ones that method reads). Pure."""
    s = settings
    clip = {"clip_percentiles": [1, 99], "margin": s.margin}
    if s.method == "pca":
        return {"pca": s.pca, **clip}
    params = {"n_neighbors": s.n_neighbors, "min_dist": s.min_dist, "metric": s.metric, "pca": s.pca, "n_epochs": s.n_epochs,
              "perplexity": s.perplexity, **clip, "knn": s.knn}
    if s.method == "tsne":
        return {k: v for k, v in params.items() if k not in ("n_neighbors", "min_dist", "n_epochs")}
    params.pop("perplexity")
    return params


@store.writer
def aligned_project(run_dir: str | Path, layers, settings: LayersSettings | None = None, *, compare: bool = False,
                    **overrides) -> dict:
    """Lay out consecutive layers together with umap-learn's AlignedUMAP, each stored as ``layouts/{layer}/{aligned_atlas}``.

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store must hold every layer's samples.
    layers : sequence of str
        Two or more sampled layers, in network order (consecutive ones are tied).
    settings : LayersSettings or None, default None
        The settings (:class:`atlas.settings.LayersSettings`: aligned_atlas, n_neighbors, min_dist, seed, tolerance,
        alignment, n_epochs); None: the defaults.
    compare : bool, default False
        Also lay out each layer on its own with the same UMAP and report both mean displacements.
    **overrides
        Single fields of :class:`~atlas.settings.LayersSettings` replacing those of ``settings`` (checked by the class).

    Returns
    -------
    dict
        As :func:`atlas.layout.aligned.aligned_layouts`: ``layers``, ``pairs``, ``n``, ``displacement``, ``seconds``.
    """
    from atlas.layout.aligned import aligned_layouts

    s = LayersSettings.merged(settings, overrides)
    return aligned_layouts(run_dir, layers, normalize=normalize_layout, save=save_layout, atlas=s.aligned_atlas,
                           n_neighbors=s.n_neighbors, min_dist=s.min_dist, seed=s.seed, tolerance=s.tolerance,
                           alignment=s.alignment, n_epochs=s.n_epochs, compare=compare)
