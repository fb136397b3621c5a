"""The console entry point: :func:`main` runs the app, prints what the user can fix as one line with exit status 2,
and turns SIGINT and SIGTERM into :class:`Interrupted`, one line and exit status 128 + the signal (130, 143).

Ctrl-C (SIGINT) and SIGTERM stop every command within about a second: the handler :func:`main` installs raises
:class:`Interrupted` in the main thread, a ``BaseException`` that no ``except Exception`` of the library (nor click's
handling of KeyboardInterrupt, which would turn it into a silent return) can swallow; the ``finally`` blocks on the
way up close DataLoader workers, Ray sessions and servers, and leave what was finished in the run folder.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings

import typer

from atlas.cli.commands import app
from atlas.errors import AtlasError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 - a signal, not an error
    """SIGINT or SIGTERM arrived (``signum``); raised in the main thread by the handler :func:`main` installs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _install_stop_handlers(received: list[int]) -> dict[int | str, object] | None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` in this process; returns the handlers they replace (None
    where handlers cannot be set: not the main thread, as when a test calls ``main`` from another thread).

    An inherited "ignore SIGINT" (what a shell gives a job started with ``&``) is overridden on purpose: an interrupt
    sent to atlas must stop it. A process forked from this one (a DataLoader worker) inherits the handler; there it
    raises KeyboardInterrupt, on which torch's worker loop ends quietly, and the main process does the rest.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    pid = os.getpid()
    hook = sys.unraisablehook
    main_thread = threading.main_thread().ident
    in_hook = threading.Event()

    def again_soon(signum: int) -> None:
        # from another thread, a moment later: the handler then runs in the main thread at its next bytecode, outside
        # the hook (sent from inside the hook, it would raise right there and be printed as "Exception ignored")
        threading.Timer(0.01, signal.pthread_kill, (main_thread, signum)).start()

    def stop(signum, frame):
        if os.getpid() != pid:
            raise KeyboardInterrupt
        received.append(signum)
        _quiet_unawaited()  # from here on, before anything unwinds
        if in_hook.is_set():  # arrived while the hook below runs: raise it once the hook has returned
            again_soon(signum)
            return
        raise Interrupted(signum)

    def unraisable(info) -> None:
        # The signal can land where Python cannot pass an exception on, only print it ("Exception ignored in": an
        # at-fork callback while a DataLoader worker starts, a __del__): send it again, to be raised at the next point
        # that can. The KeyboardInterrupt of a forked worker caught there is dropped quietly: its parent ends it.
        # After an interruption, what a half-built object's __del__ says on the way out (torch's DataLoader iterator
        # stopped in its constructor) is noise: the one line says it all.
        in_hook.set()
        try:
            if isinstance(info.exc_value, Interrupted) and os.getpid() == pid:
                again_soon(info.exc_value.signum)
            elif not (received or isinstance(info.exc_value, Interrupted | KeyboardInterrupt)):
                hook(info)
        finally:
            in_hook.clear()

    sys.unraisablehook = unraisable
    return {"unraisablehook": hook} | {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}


def _quiet_unawaited() -> None:
    # An interruption can land between creating a coroutine and running it (`atlas serve` starting uvicorn): its
    # "never awaited" warning, printed when the stack unwinds, is noise after the one line. Likewise zarr's I/O runs
    # on an asyncio loop in its own thread: stopped mid-write, its pending tasks are collected at exit and asyncio's
    # logger prints "Task was destroyed but it is pending!" after the one line (what was written is sealed or redone
    # on resume, so nothing is lost that the message could warn of).
    warnings.filterwarnings("ignore", category=RuntimeWarning, message="coroutine .* was never awaited")
    logging.getLogger("asyncio").disabled = True


def _interrupted_exit(signum: int) -> SystemExit:
    _quiet_unawaited()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    then = "the server stopped" if command == "serve" else "run the same command again to resume"
    print(f"atlas: interrupted; {then}", file=sys.stderr, flush=True)
    return SystemExit(128 + signum)


def main() -> None:
    """Console entry point: run the app, turning AtlasError into one clear line and SIGINT/SIGTERM into one line
    and exit status 130/143."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    received: list[int] = []
    previous = _install_stop_handlers(received)
    try:
        _run()
        if received:  # swallowed on its way up (click turns a KeyboardInterrupt into a quiet return): still an interruption
            raise Interrupted(received[0])
    except Interrupted as exc:
        raise _interrupted_exit(exc.signum) from None
    except KeyboardInterrupt:  # where the handler could not be installed
        raise _interrupted_exit(signal.SIGINT) from None
    except BaseException as exc:
        # Anything a signal caused on its way up (a DataLoader worker gone, a broken pipe) is the interruption.
        if received and not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            raise _interrupted_exit(received[0]) from None
        # ray.init replaces the SIGTERM handler of the driver with its own `sys.exit(signum)`.
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM and "ray" in sys.modules:
            raise _interrupted_exit(signal.SIGTERM) from None
        raise
    finally:
        if previous is not None and not received:
            sys.unraisablehook = previous.pop("unraisablehook")
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        elif previous is not None:  # on the way out: a second Ctrl-C must not turn the exit into a traceback
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)


def _run() -> None:
    try:
        app(standalone_mode=False)
    except AtlasError as exc:
        print(f"atlas: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
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
