"""The `atlas` command line: thin Typer wrappers over the library's functions.

Each stage registers its commands in its own module here; errors the user can fix
(:class:`atlas.errors.AtlasError`, and click's usage errors such as a non-integer for an
integer option) print as one line and exit with status 2. Option defaults, ranges and help
come from the settings classes of :mod:`atlas.settings`; each command checks its options
there before importing its stage (and torch), so a bad value fails in well under a second.

Ctrl-C (SIGINT) and SIGTERM stop every command within about a second: the handler :func:`main` installs raises
:class:`Interrupted` in the main thread, a ``BaseException`` that no ``except Exception`` of the library (nor click's
handling of KeyboardInterrupt, which would turn it into a silent return) can swallow; the ``finally`` blocks on the
way up close DataLoader workers, Ray sessions and servers, and leave what was finished in the run folder. One line
is printed and the exit status is 128 + the signal (130, 143).

The rooms: :mod:`atlas.cli.commands` (the Typer app the command modules register on), :mod:`atlas.cli.entry`
(:func:`main`, the one-line errors and the signal handling), :mod:`atlas.cli.groups` (the panels of ``atlas --help``)
and one ``*_cmd`` module per stage or instrument. This face imports them, which registers every command.
"""

from __future__ import annotations

from atlas.cli import stages  # noqa: F401  (the command modules register themselves on `app` when imported)
from atlas.cli.commands import app
from atlas.cli.entry import Interrupted, main
from atlas.cli.groups import group_commands

__all__ = ["GROUPS", "Interrupted", "app", "main"]

# `atlas --help` lists the commands in four groups, in this order (each group in the order given). A command missing
# here would fall into a fifth, untitled group: tests/test_cli_help.py names it.
GROUPS: dict[str, tuple[str, ...]] = {
    "Pipeline": ("build", "sample", "project", "grid", "render", "tiles", "export-icons", "info", "layers", "fetch-weights"),
    "Instruments": ("inspect", "units", "concepts", "weights", "evolution", "reconstruct"),
    "Experiments": ("class", "compare", "patch", "patch-search", "align", "side-by-side", "class-layers"),
    "Serving": ("serve",),
}
group_commands(app, GROUPS)
