"""Tests of the layout stage (atlas.layout, `atlas project`) on small synthetic stores."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
from synthetic import clustered, make_store

from atlas import layout
from atlas.errors import AtlasError
from atlas.layout import embed, embedding, knn_graph, knn_recall, normalize_layout, project, save_layout
from atlas.store import open_store

LAYER = "mixed4c"


def _label_purity(xy: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Fraction of each point's k nearest layout neighbours that share its cluster."""
    nn = knn_graph(np.asarray(xy, np.float32), k + 1, "euclidean")[0][:, 1:]
    return float((labels[nn] == labels[:, None]).mean())


def test_umap_project_keeps_clusters_apart_and_follows_the_contract(tmp_path):
    data = make_store(tmp_path, n=800, c=32, clusters=4, invalid=0.1)
    attrs = project(tmp_path, LAYER, n_epochs=100)
    node = open_store(tmp_path)[f"layouts/{LAYER}/full"]
    rows, raw, xy, inside = node["rows"][:], node["raw"][:], node["xy"][:], node["inside"][:]
    expected_rows = np.flatnonzero(data["valid"])
    np.testing.assert_array_equal(rows, expected_rows)
    assert rows.dtype == np.int64 and raw.dtype == np.float32 and xy.dtype == np.float32 and inside.dtype == bool
    assert raw.shape == xy.shape == (rows.size, 2)
    assert xy.min() >= 0.0 and xy.max() <= 1.0
    labels = data["labels"][rows]
    assert _label_purity(xy, labels) > 0.97
    # cluster centroids in the layout are further apart than the clusters are wide
    cents = np.array([xy[labels == j].mean(axis=0) for j in range(4)])
    widths = np.array([xy[labels == j].std(axis=0).mean() for j in range(4)])
    gaps = np.linalg.norm(cents[:, None] - cents[None], axis=2)[~np.eye(4, dtype=bool)]
    assert gaps.min() > 2 * widths.max()
    for key in ("method", "params", "seed", "n", "quality", "n_outside", "outside", "summary", "layout_id"):
        assert key in attrs
    assert attrs["n"] == rows.size and attrs["method"] == "umap" and attrs["params"]["n_neighbors"] == 50
    assert 0.0 < attrs["quality"]["knn_recall_10"] <= 1.0 and 0.5 < attrs["quality"]["trustworthiness"] <= 1.0
    assert dict(node.attrs)["summary"]["n"] == rows.size


def test_seeded_umap_is_reproducible():
    x, _ = clustered(4500, 32, 5, seed=3)
    a = embed(x, "umap", seed=7, n_epochs=30)
    b = embed(x, "umap", seed=7, n_epochs=30)
    c = embed(x, "umap", seed=8, n_epochs=30)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_tsne_and_pca_are_seeded_and_tsne_supports_one_dimension():
    x, labels = clustered(500, 24, 3, seed=1)
    one = embed(x, "tsne", n_components=1, seed=0)
    assert one.shape == (500, 1) and np.isfinite(one).all()
    np.testing.assert_array_equal(one, embed(x, "tsne", n_components=1, seed=0))
    # 1-D: the three clusters occupy disjoint intervals
    spans = sorted((one[labels == j, 0].min(), one[labels == j, 0].max()) for j in range(3))
    assert all(spans[i][1] < spans[i + 1][0] for i in range(2))
    p = embed(x, "pca", seed=0)
    np.testing.assert_array_equal(p, embed(x, "pca", seed=5))  # PCA is deterministic, signs fixed


def test_duplicates_project_fine(tmp_path):
    make_store(tmp_path, n=4200, c=32, clusters=4, duplicates=0.6)
    x = open_store(tmp_path)[f"samples/{LAYER}/activations"][:]
    assert len(np.unique(x, axis=0)) < 1800  # most rows really are copies
    project(tmp_path, LAYER, n_epochs=20)
    xy = open_store(tmp_path)[f"layouts/{LAYER}/full/xy"][:]
    assert xy.shape == (4200, 2) and np.isfinite(xy).all()
    # all-identical data (the degenerate end of duplicates) also gives a layout
    same = np.tile(x[:1], (300, 1))
    assert np.isfinite(embed(same, "umap", seed=0, n_epochs=20)).all()
    assert np.isfinite(embed(x[:400], "umap", seed=0, n_epochs=20)).all()  # exact kNN path
    assert np.isfinite(embed(x[:400], "tsne", seed=0)).all()


def test_umap_failure_is_caught_and_retried_with_jitter(monkeypatch):
    real = embedding.optimize_layout
    graphs = []

    def flaky(graph, *args, **kwargs):
        graphs.append(graph.copy())
        if len(graphs) == 1:
            raise RecursionError("maximum recursion depth exceeded")  # what pynndescent's RP trees do on duplicates
        return real(graph, *args, **kwargs)

    monkeypatch.setattr(embedding, "optimize_layout", flaky)
    x, _ = clustered(300, 16, 3, seed=2)
    with pytest.warns(RuntimeWarning, match="retrying"):
        y = embed(x, "umap", seed=0, n_epochs=50)
    assert len(graphs) == 2 and np.isfinite(y).all() and y.shape == (300, 2)
    assert abs(graphs[0] - graphs[1]).max() > 0  # the retry's graph was built from jittered data


