"""Benchmark: ``atlas inspect``'s parts against their plain baselines, side by side in one run.

1. **Occlusion maps** (Zeiler & Fergus Fig. 7; ``atlas.inspect.occlusion``): a 224 px photo, a 32 px grey square at
   stride 8 (625 positions), layer mixed4c. The batched path of ``occlusion_maps`` (incremental early layers +
   channels-last, batches of 32) and the same without the incremental part (``incremental=False``: channels-last
   batches only) against the plain loop of one forward per position at batch 1 on the unmodified model (what
   ``occlusion_loop`` runs). Target: batched >= 3x the loop. The three compute the same batch of positions one
   after the other, batch after batch, so machine load hits them alike; their numbers are compared with the loop's.
   Beside them, when captum is installed (the dev extra), captum's ``Occlusion`` on the same photo, square, stride,
   grey baseline and batch size (``perturbations_per_eval``), for the target class's probability on the unmodified
   model: one call over its whole grid (captum has no way to run a subset of its windows, so ``--rounds`` does not
   shorten it), timed on its own with the load average before and after. captum's grid is atlas's when
   ``(224 - occluder)`` is a multiple of the stride (atlas adds a last position flush with the edge otherwise).
   tests/test_captum.py checks the two give the same numbers.

    .venv/bin/python bench/inspect.py [--occlusion] [--image PATH] [--layer mixed4c] [--stride 8] [--occluder 32]
                                      [--batch-size 32] [--rounds N]

``--rounds N`` times only N evenly spaced batches of the grid (the cost per position hardly depends on where the
square is), to keep the run short on a loaded machine.

2. **The whole report** (``--report``): ``atlas.inspect.inspect`` on one photo at the default settings (every
   layer's views, occlusion 32 px / stride 8, the invariance curves; with ``--run RUN`` also the placement on that
   run's atlas), in a temporary folder; prints the seconds of each part as ``report.json`` records them. Aim: under
   30 s on this machine. The model is loaded before the clock starts (a report of a served run reuses it too).

Every rate also prints the GFLOP/s it achieves and its share of this machine's fp32 and bf16 matmul throughput,
measured at the start of the same run (bench/flops.py), from torch's flop counter: per occluder position, what each
path actually runs (the loop: one whole forward; the batched paths: one timed batch, divided by its positions; the
incremental path recomputes only what the square changes, so it counts fewer); for the report, a second, untimed
report of the same photo under the counter (every part's network work), over the timed report's seconds.
"""

from __future__ import annotations

import os
import sys

# This script is named like the standard library's `inspect`, which numpy and torch import: run as a script, its own
# folder comes first on sys.path and would shadow it. Take that folder off before anything else is imported.
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.append(str(Path(__file__).parent))  # appended: this folder's inspect.py must not shadow the standard library's
import flops  # noqa: E402

