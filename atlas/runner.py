"""The stage runner: run stage steps in order, skip what the store says is current, record what finished.

``atlas build`` (every stage of the whole-layer atlas) and ``atlas class`` / ``atlas compare``
(project, grid, render and tiles of a named atlas) are lists of :class:`Step` handed to
:func:`run_stages`; this module is the one place where "run these stages in order, skip what is
current, record it when done" lives. What a step computes is the caller's closure (the runner
imports no stage); whether it is current is the store's (``atlas.store.stage_status``), asked
step by step just before it would run, because a step that runs invalidates the records of every
later stage as it starts writing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from atlas import store


@dataclass(frozen=True)
class Step:
    """One stage step of a run.

    Parameters
    ----------
    name : str
        The stage ("sample", "project", "grid", "render", "tiles", "units", "gallery"), or ``ATLAS:stage`` for a class
        or compare atlas's step; it names the step in progress lines and the record in the store's ledger.
    key : str or None
        The step's key (its settings chained with every step before it, as ``atlas.build.stage_keys`` makes them).
        With a key the step is skipped when the store holds a record of ``name`` under this key whose outputs are
        intact, and recorded when it finishes. None: the step always runs and nothing is recorded.
    run : callable
        Called with no arguments to do the work (every layer of it).
    cost : float or None, default None
        Estimated seconds, at least 0; with a cost the "runs" line ends with the overall ETA of the steps left.
    paths : sequence of str, default ()
        Store nodes the step writes, recorded with its key (and verified before it is skipped next time).
    files : sequence of str, default ()
        Files in the run folder the step writes, recorded likewise (e.g. ``tiles/{layer}/full/atlas.json``).
    """

    name: str
    key: str | None
    run: Callable[[], object]
    cost: float | None = None
    paths: Sequence[str] = ()
    files: Sequence[str] = ()


@dataclass
class StageReport:
    """What :func:`run_stages` did: ``ran`` and ``skipped`` (step names, in order) and ``seconds`` per step that ran."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def fmt_seconds(seconds: float) -> str:
    """``seconds`` as "1h05m" (an hour or more) or "3m07s", rounded to the second."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _quiet(line: str) -> None:
    """The default ``echo``: progress goes nowhere (``atlas class`` and ``compare`` print only their result)."""


def run_stages(run_dir: str | Path, steps: Iterable[Step], echo: Callable[[str], object] = _quiet) -> StageReport:
    """Run ``steps`` in order for the run folder ``run_dir``, skipping each one whose recorded key is current.

    Before a step with a key runs, the store is asked whether ``name`` finished under that key with its recorded
    outputs intact (``atlas.store.stage_status``); if so it is skipped, else it runs and is then recorded with its
    key, ``paths`` and ``files`` (``atlas.store.record_stage``). A step without a key always runs and is not recorded.
    Each step gets one progress line: ``[i/n] name: up to date, skipped`` or ``[i/n] name (why[; overall ETA t])``.

    Parameters
    ----------
    run_dir : str or Path
        The run folder (``RUN/store.zarr`` may not exist yet when the first step samples into it).
    steps : iterable of Step
        The steps, in the order they must run (upstream first).
    echo : callable, default no output
        Receives each progress line.

    Returns
    -------
    StageReport
        ``ran``, ``skipped`` and ``seconds`` (per step that ran, the time of its ``run`` alone).

    Raises
    ------
    AtlasError
        Whatever a step raises (it stops the run; steps already recorded stay recorded), or a damaged ledger.
    """
    steps = list(steps)
    report = StageReport()
    remaining = sum(step.cost or 0.0 for step in steps)
    for number, step in enumerate(steps, 1):
        where = f"[{number}/{len(steps)}] {step.name}"
        # Asked step by step: a step that runs invalidates the records of every later one as it starts writing.
        why = store.stage_status(run_dir, step.name, step.key) if step.key is not None else "always run"
        if why is None:
            report.skipped.append(step.name)
            remaining -= step.cost or 0.0
            echo(f"{where}: up to date, skipped")
            continue
        echo(f"{where} ({why}; overall ETA {fmt_seconds(remaining)})" if step.cost is not None else f"{where} ({why})")
        t0 = time.perf_counter()
        step.run()
        report.seconds[step.name] = time.perf_counter() - t0
        report.ran.append(step.name)
        remaining = max(remaining - (step.cost or 0.0), 0.0)
        if step.key is not None:
            store.record_stage(run_dir, step.name, step.key, step.paths, step.files)
    return report
