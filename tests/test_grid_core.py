"""Unit tests of the grid stage's pure core, atlas.grid.bin_cells, on small hand-made arrays (no store)."""

from __future__ import annotations

import numpy as np
import pytest

import atlas.grid as grid_module
from atlas.errors import AtlasError
from atlas.grid import Cells, bin_cells

# Six points on a 2 x 2 grid: cells (gy, gx) = (0, 0) x2, (0, 1) x1, (1, 1) x3 (one at exactly 1.0), (1, 0) none.
XY = np.array([[0.1, 0.1], [0.4, 0.2], [0.9, 0.3], [0.6, 0.6], [1.0, 1.0], [0.75, 0.99]])
ACTS = np.array([[1, 0], [3, 0], [0, 2], [1, 1], [2, 2], [1, 0]], dtype=np.float32)
ATTRS = np.array([[0.0, 1.0, 0.5], [0.0, 3.0, 0.5], [2.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 3.0], [1.0, 0.0, 0.0]], np.float32)


def test_a_hand_computed_two_by_two_grid():
    out = bin_cells(XY, ACTS, ATTRS, [2], min_count=2, n_nearest=2, top=2)
    assert list(out) == [2] and isinstance(out[2], Cells)
    c = out[2]
    np.testing.assert_array_equal(c.cell, [0, 0, 1, 3, 3, 3])
    assert c.cell.dtype == np.int32 and c.count.dtype == np.int32
    np.testing.assert_array_equal(c.count, [[2, 1], [0, 3]])
    np.testing.assert_array_equal(c.render, [[True, False], [False, True]])
    np.testing.assert_allclose(c.mean_activation, [[[2, 0], [0, 2]], [[0, 0], [4 / 3, 1]]])
    np.testing.assert_allclose(c.mean_attribution[0, 0], [0, 2, 0.5])
    np.testing.assert_allclose(c.mean_attribution[1, 1], [1, 0, 1])
    np.testing.assert_array_equal(c.top_classes[0, 0], [1, 2])
    np.testing.assert_array_equal(c.top_classes[1, 1], [0, 2])  # tie 1.0 / 1.0: the lower class first
    np.testing.assert_array_equal(c.top_classes[1, 0], [-1, -1])  # empty cell
    np.testing.assert_allclose(c.top_attribution[0, 0], [2, 0.5])
    # nearest in cosine to the cell mean: cell (0, 0) mean (2, 0), both points have cosine 1 -> by row
    np.testing.assert_array_equal(c.nearest[0, 0], [0, 1])
    np.testing.assert_array_equal(c.nearest[0, 1], [2, -1])
    np.testing.assert_array_equal(c.nearest[1, 0], [-1, -1])
    # cell (1, 1) mean (4/3, 1): cosines of (1,1) and (2,2) are equal and above (1,0)'s -> rows 3, 4
    np.testing.assert_array_equal(c.nearest[1, 1], [3, 4])
    assert c.summary == {"size": 2, "min_count": 2, "n_kept": 6, "n_cells": 3, "n_render": 2, "n_dropped": 0,
                         "has_attribution": True}


def test_rows_map_points_to_a_larger_array_and_kept_drops_points():
    rng = np.random.default_rng(0)
    big = rng.normal(size=(20, 2)).astype(np.float32)
    big_att = rng.random((20, 3)).astype(np.float32)
    rows = np.array([1, 4, 5, 9, 13, 19])
    big[rows], big_att[rows] = ACTS, ATTRS
    direct = bin_cells(XY, ACTS, ATTRS, [1, 2], n_nearest=3)
    mapped = bin_cells(XY, big, big_att, [2, 1, 2], rows=rows, n_nearest=3)
    assert list(mapped) == [1, 2]
    for s in (1, 2):
        for name in ("cell", "count", "render", "mean_activation", "mean_attribution", "top_classes", "top_attribution"):
            np.testing.assert_array_equal(getattr(mapped[s], name), getattr(direct[s], name))
        want = np.where(direct[s].nearest >= 0, rows[np.maximum(direct[s].nearest, 0)], -1)
        np.testing.assert_array_equal(mapped[s].nearest, want)  # nearest lists the given rows
    kept = np.array([True, False, True, True, False, True])
    dropped = bin_cells(XY, ACTS, ATTRS, [2], kept=kept, min_count=1)[2]
    np.testing.assert_array_equal(dropped.cell, [0, -1, 1, 3, -1, 3])
    np.testing.assert_array_equal(dropped.count, [[1, 1], [0, 2]])
    np.testing.assert_allclose(dropped.mean_activation[0, 0], [1, 0])
    assert dropped.summary["n_dropped"] == 2 and dropped.summary["n_kept"] == 4
    assert not np.isin([1, 4], dropped.nearest).any()


