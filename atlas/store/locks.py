"""One writer at a time, leftovers and faults: the run folder's advisory lock, the :func:`writer` decorator (a
read-only folder or a full disk is one line), removal of killed writers' partial files, and atomic store creation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import zarr

from atlas.errors import AtlasError
from atlas.store.schema import LOCK_NAME, PARTIAL_STORE, STORE_NAME, open_store, store_path

FAULTS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
          errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


_HELD: dict[str, tuple[int, Path]] = {}  # resolved run folder -> (open lock file descriptor, the folder as given)


_SCOPES: list[list[str]] = []  # locks taken inside each active @writer call


def take_lock(run_dir: str | Path, create: bool = False, unless_current: Callable[[], bool] | None = None) -> bool:
    """Hold the run's advisory lock (``RUN/.lock``) until the enclosing :func:`writer` call returns.

    Re-entrant within a process. Another process holding it is one line naming its pid. The
    first acquisition removes stray partial files of killed writers. ``create`` makes the run
    folder if needed (sampling, building); otherwise a missing folder is the "no atlas run" error.

    ``unless_current``, when given, is asked only when the lock file cannot be created because the folder is not
    writable (read-only file system, no permission): if it answers True (everything the caller would write is already
    current, e.g. every stage of a finished build), no lock is needed since nothing will be written, and False is
    returned instead of the one-line error. Returns True when the lock is held.
    """
    run = Path(run_dir)
    key = os.path.realpath(run)
    if key in _HELD:
        return True
    if not create and not run.is_dir():
        raise AtlasError(f"no atlas run in {run_dir} (missing {STORE_NAME}); run `atlas sample` first")
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if unless_current is not None and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and run.is_dir() and unless_current():
            return False  # a read-only run with nothing to do: readers need no lock
        raise AtlasError(describe_fault(exc, run)) from None
    try:
        # A POSIX record lock rather than flock: forked children (DataLoader workers) do not inherit it, so a killed
        # writer's lock is gone at once, not only when its last orphaned worker exits.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise AtlasError(describe_fault(exc, run)) from None
        raise AtlasError(f"{run} is being written by another atlas process ({holder or 'pid unknown'}); "
                         "wait for it to finish, or use another folder") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk must not hide the real error of the stage; the lock itself is held
    _HELD[key] = (fd, run)
    if _SCOPES:
        _SCOPES[-1].append(key)
    cleanup_partials(run)
    return True


def release_lock(run_dir: str | Path) -> None:
    held = _HELD.pop(os.path.realpath(Path(run_dir)), None)
    if held is not None:
        os.close(held[0])  # closing the descriptor releases the lock


def describe_fault(exc: OSError, run_dir: str | Path | None = None) -> str:
    """One line for an environment fault: what happened and in which folder."""
    what = FAULTS.get(exc.errno, exc.strerror or str(exc))
    if run_dir is None and _HELD:
        run_dir = list(_HELD.values())[-1][1]  # the run being written (a write error from a thread names no file)
    # A copy that fails writing (shutil's sendfile: ENOSPC with filename = the source, filename2 = the destination) names
    # the folder written into, never the folder read from (OpenSeadragon's, in the package).
    name = exc.filename2 if exc.filename2 and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else exc.filename
    where = Path(name).parent if name else (Path(run_dir) if run_dir else "the run folder")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what} while writing into {where}: free some space (or choose another --out) and run the same command again"
    if exc.errno == errno.EROFS:
        return f"cannot write to {where} ({what}); make the run folder writable or choose another --out"
    return f"{what}: {exc.filename or where}; check its permissions (or choose another --out)"


def writer(fn):
    """Decorator for every library function that writes a run: locks taken inside are released when it returns,
    and environment faults (read-only folder, full disk) become one :class:`AtlasError` line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _SCOPES.append([])
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if exc.errno in FAULTS:
                raise AtlasError(describe_fault(exc)) from None
            raise
        finally:
            for key in _SCOPES.pop():
                release_lock(key)

    return wrapper


def cleanup_partials(run_dir: str | Path) -> list[Path]:
    """Remove what killed writers left behind: ``RUN/.store.zarr.partial-*`` stores, zarr's and the ledger's
    ``*.partial`` temporary files in the store, ``tiles/*/*.partial`` folders (restoring ``*.old``
    ones whose replacement never arrived) and the manifest's temporary file. Returns what was removed."""
    run = Path(run_dir)
    removed: list[Path] = []

    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)

    for path in run.glob(PARTIAL_STORE + "*"):
        remove(path)
    store_dir = run / STORE_NAME
    if store_dir.is_dir():
        for folder, _, files in os.walk(store_dir):
            for name in files:
                if name.endswith(".partial"):
                    remove(Path(folder) / name)
    tiles = run / "tiles"
    if tiles.is_dir():
        for path in list(tiles.glob("*/*.old")):
            final = path.with_name(path.name[: -len(".old")])
            if not final.exists():
                os.replace(path, final)  # killed between moving the old tiles away and the new ones in
            else:
                remove(path)
        for path in [*tiles.glob("*/*.partial"), *tiles.glob("*.tmp")]:
            remove(path)
    return removed


@contextlib.contextmanager
def new_store(run_dir: str | Path):
    """Build a new store out of sight (``RUN/.store.zarr.partial-PID``) and move it into place when the block ends.

    A kill at any moment leaves either no store (the partial folder is removed on the next
    start) or a complete one. Yields the partial store's root group.
    """
    run = Path(run_dir)
    final = store_path(run)
    if final.exists():
        raise AtlasError(f"{final} already exists")
    partial = run / f"{PARTIAL_STORE}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield zarr.open_group(str(partial), mode="w")
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def open_for_update(run_dir: str | Path) -> zarr.Group:
    """The run's store opened read-write, or the clear "no atlas run" error (never a new empty store)."""
    open_store(run_dir)
    return open_store(run_dir, mode="r+")
