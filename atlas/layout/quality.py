"""How faithful a layout is to the space it came from: kNN recall and trustworthiness (pure functions on arrays).

``project`` stores both in the layout's ``quality`` attrs; ``bench/layout.py`` compares layouts by them.
"""

from __future__ import annotations

import math

import numpy as np

from atlas.layout.neighbors import METRICS, knn_graph, others_first

__all__ = ["knn_recall", "layout_quality", "trustworthiness"]


def _neighbours(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact k nearest neighbours within ``x``, self excluded (a k-d tree for layouts, GEMM or sklearn otherwise)."""
    if x.shape[1] <= 3 and metric in ("euclidean", "l2"):
        from scipy.spatial import cKDTree

        idx = cKDTree(x).query(x, k + 1)[1]
    elif metric in METRICS:
        return knn_graph(x, k + 1, metric, exact_max=len(x) + 1)[0][:, 1:]
    else:
        from sklearn.neighbors import NearestNeighbors

        idx = NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(x).kneighbors(x, return_distance=False)
    return np.take_along_axis(idx, others_first(idx, k), axis=1)


def trustworthiness(x: np.ndarray, y: np.ndarray, k: int = 10, metric: str = "cosine") -> float:
    """Venna and Kaski's trustworthiness of layout ``y`` of ``x``: 1 when every layout neighbour is a true one.

    Each of a point's ``k`` layout neighbours that is not among its ``k`` nearest in ``x``
    is penalised by how far down its ranking in ``x`` it sits. Needs all pairwise distances,
    so call it on a subsample of a few thousand points.
    """
    from sklearn.metrics import pairwise_distances

    n = x.shape[0]
    dist = pairwise_distances(np.asarray(x, np.float32), metric=metric)
    np.fill_diagonal(dist, np.inf)
    near = _neighbours(np.asarray(y, np.float32).reshape(n, -1), k, "euclidean")
    penalty = 0
    for start in range(0, n, 256):
        d = dist[start : start + 256]
        to_near = np.take_along_axis(d, near[start : start + 256], axis=1)
        ranks = (d[:, None, :] < to_near[:, :, None]).sum(axis=2) + 1  # 1 = the nearest point in x
        penalty += int(np.maximum(ranks - k, 0).sum())
    return float(1.0 - penalty * 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)))


def knn_recall(x: np.ndarray, y: np.ndarray, k: int = 10, n: int = 10000, seed: int = 0, metric: str = "cosine") -> float:
    """Mean fraction of each point's ``k`` nearest neighbours in ``x`` (under ``metric``) that are
    also among its ``k`` nearest in the layout ``y`` (Euclidean), on a seeded subsample of ``n``.

    Neighbours are searched within the subsample in both spaces, so the figure is comparable
    across N and cheap at 1M points.
    """
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)
    if y.ndim == 1:
        y = y[:, None]
    m = x.shape[0]
    if m <= k:
        return float("nan")
    sel = np.sort(np.random.default_rng(seed).choice(m, min(n, m), replace=False))
    a = _neighbours(x[sel], k, metric)
    b = _neighbours(y[sel], k, "euclidean")
    hits = (a[:, :, None] == b[:, None, :]).any(axis=2).sum()
    return float(hits / (a.shape[0] * k))


def layout_quality(x: np.ndarray, y: np.ndarray, metric: str = "cosine", seed: int = 0, n: int = 10000, n_trust: int = 2000) -> dict:
    """kNN recall (k=10, up to ``n`` points) and trustworthiness (k=10, up to ``n_trust`` points: it needs all pairwise ranks)."""
    m = x.shape[0]
    quality = {"knn_recall_10": knn_recall(x, y, 10, n, seed, metric), "knn_recall_n": int(min(n, m))}
    if m > 11:
        sel = np.sort(np.random.default_rng(seed + 1).choice(m, min(n_trust, m), replace=False))
        k = min(10, (len(sel) - 1) // 2 - 1)
        if k >= 1:
            quality["trustworthiness"] = trustworthiness(x[sel], y[sel], k, metric)
            quality["trustworthiness_n"] = int(len(sel))
    return {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in quality.items()}
