"""The viewer: the local server's confinement to the run folder, and the page in headless Chromium."""

from __future__ import annotations

import http.client
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import serving
from PIL import Image
from tiles_helpers import make_tile_run

import atlas.tiles as tiles
from atlas.errors import AtlasError
from atlas.server import make_server
from atlas.tiles import make_tiles
from atlas.viewer import url_of

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = REPO / "outputs"
LAYER = "mixed4c"


def fake_patches(run_dir, layer, rows, size=80):
    """Stand-in example patches: a tinted gradient per sample row."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((len(rows), size, size, 3), np.uint8)
    for i, r in enumerate(rows):
        out[i] = np.stack([(xx * 3 + r * 37) % 256, (yy * 3 + r * 11) % 256, np.full_like(xx, (r * 53) % 256)], axis=-1)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two atlases: a full one with 16/32/64 grids of 32 px icons (2048 px), and a comparison atlas with axis labels."""
    run = make_tile_run(tmp_path_factory.mktemp("viewer") / "run", sizes=(16, 32, 64), icon=32)
    make_tile_run(run, atlas="compare-snorkel-scuba_diver", sizes=(8, 16), icon=32, axis_labels=["snorkel", "scuba diver"])
    original = tiles.writer._sample_patches
    tiles.writer._sample_patches = lambda: fake_patches
    try:
        make_tiles(run, LAYER, highlight="goldfish")
        make_tiles(run, LAYER, atlas="compare-snorkel-scuba_diver")
    finally:
        tiles.writer._sample_patches = original
    return run


@pytest.fixture(scope="module")
def server(run):
    with serving(run) as srv:
        yield srv


def get(server, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.putrequest("GET", path, skip_accept_encoding=True)  # sent as is, no client-side normalisation
    conn.endheaders()
    response = conn.getresponse()
    return response.status, response.read()


# ---------------------------------------------------------------------------- server
def test_server_binds_localhost_and_serves_the_viewer(server):
    assert server.server_address[0] == "127.0.0.1"
    assert url_of(server).endswith("/tiles/index.html")
    status, body = get(server, "/tiles/index.html")
    assert status == 200 and b"openseadragon/openseadragon.min.js" in body
    assert get(server, "/tiles/atlases.json")[0] == 200
    assert get(server, "/tiles/mixed4c/full/atlas.dzi")[0] == 200
    assert get(server, "/")[0] == 302


@pytest.mark.parametrize("path", [
    "/../../../../etc/passwd",
    "/tiles/../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/tiles/..%2f..%2f..%2fetc%2fpasswd",
    "/..\\..\\..\\etc\\passwd",
    "//etc/passwd",
    "/tiles/%00/../x",
])
def test_path_traversal_is_refused(server, path):
    status, body = get(server, path)
    assert status in (403, 404), (path, status)
    assert b"root:" not in body


def test_symlinks_out_of_the_run_and_listings_are_refused(server, run, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    link = run / "tiles" / "leak.txt"
    link.symlink_to(secret)
    try:
        assert get(server, "/tiles/leak.txt")[0] in (403, 404)
    finally:
        link.unlink()
    assert get(server, "/store.zarr/")[0] == 404  # no directory listings


def test_serve_command_prints_the_url(run):
    proc = subprocess.Popen([sys.executable, "-c", "from atlas.cli import main; main()", "serve", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/tiles/index\.html", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("GET", "/tiles/atlases.json")
        assert conn.getresponse().status == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_without_tiles_is_a_clear_error(tmp_path):
    with pytest.raises(AtlasError, match="run `atlas tiles"):
        make_server(tmp_path, port=0)


# ---------------------------------------------------------------------------- browser
@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 820}, device_scale_factor=1)
    pg = context.new_page()
    pg.requested = []
    pg.errors = []
    pg.on("request", lambda r: pg.requested.append(r.url))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(url_of(server))
    pg.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
    yield pg
    context.close()


def levels_requested(urls: list[str], atlas: str = "full") -> set[int]:
    return {int(m.group(1)) for u in urls if (m := re.search(rf"/{atlas}/atlas_files/(\d+)/\d+_\d+\.jpg", u))}


def test_viewer_shows_tiles_and_zooms_deeper(page):
    assert page.errors == []
    assert page.inner_text("#f-layer") == LAYER and page.inner_text("#f-model") == "synthetic"
    shot = np.asarray(Image.open(io.BytesIO(page.locator("#osd").screenshot())).convert("RGB")).astype(int)
    centre = shot[shot.shape[0] // 4 : 3 * shot.shape[0] // 4, shot.shape[1] // 3 : 2 * shot.shape[1] // 3]
    assert centre.std() > 20 and len(np.unique(centre.reshape(-1, 3), axis=0)) > 50, "the canvas looks blank"
    before = levels_requested(page.requested)
    assert before and max(before) == 10  # home view (~770 px): the 1024 px level, no more
    grid_before = page.inner_text("#f-grid")
    page.evaluate("atlasViewer.viewer.viewport.zoomTo(atlasViewer.viewer.viewport.getZoom() * 6, null, true)")
    page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
    page.wait_for_timeout(300)
    after = levels_requested(page.requested)
    assert max(after) == 11  # the 64x64 grid's own level
    assert grid_before == "32×32" and page.inner_text("#f-grid") == "64×64"


def test_hover_shows_cell_info_and_click_opens_examples(page):
    pos = page.evaluate("(() => { const g = atlasViewer.activeGrid(); return [g.size, atlasViewer.cellCenter(g.size, 4, 2)]; })()")
    size, centre = pos
    page.mouse.move(centre["x"], centre["y"])
    page.wait_for_selector("#tooltip:not([hidden])", timeout=5000)
    text = page.inner_text("#tooltip")
    # cell (4, 2): count 1 + (6 % 5) * 10 = 11, top class (4 + 2) % 10 = 6 = stingray
    assert f"grid {size}×{size}" in text and "cell 4, 2" in text and "11" in text and "stingray" in text, text
    page.mouse.click(centre["x"], centre["y"])
    page.wait_for_selector("#panel:not([hidden])", timeout=5000)
    assert "Cell 4, 2" in page.inner_text("#panel-title")
    assert page.locator("#panel-examples .sprite").count() == 5
    icon_url = page.eval_on_selector("#panel-icon", "el => getComputedStyle(el).backgroundImage")
    assert f"icons/{size}/0_0.jpg" in icon_url
    OUTPUTS.mkdir(exist_ok=True)
    page.mouse.move(centre["x"] + 3, centre["y"] + 3)
    page.wait_for_timeout(200)
    page.screenshot(path=str(OUTPUTS / "viewer.png"))


def test_menu_switches_atlas_and_shows_axis_labels(page):
    options = page.eval_on_selector_all("#atlas-menu option", "els => els.map(e => e.value)")
    assert options == [f"{LAYER}/full", f"{LAYER}/compare-snorkel-scuba_diver"]
    assert page.locator("#axis-left").is_hidden()
    page.select_option("#atlas-menu", f"{LAYER}/compare-snorkel-scuba_diver")
    page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
    assert "snorkel" in page.inner_text("#axis-left") and "scuba diver" in page.inner_text("#axis-right")
    assert levels_requested(page.requested, "compare-snorkel-scuba_diver")
    assert page.locator("#ladder li").count() == 2 and page.locator("#hl-legend").is_hidden()
    page.screenshot(path=str(OUTPUTS / "viewer_compare.png"))
    assert page.errors == []
