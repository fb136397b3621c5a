"""Deep-zoom tiles of an atlas: a standard DZI pyramid, per-cell metadata and the viewer's manifest.

``make_tiles(run_dir, layer, atlas)`` reads ``grids/{layer}/{atlas}/{size}/*`` and
``icons/{layer}/{atlas}/{size}/*`` and writes, under ``RUN/tiles/``::

    atlases.json                               every tiled atlas of the run (the viewer's menu)
    index.html viewer.js viewer.css            the viewer (atlas.viewer), plus openseadragon/
    {layer}/{atlas}/atlas.dzi                  Deep Zoom descriptor
    {layer}/{atlas}/atlas_files/{level}/{col}_{row}.{fmt}
    {layer}/{atlas}/meta/{size}/{bx}_{by}.json cells of one BLOCK x BLOCK block of one grid
    {layer}/{atlas}/icons/{size}/{bx}_{by}.jpg the icons of one block at full size (a sprite)
    {layer}/{atlas}/examples/{size}/{gy}/{gx}.jpg  the cell's dataset-example patches side by side
    {layer}/{atlas}/highlight/{size}.png       with ``highlight``: an S x S RGBA veil per grid

Semantic zoom: every grid owns the pyramid level whose size matches its canvas
(``size * icon`` pixels) and that level is drawn from its own icons; the levels between two
owned levels are box-downsampled from the finer one, and the levels below the coarsest grid
from that grid. The pyramid is written strip by strip (a band of cells at a time), so memory
holds a few tile rows per level, never a whole canvas.

The highlight veil darkens each cell by how little it attributes to the class (the cells that
support the class stay bright); the viewer stretches the grid's PNG over the image with
nearest-neighbour scaling, and each cell's value is also in its metadata as ``hl``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from atlas import store
from atlas.classnames import resolve_class
from atlas.errors import AtlasError
from atlas.store import FULL_ATLAS, attrs, log, open_store

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
BACKGROUND = (17, 19, 24)  # the viewer's page colour, so empty cells blend into it
BLOCK = 16  # cells per side of one metadata file
MANIFEST = "atlases.json"


# --------------------------------------------------------------------------------------
# Pyramid geometry
# --------------------------------------------------------------------------------------
def dzi_levels(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every Deep Zoom level, level 0 (1x1) first, the full image last."""
    top = max(1, math.ceil(math.log2(max(width, height)))) if max(width, height) > 1 else 0
    return [(math.ceil(width / 2 ** (top - lvl)), math.ceil(height / 2 ** (top - lvl))) for lvl in range(top + 1)]


def tile_spans(length: int, tile_size: int, overlap: int) -> list[tuple[int, int]]:
    """Pixel span [start, end) of each tile along one axis, overlap included (as DZI readers expect)."""
    n = max(1, math.ceil(length / tile_size))
    return [(max(0, i * tile_size - overlap), min(length, (i + 1) * tile_size + overlap)) for i in range(n)]


@dataclass
class GridPlan:
    """One grid of the atlas and the pyramid level it is drawn at."""

    size: int
    icon: int  # native icon size in the store
    canvas: int  # size * drawn icon size
    level: int = -1
    dim: int = 0  # the owned level's width (== canvas when the sizes line up)


def plan_levels(grids: list[GridPlan]) -> tuple[int, list[tuple[int, int]], list[GridPlan]]:
    """The full image size, its levels and the grids that own a level (finest first).

    Each grid claims the level nearest (in scale) to its canvas; when two grids claim the
    same level the finer grid keeps it, because it holds more specific icons.
    """
    full = max(g.canvas for g in grids)
    levels = dzi_levels(full, full)
    owned: dict[int, GridPlan] = {}
    for g in sorted(grids, key=lambda g: -g.size):
        lvl = min(range(len(levels)), key=lambda i: (abs(math.log2(levels[i][0] / g.canvas)), -i))
        if lvl not in owned:
            g.level, g.dim = lvl, levels[lvl][0]
            owned[lvl] = g
    return full, levels, [owned[k] for k in sorted(owned, reverse=True)]


def level_ranges(owned: list[int]) -> dict[int, tuple[int, int]]:
    """The semantic-zoom plan: owned level -> (coarsest, finest) level drawn from that grid.

    A grid draws its own level and every coarser level down to just above the next owned
    one; the coarsest grid draws every level down to 0 (1x1).
    """
    ranges, below = {}, -1
    for lvl in sorted(set(owned)):
        ranges[lvl] = (below + 1, lvl)
        below = lvl
    return ranges


