"""Sample and render on Ray (issue 17): the store a local Ray cluster writes equals a local run's, bit for bit,
even when a worker actor is killed in the middle; `atlas build --engine ray` end to end; bad engines, addresses and
object-storage URLs are one line; a finished run copied to object storage reads the same through zarr's fsspec store.

One local Ray cluster (``ray.init(num_cpus=2)``) runs in this test process for the whole module and is shut down
after it. The sample comparison is the issue's: 64 shared photos with attribution (8 shards of 8, so the kill lands
with shards still to do), one local run and one Ray run.
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
from conftest import PHOTOS, REPO, WEIGHTS, require_shared
from tiny_run import CONFIG, LAYER, build_tiny, cli, cli_process, copy_run, one_line, snapshot

from atlas import store
from atlas.engine import NAMESPACE, Engine, actor_name, probe
from atlas.errors import AtlasError

N_PHOTOS = 64
SHARD = 8
SAMPLE = {"weights": WEIGHTS, "max_images": N_PHOTOS, "shard_size": SHARD, "batch_size": SHARD, "workers": 0, "progress": False}


def _require_ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray is not installed (make test installs the 'ray' extra)")
        pytest.skip("Ray is not installed: pip install 'activation-atlas[ray]'")
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


def _arrays(run, node: str, root=None) -> dict[str, np.ndarray]:
    """Every array under ``node`` of the run's store (or of the zarr group ``root``), by path."""
    root = store.open_store(run) if root is None else root
    out = {}
    for name, arr in root[node].arrays():
        out[name] = arr[...]
    for name, _group in root[node].groups():
        out |= {f"{name}/{k}": v for k, v in _arrays(run, f"{node}/{name}", root).items()}
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), f"{name} differs"


@pytest.fixture(scope="module")
def local_sample(tmp_path_factory):
    """One local run of the 64 photos with attribution (the reference every Ray run of them is compared with)."""
    require_shared()
    from atlas.sample import sample

    out = tmp_path_factory.mktemp("local64") / "run"
    return out, sample(PHOTOS, [LAYER], out, **SAMPLE)


def test_sample_of_64_photos_on_ray_equals_a_local_run_even_when_an_actor_is_killed(ray_cluster, local_sample, tmp_path):
    from atlas.sample import sample

    local_run, local = local_sample
    engine = Engine("ray")
    found: dict = {}
    killer = _kill_when(ray_cluster, actor_name("sample", 1), _Flags(tmp_path / "ray", "images/shard_done"), found)
    result = sample(PHOTOS, [LAYER], tmp_path / "ray", engine=engine, **SAMPLE)
    killer.join(5)
    assert found.get("killed") and found["pending"] >= 1, "the actor was not killed while shards were still to do"
    assert engine.last.actors == 2 and engine.last.units == N_PHOTOS // SHARD
    assert engine.last.restarts >= 1, "the killed actor's units were not computed again by its restarted process"
    assert result.n_images == local.n_images == N_PHOTOS and result.n_samples == local.n_samples and result.n_skipped == local.n_skipped
    for node in ("images", f"samples/{LAYER}"):
        _assert_same(_arrays(local_run, node), _arrays(tmp_path / "ray", node))
    ray_samples = _arrays(tmp_path / "ray", f"samples/{LAYER}")
    assert ray_samples["attributions"].shape[0] == N_PHOTOS and np.isfinite(ray_samples["attributions"]).all()
    assert np.abs(ray_samples["attributions"]).max() > 0  # real attributions, not the fill value
    store.verify(store.open_store(tmp_path / "ray"), ["images", f"samples/{LAYER}"])  # sealed like a local run
    assert f"sample on Ray: {N_PHOTOS // SHARD} units on 2 Ray actors" in (tmp_path / "ray" / "log.txt").read_text()
    # Resumable as locally: everything is done, so a second Ray run computes nothing (Ray is not even started) and
    # changes nothing.
    again = sample(PHOTOS, [LAYER], tmp_path / "ray", engine=engine, **SAMPLE)
    assert again.images_per_second == 0.0 and engine.last.units == 0
    _assert_same(ray_samples, _arrays(tmp_path / "ray", f"samples/{LAYER}"))


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


