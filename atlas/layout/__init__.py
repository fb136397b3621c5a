"""Layout stage: project sampled activations to 2-D (UMAP, t-SNE or PCA) and normalise.

``project`` reads ``samples/{layer}/activations`` (valid rows, or a given subset) and writes
``layouts/{layer}/{atlas}/{rows,raw,xy,inside}`` as ``docs/architecture.md`` specifies. The
array-level pieces (``embed``, ``knn_graph``, ``normalize_layout``, ``knn_recall``,
``save_layout``) are public so the class atlases can build and store their own layouts.

Speed at large N comes from three pieces of this sub-package: the nearest-neighbour graph
is a GEMM-based clustered search (``neighbors``; faiss with ``knn="faiss"``), the fuzzy graph is umap-learn's own, and
the layout is optimised by a parallel yet reproducible version of umap-learn's SGD
(``optimize``); ``quality`` measures the result (kNN recall, trustworthiness). The initialisation is a PCA of
the data instead of a spectral embedding,
which is slow and fragile on graphs with many components (clustered data, duplicates).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import numpy as np

from atlas import store
from atlas.errors import AtlasError
from atlas.layout.neighbors import DEFAULT_BACKEND, METRICS, as_float32, check_backend, knn_graph
from atlas.layout.optimize import optimize_layout
from atlas.layout.quality import knn_recall, layout_quality, trustworthiness  # noqa: F401  (public here too)
from atlas.settings import ProjectSettings
from atlas.store import FULL_ATLAS, log, open_for_update, open_store, read_rows, require_layer, write_array

METHODS = ("umap", "tsne", "pca")
OUTSIDE = ("edge", "drop")
# Above LARGE_N points the default is LARGE_N_EPOCHS optimisation epochs (umap-learn: 200): with the PCA
# start, measured at 100k (bench/layout.py) it costs ~0.01 kNN recall and saves half of the optimisation.
LARGE_N, LARGE_N_EPOCHS = 10000, 100
SMALL_N_EPOCHS = 500


# ----------------------------------------------------------------------------- helpers


def pca_project(x: np.ndarray, d: int, center: bool = True) -> np.ndarray:
    """Project onto the top ``d`` principal axes (float64 second moments, deterministic signs).

    ``center=False`` uses the uncentred second moment, which keeps inner products, and so
    cosine similarities of non-negative activations, better than centred PCA does.
    """
    x = np.asarray(x, dtype=np.float32)
    d = max(1, min(d, x.shape[1]))
    mean = x.mean(axis=0, dtype=np.float64) if center else np.zeros(x.shape[1])
    moment = np.zeros((x.shape[1], x.shape[1]))
    mean32 = mean.astype(np.float32)
    for start in range(0, x.shape[0], 65536):
        block = x[start : start + 65536] - mean32  # float32 products (fast), summed per block in float64
        moment += block.T @ block
    _, vecs = np.linalg.eigh(moment)
    vecs = vecs[:, ::-1][:, :d]
    vecs *= np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(d)])  # fixed sign: largest loading positive
    out = np.empty((x.shape[0], d), dtype=np.float32)
    vecs32 = vecs.astype(np.float32)
    for start in range(0, x.shape[0], 65536):
        out[start : start + 65536] = (x[start : start + 65536] - mean32) @ vecs32
    return out


def _scaled_init(x: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """PCA coordinates scaled to [-10, 10] with a little seeded noise, as umap's own "pca" init."""
    init = pca_project(x, n_components, center=True).astype(np.float64)
    span = np.abs(init).max(axis=0)
    init = init / np.where(span > 0, span, 1.0) * 10.0
    init += np.random.default_rng(seed).normal(scale=1e-4, size=init.shape)
    return init.astype(np.float32)


# ----------------------------------------------------------------------------- embedding


