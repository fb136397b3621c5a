"""The unit gallery: every channel of a layer in the browser, beside the atlas viewer.

``write_gallery(run_dir, layer)`` reads what the store holds under ``units/{layer}/`` (any part may be missing:
the gallery shows what exists) and the layer's atlas grids, and writes, under ``RUN/tiles/``::

    units.json                                   the layers that have a gallery (the pages' menu)
    units.html units.js units.css atlas_units.js the gallery page and the atlas viewer's unit links (atlas.viewer)
    units/{layer}/gallery.json                   the layer: channels, the grid's channels (order) and columns, kinds,
                                                 methods, atlases
    units/{layer}/thumbs/{c}.jpg                 every visualised channel's square (layers up to ``dzi_above`` channels)
    units/{layer}/grid.dzi, grid_files/          the same as one Deep Zoom pyramid (larger layers)

The grid shows only the channels with a visualisation; the page lists the others by number (each still opens its
panel: top examples, projections and classes may exist without a visualisation).
    units/{layer}/unit/{c}.json                  one unit: visualisations, top examples, projections, classes, cells
                                                 (its veils: S x S alpha bytes per atlas and grid, zlib, base64)
    units/{layer}/vis/{kind}/{c}.jpg|png         its visualisations of one kind side by side (PNG with alpha)
    units/{layer}/top/{c}.jpg                    its top-k dataset patches side by side
    units/{layer}/projection/{method}/{c}.jpg    their projections, in the same order
    units/{layer}/cells/{atlas}/{size}/{bx}_{by}.json  each atlas cell's top units (BLOCK x BLOCK cells a file)

The channel grid shows the best kind each channel has: ``fft``, else a Yosinski preset, else ``pixel``, else the
first image of ``diverse``, else ``alpha`` over grey. A unit's "show in atlas" veil is the atlas viewer's
``--highlight`` veil with the unit's mean activation per cell in place of a class attribution: cells where the
unit is strong stay bright, the others darken (:func:`unit_veils`; the per-unit alphas go in the unit's JSON and
the viewer draws them client-side, so no PNG per unit and grid is written). A cell's top units are the channels
with the largest values in the cell's mean activation (``grids/{layer}/{atlas}/{size}/mean_activation``).

Only ``tiles/`` is written, never the store; the gallery is rebuilt whole in ``units/{layer}.partial`` and swapped
in when complete (a failed call leaves the previous gallery as it was). A part of the store that is damaged is
skipped with one line in log.txt and counted in the summary; a part a killed ``atlas units`` left unfinished
shows the channels it had finished (its ``done`` flags).
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from atlas import store
from atlas.errors import AtlasError
from atlas.viewer import swap_folder, update_listing

BLOCK = 16  # cells per side of one cells/ file, as the atlas viewer's metadata blocks (atlas.tiles.BLOCK)
TOP_UNITS = 5  # units listed per atlas cell
DZI_ABOVE = 256  # layers with more channels get a Deep Zoom grid instead of one thumbnail file per channel
MAX_THUMB = 96  # side of a channel's square in the grid (the visualisation's own size when smaller)
BACKGROUND = (17, 19, 24)  # the viewer's page colour (atlas.tiles.BACKGROUND): empty squares and the veil's colour
GREY = 127
MANIFEST = "units.json"
TILE_SIZE, OVERLAP = 254, 1
SUPPORT_LEVEL = 0.08  # a projection pixel this far from grey (of full scale) is part of what the card crops to


# --------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------
def kind_order(kinds: list[str]) -> list[str]:
    """The kinds in the order the channel grid prefers them: fft, the presets, pixel, diverse, alpha, others."""
    rank = {"fft": 0, "pixel": 2, "diverse": 3, "alpha": 4}
    return sorted(kinds, key=lambda k: (rank.get(k, 1 if k.startswith("yosinski") else 5), k))


def unit_veils(values: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """(S, S, C) uint8 veil alphas, one per unit: the atlas viewer's highlight veil of each unit's cell values.

    ``values`` (S, S, C) is a grid's mean activation, ``draw`` (S, S) its drawn cells. Per unit, as
    ``atlas.tiles.highlight_veil`` does for a class: strength = value / the 99th percentile of the unit's positive
    values over drawn cells (1 when it has none), clipped to [0, 1]; alpha = 205 (1 - strength)^1.5 on drawn
    cells, 0 elsewhere. Pure.
    """
    values = np.asarray(values, np.float64)
    pos = np.where((values > 0) & draw[..., None], values, np.nan)[draw]  # (n_drawn, C)
    with warnings.catch_warnings():  # a unit with no positive cell: an all-NaN column, handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        top = np.nanpercentile(pos, 99, axis=0) if pos.size else np.full(values.shape[-1], np.nan)
    top = np.where(np.isfinite(top), top, 1.0)
    strength = np.clip(values / np.maximum(top, 1e-12), 0.0, 1.0)
    alpha = np.round(205 * (1.0 - strength) ** 1.5)
    return np.where(draw[..., None], alpha, 0).astype(np.uint8)


def cell_top_units(values: np.ndarray, count: np.ndarray, k: int = TOP_UNITS) -> dict[tuple[int, int], list[dict]]:
    """Each cell's top units, grouped in BLOCK x BLOCK blocks: ``{(bx, by): [{"x", "y", "units": [[c, v], ...]}]}``.

    ``values`` (S, S, C) is the grid's mean activation, ``count`` (S, S) its samples per cell; cells without samples
    are left out, and so are units whose value is not positive. Units by descending value. Pure.
    """
    k = min(k, values.shape[-1])
    order = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    blocks: dict[tuple[int, int], list[dict]] = {}
    for gy, gx in zip(*np.nonzero(count > 0), strict=True):
        units = [[int(c), round(float(values[gy, gx, c]), 4)] for c in order[gy, gx] if values[gy, gx, c] > 0]
        blocks.setdefault((int(gx) // BLOCK, int(gy) // BLOCK), []).append({"x": int(gx), "y": int(gy), "units": units})
    return blocks


def grid_columns(channels: int) -> int:
    """Columns (== rows) of the square channel grid."""
    return max(1, math.ceil(math.sqrt(channels)))


def strip(images: list[np.ndarray]) -> np.ndarray:
    """Equal-sized images side by side."""
    return np.concatenate(images, axis=1)


def on_grey(image: np.ndarray) -> np.ndarray:
    """An RGB view of an image: RGBA composited over mid grey, RGB unchanged."""
    if image.shape[-1] == 3:
        return image
    a = image[..., 3:4].astype(np.float32) / 255.0
    return np.round(image[..., :3] * a + GREY * (1.0 - a)).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Reading the store
# --------------------------------------------------------------------------------------
class _Parts:
    """The usable parts of ``units/{layer}``: each with its done flags over the layer's C channels."""

    def __init__(self, run_dir: Path, root, layer: str):
        self.run_dir, self.root, self.layer = run_dir, root, layer
        self.group = root.get(f"units/{layer}")
        self.skipped: list[str] = []
        self.partial: list[str] = []
        self.channels: int | None = None
        self.writing = list(store.read_ledger(run_dir).get("writing", {}))

    def _usable(self, rel: str, arrays: tuple[str, ...]) -> bool:
        """True when the node holds ``arrays`` and is intact (or is being finished by a resumable writer)."""
        path = f"units/{self.layer}/{rel}"
        node = self.root.get(path)
        if node is None or any(a not in node for a in arrays):
            if node is not None:
                self._skip(rel, f"misses {', '.join(a for a in arrays if a not in node)}")
            return False
        marked = any(path == m or path.startswith(m + "/") or m.startswith(path + "/") for m in self.writing)
        if not marked:  # marked: a killed `atlas units`; the channels it flagged done are final, the rest is not shown
            try:
                store.verify(self.root, [path])
            except AtlasError as exc:
                self._skip(rel, str(exc))
                return False
        c = node[arrays[0]].shape[0]
        if self.channels is None:
            self.channels = c
        elif c != self.channels:
            self._skip(rel, f"has {c} channels, other parts {self.channels}")
            return False
        if marked:
            self.partial.append(rel)
        return True

    def _skip(self, rel: str, why: str) -> None:
        self.skipped.append(rel)
        store.log(self.run_dir, f"gallery {self.layer}: units/{self.layer}/{rel} skipped: {why}")

    def done(self, rel: str, fallback: np.ndarray | None = None) -> np.ndarray:
        node = self.root[f"units/{self.layer}/{rel}"]
        if "done" in node:
            return np.asarray(node["done"][:], bool)
        return fallback if fallback is not None else np.ones(self.channels or 0, bool)

    def subgroups(self, rel: str) -> list[str]:
        node = self.group.get(rel) if self.group is not None else None
        return sorted(node.group_keys()) if node is not None else []


