"""The classes each unit contributes to most, from the run's sampled activations and attributions: the pure
:func:`class_scores` and its store writer :func:`write_class_scores` (``units/{layer}/classes``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from atlas import store

TOP_CLASSES = 5


def class_scores(activations, attributions, top: int = TOP_CLASSES, block: int = 65536,
                 valid=None) -> tuple[np.ndarray, np.ndarray]:
    """The classes each unit contributes to most: the activation-weighted mean attribution.

    For unit c and class k the score is ``sum_n a[n, c] * attr[n, k] / sum_n a[n, c]`` over the sampled rows n,
    where ``attr[n, k] = h_n . d logit_k / d h_n`` is the stored attribution of row n (all channels together): the
    mean attribution to k of the positions where the unit is active, each counted as strongly as the unit fires.
    The stored attributions do not split by channel, so this is the closest cheap reading; a unit that never
    fires gets no classes.

    Parameters
    ----------
    activations : array-like, shape (N, C)
        Non-negative activations of the sampled rows (numpy or zarr; read in blocks of ``block`` rows).
    attributions : array-like, shape (N, K)
        Their attributions to every class.
    top : int, default 5, >= 1
        Classes kept per unit.
    block : int, default 65536, >= 1
        Rows read at a time.
    valid : array-like of bool, shape (N,), or None, default None
        Rows to count (e.g. ``samples/{layer}/valid``: rows of unreadable images are not); None: all.

    Returns
    -------
    (classes, scores) : (ndarray of shape (C, top) int32, ndarray of shape (C, top) float32)
        Class indices by descending score; -1 (and NaN) pad units that never fire and layers with fewer classes.
    """
    n, c = activations.shape
    k = attributions.shape[1]
    weighted = np.zeros((c, k), np.float64)
    total = np.zeros(c, np.float64)
    for start in range(0, n, block):  # blocks straight from the arrays: a 1M-row store is never held in memory
        a = np.maximum(np.asarray(activations[start:start + block], np.float64), 0.0)
        if valid is not None:
            a[~np.asarray(valid[start:start + block], bool)] = 0.0
        weighted += a.T @ np.asarray(attributions[start:start + block], np.float64)
        total += a.sum(0)
    keep = min(top, k)
    classes = np.full((c, top), -1, np.int32)
    scores = np.full((c, top), np.nan, np.float32)
    alive = total > 0
    if alive.any() and keep:
        mean = weighted[alive] / total[alive, None]
        order = np.argsort(-mean, axis=1, kind="stable")[:, :keep]
        classes[alive, :keep] = order
        scores[alive, :keep] = np.take_along_axis(mean, order, 1)
    return classes, scores


@store.writer
def write_class_scores(run_dir: str | Path, layer: str) -> dict | None:
    """Store :func:`class_scores` of ``layer`` as ``units/{layer}/classes/{top,score}``; None when the run has no attributions."""
    root = store.open_for_update(run_dir)
    group = store.require_layer(root, layer)
    if "attributions" not in group or group["attributions"].shape[1] == 0:
        return None
    store.verify(run_dir, [f"samples/{layer}"])
    # what the scores are computed from, by the seals the store keeps of it: unchanged samples are not read again
    seals = store.read_ledger(run_dir)["seals"]
    source = hashlib.sha256(json.dumps([seals.get(f"samples/{layer}/{name}") for name in ("activations", "attributions", "valid")],
                                       sort_keys=True).encode()).hexdigest()[:16]
    units_node = root.get(f"units/{layer}/classes")
    if units_node is not None and store.attrs(units_node).get("source") == source and seals.get(f"units/{layer}/classes/top"):
        store.verify(run_dir, [f"units/{layer}/classes"])
        return dict(store.attrs(units_node).get("summary", {}))
    valid = group["valid"][:]
    classes, scores = class_scores(group["activations"], group["attributions"], valid=valid)
    path = f"units/{layer}/classes"
    store.begin_stage(run_dir, "units", [path])
    node = root.require_group("units").require_group(layer)
    if "classes" in node:
        del node["classes"]
    out = node.create_group("classes")
    store.write_array(out, "top", classes)
    store.write_array(out, "score", scores)
    summary = {"rows": int(valid.sum()), "units_with_classes": int((classes[:, 0] >= 0).sum())}
    out.attrs.update({"summary": summary, "method": "activation-weighted mean attribution", "source": source})
    store.finish_stage(run_dir, "units", [path])
    return summary
