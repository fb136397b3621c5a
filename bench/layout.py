"""Benchmark: `atlas project` (atlas kNN graph + parallel reproducible optimiser) against plain umap-learn, in one process.

Synthetic clustered 512-d data (tests/synthetic.py ``clustered``), N = 10k and 100k by
default, 1M with ``--million``. For each N: wall time and peak memory (process RSS sampled
every 20 ms in a thread, minus the RSS just before the run: native allocations of numba,
torch and BLAS are invisible to tracemalloc) of

* atlas: ``atlas.layout.project`` on a synthetic run folder (reads the store, builds the
  layout, computes its quality figures, writes the layout), seed 0;
* plain: ``umap.UMAP(n_neighbors=50, min_dist=0.05, metric="cosine").fit_transform(X)``
  (no seed, so umap-learn may use all cores),

and the kNN recall (k=10, the same seeded 10,000-point subsample) of both layouts against
the 512-d data under cosine. Both paths are warmed up first so numba compile time counts
for neither. Prints a markdown table and the ratios; ``--json`` saves the rows.

A second table times the two kNN backends alone (``atlas.layout.knn_graph``, the 50-NN graph
under cosine that UMAP uses): atlas's own k-means/GEMM search against faiss's IVF index, N =
100k by default and 1M with ``--million``, on the same data in the same process, interleaved
(atlas, faiss, then faiss, atlas, ... for ``--repeats``; the table shows the fastest run of
each, the fairest figure on a shared machine, and its process CPU time). Recall is the fraction of the 49 exact nearest
neighbours other than the row itself that the graph holds, on 2,000 seeded queries searched by
brute force (float32 GEMM over all N).

    .venv/bin/python bench/layout.py                 # 10k and 100k, then the kNN table at 100k
    .venv/bin/python bench/layout.py --million       # adds 1M (atlas only unless --plain-1m) to both
    .venv/bin/python bench/layout.py --knn-only --million --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic import clustered  # noqa: E402

from atlas.layout import knn_graph, knn_recall, project  # noqa: E402
from atlas.layout.neighbors import FAISS_NPROBE, NPROBE  # noqa: E402
from atlas.store import open_store, write_array  # noqa: E402

LAYER = "mixed4c"


class PeakRSS:
    """Peak resident memory above the level at entry, sampled in a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.proc = interval, psutil.Process()

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def write_run(run_dir: Path, x: np.ndarray) -> None:
    """A minimal run folder holding ``x`` as the samples of one layer (all rows valid)."""
    root = open_store(run_dir, mode="w")
    group = root.require_group("samples").require_group(LAYER)
    write_array(group, "activations", x)
    write_array(group, "valid", np.ones(len(x), bool))


def run_atlas(x: np.ndarray, workdir: Path, **kwargs) -> tuple[float, float, float, dict]:
    run_dir = workdir / f"run_{len(x)}"
    shutil.rmtree(run_dir, ignore_errors=True)
    write_run(run_dir, x)
    with PeakRSS() as mem:
        t = time.perf_counter()
        attrs = project(run_dir, LAYER, **kwargs)
        seconds = time.perf_counter() - t
    shutil.rmtree(run_dir, ignore_errors=True)
    return seconds, mem.mb, attrs["quality"]["knn_recall_10"], attrs["summary"]


def run_plain(x: np.ndarray) -> tuple[float, float, np.ndarray]:
    import umap

    with PeakRSS() as mem:
        t = time.perf_counter()
        y = umap.UMAP(n_neighbors=50, min_dist=0.05, metric="cosine").fit_transform(x)
        seconds = time.perf_counter() - t
    return seconds, mem.mb, y


