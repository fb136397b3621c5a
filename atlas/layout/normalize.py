"""A layout mapped to the unit square as the paper does: percentile clip box, margin, rescale (pure)."""

from __future__ import annotations

import numpy as np

from atlas.settings import ProjectSettings


def normalize_layout(raw: np.ndarray, lo: float = 1.0, hi: float = 99.0,
                     margin: float = ProjectSettings.margin) -> tuple[np.ndarray, np.ndarray]:
    """Map a layout to [0, 1] as the paper does; returns ``(xy float32, inside bool)``.

    Per axis: take the ``lo``-``hi`` percentile range, widen it by ``margin`` of its width on
    each side, clip to that box and rescale it to [0, 1]. Clipped points land exactly on 0 or
    1 (the edge cells); ``inside`` is False for them. A constant axis maps to 0.5.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1:
        raw = raw[:, None]
    if raw.shape[0] == 0:
        return np.zeros(raw.shape, np.float32), np.zeros(0, bool)
    p_lo, p_hi = np.percentile(raw, [lo, hi], axis=0)
    width = p_hi - p_lo
    box_lo, box_hi = p_lo - margin * width, p_hi + margin * width
    span = box_hi - box_lo
    flat = span <= 0
    safe = np.where(flat, 1.0, span)
    inside = ((raw >= box_lo) & (raw <= box_hi)).all(axis=1)
    xy = np.clip((raw - box_lo) / safe, 0.0, 1.0)
    xy[:, flat] = 0.5
    return xy.astype(np.float32), inside
