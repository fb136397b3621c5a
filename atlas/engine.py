"""Where the stages whose cost grows with images or cells run: in this process (``local``) or on Ray (``ray``).

``sample`` (its shards), ``render`` (its cell batches) and the unit lens's top-k pass (its shards) hand their own
work units to :meth:`Engine.map`; everything else (project, grid, tiles) stays on the driver. On Ray each worker is
one actor holding one model (``num_gpus=1`` per actor when the stage runs on CUDA), built once by a *factory*
(a module-level function of the stage, pickled by reference) and called once per unit. Workers only compute and
return arrays; the driver writes every result into the store through the stage's own writer and seals it as a
local run does, so no zarr chunk ever has two writers and the store ends as a local run's would (docs/ray.md).

Results come back in the order of the units (the stage writes and flags them in that order, as locally): a
killed actor is restarted by Ray (``max_restarts``) and its unfinished tasks are run again (``max_task_retries``);
the stage never sees it except as a delay.

Ray is optional (``pip install 'activation-atlas[ray]'``): this module imports it only when ``--engine ray`` is asked for, and
without it that is one line saying how to install it. An address that cannot be reached is one line after at most
``CONNECT_TIMEOUT`` seconds, never a hang.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas.errors import AtlasError
from atlas.settings import ENGINES, RunSettings

INSTALL = "pip install 'activation-atlas[ray]'"
CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster's GCS port before giving up with one line
NAMESPACE = "atlas"  # the namespace of atlas's named actors (tests find an actor by name to kill it)
MAX_RESTARTS = 4  # a killed actor is started again this often (a worker that keeps dying is an error, not a hang)
MAX_TASK_RETRIES = 4
LOCAL_OBJECT_STORE = 300 * 1024**2  # a local Ray's object store: results are a shard or a batch at a time
DEPTH = 2  # units queued per actor: the next one is ready while the driver writes the last
# The environment of an actor process whose threads outnumber the CPUs it reserved, set before the actor imports
# torch (OpenMP reads it when torch loads it). Each actor runs the driver's torch thread count for bit-identical
# results (oneDNN's sums depend on it: a 1-thread and a 2-thread run differ from mixed4d on), so with one actor per
# core the actors' threads outnumber the cores; OpenMP's default busy-waiting at its barriers then burns the cores
# another actor needs. PASSIVE makes waiting threads sleep; it changes no arithmetic. Measured here (InceptionV1
# forward + backward to mixed4c, 4 x 80 px, 2 cores): two 2-thread processes at once ran 3.6 + 3.6 steps/s spinning,
# 13.0 + 11.8 passive; one 2-thread process 16.9 spinning but 10.2 passive, so an actor that has its cores to itself
# (threads <= reserved CPUs) keeps OpenMP's default.
# (Set in the actor, not as a Ray runtime_env: an actor with its own runtime_env cannot use the worker processes Ray
# has already started, and waits for a new one.)
ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# The HTTP/2 client connection preface followed by an empty SETTINGS frame (RFC 9113, section 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` records its address


def actor_name(stage: str, index: int) -> str:
    """The name of this process's ``index``-th actor of a stage's pool (unique per driver: two runs can share a cluster)."""
    return f"atlas-{stage}-{os.getpid()}-{index}"


def require_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise AtlasError(f"--engine ray needs Ray, which is not installed: {INSTALL} (or pip install 'ray[data]>=2.9')") from None
    return ray


def _auto_address() -> str:
    """The address ``ray start --head`` left for ``auto``: $RAY_ADDRESS, else /tmp/ray/ray_current_cluster."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address and CURRENT_CLUSTER.is_file():
        address = CURRENT_CLUSTER.read_text().strip()
    if not address or address == "auto":
        raise AtlasError("--ray-address auto: no running Ray cluster found (no $RAY_ADDRESS, no /tmp/ray/ray_current_cluster); "
                         "start one with `ray start --head`, give --ray-address HOST:PORT, or leave --ray-address out to start Ray here")
    return address


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> str:
    """``address`` (HOST:PORT or ray://HOST:PORT) if something listens there within ``timeout`` s, else one line.

    Ray's own connect retries for a long time against a silent address; this TCP check bounds it.
    """
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise AtlasError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT; got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            # Ray's GCS (and Ray Client) speak gRPC, i.e. HTTP/2: a server answers the client preface with a SETTINGS
            # frame. Anything else listening there would leave ray.init retrying for minutes.
            conn.sendall(HTTP2_PREFACE)
            answer = conn.recv(9)
    except TimeoutError:
        raise AtlasError(f"cannot reach the Ray cluster at {address}: no answer within {timeout:.0f} s; "
                         "check the address and that `ray status` works there") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise AtlasError(f"cannot reach the Ray cluster at {address}: {reason}; "
                         "check the address and that `ray status` works there") from None
    if len(answer) < 9 or answer[3] != 0x04:
        raise AtlasError(f"{address} does not answer like a Ray cluster (no gRPC there); give the address of a Ray head node "
                         "(`ray start --head` prints it; the GCS port is 6379 by default)")
    return address