def _label_names(root) -> list[str]:
    """Names for ``images/label`` indices: the run's class table (synset_words.txt), else the model's classes."""
    from atlas.data import class_table

    table = class_table(root.attrs.get("weights"))
    if table:
        return [names[0] for _, names in table]
    classes = [str(c) for c in root.attrs.get("classes") or []]
    return classes[1:1001] if len(classes) == 1008 else classes  # Lucid's logits: 'dummy' first


def _atlas_grids(run_dir: Path, root, layer: str, channels: int | None, skipped: list[str]) -> dict[str, dict[int, object]]:
    """atlas -> {size: grid group} of the layer's grids that hold a usable mean activation."""
    grids_root = root.get(f"grids/{layer}")
    out: dict[str, dict[int, object]] = {}
    if grids_root is None:
        return out
    for atlas in sorted(grids_root.group_keys()):
        for key in sorted(grids_root[atlas].group_keys(), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0)):
            g = grids_root[atlas][key]
            if not key.isdigit() or "mean_activation" not in g or "count" not in g:
                continue
            rel = f"grids/{layer}/{atlas}/{key}"
            try:
                store.verify(root, [rel])
            except AtlasError as exc:
                skipped.append(rel)
                store.log(run_dir, f"gallery {layer}: {rel} skipped: {exc}")
                continue
            if channels is not None and g["mean_activation"].shape[-1] != channels:
                skipped.append(rel)
                store.log(run_dir, f"gallery {layer}: {rel} skipped: its mean activation has "
                                   f"{g['mean_activation'].shape[-1]} channels, the units {channels}")
                continue
            out.setdefault(atlas, {})[int(key)] = g
    return out


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _rows(array, done: np.ndarray, block: int = 64):
    """(channel, array[channel]) for the channels flagged done, read ``block`` channels at a time (one read per block,
    not per channel: a zarr read costs milliseconds however small)."""
    wanted = np.flatnonzero(done)
    for start in range(0, array.shape[0], block):
        inside = wanted[(wanted >= start) & (wanted < start + block)]
        if inside.size:
            rows = np.asarray(array[start:int(inside[-1]) + 1])
            for c in inside.tolist():
                yield c, rows[c - start]


