"""`atlas inspect`: one or more photos under the microscope (prediction, layer views, occlusion, invariance,
correspondence, the image on the atlas), written as an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.errors import AtlasError
from atlas.settings import InspectSettings as S


def _numbers(option: str, text: str | None, cast):
    """``--shifts -60,-30,0,30`` -> a tuple; a malformed list is one line."""
    if text is None:
        return None
    try:
        values = tuple(cast(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise AtlasError(f"{option} must be a comma-separated list of numbers, e.g. -60,-30,0,30,60; got {text!r}") from None
    if not values:
        raise AtlasError(f"{option} must list at least one number; got {text!r}")
    return values


def _shown(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@app.command("inspect")
def inspect_command(
    images: Annotated[list[Path], typer.Argument(help="photos to inspect")],
    run: Annotated[Path | None, typer.Option(help="run folder: its model, its atlas, and the report inside its viewer")] = None,
    out: Annotated[Path | None, typer.Option(help="report folder (default with --run: RUN/tiles/inspect/NAME)")] = None,
    name: Annotated[str | None, typer.Option(help="report name (default: the first image's file name)")] = None,
    layer: Annotated[list[str] | None, typer.Option("--layer", help=S.option_help("layers") + " Repeat for several.")] = None,
    atlas_layer: Annotated[str | None, typer.Option("--atlas-layer", help=S.option_help("layer"))] = S.layer,
    model: Annotated[str | None, typer.Option(help="model without --run (default inceptionv1)")] = None,
    weights: Annotated[str | None, typer.Option(help="weights file without --run (default: the usual lookup)")] = None,
    label: Annotated[str | None, typer.Option(help=S.option_help("label"))] = S.label,
    top: Annotated[int, typer.Option(help=S.option_help("top"))] = S.top,
    no_occlusion: Annotated[bool, typer.Option("--no-occlusion", help="skip the occlusion maps")] = False,
    occluder: Annotated[int, typer.Option(help=S.option_help("occluder"))] = S.occluder,
    stride: Annotated[int, typer.Option(help=S.option_help("stride"))] = S.stride,
    no_invariance: Annotated[bool, typer.Option("--no-invariance", help="skip the invariance curves")] = False,
    shifts: Annotated[str | None, typer.Option(help=f"{S.option_help('shifts')} Comma-separated (default {_shown(S.shifts)}).")]
    = None,
    scales: Annotated[str | None, typer.Option(help=f"{S.option_help('scales')} Comma-separated (default {_shown(S.scales)}).")]
    = None,
    angles: Annotated[str | None, typer.Option(help=f"{S.option_help('angles')} Comma-separated (default {_shown(S.angles)}).")]
    = None,
    low_layer: Annotated[str | None, typer.Option(help=S.option_help("low_layer"))] = S.low_layer,
    high_layer: Annotated[str | None, typer.Option(help=S.option_help("high_layer"))] = S.high_layer,
    boxes: Annotated[str | None, typer.Option(help=S.option_help("boxes"))] = S.boxes,
    n_random: Annotated[int, typer.Option(help=S.option_help("n_random"))] = S.n_random,
    neighbors: Annotated[int, typer.Option(help=S.option_help("neighbors"))] = S.neighbors,
    atlas: Annotated[str, typer.Option(help=S.option_help("atlas"))] = S.atlas,
    seed: Annotated[int, typer.Option(help=S.option_help("seed"))] = S.seed,
    batch_size: Annotated[int, typer.Option(help=S.option_help("batch_size"))] = S.batch_size,
    device: Annotated[str, typer.Option(help=S.option_help("device"))] = S.device,
) -> None:
    """Inspect photos: top classes, every layer's channel maps, occlusion sensitivity, invariance curves, the
    correspondence analysis (--boxes) and, with --run, where each image lands on the run's atlas."""
    # Checked before the instrument (and torch) is imported: `--stride 0` or `--scales x` fail at once.
    settings = S(layers=tuple(layer or ()), layer=atlas_layer, top=top, label=label, occlusion=not no_occlusion, occluder=occluder,
                 stride=stride, invariance=not no_invariance, shifts=_numbers("--shifts", shifts, int) or S.shifts,
                 scales=_numbers("--scales", scales, float) or S.scales, angles=_numbers("--angles", angles, int) or S.angles,
                 low_layer=low_layer, high_layer=high_layer, boxes=boxes, n_random=n_random, neighbors=neighbors, atlas=atlas,
                 seed=seed, batch_size=batch_size, device=device)
    if run is None and out is None:
        raise AtlasError("give --run RUN (the report goes into the run's viewer) or --out DIR")
    from atlas.inspect import inspect

    report = inspect(images, run, settings, out, model=model, weights=weights, name=name, echo=typer.echo)
    if report.get("correspondence", {}).get("markdown"):  # the paper's table, printed as well as in the report
        typer.echo(report["correspondence"]["markdown"])
    typer.echo(f"report of {len(report['images'])} image(s) -> {report['index']}"
               + (f" ({len(report['skipped'])} skipped)" if report["skipped"] else "") + f"; {report['seconds']:.0f}s")
