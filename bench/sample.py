"""Sampler throughput, measured side by side in one run on the same images.

(a) the model forward alone (to the sampled layer) on preloaded tensors: the ceiling;
(b) `atlas sample` without attribution;
(c) a plain loop: torchvision ImageFolder + full forward + a forward hook;
(d) `atlas sample` with attribution (one forward-mode JVP per batch).

    .venv/bin/python bench/sample.py [--images ../shared/data/imagenet-samples] [--n 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from atlas.data import list_images, load_image, to_tensor
from atlas.models import load_model, synset_words
from atlas.sample import resolve_precision, sample

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
REPO = Path(__file__).resolve().parents[1]


def ceiling(net, paths, layer, batch, precision):
    x = torch.stack([to_tensor(load_image(p)) for p in paths])
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bfloat16"):
        net.activations(x[:batch], [layer])
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            net.activations(x[i : i + batch], [layer])
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


def atlas_sample(net, images, layer, batch, workers, attribution, precision="auto"):
    out = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    sample(images, [layer], out, net=net, batch_size=batch, workers=workers, attribution=attribution, progress=False,
           precision=precision)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return len(images) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "imagenet-samples"))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--layer", default="mixed4c")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    net = load_model("inceptionv1", os.environ.get("ATLAS_WEIGHTS") or REPO.parent / "shared" / "models" / "bvlc_googlenet.safetensors")
    images = list_images(args.images, [s for s, _ in synset_words(net.weights)]).head(args.n)
    torch.set_num_threads(torch.get_num_threads())
    precision = resolve_precision("auto", "cpu")
    rows = {
        f"(a) forward only, preloaded tensors ({precision})": ceiling(net, images.paths, args.layer, args.batch, precision),
        f"(b) atlas sample --no-attribution ({precision})": atlas_sample(net, images, args.layer, args.batch, args.workers, False),
        "(a') forward only, preloaded tensors (float32)": ceiling(net, images.paths, args.layer, args.batch, "float32"),
        "(b') atlas sample --no-attribution --precision float32": atlas_sample(net, images, args.layer, args.batch, args.workers,
                                                                               False, "float32"),
        "(c) ImageFolder + full forward + hook": plain_loop(net, images.paths, args.layer, args.batch, args.workers),
        "(d) atlas sample (with attribution)": atlas_sample(net, images, args.layer, args.batch, args.workers, True),
    }
    a, b, c = (rows[f"(a) forward only, preloaded tensors ({precision})"], rows[f"(b) atlas sample --no-attribution ({precision})"],
               rows["(c) ImageFolder + full forward + hook"])
    a32, b32 = rows["(a') forward only, preloaded tensors (float32)"], rows["(b') atlas sample --no-attribution --precision float32"]
    print(f"{len(images)} images, layer {args.layer}, batch {args.batch}, workers {args.workers}, torch threads {torch.get_num_threads()}")
    print("| pipeline | images/s |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\n(b)/(a) = {b / a:.2f} (target >= 0.8); (b)/(c) = {b / c:.2f} (target >= 2)")
    print(f"(b')/(a') = {b32 / a32:.2f}; (b')/(c) = {b32 / c:.2f} (float32 throughout)")


if __name__ == "__main__":
    main()