def embed(x: np.ndarray, method: str = "umap", n_components: int = 2, *, n_neighbors: int = 50, min_dist: float = 0.05,
          metric: str = "cosine", pca: int | None = None, seed: int = 0, n_epochs: int | None = None, init: str = "pca",
          perplexity: float = 30.0, knn: tuple[np.ndarray, np.ndarray] | None = None, verbose: bool = False,
          progress: bool = False, timings: dict | None = None, knn_backend: str = DEFAULT_BACKEND) -> np.ndarray:
    """Embed rows of ``x`` in ``n_components`` dimensions (1 or 2); seeded and reproducible.

    The pure core of the project stage: no store, no files. Ranges shared with the ``[project]`` table are
    :class:`atlas.settings.ProjectSettings`' (they are checked there when called through :func:`project`).

    Parameters
    ----------
    x : array of shape (n, d)
        The rows to embed (any float type; computed in float32). At least one row. With ``n <= n_components + 2``
        rows, or all rows identical, the result is a centred PCA whatever ``method`` says.
    method : str, default "umap"
        "umap", "tsne" or "pca" (``ProjectSettings.method``).
    n_components : int, default 2
        1 or 2.
    n_neighbors : int, default 50
        UMAP's neighbourhood size, at least 2 (``ProjectSettings.n_neighbors``); UMAP only.
    min_dist : float, default 0.05
        UMAP's minimum distance between embedded points, 0 to 1 (``ProjectSettings.min_dist``); UMAP only.
    metric : str, default "cosine"
        Distance between rows: "cosine", "euclidean", "l2", "manhattan" or "correlation" (``ProjectSettings.metric``).
    pca : int or None, default None
        Reduce ``x`` to this many dimensions with PCA first (uncentred for cosine and correlation, so angles are
        kept); at least 1 (``ProjectSettings.pca``). None, or a value of at least ``d``, means no reduction. A
        reduction discards ``knn``, which no longer matches the reduced data.
    seed : int, default 0
        Seed of the embedding, 0 to 2**32 - 1 (``ProjectSettings.seed``); same seed and data, same result.
    n_epochs : int or None, default None
        UMAP's optimisation epochs. None means umap-learn's default (500) up to ``LARGE_N`` (10,000) rows and
        ``LARGE_N_EPOCHS`` (100) above.
    init : str, default "pca"
        UMAP's starting layout: "pca" or "random".
    perplexity : float, default 30.0
        t-SNE's perplexity, greater than 0; lowered to ``(n - 1) / 3`` (and at least 1) for small ``n``. t-SNE only.
    knn : (indices, distances) or None, default None
        A precomputed ``knn_graph`` of ``x`` (UMAP and t-SNE), so a caller embedding the same rows twice searches once.
        None: the graph is searched with ``knn_backend``.
    verbose : bool, default False
        Let umap-learn and openTSNE print their logs.
    progress : bool, default False
        Show progress bars for UMAP's kNN search and epochs.
    timings : dict or None, default None
        If given, receives seconds per step (kNN search, epochs, ...).
    knn_backend : str, default "atlas"
        The search that builds the kNN graph when ``knn`` is None: "atlas" (its own) or "faiss"
        (``ProjectSettings.knn``; docs/layout.md compares them).

    Returns
    -------
    array of shape (n, n_components), float32
        The embedding, in the method's own units (:func:`normalize_layout` maps it to [0, 1]).

    Raises
    ------
    AtlasError
        For an unknown ``method``, ``init`` or ``knn_backend``, ``n_components`` other than 1 or 2, or no rows.

    Duplicate points are handled: if the graph or the optimisation fails on them (RecursionError and friends,
    non-finite coordinates) the data is jittered by a tiny seeded amount and the fit retried.
    """
    if method not in METHODS:
        raise AtlasError(f"unknown projection method '{method}'; choose one of {', '.join(METHODS)}")
    if init not in ("pca", "random"):
        raise AtlasError(f"unknown UMAP init '{init}'; choose pca or random")
    if n_components not in (1, 2):
        raise AtlasError(f"n_components must be 1 or 2, not {n_components}")
    check_backend(knn_backend)
    x = as_float32(x)
    n = x.shape[0]
    if n == 0:
        raise AtlasError("nothing to project: no samples selected")
    if n <= n_components + 2 or (x.std(axis=0).max() == 0.0):
        # Too few (or all identical) points for a neighbour method: a PCA is the only sensible layout.
        return pca_project(x, n_components, center=True)
    if pca is not None and 0 < pca < x.shape[1]:
        x = pca_project(x, pca, center=metric not in ("cosine", "correlation"))
        knn = None  # a graph of the unreduced data no longer matches
    if method == "pca":
        return pca_project(x, n_components, center=True)
    if method == "tsne":
        return _tsne(x, n_components, metric, perplexity, seed, knn, verbose, knn_backend)
    return _umap(x, n_components, n_neighbors, min_dist, metric, seed, n_epochs, init, knn, verbose or progress,
                 timings if timings is not None else {}, knn_backend)


