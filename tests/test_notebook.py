"""CI executes the quickstart notebook: the documented API path must keep working."""

import os

import nbformat
from conftest import REPO, require_shared
from nbclient import NotebookClient


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    require_shared()
    from conftest import PHOTOS, WEIGHTS

    monkeypatch.setenv("IMAGES", str(PHOTOS))
    monkeypatch.setenv("ATLAS_WEIGHTS", str(WEIGHTS))
    monkeypatch.setenv("RUN", str(tmp_path / "quickstart"))
    monkeypatch.setenv("N_IMAGES", "60")
    monkeypatch.setenv("STEPS", "12")
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the atlas is shown inline"
    assert (tmp_path / "quickstart" / "tiles" / "index.html").exists()
    assert os.path.exists(tmp_path / "quickstart" / "store.zarr")
