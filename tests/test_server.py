"""`atlas serve` hardened: only tiles/ is served, Host checked, idle and half-sent requests cut off, a burst of
200 parallel tile requests served at once; bad ports and a missing OpenSeadragon are one line before any work.

Every server here listens on 127.0.0.1 and an ephemeral port; every loop is bounded in count and time.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import serving
from PIL import Image
from tiles_helpers import make_tile_run
from tiny_run import one_line as assert_one_line

from atlas.errors import AtlasError
from atlas.server import make_server
from atlas.tiles import make_tiles
from atlas.viewer import find_openseadragon, split_host

LAYER = "mixed4c"
TIMEOUT = 1.5  # the servers' idle / request-head timeout in these tests (the default is 15 s)
CLI = [sys.executable, "-c", "from atlas.cli import main; main()"]


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its content: the state a failed command must leave alone."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny tiled run, plus the files that must never be served: the store, a log, links out of tiles/, a FIFO."""
    run = make_tile_run(tmp_path_factory.mktemp("server") / "run", sizes=(4, 8), icon=16)
    make_tiles(run, LAYER, examples=False)
    (run / "log.txt").write_text(f"sampled {run}/store.zarr from /home/someone/secret-photos\n")
    tiles = run / "tiles"
    (tiles / "leak-store.json").symlink_to(run / "store.zarr" / "zarr.json")
    (tiles / "leak-log.txt").symlink_to(run / "log.txt")
    (tiles / "leak-dir").symlink_to(run / "store.zarr", target_is_directory=True)
    (tiles / "inside.json").symlink_to(tiles / "atlases.json")  # a link that stays inside tiles/ is fine
    os.mkfifo(tiles / "fifo")  # opening it would block a server thread forever
    return run


@pytest.fixture(scope="module")
def server(run):
    with serving(run, timeout=TIMEOUT) as srv:
        yield srv


