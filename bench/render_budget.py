"""Benchmark: icon quality per optimisation compute, strategies side by side on the cells of a real run.

Builds a small real run with atlas's own stages (the shared photos, mixed4c, no attribution, grids 10 and 20),
picks ``--cells`` grid-20 cells whose grid-10 parent cell is also rendered, and renders those cells' icons under
each strategy, all in one process, with the renderer's own seeds (seed, hash of the cell's direction, attempt)
and settings (80 px, Adam lr 0.05, the default transforms, whitening S from the run). Reported per strategy:
the mean and the 10th percentile of the final whitened cosine cos(h, S v) (what the objective aligns), the mean
objective, the mean raw cos(h, v) to the unwhitened cell mean, and the icon-steps spent per icon (all attempts).

Strategies:

* ``paper`` (1024 steps x best of 4) and ``standard`` (512 x 2): the presets, the references;
* ``plain 512x1``: one seed, 512 steps (1/8 of the paper's icon-steps);
* ``screen 4 x 32 -> 384``: successive halving in its simplest form: all 4 seeds for 32 steps, then only the seed
  with the highest objective is optimised (from its start, 384 steps; 512 icon-steps in all);
* ``warm 10->20 + K``: each grid-20 icon starts from the finished parameters of its grid-10 parent cell's icon
  (512 x 1 on the parent's own direction) and runs K more steps on its own direction. Its icon-steps are K; the
  parent's 512 are spent anyway where the atlas renders grid 10 too (the table also gives them amortised over the
  parent's kept grid-20 children).

    .venv/bin/python -P bench/render_budget.py [--cells 8] [--photos 300] [--out /tmp/render_budget]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from atlas.models import load_model
from atlas.render.objectives import direction
from atlas.render.optimize import Optimization, Result, Settings, best_of
from atlas.render.param import default_param
from atlas.render.run import DEFAULT_TRANSFORMS, _digest

LAYER = "mixed4c"
SIZE = 80  # icon side, px: the presets'
SHARED = Path(os.environ.get("ATLAS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PHOTOS = SHARED / "data" / "imagenet-samples"
WEIGHTS = SHARED / "models" / "bvlc_googlenet.safetensors"


def build_run(out: Path, photos: int) -> Path:
    """A real run: ``photos`` shared photos x 2 positions at mixed4c, no attribution, a UMAP layout, grids 10 and 20."""
    import atlas

    if not (out / "store.zarr").exists() or f"grids/{LAYER}/full/20" not in zarr.open_group(str(out / "store.zarr"), mode="r"):
        atlas.sample(PHOTOS, [LAYER], out, weights=WEIGHTS, max_images=photos, per_image=2, attribution=False,
                     progress=False)
        atlas.project(out, LAYER)
        atlas.grid(out, LAYER, [10, 20])
    return out


def pick_cells(root: zarr.Group, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` grid-20 cells (evenly spread over the kept ones) whose grid-10 parent (y // 2, x // 2) is kept too, and
    the number of kept grid-20 children of each grid-10 cell."""
    fine, coarse = root[f"grids/{LAYER}/full/20/render"][...], root[f"grids/{LAYER}/full/10/render"][...]
    cells = np.array([(y, x) for y, x in np.argwhere(fine) if coarse[y // 2, x // 2]])
    pick = cells[np.linspace(0, len(cells) - 1, min(n, len(cells))).round().astype(int)]
    children = np.zeros(coarse.shape, int)
    for y, x in np.argwhere(fine):
        children[y // 2, x // 2] += 1
    return pick, children


def run(net, vectors: np.ndarray, whitening: np.ndarray, steps: int, attempts: int, seed: int = 0,
        param=None, digests: np.ndarray | None = None, seeds: list | None = None) -> Result:
    """``vectors``' icons as the renderer makes them (its seeds and settings), best of ``attempts``."""
    digests = digests if digests is not None else np.array([_digest(v.tobytes()) for v in vectors])
    seeds = seeds or [(seed, int(d), k) for d in digests for k in range(attempts)]
    settings = Settings(size=SIZE, steps=steps, attempts=attempts, transforms=DEFAULT_TRANSFORMS)
    objective = direction(LAYER, torch.from_numpy(vectors).repeat_interleave(len(seeds) // len(vectors), 0),
                          torch.from_numpy(whitening))
    opt = Optimization(net, LAYER, objective, seeds, settings, param=param)
    opt.step()
    return best_of(opt.result(), len(seeds) // len(vectors))


def screen(net, vectors: np.ndarray, whitening: np.ndarray, attempts: int, short: int, steps: int) -> Result:
    """All ``attempts`` seeds for ``short`` steps, then the seed of each icon whose trial scored highest, alone, for
    ``steps`` steps from its start. A seed's transforms are drawn for the run's length, so the trial is not the long
    run's prefix: the screen picks a starting point (and transform stream), and costs ``attempts * short`` steps."""
    digests = np.array([_digest(v.tobytes()) for v in vectors])
    trial = Optimization(net, LAYER, direction(LAYER, torch.from_numpy(vectors).repeat_interleave(attempts, 0),
                                               torch.from_numpy(whitening)),
                         [(0, int(d), k) for d in digests for k in range(attempts)],
                         Settings(size=SIZE, steps=short, attempts=attempts, transforms=DEFAULT_TRANSFORMS))
    trial.step()
    best = trial.result().objective.reshape(len(vectors), attempts).argmax(1)
    return run(net, vectors, whitening, steps, 1, seeds=[(0, int(d), int(k)) for d, k in zip(digests, best, strict=True)])


def warm(net, vectors: np.ndarray, parents: np.ndarray, whitening: np.ndarray, parent_steps: int,
         child_steps: int) -> Result:
    """Each child icon starts from its parent cell's finished parameters (``parent_steps`` x 1 on the parent's own
    direction) and runs ``child_steps`` more on its own."""
    unique, which = np.unique(parents, axis=0, return_inverse=True)
    pdig = [(0, _digest(p.tobytes()), 0) for p in unique]
    parent = Optimization(net, LAYER, direction(LAYER, torch.from_numpy(unique), torch.from_numpy(whitening)), pdig,
                          Settings(size=SIZE, steps=parent_steps, transforms=DEFAULT_TRANSFORMS))
    parent.step()
    digests = np.array([_digest(v.tobytes()) for v in vectors])
    seeds = [(0, int(d), 0) for d in digests]
    param = default_param(seeds, SIZE)  # the child's own seed draws its transforms; its start is the parent's icon
    with torch.no_grad():
        param.inner.spectrum.copy_(parent.param.inner.spectrum.detach().cpu()[torch.from_numpy(which.ravel())])
    return run(net, vectors, whitening, child_steps, 1, param=param, seeds=seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=8, help="grid-20 cells rendered under every strategy")
    ap.add_argument("--photos", type=int, default=300, help="shared photos sampled (2 positions each)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/render_budget"), help="run folder (kept and reused)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.01: a smoke run)")
    ap.add_argument("--skip", default="", help="comma-separated strategy names to leave out (e.g. paper)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = zarr.open_group(str(build_run(args.out, args.photos) / "store.zarr"), mode="r")
    net = load_model("inceptionv1", WEIGHTS)
    cells, children = pick_cells(root, args.cells)
    if not len(cells):
        raise SystemExit("render_budget: error: no grid-20 cell with a kept grid-10 parent; sample more photos (--photos)")
    means20, means10 = root[f"grids/{LAYER}/full/20/mean_activation"], root[f"grids/{LAYER}/full/10/mean_activation"]
    vectors = np.stack([np.asarray(means20[int(y), int(x)], np.float32) for y, x in cells])
    parents = np.stack([np.asarray(means10[int(y) // 2, int(x) // 2], np.float32) for y, x in cells])
    whitening = root[f"whitening/{LAYER}/matrix"][...].astype(np.float32)
    per_parent = float(np.mean([children[y // 2, x // 2] for y, x in cells]))
    k = lambda steps: max(1, round(steps * args.scale))  # noqa: E731 - every step count, scaled for a smoke run
    strategies = {
        "paper (1024 x 4)": (4 * k(1024), lambda: run(net, vectors, whitening, k(1024), 4)),
        "standard (512 x 2)": (2 * k(512), lambda: run(net, vectors, whitening, k(512), 2)),
        "plain 512 x 1": (k(512), lambda: run(net, vectors, whitening, k(512), 1)),
        "screen 4 x 32 -> 384": (4 * k(32) + k(384), lambda: screen(net, vectors, whitening, 4, k(32), k(384))),
        "warm 10->20 + 128": (k(128), lambda: warm(net, vectors, parents, whitening, k(512), k(128))),
        "warm 10->20 + 256": (k(256), lambda: warm(net, vectors, parents, whitening, k(512), k(256))),
    }
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    load = os.getloadavg()
    print(f"{len(cells)} grid-20 cells of a run of {args.photos} shared photos x 2 positions at {LAYER} (grids 10/20, "
          f"whitened), {SIZE} px; their grid-10 parents have {per_parent:.1f} kept grid-20 children on average", flush=True)
    rows = []
    for name, (cost, fn) in strategies.items():
        if any(name.startswith(s) for s in skip):
            continue
        start = time.perf_counter()
        r = fn()
        seconds = time.perf_counter() - start
        amortised = f"{cost + k(512) / per_parent:.0f}" if name.startswith("warm") else f"{cost}"
        rows.append((name, float(np.mean(r.cosine_whitened)), float(np.percentile(r.cosine_whitened, 10)),
                     float(np.mean(r.objective)), float(np.mean(r.cosine)), cost, amortised, seconds))
        print(f"  {name}: {seconds:.0f} s, mean cos(h, S v) {rows[-1][1]:.3f}, 10th pct {rows[-1][2]:.3f}, "
              f"objective {rows[-1][3]:.1f}, raw cos(h, v) {rows[-1][4]:.3f}", flush=True)  # a row now, in case of a kill
    print(f"\nload average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}\n")
    print("| strategy | mean cos(h, S v) | 10th pct cos(h, S v) | mean objective | mean raw cos(h, v) | icon-steps per icon "
          "| with the parent amortised | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, white, p10, obj, raw, cost, amortised, seconds in rows:
        print(f"| {name} | {white:.3f} | {p10:.3f} | {obj:.1f} | {raw:.3f} | {cost} | {amortised} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
