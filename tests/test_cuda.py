"""The CUDA code paths against the CPU, on the same inputs: sampling, rendering and a small build.

Every test here runs only where ``torch.cuda.is_available()``; elsewhere each is skipped with
that reason (the machines this project has run on have no GPU, so these tests have never run).
Tolerances, and why:

- sampling: activations and attributions are float32 arithmetic on both devices (with
  attribution the sampler always runs float32), stored as float16, so rows must agree to a
  cosine of 0.999 (cuDNN picks other convolution algorithms and, on Ampere and later, TF32
  for convolutions, the PyTorch default, which keeps about 3 decimal digits); the top-1 class
  must agree for almost every image (a near tie may flip).
- sampling without attribution: ``precision="auto"`` is bfloat16 on CUDA (float32 on CPUs
  without native bf16), which keeps a cosine of ~0.9999 to float32 (see bench/sample.py), so
  0.995 here.
- rendering: the same directions, seeds and transforms in float32 with TF32 off, so the two
  devices do the same computation up to summation order. Adam's first steps are nearly
  sign(gradient) steps, so pixel-exact agreement is not expected; a few steps give nearly the
  same icons (mean absolute pixel difference below 0.02 of the range), and after 48 steps
  the icons reach the same cosine to their directions (within 0.05 each, 0.02 on average).
- build: the whole pipeline with sample and render on CUDA and on CPU, from the same photos:
  same samples and cells, icons of the same quality (mean cosine within 0.05).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from conftest import WEIGHTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False); the CUDA paths are untested here")

LAYER = "mixed4c"


def _rows_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _store(run) -> zarr.Group:
    return zarr.open_group(str(run / "store.zarr"), mode="r")


@pytest.fixture
def float32_exact():
    """TF32 off for matrix products and convolutions, so float32 on CUDA means float32 (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, photo_list):
    """The same 18 photos sampled (with attribution, 2 positions each, two layers) on CPU and on CUDA."""
    from atlas.sample import sample

    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = tmp_path_factory.mktemp(f"sample-{device}") / "run"
        sample(photo_list, [LAYER, "mixed5b"], runs[device], weights=WEIGHTS, per_image=2, workers=0, batch_size=8, device=device,
               progress=False)
    return runs


def test_sample_on_cuda_matches_cpu(sampled):
    cpu, gpu = _store(sampled["cpu"]), _store(sampled["cuda"])
    assert gpu.attrs["weights_sha256"] == cpu.attrs["weights_sha256"]
    for layer in (LAYER, "mixed5b"):
        valid = cpu[f"samples/{layer}/valid"][:]
        assert valid.all() and (gpu[f"samples/{layer}/valid"][:] == valid).all()
        # the positions are drawn from the seed and image index alone: identical on both devices
        assert (gpu[f"samples/{layer}/position"][:] == cpu[f"samples/{layer}/position"][:]).all()
        acts = _rows_cosine(cpu[f"samples/{layer}/activations"][:], gpu[f"samples/{layer}/activations"][:])
        attrs = _rows_cosine(cpu[f"samples/{layer}/attributions"][:], gpu[f"samples/{layer}/attributions"][:])
        assert acts.min() > 0.999, (layer, acts.min())
        assert attrs.min() > 0.99, (layer, attrs.min())
    top1_cpu, top1_gpu = cpu["images/top5"][:, 0], gpu["images/top5"][:, 0]
    assert (top1_cpu == top1_gpu).mean() >= 0.9, (top1_cpu, top1_gpu)


def test_sample_without_attribution_on_cuda_matches_cpu(sampled, photo_list, tmp_path):
    from atlas.sample import sample

    run = tmp_path / "run"
    sample(photo_list, [LAYER], run, weights=WEIGHTS, per_image=2, workers=0, batch_size=8, device="cuda", attribution=False,
           progress=False)  # precision "auto": bfloat16 where CUDA supports it
    cpu, gpu = _store(sampled["cpu"]), _store(run)
    acts = _rows_cosine(cpu[f"samples/{LAYER}/activations"][:], gpu[f"samples/{LAYER}/activations"][:])
    assert acts.min() > 0.995, acts.min()


def _directions(sampled, n: int = 6) -> torch.Tensor:
    """n real directions: activations of the first n samples of the CPU run."""
    return torch.from_numpy(_store(sampled["cpu"])[f"samples/{LAYER}/activations"][:n].astype(np.float32))


