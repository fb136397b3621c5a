"""The photos a patch is pasted into, prepared as the sampler prepares them, and their seeded crops and flips.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.errors import AtlasError

CROP = 224  # the model's input size the placements are laid out on (InceptionV1's, and most ViTs')
PICTURES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def augment_images(images: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``k`` seeded variants of every (N, S, S, 3) image, after the images themselves: a random square crop of 60 to
    100% of the side, scaled back to S, mirrored half of the time. Widens a source set of one photo per class."""
    if k <= 0:
        return images
    n, side = images.shape[0], images.shape[1]
    out = [images]
    for i in range(n):
        rng = np.random.default_rng([seed, i, 7])
        for _ in range(k):
            s = int(round(side * rng.uniform(0.6, 1.0)))
            top, left = (int(v) for v in rng.integers(0, side - s + 1, size=2))
            crop = Image.fromarray(images[i, top : top + s, left : left + s]).resize((side, side), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(np.asarray(crop, np.uint8)[None])
    return np.concatenate(out)


def load_source(images: str | Path | Sequence[str | Path], classes: list[str] | None = None,
                reading: tuple[int, int, str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(N, crop, crop, 3) uint8 and the paths of a folder, a list file or a list of paths, prepared as the sampler does
    for the model: ``reading`` = (resize, crop, interpolation) from ``atlas.data.photo_reading(net.preprocess)``
    (None: shorter side 256, centre crop 224, bilinear, InceptionV1's). Unreadable files are skipped and counted in
    the paths' absence; none readable is one line."""
    from atlas.data import class_table, list_images, load_image, photo_reading

    resize, crop, interpolation = reading or photo_reading(None)

    if isinstance(images, (str, Path)) and Path(images).suffix.lower() in PICTURES:  # one photo, not a list file
        listed = [str(images)]
    elif isinstance(images, (str, Path)):
        listed = list_images(images, class_table() if classes is None else classes).paths
    else:
        listed = [str(p) for p in images]
    arrays, kept = [], []
    for path in listed:
        try:
            arrays.append(np.asarray(load_image(path, resize, crop, interpolation), np.uint8))
            kept.append(str(path))
        except (OSError, ValueError, SyntaxError):
            continue
    if not arrays:
        raise AtlasError(f"none of the {len(listed)} images of {images} could be read")
    return np.stack(arrays), kept
