"""`atlas weights` (filter sheets) and `atlas evolution` (features over training); docs/weights.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import EvolutionSettings as E
from atlas.settings import WeightsSettings as W


def _check_files(paths: list[Path]) -> None:
    """A missing checkpoint is one line before torch is imported (the library says the same, later)."""
    for path in paths:
        if not path.expanduser().is_file():
            from atlas.errors import AtlasError

            raise AtlasError(f"checkpoint not found: {path.expanduser()}")


@app.command("weights")
def weights_command(
    out: Annotated[Path, typer.Option("--out", help="the sheet, a .png file")],
    model: Annotated[str, typer.Option(help="inceptionv1 or a torchvision classifier name")] = "inceptionv1",
    weights: Annotated[Path | None, typer.Option(help="a state dict of the model (.safetensors, .pth, .pt); default: the model's "
                                                      "own weights")] = None,
    random: Annotated[bool, typer.Option("--random", help="the model's default random initialisation (seed 0) instead of weights")]
    = False,
    layer: Annotated[str | None, typer.Option(help=W.option_help("layer"))] = W.layer,
    channels: Annotated[str | None, typer.Option(help=W.option_help("channels"))] = W.channels,
    scale: Annotated[int, typer.Option(help=W.option_help("scale"))] = W.scale,
    normalize: Annotated[str, typer.Option(help=W.option_help("normalize"))] = W.normalize,
) -> None:
    """A convolution's filters on one sheet: the first layer's in colour with their indices, deeper ones as grey grids
    (one row per filter, one square per input channel). Prints the filters' high-frequency share and colour opponency."""
    # Checked before torch is imported: `--scale 0` or `--normalize max` fail at once.
    settings = W(layer=layer, channels=channels, scale=scale, normalize=normalize)
    if out.suffix.lower() != ".png" or out.is_dir():
        from atlas.errors import AtlasError

        raise AtlasError(f"--out {out}: a filter sheet is a .png file")
    if random and weights is not None:
        from atlas.errors import AtlasError

        raise AtlasError("give --weights or --random, not both")
    _check_files([weights] if weights is not None else [])
    from atlas.models import load_model
    from atlas.weights import load_checkpoint, random_network, write_filters

    net = random_network(model) if random else load_checkpoint(weights, model) if weights is not None else load_model(model)
    s = write_filters(net, out, settings.layer, settings.channels, settings.scale, settings.normalize)
    colour = f", colour-opponent share {s['opponent_share']:.3f}" if s["opponent_share"] is not None else ""
    typer.echo(f"{s['layer']}: {s['channels']} filters {'x'.join(map(str, s['shape'][1:]))} -> {s['figure']} "
               f"({s['size'][0]}x{s['size'][1]} px); high-frequency share {s['high_frequency_share']:.3f}{colour}")


@app.command("evolution")
def evolution_command(
    checkpoints: Annotated[list[Path], typer.Option("--checkpoints", help="state dicts in training order (.safetensors, .pth, .pt)")],
    images: Annotated[Path, typer.Option("--images", help="image folder or list file searched for each unit's strongest patch")],
    layer: Annotated[str, typer.Option("--layer", help="layer whose units are followed, e.g. conv2d2 or mixed4c")],
    out: Annotated[Path, typer.Option("--out", help="the figure, a .png file (its numbers go beside it as .json)")],
    extra: Annotated[list[str] | None, typer.Argument(help="more checkpoints (--checkpoints A B C ...)", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="the checkpoints' architecture: inceptionv1 or a torchvision classifier")]
    = "inceptionv1",
    channels: Annotated[str | None, typer.Option(help=E.option_help("channels"))] = E.channels,
    patch: Annotated[int, typer.Option(help=E.option_help("patch"))] = E.patch,
    projection: Annotated[str, typer.Option(help=E.option_help("projection"))] = E.projection,
    max_images: Annotated[int | None, typer.Option(help=E.option_help("max_images"))] = E.max_images,
    batch_size: Annotated[int, typer.Option(help=E.option_help("batch_size"))] = E.batch_size,
    workers: Annotated[int, typer.Option(help=E.option_help("workers"))] = E.workers,
    device: Annotated[str, typer.Option(help=E.option_help("device"))] = E.device,
) -> None:
    """Features over training (Zeiler & Fergus, Fig. 4): each unit's strongest patch over the images and its projection
    at every checkpoint; one figure, units down, checkpoints across."""
    settings = E(layer=layer, channels=channels, patch=patch, projection=projection, max_images=max_images, batch_size=batch_size,
                 workers=workers, device=device)
    if out.suffix.lower() != ".png" or out.is_dir():
        from atlas.errors import AtlasError

        raise AtlasError(f"--out {out}: the figure is a .png file")
    _check_files([*checkpoints, *(Path(p) for p in extra or [])])
    from atlas.weights import evolution

    s = evolution([*checkpoints, *(Path(p) for p in extra or [])], images, settings=settings, out=out, model=model, echo=typer.echo)
    skipped = f"; {s['skipped']} unreadable skipped (first: {s['skipped_first']})" if s["skipped"] else ""
    typer.echo(f"{len(s['channels'])} units of {s['layer']} x {len(s['checkpoints'])} checkpoints over {s['images']} images{skipped}")
    for label, row in zip(s["labels"], s["values"], strict=True):
        typer.echo(f"  {label}: strongest " + " ".join(f"{v:.3g}" for v in row))
    typer.echo(f"-> {s['figure']} ({s['seconds']:.0f}s)")
