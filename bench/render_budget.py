"""Benchmark: icon quality per optimisation compute, strategies side by side on the cells of a real run.

Builds a real run with atlas's own stages (``--photos`` shared photos x 2 positions, mixed4c, no attribution, a
UMAP layout, grids 10, 20 and 40) and renders the icons of ``--cells`` grid-20 cells and ``--cells`` grid-40 cells
(each grid-40 cell's grid-20 parent among the grid-20 ones) under each strategy, with the renderer's own seeds
(seed, hash of the cell's direction, attempt) and settings (80 px, the default transforms, whitening S from the run).
Reported per strategy: the mean and the 10th percentile of the final whitened cosine cos(h, S v) (what the
objective aligns), the mean objective, the mean raw cos(h, v) to the unwhitened cell mean, and the icon-steps spent
per icon (all attempts). Quality figures do not depend on the machine's load; the seconds do.

Strategies (``--only`` / ``--skip`` take their keys):

* ``paper`` (1024 steps x best of 4), on the first ``--paper-cells`` grid-20 cells only (its cost), and
  ``standard`` (512 x 2) on all cells: the references. The standard run is measured every 64 steps, which gives
  three more rows for free: ``plain 512 x 1`` (its first attempt), ``plain 256 x 1`` (that attempt at step 256: the
  same optimiser, its transforms drawn for 512 steps) and ``early stop`` (the first attempt stopped at the first
  64-step mark from 128 on where its objective under the transforms rose by less than 2% over the last 64 steps);
* ``cosine``: one seed, 256 steps, Adam's step size decayed from 0.05 to 0 along half a cosine;
* ``screen``: successive halving: all 4 seeds for the first 32 steps of a 256-step run, then only the seed whose
  objective over its last 16 steps was highest goes on, parameters and Adam state carried (352 icon-steps);
  ``screen16``: 4 seeds for 16 steps of a 208-step run (256, standard's 1/4); ``screen8``: 8 seeds for 16 steps of a
  384-step run (496, paper's 1/8), on the paper cells only;
* ``warm``: each grid-40 icon starts from the finished parameters of its grid-20 parent's ``standard`` icon and runs
  K more steps on its own direction (128 constant; 64 with the cosine schedule). Its icon-steps are K: the parent's
  are spent anyway where the atlas renders grid 20 too.

Each strategy's per-cell figures and icons are kept in ``--out``/results (a later call reuses them), so strategies
can run in separate processes (``--only``) and a final call prints the tables and writes ``sheet.png`` (rows:
strategies, columns: the paper cells).

    .venv/bin/python -P bench/render_budget.py [--cells 40] [--paper-cells 8] [--photos 1000] [--only standard]
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
EVERY = 64  # the standard run is measured every EVERY steps (the early-stop and plain 256 x 1 rows)


def build_run(out: Path, photos: int) -> Path:
    """A real run: ``photos`` shared photos x 2 positions at mixed4c, no attribution, a UMAP layout, grids 10/20/40."""
    import atlas

    if not (out / "store.zarr").exists() or f"grids/{LAYER}/full/40" not in zarr.open_group(str(out / "store.zarr"), mode="r"):
        atlas.sample(PHOTOS, [LAYER], out, weights=WEIGHTS, max_images=photos, per_image=2, attribution=False,
                     progress=False)
        atlas.project(out, LAYER)
        atlas.grid(out, LAYER, sizes=[10, 20, 40])
    return out


def pick_cells(root: zarr.Group, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``n`` kept grid-40 cells whose grid-20 parent is kept (evenly spread), and ``n`` grid-20 cells: their
    parents first, then others evenly spread. Returns (grid-20 cells, grid-40 cells, index of each grid-40 cell's
    parent among the grid-20 cells)."""
    kept20, kept40 = root[f"grids/{LAYER}/full/20/render"][...], root[f"grids/{LAYER}/full/40/render"][...]
    c40 = np.array([(y, x) for y, x in np.argwhere(kept40) if kept20[y // 2, x // 2]]).reshape(-1, 2)
    c40 = c40[np.unique(np.linspace(0, len(c40) - 1, min(n, len(c40))).round().astype(int))] if len(c40) else c40
    parents = [tuple(p) for p in np.unique(c40 // 2, axis=0)]
    rest = [tuple(c) for c in np.argwhere(kept20) if tuple(c) not in parents]
    extra = max(0, n - len(parents))
    more = [rest[i] for i in np.unique(np.linspace(0, len(rest) - 1, min(extra, len(rest))).round().astype(int))] if extra else []
    c20 = np.array(parents + more).reshape(-1, 2)
    which = np.array([parents.index(tuple(c // 2)) for c in c40], int)
    return c20, c40, which


def optimization(net, vectors: np.ndarray, whitening: np.ndarray, steps: int, attempts: int, seeds: list | None = None,
                 lr: float = 0.05, schedule: str = "constant", param=None) -> Optimization:
    """The renderer's optimisation of ``vectors``' icons (its seeds unless ``seeds``: (seed, hash of v, attempt))."""
    seeds = seeds or [(0, _digest(v.tobytes()), k) for v in vectors for k in range(attempts)]
    settings = Settings(size=SIZE, steps=steps, attempts=attempts, lr=lr, schedule=schedule, transforms=DEFAULT_TRANSFORMS)
    objective = direction(LAYER, torch.from_numpy(vectors).repeat_interleave(len(seeds) // len(vectors), 0),
                          torch.from_numpy(whitening))
    return Optimization(net, LAYER, objective, seeds, settings, param=param)


def run(net, vectors: np.ndarray, whitening: np.ndarray, steps: int, attempts: int, seeds: list | None = None,
        lr: float = 0.05, schedule: str = "constant", param=None) -> Result:
    """``vectors``' icons as the renderer makes them, best of ``attempts``."""
    opt = optimization(net, vectors, whitening, steps, attempts, seeds, lr, schedule, param)
    opt.step()
    return best_of(opt.result(), attempts)


def curve(net, vectors: np.ndarray, whitening: np.ndarray, steps: int, attempts: int, every: int = EVERY
          ) -> tuple[Result, dict, np.ndarray, np.ndarray]:
    """Like :func:`run`, measured every ``every`` steps: (best-of result, {step: per-attempt Result}, the trace
    (steps, n * attempts), the finished spectra of the kept attempts)."""
    opt = optimization(net, vectors, whitening, steps, attempts)
    marks = {}
    while opt.done < steps:
        opt.step(every)
        marks[opt.done] = opt.result()
    final = marks[steps]
    pick = final.objective.reshape(len(vectors), attempts).argmax(1) + np.arange(len(vectors)) * attempts
    spectra = opt.param.inner.spectrum.detach().cpu()[torch.from_numpy(pick)].numpy()
    return best_of(final, attempts), marks, opt.trace, spectra


def screen(net, vectors: np.ndarray, whitening: np.ndarray, attempts: int, short: int, steps: int) -> Result:
    """Successive halving: all ``attempts`` seeds for the first ``short`` steps of a ``steps``-step run, then only each
    icon's seed whose objective (under the transforms) over its last ``short // 2`` trial steps was highest goes on to
    ``steps``, its parameters and Adam state carried over. The kept icon is therefore exactly that seed's plain
    ``steps``-step run; it costs ``attempts * short + steps - short`` icon-steps."""
    trial = optimization(net, vectors, whitening, steps, attempts)
    trial.step(short)
    score = trial.trace[short - max(1, short // 2): short].mean(0).reshape(len(vectors), attempts)
    rows = torch.from_numpy(score.argmax(1) + np.arange(len(vectors)) * attempts)
    seeds = [trial_seed for i, trial_seed in enumerate(_seeds(vectors, attempts)) if i in set(rows.tolist())]
    keep = optimization(net, vectors, whitening, steps, 1, seeds=seeds)
    old, new = trial.param.inner.spectrum, keep.param.inner.spectrum
    with torch.no_grad():
        new.copy_(old.detach()[rows])
    state = trial.optimizer.state[old]
    keep.optimizer.state[new] = {k: (v.clone() if v.dim() == 0 else v[rows].clone()) for k, v in state.items()}
    keep.trace[:short] = trial.trace[:short, rows.numpy()]
    keep.done = short
    keep.step()
    return keep.result()


def _seeds(vectors: np.ndarray, attempts: int) -> list[tuple[int, int, int]]:
    return [(0, _digest(v.tobytes()), k) for v in vectors for k in range(attempts)]


def warm(net, vectors: np.ndarray, spectra: np.ndarray, whitening: np.ndarray, steps: int, lr: float = 0.05,
         schedule: str = "constant") -> Result:
    """Each icon starts from ``spectra`` (its parent cell's finished parameters, one row per icon) and runs ``steps``
    steps on its own direction, its own seed drawing the transforms."""
    seeds = _seeds(vectors, 1)
    param = default_param(seeds, SIZE)
    with torch.no_grad():
        param.inner.spectrum.copy_(torch.from_numpy(spectra))
    return run(net, vectors, whitening, steps, 1, seeds=seeds, lr=lr, schedule=schedule, param=param)


def parent_spectra(net, parents: np.ndarray, whitening: np.ndarray, steps: int) -> np.ndarray:
    """Finished parameters of one plain ``steps`` x 1 icon per parent direction (the tests' stand-in for a coarser grid)."""
    opt = optimization(net, parents, whitening, steps, 1)
    opt.step()
    return opt.param.inner.spectrum.detach().cpu().numpy()


def early_stop(marks: dict, trace: np.ndarray, attempts: int, tol: float = 0.02) -> tuple[np.ndarray, Result]:
    """The first attempt of a measured run, stopped at the first mark from 128 on where its mean objective under the
    transforms over the last ``EVERY`` steps rose by less than ``tol`` over the ``EVERY`` before: (stop step per icon,
    its figures there)."""
    steps = sorted(marks)
    n = marks[steps[0]].objective.shape[0] // attempts
    first = np.arange(n) * attempts
    stop = np.full(n, steps[-1])
    for i, row in enumerate(first):
        for s in steps:
            if s >= 2 * EVERY:
                now, before = trace[s - EVERY: s, row].mean(), trace[s - 2 * EVERY: s - EVERY, row].mean()
                if now < before + tol * abs(before):
                    stop[i] = s
                    break
    pick = lambda name: np.array([getattr(marks[s], name)[row] for s, row in zip(stop, first, strict=True)])  # noqa: E731
    return stop, Result(pick("images"), pick("cosine"), pick("objective"), np.zeros((0, n), np.float32), pick("cosine_whitened"))


def _save(path: Path, r: Result, steps: np.ndarray | float, seconds: float, **extra) -> None:
    pixels = np.clip(np.rint(r.images * 255.0), 0, 255).astype(np.uint8)
    np.savez(path, images=pixels, cosine=r.cosine, objective=r.objective, cosine_whitened=r.cosine_whitened,
             steps=np.broadcast_to(np.asarray(steps, float), r.objective.shape), seconds=seconds, **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=40, help="grid-40 cells, and grid-20 cells, rendered under every strategy")
    ap.add_argument("--paper-cells", type=int, default=8, help="grid-20 cells also rendered with the paper preset")
    ap.add_argument("--photos", type=int, default=1000, help="shared photos sampled (2 positions each)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/render_budget"), help="run folder and results (kept and reused)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.05: a smoke run)")
    ap.add_argument("--only", default="", help="comma-separated strategy keys to compute now (others: from results)")
    ap.add_argument("--skip", default="", help="comma-separated strategy keys to leave out")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores; 1 on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    root = zarr.open_group(str(build_run(args.out, args.photos) / "store.zarr"), mode="r")
    c20, c40, which = pick_cells(root, args.cells)
    if not len(c40):
        raise SystemExit("render_budget: error: no grid-40 cell with a kept grid-20 parent; sample more photos (--photos)")
    means = {g: root[f"grids/{LAYER}/full/{g}/mean_activation"] for g in (20, 40)}
    v20 = np.stack([np.asarray(means[20][int(y), int(x)], np.float32) for y, x in c20])
    v40 = np.stack([np.asarray(means[40][int(y), int(x)], np.float32) for y, x in c40])
    vectors = np.concatenate([v20, v40])
    whitening = root[f"whitening/{LAYER}/matrix"][...].astype(np.float32)
    m = min(args.paper_cells, len(v20))
    k = lambda steps: max(1, round(steps * args.scale))  # noqa: E731 - every step count, scaled for a smoke run
    results = args.out / "results"
    results.mkdir(exist_ok=True)
    net = None

    def model():
        nonlocal net
        net = net or load_model("inceptionv1", WEIGHTS)
        return net

    def compute(key: str) -> None:
        start = time.perf_counter()
        if key == "paper":
            _save(results / "paper.npz", run(model(), v20[:m], whitening, k(1024), 4), 4 * k(1024), 0.0)
        elif key == "standard":
            final, marks, trace, spectra = curve(model(), vectors, whitening, k(512), 2, k(EVERY))
            seconds = time.perf_counter() - start
            _save(results / "standard.npz", final, 2 * k(512), seconds, spectra20=spectra[: len(v20)])
            first = lambda r: Result(*(getattr(r, f)[::2] for f in ("images", "cosine", "objective", "trace", "cosine_whitened")))  # noqa: E731
            _save(results / "plain512.npz", first(marks[k(512)]), k(512), seconds / 2)
            _save(results / "plain256.npz", first(marks[k(256)]), k(256), seconds / 4)
            stop, stopped = early_stop(marks, trace, 2)
            _save(results / "early.npz", stopped, stop, seconds / 2 * float(np.mean(stop)) / k(512))
            return
        elif key == "cosine":
            _save(results / "cosine.npz", run(model(), vectors, whitening, k(256), 1, schedule="cosine"), k(256), 0.0)
        elif key == "screen":
            _save(results / "screen.npz", screen(model(), vectors, whitening, 4, k(32), k(256)), 3 * k(32) + k(256), 0.0)
        elif key == "screen16":  # at standard's 1/4: 4 x 16 + 192
            _save(results / "screen16.npz", screen(model(), vectors, whitening, 4, k(16), k(208)), 3 * k(16) + k(208), 0.0)
        elif key == "screen8":  # at paper's 1/8, on the paper cells: 8 x 16 + 368
            _save(results / "screen8.npz", screen(model(), v20[:m], whitening, 8, k(16), k(384)), 7 * k(16) + k(384), 0.0)
        elif key in ("warm", "warmcos"):
            std = results / "standard.npz"
            if not std.exists():
                raise SystemExit("render_budget: error: the warm start needs the standard results first (--only standard)")
            spectra = np.load(std)["spectra20"][which]
            steps, schedule = (k(128), "constant") if key == "warm" else (k(64), "cosine")
            _save(results / f"{key}.npz", warm(model(), v40, spectra, whitening, steps, schedule=schedule), steps, 0.0)
        else:
            raise SystemExit(f"render_budget: error: unknown strategy '{key}'")
        data = dict(np.load(results / f"{key}.npz"))
        data["seconds"] = time.perf_counter() - start
        np.savez(results / f"{key}.npz", **data)

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(f"{len(c20)} grid-20 and {len(c40)} grid-40 cells ({len(np.unique(which))} grid-20 parents) of a run of "
          f"{args.photos} shared photos x 2 positions at {LAYER} (whitened), {SIZE} px, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    for key in only:
        print(f"  computing {key} ...", flush=True)
        compute(key)
        print(f"  {key} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    if only:
        return
    names = {"paper": "paper (1024 x 4)", "standard": "standard (512 x 2)", "plain512": "plain 512 x 1",
             "plain256": "plain 256 x 1 (step 256 of the 512 x 1 run)", "early": "early stop (the 512 x 1 run)",
             "cosine": "cosine lr 256 x 1", "screen": "screen 4 x 32 -> 1 x 256", "screen16": "screen 4 x 16 -> 1 x 208",
             "screen8": "screen 8 x 16 -> 1 x 384", "warm": "warm 20->40 + 128",
             "warmcos": "warm 20->40 + 64, cosine lr"}
    have = {n: dict(np.load(results / f"{n}.npz")) for n in names if (results / f"{n}.npz").exists() and n not in skip}
    n20, everything = len(v20), np.arange(len(vectors))
    rows_of = {"paper": np.arange(m), "screen8": np.arange(m), "warm": n20 + np.arange(len(v40)), "warmcos": n20 + np.arange(len(v40))}

    def table(title: str, cells: np.ndarray) -> None:
        print(f"\n{title}\n")
        print("| strategy | mean cos(h, S v) | 10th pct cos(h, S v) | mean objective | mean raw cos(h, v) | icon-steps per icon |")
        print("|---|---|---|---|---|---|")
        for n, d in have.items():
            own = rows_of.get(n, everything)
            if not set(cells) <= set(own):
                continue
            at = np.searchsorted(own, cells)
            white = d["cosine_whitened"][at]
            print(f"| {names[n]} | {white.mean():.3f} | {np.percentile(white, 10):.3f} | {d['objective'][at].mean():.1f} | "
                  f"{d['cosine'][at].mean():.3f} | {d['steps'][at].mean():.0f} |")

    table(f"All {len(vectors)} cells ({n20} of grid 20, {len(v40)} of grid 40):", everything)
    table(f"The {m} paper cells (grid 20):", np.arange(m))
    table(f"The {len(v40)} grid-40 cells (warm starts from their grid-20 parents' standard icons):", n20 + np.arange(len(v40)))
    print("\nseconds per strategy (a loaded machine's; read ratios only): " +
          ", ".join(f"{n} {float(d['seconds']):.0f}" for n, d in have.items()))
    from PIL import Image

    cols = np.arange(m)
    shown = [n for n in have if set(cols) <= set(rows_of.get(n, everything))]
    sheet = np.full((len(shown) * (SIZE + 4), len(cols) * (SIZE + 4), 3), 255, np.uint8)
    for r, n in enumerate(shown):
        at = np.searchsorted(rows_of.get(n, everything), cols)
        for c, i in enumerate(at):
            icon = have[n]["images"][i]
            sheet[r * (SIZE + 4): r * (SIZE + 4) + icon.shape[0], c * (SIZE + 4): c * (SIZE + 4) + icon.shape[1]] = icon
    Image.fromarray(sheet).save(args.out / "sheet.png")
    print(f"\nsheet: {args.out / 'sheet.png'} (rows, top to bottom: {', '.join(names[n] for n in shown)})")


if __name__ == "__main__":
    main()
