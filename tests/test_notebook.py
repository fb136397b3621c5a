"""The notebooks run as a reader would run them (executed in a real kernel), and the viewer that the quickstart's
``run.show()`` puts in the notebook loads the atlas's tiles in headless Chromium while the kernel serves it.

The four notebooks build the same small run into one folder, so the quickstart builds it and the others skip every
stage (`atlas.build` sees the same settings); sizes come from environment variables, as a reader would set them.
"""

from __future__ import annotations

import os
import re

import nbformat
import pytest
from conftest import REPO, WEIGHTS
from nbclient import NotebookClient

# Small enough for seconds per stage on 2 cores: 32 photos x 4 positions, 8-step draft icons, 2 units at 16 steps.
SIZES = {"N_IMAGES": "32", "STEPS": "8", "CHANNELS": "0-1", "UNIT_STEPS": "16"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, photos) -> dict:
    base = tmp_path_factory.mktemp("notebooks")
    return {"base": base, "environ": {**os.environ, "IMAGES": str(photos), "ATLAS_WEIGHTS": str(WEIGHTS), "RUN": str(base / "run"),
                                      "OUT": str(base / "weights"), **SIZES}}


def client(name: str, env: dict) -> tuple[nbformat.NotebookNode, NotebookClient]:
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    return notebook, NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(env["base"])}})


def run_notebook(name: str, env: dict) -> nbformat.NotebookNode:
    notebook, nbclient = client(name, env)
    nbclient.execute(env=env["environ"])  # a failing cell raises CellExecutionError naming it
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def shown(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o["data"][mime] for o in outputs(notebook) if mime in o.get("data", {})]


def iframes(notebook: nbformat.NotebookNode) -> list[str]:
    return [html for html in shown(notebook, "text/html") if "<iframe" in html]


@pytest.fixture(scope="module")
def quickstart(env):
    """The executed quickstart, its kernel (and so the viewer server ``run.show()`` started in it) still running."""
    notebook, nbclient = client("quickstart", env)
    with nbclient.setup_kernel(env=env["environ"]):
        for index, cell in enumerate(notebook.cells):
            nbclient.execute_cell(cell, index)
        yield notebook


def test_quickstart_builds_shows_and_serves(quickstart, env):
    assert not [o for o in outputs(quickstart) if o.get("output_type") == "error"]
    summaries = [html for html in shown(quickstart, "text/html") if "<table>" in html]
    assert summaries and "data:image/png;base64," in summaries[0], "a bare `run` shows its summary and icons"
    assert len(shown(quickstart, "image/png")) >= 2, "the sheet and the layout plot are shown inline"
    frames = iframes(quickstart)
    assert len(frames) == 1 and re.search(r'<iframe src="http://127\.0\.0\.1:\d+/tiles/index\.html"', frames[0]), frames
    assert (env["base"] / "run" / "tiles" / "index.html").is_file()


def test_the_viewer_in_the_notebook_loads_the_atlas_tiles(quickstart, browser):
    """The HTML the notebook holds, opened in Chromium: its iframe loads the viewer, which requests tiles, and every
    tile comes back 200 from the server running in the notebook's kernel."""
    html = iframes(quickstart)[0]
    port = re.search(r"127\.0\.0\.1:(\d+)", html).group(1)
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: answers.append((r.url, r.status)))
    try:
        page.set_content(f"<!doctype html><html><body>{html}</body></html>")
        frame = page.wait_for_selector("iframe").content_frame()
        frame.wait_for_function("document.body.dataset.loaded === '1'", timeout=30000)
        tiles = [(u, s) for u, s in answers if re.search(rf"127\.0\.0\.1:{port}/tiles/mixed4c/full/atlas_files/\d+/\d+_\d+\.jpg", u)]
        assert tiles and all(s == 200 for _, s in tiles), tiles
        failed = [(u, s) for u, s in answers if s >= 400 and "favicon" not in u]
        assert not failed, failed
    finally:
        context.close()


def test_units_notebook(env, quickstart):
    notebook = run_notebook("units", env)
    assert len(shown(notebook, "image/png")) == 1, "the units' figure"
    assert "/tiles/units.html" in iframes(notebook)[0]
    assert any("up to date, skipped" in o.get("text", "") for o in outputs(notebook)), "the quickstart's run is reused"


def test_inspect_notebook(env, quickstart):
    notebook = run_notebook("inspect", env)
    assert len(shown(notebook, "image/png")) == 3, "layer view, occlusion, the photo on the atlas"
    assert re.search(r"/tiles/inspect/[^/]+/index\.html", iframes(notebook)[0])


def test_weights_notebook(env):
    notebook = run_notebook("weights", env)
    assert any("| " in md for md in shown(notebook, "text/markdown")), "the reconstruction's table"
    assert len(shown(notebook, "image/png")) == 2, "the filter sheet and the class templates"
