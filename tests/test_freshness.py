"""Downstream staleness comes from the store, never from a stage deleting another's data (issue 12).

A grid records the ``layout_id`` of the layout it was binned from and its own ``grid_id``; icons record the
``grid_id`` of the grid they were rendered from. ``store.verify`` (what render and tiles call on their inputs)
refuses a grid of an older layout and icons of an older grid in one line, and nothing is written. One tiny run
(8 photos x 4 positions, no attribution, t-SNE, one 4x4 grid, 16 px draft icons) is built once and copied.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import zarr
from tiny_run import LAYER, build_tiny, copy_run
from tiny_run import cli as _cli
from tiny_run import one_line as _one_line
from tiny_run import snapshot as _snapshot

from atlas import store

GRID = ["--layer", LAYER, "--grid", "4", "--min-count", "1"]
RENDER = ["--layer", LAYER, "--grid", "4", "--quality", "draft", "--steps", "4", "--size", "16"]
TILES = ["--layer", LAYER, "--no-examples"]
OLD_LAYOUT = "grids of mixed4c/full were built from an older layout; re-run `atlas grid` (or `atlas build`)"
OLD_GRID = "icons of mixed4c/full (grid 4) were rendered from an older grid; re-run `atlas render` (or `atlas build`)"


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory, photo_list) -> Path:
    return build_tiny(tmp_path_factory, photo_list)


@pytest.fixture
def run(base, tmp_path) -> Path:
    return copy_run(base, tmp_path)


def test_reproject_then_render_and_tiles_refuse_until_grid_runs(run):
    _ok(_cli("project", run, "--layer", LAYER, "--method", "pca"))
    before = _snapshot(run)
    # save_layout still deletes the atlas's grids and icons (tests/test_layout.py asserts it), so these are "missing"
    _one_line(_cli("render", run, *RENDER), "run `atlas grid")
    _one_line(_cli("tiles", run, *TILES), "has no rendered icons")
    assert _snapshot(run) == before
    _ok(_cli("grid", run, *GRID))
    _ok(_cli("render", run, *RENDER))
    _ok(_cli("tiles", run, *TILES))
    root = zarr.open_group(run / store.STORE_NAME, mode="r")
    grid = root[f"grids/{LAYER}/full/4"].attrs
    assert grid["layout_id"] == root[f"layouts/{LAYER}/full"].attrs["layout_id"]
    assert root[f"icons/{LAYER}/full/4"].attrs["grid_id"] == grid["grid_id"]


def test_grid_of_an_older_layout_is_refused_by_render_and_tiles(run, tmp_path):
    """Grids and icons of the t-SNE layout beside a PCA layout (put back from a copy): readers refuse them."""
    kept = tmp_path / "kept"
    for kind in ("grids", "icons"):
        shutil.copytree(run / store.STORE_NAME / kind / LAYER / "full", kept / kind)
    _ok(_cli("project", run, "--layer", LAYER, "--method", "pca"))
    for kind in ("grids", "icons"):
        shutil.rmtree(run / store.STORE_NAME / kind / LAYER / "full", ignore_errors=True)
        shutil.copytree(kept / kind, run / store.STORE_NAME / kind / LAYER / "full")
    before = _snapshot(run)
    _one_line(_cli("render", run, *RENDER), OLD_LAYOUT)
    _one_line(_cli("tiles", run, *TILES), OLD_LAYOUT)
    assert _snapshot(run) == before
    _ok(_cli("grid", run, *GRID))  # grid overwrites its own group
    _one_line(_cli("tiles", run, *TILES), OLD_GRID)
    _ok(_cli("render", run, *RENDER))
    _ok(_cli("tiles", run, *TILES))


def test_icons_of_an_older_grid_are_refused_by_tiles(run, base):
    _ok(_cli("grid", run, "--layer", LAYER, "--grid", "4", "--min-count", "3"))
    before = _snapshot(run)
    _one_line(_cli("tiles", run, *TILES), OLD_GRID)
    assert _snapshot(run) == before
    _ok(_cli("render", run, *RENDER))
    _ok(_cli("tiles", run, *TILES))
    root = zarr.open_group(run / store.STORE_NAME, mode="r")
    icons, mask = root[f"icons/{LAYER}/full/4"], root[f"grids/{LAYER}/full/4/render"][...]
    assert (icons["done"][...] == mask).all()  # cells the new grid does not render hold no icon of the old one
    assert not icons["images"][...][~mask].any()
    # back to the original grid: render redoes the cells it dropped, and the icons are the original grid's again
    # (pixels may differ by a few levels: a cell rendered in another batch composition is not bit-identical)
    _ok(_cli("grid", run, *GRID))
    _ok(_cli("render", run, *RENDER))
    old = zarr.open_group(base / store.STORE_NAME, mode="r")[f"icons/{LAYER}/full/4"]
    icons = zarr.open_group(run / store.STORE_NAME, mode="r")[f"icons/{LAYER}/full/4"]  # a group caches its attributes
    for name in ("done", "digest"):
        assert (icons[name][...] == old[name][...]).all(), name
    assert icons.attrs["grid_id"] == old.attrs["grid_id"]
