"""`atlas reconstruct`: the reconstructed equivalent model of each image (fixed ReLU masks, pooling switches and LRN
gains), its class templates, evidence overlays, a unit's effective filter and the paper's Table 1."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import ReconstructSettings as R
from atlas.settings import check_out_folder


@app.command("reconstruct")
def reconstruct_command(
    images: Annotated[list[Path], typer.Argument(help="photos (each is resized to 256 and centre-cropped to 224)")],
    out: Annotated[Path, typer.Option("--out", help="output folder (figures, arrays, table.md, table.json)")],
    model: Annotated[str, typer.Option(help="inceptionv1 or a torchvision ReLU classifier (resnet18, vgg16, ...)")] = "inceptionv1",
    weights: Annotated[Path | None, typer.Option(help="weights file (default: $ATLAS_WEIGHTS, then ~/.cache/atlas)")] = None,
    top: Annotated[int, typer.Option(help=R.option_help("top"))] = R.top,
    unit: Annotated[str | None, typer.Option(help=R.option_help("unit"))] = R.unit,
    dtype: Annotated[str, typer.Option(help=R.option_help("dtype"))] = R.dtype,
    check_columns: Annotated[int, typer.Option(help=R.option_help("check_columns"))] = R.check_columns,
    batch: Annotated[int, typer.Option(help=R.option_help("batch"))] = R.batch,
    device: Annotated[str, typer.Option(help=R.option_help("device"))] = R.device,
) -> None:
    """Record every non-linearity's state on each image and show the equivalent affine model: top-class templates
    (rows of W_x), W_x ⊙ x as positive/negative evidence, and the original vs reconstructed outputs (Table 1)."""
    # Checked before the instrument (and torch) is imported: `--top 0` or `--unit mixed4c` fail at once.
    settings = R(top=top, unit=unit, dtype=dtype, check_columns=check_columns, batch=batch, device=device)
    check_out_folder(out)
    from atlas.weights import reconstruct_report, table_markdown

    summary = reconstruct_report(images, out, settings, model=model, weights=weights, echo=typer.echo)
    typer.echo("")
    typer.echo(table_markdown(summary["images"]).rstrip())
    typer.echo(f"-> {out}/table.md, {out}/table.json")
