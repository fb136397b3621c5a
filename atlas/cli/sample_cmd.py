"""`atlas sample`, `atlas layers` and `atlas info`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.errors import AtlasError
from atlas.settings import MODEL_HELP, RunSettings, check_out_folder
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
    S(model=model, weights=weights, max_images=max_images, per_image=per_image, seed=seed, batch_size=batch_size, workers=workers,
      attribution=not no_attribution, dtype=dtype, precision=precision, device=device, shard_size=shard_size,
      aligned_positions=aligned_positions, forward=forward)
    check_out_folder(out)
    from atlas.engine import make_engine

    run_on = make_engine(engine, ray_address)  # without Ray: one line saying how to install it, before torch loads
    from atlas.sample import sample

    result = sample(images, layer, out, model=model, weights=weights, max_images=max_images, per_image=per_image, seed=seed,
                    batch_size=batch_size, workers=workers, attribution=not no_attribution, dtype=dtype, device=device,
                    shard_size=shard_size, precision=precision, labels=labels, engine=run_on, aligned_positions=aligned_positions,
                    forward=forward)
    typer.echo(result.images_summary)
    counts = ", ".join(f"{k}: {v}" for k, v in result.n_samples.items())
    typer.echo(f"{result.n_images} images ({result.n_skipped} skipped, see {out}/log.txt), samples {counts} -> {out}")
    if result.labels is not None:
        from atlas.info import format_agreement

        typer.echo(format_agreement(result.labels))


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


@app.command("info")
def info_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Summarise what a run holds: samples, layouts, grids, icons, tiles."""
    from atlas.info import format_info, info

    data = info(run_dir)
    typer.echo(json.dumps(data, indent=2) if as_json else format_info(data))
