"""The viewer's concepts panel: the concepts of a layer beside its atlas, in the browser.

``write_panel(run_dir, layer)`` reads ``concepts/{layer}/`` and the layer's atlas (the icons of one grid of the
whole-layer atlas) and writes, under ``RUN/tiles/``::

    concepts.html concepts.js concepts.css     the page (``/tiles/concepts.html?layer=mixed4c`` under ``atlas serve``)
    concepts.json                              the layers that have a panel (the page's menu)
    concepts/{layer}/panel.json                the concepts (summary, classes, top images' labels), the atlas grid
                                               (size, its cells' strongest concepts and their shares) and each
                                               concept's veil (S x S bytes, zlib, base64)
    concepts/{layer}/icons.png                 every concept's icon, one row of the sprite per concept
    concepts/{layer}/top/{k}.jpg               concept k's top dataset patches side by side
    concepts/{layer}/atlas.png                 the atlas grid's icons as one image (when the run has them)

The atlas shown is the finest grid of the whole-layer atlas up to :data:`MAX_ATLAS` cells a side that has icons
(else the finest grid, drawn as its cells' counts). Only ``tiles/`` is written; the panel is rebuilt whole in
``concepts/{layer}.partial`` and swapped in when complete.
"""

from __future__ import annotations

import base64
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from atlas import store
from atlas.errors import AtlasError
from atlas.viewer import CONCEPTS_MANIFEST, STATIC, install_viewer, swap_folder, update_listing

PAGE_FILES = ("concepts.html", "concepts.js", "concepts.css")
MANIFEST = CONCEPTS_MANIFEST
MAX_ATLAS = 40  # the finest grid shown, in cells a side (its icons as one image)
CELL_PIXELS = 32  # each atlas cell's side in atlas.png
TOP_SHARES = 5
BACKGROUND = (17, 19, 24)  # the viewer's page colour
GREY = 127


def _veil_bytes(values: np.ndarray) -> str:
    """(S, S) values -> 0..255 bytes scaled by their maximum, zlib, base64 (the page decodes them for the overlay)."""
    top = float(values.max()) if values.size else 0.0
    scaled = np.zeros(values.shape, np.uint8) if top <= 0 else np.clip(np.rint(values / top * 255), 0, 255).astype(np.uint8)
    return base64.b64encode(zlib.compress(scaled.tobytes(), 6)).decode()


def _label_names(root) -> list[str]:
    from atlas.units.gallery import _label_names as names

    return names(root)


def _class_names(root, n: int) -> list[str]:
    from atlas.tiles.cells import class_names

    return class_names(root, n)


def write_panel(run_dir: str | Path, layer: str) -> Path:
    """Write the concepts panel of ``layer`` under ``RUN/tiles/concepts/{layer}/`` and the page beside the atlas viewer.

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its store must hold ``concepts/{layer}/`` (``atlas concepts``).
    layer : str
        The layer, e.g. "mixed4c".

    Returns
    -------
    Path
        The layer's panel folder, ``RUN/tiles/concepts/{layer}``.

    Raises
    ------
    AtlasError
        For a run without a store or a layer without concepts (the command to run named).
    """
    run_dir = Path(run_dir)
    root = store.open_store(run_dir)
    store.take_lock(run_dir)
    node = root.get(f"concepts/{layer}")
    if node is None or "dictionary" not in node:
        raise AtlasError(f"no concepts of layer '{layer}' in this run; run `atlas concepts {run_dir} --layer {layer}` first")
    atoms = node["dictionary/atoms"]
    n_concepts = atoms.shape[0]
    summary = dict(store.attrs(node).get("summary", {}))
    final = run_dir / "tiles" / "concepts" / layer
    work = final.with_name(final.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "top").mkdir(parents=True)

    # icons: one sprite; concepts without an icon (none rendered) show their best patch instead
    icons = node.get("icons")
    have_icons = icons is not None and "done" in icons and bool(store.read_flags(icons["done"]).any())
    top = node.get("top")
    side = int(icons["image"].shape[1]) if have_icons else int(top["patch"].shape[2]) if top is not None else 16
    sprite = np.full((n_concepts * side, side, 3), GREY, np.uint8)
    if have_icons:
        done = store.read_flags(icons["done"])
        images = icons["image"][:]
        sprite[np.repeat(done, side)] = images[done].reshape(-1, side, 3)
    elif top is not None:
        sprite[:] = top["patch"][:, 0].reshape(-1, side, 3)
    Image.fromarray(sprite).save(work / "icons.png", optimize=True)

    entries = [{"id": k} for k in range(n_concepts)]
    if top is not None:
        labels = root["images/label"][:] if "label" in root["images"] else None
        names = _label_names(root)
        image, value, patch = top["image"][:], top["value"][:], top["patch"][:]
        for k in range(n_concepts):
            keep = image[k] >= 0
            strip = np.concatenate(list(patch[k][keep]), axis=1) if keep.any() else np.full((patch.shape[2],) * 2 + (3,), GREY, np.uint8)
            Image.fromarray(strip).save(work / "top" / f"{k}.jpg", quality=90)
            entries[k]["top"] = [float(v) for v in value[k][keep]]
            if labels is not None:
                entries[k]["labels"] = [names[int(labels[i])] if 0 <= int(labels[i]) < len(names) else "" for i in image[k][keep]]
    classes = node.get("classes")
    if classes is not None:
        top_c, score = classes["top"][:], classes["score"][:]
        n_classes = root[f"samples/{layer}/attributions"].shape[1]
        cnames = _class_names(root, n_classes)
        for k in range(n_concepts):
            entries[k]["classes"] = [[cnames[int(c)], round(float(v), 4)] for c, v in zip(top_c[k], score[k], strict=True) if c >= 0]
    # the atlas grid shown and each concept's veil on it
    atlas_info = _write_atlas(root, node, layer, work, entries)
    doc = {"layer": layer, "method": store.attrs(node).get("method"), "summary": summary, "concepts": entries, "icon_size": side,
           "atlas": atlas_info}
    (work / "panel.json").write_text(json.dumps(doc, separators=(",", ":")))
    swap_folder(work, final)
    tiles_dir = run_dir / "tiles"
    for name in PAGE_FILES:
        shutil.copyfile(STATIC / name, tiles_dir / name)
    update_listing(tiles_dir / MANIFEST, "layers", {"layer": layer, "concepts": n_concepts},
                   replaces=lambda old: old.get("layer") == layer,
                   keep=lambda old: (tiles_dir / "concepts" / str(old.get("layer"))).is_dir(),
                   order=lambda entry: str(entry.get("layer")))
    if (tiles_dir / "index.html").is_file():  # the run's atlas page: it gains the "Concepts" link to this panel
        install_viewer(tiles_dir)
    return final


