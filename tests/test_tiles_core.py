"""Unit tests of the tiles stage's pure core on small hand-made arrays (no store, no files):
level planning (plan_tiles, level_ranges), cell metadata (example_rows, cell_records, grid_record)
and the manifest entry (atlas_entry)."""

from __future__ import annotations

import numpy as np
import pytest

from atlas.errors import AtlasError
from atlas.tiles import (
    BLOCK,
    GridPlan,
    TilePlan,
    atlas_entry,
    cell_records,
    density_scales,
    example_rows,
    grid_record,
    level_ranges,
    plan_tiles,
)

NAMES = ["tench", "goldfish", "shark", "hen"]


# ----------------------------------------------------------------------------- level planning
def test_plan_tiles_gives_every_grid_its_own_level():
    plan = plan_tiles({160: 80, 20: 80, 40: 80})
    assert isinstance(plan, TilePlan) and plan.full == 12800 and len(plan.levels) == 15
    assert [g.size for g in plan.grids] == [20, 40, 160]  # smallest first
    assert [(g.size, g.level, g.dim) for g in plan.owners] == [(160, 14, 12800), (40, 12, 3200), (20, 11, 1600)]
    assert plan.skipped == []
    # the finest grid draws only its level; each coarser one down to just above the next owned level; the coarsest down to 1x1
    assert plan.ranges == {14: (13, 14), 12: (12, 12), 11: (0, 11)}


def test_two_grids_claiming_one_level_the_finer_keeps_it():
    # canvases 256 and 320 px: levels of a 320 px image are ..., 160, 320; both are nearest (in scale) to 320
    plan = plan_tiles({16: 16, 20: 16})
    assert plan.full == 320 and [(g.size, g.level) for g in plan.owners] == [(20, 9)]
    assert plan.skipped == [16] and plan.grids[0].level == -1
    assert plan.ranges == {9: (0, 9)}


def test_icon_size_redraws_every_canvas():
    plan = plan_tiles({4: 16, 8: 16}, icon_size=8)
    assert [(g.size, g.icon, g.canvas) for g in plan.grids] == [(4, 16, 32), (8, 16, 64)]
    assert plan.full == 64 and [g.dim for g in plan.owners] == [64, 32]


def test_plan_tiles_is_pure():
    a, b = plan_tiles({4: 16, 8: 16}), plan_tiles({4: 16, 8: 16})
    assert a == b and a.grids is not b.grids


@pytest.mark.parametrize("icon_sizes, icon_size, match", [({}, None, "no grids"), ({4: 16}, 0, "icon size must be positive")])
def test_plan_tiles_rejects_bad_input(icon_sizes, icon_size, match):
    with pytest.raises(AtlasError, match=match):
        plan_tiles(icon_sizes, icon_size)


def test_level_ranges():
    assert level_ranges([]) == {}
    assert level_ranges([5]) == {5: (0, 5)}
    assert level_ranges([9, 3]) == {3: (0, 3), 9: (4, 9)}
    assert level_ranges([7, 8, 9]) == {7: (0, 7), 8: (8, 8), 9: (9, 9)}


# ----------------------------------------------------------------------------- cell metadata
# A 2 x 2 grid: (0, 0) drawn with 2 samples, (0, 1) empty, (1, 0) one sample but not drawn, (1, 1) drawn with 3.
COUNT = np.array([[2, 0], [1, 3]], np.int32)
DRAW = np.array([[True, False], [False, True]])
TOP_C = np.array([[[1, 2], [-1, -1]], [[3, -1], [0, 1]]], np.int32)
TOP_A = np.array([[[0.91234, 0.5], [0, 0]], [[0.25, 0], [0.333333, -0.1]]], np.float32)
NEAREST = np.array([[[4, 7, -1], [-1, -1, -1]], [[2, -1, -1], [9, 9, 1]]], np.int64)


def test_example_rows_only_for_drawn_cells_padding_dropped():
    assert example_rows(NEAREST, DRAW) == {(0, 0): [4, 7], (1, 1): [9, 9, 1]}
    assert example_rows(np.full((2, 2, 0), -1, np.int64), DRAW) == {}


def test_cell_records_of_a_hand_made_grid():
    blocks = cell_records(COUNT, DRAW, TOP_C, TOP_A, NAMES)
    assert list(blocks) == [(0, 0)]
    cells = blocks[0, 0]
    assert [(c["x"], c["y"]) for c in cells] == [(0, 0), (0, 1), (1, 1)]  # only cells with samples, row-major
    assert cells[0] == {"x": 0, "y": 0, "n": 2, "drawn": True, "top": [["goldfish", 0.9123], ["shark", 0.5]], "ex": 0}
    assert cells[1] == {"x": 0, "y": 1, "n": 1, "drawn": False, "top": [["hen", 0.25]], "ex": 0}
    assert cells[2]["top"] == [["tench", 0.3333], ["goldfish", -0.1]]


