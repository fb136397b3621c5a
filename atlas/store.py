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
``ledger/``                            a group whose attrs are the ledger (below); written only by this module

Layer names may contain dots (torchvision module paths); they are used as zarr node
names unchanged.

The ledger: freshness, integrity, one writer
--------------------------------------------
Every stage brackets its writes with :func:`begin_stage` and :func:`finish_stage`:

- ``begin_stage(run, stage, paths)`` marks the nodes under ``paths`` as being written (a reader
  then gets "incomplete: re-run `atlas STAGE`", never half-written data), forgets their seals,
  and replaces the completion records of ``stage`` and of every later stage by tombstones saying
  which stage invalidated them (for the whole-layer atlas "full"; sampling drops them all),
  whichever command is running the stage.
- ``finish_stage(run, stage, paths)`` *seals* every array under ``paths``: the name, size and
  crc32 of each chunk file, and the array's shape. Chunks zarr never wrote (equal to the fill
  value) are simply not in the seal, so an all-zero chunk is not "missing".
- :func:`verify` (called by every stage on what it reads) lists the chunk files of each sealed
  array and compares names and sizes, then their crc32 (skipped when the files' sizes and
  mtimes are those already checked in this process). A missing, truncated, changed or extra
  chunk, an unreadable ``zarr.json`` or an unsealed half-written node is one
  :class:`AtlasError` naming the array and the stage to re-run.
- :func:`verify` also checks lineage (:func:`check_lineage`): a grid records the ``layout_id`` of its
  layout and its own ``grid_id``, icons the ``grid_id`` of their grid; a grid or icons node whose input
  has changed since is one line saying which stage to re-run. No stage deletes another stage's data to
  signal this.
- ``atlas build`` records a stage's key with :func:`record_stage` once the stage has finished and
  skips it later only when :func:`stage_status` finds the record, the same key and every
  recorded array intact.

The ledger lives in ``store.zarr/ledger/zarr.json`` (a zarr group's attributes, written
atomically here: temporary file, then ``os.replace``). Stores without one (older runs,
synthetic test stores) are read without chunk checks.

Every command that writes takes :func:`take_lock`, an advisory lock (``fcntl.lockf``) on
``RUN/.lock`` holding the holder's pid; a second writer gets one line naming it. Taking the
lock also removes stray ``*.partial`` leftovers of killed writers (:func:`cleanup_partials`).
:func:`writer` (a decorator) releases the locks its call took and turns a read-only folder
or a full disk (``EROFS``, ``EACCES``, ``ENOSPC``, ...) into one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterable
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
            "units": ("sample",), "gallery": ("tiles", "units")}
# The stage that writes each top-level node of the store (for "re-run `atlas STAGE`" hints).
WRITER = {"images": "sample", "samples": "sample", "layouts": "project", "grids": "grid", "whitening": "grid", "icons": "render",
          "units": "units"}
FAULTS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
          errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


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


def valid_rows(root: zarr.Group, layer: str) -> np.ndarray:
    """Indices of the rows that hold real samples (finished shards, readable images); the layer's arrays are verified first."""
    group = require_layer(root, layer)
    verify(root, [f"samples/{layer}"])
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


# ----------------------------------------------------------------------------- the ledger


def _store_dir(where: str | Path | zarr.Group) -> Path:
    """The store folder of a run folder, a store folder or an open group."""
    if isinstance(where, zarr.Group):
        return Path(str(where.store.root))  # LocalStore: the only store atlas uses
    where = Path(where)
    return where if where.name == STORE_NAME else where / STORE_NAME


def _run_of(store_dir: Path) -> Path:
    """The run folder of a store folder (also of a store being built as ``RUN/.store.zarr.partial-PID``)."""
    return store_dir.parent


def _empty_ledger() -> dict:
    return {"version": 1, "records": {}, "seals": {}, "writing": {}}


