"""The command list of ``atlas --help``: each command in its help panel, the panels and commands in a set order, and
each command's one-line summary from its docstring.
"""

from __future__ import annotations

import inspect

import typer


def group_commands(app: typer.Typer, groups: dict[str, tuple[str, ...]]) -> None:
    """Give each registered command its help panel (Typer's ``rich_help_panel``) and list them group by group.

    Parameters
    ----------
    app : typer.Typer
        The app, its commands registered.
    groups : dict
        Panel title -> command names, in the order ``atlas --help`` lists them; a command in no group comes last.
    """
    rank = {name: i for i, name in enumerate(n for names in groups.values() for n in names)}
    panel = {name: group for group, names in groups.items() for name in names}
    for info in app.registered_commands:
        info.rich_help_panel = panel.get(info.name, info.rich_help_panel)
        if info.short_help is None and info.callback is not None and info.callback.__doc__:
            # The list's line: the docstring's first paragraph as one paragraph (rich markup would keep its line
            # breaks), brackets escaped so that "[extras]" shows as written instead of vanishing as a style tag.
            first = inspect.cleandoc(info.callback.__doc__).split("\n\n")[0]
            info.short_help = " ".join(first.split()).replace("[", "\\[")
    app.registered_commands.sort(key=lambda info: rank.get(info.name, len(rank)))
