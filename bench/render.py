"""Benchmark: our icon renderer against lucent's ``render_vis`` on the same model and directions.

Both optimise the same 32 directions at mixed4c (means of real activations of the shared
photos), 80 px icons, the same objective dot(h, v) * cos(h, v)^2 at the centre position,
Adam lr 0.05, the same number of steps. Lucent runs with its own parameterisation,
transforms, module hooks and full forward pass, once with ``fixed_image_size=80`` and once
with its default (upsampling to 224). The two are stepped in interleaved slices in one
process, so machine load (2 shared cores) hits both alike. Reported: image-steps/s, mean
final cos(h, v) measured identically for both (the finished 80 px icon through our
network, centre position, float32), and the time each needs to reach the mean cosine
lucent reaches in its last step. Each row also prints the GFLOP/s it achieves (image-steps/s x the GFLOP of one
optimisation step, forward + backward, of one icon: torch's flop counter on one extra step of a whole batch of that
row's kind, divided by the batch) and its share of this machine's fp32 and bf16 matmul throughput, measured at the
start of the same run (bench/flops.py).

    .venv/bin/python bench/render.py [--steps 512] [--default-steps 32] [--out outputs/]

lucent is not a project dependency: ``pip install --no-deps torch-lucent kornia==0.4.1`` and
``pip install decorator ipython``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from atlas.data import load_image, to_tensor
from atlas.models import LocalResponseNorm, SpaceToDepthConv2d, autocast_dtype, load_model
from atlas.render.export import sheet
from atlas.render.objectives import Direction
from atlas.render.optimize import Optimization, Settings, layer_output

sys.path.append(str(Path(__file__).parent))
import flops  # noqa: E402

LAYER = "mixed4c"
SHARED = Path(__file__).resolve().parents[2] / "shared"  # the project's test data beside the checkout
PHOTOS = SHARED / "data" / "imagenet-samples"


def directions(net, n: int = 32) -> torch.Tensor:
    """n directions: for every 31st shared photo, the mean mixed4c activation of its central 3 x 3 positions."""
    files = sorted(PHOTOS.glob("*.JPEG"))[::31][:n]
    x = torch.stack([to_tensor(load_image(f)) for f in files])
    with torch.no_grad():
        acts = net.activations(x, [LAYER])[LAYER]
    return acts[:, :, 6:9, 6:9].mean((2, 3))


def stock(net):
    """A copy of ``net`` built from stock torch layers, as lucent's own model zoo has them.

    atlas's InceptionV1 computes local response normalisation and the strided first
    convolution its own (faster) way; lucent's ``inceptionv1`` uses ``F.local_response_norm``
    and ``nn.Conv2d``. Same weights, same function (to ~1e-7).
    """
    net = copy.deepcopy(net)
    for name, module in list(net.module.named_modules()):
        parent, _, leaf = name.rpartition(".")
        owner = net.module.get_submodule(parent) if parent else net.module
        if isinstance(module, LocalResponseNorm):
            setattr(owner, leaf, torch.nn.LocalResponseNorm(module.size, module.alpha, module.beta, module.k))
        elif isinstance(module, SpaceToDepthConv2d):
            plain = torch.nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding)
            plain.load_state_dict(module.state_dict())
            setattr(owner, leaf, plain.requires_grad_(False))
    return net


def measure(net, objective: Direction, images: torch.Tensor) -> float:
    """Mean cos(h, v) of finished icons: plain, float32, centre position of our network."""
    with torch.no_grad():
        return float(objective.cosine(layer_output(net, LAYER, images.float())).mean())


class Lucent:
    """One lucent ``render_vis`` run, taken apart so it can be stepped in slices.

    Built from lucent's own parts in the order ``render_vis`` uses them: ``param.image``
    (FFT, decorrelated, sigmoid), ``standard_transforms`` plus the Upsample it appends,
    ``hook_model`` on every module, the full forward, Adam lr 0.05 stepped with a closure.
    The model keeps its default (NCHW) memory format, as a lucent user would have it.
    """

    def __init__(self, net, objective: Direction, n: int, size: int, fixed_image_size: int | None, steps: int, seed: int):
        from lucent.optvis import param, render, transform

        torch.manual_seed(seed)
        self.net, self.objective, self.steps, self.done = net, objective, steps, 0
        self.params, self.image_f = param.image(size, batch=n)
        self.optimizer = torch.optim.Adam(self.params, lr=5e-2)
        transforms = list(transform.standard_transforms)  # preprocess=False: our model normalises itself
        new_size = fixed_image_size or (224 if size < 224 else None)
        if new_size:
            transforms.append(torch.nn.Upsample(size=new_size, mode="bilinear", align_corners=True))
        self.transform_f = transform.compose(transforms)
        self.hook = render.hook_model(net.module, self.image_f)

    def step(self, k: int) -> None:
        def closure():
            self.optimizer.zero_grad()
            self.net.module(self.transform_f(self.image_f()))
            loss = -self.objective(self.hook(LAYER)).sum()
            loss.backward()
            return loss

        for _ in range(min(k, self.steps - self.done)):
            self.optimizer.step(closure)
            self.done += 1

    def images(self) -> torch.Tensor:
        return self.image_f().detach()

    def cosine(self) -> float:
        return measure(self.net, self.objective, self.images())


class Ours:
    """Our renderer (:class:`atlas.render.optimize.Optimization`) with the same stepping interface."""

    def __init__(self, net, objective: Direction, n: int, settings: Settings):
        self.run = Optimization(net, LAYER, objective, [(0, i, 0) for i in range(n)], settings)
        self.steps = settings.steps

    @property
    def done(self) -> int:
        return self.run.done

    def step(self, k: int) -> None:
        self.run.step(k)

    def images(self) -> torch.Tensor:
        return self.run.measure()[0]

    def cosine(self) -> float:
        return float(self.run.measure()[2].mean())


def step_gflop(run, n: int) -> float:
    """GFLOP of one optimisation step (forward + backward) of one icon: one step of ``run``, a fresh run of ``n`` icons
    (not one of the timed runs, whose step counts stay as they are), under torch's flop counter, divided by ``n``."""
    return flops.gflop(lambda: run.step(1)) / n


