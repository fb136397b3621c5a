"""The icons-per-compute bench's strategies: each icon is a function of its own cell (and parent) only, whatever else is
rendered beside it, and the warm start really starts from the parent's icon."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import PHOTOS, REPO, WEIGHTS, require_shared

from atlas.data import load_image, to_tensor

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


def test_screen_keeps_each_cells_best_seed_and_ignores_its_batch(budget, cells):
    net, children, _, s = cells
    together = budget.screen(net, children, s, 3, 2, 3)
    alone = budget.screen(net, children[1:2], s, 3, 2, 3)
    np.testing.assert_array_equal(together.images[1], alone.images[0])
    # the kept icon is the plain run of the seed whose short trial scored highest
    trial = budget.run(net, children[:1], s, 2, 3)
    digest = budget._digest(children[0].tobytes())
    scores = [budget.run(net, children[:1], s, 2, 1, seeds=[(0, digest, k)]).objective[0] for k in range(3)]
    assert trial.objective[0] == pytest.approx(max(scores), rel=1e-5)
    best = budget.run(net, children[:1], s, 3, 1, seeds=[(0, digest, int(np.argmax(scores)))])
    np.testing.assert_array_equal(together.images[0], best.images[0])


def test_warm_start_begins_at_the_parent_icon_and_ignores_its_batch(budget, cells):
    net, children, parents, s = cells
    together = budget.warm(net, children, parents, s, 4, 2)
    alone = budget.warm(net, children[2:], parents[2:], s, 4, 2)
    np.testing.assert_array_equal(together.images[2], alone.images[0])
    # one child step from the parent's icon stays near the parent's icon; a cold start is far from it
    parent = budget.run(net, parents[:1], s, 4, 1, seeds=[(0, budget._digest(parents[0].tobytes()), 0)])
    warm1 = budget.warm(net, children[:1], parents[:1], s, 4, 1)
    cold1 = budget.run(net, children[:1], s, 1, 1)
    near, far = np.abs(warm1.images - parent.images).mean(), np.abs(cold1.images - parent.images).mean()
    assert near < 0.5 * far, (near, far)
    assert np.isfinite(together.cosine_whitened).all() and together.images.shape == (3, 32, 32, 3)
