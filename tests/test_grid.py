"""Tests of the grid stage (atlas.grid, `atlas grid`) on synthetic stores with hand-made layouts."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import make_store

from atlas.errors import AtlasError
from atlas.grid import cell_index, grid, whitening
from atlas.layout import normalize_layout, project, save_layout
from atlas.store import open_store

LAYER = "mixed4c"


def _layout(run_dir, valid: np.ndarray, seed: int = 0, outside: str = "edge",
            atlas: str = "full") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random layout with points exactly on cell edges, 0.0 and 1.0, stored via save_layout."""
    rows = np.flatnonzero(valid)
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(rows.size, 2)).astype(np.float32)
    raw[:6] = [[40, 0], [-40, 0], [0, 40], [0, -40], [40, 40], [-40, -40]]  # clipped to 0 / 1 exactly
    xy, inside = normalize_layout(raw)
    xy[6:12] = [[0.5, 0.5], [0.25, 0.75], [1.0, 0.0], [0.0, 1.0], [0.1, 0.9], [0.999999, 1.0]]  # on cell boundaries
    save_layout(run_dir, LAYER, atlas, rows, raw, xy, inside, {"method": "test", "outside": outside})
    return rows, xy, inside


def test_each_kept_sample_is_in_exactly_one_cell_and_counts_sum(tmp_path):
    data = make_store(tmp_path, n=3000, c=16, k_classes=7, clusters=4, invalid=0.1)
    rows, xy, _ = _layout(tmp_path, data["valid"])
    result = grid(tmp_path, LAYER, sizes=[1, 3, 10, 20], whiten=False)
    root = open_store(tmp_path)
    for s in (1, 3, 10, 20):
        node = root[f"grids/{LAYER}/full/{s}"]
        count, cell = node["count"][:], node["cell"][:]
        assert count.shape == (s, s) and count.dtype == np.int32 and cell.dtype == np.int32
        assert cell.shape == rows.shape and cell.min() >= 0 and cell.max() < s * s
        assert count.sum() == rows.size == node.attrs["n_kept"] == result["sizes"][s]["n_kept"]
        np.testing.assert_array_equal(np.bincount(cell, minlength=s * s).reshape(s, s), count)
        gx = np.minimum((xy[:, 0].astype(np.float64) * s).astype(int), s - 1)
        gy = np.minimum((xy[:, 1].astype(np.float64) * s).astype(int), s - 1)
        np.testing.assert_array_equal(cell, gy * s + gx)
        assert cell[8] == s - 1 and cell[9] == (s - 1) * s  # x == 1.0 -> last column, y == 1.0 -> last row
    gy, gx = cell_index(np.array([[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]]), 4)
    np.testing.assert_array_equal(gy, [3, 0, 2])
    np.testing.assert_array_equal(gx, [3, 0, 2])


