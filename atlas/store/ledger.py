"""The ledger file, ``store.zarr/ledger/zarr.json`` (a zarr group's attributes): read, and written atomically
(temporary file, then ``os.replace``); and the stage graph's order of invalidation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import zarr

from atlas.errors import AtlasError
from atlas.store.schema import BUILT_ON, LEDGER, _store_dir


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
