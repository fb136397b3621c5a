"""A stage's record in the ledger: :func:`begin_stage` marks the nodes it rewrites and invalidates what was built on
them, :func:`finish_stage` seals them, :func:`record_stage` / :func:`stage_status` are what ``atlas build`` skips by.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from atlas.errors import AtlasError
from atlas.store.ledger import _later, _under, _write_ledger, read_ledger
from atlas.store.locks import take_lock
from atlas.store.schema import FULL_ATLAS, _check_root, _run_of, _store_dir, store_path
from atlas.store.seals import _arrays_under, _seal, verify


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
