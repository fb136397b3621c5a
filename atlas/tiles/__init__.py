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

The package: ``plan`` (the pyramid's geometry and which grid owns which level), ``pyramid`` (the streaming
Deep Zoom writer), ``cells`` (metadata records, class names, the veil, the manifest entry: pure functions); this
module reads the store, calls them and publishes the result (``make_tiles``, ``write_cells``).

The highlight veil darkens each cell by how little it attributes to the class (the cells that
support the class stay bright); the viewer stretches the grid's PNG over the image with
nearest-neighbour scaling, and each cell's value is also in its metadata as ``hl``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from atlas import store
from atlas.classnames import resolve_class
from atlas.errors import AtlasError
from atlas.store import FULL_ATLAS, attrs, log, open_store
from atlas.tiles.cells import BLOCK, atlas_entry, cell_records, class_names, example_rows, grid_record, highlight_veil
from atlas.tiles.plan import GridPlan, TilePlan, dzi_levels, level_ranges, plan_levels, plan_tiles, tile_spans
from atlas.tiles.pyramid import BACKGROUND, FORMATS, TileSaver, density_scales, grid_bands, write_pyramid

__all__ = ["BACKGROUND", "BLOCK", "FORMATS", "MANIFEST", "GridPlan", "TilePlan", "atlas_entry", "cell_records", "class_names",
           "density_scales", "dzi_levels", "example_rows", "grid_bands", "grid_record", "highlight_veil", "level_ranges",
           "make_tiles", "plan_levels", "plan_tiles", "tile_spans", "update_manifest", "write_cells", "write_pyramid"]

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
        Also install the browser viewer beside the tiles, with the OpenSeadragon the package ships (or
        ``$ATLAS_OPENSEADRAGON``), checked first so a missing copy fails before any work.
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
