"""Sample and render on Ray (issue 17): the store a local Ray cluster writes equals a local run's, bit for bit,
even when a worker actor is killed in the middle; bad engines and addresses are one line.

One local Ray cluster (``ray.init(num_cpus=2)``) runs in this test process for the whole module and is shut down
after it. The sample comparison uses 8 photos with attribution in 4 shards (the issue asks for 64: on this
shared 2-core machine 64 photos with attribution take minutes per run; bench/ray.py samples 64 of them).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import REPO, WEIGHTS, require_shared
from tiny_run import LAYER, build_tiny, cli, copy_run, one_line

from atlas import store
from atlas.engine import NAMESPACE, Engine, actor_name

N_PHOTOS = 8
SHARD = 2


def _require_ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray is not installed (make test installs the 'ray' extra)")
        pytest.skip("Ray is not installed: pip install 'atlas[ray]'")
    return ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = _require_ray()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False,
             namespace=NAMESPACE, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


def _kill_when(ray, actor_name: str, ready, found: dict) -> threading.Thread:
    """A thread that kills the named actor (Ray restarts it) once ``ready()`` holds, i.e. in the middle of the work."""

    def run() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if ready():
                    actor = ray.get_actor(actor_name, namespace=NAMESPACE)
                    found["pending"] = ready.pending()
                    ray.kill(actor, no_restart=False)
                    found["killed"] = True
                    return
            except Exception:  # noqa: BLE001 - not there yet (the actor, the flags): look again
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class _Flags:
    """``ready()``: at least one unit is written (its done flag set) and some are still to do."""

    def __init__(self, run, path: str):
        self.run, self.path = run, path

    def _flags(self) -> np.ndarray:
        return store.read_flags(store.open_store(self.run)[self.path])

    def __call__(self) -> bool:
        flags = self._flags()
        return bool(flags.any()) and not bool(flags.all())

    def pending(self) -> int:
        return int((~self._flags()).sum())


def _arrays(run, node: str) -> dict[str, np.ndarray]:
    root = store.open_store(run)
    out = {}
    for name, arr in root[node].arrays():
        out[name] = arr[...]
    for name, _group in root[node].groups():
        out |= {f"{name}/{k}": v for k, v in _arrays(run, f"{node}/{name}").items()}
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), f"{name} differs"


def test_sample_on_ray_equals_a_local_run_even_when_an_actor_is_killed(ray_cluster, tmp_path, photos):
    from atlas.sample import sample

    kwargs = {"weights": WEIGHTS, "max_images": N_PHOTOS, "shard_size": SHARD, "batch_size": SHARD, "workers": 0, "progress": False}
    local = sample(photos, [LAYER], tmp_path / "local", **kwargs)
    engine = Engine("ray")
    found: dict = {}
    killer = _kill_when(ray_cluster, actor_name("sample", 1), _Flags(tmp_path / "ray", "images/shard_done"), found)
    result = sample(photos, [LAYER], tmp_path / "ray", engine=engine, **kwargs)
    killer.join(5)
    assert found.get("killed") and found["pending"] >= 1, "the actor was not killed while shards were still to do"
    assert engine.last.actors == 2 and engine.last.units == N_PHOTOS // SHARD
    assert engine.last.restarts >= 1, "the killed actor's units were not computed again by its restarted process"
    assert result.n_samples == local.n_samples and result.n_skipped == local.n_skipped
    for node in ("images", f"samples/{LAYER}"):
        _assert_same(_arrays(tmp_path / "local", node), _arrays(tmp_path / "ray", node))
    assert "attributions" in _arrays(tmp_path / "ray", f"samples/{LAYER}")
    store.verify(store.open_store(tmp_path / "ray"), ["images", f"samples/{LAYER}"])  # sealed like a local run
    assert "sample on Ray: 4 units on 2 Ray actors" in (tmp_path / "ray" / "log.txt").read_text()
    # Resumable as locally: everything is done, so a second Ray run computes nothing and changes nothing.
    before = _arrays(tmp_path / "ray", f"samples/{LAYER}")
    again = sample(photos, [LAYER], tmp_path / "ray", engine=engine, **kwargs)
    assert again.images_per_second == 0.0
    _assert_same(before, _arrays(tmp_path / "ray", f"samples/{LAYER}"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    require_shared()
    from conftest import PHOTOS

    return build_tiny(tmp_path_factory, PHOTOS)


def test_render_on_ray_equals_a_local_run_even_when_an_actor_is_killed(ray_cluster, tiny, tmp_path):
    from atlas.render import render

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    local_run, ray_run = copy_run(tiny, tmp_path / "a"), copy_run(tiny, tmp_path / "b")
    # seed 1: other icons than the tiny build's (seed 0), so every cell is rendered; batches of 2 cells: 7 units
    kwargs = {"quality": "draft", "steps": 4, "size": 16, "batch": 2, "seed": 1, "progress": False}
    local = render(local_run, LAYER, [4], **kwargs)[4]
    engine = Engine("ray")
    found: dict = {}
    killer = _kill_when(ray_cluster, actor_name("render-4", 1), _Flags(ray_run, f"icons/{LAYER}/full/4/done"), found)
    summary = render(ray_run, LAYER, [4], engine=engine, **kwargs)[4]
    killer.join(5)
    assert found.get("killed"), "the actor was not killed while cells were still to do"
    assert engine.last.restarts >= 1 and engine.last.actors == 2
    assert summary["n_done"] == local["n_done"] == local["n_render"] and summary["rendered_now"] == local["rendered_now"]
    _assert_same(_arrays(local_run, f"icons/{LAYER}/full/4"), _arrays(ray_run, f"icons/{LAYER}/full/4"))
    store.verify(store.open_store(ray_run), [f"icons/{LAYER}/full/4"])
    # The command line takes the same path: resumed on Ray, nothing is left to render and nothing changes.
    before = _arrays(ray_run, f"icons/{LAYER}/full/4")
    again = cli("render", ray_run, "--layer", LAYER, "--grid", "4", "--quality", "draft", "--steps", "4", "--size", "16",
                "--batch", "2", "--seed", "1", "--engine", "ray")
    assert again.returncode == 0 and f"{local['n_render']}/{local['n_render']} icons (0 new" in again.stdout, again.stderr
    _assert_same(before, _arrays(ray_run, f"icons/{LAYER}/full/4"))


def _cli(*args: str, hide_ray: bool = False) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (no Ray session of this one); ``hide_ray``: as if Ray were not installed."""
    code = ("import sys\n" + ("sys.modules['ray'] = None\n" if hide_ray else "") +
            "from atlas.cli import main\nsys.argv = ['atlas', *sys.argv[1:]]\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_engine_ray_without_ray_installed_is_one_line(tmp_path, photos):
    out = tmp_path / "run"
    result = _cli("sample", "--images", str(photos), "--layer", LAYER, "--out", str(out), "--engine", "ray", hide_ray=True)
    one_line(result, "--engine ray needs Ray", "pip install 'atlas[ray]'")
    assert not out.exists()
    result = _cli("render", str(out), "--layer", LAYER, "--grid", "4", "--engine", "ray", hide_ray=True)
    one_line(result, "pip install 'atlas[ray]'")


def test_an_unreachable_or_wrong_ray_address_is_one_line(tmp_path, photos):
    _require_ray()
    out = tmp_path / "run"
    refused = _cli("sample", "--images", str(photos), "--layer", LAYER, "--out", str(out), "--engine", "ray",
                   "--ray-address", "127.0.0.1:1")
    one_line(refused, "cannot reach the Ray cluster at 127.0.0.1:1")
    # Something listens but is not Ray (no gRPC answer): bounded by the connect timeout, not a hang.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        start = time.monotonic()
        result = _cli("build", "--images", str(photos), "--out", str(out), "--engine", "ray", "--ray-address", address)
        one_line(result, f"cannot reach the Ray cluster at {address}", "no answer within 5 s")
        assert time.monotonic() - start < 60
    finally:
        silent.close()
    one_line(_cli("render", str(out), "--layer", LAYER, "--grid", "4", "--engine", "ray", "--ray-address", "nowhere"),
             "ray_address must be auto, HOST:PORT or ray://HOST:PORT")
    one_line(_cli("render", str(out), "--layer", LAYER, "--grid", "4", "--engine", "spark"), "engine must be one of local, ray")
    assert not out.exists()


def test_the_unit_lens_top_k_pass_on_ray_equals_a_local_pass(ray_cluster, tiny, tmp_path):
    from atlas.units.topk import top_examples

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    local_run, ray_run = copy_run(tiny, tmp_path / "a"), copy_run(tiny, tmp_path / "b")
    kwargs = {"k": 3, "channels": "0-15", "batch_size": 4, "workers": 0, "progress": False}
    top_examples(local_run, [LAYER], **kwargs)
    engine = Engine("ray")
    summary = top_examples(ray_run, [LAYER], engine=engine, **kwargs)[LAYER]
    assert summary["channels"] == 16 and summary["shards_computed"] == engine.last.units == 1
    _assert_same(_arrays(local_run, f"units/{LAYER}/top"), _arrays(ray_run, f"units/{LAYER}/top"))
    assert "units top-k on Ray: 1 units on 1 Ray actors" in (ray_run / "log.txt").read_text()
