"""``atlas serve``: one ASGI application (Starlette on uvicorn) for a run's viewer, unit gallery and live page.

What it serves, and what it refuses, is what the stdlib server before it did (tests/test_server.py holds every rule).
Starlette's ``StaticFiles`` serves the files, its ``Route``/``Mount``/``WebSocketRoute`` route the requests. Four
pieces are this module's own, each where a test shows Starlette and uvicorn lack the guarantee (each comment names
the test): the Host check with its port, the deadline for a request head, the request target's length (414), and
a symlink loop as 404.

- at ``/tiles/``: the pages of the atlas viewer, the unit gallery, the side-by-side view and the live page, and
  OpenSeadragon, all from the installed package (never copied into the run: ``atlas serve`` writes nothing, so a
  read-only run is served as it is), and every other file under ``RUN/tiles/`` (the tiles, the manifests, the
  reports); ``store.zarr`` and ``log.txt``, which hold absolute paths, are never served, nor is anything a path or
  a symlink would reach outside ``tiles/``, nor a folder listing, a FIFO or a device (404). The path is the
  request target percent-decoded once, so ``%252e%252e`` stays a name; every path is resolved (symlinks
  followed) and served only inside ``tiles/``; a request target over ``MAX_TARGET`` bytes is 414, a name the file
  system cannot hold (too long) is 404;
- the ``Host`` header must name this server (localhost, 127.0.0.1, [::1], the bound address, the address the
  connection arrived on, or an ``allow_hosts`` name) with its port, else 403: a DNS-rebinding page cannot read the
  run. A WebSocket handshake that carries an ``Origin`` (every browser's does) must also come from this server's
  own pages, since browsers let any page open a WebSocket to 127.0.0.1;
- loopback by default; a listen backlog of 1024 (a browser's burst of parallel tile requests is queued, not
  dropped); a connection that has not sent a complete request head ``timeout`` seconds after it connected (or after
  its previous response) is closed, however slowly it drips bytes. uvicorn's own keep-alive timer restarts on every
  byte (encode/uvicorn#157), so the protocol class :class:`_HeadDeadline` adds that deadline on top of it.

The live instrument is a WebSocket at ``/live/ws`` (the page is ``/tiles/live.html``, ``/live`` redirects there);
:mod:`atlas.live` computes each frame, and :class:`LiveSession` holds one connection's state. One model per
server process, loaded on the first live connection; every forward runs on one worker thread (never on the event
loop), so connections take turns and the network keeps both cores. Each connection has a queue of one frame: a
frame that arrives while the previous one is computed replaces the waiting one (dropped, counted), so latency
never grows with a slow machine. The worker's queue is first come, first served and holds at most one job of each
connection, so connections take turns; at most ``MAX_LIVE`` connections are open at once (one more is told so in
one line and closed, code 1013), and one that sends nothing for ``LIVE_IDLE`` seconds is closed with one line. A text
command over ``MAX_COMMAND_BYTES``, or one JSON cannot hold (nested too deep, a number too long), is one error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h11
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketClose, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.http.h11_impl import H11Protocol

from atlas.errors import AtlasError
from atlas.viewer import (
    CONCEPTS_FILES,
    CONCEPTS_MANIFEST,
    GALLERY_FILES,
    INSPECT_FILES,
    LAYERS_FILES,
    LOOPBACK_NAMES,
    SERVED,
    STATIC,
    TIMEOUT,
    UNITS_MANIFEST,
    VIEWER_FILES,
    find_openseadragon,
    require_viewer_assets,
    split_host,
    url_of,
)
from atlas.viewer import atlas_page as viewer_page

log = logging.getLogger(__name__)  # "atlas.server": status lines and warnings (serve() gives it the command line's handlers)

BACKLOG = 1024  # listen queue; the kernel caps it at net.core.somaxconn
LIVE_FILES = ("live.html", "live.js", "live.css")
LIVE_SOCKET = "/live/ws"
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The pages served from the package itself (atlas/viewer_static), never from the run's tiles/ folder: a run tiled by
# an older atlas, or a read-only one, gets the pages of the atlas serving it, and serving writes nothing.
PACKAGE_FILES = frozenset((*VIEWER_FILES, *GALLERY_FILES, *INSPECT_FILES, *CONCEPTS_FILES, *LAYERS_FILES, *LIVE_FILES))
OSD_FOLDER = "openseadragon"  # /tiles/openseadragon/... is served from atlas.viewer.find_openseadragon()
MAX_TARGET = 8192  # bytes of a request target (path and query); longer is 414 (a browser's own limit is larger, no page needs it)

# Limits of the live socket (per connection). A browser sends 224 px JPEGs of 10-30 kB.
MAX_FRAME_BYTES = 2 * 1024 * 1024
MAX_FRAME_PIXELS = 4096 * 4096 // 4  # 4.2 megapixels: a phone photo dropped on the page is downscaled by the browser first
RATE = 30.0  # messages a second (frames and commands), with a burst of as many
WS_MAX_SIZE = 2 * MAX_FRAME_BYTES  # beyond this the socket layer closes the connection (1009); up to it, one error line
MAX_LIVE = 32  # live connections at once: with one model thread, the 33rd would wait behind 32 frames for each of its own
LIVE_IDLE = 600.0  # seconds a live connection may send nothing before it is closed (a forgotten tab keeps no socket)
MAX_COMMAND_BYTES = 4096  # a text command is a short JSON object; anything longer is refused before parsing


# --------------------------------------------------------------------------------------
# Static files
# --------------------------------------------------------------------------------------
class RunFiles(StaticFiles):
    """Starlette's :class:`~starlette.staticfiles.StaticFiles` for one folder, symlinks out of it refused.

    ``follow_symlink=False`` (the default) resolves every path with ``os.path.realpath`` and serves it only when it
    stays inside the folder: ``..``, ``%2e%2e`` and a symlink out are 404, a link inside is served; no folder
    listing; a FIFO or a device is not a regular file (404); NUL and over-long names are 404. One guarantee it
    lacks is added: a symlink loop (``os.stat`` raises ELOOP) is a 500 with a traceback in Starlette's, a plain 404
    here (``test_a_symlink_loop_under_tiles_is_404``), as is a folder the server may not read (Starlette's 401
    would ask for credentials that do not exist).
    """

    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        try:
            return super().lookup_path(path)
        except OSError:  # ELOOP, EACCES, ENAMETOOLONG: nothing to serve there
            return "", None


def atlas_page(root: Path) -> bytes:
    """The atlas page for the tiles folder ``root``, loading the add-ons (unit gallery, inspect overlay, concepts link)
    whose manifests it holds after viewer.js, as ``atlas tiles`` writes it (:func:`atlas.viewer.atlas_page`)."""
    return viewer_page(root).encode()


def _redirect(location: str):
    async def endpoint(request: Request) -> Response:
        return RedirectResponse(location, 302)  # a path only: never the request's own netloc
    return endpoint


def _package_file(name: str):
    def endpoint(request: Request) -> Response:  # sync: Starlette runs it on its thread pool
        return FileResponse(STATIC / name)
    return endpoint


def routes(root: Path) -> list[BaseRoute]:
    """The HTTP routes of ``atlas serve``, first match wins.

    The package's pages and OpenSeadragon come first (never the run's copies of them), then the run's files; ``/``,
    ``/tiles`` and ``/live`` redirect to the pages.

    Parameters
    ----------
    root : pathlib.Path
        The run's ``tiles/`` folder, resolved.

    Returns
    -------
    list of starlette.routing.BaseRoute
        Routes for :class:`starlette.applications.Starlette` (the live socket is added by :class:`AtlasApp`).
    """

    def index(request: Request) -> Response:  # composed in memory: the run folder is never written
        page = atlas_page(root)
        return Response(b"" if request.method == "HEAD" else page, 200, {"Content-Length": str(len(page))},
                        media_type="text/html")

    pages = [Route(f"/{SERVED}/{name}", _package_file(name)) for name in sorted(PACKAGE_FILES - {"index.html"})]
    return [Route("/", _redirect(f"/{SERVED}/index.html")), Route(f"/{SERVED}", _redirect(f"/{SERVED}/index.html")),
            Route("/live", _redirect(f"/{SERVED}/live.html")), Route("/live/", _redirect(f"/{SERVED}/live.html")),
            Route(f"/{SERVED}/", index), Route(f"/{SERVED}/index.html", index), *pages,
            Mount(f"/{SERVED}/{OSD_FOLDER}", RunFiles(directory=find_openseadragon().resolve())),
            Mount(f"/{SERVED}", RunFiles(directory=root))]


# --------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------
class AtlasApp:
    """The ASGI application: the Host check and the target's length, then Starlette's routes (the static files of
    ``tiles/``, the live socket)."""

    def __init__(self, run_dir: Path, port: int, allowed_names: set[str], quiet: bool = True, max_live: int = MAX_LIVE,
                 live_idle: float = LIVE_IDLE) -> None:
        self.run_dir = run_dir
        self.max_live, self.live_idle = max_live, live_idle
        self.open_live = 0  # live connections now (counted on the event loop's thread only)
        self.root = (run_dir / SERVED).resolve()
        self.port = port
        self.allowed_names = allowed_names
        self.quiet = quiet
        self.live = LiveModel(run_dir)
        self.app = Starlette(routes=[*routes(self.root), WebSocketRoute(LIVE_SOCKET, self.websocket)])

    # Starlette's TrustedHostMiddleware is not used: it drops the port (``127.0.0.1:PORT+1`` would pass), cannot
    # accept the address a connection arrived on, and refuses with 400 where the page and the live socket expect 403
    # (test_host_header_must_name_this_server, test_the_socket_refuses_other_origins_hosts_and_paths).
    def host_of(self, scope) -> str | None:
        """The one Host header's value when it names this server and its port (DNS-rebinding protection), else None."""
        values = [v for k, v in scope.get("headers", ()) if k == b"host"]
        if len(values) != 1:
            return None
        value = values[0].decode("latin-1")
        parsed = split_host(value)
        if parsed is None:
            return None
        name, port = parsed
        if (port if port is not None else 80) != self.port:
            return None
        arrived_on = str((scope.get("server") or ("",))[0]).lower()
        return value if name in self.allowed_names or name == arrived_on else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        if scope["type"] == "websocket":
            if self.host_of(scope) is None:
                await WebSocketClose(code=1008)(scope, receive, send)  # before accept: the handshake is refused with 403
            else:
                await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:  # every answer: revalidate each time, never sniff a type
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(HEADERS)
            await send(message)

        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        try:
            if self.host_of(scope) is None:
                response = PlainTextResponse("Host header does not name this server: open "
                                             f"http://127.0.0.1:{self.port}/{SERVED}/index.html; other names need "
                                             "`atlas serve --allow-host NAME`", 403)
            elif target > MAX_TARGET:  # Starlette has no limit of its own (test_an_over_long_segment_is_404_and_an_over_long_target_414)
                response = PlainTextResponse(f"request target over {MAX_TARGET} bytes", 414)
            else:
                await self.app(scope, receive, send_with_headers)
                return
            await response(scope, receive, send_with_headers)
        except OSError:  # the client went away mid-response, or the file vanished under it
            return

    async def websocket(self, ws: WebSocket) -> None:
        host = self.host_of(ws.scope)
        origins = [v.decode("latin-1") for k, v in ws.scope.get("headers", ()) if k == b"origin"]
        if origins and (host is None or origins[0].lower() != f"http://{host}".lower()):
            await ws.close(code=1008)  # before accept: the handshake is refused with 403
            return
        await ws.accept()
        if self.open_live >= self.max_live:  # refused after the handshake, so the page can show why
            with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
                await ws.send_text(json.dumps({"type": "error", "message": f"too many live connections ({self.max_live} open); "
                                               "close another live page and reload this one"}))
                await ws.close(code=1013)  # "try again later"
            return
        self.open_live += 1
        session = LiveSession(ws, self.live, idle=self.live_idle)
        try:
            await session.run()
        except (WebSocketDisconnect, OSError, RuntimeError):
            pass
        finally:
            self.open_live -= 1
            session.stop()

    def close(self) -> None:
        self.live.close()

