"""`atlas sample`: a thin wrapper over :func:`atlas.sample.sample`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import RunSettings, check_out_folder
from atlas.settings import SampleSettings as S


@app.command("sample")
def sample_command(
    images: Annotated[Path, typer.Option("--images", help="image folder (ImageNet tree or flat) or a list file")],
    layer: Annotated[list[str], typer.Option("--layer", help="layer to sample; repeat for several")],
    out: Annotated[Path, typer.Option("--out", help="run folder")],
    model: Annotated[str, typer.Option(help=S.option_help("model"))] = S.model,
    weights: Annotated[Path | None, typer.Option(help="weights file (default: $ATLAS_WEIGHTS, then ~/.cache/atlas)")] = None,
    max_images: Annotated[int | None, typer.Option(help=S.option_help("max_images"))] = S.max_images,
    per_image: Annotated[int, typer.Option(help=S.option_help("per_image"))] = S.per_image,
    aligned_positions: Annotated[bool, typer.Option("--aligned-positions", help=S.option_help("aligned_positions"))] = S.aligned_positions,
    seed: Annotated[int, typer.Option(help=S.option_help("seed"))] = S.seed,
    batch_size: Annotated[int, typer.Option(help=S.option_help("batch_size"))] = S.batch_size,
    workers: Annotated[int, typer.Option(help=S.option_help("workers"))] = S.workers,
    no_attribution: Annotated[bool, typer.Option("--no-attribution", help="skip class attributions (faster)")] = not S.attribution,
    dtype: Annotated[str, typer.Option(help=S.option_help("dtype"))] = S.dtype,
    device: Annotated[str, typer.Option(help=S.option_help("device"))] = S.device,
    shard_size: Annotated[int, typer.Option(help=S.option_help("shard_size"))] = S.shard_size,
    precision: Annotated[str, typer.Option(help=S.option_help("precision"))] = S.precision,
    forward: Annotated[str, typer.Option(help=S.option_help("forward"))] = S.forward,
    labels: Annotated[Path | None, typer.Option("--labels", help="labels file for the images: 'name label' lines, "
                                                "one label per line in image order, or LOC_val_solution.csv")] = None,
    engine: Annotated[str, typer.Option(help=RunSettings.option_help("engine"))] = RunSettings.engine,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help=RunSettings.option_help("ray_address"))] = None,
) -> None:
    """Sample one random spatial activation per image (and its class attributions) into RUN/store.zarr."""
    # Checked before the stage (and torch) is imported: a bad option fails at once, before anything is created.
    settings = S(model=model, weights=weights, max_images=max_images, per_image=per_image, seed=seed, batch_size=batch_size,
                 workers=workers, attribution=not no_attribution, dtype=dtype, precision=precision, device=device,
                 shard_size=shard_size, aligned_positions=aligned_positions, forward=forward)
    check_out_folder(out)
    from atlas.engine import make_engine

    run_on = make_engine(engine, ray_address)  # without Ray: one line saying how to install it, before torch loads
    from atlas.sample import sample

    result = sample(images, layer, out, settings, labels=labels, engine=run_on)
    typer.echo(result.images_summary)
    counts = ", ".join(f"{k}: {v}" for k, v in result.n_samples.items())
    typer.echo(f"{result.n_images} images ({result.n_skipped} skipped, see {out}/log.txt), samples {counts} -> {out}")
    if result.labels is not None:
        from atlas.info import format_agreement

        typer.echo(format_agreement(result.labels))
