"""The browser viewer: static files beside the tiles, and a small local web server for them.

The viewer (``atlas/viewer_static``) is plain HTML/JS on top of OpenSeadragon, which is
installed from npm at the version pinned in the repository's ``package.json`` and copied
into ``RUN/tiles/openseadragon/`` (never vendored into the repository). It is looked up in
``$ATLAS_OPENSEADRAGON`` (a folder holding ``openseadragon.min.js``), then in the installed
package (``atlas/viewer_static/openseadragon``, which a built wheel carries: setup.py copies it
there from npm at build time), then in ``node_modules/openseadragon/build/openseadragon`` of the
repository and of the working folder.

``serve`` is a stdlib HTTP server that only ever answers with files inside the run folder.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import sys
import urllib.parse
from pathlib import Path

from atlas.errors import AtlasError

STATIC = Path(__file__).with_name("viewer_static")
REPO = Path(__file__).resolve().parents[1]
OSD_VERSION = "5.0.1"
OSD_SUBDIR = Path("node_modules/openseadragon/build/openseadragon")
VIEWER_FILES = ("index.html", "viewer.js", "viewer.css")


def find_openseadragon() -> Path:
    """The folder holding ``openseadragon.min.js`` and ``images/``, or a one-line error saying how to install it."""
    candidates = []
    env = os.environ.get("ATLAS_OPENSEADRAGON")
    if env:
        candidates.append(Path(env).expanduser())
    # the copy a built wheel carries (setup.py puts it there from npm), then node_modules of a checkout (editable install)
    candidates += [STATIC / "openseadragon", REPO / OSD_SUBDIR, Path.cwd() / OSD_SUBDIR]
    for folder in candidates:
        if (folder / "openseadragon.min.js").is_file():
            return folder
    where = f"ATLAS_OPENSEADRAGON={env} holds no openseadragon.min.js; " if env else ""
    raise AtlasError(f"{where}OpenSeadragon is not installed: run `npm ci` in {REPO} "
                     f"(or `npm install openseadragon@{OSD_VERSION}`), or set ATLAS_OPENSEADRAGON to its build folder")


def install_viewer(tiles_dir: str | Path) -> Path:
    """Copy the viewer and OpenSeadragon into ``tiles_dir`` (refreshing changed files); returns index.html."""
    tiles_dir = Path(tiles_dir)
    osd = find_openseadragon()
    tiles_dir.mkdir(parents=True, exist_ok=True)
    for name in VIEWER_FILES:
        _copy_if_changed(STATIC / name, tiles_dir / name)
    target = tiles_dir / "openseadragon"
    _copy_if_changed(osd / "openseadragon.min.js", target / "openseadragon.min.js")
    if (osd / "images").is_dir():
        for image in (osd / "images").iterdir():
            if image.is_file():
                _copy_if_changed(image, target / "images" / image.name)
    return tiles_dir / "index.html"


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


class RunFolderHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files of one folder: no directory listings, nothing outside it (symlinks included)."""

    root: Path = Path(".")
    quiet = True

    def translate_path(self, path: str) -> str:
        """Map the URL path into the root, or to an impossible path when it would leave the root."""
        raw = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        parts = [p for p in raw.replace("\\", "/").split("/") if p]
        if any(p in ("..", ".") or "\x00" in p for p in parts):
            return ""
        resolved = self.root.joinpath(*parts).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            return ""
        return str(resolved)

    def send_head(self):
        path = self.translate_path(self.path)
        if not path:
            self.send_error(403, "outside the run folder")
            return None
        if self.path.split("?")[0] in ("", "/"):
            self.send_response(302)
            self.send_header("Location", "/tiles/index.html")
            self.end_headers()
            return None
        if os.path.isdir(path):
            index = os.path.join(path, "index.html")
            if not os.path.isfile(index):
                self.send_error(404, "no listing")
                return None
        return super().send_head()

    def list_directory(self, path):  # never list folders
        self.send_error(404, "no listing")
        return None

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)


RunFolderHandler.extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".dzi": "application/xml",
                                   ".webp": "image/webp", ".js": "text/javascript", ".json": "application/json"}


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for the run folder (port 0 picks a free port); the caller runs it."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "tiles" / "atlases.json").is_file():
        raise AtlasError(f"no tiles in {run_dir}; run `atlas tiles {run_dir} --layer LAYER` first")
    install_viewer(run_dir / "tiles")
    handler = type("Handler", (RunFolderHandler,), {"root": run_dir, "quiet": quiet})
    try:
        server = http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(run_dir)))
    except OSError as exc:
        raise AtlasError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server.daemon_threads = True
    return server


def url_of(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}/tiles/index.html"


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True) -> None:
    """Serve the run folder until interrupted, after printing the viewer's URL."""
    server = make_server(run_dir, host, port, quiet)
    print(f"atlas viewer: {url_of(server)}  (Ctrl-C to stop)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"atlas: warning: listening on {host}, other machines can read this run folder", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
