"""Shared fixtures: the real weights and photos in ../shared, the real model, small runs."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ATLAS_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models" / "bvlc_googlenet.safetensors"
PHOTOS = SHARED / "data" / "imagenet-samples"

# The library has no default pointing at ../shared: the tests point it there themselves, here,
# at import, so every test and every `atlas` subprocess they start (which inherit the
# environment) finds the real weights. The user cache is a fresh folder, so what a test sees
# never depends on (nor changes) ~/.cache/atlas.
if WEIGHTS.is_file():
    os.environ["ATLAS_WEIGHTS"] = str(WEIGHTS)
TEST_CACHE = Path(tempfile.mkdtemp(prefix="atlas-test-cache-"))
os.environ["XDG_CACHE_HOME"] = str(TEST_CACHE)
atexit.register(shutil.rmtree, TEST_CACHE, True)


def require_shared() -> None:
    """Skip when ../shared is absent, except under CI, where its absence is a failure."""
    if WEIGHTS.is_file() and PHOTOS.is_dir():
        return
    reason = f"real weights and photos not found in {SHARED} (set ATLAS_SHARED)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def net():
    require_shared()
    from atlas.models import load_model

    return load_model("inceptionv1", WEIGHTS)


@pytest.fixture(scope="session")
def photos() -> Path:
    require_shared()
    return PHOTOS


@pytest.fixture(scope="session")
def photo_list(tmp_path_factory, photos) -> Path:
    """A list file naming a few photos, among them the snorkel and scuba-diver ones."""
    names = sorted(p.name for p in photos.glob("*.JPEG"))
    chosen = names[::50][:16] + ["n04251144_snorkel.JPEG", "n10565667_scuba_diver.JPEG"]
    path = tmp_path_factory.mktemp("lists") / "images.txt"
    path.write_text("".join(f"{photos / n}\n" for n in chosen))
    return path


CHROMIUM = Path(os.environ.get("ATLAS_CHROMIUM", "/usr/bin/chromium"))
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium through playwright, for the viewer and gallery tests (skipped without it, failed
    under CI)."""
    if not CHROMIUM.is_file():
        reason = f"chromium not found at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROME_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh 1280 x 820 page; ``page.errors`` collects the page's uncaught script errors (tests assert it stays empty)."""
    context = browser.new_context(viewport={"width": 1280, "height": 820}, device_scale_factor=1)
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


@contextlib.contextmanager
def serving(run, **options):
    """``atlas serve``'s server for ``run`` on a free port (``options``: make_server's), in a thread, shut down afterwards."""
    import threading

    from atlas.server import make_server

    srv = make_server(run, port=0, **options)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


@contextlib.contextmanager
def http_folder(folder: Path):
    """A plain HTTP server on 127.0.0.1 serving ``folder`` (a stand-in for a download site); yields ``(base URL, the
    list of paths requested so far)``."""
    import http.server
    import threading

    served: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self) -> None:
            served.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
