"""The browser viewer: static files beside the tiles, and a small local web server for them.

The viewer (``atlas/viewer_static``) is plain HTML/JS on top of OpenSeadragon, which is
installed from npm at the version pinned in the repository's ``package.json`` and copied
into ``RUN/tiles/openseadragon/`` (never vendored into the repository). It is looked up in
``$ATLAS_OPENSEADRAGON`` when that is set (a folder holding ``openseadragon.min.js``, or the
npm package folder holding ``build/openseadragon``; a user's own copy, and nothing else is
tried then), otherwise in the installed package (``atlas/viewer_static/openseadragon``, which
a built wheel carries: setup.py copies it there from npm at build time), then in
``node_modules/openseadragon/build/openseadragon`` of the repository and of the working folder.
:func:`require_viewer_assets` checks this before any work, so ``atlas build``/``tiles``/
``class``/``compare``/``serve`` fail at once, in one line.

Once a unit gallery exists (``tiles/units.json``, written by :mod:`atlas.units.gallery`), :func:`install_viewer` also
copies the gallery's pages (``units.html``, ``units.js``, ``units.css``) and ``atlas_units.js``, and the atlas page
loads the latter after ``viewer.js`` (the bar's Units link, a cell's top units, the ``?unit=`` veil); without one
the viewer's files are copied unchanged.

``serve`` answers only with files under ``RUN/tiles/`` (the viewer, OpenSeadragon and the
tiles); ``store.zarr`` and ``log.txt``, which hold absolute paths, are never served, nor is
anything a path or symlink would reach outside ``tiles/`` (404). It is the standard
library's threaded HTTP server, hardened for a browser's burst of tile requests and for
clients that never finish:

- listen backlog of 1024 (the stdlib default of 5 drops SYNs in a burst of parallel tile
  requests; the client retries after 1, 3, 7, 15 s);
- a thread per connection (daemon threads) and HTTP/1.0 (one request per connection);
- a connection that stalls on any read or write for ``timeout`` seconds, or has not sent a
  complete request head within ``timeout`` seconds of connecting (a client dripping one
  byte at a time), is closed;
- the ``Host`` header must name this server (localhost, 127.0.0.1, [::1], the bound
  address, the address the connection arrived on, or an ``allow_hosts`` name) with its
  port; anything else is refused with 403, so a DNS-rebinding page cannot read the run.

Why not Starlette/uvicorn: they would add two dependencies for a static-file server, and
uvicorn has no deadline for receiving a request head (its keep-alive timeout restarts on
every byte; the request-start timeout of encode/uvicorn#157 is not implemented), so the
same watchdog would have to be written on top of it; the threaded stdlib server needs
only a socket timeout and a deadline check in its serve loop.
"""

from __future__ import annotations

import errno
import functools
import http.server
import json
import os
import shutil
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from atlas.errors import AtlasError

STATIC = Path(__file__).with_name("viewer_static")
REPO = Path(__file__).resolve().parents[1]
OSD_VERSION = "5.0.1"
OSD_SUBDIR = Path("node_modules/openseadragon/build/openseadragon")
VIEWER_FILES = ("index.html", "viewer.js", "viewer.css")
# The unit gallery's pages (atlas.units.gallery), installed once a gallery exists (``tiles/units.json``); the atlas
# page then also loads atlas_units.js (menu link, cell -> units, ?unit= veil). Without a gallery the viewer's files
# are installed byte for byte as they are, so a run without units has exactly the tiles it had before.
GALLERY_FILES = ("units.html", "units.js", "units.css", "atlas_units.js")
UNITS_MANIFEST = "units.json"

