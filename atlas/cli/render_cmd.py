"""`atlas render` and `atlas export-icons`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import GridSettings, RunSettings, check_out_folder
from atlas.settings import RenderSettings as R


@app.command("render")
def render_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    layer: Annotated[str, typer.Option("--layer", help="layer whose grid to render")],
    grid: Annotated[list[int], typer.Option("--grid", help="grid size; repeat for several")],
    atlas: Annotated[str, typer.Option(help="atlas name (full, or a class/compare atlas)")] = "full",
    quality: Annotated[str, typer.Option(help=R.option_help("quality"))] = R.quality,
    steps: Annotated[int | None, typer.Option(help=R.option_help("steps"))] = R.steps,
    size: Annotated[int | None, typer.Option(help=R.option_help("size"))] = R.size,
    attempts: Annotated[int | None, typer.Option(help=R.option_help("attempts"))] = R.attempts,
    screen: Annotated[int | None, typer.Option(help=R.option_help("screen"))] = R.screen,
    batch: Annotated[int | None, typer.Option(help=R.option_help("batch"))] = R.batch,
    p: Annotated[float, typer.Option("--p", help=R.option_help("p"))] = R.p,
    device: Annotated[str, typer.Option(help=R.option_help("device"))] = R.device,
    icons: Annotated[str, typer.Option(help=R.option_help("icons"))] = R.icons,
    seed: Annotated[int, typer.Option(help=R.option_help("seed"))] = R.seed,
    engine: Annotated[str, typer.Option(help=RunSettings.option_help("engine"))] = RunSettings.engine,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help=RunSettings.option_help("ray_address"))] = None,
) -> None:
    """Render one icon per kept grid cell into RUN/store.zarr (resumable; finished icons are kept)."""
    # Checked before the stage (and torch) is imported: `--quality ultra` or `--steps 0` fail at once.
    GridSettings(sizes=grid)
    chosen = R(quality=quality, steps=steps, size=size, attempts=attempts, screen=screen, batch=batch, p=p, icons=icons, device=device,
               seed=seed)
    from atlas.engine import make_engine

    run_on = make_engine(engine, ray_address)  # without Ray: one line saying how to install it, before torch loads
    from atlas.render import render

    summaries = render(run_dir, layer, grid, chosen, atlas=atlas, engine=run_on)
    for grid_size, s in summaries.items():
        white = s.get("mean_cosine_whitened")
        cos = (f", mean whitened cos(h, S v) {white:.3f}" if white is not None else "") + \
            (f", mean raw cos(h, v) {s['mean_cosine']:.3f}" if s["mean_cosine"] is not None else "")
        typer.echo(f"{layer} {grid_size}x{grid_size}: {s['n_done']}/{s['n_render']} icons ({s['rendered_now']} new, "
                   f"{s['seconds']:.0f}s){cos}")


@app.command("export-icons")
def export_icons_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    layer: Annotated[str, typer.Option("--layer", help="layer")],
    grid: Annotated[int, typer.Option("--grid", help="grid size")],
    out: Annotated[Path, typer.Option("--out", help="folder for the PNG files")],
    atlas: Annotated[str, typer.Option(help="atlas name")] = "full",
) -> None:
    """Write every finished icon as PNG, plus sheet.png with the whole grid."""
    GridSettings(sizes=[grid])
    check_out_folder(out)
    from atlas.render.export import export_icons

    files = export_icons(run_dir, layer, grid, out, atlas=atlas)
    typer.echo(f"{len(files) - 1} icons and sheet.png -> {out}")
