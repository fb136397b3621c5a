"""`atlas build`, `atlas class` and `atlas compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import MODEL_HELP, ClassSettings, GridSettings, ProjectSettings, RenderSettings, RunSettings


@app.command("build")
def build_command(
    images: Annotated[Path | None, typer.Option("--images", help="image folder or list file")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="labels file for the images ('name label' lines, one per "
                                                "line, or LOC_val_solution.csv)")] = None,
    layer: Annotated[list[str] | None, typer.Option("--layer", help="layer; repeat for several")] = None,
    grid: Annotated[list[int] | None, typer.Option("--grid", help="grid size; repeat for several")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run folder (default outputs/MODEL-LAYER)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with every stage's settings")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    weights: Annotated[Path | None, typer.Option(help="weights file")] = None,
    max_images: Annotated[int | None, typer.Option(help="first N images")] = None,
    per_image: Annotated[int | None, typer.Option(help="positions sampled per image")] = None,
    method: Annotated[str | None, typer.Option(help=ProjectSettings.option_help("method"))] = None,
    knn: Annotated[str | None, typer.Option("--knn", help=ProjectSettings.option_help("knn"))] = None,
    quality: Annotated[str | None, typer.Option(help=RenderSettings.option_help("quality"))] = None,
    icons: Annotated[str | None, typer.Option(help=RenderSettings.option_help("icons"))] = None,
    seed: Annotated[int | None, typer.Option(help="seed of every stage")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    engine: Annotated[str | None, typer.Option(help=RunSettings.option_help("engine"))] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help=RunSettings.option_help("ray_address"))] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved settings and estimated costs only")] = False,
) -> None:
    """Run sample -> project -> grid -> render -> tiles, redoing only what changed."""
    from atlas.build import build, load_config, merge

    resolved = load_config(config)
    layers = layer or resolved["run"]["layers"]
    model_name = model or resolved["sample"]["model"]
    default_out = Path("outputs") / f"{model_name}-{'-'.join(layers)}"
    overrides = {
        "run": {"images": str(images) if images else None, "labels": str(labels) if labels else None, "layers": layer or None,
                "out": str(out) if out else (None if resolved["run"]["out"] else str(default_out)),
                "engine": engine, "ray_address": ray_address},
        "sample": {"model": model, "weights": str(weights) if weights else None, "max_images": max_images, "per_image": per_image,
                   "seed": seed, "device": device},
        "project": {"method": method, "seed": seed, "knn": knn},
        "grid": {"sizes": grid or None},
        "render": {"quality": quality, "icons": icons, "seed": seed, "device": device},
    }
    result = build(merge(resolved, overrides), dry_run=dry_run, echo=typer.echo)
    if dry_run:
        return
    s = result.summary
    typer.echo(f"done in {s['seconds']:.0f} s (ran: {', '.join(s['ran']) or 'nothing'}; skipped: {', '.join(s['skipped']) or 'nothing'})")
    for stage, seconds in s["stage_seconds"].items():
        typer.echo(f"  {stage:8s} {seconds:8.1f} s")
    for name, entry in s["layers"].items():
        typer.echo(f"  {name}: {entry['samples']} samples; kept cells {entry['kept_cells']}; icons {entry['icons']}")
    typer.echo(f"viewer: {result.run_dir / 'tiles' / 'index.html'}  (browse it with: atlas serve {result.run_dir})")


RunDir = Annotated[Path, typer.Argument(help="run folder")]
Layer = Annotated[str, typer.Option("--layer")]
Grids = Annotated[list[int] | None, typer.Option("--grid", help="grid size(s), default 8")]
Quality = Annotated[str, typer.Option(help=RenderSettings.option_help("quality"))]
Steps = Annotated[int | None, typer.Option(help=RenderSettings.option_help("steps"))]
IconSize = Annotated[int | None, typer.Option(help=RenderSettings.option_help("size"))]
TopK = Annotated[int, typer.Option(help=ClassSettings.option_help("top_k"))]
Seed = Annotated[int, typer.Option(help=ClassSettings.option_help("seed"))]  # the layout's seed (the icons keep their own)


def _check_class_options(top_k: int, grid: list[int] | None, quality: str, steps: int | None, size: int | None, seed: int,
                         method: str = "tsne") -> None:
    """The class and compare commands' options, checked with the stages' settings before any layout or icon work."""
    from atlas.errors import AtlasError

    if top_k < 1:
        raise AtlasError(f"--top-k must be an integer >= 1; got {top_k}")
    ProjectSettings(method=method, seed=seed)
    GridSettings(sizes=grid or ClassSettings.sizes)
    RenderSettings(quality=quality, steps=steps, size=size, seed=seed)


@app.command("class")
def class_command(
    run_dir: RunDir,
    layer: Layer,
    cls: Annotated[str, typer.Option("--class", help="class name, synset or index")],
    top_k: TopK = ClassSettings.top_k,
    method: Annotated[str, typer.Option(help=ProjectSettings.option_help("method"))] = ClassSettings.method,
    grid: Grids = None,
    quality: Quality = ClassSettings.quality,
    steps: Steps = None,
    size: IconSize = None,
    seed: Seed = ClassSettings.seed,
) -> None:
    """A class-filtered atlas: the activations that matter for one class."""
    _check_class_options(top_k, grid, quality, steps, size, seed, method)
    from atlas.classes import class_atlas

    settings = ClassSettings(top_k=top_k, method=method, sizes=tuple(grid or ClassSettings.sizes), quality=quality, seed=seed)
    name = class_atlas(run_dir, layer, cls, settings, render=RenderSettings(quality=quality, steps=steps, size=size), echo=typer.echo)
    typer.echo(f"atlas {name} of {layer} -> {run_dir}/tiles (atlas serve {run_dir})")


@app.command("compare")
def compare_command(
    run_dir: RunDir,
    first: Annotated[str, typer.Argument(help="class on the left (x = -1)")],
    second: Annotated[str, typer.Argument(help="class on the right (x = +1)")],
    layer: Layer,
    top_k: TopK = ClassSettings.top_k,
    grid: Grids = None,
    quality: Quality = ClassSettings.quality,
    steps: Steps = None,
    size: IconSize = None,
    seed: Seed = ClassSettings.seed,
) -> None:
    """A class-difference atlas: x = attribution to SECOND minus FIRST, y = 1-D t-SNE."""
    _check_class_options(top_k, grid, quality, steps, size, seed)
    from atlas.classes import compare_atlas

    settings = ClassSettings(top_k=top_k, sizes=tuple(grid or ClassSettings.sizes), quality=quality, seed=seed)
    name = compare_atlas(run_dir, layer, first, second, settings, render=RenderSettings(quality=quality, steps=steps, size=size),
                         echo=typer.echo)
    typer.echo(f"atlas {name} of {layer} -> {run_dir}/tiles (atlas serve {run_dir})")
