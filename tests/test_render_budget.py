"""The icons-per-compute bench's strategies: each icon is a function of its own cell (and parent) only, whatever else is
rendered beside it, and the warm start really starts from the parent's icon."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import PHOTOS, REPO, WEIGHTS, require_shared

from atlas.data import load_image, to_tensor
from atlas.errors import AtlasError

LAYER = "mixed4c"


@pytest.fixture(scope="module")
def budget():
    """bench/render_budget.py as a module (loaded by path: bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("render_budget", REPO / "bench" / "render_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SIZE = 32  # small icons: the properties tested do not depend on the size, the time does
    return module


@pytest.fixture(scope="module")
def cells():
    """(net, 3 child directions, their parents (two share one), a whitening S) from real mixed4c activations."""
    require_shared()
    from atlas.models import load_model

    net = load_model("inceptionv1", WEIGHTS)
    files = sorted(PHOTOS.glob("*.JPEG"))[:6]
    with torch.no_grad():
        acts = net.activations(torch.stack([to_tensor(load_image(f)) for f in files]), [LAYER])[LAYER]
    x = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).double()
    s = torch.linalg.inv(x.T @ x / len(x) + 1e-2 * torch.eye(len(x.T))).float().numpy()
    children = acts[:3, :, 7, 7].numpy().astype(np.float32)
    parents = acts[[3, 3, 4], :, 6:9, 6:9].mean((2, 3)).numpy().astype(np.float32)
    return net, children, parents, s


def test_screen_continues_each_cells_best_seed_and_ignores_its_batch(budget, cells):
    net, children, _, s = cells
    together = budget.screen(net, children, s, 3, 2, 4)
    alone = budget.screen(net, children[1:2], s, 3, 2, 4)
    np.testing.assert_array_equal(together.images[1], alone.images[0])
    # the seed whose last trial step scored highest goes on, its parameters and Adam state carried: the kept icon is
    # exactly that seed's plain 4-step run (its transforms were drawn for the whole run from the start)
    # (equal up to the rounding of bf16 kernels, which differs with the batch: 9 images in the trial, 3 after it)
    trial = budget.optimization(net, children, s, 4, 3)
    trial.step(2)
    best = trial.trace[1].reshape(3, 3).argmax(1)
    trial.step()
    plain = trial.result().images
    for i in range(3):
        gaps = [np.abs(together.images[i] - plain[3 * i + k]).max() for k in range(3)]
        assert gaps[best[i]] < 0.02 and gaps[best[i]] < 0.2 * min(g for k, g in enumerate(gaps) if k != best[i]), (i, gaps)
    assert together.trace.shape == (4, 3)


def test_warm_start_begins_at_the_parent_icon_and_ignores_its_batch(budget, cells):
    net, children, parents, s = cells
    spectra = budget.parent_spectra(net, parents, s, 4)
    together = budget.warm(net, children, spectra, s, 2)
    alone = budget.warm(net, children[2:], spectra[2:], s, 2)
    np.testing.assert_array_equal(together.images[2], alone.images[0])
    # one child step from the parent's icon stays near the parent's icon; a cold start is far from it
    parent = budget.run(net, parents[:1], s, 4, 1)
    warm1 = budget.warm(net, children[:1], spectra[:1], s, 1)
    cold1 = budget.run(net, children[:1], s, 1, 1)
    near, far = np.abs(warm1.images - parent.images).mean(), np.abs(cold1.images - parent.images).mean()
    assert near < 0.5 * far, (near, far)
    assert np.isfinite(together.cosine_whitened).all() and together.images.shape == (3, 32, 32, 3)


def test_early_stop_stops_where_the_objective_levels_off(budget):
    """Icon 0 levels off at step 128 (flat over 192-255: stops at the 256 mark), icon 1 keeps rising (runs to the end); the figures
    are those measured at the stop."""
    from atlas.render.optimize import Result

    steps, n = 512, 2
    trace = np.zeros((steps, n * 2), np.float32)  # two attempts per icon; only the first (rows 0 and 2) counts
    t = np.arange(steps)
    trace[:, 0] = np.minimum(t, 128)
    trace[:, 2] = t
    marks = {m: Result(np.full((4, 2, 2, 3), m / 1000, np.float32), np.full(4, m, np.float32), np.full(4, m, np.float32),
                       trace[:m], np.full(4, m / 1000, np.float32)) for m in range(64, steps + 1, 64)}
    stop, r = budget.early_stop(marks, trace, 2)
    assert stop.tolist() == [256, 512]
    assert r.objective.tolist() == [256, 512] and r.images.shape == (2, 2, 2, 3)


def test_cosine_schedule_icons_ignore_batch_and_slicing(cells):
    """The cosine step size is a function of the step alone: an icon is the same whatever it is batched with and
    however its steps are sliced (a resumed render redoes whole batches)."""
    from atlas.render.objectives import direction
    from atlas.render.optimize import Optimization, Settings

    net, children, _, s = cells
    settings = Settings(size=32, steps=6, lr=0.05, schedule="cosine")
    assert settings.lr_at(0) == 0.05 and settings.lr_at(3) == pytest.approx(0.025) and 0 < settings.lr_at(5) < 0.01

    def icons(rows, slices):
        seeds = [(0, i, 0) for i in rows]
        opt = Optimization(net, LAYER, direction(LAYER, torch.from_numpy(children[rows]), torch.from_numpy(s)), seeds, settings)
        for k in slices:
            opt.step(k)
        return opt.result()

    together, alone = icons([0, 1, 2], [6]), icons([1], [2, 1, 3])
    np.testing.assert_array_equal(together.images[1], alone.images[0])
    constant = Optimization(net, LAYER, direction(LAYER, torch.from_numpy(children[1:2]), torch.from_numpy(s)), [(0, 1, 0)],
                            Settings(size=32, steps=6, lr=0.05))
    constant.step()
    assert not np.array_equal(constant.result().images[0], alone.images[0])  # the schedule does change the icon
    with pytest.raises(AtlasError, match="unknown lr schedule 'linear'; choose constant, cosine"):
        Settings(schedule="linear")
