"""What a fault audit found of low harm: a 16-bit PNG live frame, the live socket's limits (a cap on connections,
turns, an idle timeout, commands JSON cannot hold), damage `atlas info` must see, the advice for a garbage ledger, a
full disk during tiles, unknown layers and late checks, and over-long request targets.

Every server listens on 127.0.0.1 and an ephemeral port; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import serving
from PIL import Image
from tiny_run import LAYER, build_tiny, cli, copy_run, one_line, snapshot

from atlas.errors import AtlasError

WAIT = 120.0
MAX_COMMAND_BYTES = 4096  # atlas.server's limit on a text command


@pytest.fixture(scope="module")
def base(tmp_path_factory, photos) -> Path:
    return build_tiny(tmp_path_factory, photos)


@pytest.fixture(scope="module")
def server(base):
    with serving(base, timeout=5) as srv:
        yield srv


def jpeg(photo: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").resize((224, 224)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def connect(server):
    from websockets.sync.client import connect as ws_connect

    return ws_connect(f"ws://127.0.0.1:{server.server_port}/live/ws", max_size=2 ** 24, open_timeout=30, close_timeout=5)


def next_message(ws, timeout: float = WAIT) -> dict:
    """The next message's header (JSON text, or the JSON head of a binary message)."""
    from atlas.live import unpack

    message = ws.recv(timeout=timeout)
    return unpack(message)[0] if isinstance(message, bytes) else json.loads(message)


def hello(ws) -> dict:
    first = next_message(ws)
    return next_message(ws) if first["type"] == "status" else first