from atlas.inspect import inspect, occlusion  # noqa: E402
from atlas.inspect.engine import batched_forward, forward, probabilities, read_image  # noqa: E402
from atlas.inspect.occlusion import occlude, occluder_grid  # noqa: E402
from atlas.models import load_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "models" / "bvlc_googlenet.safetensors"
PHOTO = SHARED / "data" / "imagenet-samples" / "n01440764_tench.JPEG"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def bench_occlusion(net, image: torch.Tensor, layer: str = "mixed4c", occluder: int = 32, stride: int = 8, batch_size: int = 32,
                    rounds: int | None = None, limits: dict[str, float] | None = None) -> dict:
    """Time the occlusion maps' batched paths against the plain loop, interleaved batch by batch; print and return
    the rates (positions/s).

    The grid's positions are cut into batches of ``batch_size``; for each batch (all of them, or ``rounds`` evenly
    spaced ones) the plain loop (one :func:`atlas.inspect.engine.forward` of the unmodified model per position, what
    :func:`occlusion_loop` runs), the incremental path and the channels-last-only path (what :func:`occlusion_maps`
    runs with ``incremental`` True / False) compute the same positions one after the other, so a change of machine
    load hits all three alike. Every path's numbers are compared with the loop's.
    """
    ys, xs = occluder_grid(image.shape[-2:], occluder, stride)
    boxes = occlusion._boxes(ys, xs, occluder)
    starts = list(range(0, len(boxes), batch_size))
    if rounds is not None and rounds < len(starts):
        starts = [starts[round(i * (len(starts) - 1) / max(rounds - 1, 1))] for i in range(rounds)]
    n = sum(len(boxes[lo:lo + batch_size]) for lo in starts)
    print(f"occlusion: {tuple(image.shape[-2:])} px image, {occluder} px square, stride {stride} ({len(boxes)} positions; timed: {n} "
          f"in {len(starts)} batches of {batch_size}), layer {layer}, {torch.get_num_threads()} threads; load average {_load()}",
          flush=True)
    channel, target = occlusion._reference(net, image, layer, None, None)[:2]
    fast = occlusion._channels_last(net)
    incremental = occlusion._Incremental(fast, image, layer)

    def reduce(_layer, act):
        return act[:, channel].double().sum((1, 2))

    seconds = {"loop": 0.0, "incremental": 0.0, "channels-last": 0.0}
    out: dict[str, list] = {k: [] for k in seconds}
    incremental.run(occlude(image, boxes[:2]), boxes[:2], channel)  # warm-up
    first = boxes[starts[0]:starts[0] + batch_size]  # GFLOP per position of each path, from the first timed batch
    per_position = {
        "loop": flops.gflop(lambda: forward(net, occlude(image, first[:1]), [layer])),
        "incremental": flops.gflop(lambda: incremental.run(occlude(image, first), first, channel)) / len(first),
        "channels-last": flops.gflop(lambda: batched_forward(fast, occlude(image, first).contiguous(memory_format=torch.channels_last),
                                                             [layer], len(first), reduce)) / len(first),
    }
    for lo in starts:
        chunk = boxes[lo:lo + batch_size]
        t = time.perf_counter()
        for box in chunk:
            acts, z = forward(net, occlude(image, box[None]), [layer])
            out["loop"].append((acts[layer][:, channel].double().sum((1, 2)), z))
        seconds["loop"] += time.perf_counter() - t
        t = time.perf_counter()
        out["incremental"].append(incremental.run(occlude(image, chunk), chunk, channel))
        seconds["incremental"] += time.perf_counter() - t
        t = time.perf_counter()
        acts, z = batched_forward(fast, occlude(image, chunk).contiguous(memory_format=torch.channels_last), [layer], len(chunk), reduce)
        out["channels-last"].append((acts[layer], z))
        seconds["channels-last"] += time.perf_counter() - t
    sums = {k: torch.cat([a for a, _ in v]).double() for k, v in out.items()}
    logits = {k: torch.cat([z for _, z in v]) for k, v in out.items()}
    rates = {k: n / v for k, v in seconds.items()}
    labels = {"loop": "plain loop (batch 1, unmodified)", "incremental": "batched: incremental + channels-last",
              "channels-last": "batched: channels-last only"}
    print("  GFLOP per position: " + ", ".join(f"{k} {v:.2f}" for k, v in per_position.items()))
    for k in seconds:
        line = f"  {labels[k]:<38} {seconds[k]:7.1f} s {rates[k]:6.2f} positions/s ({flops.share(rates[k] * per_position[k], limits)})"
        if k != "loop":
            act = float((sums[k] - sums["loop"]).abs().max() / sums["loop"].abs().max())
            prob = float((probabilities(logits[k]) - probabilities(logits["loop"])).abs().max())
            same = int((logits[k].argmax(1) == logits["loop"].argmax(1)).sum())
            line += (f"  {rates[k] / rates['loop']:.2f}x the loop; vs loop: activation rel. diff {act:.1e}, probability diff {prob:.1e}, "
                     f"top class {same}/{n}")
        print(line, flush=True)
    print(f"  target: batched >= 3x the loop; load average {_load()}")
    captum_rate = bench_captum_occlusion(net, image, target, occluder, stride, batch_size)
    if captum_rate is not None:
        print(f"  {'captum Occlusion (probability only)':<38} {captum_rate:6.2f} positions/s "
              f"({flops.share(captum_rate * per_position['loop'], limits)}); atlas's incremental path is "
              f"{rates['incremental'] / captum_rate:.2f}x, its channels-last path {rates['channels-last'] / captum_rate:.2f}x captum's",
              flush=True)
    return {"positions": n, **{f"{k}_per_s": v for k, v in rates.items()}, "ratio": rates["incremental"] / rates["loop"],
            "captum_per_s": captum_rate}


