"""`atlas layers`: a model's layers with their channels and spatial size (:func:`atlas.models.describe_layers`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.errors import AtlasError
from atlas.settings import MODEL_HELP


@app.command("layers")
def layers_command(
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "inceptionv1",
    weights: Annotated[Path | None, typer.Option(help="weights file (not needed: the architecture alone gives the layers)")] = None,
    size: Annotated[int, typer.Option(help="input size in pixels")] = 224,
) -> None:
    """List a model's layers with channel count and spatial size."""
    if not 1 <= size <= 4096:
        raise AtlasError(f"layers.size must be an integer in 1..4096; got {size}")
    from atlas.models import describe_layers, load_model

    net = load_model(model, weights, pretrained=False)
    try:
        rows = describe_layers(net, size)
    except RuntimeError as exc:  # torch: "Output size is too small" for inputs the network's strides cannot take
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise AtlasError(f"--size {size} is too small an input for {model} ({reason}); try 224") from None
    width = max(len(r["layer"]) for r in rows)
    typer.echo(f"{'layer'.ljust(width)}  channels  size")
    for r in rows:
        typer.echo(f"{r['layer'].ljust(width)}  {r['channels']:>8}  {r['height']}x{r['width']}")