def _cause(exc: BaseException) -> str:
    """The first line of the error behind a Ray exception (a worker's AtlasError, a died actor's reason)."""
    ray = require_ray()
    seen = 0
    while isinstance(getattr(exc, "cause", None), BaseException) and seen < 8:
        exc, seen = exc.cause, seen + 1
    if isinstance(exc, ray.exceptions.RayError):
        text = str(exc).strip().splitlines()
        useful = [line.strip() for line in text if line.strip() and not line.startswith(("Traceback", "  File", "ray::"))]
        return useful[-1] if useful else type(exc).__name__
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _Worker:
    """One Ray actor: a stage's worker built on its first unit (its model loaded once per process), then called per unit."""

    def __init__(self, factory: str, threads: int, env: dict[str, str]):
        # An actor's process is its own and has not imported torch yet (atlas.engine does not import it), so the
        # variables are in place when torch loads OpenMP. One the node already sets (`ray start` inherits the
        # shell's environment) is left as the node's operator chose it. The factory comes as "module:name" and is
        # imported only after that: as a function argument Ray would unpickle it, importing the stage's module and
        # with it torch, before this line ran (then PASSIVE never took effect: 2 actors rendered at a quarter of
        # the speed of two plain processes, bench/ray.py).
        global _TORCH_FIRST
        _TORCH_FIRST = "torch" in sys.modules  # True would mean the variables below come too late (probe_worker reads it)
        for name, value in env.items():
            os.environ.setdefault(name, value)
        import importlib

        import torch

        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)

        # The arithmetic's reduction order on a CPU depends on the thread count: the driver's count keeps the
        # results bit-identical to a local run on the same kind of machine.
        torch.set_num_threads(threads)
        self.factory, self.call = factory, None

    def run(self, shared: list, unit: Any) -> tuple[int, Any]:
        # The stage's arguments come as an object reference inside a list, fetched once per process: a restarted
        # actor (a new process) fetches them again. (Constructor arguments in the object store would tie the restart
        # to them, which Ray warns about.)
        if self.call is None:
            import ray

            self.call = self.factory(*ray.get(shared[0]))
        return os.getpid(), self.call(unit)

    def pid(self) -> int:
        return os.getpid()


_TORCH_FIRST: bool | None = None  # set by an actor's _Worker: was torch loaded before the actor set its environment?


def probe_worker() -> Callable[[Any], dict]:
    """A factory for :func:`probe`: each unit returns what the actor's process runs with."""
    import torch

    def run(_unit) -> dict:
        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "torch_first": _TORCH_FIRST}

    return run