# --------------------------------------------------------------------------------------
# The live socket
# --------------------------------------------------------------------------------------
class LiveModel:
    """The run's model, loaded once per process on first use; every computation on one worker thread."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atlas-live")
        self.threads: int | None = None  # torch threads for the network (None: both cores, see atlas.live)
        self._engine = None
        self._lock = threading.Lock()

    def engine(self):
        """The :class:`atlas.live.LiveEngine` (run on the worker thread: loading takes a few seconds)."""
        with self._lock:
            if self._engine is None:
                from atlas.live import LiveEngine

                self._engine = LiveEngine.for_run(self.run_dir, self.threads)
            return self._engine

    async def call(self, method: str, *args, **kwargs):
        """``engine.method(*args, **kwargs)`` on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: getattr(self.engine(), method)(*args, **kwargs))

    async def hello(self) -> dict:
        """The hello message: on the worker thread while the model loads, else at once (a new connection does not wait
        behind the frames of the others: it reads only the run's manifests)."""
        if self._engine is None:
            return await self.call("hello")
        return await asyncio.to_thread(self._engine.hello)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RateLimit:
    """A token bucket: ``rate`` messages a second, bursts of as many."""

    def __init__(self, rate: float = RATE) -> None:
        self.rate, self.tokens, self.stamp = rate, rate, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class LiveSession:
    """One live connection: a receive loop, a one-frame slot, and a worker task that answers the newest frame.

    Client to server: a binary message is a frame (an encoded image); a text message is a JSON command:
    ``{"type": "layer", "layer": NAME}``, ``{"type": "image", "index": I}`` (one of the run's own images, by index:
    no path ever comes from the client), ``{"type": "unit", "channel": C}`` (the channel's deconvnet projection of
    the current frame), ``{"type": "atlas", "layer": L, "atlas": A}`` (the current frame's positions on one of the
    run's rendered atlases, ``onatlas``), ``{"type": "images"}`` (the list of the run's images offered). Server to client: JSON text
    (``hello``, ``images``, ``error``, ``status``) and binary messages made by :func:`atlas.live.pack` (a JSON
    header, then bytes): ``result`` (top-5 and the layer's maps as uint8), ``picture`` (the run's image shown),
    ``projection``.
    """

    def __init__(self, ws: WebSocket, live: LiveModel, rate: float = RATE, idle: float = LIVE_IDLE) -> None:
        self.ws, self.live, self.idle = ws, live, idle
        self.limit = RateLimit(rate)
        self.slot: tuple | None = None  # the newest job waiting: ("frame", seq, bytes, t) | ("image", index) | ("again",)
        self.unit: int | None = None  # the newest projection request waiting
        self.atlas: tuple[str, str] | None = None  # the newest "frame on the atlas" request waiting: (layer, atlas)
        self.wake = asyncio.Event()
        self.seq = 0
        self.dropped = 0
        self.layer: str | None = None
        self.current = None  # the last frame computed (atlas.live.Frame) and its result, for projections and layer changes
        self.last_limit_error = 0.0
        self.worker: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()

    async def send_json(self, message: dict) -> None:
        async with self.send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.send_text(json.dumps(message))

    async def send_bytes(self, data: bytes) -> None:
        async with self.send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.send_bytes(data)

    async def error(self, message: str) -> None:
        await self.send_json({"type": "error", "message": page_text(message, self.live.run_dir)})

    async def run(self) -> None:
        await self.send_json({"type": "status", "message": "loading the model"})
        try:
            hello = await self.live.hello()
        except AtlasError as exc:
            await self.error(str(exc))
            await self.ws.close(code=1011)
            return
        self.layer = hello["layer"]
        await self.send_json(hello)
        self.worker = asyncio.create_task(self.work())
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), self.idle)
            except TimeoutError:
                await self.error(f"closed after {self.idle:g} s without a message; reload the page to go on")
                await self.ws.close(code=1000)
                return
            if message["type"] == "websocket.disconnect":
                return
            if not self.limit.take():
                now = time.monotonic()
                if now - self.last_limit_error > 1.0:  # one line a second at most, not one per dropped message
                    self.last_limit_error = now
                    await self.error(f"rate limit: at most {RATE:g} messages a second on one connection; message dropped")
                continue
            if message.get("bytes") is not None:
                self.seq += 1
                if self.slot is not None and self.slot[0] == "frame":
                    self.dropped += 1  # the waiting frame is older than this one: never computed
                self.slot = ("frame", self.seq, message["bytes"], time.monotonic())
                self.wake.set()
            elif message.get("text") is not None:
                await self.command(message["text"])

    async def command(self, text: str) -> None:
        if len(text) > MAX_COMMAND_BYTES:  # no command is this long; parsing it could recurse deep or convert for long
            await self.error(f"command over {MAX_COMMAND_BYTES} bytes; a command is a short JSON object with type layer, image, "
                             "unit, atlas or images")
            return
        try:
            cmd = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, a number beyond int's digit limit, nesting too deep
            cmd = None
        kind = cmd.get("type") if isinstance(cmd, dict) else None
        if kind == "layer":
            layer = cmd.get("layer")
            engine = self.live.engine()
            if not isinstance(layer, str) or layer not in engine.layers:
                await self.error(f"unknown layer {str(layer)[:80]!r}; the live page offers {', '.join(engine.layers)}")
                return
            self.layer = layer
            if self.slot is None and self.current is not None:
                self.slot = ("again",)
            self.wake.set()
        elif kind == "image":
            index = cmd.get("index")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.live.engine().image_count:
                await self.error(f"no image {str(index)[:20]} in this run (0 .. {self.live.engine().image_count - 1})")
                return
            self.slot = ("image", index)
            self.wake.set()
        elif kind == "unit":
            channel = cmd.get("channel")
            if isinstance(channel, bool) or not isinstance(channel, int) or channel < 0:
                await self.error("unit: channel must be a channel number")
                return
            self.unit = channel
            self.wake.set()
        elif kind == "atlas":
            pair = (cmd.get("layer"), cmd.get("atlas"))
            if not any((a["layer"], a["atlas"]) == pair for a in self.live.engine().atlases()):
                await self.error(f"atlas: the run has no rendered atlas {str(pair[0])[:60]}/{str(pair[1])[:60]}")
                return
            self.atlas = pair
            self.wake.set()
        elif kind == "images":
            await self.send_json({"type": "images", "images": self.live.engine().image_names()})
        else:
            await self.error("unknown command; expected a JSON object with type layer, image, unit, atlas or images, "
                             "or a binary image frame")

    async def work(self) -> None:
        """Answer the newest job, then the newest projection and atlas requests, until the connection ends."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            job, self.slot = self.slot, None
            unit, self.unit = self.unit, None
            on_atlas, self.atlas = self.atlas, None
            layer = self.layer
            try:
                if job is not None:
                    await self.compute(job, layer)
                if unit is not None and self.current is not None:
                    frame, done_layer = self.current[0], self.current[1]
                    data = await self.live.call("projection", frame, done_layer, unit)
                    await self.send_bytes(data)
                if on_atlas is not None and self.current is not None:
                    await self.send_json(await self.live.call("on_atlas", self.current[0], *on_atlas))
            except AtlasError as exc:  # FrameError included: one line back, the connection stays
                await self.error(str(exc))
            except (WebSocketDisconnect, OSError):
                return
            except Exception as exc:  # noqa: BLE001 - a bug must not end the connection's worker silently
                if WebSocketState.CONNECTED != self.ws.application_state or WebSocketState.CONNECTED != self.ws.client_state:
                    return  # the connection went away while a message was being sent
                message = f"the live computation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                log.warning(message)
                try:
                    await self.error(message)
                except (WebSocketDisconnect, OSError, RuntimeError):  # the connection is gone too
                    return
            if self.slot is not None or self.unit is not None or self.atlas is not None:
                self.wake.set()

    async def compute(self, job: tuple, layer: str) -> None:
        kind = job[0]
        if kind == "frame":
            _, seq, data, received = job
            frame = await self.live.call("decode", data)
        elif kind == "image":
            seq, received = self.seq, time.monotonic()
            frame = await self.live.call("run_image", job[1])
            await self.send_bytes(await self.live.call("picture", frame))
        else:  # the layer changed: the same frame again
            frame, seq, received = self.current[0], self.current[2], time.monotonic()
        dropped = self.dropped
        data = await self.live.call("result", frame, layer, seq=seq, dropped=dropped,
                                   queued_ms=round((time.monotonic() - received) * 1000, 1))
        self.current = (frame, layer, seq)
        await self.send_bytes(data)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------
class _HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head: ``timeout`` seconds from the connection (or
    the end of the previous response) to a complete head, however slowly the bytes arrive; then the connection is
    closed. Bytes that complete a head cancel it; a WebSocket upgrade leaves this protocol and the deadline.

    Kept because neither uvicorn nor Starlette has such a deadline: uvicorn arms its keep-alive timer only after a
    response and restarts it on every byte, so with its plain h11 protocol an idle connection, a half-sent head and
    a client dripping a byte every 0.25 s all stay open (test_idle_and_half_sent_connections_are_closed_while_others_are_served
    fails). The ASGI application cannot do it: it is called only once a head is complete.
    """

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a head arrived (or the upgrade took the connection)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's head has the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class AtlasServer:
    """uvicorn serving :class:`AtlasApp` on a socket bound at construction (so connections queue before it runs).

    The interface of the stdlib server it replaced: ``serve_forever()`` (blocks), ``shutdown()`` (from another
    thread; returns once it stopped), ``server_close()``, ``server_address``, ``server_port``.
    """

    def __init__(self, app: AtlasApp, sock: socket.socket, timeout: float, quiet: bool) -> None:
        import uvicorn

        self.app, self.socket = app, sock
        self.server_address = sock.getsockname()
        self.server_port = int(self.server_address[1])
        config = uvicorn.Config(app, http=_HeadDeadline, ws="websockets-sansio", lifespan="off", log_config=None,
                                log_level=logging.INFO if not quiet else logging.CRITICAL, access_log=not quiet,
                                server_header=False, date_header=False, timeout_keep_alive=float(timeout),
                                timeout_graceful_shutdown=1, backlog=BACKLOG, ws_max_size=WS_MAX_SIZE, ws_ping_interval=None)
        if not quiet:
            for name in ("uvicorn.error", "uvicorn.access"):
                logger = logging.getLogger(name)
                if not logger.handlers:
                    logger.addHandler(logging.StreamHandler(sys.stderr))
        self._server = uvicorn.Server(config)
        self._done = threading.Event()
        self._started = False

    def serve_forever(self) -> None:
        self._started = True
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self._server.should_exit = True
        if self._started:
            self._done.wait(15)

    def server_close(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(OSError):
            self.socket.close()
        self.app.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OverflowError:
        sock.close()
        raise AtlasError(f"--port must be between 0 and 65535 (0 picks a free port), got {port}") from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AtlasError(f"cannot listen on {host}:{port}: port {port} is already in use "
                             f"(another `atlas serve`?); pick another with --port, or --port 0 for a free one") from None
        raise AtlasError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


_ABSOLUTE = re.compile(r"(?<![\w.~])(?:/[^\s'\"/:]+)+/?")


def page_text(message: str, run_dir: Path) -> str:
    """``message`` with no path of this machine in it, for the page: the run folder (and anything under it) becomes
    "the run" (or the path inside it), any other absolute path its last name. A client sees what went wrong, never
    where the server keeps its files."""
    for root in {str(run_dir), str(Path(run_dir).resolve())}:
        message = message.replace(root + "/", "").replace(root, "the run")

    def name(match: re.Match) -> str:
        return Path(match.group(0).rstrip("/")).name or "/"

    return _ABSOLUTE.sub(name, message)


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True,
                timeout: float = TIMEOUT, allow_hosts: Iterable[str] = ()) -> AtlasServer:
    """The server for the run's ``tiles/`` folder and live page (port 0 picks a free port); the caller runs it.

    ``timeout`` bounds how long a connection may take to send a request head; ``allow_hosts`` adds Host names the
    server answers to besides the loopback names and ``host`` (for a server bound to 0.0.0.0 and reached by this
    machine's name). Every check (port, tiles, viewer files, the address) comes before the socket is bound; nothing is
    written into the run (its pages and OpenSeadragon are served from the package), so a read-only run is served.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AtlasError(f"--port must be between 0 and 65535 (0 picks a free port), got {port}")
    if not timeout > 0:
        raise AtlasError(f"the server's timeout must be positive, got {timeout}")
    run_dir = Path(run_dir).resolve()
    if not any((run_dir / SERVED / name).is_file() for name in ("atlases.json", UNITS_MANIFEST, CONCEPTS_MANIFEST)):
        raise AtlasError(f"no tiles in {run_dir}; run `atlas tiles {run_dir} --layer LAYER` (or `atlas units {run_dir}`, "
                         f"`atlas concepts {run_dir} --layer LAYER`) first")
    require_viewer_assets()
    missing = [name for name in LIVE_FILES if not (STATIC / name).is_file()]
    if missing:
        raise AtlasError(f"the live page's {', '.join(missing)} missing from {STATIC}; reinstall atlas")
    sock = _bind(host, port)
    try:
        names = {n.lower().strip("[]") for n in (*LOOPBACK_NAMES, host, *allow_hosts)}
        app = AtlasApp(run_dir, int(sock.getsockname()[1]), names, quiet)
        return AtlasServer(app, sock, timeout, quiet)
    except BaseException:
        sock.close()
        raise


class _Stdio(logging.StreamHandler):
    """A handler writing to ``sys.stdout`` or ``sys.stderr`` as they are when a line is written (not when it was made)."""

    def __init__(self, name: str) -> None:
        self._which = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._which)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler's constructor sets one; the lookup above stays
        pass


class _CommandLineFormat(logging.Formatter):
    """Status lines as they are; warnings in the command line's one-line form, ``atlas: warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"atlas: warning: {text}" if record.levelno >= logging.WARNING else text


