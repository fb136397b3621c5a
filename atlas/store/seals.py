"""Seals and verification: what each array looked like when its stage finished (chunk names, sizes, crc32, shape),
the check every reader makes against it, the lineage of grids and icons, and node removal.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import zarr

from atlas.errors import AtlasError
from atlas.store.ledger import _under, read_ledger
from atlas.store.schema import FULL_ATLAS, LEDGER, WRITER, _store_dir, require_layer


def valid_rows(root: zarr.Group, layer: str) -> np.ndarray:
    """Indices of the rows that hold real samples (finished shards, readable images); the layer's arrays are verified first."""
    group = require_layer(root, layer)
    verify(root, [f"samples/{layer}"])
    valid = group["valid"][:]
    rows = np.flatnonzero(valid)
    if rows.size == 0:
        raise AtlasError(f"layer '{layer}' has no samples yet; run or resume `atlas sample`")
    return rows


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
