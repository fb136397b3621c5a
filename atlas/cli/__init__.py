"""The `atlas` command line: thin Typer wrappers over the library's functions.

Each stage registers its commands in its own module here; errors the user can fix
(:class:`atlas.errors.AtlasError`, and click's usage errors such as a non-integer for an
integer option) print as one line and exit with status 2. Option defaults, ranges and help
come from the settings classes of :mod:`atlas.settings`; each command checks its options
there before importing its stage (and torch), so a bad value fails in well under a second.
"""

from __future__ import annotations

import sys
import warnings

import typer

from atlas.cli.commands import app
from atlas.errors import AtlasError

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point: run the app, turning AtlasError into one clear line."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    try:
        app(standalone_mode=False)
    except AtlasError as exc:
        print(f"atlas: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("atlas: interrupted; finished work is kept in the run folder, run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:  # usage errors of the click that typer bundles (bad option value, missing option, ...)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `atlas` or `atlas CMD` alone: the help, as click prints it
            exc.show()
            raise SystemExit(exc.exit_code) from None
        message = getattr(exc, "format_message", None)
        if callable(message) and hasattr(exc, "exit_code"):
            # One line, like every other error (click's own form is usage + hint + message on four lines).
            ctx = getattr(exc, "ctx", None)
            command = " ".join(["atlas", *ctx.command_path.split()[1:]]) if ctx is not None else "atlas"  # not "-c" or "__main__.py"
            hint = f" (see `{command} --help`)"
            print(f"atlas: error: {' '.join(message().split())}{hint}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        if type(exc).__name__ == "Abort":
            raise SystemExit(1) from None
        raise


# Command modules register themselves on `app` when imported.
from atlas.cli import stages  # noqa: E402,F401
