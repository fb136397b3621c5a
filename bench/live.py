"""Benchmark: the live page's WebSocket instrument against the plain approach, side by side in one run.

1. **Live, closed loop** (what the page does): a WebSocket client sends a 224 px JPEG, waits for the result (top-5
   and one layer's maps as uint8), sends the next. Frames per second and frame-to-result latency (median, 90th
   percentile). Targets: >= 10 frames/s, median <= 100 ms.
2. **Live, open loop at camera rate**: frames sent at ``--camera-fps`` whatever happens; the server keeps only the
   newest, so results/s stays at what the machine can compute and latency does not grow (dropped frames counted).
3. **Plain approach**, in process (no network, no socket: the most favourable setting for it): per frame, decode
   the JPEG, a full forward, :func:`atlas.inspect.views.channel_grid` and a PNG encode of the grid, as a
   request-per-frame endpoint would do.

Every frames/s figure also prints the GFLOP/s it achieves and its share of this machine's fp32 and bf16 matmul
throughput, measured at the start of the same run (bench/flops.py): frames/s x the GFLOP of one whole forward of a
224 px frame (torch's flop counter on the reference model; the server runs the same forward on its channels-last copy,
the plain approach on the model itself; decoding, maps, top-5 and PNG are not counted).

Every figure is printed with the machine's load (``os.getloadavg``) when it was measured: on a shared 2-core
machine the load moves the numbers more than anything else.

    .venv/bin/python bench/live.py [--run RUN] [--frames 40] [--layer mixed4c] [--threads 2] [--seconds 8] [--rounds 3]

Without ``--run``, a throwaway run is sampled from 8 shared photos (the live page needs the run's model, not its
atlas; an empty atlas listing lets ``atlas serve`` start on it).
"""

from __future__ import annotations

import os
import sys

# python puts bench/ first on sys.path, where bench/inspect.py would stand in for the standard library's inspect
# (which asyncio imports): drop it before anything else is imported
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.append(HERE)  # appended (after the standard library), for bench/flops.py
import flops  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "data" / "imagenet-samples"
WEIGHTS = SHARED / "models" / "bvlc_googlenet.safetensors"


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def frames(n: int) -> list[bytes]:
    """``n`` distinct shared photos as the page sends them: centre square, 224 px, JPEG quality 85."""
    from atlas.data import load_image

    out = []
    for path in sorted(PHOTOS.glob("*.JPEG"))[::7][:n]:
        buf = io.BytesIO()
        load_image(path, 224, 224).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def throwaway_run(root: Path) -> Path:
    from atlas.sample import sample

    images = root / "images"
    images.mkdir()
    for path in sorted(PHOTOS.glob("*.JPEG"))[:8]:
        (images / path.name).symlink_to(path)
    run = root / "run"
    sample(str(images), ["mixed4c"], run, weights=str(WEIGHTS), per_image=1, attribution=False, workers=0, progress=False)
    (run / "tiles").mkdir(exist_ok=True)
    (run / "tiles" / "atlases.json").write_text(json.dumps({"version": 1, "atlases": []}))
    return run


def summary(name: str, latencies: list[float], elapsed: float, count: int, extra: str = "", per_frame: float = 0.0,
            limits: dict[str, float] | None = None) -> None:
    lat = sorted(latencies)
    p90 = lat[min(len(lat) - 1, int(0.9 * len(lat)))]
    achieved = f" ({flops.share(count / elapsed * per_frame, limits)})" if limits else ""
    print(f"{name:<44} {count / elapsed:6.1f} frames/s{achieved}   latency median {1000 * statistics.median(lat):6.0f} ms, "
          f"p90 {1000 * p90:6.0f} ms   {extra}  [{load()}]", flush=True)


async def closed_loop(url: str, data: list[bytes], layer: str, rounds: int, offset: int = 0) -> tuple[list[float], float, list[float], int]:
    import websockets

    from atlas.live import unpack

    async with websockets.connect(url, max_size=2 ** 24) as ws:
        while json.loads(await ws.recv())["type"] != "hello":
            pass
        await ws.send(json.dumps({"type": "layer", "layer": layer}))
        await ws.send(data[0])  # warm-up: the first forward allocates
        unpack(await ws.recv())
        latencies, compute = [], []
        start = time.perf_counter()
        for i in range(rounds):
            t0 = time.perf_counter()
            await ws.send(data[(offset + i + 1) % len(data)])
            head, maps = unpack(await ws.recv())
            latencies.append(time.perf_counter() - t0)
            compute.append(head["compute_ms"])
            c, h, w = head["shape"]
            assert head["type"] == "result" and head["layer"] == layer and len(maps) == c * h * w
        elapsed = time.perf_counter() - start
    return latencies, elapsed, compute, len(maps)