SERVED = "tiles"  # the only folder of a run the server exposes, at /tiles/
TIMEOUT = 15.0  # seconds a connection may stall, or take to send its request head
BACKLOG = 1024  # listen queue; the kernel caps it at net.core.somaxconn
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def find_openseadragon() -> Path:
    """The folder holding ``openseadragon.min.js`` and ``images/``, or a one-line error saying how to install it."""
    env = os.environ.get("ATLAS_OPENSEADRAGON")
    if env:  # the user's own copy: authoritative, a wrong folder is an error rather than a silent fallback
        given = Path(env).expanduser()
        for folder in (given, given / "build" / "openseadragon"):
            if (folder / "openseadragon.min.js").is_file():
                return folder
        raise AtlasError(f"ATLAS_OPENSEADRAGON={env} holds no openseadragon.min.js; point it at OpenSeadragon's build folder "
                         f"(node_modules/openseadragon/build/openseadragon, from `npm ci` in the atlas checkout or "
                         f"`npm install openseadragon@{OSD_VERSION}`) or unset it")
    # the copy a built wheel carries (setup.py puts it there from npm), then node_modules of a checkout (editable install)
    candidates = [STATIC / "openseadragon", REPO / OSD_SUBDIR, Path.cwd() / OSD_SUBDIR]
    for folder in candidates:
        if (folder / "openseadragon.min.js").is_file():
            return folder
    raise AtlasError(f"OpenSeadragon is not installed: run `npm ci` in the atlas checkout ({REPO}) "
                     f"(or `npm install openseadragon@{OSD_VERSION}`), install atlas from a wheel (which bundles it), "
                     f"or set ATLAS_OPENSEADRAGON=DIR to a folder holding openseadragon.min.js")


def require_viewer_assets() -> Path:
    """Check that the viewer can be installed (its own files and OpenSeadragon); returns OpenSeadragon's folder.

    Called before any work by every command that ends by writing or serving the viewer,
    so a missing OpenSeadragon is one line at the start rather than an error after hours.
    """
    missing = [name for name in VIEWER_FILES if not (STATIC / name).is_file()]
    if missing:
        raise AtlasError(f"the viewer's {', '.join(missing)} missing from {STATIC}; reinstall atlas")
    return find_openseadragon()


def install_viewer(tiles_dir: str | Path) -> Path:
    """Copy the viewer and OpenSeadragon into ``tiles_dir`` (refreshing changed files); returns index.html."""
    tiles_dir = Path(tiles_dir)
    osd = require_viewer_assets()
    tiles_dir.mkdir(parents=True, exist_ok=True)
    gallery = (tiles_dir / UNITS_MANIFEST).is_file()
    for name in VIEWER_FILES:
        if not (gallery and name == "index.html"):  # with a gallery, _install_gallery writes the atlas page
            _copy_if_changed(STATIC / name, tiles_dir / name)
    if gallery:
        _install_gallery(tiles_dir)
    target = tiles_dir / "openseadragon"
    _copy_if_changed(osd / "openseadragon.min.js", target / "openseadragon.min.js")
    if (osd / "images").is_dir():
        for image in (osd / "images").iterdir():
            if image.is_file():
                _copy_if_changed(image, target / "images" / image.name)
    return tiles_dir / "index.html"


