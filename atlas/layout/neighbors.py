"""Nearest-neighbour graphs for the layout stage: exact below a size, clustered search above.

The search is built from matrix products so that the CPU spends its time in GEMM: the data
are split into ~2 sqrt(N) k-means lists, and every point of a list is compared with all the
points of the ``nprobe`` lists whose centroids are nearest its own list's centroid, in one
product per list pair. Probing by list rather than by query misses a few true neighbours of
points on a list's border, which a slightly larger ``nprobe`` wins back; on clustered 512-d
data it finds ~0.97 of the exact neighbours at a twentieth of brute force's cost. Below
``EXACT_MAX`` points there is a single list, and the search is exact.

A second backend, ``backend="faiss"`` (faiss-cpu), builds the same graph with faiss: an exact
``IndexFlat`` up to ``EXACT_MAX`` points, an ``IndexIVFFlat`` (seeded k-means lists, probed
per query) above. Both backends return the same arrays in the same convention, so the fuzzy
graph and the optimiser take either; ``bench/layout.py`` times the two side by side.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from atlas.errors import AtlasError

METRICS = ("cosine", "euclidean", "l2")
BACKENDS = ("atlas", "faiss")
DEFAULT_BACKEND = "atlas"  # chosen from bench/layout.py's side-by-side table (docs/layout.md)
EXACT_MAX = 20000  # brute force below this many points: a few seconds, and exact
NPROBE = 10
QUERY_BLOCK = 4096  # rows of a list compared at once, at most
# Scores computed in one call, at most (32 MB of float32). It bounds the score matrix's memory and how long Ctrl-C
# waits: Python runs a signal handler only between two calls into torch or faiss, and 4096 rows against the
# 20,000-point pool of an exact search took 2.5 s on a loaded 2-core machine; 2^23 scores (419 such rows) take a
# tenth of that.
SCORES_PER_BLOCK = 1 << 23
# faiss IVF settings. Lists: 4 sqrt(N), the low end of faiss's guideline. Training: as atlas's own k-means
# (16 points per list, 8 iterations): faiss's default 256 points x 25 iterations cost more than the whole
# search for rough lists. With nprobe 10 it keeps 0.988 of the exact 50 neighbours at 100k and 0.987 at 1M
# (atlas's search: 0.976 and 0.862) at 0.9x and 2.1x atlas's time (bench/layout.py, docs/layout.md).
FAISS_NPROBE = 10
FAISS_TRAIN_PER_LIST = 16
FAISS_KMEANS_ITERS = 8


def as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float32 matrix; non-finite values are an error, since no layout can use them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise AtlasError(f"expected a 2-D array of samples, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise AtlasError("activations contain NaN or infinite values; re-run `atlas sample` for this layer")
    return x


def _search_space(x: np.ndarray, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vectors whose inner products rank neighbours as ``metric`` does, and squared norms for L2.

    For L2 the score of a candidate c for a query q is 2 q.c - |c|^2, which orders candidates
    as -|q - c|^2 does (|q|^2 is the same for all of them).
    """
    vecs = torch.from_numpy(x)
    if metric == "cosine":
        return torch.nn.functional.normalize(vecs, dim=1), None
    return vecs, (vecs * vecs).sum(1)


def _scores(q: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor | None) -> torch.Tensor:
    s = q @ c.T
    return s if c_sq is None else 2.0 * s - c_sq[None, :]


def kmeans(vecs: torch.Tensor, n_lists: int, seed: int, iters: int = 8, spherical: bool = True) -> torch.Tensor:
    """Seeded Lloyd's k-means on up to 16 points per list; the centroids only need to be rough."""
    gen = torch.Generator().manual_seed(int(seed))
    n = vecs.shape[0]
    sample = vecs[torch.randperm(n, generator=gen)[: min(n, 16 * n_lists)].sort().values]
    cent = sample[torch.randperm(sample.shape[0], generator=gen)[:n_lists].sort().values].clone()
    for _ in range(iters):
        assign = _assign(sample, cent, spherical)
        sums = torch.zeros_like(cent).index_add_(0, assign, sample)
        counts = torch.bincount(assign, minlength=n_lists).to(sums.dtype)
        empty = counts == 0
        cent = torch.where(empty[:, None], cent, sums / counts.clamp(min=1)[:, None])
        if spherical:
            cent = torch.nn.functional.normalize(cent, dim=1)
    return cent