def table(args, runs, seconds, curves, have_lucent: bool, final: bool, limits=None, per_step=None) -> str:
    """Print the results so far (a markdown table when ``final``); returns the name of our default run."""
    first = next(iter(runs))
    target_name = "lucent fixed_image_size=80" if have_lucent else first
    target = curves[target_name][-1][2]
    rates = {name: args.n * r.done / seconds[name] for name, r in runs.items()}
    if not final:
        print("  " + "; ".join(f"{k}: step {r.done}, {rates[k]:.1f}/s, cos {curves[k][-1][2]:.3f}" for k, r in runs.items()),
              flush=True)
        return first
    print(f"\n{args.n} directions at {LAYER} (means of real activations), {args.size} px icons, "
          "objective dot(h, v) * cos(h, v)^2 at the centre, Adam lr 0.05\n")
    print(flops.ceiling_line(limits))
    print("GFLOP per image-step (forward + backward, torch's flop counter): "
          + ", ".join(f"{name} {g:.3f}" for name, g in per_step.items()) + "\n")
    print(f"| renderer | steps | image-steps/s | achieved | mean final cos(h, v) | time to mean cos >= {target:.3f} |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        hit = next(((s, t) for s, t, c in curves[name] if c >= target), None)
        reach = f"{hit[1]:.0f} s (step {hit[0]})" if hit else "not reached"
        achieved = flops.share(rates[name] * per_step[name], limits)
        print(f"| {name} | {r.done} | {rates[name]:.1f} | {achieved} | {curves[name][-1][2]:.3f} | {reach} |")
    if have_lucent:
        for name in ("lucent fixed_image_size=80", "lucent fixed_image_size=80, atlas's model"):
            print(f"\nspeed-up of {first} over {name}: {rates[first] / rates[name]:.2f}x")
    cos_at = {name: {s: round(c, 3) for s, _, c in curves[name] if s in (16, 32, 64, 128, 256, 512)} for name in runs}
    print("mean cos(h, v) by step:", cos_at, flush=True)
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=512, help="steps for ours and lucent at 80 px")
    parser.add_argument("--fp32-steps", type=int, default=128, help="steps for our float32 variant (speed and cosine)")
    parser.add_argument("--default-steps", type=int, default=16, help="steps for lucent's default (224 px, slow)")
    parser.add_argument("--every", type=int, default=16, help="steps per interleaved slice and cosine checkpoint")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import lucent  # noqa: F401

        have_lucent = True
    except ImportError:
        print("lucent is not installed, comparing nothing: "
              "pip install --no-deps torch-lucent kornia==0.4.1 && pip install decorator ipython")
        have_lucent = False

    limits = flops.ceilings()
    torch.manual_seed(0)
    net = load_model("inceptionv1", os.environ.get("ATLAS_WEIGHTS") or SHARED / "models" / "bvlc_googlenet.safetensors")
    v = directions(net, args.n)
    settings = Settings(size=args.size, steps=args.steps)
    auto = autocast_dtype(settings.precision, torch.device("cpu"))
    print(f"{torch.get_num_threads()} threads; ours: network input {settings.transforms.out_size(args.size)} px, "
          f"autocast {auto}, channels-last")
    runs: dict[str, Ours | Lucent] = {
        # named apart from the fp32 variant below even where auto is fp32 (no native bf16), so neither row overwrites the other
        f"ours (default: {'bf16' if auto else 'fp32'}, channels-last, --steps)": Ours(net, Direction(v), args.n, settings),
        "ours (fp32, channels-last, --fp32-steps)": Ours(net, Direction(v), args.n,
                                                          replace(settings, steps=args.fp32_steps, precision="fp32")),
        "ours (fp32, NCHW)": Ours(net, Direction(v), args.n,
                                  replace(settings, steps=args.fp32_steps, precision="fp32", channels_last=False)),
    }
    # the GFLOP of one icon-step of each row: one step of a separate run of the same kind (so the timed runs' step counts
    # stay as they are); lucent's on fresh copies of the model, counted before any lucent run hooks ``net``
    # (hook_model leaves its hooks on the module)
    per_step = {name: step_gflop(Ours(net, Direction(v), args.n, replace(r.run.settings, steps=1)), args.n) for name, r in runs.items()}
    if have_lucent:
        for name, model, fixed in (("lucent fixed_image_size=80", stock(net), args.size),
                                   ("lucent fixed_image_size=80, atlas's model", copy.deepcopy(net), args.size),
                                   ("lucent default (224 px)", stock(net), None)):
            per_step[name] = step_gflop(Lucent(model, Direction(v), args.n, args.size, fixed, 1, 0), args.n)
        runs["lucent fixed_image_size=80"] = Lucent(stock(net), Direction(v), args.n, args.size, args.size, args.steps, 0)
        runs["lucent fixed_image_size=80, atlas's model"] = Lucent(net, Direction(v), args.n, args.size, args.size, args.steps, 0)
        runs["lucent default (224 px)"] = Lucent(stock(net), Direction(v), args.n, args.size, None, args.default_steps, 0)
    seconds = dict.fromkeys(runs, 0.0)
    curves: dict[str, list[tuple[int, float, float]]] = {name: [] for name in runs}
    while any(r.done < r.steps for r in runs.values()):
        for name, r in runs.items():  # one slice each, in turn: the same machine load for all
            if r.done >= r.steps:
                continue
            t0 = time.perf_counter()
            r.step(args.every)
            seconds[name] += time.perf_counter() - t0
            curves[name].append((r.done, seconds[name], r.cosine()))

        table(args, runs, seconds, curves, have_lucent, final=False)
    first = table(args, runs, seconds, curves, have_lucent, final=True, limits=limits, per_step=per_step)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, r in ((first, runs[first]), *((("lucent80", runs["lucent fixed_image_size=80"]),) if have_lucent else ())):
        icons = np.clip(np.rint(r.images().permute(0, 2, 3, 1).cpu().numpy()[:16] * 255), 0, 255).astype(np.uint8)
        tag = "ours" if name == first else name
        sheet(icons, cols=4).save(args.out / f"bench_{tag}_{LAYER}_{args.size}px_{args.steps}steps.png")


if __name__ == "__main__":
    main()
