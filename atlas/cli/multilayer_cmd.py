"""The commands over several layers of a run, `atlas align`, `atlas side-by-side` and `atlas class-layers`: thin
wrappers over :func:`atlas.layout.aligned_project`, :func:`atlas.layers.side_by_side` and :func:`atlas.layers.class_layers`.

Every option's default and check is :class:`atlas.settings.LayersSettings`'s (the ``[layers]`` table): the settings object
is built before the library (and umap or torch) is imported, so a bad option fails at once with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import LayersSettings as L
from atlas.settings import RenderSettings

RunDir = Annotated[Path, typer.Argument(help="run folder")]
Layers = Annotated[list[str], typer.Option("--layer", help="a layer of the run (LAYER or RUN:LAYER); repeat, 2 or 3 layers")]


@app.command("align")
def align_command(
    run_dir: RunDir,
    layer: Layers,
    atlas: Annotated[str, typer.Option(help=L.option_help("aligned_atlas"))] = L.aligned_atlas,
    neighbors: Annotated[int, typer.Option("--neighbors", help=L.option_help("n_neighbors"))] = L.n_neighbors,
    min_dist: Annotated[float, typer.Option("--min-dist", help=L.option_help("min_dist"))] = L.min_dist,
    seed: Annotated[int, typer.Option(help=L.option_help("seed"))] = L.seed,
    tolerance: Annotated[float, typer.Option(help=L.option_help("tolerance"))] = L.tolerance,
    alignment: Annotated[float, typer.Option(help=L.option_help("alignment"))] = L.alignment,
    n_epochs: Annotated[int | None, typer.Option("--n-epochs", help=L.option_help("n_epochs"))] = L.n_epochs,
    compare: Annotated[bool, typer.Option("--compare", help="also lay each layer out alone and print both displacements")] = False,
) -> None:
    """Lay out consecutive layers together with umap-learn's AlignedUMAP, so the same image regions sit in similar places."""
    s = L(aligned_atlas=atlas, n_neighbors=neighbors, min_dist=min_dist, seed=seed, tolerance=tolerance, alignment=alignment,
          n_epochs=n_epochs)  # checked before the layout (and umap) is imported
    from atlas.layout import aligned_project

    r = aligned_project(run_dir, layer, s, compare=compare)
    atlas = s.aligned_atlas
    for t, pairs in enumerate(r["pairs"]):
        a, b = r["layers"][t], r["layers"][t + 1]
        line = (f"{a} -> {b}: {pairs} corresponding samples (of {r['n'][t]} and {r['n'][t + 1]}), "
                f"mean displacement {r['displacement'][t]:.3f}")
        if compare:
            line += (f"; laid out alone {r['independent_displacement'][t]:.3f} ({r['independent_procrustes'][t]:.3f} after the best "
                     "rotation, shift and scale)")
        typer.echo(line)
    typer.echo(f"layouts {', '.join(f'{x}/{atlas}' for x in r['layers'])} in {r['seconds']:.0f}s; next: atlas grid {run_dir} --layer L "
               f"--atlas {atlas} --grid 20, atlas render, atlas tiles, then atlas side-by-side {run_dir} --atlas {atlas} --layer ...")


@app.command("side-by-side")
def side_by_side_command(
    run_dir: RunDir,
    layer: Layers,
    atlas: Annotated[str, typer.Option(help=L.option_help("atlas"))] = L.atlas,
    highlight: Annotated[str | None, typer.Option("--highlight", help=L.option_help("highlight"))] = L.highlight,
) -> None:
    """Show two or three layers' atlases side by side (tiles/layers.html), one class highlighted in every layer."""
    s = L(atlas=atlas, highlight=highlight)
    from atlas.layers import side_by_side

    view = side_by_side(run_dir, layer, atlas=s.atlas, highlight=s.highlight, echo=typer.echo)
    typer.echo(f"{' | '.join(view['layers'])} -> {run_dir}/tiles/{view['url']}  (atlas serve {run_dir}, then open /tiles/{view['url']})")


@app.command("class-layers")
def class_layers_command(
    run_dir: RunDir,
    layer: Layers,
    cls: Annotated[str, typer.Option("--class", help="class name, synset or index")],
    top_k: Annotated[int, typer.Option("--top-k", help=L.option_help("top_k"))] = L.top_k,
    method: Annotated[str, typer.Option(help=L.option_help("method"))] = L.method,
    grid: Annotated[list[int] | None, typer.Option("--grid", help=L.option_help("sizes") + f" Repeat for several (default {L.sizes[0]}).")]
    = None,
    quality: Annotated[str, typer.Option(help=L.option_help("quality"))] = L.quality,
    steps: Annotated[int | None, typer.Option(help=RenderSettings.option_help("steps"))] = None,
    size: Annotated[int | None, typer.Option(help=RenderSettings.option_help("size"))] = None,
    seed: Annotated[int, typer.Option(help=L.option_help("seed"))] = L.seed,
) -> None:
    """A class atlas of one class in every given layer, shown side by side with the class highlighted."""
    s = L(top_k=top_k, method=method, sizes=tuple(grid) if grid else L.sizes, quality=quality, seed=seed)
    icons = RenderSettings(quality=s.quality, steps=steps, size=size)  # the icon overrides are the render stage's
    from atlas.layers import class_layers

    view = class_layers(run_dir, cls, layer, s, render=icons, echo=typer.echo)
    typer.echo(f"atlas {view['atlas']} of {', '.join(view['layers'])} -> {run_dir}/tiles/{view['url']}")
