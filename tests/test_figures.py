"""The library's figures: pure ``plot_*`` functions return matplotlib Figures (for a notebook), the writers only save
them, and nothing in the library switches the process's matplotlib backend (no ``matplotlib.use``, no pyplot)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from atlas.inspect.engine import read_image
from atlas.inspect.invariance import invariance_curves, plot_invariance, write_invariance
from atlas.inspect.occlusion import occlusion_maps, plot_occlusion, write_occlusion
from atlas.inspect.onatlas import Placement, plot_placement, plot_placement_cells
from atlas.patches import patch_images, plot_patched
from atlas.settings import PatchSettings, ReconstructSettings
from atlas.weights.reconstruct import plot_reconstruction, read_photo, reconstruct_report

ATLAS = Path(__file__).resolve().parents[1] / "atlas"
FOREIGN = "template"  # a backend no writer would pick: a writer that switched to Agg would show


@pytest.fixture
def foreign_backend():
    """The process on a backend of the caller's choosing for the test; the one before it put back afterwards."""
    before = matplotlib.get_backend()
    matplotlib.use(FOREIGN)
    try:
        yield FOREIGN
    finally:
        matplotlib.use(before)


def test_the_library_never_chooses_a_backend():
    """Source check of every module: the writers draw on ``matplotlib.figure.Figure`` objects, which save without one."""
    offenders = []
    for path in sorted(ATLAS.rglob("*.py")):
        text = path.read_text()
        if re.search(r"matplotlib\.use\(|import matplotlib\.pyplot|from matplotlib import pyplot|switch_backend", text):
            offenders.append(str(path.relative_to(ATLAS.parent)))
    assert not offenders, offenders


def test_occlusion_plot_and_writer(net, photos, tmp_path, foreign_backend):
    image, picture = read_image(str(photos / "n01440764_tench.JPEG"))
    result = occlusion_maps(net, image, "mixed4c", occluder=112, stride=112)
    fig = plot_occlusion(result, picture, net.classes)
    assert isinstance(fig, Figure) and len(fig.axes) >= 4 and "(a) mixed4c" in fig.axes[0].get_title()
    summary = write_occlusion(result, picture, tmp_path, net.classes)
    assert (tmp_path / summary["figure"]).stat().st_size > 10_000
    assert matplotlib.get_backend() == foreign_backend


def test_invariance_plot_and_writer(net, photos, tmp_path, foreign_backend):
    curves = invariance_curves(net, [photos / "n02088364_beagle.JPEG"], shifts=[0, 8])
    fig = plot_invariance(curves, ["beagle"])
    assert isinstance(fig, Figure) and len(fig.axes) == 3 and fig.axes[2].get_lines()[0].get_label() == "beagle"
    write_invariance(curves, tmp_path, ["beagle"])
    assert (tmp_path / "invariance.png").stat().st_size > 5_000
    assert matplotlib.get_backend() == foreign_backend


def test_reconstruction_plot_and_writer(net, photos, tmp_path, foreign_backend):
    summary = reconstruct_report([photos / "n02088364_beagle.JPEG"], tmp_path, ReconstructSettings(top=2, check_columns=2), net=net)
    table = summary["images"][0]
    assert (tmp_path / table["figure"]).stat().st_size > 10_000
    assert matplotlib.get_backend() == foreign_backend
    # the pure function, from what the writer saved beside its figure
    arrays = np.load(tmp_path / table["arrays"])
    _, photo = read_photo(photos / "n02088364_beagle.JPEG")
    fig = plot_reconstruction(photo, "beagle", table["classes"], arrays["templates"], arrays["evidence"])
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 3 and fig.axes[0].get_title() == "beagle"


def test_patch_plot_and_writer(net, photos, tmp_path, foreign_backend):
    from PIL import Image

    scuba = np.asarray(Image.open(photos / "n10565667_scuba_diver.JPEG").convert("RGB").resize((224, 224)))
    settings = PatchSettings(sizes=(160,), positions=("centre",), n_random=0, batch_size=8, figure=2)
    report = patch_images([photos / "n04251144_snorkel.JPEG", photos / "n02088364_beagle.JPEG"], patch=scuba[20:200, 20:200],
                          target="scuba diver", settings=settings, out=tmp_path / "rep", net=net)
    assert Path(report["files"]["figure"]).stat().st_size > 10_000
    assert matplotlib.get_backend() == foreign_backend
    # the pure function on its own: two images, one variant each, drawn in two columns
    images = np.stack([scuba, scuba[::-1]])
    before = np.zeros((2, 3), np.float32)
    after = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    from atlas.patches.core import Placement as Place

    result = {"delta": np.array([2.0, 1.0]), "image_of": np.array([0, 1]), "places": [Place("centre", 160, 32, 32)] * 2,
              "resized": {160: scuba[:160, :160]}, "original": np.array([0, 0]), "top1": np.array([1, 0]), "after": after}
    fig = plot_patched(images, before, result, 1, ["a", "b", "c"], 2, "title")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert plot_patched(images, before, {**result, "delta": np.array([]), "image_of": np.array([], int)}, 1, ["a", "b", "c"], 2, "") is None


def test_placement_plots(tmp_path, foreign_backend):
    rng = np.random.default_rng(0)
    p = 6
    placement = Placement(layer="mixed4c", atlas="umap", hw=(2, 3), xy=rng.random((p, 2), dtype=np.float32),
                          neighbours=np.zeros((p, 2), np.int64), distances=np.zeros((p, 2), np.float32), exact=np.zeros(p, bool),
                          cells={4: np.arange(p, dtype=np.int32)}, has_icon={4: np.ones(p, bool)}, counts={4: np.ones(p, np.int32)},
                          method="umap", metric="cosine", k=2, outside="edge", transform="", n_samples=10, seconds=0.0)
    canvas = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    fig = plot_placement(placement, np.linspace(-1, 1, p), canvas, "photo", size=4, target_name="tench")
    assert isinstance(fig, Figure) and "photo on mixed4c/umap (4×4 icons): 6 positions" in fig.axes[0].get_title()
    cells = [{"gx": 1, "gy": 0, "positions": 4}, {"gx": 2, "gy": 3, "positions": 2}]
    fig = plot_placement_cells(cells, [canvas[:16, :16], None], 4, "photo")
    assert isinstance(fig, Figure) and len(fig.axes) == 2 and fig.axes[1].texts[0].get_text() == "no icon"
    fig.savefig(tmp_path / "cells.png")  # no backend chosen, none needed
    assert matplotlib.get_backend() == foreign_backend
