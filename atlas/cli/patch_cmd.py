"""`atlas patch` and `atlas patch-search`: thin wrappers over :func:`atlas.patches.patch_images` and
:func:`atlas.patches.guided_search`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.settings import PatchSettings as S


def _settings(size, position, n_random, seed, augment, figure, batch_size, device, top=S.top, kind=None) -> S:
    return S(sizes=tuple(size or S.sizes), positions=tuple(position or S.positions), n_random=n_random, seed=seed, augment=augment,
             top=top, kinds=tuple(kind or S.kinds), figure=figure, batch_size=batch_size, device=device)


def _rate(value: float | None) -> str:
    return "n/a (every image already is the target)" if value is None else f"{value:.1%}"


Size = Annotated[list[int] | None, typer.Option("--size", help=S.option_help("sizes") + " Repeat for several (default 48 80 112).")]
Position = Annotated[list[str] | None, typer.Option("--position", help=S.option_help("positions")
                                                    + " Repeat for several (default corners, centre, random).")]
NRandom = Annotated[int, typer.Option("--random", help=S.option_help("n_random"))]
Seed = Annotated[int, typer.Option(help=S.option_help("seed"))]
Augment = Annotated[int, typer.Option(help=S.option_help("augment"))]
FigureN = Annotated[int, typer.Option("--figure", help=S.option_help("figure"))]
Batch = Annotated[int, typer.Option(help=S.option_help("batch_size"))]
DeviceO = Annotated[str, typer.Option(help=S.option_help("device"))]


@app.command("patch")
def patch_command(
    images: Annotated[Path, typer.Option("--images", help="photos to paste into: a folder or a list file")],
    out: Annotated[Path, typer.Option("--out", help="folder for report.json, figure.png and patch.png")] = Path("patch-report"),
    patch: Annotated[Path | None, typer.Option("--patch", help="the patch: any picture (its centred square is used)")] = None,
    cell: Annotated[str | None, typer.Option("--cell", help="the patch: an atlas cell, RUN:LAYER:ATLAS:GRID:X,Y")] = None,
    cell_patch: Annotated[str, typer.Option("--cell-patch", help="what of the cell: its icon or its best dataset patch "
                                            "(icon, example)")] = "icon",
    target: Annotated[str | None, typer.Option("--target", help="class the patch should produce (default: the cell's class, else "
                                               "the model's top-1 on the patch alone)")] = None,
    size: Size = None, position: Position = None, n_random: NRandom = S.n_random, seed: Seed = S.seed, augment: Augment = S.augment,
    figure: FigureN = S.figure, batch_size: Batch = S.batch_size, device: DeviceO = S.device,
    weights: Annotated[Path | None, typer.Option("--weights", help="weights of the model (with --patch; a cell uses its run's)")] = None,
) -> None:
    """Paste a patch into every image at several sizes and places; report top-1 before and after, the flip rate to the
    target and the mean change of logit(target) - logit(original), with a figure of the strongest examples."""
    settings = _settings(size, position, n_random, seed, augment, figure, batch_size, device)  # checked before torch is loaded
    if cell_patch not in ("icon", "example"):
        S(kinds=(cell_patch,))
    from atlas.patches import patch_images

    r = patch_images(images, patch=patch, cell=cell, cell_kind=cell_patch, target=target, settings=settings, out=out, weights=weights,
                     echo=typer.echo)
    for row in r["per_image"]:
        # "before -> after" read as a contradiction beside a flip rate when most places kept the class: say each part
        rate = "already the target" if row["already_target"] else f"'{r['target']}' in {_rate(row['flip_rate'])} of places"
        after = (f"still '{row['after']}'" if row["after"] == row["before"] else f"'{row['after']}'") + f" in {row['after_share']:.0%}"
        typer.echo(f"  {Path(row['image'].split(' (')[0]).name}{' (' + row['image'].split(' (')[1] if ' (' in row['image'] else ''}: "
                   f"top-1 '{row['before']}'; patched: {after} of places (the most common), {rate}; mean delta {row['mean_delta']:.2f}")
    typer.echo(f"{r['n_images']} images, {r['n_variants']} pasted variants: flip rate to '{r['target']}' {_rate(r['flip_rate'])} "
               f"({r['n_flipped']}/{r['n_eligible']}), top-1 changed in {r['changed_rate']:.1%}, mean delta "
               f"logit(target) - logit(original) {r['mean_delta']:+.2f}; {r['already_target']} images already '{r['target']}'")
    typer.echo(f"report: {r['files'].get('report')}, figure: {r['files'].get('figure')}")


@app.command("patch-search")
def patch_search_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder holding a class-difference atlas (atlas compare)")],
    layer: Annotated[str, typer.Option("--layer", help="the atlas's layer")],
    atlas: Annotated[str, typer.Option("--atlas", help="the compare-A-vs-B atlas")],
    images: Annotated[Path | None, typer.Option("--images", help="A's photos: a folder or list file (default: the run's images "
                                                "labelled A)")] = None,
    near: Annotated[bool, typer.Option("--near", help="also the run's images whose top-5 holds A (not those called B)")] = False,
    grid: Annotated[int | None, typer.Option("--grid", help="grid whose cells are tried (default: the largest with icons)")] = None,
    top: Annotated[int, typer.Option("--top", help=S.option_help("top"))] = S.top,
    kind: Annotated[list[str] | None, typer.Option("--kind", help=S.option_help("kinds") + " Repeat for several.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="folder for search.json, table.txt, the patches and figure.png")] = None,
    size: Size = None, position: Position = None, n_random: NRandom = S.n_random, seed: Seed = S.seed, augment: Augment = S.augment,
    figure: FigureN = S.figure, batch_size: Batch = S.batch_size, device: DeviceO = S.device,
) -> None:
    """Rank the cells of a class-difference atlas A-vs-B by attribution toward B, paste each top cell's icon and best
    dataset patch into A's images and print which cells flip A to B most."""
    settings = _settings(size, position, n_random, seed, augment, figure, batch_size, device, top, kind)
    from atlas.patches import guided_search, search_table

    r = guided_search(run_dir, layer, atlas, images=images, grid=grid, settings=settings, near=near, out=out, echo=typer.echo)
    a, b = r["classes"]
    typer.echo(f"{layer}/{atlas} grid {r['grid']}: patches of cells toward '{b}' pasted into {r['n_images']} images of '{a}' "
               f"({r['n_photos']} photos; {r['already_target']} already '{b}')")
    typer.echo(search_table(r["rows"]))
    missing = {k: v for k, v in r["skipped"].items() if v}
    if missing:
        typer.echo("skipped: " + ", ".join(f"{v} cells without a {k}" for k, v in missing.items()))
    if r["files"]:
        typer.echo(f"report: {r['files']['report']}")
