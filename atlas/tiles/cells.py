"""What the viewer reads about each cell and each atlas: metadata records, class names, the highlight veil and the
manifest entry (pure functions on arrays)."""

from __future__ import annotations

import numpy as np

from atlas.store import FULL_ATLAS
from atlas.tiles.plan import GridPlan
from atlas.tiles.pyramid import BACKGROUND

BLOCK = 16  # cells per side of one metadata file


def class_names(root, n_classes: int) -> list[str]:
    """Class names from the root attrs ``classes``, else the ImageNet list for that many logits."""
    names = root.attrs.get("classes")
    if isinstance(names, list | tuple) and len(names) >= n_classes:
        return [str(n) for n in names]
    from atlas.models import imagenet_classes

    return imagenet_classes(n_classes)


def highlight_veil(values: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """An (S, S, 4) RGBA veil: transparent over cells that attribute strongly to the class,
    up to ~80% dark over cells that do not (scaled by the 99th percentile of positive values)."""
    pos = values[draw & (values > 0)]
    top = float(np.percentile(pos, 99)) if pos.size else 1.0
    strength = np.clip(values / max(top, 1e-12), 0.0, 1.0)
    veil = np.zeros((*values.shape, 4), np.uint8)
    veil[..., :3] = BACKGROUND
    veil[..., 3] = np.where(draw, np.round(205 * (1.0 - strength) ** 1.5), 0).astype(np.uint8)
    return veil


def example_rows(nearest: np.ndarray, draw: np.ndarray) -> dict[tuple[int, int], list[int]]:
    """(gx, gy) -> the dataset rows of a drawn cell's example strip, nearest first (the -1 padding dropped).

    ``nearest`` is the grid's (S, S, K) array of sample rows; cells not drawn get no strip.
    """
    out = {}
    for gy, gx in zip(*np.nonzero(draw), strict=True):
        rows = [r for r in nearest[gy, gx].tolist() if r >= 0]
        if rows:
            out[int(gx), int(gy)] = rows
    return out


def cell_records(count: np.ndarray, draw: np.ndarray, top_classes: np.ndarray, top_attribution: np.ndarray, names: list[str],
                 examples: dict[tuple[int, int], list[int]] | None = None, highlight: np.ndarray | None = None,
                 focus: list[int] | None = None, focus_attribution: np.ndarray | None = None) -> dict[tuple[int, int], list[dict]]:
    """The metadata records of a grid's cells with samples, grouped by BLOCK x BLOCK block: ``{(bx, by): [cell, ...]}``.

    Arrays are (S, S) ``count`` and ``draw``, (S, S, T) ``top_classes`` (-1 = none) and
    ``top_attribution``; ``examples`` as from :func:`example_rows` (its lengths become ``ex``);
    ``highlight`` (S, S) values become ``hl``; ``focus`` class indices with their (S, S, F)
    ``focus_attribution`` become ``cls``. Within a block cells are in row-major order. Pure.
    """
    examples = examples or {}
    blocks: dict[tuple[int, int], list[dict]] = {}
    for gy in range(count.shape[0]):
        for gx in np.flatnonzero(count[gy] > 0):
            cell = {
                "x": int(gx), "y": int(gy), "n": int(count[gy, gx]), "drawn": bool(draw[gy, gx]),
                "top": [[names[c], round(float(a), 4)]
                        for c, a in zip(top_classes[gy, gx], top_attribution[gy, gx], strict=True) if c >= 0],
                "ex": len(examples.get((int(gx), gy), ())),
            }
            if highlight is not None:
                cell["hl"] = round(float(highlight[gy, gx]), 4)
            if focus_attribution is not None:
                cell["cls"] = [[names[c], round(float(a), 4)] for c, a in zip(focus or [], focus_attribution[gy, gx], strict=True)]
            blocks.setdefault((int(gx) // BLOCK, gy // BLOCK), []).append(cell)
    return blocks


def grid_record(plan: GridPlan, render: np.ndarray, draw: np.ndarray) -> dict:
    """A grid's entry in the manifest: its plan, the cells drawn and the cells still without icons."""
    return {"size": plan.size, "icon": plan.icon, "canvas": plan.dim, "level": plan.level, "cells": int(draw.sum()),
            "not_done": int((render & ~draw).sum())}


def atlas_entry(layer: str, atlas: str, model: str, layout_attrs: dict, pyramid: dict, grids: list[dict], *, tile_size: int,
                overlap: int, fmt: str, density_scale: bool, examples: bool, highlight: tuple[str, int] | None) -> dict:
    """The manifest entry of one atlas (``atlas.json`` and its line in ``atlases.json``); ``highlight`` is (class, index). Pure."""
    return {
        "id": f"{layer}/{atlas}",
        "layer": layer,
        "atlas": atlas,
        "model": model,
        "kind": layout_attrs.get("kind", "full" if atlas == FULL_ATLAS else "custom"),
        "classes": layout_attrs.get("classes"),
        "axis_labels": layout_attrs.get("axis_labels"),
        "method": layout_attrs.get("method"),
        "dzi": f"{layer}/{atlas}/atlas.dzi",
        "base": f"{layer}/{atlas}/",
        "width": pyramid["width"],
        "height": pyramid["height"],
        "levels": pyramid["levels"],
        "tile_size": tile_size,
        "overlap": overlap,
        "format": fmt,
        "grids": sorted(grids, key=lambda g: g["size"]),
        "block": BLOCK,
        "density_scale": density_scale,
        "examples": examples,
        "background": "#{:02x}{:02x}{:02x}".format(*BACKGROUND),
        "highlight": None if highlight is None else {"class": highlight[0], "index": highlight[1], "dir": "highlight"},
    }


