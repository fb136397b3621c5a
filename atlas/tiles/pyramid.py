"""The streaming Deep Zoom writer: a canvas of icons drawn band by band, each level downsampled from the one above."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.errors import AtlasError
from atlas.tiles.plan import GridPlan, dzi_levels, level_ranges, tile_spans

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
BACKGROUND = (17, 19, 24)  # the viewer's page colour, so empty cells blend into it


# --------------------------------------------------------------------------------------
# Streaming pyramid writer
# --------------------------------------------------------------------------------------
class TileSaver:
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

    def __init__(self, level: int, width: int, height: int, out_dir: Path, saver: TileSaver, tile_size: int, overlap: int,
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


def _chain(top: int, stop: int, levels: list[tuple[int, int]], out_dir: Path, saver: TileSaver, tile_size: int, overlap: int,
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
    saver = TileSaver(fmt, quality, threads or min(4, os.cpu_count() or 1))
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