@dataclass(frozen=True)
class TilePlan:
    """Which grid draws which pyramid level, at which canvas size: the outcome of :func:`plan_tiles`."""

    full: int  # width (== height) of the full image in pixels
    levels: list[tuple[int, int]]  # (width, height) of every level, level 0 first
    grids: list[GridPlan]  # every grid, smallest first; level -1 when a finer grid owns its level
    owners: list[GridPlan]  # the grids that own a level, finest first

    @property
    def skipped(self) -> list[int]:
        """Sizes of the grids not drawn (their level went to a finer grid)."""
        return [g.size for g in self.grids if g.level < 0]

    @property
    def ranges(self) -> dict[int, tuple[int, int]]:
        """Owned level -> (coarsest, finest) level that grid draws (see :func:`level_ranges`)."""
        return level_ranges([g.level for g in self.owners])


def plan_tiles(icon_sizes: dict[int, int], icon_size: int | None = None) -> TilePlan:
    """Plan the pyramid of one atlas from ``{grid size: stored icon size}``.

    Each grid's canvas is ``size * (icon_size or its stored icon size)`` pixels; the grids
    then claim levels as :func:`plan_levels` says. Pure: nothing is read or written.
    """
    if not icon_sizes:
        raise AtlasError("no grids to tile")
    if icon_size is not None and icon_size < 1:
        raise AtlasError(f"icon size must be positive (got {icon_size})")
    grids = [GridPlan(size=s, icon=p, canvas=s * (icon_size or p)) for s, p in sorted(icon_sizes.items())]
    full, levels, owners = plan_levels(grids)
    return TilePlan(full=full, levels=levels, grids=grids, owners=owners)


# --------------------------------------------------------------------------------------
# Streaming pyramid writer
# --------------------------------------------------------------------------------------
class _TileSaver:
    """Encodes and writes tiles on a small thread pool, with a bound on tiles in flight."""

    def __init__(self, fmt: str, quality: int, threads: int):
        self.fmt, self.quality = FORMATS[fmt], quality
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.slots = threading.Semaphore(threads * 8)
        self.futures: list[Future] = []
        self.count = 0

    def _write(self, tile: np.ndarray, path: Path) -> None:
        try:
            options = {"quality": self.quality} if self.fmt in ("JPEG", "WEBP") else {"compress_level": 3}
            Image.fromarray(tile).save(path, self.fmt, **options)
        finally:
            self.slots.release()

    def submit(self, tile: np.ndarray, path: Path) -> None:
        self.slots.acquire()
        self.futures.append(self.pool.submit(self._write, tile, path))
        self.count += 1
        if len(self.futures) > 4096:
            self._reap()

    def _reap(self) -> None:
        pending = []
        for f in self.futures:
            if f.done():
                f.result()  # re-raise write errors
            else:
                pending.append(f)
        self.futures = pending

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for f in self.futures:
            f.result()
        self.futures = []


