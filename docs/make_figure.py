"""Make the README's picture: an activation atlas of InceptionV1's mixed4c from the 1,000 shared ImageNet photos.

    python docs/make_figure.py [--images ../shared/data/imagenet-samples] [--run outputs/readme]

Builds the atlas with ``configs/cpu.toml`` (every stage skipped when the run is already complete), then writes
``docs/atlas.png``: the 20 x 20 grid's icons as one picture, each cell the feature visualisation of the mean
activation of the photos' samples that the layout put there (empty cells white).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "imagenet-samples"))
    parser.add_argument("--run", default=str(REPO / "outputs" / "readme"))
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.toml"))
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--size", type=int, default=800, help="width of the picture in pixels")
    parser.add_argument("--out", default=str(HERE / "atlas.png"))
    shared = REPO.parent / "shared" / "models" / "bvlc_googlenet.safetensors"
    parser.add_argument("--weights", default=str(shared) if shared.is_file() else None,
                        help="weights file (default: the shared BVLC file when present, else atlas's own lookup)")
    args = parser.parse_args()

    import atlas
    from atlas.build import build, load_config, merge
    from atlas.errors import AtlasError

    config = merge(load_config(Path(args.config)), {"run": {"images": args.images, "out": args.run}})
    if args.weights:
        config = merge(config, {"sample": {"weights": args.weights}})
    try:
        build(config)
    except AtlasError as exc:
        raise SystemExit(f"atlas: error: {exc}") from None
    run = atlas.open_run(args.run)
    sheet = run.sheet("mixed4c", args.grid)
    sheet.resize((args.size, args.size)).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.size} px) from {args.run}")


if __name__ == "__main__":
    main()
