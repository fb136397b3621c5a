"""The files of one tiled grid (metadata blocks, icon sprites, example strips, the highlight veil) and the run's
manifest of tiled atlases, ``tiles/atlases.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.errors import AtlasError
from atlas.store import FULL_ATLAS
from atlas.tiles.cells import BLOCK, cell_records, example_rows, highlight_veil
from atlas.tiles.pyramid import BACKGROUND, TileSaver

MANIFEST = "atlases.json"


# --------------------------------------------------------------------------------------
# Per-cell metadata, cell images and the highlight veil
# --------------------------------------------------------------------------------------
def _sample_patches():
    """The render stage's example-patch function, looked up when tiles are written (render imports torch)."""
    from atlas.render import sample_patches

    return sample_patches


def write_cells(run_dir: Path, layer: str, grid, icons, draw: np.ndarray, names: list[str], out_dir: Path,
                examples: bool, highlight: int | None, threads: int | None = None, focus: list[int] | None = None) -> dict:
    """Metadata blocks, icon sprites per block and example strips per cell for one grid.

    Blocks hold only cells with samples (records from :func:`cell_records`). Icons at full
    size go in one sprite per block (a click fetches its block once; a file per cell would
    mean tens of thousands of files per grid). Example patches, when available, go in one
    strip per drawn cell, fetched one band of blocks at a time to bound memory.
    """
    s, p = icons.shape[0], icons.shape[2]
    count = grid["count"][:]
    if "top_classes" in grid:
        top_c, top_a = grid["top_classes"][:], grid["top_attribution"][:]
    else:  # sampled without attribution
        top_c, top_a = np.full((s, s, 0), -1, np.int64), np.zeros((s, s, 0), np.float32)
    nearest = grid["nearest"][:] if "nearest" in grid else np.full((s, s, 0), -1, np.int64)
    hl = grid["mean_attribution"][:, :, highlight] if highlight is not None else None
    focus = [int(c) for c in (focus or []) if isinstance(c, int) and "mean_attribution" in grid]
    focus_att = grid["mean_attribution"].oindex[:, :, focus] if focus else None
    sample = _sample_patches() if examples else None
    if examples and sample is None:  # only a substitute of _sample_patches (tests/test_tiles.py) returns None
        raise AtlasError("example patches are not available (no atlas.render.sample_patches); run with --no-examples")
    strips = example_rows(nearest, draw) if sample is not None else {}
    blocks = cell_records(count, draw, top_c, top_a, names, strips, hl, focus, focus_att)
    meta_dir, sprite_dir, ex_dir = out_dir / "meta" / str(s), out_dir / "icons" / str(s), out_dir / "examples" / str(s)
    meta_dir.mkdir(parents=True, exist_ok=True)
    sprite_dir.mkdir(parents=True, exist_ok=True)
    bg = np.array(BACKGROUND, np.uint8)
    n_strips = 0
    saver = TileSaver("jpg", 90, threads or min(4, os.cpu_count() or 1))
    try:
        for by in range(0, s, BLOCK):
            rows = icons[by : by + BLOCK]  # (b, S, P, P, 3): one band of blocks
            shown = draw[by : by + BLOCK]
            patches: dict[int, np.ndarray] = {}
            if sample is not None:
                wanted = nearest[by : by + BLOCK][shown]
                uniq = np.unique(wanted[wanted >= 0])
                if uniq.size:
                    got = np.asarray(sample(run_dir, layer, uniq, size=p))
                    patches = dict(zip(uniq.tolist(), got, strict=True))
            for bx in range(0, s, BLOCK):
                block_draw = shown[:, bx : bx + BLOCK]
                if not block_draw.any():
                    continue
                sprite = rows[:, bx : bx + BLOCK].copy()
                sprite[~block_draw] = bg
                h, w = block_draw.shape
                saver.submit(np.ascontiguousarray(sprite.transpose(0, 2, 1, 3, 4)).reshape(h * p, w * p, 3),
                             sprite_dir / f"{bx // BLOCK}_{by // BLOCK}.jpg")
            for (bx, bby), cells in blocks.items():
                if bby != by // BLOCK:
                    continue
                for cell in cells:
                    ex = strips.get((cell["x"], cell["y"]))
                    if cell["ex"] and ex:
                        path = ex_dir / str(cell["y"]) / f"{cell['x']}.jpg"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        saver.submit(np.concatenate([patches[r] for r in ex], axis=1), path)
                        n_strips += 1
                (meta_dir / f"{bx}_{bby}.json").write_text(json.dumps({"size": s, "block": BLOCK, "cells": cells}, separators=(",", ":")))
    finally:
        saver.close()
    info = {"strips": n_strips, "examples": sample is not None}
    if hl is not None:
        hl_dir = out_dir / "highlight"
        hl_dir.mkdir(exist_ok=True)
        Image.fromarray(highlight_veil(hl, draw), "RGBA").save(hl_dir / f"{s}.png")
    return info


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------
def update_manifest(tiles_dir: Path, entry: dict) -> list[dict]:
    """Insert or replace one atlas in ``atlases.json`` (written atomically), sorted by layer then name."""
    from atlas.viewer import update_listing

    return update_listing(tiles_dir / MANIFEST, "atlases", entry, lambda a: a.get("id") == entry["id"],
                          lambda a: (tiles_dir / str(a.get("dzi", "-"))).is_file(),
                          lambda a: (a["layer"], a["atlas"] != FULL_ATLAS, a["atlas"]))
