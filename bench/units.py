"""Benchmark: the unit lens against its baselines, side by side in one run.

1. **Top-k pass** (``atlas.units.topk.top_examples``: one streamed pass keeping every channel's top-9 images,
   their positions, receptive-field boxes and patches) in images/s, against ``atlas sample --no-attribution``
   on the same photos, same batch size, workers and precision. Target: >= 0.8x.
2. **Unit visualisation throughput** in unit-steps/s (channels x optimisation steps per second) for our FFT
   parameterisation and Yosinski et al.'s pixel presets (``atlas.units.features.unit_images``), against lucent's
   ``render_vis`` machinery (its ``param.image``, standard transforms, ``hook_model``, full forward, Adam) on the
   same channels of the same model at the same size: lucent FFT + decorrelated against our ``fft``, lucent pixel
   (``fft=False, decorrelate=False``) against our pixel presets. Target: >= 3x. Whole runs alternate (ours,
   lucent, ours, ...) so machine load hits both alike; each run's time includes its set-up. Also timed, for
   scale: lucent's ``render_vis`` as it runs by default, upsampling every image to 224 px before the network
   (``--default-steps`` steps per round, its time scaled to ``--steps``).

Every row also prints the GFLOP/s it achieves and its share of this machine's fp32 and bf16 matmul throughput, measured
at the start of the same run (bench/flops.py), from torch's flop counter: per image, the forward to the layer on the
reference model (what the sampler's and the top-k pass's fused kernels compute; patches and boxes are not counted);
per unit-step, one optimisation step (forward + backward) of the whole batch of channels divided by the channels (ours:
a 2-step run minus a 1-step run, so set-up and final measurement drop out; lucent's: one step of a fresh run).

    .venv/bin/python bench/units.py [--images 200] [--channels 16] [--steps 64] [--layer mixed4c]

lucent is not a project dependency: ``pip install --no-deps torch-lucent kornia==0.4.1`` and
``pip install decorator ipython`` (without it part 2 prints our figures only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/render.py's lucent pieces
import flops  # noqa: E402
from render import Lucent, stock  # noqa: E402

from atlas.data import load_image, to_tensor  # noqa: E402
from atlas.models import load_model  # noqa: E402
from atlas.render.optimize import Settings  # noqa: E402
from atlas.sample import sample  # noqa: E402
from atlas.units.features import unit_images  # noqa: E402
from atlas.units.topk import top_examples  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "data" / "imagenet-samples"


def topk_table(net, layer: str, n_images: int, batch_size: int, workers: int, limits: dict[str, float]) -> None:
    root = Path(tempfile.mkdtemp(prefix="atlas-bench-units-"))
    try:
        run = root / "run"
        start = time.perf_counter()
        sample(PHOTOS, [layer], run, net=net, max_images=n_images, attribution=False, batch_size=batch_size, workers=workers,
               progress=False)
        t_sample = time.perf_counter() - start
        start = time.perf_counter()
        top_examples(run, [layer], k=9, batch_size=batch_size, workers=workers, progress=False, net=net)
        t_top = time.perf_counter() - start
        # a second sampler run into a fresh folder, after the top-k pass, so a drift in machine load shows
        start = time.perf_counter()
        sample(PHOTOS, [layer], root / "again", net=net, max_images=n_images, attribution=False, batch_size=batch_size,
               workers=workers, progress=False)
        t_again = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = n_images / ((t_sample + t_again) / 2)
    x1 = to_tensor(load_image(sorted(PHOTOS.glob("*.JPEG"))[0]))[None]
    per_image = flops.gflop(lambda: net.activations(x1, [layer]))
    print(f"\n{n_images} shared photos, layer {layer}, batch {batch_size}, {workers} workers, {torch.get_num_threads()} threads\n")
    print(flops.ceiling_line(limits))
    print(f"GFLOP per image (forward to {layer}, counted on the reference model): {per_image:.2f}\n")
    print("| pass | seconds | images/s | achieved |")
    print("|---|---|---|---|")
    for name, t in (("atlas sample --no-attribution (1st)", t_sample), ("atlas sample --no-attribution (2nd)", t_again),
                    ("top-9 pass (values, positions, boxes, patches)", t_top)):
        print(f"| {name} | {t:.1f} | {n_images / t:.1f} | {flops.share(n_images / t * per_image, limits)} |")
    print(f"\ntop-k pass / sampler (mean of both): {n_images / t_top / base:.2f}x (target >= 0.8x)", flush=True)


class LucentChannels(Lucent):
    """lucent's render_vis pieces on a channel objective (mean activation of channel c_i for image i)."""

    def __init__(self, net, layer: str, channels: list[int], size: int, steps: int, fft: bool, fixed: bool = True):
        from lucent.optvis import param

        idx = torch.arange(len(channels))
        chans = torch.tensor(channels)
        # fixed: fixed_image_size=size (the network sees `size` px, as ours); else render_vis's default, which
        # upsamples every image to 224 px before the network
        super().__init__(net, lambda acts: acts[idx, chans].mean((1, 2)), len(channels), size, size if fixed else None, steps, seed=0)
        if not fft:  # swap lucent's image for its pixel parameterisation, as render_vis(param_f=...) would
            from lucent.optvis import render

            self.params, self.image_f = param.image(size, batch=len(channels), fft=False, decorrelate=False)
            self.optimizer = torch.optim.Adam(self.params, lr=5e-2)
            self.hook = render.hook_model(net.module, self.image_f)
        self.layer = layer


