"""Benchmark: icon quality per optimisation compute, strategies side by side on the cells of a real run.

Builds a real run with atlas's own stages (``--photos`` shared photos x 2 positions, mixed4c, no attribution, a UMAP
layout, grids 10, 20 and 40) and optimises the icons of ``--cells`` grid-20 cells and ``--cells`` grid-40 cells with
the renderer's own seeds ((seed, hash of the cell's direction, attempt): the seeds, starts and transform draws of
``atlas render``), settings (80 px, the default transforms, whitening S from the run) and objective.

Every icon is one seed's plain run, so one measured run answers many strategies. ``curves`` runs 4 seeds x 512
steps for every cell (the ``standard`` preset's seeds are its first 2, its steps the same 512, so its icons are
exactly ``standard``'s), measuring every seed every 32 steps; ``paper`` runs 4 seeds x 1,024 steps (the ``paper``
preset itself) on ``--paper-cells`` grid-20 cells evenly spread among them, measured every 64 steps. The rows are read off them:

* a preset: best of its seeds by the final objective (what the renderer keeps);
* plain S x 1: the first seed at step S (below the run's length its transforms were drawn for the longer run);
* screen A x T -> S (successive halving): all A seeds for T steps, then only the seed whose objective under the
  transforms over its last T/2 trial steps was highest goes on to S steps (``atlas render --screen T``, which keeps
  its parameters and Adam state); it costs A x T + S - T icon-steps, and its icon is that seed's plain S-step run.

``polish`` (a strategy not kept, shown for why): one seed, 256 steps, the last 64 without transforms, on the first 32
grid-20 cells.

Reported per row: the mean and the 10th percentile of the final whitened cosine cos(h, S v) of the icon as shown
(what the objective aligns), the same averaged over 16 random views of the icon under the renderer's transforms (a
fixed draw; an icon that only works at one exact alignment scores high on the first and low on this one), the mean
objective, the mean raw cos(h, v) to the unwhitened cell mean, and the icon-steps per icon (all seeds). Quality
figures do not depend on the machine's load; the seconds do.

Results are kept per chunk of cells in ``--out``/results (a later or killed call reuses them), so the work can run in
several processes (``--only``); a call without ``--only`` prints the tables and writes ``sheet.png`` (rows: strategies,
columns: the paper cells).

    .venv/bin/python -P bench/render_budget.py [--cells 150] [--paper-cells 16] [--only curves,paper,polish]
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
from atlas.render.objectives import State, direction
from atlas.render.optimize import Optimization, Settings, layer_output, screened_rows
from atlas.render.param import COLOR_MATRIX, FFT_DIVISOR, default_param, frequency_scale
from atlas.render.run import DEFAULT_TRANSFORMS, _digest
from atlas.render.transforms import apply, draw

LAYER = "mixed4c"
SIZE = 80  # icon side, px: the presets'
SHARED = Path(os.environ.get("ATLAS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PHOTOS = SHARED / "data" / "imagenet-samples"
WEIGHTS = SHARED / "models" / "bvlc_googlenet.safetensors"
SEEDS = 4  # seeds per cell in the measured runs
VIEWS = 16  # random views of the transformed-view cosine
POLISH_CELLS = 32


def build_run(out: Path, photos: int) -> Path:
    """A real run: ``photos`` shared photos x 2 positions at mixed4c, no attribution, a UMAP layout, grids 10/20/40."""
    import atlas

    if not (out / "store.zarr").exists() or f"grids/{LAYER}/full/40" not in zarr.open_group(str(out / "store.zarr"), mode="r"):
        atlas.sample(PHOTOS, [LAYER], out, weights=WEIGHTS, max_images=photos, per_image=2, attribution=False,
                     progress=False)
        atlas.project(out, LAYER)
        atlas.grid(out, LAYER, sizes=[10, 20, 40])
    return out


def warm_pairs(c20: np.ndarray, c40: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the grid-40 cells whose grid-20 parent, the cell holding them, is among ``c20``; each one's parent's index in ``c20``)."""
    where = {tuple(c): i for i, c in enumerate(c20.tolist())}
    pairs = [(i, where[(y // 2, x // 2)]) for i, (y, x) in enumerate(c40.tolist()) if (y // 2, x // 2) in where]
    return np.array([a for a, _ in pairs], int), np.array([b for _, b in pairs], int)


def spread(n: int, k: int) -> np.ndarray:
    """``min(k, n)`` indices evenly spread over ``range(n)``."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int)) if n else np.zeros(0, int)


def pick_cells(root: zarr.Group, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` kept grid-20 cells and ``n`` kept grid-40 cells, each evenly spread over the kept cells of its grid
    (row-major order; all of them when ``n`` is at least their number)."""
    out = []
    for g in (20, 40):
        kept = np.argwhere(root[f"grids/{LAYER}/full/{g}/render"][...])
        out.append(kept[spread(len(kept), n)])
    return out[0], out[1]


def seeds_of(vectors: np.ndarray, attempts: int) -> list[tuple[int, int, int]]:
    """The renderer's seed tuples (seed 0, hash of the direction, attempt), icon-major."""
    return [(0, _digest(v.tobytes()), k) for v in vectors for k in range(attempts)]


def optimization(net, vectors: np.ndarray, whitening: np.ndarray, steps: int, attempts: int, schedule: str = "constant",
                 start: np.ndarray | None = None) -> Optimization:
    """The renderer's optimisation of ``attempts`` seeds of each of ``vectors``' icons for ``steps`` steps (``start``:
    the spectra to begin from, one per image, instead of the seeds' own)."""
    seeds = seeds_of(vectors, attempts)
    settings = Settings(size=SIZE, steps=steps, attempts=attempts, transforms=DEFAULT_TRANSFORMS, schedule=schedule)
    objective = direction(LAYER, torch.from_numpy(vectors).repeat_interleave(attempts, 0), torch.from_numpy(whitening))
    param = default_param(seeds, SIZE)
    if start is not None:
        with torch.no_grad():
            param.inner.spectrum.copy_(torch.from_numpy(start))
    return Optimization(net, LAYER, objective, seeds, settings, param=param)


def spectra_of(images: np.ndarray) -> np.ndarray:
    """The default parameterisation's spectra that give ``images`` (n, P, P, 3; uint8 or floats in (0, 1)): its sigmoid,
    colour mixing and scaled inverse FFT undone (a stored icon's values are clipped half a level inside (0, 1))."""
    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    x = x / 255.0 if images.dtype == np.uint8 else x
    x = x.clamp(0.5 / 255, 1 - 0.5 / 255)
    y = torch.log(x) - torch.log1p(-x)
    z = torch.linalg.solve(COLOR_MATRIX, y.flatten(2)).view_as(y) * FFT_DIVISOR
    spectrum = torch.fft.rfft2(z, norm="ortho") / frequency_scale(z.shape[-2], z.shape[-1])
    return torch.view_as_real(spectrum).contiguous().numpy()


def view_draws(views: int = VIEWS) -> torch.Tensor:
    """A fixed draw of ``views`` random views (the renderer's transform ranges), the same for every icon and strategy."""
    return torch.from_numpy(draw(DEFAULT_TRANSFORMS, views, np.random.default_rng(12345)))


def transformed_cosine(net, images: np.ndarray, vectors: np.ndarray, whitening: np.ndarray, draws: torch.Tensor) -> np.ndarray:
    """Mean cos(h, S v) of each icon (n, P, P, 3, floats in [0, 1] or uint8) over the random views ``draws``."""
    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2).contiguous()
    x = x / 255.0 if images.dtype == np.uint8 else x
    objective = direction(LAYER, torch.from_numpy(vectors), torch.from_numpy(whitening))
    t = DEFAULT_TRANSFORMS
    total = np.zeros(len(x), np.float64)
    with torch.no_grad():
        for d in draws:
            view = apply(x, d.expand(len(x), 4), t.out_size(x.shape[-1]), t.zoom, t.fill)
            h = layer_output(net, LAYER, view).float()
            total += objective.cosine_whitened(State({LAYER: h}, x, LAYER)).numpy()
    return (total / len(draws)).astype(np.float32)


def measured(net, vectors: np.ndarray, whitening: np.ndarray, steps: int, every: int, keep: tuple[int, ...],
             seeds: int = SEEDS, polish: int = 0, schedule: str = "constant", start: np.ndarray | None = None
             ) -> dict[str, np.ndarray]:
    """``seeds`` seeds x ``steps`` steps of each icon (``polish``: the last steps without transforms; ``schedule``: Adam's
    step size; ``start``: spectra to begin from), measured every ``every`` steps. Returns per seed (columns icon-major,
    ``seeds`` per icon): ``marks``; ``white``, ``objective``, ``raw`` (marks, n * seeds) of the icon as shown; ``trace``
    (steps, n * seeds) the objective under the transforms; and at each step in ``keep``: ``images_S`` (uint8) and
    ``views_S`` (the transformed-view cosine)."""
    opt = optimization(net, vectors, whitening, steps, seeds, schedule, start)
    if polish:
        d = opt.draws.clone()
        d[-polish:, :, 0], d[-polish:, :, 1:] = 1.0, 0.0  # scale 1, no rotation, no shift: the icon as shown
        opt.draws = d
    repeated = np.repeat(vectors, seeds, 0)
    out: dict[str, list] = {"marks": [], "white": [], "objective": [], "raw": []}
    while opt.done < steps:
        opt.step(every)
        images, objective, raw, white = opt.measure()
        out["marks"].append(opt.done)
        out["white"].append(white.numpy())
        out["objective"].append(objective.numpy())
        out["raw"].append(raw.numpy())
        if opt.done in keep:
            pixels = np.clip(np.rint(images.permute(0, 2, 3, 1).numpy() * 255.0), 0, 255).astype(np.uint8)
            out[f"images_{opt.done}"] = pixels
            out[f"views_{opt.done}"] = transformed_cosine(net, pixels, repeated, whitening, view_draws())
    result = {k: np.asarray(v) for k, v in out.items()}
    result["trace"] = opt.trace.copy()
    return result


# --- the strategies, read off a measured run: each returns (chosen column per icon, the step it is read at, icon-steps)


def best_of(run: dict, attempts: int, step: int) -> tuple[np.ndarray, int, int]:
    """The renderer's ``attempts`` x ``step`` preset: of the first ``attempts`` seeds, the highest final objective."""
    at = list(run["marks"]).index(step)
    objective = run["objective"][at].reshape(-1, SEEDS)[:, :attempts]
    return objective.argmax(1) + np.arange(len(objective)) * SEEDS, step, attempts * step


def plain(run: dict, step: int, seeds: int = SEEDS) -> tuple[np.ndarray, int, int]:
    """The first seed alone, read at ``step`` (``seeds``: seeds per icon in the run)."""
    n = run["trace"].shape[1] // seeds
    return np.arange(n) * seeds, step, step


def early_stop(run: dict, every: int, least: int, tol: float = 0.02) -> tuple[np.ndarray, np.ndarray, float]:
    """The first seed stopped at the first mark from ``least`` on where its mean objective under the transforms over the
    last ``every`` steps rose by less than ``tol`` over the ``every`` before: (its column per icon, the stop step per
    icon, the mean icon-steps)."""
    trace, marks = run["trace"], list(run["marks"])
    cols = np.arange(trace.shape[1] // SEEDS) * SEEDS
    stop = np.full(len(cols), marks[-1])
    for i, c in enumerate(cols):
        for m in marks:
            if m >= max(least, 2 * every):
                now, before = trace[m - every: m, c].mean(), trace[m - 2 * every: m - every, c].mean()
                if now < before + tol * abs(before):
                    stop[i] = m
                    break
    return cols, stop, float(stop.mean())


def screen(trace: np.ndarray, attempts: int, trial: int, step: int) -> tuple[np.ndarray, int, int]:
    """Successive halving: of the first ``attempts`` seeds, the one whose objective under the transforms over trial steps
    [trial - trial // 2, trial) was highest (``trace`` (steps, n * SEEDS)) goes on to ``step``."""
    rows = screened_rows(trace.reshape(len(trace), -1, SEEDS)[:, :, :attempts].reshape(len(trace), -1), attempts, trial)
    icon, seed = np.divmod(rows, attempts)
    return icon * SEEDS + seed, step, attempts * trial + step - trial


def figures(run: dict, chosen: tuple[np.ndarray, int, int]) -> dict[str, np.ndarray | float]:
    """Per icon: the exact and transformed-view whitened cosines, objective and raw cosine of the chosen seeds."""
    cols, step, cost = chosen
    at = list(run["marks"]).index(step)
    views = run.get(f"views_{step}")
    return {"white": run["white"][at][cols], "views": views[cols] if views is not None else np.full(len(cols), np.nan),
            "objective": run["objective"][at][cols], "raw": run["raw"][at][cols], "steps": float(cost),
            "images": run[f"images_{step}"][cols] if f"images_{step}" in run else None}


def rows_of(run: dict, paper: bool, k=lambda steps: steps) -> dict[str, tuple[np.ndarray, int, int]]:
    """The strategies read off a measured ``curves`` run (``paper``: a ``paper`` run); ``k`` scales the step counts
    (a smoke run), the names keep the full-size ones."""
    trace = run["trace"]
    if paper:
        rows = {"paper (1024 x 4)": best_of(run, 4, k(1024))}
        for trial, step in ((64, 320), (32, 384), (64, 512), (64, 768), (128, 768), (32, 1024), (64, 1024), (128, 1024)):
            rows[f"screen 4 x {trial} -> {step}"] = screen(trace, 4, k(trial), k(step))
        rows["plain 1024 x 1"] = plain(run, k(1024))
        return rows
    rows = {"standard (512 x 2)": best_of(run, 2, k(512)), "best of 4 x 512": best_of(run, 4, k(512)),
            "plain 512 x 1": plain(run, k(512)), "plain 256 x 1 (step 256 of 512)": plain(run, k(256))}
    # at no more than standard's 1/4 (256 icon-steps) and paper's 1/8 (512), and longer
    for attempts, trial, step in ((4, 16, 192), (2, 32, 224), (4, 32, 416), (4, 64, 320), (2, 64, 448), (4, 32, 256),
                                  (2, 32, 512), (2, 64, 512), (4, 32, 512), (4, 64, 512)):
        rows[f"screen {attempts} x {trial} -> {step}"] = screen(trace, attempts, k(trial), k(step))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=400, help="grid-20 cells, and grid-40 cells, measured (at most all kept)")
    ap.add_argument("--paper-cells", type=int, default=16, help="grid-20 cells (evenly spread) also run with the paper preset's 4 x 1024")
    ap.add_argument("--photos", type=int, default=1000, help="shared photos sampled (2 positions each)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/render_budget"), help="run folder and results (kept and reused)")
    ap.add_argument("--chunk", type=int, default=25, help="cells optimised together (results are kept per chunk)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (a power of 2 such as 1/16: a smoke run)")
    ap.add_argument("--only", default="", help="comma-separated keys to compute now: curves, paper, polish, cosine, warm")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    root = zarr.open_group(str(build_run(args.out, args.photos) / "store.zarr"), mode="r")
    c20, c40 = pick_cells(root, args.cells)
    if not len(c20) or not len(c40):
        raise SystemExit("render_budget: error: no kept grid-20 or grid-40 cell; sample more photos (--photos)")
    v20 = np.stack([np.asarray(root[f"grids/{LAYER}/full/20/mean_activation"][int(y), int(x)], np.float32) for y, x in c20])
    v40 = np.stack([np.asarray(root[f"grids/{LAYER}/full/40/mean_activation"][int(y), int(x)], np.float32) for y, x in c40])
    vectors = np.concatenate([v20, v40])
    whitening = root[f"whitening/{LAYER}/matrix"][...].astype(np.float32)
    paper_cells = spread(len(v20), args.paper_cells)
    k = lambda steps: max(1, round(steps * args.scale))  # noqa: E731 - every step count, scaled for a smoke run
    results = args.out / "results"
    results.mkdir(exist_ok=True)
    net = None

    def model():
        nonlocal net
        net = net or load_model("inceptionv1", WEIGHTS)
        return net

    def chunks(key: str, vs: np.ndarray, steps: int, every: int, keep: tuple[int, ...], start: np.ndarray | None = None,
               **options) -> None:
        for lo in range(0, len(vs), args.chunk):
            path = results / f"{key}_{lo:05d}.npz"
            if path.exists():
                continue
            t0 = time.perf_counter()
            part = None if start is None else start[lo: lo + args.chunk]
            data = measured(model(), vs[lo: lo + args.chunk], whitening, steps, every, keep, start=part, **options)
            np.savez(path, seconds=time.perf_counter() - t0, **data)
            print(f"  {key} cells {lo}-{lo + len(vs[lo: lo + args.chunk]) - 1} in {time.perf_counter() - t0:.0f} s, "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)

    def warm() -> None:
        """Each grid-40 cell whose grid-20 parent was measured starts from the parent's ``standard`` icon."""
        curves = load(results, "curves")
        if curves is None or curves["trace"].shape[1] // SEEDS < len(vectors):
            raise SystemExit("render_budget: error: the warm start needs every cell's curves first (--only curves)")
        children, parents = warm_pairs(c20, c40)
        cols, _, _ = best_of(curves, 2, k(512))
        start = spectra_of(curves[f"images_{k(512)}"][cols[parents]])
        chunks("warm", v40[children], k(128), k(32), (k(128),), seeds=1, start=start)

    jobs = {"curves": lambda: chunks("curves", vectors, k(512), k(32), tuple(k(s) for s in (192, 224, 256, 320, 416, 448, 512))),
            "paper": lambda: chunks("paper", v20[paper_cells], k(1024), k(64), (k(512), k(1024))),
            "polish": lambda: chunks("polish", v20[:POLISH_CELLS], k(256), k(32), (k(256),), seeds=1, polish=k(64)),
            "cosine": lambda: chunks("cosine", vectors, k(256), k(32), (k(256),), seeds=1, schedule="cosine"),
            "warm": warm}
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    print(f"{len(c20)} grid-20 and {len(c40)} grid-40 cells of a run of {args.photos} shared photos x 2 positions at "
          f"{LAYER} (whitened), {SIZE} px, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}", flush=True)
    for key in only:
        if key not in jobs:
            raise SystemExit(f"render_budget: error: unknown key '{key}'; choose {', '.join(jobs)}")
        jobs[key]()
    if only:
        return
    report(results, len(v20), paper_cells, warm_pairs(c20, c40)[0], k)


def load(results: Path, key: str) -> dict | None:
    """A key's chunks joined along the icons (None when none exist)."""
    parts = [dict(np.load(p)) for p in sorted(results.glob(f"{key}_*.npz"))]
    if not parts:
        return None
    joined = {"marks": parts[0]["marks"], "seconds": sum(float(p["seconds"]) for p in parts)}
    for name in parts[0]:
        if name in ("marks", "seconds"):
            continue
        axis = 1 if name in ("white", "objective", "raw", "trace") else 0
        joined[name] = np.concatenate([p[name] for p in parts], axis)
    return joined


def report(results: Path, n20: int, paper_cells: np.ndarray, children: np.ndarray, k) -> None:
    """Print the tables and write ``sheet.png``; ``children``: the grid-40 cells (indices among them) the warm start ran on."""
    from PIL import Image

    runs = {key: load(results, key) for key in ("curves", "paper", "polish", "cosine", "warm")}
    curves, paper = runs["curves"], runs["paper"]
    if curves is None:
        raise SystemExit("render_budget: error: no results yet; run with --only curves first")
    n = curves["trace"].shape[1] // SEEDS

    def line(name: str, f: dict, cells: np.ndarray) -> str:
        w, v = f["white"][cells], f["views"][cells]
        views = f"{np.nanmean(v):.3f} | {np.nanpercentile(v, 10):.3f}" if np.isfinite(v).all() else "n/a | n/a"
        return (f"| {name} | {w.mean():.3f} | {np.percentile(w, 10):.3f} | {views} | {f['objective'][cells].mean():.1f} | "
                f"{f['raw'][cells].mean():.3f} | {f['steps']:.0f} |")

    def table(title: str, rows: dict[str, tuple[dict, np.ndarray]]) -> None:
        print(f"\n{title}:\n\n| strategy | mean cos(h, S v) | 10th pct | transformed views: mean | 10th pct | mean objective | "
              "mean raw cos(h, v) | icon-steps per icon |\n|---|---|---|---|---|---|---|---|")
        for name, (f, cells) in rows.items():
            print(line(name, f, cells))

    rows = {name: figures(curves, c) for name, c in rows_of(curves, False, k).items()}
    cols, stop, mean_stop = early_stop(curves, k(64), k(128))
    at = np.searchsorted(curves["marks"], stop)
    rows["early stop (the first seed of 512)"] = {
        "white": curves["white"][at, cols], "views": np.full(n, np.nan), "objective": curves["objective"][at, cols],
        "raw": curves["raw"][at, cols], "steps": mean_stop, "images": None}
    if runs["cosine"] is not None and runs["cosine"]["trace"].shape[1] == n:
        rows["cosine step size, 256 x 1"] = figures(runs["cosine"], plain(runs["cosine"], k(256), 1))
    for title, cells in ((f"All {n} cells ({min(n, n20)} of grid 20, {max(0, n - n20)} of grid 40)", np.arange(n)),
                         (f"The {min(n, n20)} grid-20 cells", np.arange(min(n, n20))),
                         (f"The {max(0, n - n20)} grid-40 cells", np.arange(n20, n))):
        if len(cells):
            table(title, {name: (f, cells) for name, f in rows.items()})
    paper_rows = {}
    if paper is not None:
        mp = paper["trace"].shape[1] // SEEDS
        paper_rows = {name: figures(paper, c) for name, c in rows_of(paper, True, k).items()}
        table(f"The {mp} paper cells (grid-20 cells evenly spread)",
              {name: (f, np.arange(mp)) for name, f in paper_rows.items()} |
              {name: (f, paper_cells[:mp]) for name, f in rows.items()})
    if runs["warm"] is not None:
        f = figures(runs["warm"], plain(runs["warm"], k(128), 1))
        f["steps"] = float(k(128))
        mine = np.arange(len(f["white"]))
        table(f"The {len(mine)} grid-40 cells whose grid-20 parent was measured, the warm start",
              {"warm 20 -> 40: + 128 from the parent's standard icon (its steps spent for grid 20)": (f, mine)} |
              {name: (rows[name], n20 + children[: len(mine)]) for name in
               ("plain 256 x 1 (step 256 of 512)", "plain 512 x 1", "standard (512 x 2)")})
    if runs["polish"] is not None:
        f = figures(runs["polish"], plain(runs["polish"], k(256), 1))
        mq = np.arange(len(f["white"]))
        table(f"The first {len(mq)} grid-20 cells: polishing without transforms (not kept: the icon fits its exact alignment)",
              {"polish: 256 x 1, the last 64 without transforms": (f, mq)} |
              {name: (rows[name], mq) for name in ("plain 256 x 1 (step 256 of 512)", "standard (512 x 2)")})
    print("\nseconds (a loaded machine's; read ratios only): " +
          ", ".join(f"{key} {r['seconds']:.0f}" for key, r in runs.items() if r is not None))
    # the sheet: rows are strategies, columns the first 8 paper cells (or the first 8 cells without a paper run)
    cols = paper_cells[: min(8, paper["trace"].shape[1] // SEEDS)] if paper is not None else np.arange(min(8, n))
    shown = [(name, f["images"][: len(cols)]) for name, f in paper_rows.items() if f["images"] is not None]
    shown += [(name, f["images"][cols]) for name, f in rows.items() if f["images"] is not None]
    sheet = np.full((len(shown) * (SIZE + 4), len(cols) * (SIZE + 4), 3), 255, np.uint8)
    for r, (_, images) in enumerate(shown):
        for c, icon in enumerate(images):
            sheet[r * (SIZE + 4): r * (SIZE + 4) + icon.shape[0], c * (SIZE + 4): c * (SIZE + 4) + icon.shape[1]] = icon
    Image.fromarray(sheet).save(results.parent / "sheet.png")
    print(f"\nsheet: {results.parent / 'sheet.png'} (rows, top to bottom: {', '.join(name for name, _ in shown)})")


if __name__ == "__main__":
    main()
