"""The Typer app every command module registers on, and its one global option, ``--version``.

It lives apart from :mod:`atlas.cli` (which imports the command modules so they register)
so that the command modules need not import the package that imports them: no import circle.
"""

from __future__ import annotations

import importlib.metadata
from typing import Annotated

import typer

DISTRIBUTION = "activation-atlas"  # the name on PyPI (`atlas` there is another project); the package imports as atlas

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Activation Atlases for PyTorch vision models.")


def package_version() -> str:
    """The installed version of atlas: the distribution's metadata, else ``atlas.__version__`` (a source tree on sys.path).

    Returns
    -------
    str
        The version, such as ``"0.1.0"``.
    """
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        from atlas import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"atlas {package_version()}")
        raise typer.Exit()


# No docstring: the app's help above is what `atlas --help` shows.
@app.callback()
def _global_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print atlas's version and exit.")] = False,
) -> None:
    pass
