"""Dataset patches behind sample rows: what real inputs look like at a sampled position.

Optimised icons show what a direction *wants*; patches show what actually lands in a
cell. They need no optimisation, only the stored image paths and positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.data import crop_patch, load_image, photo_reading, position_to_pixels
from atlas.errors import AtlasError
from atlas.store import open_store, require_layer

GREY = 127


def default_extent(crop: int, grid_w: int) -> int:
    """Side, in input pixels, of the patch shown for one position: four strides of the layer.

    The theoretical receptive field of mid layers covers the whole image, but the part
    that drives a position is a few strides wide, so the patch grows with the layer's stride.
    """
    return int(min(crop, round(4 * crop / max(grid_w, 1))))


def sample_patches(run_dir: str | Path, layer: str, rows: Sequence[int] | np.ndarray, size: int = 80,
                   extent: int | None = None) -> np.ndarray:
    """(n, size, size, 3) uint8 patches around the sampled positions of ``rows`` of ``samples/{layer}``.

    Images are loaded with the run's preprocessing (``preprocessing`` root attrs), each
    once; rows of unreadable images, or -1, give grey patches.
    """
    root = open_store(run_dir)
    samples = require_layer(root, layer)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.full((rows.size, size, size, 3), GREY, dtype=np.uint8)
    if rows.size == 0:
        return out
    prep = dict(root.attrs.get("preprocessing", {}) or {})
    resize, crop, interpolation = photo_reading(prep)  # the run's model's own resampling (bicubic for a ViT)
    grid_hw = samples.attrs.get("grid_hw")
    if grid_hw is None:
        raise AtlasError(f"samples/{layer} has no grid_hw attribute; re-run `atlas sample`")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    extent = extent or default_extent(crop, w)
    n_rows = samples["image_index"].shape[0]
    valid = (rows >= 0) & (rows < n_rows)
    if not valid.any():
        return out
    wanted = np.unique(rows[valid])
    image_index = samples["image_index"].get_coordinate_selection(wanted)
    position = samples["position"].get_orthogonal_selection((wanted, slice(None)))
    where = {int(r): i for i, r in enumerate(wanted)}
    paths = root["images/path"]
    cache: dict[int, Image.Image | None] = {}
    for k, row in enumerate(rows.tolist()):
        if row not in where:
            continue
        i = where[row]
        img_id = int(image_index[i])
        if img_id not in cache:
            try:
                cache[img_id] = load_image(str(paths[img_id]), resize, crop, interpolation)
            except (OSError, ValueError, SyntaxError):
                cache[img_id] = None
        image = cache[img_id]
        if image is None:
            continue
        centre = position_to_pixels((int(position[i, 0]), int(position[i, 1])), (h, w), crop)
        patch = crop_patch(image, centre, extent)
        if extent != size:
            patch = patch.resize((size, size), Image.LANCZOS)
        out[k] = np.asarray(patch, dtype=np.uint8)
    return out


def compose(patches: np.ndarray, size: int) -> np.ndarray:
    """One icon from up to four patches: a 2 x 2 mosaic when there are four, else the first one."""
    if patches.shape[0] == 0:
        return np.full((size, size, 3), GREY, dtype=np.uint8)
    if patches.shape[0] < 4:
        return patches[0]
    half = patches.shape[1]
    mosaic = np.concatenate([np.concatenate(patches[:2], 1), np.concatenate(patches[2:4], 1)], 0)
    if 2 * half != size:
        mosaic = np.asarray(Image.fromarray(mosaic).resize((size, size), Image.LANCZOS))
    return mosaic
