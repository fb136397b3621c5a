"""The tiles stage against the store: check, read the grids and icons, write the pyramid and the cell files into a
``.partial`` folder, publish it (:func:`make_tiles`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from atlas import store
from atlas.classnames import resolve_class
from atlas.errors import AtlasError
from atlas.settings import TilesSettings
from atlas.store import FULL_ATLAS, attrs, log, open_store
from atlas.tiles.cells import atlas_entry, class_names, grid_record
from atlas.tiles.plan import plan_tiles
from atlas.tiles.pyramid import density_scales, write_pyramid
from atlas.tiles.writer import update_manifest, write_cells


# --------------------------------------------------------------------------------------
# The steps of make_tiles: validation, inputs, class names, the manifest entry, publishing
# --------------------------------------------------------------------------------------
def _check_viewer(viewer: bool) -> None:
    """Fail fast on what needs no store: the viewer's assets, when it is to be installed."""
    if viewer:
        from atlas.viewer import require_viewer_assets

        require_viewer_assets()


def _select_grids(root, layer: str, atlas: str, sizes: list[int] | None) -> tuple[object, object, list[int]]:
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
    """Copy the browser viewer beside the tiles (its assets were checked by :func:`_check_viewer`)."""
    from atlas.viewer import install_viewer

    install_viewer(tiles_dir)


def _summary(layer: str, atlas: str, entry: dict, tiles: int, skipped: list[int]) -> str:
    """The run-log line of one tiled atlas."""
    msg = (f"tiles {layer}/{atlas}: {entry['width']}x{entry['height']} px, {entry['levels']} levels, {tiles} tiles; grids "
           + ", ".join(f"{g['size']}@level{g['level']}" for g in entry["grids"]))
    if skipped:
        msg += f"; grids {skipped} share a level with a finer grid and were not drawn"
    return msg


@store.writer
def make_tiles(run_dir: str | Path, layer: str, settings: TilesSettings | None = None, *, atlas: str = FULL_ATLAS,
               sizes: list[int] | None = None, highlight: str | int | None = None, viewer: bool = True, quality: int = 75,
               threads: int | None = None, **overrides) -> dict:
    """Write the deep-zoom pyramid, cell metadata and cell strips of one atlas and list it in atlases.json.

    The tiles stage. Everything is written to ``tiles/{layer}/{atlas}.partial`` and swapped into place when
    complete, so a failed or interrupted call leaves the previous tiles as they were. Every setting is checked (by
    :class:`atlas.settings.TilesSettings`) before any work.

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store must hold grids and rendered icons of the atlas (``atlas grid``, ``atlas render``).
    layer : str
        The layer, e.g. "mixed4c".
    settings : TilesSettings or None, default None
        The settings (:class:`atlas.settings.TilesSettings`: format, density_scale, examples, icon_size, tile_size,
        overlap); None: the defaults. ``examples`` needs the sampled images still readable; ``density_scale`` shrinks
        icons of sparse cells by min(1, sqrt(n / mean n)), as the paper does.
    atlas : str, default "full"
        Which atlas of the layer (``FULL_ATLAS``; class and comparison atlases have their own names).
    sizes : list of int or None, default None
        Grid sizes to tile, each with rendered icons; None: every grid of the atlas that has icons.
    highlight : str, int or None, default None
        A class (name, synset id or index) to highlight: each cell's mean attribution to it goes in the cell
        metadata and a veil per grid (``highlight/{size}.png``) darkens the cells that attribute little to it.
        Needs a run sampled with attribution. None: no highlight.
    viewer : bool, default True
        Also install the browser viewer beside the tiles, with the OpenSeadragon the package ships (or
        ``$ATLAS_OPENSEADRAGON``), checked first so a missing copy fails before any work.
    quality : int, default 75
        JPEG and WebP quality of the tiles (Pillow's scale, 1 to 95 useful); PNG tiles ignore it.
    threads : int or None, default None
        Threads encoding tiles; None: min(4, CPU count).
    **overrides
        Single fields of :class:`~atlas.settings.TilesSettings` replacing those of ``settings``, e.g. ``format="png"``
        (checked by the class; an unknown name is one line).

    Returns
    -------
    dict
        The manifest entry of the atlas, as written to ``tiles/{layer}/{atlas}/atlas.json`` and listed in
        ``tiles/atlases.json``: id, layer, atlas, model, kind, classes, method, the deep-zoom file and size, tile
        settings and one record per grid (size, icon and canvas pixels, level, cells drawn, cells not yet rendered).

    Raises
    ------
    AtlasError
        For a setting out of range, missing OpenSeadragon (with ``viewer``), no rendered icons for the layer, atlas or
        sizes, or a ``highlight`` without attributions or not a class.
    """
    s = TilesSettings.merged(settings, overrides)
    fmt, tile_size, overlap, examples = s.format, s.tile_size, s.overlap, s.examples
    run_dir = Path(run_dir)
    _check_viewer(viewer)
    root = open_store(run_dir)
    store.take_lock(run_dir)
    grid_group, icon_group, sizes = _select_grids(root, layer, atlas, sizes)
    store.verify(root, [f"{kind}/{layer}/{atlas}/{size}" for kind in ("grids", "icons") for size in sizes]
                 + ([f"samples/{layer}", "images"] if examples else []))
    inputs = _read_inputs(grid_group, icon_group, layer, atlas, sizes)
    plan = plan_tiles({size: images.shape[2] for size, (_, images, _) in inputs.items()}, s.icon_size)
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
        sources.append((owner, images, draw, density_scales(g["count"][:], draw) if s.density_scale else None))
        info = write_cells(run_dir, layer, g, images, draw, names, work, examples, hl_index, threads, layout_attrs.get("classes"))
        any_examples |= info["examples"]
        grids_info.append(grid_record(owner, g["render"][:], draw))
        if grids_info[-1]["not_done"]:
            log(run_dir, f"tiles {layer}/{atlas}: grid {owner.size} has {grids_info[-1]['not_done']} cells without icons yet (drawn empty)")
    pyramid = write_pyramid(sources, work, fmt, tile_size, overlap, quality, threads)
    entry = atlas_entry(layer, atlas, str(root.attrs.get("model", "unknown")), layout_attrs, pyramid, grids_info, tile_size=tile_size,
                        overlap=overlap, fmt=fmt, density_scale=s.density_scale, examples=any_examples,
                        highlight=None if hl_index is None else (names[hl_index], hl_index))
    _publish(tiles_dir, work, final, entry)
    if viewer:
        _install_viewer(tiles_dir)
    log(run_dir, _summary(layer, atlas, entry, pyramid["tiles"], plan.skipped))
    entry["skipped"] = plan.skipped
    return entry
