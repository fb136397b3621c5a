"""What the store's integrity seals cost: sealing and verifying a sampler-sized activations array.

Writes ``samples/mixed4c/activations`` as the sampler does (N x 512 float16, ReLU-like sparse
values, one chunk per 256-image shard) into a temporary store, then times, side by side:
reading the whole array (what ``atlas project`` does anyway), sealing it (name, size and crc32 of
every chunk file), verifying it from scratch (listing + crc32), and verifying it again in the same
process (listing and stat only: the crc32s are skipped when sizes and mtimes are unchanged).

    .venv/bin/python bench/integrity.py [--n 1000000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from atlas import store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="rows (samples)")
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--dir", default=None, help="where to put the temporary store")
    args = parser.parse_args()
    run = Path(tempfile.mkdtemp(prefix="atlas-integrity-", dir=args.dir))
    try:
        root = store.open_store(run, "w")
        group = root.require_group("samples/mixed4c")
        shard = 256
        array = store.create_array(group, "activations", (args.n, args.channels), "float16", chunks=(shard, args.channels))
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        block = 65536
        for lo in range(0, args.n, block):
            rows = min(block, args.n - lo)
            x = np.maximum(rng.standard_normal((rows, args.channels), dtype=np.float32) - 0.5, 0).astype(np.float16)
            array[lo : lo + rows] = x
        write = time.perf_counter() - t
        files = list((run / store.STORE_NAME / "samples/mixed4c/activations/c").rglob("*"))
        stored = sum(f.stat().st_size for f in files if f.is_file())
        print(f"{args.n:,} x {args.channels} float16: {args.n * args.channels * 2 / 1e9:.2f} GB raw, {stored / 1e9:.2f} GB in "
              f"{sum(f.is_file() for f in files):,} chunk files (written in {write:.1f} s)")

        t = time.perf_counter()
        for lo in range(0, args.n, block):
            array[lo : lo + block]
        read = time.perf_counter() - t
        t = time.perf_counter()
        store.finish_stage(run, "sample", ["samples/mixed4c"])
        seal = time.perf_counter() - t
        store.seals._VERIFIED.clear()
        t = time.perf_counter()
        store.verify(run, ["samples/mixed4c"])
        cold = time.perf_counter() - t
        t = time.perf_counter()
        store.verify(run, ["samples/mixed4c"])
        warm = time.perf_counter() - t
        print(f"{'read the whole array':34s} {read:7.2f} s")
        print(f"{'seal (list + crc32 of every chunk)':34s} {seal:7.2f} s")
        print(f"{'verify, first time in a process':34s} {cold:7.2f} s")
        print(f"{'verify again (stat only)':34s} {warm:7.2f} s")
    finally:
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
