"""The Typer app every command module registers on.

It lives apart from :mod:`atlas.cli` (which imports the command modules so they register)
so that the command modules need not import the package that imports them: no import circle.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Activation Atlases for PyTorch vision models.")
