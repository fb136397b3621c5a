"""The patch itself: a picture file, or one cell of an atlas grid (its rendered icon or its best dataset-example
patch), read through :mod:`atlas.store` and the render stage's public ``sample_patches``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from atlas import store
from atlas.errors import AtlasError

KINDS = ("icon", "example")


@dataclass(frozen=True)
class CellRef:
    """One cell of an atlas grid: ``x`` to the right, ``y`` from the top (the store's arrays are indexed [y, x])."""

    run: Path
    layer: str
    atlas: str
    grid: int
    x: int
    y: int

    def __str__(self) -> str:
        return f"{self.run}:{self.layer}:{self.atlas}:{self.grid}:{self.x},{self.y}"


def parse_cell(spec: str) -> CellRef:
    """``RUN:LAYER:ATLAS:GRID:X,Y`` (the run folder may itself hold colons: the fields are split from the right)."""
    parts = str(spec).rsplit(":", 4)
    bad = f"--cell must be RUN:LAYER:ATLAS:GRID:X,Y (e.g. outputs/cpu:mixed4c:full:20:3,7); got {spec!r}"
    if len(parts) != 5 or not all(parts[:3]):
        raise AtlasError(bad)
    run, layer, atlas, grid, xy = parts
    x, _, y = xy.partition(",")
    if not (grid.strip().isdigit() and x.strip().isdigit() and y.strip().isdigit()):
        raise AtlasError(bad)
    return CellRef(Path(run), layer, atlas, int(grid), int(x), int(y))


def load_patch(path: str | Path) -> np.ndarray:
    """(h, w, 3) uint8 RGB of a picture file; transparency is flattened onto mid grey (the sampler's padding colour)."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"patch file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info:
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (127, 127, 127, 255)), im)
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise AtlasError(f"cannot read the patch {path}: {exc}") from None


def _square(patch: np.ndarray) -> np.ndarray:
    """The largest centred square of a picture (patches are pasted as squares)."""
    h, w = patch.shape[:2]
    s = min(h, w)
    return patch[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def _check_layer(root, run_dir: Path, layer: str) -> None:
    """One line for a layer the run did not sample (a typo such as ``mixed9z``), before any talk of missing atlases."""
    sampled = sorted(root["samples"].group_keys()) if "samples" in root else []
    if layer not in sampled:
        raise AtlasError(f"unknown layer '{layer}' in {run_dir}: the run's layers are {', '.join(sampled) or 'none (sample it first)'}")


def _grid_group(root, cell: CellRef):
    _check_layer(root, cell.run, cell.layer)
    where = f"grids/{cell.layer}/{cell.atlas}/{cell.grid}"
    if f"grids/{cell.layer}/{cell.atlas}" not in root:
        have = sorted(root[f"grids/{cell.layer}"].group_keys()) if f"grids/{cell.layer}" in root else []
        raise AtlasError(f"no grids of atlas '{cell.atlas}' at layer '{cell.layer}' in {cell.run}; atlases: {', '.join(have) or 'none'}")
    if where not in root:
        sizes = sorted(int(k) for k in root[f"grids/{cell.layer}/{cell.atlas}"].group_keys() if k.isdigit())
        raise AtlasError(f"atlas {cell.layer}/{cell.atlas} has no {cell.grid}x{cell.grid} grid; "
                         f"grids: {', '.join(map(str, sizes)) or 'none'}")
    group = root[where]
    if not (0 <= cell.x < cell.grid and 0 <= cell.y < cell.grid):
        raise AtlasError(f"cell {cell.x},{cell.y} is outside the {cell.grid}x{cell.grid} grid (x and y run from 0 to {cell.grid - 1})")
    if int(group["count"][cell.y, cell.x]) == 0:
        raise AtlasError(f"cell {cell.x},{cell.y} of {cell.layer}/{cell.atlas} grid {cell.grid} is empty (no samples fell in it)")
    return group


def cell_patch(cell: CellRef | str, kind: str = "icon", size: int = 112) -> np.ndarray:
    """The patch of one atlas cell: its rendered icon (``kind="icon"``) or the dataset-example patch of its sample
    nearest the cell's mean (``kind="example"``, cut by :func:`atlas.render.sample_patches` at ``size`` px).

    One line for a cell outside the grid, an empty cell, or an icon not rendered (or rendered from an older grid).
    """
    cell = parse_cell(cell) if isinstance(cell, str) else cell
    if kind not in KINDS:
        raise AtlasError(f"unknown cell patch kind '{kind}'; use {', '.join(KINDS)}")
    root = store.open_store(cell.run)
    grid_path = f"grids/{cell.layer}/{cell.atlas}/{cell.grid}"
    group = _grid_group(root, cell)
    if kind == "icon":
        icons_path = f"icons/{cell.layer}/{cell.atlas}/{cell.grid}"
        if icons_path not in root or not bool(root[icons_path]["done"][cell.y, cell.x]):
            raise AtlasError(f"cell {cell.x},{cell.y} of {cell.layer}/{cell.atlas} grid {cell.grid} has no rendered icon; run "
                             f"`atlas render {cell.run} --layer {cell.layer} --atlas {cell.atlas} --grid {cell.grid}` "
                             "(or use its dataset patch: --cell-patch example)")
        store.verify(root, [grid_path, icons_path])
        return np.asarray(root[icons_path]["images"][cell.y, cell.x], np.uint8)
    store.verify(root, [grid_path, f"samples/{cell.layer}", "images"])
    rows = [int(r) for r in np.asarray(group["nearest"][cell.y, cell.x]).tolist() if r >= 0] if "nearest" in group else []
    if not rows:
        raise AtlasError(f"cell {cell.x},{cell.y} of {cell.layer}/{cell.atlas} grid {cell.grid} keeps no nearest samples; "
                         "re-run `atlas grid` with --nearest 1 or more")
    from atlas.render import sample_patches

    patch = np.asarray(sample_patches(cell.run, cell.layer, [rows[0]], size=size)[0], np.uint8)
    if (patch == 127).all():
        raise AtlasError(f"the image behind cell {cell.x},{cell.y} of {cell.layer}/{cell.atlas} cannot be read any more")
    return patch


def _cell_target(cell: CellRef) -> int | None:
    """The class an atlas cell argues for: a class atlas's class, a compare atlas's second class, else the cell's top class."""
    root = store.open_store(cell.run)
    layout = root.get(f"layouts/{cell.layer}/{cell.atlas}")
    classes = store.attrs(layout).get("classes") if layout is not None else None
    if classes:
        return int(classes[-1])
    group = root[f"grids/{cell.layer}/{cell.atlas}/{cell.grid}"]
    if "top_classes" in group:
        top = int(group["top_classes"][cell.y, cell.x, 0])
        return top if top >= 0 else None
    return None