@dataclass
class MapStats:
    """What one :meth:`Engine.map` did: units, actors, and the worker processes that computed them."""

    units: int = 0
    actors: int = 0
    first: dict[int, int] = field(default_factory=dict)  # actor index -> pid of its first process
    pids: dict[int, set[int]] = field(default_factory=dict)  # actor index -> pids that returned results
    ready: float = 0.0  # seconds from asking for the actors until every actor's process answered (bench/ray.py)

    @property
    def restarts(self) -> int:
        """Actor processes that were replaced (killed and restarted by Ray) while the stage ran."""
        return sum(len(p | {self.first[i]}) - 1 for i, p in self.pids.items() if i in self.first)

    def describe(self) -> str:
        return f"{self.units} units on {self.actors} Ray actors ({self.restarts} restarted)"


@dataclass
class Engine:
    """``local`` or ``ray`` (at ``address``: None starts Ray on this machine, ``auto`` joins the running cluster).

    ``workers`` is the number of actors (None: one per GPU of the cluster when the stage runs on CUDA, else one
    per ``cpus`` CPUs); ``threads`` the torch threads of each (None: this process's, for results identical to a
    local run); ``cpus`` the CPUs Ray reserves for each actor on a CPU stage (1: one actor per core; a node's core
    count: one actor per node using all its cores); ``depth`` the units queued per actor; ``env`` the environment
    variables of each actor process (None: :data:`ACTOR_ENV` when an actor's threads outnumber its CPUs, else none).
    """

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    threads: int | None = None
    cpus: int = 1
    depth: int = DEPTH
    env: dict[str, str] | None = None
    last: MapStats = field(default_factory=MapStats)

    def __post_init__(self):
        RunSettings(engine=self.kind, ray_address=self.address)
        for name in ("workers", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise AtlasError(f"engine {name} must be at least 1; got {getattr(self, name)}")
        for name in ("cpus", "depth"):
            if getattr(self, name) < 1:
                raise AtlasError(f"engine {name} must be at least 1; got {getattr(self, name)}")

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"

    def start(self):
        """Connect to (or start) Ray; returns the module. Ray already initialised in this process is used as it is."""
        ray = require_ray()
        if ray.is_initialized():
            return ray
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                                  "namespace": NAMESPACE}
        if self.address is None:
            kwargs |= {"num_cpus": os.cpu_count() or 1, "object_store_memory": LOCAL_OBJECT_STORE}
        else:
            address = _auto_address() if self.address == "auto" else self.address
            kwargs["address"] = check_reachable(address)
            if not address.startswith("ray://"):
                kwargs.pop("include_dashboard")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        # ray.init takes SIGTERM over (a `sys.exit`, then its core worker's crash handler, which aborts): the command
        # line's handlers are put back, so that SIGTERM stops a Ray run as it stops a local one (atlas.cli).
        stop = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise AtlasError(f"cannot start Ray{f' at {self.address}' if self.address else ''}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                for signum, handler in stop.items():
                    if handler is not None:
                        signal.signal(signum, handler)
        self._started = True
        return ray

    @contextlib.contextmanager
    def session(self) -> Iterator[Engine]:
        """A span of work over which Ray, once started (or joined) by :meth:`map`, stays up; shut down at its end when
        this engine started it.

        Re-entrant: `atlas build` holds one session over all its stages, each stage opens its own inside it, so Ray
        starts once per build. Ray starts on the first unit to compute, not here: a resumed stage with nothing left
        to do, or a build whose stages are all up to date, never starts it.
        """
        self._sessions = getattr(self, "_sessions", 0) + 1
        try:
            yield self
        finally:
            self._sessions -= 1
            if not self._sessions:
                self.stop()

    def stop(self) -> None:
        """Shut Ray down if :meth:`start` started it (a session the caller opened stays open)."""
        if getattr(self, "_started", False):
            require_ray().shutdown()
            self._started = False

    def map(self, factory: Callable[..., Callable[[Any], Any]], args: tuple, units: Iterable[Any], name: str,
            gpus: float = 0.0) -> Iterator[Any]:
        """``factory(*args)(unit)`` for every unit, in order, on a pool of Ray actors (one ``factory`` call per actor).

        ``factory`` must be a module-level function (Ray pickles it by reference); ``args`` travel once per actor
        through the object store. ``gpus`` is each actor's share of a GPU (1 on CUDA, 0 on a CPU). Results are
        yielded in the order of ``units``, at most ``depth`` units queued per actor.
        """
        import torch

        target = f"{factory.__module__}:{factory.__qualname__}"
        if factory.__module__ == "__main__" or "<" in factory.__qualname__ or "." in factory.__qualname__:
            raise AtlasError(f"{name} on Ray: the worker factory {target} must be a module-level function of an importable "
                             "module (each actor imports it by name)")
        units = list(units)
        if not units:  # nothing to compute: Ray is not started for it
            self.last = MapStats()
            return
        ray = self.start()
        actors: list = []
        try:
            resources = ray.cluster_resources()
            if gpus and resources.get("GPU", 0) < gpus:
                raise AtlasError(f"the Ray cluster has no GPU (resources: {int(resources.get('CPU', 0))} CPUs); "
                                 "use --device cpu, or add GPU nodes")
            cpus = 1 if gpus else self.cpus  # a GPU actor's CPU work is the GPU's feeding: one core each
            n = self.workers or max(1, int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // cpus))
            n = max(1, min(n, len(units)))
            self.last = stats = MapStats(units=len(units), actors=n)
            threads = self.threads or torch.get_num_threads()
            remote = ray.remote(_Worker)
            shared = ray.put(args)
            env = (ACTOR_ENV if threads > cpus else {}) if self.env is None else self.env
            asked = time.perf_counter()
            actors = [remote.options(name=actor_name(name, i), namespace=NAMESPACE, num_cpus=cpus, num_gpus=gpus,
                                     max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES, lifetime=None)
                      .remote(target, threads, dict(env)) for i in range(n)]
            try:
                stats.first = dict(enumerate(ray.get([actor.pid.remote() for actor in actors])))
                stats.ready = time.perf_counter() - asked
            except ray.exceptions.RayError as exc:
                raise AtlasError(f"{name} on Ray failed: {_cause(exc)}") from None
            queue: collections.deque = collections.deque()
            submitted = 0
            for index in range(len(units)):
                while submitted < len(units) and submitted < index + self.depth * n:
                    queue.append(actors[submitted % n].run.remote([shared], units[submitted]))
                    submitted += 1
                try:
                    pid, result = ray.get(queue.popleft())
                except ray.exceptions.RayError as exc:
                    raise AtlasError(f"{name} on Ray failed: {_cause(exc)}") from None
                stats.pids.setdefault(index % n, set()).add(pid)
                yield result
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)


def probe(engine: Engine) -> list[dict]:
    """What each actor of ``engine``'s pool runs with — pid, torch threads, ``OMP_WAIT_POLICY``, and ``torch_first``
    (torch was already imported when the actor set its environment: the variables would then have no effect) — one
    dict per actor, for checking a cluster before a long run."""
    # More units than any pool has actors: the pool takes its usual size, unit i runs on actor i % size.
    results = list(engine.map(probe_worker, (), [None] * max(engine.workers or 0, 256), "probe"))
    return results[: engine.last.actors]


def make_engine(kind: str = "local", address: str | None = None, workers: int | None = None) -> Engine:
    """An :class:`Engine` from the ``[run]`` settings ``engine`` and ``ray_address`` (checked: one line when bad).

    ``--engine ray`` is refused at once (one line) when Ray is not installed or the cluster cannot be reached, before
    any work starts.
    """
    if kind not in ENGINES:
        RunSettings(engine=kind)
    result = Engine(kind, address, workers)
    if result.is_ray:
        require_ray()
        if address is not None:  # an unreachable cluster is one line now, not after the model has loaded
            check_reachable(_auto_address() if address == "auto" else address)
    return result
