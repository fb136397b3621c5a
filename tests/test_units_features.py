"""Feature visualisation per unit (atlas.units.features, atlas.render.regularizers, the pixel and alpha parameterisations).

The issue's tests, on the real BVLC GoogLeNet and the 1,000 shared photos. The photos' maxima cost one pass over
1,000 photos at 224 px (about a minute on two loaded cores), so they and the visualisations are module fixtures,
computed once, for two channels of mixed4c at 64 px with a few steps: the fewest that keep the comparison honest
(a visualisation that beats every photo at 64 px and 96-192 steps; the diverse sets pay for their
diversity with activation and get 128).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from atlas import store
from atlas.data import load_image, to_tensor
from atlas.errors import AtlasError
from atlas.render import objectives as obj
from atlas.render.optimize import layer_output, prepared
from atlas.render.param import alpha_image, pixel_image
from atlas.render.regularizers import (
    YOSINSKI_PRESETS,
    ClipContribution,
    ClipNorm,
    GaussianBlur,
    GradientAscent,
    L2Decay,
    _percentile_mask,
)
from atlas.units.features import grouped_diversity, unit_images, write_visualizations

LAYER = "mixed4c"
CHANNELS = [0, 300]
SIZE = 64
PIXEL_STEPS = 96
FFT_STEPS = 96
DIVERSE_STEPS = 128
ALPHA_STEPS = 192
N = 3


@pytest.fixture(scope="module")
def photo_max(net, photos) -> np.ndarray:
    """(C,) the maximum over the 1,000 photos and all positions of every mixed4c channel, photos at 224 px."""
    paths = sorted(Path(photos).glob("*.JPEG"))
    assert len(paths) == 1000
    best = None
    with torch.no_grad(), prepared(net, torch.device("cpu"), True):
        for lo in range(0, len(paths), 50):
            x = torch.stack([to_tensor(load_image(p)) for p in paths[lo:lo + 50]]).contiguous(memory_format=torch.channels_last)
            m = layer_output(net, LAYER, x).amax((0, 2, 3))
            best = m if best is None else torch.maximum(best, m)
    return best.numpy()


@pytest.fixture(scope="module")
def vis(net) -> dict:
    """kind -> (images (2, n, S, S, 3|4), objective (2, n)) for the two channels."""
    out = {}
    for kind in ("pixel", *YOSINSKI_PRESETS):
        out[kind] = unit_images(net, LAYER, CHANNELS, kind, size=SIZE, steps=PIXEL_STEPS)
    out["fft"] = unit_images(net, LAYER, CHANNELS, "fft", n=N, size=SIZE, steps=FFT_STEPS)
    out["diverse"] = unit_images(net, LAYER, CHANNELS, "diverse", n=N, size=SIZE, steps=DIVERSE_STEPS)
    out["alpha"] = unit_images(net, LAYER, CHANNELS, "alpha", size=SIZE, steps=ALPHA_STEPS)
    return out


def _acts(net, images: np.ndarray) -> torch.Tensor:
    """mixed4c activations of (n, S, S, 3) images, or of RGBA images composited over grey."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[1] == 4:
        x = x[:, :3] * x[:, 3:] + 0.5 * (1 - x[:, 3:])
    with torch.no_grad():
        return layer_output(net, LAYER, x.contiguous())


def _unit_max(net, images: np.ndarray, channel: int) -> np.ndarray:
    return _acts(net, images)[:, channel].flatten(1).amax(1).numpy()


# Yosinski et al.'s presets 1, 2 and 4 do not reach the photos' maxima on GoogLeNet's mixed4c under the paper's own step
# rules (measured at 80 px, 256 steps, channels 0, 100, 300: at most 98, 228 and 54 against photo maxima of 205, 541, 308):
# "progress" raises the objective by 2 per step before the clips undo part of it, and a decay of 0.3 per step settles
# early. The kinds below do; docs/units.md reports the figures.
@pytest.mark.parametrize("kind", ["fft", "pixel", "yosinski-3", "alpha", "diverse"])
def test_each_visualisation_beats_every_photo(net, photo_max, vis, kind):
    images, objective = vis[kind]
    for i, c in enumerate(CHANNELS):
        best = _unit_max(net, images[i], c)
        assert (best > photo_max[c]).all(), (kind, c, best, photo_max[c])
        assert np.isfinite(objective[i]).all() and (objective[i] > 0).all()


def _high_frequency_power(images: np.ndarray, radius: float = 0.25) -> float:
    """Mean FFT power above ``radius`` cycles per pixel of the images minus their mean colour."""
    x = images[..., :3].astype(np.float64)
    x = x - x.mean((-3, -2), keepdims=True)
    p = np.abs(np.fft.fft2(x, axes=(-3, -2))) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(x.shape[-3]), np.fft.fftfreq(x.shape[-2]), indexing="ij"))
    return float(p[..., f > radius, :].mean())


