"""What a fault audit found of medium harm: `atlas serve` and `atlas build` on a read-only run, paths of this machine
under tiles/, and a symlink to itself at the top of an image folder.

Read-only runs are tested on a read-only bind mount where the machine allows one (tests run as root, for whom
``chmod a-w`` stops no write), else on a ``chmod -R a-w`` copy; either way every file under the run is compared
before and after, and no file may appear. Every server listens on 127.0.0.1 and an ephemeral port.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import WEIGHTS, serving
from tiny_run import CONFIG, LAYER, build_tiny, cli, copy_run, snapshot

from atlas.data import list_images
from atlas.viewer import STATIC, find_openseadragon


@pytest.fixture(scope="module")
def base(tmp_path_factory, photos) -> Path:
    return build_tiny(tmp_path_factory, photos)


def every_file(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` seen through a read-only bind mount (writes fail with EROFS, even for root), or, where mounting is not
    allowed, the folder itself with every write permission removed (then only the snapshot comparison guards it)."""
    mnt = folder.with_name(folder.name + "-ro")
    mnt.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(folder), str(mnt)], capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        mounted = False
    try:
        if mounted:
            with pytest.raises(OSError):  # the mount really refuses writes
                (mnt / "probe").write_text("x")
            yield mnt
        else:
            subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
            yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        else:
            subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------- serve and build on a read-only run
def test_serve_writes_nothing_and_serves_a_read_only_run(base, tmp_path):
    from websockets.sync.client import connect

    from atlas.live import unpack

    run = copy_run(base, tmp_path)
    for stale in ("viewer.js", "live.html"):  # a run tiled by another version: the pages come from the package serving it
        (run / "tiles" / stale).unlink(missing_ok=True)
    before, names = snapshot(run), every_file(run)
    with read_only(run) as ro, serving(ro, timeout=5) as server:
        port = server.server_port
        for name in ("index.html", "viewer.js", "live.html", "live.js", "live.css"):
            status, body = get(port, f"/tiles/{name}")
            assert status == 200, name
            if name != "index.html":
                assert body == (STATIC / name).read_bytes(), name
        status, body = get(port, "/tiles/openseadragon/openseadragon.min.js")
        assert status == 200 and body == (find_openseadragon() / "openseadragon.min.js").read_bytes()
        assert get(port, "/tiles/atlases.json") == (200, (run / "tiles" / "atlases.json").read_bytes())
        assert get(port, f"/tiles/{LAYER}/full/atlas.dzi")[0] == 200
        assert get(port, "/tiles/openseadragon/../../store.zarr/zarr.json")[0] == 404
        with connect(f"ws://127.0.0.1:{port}/live/ws", open_timeout=30) as ws:  # the live page computes on it too
            assert json.loads(ws.recv(timeout=120))["type"] == "status"
            assert json.loads(ws.recv(timeout=120))["type"] == "hello"
            ws.send(json.dumps({"type": "image", "index": 0}))
            kinds = set()
            while "result" not in kinds:
                message = ws.recv(timeout=120)
                kinds.add(unpack(message)[0]["type"] if isinstance(message, bytes) else json.loads(message)["type"])
                assert "error" not in kinds
    assert snapshot(run) == before and every_file(run) == names


def test_serve_on_the_command_line_on_a_read_only_run(base, tmp_path):
    """The entry point itself: it prints its URLs and serves (it died with a traceback writing live.html before)."""
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    with read_only(run) as ro:
        proc = subprocess.Popen([sys.executable, "-c", "from atlas.cli import main; main()", "serve", str(ro), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()  # blocks until the first URL (or the end of a failed start)
            assert line.startswith("atlas viewer: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
            port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
            assert get(port, "/tiles/live.html")[0] == 200
        finally:
            proc.terminate()
            proc.wait(30)
        assert "Traceback" not in proc.stderr.read()
    assert snapshot(run) == before


def test_build_on_a_finished_read_only_run_is_up_to_date(base, tmp_path, photos):
    from atlas.build import build, load_config, merge

    run = copy_run(base, tmp_path)
    before, names = snapshot(run), every_file(run)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG)
    with read_only(run) as ro:
        lines: list[str] = []
        result = build(merge(load_config(cfg), {"run": {"images": str(photos), "out": str(ro)}}), echo=lines.append)
        assert result.ran == [] and result.skipped == ["sample", "project", "grid", "render", "tiles"]
        assert sum("up to date" in line for line in lines) == 5, lines
    assert snapshot(run) == before and every_file(run) == names


def test_build_with_work_to_do_on_a_read_only_run_is_one_line(base, tmp_path, photos):
    run = copy_run(base, tmp_path)
    cfg = tmp_path / "changed.toml"
    cfg.write_text(CONFIG.replace('method = "tsne"', 'method = "pca"'))  # the layout must be redone: nothing to skip
    with read_only(run) as ro:
        if ro == run:
            pytest.skip("no read-only mount here: as root, a chmod'ed folder is still written")
        result = cli("build", "--config", cfg, "--images", photos, "--out", ro)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "read-only file system" in result.stderr and str(ro) in result.stderr


# ---------------------------------------------------------------------------- no path of this machine under tiles/
def test_nothing_under_tiles_holds_a_path_of_this_machine(base, tmp_path, photos):
    run = copy_run(base, tmp_path)
    photo = sorted(photos.glob("*.JPEG"))[3]
    assert cli("units", run, "--layer", LAYER, "--channels", "0-2", "--top-k", "2", "--patch", "16", "--kind", "fft",
               "--size", "16", "--steps", "2", "--workers", "0").returncode == 0
    inspected = cli("inspect", photo, tmp_path / "no-such-photo.jpg", "--run", run, "--no-occlusion", "--no-invariance",
                    "--layer", "conv2d0", "--atlas-layer", LAYER, "--name", "probe")
    assert inspected.returncode == 0, inspected.stderr
    report = run / "tiles" / "inspect" / "probe" / "report.json"
    assert report.is_file()
    summary = json.loads(report.read_text())
    assert summary["images"][0]["path"] == photo.name and summary["weights"] == Path(WEIGHTS).name
    assert summary["skipped"] and summary["skipped"][0]["path"] == "no-such-photo.jpg"
    forbidden = {str(run), os.path.realpath(run), str(Path(WEIGHTS).resolve()), str(WEIGHTS), str(photos),
                 os.path.realpath(photos), str(tmp_path), os.path.expanduser("~")}
    forbidden = {f for f in forbidden if f not in ("", "/")}
    leaks = []
    for path in sorted((run / "tiles").rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            leaks += [(path.relative_to(run).as_posix(), f) for f in forbidden if f.encode() in data]
    assert not leaks, leaks
    with serving(run, timeout=5) as server:  # and what the server returns of it
        status, body = get(server.server_port, "/tiles/inspect/probe/report.json")
        assert status == 200 and not any(f.encode() in body for f in forbidden)


# ---------------------------------------------------------------------------- a symlink to itself in an image folder
def test_a_self_referencing_symlink_at_the_top_of_an_image_folder(tmp_path, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in sorted(photos.glob("*.JPEG"))[:3]:
        (folder / p.name).symlink_to(p)
    (folder / "selfloop").symlink_to("selfloop")  # ln -s selfloop DIR/selfloop
    (folder / "loop.jpg").symlink_to("loop.jpg")
    sub = folder / "sub"
    sub.mkdir()
    (sub / "selfloop").symlink_to("selfloop")  # one level down: handled before as well
    found = list_images(folder)
    assert len(found) == 3
    result = cli("build", "--images", folder, "--out", tmp_path / "run", "--layer", LAYER, "--dry-run")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