class _Level:
    """One pyramid level fed with horizontal bands top to bottom: cuts and saves tile rows as
    soon as their rows (overlap included) have arrived, and feeds the next coarser level."""

    def __init__(self, level: int, width: int, height: int, out_dir: Path, saver: _TileSaver, tile_size: int, overlap: int,
                 ext: str, below: _Level | None):
        self.level, self.width, self.height = level, width, height
        self.saver, self.tile_size, self.overlap, self.ext, self.below = saver, tile_size, overlap, ext, below
        self.dir = out_dir / str(level)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows = tile_spans(height, tile_size, overlap)
        self.cols = tile_spans(width, tile_size, overlap)
        self.buf = np.empty((tile_size + 2 * overlap + tile_size, width, 3), np.uint8)
        self.buf_start = 0  # image row of buf[0]
        self.buf_len = 0
        self.received = 0
        self.next_row = 0  # next tile row to emit
        self.carry: np.ndarray | None = None  # an odd row waiting for its pair (for the level below)

    def push(self, band: np.ndarray) -> None:
        for start in range(0, band.shape[0], self.tile_size):  # pieces no taller than a tile fit the buffer
            self._push_piece(band[start : start + self.tile_size])
        if self.below is not None:
            self._downsample(band, final=False)

    def _push_piece(self, piece: np.ndarray) -> None:
        h = piece.shape[0]
        if self.buf_len + h > self.buf.shape[0]:  # drop rows no tile still needs
            keep_from = self.rows[self.next_row][0] if self.next_row < len(self.rows) else self.received
            drop = keep_from - self.buf_start
            self.buf[: self.buf_len - drop] = self.buf[drop : self.buf_len]
            self.buf_start, self.buf_len = keep_from, self.buf_len - drop
        self.buf[self.buf_len : self.buf_len + h] = piece
        self.buf_len += h
        self.received += h
        while self.next_row < len(self.rows) and self.rows[self.next_row][1] <= self.received:
            self._emit(self.next_row)
            self.next_row += 1

    def _emit(self, r: int) -> None:
        y0, y1 = self.rows[r]
        strip = self.buf[y0 - self.buf_start : y1 - self.buf_start]
        for c, (x0, x1) in enumerate(self.cols):
            self.saver.submit(np.ascontiguousarray(strip[:, x0:x1]), self.dir / f"{c}_{r}.{self.ext}")

    def _downsample(self, band: np.ndarray, final: bool) -> None:
        """2x2 box mean into the level below; an odd trailing row waits for the next band."""
        if self.carry is not None:
            band = np.concatenate([self.carry, band]) if band.size else self.carry
            self.carry = None
        if not final and band.shape[0] % 2:
            self.carry, band = band[-1:].copy(), band[:-1]
        if band.shape[0]:
            self.below.push(np.asarray(Image.fromarray(band).reduce(2)))

    def finish(self) -> None:
        if self.received != self.height:
            raise RuntimeError(f"level {self.level}: got {self.received} rows, expected {self.height}")
        if self.below is not None:
            self._downsample(np.empty((0, self.width, 3), np.uint8), final=True)
            self.below.finish()


def _chain(top: int, stop: int, levels: list[tuple[int, int]], out_dir: Path, saver: _TileSaver, tile_size: int, overlap: int,
           ext: str) -> _Level:
    """Levels ``top`` down to ``stop`` (inclusive), each feeding the next."""
    below = None
    for lvl in range(stop, top + 1):
        w, h = levels[lvl]
        below = _Level(lvl, w, h, out_dir, saver, tile_size, overlap, ext, below)
    return below


# --------------------------------------------------------------------------------------
# Drawing a grid's icons
# --------------------------------------------------------------------------------------
def density_scales(count: np.ndarray, render: np.ndarray) -> np.ndarray:
    """The paper's icon scale min(1, sqrt(n / mean n)) over the drawn cells (1 elsewhere)."""
    scale = np.ones(count.shape, np.float32)
    if render.any():
        mean = float(count[render].mean())
        if mean > 0:
            scale[render] = np.minimum(1.0, np.sqrt(count[render] / mean))
    return scale


def grid_bands(icons, draw: np.ndarray, dim: int, scale: np.ndarray | None = None,
               background: tuple[int, int, int] = BACKGROUND) -> Iterator[np.ndarray]:
    """Bands of ``dim``-wide rows, one grid row at a time, drawing the grid's icons to fill ``dim`` pixels.

    ``icons`` is the (S, S, P, P, 3) zarr array, read one grid row at a time. When
    ``dim == S * P`` and icons keep their size, a row is a plain reshape (the fast path).
    """
    s, p = icons.shape[0], icons.shape[2]
    bounds = np.round(np.arange(s + 1) * dim / s).astype(int)
    bg = np.array(background, np.uint8)
    exact = dim == s * p and scale is None
    for gy in range(s):
        h = int(bounds[gy + 1] - bounds[gy])
        if not draw[gy].any():
            yield np.broadcast_to(bg, (h, dim, 3)).copy()
            continue
        row = icons[gy]  # (S, P, P, 3)
        if exact:
            band = np.ascontiguousarray(row.transpose(1, 0, 2, 3)).reshape(p, dim, 3)
            band.reshape(p, s, p, 3)[:, ~draw[gy]] = bg
            yield band
            continue
        band = np.empty((h, dim, 3), np.uint8)
        band[:] = bg
        for gx in np.flatnonzero(draw[gy]):
            x0, x1 = int(bounds[gx]), int(bounds[gx + 1])
            cw = x1 - x0
            k = 1.0 if scale is None else float(scale[gy, gx])
            iw, ih = max(1, round(cw * k)), max(1, round(h * k))
            icon = Image.fromarray(row[gx])
            if (iw, ih) != (p, p):
                icon = icon.resize((iw, ih), Image.Resampling.LANCZOS)
            ox, oy = x0 + (cw - iw) // 2, (h - ih) // 2
            band[oy : oy + ih, ox : ox + iw] = np.asarray(icon)
        yield band


