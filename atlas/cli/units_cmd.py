"""`atlas units`: the unit lens (top-k examples, projections, feature visualisations, gallery) of a sampled run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import RunSettings
from atlas.settings import UnitsSettings as U


@app.command("units")
def units_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder (written by atlas sample or atlas build)")],
    layer: Annotated[list[str] | None, typer.Option("--layer", help="layer to look at; repeat for several (default: the run's layers)")]
    = None,
    top_k: Annotated[int, typer.Option("--top-k", help=U.option_help("top_k"))] = U.top_k,
    channels: Annotated[str | None, typer.Option(help=U.option_help("channels"))] = U.channels,
    patch: Annotated[int, typer.Option(help=U.option_help("patch"))] = U.patch,
    projection: Annotated[list[str] | None, typer.Option("--projection", help=U.option_help("projections") + " Repeat for several.")]
    = None,
    no_projection: Annotated[bool, typer.Option("--no-projection", help="compute no projection")] = False,
    kind: Annotated[list[str] | None, typer.Option("--kind", help=U.option_help("kinds") + " Repeat for several.")] = None,
    no_vis: Annotated[bool, typer.Option("--no-vis", help="compute no feature visualisation")] = False,
    objective: Annotated[str, typer.Option(help=U.option_help("objective"))] = U.objective,
    n_diverse: Annotated[int, typer.Option(help=U.option_help("n_diverse"))] = U.n_diverse,
    size: Annotated[int, typer.Option(help=U.option_help("size"))] = U.size,
    steps: Annotated[int, typer.Option(help=U.option_help("steps"))] = U.steps,
    seed: Annotated[int, typer.Option(help=U.option_help("seed"))] = U.seed,
    batch: Annotated[int, typer.Option(help=U.option_help("batch"))] = U.batch,
    batch_size: Annotated[int, typer.Option(help=U.option_help("batch_size"))] = U.batch_size,
    workers: Annotated[int, typer.Option(help=U.option_help("workers"))] = U.workers,
    device: Annotated[str, typer.Option(help=U.option_help("device"))] = U.device,
    engine: Annotated[str, typer.Option(help=RunSettings.option_help("engine"))] = RunSettings.engine,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help=RunSettings.option_help("ray_address"))] = None,
) -> None:
    """Per-channel top-k dataset patches, their projections to pixels and regularised visualisations, and the
    unit gallery under RUN/tiles/units/ (resumable; what is done is kept)."""
    # Checked before the instrument (and torch) is imported: `--top-k 0` or `--kind nope` fail at once.
    settings = U(top_k=top_k, channels=channels, patch=patch,
                 projections=() if no_projection else tuple(projection or U.projections),
                 kinds=() if no_vis else tuple(kind or U.kinds), objective=objective, n_diverse=n_diverse, size=size, steps=steps,
                 seed=seed, batch=batch, batch_size=batch_size, workers=workers, device=device)
    from atlas.engine import make_engine

    run_on = make_engine(engine, ray_address)  # without Ray: one line saying how to install it, before torch loads
    from atlas.units import units

    report = units(run_dir, layer or None, settings, echo=typer.echo, engine=run_on)
    for name, entry in report.items():
        if name != "seconds":
            typer.echo(f"{name}: {len(entry['channels'])} units -> {entry.get('gallery')}")
    typer.echo(f"done in {report['seconds']:.0f}s")