@pytest.mark.parametrize("kind", list(YOSINSKI_PRESETS))
def test_regularised_presets_have_less_high_frequency_energy_than_plain_pixel_ascent(vis, kind):
    plain = _high_frequency_power(vis["pixel"][0])
    assert _high_frequency_power(vis[kind][0]) < 0.5 * plain


def _mean_pairwise(cos: torch.Tensor) -> float:
    off = ~torch.eye(cos.shape[0], dtype=torch.bool)
    return float(cos[off].mean())


def test_diversity_lowers_the_similarity_of_a_set_against_independent_runs(net, vis):
    for i, _c in enumerate(CHANNELS):
        independent = _mean_pairwise(obj.gram_cosines(_acts(net, vis["fft"][0][i])))
        diverse = _mean_pairwise(obj.gram_cosines(_acts(net, vis["diverse"][0][i])))
        assert diverse < independent - 0.1, (independent, diverse)


def test_grouped_diversity_is_lucids_diversity_within_each_set():
    torch.manual_seed(0)
    acts = torch.rand(6, 8, 3, 3)
    state = obj.State({LAYER: acts}, None, LAYER)
    grouped = grouped_diversity(3, LAYER).fn(state)
    for lo in (0, 3):
        plain = obj.diversity(LAYER).fn(obj.State({LAYER: acts[lo:lo + 3]}, None, LAYER))
        torch.testing.assert_close(grouped[lo:lo + 3], plain)
    # an image whose gate is not positive is left out of its set, and gets no diversity gradient
    gate = obj.Objective(lambda s: torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]), "gate")
    leaf = acts.clone().requires_grad_(True)
    gated = grouped_diversity(3, LAYER, gate).fn(obj.State({LAYER: leaf}, None, LAYER))
    assert gated[2] == 0
    gated.sum().backward()
    assert leaf.grad[2].abs().max() == 0 and leaf.grad[0].abs().max() > 0


def test_alpha_images_are_rgba_and_not_all_opaque(vis):
    images, _ = vis["alpha"]
    assert images.shape == (len(CHANNELS), 1, SIZE, SIZE, 4)
    alpha = images[..., 3]
    assert (alpha < 0.9).mean() > 0.25  # a substantial part is see-through
    assert (alpha > 0.5).mean() > 0.02  # and the unit earned some opacity


def test_alpha_composite_depends_on_the_background_only_where_transparent():
    param = alpha_image([(0, 1, 0)], 32, backgrounds=("fft", "noise", "solid"))
    with torch.no_grad():
        param.alpha_spectrum[:, :, 0, 0, 0] = 200.0  # a large DC term: alpha -> 1 everywhere
        a, b = param(), param()  # two random backgrounds
        assert float(param.alpha().min()) > 0.999
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
        param.alpha_spectrum[:, :, 0, 0, 0] = -200.0  # fully transparent: the composite is the background
        assert float((param() - param()).abs().max()) > 0.05
        param.eval()
        torch.testing.assert_close(param(), torch.full((1, 3, 32, 32), 0.5), atol=1e-3, rtol=0)


def test_regularisers_do_what_the_paper_says():
    x = torch.randn(3, 1, 17, 13)
    for p in (20, 33.3, 50, 90):  # the toolbox's numpy percentile (linear interpolation), strictly below
        want = x.flatten(1).numpy() < np.percentile(x.flatten(1).numpy(), p, axis=1, keepdims=True)
        np.testing.assert_array_equal(_percentile_mask(x, p).flatten(1).numpy(), want)
    d = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(L2Decay(0.3)(0, d, None), 0.7 * d)
    blurred = GaussianBlur(1.0, 4)(0, d, None)
    assert GaussianBlur(1.0, 4)(1, d, None) is d  # only every 4th step
    assert float(blurred.std()) < 0.6 * float(d.std())
    torch.testing.assert_close(GaussianBlur(1.0, 4)(0, torch.full((1, 3, 8, 8), 0.3), None), torch.full((1, 3, 8, 8), 0.3))
    clipped = ClipNorm(50)(0, d, None)
    norms, kept = d.norm(dim=1), clipped.norm(dim=1) > 0
    assert kept.flatten(1).sum(1).tolist() == [128, 128]  # half the pixels of each image survive
    for i in range(2):
        assert float(norms[i][kept[i]].min()) >= float(norms[i][~kept[i]].max())
    grad = torch.randn_like(d)
    contrib = (d * grad).sum(1).abs()
    kept = ClipContribution(90)(0, d, grad).abs().sum(1) > 0
    for i in range(2):
        assert 24 <= int(kept[i].sum()) <= 26  # the top 10% of 256 pixels by |sum_c x * grad|
        assert float(contrib[i][kept[i]].min()) >= float(contrib[i][~kept[i]].max())


