"""What the store tests share: one tiny build's config and the in-process command line with its one-line check.

The tiny run is 8 photos x 4 positions, no attribution, a t-SNE layout, one 4x4 grid and 16 px draft icons:
every stage runs in seconds, so tests can damage, interrupt or re-run copies of it.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

from conftest import WEIGHTS

from atlas import store

LAYER = "mixed4c"
CONFIG = f"""
[run]
layers = ["{LAYER}"]
[sample]
weights = "{WEIGHTS}"
max_images = 8
per_image = 4
workers = 0
batch_size = 8
attribution = false
[project]
method = "tsne"
[grid]
sizes = [4]
min_count = 1
[render]
quality = "draft"
steps = 4
size = 16
[tiles]
examples = false
"""


def cli(*args) -> subprocess.CompletedProcess:
    """The real command line (``atlas.cli.main``) run in this process: the same code path as the entry point without
    a second torch start-up; used where another process is not the point of the test."""
    from atlas.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["atlas", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def cli_process(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line in a fresh Python process (where a test is about start-up: what is imported, or checked
    before torch is)."""
    return subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit 2 and exactly one `atlas: error:` line holding every needle."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("atlas: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, int]:
    """crc32 of every file under ``folder`` (the lock file's pid aside)."""
    return {p.relative_to(folder).as_posix(): zlib.crc32(p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != store.LOCK_NAME}


def tiny_config(tmp_path_factory) -> Path:
    """``CONFIG`` written to a file of its own (a module fixture's: tests that run the command line need a path)."""
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(CONFIG)
    return path


def build_tiny(tmp_path_factory, images: Path, cfg: Path | None = None) -> Path:
    """A finished tiny run (every stage ran and is recorded) of ``images``, built with ``CONFIG`` (or ``cfg``)."""
    from atlas.build import build, load_config, merge

    if cfg is None:
        cfg = tmp_path_factory.mktemp("cfg") / "tiny.toml"
        cfg.write_text(CONFIG)
    out = tmp_path_factory.mktemp("base") / "run"
    config = merge(load_config(cfg), {"run": {"images": str(images), "out": str(out)}})
    assert build(config, echo=lambda *_: None).ran == ["sample", "project", "grid", "render", "tiles"]
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    """A copy of a finished run for a test to damage, interrupt or re-run."""
    out = tmp_path / "run"
    shutil.copytree(base, out, symlinks=True)
    return out