def test_cell_means_equal_a_direct_numpy_computation(tmp_path):
    data = make_store(tmp_path, n=2500, c=24, k_classes=6, clusters=5, invalid=0.05, dtype="float16")
    rows, xy, _ = _layout(tmp_path, data["valid"], seed=1)
    grid(tmp_path, LAYER, sizes=[6], min_count=20, n_nearest=4, whiten=False)
    node = open_store(tmp_path)[f"grids/{LAYER}/full/6"]
    acts = data["activations"].astype(np.float16).astype(np.float64)[rows]
    atts = data["attributions"].astype(np.float16).astype(np.float64)[rows]
    cell = node["cell"][:]
    count = node["count"][:].ravel()
    mean_act = node["mean_activation"][:].reshape(36, -1)
    mean_att = node["mean_attribution"][:].reshape(36, -1)
    top, top_val = node["top_classes"][:].reshape(36, 5), node["top_attribution"][:].reshape(36, 5)
    nearest = node["nearest"][:].reshape(36, 4)
    render = node["render"][:].ravel()
    assert mean_act.dtype == np.float32 and top.dtype == np.int32 and nearest.dtype == np.int64
    np.testing.assert_array_equal(render, count >= 20)
    assert node.attrs["n_render"] == render.sum() and node.attrs["n_cells"] == (count > 0).sum()
    for j in range(36):
        members = cell == j
        if not members.any():
            assert count[j] == 0 and np.all(mean_act[j] == 0) and np.all(top[j] == -1) and np.all(nearest[j] == -1)
            continue
        expect = acts[members].mean(axis=0)
        np.testing.assert_allclose(mean_act[j], expect, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mean_att[j], atts[members].mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(top[j], np.argsort(-atts[members].mean(axis=0), kind="stable")[:5])
        np.testing.assert_allclose(top_val[j], np.sort(atts[members].mean(axis=0))[::-1][:5], rtol=1e-6)
        cos = acts[members] @ expect / (np.linalg.norm(acts[members], axis=1) * np.linalg.norm(expect))
        best = rows[members][np.argsort(-cos, kind="stable")[: min(4, members.sum())]]
        np.testing.assert_array_equal(nearest[j][: best.size], best)
        assert np.all(nearest[j][best.size :] == -1)


def test_drop_option_leaves_outside_points_out(tmp_path):
    data = make_store(tmp_path, n=1000, c=8, clusters=3)
    rows, _, inside = _layout(tmp_path, data["valid"], outside="drop")
    assert (~inside).sum() >= 6
    summary = grid(tmp_path, LAYER, sizes=[5], whiten=False)["sizes"][5]
    node = open_store(tmp_path)[f"grids/{LAYER}/full/5"]
    cell = node["cell"][:]
    np.testing.assert_array_equal(cell < 0, ~inside)
    assert node["count"][:].sum() == inside.sum() == summary["n_kept"] and summary["n_dropped"] == (~inside).sum()


def test_runs_without_attributions_skip_the_attribution_arrays(tmp_path):
    data = make_store(tmp_path, n=800, c=8, clusters=3, attributions=False)
    _layout(tmp_path, data["valid"])
    summary = grid(tmp_path, LAYER, sizes=[4, 8])["sizes"][8]
    node = open_store(tmp_path)[f"grids/{LAYER}/full/8"]
    names = set(node.array_keys())
    assert {"count", "render", "mean_activation", "nearest", "cell"} <= names
    assert not names & {"mean_attribution", "top_classes", "top_attribution"}
    assert summary["has_attribution"] is False


def test_whitening_matches_numpy_and_is_computed_once(tmp_path):
    data = make_store(tmp_path, n=1500, c=12, clusters=3, invalid=0.1)
    x = data["activations"][data["valid"]].astype(np.float64)
    first = whitening(tmp_path, LAYER)
    assert first["skipped"] is False and first["n_samples"] == len(x)
    moment = x.T @ x / len(x)
    eps = 1e-3 * np.trace(moment) / 12
    expect = np.linalg.inv(moment + eps * np.eye(12))
    matrix = open_store(tmp_path)[f"whitening/{LAYER}/matrix"][:]
    assert matrix.dtype == np.float32 and matrix.shape == (12, 12)
    np.testing.assert_allclose(matrix, expect, rtol=1e-4, atol=1e-6 * np.abs(expect).max())
    assert whitening(tmp_path, LAYER)["skipped"] is True
    root = open_store(tmp_path, mode="a")
    valid = root[f"samples/{LAYER}/valid"][:]
    valid[:100] = False
    root[f"samples/{LAYER}/valid"][:] = valid
    again = whitening(tmp_path, LAYER)
    assert again["skipped"] is False and again["n_samples"] == valid.sum()


def test_grid_after_a_real_projection(tmp_path):
    make_store(tmp_path, n=1200, c=16, clusters=4)
    project(tmp_path, LAYER, method="pca")
    result = grid(tmp_path, LAYER, sizes=[10, 20])
    assert result["sizes"][10]["n_kept"] == 1200 and result["whitening"]["n_samples"] == 1200
    attrs = dict(open_store(tmp_path)[f"grids/{LAYER}/full/20"].attrs)
    assert attrs["size"] == 20 and attrs["min_count"] == 5 and "summary" in attrs and attrs["layout_id"]


def test_grid_errors(tmp_path):
    with pytest.raises(AtlasError, match="no atlas run"):
        grid(tmp_path / "none", LAYER, sizes=[10])
    make_store(tmp_path, n=100, c=8, clusters=2)
    with pytest.raises(AtlasError, match="no layout 'full' for layer 'mixed4c'.*atlas project"):
        grid(tmp_path, LAYER, sizes=[10])
    with pytest.raises(AtlasError, match="was not sampled"):
        grid(tmp_path, "mixed9", sizes=[10])
    project(tmp_path, LAYER, method="pca")
    with pytest.raises(AtlasError, match="at least one grid size"):
        grid(tmp_path, LAYER, sizes=[])
    with pytest.raises(AtlasError, match="between 1 and"):
        grid(tmp_path, LAYER, sizes=[0, 10])
    with pytest.raises(AtlasError, match=r"^grid settings must be a GridSettings \(or None for the defaults\); got \[10\]$"):
        grid(tmp_path, LAYER, [10])  # the sizes where the settings object goes: one line
    with pytest.raises(AtlasError, match=r"^unknown setting grid.min_cout; known: min_count, n_nearest, sizes$"):
        grid(tmp_path, LAYER, min_cout=2)