def write_pyramid(sources: list[tuple[GridPlan, object, np.ndarray, np.ndarray | None]], out_dir: Path, fmt: str = "jpg",
                  tile_size: int = 254, overlap: int = 1, quality: int = 75, threads: int | None = None,
                  background: tuple[int, int, int] = BACKGROUND) -> dict:
    """Write ``out_dir/atlas.dzi`` and ``out_dir/atlas_files`` from grids that own levels.

    ``sources`` holds (plan, icons array, draw mask, density scale or None) with plans from
    :func:`plan_levels`. Returns the full size, level count and number of tiles written.
    """
    if fmt not in FORMATS:
        raise AtlasError(f"unknown tile format '{fmt}'; use one of {', '.join(FORMATS)}")
    if tile_size < 1 or overlap < 0:
        raise AtlasError(f"tile size must be >= 1 and overlap >= 0 (got {tile_size}, {overlap})")
    full = max(plan.dim for plan, *_ in sources)
    levels = dzi_levels(full, full)
    files = out_dir / "atlas_files"
    files.mkdir(parents=True, exist_ok=True)
    saver = _TileSaver(fmt, quality, threads or min(4, os.cpu_count() or 1))
    try:
        ranges = level_ranges([plan.level for plan, *_ in sources])
        for plan, icons, draw, scale in sources:
            stop = ranges[plan.level][0]
            top = _chain(plan.level, stop, levels, files, saver, tile_size, overlap, fmt)
            for band in grid_bands(icons, draw, plan.dim, scale, background):
                top.push(band)
            top.finish()
    finally:
        saver.close()
    (out_dir / "atlas.dzi").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" Overlap="{overlap}" TileSize="{tile_size}">\n'
        f'  <Size Width="{full}" Height="{full}"/>\n</Image>\n'
    )
    return {"width": full, "height": full, "levels": len(levels), "tiles": saver.count}


# --------------------------------------------------------------------------------------
# Per-cell metadata, cell images and the highlight veil
# --------------------------------------------------------------------------------------
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


def _sample_patches():
    """The render stage's example-patch function, looked up when tiles are written (render imports torch)."""
    from atlas.render import sample_patches

    return sample_patches


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
    saver = _TileSaver("jpg", 90, threads or min(4, os.cpu_count() or 1))
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


# --------------------------------------------------------------------------------------
# The steps of make_tiles: validation, inputs, class names, the manifest entry, publishing
# --------------------------------------------------------------------------------------
def _check_options(fmt: str, viewer: bool) -> None:
    """Fail fast on what needs no store: the tile format, and the viewer's assets when it is to be installed."""
    if fmt not in FORMATS:
        raise AtlasError(f"unknown tile format '{fmt}'; use one of {', '.join(FORMATS)}")
    if viewer:
        from atlas.viewer import require_viewer_assets

        require_viewer_assets()


def _select_grids(root, layer: str, atlas: str, sizes: list[int] | None, icon_size: int | None) -> tuple[object, object, list[int]]:
    """The atlas's grids and icons groups and the grid sizes to tile (default: every size with icons), checked."""
    grids_root, icons_root = root.get(f"grids/{layer}"), root.get(f"icons/{layer}")
    if grids_root is None or icons_root is None:
        raise AtlasError(f"no rendered icons for layer '{layer}'; run `atlas grid` and `atlas render` first")
    if atlas not in grids_root or atlas not in icons_root:
        have = sorted(set(grids_root.group_keys()) & set(icons_root.group_keys()))
        raise AtlasError(f"atlas '{atlas}' of layer '{layer}' has no rendered icons; atlases with icons: {', '.join(have) or 'none'}")
    grid_group, icon_group = grids_root[atlas], icons_root[atlas]
    available = sorted(int(k) for k in set(grid_group.group_keys()) & set(icon_group.group_keys()) if k.isdigit())
    if sizes is None:
        sizes = available
    missing = [s for s in sizes if s not in available]
    if missing or not sizes:
        raise AtlasError(f"grid sizes {missing or sizes} have no rendered icons in {layer}/{atlas}; available: "
                         f"{', '.join(map(str, available)) or 'none'}")
    if icon_size is not None and icon_size < 1:
        raise AtlasError(f"icon size must be positive (got {icon_size})")
    return grid_group, icon_group, sizes


