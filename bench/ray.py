"""Benchmark: sample and render locally against the same stages on Ray with 2 workers, on this machine.

One run, figures printed side by side. Sample: ``--images`` photos (default 64 shared ones) with attribution, in
shards of ``--shard`` images, once in this process (``engine="local"``) and once on a local Ray cluster
(``ray.init(num_cpus=2)``, two actors, one model each). Render: the icons of a 4x4 grid of that run (PCA layout,
min_count 1), ``--steps`` steps at ``--size`` px, in batches of ``--batch`` cells, locally and on Ray. Both
stores are compared array by array (they must be equal). Ray's start is timed apart from the stages: a cluster
is started once and serves every stage.

(-P: bench/ holds an inspect.py that would shadow the standard library module of that name.)

The target (issue 17): Ray with 2 workers on these 2 cores at least 0.8x the local speed; this measures the
engine's overhead, not a speed-up (the local run already uses both cores through torch's threads). The machine
is shared: ``uptime`` is printed before and after.

    .venv/bin/python -P bench/ray.py [--images 64] [--shard 16] [--steps 32] [--size 80] [--batch 4]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from atlas import store
from atlas.engine import NAMESPACE, Engine

LAYER = "mixed4c"
SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "data" / "imagenet-samples"
WEIGHTS = SHARED / "models" / "bvlc_googlenet.safetensors"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def same(a: Path, b: Path, node: str) -> bool:
    ra, rb = store.open_store(a), store.open_store(b)
    names = [name for name, _ in ra[node].arrays()]
    return all(np.array_equal(ra[f"{node}/{n}"][...], rb[f"{node}/{n}"][...], equal_nan=ra[f"{node}/{n}"].dtype.kind == "f")
               for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--shard", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    import ray
    import torch

    from atlas.grid import grid
    from atlas.layout import project
    from atlas.render import render
    from atlas.sample import sample

    print(f"load before: {uptime()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ray {ray.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="atlas-bench-ray-"))
    try:
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False,
                 namespace=NAMESPACE, logging_level=logging.ERROR)
        ray_start = time.perf_counter() - start
        engine = Engine("ray", workers=2)

        kwargs = {"weights": WEIGHTS, "max_images": args.images, "shard_size": args.shard, "batch_size": 16, "workers": 0,
                  "progress": False}
        t = time.perf_counter()
        sample(PHOTOS, [LAYER], tmp / "local", **kwargs)
        sample_local = time.perf_counter() - t
        t = time.perf_counter()
        sample(PHOTOS, [LAYER], tmp / "ray", engine=engine, **kwargs)
        sample_ray = time.perf_counter() - t
        sample_same = same(tmp / "local", tmp / "ray", f"samples/{LAYER}") and same(tmp / "local", tmp / "ray", "images")

        project(tmp / "local", LAYER, method="pca")
        grid(tmp / "local", LAYER, [4], min_count=1)
        shutil.copytree(tmp / "local", tmp / "render-ray")
        rkw = {"quality": "draft", "steps": args.steps, "size": args.size, "batch": args.batch, "progress": False}
        t = time.perf_counter()
        local = render(tmp / "local", LAYER, [4], **rkw)[4]
        render_local = time.perf_counter() - t
        t = time.perf_counter()
        render(tmp / "render-ray", LAYER, [4], engine=engine, **rkw)
        render_ray = time.perf_counter() - t
        render_same = same(tmp / "local", tmp / "render-ray", f"icons/{LAYER}/full/4")
        icons = local["rendered_now"]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"load after:  {uptime()}")
    print(f"Ray start (ray.init, once per session): {ray_start:.1f} s")
    print(f"{'stage':<8} {'work':<40} {'local s':>8} {'ray s':>8} {'ray/local speed':>16} {'equal':>6}")
    work = f"{args.images} photos, attribution, shards of {args.shard}"
    print(f"{'sample':<8} {work:<40} {sample_local:8.1f} {sample_ray:8.1f} {sample_local / sample_ray:15.2f}x {sample_same!s:>6}")
    work = f"{icons} icons, {args.steps} steps, {args.size} px, batch {args.batch}"
    print(f"{'render':<8} {work:<40} {render_local:8.1f} {render_ray:8.1f} {render_local / render_ray:15.2f}x {render_same!s:>6}")
    per_image = sample_local / args.images
    per_step = render_local / (icons * args.steps)
    print(f"measured local CPU costs (2 cores, this load): {per_image:.2f} s per image with attribution, "
          f"{per_step * 1000:.1f} ms per icon step at {args.size} px ({per_step * 1024 * 4:.0f} s per paper icon: 1,024 steps x 4 "
          "attempts, extrapolated)")


if __name__ == "__main__":
    main()