def read_ledger(where: str | Path | zarr.Group) -> dict:
    """The ledger of a store (empty for stores written before it existed); a damaged one is an error."""
    path = _store_dir(where) / LEDGER / "zarr.json"
    if not path.is_file():
        return _empty_ledger()
    try:
        data = json.loads(path.read_bytes())["attributes"]["ledger"]
        if not all(isinstance(data.get(k), dict) for k in ("records", "seals", "writing")):
            raise ValueError("missing tables")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise AtlasError(f"{path} is damaged; delete {path.parent} and re-run `atlas build` (it redoes every stage), "
                         "or re-run each stage's command") from None
    return data


def _write_ledger(store_dir: Path, ledger: dict) -> None:
    """Write the ledger atomically (a torn write can never leave half a file)."""
    folder = store_dir / LEDGER
    folder.mkdir(exist_ok=True)
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"ledger": ledger}}
    tmp = folder / f"zarr.json.{os.getpid()}.partial"
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, folder / "zarr.json")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _later(stage: str) -> list[str]:
    """``stage`` and every stage built on it (:data:`BUILT_ON`), in order; [] for a stage outside the graph."""
    if stage != "sample" and stage not in BUILT_ON:
        return []
    later = [stage]
    for name, inputs in BUILT_ON.items():  # listed in dependency order, so one pass suffices
        if name not in later and any(i in later for i in inputs):
            later.append(name)
    return later