def bench_captum_occlusion(net, image: torch.Tensor, target: int, occluder: int, stride: int, batch_size: int) -> float | None:
    """captum's ``Occlusion`` over its whole grid for the target's probability (same square, stride, grey, batch size)
    on the unmodified model; print the line and return positions/s, or None when captum is not installed."""
    try:
        from captum.attr import Occlusion
    except ImportError:
        print("  captum Occlusion: captum is not installed (pip install captum, or the dev extra); row skipped")
        return None
    h, w = image.shape[-2:]
    n = ((h - occluder) // stride + 1) * ((w - occluder) // stride + 1)  # captum's windows: whole stride steps only
    baseline = torch.tensor(occlusion.GREY).view(1, 3, 1, 1).expand(1, 3, h, w).clone()

    def probability(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net.module(x).double(), dim=-1)

    print(f"  captum Occlusion: {n} positions, perturbations_per_eval {batch_size}, unmodified model; load average {_load()}", flush=True)
    t = time.perf_counter()
    with torch.no_grad():
        Occlusion(probability).attribute(image[None].clone(), sliding_window_shapes=(3, occluder, occluder), strides=(3, stride, stride),
                                         baselines=baseline, target=target, perturbations_per_eval=batch_size)
    seconds = time.perf_counter() - t
    print(f"  captum Occlusion: {seconds:.1f} s; load average {_load()}", flush=True)
    return n / seconds


def bench_report(net, photo: str, run: str | None = None, limits: dict[str, float] | None = None) -> dict:
    """Time one whole report at the default settings (model already loaded); print the seconds per part."""
    print(f"report: {Path(photo).name} at the default settings{f', placed on {run}' if run else ''}; load average {_load()}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = inspect([photo], None, out=Path(tmp) / "report", net=net, echo=None) if run is None else \
            _in_run(net, photo, run, Path(tmp))
        seconds = time.perf_counter() - t
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in summary["timings"].items())
    print(f"  whole report {seconds:.1f} s ({parts}); aim: under 30 s; load average {_load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the same report again, untimed, under the flop counter
        total = flops.gflop_vjp(lambda: inspect([photo], None, out=Path(tmp) / "report", net=net, echo=None) if run is None else
                            _in_run(net, photo, run, Path(tmp)))
    print(f"  whole report: {total:.1f} GFLOP (a second, untimed report under the counter) in the timed {seconds:.1f} s: "
          f"{flops.share(total / seconds, limits)}")
    return {"seconds": seconds, **summary["timings"]}


def _in_run(net, photo: str, run: str, tmp: Path) -> dict:
    """A report inside a copy of ``run`` (its tiles get the report; the original run is left alone)."""
    import shutil

    copy = tmp / "run"
    shutil.copytree(run, copy, symlinks=True)
    return inspect([photo], copy, net=net, echo=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--occlusion", action="store_true", help="only the occlusion benchmark")
    parser.add_argument("--report", action="store_true", help="only the whole-report timing")
    parser.add_argument("--run", default=None, help="a run folder to place the photo on (copied first), for --report")
    parser.add_argument("--image", default=str(PHOTO))
    parser.add_argument("--layer", default="mixed4c")
    parser.add_argument("--occluder", type=int, default=32)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None, help="time only this many evenly spaced batches (default: all)")
    args = parser.parse_args()
    limits = flops.ceilings()
    print(flops.ceiling_line(limits))
    start = time.perf_counter()
    net = load_model("inceptionv1", WEIGHTS)
    image, _ = read_image(args.image)
    if not args.report:
        bench_occlusion(net, image, args.layer, args.occluder, args.stride, args.batch_size, args.rounds, limits)
    if not args.occlusion:
        bench_report(net, args.image, args.run, limits)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
