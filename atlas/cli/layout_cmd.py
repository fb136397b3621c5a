"""`atlas project` and `atlas grid`: thin wrappers over :mod:`atlas.layout` and :mod:`atlas.grid`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli import app
from atlas.errors import AtlasError

DEFAULT_SIZES = (20, 40, 80, 160)


@app.command("project")
def project_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder made by `atlas sample`.")],
    layer: Annotated[str, typer.Option("--layer", help="Sampled layer to lay out.")],
    method: Annotated[str, typer.Option("--method", help="umap, tsne or pca.")] = "umap",
    atlas: Annotated[str, typer.Option("--atlas", help="Name of the layout (\"full\" = the whole layer).")] = "full",
    neighbors: Annotated[int, typer.Option("--neighbors", help="UMAP n_neighbors.")] = 50,
    min_dist: Annotated[float, typer.Option("--min-dist", help="UMAP min_dist.")] = 0.05,
    metric: Annotated[str, typer.Option("--metric", help="Distance in activation space.")] = "cosine",
    pca: Annotated[int | None, typer.Option("--pca", help="Reduce to this many dimensions with PCA first.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same layout).")] = 0,
    outside: Annotated[str, typer.Option("--outside", help="Points beyond the 1-99th percentile clip: edge (clamp) or drop.")] = "edge",
    knn: Annotated[str | None, typer.Option("--knn", help="Nearest-neighbour search: atlas (its own) or faiss (default: atlas.layout's).")
                   ] = None,
) -> None:
    """Project a layer's sampled activations to 2-D and store the normalised layout."""
    from atlas.layout import DEFAULT_BACKEND, project

    if pca is not None and pca < 1:
        raise AtlasError("--pca must be a positive number of dimensions")
    attrs = project(run_dir, layer, method=method, atlas=atlas, n_neighbors=neighbors, min_dist=min_dist, metric=metric, pca=pca,
                    seed=seed, outside=outside, progress=True, knn=DEFAULT_BACKEND if knn is None else knn)
    s = attrs["summary"]
    recall = "n/a" if s["knn_recall_10"] is None else f"{s['knn_recall_10']:.3f}"
    trust = "n/a" if s.get("trustworthiness") is None else f"{s['trustworthiness']:.3f}"
    typer.echo(f"{layer}/{atlas}: {method} layout of {s['n']} samples in {s['seconds']:.1f} s; kNN recall@10 {recall}, "
               f"trustworthiness {trust}; {s['n_outside']} outside the clip ({'kept at the edge' if outside == 'edge' else 'dropped'})")


@app.command("grid")
def grid_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with a layout (`atlas project`).")],
    layer: Annotated[str, typer.Option("--layer", help="Layer whose layout to grid.")],
    grid: Annotated[list[int] | None, typer.Option("--grid", help="Grid size; repeat for several (default 20 40 80 160).")] = None,
    atlas: Annotated[str, typer.Option("--atlas", help="Layout name.")] = "full",
    min_count: Annotated[int, typer.Option("--min-count", help="Cells with fewer samples are stored but not rendered.")] = 5,
    nearest: Annotated[int, typer.Option("--nearest", help="Sample rows kept per cell, nearest its mean.")] = 8,
) -> None:
    """Average activations and attributions over cells of one or more square grids."""
    from atlas.grid import grid as run_grid

    result = run_grid(run_dir, layer, grid or DEFAULT_SIZES, atlas=atlas, min_count=min_count, n_nearest=nearest)
    for size, s in result["sizes"].items():
        typer.echo(f"{layer}/{atlas} grid {size}x{size}: {s['n_cells']} non-empty cells, {s['n_render']} to render "
                   f"(>= {s['min_count']} samples), {s['n_kept']} samples")
    white = result["whitening"]
    if white is not None:
        typer.echo(f"whitening matrix for {layer}: {'already up to date' if white['skipped'] else 'computed'} "
                   f"from {white['n_samples']} samples")
    typer.echo(f"done in {result['seconds']:.1f} s")