def test_normalize_layout_clips_outliers_to_the_edge():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(1000, 2))
    raw[:5] = [[100, 0], [-100, 0], [0, 100], [0, -100], [50, 50]]
    xy, inside = normalize_layout(raw, margin=0.1)
    assert xy.dtype == np.float32 and xy.min() == 0.0 and xy.max() == 1.0
    assert not inside[:5].any() and inside[5:].mean() > 0.97
    assert xy[0, 0] == 1.0 and xy[1, 0] == 0.0 and xy[2, 1] == 1.0 and xy[3, 1] == 0.0
    inner = xy[inside]
    assert inner.min() > 0.0 and inner.max() < 1.0
    const, inside = normalize_layout(np.c_[np.arange(10.0), np.full(10, 3.0)])
    assert np.all(const[:, 1] == 0.5) and inside.all()


def test_knn_graph_puts_self_first_even_with_duplicates_and_clustered_search_is_close_to_exact():
    x, _ = clustered(3000, 32, 4, seed=4)
    x[100:140] = x[100]  # 40 identical rows: self could be anywhere among them
    exact_idx, exact_d = knn_graph(x, 15, "cosine")
    assert np.array_equal(exact_idx[:, 0], np.arange(3000)) and np.all(exact_d[:, 0] == 0)
    assert np.all(np.diff(exact_d, axis=1) >= -1e-6)
    assert len(set(exact_idx[120])) == 15
    clustered_idx, _ = knn_graph(x, 15, "cosine", exact_max=1000)  # force the clustered search
    overlap = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(exact_idx, clustered_idx, strict=True)])
    assert overlap > 0.9
    l2_idx, l2_d = knn_graph(x, 5, "euclidean")
    direct = np.linalg.norm(x[7] - x[l2_idx[7]], axis=1)
    np.testing.assert_allclose(l2_d[7], direct, rtol=1e-3, atol=1e-3)


def test_knn_recall_is_one_for_the_same_space_and_low_for_noise():
    x, _ = clustered(1200, 16, 3, seed=5)
    assert knn_recall(x, x, metric="euclidean") == 1.0
    noise = np.random.default_rng(0).normal(size=(1200, 2))
    assert knn_recall(x, noise) < 0.05
    assert knn_recall(x, x, n=300, metric="euclidean") == 1.0


def test_subset_rows_and_outside_option(tmp_path):
    data = make_store(tmp_path, n=600, c=16, clusters=3, invalid=0.2)
    mask = np.zeros(600, bool)
    mask[::2] = True
    attrs = project(tmp_path, LAYER, method="pca", atlas="evens", rows=mask, outside="drop")
    rows = open_store(tmp_path)[f"layouts/{LAYER}/evens/rows"][:]
    np.testing.assert_array_equal(rows, np.flatnonzero(mask & data["valid"]))
    assert attrs["kind"] == "subset" and attrs["outside"] == "drop"
    assert attrs["summary"]["invalid_rows_skipped"] == int((mask & ~data["valid"]).sum())
    project(tmp_path, LAYER, method="pca", atlas="list", rows=[30, 10, 20, 10, *np.flatnonzero(data["valid"])[:50]])
    listed = open_store(tmp_path)[f"layouts/{LAYER}/list/rows"][:]
    assert np.all(np.diff(listed) > 0) and data["valid"][listed].all()


def test_save_layout_sorts_rows_and_replaces_stale_grids(tmp_path):
    make_store(tmp_path, n=200, c=8, clusters=2)
    rows = np.array([5, 1, 3])
    raw = np.array([[0, 0], [1, 1], [2, 2]], np.float32)
    xy, inside = normalize_layout(raw)
    save_layout(tmp_path, LAYER, "custom", rows, raw, xy, inside, {"method": "manual", "kind": "class"})
    root = open_store(tmp_path)
    np.testing.assert_array_equal(root[f"layouts/{LAYER}/custom/rows"][:], [1, 3, 5])
    np.testing.assert_array_equal(root[f"layouts/{LAYER}/custom/raw"][:, 0], [1, 2, 0])
    from atlas.grid import grid

    grid(tmp_path, LAYER, sizes=[2], atlas="custom", whiten=False)
    assert f"grids/{LAYER}/custom/2" in open_store(tmp_path)
    save_layout(tmp_path, LAYER, "custom", rows, raw, xy, inside, {"method": "manual"})
    assert f"grids/{LAYER}/custom" not in open_store(tmp_path)
    with pytest.raises(AtlasError, match="out of range"):
        save_layout(tmp_path, LAYER, "bad", np.array([0, 999]), raw[:2], xy[:2], inside[:2], {})