def test_without_attributions_and_without_nearest():
    c = bin_cells(XY, ACTS, None, [3], n_nearest=0)[3]
    assert c.mean_attribution is None and c.top_classes is None and c.top_attribution is None
    assert c.nearest.shape == (3, 3, 0) and c.summary["has_attribution"] is False
    assert c.count.sum() == 6 and c.render.sum() == 0  # default min_count 5: no cell has 5 points


def test_streamed_blocks_equal_one_block_and_a_direct_numpy_computation(monkeypatch):
    rng = np.random.default_rng(3)
    m, ch, k, s = 500, 6, 4, 5
    xy = rng.random((m, 2))
    acts = rng.normal(size=(m, ch)).astype(np.float32)
    atts = rng.normal(size=(m, k)).astype(np.float32)
    whole = bin_cells(xy, acts, atts, [s], n_nearest=4, min_count=1)[s]
    monkeypatch.setattr(grid_module, "BLOCK", 7)  # many blocks, one ending inside a cell's points
    streamed = bin_cells(xy, acts, atts, [s], n_nearest=4, min_count=1)[s]
    for name in ("cell", "count", "nearest", "top_classes"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(whole, name))
    np.testing.assert_allclose(streamed.mean_activation, whole.mean_activation, rtol=1e-6)
    gx = np.minimum((xy[:, 0] * s).astype(int), s - 1)
    gy = np.minimum((xy[:, 1] * s).astype(int), s - 1)
    for cy, cx in [(0, 0), (2, 3), (4, 4)]:
        members = np.flatnonzero((gy == cy) & (gx == cx))
        mean = acts[members].astype(np.float64).mean(0)
        np.testing.assert_allclose(whole.mean_activation[cy, cx], mean, rtol=1e-5)
        np.testing.assert_allclose(whole.mean_attribution[cy, cx], atts[members].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
        cos = acts[members] @ mean / np.linalg.norm(acts[members], axis=1) / np.linalg.norm(mean)
        np.testing.assert_array_equal(whole.nearest[cy, cx], members[np.argsort(-cos, kind="stable")[:4]])


@pytest.mark.parametrize("kwargs, message", [
    ({"sizes": []}, "at least one grid size"),
    ({"sizes": [0]}, "between 1 and"),
    ({"sizes": [2], "min_count": 0}, "min_count and top"),
    ({"sizes": [2], "rows": np.array([0, 2, 1, 3, 4, 5])}, "ascending distinct rows"),
    ({"sizes": [2], "rows": np.arange(1, 7)}, "ascending distinct rows"),
    ({"sizes": [2], "kept": np.ones(5, bool)}, "needs xy"),
])
def test_bad_arguments_are_one_clear_error(kwargs, message):
    with pytest.raises(AtlasError, match=message):
        bin_cells(XY, ACTS, ATTRS, **kwargs)


def test_the_grid_stage_stores_exactly_what_the_core_returns(tmp_path):
    from synthetic import make_store

    from atlas.grid import grid
    from atlas.layout import normalize_layout, save_layout
    from atlas.store import open_store

    data = make_store(tmp_path, n=800, c=8, k_classes=4, clusters=3, invalid=0.1)
    rows = np.flatnonzero(data["valid"])
    raw = np.random.default_rng(1).normal(size=(rows.size, 2)).astype(np.float32)
    xy, inside = normalize_layout(raw)
    save_layout(tmp_path, "mixed4c", "full", rows, raw, xy, inside, {"method": "test", "outside": "drop"})
    grid(tmp_path, "mixed4c", sizes=[3, 6], min_count=2, n_nearest=3, whiten=False)
    root = open_store(tmp_path)
    samples = root["samples/mixed4c"]
    want = bin_cells(xy, samples["activations"][:], samples["attributions"][:], [3, 6], rows=rows, kept=inside, min_count=2,
                     n_nearest=3)
    for s in (3, 6):
        node = root[f"grids/mixed4c/full/{s}"]
        assert sorted(node.array_keys()) == sorted(["cell", "count", "render", "mean_activation", "mean_attribution", "top_classes",
                                                    "top_attribution", "nearest"])
        for name in node.array_keys():
            stored, core = node[name][:], getattr(want[s], name)
            assert stored.dtype == core.dtype and stored.shape == core.shape
            np.testing.assert_array_equal(stored, core)
        assert node.attrs["summary"] == want[s].summary and want[s].summary["n_dropped"] == int((~inside).sum())
