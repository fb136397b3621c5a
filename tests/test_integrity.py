"""Nothing silently wrong, nothing lost: the store's freshness records, integrity seals, atomic creation, one writer,
and environment faults (read-only folder, full disk), each through the real command line.

One tiny run (8 photos x 4 positions, no attribution, a t-SNE layout, one 4x4 grid, 16 px draft icons) is built once
and copied for every test that damages or interrupts it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import WEIGHTS
from tiny_run import LAYER, build_tiny, copy_run, tiny_config
from tiny_run import cli as _cli
from tiny_run import one_line as _one_line
from tiny_run import snapshot as _snapshot

from atlas import store
from atlas.build import build, load_config, merge
from atlas.errors import AtlasError


def _atlas(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kwargs)


def _popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from atlas.cli import main; main()", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _config(cfg: Path, images: Path, out: Path, **tables) -> dict:
    config = merge(load_config(cfg), {"run": {"images": str(images), "out": str(out)}})
    return merge(config, tables) if tables else config


def _chunk(run: Path, array: str, key: str = "0/0") -> Path:
    path = run / store.STORE_NAME / array / "c" / key
    assert path.is_file(), f"{path} not written"
    return path


def _current(run: Path) -> set[str]:
    """Stages the build records as complete (invalidated ones keep only a tombstone without a key)."""
    return {stage for stage, record in _ledger(run)["records"].items() if "key" in record}


def _ledger(run: Path) -> dict:
    try:
        return store.read_ledger(run)
    except AtlasError:  # read while being replaced: try again
        return {"records": {}, "seals": {}, "writing": {}}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory, cfg, photo_list) -> Path:
    """A finished tiny run (every stage recorded), never modified by the tests."""
    return build_tiny(tmp_path_factory, photo_list, cfg)


@pytest.fixture
def run(base, tmp_path) -> Path:
    return copy_run(base, tmp_path)


# ----------------------------------------------------------------------------- integrity


def test_finished_run_is_sealed_and_all_fill_chunks_are_not_missing(base):
    ledger = store.read_ledger(base)
    assert _current(base) == {"sample", "project", "grid", "render", "tiles"} and not ledger["writing"]
    for array in (f"samples/{LAYER}/activations", f"layouts/{LAYER}/full/xy", f"grids/{LAYER}/full/4/mean_activation",
                  f"icons/{LAYER}/full/4/images"):
        assert ledger["seals"][array]["chunks"], array
    # Without attribution every top-5 entry is -1, the fill value: zarr writes no chunk at all, and that is not "missing".
    assert not (base / store.STORE_NAME / "images/top5/c").exists() and ledger["seals"]["images/top5"]["chunks"] == {}
    store.verify(base, ["images", "samples", "layouts", "grids", "whitening", "icons"])
    for stage in store.STAGE_ORDER:
        assert store.stage_status(base, stage, ledger["records"][stage]["key"]) is None


DAMAGE = [  # (array, how, command, what the line must say)
    (f"samples/{LAYER}/activations", "delete", ["project", "{run}", "--layer", LAYER, "--method", "pca"],
     ["chunk 0.0 missing", "re-run `atlas sample`"]),
    (f"layouts/{LAYER}/full/xy", "truncate", ["grid", "{run}", "--layer", LAYER, "--grid", "4"],
     ["truncated", "re-run `atlas project`"]),
    (f"grids/{LAYER}/full/4/mean_activation", "delete", ["render", "{run}", "--layer", LAYER, "--grid", "4", "--steps", "4"],
     ["chunk 0.0.0 missing", "re-run `atlas grid`"]),
    (f"icons/{LAYER}/full/4/images", "truncate", ["tiles", "{run}", "--layer", LAYER, "--no-examples"],
     ["truncated", "re-run `atlas render`"]),
    (f"icons/{LAYER}/full/4/images", "garble", ["tiles", "{run}", "--layer", LAYER, "--no-examples"],
     ["changed (crc32 differs)", "re-run `atlas render`"]),
]


@pytest.mark.parametrize(("array", "how", "command", "words"), DAMAGE, ids=[f"{d[0].split('/')[0]}-{d[1]}" for d in DAMAGE])
def test_damaged_chunk_is_one_line_naming_the_array_and_the_stage(run, array, how, command, words):
    key = {f"grids/{LAYER}/full/4/mean_activation": "0/0/0", f"icons/{LAYER}/full/4/images": "1/0/0/0/0"}.get(array, "0/0")
    chunk = _chunk(run, array, key)
    if how == "delete":
        chunk.unlink()
    elif how == "truncate":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    else:  # same size, other bytes
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    before = _snapshot(run)
    line = _one_line(_cli(*[c.format(run=run) for c in command]), f"{array} is damaged", *words)
    assert str(run) in line
    assert _snapshot(run) == before  # nothing was touched


def test_build_repairs_damaged_samples_and_icons_to_the_uninterrupted_result(run, base, cfg, photo_list):
    _chunk(run, f"samples/{LAYER}/activations", "0/0").unlink()
    _chunk(run, f"icons/{LAYER}/full/4/images", "2/0/0/0/0").unlink()
    lines: list[str] = []
    result = build(_config(cfg, photo_list, run), echo=lines.append)
    assert result.ran == ["sample", "project", "grid", "render", "tiles"], lines
    assert any("damaged" in line for line in lines if line.startswith("[1/5] sample"))
    a, b = zarr.open_group(run / store.STORE_NAME, mode="r"), zarr.open_group(base / store.STORE_NAME, mode="r")
    for name in (f"samples/{LAYER}/activations", f"samples/{LAYER}/valid", f"layouts/{LAYER}/full/xy",
                 f"grids/{LAYER}/full/4/count", f"icons/{LAYER}/full/4/images"):
        assert np.array_equal(a[name][...], b[name][...]), name
    again = build(_config(cfg, photo_list, run), echo=lambda *_: None)
    assert again.ran == []


@pytest.mark.parametrize("node", ["", f"samples/{LAYER}/activations/", f"layouts/{LAYER}/full/xy/", "ledger/"])
def test_garbage_zarr_json_is_one_line(run, node):
    (run / store.STORE_NAME / node / "zarr.json").write_bytes(b"\x00garbage{")
    before = _snapshot(run)
    line = _one_line(_cli("grid", run, "--layer", LAYER, "--grid", "4"), "damaged")
    assert f"{store.STORE_NAME}/{node}".rstrip("/") in line
    assert _snapshot(run) == before
    # `atlas info` reads every node's metadata: the same kind of line (through the real entry point once).
    _one_line(_atlas("info", run) if node == "" else _cli("info", run), "damaged")


def test_store_swapped_for_an_empty_folder_is_one_line(run, photo_list):
    shutil.rmtree(run / store.STORE_NAME)
    (run / store.STORE_NAME).mkdir()
    for args in (["project", run, "--layer", LAYER], ["info", run],
                 ["sample", "--images", photo_list, "--layer", LAYER, "--out", run, "--weights", WEIGHTS, "--max-images", "8",
                  "--per-image", "4", "--no-attribution", "--workers", "0"]):
        _one_line(_cli(*args), "is not an atlas store")
    assert not any((run / store.STORE_NAME).iterdir())


# ----------------------------------------------------------------------------- freshness


def test_stage_command_invalidates_build_records(run, cfg, photo_list):
    assert _cli("project", run, "--layer", LAYER, "--method", "pca").returncode == 0
    assert _current(run) == {"sample"}  # project and everything after it are no longer current
    assert _ledger(run)["records"]["grid"] == {"invalidated_by": "project", "at": _ledger(run)["records"]["grid"]["at"]}
    lines: list[str] = []
    result = build(_config(cfg, photo_list, run), echo=lines.append)
    assert result.skipped == ["sample"] and result.ran == ["project", "grid", "render", "tiles"], lines
    assert any(line.startswith("[3/5] grid (its input was rewritten since, by `atlas project`;") for line in lines), lines
    root = zarr.open_group(run / store.STORE_NAME, mode="r")
    layout = root[f"layouts/{LAYER}/full"].attrs
    assert layout["method"] == "tsne"
    assert root[f"grids/{LAYER}/full/4"].attrs["layout_id"] == layout["layout_id"]
    assert json.loads((run / "tiles" / LAYER / "full" / "atlas.json").read_text())["method"] == "tsne"


def test_killed_build_with_changed_settings_is_redone(run, base, cfg, photo_list):
    """A build with another projection killed after it rewrote the layout: the original build must not say "up to date"."""
    proc = _popen("build", "--config", cfg, "--images", photo_list, "--out", run, "--method", "pca")
    layout = run / store.STORE_NAME / "layouts" / LAYER / "full" / "zarr.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(layout.read_bytes())["attributes"].get("method") == "pca":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "project" not in _current(run)
    result = build(_config(cfg, photo_list, run), echo=lambda *_: None)
    assert result.skipped == ["sample"] and result.ran == ["project", "grid", "render", "tiles"]
    a, b = zarr.open_group(run / store.STORE_NAME, mode="r"), zarr.open_group(base / store.STORE_NAME, mode="r")
    for name in (f"layouts/{LAYER}/full/xy", f"grids/{LAYER}/full/4/count", f"icons/{LAYER}/full/4/images"):
        assert np.array_equal(a[name][...], b[name][...]), name


def _kill_when_writing(args: list, run: Path, node: str, tries: int = 4) -> bool:
    """Start ``args`` and SIGKILL it as soon as the ledger marks ``node`` as being written; retried a few times
    because small stages write for only milliseconds. True when a kill landed inside the window."""
    for _ in range(tries):
        proc = _popen(*args)
        while proc.poll() is None:
            if node in _ledger(run)["writing"]:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return node in _ledger(run)["writing"]
            time.sleep(0.0005)
        proc.wait()
    return False


STAGE_KILLS = [  # (stage, command, node it writes, a later command that reads it)
    ("project", ["project", "{run}", "--layer", LAYER, "--method", "tsne"], f"layouts/{LAYER}/full",
     ["grid", "{run}", "--layer", LAYER, "--grid", "4", "--min-count", "1"]),
    ("grid", ["grid", "{run}", "--layer", LAYER, "--grid", "4", "--min-count", "1"], f"grids/{LAYER}/full/4",
     ["render", "{run}", "--layer", LAYER, "--grid", "4", "--quality", "draft", "--steps", "4", "--size", "16"]),
    ("render", ["render", "{run}", "--layer", LAYER, "--grid", "4", "--quality", "draft", "--steps", "4", "--size", "16"],
     f"icons/{LAYER}/full/4", ["tiles", "{run}", "--layer", LAYER, "--no-examples"]),
]


@pytest.mark.parametrize(("stage", "command", "node", "reader"), STAGE_KILLS, ids=[s[0] for s in STAGE_KILLS])
def test_sigkill_mid_stage_then_rerun_gives_the_uninterrupted_result(run, base, stage, command, node, reader):
    args = [c.format(run=run) for c in command]
    if not _kill_when_writing(args, run, node):
        pytest.skip(f"`atlas {stage}` finished every time before it could be killed inside its write window")
    _one_line(_cli(*[c.format(run=run) for c in reader]), "is incomplete", f"re-run `atlas {stage}`")
    assert stage not in _current(run)
    assert _cli(*args).returncode == 0
    a, b = zarr.open_group(run / store.STORE_NAME, mode="r"), zarr.open_group(base / store.STORE_NAME, mode="r")
    for name in {"project": [f"layouts/{LAYER}/full/xy"], "grid": [f"grids/{LAYER}/full/4/mean_activation"],
                 "render": [f"icons/{LAYER}/full/4/images", f"icons/{LAYER}/full/4/done"]}[stage]:
        assert np.array_equal(a[name][...], b[name][...]), name
    # No "up to date" lie: the build would redo this stage and every later one (their records are gone).
    key = store.read_ledger(base)["records"][stage]["key"]
    assert store.stage_status(run, stage, key) is not None
    assert not {stage, "tiles"} & _current(run)


def test_sigkill_mid_tiles_then_rerun(run, base):
    args = ["tiles", run, "--layer", LAYER, "--no-examples"]
    work = run / "tiles" / LAYER / "full.partial"
    for _ in range(6):
        proc = _popen(*args)
        while proc.poll() is None and not work.exists():
            time.sleep(0.0005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        proc.wait()
    assert _cli(*args).returncode == 0
    assert not work.exists() and not (run / "tiles" / LAYER / "full.old").exists()
    assert _snapshot(run / "tiles" / LAYER / "full") == _snapshot(base / "tiles" / LAYER / "full")


# ----------------------------------------------------------------------------- creation, leftovers


def test_sigkill_while_creating_the_store_leaves_nothing_or_a_resumable_store(photo_list, tmp_path):
    args = ["sample", "--images", photo_list, "--layer", LAYER, "--layer", "mixed5b", "--weights", WEIGHTS, "--max-images", "4",
            "--per-image", "2", "--no-attribution", "--workers", "0", "--shard-size", "2"]
    killed = tmp_path / "killed"
    caught = False
    for _ in range(4):  # kill right after the partial store appears
        proc = _popen(*args, "--out", killed)
        while proc.poll() is None and not list(killed.glob(store.PARTIAL_STORE + "*")):
            time.sleep(0.0005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            caught = True
            break
        shutil.rmtree(killed)
    assert caught, "the sampler never showed its partial store"
    assert not (killed / store.STORE_NAME).exists() or (killed / store.STORE_NAME / "zarr.json").is_file()
    proc = _popen(*args, "--out", killed)  # and once more at a random moment of the start-up, creation or first shard
    time.sleep(random.Random(0).uniform(0.5, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _cli(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(killed.glob(store.PARTIAL_STORE + "*"))
    assert _cli(*args, "--out", tmp_path / "whole").returncode == 0
    a = zarr.open_group(killed / store.STORE_NAME, mode="r")
    b = zarr.open_group(tmp_path / "whole" / store.STORE_NAME, mode="r")
    for layer in (LAYER, "mixed5b"):
        for name in ("activations", "image_index", "position", "valid"):
            assert np.array_equal(a[f"samples/{layer}/{name}"][:], b[f"samples/{layer}/{name}"][:]), name


def test_stray_partial_files_are_cleaned_up_on_resume(run, base):
    (run / f"{store.PARTIAL_STORE}999").mkdir()
    (run / f"{store.PARTIAL_STORE}999" / "zarr.json").write_text("{}")
    strays = [run / store.STORE_NAME / f"samples/{LAYER}/activations/c/0/0.1234abcd.partial",
              run / store.STORE_NAME / "ledger" / "zarr.json.77.partial", run / "tiles" / "atlases.tmp"]
    for path in strays:
        path.write_bytes(b"half a write")
    (run / "tiles" / LAYER / "full.partial").mkdir()
    os.replace(run / "tiles" / LAYER / "full", run / "tiles" / LAYER / "full.old")  # killed between the two renames
    result = _cli("grid", run, "--layer", LAYER, "--grid", "4", "--min-count", "1")
    assert result.returncode == 0, result.stderr
    assert not list(run.glob(store.PARTIAL_STORE + "*")) and not any(p.exists() for p in strays)
    assert not (run / "tiles" / LAYER / "full.partial").exists() and not (run / "tiles" / LAYER / "full.old").exists()
    assert _snapshot(run / "tiles" / LAYER / "full") == _snapshot(base / "tiles" / LAYER / "full")


# ----------------------------------------------------------------------------- one writer


def test_second_writer_gets_one_line_naming_the_holder(run):
    proc = _popen("render", run, "--layer", LAYER, "--grid", "4", "--steps", "4000", "--size", "16", "--seed", "1")
    try:
        lock = run / store.LOCK_NAME
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and lock.read_text().strip() != f"pid {proc.pid}":
            time.sleep(0.05)
        assert proc.poll() is None
        before = _snapshot(run / store.STORE_NAME / "layouts")
        _one_line(_cli("project", run, "--layer", LAYER, "--method", "pca"), f"pid {proc.pid}", "another atlas process")
        assert _snapshot(run / store.STORE_NAME / "layouts") == before
        assert _cli("info", run).returncode == 0  # readers need no lock
    finally:
        proc.kill()
        proc.wait()
    assert _cli("grid", run, "--layer", LAYER, "--grid", "4", "--min-count", "1").returncode == 0  # the lock died with its holder


# ----------------------------------------------------------------------------- environment faults


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_read_only_run_folder_is_one_line(run, tmp_path):
    view = tmp_path / "ro"
    view.mkdir()
    if not _mount("--bind", "-o", "ro", str(run), str(view)):
        pytest.skip("cannot mount a read-only bind (needs root); chmod alone does not stop root from writing")
    try:
        before = _snapshot(view)
        _one_line(_cli("project", view, "--layer", LAYER, "--method", "pca"), "read-only", str(view))
        _one_line(_cli("tiles", view, "--layer", LAYER, "--no-examples"), "read-only")
        assert _snapshot(view) == before
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)


def test_full_disk_is_one_line_saying_which_folder(base, tmp_path, photo_list):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a small tmpfs (needs root)")
    try:
        run = disk / "run"
        shutil.copytree(base, run, symlinks=True)
        before = _snapshot(run)
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last byte, then free a little: tiles fail mid-way
            for block in (65536, 1):
                with contextlib.suppress(OSError):
                    while f.write(b"\0" * block):
                        pass
        os.truncate(disk / "filler", (disk / "filler").stat().st_size - (12 << 10))
        line = _one_line(_cli("tiles", run, "--layer", LAYER, "--no-examples"), "no space left")
        assert str(run) in line
        after = _snapshot(run)
        # Only the unfinished tiles were left aside (and the ledger no longer calls the tiles current).
        assert {k: v for k, v in after.items() if ".partial" not in k and "ledger" not in k} == \
            {k: v for k, v in before.items() if "ledger" not in k}
        line = _one_line(_cli("sample", "--images", photo_list, "--layer", LAYER, "--out", disk / "new", "--weights", WEIGHTS,
                                "--max-images", "2", "--no-attribution", "--workers", "0"), "no space left")
        assert str(disk / "new") in line
        assert not (disk / "new" / store.STORE_NAME).exists() and not list((disk / "new").glob(store.PARTIAL_STORE + "*"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_fault_lines_name_the_folder_or_file():
    """Permission errors cannot be provoked as root (tests run as root here), so their line is checked directly."""
    import errno

    assert store.describe_fault(PermissionError(errno.EACCES, "Permission denied", "/runs/a/store.zarr/x")) == \
        "permission denied: /runs/a/store.zarr/x; check its permissions (or choose another --out)"
    assert "while writing into /runs/a/tiles:" in store.describe_fault(OSError(errno.ENOSPC, "No space", "/runs/a/tiles/t.jpg"))
    assert "cannot write to /runs/b (read-only" in store.describe_fault(OSError(errno.EROFS, "Read-only"), "/runs/b")


def test_a_build_killed_in_one_stage_then_again_while_resuming_ends_as_the_uninterrupted_build(base, cfg, photo_list, tmp_path):
    """SIGKILL at several offsets of one `atlas build` — while sampling, then while the resumed build lays out, then
    while the next resume renders — and a last run: every array equals the uninterrupted build's."""
    run = tmp_path / "run"
    args = ["build", "--config", cfg, "--images", photo_list, "--out", run]
    kills = []
    for node in (f"samples/{LAYER}", f"layouts/{LAYER}/full", f"icons/{LAYER}/full/4"):
        kills.append(_kill_when_writing(args, run, node))
    assert kills[0], "the first build finished sampling before it could be killed"
    assert _cli(*args).returncode == 0
    assert {"sample", "project", "grid", "render", "tiles"} <= _current(run)
    a, b = zarr.open_group(run / store.STORE_NAME, mode="r"), zarr.open_group(base / store.STORE_NAME, mode="r")
    names = [f"samples/{LAYER}/{n}" for n in ("activations", "position", "image_index", "valid")] + [
        "images/ok", f"layouts/{LAYER}/full/xy", f"grids/{LAYER}/full/4/mean_activation", f"grids/{LAYER}/full/4/count",
        f"icons/{LAYER}/full/4/images", f"icons/{LAYER}/full/4/done"]
    for name in names:
        assert np.array_equal(a[name][...], b[name][...]), (name, kills)
