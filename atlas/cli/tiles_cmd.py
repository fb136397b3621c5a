"""`atlas tiles` and `atlas serve`: thin wrappers over atlas.tiles and atlas.viewer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app
from atlas.errors import AtlasError
from atlas.settings import GridSettings, check_port
from atlas.settings import TilesSettings as T


@app.command("tiles")
def tiles_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    layer: Annotated[str, typer.Option("--layer", help="layer whose atlas to tile")],
    atlas: Annotated[str, typer.Option("--atlas", help="atlas name (full, class-..., compare-...)")] = "full",
    size: Annotated[list[int] | None, typer.Option("--size", help="grid size to include; repeat (default: every rendered grid)")] = None,
    icon_size: Annotated[int | None, typer.Option(help=T.option_help("icon_size"))] = T.icon_size,
    fmt: Annotated[str, typer.Option("--format", help=T.option_help("format"))] = T.format,
    density_scale: Annotated[bool, typer.Option("--density-scale", help=T.option_help("density_scale"))] = T.density_scale,
    highlight: Annotated[str | None, typer.Option("--highlight", help="class (name or index) whose attribution to highlight")] = None,
    no_examples: Annotated[bool, typer.Option("--no-examples", help="skip dataset-example patches (no images needed)")] = False,
    tile_size: Annotated[int, typer.Option(help=T.option_help("tile_size"))] = T.tile_size,
    overlap: Annotated[int, typer.Option(help=T.option_help("overlap"))] = T.overlap,
) -> None:
    """Write deep-zoom tiles, cell metadata and the viewer under RUN/tiles/."""
    # Checked before the stage is imported: `--format gif` or `--tile-size 0` fail at once, before any tile is drawn.
    settings = T(format=fmt, density_scale=density_scale, examples=not no_examples, icon_size=icon_size, tile_size=tile_size,
                 overlap=overlap)
    if size:
        GridSettings(sizes=size)
    from atlas.tiles import make_tiles

    entry = make_tiles(run_dir, layer, settings, atlas=atlas, sizes=size or None, highlight=highlight)
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
    check_port(port)
    if not run_dir.is_dir():  # not "run atlas tiles": there is no run there to tile
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise AtlasError(f"run folder {run_dir} {what}; give the folder of a run (atlas build --out RUN) to serve")
    from atlas.server import serve

    serve(run_dir, host=host, port=port, quiet=not verbose, allow_hosts=allow_host or ())