def _write_atlas(root, node, layer: str, work: Path, entries: list[dict]) -> dict | None:
    """atlas.png (the grid's icons), the grid's size, cells' strongest concepts, and each concept's veil in ``entries``."""
    veils = node.get("veil")
    sizes = sorted(int(s) for s in veils.group_keys() if s.isdigit()) if veils is not None else []
    if not sizes:
        return None
    with_icons = [s for s in sizes if s <= MAX_ATLAS and f"icons/{layer}/{store.FULL_ATLAS}/{s}/images" in root]
    size = max(with_icons) if with_icons else max(s for s in sizes if s <= MAX_ATLAS) if any(s <= MAX_ATLAS for s in sizes) else sizes[0]
    veil = veils[str(size)]
    mean, share, count = veil["mean"][:], veil["share"][:], veil["count"][:]
    canvas = np.zeros((size * CELL_PIXELS, size * CELL_PIXELS, 3), np.uint8)
    canvas[:] = BACKGROUND
    if size in with_icons:
        icons = root[f"icons/{layer}/{store.FULL_ATLAS}/{size}"]
        images, done = icons["images"], icons["done"][:] if "done" in icons else np.ones((size, size), bool)
        for gy, gx in np.argwhere(done):
            icon = Image.fromarray(np.asarray(images[int(gy), int(gx)], np.uint8)[..., :3])
            icon = icon.resize((CELL_PIXELS, CELL_PIXELS), Image.LANCZOS)
            canvas[gy * CELL_PIXELS:(gy + 1) * CELL_PIXELS, gx * CELL_PIXELS:(gx + 1) * CELL_PIXELS] = np.asarray(icon)
    else:  # no icons yet: the cells' sample counts in grey
        shade = (np.sqrt(count / max(int(count.max()), 1)) * 200).astype(np.uint8)
        canvas[:] = np.repeat(np.repeat(shade, CELL_PIXELS, 0), CELL_PIXELS, 1)[..., None]
    Image.fromarray(canvas).save(work / "atlas.png", optimize=True)
    for k, entry in enumerate(entries):
        entry["veil"] = _veil_bytes(mean[..., k])
        entry["peak"] = [int(v) for v in np.unravel_index(int(np.argmax(mean[..., k])), (size, size))]
    cells: dict[str, list] = {}
    order = np.argsort(-share, axis=-1, kind="stable")[..., :TOP_SHARES]
    for gy, gx in np.argwhere(count > 0):
        cells[f"{gy},{gx}"] = [[int(k), round(float(share[gy, gx, k]), 4)] for k in order[gy, gx] if share[gy, gx, k] > 0]
    return {"size": size, "cell_pixels": CELL_PIXELS, "cells": cells, "icons": size in with_icons}