def support_box(projections: list[np.ndarray], level: float = SUPPORT_LEVEL, margin: float = 0.15,
                min_side: int = 8) -> tuple[int, int, int, int]:
    """The square around where display projections (P, P, 3) uint8, grey 127/128 for zero, differ from grey.

    Parameters
    ----------
    projections : list of numpy.ndarray
        The same example's projections (one per method), (P, P, 3) uint8 as :func:`atlas.units.to_display` makes them.
    level : float, default SUPPORT_LEVEL (0.08)
        A pixel belongs to the support when a channel differs from grey by more than this fraction of full scale.
    margin : float, default 0.15
        Added around the support, as a fraction of its larger side.
    min_side : int, default 8
        The smallest side of the square, in pixels (a single bright pixel is shown with its surroundings).

    Returns
    -------
    tuple of int
        (top, left, bottom, right), bottom/right exclusive, inside the patch; the whole patch when nothing differs.
    """
    side = projections[0].shape[0]
    deviation = np.max([np.abs(p[..., :3].astype(np.float32) - 127.5).max(-1) for p in projections], axis=0)
    ys, xs = np.nonzero(deviation > level * 127.5)
    if ys.size == 0:
        return 0, 0, side, side
    top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    extent = max(bottom - top, right - left)
    extent = min(side, max(min_side, int(round(extent * (1 + 2 * margin)))))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    top = int(min(max(0, round(cy - extent / 2)), side - extent))
    left = int(min(max(0, round(cx - extent / 2)), side - extent))
    return top, left, top + extent, left + extent


