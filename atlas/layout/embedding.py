"""The embedding: rows of activations to 1 or 2 dimensions with UMAP, t-SNE or PCA, seeded (the project stage's pure core).

UMAP's neighbour graph is atlas's own kNN search (:mod:`atlas.layout.neighbors`; faiss with ``knn_backend="faiss"``),
its fuzzy graph umap-learn's, and its layout is optimised by :func:`atlas.layout.optimize.optimize_layout`, started from
a PCA of the data instead of a spectral embedding (slow and fragile on graphs with many components).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from atlas.errors import AtlasError
from atlas.layout.neighbors import DEFAULT_BACKEND, METRICS, as_float32, check_backend, knn_graph
from atlas.layout.optimize import optimize_layout
from atlas.settings import PROJECT_METHODS
from atlas.settings import ProjectSettings as P

METHODS = PROJECT_METHODS
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


def embed(x: np.ndarray, method: str = P.method, n_components: int = 2, *, n_neighbors: int = P.n_neighbors,
          min_dist: float = P.min_dist, metric: str = P.metric, pca: int | None = P.pca, seed: int = P.seed,
          n_epochs: int | None = P.n_epochs, init: str = "pca", perplexity: float = P.perplexity,
          knn: tuple[np.ndarray, np.ndarray] | None = None, verbose: bool = False, progress: bool = False,
          timings: dict | None = None, knn_backend: str = P.knn) -> np.ndarray:
    """Embed rows of ``x`` in ``n_components`` dimensions (1 or 2); seeded and reproducible.

    The pure core of the project stage: no store, no files. The defaults and the ranges shared with the ``[project]``
    table are :class:`atlas.settings.ProjectSettings`' (checked there when called through :func:`project`); this array
    function takes them as keywords so a notebook can embed any array.

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