def test_clear_errors(tmp_path):
    with pytest.raises(AtlasError, match="no atlas run"):
        project(tmp_path / "nothing", LAYER)
    make_store(tmp_path, n=40, c=8, clusters=2)
    with pytest.raises(AtlasError, match="layer 'mixed5a' was not sampled.*mixed4c"):
        project(tmp_path, "mixed5a")
    with pytest.raises(AtlasError, match="^project.method must be one of umap, tsne, pca; got 'isomap'$"):
        project(tmp_path, LAYER, method="isomap")
    with pytest.raises(AtlasError, match="^project.outside must be one of edge, drop; got 'wrap'$"):
        project(tmp_path, LAYER, outside="wrap")
    with pytest.raises(AtlasError, match="^project settings must be a ProjectSettings"):
        project(tmp_path, LAYER, "pca")  # the method where the settings object goes: one line, not a traceback
    with pytest.raises(AtlasError, match="out of range"):
        project(tmp_path, LAYER, rows=[0, 40])
    root = open_store(tmp_path, mode="a")
    root[f"samples/{LAYER}/valid"][:] = False  # an empty store: nothing sampled yet
    with pytest.raises(AtlasError, match="no samples yet"):
        project(tmp_path, LAYER)
    empty = tmp_path / "empty"
    make_store(empty, n=0, c=8, clusters=2)
    with pytest.raises(AtlasError, match="no samples yet"):
        project(empty, LAYER)


def test_cli_project_and_grid(tmp_path, monkeypatch):
    import importlib.util
    import re
    from pathlib import Path

    from typer.testing import CliRunner

    import atlas

    stages = (Path(atlas.__file__).parent / "cli" / "stages.py").read_text()
    for name in set(re.findall(r"\b(\w+_cmd)\b", stages)) - {"layout_cmd"}:
        # other stages' command modules may be missing in a partial checkout; they are not under test here
        if importlib.util.find_spec(f"atlas.cli.{name}") is None:
            monkeypatch.setitem(sys.modules, f"atlas.cli.{name}", types.ModuleType(name))
    from atlas.cli import app

    make_store(tmp_path, n=400, c=16, clusters=3)
    runner = CliRunner()
    result = runner.invoke(app, ["project", str(tmp_path), "--layer", LAYER, "--method", "pca", "--atlas", "p", "--outside", "drop"])
    assert result.exit_code == 0, result.output
    assert "pca layout of 400 samples" in result.output and "dropped" in result.output
    result = runner.invoke(app, ["grid", str(tmp_path), "--layer", LAYER, "--atlas", "p", "--grid", "4", "--grid", "8"])
    assert result.exit_code == 0, result.output
    assert "grid 4x4" in result.output and "grid 8x8" in result.output
    result = runner.invoke(app, ["project", str(tmp_path), "--layer", "nope"])
    assert result.exit_code != 0 and isinstance(result.exception, AtlasError)


def test_tiny_inputs_do_not_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (1, 3, 12):
            x, _ = clustered(n, 8, 2, seed=n)
            for method in ("umap", "tsne", "pca"):
                y = embed(x, method, seed=0)
                assert y.shape == (n, 2) and np.isfinite(y).all()
    with pytest.raises(AtlasError):
        embed(np.zeros((0, 4), np.float32))
    with pytest.raises(AtlasError, match="NaN"):
        embed(np.full((5, 4), np.nan, np.float32))
    assert layout.METHODS == ("umap", "tsne", "pca")


def test_umap_optimiser_is_identical_on_one_and_two_threads_and_does_one_dimension():
    import numba

    x, labels = clustered(3000, 32, 4, seed=5)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = embed(x, "umap", seed=3, n_epochs=40)
        numba.set_num_threads(max(2, before))
        two = embed(x, "umap", seed=3, n_epochs=40)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
    line = embed(x, "umap", n_components=1, seed=0)  # 1-D needs the default 500 epochs at this size
    assert line.shape == (3000, 1) and np.isfinite(line).all()
    # 1-D: most of each point's 10 nearest points on the line share its cluster
    nn = np.argsort(np.abs(line - line.T), axis=1)[:, 1:11]
    assert (labels[nn] == labels[:, None]).mean() > 0.9


def test_trustworthiness_and_exact_neighbours_agree_with_scikit_learn():
    from sklearn.manifold import trustworthiness as sk_trustworthiness
    from sklearn.neighbors import NearestNeighbors

    x, _ = clustered(600, 16, 3, seed=6)
    y = embed(x, "pca")
    noisy = y + np.random.default_rng(0).normal(scale=y.std(), size=y.shape).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        for layout_ in (y, noisy):
            ours = layout.trustworthiness(x, layout_, 10, metric)
            assert abs(ours - sk_trustworthiness(x.astype(np.float64), layout_.astype(np.float64), n_neighbors=10, metric=metric)) < 1e-6
    idx, dist = knn_graph(x, 8, "euclidean")
    ref_d, _ = NearestNeighbors(n_neighbors=8).fit(x).kneighbors(x)
    np.testing.assert_allclose(dist, ref_d, atol=1e-3)