def test_render_steps_on_cuda_match_cpu(net, sampled, float32_exact):
    from atlas.render.objectives import Direction
    from atlas.render.optimize import Settings, optimize

    settings = Settings(size=64, steps=4, precision="fp32")
    v = _directions(sampled)
    seeds = [(0, i, 0) for i in range(len(v))]
    cpu = optimize(net, LAYER, Direction(v), seeds, settings, "cpu")
    gpu = optimize(net, LAYER, Direction(v), seeds, settings, "cuda")
    assert gpu.images.shape == cpu.images.shape and np.isfinite(gpu.images).all()
    assert np.abs(gpu.images - cpu.images).mean() < 0.02
    assert np.allclose(gpu.trace[0], cpu.trace[0], rtol=1e-3, atol=1e-3)  # step 0: the same images, the same objective
    assert next(net.module.parameters()).device.type == "cpu"  # the renderer put the model back where it was


def test_render_on_cuda_reaches_the_cpu_quality(net, sampled, float32_exact):
    from atlas.render.optimize import Settings, visualize

    settings = Settings(precision="fp32")
    v = _directions(sampled, 4)
    cpu = visualize(net, LAYER, v, size=48, steps=48, settings=settings, device="cpu")
    gpu = visualize(net, LAYER, v, size=48, steps=48, settings=settings, device="cuda")
    assert np.abs(gpu.cosine - cpu.cosine).max() < 0.05, (cpu.cosine, gpu.cosine)
    assert abs(gpu.cosine.mean() - cpu.cosine.mean()) < 0.02, (cpu.cosine, gpu.cosine)


def test_screened_render_on_cuda_keeps_the_cpu_seeds(net, sampled, float32_exact):
    """Successive halving on the GPU: the kept rows' parameters, Adam state and objective move with the batch on the
    device; the same seeds go on as on the CPU and the icons agree."""
    from atlas.render.objectives import Direction
    from atlas.render.optimize import Settings, best_icons

    settings = Settings(size=48, steps=8, attempts=3, screen=4, precision="fp32")
    v = _directions(sampled, 3)
    seeds = [(0, i, a) for i in range(len(v)) for a in range(3)]
    objective = Direction(v.repeat_interleave(3, 0))
    cpu = best_icons(net, LAYER, objective, seeds, settings, "cpu")
    gpu = best_icons(net, LAYER, objective, seeds, settings, "cuda")
    assert gpu.images.shape == cpu.images.shape == (3, 48, 48, 3) and np.isfinite(gpu.images).all()
    assert np.abs(gpu.images - cpu.images).mean() < 0.02
    assert np.allclose(gpu.trace[:4], cpu.trace[:4], rtol=1e-2, atol=1e-2)


def test_small_build_on_cuda_matches_cpu(photo_list, tmp_path):
    from atlas.build import build, load_config, merge

    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = tmp_path / device
        config = merge(load_config(None), {
            "run": {"images": str(photo_list), "out": str(runs[device]), "layers": [LAYER]},
            "sample": {"weights": str(WEIGHTS), "per_image": 4, "workers": 0, "device": device},
            "project": {"n_neighbors": 10},
            "grid": {"sizes": [4], "min_count": 1},
            "render": {"quality": "draft", "steps": 32, "size": 32, "device": device},
            "tiles": {"examples": False},
        })
        result = build(config, echo=lambda *_: None)
        assert result.ran == ["sample", "project", "grid", "render", "tiles"]
    cpu, gpu = _store(runs["cpu"]), _store(runs["cuda"])
    assert gpu[f"samples/{LAYER}/valid"][:].sum() == cpu[f"samples/{LAYER}/valid"][:].sum() == 72
    acts = _rows_cosine(cpu[f"samples/{LAYER}/activations"][:], gpu[f"samples/{LAYER}/activations"][:])
    assert acts.min() > 0.999
    icons = {d: s[f"icons/{LAYER}/full/4"] for d, s in (("cpu", cpu), ("cuda", gpu))}
    for d, group in icons.items():
        render = (cpu if d == "cpu" else gpu)[f"grids/{LAYER}/full/4/render"][:]
        assert render.any() and group["done"][:][render].all(), d
    mean = {d: float(np.nanmean(g["cosine"][:][g["done"][:]])) for d, g in icons.items()}
    assert abs(mean["cuda"] - mean["cpu"]) < 0.05, mean
    assert (runs["cuda"] / "tiles" / "index.html").is_file() and list((runs["cuda"] / "tiles").rglob("*.dzi"))
