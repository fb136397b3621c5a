"""The stage runner (atlas.runner.run_stages) on a real, empty store: order, skipping, recording, progress lines.

The steps here are small closures writing one file each, so what is tested is the runner's own logic; the
stages themselves run through it in tests/test_build.py and tests/test_classes.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas import store
from atlas.errors import AtlasError
from atlas.runner import Step, fmt_seconds, run_stages


def _empty_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    with store.new_store(run):
        pass
    return run


def _writing(run: Path, name: str, done: list[str]):
    def work() -> None:
        (run / f"{name}.txt").write_text(name)
        done.append(name)

    return work


def _steps(run: Path, done: list[str], keys=("k1", "k2")) -> list[Step]:
    return [Step("project", keys[0], _writing(run, "project", done), 5.0, files=["project.txt"]),
            Step("grid", keys[1], _writing(run, "grid", done), 3.0, files=["grid.txt"])]


def test_steps_run_in_order_are_recorded_and_then_skipped(tmp_path):
    run, done, lines = _empty_run(tmp_path), [], []
    report = run_stages(run, _steps(run, done), lines.append)
    assert done == ["project", "grid"] and report.ran == ["project", "grid"] and report.skipped == []
    assert set(report.seconds) == {"project", "grid"}
    assert lines == ["[1/2] project (not run yet; overall ETA 0m08s)", "[2/2] grid (not run yet; overall ETA 0m03s)"]
    assert store.read_ledger(run)["records"]["grid"]["key"] == "k2"

    lines.clear()
    report = run_stages(run, _steps(run, done), lines.append)
    assert done == ["project", "grid"] and report.skipped == ["project", "grid"] and report.ran == []
    assert lines == ["[1/2] project: up to date, skipped", "[2/2] grid: up to date, skipped"]


def test_a_changed_key_or_a_missing_output_reruns_only_that_step(tmp_path):
    run, done, lines = _empty_run(tmp_path), [], []
    run_stages(run, _steps(run, done))
    done.clear()
    report = run_stages(run, _steps(run, done, keys=("k1", "k2-new")), lines.append)
    assert done == ["grid"] and report.skipped == ["project"]
    assert lines[1] == "[2/2] grid (settings changed; overall ETA 0m03s)"  # the skipped step's cost is no longer in the ETA

    (run / "project.txt").unlink()
    done.clear()
    lines.clear()
    run_stages(run, _steps(run, done, keys=("k1", "k2-new")), lines.append)
    assert done == ["project"] and lines[0] == f"[1/2] project ({run / 'project.txt'} is missing; overall ETA 0m08s)"


def test_keyless_steps_always_run_record_nothing_and_say_nothing_by_default(tmp_path, capsys):
    run, done = _empty_run(tmp_path), []
    steps = [Step("grid", None, _writing(run, "grid", done)), Step("tiles", None, _writing(run, "tiles", done))]
    for _ in range(2):
        report = run_stages(run, steps)
    assert done == ["grid", "tiles", "grid", "tiles"] and report.ran == ["grid", "tiles"]
    assert store.read_ledger(run)["records"] == {}
    assert capsys.readouterr().out == ""
    lines = []
    run_stages(run, steps, lines.append)
    assert lines == ["[1/2] grid (always run)", "[2/2] tiles (always run)"]


def test_a_failing_step_stops_the_run_and_keeps_earlier_records(tmp_path):
    run, done = _empty_run(tmp_path), []

    def fail() -> None:
        raise AtlasError("grid says no")

    steps = [Step("project", "k1", _writing(run, "project", done), files=["project.txt"]), Step("grid", "k2", fail),
             Step("render", "k3", _writing(run, "render", done))]
    with pytest.raises(AtlasError, match="grid says no"):
        run_stages(run, steps)
    assert done == ["project"] and set(store.read_ledger(run)["records"]) == {"project"}


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (0, 59.6, 187, 3600, 3 * 3600 + 5 * 60 + 59)] == ["0m00s", "1m00s", "3m07s", "1h00m", "3h05m"]