def crop_to(image: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """``image`` (P, P, 3) cropped to ``box`` (see :func:`support_box`) and scaled back to P x P; None: unchanged."""
    side = image.shape[0]
    if box is None or tuple(box) == (0, 0, side, side):
        return image
    top, left, bottom, right = box
    part = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right]))
    return np.asarray(part.resize((side, side), Image.Resampling.BICUBIC))


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.shape[-1] == 4:
        Image.fromarray(image, "RGBA").save(path, "PNG", compress_level=3)
    else:
        Image.fromarray(image).save(path, "JPEG", quality=90)


def _thumb(image: np.ndarray, side: int) -> np.ndarray:
    rgb = on_grey(image)
    if rgb.shape[0] != side or rgb.shape[1] != side:
        rgb = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.LANCZOS))
    return rgb


def _write_dzi(canvas: np.ndarray, out_dir: Path) -> dict:
    """``out_dir/grid.dzi`` and ``grid_files/{level}/{col}_{row}.jpg`` of one in-memory RGB image (a standard DZI)."""
    h, w = canvas.shape[:2]
    top = max(1, math.ceil(math.log2(max(w, h)))) if max(w, h) > 1 else 0
    image = Image.fromarray(canvas)
    tiles = 0
    for level in range(top, -1, -1):
        lw, lh = math.ceil(w / 2 ** (top - level)), math.ceil(h / 2 ** (top - level))
        if image.size != (lw, lh):
            image = image.resize((lw, lh), Image.Resampling.BOX)
        folder = out_dir / "grid_files" / str(level)
        folder.mkdir(parents=True, exist_ok=True)
        for row in range(max(1, math.ceil(lh / TILE_SIZE))):
            for col in range(max(1, math.ceil(lw / TILE_SIZE))):
                box = (max(0, col * TILE_SIZE - OVERLAP), max(0, row * TILE_SIZE - OVERLAP),
                       min(lw, (col + 1) * TILE_SIZE + OVERLAP), min(lh, (row + 1) * TILE_SIZE + OVERLAP))
                image.crop(box).save(folder / f"{col}_{row}.jpg", "JPEG", quality=85)
                tiles += 1
    (out_dir / "grid.dzi").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpg" Overlap="{OVERLAP}" TileSize="{TILE_SIZE}">\n'
        f'  <Size Width="{w}" Height="{h}"/>\n</Image>\n')
    return {"src": "grid.dzi", "width": w, "height": h, "tiles": tiles}


def _update_manifest(tiles_dir: Path, entry: dict) -> None:
    """Insert or replace one layer in ``tiles/units.json`` (atomically), keeping only layers whose gallery exists."""
    update_listing(tiles_dir / MANIFEST, "layers", entry, lambda x: x.get("layer") == entry["layer"],
                   lambda x: (tiles_dir / str(x.get("base", "-")) / "gallery.json").is_file(), lambda x: x["layer"])


def _publish(work: Path, final: Path) -> None:
    swap_folder(work, final)