async def open_loop(url: str, data: list[bytes], layer: str, fps: float, seconds: float, per_frame: float = 0.0,
                    limits: dict[str, float] | None = None) -> None:
    import websockets

    from atlas.live import unpack

    async with websockets.connect(url, max_size=2 ** 24) as ws:
        while json.loads(await ws.recv())["type"] != "hello":
            pass
        await ws.send(json.dumps({"type": "layer", "layer": layer}))
        sent: dict[int, float] = {}
        latencies: list[float] = []
        last = {"dropped": 0}

        async def reader() -> None:
            while True:
                head, _ = unpack(await ws.recv())
                if head["type"] == "result":
                    latencies.append(time.perf_counter() - sent[head["seq"]])
                    last.update(head)

        task = asyncio.create_task(reader())
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < seconds:
            i += 1
            sent[i] = time.perf_counter()
            await ws.send(data[i % len(data)])
            await asyncio.sleep(max(0.0, start + i / fps - time.perf_counter()))
        await asyncio.sleep(1.0)  # the frame in flight
        elapsed = time.perf_counter() - start
        task.cancel()
    summary(f"live, open loop at {fps:g} frames/s sent", latencies, elapsed, len(latencies),
            f"({i} sent, {last['dropped']} dropped by the server)", per_frame, limits)


def plain(net, data: list[bytes], layer: str, rounds: int, offset: int = 0) -> tuple[list[float], float, list[float], list[int]]:
    """Decode + full forward + channel_grid + PNG encode per frame, in process."""
    from PIL import Image

    from atlas.inspect.engine import forward, top_classes
    from atlas.inspect.views import channel_grid
    from atlas.live import decode_frame

    latencies, sizes, forwards = [], [], []
    start = time.perf_counter()
    for i in range(rounds):
        t0 = time.perf_counter()
        frame = decode_frame(data[(offset + i + 1) % len(data)])
        t1 = time.perf_counter()
        acts, logits = forward(net, frame.tensor, [layer])
        forwards.append(time.perf_counter() - t1)
        top_classes(logits[0], net.classes, 5)
        picture, _ = channel_grid(acts[layer][0].numpy())
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, "PNG")
        sizes.append(buf.tell())
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return latencies, elapsed, forwards, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a run folder (default: a throwaway run of 8 shared photos)")
    parser.add_argument("--frames", type=int, default=40, help="frames per closed-loop measurement")
    parser.add_argument("--layer", default="mixed4c")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (server and plain)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the open-loop measurement")
    parser.add_argument("--camera-fps", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3, help="alternating live / plain rounds the frames are split into")
    args = parser.parse_args()
    os.environ.setdefault("ATLAS_WEIGHTS", str(WEIGHTS))

    from atlas.server import make_server

    print(f"bench/live.py: {os.cpu_count()} cores, torch threads {args.threads}, 224 px, layer {args.layer}  [{load()}]", flush=True)
    limits = flops.ceilings()
    print(flops.ceiling_line(limits), flush=True)
    root = Path(tempfile.mkdtemp(prefix="atlas-bench-live-"))
    try:
        run = args.run or throwaway_run(root)
        data = frames(20)
        srv = make_server(run, port=0)
        srv.app.live.threads = args.threads
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        url = f"ws://127.0.0.1:{srv.server_port}/live/ws"
        try:
            import torch

            from atlas.inspect.engine import forward
            from atlas.live import decode_frame
            from atlas.models import load_model

            net = load_model("inceptionv1", WEIGHTS)  # the plain approach's own model, in this thread
            torch.set_num_threads(args.threads)
            forward(net, decode_frame(data[0]).tensor, [args.layer])
            per_frame = flops.gflop(lambda: forward(net, decode_frame(data[0]).tensor, [args.layer]))
            print(f"GFLOP per frame (one whole forward, 224 px): {per_frame:.2f}", flush=True)
            # rounds alternate (live, plain, live, ...) so that the machine's load hits both alike
            live = {"lat": [], "elapsed": 0.0, "compute": [], "bytes": 0}
            base = {"lat": [], "elapsed": 0.0, "forward": [], "png": []}
            per = max(1, args.frames // args.rounds)
            for r in range(args.rounds):
                lat, el, comp, nbytes = asyncio.run(closed_loop(url, data, args.layer, per, offset=r * per))
                live["lat"] += lat
                live["elapsed"] += el
                live["compute"] += comp
                live["bytes"] = nbytes
                lat, el, fw, png = plain(net, data, args.layer, per, offset=r * per)
                base["lat"] += lat
                base["elapsed"] += el
                base["forward"] += fw
                base["png"] += png
            summary(f"live, closed loop ({args.layer} grid + top-5)", live["lat"], live["elapsed"], len(live["lat"]),
                    f"(server compute median {statistics.median(live['compute']):.0f} ms, {live['bytes'] / 1024:.0f} kB of maps)",
                    per_frame, limits)
            summary(f"plain: forward + channel_grid + PNG ({args.layer})", base["lat"], base["elapsed"], len(base["lat"]),
                    f"(forward alone median {1000 * statistics.median(base['forward']):.0f} ms, "
                    f"PNG {statistics.median(base['png']) / 1024:.0f} kB)", per_frame, limits)
            asyncio.run(open_loop(url, data, args.layer, args.camera_fps, args.seconds, per_frame, limits))
        finally:
            srv.shutdown()
            srv.server_close()
            thread.join(10)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"done  [{load()}]")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
