"""The browser viewer: static files beside the tiles (served by :mod:`atlas.server`).

The viewer (``atlas/viewer_static``) is plain HTML/JS on top of OpenSeadragon, whose pinned release
(``OSD_VERSION``: its minified build, button images and BSD licence) ships inside the package in
``atlas/viewer_static/openseadragon`` and is copied into ``RUN/tiles/openseadragon/`` beside the tiles, so
``pip install``, an editable install and the wheel all serve the viewer with nothing else installed.
``$ATLAS_OPENSEADRAGON``, when set, replaces that copy (a folder holding ``openseadragon.min.js``, or an npm
package folder holding ``build/openseadragon``; a user's own copy, and nothing else is tried then).
:func:`require_viewer_assets` checks this before any work, so ``atlas build``/``tiles``/
``class``/``compare``/``serve`` fail at once, in one line.

Once a unit gallery exists (``tiles/units.json``, written by :mod:`atlas.units.gallery`), :func:`install_viewer` also
copies the gallery's pages (``units.html``, ``units.js``, ``units.css``) and ``atlas_units.js``, and the atlas page
loads the latter after ``viewer.js`` (the bar's Units link, a cell's top units, the ``?unit=`` veil). Likewise, once
an inspect report is listed (``tiles/inspect.json``, :mod:`atlas.inspect`), ``atlas_inspect.js`` is copied and loaded
after them (``index.html?inspect=NAME``: the image's positions as dots over the atlas). Without either the viewer's
files are copied unchanged.

``atlas serve`` itself is :mod:`atlas.server` (an ASGI application on uvicorn: these files, the tiles, and the live
page's WebSocket); its rules (only ``tiles/`` is served, the Host check, the request-head deadline) are documented
there. :func:`split_host` and :func:`url_of` stay here for it and for the tests.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from atlas.errors import AtlasError

STATIC = Path(__file__).with_name("viewer_static")
OSD_VERSION = "5.0.1"  # the release vendored in viewer_static/openseadragon (its README says where it came from)
VIEWER_FILES = ("index.html", "viewer.js", "viewer.css")
# The unit gallery's pages (atlas.units.gallery), installed once a gallery exists (``tiles/units.json``); the atlas
# page then also loads atlas_units.js (menu link, cell -> units, ?unit= veil). Without a gallery the viewer's files
# are installed byte for byte as they are, so a run without units has exactly the tiles it had before.
GALLERY_FILES = ("units.html", "units.js", "units.css", "atlas_units.js")
UNITS_MANIFEST = "units.json"
# Once an inspect report is listed (``tiles/inspect.json``, atlas.inspect), the atlas page also loads atlas_inspect.js:
# ``index.html?inspect=NAME`` draws that report's image positions over the atlas. Both add-ons compose.
INSPECT_FILES = ("atlas_inspect.js",)
# Once a layer has a concepts panel (``tiles/concepts.json``, atlas.concepts), the atlas page also loads
# atlas_concepts.js: a "Concepts" link in the bar to that layer's panel.
CONCEPTS_FILES = ("atlas_concepts.js",)
CONCEPTS_MANIFEST = "concepts.json"
INSPECT_MANIFEST = "inspect.json"
# Once a side-by-side view is listed (``tiles/layers.json``, atlas.layers), the layers page is installed too.
LAYERS_FILES = ("layers.html", "layers.js", "layers.css")
LAYERS_MANIFEST = "layers.json"

SERVED = "tiles"  # the only folder of a run the server exposes, at /tiles/
TIMEOUT = 15.0  # seconds a connection may take to send its request head (atlas.server)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def find_openseadragon() -> Path:
    """The folder holding ``openseadragon.min.js`` and ``images/``: ``$ATLAS_OPENSEADRAGON``, else the package's own copy.

    Returns
    -------
    pathlib.Path
        The folder to copy OpenSeadragon from.

    Raises
    ------
    AtlasError
        One line when ``$ATLAS_OPENSEADRAGON`` names a folder without ``openseadragon.min.js``, or when the
        package's copy is missing (a broken install), saying what to do.
    """
    env = os.environ.get("ATLAS_OPENSEADRAGON")
    if env:  # the user's own copy: authoritative, a wrong folder is an error rather than a silent fallback
        given = Path(env).expanduser()
        for folder in (given, given / "build" / "openseadragon"):
            if (folder / "openseadragon.min.js").is_file():
                return folder
        raise AtlasError(f"ATLAS_OPENSEADRAGON={env} holds no openseadragon.min.js; point it at a folder holding OpenSeadragon's "
                         f"openseadragon.min.js and images/ (a release's build folder), or unset it to use the copy atlas ships "
                         f"(OpenSeadragon {OSD_VERSION})")
    shipped = STATIC / "openseadragon"
    if (shipped / "openseadragon.min.js").is_file():
        return shipped
    raise AtlasError(f"OpenSeadragon {OSD_VERSION}, which atlas ships for its viewer, is missing from {shipped}: reinstall "
                     f"atlas (pip install --force-reinstall activation-atlas), or set ATLAS_OPENSEADRAGON=DIR to a folder holding "
                     f"openseadragon.min.js")


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
    inspect = (tiles_dir / INSPECT_MANIFEST).is_file()
    for name in VIEWER_FILES:
        if not (addon_scripts(tiles_dir) and name == "index.html"):  # with an add-on, _write_atlas_page writes the atlas page
            _copy_if_changed(STATIC / name, tiles_dir / name)
    if gallery:
        _install_gallery(tiles_dir)
    if inspect:
        _install_files(tiles_dir, INSPECT_FILES, "the inspect overlay's")
    if (tiles_dir / LAYERS_MANIFEST).is_file():
        _install_files(tiles_dir, LAYERS_FILES, "the side-by-side page's")
    concepts = (tiles_dir / CONCEPTS_MANIFEST).is_file()
    if concepts:
        _install_files(tiles_dir, CONCEPTS_FILES, "the concepts link's")
    if gallery or inspect or concepts:
        _write_atlas_page(tiles_dir)
    target = tiles_dir / "openseadragon"
    _copy_if_changed(osd / "openseadragon.min.js", target / "openseadragon.min.js")
    if (osd / "images").is_dir():
        for image in (osd / "images").iterdir():
            if image.is_file():
                _copy_if_changed(image, target / "images" / image.name)
    return tiles_dir / "index.html"


def _install_gallery(tiles_dir: Path) -> None:
    """The gallery's pages (the atlas page loading atlas_units.js is written by :func:`_write_atlas_page`)."""
    _install_files(tiles_dir, GALLERY_FILES, "the unit gallery's")


