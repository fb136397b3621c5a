"""Top-1 of the real ViT-Ti/16 through atlas's image loader against a plain timm loop, on the same photos.

Three passes over the same labelled photos (ImageNet file names ``n01440764_tench.JPEG`` give the labels):

(a) atlas: ``load_model("timm:vit_tiny_patch16_224", weights)`` and the loader every stage reads photos with
    (:class:`atlas.data.ImageDataset` with the model's own preprocessing: bicubic, shorter side 248, centre 224;
    JPEGs decoded at a reduced scale first, as the sampler does);
(b) the same pixels as (a) through a plain timm model (``timm.create_model`` + the weights, loaded strictly) with
    timm's normalisation: the largest logit difference says whether atlas's wrapper computes the model's function;
(c) a plain timm loop: PIL's full-size decode and timm's own transform (``resolve_data_config`` +
    ``create_transform``), the usual way to evaluate a timm model.

Prints top-1 accuracy of (a) and (c), how many top-1 classes (a) and (c) share, and (a) vs (b)'s largest logit
difference and top-1 agreement; one JSON line at the end.

    .venv/bin/python -P bench/vit_fidelity.py [--images ../shared/data/imagenet-samples] [--weights FILE] [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from atlas.data import ImageDataset, class_table, list_images, real_path
from atlas.models import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
NAME = "vit_tiny_patch16_224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(SHARED / "data" / "imagenet-samples"))
    parser.add_argument("--weights", default=str(SHARED / "models" / f"{NAME}.safetensors"))
    parser.add_argument("--n", type=int, default=1000, help="first N photos of the folder")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    images = list_images(args.images, class_table(args.weights)).head(args.n)  # synset_words.txt beside the weights
    labels = np.asarray(images.labels)
    net = load_model(f"timm:{NAME}", args.weights)
    prep = net.preprocess
    plain = timm.create_model(NAME, pretrained=False)
    plain.load_state_dict(load_file(args.weights), strict=True)
    plain.eval()
    config = timm.data.resolve_data_config({}, model=plain)
    normalise = transforms.Normalize(config["mean"], config["std"])
    whole = timm.data.create_transform(**config)
    print(f"{len(images)} photos; atlas reads them {prep['interpolation']}, shorter side {prep['resize']}, crop {prep['size']}; "
          f"timm's transform: {config['interpolation']}, crop_pct {config['crop_pct']}, {config['input_size']}")

    dataset = ImageDataset(images, prep["resize"], prep["size"], interpolation=prep["interpolation"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers)
    ours, same, skipped = [], [], 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _index, x, errors in loader:
            skipped += sum(bool(e) for e in errors)
            ours.append(net.module(x))
            same.append(plain(normalise(x)))
    ours_t, same_t = torch.cat(ours), torch.cat(same)
    t_atlas = time.perf_counter() - t0

    t0 = time.perf_counter()
    own = []
    with torch.inference_mode():
        for lo in range(0, len(images), args.batch):
            batch = [whole(Image.open(real_path(p)).convert("RGB")) for p in images.paths[lo:lo + args.batch]]
            own.append(plain(torch.stack(batch)))
    own_t = torch.cat(own)
    t_plain = time.perf_counter() - t0

    top_ours, top_same, top_own = ours_t.argmax(1).numpy(), same_t.argmax(1).numpy(), own_t.argmax(1).numpy()
    known = labels >= 0
    result = {
        "photos": len(images), "labelled": int(known.sum()), "skipped": skipped,
        "top1_atlas": round(float((top_ours[known] == labels[known]).mean()), 4),
        "top1_timm_loop": round(float((top_own[known] == labels[known]).mean()), 4),
        "same_top1_atlas_vs_timm_loop": int((top_ours == top_own).sum()),
        "max_logit_diff_same_pixels": float((ours_t - same_t).abs().max()),
        "same_top1_same_pixels": int((top_ours == top_same).sum()),
        "seconds_atlas_and_same_pixels": round(t_atlas, 1), "seconds_timm_loop": round(t_plain, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    print(f"(a) atlas loader + wrapped model: top-1 {result['top1_atlas']:.4f}")
    print(f"(b) the same pixels, plain timm model: largest logit difference {result['max_logit_diff_same_pixels']:.2e}, "
          f"same top-1 on {result['same_top1_same_pixels']} of {len(images)}")
    print(f"(c) plain timm loop (its own decode and transform): top-1 {result['top1_timm_loop']:.4f}; "
          f"same top-1 as (a) on {result['same_top1_atlas_vs_timm_loop']} of {len(images)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
