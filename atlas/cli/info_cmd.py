"""`atlas info`: what a run holds (:func:`atlas.info.info`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from atlas.cli.commands import app


@app.command("info")
def info_command(
    run_dir: Annotated[Path, typer.Argument(help="run folder")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Summarise what a run holds: samples, layouts, grids, icons, tiles."""
    from atlas.info import format_info, info

    data = info(run_dir)
    typer.echo(json.dumps(data, indent=2) if as_json else format_info(data))
