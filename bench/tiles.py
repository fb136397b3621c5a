"""Benchmark: writing the deep-zoom pyramid of a 12800 px atlas vs pyvips ``dzsave``.

Builds a synthetic run (a 160 x 160 grid of 80 px textured icons, and optionally the
20/40/80 grids for semantic zoom), then in separate processes, so each peak RSS is its own:

* ``atlas`` : :func:`atlas.tiles.write_pyramid` from the icons in the zarr store (read included);
* ``atlas semantic``: the same with the 20, 40, 80 and 160 grids each drawing its own level;
* ``make_tiles``: the whole stage (pyramid, cell metadata, per-cell icon strips, no examples);
* ``dzsave`` : pyvips ``dzsave`` of the same flat 12800 px image, already in memory (building it is not timed).

All write JPEG Q75 tiles of 254 px with 1 px overlap. Usage::

    .venv/bin/python bench/tiles.py [--size 160] [--icon 80] [--work /tmp/atlas-bench] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LAYER, ATLAS = "mixed4c", "full"


def textured_row(size: int, icon: int, gy: int) -> np.ndarray:
    """One grid row of icons with per-cell colour and sinusoidal texture (JPEG-realistic detail)."""
    rng = np.random.default_rng(gy)
    yy, xx = np.mgrid[0:icon, 0:icon].astype(np.float32) / icon
    colour = rng.random((size, 1, 1, 3), dtype=np.float32)
    freq = rng.random((size, 1, 1), dtype=np.float32) * 18 + 2
    angle = rng.random((size, 1, 1), dtype=np.float32) * np.pi
    wave = 0.55 + 0.45 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi)
    return (wave[..., None] * colour * 255).astype(np.uint8)


def build(work: Path, size: int, icon: int, semantic: bool) -> Path:
    """A run folder with grids (all cells drawn) and textured icons."""
    from atlas.store import create_array, open_store, write_array

    run = work / "run"
    sizes = [size // 8, size // 4, size // 2, size] if semantic else [size]
    root = open_store(run, mode="a") if (run / "store.zarr").exists() else None
    if root is not None and all(f"icons/{LAYER}/{ATLAS}/{s}/done" in root for s in sizes):
        return run
    run.mkdir(parents=True, exist_ok=True)
    root = open_store(run, mode="a")
    root.attrs.update({"model": "synthetic", "classes": [f"class {i}" for i in range(10)]})
    for s in sizes:
        g = root.require_group(f"grids/{LAYER}/{ATLAS}/{s}")
        write_array(g, "count", np.full((s, s), 10, np.int32))
        write_array(g, "render", np.ones((s, s), bool))
        write_array(g, "top_classes", np.tile(np.arange(5, dtype=np.int32), (s, s, 1)))
        write_array(g, "top_attribution", np.tile(np.linspace(1, 0.2, 5, dtype=np.float32), (s, s, 1)))
        write_array(g, "mean_attribution", np.zeros((s, s, 10), np.float32))
        write_array(g, "nearest", np.full((s, s, 8), -1, np.int64))
        ic = root.require_group(f"icons/{LAYER}/{ATLAS}/{s}")
        images = create_array(ic, "images", (s, s, icon, icon, 3), np.uint8, overwrite=True)
        for gy in range(s):
            images[gy] = textured_row(s, icon, gy)
        write_array(ic, "done", np.ones((s, s), bool))
    return run


def worker(kind: str, run: Path, out: Path, size: int) -> float:
    """One timed job, run in its own process; returns seconds."""
    from atlas.store import open_store
    from atlas.tiles import GridPlan, make_tiles, plan_levels, write_pyramid

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    root = open_store(run)
    if kind == "dzsave":
        import pyvips

        images = root[f"icons/{LAYER}/{ATLAS}/{size}/images"]
        icon = images.shape[2]
        flat = np.empty((size * icon, size * icon, 3), np.uint8)
        for gy in range(size):
            flat[gy * icon : (gy + 1) * icon] = images[gy].transpose(1, 0, 2, 3).reshape(icon, size * icon, 3)
        image = pyvips.Image.new_from_memory(flat.data, flat.shape[1], flat.shape[0], 3, "uchar")
        t0 = time.perf_counter()
        image.dzsave(str(out / "atlas"), suffix=".jpg[Q=75]", tile_size=254, overlap=1)
        return time.perf_counter() - t0
    if kind == "make_tiles":
        shutil.rmtree(run / "tiles", ignore_errors=True)  # a first tiling: replacing old tiles adds their deletion
        t0 = time.perf_counter()
        make_tiles(run, LAYER, atlas=ATLAS, sizes=[size], examples=False, viewer=False)
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    sizes = [size // 8, size // 4, size // 2, size] if kind == "semantic" else [size]
    plans, arrays = [], {}
    for s in sizes:
        images = root[f"icons/{LAYER}/{ATLAS}/{s}/images"]
        plans.append(GridPlan(size=s, icon=images.shape[2], canvas=s * images.shape[2]))
        arrays[s] = images
    _, _, owners = plan_levels(plans)
    sources = [(p, arrays[p.size], np.ones((p.size, p.size), bool), None) for p in owners]
    write_pyramid(sources, out)
    return time.perf_counter() - t0


def run_child(kind: str, run: Path, out: Path, size: int) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one job in a fresh process."""
    proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--run", str(run), "--out", str(out), "--size", str(size)],
                            stdout=subprocess.PIPE, text=True)
    out_text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{kind} failed with status {proc.returncode}")
    return float(json.loads(out_text.strip().splitlines()[-1])["seconds"]), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--icon", type=int, default=80)
    parser.add_argument("--work", type=Path, default=Path("/tmp/atlas-bench"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--worker")
    parser.add_argument("--run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"seconds": worker(args.worker, args.run, args.out, args.size)}))
        return

    t0 = time.perf_counter()
    run = build(args.work, args.size, args.icon, semantic=True)
    canvas = args.size * args.icon
    print(f"synthetic run: {args.size}x{args.size} grid of {args.icon} px icons = {canvas} px canvas "
          f"(+ {args.size // 8}/{args.size // 4}/{args.size // 2} grids), built in {time.perf_counter() - t0:.1f} s; "
          f"{os.cpu_count()} CPUs")
    jobs = [("dzsave", "pyvips dzsave (flat image in memory)"), ("atlas", "atlas write_pyramid (160 grid)"),
            ("semantic", "atlas write_pyramid (20/40/80/160 grids)"), ("make_tiles", "atlas make_tiles (160, no examples)")]
    results: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeat):
        for kind, _label in jobs:
            seconds, peak = run_child(kind, run, args.work / f"out-{kind}", args.size)
            best = results.get(kind)
            results[kind] = (min(seconds, best[0]) if best else seconds, max(peak, best[1]) if best else peak)
    base = results["dzsave"][0]
    print("\n| job | time (s) | peak RSS (MB) | time / dzsave |\n|---|---:|---:|---:|")
    for kind, label in jobs:
        seconds, peak = results[kind]
        print(f"| {label} | {seconds:.2f} | {peak:.0f} | {seconds / base:.2f}x |")
    ratio = results["atlas"][0] / base
    print(f"\nratio atlas/dzsave = {ratio:.2f}x (target <= 1.2x): {'OK' if ratio <= 1.2 else 'OVER'}")


if __name__ == "__main__":
    main()
