"""The arithmetic of patch experiments, on arrays only: where a patch goes, pasting it, and what it did.

Everything here is pure (numpy in, numpy out) so that the tests can check placements, pasting and the flip rate on
hand-made arrays, and the library (:mod:`atlas.patches`) only loads images, runs the model and calls these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from atlas.errors import AtlasError
from atlas.settings import PATCH_POSITIONS

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
NAMED = (*CORNERS, "centre")
# What ``--position`` accepts: the five named places, "corners" (all four), and "random" (``n_random`` seeded places).
POSITIONS = PATCH_POSITIONS


@dataclass(frozen=True)
class Placement:
    """One place of one patch size in one image: the patch covers rows ``top:top+size`` and columns ``left:left+size``."""

    name: str
    size: int
    top: int
    left: int


def expand_positions(positions: tuple[str, ...] | list[str]) -> list[str]:
    """The named positions in order, "corners" expanded, repeats dropped; "random" kept as one entry."""
    out: list[str] = []
    for p in positions:
        if p not in POSITIONS:
            raise AtlasError(f"unknown patch position '{p}'; use {', '.join(POSITIONS)}")
        for q in (CORNERS if p == "corners" else (p,)):
            if q not in out:
                out.append(q)
    return out


def placements(side: int, sizes: tuple[int, ...] | list[int], positions: tuple[str, ...] | list[str], n_random: int = 2,
               seed: int = 0, image_index: int = 0) -> list[Placement]:
    """Every (size, position) of a patch in a ``side`` x ``side`` image.

    Named positions touch the image's edges (corners) or sit in its middle (``centre``, rounded down); ``random``
    draws ``n_random`` top-left corners uniformly among those that keep the patch inside, from a generator seeded by
    (seed, image index, size), so an image's places never depend on the batch or on the other images.
    """
    out = []
    for size in sizes:
        if size > side:
            raise AtlasError(f"patch size {size} px is larger than the images ({side} x {side} px after the model's crop); "
                             f"use sizes up to {side}")
        if size < 1:
            raise AtlasError(f"patch size must be at least 1 px; got {size}")
        far = side - size
        fixed = {"top-left": (0, 0), "top-right": (0, far), "bottom-left": (far, 0), "bottom-right": (far, far),
                 "centre": (far // 2, far // 2)}
        for name in expand_positions(positions):
            if name == "random":
                rng = np.random.default_rng([seed, image_index, size])
                for i, (top, left) in enumerate(rng.integers(0, far + 1, size=(n_random, 2)).tolist()):
                    out.append(Placement(f"random-{i}", size, int(top), int(left)))
            else:
                top, left = fixed[name]
                out.append(Placement(name, size, top, left))
    return out


def resize_patch(patch: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the patch scaled to ``size`` pixels (Lanczos; a patch already that size is returned as is)."""
    patch = np.asarray(patch, np.uint8)
    if patch.shape[:2] == (size, size):
        return patch
    return np.asarray(Image.fromarray(patch).resize((size, size), Image.LANCZOS), np.uint8)


def paste(image: np.ndarray, patch: np.ndarray, top: int, left: int) -> np.ndarray:
    """A copy of the (H, W, 3) ``image`` with the square ``patch`` pasted at (top, left); every other pixel unchanged."""
    h, w = image.shape[:2]
    s = patch.shape[0]
    if top < 0 or left < 0 or top + s > h or left + s > w:
        raise AtlasError(f"a {s} px patch at ({top}, {left}) does not fit in a {h} x {w} image")
    out = np.array(image, copy=True)
    out[top : top + s, left : left + s] = patch
    return out


def outcome(before: np.ndarray, after: np.ndarray, image_of: np.ndarray, target: int) -> dict[str, np.ndarray]:
    """What each pasted variant did, from the logits of the images (``before``, (N, K)) and of the variants
    (``after``, (V, K)), ``image_of`` (V,) giving each variant's image.

    ``original`` is each image's top-1 before pasting; per variant ``top1`` after, ``flipped`` (the prediction became
    ``target`` and was not ``target`` before), ``eligible`` (the image was not already ``target``), ``changed`` (top-1
    differs from the original) and ``delta``: the change of logit(target) - logit(original) from the image to the variant.
    """
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    image_of = np.asarray(image_of, np.int64)
    original = before.argmax(1)
    orig_v = original[image_of]
    top1 = after.argmax(1)
    idx = np.arange(after.shape[0])
    margin_before = before[image_of, target] - before[image_of, orig_v]
    margin_after = after[idx, target] - after[idx, orig_v]
    eligible = orig_v != target
    return {"original": original, "top1": top1, "eligible": eligible, "flipped": eligible & (top1 == target),
            "changed": top1 != orig_v, "delta": margin_after - margin_before}


def flip_rate(flipped: np.ndarray, eligible: np.ndarray) -> float | None:
    """Flipped variants over eligible ones (variants of images not already predicted as the target); None without any."""
    n = int(np.count_nonzero(eligible))
    return None if n == 0 else float(np.count_nonzero(np.asarray(flipped) & np.asarray(eligible)) / n)
