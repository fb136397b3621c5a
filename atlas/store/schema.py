"""The run folder and its zarr v3 store: where the store is, opening it (a damaged root is one line), arrays with
sensible chunks and compression, rows read in blocks, the run's log, and the names every stage shares (the stage
graph :data:`BUILT_ON`, which stage writes which top-level group, :data:`WRITER`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from atlas.errors import AtlasError

STORE_NAME = "store.zarr"


FULL_ATLAS = "full"


COMPRESSORS = (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),)


LEDGER = "ledger"


LOCK_NAME = ".lock"


PARTIAL_STORE = ".store.zarr.partial-"


STAGE_ORDER = ("sample", "project", "grid", "render", "tiles")  # the atlas chain


# What each stage is built on: a stage that starts rewriting invalidates itself and every stage built on it,
# directly or not. The unit lens (``units``) reads the sampled run's images only; its ``gallery`` links to the atlas.
BUILT_ON = {"project": ("sample",), "grid": ("project",), "render": ("grid",), "tiles": ("render",),
            "units": ("sample",), "gallery": ("tiles", "units"), "concepts": ("sample",)}


# The stage that writes each top-level node of the store (for "re-run `atlas STAGE`" hints).
WRITER = {"images": "sample", "samples": "sample", "layouts": "project", "grids": "grid", "whitening": "grid", "icons": "render",
          "units": "units", "concepts": "concepts"}


def store_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STORE_NAME


def _check_root(run_dir: str | Path) -> None:
    """The store exists and its root ``zarr.json`` is a readable zarr group, else one line saying so."""
    path = store_path(run_dir)
    meta = path / "zarr.json"
    if not meta.is_file():
        raise AtlasError(f"{path} is not an atlas store (no zarr.json: an empty or foreign folder); move it away and re-run "
                         "`atlas sample` (or `atlas build`), or use another folder")
    try:
        doc = json.loads(meta.read_bytes())
        ok = isinstance(doc, dict) and doc.get("zarr_format") == 3 and doc.get("node_type") == "group"
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise AtlasError(f"{meta} is damaged (not a zarr v3 group); the run's settings are lost: re-run `atlas sample` "
                         "(or `atlas build`) into a new folder")


def open_store(run_dir: str | Path, mode: str = "r") -> zarr.Group:
    """Open a run's store; a folder holding no run, or a damaged root, is a clear error."""
    path = store_path(run_dir)
    if mode == "r" and not path.exists():
        raise AtlasError(f"no atlas run in {run_dir} (missing {STORE_NAME}); run `atlas sample` first")
    if mode in ("r", "r+") or (mode == "a" and path.exists()):
        _check_root(run_dir)
    return zarr.open_group(str(path), mode=mode)


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...] | None = None,
                 fill_value=0, overwrite: bool = False) -> zarr.Array:
    """A compressed array with sensible chunks (whole rows, ~4 MB)."""
    if chunks is None:
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize if len(shape) > 1 else np.dtype(dtype).itemsize
        rows = max(1, min(shape[0] if shape[0] else 1, (4 << 20) // max(row_bytes, 1)))
        chunks = (rows, *shape[1:])
    compressors = None if np.dtype(dtype).kind in "UOT" else COMPRESSORS
    if np.dtype(dtype).kind in "UT":
        dtype = str  # zarr's variable-length UTF-8 strings: specified in v3, unlike fixed-width numpy unicode
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
                              compressors=compressors, overwrite=overwrite)


def write_array(group: zarr.Group, name: str, data: np.ndarray, **kwargs) -> zarr.Array:
    """Replace ``group[name]`` with ``data`` (used for small, whole results of a stage)."""
    data = np.asarray(data)
    array = create_array(group, name, data.shape, data.dtype, overwrite=True, **kwargs)
    if data.size:
        array[...] = data
    return array


def require_layer(root: zarr.Group, layer: str) -> zarr.Group:
    """The samples group of a layer, or a clear error listing the layers the run has."""
    samples = root.get("samples")
    if samples is None or layer not in samples:
        have = sorted(samples.group_keys()) if samples is not None else []
        raise AtlasError(f"layer '{layer}' was not sampled in this run; sampled layers: {', '.join(have) or 'none'}")
    return samples[layer]


def read_rows(array: zarr.Array, rows: np.ndarray, dtype=np.float32, block: int = 65536) -> np.ndarray:
    """``array[rows]`` for sorted row indices, streamed chunk-wise so memory stays at the result's size."""
    rows = np.asarray(rows)
    out = np.empty((rows.size, *array.shape[1:]), dtype=dtype)
    for start in range(0, rows.size, block):
        sel = rows[start : start + block]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        out[start : start + sel.size] = array[lo:hi][sel - lo]
    return out


def log(run_dir: str | Path, message: str) -> None:
    """Append one timestamped line to the run's log.txt."""
    with open(Path(run_dir) / "log.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def attrs(node: zarr.Group | zarr.Array) -> dict:
    return json.loads(json.dumps(node.attrs.asdict()))


def _store_dir(where: str | Path | zarr.Group) -> Path:
    """The store folder of a run folder, a store folder or an open group."""
    if isinstance(where, zarr.Group):
        return Path(str(where.store.root))  # LocalStore: the only store atlas uses
    where = Path(where)
    return where if where.name == STORE_NAME else where / STORE_NAME


def _run_of(store_dir: Path) -> Path:
    """The run folder of a store folder (also of a store being built as ``RUN/.store.zarr.partial-PID``)."""
    return store_dir.parent