def unit_step_gflop(net, layer: str, channels: list[int], kinds: list[str], size: int, default_steps: int,
                    have_lucent: bool) -> dict[str, float]:
    """GFLOP of one optimisation step (forward + backward) of one channel's image, for each row of the table.

    Ours: a 2-step run minus a 1-step run of ``unit_images`` (set-up and the final measurement cancel). lucent's: one step
    of a fresh run on a fresh copy of the model (hook_model leaves its hooks on the module it hooks)."""
    n = len(channels)
    out = {f"ours {kind}": (flops.gflop(lambda kind=kind: unit_images(net, layer, channels, kind, size=size, steps=2))
                            - flops.gflop(lambda kind=kind: unit_images(net, layer, channels, kind, size=size, steps=1))) / n
           for kind in kinds}
    if have_lucent:
        for name, fft, fixed in (("lucent FFT + decorrelated", True, True), ("lucent pixel", False, True),
                                 *((("lucent FFT, render_vis default (224 px)", True, False),) if default_steps else ())):
            run = LucentChannels(stock(net), layer, channels, size, 1, fft=fft, fixed=fixed)
            out[name] = flops.gflop(lambda run=run: run.step(1)) / n
    return out


def vis_table(net, layer: str, channels: list[int], size: int, steps: int, rounds: int, kinds: list[str],
              default_steps: int = 0, limits: dict[str, float] | None = None) -> None:
    try:
        import lucent  # noqa: F401

        have_lucent = True
    except ImportError:
        print("lucent is not installed, comparing nothing: pip install --no-deps torch-lucent kornia==0.4.1 && "
              "pip install decorator ipython")
        have_lucent = False
    import render as bench_render

    bench_render.LAYER = layer  # the Lucent class hooks this layer
    seconds: dict[str, float] = {}
    n = len(channels)
    per_step = unit_step_gflop(net, layer, channels, kinds, size, default_steps, have_lucent)
    lucent_net = stock(net) if have_lucent else None
    # Whole runs of `steps` steps, alternating ours and lucent's, `rounds` times: machine load hits both alike, and
    # each run's time includes its set-up (ours: parameterisation, loop, final measurement; lucent: its image,
    # transforms, hooks and Adam), as a user calling either would pay it.
    for r in range(rounds):
        for kind in kinds:
            t = time.perf_counter()
            unit_images(net, layer, channels, kind, size=size, steps=steps, seed=r)
            seconds[f"ours {kind}"] = seconds.get(f"ours {kind}", 0.0) + time.perf_counter() - t
        if have_lucent:
            for name, fft in (("lucent FFT + decorrelated", True), ("lucent pixel", False)):
                t = time.perf_counter()
                LucentChannels(lucent_net, layer, channels, size, steps, fft=fft).step(steps)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
        if have_lucent and default_steps:  # render_vis's default (224 px network input), fewer steps: it is slow
            t = time.perf_counter()
            LucentChannels(lucent_net, layer, channels, size, default_steps, fft=True, fixed=False).step(default_steps)
            seconds["lucent FFT, render_vis default (224 px)"] = (seconds.get("lucent FFT, render_vis default (224 px)", 0.0)
                                                                  + (time.perf_counter() - t) * steps / default_steps)
        print(f"  round {r + 1}: " + "; ".join(f"{name}: {n * steps * (r + 1) / s:.1f}/s" for name, s in seconds.items()),
              flush=True)
    steps *= rounds
    rates = {name: n * steps / s for name, s in seconds.items()}
    print(f"\n{n} channels of {layer}, {size} px, {steps // rounds} steps x {rounds} runs each, channel objective (mean activation)\n")
    print(flops.ceiling_line(limits))
    print("GFLOP per unit-step (forward + backward, torch's flop counter): " + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items()))
    print("\n| visualiser | unit-steps/s | achieved |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {flops.share(rate * per_step[name], limits)} |")
    if have_lucent:
        print(f"\nours fft / lucent FFT: {rates['ours fft'] / rates['lucent FFT + decorrelated']:.2f}x (target >= 3x)")
        default = rates.get("lucent FFT, render_vis default (224 px)")
        if default:
            print(f"ours fft / lucent render_vis default (224 px): {rates['ours fft'] / default:.2f}x")
        for kind in kinds:
            if kind != "fft":
                print(f"ours {kind} / lucent pixel: {rates[f'ours {kind}'] / rates['lucent pixel']:.2f}x (target >= 3x)")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", default="mixed4c")
    parser.add_argument("--images", type=int, default=200, help="shared photos for the top-k pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--channels", type=int, default=16, help="channels visualised together")
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating whole runs of each visualiser")
    parser.add_argument("--default-steps", type=int, default=16,
                        help="steps of lucent's render_vis default (224 px input; timed, scaled to --steps); 0: skip")
    parser.add_argument("--kinds", default="fft,pixel,yosinski-1,yosinski-4", help="our kinds to time, comma-separated")
    parser.add_argument("--skip-topk", action="store_true")
    parser.add_argument("--skip-vis", action="store_true")
    args = parser.parse_args()
    limits = flops.ceilings()
    torch.manual_seed(0)
    net = load_model("inceptionv1", os.environ.get("ATLAS_WEIGHTS") or SHARED / "models" / "bvlc_googlenet.safetensors")
    print(f"precision: {Settings().precision} (float32 unless this CPU has native bf16)")
    if not args.skip_topk:
        topk_table(net, args.layer, args.images, args.batch_size, args.workers, limits)
    if not args.skip_vis:
        vis_table(net, args.layer, list(range(0, 8 * args.channels, 8))[: args.channels], args.size, args.steps, args.rounds,
                  [k for k in args.kinds.split(",") if k], args.default_steps, limits)


if __name__ == "__main__":
    main()
