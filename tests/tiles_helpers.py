"""Synthetic rendered atlases for the tiles and viewer tests: grids and icons written per the
store contract (docs/architecture.md), without sampling, layout or rendering."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atlas.store import create_array, open_store, write_array

CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray", "cock", "hen", "ostrich"]


def icon_colour(size: int, gx: int, gy: int) -> np.ndarray:
    """A colour unique to a cell of a grid, so tests can tell which grid a pixel came from."""
    rng = np.random.default_rng(size * 100_003 + gy * 1009 + gx)
    return rng.integers(40, 256, 3).astype(np.uint8)


def synthetic_icons(size: int, icon: int, gy: int) -> np.ndarray:
    """Row ``gy`` of icons (S, P, P, 3): a cell colour with a diagonal stripe, detailed enough to matter for JPEG."""
    yy, xx = np.mgrid[0:icon, 0:icon]
    stripe = ((xx + yy) // max(1, icon // 8)) % 2 == 0
    row = np.empty((size, icon, icon, 3), np.uint8)
    for gx in range(size):
        c = icon_colour(size, gx, gy)
        row[gx] = c
        row[gx][stripe] = (c.astype(np.int32) * 3 // 5).astype(np.uint8)
    return row


def make_tile_run(run_dir: str | Path, layer: str = "mixed4c", atlas: str = "full", sizes: tuple[int, ...] = (4, 8), icon: int = 16,
                  n_classes: int = 10, axis_labels: list[str] | None = None, empty_every: int = 7, classes: bool = True,
                  model: str = "synthetic", nearest_rows: int = 200) -> Path:
    """A run folder with grids and icons of the given sizes for one layer and atlas.

    Every ``empty_every``-th cell (flat index) has no samples and is not drawn; the others
    have ``count = 1 + (gx + gy) % 5 * 10``, top class ``(gx + gy) % n_classes`` with
    attribution decreasing down the list, and ``nearest`` rows in ``[0, nearest_rows)``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = open_store(run_dir, mode="a")
    root.attrs.update({"model": model})
    if classes:
        root.attrs.update({"classes": CLASSES[:n_classes] + [f"class {i}" for i in range(len(CLASSES), n_classes)]})
    layout = root.require_group(f"layouts/{layer}/{atlas}")
    layout.attrs.update({"method": "umap", "n": 100})
    if axis_labels:
        layout.attrs.update({"kind": "compare", "axis_labels": axis_labels, "classes": axis_labels})
    for s in sizes:
        gy, gx = np.mgrid[0:s, 0:s]
        flat = gy * s + gx
        count = np.where(flat % empty_every == empty_every - 1, 0, 1 + (gx + gy) % 5 * 10).astype(np.int32)
        render = count >= 1
        top = (gx + gy)[..., None] % n_classes + np.arange(5)
        top = (top % n_classes).astype(np.int32)
        top_attr = np.broadcast_to(np.array([0.9, 0.5, 0.3, 0.2, -0.1], np.float32), (s, s, 5)).copy()
        mean_attr = np.zeros((s, s, n_classes), np.float32)
        for k in range(5):
            np.put_along_axis(mean_attr, top[..., k : k + 1], top_attr[..., k : k + 1], axis=2)
        nearest = (flat[..., None] * 3 + np.arange(8)) % nearest_rows
        nearest[..., 5:] = -1
        grid = root.require_group(f"grids/{layer}/{atlas}/{s}")
        write_array(grid, "count", count)
        write_array(grid, "render", render)
        write_array(grid, "top_classes", np.where(count[..., None] > 0, top, -1).astype(np.int32))
        write_array(grid, "top_attribution", top_attr)
        write_array(grid, "mean_attribution", mean_attr)
        write_array(grid, "nearest", nearest.astype(np.int64))
        grid.attrs.update({"size": s, "min_count": 1})
        icons = root.require_group(f"icons/{layer}/{atlas}/{s}")
        images = create_array(icons, "images", (s, s, icon, icon, 3), np.uint8, overwrite=True)
        for y in range(s):
            images[y] = synthetic_icons(s, icon, y)
        write_array(icons, "done", render)
    return run_dir


def expected_canvas(size: int, icon: int, render: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """The flat canvas a grid's level must show: its icons, background where nothing is drawn."""
    canvas = np.empty((size * icon, size * icon, 3), np.uint8)
    for gy in range(size):
        row = synthetic_icons(size, icon, gy)
        row[~render[gy]] = background
        canvas[gy * icon : (gy + 1) * icon] = row.transpose(1, 0, 2, 3).reshape(icon, size * icon, 3)
    return canvas