def exact_neighbours(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` exact cosine nearest rows of ``x`` (self excluded) for each row index in ``queries``."""
    import torch

    unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    out = []
    for a in range(0, len(queries), 200):  # 200 x N scores at a time: 0.8 GB at 1M
        q = torch.from_numpy(queries[a : a + 200])
        scores = unit[q] @ unit.T
        scores[torch.arange(len(q)), q] = -float("inf")
        out.append(scores.topk(k, dim=1).indices.numpy())
    return np.concatenate(out)


def graph_recall(idx: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's exact neighbours (``truth``) among its graph neighbours other than itself."""
    hits = [np.intersect1d(idx[q][idx[q] != q], t).size for q, t in zip(queries, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])


def run_knn(x: np.ndarray, backend: str, nprobe: int | None, k: int, queries: np.ndarray, truth: np.ndarray) -> dict:
    with PeakRSS() as mem:
        t = time.perf_counter()
        cpu = sum(psutil.Process().cpu_times()[:2])
        idx, _ = knn_graph(x, k, "cosine", seed=0, backend=backend, nprobe=nprobe)
        seconds = time.perf_counter() - t
        cpu = sum(psutil.Process().cpu_times()[:2]) - cpu
    return {"seconds": seconds, "cpu": cpu, "mb": mem.mb, "recall": graph_recall(idx, queries, truth)}


def _label(backend: str, nprobe: int | None) -> str:
    default = {"atlas": NPROBE, "faiss": FAISS_NPROBE}[backend]
    return f"{backend} (nprobe {default}, default)" if nprobe is None else f"{backend} (nprobe {nprobe})"


def knn_table(sizes: list[int], dim: int, clusters: int, repeats: int, faiss_nprobe: list[int] | None = None, k: int = 50,
              n_queries: int = 2000) -> list[dict]:
    """Time both kNN backends on the same data, interleaved; one row per (N, backend), fastest of ``repeats``.

    ``faiss_nprobe`` adds faiss runs at those nprobe values besides its default.
    """
    configs = [("atlas", None), ("faiss", None)] + [("faiss", p) for p in faiss_nprobe or []]
    rows = []
    for n in sizes:
        x, _ = clustered(n, dim, clusters, seed=0)
        queries = np.sort(np.random.default_rng(0).choice(n, min(n_queries, n), replace=False))
        t = time.perf_counter()
        truth = exact_neighbours(x, queries, k - 1)
        print(f"N={n}: exact neighbours of {len(queries)} queries in {time.perf_counter() - t:.1f} s", flush=True)
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        for r in range(repeats):
            for backend, nprobe in configs if r % 2 == 0 else configs[::-1]:
                out = run_knn(x, backend, nprobe, k, queries, truth)
                runs[backend, nprobe].append(out)
                label = _label(backend, nprobe)
                print(f"N={n}: {label} kNN {out['seconds']:.1f} s (CPU {out['cpu']:.1f} s), +{out['mb']:.0f} MB, "
                      f"recall {out['recall']:.4f}, load {psutil.getloadavg()[0]:.1f}", flush=True)
                gc.collect()
        for (backend, nprobe), outs in runs.items():
            best = min(outs, key=lambda o: o["seconds"])
            rows.append({"n": n, "backend": _label(backend, nprobe), "nprobe": nprobe,
                         "seconds": best["seconds"], "all_seconds": [o["seconds"] for o in outs], "cpu": best["cpu"],
                         "mb": max(o["mb"] for o in outs),
                         "recall": best["recall"]})
        del x
        gc.collect()
    return rows


def print_knn_table(rows: list[dict]) -> None:
    print("\n| N | kNN backend | seconds (fastest) | all runs (s) | CPU seconds (fastest run) | recall of the 50-NN graph | "
          "peak RSS (MB) | time / atlas's |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["n"]: r["seconds"] for r in rows if r["backend"].startswith("atlas")}
    for r in rows:
        runs = ", ".join(f"{s:.1f}" for s in r["all_seconds"])
        print(f"| {r['n']:,} | {r['backend']} | {r['seconds']:.1f} | {runs} | {r['cpu']:.1f} | {r['recall']:.4f} | {r['mb']:.0f} | "
              f"{r['seconds'] / base[r['n']]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--million", action="store_true", help="also run N = 1,000,000")
    ap.add_argument("--plain-1m", action="store_true", help="also run plain umap-learn at 1M (hours on 2 cores)")
    ap.add_argument("--no-plain", action="store_true", help="atlas only")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--pca", type=int, default=None, help="pass --pca to atlas project")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--knn-only", action="store_true", help="only the kNN backend table (atlas against faiss)")
    ap.add_argument("--no-knn", action="store_true", help="skip the kNN backend table")
    ap.add_argument("--knn-sizes", type=int, nargs="*", default=[100_000], help="N of the kNN table (--million adds 1M)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each kNN backend per N, alternating the order")
    ap.add_argument("--faiss-nprobe", type=int, nargs="*", default=[], help="also time faiss at these nprobe values")
    args = ap.parse_args()
    sizes = list(args.sizes) + ([1_000_000] if args.million else [])
    warnings.filterwarnings("ignore")
    if args.knn_only:
        print(f"cores: {psutil.cpu_count()}, load average {psutil.getloadavg()[0]:.1f}", flush=True)
        knn_rows = knn_table(list(args.knn_sizes) + ([1_000_000] if args.million else []), args.dim, args.clusters, args.repeats,
                             args.faiss_nprobe)
        print_knn_table(knn_rows)
        print(f"load average at the end {psutil.getloadavg()[0]:.1f}")
        if args.json:
            args.json.write_text(json.dumps({"knn": knn_rows}, indent=2))
        return
    workdir = Path(tempfile.mkdtemp(prefix="atlas_bench_"))
    print(f"cores: {psutil.cpu_count()}, warming up numba (not timed) ...", flush=True)
    warm, _ = clustered(5000, 64, 5, seed=99)
    run_atlas(warm, workdir, n_epochs=5)
    if not args.no_plain:
        import umap

        umap.UMAP(n_neighbors=50, min_dist=0.05, metric="cosine", n_epochs=5).fit_transform(warm)
    rows = []
    for n in sizes:
        x, _ = clustered(n, args.dim, args.clusters, seed=0)
        a_s, a_mb, a_r, summary = run_atlas(x, workdir, pca=args.pca)
        print(f"N={n}: atlas {a_s:.1f} s, +{a_mb:.0f} MB, recall {a_r:.3f} ({summary})", flush=True)
        row = {"n": n, "atlas_s": a_s, "atlas_mb": a_mb, "atlas_recall": a_r, "plain_s": None, "plain_mb": None, "plain_recall": None}
        if not args.no_plain and (n < 1_000_000 or args.plain_1m):
            p_s, p_mb, y = run_plain(x)
            p_r = knn_recall(x, y, k=10, n=10000, seed=0, metric="cosine")
            print(f"N={n}: plain umap-learn {p_s:.1f} s, +{p_mb:.0f} MB, recall {p_r:.3f}", flush=True)
            row.update(plain_s=p_s, plain_mb=p_mb, plain_recall=p_r)
        rows.append(row)
        del x
        gc.collect()
    shutil.rmtree(workdir, ignore_errors=True)

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    print("\n| N | atlas project (s) | plain umap-learn (s) | speed-up | atlas peak RSS (MB) | plain peak RSS (MB) "
          "| atlas kNN recall@10 | plain kNN recall@10 | recall difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = r["plain_s"] / r["atlas_s"] if r["plain_s"] else None
        diff = r["atlas_recall"] - r["plain_recall"] if r["plain_recall"] is not None else None
        print(f"| {r['n']:,} | {r['atlas_s']:.1f} | {f(r['plain_s'], '.1f')} | {f(speed, '.1f')}x | {r['atlas_mb']:.0f} | "
              f"{f(r['plain_mb'], '.0f')} | {r['atlas_recall']:.3f} | {f(r['plain_recall'], '.3f')} | {f(diff, '+.3f')} |")
    knn_rows = []
    if not args.no_knn:
        knn_rows = knn_table(list(args.knn_sizes) + ([1_000_000] if args.million else []), args.dim, args.clusters, args.repeats,
                             args.faiss_nprobe)
        print_knn_table(knn_rows)
    if args.json:
        args.json.write_text(json.dumps({"project": rows, "knn": knn_rows}, indent=2))


if __name__ == "__main__":
    main()
