"""`atlas tiles` and `atlas serve`: thin wrappers over atlas.tiles and atlas.viewer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli import app


@app.command("tiles")
def tiles_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    layer: Annotated[str, typer.Option("--layer", help="layer whose atlas to tile")],
    atlas: Annotated[str, typer.Option("--atlas", help="atlas name (full, class-..., compare-...)")] = "full",
    size: Annotated[list[int] | None, typer.Option("--size", help="grid size to include; repeat (default: every rendered grid)")] = None,
    icon_size: Annotated[int | None, typer.Option(help="redraw icons at this many pixels (default: as rendered)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="tile format: jpg, png or webp")] = "jpg",
    density_scale: Annotated[bool, typer.Option("--density-scale", help="shrink icons of sparse cells, min(1, sqrt(n / mean n))")] = False,
    highlight: Annotated[str | None, typer.Option("--highlight", help="class (name or index) whose attribution to highlight")] = None,
    no_examples: Annotated[bool, typer.Option("--no-examples", help="skip dataset-example patches (no images needed)")] = False,
    tile_size: Annotated[int, typer.Option(help="tile size in pixels")] = 254,
    overlap: Annotated[int, typer.Option(help="tile overlap in pixels")] = 1,
) -> None:
    """Write deep-zoom tiles, cell metadata and the viewer under RUN/tiles/."""
    from atlas.tiles import make_tiles

    entry = make_tiles(run_dir, layer, atlas=atlas, sizes=size or None, icon_size=icon_size, fmt=fmt, tile_size=tile_size,
                       overlap=overlap, density_scale=density_scale, highlight=highlight, examples=not no_examples)
    grids = ", ".join(f"{g['size']}x{g['size']}" for g in entry["grids"])
    typer.echo(f"{entry['width']}x{entry['height']} px, {entry['levels']} levels, grids {grids} -> {run_dir}/tiles/{entry['dzi']}")
    typer.echo(f"view it with: atlas serve {run_dir}")


@app.command("serve")
def serve_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    port: Annotated[int, typer.Option("--port", help="port (0 picks a free one)")] = 8000,
    host: Annotated[str, typer.Option("--host", help="address to bind; 127.0.0.1 keeps it on this machine")] = "127.0.0.1",
    allow_host: Annotated[list[str] | None, typer.Option("--allow-host", help="another Host name to answer to, e.g. this "
                                                         "machine's name with --host 0.0.0.0; repeat")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="log every request")] = False,
) -> None:
    """Serve the run's viewer and tiles (RUN/tiles/ only) over HTTP; prints the URL."""
    from atlas.viewer import serve

    serve(run_dir, host=host, port=port, quiet=not verbose, allow_hosts=allow_host or ())