def raw(server, request: bytes, wait: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` exactly as given; (status, body) of the answer read until the server closes."""
    with socket.create_connection(server.server_address[:2], timeout=wait) as s:
        s.sendall(request)
        data = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def get(server, path: str, host: str | None = None) -> tuple[int, bytes]:
    host = f"127.0.0.1:{server.server_port}" if host is None else host
    return raw(server, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), or None if it is still open after ``seconds``."""
    start = time.monotonic()
    while (left := seconds - (time.monotonic() - start)) > 0:
        if select.select([sock], [], [], left)[0]:
            try:
                if sock.recv(1024) == b"":
                    return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
    return None


# ---------------------------------------------------------------------------- what is served
def test_tiles_and_viewer_are_served(server, run):
    status, body = get(server, "/tiles/atlases.json")
    assert status == 200 and body == (run / "tiles" / "atlases.json").read_bytes()
    assert get(server, "/tiles/index.html")[0] == 200
    assert get(server, "/tiles/openseadragon/openseadragon.min.js")[0] == 200
    assert get(server, f"/tiles/{LAYER}/full/atlas.dzi")[0] == 200
    assert get(server, "/tiles/inside.json") == (200, body)
    assert get(server, "/")[0] == 302 and get(server, "/tiles")[0] == 302


@pytest.mark.parametrize("path", [
    "/store.zarr/zarr.json", "/store.zarr", "/store.zarr/", "/log.txt",
    "/../store.zarr/zarr.json", "/tiles/../store.zarr/zarr.json", "/tiles/../log.txt",
    "/%2e%2e/store.zarr/zarr.json", "/tiles/%2e%2e/log.txt", "/tiles/%2E%2E%2Flog.txt", "/tiles/..%2flog.txt",
    "/tiles/..\\log.txt", "/tiles/%5c..%5clog.txt", "/tiles/%252e%252e/log.txt", "//log.txt", "/tiles//../log.txt",
    "/tiles/leak-store.json", "/tiles/leak-log.txt", "/tiles/leak-dir/zarr.json", "/tiles/leak-dir/",
    "/tiles/fifo", "/tiles/%00/../log.txt", f"/tiles/{LAYER}/", "/tiles/no-such-file.json",
    "http://127.0.0.1/log.txt",
])
def test_nothing_outside_tiles_is_served(server, run, path):
    status, body = get(server, path)
    assert status == 404, (path, status)
    assert str(run).encode() not in body and b"secret" not in body and b"zarr_format" not in body


def test_a_symlink_loop_under_tiles_is_404(server, run):
    """``os.stat`` of a link to itself raises ELOOP: a plain 404 like any other name with nothing behind it, not a 500."""
    loop = run / "tiles" / "loop.json"
    loop.symlink_to(loop.name)
    try:
        status, body = get(server, "/tiles/loop.json")
        assert status == 404 and str(run).encode() not in body
        assert get(server, "/tiles/atlases.json")[0] == 200  # and the server goes on
    finally:
        loop.unlink()


def test_pages_and_tiles_carry_their_types_no_cache_and_an_etag(server):
    for path, media in (("/tiles/index.html", "text/html"), ("/tiles/viewer.js", "javascript"),
                        ("/tiles/openseadragon/openseadragon.min.js", "javascript"), ("/tiles/atlases.json", "application/json")):
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        assert response.status == 200 and media in response.getheader("Content-Type"), (path, response.getheader("Content-Type"))
        assert response.getheader("Cache-Control") == "no-cache" and response.getheader("X-Content-Type-Options") == "nosniff"
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:  # no-cache with the file's ETag: a run's file is revalidated, not fetched again
        conn.request("GET", "/tiles/atlases.json", headers={"If-None-Match": response.getheader("ETag")})
        again = conn.getresponse()
        assert again.status == 304 and again.read() == b""
    finally:
        conn.close()


# ---------------------------------------------------------------------------- Host header
def test_host_header_must_name_this_server(server):
    port = server.server_port
    for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        assert get(server, "/tiles/atlases.json", host=good)[0] == 200, good
    bad = [f"evil.example:{port}", f"localhost.evil.example:{port}", f"127.0.0.1.nip.io:{port}", "127.0.0.1",
           f"127.0.0.1:{port + 1}", f"127.0.0.1:{port}@evil.example", f"::1:{port}", f"[::1:{port}", "", f"127.0.0.1:+{port}"]
    for value in bad:
        assert get(server, "/tiles/atlases.json", host=value)[0] == 403, value
        assert get(server, "/", host=value)[0] == 403, value  # not even the redirect
    no_host = raw(server, b"GET /tiles/atlases.json HTTP/1.0\r\n\r\n")
    two_hosts = raw(server, f"GET /tiles/atlases.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n\r\n".encode())
    assert no_host[0] == 403 and two_hosts[0] in (400, 403)  # h11 itself refuses a request with two Host headers (400)


def test_allow_host_adds_a_name(run):
    srv = make_server(run, port=0, timeout=TIMEOUT, allow_hosts=["atlas.lan"])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        assert get(srv, "/tiles/atlases.json", host=f"atlas.lan:{srv.server_port}")[0] == 200
        assert get(srv, "/tiles/atlases.json", host=f"other.lan:{srv.server_port}")[0] == 403
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def test_split_host():
    assert split_host("LocalHost:8000") == ("localhost", 8000)
    assert split_host("[::1]:80") == ("::1", 80) and split_host("[::1]") == ("::1", None)
    assert split_host("127.0.0.1") == ("127.0.0.1", None)
    for bad in ("", ":80", "::1", "[::1", "[::1]80", "a:b", "a:80:80", "a:", "a:٣"):
        assert split_host(bad) is None, bad


# ---------------------------------------------------------------------------- stalled clients
def test_idle_and_half_sent_connections_are_closed_while_others_are_served(server):
    address = server.server_address[:2]
    idle = socket.create_connection(address, timeout=10)
    half = socket.create_connection(address, timeout=10)
    half.sendall(b"GET /tiles/atlases.json HTTP/1.1\r\nHost: 127.0.0.1")  # and never the rest
    drip = socket.create_connection(address, timeout=10)
    drip.sendall(b"GET /tiles/atlases.json HTTP/1.1\r\nX-Slow: ")
    try:
        start = time.monotonic()
        drip_closed = None
        for _ in range(int(4 * TIMEOUT / 0.25)):  # a byte every 0.25 s: no single read ever waits TIMEOUT
            assert get(server, "/tiles/atlases.json")[0] == 200  # the server keeps answering meanwhile
            try:
                drip.sendall(b"a")
            except OSError:
                drip_closed = time.monotonic() - start
                break
            if closed_within(drip, 0.25) is not None:
                drip_closed = time.monotonic() - start
                break
        assert drip_closed is not None and drip_closed < TIMEOUT + 1.5, drip_closed
        left = TIMEOUT + 1.5 - (time.monotonic() - start)
        assert closed_within(idle, max(left, 0.1)) is not None, "an idle connection was kept open"
        assert closed_within(half, max(left, 0.1)) is not None, "a half-sent request was kept open"
        assert get(server, "/tiles/atlases.json")[0] == 200
    finally:
        for s in (idle, half, drip):
            s.close()


# ---------------------------------------------------------------------------- bursts
def test_a_burst_of_200_connections_waits_in_the_listen_queue(run):
    """Before the accept loop runs, 200 connections complete their handshake at once (backlog 5 takes 6)."""
    srv = make_server(run, port=0, timeout=10)
    socks: list[socket.socket] = []
    thread = None
    try:
        for i in range(200):
            s = socket.socket()
            s.settimeout(0.5)
            try:
                s.connect(srv.server_address[:2])
            except OSError:
                s.close()
                pytest.fail(f"connection {i + 1} of 200 was not queued: the listen backlog is too small")
            socks.append(s)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        request = f"GET /tiles/atlases.json HTTP/1.0\r\nHost: 127.0.0.1:{srv.server_port}\r\n\r\n".encode()
        for s in socks:
            s.settimeout(10)
            s.sendall(request)
        for s in socks:
            assert s.recv(12)[8:12] == b" 200"  # uvicorn answers HTTP/1.0 requests with an HTTP/1.1 status line
    finally:
        for s in socks:
            s.close()
        if thread is not None:
            srv.shutdown()
        srv.server_close()


def test_200_parallel_tile_requests(server, run):
    tiles = sorted(p.relative_to(run).as_posix() for p in (run / "tiles" / LAYER / "full" / "atlas_files").rglob("*.jpg"))
    assert len(tiles) >= 5
    expected = {t: (run / t).read_bytes() for t in tiles}
    barrier = threading.Barrier(200, timeout=30)

    def fetch(i: int) -> tuple[bool, float]:
        path = tiles[i % len(tiles)]
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        barrier.wait()
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/" + path)
            response = conn.getresponse()
            ok = response.status == 200 and response.read() == expected[path]
        finally:
            conn.close()
        return ok, time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(fetch, range(200), timeout=60))
    elapsed = time.perf_counter() - start
    print(f"200 parallel tile requests: {elapsed:.2f} s, slowest {max(r[1] for r in results):.2f} s")
    assert all(ok for ok, _ in results)
    assert elapsed < 5.0, elapsed  # the listen-queue stall this guards against costs 1, 3, 7, 15 s of SYN retries


# ---------------------------------------------------------------------------- CLI: ports
def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_serve_rejects_a_bad_port(run, port):
    assert_one_line(cli("serve", str(run), "--port", port), port, "65535")
    with pytest.raises(AtlasError, match=f"between 0 and 65535.*got {port}"):  # the library checks too, for its own callers
        make_server(run, port=int(port))


def test_serve_on_a_port_in_use_is_one_line(run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_one_line(cli("serve", str(run), "--port", str(port)), str(port), "already in use")
    with pytest.raises(AtlasError, match="0 and 65535"):
        make_server(run, port=True)


# ---------------------------------------------------------------------------- OpenSeadragon missing
@pytest.fixture
def no_osd(tmp_path) -> dict:
    empty = tmp_path / "no-openseadragon"
    empty.mkdir()
    return {"ATLAS_OPENSEADRAGON": str(empty)}


def test_missing_openseadragon_fails_tiles_class_and_compare_before_any_work(tmp_path, no_osd):
    run = make_tile_run(tmp_path / "untiled", sizes=(4,), icon=16)
    before = tree(run)
    for args in (["tiles", str(run), "--layer", LAYER], ["class", str(run), "--layer", LAYER, "--class", "goldfish"],
                 ["compare", str(run), "tench", "goldfish", "--layer", LAYER]):
        assert_one_line(cli(*args, env=no_osd, timeout=60), "ATLAS_OPENSEADRAGON", "openseadragon.min.js")
    assert tree(run) == before and not (run / "tiles").exists()


def test_missing_openseadragon_fails_serve_and_build_before_any_work(run, tmp_path, no_osd):
    before = tree(run / "tiles")
    assert_one_line(cli("serve", str(run), "--port", "0", env=no_osd, timeout=60), "ATLAS_OPENSEADRAGON")
    assert tree(run / "tiles") == before
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(images / f"img{i}.jpg")
    out = tmp_path / "new-run"
    for extra in ([], ["--dry-run"]):
        proc = cli("build", "--images", str(images), "--out", str(out), "--layer", LAYER, *extra, env=no_osd, timeout=60)
        assert_one_line(proc, "ATLAS_OPENSEADRAGON")
        assert not out.exists()


def test_without_any_openseadragon_the_line_says_how_to_get_it(monkeypatch, tmp_path):
    import atlas.viewer as viewer

    static = tmp_path / "viewer_static"  # the viewer's own files without the OpenSeadragon atlas ships (a broken install)
    static.mkdir()
    for name in viewer.VIEWER_FILES:
        shutil.copyfile(viewer.STATIC / name, static / name)
    monkeypatch.delenv("ATLAS_OPENSEADRAGON", raising=False)
    monkeypatch.setattr(viewer, "STATIC", static)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AtlasError) as info:
        viewer.require_viewer_assets()
    message = str(info.value)
    assert "\n" not in message and str(static / "openseadragon") in message
    assert "reinstall" in message and "ATLAS_OPENSEADRAGON" in message and "npm" not in message


def test_a_users_own_openseadragon_is_installed(tmp_path, monkeypatch):
    """ATLAS_OPENSEADRAGON=DIR is a real feature: the copy there (a build folder or the npm package) is the one installed."""
    package = tmp_path / "openseadragon"
    shutil.copytree(find_openseadragon(), package / "build" / "openseadragon")
    mine = package / "build" / "openseadragon" / "openseadragon.min.js"
    mine.write_bytes(mine.read_bytes() + b"\n/* user's copy */\n")
    for given in (package, package / "build" / "openseadragon"):
        monkeypatch.setenv("ATLAS_OPENSEADRAGON", str(given))
        assert find_openseadragon() == package / "build" / "openseadragon"
    run = make_tile_run(tmp_path / "run", sizes=(4,), icon=16)
    make_tiles(run, LAYER, examples=False)
    assert (run / "tiles" / "openseadragon" / "openseadragon.min.js").read_bytes() == mine.read_bytes()
