"""Ctrl-C and SIGTERM: every command stops within seconds with one line and exit 130 / 143, and the run it leaves
resumes to the run an uninterrupted command gives, array by array.

The real command line runs in its own process group, as a terminal starts it; Ctrl-C is SIGINT sent to the whole group
(the DataLoader workers with it), SIGTERM is sent to the process alone, as `kill` does. The tiny build of
``tiny_run.CONFIG`` (8 photos) is the uninterrupted reference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import WEIGHTS
from tiny_run import LAYER, build_tiny, tiny_config
from tiny_run import cli as _cli

from atlas import store
from atlas.build import build, load_config, merge
from atlas.errors import AtlasError

LINE = "atlas: interrupted; run the same command again to resume"
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory, cfg, photo_list) -> Path:
    """The uninterrupted tiny build."""
    return build_tiny(tmp_path_factory, photo_list, cfg)


def _start(*args) -> subprocess.Popen:
    """`atlas ARGS` in a new process group, SIGINT at its default (a shell's background job would ignore it)."""
    return subprocess.Popen([sys.executable, "-c", "from atlas.cli import main; main()", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, process_group=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _writing(run: Path) -> dict:
    try:
        return store.read_ledger(run)["writing"]
    except AtlasError:  # no store yet, or read while being replaced
        return {}


def _current(run: Path) -> set[str]:
    """Stages the build records as complete (an invalidated one keeps only a tombstone without a key)."""
    return {stage for stage, record in store.read_ledger(run)["records"].items() if "key" in record}


def _interrupt(proc: subprocess.Popen, sig: int, group: bool, ready, timeout: float = 180) -> float | None:
    """Send ``sig`` (to the group or the process) as soon as ``ready()``; assert the one line and the exit status.
    Returns the seconds from the signal to the exit, None when the command finished before ``ready()`` was seen."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is not None:
        proc.communicate()
        return None
    sent = time.monotonic()
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert "Traceback" not in err and err.strip().splitlines()[-1:] == [LINE], err
    assert proc.returncode == EXIT[sig], (proc.returncode, err)
    return seconds


def _same(a_run: Path, b_run: Path, names: list[str]) -> None:
    a, b = (zarr.open_group(run / store.STORE_NAME, mode="r") for run in (a_run, b_run))
    for name in names:
        assert np.array_equal(a[name][...], b[name][...]), name


SAMPLE = ["sample", "--layer", LAYER, "--weights", WEIGHTS, "--max-images", "12", "--per-image", "2", "--no-attribution",
          "--batch-size", "2", "--shard-size", "2"]
SAMPLED = ["images/ok", "images/top5", *(f"samples/{LAYER}/{name}" for name in ("activations", "position", "image_index", "valid"))]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, photo_list) -> Path:
    """The uninterrupted `atlas sample` of ``SAMPLE``."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert _cli(*SAMPLE, "--images", photo_list, "--workers", "0", "--out", out).returncode == 0
    return out


def _first_shard(out: Path):
    return (out / store.STORE_NAME / "images" / "shard_done" / "c" / "0").is_file


def _part_way(out: Path) -> None:
    done = store.read_flags(zarr.open_group(out / store.STORE_NAME, mode="r")["images/shard_done"])
    assert 0 < done.sum() < len(done)  # stopped part-way: finished shards kept


def test_ctrl_c_stops_sample_and_its_workers_and_the_run_resumes(tmp_path, photo_list, whole):
    """`atlas sample` with a decoding worker, Ctrl-C (SIGINT to the group) after its first shard: exit 130 within
    seconds, no process left; run again, every array equals an uninterrupted run's."""
    out = tmp_path / "run"
    args = [*SAMPLE, "--images", photo_list, "--workers", "1", "--out", out]
    proc = _start(*args)
    seconds = _interrupt(proc, signal.SIGINT, True, _first_shard(out))
    assert seconds is not None, "the sampler finished before its first shard was seen"
    assert seconds < 10, seconds
    with pytest.raises(ProcessLookupError):  # the group is gone: the worker ended with the main process
        os.killpg(proc.pid, 0)
    _part_way(out)
    assert _cli(*args).returncode == 0
    _same(out, whole, SAMPLED)


def test_sigterm_stops_sample_on_ray_and_the_run_resumes_locally(tmp_path, photo_list, whole):
    """`atlas sample --engine ray` (its own local Ray), SIGTERM to the process after its first shard: exit 143 with
    the one line (ray.init's own SIGTERM handler would exit 15, then abort), the actors shut down; resumed locally,
    every array equals the uninterrupted run's."""
    pytest.importorskip("ray")
    out = tmp_path / "run"
    seconds = _interrupt(_start(*SAMPLE, "--images", photo_list, "--workers", "0", "--engine", "ray", "--out", out), signal.SIGTERM,
                         False, _first_shard(out))
    assert seconds is not None, "the sampler finished on Ray before its first shard was seen"
    assert seconds < 60, seconds
    _part_way(out)
    assert _cli(*SAMPLE, "--images", photo_list, "--workers", "0", "--out", out).returncode == 0
    _same(out, whole, SAMPLED)


def test_a_build_interrupted_in_sample_then_in_render_resumes_to_the_uninterrupted_build(tmp_path, base, cfg, photo_list):
    """`atlas build`: Ctrl-C during sample (exit 130), then its re-run SIGTERMed during render (exit 143), then run to
    the end: the samples, layout, grid and icons equal the uninterrupted build's, array by array."""
    out = tmp_path / "run"
    args = ["build", "--config", cfg, "--images", photo_list, "--out", out]
    seconds = _interrupt(_start(*args), signal.SIGINT, True, lambda: f"samples/{LAYER}" in _writing(out))
    assert seconds is not None and seconds < 10, seconds
    assert "sample" not in _current(out)
    render = f"icons/{LAYER}/full/4"
    seconds = _interrupt(_start(*args), signal.SIGTERM, False, lambda: render in _writing(out))
    if seconds is None:
        pytest.skip("the build's render finished every time before it could be interrupted")
    assert seconds < 10, seconds
    assert {"sample", "project", "grid"} <= _current(out) and "render" not in _current(out)
    config = merge(load_config(cfg), {"run": {"images": str(photo_list), "out": str(out)}})
    result = build(config, echo=lambda *_: None)
    assert result.skipped[:3] == ["sample", "project", "grid"] and "render" in result.ran
    _same(out, base, ["images/ok", f"samples/{LAYER}/activations", f"samples/{LAYER}/position", f"layouts/{LAYER}/full/xy",
                      f"grids/{LAYER}/full/4/count", f"{render}/images", f"{render}/done"])


def test_ctrl_c_stops_serve(base):
    """`atlas serve`: Ctrl-C once it listens stops it at once, in one line."""
    proc = subprocess.Popen([sys.executable, "-c", "from atlas.cli import main; main()", "serve", str(base), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "atlas viewer:" in proc.stdout.readline()
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10 and proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and err.strip().splitlines() == ["atlas: interrupted; the server stopped"], err


# ---------------------------------------------------------------------------- the layout's kNN search, in blocks
def _clustered(n: int, d: int = 512, seed: int = 0) -> np.ndarray:
    """Clustered non-negative rows, as a layer's activations after a ReLU are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d)).astype(np.float32)
    return np.maximum(centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32), 0.0)


@pytest.mark.parametrize("exact_max, budget", [(10_000, 100 * 1200), (300, 64 * 200)])  # one exact list; clustered lists
def test_the_knn_search_scores_in_bounded_blocks_and_finds_the_same_neighbours(monkeypatch, exact_max, budget):
    """Every product of the search (the k-means assignment included) holds at most SCORES_PER_BLOCK scores, or 64
    query rows: how long Ctrl-C can wait on one call is bounded; cutting the queries finer changes no neighbour, and
    a distance at most in its last bit (a BLAS product of a few rows may sum in another order)."""
    from atlas.layout import neighbors

    x = _clustered(1200, 32)
    whole = neighbors.knn_graph(x, 15, "cosine", seed=1, exact_max=exact_max)
    shapes: list[tuple[int, int]] = []
    scores = neighbors._scores
    monkeypatch.setattr(neighbors, "_scores", lambda q, c, c_sq: shapes.append((q.shape[0], c.shape[0])) or scores(q, c, c_sq))
    monkeypatch.setattr(neighbors, "SCORES_PER_BLOCK", budget)
    blocks = neighbors.knn_graph(x, 15, "cosine", seed=1, exact_max=exact_max)
    too_large = [(r, c) for r, c in shapes if r * c > budget and r > 64]
    assert len(shapes) >= 10 and not too_large, too_large[:5]
    assert np.array_equal(whole[0], blocks[0]) and np.allclose(whole[1], blocks[1], rtol=0, atol=1e-6)


def test_ctrl_c_stops_the_layouts_knn_search_within_a_second():
    """SIGINT during an exact 20,000-point search (512-d, as mixed4c): the KeyboardInterrupt comes within a second
    (the search ran 4096 x 20,000 products, 2.5 s each on a loaded 2-core machine, before it was cut into blocks)."""
    import threading

    from atlas.layout.neighbors import knn_graph

    x = _clustered(20_000)
    sent: list[float] = []

    def interrupt() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.5, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            knn_graph(x, 30, "cosine")
        waited = time.monotonic() - sent[0]
    finally:
        timer.cancel()
    assert waited < 1.0, f"Ctrl-C waited {waited:.2f} s for the kNN search"