def _read_inputs(grid_group, icon_group, layer: str, atlas: str, sizes: list[int]) -> dict[int, tuple[object, object, np.ndarray]]:
    """size -> (grid group, icons array, draw mask) with the icons' shape checked; smallest grid first."""
    inputs = {}
    for s in sorted(set(sizes)):
        g, ic = grid_group[str(s)], icon_group[str(s)]
        images = ic["images"]
        if images.shape[:2] != (s, s) or images.ndim != 5:
            raise AtlasError(f"icons/{layer}/{atlas}/{s}/images has shape {images.shape}, expected ({s}, {s}, P, P, 3)")
        inputs[s] = (g, images, g["render"][:] & ic["done"][:])
    return inputs


def _class_names(root, layer: str, first, highlight: str | int | None) -> tuple[list[str], int | None]:
    """The class names of the run and the index of the highlighted class (None without ``highlight``)."""
    n_classes = first["mean_attribution"].shape[-1] if "mean_attribution" in first else len(root.attrs.get("classes", []))
    names = class_names(root, n_classes)
    if highlight is not None and "mean_attribution" not in first:
        raise AtlasError(f"--highlight needs attributions, but layer '{layer}' was sampled with --no-attribution")
    hl_index = resolve_class(highlight, names, root.attrs.get("weights")).index if highlight is not None else None
    return names, hl_index


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


def _publish(tiles_dir: Path, work: Path, final: Path, entry: dict) -> None:
    """Write ``atlas.json``, swap the finished folder in for the old one and list the atlas in the manifest.

    The old tiles stay in place until the new ones are complete: a failed run leaves only a ``.partial`` folder.
    """
    from atlas.viewer import swap_folder

    (work / "atlas.json").write_text(json.dumps(entry, indent=1))
    swap_folder(work, final)
    update_manifest(tiles_dir, entry)


def _install_viewer(tiles_dir: Path) -> None:
    """Copy the browser viewer beside the tiles (its assets were checked by :func:`_check_options`)."""
    from atlas.viewer import install_viewer

    install_viewer(tiles_dir)