def _cli(*args: str, hide_ray: bool = False, cwd=REPO) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (no Ray session of this one); ``hide_ray``: as if Ray were not installed."""
    code = ("import sys\n" + ("sys.modules['ray'] = None\n" if hide_ray else "") +
            "from atlas.cli import main\nsys.argv = ['atlas', *sys.argv[1:]]\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_actors_set_their_environment_before_torch_loads(ray_cluster):
    """The actors' environment takes effect: torch is not yet imported when an actor sets it (the stage's factory is
    imported after), 2 one-core actors with 2 threads each sleep at OpenMP barriers, an actor with both cores keeps
    OpenMP's default, and every actor runs the driver's thread count."""
    import torch

    for engine, policy in ((Engine("ray", workers=2), "PASSIVE"), (Engine("ray", cpus=2), None)):
        with engine.session():
            seen = probe(engine)
        assert len(seen) == engine.last.actors == (2 if policy else 1)
        assert len({row["pid"] for row in seen}) == len(seen)
        for row in seen:
            assert row["torch_first"] is False and row["threads"] == torch.get_num_threads()
            assert row["omp_wait_policy"] == policy
    with pytest.raises(AtlasError, match="module-level function"):  # an actor could not import it by name
        list(Engine("ray").map(lambda: (lambda unit: unit), (), [1], "probe"))


def test_engine_ray_without_ray_installed_is_one_line(tmp_path, photos):
    out = tmp_path / "run"
    result = _cli("sample", "--images", str(photos), "--layer", LAYER, "--out", str(out), "--engine", "ray", hide_ray=True)
    one_line(result, "--engine ray needs Ray", "pip install 'activation-atlas[ray]'")
    assert not out.exists()
    result = _cli("render", str(out), "--layer", LAYER, "--grid", "4", "--engine", "ray", hide_ray=True)
    one_line(result, "pip install 'activation-atlas[ray]'")


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


def test_atlas_build_on_ray_equals_a_local_build_then_is_up_to_date(ray_cluster, tiny, tmp_path):
    """`atlas build --engine ray` in a fresh process, joining this module's Ray cluster by its address (--ray-address
    HOST:PORT), against the tiny build made locally with the same config: samples bit for bit, icons equal (same
    seeds, same precision); a second build skips every stage without starting Ray."""
    address = ray_cluster.get_runtime_context().gcs_address
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    args = ("build", "--config", cfg, "--images", PHOTOS, "--out", out, "--engine", "ray", "--ray-address", address)
    first = cli_process(*args)
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    assert "ran: sample, project, grid, render, tiles" in first.stdout, first.stdout
    for node in ("images", f"samples/{LAYER}", f"layouts/{LAYER}/full", f"grids/{LAYER}/full/4", f"icons/{LAYER}/full/4"):
        _assert_same(_arrays(tiny, node), _arrays(out, node))
    assert _arrays(out, f"icons/{LAYER}/full/4")["done"].sum() == _arrays(out, f"grids/{LAYER}/full/4")["render"].sum() > 0
    log = (out / "log.txt").read_text()
    assert "sample on Ray: 1 units on 1 Ray actors (0 restarted)" in log and f"render {LAYER}/full/4 on Ray: " in log
    before = snapshot(store.store_path(out))
    again = cli_process(*args)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert again.stdout.count("up to date, skipped") == 5 and "ran: nothing" in again.stdout, again.stdout
    assert snapshot(store.store_path(out)) == before


def test_an_object_storage_url_as_the_run_folder_is_one_line(tmp_path, photos):
    """`--out s3://bucket/run` would otherwise be a local folder named `s3:` (and exit 0): one line, nothing created."""
    for command in (["sample", "--images", str(photos), "--layer", LAYER], ["build", "--images", str(photos), "--engine", "ray"]):
        result = _cli(*command, "--out", "s3://atlas-bucket/run", cwd=tmp_path)
        one_line(result, "is a URL: atlas writes a run to a folder", "copy it to the bucket afterwards")
    # A stage reading a run finds no run there (it reads only folders): one line as well.
    one_line(_cli("render", "gs://atlas-bucket/run", "--layer", LAYER, "--grid", "4", cwd=tmp_path), "no atlas run in gs:/atlas-bucket/run")
    assert not list(tmp_path.iterdir())


def test_a_finished_run_copied_to_object_storage_reads_the_same_through_zarrs_fsspec_store(tiny):
    """What docs/ray.md promises for object storage: a run built in a folder and copied to a bucket is a zarr v3 store
    that zarr's FsspecStore reads back array for array (fsspec's in-memory file system stands in for s3fs/gcsfs: the
    same fsspec interface; no real bucket is reachable from here)."""
    import fsspec
    import zarr

    fs = fsspec.filesystem("memory")
    fs.put(str(store.store_path(tiny)), "/atlas-bucket/run/store.zarr", recursive=True)
    try:
        remote = zarr.open_group(store=zarr.storage.FsspecStore.from_url("memory://atlas-bucket/run/store.zarr", read_only=True),
                                 mode="r")
        local = store.open_store(tiny)
        assert dict(remote.attrs) == dict(local.attrs)
        for node in ("images", f"samples/{LAYER}", f"layouts/{LAYER}", f"grids/{LAYER}", f"icons/{LAYER}"):
            mine, theirs = _arrays(tiny, node), _arrays(None, node, remote)
            assert mine, node
            _assert_same(mine, theirs)
    finally:
        fs.rm("/atlas-bucket", recursive=True)
