"""The icons-per-compute bench: the strategies it reads off one measured run are what the renderer would make, and its
transformed-view cosine measures the icon as shown when the views are the identity."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import PHOTOS, REPO, WEIGHTS, require_shared

from atlas.data import load_image, to_tensor
from atlas.render.optimize import Settings, best_icons

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
    """(net, 3 directions, a whitening S) from real mixed4c activations."""
    require_shared()
    from atlas.models import load_model

    net = load_model("inceptionv1", WEIGHTS)
    files = sorted(PHOTOS.glob("*.JPEG"))[:6]
    with torch.no_grad():
        acts = net.activations(torch.stack([to_tensor(load_image(f)) for f in files]), [LAYER])[LAYER]
    x = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).double()
    s = torch.linalg.inv(x.T @ x / len(x) + 1e-2 * torch.eye(len(x.T))).float().numpy()
    return net, acts[:3, :, 7, 7].numpy().astype(np.float32), s


def test_read_offs_pick_what_the_renderer_keeps(budget):
    """Synthetic measured run, 2 icons x 4 seeds, marks 2 and 4: the preset keeps the best final objective of its first
    seeds, plain the first seed, the screen the best trial score over the last half of the trial."""
    trace = np.zeros((4, 8), np.float32)
    trace[:2] = [[1, 5, 2, 9, 4, 3, 8, 1], [1, 6, 2, 7, 4, 3, 1, 1]]  # the window is step 1: icon 0 seed 3, icon 1 seed 0
    objective = np.array([[0] * 8, [3, 1, 4, 2, 1, 5, 2, 9]], np.float32)
    run = {"marks": np.array([2, 4]), "trace": trace, "objective": objective, "white": objective / 10, "raw": objective / 20,
           "views_4": objective[1] / 11, "images_4": np.arange(8)[:, None, None, None] * np.ones((8, 2, 2, 3), np.uint8)}
    assert budget.best_of(run, 2, 4)[0].tolist() == [0, 5] and budget.best_of(run, 4, 4)[0].tolist() == [2, 7]
    assert budget.plain(run, 4)[0].tolist() == [0, 4]
    cols, step, cost = budget.screen(trace, 4, 2, 4)
    assert cols.tolist() == [3, 4] and step == 4 and cost == 4 * 2 + 4 - 2
    assert budget.screen(trace, 2, 2, 4)[0].tolist() == [1, 4]  # only the first two seeds screened
    f = budget.figures(run, budget.best_of(run, 2, 4))
    np.testing.assert_allclose(f["white"], [0.3, 0.5])
    np.testing.assert_allclose(f["views"], [3 / 11, 5 / 11])
    assert f["steps"] == 8 and f["images"][:, 0, 0, 0].tolist() == [0, 5]
    rows = budget.rows_of(run | {"trace": np.zeros((512, 8), np.float32), "marks": np.array([256, 512]),
                                 "objective": np.zeros((2, 8))}, False)
    assert rows["standard (512 x 2)"][2] == 1024 and rows["screen 4 x 32 -> 512"][2] == 4 * 32 + 480


def test_a_screened_render_is_its_chosen_seeds_plain_run(budget, cells):
    """``best_icons`` with a trial keeps, per icon, the seed the bench's read-off picks from the same trial, and its
    icon is that seed's plain run (parameters and Adam state carried); it does not depend on the icon's batch."""
    net, v, s = cells
    steps, trial = 6, 2
    full = budget.measured(net, v, s, steps, 2, (steps,))
    cols, _, _ = budget.screen(full["trace"], 4, trial, steps)
    settings = Settings(size=32, steps=steps, attempts=4, screen=trial)
    seeds = budget.seeds_of(v, 4)

    def screened(rows):
        from atlas.render.objectives import direction

        objective = direction(LAYER, torch.from_numpy(v[rows]).repeat_interleave(4, 0), torch.from_numpy(s))
        return best_icons(net, LAYER, objective, [x for i in rows for x in seeds[4 * i: 4 * i + 4]], settings)

    together, alone = screened([0, 1, 2]), screened([1])
    np.testing.assert_array_equal(together.images[1], alone.images[0])
    plain = full["images_6"].astype(np.float32)
    shown = np.rint(together.images * 255.0)
    for i, c in enumerate(cols):
        # equal up to the rounding of bf16 kernels, which differs with the batch (12 images, then 3)
        gaps = [np.abs(shown[i] - plain[4 * i + k]).max() for k in range(4)]
        assert gaps[c - 4 * i] <= 6 and gaps[c - 4 * i] < min(g for k, g in enumerate(gaps) if k != c - 4 * i), (i, gaps)
    assert together.trace.shape == (steps, 3)
    assert settings.icon_steps == 4 * 2 + 4 and settings.key_dict()["screen"] == 2
    assert "screen" not in Settings(steps=6, attempts=1, screen=2).key_dict()  # one seed: nothing to screen


def test_transformed_view_cosine_of_identity_views_is_the_exact_cosine(budget, cells):
    net, v, s = cells
    run = budget.measured(net, v[:2], s, 3, 3, (3,))
    exact = run["white"][-1]
    identity = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    got = budget.transformed_cosine(net, run["images_3"], np.repeat(v[:2], 4, 0), s, identity)
    np.testing.assert_allclose(got, exact, atol=0.02)  # the stored icons are rounded to uint8
    views = run["views_3"]
    assert views.shape == exact.shape and np.isfinite(views).all() and np.abs(views - exact).max() > 1e-4


def test_polish_runs_its_last_steps_without_transforms(budget, cells):
    net, v, s = cells
    run = budget.measured(net, v[:1], s, 4, 2, (4,), seeds=1, polish=2)
    assert run["trace"].shape == (4, 1) and run["white"].shape == (2, 1)


def test_spectra_of_an_icon_give_the_icon_back(budget):
    """The warm start begins at the parent's stored icon: the default parameterisation inverted (up to uint8 rounding)."""
    from atlas.render.param import default_param

    param = default_param([(0, 1, 0), (0, 2, 0)], 32)
    with torch.no_grad():
        param.inner.spectrum.mul_(40.0)  # a finished icon's contrast, not the start's near-grey
        icons = np.clip(np.rint(param().permute(0, 2, 3, 1).numpy() * 255.0), 0, 255).astype(np.uint8)
    assert icons.std() > 20
    back = default_param([(0, 1, 0), (0, 2, 0)], 32)
    with torch.no_grad():
        back.inner.spectrum.copy_(torch.from_numpy(budget.spectra_of(icons)))
        again = back().permute(0, 2, 3, 1).numpy() * 255.0
    assert np.abs(again - icons).max() <= 0.51


def test_warm_pairs_and_early_stop(budget):
    c20 = np.array([[0, 0], [1, 2], [3, 3]])
    c40 = np.array([[1, 1], [2, 5], [5, 0], [7, 6]])  # parents (0, 0), (1, 2), (2, 0) not measured, (3, 3)
    children, parents = budget.warm_pairs(c20, c40)
    assert children.tolist() == [0, 1, 3] and parents.tolist() == [0, 1, 2]
    trace = np.zeros((8, 2 * budget.SEEDS), np.float32)
    trace[:, 0] = np.minimum(np.arange(8), 2)  # icon 0 levels off at step 2: steps 4-5 no higher than 2-3 -> stops at 6
    trace[:, budget.SEEDS] = np.arange(8)  # icon 1 keeps rising
    cols, stop, mean = budget.early_stop({"trace": trace, "marks": np.array([2, 4, 6, 8])}, 2, 4)
    assert cols.tolist() == [0, budget.SEEDS] and stop.tolist() == [6, 8] and mean == 7
