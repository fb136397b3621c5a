"""`atlas --help` lists every command under one of four headings, and square brackets in help text show as written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from atlas.cli import GROUPS, app

HEADINGS = ("Pipeline", "Instruments", "Experiments", "Serving")


def _help(*args: str) -> str:
    """The help as a user's terminal gets it: the installed entry point in a fresh process, 200 columns wide."""
    code = "import sys; from atlas.cli import main; sys.argv = ['atlas', *sys.argv[1:]]; main()"
    done = subprocess.run([sys.executable, "-c", code, *args, "--help"], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "TERM": "dumb", "PATH": "/usr/bin:/bin", "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def top_help() -> str:
    return _help()


def _panels(text: str) -> dict[str, list[str]]:
    """Heading -> the command names listed in its box, in order."""
    panels: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"\s*╭─ (.+?) ─", line)
        if heading:
            current = heading.group(1)
            panels[current] = []
            continue
        row = re.match(r"\s*│ ([a-z][a-z-]*)\s{2,}\S", line)
        if current is not None and row:
            panels[current].append(row.group(1))
    return panels


def test_every_command_is_listed_under_its_heading(top_help):
    panels = _panels(top_help)
    assert [h for h in panels if h != "Options"] == list(HEADINGS)  # no untitled "Commands" group: every command has one
    registered = {info.name for info in app.registered_commands}
    listed = [name for h in HEADINGS for name in panels[h]]
    assert sorted(listed) == sorted(registered) and len(listed) == len(set(listed))
    for heading in HEADINGS:
        assert panels[heading] == [n for n in GROUPS[heading] if n in registered]
    assert panels["Serving"] == ["serve"] and panels["Pipeline"][:2] == ["build", "sample"]
    assert {"inspect", "units", "weights"} <= set(panels["Instruments"]) and {"patch", "side-by-side"} <= set(panels["Experiments"])


def test_square_brackets_show_as_written():
    # the settings' help names the extra to install: rich markup would swallow "[ray]" as a style tag
    assert "pip install 'activation-atlas[ray]'" in " ".join(_help("sample").replace("│", " ").split())
    # the command list's lines are the docstrings' first paragraphs, escaped the same way
    for info in app.registered_commands:
        assert info.short_help and not re.search(r"(?<!\\)\[", info.short_help), info.name