def _install_gallery(tiles_dir: Path) -> None:
    """The gallery's pages, and the atlas page with atlas_units.js loaded after viewer.js."""
    missing = [name for name in GALLERY_FILES if not (STATIC / name).is_file()]
    if missing:
        raise AtlasError(f"the unit gallery's {', '.join(missing)} missing from {STATIC}; reinstall atlas")
    for name in GALLERY_FILES:
        _copy_if_changed(STATIC / name, tiles_dir / name)
    html = (STATIC / "index.html").read_text()
    marker = '<script src="viewer.js"></script>'
    if marker not in html:
        raise AtlasError(f"{STATIC / 'index.html'} does not load viewer.js; reinstall atlas")
    page = html.replace(marker, marker + '\n  <script src="atlas_units.js"></script>')
    index = tiles_dir / "index.html"
    if not index.is_file() or index.read_text() != page:
        tmp = index.with_name("index.html.tmp")
        tmp.write_text(page)
        os.replace(tmp, index)


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------
def swap_folder(work: Path, final: Path) -> None:
    """Put the finished folder ``work`` in place of ``final``: the old one stays until the new one is complete, so a
    failed run leaves only its own ``.partial`` folder (``final.old``, when a kill leaves it, is put back by
    ``store.cleanup_partials``)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def update_listing(path: Path, key: str, entry: dict, replaces, keep, order) -> list[dict]:
    """Insert ``entry`` into the JSON listing ``path`` (``{"version": 1, key: [...]}``, e.g. ``atlases.json``),
    written atomically: entries for which ``replaces(old)`` is true, or ``keep(old)`` false (their files are gone),
    are dropped; the list is sorted by ``order``. An unreadable listing starts afresh. Returns the new list."""
    items = []
    if path.is_file():
        try:
            items = json.loads(path.read_text()).get(key, [])
        except (json.JSONDecodeError, AttributeError):
            items = []
    items = [x for x in items if isinstance(x, dict) and not replaces(x) and keep(x)]
    items.append(entry)
    items.sort(key=order)
    tmp = path.with_suffix(".tmp")  # removed by store.cleanup_partials if a kill leaves it
    tmp.write_text(json.dumps({"version": 1, key: items}, indent=1))
    os.replace(tmp, path)
    return items


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host header value (lower-cased, IPv6 without brackets), or None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
    elif value.count(":") > 1:  # a bare IPv6 address is not a valid Host
        return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if not name:
        return None
    if not rest:
        return name, None
    if not rest.startswith(":") or not rest[1:].isdigit() or not rest[1:].isascii():
        return None
    return name, int(rest[1:])


class RunFolderHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the files under one run's ``tiles/`` at ``/tiles/``: no listings, nothing outside it (symlinks included)."""

    root: Path = Path(".")  # the resolved tiles folder
    quiet = True
    timeout = TIMEOUT  # StreamRequestHandler.setup sets it on the socket: no read or write may stall longer
    server: AtlasServer
    expired = False

    def setup(self) -> None:
        super().setup()
        self.server.watch(self)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.unwatch(self)  # the head arrived: from here on only the per-operation timeout applies
        if self.expired:  # cut off by the deadline: whatever was parsed is incomplete
            self.close_connection = True
            return False
        return ok

    def finish(self) -> None:
        self.server.unwatch(self)
        try:
            super().finish()
        except OSError:  # the client went away, or the deadline shut the socket
            pass

    def drop(self) -> None:
        """Close the connection from outside (the server's deadline); the handler's blocked read returns at once."""
        self.expired = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def translate_path(self, path: str) -> str:
        """The file a URL path names inside the tiles folder, or "" when it names nothing servable."""
        raw = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        parts = [p for p in raw.replace("\\", "/").split("/") if p]
        if not parts or parts[0] != SERVED or any(p in ("..", ".") or "\x00" in p for p in parts):
            return ""
        try:
            resolved = self.root.joinpath(*parts[1:]).resolve()
        except (OSError, RuntimeError, ValueError):  # symlink loops, over-long names
            return ""
        if resolved != self.root and self.root not in resolved.parents:
            return ""
        return str(resolved)

    def host_allowed(self) -> bool:
        """True when the one Host header names this server and its port (DNS-rebinding protection)."""
        values = self.headers.get_all("Host") or []
        parsed = split_host(values[0]) if len(values) == 1 else None
        if parsed is None:
            return False
        name, port = parsed
        if (port if port is not None else 80) != self.server.server_port:
            return False
        try:
            arrived_on = str(self.connection.getsockname()[0]).lower()
        except OSError:
            arrived_on = ""
        return name in self.server.allowed_names or name == arrived_on

    def send_head(self):
        if not self.host_allowed():
            self.send_error(403, "Host header does not name this server",
                            f"open http://127.0.0.1:{self.server.server_port}/{SERVED}/index.html; "
                            "other names need `atlas serve --allow-host NAME`")
            return None
        url_path = urllib.parse.urlsplit(self.path).path
        if url_path in ("", "/", f"/{SERVED}"):
            return self._redirect(f"/{SERVED}/index.html", 302)
        path = self.translate_path(self.path)
        if path and os.path.isdir(path):
            if not url_path.endswith("/"):  # relative to this server only (never the request's own netloc)
                return self._redirect(urllib.parse.quote(urllib.parse.unquote(url_path)) + "/", 301)
            path = os.path.join(path, "index.html")
        if not path or not os.path.isfile(path):  # also FIFOs and devices, which would block or stream forever
            self.send_error(404, "not found")
            return None
        return super().send_head()

    def _redirect(self, location: str, code: int) -> None:
        self.send_response(code)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def list_directory(self, path):  # never list folders
        self.send_error(404, "not found")
        return None

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)


RunFolderHandler.extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".dzi": "application/xml",
                                   ".webp": "image/webp", ".js": "text/javascript", ".json": "application/json"}


class AtlasServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a deep listen queue, daemon threads and a deadline for request heads."""

    daemon_threads = True
    block_on_close = False  # server_close must not wait for clients that hold connections open
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], handler, timeout: float = TIMEOUT, allowed_names: Iterable[str] = ()) -> None:
        self.head_timeout = float(timeout)
        self.allowed_names = {n.lower().strip("[]") for n in (*LOOPBACK_NAMES, address[0], *allowed_names)}
        self._pending: dict[RunFolderHandler, float] = {}
        self._lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also calls socket.getfqdn(), a reverse DNS lookup that can hang offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def watch(self, handler: RunFolderHandler) -> None:
        with self._lock:
            self._pending[handler] = time.monotonic() + self.head_timeout

    def unwatch(self, handler: RunFolderHandler) -> None:
        with self._lock:
            self._pending.pop(handler, None)

    def service_actions(self) -> None:
        """Run by serve_forever at least every poll interval (0.5 s): cut connections past their head deadline."""
        super().service_actions()
        now = time.monotonic()
        with self._lock:
            late = [h for h, deadline in self._pending.items() if deadline <= now]
            for h in late:
                del self._pending[h]
        for h in late:
            h.drop()

    def handle_error(self, request, client_address) -> None:
        """A client that vanished mid-response is normal; anything else is one line, never a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        print(f"atlas: warning: request from {client_address[0]} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True,
                timeout: float = TIMEOUT, allow_hosts: Iterable[str] = ()) -> AtlasServer:
    """A threaded HTTP server for the run's ``tiles/`` folder (port 0 picks a free port); the caller runs it.

    ``timeout`` bounds how long a connection may stall or take to send its request;
    ``allow_hosts`` adds Host names the server answers to besides the loopback names and
    ``host`` (for a server bound to 0.0.0.0 and reached by this machine's name).
    Every check (port, tiles, viewer files, the address) comes before anything is written.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AtlasError(f"--port must be between 0 and 65535 (0 picks a free port), got {port}")
    if not timeout > 0:
        raise AtlasError(f"the server's timeout must be positive, got {timeout}")
    run_dir = Path(run_dir).resolve()
    if not any((run_dir / SERVED / name).is_file() for name in ("atlases.json", UNITS_MANIFEST)):
        raise AtlasError(f"no tiles in {run_dir}; run `atlas tiles {run_dir} --layer LAYER` (or `atlas units {run_dir}`) first")
    require_viewer_assets()
    tiles_dir = (run_dir / SERVED).resolve()
    handler = type("Handler", (RunFolderHandler,), {"root": tiles_dir, "quiet": quiet, "timeout": float(timeout)})
    try:
        server = AtlasServer((host, port), functools.partial(handler, directory=str(tiles_dir)), timeout, allow_hosts)
    except OverflowError:
        raise AtlasError(f"--port must be between 0 and 65535 (0 picks a free port), got {port}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AtlasError(f"cannot listen on {host}:{port}: port {port} is already in use "
                             f"(another `atlas serve`?); pick another with --port, or --port 0 for a free one") from None
        raise AtlasError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        install_viewer(tiles_dir)
    except BaseException:
        server.server_close()
        raise
    return server


def url_of(server: http.server.HTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}/{SERVED}/index.html"


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True, allow_hosts: Iterable[str] = ()) -> None:
    """Serve the run's viewer and tiles until interrupted, after printing the viewer's URL."""
    server = make_server(run_dir, host, port, quiet, allow_hosts=allow_hosts)
    tiles_dir = Path(run_dir) / SERVED
    atlas_url, gallery_url = url_of(server), url_of(server).rsplit("/", 1)[0] + "/units.html"
    if (tiles_dir / "atlases.json").is_file():
        print(f"atlas viewer: {atlas_url}  (Ctrl-C to stop)", flush=True)
        if (tiles_dir / UNITS_MANIFEST).is_file():
            print(f"unit gallery: {gallery_url}", flush=True)
    else:  # a run with the unit lens and no atlas yet
        print(f"unit gallery: {gallery_url}  (Ctrl-C to stop)", flush=True)
    if host not in LOOPBACK_NAMES:
        print(f"atlas: warning: listening on {host}, other machines can read this run's tiles", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
