"""`atlas align`, `atlas side-by-side` and `atlas class-layers`: thin wrappers over :func:`atlas.layout.aligned_project`,
:func:`atlas.layers.side_by_side` and :func:`atlas.layers.class_layers`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import GridSettings, ProjectSettings, RenderSettings

RunDir = Annotated[Path, typer.Argument(help="run folder")]
Layers = Annotated[list[str], typer.Option("--layer", help="a layer of the run (LAYER or RUN:LAYER); repeat, 2 or 3 layers")]


@app.command("align")
def align_command(
    run_dir: RunDir,
    layer: Layers,
    atlas: Annotated[str, typer.Option(help="name of the aligned layouts")] = "aligned",
    neighbors: Annotated[int, typer.Option("--neighbors", help="UMAP's neighbourhood size, the same for every layer")] = 15,
    min_dist: Annotated[float, typer.Option("--min-dist", help=ProjectSettings.option_help("min_dist"))] = 0.1,
    seed: Annotated[int, typer.Option(help=ProjectSettings.option_help("seed"))] = 0,
    tolerance: Annotated[float, typer.Option(help="cells of the coarser layer two samples' input-pixel centres may be apart to "
                                             "correspond")] = 1.0,
    alignment: Annotated[float, typer.Option(help="AlignedUMAP's alignment_regularisation (umap-learn's default 0.01 barely ties "
                                             "sparse samples; docs/experiments.md)")] = 1.0,
    compare: Annotated[bool, typer.Option("--compare", help="also lay each layer out alone and print both displacements")] = False,
) -> None:
    """Lay out consecutive layers together with umap-learn's AlignedUMAP, so the same image regions sit in similar places."""
    ProjectSettings(n_neighbors=neighbors, min_dist=min_dist, seed=seed)  # checked before the layout (and umap) is imported
    from atlas.layout import aligned_project

    r = aligned_project(run_dir, layer, atlas=atlas, n_neighbors=neighbors, min_dist=min_dist, seed=seed, tolerance=tolerance,
                        alignment=alignment, compare=compare)
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
    atlas: Annotated[str, typer.Option(help="the atlas of every layer (full, aligned, class-...)")] = "full",
    highlight: Annotated[str | None, typer.Option("--highlight", help="class whose attribution shades every layer")] = None,
) -> None:
    """Show two or three layers' atlases side by side (tiles/layers.html), one class highlighted in every layer."""
    from atlas.layers import side_by_side

    view = side_by_side(run_dir, layer, atlas=atlas, highlight=highlight, echo=typer.echo)
    typer.echo(f"{' | '.join(view['layers'])} -> {run_dir}/tiles/{view['url']}  (atlas serve {run_dir}, then open /tiles/{view['url']})")


@app.command("class-layers")
def class_layers_command(
    run_dir: RunDir,
    layer: Layers,
    cls: Annotated[str, typer.Option("--class", help="class name, synset or index")],
    top_k: Annotated[int, typer.Option(help="samples with the highest positive attribution to add to the winners")] = 2000,
    method: Annotated[str, typer.Option(help=ProjectSettings.option_help("method"))] = "tsne",
    grid: Annotated[list[int] | None, typer.Option("--grid", help="grid size(s), default 8")] = None,
    quality: Annotated[str, typer.Option(help=RenderSettings.option_help("quality"))] = "draft",
    steps: Annotated[int | None, typer.Option(help=RenderSettings.option_help("steps"))] = None,
    size: Annotated[int | None, typer.Option(help=RenderSettings.option_help("size"))] = None,
    seed: Annotated[int, typer.Option(help=RenderSettings.option_help("seed"))] = 0,
) -> None:
    """A class atlas of one class in every given layer, shown side by side with the class highlighted."""
    from atlas.errors import AtlasError

    if top_k < 1:
        raise AtlasError(f"--top-k must be an integer >= 1; got {top_k}")
    ProjectSettings(method=method, seed=seed)
    GridSettings(sizes=grid or [8])
    RenderSettings(quality=quality, steps=steps, size=size, seed=seed)
    from atlas.layers import class_layers

    view = class_layers(run_dir, cls, layer, top_k=top_k, method=method, sizes=tuple(grid or [8]), quality=quality, seed=seed,
                        render_kwargs={"steps": steps, "size": size}, echo=typer.echo)
    typer.echo(f"atlas {view['atlas']} of {', '.join(view['layers'])} -> {run_dir}/tiles/{view['url']}")
