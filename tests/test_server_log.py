"""`atlas serve`'s status lines and warnings go through the ``atlas.server`` logger; its default handlers print them
as the command line always has (the viewer's URL first, on stdout, exactly as before)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

from atlas import server


def _lines(stream, n: int, timeout: float = 60) -> list[str]:
    """``n`` lines of ``stream``, or what came within ``timeout`` seconds (padded with ""): a missing line fails the
    test instead of hanging it."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(stream.readline() for _ in range(n)), daemon=True)
    reader.start()
    reader.join(timeout)
    return (got + [""] * n)[:n]


def test_serve_prints_its_lines_as_before(tmp_path):
    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "atlases.json").write_text(json.dumps([]))  # a run whose tiles list no atlas yet
    proc = subprocess.Popen([sys.executable, "-c", "from atlas.cli import main; main()", "serve", str(tmp_path), "--port", "0",
                             "--host", "0.0.0.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first, second = _lines(proc.stdout, 2)
        warning = _lines(proc.stderr, 1)[0]  # written last, right before the server starts serving
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert warning.rstrip() == "atlas: warning: listening on 0.0.0.0, other machines can read this run's tiles", warning
    assert first.startswith("atlas viewer: http://") and first.rstrip().endswith("/index.html  (Ctrl-C to stop)"), first
    assert second.startswith("live page: http://") and second.rstrip().endswith("/live.html"), second
    lines = err.strip().splitlines()
    assert lines[-1] == "atlas: interrupted; the server stopped" and "Traceback" not in err, err


def test_an_applications_own_handler_is_left_alone():
    mine = logging.Handler()
    server.log.addHandler(mine)
    try:
        server._default_handlers()
        assert server.log.handlers == [mine]  # no command-line handlers beside it: the application's lines go where it says
    finally:
        server.log.removeHandler(mine)
