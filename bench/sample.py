"""Sampler throughput, measured side by side in one run on the same images (issue 19's targets).

(a) the model forward alone (to the sampled layer) on preloaded tensors, for each kernel choice (``--forward``):
    the reference NCHW model (one call per batch), its channels-last copy and the fused copy (the default), both in
    the sampler's CPU micro-batches (:func:`atlas.models.micro_batch`), and the fused copy in one call per batch;
(b) `atlas sample --no-attribution`: the default, the reference kernels, and the code of ``--baseline`` (the
    commit before this work, unpacked with ``git archive`` into a temporary folder and run in a subprocess on the
    same photos in the same run), plus decoder-worker and batch-size variants;
(c) a plain loop: torchvision ImageFolder + full forward + a forward hook;
(d) `atlas sample` with attribution (one forward-mode JVP per batch): the default and the baseline's;
(e) decoding alone: the sampler's DataLoader without the model, uint8 batches (now) and float ones (before);
(v) with ``--vit``: the real ViT-Ti/16 (timm) at ``blocks.6``: `atlas sample` without and with attribution against a
    plain timm loop (timm's own transforms, ImageFolder, full forward, a forward hook on the block).
Every row prints images/s and, from torch's flop counter, the GFLOP/s achieved and its share of this machine's fp32
and bf16 matmul throughput, measured at the start of the same run. (-P: bench/ holds an inspect.py that would shadow
the standard library module of that name.)

    .venv/bin/python -P bench/sample.py [--images ../shared/data/imagenet-samples] [--n 256] [--baseline 1342adf] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from atlas.data import ImageDataset, list_images, load_image, to_tensor
from atlas.models import as_input, inference_net, load_model, micro_batch, synset_words
from atlas.models.precision import resolve_precision
from atlas.sample import forward_samples, sample

sys.path.append(str(Path(__file__).parent))
import flops  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
REPO = Path(__file__).resolve().parents[1]
BASELINE = "1342adf"  # the last commit before issue 19's kernels and data path

BASELINE_SCRIPT = """
import json, sys, tempfile, time, warnings
warnings.filterwarnings("ignore")
import atlas, torch
from atlas.data import list_images
from atlas.models import load_model, synset_words
from atlas.sample import sample
assert atlas.__file__.startswith(sys.argv[1]), atlas.__file__
net = load_model("inceptionv1", sys.argv[2])
images = list_images(sys.argv[3], [s for s, _ in synset_words(net.weights)])
rates = {}
for attribution in (False, True):
    start = time.perf_counter()
    sample(images, [sys.argv[4]], tempfile.mkdtemp(), net=net, batch_size=int(sys.argv[5]), workers=int(sys.argv[6]),
           attribution=attribution, progress=False)
    rates[str(attribution)] = len(images) / (time.perf_counter() - start)
print(json.dumps(rates))
"""


def forward_only(net, x, layer, batch, forward, precision, chunked=True):
    """Batches of ``batch`` through the forward ``forward``, each in the sampler's CPU micro-batches (``chunked``)
    or in one call."""
    fast = inference_net(net, forward, [layer])
    x = as_input(x, forward)
    chunk = micro_batch(x[:batch], forward) if chunked else batch
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bfloat16"):
        fast.activations(x[:chunk], [layer])
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            for part in x[i : i + batch].split(chunk):
                fast.activations(part, [layer])
    return len(x) / (time.perf_counter() - start)


def plain_loop(net, paths, layer, batch, workers):
    """What a researcher would write first: ImageFolder, the usual transforms, full forward, a hook."""
    root = Path(tempfile.mkdtemp())
    (root / "all").mkdir()
    for p in paths:
        (root / "all" / Path(p).name).symlink_to(p)
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(root, tf), batch_size=batch, num_workers=workers)
    kept = []
    handle = net.module_of(layer).register_forward_hook(lambda m, i, o: kept.append(o[:, :, 7, 7].clone()))
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            net.module(x)
    seconds = time.perf_counter() - start
    handle.remove()
    shutil.rmtree(root)
    return len(paths) / seconds


def atlas_sample(net, images, layer, batch, workers, attribution, forward="fused"):
    out = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    sample(images, [layer], out, net=net, batch_size=batch, workers=workers, attribution=attribution, progress=False, forward=forward)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return len(images) / seconds


def plain_timm_loop(weights, paths, block, batch, workers):
    """The ViT as a researcher runs it first: timm's model and transforms, ImageFolder, full forward, a hook."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    root = Path(tempfile.mkdtemp())
    (root / "all").mkdir()
    for p in paths:
        (root / "all" / Path(p).name).symlink_to(p)
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(root, tf), batch_size=batch, num_workers=workers)
    kept = []
    handle = model.get_submodule(block).register_forward_hook(lambda m, i, o: kept.append(o[:, 1 + 7 * 14 + 7].clone()))
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            model(x)
    seconds = time.perf_counter() - start
    handle.remove()
    shutil.rmtree(root)
    return len(paths) / seconds