def _summary(layer: str, atlas: str, entry: dict, tiles: int, skipped: list[int]) -> str:
    """The run-log line of one tiled atlas."""
    msg = (f"tiles {layer}/{atlas}: {entry['width']}x{entry['height']} px, {entry['levels']} levels, {tiles} tiles; grids "
           + ", ".join(f"{g['size']}@level{g['level']}" for g in entry["grids"]))
    if skipped:
        msg += f"; grids {skipped} share a level with a finer grid and were not drawn"
    return msg


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
@store.writer
def make_tiles(run_dir: str | Path, layer: str, atlas: str = FULL_ATLAS, sizes: list[int] | None = None, icon_size: int | None = None,
               fmt: str = "jpg", tile_size: int = 254, overlap: int = 1, density_scale: bool = False, highlight: str | int | None = None,
               examples: bool = True, viewer: bool = True, quality: int = 75, threads: int | None = None) -> dict:
    """Write the deep-zoom pyramid, cell metadata and cell strips of one atlas and list it in atlases.json.

    The tiles stage. Everything is written to ``tiles/{layer}/{atlas}.partial`` and swapped into place when
    complete, so a failed or interrupted call leaves the previous tiles as they were. The settings of the
    ``[tiles]`` table take their defaults and ranges from :class:`atlas.settings.TilesSettings` (the CLI and
    ``atlas build`` check them there; this function itself refuses only what it cannot draw, noted below).

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store must hold grids and rendered icons of the atlas (``atlas grid``, ``atlas render``).
    layer : str
        The layer, e.g. "mixed4c".
    atlas : str, default "full"
        Which atlas of the layer (``FULL_ATLAS``; class and comparison atlases have their own names).
    sizes : list of int or None, default None
        Grid sizes to tile, each with rendered icons; None: every grid of the atlas that has icons.
    icon_size : int or None, default None
        Redraw every icon at this many pixels, 1 to 1024 (``TilesSettings.icon_size``; here: at least 1);
        None: each grid's stored icon size.
    fmt : str, default "jpg"
        Tile image format: "jpg", "png" or "webp" (``TilesSettings.format``).
    tile_size : int, default 254
        Deep-zoom tile size in pixels, 16 to 4096 (``TilesSettings.tile_size``; here: at least 1).
    overlap : int, default 1
        Deep-zoom tile overlap in pixels, 0 to 64 (``TilesSettings.overlap``; here: at least 0).
    density_scale : bool, default False
        Shrink icons of sparse cells by min(1, sqrt(n / mean n)), as the paper does (``TilesSettings.density_scale``).
    highlight : str, int or None, default None
        A class (name, synset id or index) to highlight: each cell's mean attribution to it goes in the cell
        metadata and a veil per grid (``highlight/{size}.png``) darkens the cells that attribute little to it.
        Needs a run sampled with attribution. None: no highlight.
    examples : bool, default True
        Write dataset-example patches per cell (needs the sampled images still readable) (``TilesSettings.examples``).
    viewer : bool, default True
        Also install the browser viewer beside the tiles; it needs OpenSeadragon from npm, checked first so a
        missing install fails before any work.
    quality : int, default 75
        JPEG and WebP quality of the tiles (Pillow's scale, 1 to 95 useful); PNG tiles ignore it.
    threads : int or None, default None
        Threads encoding tiles; None: min(4, CPU count).

    Returns
    -------
    dict
        The manifest entry of the atlas, as written to ``tiles/{layer}/{atlas}/atlas.json`` and listed in
        ``tiles/atlases.json``: id, layer, atlas, model, kind, classes, method, the deep-zoom file and size, tile
        settings and one record per grid (size, icon and canvas pixels, level, cells drawn, cells not yet rendered).

    Raises
    ------
    AtlasError
        For an unknown format, missing OpenSeadragon (with ``viewer``), no rendered icons for the layer, atlas or
        sizes, a ``highlight`` without attributions or not a class, or icon and tile sizes out of range.
    """
    run_dir = Path(run_dir)
    _check_options(fmt, viewer)
    root = open_store(run_dir)
    store.take_lock(run_dir)
    grid_group, icon_group, sizes = _select_grids(root, layer, atlas, sizes, icon_size)
    store.verify(root, [f"{kind}/{layer}/{atlas}/{s}" for kind in ("grids", "icons") for s in sizes]
                 + ([f"samples/{layer}", "images"] if examples else []))
    inputs = _read_inputs(grid_group, icon_group, layer, atlas, sizes)
    plan = plan_tiles({s: images.shape[2] for s, (_, images, _) in inputs.items()}, icon_size)
    names, hl_index = _class_names(root, layer, next(iter(inputs.values()))[0], highlight)
    layout = root.get(f"layouts/{layer}/{atlas}")
    layout_attrs = attrs(layout) if layout is not None else {}

    tiles_dir = run_dir / "tiles"
    final = tiles_dir / layer / atlas
    work = final.with_name(final.name + ".partial")
    store.begin_stage(run_dir, "tiles", [], atlas)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    grids_info, sources, any_examples = [], [], False
    for owner in plan.owners:
        g, images, draw = inputs[owner.size]
        sources.append((owner, images, draw, density_scales(g["count"][:], draw) if density_scale else None))
        info = write_cells(run_dir, layer, g, images, draw, names, work, examples, hl_index, threads, layout_attrs.get("classes"))
        any_examples |= info["examples"]
        grids_info.append(grid_record(owner, g["render"][:], draw))
        if grids_info[-1]["not_done"]:
            log(run_dir, f"tiles {layer}/{atlas}: grid {owner.size} has {grids_info[-1]['not_done']} cells without icons yet (drawn empty)")
    pyramid = write_pyramid(sources, work, fmt, tile_size, overlap, quality, threads)
    entry = atlas_entry(layer, atlas, str(root.attrs.get("model", "unknown")), layout_attrs, pyramid, grids_info, tile_size=tile_size,
                        overlap=overlap, fmt=fmt, density_scale=density_scale, examples=any_examples,
                        highlight=None if hl_index is None else (names[hl_index], hl_index))
    _publish(tiles_dir, work, final, entry)
    if viewer:
        _install_viewer(tiles_dir)
    log(run_dir, _summary(layer, atlas, entry, pyramid["tiles"], plan.skipped))
    entry["skipped"] = plan.skipped
    return entry