def wait_for(ws, kind: str, timeout: float = WAIT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        message = next_message(ws, max(0.1, deadline - time.monotonic()))
        if message["type"] == kind:
            return message
        assert message["type"] != "error", message


# ---------------------------------------------------------------------------- the live frame's decoder
def test_a_16_bit_png_frame_is_decoded_as_the_sampler_decodes_it():
    from atlas.data import decode_image
    from atlas.live import decode_frame

    ramp = np.tile(np.linspace(0, 65535, 224).astype(np.uint16), (224, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")  # really 16 bits per sample
    frame = decode_frame(buf.getvalue())
    assert abs(float(frame.picture.mean()) - 127.5) < 3  # a ramp from black to white, not 99.6% white
    assert (frame.picture == 255).mean() < 0.05
    np.testing.assert_array_equal(frame.picture, np.asarray(decode_image(buf.getvalue(), 224, 224)))


# ---------------------------------------------------------------------------- the live socket
def test_connections_beyond_the_cap_are_refused_in_one_line_and_turns_are_taken(server, photos):
    frame = jpeg(sorted(photos.glob("*.JPEG"))[0])
    server.app.max_live = 3
    clients = []
    stack = contextlib.ExitStack()
    try:
        for _ in range(3):
            clients.append(stack.enter_context(connect(server)))
            hello(clients[-1])
        refused = stack.enter_context(connect(server))
        message = next_message(refused, 30)
        assert message["type"] == "error" and "too many live connections (3 open)" in message["message"]
        with pytest.raises(Exception):  # noqa: B017 - closed by the server: ConnectionClosed of any kind
            refused.recv(timeout=10)
        assert refused.close_code == 1013
        # two connections flood frames; a newcomer (once one closed) gets its hello at once and its result in turn
        stop = threading.Event()

        def flood(ws) -> None:
            while not stop.is_set():
                try:
                    ws.send(frame)
                    ws.recv(timeout=0.05)
                except TimeoutError:
                    continue
                except Exception:  # noqa: BLE001 - the connection closed under the test's end
                    return
                time.sleep(0.05)

        threads = [threading.Thread(target=flood, args=(ws,), daemon=True) for ws in clients[:2]]
        for t in threads:
            t.start()
        clients.pop().close()
        time.sleep(0.5)
        t0 = time.monotonic()
        newcomer = stack.enter_context(connect(server))
        hello(newcomer)
        assert time.monotonic() - t0 < 10
        newcomer.send(frame)
        wait_for(newcomer, "result", 60)
        assert time.monotonic() - t0 < 60
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        server.app.max_live = 32
        stack.close()


def test_a_socket_that_sends_nothing_is_closed_with_one_line(server):
    server.app.live_idle = 1.0
    try:
        with connect(server) as ws:
            hello(ws)
            t0 = time.monotonic()
            message = next_message(ws, 30)
            assert message["type"] == "error" and "without a message" in message["message"]
            with pytest.raises(Exception):  # noqa: B017 - then closed
                ws.recv(timeout=10)
            assert time.monotonic() - t0 < 10
    finally:
        server.app.live_idle = 600.0


@pytest.mark.parametrize("text", [
    "[" * 100_000,  # 100,000 deep
    '{"type": "image", "index": ' + "9" * 5000 + "}",  # a 5,000-digit number
    "[" * 2000 + "]" * 2000,  # short enough to be parsed, too deep for the parser
    "x" * (MAX_COMMAND_BYTES + 1),
])
def test_commands_json_cannot_hold_are_one_error_line_and_the_connection_stays(server, text):
    with connect(server) as ws:
        hello(ws)
        ws.send(text)
        message = next_message(ws, 30)
        assert message["type"] == "error" and len(message["message"]) < 300 and "\n" not in message["message"]
        ws.send(json.dumps({"type": "images"}))
        assert wait_for(ws, "images", 30)["images"]


# ---------------------------------------------------------------------------- HTTP request targets
def raw_status(server, target: str) -> int:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.server_port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_an_over_long_segment_is_404_and_an_over_long_target_414(server):
    assert raw_status(server, "/tiles/" + "a" * 300) == 404  # longer than a file name may be
    assert raw_status(server, "/tiles/openseadragon/" + "b" * 300) == 404
    assert raw_status(server, "/tiles/" + "a" * 70_000) == 414
    assert raw_status(server, "/tiles/atlases.json") == 200  # and the server goes on


# ---------------------------------------------------------------------------- atlas info sees damage
def test_info_sees_a_deleted_chunk(base, tmp_path):
    from atlas.info import format_info, info

    run = copy_run(base, tmp_path)
    assert info(run)["complete"] and not info(run)["damaged"]
    chunk = sorted((run / "store.zarr" / "samples" / LAYER / "activations" / "c").rglob("*"))[-1]
    chunk.unlink()
    data = info(run)
    assert not data["complete"]
    (rel, problem), = data["damaged"].items()
    assert rel == f"samples/{LAYER}/activations" and "missing" in problem and "atlas sample" in problem
    text = format_info(data)
    assert "damaged" in text and "sampling incomplete" in text
    shown = cli("info", run)
    assert shown.returncode == 0 and "damaged" in shown.stdout


def test_a_garbage_ledger_is_advised_as_build_advises_it(base, tmp_path, photos):
    """Only the record of finished stages is lost, not the samples: never "sample again into a new folder"."""
    from tiny_run import CONFIG

    run = copy_run(base, tmp_path)
    (run / "store.zarr" / "ledger" / "zarr.json").write_text("{garbage")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG)
    built = one_line(cli("build", "--config", cfg, "--images", photos, "--out", run), "ledger", "atlas build")
    shown = one_line(cli("info", run), "ledger", "delete", "atlas build")
    assert "new folder" not in built and "new folder" not in shown


# ---------------------------------------------------------------------------- a full disk during tiles
def test_a_full_disk_during_tiles_names_the_run_folder(base, tmp_path, monkeypatch):
    from atlas.tiles import make_tiles
    from atlas.viewer import find_openseadragon

    run = copy_run(base, tmp_path)
    shutil.rmtree(run / "tiles" / "openseadragon")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)  # the kernel's copy, as shutil.copyfile uses it on Linux
    with pytest.raises(AtlasError) as info:
        make_tiles(run, LAYER, examples=False)
    message = str(info.value)
    assert "no space left" in message and str(run) in message, message
    assert str(find_openseadragon()) not in message


# ---------------------------------------------------------------------------- checks in the right order
def test_patch_search_with_an_unknown_layer_says_so(base):
    one_line(cli("patch-search", base, "--layer", "mixed9z", "--atlas", "compare-a-vs-b"), "unknown layer 'mixed9z'", LAYER)


def test_inspect_checks_its_boxes_before_any_layer_view(base, tmp_path, photos):
    photo = sorted(photos.glob("*.JPEG"))[0]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"eye": {"not-an-image-given.jpg": [0, 0, 10, 10]}}))
    before = snapshot(base)
    result = cli("inspect", photo, "--out", tmp_path / "report", "--no-occlusion", "--no-invariance", "--boxes", boxes)
    one_line(result, "boxes")
    assert "layer views" not in result.stdout and not (tmp_path / "report").exists()
    assert snapshot(base) == before


def test_live_error_lines_carry_no_path_of_the_machine(tmp_path):
    """An error the live socket sends names the run's files relative to it and other files by name only."""
    from atlas.server import page_text

    run = tmp_path / "run"
    run.mkdir()
    text = page_text(f"{run}/store.zarr/icons/mixed4c/full/20/zarr.json is unreadable; weights {tmp_path}/w/bvlc.safetensors; "
                     f"rebuild {run.resolve()}", run)
    assert str(tmp_path) not in text and "/" + tmp_path.name not in text
    assert text == "store.zarr/icons/mixed4c/full/20/zarr.json is unreadable; weights bvlc.safetensors; rebuild the run"