def rows_per_block(pool: int, most: int = QUERY_BLOCK) -> int:
    """How many query rows to score against ``pool`` candidates in one product.

    Parameters
    ----------
    pool : int
        Candidates each query row is scored against.
    most : int, default QUERY_BLOCK
        Rows per product at most.

    Returns
    -------
    int
        ``SCORES_PER_BLOCK // pool`` rows, but never fewer than 64 (the products stay matrix products) and never
        more than ``most``.
    """
    return int(min(most, max(64, SCORES_PER_BLOCK // max(pool, 1))))


def _assign(vecs: torch.Tensor, cent: torch.Tensor, spherical: bool) -> torch.Tensor:
    c_sq = None if spherical else (cent * cent).sum(1)
    step = rows_per_block(cent.shape[0], most=65536)
    return torch.cat([_scores(vecs[s : s + step], cent, c_sq).argmax(1) for s in range(0, vecs.shape[0], step)])


def _lists(vecs: torch.Tensor, n: int, exact: bool, seed: int, spherical: bool, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order grouping the lists, list boundaries in that order, and each list's probed lists."""
    if exact:
        return np.arange(n), np.array([0, n]), np.zeros((1, 1), np.int64)
    n_lists = int(min(max(2 * math.sqrt(n), 64), 16384))
    cent = kmeans(vecs, n_lists, seed, spherical=spherical)
    assign = _assign(vecs, cent, spherical).numpy()
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(n_lists + 1))
    probes = _scores(cent, cent, None if spherical else (cent * cent).sum(1)).topk(min(nprobe, n_lists), dim=1).indices.numpy()
    own = np.arange(n_lists)
    lost = ~(probes == own[:, None]).any(axis=1)  # duplicate centroids can tie a list out of its own probes
    probes[lost, -1] = own[lost]
    return order, bounds, probes


def _nearest(queries: torch.Tensor, q_sq: torch.Tensor | None, pool: list[tuple[torch.Tensor, torch.Tensor | None]], k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Distances and positions (in the concatenated ``pool``) of each query's ``k`` nearest pool rows."""
    scores = torch.cat([_scores(queries, c, c_sq) for c, c_sq in pool], dim=1)
    top, where = scores.topk(min(k, scores.shape[1]), dim=1)
    dist = (1.0 - top) if q_sq is None else (q_sq[:, None] - top).clamp(min=0.0).sqrt()
    return dist.clamp(min=0.0).numpy(), where.numpy()


def check_backend(backend: str) -> str:
    """``backend`` if it names a kNN backend, else the one-line error."""
    if backend not in BACKENDS:
        raise AtlasError(f"unknown kNN backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    return backend


def knn_graph(x: np.ndarray, k: int, metric: str = "cosine", seed: int = 0, exact_max: int = EXACT_MAX,
              nprobe: int | None = None, progress: bool = False, backend: str = DEFAULT_BACKEND) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row (itself first, distance 0).

    Returns ``(indices int64 (N, k), distances float32 (N, k))`` in umap-learn's convention
    (cosine distance = 1 - cos; Euclidean distance for "euclidean"/"l2"). Exact up to
    ``exact_max`` rows; above, the clustered search of this module (``backend="atlas"``) or a
    faiss IVF index (``backend="faiss"``). ``nprobe`` None means the backend's default
    (``NPROBE``, ``FAISS_NPROBE``). Self is forced into column 0 so exact duplicates cannot push it out.
    """
    check_backend(backend)
    if metric not in METRICS:
        raise ValueError(f"the kNN search supports {METRICS}, not {metric!r}")
    x = as_float32(x)
    n = x.shape[0]
    k = min(k, n)
    vecs, sq = _search_space(x, metric)
    if backend == "faiss":
        idx, dists = _faiss_search(vecs, sq is None, k, seed, n <= exact_max, FAISS_NPROBE if nprobe is None else nprobe, progress)
        return _self_first(idx, dists, vecs, sq, k)
    nprobe = NPROBE if nprobe is None else nprobe
    order, bounds, probes = _lists(vecs, n, n <= exact_max, seed, sq is None, nprobe)
    grouped = vecs[torch.from_numpy(order)].contiguous()
    grouped_sq = None if sq is None else sq[torch.from_numpy(order)].contiguous()

    def part(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return grouped[a:b], None if grouped_sq is None else grouped_sq[a:b]

    dists = np.zeros((n, k), np.float32)
    idx = np.full((n, k), -1, np.int64)
    for lst in tqdm(range(len(bounds) - 1), desc="kNN graph", unit="list", disable=not progress):
        cand = np.concatenate([np.arange(bounds[p], bounds[p + 1]) for p in probes[lst]])
        pool = [part(bounds[lst], bounds[lst + 1])] if len(probes[lst]) == 1 else [
            (grouped[torch.from_numpy(cand)], None if grouped_sq is None else grouped_sq[torch.from_numpy(cand)])]
        step = rows_per_block(len(cand))
        for q0 in range(bounds[lst], bounds[lst + 1], step):
            q1 = min(q0 + step, bounds[lst + 1])
            d, where = _nearest(*part(q0, q1), pool, k)
            rows = order[q0:q1]
            idx[rows, : d.shape[1]] = order[cand[where]]
            dists[rows, : d.shape[1]] = d
    return _self_first(idx, dists, vecs, sq, k)


def _self_first(idx: np.ndarray, dists: np.ndarray, vecs: torch.Tensor, sq: torch.Tensor | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill rows the search left short (-1 entries) by brute force, then put each row itself first at distance 0."""
    n = idx.shape[0]
    missing = np.flatnonzero((idx < 0).any(axis=1))
    step = rows_per_block(n)
    for q0 in range(0, missing.size, step):  # probed lists held fewer than k points: search those rows exactly
        rows = torch.from_numpy(missing[q0 : q0 + step])
        d, where = _nearest(vecs[rows], None if sq is None else sq[rows], [(vecs, sq)], k)
        idx[rows.numpy()], dists[rows.numpy()] = where, d
    keep = others_first(idx, k - 1)
    out_idx = np.concatenate([np.arange(n)[:, None], np.take_along_axis(idx, keep, axis=1)], axis=1)
    out_dist = np.concatenate([np.zeros((n, 1), np.float32), np.take_along_axis(dists, keep, axis=1)], axis=1)
    return out_idx, out_dist


def _faiss_search(vecs: torch.Tensor, inner: bool, k: int, seed: int, exact: bool, nprobe: int, progress: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows by faiss: ``IndexFlat`` when ``exact``, else a seeded ``IndexIVFFlat``.

    ``vecs`` are the search-space rows of ``_search_space`` (unit rows when ``inner``, ranked by
    inner product; raw rows otherwise, ranked by L2). Returns (indices, distances) in this
    module's convention, -1 where a query's probed lists held fewer than ``k`` points.
    faiss uses as many OpenMP threads as torch does, so ``torch.set_num_threads`` bounds both backends.
    """
    try:
        import faiss
    except ImportError:
        raise AtlasError("the faiss kNN backend needs faiss-cpu: pip install faiss-cpu (or use --knn atlas)") from None
    data = vecs.numpy()  # shares memory with the torch tensor; C-contiguous float32
    n, d = data.shape
    faiss.omp_set_num_threads(torch.get_num_threads())
    faiss_metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
    if exact:
        index = faiss.IndexFlat(d, faiss_metric)
    else:
        # faiss's guideline is 4-16 sqrt(N) lists; the smallest keeps training and the coarse assignment cheap.
        n_lists = int(min(max(4 * math.sqrt(n), 64), 65536))
        quantizer = faiss.IndexFlat(d, faiss_metric)
        index = faiss.IndexIVFFlat(quantizer, d, n_lists, faiss_metric)
        index.cp.seed = int(seed)
        index.cp.niter = FAISS_KMEANS_ITERS
        index.cp.max_points_per_centroid = FAISS_TRAIN_PER_LIST
        index.cp.min_points_per_centroid = 1  # rough lists are enough; no warning about the small training set
        index.cp.spherical = inner  # unit centroids for inner-product lists, as atlas's own k-means
        index.train(data)
        index.nprobe = probe = min(nprobe, n_lists)
    # Rows per search call. IVF: each query scores its probed lists, about probe * n / n_lists rows, so the budget
    # bounds a call (same neighbours, same time). Exact: faiss's BLAS search blocks the queries itself, and smaller
    # calls changed the distances' last bits and ran 3x slower here, so one call per 65536 rows stays.
    block = 65536 if exact else rows_per_block(probe * n // n_lists, most=65536)
    dists = np.empty((n, k), np.float32)
    idx = np.empty((n, k), np.int64)
    bar = tqdm(total=n, desc="kNN graph (faiss)", unit="row", unit_scale=True, disable=not progress)
    if exact:
        index.add(data)
        for a in range(0, n, block):
            dists[a : a + block], idx[a : a + block] = index.search(data[a : a + block], k)
            bar.update(len(idx[a : a + block]))
    else:
        # The queries are the indexed rows themselves, so one coarse search gives each row both its own list
        # (the nearest centroid, where add() would put it) and its probed lists; add() and search() would
        # each run that O(N sqrt(N) d) pass, the largest single cost at 1M points.
        coarse_d = np.empty((n, probe), np.float32)
        coarse_i = np.empty((n, probe), np.int64)
        coarse = rows_per_block(n_lists, most=65536)
        for a in range(0, n, coarse):
            coarse_d[a : a + coarse], coarse_i[a : a + coarse] = quantizer.search(data[a : a + coarse], probe)
        own = np.ascontiguousarray(coarse_i[:, 0])
        index.add_core(n, faiss.swig_ptr(data), None, faiss.swig_ptr(own))
        for a in range(0, n, block):
            dists[a : a + block], idx[a : a + block] = index.search_preassigned(data[a : a + block], k, coarse_i[a : a + block],
                                                                               coarse_d[a : a + block])
            bar.update(len(idx[a : a + block]))
    bar.close()
    found = idx >= 0
    if inner:
        dists = np.where(found, 1.0 - dists, 0.0)
    else:
        dists = np.sqrt(np.where(found, dists, 0.0))  # faiss's L2 distances are squared
    return idx, np.maximum(dists, 0.0).astype(np.float32)


def others_first(idx: np.ndarray, m: int) -> np.ndarray:
    """Column positions of the first ``m`` entries of each row of ``idx`` that are not the row itself.

    Row i of a neighbour list should hold i first, but exact duplicates tie with it, so i
    may sit anywhere or be missing; this keeps the others in their order either way.
    """
    return np.argsort(idx == np.arange(len(idx))[:, None], axis=1, kind="stable")[:, :m]
