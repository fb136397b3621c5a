"""One run of the figures that matter on an accelerator: sampling, icon steps, a small build; one JSON file.

    python bench/gpu_check.py --device cuda --out outputs/gpu_check.json
    python bench/gpu_check.py --device cpu --tiny        # the dry run (what tests/test_gpu_check.py runs)

Each figure is measured in this process, on ``--device``: the sampler's images/s (without attribution, in the
precision ``auto`` gives there, and with attribution, always float32), the renderer's icon-steps/s at 80 px in
float32 and in bfloat16 with the mean final cos(h, v) of each, and an ``atlas build`` of a few photos with its stage
times. ``bench/gpu_check.sh`` runs this and ``tests/test_cuda.py`` on a GPU machine in under ten minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, bench/ comes first on sys.path, where bench/inspect.py would shadow the standard library's inspect
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
SHARED = Path(os.environ.get("ATLAS_SHARED", REPO.parent / "shared"))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    import torch

    from atlas.models.precision import native_bf16, resolve_precision

    out = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "native_bf16": native_bf16(device), "auto_precision": resolve_precision("auto", device)}
    if device.startswith("cuda"):
        out |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
    return out


def sampling(net, images: Path, n: int, device: str, workdir: Path) -> dict:
    """images/s of ``atlas sample`` on the first ``n`` photos, without and with attribution (best of two runs)."""
    from atlas.sample import sample

    rows = {}
    for attribution in (False, True):
        best = 0.0
        for attempt in range(2):
            out = workdir / f"sample-{attribution}-{attempt}"
            start = time.perf_counter()
            sample(images, ["mixed4c"], out, max_images=n, attribution=attribution, batch_size=32, workers=2, progress=False,
                   net=net, device=device)
            _sync(device)
            best = max(best, n / (time.perf_counter() - start))
        rows["with_attribution" if attribution else "no_attribution"] = round(best, 1)
    return {"images": n, "images_per_second": rows}


def rendering(net, device: str, steps: int, batch: int) -> dict:
    """icon-steps/s at 80 px (after two warm-up steps) and the mean final cos(h, v), float32 and bfloat16."""
    import numpy as np
    import torch

    from atlas.render.objectives import direction
    from atlas.render.optimize import Optimization, Settings

    v = torch.from_numpy(np.random.default_rng(0).random((batch, 512), dtype=np.float32))
    rows = {}
    for precision in ("float32", "bfloat16"):
        opt = Optimization(net, "mixed4c", direction("mixed4c", v), [(i,) for i in range(batch)],
                           Settings(size=80, steps=steps + 2, precision=precision), device)
        opt.step(2)
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        seconds = time.perf_counter() - start
        rows[precision] = {"icon_steps_per_second": round(batch * steps / seconds, 1),
                           "mean_cosine": round(float(np.mean(opt.result().cosine)), 4)}
    return {"size": 80, "steps": steps, "batch": batch, "rows": rows}


def small_build(images: Path, weights: Path | None, n: int, device: str, workdir: Path) -> dict:
    """`atlas build` of ``n`` photos (2 positions, t-SNE, a 4x4 and an 8x8 grid, draft icons at 64 steps) on ``device``."""
    from atlas.build import build, load_config, merge

    config = workdir / "small.toml"
    config.write_text(f"""
[run]
layers = ["mixed4c"]
[sample]
max_images = {n}
per_image = 2
workers = 2
device = "{device}"
{f'weights = "{weights}"' if weights else ''}
[project]
method = "tsne"
[grid]
sizes = [4, 8]
min_count = 1
[render]
quality = "draft"
steps = 64
device = "{device}"
[tiles]
examples = false
""")
    lines: list[str] = []
    start = time.perf_counter()
    result = build(merge(load_config(config), {"run": {"images": str(images), "out": str(workdir / "build")}}), echo=lines.append)
    return {"images": n, "seconds": round(time.perf_counter() - start, 1), "ran": result.ran, "log": lines[-12:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "imagenet-samples")
    parser.add_argument("--weights", type=Path, default=SHARED / "models" / "bvlc_googlenet.safetensors")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check.json")
    parser.add_argument("--tiny", action="store_true", help="a dry run in seconds (CPU): few photos, few steps")
    args = parser.parse_args()

    import tempfile

    from atlas.errors import AtlasError
    from atlas.models import load_model

    n_sample, n_build, steps, batch = (8, 8, 4, 2) if args.tiny else (512, 64, 256, 64)
    weights = args.weights if args.weights.is_file() else None
    try:
        net = load_model("inceptionv1", weights, args.device)
        figures: dict = {"machine": machine(args.device)}
        with tempfile.TemporaryDirectory(prefix="atlas-gpu-check-") as tmp:
            work = Path(tmp)
            for name, run in (("sample", lambda: sampling(net, args.images, n_sample, args.device, work)),
                              ("render", lambda: rendering(net, args.device, steps, batch)),
                              ("build", lambda: small_build(args.images, weights, n_build, args.device, work))):
                start = time.perf_counter()
                try:
                    figures[name] = run()
                except Exception as exc:  # one part failing must not lose the others' figures
                    figures[name] = {"error": f"{type(exc).__name__}: {exc}"}
                figures[name]["wall_seconds"] = round(time.perf_counter() - start, 1)
                print(f"gpu_check {name}: {json.dumps(figures[name])[:300]}", flush=True)
    except AtlasError as exc:
        raise SystemExit(f"atlas: error: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"gpu_check: wrote {args.out}")


if __name__ == "__main__":
    main()