def _default_handlers() -> None:
    """Give :data:`log` the command line's handlers (status lines to stdout, warnings to stderr) unless the
    application gave it handlers of its own; then its lines go only there (``propagate`` off, no doubled lines)."""
    if log.handlers:
        return
    out, err = _Stdio("stdout"), _Stdio("stderr")
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_CommandLineFormat())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True, allow_hosts: Iterable[str] = ()) -> None:
    """Serve the run's viewer, gallery and live page until interrupted, after printing their URLs.

    The first line (the viewer's URL, or the gallery's for a run without an atlas) is printed to stdout as it is;
    the other status lines and the warnings go through the ``atlas.server`` logger, which prints them the same way
    (stdout; stderr as ``atlas: warning: ...``) unless the application has given that logger handlers of its own.
    """
    server = make_server(run_dir, host, port, quiet, allow_hosts=allow_hosts)
    _default_handlers()
    tiles_dir = Path(run_dir) / SERVED
    atlas_url = url_of(server)
    base = atlas_url.rsplit("/", 1)[0]
    if (tiles_dir / "atlases.json").is_file():
        print(f"atlas viewer: {atlas_url}  (Ctrl-C to stop)", flush=True)
        if (tiles_dir / UNITS_MANIFEST).is_file():
            log.info(f"unit gallery: {base}/units.html")
    else:  # a run with the unit lens and no atlas yet
        print(f"unit gallery: {base}/units.html  (Ctrl-C to stop)", flush=True)
    log.info(f"live page: {base}/live.html")
    if host not in LOOPBACK_NAMES:
        log.warning(f"listening on {host}, other machines can read this run's tiles")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