def test_cell_records_with_examples_highlight_and_focus_classes():
    hl = np.array([[0.123456, 0], [0.5, -0.25]], np.float32)
    focus_att = np.array([[[0.1, 0.2], [0, 0]], [[0.3, 0.4], [0.55556, -0.5]]], np.float32)
    cells = cell_records(COUNT, DRAW, TOP_C, TOP_A, NAMES, example_rows(NEAREST, DRAW), hl, [3, 0], focus_att)[0, 0]
    assert [c["ex"] for c in cells] == [2, 0, 3]
    assert [c["hl"] for c in cells] == [0.1235, 0.5, -0.25]
    assert cells[2]["cls"] == [["hen", 0.5556], ["tench", -0.5]]
    assert cells[0]["cls"] == [["hen", 0.1], ["tench", 0.2]]


def test_cell_records_without_attribution_have_no_top_classes():
    s = 2
    cells = cell_records(COUNT, DRAW, np.full((s, s, 0), -1, np.int64), np.zeros((s, s, 0), np.float32), NAMES)[0, 0]
    assert all(c["top"] == [] and "hl" not in c and "cls" not in c for c in cells)


def test_cell_records_are_grouped_by_block():
    s = BLOCK + 1
    count = np.zeros((s, s), np.int32)
    for gy, gx in [(0, 0), (0, BLOCK), (BLOCK, 0), (BLOCK, BLOCK), (3, 5), (2, 9)]:
        count[gy, gx] = 1
    empty_c, empty_a = np.full((s, s, 0), -1, np.int64), np.zeros((s, s, 0), np.float32)
    blocks = cell_records(count, count > 0, empty_c, empty_a, NAMES)
    assert sorted(blocks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(c["x"], c["y"]) for c in blocks[0, 0]] == [(0, 0), (9, 2), (5, 3)]
    assert [(c["x"], c["y"]) for c in blocks[1, 1]] == [(BLOCK, BLOCK)]


def test_grid_record_counts_drawn_and_not_yet_done_cells():
    render = np.array([[True, False], [True, True]])
    plan = GridPlan(size=2, icon=16, canvas=32, level=5, dim=32)
    assert grid_record(plan, render, DRAW) == {"size": 2, "icon": 16, "canvas": 32, "level": 5, "cells": 2, "not_done": 1}


def test_density_scales():
    count = np.array([[1, 4], [0, 16]])
    draw = np.array([[True, True], [False, True]])
    np.testing.assert_allclose(density_scales(count, draw), [[np.sqrt(1 / 7), np.sqrt(4 / 7)], [1, 1]])
    np.testing.assert_array_equal(density_scales(count, np.zeros((2, 2), bool)), np.ones((2, 2)))


# ----------------------------------------------------------------------------- manifest entry
def test_atlas_entry():
    grids = [{"size": 8, "level": 7}, {"size": 4, "level": 6}]
    pyramid = {"width": 128, "height": 128, "levels": 8, "tiles": 3}
    entry = atlas_entry("mixed4c", "full", "googlenet", {"method": "umap"}, pyramid, grids, tile_size=254, overlap=1, fmt="jpg",
                        density_scale=False, examples=True, highlight=("goldfish", 1))
    assert entry["id"] == "mixed4c/full" and entry["kind"] == "full" and entry["method"] == "umap" and entry["classes"] is None
    assert entry["dzi"] == "mixed4c/full/atlas.dzi" and entry["base"] == "mixed4c/full/" and entry["block"] == BLOCK
    assert (entry["width"], entry["levels"], entry["format"]) == (128, 8, "jpg") and "tiles" not in entry
    assert [g["size"] for g in entry["grids"]] == [4, 8]
    assert entry["highlight"] == {"class": "goldfish", "index": 1, "dir": "highlight"}
    other = atlas_entry("mixed4c", "mine", "m", {}, pyramid, [], tile_size=64, overlap=0, fmt="png", density_scale=True,
                        examples=False, highlight=None)
    assert other["kind"] == "custom" and other["highlight"] is None
    assert atlas_entry("l", "c", "m", {"kind": "compare", "axis_labels": ["a", "b"]}, pyramid, [], tile_size=64, overlap=0, fmt="png",
                       density_scale=False, examples=False, highlight=None)["axis_labels"] == ["a", "b"]