def decoding(images, batch, workers, uint8):
    loader = torch.utils.data.DataLoader(ImageDataset(images, uint8=uint8), batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(images) / (time.perf_counter() - start)


def baseline(rev, weights, images, layer, batch, workers):
    """(b) and (d) rates of the code at ``rev``, run from an unpacked copy in a subprocess; None if git cannot."""
    folder = Path(tempfile.mkdtemp(prefix="atlas-baseline-"))
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
        listing = folder / "images.txt"
        listing.write_text("".join(f"{p}\n" for p in images.paths))
        env = os.environ | {"PYTHONPATH": str(folder)}
        result = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, str(folder), str(weights), str(listing), layer, str(batch),
                                 str(workers)], capture_output=True, text=True, env=env, cwd=folder, check=True)
        return {k == "True": v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        print(f"baseline {rev} not measured: {exc}")
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "imagenet-samples"))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--layer", default="mixed4c")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with ('' to skip)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each row is its best round")
    parser.add_argument("--vit", action="store_true", help="add the (v) rows: the shared ViT-Ti/16 at blocks.6 (needs timm)")
    args = parser.parse_args()
    weights = os.environ.get("ATLAS_WEIGHTS") or REPO.parent / "shared" / "models" / "bvlc_googlenet.safetensors"
    net = load_model("inceptionv1", weights)
    images = list_images(args.images, [s for s, _ in synset_words(net.weights)]).head(args.n)
    precision = resolve_precision("auto", "cpu")
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    limits = flops.ceilings()
    x1 = to_tensor(load_image(images.paths[0]))[None]
    pos = {args.layer: torch.tensor([[7, 7]])}
    per_image = {
        "forward": flops.gflop(lambda: net.activations(x1, [args.layer])),
        "attribution": flops.gflop(lambda: forward_samples(net, x1, [args.layer], pos, attribution=True, forward="nchw")),
    }
    x = torch.stack([to_tensor(load_image(p)) for p in images.paths])

    # Every row is the best of --rounds runs, the rounds interleaved (the baseline's subprocess included), so a load
    # that comes and goes on this shared machine hits every row alike.
    runs: dict[str, tuple[object, str]] = {}
    chunk = micro_batch(as_input(x[: args.batch], "fused"), "fused")
    for forward in ("nchw", "channels-last", "fused"):
        runs[f"(a) forward only to {args.layer}, preloaded tensors, --forward {forward} ({precision})"] = (
            lambda forward=forward: forward_only(net, x, args.layer, args.batch, forward, precision), "forward")
    runs[f"(a) ... fused, each batch of {args.batch} in one call (not in chunks of {chunk})"] = (
        lambda: forward_only(net, x, args.layer, args.batch, "fused", precision, chunked=False), "forward")
    b_name = f"(b) atlas sample --no-attribution (default: --forward fused, {args.workers} workers, batch {args.batch})"
    d_name = "(d) atlas sample, attribution to every class (default)"
    runs[b_name] = (lambda: atlas_sample(net, images, args.layer, args.batch, args.workers, False), "forward")
    runs["(b) ... --forward nchw (the reference kernels, this code's data path)"] = (
        lambda: atlas_sample(net, images, args.layer, args.batch, args.workers, False, "nchw"), "forward")
    runs["(b) ... --workers 1"] = (lambda: atlas_sample(net, images, args.layer, args.batch, 1, False), "forward")
    runs["(b) ... --batch-size 64"] = (lambda: atlas_sample(net, images, args.layer, 64, args.workers, False), "forward")
    runs["(c) ImageFolder + full forward + hook (float32)"] = (
        lambda: plain_loop(net, images.paths, args.layer, args.batch, args.workers), "full")
    runs[d_name] = (lambda: atlas_sample(net, images, args.layer, args.batch, args.workers, True), "attribution")
    runs[f"(e) decoding only, {args.workers} workers, uint8 batches (now)"] = (
        lambda: decoding(images, args.batch, args.workers, True), "")
    runs[f"(e) decoding only, {args.workers} workers, float batches (before)"] = (
        lambda: decoding(images, args.batch, args.workers, False), "")
    if args.vit:
        vit_weights = REPO.parent / "shared" / "models" / "vit_tiny_patch16_224.safetensors"
        vit = load_model("timm:vit_tiny_patch16_224", vit_weights)
        runs["(v) ViT-Ti blocks.6: atlas sample --no-attribution"] = (
            lambda: atlas_sample(vit, images, "blocks.6", args.batch, args.workers, False), "vit")
        runs["(v) ViT-Ti blocks.6: atlas sample, attribution to every class"] = (
            lambda: atlas_sample(vit, images, "blocks.6", args.batch, args.workers, True), "vit")
        runs["(v) ViT-Ti: timm's transforms + ImageFolder + full forward + hook on blocks.6"] = (
            lambda: plain_timm_loop(vit_weights, images.paths, "blocks.6", args.batch, args.workers), "vit")
    old_b = f"(b) atlas sample --no-attribution at {args.baseline} (before this work)"
    old_d = f"(d) atlas sample with attribution at {args.baseline} (before this work)"
    best: dict[str, float] = {}
    kinds = {name: kind for name, (_, kind) in runs.items()} | {old_b: "forward", old_d: "attribution"}
    for _ in range(args.rounds):
        if args.baseline and (old := baseline(args.baseline, weights, images, args.layer, args.batch, args.workers)):
            best[old_b], best[old_d] = max(best.get(old_b, 0), old[False]), max(best.get(old_d, 0), old[True])
        for name, (run, _) in runs.items():
            best[name] = max(best.get(name, 0.0), run())
    rows = [(name, best[name], kinds[name]) for name in [*runs, old_b, old_d] if name in best]
    b, d = best[b_name], best[d_name]
    old = {False: best[old_b], True: best[old_d]} if old_b in best else None
    per_image["full"] = flops.gflop(lambda: net.module(x1))

    print(f"{len(images)} images, layer {args.layer}, torch threads {torch.get_num_threads()}, precision auto = {precision}")
    print(flops.ceiling_line(limits))
    print(f"GFLOP per image: forward to {args.layer} {per_image['forward']:.2f}, full forward {per_image['full']:.2f}, "
          f"forward + JVP (attribution) {per_image['attribution']:.2f}")
    print("| pipeline | images/s | achieved |\n|---|---|---|")
    for name, rate, kind in rows:
        achieved = flops.share(rate * per_image[kind], limits) if kind in per_image else "(no model)" if not kind else "(not counted)"
        print(f"| {name} | {rate:.1f} | {achieved} |")
    print(f"\n(d)/(b) = {d / b:.2f} (target >= 0.5)")
    if old:
        print(f"(b) now / (b) at {args.baseline} = {b / old[False]:.2f} (target >= 2); "
              f"(d) now / (d) at {args.baseline} = {d / old[True]:.2f}")
    print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
