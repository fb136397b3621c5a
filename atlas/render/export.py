"""Icons out of the store as PNG files: one per rendered cell, and the whole grid as one sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from atlas.errors import AtlasError
from atlas.store import open_store, verify


def sheet(images: np.ndarray, cols: int | None = None, gap: int = 0, background: int = 255) -> Image.Image:
    """(n, P, P, 3) uint8 icons (or (rows, cols, P, P, 3)) tiled into one image, row by row."""
    if images.ndim == 5:
        rows, cols = images.shape[:2]
        images = images.reshape(-1, *images.shape[2:])
    else:
        cols = cols or int(np.ceil(np.sqrt(len(images))))
        rows = int(np.ceil(len(images) / cols))
    p = images.shape[1]
    canvas = np.full((rows * (p + gap) - gap, cols * (p + gap) - gap, 3), background, np.uint8)
    for k, icon in enumerate(images):
        r, c = divmod(k, cols)
        canvas[r * (p + gap) : r * (p + gap) + p, c * (p + gap) : c * (p + gap) + p] = icon
    return Image.fromarray(canvas)


def export_icons(run_dir: str | Path, layer: str, grid: int, out: str | Path, atlas: str = "full") -> list[Path]:
    """Write ``{gy}_{gx}.png`` for every finished icon and ``sheet.png`` (unfinished cells white); returns the paths."""
    root = open_store(run_dir)
    path = f"icons/{layer}/{atlas}/{grid}"
    verify(root, [path])  # damaged or half-written icons are one line, not black squares
    if path not in root:
        raise AtlasError(f"no icons {path} in this run; run `atlas render {run_dir} --layer {layer} --grid {grid}` first")
    group = root[path]
    images, done = group["images"][...], group["done"][...]
    if not done.any():
        raise AtlasError(f"no finished icons in {path}; run or resume `atlas render`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    width = len(str(done.shape[0] - 1))
    for gy, gx in np.argwhere(done):
        file = out / f"{gy:0{width}d}_{gx:0{width}d}.png"
        Image.fromarray(images[gy, gx]).save(file)
        written.append(file)
    images[~done] = 255
    sheet(images).save(out / "sheet.png")
    written.append(out / "sheet.png")
    return written