def _umap(x: np.ndarray, n_components: int, n_neighbors: int, min_dist: float, metric: str, seed: int, n_epochs: int | None,
          init: str, knn: tuple[np.ndarray, np.ndarray] | None, progress: bool, timings: dict,
          backend: str = DEFAULT_BACKEND) -> np.ndarray:
    from umap.umap_ import find_ab_params, fuzzy_simplicial_set, nearest_neighbors

    n = x.shape[0]
    k = max(2, min(n_neighbors, n - 1))
    if n_epochs is None:
        n_epochs = LARGE_N_EPOCHS if n > LARGE_N else SMALL_N_EPOCHS
    a, b = find_ab_params(1.0, min_dist)
    data = x
    for attempt in range(3):
        try:
            t = time.perf_counter()
            if knn is None:
                if metric in METRICS:
                    knn = knn_graph(data, k, metric, seed, progress=progress, backend=backend)
                else:  # other metrics: umap-learn's own search (NN-descent)
                    knn = nearest_neighbors(data, k, metric, {}, False, np.random.RandomState(seed))[:2]
            timings["knn"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            graph = fuzzy_simplicial_set(data, k, np.random.RandomState(seed), metric, knn_indices=knn[0][:, :k],
                                         knn_dists=knn[1][:, :k])[0]
            timings["graph"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            if init == "pca" and attempt < 2:
                start = _scaled_init(data, n_components, seed)
            else:  # last resort: no PCA step to fail on degenerate data
                start = np.random.default_rng(seed).uniform(-10.0, 10.0, (n, n_components))
            out = optimize_layout(graph, start, n_epochs, a, b, seed=seed, verbose=progress)
            timings["optimize"] = round(time.perf_counter() - t, 2)
            if np.isfinite(out).all():
                return out
            problem = "non-finite coordinates"
        except (RecursionError, ValueError, ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        # Duplicates are the usual cause: break ties with a tiny seeded jitter and retry.
        rng = np.random.default_rng(seed + 1000 + attempt)
        scale = float(np.abs(x).mean()) or 1.0
        data = x + rng.normal(scale=1e-4 * scale, size=x.shape).astype(np.float32)
        knn = None
        warnings.warn(f"umap failed ({problem}); retrying with jittered data", RuntimeWarning, stacklevel=2)
    raise AtlasError(f"UMAP failed on this data even after jittering ({problem}); try --method tsne or --method pca")


def _tsne(x: np.ndarray, n_components: int, metric: str, perplexity: float, seed: int, knn: tuple[np.ndarray, np.ndarray] | None,
          verbose: bool, backend: str = DEFAULT_BACKEND) -> np.ndarray:
    n = x.shape[0]
    perplexity = float(max(1.0, min(perplexity, (n - 1) / 3.0)))
    try:
        import openTSNE
    except ImportError:  # pragma: no cover - openTSNE is a dependency; sklearn only for small N
        if n > 20000:
            raise AtlasError("t-SNE of more than 20,000 points needs openTSNE (pip install openTSNE)") from None
        from sklearn.manifold import TSNE

        return TSNE(n_components, perplexity=perplexity, metric=metric, init="pca", random_state=seed).fit_transform(x).astype(np.float32)
    from openTSNE import affinity, initialization
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    k = min(n - 1, int(3 * perplexity) + 1)
    if metric in METRICS:
        if knn is None or knn[0].shape[1] < k + 1:
            knn = knn_graph(x, k + 1, metric, seed, backend=backend)
        neighbours = PrecomputedNeighbors(knn[0][:, 1 : k + 1], knn[1][:, 1 : k + 1].astype(np.float64))
        aff = affinity.PerplexityBasedNN(perplexity=perplexity, knn_index=neighbours, random_state=seed, verbose=verbose)
    else:
        aff = affinity.PerplexityBasedNN(x, perplexity=perplexity, metric=metric, random_state=seed, verbose=verbose)
    start = initialization.pca(x, n_components=n_components, random_state=seed)
    # FFT interpolation has a large fixed cost per iteration in 2-D: Barnes-Hut is faster below ~10k points.
    gradient = "fft" if n_components == 1 or n >= 10000 else "bh"
    tsne = openTSNE.TSNE(n_components=n_components, random_state=seed, negative_gradient_method=gradient, n_jobs=1, verbose=verbose)
    return np.asarray(tsne.fit(affinities=aff, initialization=start), dtype=np.float32)


# ----------------------------------------------------------------------------- normalising and quality


def normalize_layout(raw: np.ndarray, lo: float = 1.0, hi: float = 99.0, margin: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Map a layout to [0, 1] as the paper does; returns ``(xy float32, inside bool)``.

    Per axis: take the ``lo``-``hi`` percentile range, widen it by ``margin`` of its width on
    each side, clip to that box and rescale it to [0, 1]. Clipped points land exactly on 0 or
    1 (the edge cells); ``inside`` is False for them. A constant axis maps to 0.5.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1:
        raw = raw[:, None]
    if raw.shape[0] == 0:
        return np.zeros(raw.shape, np.float32), np.zeros(0, bool)
    p_lo, p_hi = np.percentile(raw, [lo, hi], axis=0)
    width = p_hi - p_lo
    box_lo, box_hi = p_lo - margin * width, p_hi + margin * width
    span = box_hi - box_lo
    flat = span <= 0
    safe = np.where(flat, 1.0, span)
    inside = ((raw >= box_lo) & (raw <= box_hi)).all(axis=1)
    xy = np.clip((raw - box_lo) / safe, 0.0, 1.0)
    xy[:, flat] = 0.5
    return xy.astype(np.float32), inside


# ----------------------------------------------------------------------------- store


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
def project(run_dir: str | Path, layer: str, method: str = "umap", atlas: str = FULL_ATLAS, rows=None, n_neighbors: int = 50,
            min_dist: float = 0.05, metric: str = "cosine", pca: int | None = None, seed: int = 0, outside: str = "edge",
            n_epochs: int | None = None, perplexity: float = 30.0, margin: float = 0.1, verbose: bool = False,
            progress: bool = False, knn: str = DEFAULT_BACKEND) -> dict:
    """Lay out a layer's samples and store the layout at ``layouts/{layer}/{atlas}``: the project stage.

    Reads ``samples/{layer}/activations`` of the chosen valid rows, embeds them with :func:`embed`, maps the result
    to [0, 1] with :func:`normalize_layout`, measures its quality and writes it with :func:`save_layout`. The
    settings shared with the ``[project]`` table take their defaults and ranges from
    :class:`atlas.settings.ProjectSettings` (a value out of range fails in one line before any work).

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store must hold ``samples/{layer}`` (``atlas sample``).
    layer : str
        A sampled layer, e.g. "mixed4c".
    method : str, default "umap"
        "umap", "tsne" or "pca" (``ProjectSettings.method``).
    atlas : str, default "full"
        Name of the layout (``FULL_ATLAS``; class atlases use their own names). A plain name, no "/".
    rows : bool mask of length n_rows, integer indices, or None, default None
        The rows to lay out; None means every valid row. Invalid rows among them are skipped and counted
        (``summary["invalid_rows_skipped"]``).
    n_neighbors : int, default 50
        UMAP's neighbourhood size, at least 2 (``ProjectSettings.n_neighbors``).
    min_dist : float, default 0.05
        UMAP's minimum distance, 0 to 1 (``ProjectSettings.min_dist``).
    metric : str, default "cosine"
        "cosine", "euclidean", "l2", "manhattan" or "correlation" (``ProjectSettings.metric``).
    pca : int or None, default None
        PCA dimensions before the embedding, at least 1; None: no reduction (``ProjectSettings.pca``).
    seed : int, default 0
        Seed of the layout, 0 to 2**32 - 1 (``ProjectSettings.seed``).
    outside : str, default "edge"
        What the grid does with points beyond the 1-99th percentile clip box: "edge" keeps them in the edge cells,
        "drop" leaves them out (the layout keeps them, flagged in ``inside``) (``ProjectSettings.outside``).
    n_epochs : int or None, default None
        UMAP's epochs; None: :func:`embed`'s default.
    perplexity : float, default 30.0
        t-SNE's perplexity (positive).
    margin : float, default 0.1
        Widening of the clip box on each side, as a fraction of its width (:func:`normalize_layout`).
    verbose : bool, default False
        Let umap-learn and openTSNE print their logs.
    progress : bool, default False
        Show progress bars (the command line and ``atlas build`` turn them on).
    knn : str, default "atlas"
        The search behind UMAP's and t-SNE's neighbour graph: "atlas" (its own) or "faiss" (``ProjectSettings.knn``).

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
    if method not in METHODS:
        raise AtlasError(f"unknown projection method '{method}'; choose one of {', '.join(METHODS)}")
    if outside not in OUTSIDE:
        raise AtlasError(f"--outside must be 'edge' or 'drop', not '{outside}'")
    if n_neighbors < 2:
        raise AtlasError(f"n_neighbors must be at least 2, not {n_neighbors}")
    if min_dist < 0:
        raise AtlasError(f"min_dist must be non-negative, not {min_dist}")
    # The rest of the ranges (metric, pca, seed, min_dist <= 1, the kNN backend) are ProjectSettings' own.
    ProjectSettings(method=method, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, pca=pca, seed=seed, outside=outside,
                    knn=knn)
    check_backend(knn)
    _check_atlas_name(atlas)
    started = time.perf_counter()
    root = open_store(run_dir)
    store.take_lock(run_dir)
    store.verify(root, [f"samples/{layer}"])
    chosen, dropped = _select_rows(root, layer, rows)
    x = read_rows(require_layer(root, layer)["activations"], chosen)
    timings = {"read": round(time.perf_counter() - started, 2)}
    t = time.perf_counter()
    raw = embed(x, method, 2, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, pca=pca, seed=seed, n_epochs=n_epochs,
                perplexity=perplexity, verbose=verbose, progress=progress, timings=timings, knn_backend=knn)
    timings["embed"] = round(time.perf_counter() - t, 2)
    xy, inside = normalize_layout(raw, margin=margin)
    t = time.perf_counter()
    quality = layout_quality(x, raw, metric=metric, seed=seed)
    timings["quality"] = round(time.perf_counter() - t, 2)
    params = {"n_neighbors": n_neighbors, "min_dist": min_dist, "metric": metric, "pca": pca, "n_epochs": n_epochs,
              "perplexity": perplexity, "clip_percentiles": [1, 99], "margin": margin, "knn": knn}
    if method == "pca":
        params = {"pca": pca, "clip_percentiles": [1, 99], "margin": margin}
    elif method == "tsne":
        params = {k: v for k, v in params.items() if k not in ("n_neighbors", "min_dist", "n_epochs")}
    else:
        params.pop("perplexity")
    n_outside = int((~inside).sum())
    shown = {k: quality[k] for k in ("knn_recall_10", "trustworthiness") if quality.get(k) is not None}
    summary = {"n": int(chosen.size), "method": method, "seconds": round(time.perf_counter() - started, 2),
               "timings": timings, "knn_recall_10": quality.get("knn_recall_10"),
               "trustworthiness": quality.get("trustworthiness"), "quality": shown, "n_outside": n_outside, "outside": outside,
               "invalid_rows_skipped": dropped}
    saved = save_layout(run_dir, layer, atlas, chosen, raw, xy, inside,
                        {"method": method, "params": params, "seed": seed, "quality": quality, "outside": outside,
                         "kind": "full" if rows is None else "subset", "summary": summary})
    r = quality.get("knn_recall_10")
    log(run_dir, f"project {layer}/{atlas}: {method} of {chosen.size} samples in {summary['seconds']} s, "
                 f"knn recall@10 {r if r is None else round(r, 3)}, {n_outside} outside the clip ({outside})")
    return saved



@store.writer
def aligned_project(run_dir: str | Path, layers, **kwargs) -> dict:
    """Lay out consecutive layers together with umap-learn's AlignedUMAP (``atlas.layout.aligned``), each stored as
    ``layouts/{layer}/aligned``; keyword arguments as :func:`atlas.layout.aligned.aligned_layouts`."""
    from atlas.layout.aligned import aligned_layouts

    return aligned_layouts(run_dir, layers, normalize=normalize_layout, save=save_layout, **kwargs)
