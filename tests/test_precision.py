"""The precision policy (docs/precision.md) with bfloat16 forced, so that every CPU runs the bfloat16 code paths.

Where bf16 is emulated (no avx512_bf16/AMX) these passes are several times slower than float32: the run is kept tiny
(8 photos x 4 positions). Tolerances against float32 are derived from bfloat16's 8-bit significand: one rounding is a
relative error of at most 2**-8 (0.4%); through the ~10 rounded layers below mixed4c the maxima stay within 3%.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_run import CONFIG, build_tiny, cli, copy_run, one_line

import atlas.models.precision as precision_module
from atlas import store
from atlas.errors import AtlasError
from atlas.inspect.engine import read_image
from atlas.inspect.onatlas import image_positions, place_on_atlas
from atlas.models.inference import run_activations, run_kernels
from atlas.models.precision import autocast_dtype, resolve_precision, run_precision
from atlas.render.objectives import direction
from atlas.render.optimize import Optimization, Settings
from atlas.units.topk import top_examples

LAYER = "mixed4c"
BF16_ULP = 2.0 ** -8  # bfloat16's relative rounding step
DRIFT = 0.03  # relative distance of a bfloat16 activation from the float32 one, after the layers below mixed4c


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos):
    """The tiny run (8 photos x 4 positions, no attribution) sampled in bfloat16 on any CPU."""
    cfg = tmp_path_factory.mktemp("cfg") / "bf16.toml"
    cfg.write_text(CONFIG.replace("attribution = false", 'attribution = false\nprecision = "bfloat16"'))
    return build_tiny(tmp_path_factory, photos, cfg)


def _photos(run) -> torch.Tensor:
    root = store.open_store(run)
    prep = store.attrs(root)["preprocessing"]
    return torch.stack([read_image(str(p), int(prep["resize"]), int(prep["crop"]))[0] for p in root["images/path"][:]])


def test_auto_is_bfloat16_only_where_it_is_native(monkeypatch):
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(precision_module, "native_bf16", lambda device, native=native: native)
        assert resolve_precision("auto", "cpu") == want
        assert autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    assert [resolve_precision(p, "cpu") for p in ("fp32", "float32", "bf16", "bfloat16")] == ["float32"] * 2 + ["bfloat16"] * 2
    with pytest.raises(AtlasError, match="unknown precision 'half'"):
        resolve_precision("half", "cpu")
    assert run_precision({}) == "float32"  # a run from before the precision was recorded
    assert run_kernels({"precision": "bfloat16", "forward": "nchw"}) == ("bfloat16", "nchw")
    with pytest.raises(AtlasError, match="unknown precision"):
        run_precision({"precision": "int8"})


def test_the_run_records_bfloat16_and_stores_what_its_kernels_compute(run, net):
    root = store.open_store(run)
    meta = store.attrs(root)
    assert (meta["precision"], meta["forward"]) == ("bfloat16", "fused") and run_kernels(meta) == ("bfloat16", "fused")
    samples = root[f"samples/{LAYER}"]
    stored = samples["activations"][:].astype(np.float32)
    image, pos = samples["image_index"][:], samples["position"][:]
    x = _photos(run)
    bf16 = run_activations(net, x, [LAYER], "bfloat16")[LAYER].float().numpy()
    fp32 = run_activations(net, x, [LAYER], "float32")[LAYER].numpy()
    at = (image, slice(None), pos[:, 0], pos[:, 1])
    # the stored rows are the bfloat16 pass's, to the float16 storage's rounding (2**-11) ...
    np.testing.assert_allclose(stored, bf16[at], rtol=2.0 ** -10, atol=1e-3)
    # ... near the float32 values, and truly not them: off by more than float16 storage explains
    cos = (stored * fp32[at]).sum(1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(fp32[at], axis=1)
    assert cos.min() > 0.999
    assert np.abs(stored - fp32[at]).max() > 2.0 ** -10 * np.abs(fp32[at]).max()


def test_the_top_k_pass_ranks_the_runs_own_bfloat16_activations(run, net, tmp_path):
    run = copy_run(run, tmp_path)
    top_examples(run, [LAYER], k=3, channels="0-31", batch_size=4, workers=0, progress=False, net=net)
    g = store.open_store(run)[f"units/{LAYER}/top"]
    value, image = g["value"][:32], g["image"][:32]
    x = _photos(run)
    best = {p: run_activations(net, x, [LAYER], p)[LAYER].float().amax((2, 3))[:, :32].numpy().T for p in ("bfloat16", "float32")}
    # the maxima are the run's bfloat16 activations (one bfloat16 rounding apart at most: other batch compositions) ...
    np.testing.assert_allclose(value[:, 0], best["bfloat16"].max(1), rtol=BF16_ULP, atol=1e-3)
    # ... and within bfloat16's drift of float32's
    np.testing.assert_allclose(value[:, 0], best["float32"].max(1), rtol=DRIFT, atol=1e-2)
    clear = np.sort(best["bfloat16"], 1)[:, -1] > np.sort(best["bfloat16"], 1)[:, -2] * (1 + 4 * BF16_ULP)
    assert clear.sum() >= 16  # most channels have a clear winner, and there the ranking is the bfloat16 one
    assert np.array_equal(image[clear, 0], best["bfloat16"].argmax(1)[clear])


def test_an_image_inspected_against_its_bfloat16_run_lands_on_its_own_samples(run, net):
    root = store.open_store(run)
    samples = root[f"samples/{LAYER}"]
    image_index, position = samples["image_index"][:], samples["position"][:]
    rows = root[f"layouts/{LAYER}/full/rows"][:]
    x = _photos(run)
    for i in (0, 5):
        acts, _, (h, w), _ = image_positions(net, x[i], LAYER, arithmetic=run_kernels(store.attrs(root)))
        placement = place_on_atlas(run, LAYER, acts, k=8, net=net)
        for row in np.flatnonzero(image_index == i):
            p = int(position[row, 0]) * w + int(position[row, 1])
            assert placement.exact[p] and placement.neighbours[p, 0] == row and rows[np.searchsorted(rows, row)] == row
        assert placement.exact.sum() == 4
        # in float32 the same photo is other numbers: its own samples are no longer recognised as the same activation
        acts32, _, _, _ = image_positions(net, x[i], LAYER)
        assert place_on_atlas(run, LAYER, acts32, k=8, net=net).exact.sum() < 4


def test_auto_resumes_a_bfloat16_run_in_bfloat16_on_any_cpu(run, net, tmp_path, monkeypatch, photos):
    from atlas.sample import sample

    run = copy_run(run, tmp_path)
    root = store.open_store(run, "r+")
    want = root[f"samples/{LAYER}/activations"][:]
    flags = root["images/shard_done"]
    flags[...] = np.zeros(flags.shape, bool)  # every shard to be sampled again
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: False)  # a CPU where "auto" means float32
    # a resume with the run's own settings: "auto" keeps the recorded bfloat16 instead of refusing the folder
    kept = dict(store.attrs(store.open_store(run)))
    sample(photos, [LAYER], run, max_images=8, per_image=4, attribution=False, batch_size=8, workers=0, progress=False, net=net,
           precision="auto")
    root = store.open_store(run)
    assert store.attrs(root)["precision"] == "bfloat16" and store.attrs(root)["image_list_hash"] == kept["image_list_hash"]
    np.testing.assert_array_equal(root[f"samples/{LAYER}/activations"][:], want)
    # an explicit other precision is one line naming it
    result = cli("sample", "--images", photos, "--layer", LAYER, "--out", run, "--max-images", 8, "--per-image", 4,
                 "--no-attribution", "--workers", 0, "--batch-size", 8, "--precision", "float32")
    one_line(result, "precision", "bfloat16")


def test_icons_optimised_in_bfloat16_are_scored_in_float32(net):
    """bfloat16 steps, float32 verdict: the kept attempt and the reported cos/objective are the float32 ones."""
    rng = np.random.default_rng(0)
    v = torch.from_numpy(rng.random((2, 512), dtype=np.float32))
    settings = Settings(size=24, steps=3, precision="bfloat16")
    opt = Optimization(net, LAYER, direction(LAYER, v), [(0,), (1,)], settings)
    assert opt.dtype == torch.bfloat16
    opt.step()
    result = opt.result()
    with torch.no_grad():  # the finished icons through the float32 model, outside the optimisation
        h = net.activations(opt.param(), [LAYER])[LAYER]
        assert h.dtype == torch.float32
        cos, value = opt.objective.cosine(h).numpy(), opt.objective(h).numpy()
    np.testing.assert_allclose(result.cosine, cos, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.objective, value, rtol=1e-4, atol=1e-4)
