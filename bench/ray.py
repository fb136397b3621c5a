"""Benchmark: sample and render locally against the same stages on Ray, every engine variant side by side, one run.

Sample: ``--images`` photos (default 512 shared ones) with attribution, in shards of ``--shard`` (64) images. Render:
the icons of a ``--grid`` x ``--grid`` grid (default 10) of that run (PCA layout, min_count 1), ``--steps`` steps
(64) at ``--size`` px, in batches of ``--batch`` cells. (At the first defaults, 32 photos and a 4x4 grid at 32
steps, a local stage took 4-6 s: Ray's fixed cost per stage, 3-4 s until the actors answer and a model load each,
was most of what the bench measured.) For every Ray variant each stage runs locally (``engine="local"``, this process, both cores
through torch's threads) and right after it on one local Ray cluster (``ray.init(num_cpus=2)``, started once; its
start is timed apart): each pair sees the same load of this shared machine, and the ratio is the pair's. An untimed
2-image sample first takes the imports and the file cache out of the first pair. Every Ray store is compared with a
local one array by array (they must be equal: "equal" is printed per row).

The variants (``atlas.engine.Engine`` settings; every actor runs the driver's torch thread count, 2 here, for
bit-identical results, so 2 actors run 4 threads on 2 cores):

- ``2 actors, spin``: 2 workers of 1 CPU each, OpenMP's default waiting (busy-waits at barriers); the engine before
  ``ACTOR_ENV``;
- ``2 actors``: the same with ``OMP_WAIT_POLICY=PASSIVE`` in the actors (the engine's default ``ACTOR_ENV``);
- ``2 actors, depth 1``: the same with one unit in flight per actor instead of 2;
- ``2 actors, decode in loader`` (sample only): each actor decodes its shard in 1 DataLoader worker process
  (``workers=1``) instead of in the actor (``workers=0``, as the local run and the other rows);
- ``1 actor per node``: one actor reserving both cores (``cpus=2``): one model per node, no oversubscription, so
  OpenMP's default waiting (the engine sets PASSIVE only where threads outnumber the CPUs). Not "2 workers": a
  separate mode, for CPU clusters.

The target (issue 17): Ray with 2 workers on these 2 cores at least 0.8x the local speed. This measures the
engine's overhead, not a speed-up (the local run already uses both cores). The machine is shared: ``uptime`` is
printed before and after; run it on a quiet machine (1-minute load below 1.5).

(-P: bench/ holds an inspect.py that would shadow the standard library module of that name.)

    .venv/bin/python -P bench/ray.py [--images 512] [--shard 64] [--steps 64] [--size 80] [--batch 4] [--grid 10]
        [--variants '2 actors,1 actor per node']
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

# (row name, Engine keyword arguments, sample's DataLoader workers or None when the row is not a sample row)
VARIANTS = [
    ("2 actors, spin", {"workers": 2, "env": {}}, 0),
    ("2 actors", {"workers": 2}, 0),
    ("2 actors, depth 1", {"workers": 2, "depth": 1}, 0),
    ("2 actors, decode in loader", {"workers": 2}, 1),
    ("1 actor per node", {"cpus": 2}, 0),
]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def same(a: Path, b: Path, node: str) -> bool:
    ra, rb = store.open_store(a), store.open_store(b)
    names = [name for name, _ in ra[node].arrays()]
    return all(np.array_equal(ra[f"{node}/{n}"][...], rb[f"{node}/{n}"][...], equal_nan=ra[f"{node}/{n}"].dtype.kind == "f")
               for n in names)


def timed(call, *args, **kwargs) -> float:
    """Seconds ``call(*args, **kwargs)`` took."""
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shard", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grid", type=int, default=10, help="render the icons of this grid size (min_count 1)")
    parser.add_argument("--variants", default="", help="comma-separated row names to run (default: all)")
    args = parser.parse_args()
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(",")]

    import ray
    import torch

    from atlas.grid import grid
    from atlas.layout import project
    from atlas.render import render
    from atlas.sample import sample

    print(f"load before: {uptime()}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ray {ray.__version__}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="atlas-bench-ray-"))
    rows: list[tuple[str, str, float, float, float, bool]] = []  # (stage, variant, local s, ray s, actors' start s, equal)
    try:
        ray_start = timed(ray.init, num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False,
                          namespace=NAMESPACE, logging_level=logging.ERROR)
        kwargs = {"weights": WEIGHTS, "shard_size": args.shard, "batch_size": args.shard, "progress": False}
        sample(PHOTOS, [LAYER], tmp / "warm-up", max_images=2, workers=0, **kwargs)  # imports, file cache: not timed
        for i, (variant, options, loader) in enumerate(variants):
            # Each Ray run right after a local run of the same work: the pair sees the same machine load.
            local = timed(sample, PHOTOS, [LAYER], tmp / f"sample-local-{i}", max_images=args.images, workers=0, **kwargs)
            engine = Engine("ray", **options)
            seconds = timed(sample, PHOTOS, [LAYER], tmp / f"sample-{i}", max_images=args.images, workers=loader, engine=engine,
                            **kwargs)
            equal = all(same(tmp / "sample-local-0", tmp / f"sample-{i}", node) for node in ("images", f"samples/{LAYER}"))
            rows.append(("sample", f"{variant} ({engine.last.actors} on Ray)", local, seconds, engine.last.ready, equal))
            print(f"  sample {variant}: local {local:.1f} s, Ray {seconds:.1f} s, equal {equal}", flush=True)

        base = tmp / "sample-local-0"
        project(base, LAYER, method="pca")
        grid(base, LAYER, sizes=[args.grid], min_count=1)
        rkw = {"quality": "draft", "steps": args.steps, "size": args.size, "batch": args.batch, "progress": False}
        icons = 0
        for i, (variant, options, loader) in enumerate(variants):
            if loader:  # decoding is the sampler's
                continue
            for folder in (f"render-local-{i}", f"render-{i}"):
                shutil.copytree(base, tmp / folder)
            t = time.perf_counter()
            icons = render(tmp / f"render-local-{i}", LAYER, [args.grid], **rkw)[args.grid]["rendered_now"]
            local = time.perf_counter() - t
            engine = Engine("ray", **options)
            seconds = timed(render, tmp / f"render-{i}", LAYER, [args.grid], engine=engine, **rkw)
            equal = same(tmp / f"render-local-{i}", tmp / f"render-{i}", f"icons/{LAYER}/full/{args.grid}")
            rows.append(("render", f"{variant} ({engine.last.actors} on Ray)", local, seconds, engine.last.ready, equal))
            print(f"  render {variant}: local {local:.1f} s, Ray {seconds:.1f} s, equal {equal}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"load after:  {uptime()}")
    print(f"Ray start (ray.init, once per session, not in the table): {ray_start:.1f} s")
    work = {"sample": f"{args.images} photos, attribution, shards of {args.shard}",
            "render": f"{icons} icons, {args.steps} steps, {args.size} px, batch {args.batch}"}
    print(f"{'stage':<7} {'work':<38} {'Ray engine':<38} {'local s':>8} {'Ray s':>7} {'actors up s':>12} {'Ray/local':>10} {'equal':>6}")
    for stage in ("sample", "render"):
        for n, (_, variant, local, seconds, ready, equal) in enumerate(r for r in rows if r[0] == stage):
            label = work[stage] if n == 0 else ""
            print(f"{stage if n == 0 else '':<7} {label:<38} {variant:<38} {local:8.1f} {seconds:7.1f} {ready:12.1f} "
                  f"{local / seconds:9.2f}x {equal!s:>6}")
    print("Ray/local: the local run's time over the Ray run's, each pair run back to back (a speed ratio; target >= 0.80x); "
          "actors up: from asking Ray for the actors until every actor process answered (before any model load)")
    samples = [r[2] for r in rows if r[0] == "sample"]
    renders = [r[2] for r in rows if r[0] == "render"]
    print(f"measured local CPU costs (2 cores, this load; median of the local runs): {np.median(samples) / args.images:.2f} s per "
          f"image with attribution, {np.median(renders) / max(icons * args.steps, 1) * 1000:.1f} ms per icon step at {args.size} px")

if __name__ == "__main__":
    main()
