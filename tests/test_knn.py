"""Tests of the two kNN backends (atlas's own search and faiss) behind the layout's neighbour graph."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from synthetic import clustered, make_store

from atlas.errors import AtlasError
from atlas.layout import embed, knn_graph, project
from atlas.store import open_store

LAYER = "mixed4c"
BACKENDS = ("atlas", "faiss")


def _exact_cosine(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest rows other than itself of every row, by float64 brute force."""
    unit = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def _recall(idx: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of ``truth`` (self excluded) found among each row's graph neighbours other than itself."""
    others = idx[:, 1:]
    return float(np.mean([np.intersect1d(a, b).size / truth.shape[1] for a, b in zip(others, truth, strict=True)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_regime_matches_brute_force_with_the_same_format(backend):
    x, _ = clustered(3000, 64, 6, seed=11)
    idx, dist = knn_graph(x, 20, "cosine", backend=backend)
    assert idx.shape == dist.shape == (3000, 20) and idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.array_equal(idx[:, 0], np.arange(3000)) and np.all(dist[:, 0] == 0)
    assert not (idx[:, 1:] == np.arange(3000)[:, None]).any()  # the row itself only in column 0
    assert np.all(np.diff(dist, axis=1) >= -1e-6)
    assert _recall(idx, _exact_cosine(x, 19)) >= 0.99
    # cosine distance in umap-learn's convention, 1 - cos
    row = x[5] / np.linalg.norm(x[5])
    direct = 1.0 - (x[idx[5]] / np.linalg.norm(x[idx[5]], axis=1, keepdims=True)) @ row
    np.testing.assert_allclose(dist[5, 1:], direct[1:], atol=1e-5)
    # L2: true (not squared) Euclidean distances
    l2_idx, l2_dist = knn_graph(x, 6, "euclidean", backend=backend)
    np.testing.assert_allclose(l2_dist[9], np.linalg.norm(x[9] - x[l2_idx[9]], axis=1), rtol=1e-3, atol=1e-3)


def test_both_backends_agree_in_the_exact_regime():
    x, _ = clustered(3000, 64, 6, seed=12)
    a_idx, a_dist = knn_graph(x, 15, "cosine", backend="atlas")
    f_idx, f_dist = knn_graph(x, 15, "cosine", backend="faiss")
    assert np.mean(a_idx == f_idx) > 0.99
    np.testing.assert_allclose(a_dist, f_dist, atol=1e-5)


def test_clustered_search_of_both_backends_is_close_to_exact_and_faiss_is_reproducible():
    x, _ = clustered(4000, 64, 10, seed=13)
    truth = _exact_cosine(x, 29)
    graphs = {b: knn_graph(x, 30, "cosine", seed=3, exact_max=1000, backend=b) for b in BACKENDS}  # force the list search
    for backend, (idx, dist) in graphs.items():
        assert idx.shape == (4000, 30) and dist.dtype == np.float32 and np.array_equal(idx[:, 0], np.arange(4000)), backend
        assert (idx >= 0).all() and np.isfinite(dist).all(), backend
        assert _recall(idx, truth) >= 0.9, backend
    again = knn_graph(x, 30, "cosine", seed=3, exact_max=1000, backend="faiss")
    np.testing.assert_array_equal(again[0], graphs["faiss"][0])
    np.testing.assert_array_equal(again[1], graphs["faiss"][1])
    # with one probe per query many rows find fewer than k candidates; those are searched exactly, never left at -1
    few, _ = knn_graph(x, 30, "cosine", exact_max=1000, nprobe=1, backend="faiss")
    assert (few >= 0).all() and np.array_equal(few[:, 0], np.arange(4000))


def test_faiss_keeps_self_first_among_duplicates():
    x, _ = clustered(2000, 32, 4, seed=14)
    x[50:90] = x[50]  # 40 identical rows: faiss may return any of them first
    idx, dist = knn_graph(x, 12, "cosine", backend="faiss")
    assert np.array_equal(idx[:, 0], np.arange(2000)) and np.all(dist[:, 0] == 0)
    assert len(set(idx[60])) == 12 and set(idx[60]) <= set(range(50, 90))


def test_project_with_faiss_end_to_end(tmp_path):
    data = make_store(tmp_path, n=800, c=32, clusters=4)
    attrs = project(tmp_path, LAYER, n_epochs=60, knn="faiss")
    node = open_store(tmp_path)[f"layouts/{LAYER}/full"]
    xy, rows = node["xy"][:], node["rows"][:]
    assert xy.shape == (800, 2) and np.isfinite(xy).all() and attrs["params"]["knn"] == "faiss"
    labels = data["labels"][rows]
    near = knn_graph(xy, 11, "euclidean")[0][:, 1:]
    assert (labels[near] == labels[:, None]).mean() > 0.95
    assert attrs["quality"]["knn_recall_10"] > 0.1
    # t-SNE takes the faiss graph too
    one = embed(data["activations"][:300], "tsne", n_components=1, knn_backend="faiss")
    assert one.shape == (300, 1) and np.isfinite(one).all()


def test_unknown_backend_is_one_clear_error(tmp_path):
    x, _ = clustered(100, 8, 2, seed=0)
    for call in (lambda: knn_graph(x, 5, backend="annoy"), lambda: embed(x, knn_backend="annoy"),
                 lambda: project(tmp_path, LAYER, knn="annoy")):
        with pytest.raises(AtlasError) as err:
            call()
        assert "'annoy'" in str(err.value) and "atlas, faiss" in str(err.value)


def test_settings_and_the_search_module_name_the_same_backends_and_default():
    from atlas.layout.neighbors import BACKENDS as SEARCH_BACKENDS
    from atlas.layout.neighbors import DEFAULT_BACKEND
    from atlas.settings import KNN_BACKENDS, ProjectSettings

    assert tuple(KNN_BACKENDS) == SEARCH_BACKENDS and ProjectSettings().knn == DEFAULT_BACKEND


def test_missing_faiss_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    x, _ = clustered(100, 8, 2, seed=0)
    with pytest.raises(AtlasError, match="needs faiss-cpu"):
        knn_graph(x, 5, backend="faiss")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", *args], capture_output=True, text=True,
                          timeout=120)


def _one_error_line(stderr: str) -> bool:
    line = stderr.strip()
    return "\n" not in line and line.startswith("atlas: error: ") and "'annoy'" in line and "atlas, faiss" in line


def test_cli_unknown_knn_is_one_line(tmp_path):
    make_store(tmp_path, n=300, c=16, clusters=3)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = _cli("project", str(tmp_path), "--layer", LAYER, "--knn", "annoy")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _one_error_line(result.stderr)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no layout written
    built = _cli("build", "--images", str(tmp_path / "no-images"), "--out", str(tmp_path / "run"), "--knn", "annoy")
    assert built.returncode == 2 and "Traceback" not in built.stderr
    assert _one_error_line(built.stderr)
    assert not (tmp_path / "run").exists()