def test_gradient_ascent_steps_in_the_papers_pixel_units():
    p = torch.nn.Parameter(torch.zeros(2, 3, 4, 4))
    p.grad = -torch.ones_like(p) * 255.0  # the loop minimises -objective: an objective gradient of 255 per [0, 1] unit
    GradientAscent([p], lr=100.0).step()
    torch.testing.assert_close(p.data, torch.full_like(p, 100.0 / 255.0))  # 100 * (gradient 1 per paper unit) / 255
    q = torch.nn.Parameter(torch.zeros(1, 3, 4, 4))
    q.grad = -torch.ones_like(q) * 255.0
    GradientAscent([q], policy="progress", max_lr=1e8, desired_progress=2.0).step()
    gain = float((q.data * 255.0).sum())  # objective change = g_paper . step_paper (g_paper = 1 everywhere)
    assert gain == pytest.approx(2.0, rel=1e-5)


def test_pixel_image_starts_at_the_mean_plus_noise_independent_of_the_batch():
    a = pixel_image([(0, 5, 0), (0, 6, 0)], 32)
    b = pixel_image([(0, 6, 0)], 32)
    torch.testing.assert_close(a.pixels[1], b.pixels[0])
    mean = a.pixels.detach().mean((0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor([0.485, 0.456, 0.406]), atol=0.01, rtol=0)
    assert 0.02 < float(a.pixels.detach().std()) < 0.06


def _tiny_store(tmp_path: Path) -> Path:
    from conftest import WEIGHTS

    run = tmp_path / "run"
    root = store.open_store(run, "w")
    root.attrs.update({"model": "inceptionv1", "weights": str(WEIGHTS)})
    return run


def test_write_visualizations_stores_resumes_and_refuses_bad_channels(net, tmp_path):
    run = _tiny_store(tmp_path)
    first = write_visualizations(run, LAYER, kinds=["fft", "alpha"], channels=[3, 5], size=32, steps=3, batch=1, progress=False,
                                 net=net)
    assert first["fft"]["computed"] == 2 and first["alpha"]["computed"] == 2
    root = store.open_store(run)
    g = root[f"units/{LAYER}/vis/alpha"]
    assert g["image"].shape == (512, 1, 32, 32, 4) and g["image"].dtype == np.uint8
    assert g["done"][:].nonzero()[0].tolist() == [3, 5]
    assert root[f"units/{LAYER}/vis/fft/image"].shape == (512, 1, 32, 32, 3)
    assert np.isfinite(g["objective"][[3, 5]]).all() and np.isnan(g["objective"][4]).all()
    kept = g["image"][3].copy()
    again = write_visualizations(run, LAYER, kinds=["alpha"], channels=[3, 5, 7], size=32, steps=3, progress=False, net=net)
    assert (again["alpha"]["computed"], again["alpha"]["skipped"]) == (1, 2)
    np.testing.assert_array_equal(store.open_store(run)[f"units/{LAYER}/vis/alpha/image"][3], kept)  # nothing redone
    other = write_visualizations(run, LAYER, kinds=["alpha"], channels=[3], size=32, steps=4, progress=False, net=net)
    assert other["alpha"]["computed"] == 1  # other settings: the kind is recomputed
    assert store.open_store(run)[f"units/{LAYER}/vis/alpha/done"][:].nonzero()[0].tolist() == [3]
    assert not store.read_ledger(run)["writing"]
    with pytest.raises(AtlasError, match=r"channel 512 is out of range: layer 'mixed4c' has 512 channels") as e:
        write_visualizations(run, LAYER, kinds=["fft"], channels=[512], steps=1, progress=False, net=net)
    assert "\n" not in str(e.value)
    with pytest.raises(AtlasError, match="unknown visualisation kind 'blurry'"):
        write_visualizations(run, LAYER, kinds=["blurry"], steps=1, progress=False, net=net)
    with pytest.raises(AtlasError, match=r"logits.*no spatial positions.*mixed4c"):
        write_visualizations(run, "logits", kinds=["fft"], steps=1, progress=False, net=net)


@pytest.mark.parametrize("unit", ["channel", "neuron"])
def test_the_returned_objective_is_the_units_activation_on_the_finished_image(net, unit):
    images, objective = unit_images(net, LAYER, [7, 9], "pixel", n=2, size=32, steps=3, objective=unit)
    assert images.shape == (2, 2, 32, 32, 3) and objective.shape == (2, 2)
    acts = _acts(net, images.reshape(4, 32, 32, 3))
    h, w = acts.shape[2:]
    for k, c in enumerate([7, 7, 9, 9]):
        want = acts[k, c].mean() if unit == "channel" else acts[k, c, h // 2, w // 2]
        assert objective.flatten()[k] == pytest.approx(float(want), rel=1e-4, abs=1e-4)
    with pytest.raises(AtlasError, match="unknown unit objective 'cell'"):
        unit_images(net, LAYER, [7], "pixel", steps=1, objective="cell")
