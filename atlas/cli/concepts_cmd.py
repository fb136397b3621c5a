"""`atlas concepts`: a sparse dictionary of a sampled layer, its concepts drawn and placed on the atlas."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import ConceptsSettings as S


@app.command("concepts")
def concepts_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder (written by atlas sample or atlas build)")],
    layer: Annotated[str, typer.Option("--layer", help="a sampled layer of the run, e.g. mixed4c")],
    concepts: Annotated[int, typer.Option("--concepts", help=S.option_help("concepts"))] = S.concepts,
    method: Annotated[str, typer.Option(help=S.option_help("method"))] = S.method,
    sparsity: Annotated[int, typer.Option(help=S.option_help("sparsity"))] = S.sparsity,
    epochs: Annotated[int, typer.Option(help=S.option_help("epochs"))] = S.epochs,
    max_iter: Annotated[int, typer.Option("--max-iter", help=S.option_help("max_iter"))] = S.max_iter,
    seed: Annotated[int, typer.Option(help=S.option_help("seed"))] = S.seed,
    top_k: Annotated[int, typer.Option("--top-k", help=S.option_help("top_k"))] = S.top_k,
    patch: Annotated[int, typer.Option(help=S.option_help("patch"))] = S.patch,
    no_icons: Annotated[bool, typer.Option("--no-icons", help="render no icons (the panel shows the top patch instead)")] = False,
    quality: Annotated[str, typer.Option(help=S.option_help("quality"))] = S.quality,
    steps: Annotated[int | None, typer.Option(help=S.option_help("steps"))] = S.steps,
    device: Annotated[str, typer.Option(help=S.option_help("device"))] = S.device,
) -> None:
    """Learn a sparse dictionary of a layer's sampled activations (TopK sparse autoencoder or NMF); per concept its
    icon, top dataset patches, classes and veil over the atlas, and the viewer's concepts panel (resumable)."""
    # Checked before the instrument (and torch) is imported: `--concepts 1` or `--method pca` fail at once.
    settings = S(concepts=concepts, method=method, sparsity=sparsity, epochs=epochs, max_iter=max_iter, seed=seed, top_k=top_k,
                 patch=patch, icons=not no_icons, quality=quality, steps=steps, device=device)
    from atlas.concepts import concepts as learn

    report = learn(run_dir, layer, settings, echo=typer.echo)
    typer.echo(f"{layer}: {report['concepts']} concepts ({report['method']}), R^2 {report['r2']}, "
               f"{report['active_per_sample']} active per sample, {report['dead']} dead -> {report['panel']}")
    typer.echo(f"done in {report['seconds']:.0f}s")
