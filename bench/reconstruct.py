"""Benchmark: the reconstructed equivalent model (atlas.weights.reconstruct), figures side by side in one run.

1. **Reconstruction of one 224 px photo**: the states recorded (one forward of a copy of InceptionV1 that keeps every
   ReLU mask, pooling switch and LRN gain) plus the top-5 class templates (five rows of W_x by reverse mode).
   Target: <= 2 s. The first run (cold: fresh copy, first use of its kernels) and the median of the warm runs are
   printed, with one plain forward of the original network for scale.
2. **The full W_x of a 64x64 input** (1000 x 12,288) from all 12,288 orthogonal basis vectors: batched forward-mode
   products (``ReconstructedModel.columns``, ``--batch`` JVPs per vmap call, the primal computed once per batch)
   against the naive loop of one forward of the reconstructed model per basis vector (``f(e_i) - f(0)``, batch 1)
   and against one unbatched JVP per basis vector. The naive loops run on a fixed subset of ``--naive`` vectors
   (default 512), timed and stated as a per-vector rate (the ratio compares rates, not a full naive run); their
   columns are checked against the batched ones. Target: >= 10x.

Every timing also prints the GFLOP/s it achieves and its share of this machine's fp32 and bf16 matmul throughput,
measured at the start of the same run (bench/flops.py), from torch's flop counter on one extra, untimed call of what
was timed: the plain forward; the recording alone and recording + templates; per basis vector, one batch of JVPs
divided by its vectors, one forward of the reconstructed model, one unbatched JVP.

    .venv/bin/python bench/reconstruct.py [--image PATH] [--batch 64] [--naive 512] [--columns 12288]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# bench/inspect.py would shadow the standard library's inspect (torch imports it): not on the path here
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

sys.path.append(str(Path(__file__).parent))  # appended: this folder's inspect.py must not shadow the standard library's
import flops  # noqa: E402

from atlas.models import load_model  # noqa: E402
from atlas.weights.reconstruct import read_photo, reconstruct  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTO = SHARED / "data" / "imagenet-samples" / "n04251144_snorkel.JPEG"
WEIGHTS = SHARED / "models" / "bvlc_googlenet.safetensors"


def load() -> str:
    return f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"


def part1(net, x: torch.Tensor, repeats: int, limits: dict[str, float]) -> None:
    with torch.no_grad():
        net.module(x[None])
        start = time.perf_counter()
        logits = net.module(x[None])[0]
        t_plain = time.perf_counter() - start
    top = logits.topk(5).indices
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model = reconstruct(net, x)
        t_record = time.perf_counter() - start
        model.rows(top)
        times.append((t_record, time.perf_counter() - start))
    cold, warm = times[0], times[1:] or times
    with torch.no_grad():
        g_plain = flops.gflop(lambda: net.module(x[None]))
    g_record = flops.gflop(lambda: reconstruct(net, x))
    g_total = flops.gflop_vjp(lambda: reconstruct(net, x).rows(top))
    w_record, w_total = statistics.median(t[0] for t in warm), statistics.median(t[1] for t in warm)
    print(f"1. reconstruction of one 224 px photo (states recorded + top-5 class templates by VJP), {load()}")
    print(f"   GFLOP: plain forward {g_plain:.2f}, record {g_record:.2f}, record + top-5 templates {g_total:.2f}")
    print(f"   plain forward of the original: {t_plain:.3f} s ({flops.share(g_plain / t_plain, limits)})")
    print(f"   cold (first): record {cold[0]:.3f} s, total {cold[1]:.3f} s")
    print(f"   warm (median of {len(warm)}): record {w_record:.3f} s, total {w_total:.3f} s   target <= 2 s")
    print(f"   warm achieved: record {flops.share(g_record / w_record, limits)}; total {flops.share(g_total / w_total, limits)}")
    print(f"   states: {model.counts}")


def part2(net, x: torch.Tensor, batch: int, naive: int, columns: int, limits: dict[str, float]) -> None:
    crop = x[:, 80:144, 80:144].contiguous()
    model = reconstruct(net, crop)
    size = crop.numel()
    columns = min(columns, size)
    print(f"\n2. W_x of a 64x64 input ({model.recorded_logits.shape[-1]} x {size}), {load()}")
    model.columns(range(batch), batch)  # warm-up
    start = time.perf_counter()
    w = model.columns(range(columns), batch)
    t_batched = time.perf_counter() - start
    rate_batched = t_batched / columns
    g_batched = flops.gflop(lambda: model.columns(range(batch), batch)) / batch  # per vector
    print(f"   batched JVPs ({batch} per vmap call): {columns} columns in {t_batched:.1f} s = {1e3 * rate_batched:.2f} ms per vector"
          + (" (all of W_x)" if columns == size else "")
          + f" ({g_batched:.3f} GFLOP per vector: {flops.share(g_batched / rate_batched, limits)})")

    subset = torch.randperm(columns, generator=torch.Generator().manual_seed(0))[:naive]
    zero = torch.zeros(1, *crop.shape)
    with torch.no_grad():
        b = model(zero)[0]
        model(zero)  # warm-up
        start = time.perf_counter()
        diffs = []
        for i in subset.tolist():
            e = torch.zeros(size)
            e[i] = 1.0
            diffs.append(model(e.view(1, *crop.shape))[0] - b)
        t_naive = time.perf_counter() - start
    rate_naive = t_naive / len(subset)
    naive_cols = torch.stack(diffs, 1)
    err_naive = float((naive_cols - w[:, subset]).abs().max())

    x0 = model.x[:1]
    start = time.perf_counter()
    jcols = []
    with torch.no_grad():
        for i in subset.tolist():
            e = torch.zeros(size)
            e[i] = 1.0
            jcols.append(torch.func.jvp(model.forward, (x0,), (e.view(1, *crop.shape),))[1][0])
    t_jvp1 = time.perf_counter() - start
    rate_jvp1 = t_jvp1 / len(subset)
    err_jvp1 = float((torch.stack(jcols, 1) - w[:, subset]).abs().max())
    e = torch.zeros(size)
    e[0] = 1.0
    with torch.no_grad():
        g_naive = flops.gflop(lambda: model(e.view(1, *crop.shape)))
        g_jvp1 = flops.gflop(lambda: torch.func.jvp(model.forward, (x0,), (e.view(1, *crop.shape),)))
    scale = float(w[:, subset].abs().max())
    print(f"   naive loop, one forward per basis vector (f(e_i) - f(0)), {len(subset)} of them: {t_naive:.1f} s = "
          f"{1e3 * rate_naive:.2f} ms per vector ({g_naive:.3f} GFLOP: {flops.share(g_naive / rate_naive, limits)}); "
          f"max |diff| to the batched columns {err_naive:.1e} (entries up to {scale:.1e})")
    print(f"   one unbatched JVP per basis vector, {len(subset)} of them: {t_jvp1:.1f} s = {1e3 * rate_jvp1:.2f} ms per vector "
          f"({g_jvp1:.3f} GFLOP: {flops.share(g_jvp1 / rate_jvp1, limits)}); max |diff| {err_jvp1:.1e}")
    print(f"   ratio (per-vector rates): batched JVPs {rate_naive / rate_batched:.1f}x faster than the naive forward loop, "
          f"{rate_jvp1 / rate_batched:.1f}x than unbatched JVPs   target >= 10x")
    print(f"   full W_x at these rates: batched {rate_batched * size:.0f} s, naive loop {rate_naive * size:.0f} s (extrapolated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, default=PHOTO)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--naive", type=int, default=512)
    parser.add_argument("--columns", type=int, default=12288)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--skip-part1", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}")
    limits = flops.ceilings()
    print(flops.ceiling_line(limits))
    net = load_model("inceptionv1", args.weights)
    x = read_photo(args.image)[0]
    if not args.skip_part1:
        part1(net, x, args.repeats, limits)
    part2(net, x, args.batch, args.naive, args.columns, limits)
    print(f"\nend: {load()}")


if __name__ == "__main__":
    main()
