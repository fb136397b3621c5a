"""`atlas project` and `atlas grid`: thin wrappers over :mod:`atlas.layout` and :mod:`atlas.grid`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import GridSettings as G
from atlas.settings import ProjectSettings as P


@app.command("project")
def project_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder made by `atlas sample`.")],
    layer: Annotated[str, typer.Option("--layer", help="Sampled layer to lay out.")],
    method: Annotated[str, typer.Option("--method", help=P.option_help("method"))] = P.method,
    atlas: Annotated[str, typer.Option("--atlas", help="Name of the layout (\"full\" = the whole layer).")] = "full",
    neighbors: Annotated[int, typer.Option("--neighbors", "--n-neighbors", help=P.option_help("n_neighbors"))] = P.n_neighbors,
    min_dist: Annotated[float, typer.Option("--min-dist", help=P.option_help("min_dist"))] = P.min_dist,
    metric: Annotated[str, typer.Option("--metric", help=P.option_help("metric"))] = P.metric,
    pca: Annotated[int | None, typer.Option("--pca", help=P.option_help("pca"))] = P.pca,
    seed: Annotated[int, typer.Option("--seed", help=P.option_help("seed"))] = P.seed,
    outside: Annotated[str, typer.Option("--outside", help=P.option_help("outside"))] = P.outside,
    knn: Annotated[str, typer.Option("--knn", help=P.option_help("knn"))] = P.knn,
) -> None:
    """Project a layer's sampled activations to 2-D and store the normalised layout."""
    # Checked before the stage (and torch) is imported: a bad option fails at once.
    settings = P(method=method, n_neighbors=neighbors, min_dist=min_dist, metric=metric, pca=pca, seed=seed, outside=outside,
                 knn=knn)
    from atlas.layout import project

    attrs = project(run_dir, layer, settings, atlas=atlas, progress=True)
    s = attrs["summary"]
    recall = "n/a" if s["knn_recall_10"] is None else f"{s['knn_recall_10']:.3f}"
    trust = "n/a" if s.get("trustworthiness") is None else f"{s['trustworthiness']:.3f}"
    typer.echo(f"{layer}/{atlas}: {method} layout of {s['n']} samples in {s['seconds']:.1f} s; kNN recall@10 {recall}, "
               f"trustworthiness {trust}; {s['n_outside']} outside the clip ({'kept at the edge' if outside == 'edge' else 'dropped'})")


@app.command("grid")
def grid_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with a layout (`atlas project`).")],
    layer: Annotated[str, typer.Option("--layer", help="Layer whose layout to grid.")],
    grid: Annotated[list[int] | None, typer.Option("--grid", help=f"{G.option_help('sizes')} Repeat for several (default "
                                                   f"{' '.join(map(str, G.sizes))}).")] = None,
    atlas: Annotated[str, typer.Option("--atlas", help="Layout name.")] = "full",
    min_count: Annotated[int, typer.Option("--min-count", help=G.option_help("min_count"))] = G.min_count,
    nearest: Annotated[int, typer.Option("--nearest", help=G.option_help("n_nearest"))] = G.n_nearest,
) -> None:
    """Average activations and attributions over cells of one or more square grids."""
    settings = G(sizes=grid or G.sizes, min_count=min_count, n_nearest=nearest)  # checked before the stage is imported
    from atlas.grid import grid as run_grid

    result = run_grid(run_dir, layer, settings, atlas=atlas)
    for size, s in result["sizes"].items():
        typer.echo(f"{layer}/{atlas} grid {size}x{size}: {s['n_cells']} non-empty cells, {s['n_render']} to render "
                   f"(>= {s['min_count']} samples), {s['n_kept']} samples")
    white = result["whitening"]
    if white is not None:
        typer.echo(f"whitening matrix for {layer}: {'already up to date' if white['skipped'] else 'computed'} "
                   f"from {white['n_samples']} samples")
    typer.echo(f"done in {result['seconds']:.1f} s")