def _install_files(tiles_dir: Path, names: Iterable[str], what: str) -> None:
    missing = [name for name in names if not (STATIC / name).is_file()]
    if missing:
        raise AtlasError(f"{what} {', '.join(missing)} missing from {STATIC}; reinstall atlas")
    for name in names:
        _copy_if_changed(STATIC / name, tiles_dir / name)


def addon_scripts(tiles_dir: Path) -> list[str]:
    """The add-ons the atlas page loads after viewer.js, in this order: those whose manifest the tiles folder holds."""
    return [name for name, manifest in (("atlas_units.js", UNITS_MANIFEST), ("atlas_inspect.js", INSPECT_MANIFEST),
                                        ("atlas_concepts.js", CONCEPTS_MANIFEST)) if (Path(tiles_dir) / manifest).is_file()]


def atlas_page(tiles_dir: str | Path) -> str:
    """The atlas page for ``tiles_dir``: the package's index.html loading the add-ons of :func:`addon_scripts`."""
    html = (STATIC / "index.html").read_text()
    marker = '<script src="viewer.js"></script>'
    if marker not in html:
        raise AtlasError(f"{STATIC / 'index.html'} does not load viewer.js; reinstall atlas")
    return html.replace(marker, marker + "".join(f'\n  <script src="{name}"></script>' for name in addon_scripts(Path(tiles_dir))))


def _write_atlas_page(tiles_dir: Path) -> None:
    """Write :func:`atlas_page` as ``tiles_dir/index.html`` (atomically, only when it changed)."""
    page = atlas_page(tiles_dir)
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


def url_of(server) -> str:
    """The atlas viewer's URL on a server from :func:`atlas.server.make_server` (its ``server_address``)."""
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}/{SERVED}/index.html"