def begin_stage(run_dir: str | Path, stage: str, paths: Iterable[str], atlas: str = FULL_ATLAS) -> None:
    """``stage`` starts rewriting the nodes under ``paths``: mark them, forget their seals, invalidate records.

    Records of ``stage`` and every later stage are dropped when the whole-layer atlas is
    concerned (``atlas`` "full") or when sampling (everything depends on the samples).
    Takes the run's lock if this process does not hold it yet.
    """
    store_dir = _store_dir(run_dir)
    take_lock(_run_of(store_dir))
    ledger = read_ledger(store_dir)
    paths = [p.strip("/") for p in paths]
    for name in [k for k in ledger["seals"] if any(_under(k, p) for p in paths)]:
        del ledger["seals"][name]
    for p in paths:
        ledger["writing"][p] = {"stage": stage, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tombstone = {"invalidated_by": stage, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if atlas == FULL_ATLAS or stage == "sample":
        for name in _later(stage):
            if name in ledger["records"] or name == stage:  # a tombstone: the record is gone, and why
                ledger["records"][name] = dict(tombstone)
    # A class or compare atlas's records are named "ATLAS:stage"; rewriting one of its stages drops its later ones,
    # and sampling again drops every one of them.
    for name in list(ledger["records"]):
        owner, _, part = name.partition(":")
        if part and ((stage == "sample") or (owner == atlas and part in _later(stage))):
            ledger["records"][name] = dict(tombstone)
    _write_ledger(store_dir, ledger)


def finish_stage(run_dir: str | Path, stage: str, paths: Iterable[str]) -> dict:
    """``stage`` has finished writing ``paths``: seal every array under them and clear their marks; returns the seals."""
    store_dir = _store_dir(run_dir)
    ledger = read_ledger(store_dir)
    paths = [p.strip("/") for p in paths]
    sealed = {}
    for p in paths:
        for rel, meta in _arrays_under(store_dir, p):
            sealed[rel] = _seal(store_dir / rel, meta, stage)
    for name in [k for k in ledger["seals"] if any(_under(k, p) for p in paths)]:
        del ledger["seals"][name]
    ledger["seals"].update(sealed)
    for p in paths:
        ledger["writing"].pop(p, None)
    _write_ledger(store_dir, ledger)
    return sealed


def record_stage(run_dir: str | Path, stage: str, key: str, paths: Iterable[str] = (), files: Iterable[str] = ()) -> None:
    """Record that ``stage`` of ``atlas build`` is complete under ``key``, having written ``paths`` (store nodes) and ``files``."""
    store_dir = _store_dir(run_dir)
    ledger = read_ledger(store_dir)
    ledger["records"][stage] = {"key": key, "paths": [p.strip("/") for p in paths], "files": list(files),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_ledger(store_dir, ledger)


def stage_status(run_dir: str | Path, stage: str, key: str) -> str | None:
    """None when ``stage`` is complete under ``key`` and everything it wrote is intact, else why it must run."""
    if not store_path(run_dir).exists():
        return "not run yet"
    _check_root(run_dir)
    store_dir = _store_dir(run_dir)
    record = read_ledger(store_dir)["records"].get(stage)
    if record is None:
        return "not run yet"
    if "key" not in record:
        by = record.get("invalidated_by")
        if by == stage:
            return f"rewritten since the last build, by `atlas {stage}` or an unfinished run of it"
        return f"its input was rewritten since, by `atlas {by}`"
    if record.get("key") != key:
        return "settings changed"
    for p in record.get("paths", []):
        if not (store_dir / p).is_dir():
            return f"{store_dir / p} is missing"
        try:
            verify(run_dir, [p])
        except AtlasError as exc:
            return str(exc).split(";")[0]
    for f in record.get("files", []):
        if not (Path(run_dir) / f).is_file():
            return f"{Path(run_dir) / f} is missing"
    return None


def stage_is_current(run_dir: str | Path, stage: str, key: str) -> bool:
    return stage_status(run_dir, stage, key) is None


# ----------------------------------------------------------------------------- seals and verification

_VERIFIED: dict[str, tuple] = {}  # array folder -> stat signature whose crc32s were checked in this process


def _arrays_under(store_dir: Path, prefix: str, unreadable: list | None = None):
    """(relative path, metadata) of every array under ``prefix`` (which may be an array).

    An unreadable zarr.json raises, or is appended to ``unreadable`` when that list is given.
    """
    top = store_dir / prefix
    if not top.is_dir():
        return
    for folder, dirs, files in os.walk(top):
        rel = Path(folder).relative_to(store_dir).as_posix()
        if "zarr.json" not in files:
            continue
        try:
            meta = json.loads((Path(folder) / "zarr.json").read_bytes())
            kind = meta.get("node_type")
            if kind not in ("array", "group"):
                raise ValueError(kind)
        except (OSError, ValueError, AttributeError):
            if unreadable is not None:
                unreadable.append(rel)
                dirs[:] = []
                continue
            raise AtlasError(f"{Path(folder)} is damaged (zarr.json unreadable); {_hint(rel, metadata=True)}") from None
        if kind == "array":
            dirs[:] = []  # chunks below, no nodes
            yield rel, meta


def _chunk_files(array_dir: Path) -> dict[str, os.stat_result]:
    """Chunk key ("3/0") -> stat of every chunk file of an array (zarr's own tmp files excluded)."""
    out = {}
    base = array_dir / "c"
    if not base.is_dir():
        return out
    for folder, _, files in os.walk(base):
        for name in files:
            if name.endswith(".partial"):
                continue
            path = Path(folder) / name
            out[path.relative_to(base).as_posix()] = path.stat()
    return out


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def _seal(array_dir: Path, meta: dict, stage: str) -> dict:
    chunks = {key: [st.st_size, _crc(array_dir / "c" / key)] for key, st in sorted(_chunk_files(array_dir).items())}
    return {"stage": stage, "shape": meta.get("shape"), "chunks": chunks}


def _hint(rel: str, metadata: bool = False) -> str:
    """How to recover a damaged node: which stage writes it."""
    parts = rel.split("/")
    if parts[0] == LEDGER:  # the record of finished stages only: the data is intact, the stages are redone or re-recorded
        return (f"delete {LEDGER}/ in the store and re-run `atlas build` (it redoes every stage), or re-run each stage's "
                "command; the sampled data is not affected")
    stage = WRITER.get(parts[0], "sample")
    if stage == "sample" and metadata:
        return "the sampled data cannot be read any more: sample again into a new folder"
    if stage == "sample":
        return "re-run `atlas sample` with the same arguments (or `atlas build`): it redoes the damaged shards"
    if len(parts) > 2 and parts[2] != FULL_ATLAS:
        return f"re-run the `atlas class` / `atlas compare` command that made atlas '{parts[2]}'"
    return f"re-run `atlas {stage}` (or `atlas build`, which redoes it)"


def _problem(array_dir: Path, seal: dict, meta: dict) -> tuple[str, list[tuple[int, ...]]] | None:
    """What is wrong with a sealed array (first problem in words, and every bad chunk's coordinates), or None."""
    if seal.get("shape") is not None and meta.get("shape") != seal["shape"]:
        return f"shape {meta.get('shape')} instead of {seal['shape']}", []
    want: dict = seal.get("chunks", {})
    have = _chunk_files(array_dir)
    words, bad = [], []

    def coords(key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in key.split("/") if x.isdigit())

    for key, (size, _) in want.items():
        dotted = key.replace("/", ".")
        if key not in have:
            words.append(f"chunk {dotted} missing")
            bad.append(coords(key))
        elif have[key].st_size != size:
            words.append(f"chunk {dotted} truncated or changed: {have[key].st_size} of {size} bytes")
            bad.append(coords(key))
    for key in have.keys() - want.keys():
        words.append(f"unexpected chunk {key.replace('/', '.')}")
        bad.append(coords(key))
    if not words:
        signature = tuple(sorted((k, st.st_size, st.st_mtime_ns) for k, st in have.items()))
        if _VERIFIED.get(str(array_dir)) == signature:
            return None
        for key, (_, crc) in want.items():
            if _crc(array_dir / "c" / key) != crc:
                words.append(f"chunk {key.replace('/', '.')} changed (crc32 differs)")
                bad.append(coords(key))
        if not words:
            _VERIFIED[str(array_dir)] = signature
            return None
    _VERIFIED.pop(str(array_dir), None)
    more = f" and {len(words) - 1} more" if len(words) > 1 else ""
    return words[0] + more, bad


def verify(where: str | Path | zarr.Group, paths: Iterable[str]) -> None:
    """Check every node under ``paths`` before a stage reads it; raise one line naming a damaged or incomplete array.

    ``where`` is the run folder or an open group of its store. Nodes that do not exist are
    left to the caller's own "run `atlas ...` first" message. Grids and icons are also refused when their
    input changed after they were computed (:func:`check_lineage`), so nothing downstream of a rewrite is used.
    """
    store_dir = _store_dir(where)
    ledger = read_ledger(store_dir)
    paths = [p.strip("/") for p in paths]
    for p in paths:
        for marked, info in ledger["writing"].items():
            if _under(p, marked) or _under(marked, p):
                stage = info.get("stage")
                again = "resume it with the same `atlas sample` command" if stage == "sample" else f"re-run `atlas {stage}`"
                raise AtlasError(f"{store_dir / marked} is incomplete (`atlas {stage}` stopped before it finished); "
                                 f"{again} (or `atlas build`)")
        for rel, meta in _arrays_under(store_dir, p):
            seal = ledger["seals"].get(rel)
            if seal is None:
                continue  # written before the ledger existed (or by hand): nothing to compare with
            found = _problem(store_dir / rel, seal, meta)
            if found is not None:
                raise AtlasError(f"{store_dir / rel} is damaged ({found[0]}); {_hint(rel)}")
    check_lineage(store_dir, paths)


# Lineage: a node records the identity of the node it was computed from, and a reader refuses it when that node has
# changed since. kind -> (the input's kind, the depth of the input's path, the attribute naming the input's content).
# A grid (grids/L/A/S) records its layout's ``layout_id``; icons (icons/L/A/S) their grid's ``grid_id``.
LINEAGE = {"grids": ("layouts", 3, "layout_id"), "icons": ("grids", 4, "grid_id")}


def _node_attrs(store_dir: Path, rel: str) -> dict | None:
    """The attributes in a node's zarr.json, or None when it has none (or is not there)."""
    try:
        doc = json.loads((store_dir / rel / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    found = doc.get("attributes") if isinstance(doc, dict) else None
    return found if isinstance(found, dict) else None


def stale(where: str | Path | zarr.Group, path: str) -> str | None:
    """Why the grid or icons node ``path`` (``grids/L/A/S``, ``icons/L/A/S``) no longer matches its input, or None.

    None also when either side records no identity (stores written before lineage existed) or the input
    is missing (the caller's own "run `atlas ...` first" applies).
    """
    store_dir = _store_dir(where)
    parts = path.strip("/").split("/")
    if parts[0] not in LINEAGE or len(parts) != 4:
        return None
    kind, depth, key = LINEAGE[parts[0]]
    mine, theirs = _node_attrs(store_dir, path.strip("/")), _node_attrs(store_dir, "/".join([kind, *parts[1:depth]]))
    if not mine or not theirs or mine.get(key) is None or theirs.get(key) is None or mine[key] == theirs[key]:
        return None
    layer, atlas = parts[1], parts[2]
    if atlas != FULL_ATLAS:
        again = f"re-run the `atlas class` / `atlas compare` command that made atlas '{atlas}'"
    else:
        again = f"re-run `atlas {'grid' if parts[0] == 'grids' else 'render'}` (or `atlas build`)"
    if parts[0] == "grids":
        return f"grids of {layer}/{atlas} were built from an older layout; {again}"
    return f"icons of {layer}/{atlas} (grid {parts[3]}) were rendered from an older grid; {again}"


def derived_nodes(path: str) -> list[str]:
    """``path`` and the nodes :data:`LINEAGE` derives from it, directly or not: for ``layouts/L/A`` the atlas's
    ``grids/L/A`` and ``icons/L/A``; for ``grids/L/A[/S]`` its ``icons/L/A[/S]``."""
    parts = path.strip("/").split("/")
    out = ["/".join(parts)]
    for kind, (source, depth, _key) in LINEAGE.items():  # listed in dependency order
        if any(q.split("/")[0] == source for q in out) and len(parts) >= depth - 1:
            out.append("/".join([kind, *parts[1:]]))
    return out


def replace_node(where: str | Path | zarr.Group, path: str) -> list[str]:
    """Remove ``path`` before it is written anew, together with what was derived from it (:func:`derived_nodes`),
    so nothing built on the old content outlives it; returns the nodes concerned (for :func:`begin_stage`).

    The store owns this rule: a stage replaces only its own node and never names another stage's data.
    """
    nodes = derived_nodes(path)
    for node in nodes:
        remove_node(where, node)
    return nodes


def check_lineage(where: str | Path | zarr.Group, paths: Iterable[str]) -> None:
    """Raise one line for the first grid or icons node under ``paths`` that is :func:`stale`."""
    store_dir = _store_dir(where)
    for p in [p.strip("/") for p in paths]:
        parts = p.split("/")
        if parts[0] not in LINEAGE or len(parts) > 4 or not (store_dir / p).is_dir():
            continue
        nodes = [p] if len(parts) == 4 else sorted(q.relative_to(store_dir).as_posix()
                                                   for q in (store_dir / p).glob("/".join(["*"] * (4 - len(parts))))
                                                   if (q / "zarr.json").is_file())
        for node in nodes:
            why = stale(store_dir, node)
            if why is not None:
                raise AtlasError(why)


def check_metadata(where: str | Path | zarr.Group) -> None:
    """Every zarr.json of the store parses (no chunk checks: cheap enough for readers such as ``atlas info``)."""
    for _ in _arrays_under(_store_dir(where), ""):
        pass


def damaged(where: str | Path | zarr.Group, path: str) -> dict[str, list[tuple[int, ...]] | None]:
    """Arrays under ``path`` that fail verification -> coordinates of their bad chunks, or None for a node whose
    zarr.json cannot be read (for stages that repair their own output before rewriting it)."""
    store_dir = _store_dir(where)
    ledger = read_ledger(store_dir)
    out: dict[str, list[tuple[int, ...]] | None] = {}
    unreadable: list[str] = []
    for rel, meta in _arrays_under(store_dir, path.strip("/"), unreadable):
        seal = ledger["seals"].get(rel)
        if seal is not None and (found := _problem(store_dir / rel, seal, meta)) is not None:
            out[rel] = found[1]
    return out | dict.fromkeys(unreadable)


def seal_problems(where: str | Path | zarr.Group) -> dict[str, str]:
    """Every sealed array of the store whose chunks no longer match their seal -> what is wrong and how to recover, in
    one line each: a missing, extra or resized chunk file (cheap: one ``stat`` per chunk, no content read, so readers
    such as ``atlas info`` can afford it on a large run), and arrays a stage marked as being written.

    Returns
    -------
    dict
        Relative array path (``samples/mixed4c/acts``) -> "chunk 3.0 missing; re-run ...". Empty for an intact store.
    """
    store_dir = _store_dir(where)
    ledger = read_ledger(store_dir)
    out: dict[str, str] = {}
    for marked, info in ledger["writing"].items():
        stage = info.get("stage")
        again = "resume it with the same `atlas sample` command" if stage == "sample" else f"re-run `atlas {stage}`"
        out[marked] = f"incomplete (`atlas {stage}` stopped before it finished); {again} (or `atlas build`)"
    for rel, seal in ledger["seals"].items():
        array_dir = store_dir / rel
        if not (array_dir / "zarr.json").is_file():
            if array_dir.parent.is_dir():  # its node is there but the array is gone (a whole node removed is no damage)
                out[rel] = f"missing; {_hint(rel)}"
            continue
        want: dict = seal.get("chunks", {})
        have = _chunk_files(array_dir)
        words = [f"chunk {k.replace('/', '.')} missing" for k in want if k not in have]
        words += [f"chunk {k.replace('/', '.')} truncated or changed" for k, (size, _) in want.items()
                  if k in have and have[k].st_size != size]
        words += [f"unexpected chunk {k.replace('/', '.')}" for k in have.keys() - want.keys()]
        if words:
            out[rel] = words[0] + (f" and {len(words) - 1} more" if len(words) > 1 else "") + f"; {_hint(rel)}"
    return out


def read_flags(array: zarr.Array) -> np.ndarray:
    """A stage's done flags (one per shard or channel), tolerating a flag chunk torn by a kill: it counts as not done."""
    try:
        return np.asarray(array[:], dtype=bool)
    except Exception:  # noqa: BLE001 - a torn chunk must not stop the resume
        flags = np.zeros(array.shape[0], dtype=bool)
        for i in range(array.shape[0]):
            try:
                flags[i] = bool(array[i])
            except Exception:  # noqa: BLE001
                flags[i] = False
        return flags


def remove_node(where: str | Path | zarr.Group, path: str) -> None:
    """Delete a node of the store by its folder (works even when its zarr.json is garbage)."""
    shutil.rmtree(_store_dir(where) / path.strip("/"), ignore_errors=True)


# ----------------------------------------------------------------------------- one writer, leftovers, faults

_HELD: dict[str, tuple[int, Path]] = {}  # resolved run folder -> (open lock file descriptor, the folder as given)
_SCOPES: list[list[str]] = []  # locks taken inside each active @writer call


def take_lock(run_dir: str | Path, create: bool = False, unless_current: Callable[[], bool] | None = None) -> bool:
    """Hold the run's advisory lock (``RUN/.lock``) until the enclosing :func:`writer` call returns.

    Re-entrant within a process. Another process holding it is one line naming its pid. The
    first acquisition removes stray partial files of killed writers. ``create`` makes the run
    folder if needed (sampling, building); otherwise a missing folder is the "no atlas run" error.

    ``unless_current``, when given, is asked only when the lock file cannot be created because the folder is not
    writable (read-only file system, no permission): if it answers True (everything the caller would write is already
    current, e.g. every stage of a finished build), no lock is needed since nothing will be written, and False is
    returned instead of the one-line error. Returns True when the lock is held.
    """
    run = Path(run_dir)
    key = os.path.realpath(run)
    if key in _HELD:
        return True
    if not create and not run.is_dir():
        raise AtlasError(f"no atlas run in {run_dir} (missing {STORE_NAME}); run `atlas sample` first")
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if unless_current is not None and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and run.is_dir() and unless_current():
            return False  # a read-only run with nothing to do: readers need no lock
        raise AtlasError(describe_fault(exc, run)) from None
    try:
        # A POSIX record lock rather than flock: forked children (DataLoader workers) do not inherit it, so a killed
        # writer's lock is gone at once, not only when its last orphaned worker exits.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise AtlasError(describe_fault(exc, run)) from None
        raise AtlasError(f"{run} is being written by another atlas process ({holder or 'pid unknown'}); "
                         "wait for it to finish, or use another folder") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk must not hide the real error of the stage; the lock itself is held
    _HELD[key] = (fd, run)
    if _SCOPES:
        _SCOPES[-1].append(key)
    cleanup_partials(run)
    return True


def release_lock(run_dir: str | Path) -> None:
    held = _HELD.pop(os.path.realpath(Path(run_dir)), None)
    if held is not None:
        os.close(held[0])  # closing the descriptor releases the lock


def describe_fault(exc: OSError, run_dir: str | Path | None = None) -> str:
    """One line for an environment fault: what happened and in which folder."""
    what = FAULTS.get(exc.errno, exc.strerror or str(exc))
    if run_dir is None and _HELD:
        run_dir = list(_HELD.values())[-1][1]  # the run being written (a write error from a thread names no file)
    # A copy that fails writing (shutil's sendfile: ENOSPC with filename = the source, filename2 = the destination) names
    # the folder written into, never the folder read from (OpenSeadragon's, in the package).
    name = exc.filename2 if exc.filename2 and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else exc.filename
    where = Path(name).parent if name else (Path(run_dir) if run_dir else "the run folder")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what} while writing into {where}: free some space (or choose another --out) and run the same command again"
    if exc.errno == errno.EROFS:
        return f"cannot write to {where} ({what}); make the run folder writable or choose another --out"
    return f"{what}: {exc.filename or where}; check its permissions (or choose another --out)"


def writer(fn):
    """Decorator for every library function that writes a run: locks taken inside are released when it returns,
    and environment faults (read-only folder, full disk) become one :class:`AtlasError` line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _SCOPES.append([])
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if exc.errno in FAULTS:
                raise AtlasError(describe_fault(exc)) from None
            raise
        finally:
            for key in _SCOPES.pop():
                release_lock(key)

    return wrapper


def cleanup_partials(run_dir: str | Path) -> list[Path]:
    """Remove what killed writers left behind: ``RUN/.store.zarr.partial-*`` stores, zarr's and the ledger's
    ``*.partial`` temporary files in the store, ``tiles/*/*.partial`` folders (restoring ``*.old``
    ones whose replacement never arrived) and the manifest's temporary file. Returns what was removed."""
    run = Path(run_dir)
    removed: list[Path] = []

    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)

    for path in run.glob(PARTIAL_STORE + "*"):
        remove(path)
    store_dir = run / STORE_NAME
    if store_dir.is_dir():
        for folder, _, files in os.walk(store_dir):
            for name in files:
                if name.endswith(".partial"):
                    remove(Path(folder) / name)
    tiles = run / "tiles"
    if tiles.is_dir():
        for path in list(tiles.glob("*/*.old")):
            final = path.with_name(path.name[: -len(".old")])
            if not final.exists():
                os.replace(path, final)  # killed between moving the old tiles away and the new ones in
            else:
                remove(path)
        for path in [*tiles.glob("*/*.partial"), *tiles.glob("*.tmp")]:
            remove(path)
    return removed


@contextlib.contextmanager
def new_store(run_dir: str | Path):
    """Build a new store out of sight (``RUN/.store.zarr.partial-PID``) and move it into place when the block ends.

    A kill at any moment leaves either no store (the partial folder is removed on the next
    start) or a complete one. Yields the partial store's root group.
    """
    run = Path(run_dir)
    final = store_path(run)
    if final.exists():
        raise AtlasError(f"{final} already exists")
    partial = run / f"{PARTIAL_STORE}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield zarr.open_group(str(partial), mode="w")
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def open_for_update(run_dir: str | Path) -> zarr.Group:
    """The run's store opened read-write, or the clear "no atlas run" error (never a new empty store)."""
    open_store(run_dir)
    return open_store(run_dir, mode="r+")