@store.writer
def write_gallery(run_dir: str | Path, layer: str, *, dzi_above: int = DZI_ABOVE, viewer: bool = True) -> Path:
    """Write the unit gallery of ``layer`` under ``RUN/tiles/units/{layer}/`` from what the store holds.

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store should hold ``units/{layer}/`` (``atlas units``). Parts that are missing are
        left out of the pages; the layer's atlas grids, when they exist, give the cell <-> unit links.
    layer : str
        The layer, e.g. "mixed4c".
    dzi_above : int, default 256, >= 0
        Layers with more channels than this get their channel grid as a Deep Zoom pyramid (``grid.dzi``) rather
        than one thumbnail file per channel.
    viewer : bool, default True
        Also install (or refresh) the pages: ``units.html`` and the atlas viewer with its unit links
        (:func:`atlas.viewer.install_viewer`; needs OpenSeadragon, checked before any work).

    Returns
    -------
    Path
        The layer's gallery folder, ``RUN/tiles/units/{layer}``.

    Raises
    ------
    AtlasError
        For a run without a store, a layer without any unit data (the layers that have some listed), a negative
        ``dzi_above`` or, with ``viewer``, missing viewer assets.
    """
    run_dir = Path(run_dir)
    if isinstance(dzi_above, bool) or not isinstance(dzi_above, int) or dzi_above < 0:
        raise AtlasError(f"dzi_above must be a whole number >= 0 (got {dzi_above!r})")
    if viewer:
        from atlas.viewer import require_viewer_assets

        require_viewer_assets()
    root = store.open_store(run_dir)
    store.take_lock(run_dir)
    parts = _unit_parts(run_dir, root, layer)
    top_ok = parts._usable("top", ("value", "image"))
    kinds = [k for k in kind_order(parts.subgroups("vis")) if parts._usable(f"vis/{k}", ("image",))]
    methods = [m for m in parts.subgroups("projection") if parts._usable(f"projection/{m}", ("image",))]
    classes_ok = parts._usable("classes", ("top",))
    grids = _atlas_grids(run_dir, root, layer, parts.channels, parts.skipped)
    c_total = _channel_count(parts, grids, run_dir, layer)

    tiles_dir = run_dir / "tiles"
    final = tiles_dir / "units" / layer
    work = final.with_name(final.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    units: list[dict] = [{"layer": layer, "channel": c, "vis": [], "top": None, "projections": [], "classes": None,
                          "cells": {}} for c in range(c_total)]
    grid = _write_visualizations(parts, kinds, units, work, dzi_above)
    k = _write_top(parts, root, methods, units, work) if top_ok else 0
    class_list = [str(n) for n in root.attrs.get("classes") or []]
    if classes_ok:
        node = parts.group["classes"]
        rows = class_rows(node["top"][:], node["score"][:] if "score" in node else None, class_list)
        for c in range(c_total):
            units[c]["classes"] = rows[c]
    effects_ok = parts._usable("effects", ("done", "value"))
    if effects_ok:
        _check_classes(parts, units, class_list, parts.group["classes"]["top"][:] if classes_ok else None)
    atlases = _write_cells(root, layer, grids, units, work)

    for c, unit in enumerate(units):
        path = work / "unit" / f"{c}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(unit, separators=(",", ":")))

    summary = {"channels": c_total, "with_vis": sum(t is not None for t in grid["thumbs"]),
               "with_top": sum(u["top"] is not None for u in units), "kinds": kinds, "methods": methods,
               "atlases": len(atlases), "skipped": parts.skipped, "unfinished": parts.partial}
    meta = {"version": 1, "layer": layer, "model": str(root.attrs.get("model", "unknown")), "channels": c_total, "cols": grid["cols"],
            "order": grid["order"], "cell": grid["cell"], "thumbs": grid["thumbs"], "dzi": grid["dzi"], "kinds": kinds,
            "vis": grid["vis"], "methods": methods, "k": k,
            "top": top_ok, "classes": classes_ok, "effects": effects_ok, "atlases": atlases,
            "background": "#{:02x}{:02x}{:02x}".format(*BACKGROUND),
            "summary": summary}
    (work / "gallery.json").write_text(json.dumps(meta, indent=1))
    _publish(work, final)
    _update_manifest(tiles_dir, {"layer": layer, "channels": c_total, "base": f"units/{layer}/"})
    if viewer:
        from atlas.viewer import install_viewer

        install_viewer(tiles_dir)
    log_line = (f"gallery {layer}: {c_total} units, {summary['with_vis']} with visualisations ({', '.join(kinds) or 'none'}), "
                f"{summary['with_top']} with top examples, projections {', '.join(methods) or 'none'}, {len(atlases)} atlases")
    if parts.skipped:
        log_line += f"; skipped {len(parts.skipped)} damaged parts: {', '.join(parts.skipped)}"
    store.log(run_dir, log_line)
    return final


def _unit_parts(run_dir: Path, root, layer: str) -> _Parts:
    """The layer's unit data; one line for a layer without any."""
    units_root = root.get("units")
    if units_root is None or layer not in units_root:
        have = sorted(units_root.group_keys()) if units_root is not None else []
        raise AtlasError(f"layer '{layer}' has no unit data in this run; run `atlas units {run_dir} --layer {layer}` first "
                         f"(layers with unit data: {', '.join(have) or 'none'})")
    return _Parts(run_dir, root, layer)


def _channel_count(parts: _Parts, grids: dict, run_dir: Path, layer: str) -> int:
    """The layer's channels: from its unit data, else from its atlas grids; one line when neither has any."""
    if parts.channels is not None:
        return parts.channels
    sizes = [g["mean_activation"].shape[-1] for by_size in grids.values() for g in by_size.values()]
    if not sizes:
        raise AtlasError(f"units/{layer} holds nothing the gallery can show yet (no top examples, projections, "
                         f"visualisations or class scores); run `atlas units {run_dir} --layer {layer}`")
    return sizes[0]


def _write_visualizations(parts: _Parts, kinds: list[str], units: list[dict], work: Path, dzi_above: int) -> dict:
    """Each channel's visualisations as one strip per kind, and the channel grid from the best kind each has (one
    thumbnail per channel, or a Deep Zoom pyramid above ``dzi_above`` channels); the grid's part of ``gallery.json``."""
    c_total = len(units)
    thumbs: list[str | None] = [None] * c_total
    first: dict[int, np.ndarray] = {}
    vis_info = {}
    for kind in kinds:
        node = parts.group[f"vis/{kind}"]
        images, done = node["image"], parts.done(f"vis/{kind}")
        objective = node["objective"][:] if "objective" in node else None
        n, side, channels = images.shape[1], images.shape[2], images.shape[-1]
        vis_info[kind] = {"n": int(n), "size": int(side), "alpha": channels == 4, "channels": int(done.sum())}
        ext = "png" if channels == 4 else "jpg"
        for c, block in _rows(images, done):  # block: (n, S, S, 3|4)
            _save(strip(list(block)), work / "vis" / kind / f"{c}.{ext}")
            units[c]["vis"].append({"kind": kind, "src": f"vis/{kind}/{c}.{ext}", "n": int(n), "size": int(side),
                                    "alpha": channels == 4,
                                    "objective": [round(float(v), 4) for v in objective[c]] if objective is not None else None})
            if thumbs[c] is None:
                thumbs[c], first[int(c)] = kind, block[0]
    side = min(MAX_THUMB, max((im.shape[0] for im in first.values()), default=MAX_THUMB))
    # The grid holds the visualised channels only, in channel order: hundreds of empty squares for channels not yet
    # visualised said nothing; the page lists those by number instead (``order`` maps a square to its channel).
    order = sorted(first)
    cols = grid_columns(max(1, len(order)))
    dzi = None
    if c_total > dzi_above and order:
        canvas = np.empty((cols * side, cols * side, 3), np.uint8)
        canvas[:] = BACKGROUND
        for i, c in enumerate(order):
            y, x = divmod(i, cols)
            canvas[y * side:(y + 1) * side, x * side:(x + 1) * side] = _thumb(first[c], side)
        dzi = _write_dzi(canvas, work)
    else:
        for c, image in first.items():
            _save(_thumb(image, side), work / "thumbs" / f"{c}.jpg")
    return {"thumbs": thumbs, "vis": vis_info, "order": order, "cols": cols, "cell": side, "dzi": dzi}


def example_records(value: np.ndarray, image_idx: np.ndarray, c: int, slots: list[int], files: dict[int, str],
                    labels: np.ndarray | None, names: list[str], pos: np.ndarray | None, box: np.ndarray | None) -> list[dict]:
    """The unit card's records of channel ``c``'s top examples ``slots``: activation, image, file name, label, position
    and receptive-field box.

    Parameters
    ----------
    value, image_idx : (C, k) arrays
        The top-k values and image indices (``units/{layer}/top``).
    c : int
        The channel.
    slots : list of int
        Which of its k examples are filled.
    files : dict
        Image index -> file name (never its folder: served pages hold no absolute paths).
    labels : (n_images,) int array or None
        The run's labels (-1 unknown).
    names : list of str
        Class names by index.
    pos, box : (C, k, 2) and (C, k, 4) arrays or None
        Position in the layer's grid and receptive-field box in pixels.

    Returns
    -------
    list of dict
    """
    examples = []
    for j in slots:
        i = int(image_idx[c, j])
        label = int(labels[i]) if labels is not None and i < labels.shape[0] else -1
        examples.append({"value": round(float(value[c, j]), 4), "image": i,
                         "file": files.get(i),
                         "label": label, "label_name": names[label] if 0 <= label < len(names) else None,
                         "pos": pos[c, j].tolist() if pos is not None else None,
                         "box": box[c, j].tolist() if box is not None else None})
    return examples


def _image_files(root, image_idx: np.ndarray, done: np.ndarray) -> dict[int, str]:
    """Image index -> file name of every image the finished channels show (never its folder)."""
    if "images" not in root or "path" not in root["images"]:
        return {}
    path_array = root["images/path"]
    used = np.unique(image_idx[done][(image_idx[done] >= 0) & (image_idx[done] < path_array.shape[0])])
    if not used.size:
        return {}
    return {int(i): os.path.basename(str(p)) for i, p in zip(used, path_array.oindex[used], strict=True)}


def _write_top(parts: _Parts, root, methods: list[str], units: list[dict], work: Path) -> int:
    """Each finished channel's top examples (records, a strip of their patches) and their projections (a strip per
    method), each example cropped to its projections' support; returns k."""
    top = parts.group["top"]
    value, image_idx = top["value"][:], top["image"][:]
    k = int(value.shape[1])
    done = parts.done("top", fallback=np.isfinite(value[:, 0]))
    pos = top["pos"][:] if "pos" in top else None
    box = top["box"][:] if "box" in top else None
    files = _image_files(root, image_idx, done)
    labels = root["images/label"][:] if "images" in root and "label" in root["images"] else None
    names = _label_names(root) if labels is not None else []
    patches = top["patch"] if "patch" in top else None
    proj = {m: (parts.group[f"projection/{m}"], parts.done(f"projection/{m}")) for m in methods}
    patch_rows = dict(_rows(patches, done)) if patches is not None else {}
    proj_rows = {m: dict(_rows(node["image"], m_done & done)) for m, (node, m_done) in proj.items()}
    for c in np.flatnonzero(done):
        c = int(c)
        slots = [j for j in range(k) if image_idx[c, j] >= 0 and np.isfinite(value[c, j])]
        if not slots:
            continue
        examples = example_records(value, image_idx, c, slots, files, labels, names, pos, box)
        record = {"k": k, "examples": examples, "src": None, "patch": None}
        blocks = {m: proj_rows[m].pop(c) for m in proj if c in proj_rows[m]}
        # each example cropped to where its projections are not grey (Zeiler & Fergus show the projection's support,
        # not specks in the receptive field), its patch and every projection alike so that they still correspond
        crops = {j: support_box([b[j] for b in blocks.values()]) for j in slots} if blocks else {}
        for j, e in zip(slots, examples, strict=True):
            e["crop"] = list(crops[j]) if j in crops else None
        if c in patch_rows:
            block = patch_rows.pop(c)
            _save(strip([crop_to(block[j], crops.get(j)) for j in slots]), work / "top" / f"{c}.jpg")
            record.update(src=f"top/{c}.jpg", patch=int(block.shape[1]))
        units[c]["top"] = record
        for m, (node, _) in proj.items():
            if m not in blocks:
                continue
            block = blocks[m]
            _save(strip([crop_to(block[j], crops.get(j)) for j in slots]), work / "projection" / m / f"{c}.jpg")
            scale = node["scale"][c] if "scale" in node else None
            units[c]["projections"].append({"method": m, "src": f"projection/{m}/{c}.jpg",
                                            "scale": [round(float(scale[j]), 5) for j in slots] if scale is not None else None})
    return k


def class_rows(class_top: np.ndarray, score: np.ndarray | None, class_list: list[str]) -> list[list]:
    """Each unit's classes for its card: ``[[name, score or None], ...]`` from the attribution-based class scores.

    Parameters
    ----------
    class_top : (C, T) int array
        The classes each unit contributes to most (-1 pads).
    score : (C, T) float array or None
        Their scores.
    class_list : list of str
        Class names by index (``class N`` beyond it).

    Returns
    -------
    list of list
        One list per unit.
    """
    return [[[class_list[t] if t < len(class_list) else f"class {t}",
              round(float(score[c, j]), 4) if score is not None and np.isfinite(score[c, j]) else None]
             for j, t in enumerate(class_top[c].tolist()) if t >= 0] for c in range(class_top.shape[0])]


def _check_classes(parts: _Parts, units: list[dict], class_list: list[str], attribution_top: np.ndarray | None) -> None:
    """Where the direct effect of a unit on the logits was measured, its card lists the classes the unit itself
    raises most and says which attribution-based classes survive that check."""
    # The attribution-based classes are a reading through every channel at once (atlas.units.effects)
    from atlas.units.effects import check_classes  # torch-free, but its module loads torch: only when needed

    node = parts.group["effects"]

    def name(t: int) -> str:
        return class_list[t] if t < len(class_list) else f"class {t}"

    for c in np.flatnonzero(parts.done("effects")):
        c = int(c)
        row = np.asarray(node["value"][c], np.float32)
        prior = attribution_top[c] if attribution_top is not None else np.full(0, -1)
        top_c, top_v, survives = check_classes(row, prior)
        previous = units[c]["classes"] or []
        units[c]["classes"] = [[name(int(t)), round(float(v), 4)] for t, v in zip(top_c, top_v, strict=True)]
        units[c]["class_check"] = {"measure": "direct effect on the logit (logit units)",
                                   "attribution": [[n, v, bool(ok)] for (n, v), ok in zip(previous, survives, strict=False)]}


def unit_cells(values: np.ndarray, draw: np.ndarray) -> list[dict]:
    """Each unit's place on one atlas grid: its veil (deflate-compressed, base64) and its strongest drawn cell.

    Parameters
    ----------
    values : (S, S, C) float array
        The grid's mean activation per cell.
    draw : (S, S) bool array
        The cells the atlas draws.

    Returns
    -------
    list of dict
        ``{"veil", "best": [gx, gy, value] or None}`` per unit.
    """
    size = values.shape[1]
    veils = unit_veils(values, draw)
    masked = np.where(draw[..., None], values, -np.inf)
    out = []
    for c in range(values.shape[-1]):
        gy, gx = divmod(int(np.argmax(masked[..., c])), size)
        best = [gx, gy, round(float(values[gy, gx, c]), 4)] if draw.any() else None
        packed = zlib.compress(np.ascontiguousarray(veils[..., c]).tobytes(), 6)  # the browser's DecompressionStream("deflate")
        out.append({"veil": base64.b64encode(packed).decode("ascii"), "best": best})
    return out


def _write_cells(root, layer: str, grids: dict, units: list[dict], work: Path) -> list[dict]:
    """Each atlas grid's cells with their top units (``cells/ATLAS/SIZE/BX_BY.json``) and each unit's veil and best
    cell on it; the atlases' part of ``gallery.json``."""
    atlases = []
    for atlas, by_size in grids.items():
        atlases.append({"atlas": atlas, "sizes": sorted(by_size)})
        for size, g in sorted(by_size.items()):
            values = np.asarray(g["mean_activation"][:], np.float32)
            count = g["count"][:]
            draw = (g["render"][:] if "render" in g else count > 0) & (count > 0)
            icons = root.get(f"icons/{layer}/{atlas}/{size}")
            if icons is not None and "done" in icons and icons["done"].shape == draw.shape:
                draw &= icons["done"][:]  # as the atlas tiles draw them
            folder = work / "cells" / atlas / str(size)
            folder.mkdir(parents=True, exist_ok=True)
            for (bx, by), cells in cell_top_units(values, count).items():
                (folder / f"{bx}_{by}.json").write_text(json.dumps({"size": size, "block": BLOCK, "cells": cells}, separators=(",", ":")))
            for c, place in enumerate(unit_cells(values, draw)[: len(units)]):
                units[c]["cells"].setdefault(atlas, {})[str(size)] = place
    return atlases
