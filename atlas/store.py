"""The run folder and its zarr v3 store: the only way stages talk to each other.

A run folder holds ``store.zarr`` (everything numeric), ``log.txt`` (skipped files and
stage messages) and, later, ``tiles/``. The store's layout:

``/``                                  attrs: model, weights, weights_sha256, seed, ... (see ``sample``)
``images/path`` (n_images,) str        the deterministic image list
``images/label`` (n_images,) int32     class index or -1
``images/ok`` (n_images,) bool         False for unreadable files (also listed in log.txt)
``images/top5`` (n_images, 5) int32    the model's top-5 classes
``images/shard_done`` (n_shards,) bool a shard's rows are written and final
``samples/{layer}/activations`` (n_rows, C)         n_rows = n_images * per_image
``samples/{layer}/attributions`` (n_rows, n_classes) h . d logit_c / d h at the sampled position
``samples/{layer}/image_index`` (n_rows,) int32
``samples/{layer}/position`` (n_rows, 2) int16      (y, x) in the layer's grid
``samples/{layer}/valid`` (n_rows,) bool            False for rows of skipped images
``layouts/{layer}/{atlas}/...``        written by ``atlas.layout`` ("full" is the whole-layer atlas)
``grids/{layer}/{atlas}/{size}/...``   written by ``atlas.grid``
``whitening/{layer}/matrix`` (C, C)    written by ``atlas.grid``
``icons/{layer}/{atlas}/{size}/...``   written by ``atlas.render``

Layer names may contain dots (torchvision module paths); they are used as zarr node
names unchanged.
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


def store_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STORE_NAME


def open_store(run_dir: str | Path, mode: str = "r") -> zarr.Group:
    """Open a run's store; reading a folder that holds no run is a clear error."""
    path = store_path(run_dir)
    if mode == "r" and not path.exists():
        raise AtlasError(f"no atlas run in {run_dir} (missing {STORE_NAME}); run `atlas sample` first")
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


def valid_rows(root: zarr.Group, layer: str) -> np.ndarray:
    """Indices of the rows that hold real samples (finished shards, readable images)."""
    group = require_layer(root, layer)
    valid = group["valid"][:]
    rows = np.flatnonzero(valid)
    if rows.size == 0:
        raise AtlasError(f"layer '{layer}' has no samples yet; run or resume `atlas sample`")
    return rows


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
