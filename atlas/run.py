"""A run folder as a Python object: :class:`Run` (``atlas.open_run(path)``) and :func:`build_run` (``atlas.build``).

The store (``RUN/store.zarr``, docs/architecture.md) is how the stages talk to each other; a notebook reads a run
through :class:`Run` instead, whose methods return plain numpy arrays and PIL images, verified against the store's
seals like every stage's reads. ``Run.show()`` starts the viewer of ``atlas serve`` on a free local port in a
background thread and returns an inline frame for Jupyter; a bare ``run`` in a cell shows a summary and the icon
sheet with no server. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import html
import io
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from atlas import store
from atlas.errors import AtlasError

__all__ = ["Layout", "Run", "Samples", "Viewer", "build_run", "open_run"]

# The tables `atlas build` reads, in the order a bare setting name is looked up in (``max_images`` -> sample).
BUILD_TABLES = ("run", "sample", "project", "grid", "render", "tiles")
REPR_PIXELS = 480  # the summary's inline sheet is at most this wide (the icons are downscaled to fit)
REPR_GRID = 40  # ... and shows the finest grid up to this size


class Layout(NamedTuple):
    """The 2-D layout of an atlas: ``xy`` (M, 2) float32 in [0, 1] (x to the right, y downwards), ``rows`` (M,) int64
    (the sample rows laid out, as :meth:`Run.samples` numbers them) and ``inside`` (M,) bool (False where the point
    fell outside the 1st-99th percentile clip and was put on the edge)."""

    xy: np.ndarray
    rows: np.ndarray
    inside: np.ndarray


class Samples(NamedTuple):
    """Sampled activations of one layer, one row per sample: ``rows`` (N,) int64 (the sample's row in the run),
    ``activations`` (N, C) float32, ``image_index`` (N,) int32 (into :attr:`Run.images`), ``position`` (N, 2) int16
    ((y, x) in the layer's grid of positions) and ``attributions`` (N, K) float32 (to each of the K classes), or None
    when the run was sampled without attribution."""

    rows: np.ndarray
    activations: np.ndarray
    image_index: np.ndarray
    position: np.ndarray
    attributions: np.ndarray | None


class Viewer:
    """The viewer of a run served on this machine: ``url``; shown inline by Jupyter as an iframe; ``stop()`` ends it.

    The iframe points at ``127.0.0.1``, so it shows where the browser runs on the same machine as the Python
    kernel (a local Jupyter); elsewhere open the run with ``atlas serve`` behind an SSH tunnel.
    """

    def __init__(self, url: str, width: str = "100%", height: int = 600, stop: Callable[[], None] | None = None) -> None:
        self.url, self.width, self.height, self._stop = url, width, height, stop

    def _repr_html_(self) -> str:
        src = html.escape(self.url, quote=True)
        return (f'<iframe src="{src}" width="{html.escape(str(self.width), quote=True)}" height="{int(self.height)}" '
                f'style="border: 1px solid #ccc" allowfullscreen></iframe>'
                f'<div style="font-size: smaller"><a href="{src}" target="_blank">{html.escape(self.url)}</a></div>')

    def __repr__(self) -> str:
        return f"Viewer({self.url!r})"

    def stop(self) -> None:
        """Stop the server behind this view (the run's server: every view of the run stops)."""
        if self._stop is not None:
            self._stop()


def _stop_server(server) -> None:
    """Shut a viewer server down (from :meth:`Run.stop`, the garbage collector or at exit); idempotent."""
    try:
        server.shutdown()
    finally:
        server.server_close()


def _runs_under(folder: Path) -> list[str]:
    """Names of the run folders directly inside ``folder`` (for the error naming what exists)."""
    try:
        return sorted(p.name for p in folder.iterdir() if (p / store.STORE_NAME / "zarr.json").is_file())
    except OSError:
        return []


class Run:
    """A run folder (written by ``atlas build`` or its stages), read through plain arrays and images.

    Parameters
    ----------
    path : str or Path
        The run folder: the one holding ``store.zarr``.

    Attributes
    ----------
    path : Path
        The run folder, absolute.

    Raises
    ------
    AtlasError
        If ``path`` is not a run folder (the message names the runs inside it, if any).

    Examples
    --------
    >>> run = atlas.open_run("runs/demo")
    >>> run.layers
    ['mixed4c']
    >>> run.sheet("mixed4c", 20)        # a PIL image of the 20 x 20 grid's icons
    >>> run.show()                      # the zoomable viewer, inline in Jupyter
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise AtlasError(f"no run folder at {path}" + ("" if self.path.exists() else " (it does not exist)"))
        if not (self.path / store.STORE_NAME).exists():
            inside = _runs_under(self.path)
            hint = (f"runs inside it: {', '.join(inside)}" if inside
                    else "build one with atlas.build(images, out) or `atlas build --images DIR --out RUN`")
            raise AtlasError(f"{self.path} is not an atlas run (no {store.STORE_NAME}); {hint}")
        store.open_store(self.path)  # a damaged root is one line now, not at the first method
        self._server = None
        self._finalizer = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what the run holds
    def _root(self):
        return store.open_store(self.path)

    @property
    def layers(self) -> list[str]:
        """The sampled layers, sorted."""
        root = self._root()
        return sorted(root["samples"].group_keys()) if "samples" in root else []

    @property
    def images(self) -> list[Path]:
        """The run's image files, in the order of ``Samples.image_index``."""
        root = self._root()
        return [Path(p) for p in root["images/path"][:]] if "images/path" in root else []

    @property
    def classes(self) -> list[str]:
        """The model's class names, in the order of the attributions' columns and ``class_top`` indices."""
        return list(store.attrs(self._root()).get("classes") or [])

    def atlases(self, layer: str) -> list[str]:
        """The atlases laid out for ``layer`` (``"full"``, ``"class-snorkel"``, ...), sorted."""
        self._layer(layer)
        root = self._root()
        return sorted(root[f"layouts/{layer}"].group_keys()) if f"layouts/{layer}" in root else []

    def grids(self, layer: str, atlas: str = store.FULL_ATLAS) -> list[int]:
        """The grid sizes with rendered icons for ``layer``'s ``atlas``, ascending."""
        self._layer(layer)
        root = self._root()
        node = f"icons/{layer}/{atlas}"
        return sorted(int(s) for s in root[node].group_keys()) if node in root else []

    def info(self) -> dict:
        """What ``atlas info`` reports, as a JSON-able dict (schema in :mod:`atlas.info`)."""
        from atlas.info import info

        return info(self.path)

    def _layer(self, layer: str) -> None:
        layers = self.layers
        if layer not in layers:
            raise AtlasError(f"layer {layer!r} is not in the run {self.path}; its layers: {', '.join(layers) or 'none (not sampled yet)'}")

    def _atlas(self, layer: str, atlas: str) -> None:
        atlases = self.atlases(layer)
        if atlas not in atlases:
            raise AtlasError(f"atlas {atlas!r} of {layer} is not in the run {self.path}; its atlases: {', '.join(atlases) or 'none'}"
                             + ("" if atlases else f" (lay it out with atlas.project(run, {layer!r}))"))

    # ------------------------------------------------------------------ arrays
    def layout(self, layer: str, atlas: str = store.FULL_ATLAS) -> Layout:
        """The 2-D layout of ``layer``'s ``atlas``.

        Parameters
        ----------
        layer : str
            A sampled layer (:attr:`layers`).
        atlas : str, default "full"
            The whole-layer atlas, or a class or comparison atlas (:meth:`atlases`).

        Returns
        -------
        Layout
            ``xy`` (M, 2) float32 in [0, 1], ``rows`` (M,) int64 sample rows, ``inside`` (M,) bool.
        """
        self._atlas(layer, atlas)
        node = f"layouts/{layer}/{atlas}"
        store.verify(self.path, [node])
        group = self._root()[node]
        return Layout(np.asarray(group["xy"][:], np.float32), np.asarray(group["rows"][:], np.int64),
                      np.asarray(group["inside"][:], bool))

    def samples(self, layer: str, rows: Sequence[int] | np.ndarray | None = None, attributions: bool = True) -> Samples:
        """The sampled activations of ``layer`` with their images, positions and attributions.

        Parameters
        ----------
        layer : str
            A sampled layer (:attr:`layers`).
        rows : sequence of int or None, default None
            Sample rows to read, e.g. ``run.layout(layer).rows`` for one row per layout point in its order; None:
            every valid sample (rows of unreadable images or unfinished shards left out).
        attributions : bool, default True
            Read the attributions too (N x 1000 floats: skip them for large runs when not needed).

        Returns
        -------
        Samples
            ``rows``, ``activations`` (N, C) float32, ``image_index``, ``position`` (y, x), ``attributions`` (N, K)
            float32 or None.
        """
        self._layer(layer)
        root = self._root()
        valid = store.valid_rows(root, layer)  # also verifies the layer's arrays against their seals
        if rows is None:
            picked = valid
        else:
            picked = np.asarray(rows, np.int64).reshape(-1)
            bad = picked[~np.isin(picked, valid)]
            if bad.size:
                raise AtlasError(f"{bad.size} of the rows asked for are not valid samples of {layer} (first: {int(bad[0])}); "
                                 f"valid rows: {valid.size} between {int(valid[0])} and {int(valid[-1])}")
        group = root[f"samples/{layer}"]
        order = np.argsort(picked, kind="stable")  # read_rows streams sorted rows; the caller's order is restored below
        back = np.empty_like(order)
        back[order] = np.arange(order.size)
        sorted_rows = picked[order]

        def read(name: str, dtype) -> np.ndarray:
            return store.read_rows(group[name], sorted_rows, dtype=dtype)[back] if sorted_rows.size else \
                np.empty((0, *group[name].shape[1:]), dtype)

        attrs = read("attributions", np.float32) if attributions and "attributions" in group else None
        return Samples(picked, read("activations", np.float32), read("image_index", np.int32), read("position", np.int16), attrs)

    def icons(self, layer: str, grid: int, atlas: str = store.FULL_ATLAS) -> np.ma.MaskedArray:
        """The icons of one grid, cell by cell.

        Parameters
        ----------
        layer : str
            A sampled layer (:attr:`layers`).
        grid : int
            A rendered grid size (:meth:`grids`).
        atlas : str, default "full"
            The atlas (:meth:`atlases`).

        Returns
        -------
        numpy.ma.MaskedArray
            Shape (G, G, S, S, 3), uint8, indexed ``[gy, gx]`` with gy from the top (as the sheet and the viewer draw
            them); S is the icon size in pixels. Cells without an icon (too few samples, or not rendered yet) are
            masked and hold zeros: ``.filled(255)`` paints them white, ``.data`` is the plain array and
            ``~icons.mask[:, :, 0, 0, 0]`` the (G, G) cells that have one.
        """
        images, done = self._icons(layer, grid, atlas)
        mask = np.broadcast_to(~done[:, :, None, None, None], images.shape)
        return np.ma.MaskedArray(np.where(mask, 0, images).astype(np.uint8), mask=mask.copy())

    def _icons(self, layer: str, grid: int, atlas: str) -> tuple[np.ndarray, np.ndarray]:
        self._atlas(layer, atlas)
        rendered = self.grids(layer, atlas)
        if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or int(grid) not in rendered:
            raise AtlasError(f"grid {grid!r} of {layer}/{atlas} has no icons in {self.path}; rendered grids: "
                             f"{', '.join(map(str, rendered)) or 'none'} (atlas.render(run, {layer!r}, [{grid}]) renders it)")
        node = f"icons/{layer}/{atlas}/{int(grid)}"
        store.verify(self.path, [node])  # seals and lineage: icons of an older grid are refused in one line
        group = self._root()[node]
        return np.asarray(group["images"][:], np.uint8), np.asarray(group["done"][:], bool)

    def sheet(self, layer: str, grid: int, atlas: str = store.FULL_ATLAS, icon_size: int | None = None,
              background: tuple[int, int, int] = (255, 255, 255)):
        """The icons of one grid as one picture, cell (gx, gy) at column gx, row gy.

        Parameters
        ----------
        layer : str
            A sampled layer (:attr:`layers`).
        grid : int
            A rendered grid size (:meth:`grids`).
        atlas : str, default "full"
            The atlas (:meth:`atlases`).
        icon_size : int or None, default None
            Resize every icon to this many pixels (e.g. to keep a 160-cell grid small); None: as rendered.
        background : tuple of 3 int, default (255, 255, 255)
            Colour of the cells without an icon.

        Returns
        -------
        PIL.Image.Image
            RGB, G * S pixels square.
        """
        from PIL import Image

        images, done = self._icons(layer, grid, atlas)
        g, s = done.shape[0], images.shape[2]
        if icon_size is not None:
            if isinstance(icon_size, bool) or not isinstance(icon_size, (int, np.integer)) or icon_size < 1:
                raise AtlasError(f"icon_size must be a positive integer, got {icon_size!r}")
            s = int(icon_size)
        canvas = np.empty((g * s, g * s, 3), np.uint8)
        canvas[:] = np.asarray(background, np.uint8)
        for gy, gx in zip(*np.nonzero(done), strict=True):
            icon = images[gy, gx]
            if icon.shape[0] != s:
                icon = np.asarray(Image.fromarray(icon).resize((s, s), Image.Resampling.LANCZOS))
            canvas[gy * s:(gy + 1) * s, gx * s:(gx + 1) * s] = icon
        return Image.fromarray(canvas)

    def unit_views(self, layer: str, channels: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """What the unit lens (``atlas.units``) computed for ``layer``, per channel.

        Parameters
        ----------
        layer : str
            A layer the lens ran on.
        channels : sequence of int or None, default None
            Channels to read; None: every channel whose top-k examples are done.

        Returns
        -------
        dict of str to numpy.ndarray
            ``channels`` (n,); ``top_value`` (n, k) the top-k activations, ``top_image`` (n, k) their images (into
            :attr:`images`), ``top_patch`` (n, k, P, P, 3) uint8 the patches their receptive fields cover; for each
            projection computed ``projection/METHOD`` (n, k, P, P, 3) uint8; for each visualisation kind
            ``vis/KIND`` (n, m, S, S, 3 or 4) uint8 (m images per unit: 1, or the diverse set); with attributions
            ``class_top`` (n, 5) class indices and ``class_score`` (n, 5). Parts not computed for a channel are zeros.

        Raises
        ------
        AtlasError
            If the lens has not run on ``layer`` (the layers it ran on named) or a channel is out of range.
        """
        root = self._root()
        ran = sorted(root["units"].group_keys()) if "units" in root else []
        if layer not in ran:
            raise AtlasError(f"the unit lens has not run on {layer!r} in {self.path}; it ran on: {', '.join(ran) or 'no layer'} "
                             f"(atlas.units(run, {layer!r}, channels='0-7') runs it)")
        node = f"units/{layer}"
        store.verify(self.path, [node])
        g = root[node]
        n = g["top/done"].shape[0]
        picked = np.flatnonzero(g["top/done"][:]) if channels is None else np.asarray(channels, np.int64).reshape(-1)
        if picked.size and (picked.min() < 0 or picked.max() >= n):
            raise AtlasError(f"channels of {layer} are 0..{n - 1}; got {picked.min()}..{picked.max()}")
        out: dict[str, np.ndarray] = {"channels": picked}
        for name in ("value", "image", "patch"):
            out[f"top_{name}"] = np.asarray(g[f"top/{name}"].get_orthogonal_selection((picked,)))
        for kind in ("projection", "vis"):
            for method in sorted(g[kind].group_keys()) if kind in g else []:
                out[f"{kind}/{method}"] = np.asarray(g[f"{kind}/{method}/image"].get_orthogonal_selection((picked,)))
        if "classes" in g:
            out["class_top"] = np.asarray(g["classes/top"].get_orthogonal_selection((picked,)))
            out["class_score"] = np.asarray(g["classes/score"].get_orthogonal_selection((picked,)))
        return out

    def concepts(self, layer: str):
        """The sparse dictionary ``atlas concepts`` learnt for ``layer`` and every sampled row's code.

        Parameters
        ----------
        layer : str
            A layer ``atlas concepts`` (``atlas.concepts.concepts``) ran on.

        Returns
        -------
        atlas.concepts.Concepts
            ``atoms`` (K, C) unit-norm concept directions, ``bias`` (C,), ``codes`` (N, K) (``codes @ atoms + bias``
            reconstructs the activations), ``rows`` (N,) (as :meth:`samples` numbers them), ``method``, ``sparsity``,
            ``summary`` (R^2, active concepts per sample, dead concepts), the top examples' images and codes, and the
            top classes (None without attributions).

        Raises
        ------
        AtlasError
            If no concepts were learnt for ``layer`` (the command to run named).
        """
        from atlas.concepts import read_concepts

        return read_concepts(self.path, layer)

    # ------------------------------------------------------------------ the viewer
    def show(self, layer: str | None = None, atlas: str = store.FULL_ATLAS, height: int = 600, width: str = "100%",
             page: str = "index.html") -> Viewer:
        """The zoomable viewer of this run, inline in Jupyter (an iframe on a server on this machine).

        The first call starts the server of ``atlas serve`` for this run on 127.0.0.1 and a free port, in a
        background thread; later calls reuse it. It stops with :meth:`stop`, when the object is garbage-collected or
        when Python exits.

        Parameters
        ----------
        layer : str or None, default None
            Open this layer's atlas first; None: the first atlas of the run's tiles.
        atlas : str, default "full"
            With ``layer``: which of its atlases.
        height : int, default 600
            Height of the frame in pixels.
        width : str, default "100%"
            Width of the frame (any CSS width).
        page : str, default "index.html"
            The page of the run's ``tiles/`` folder to show: ``"index.html"`` (the atlas), ``"units.html"`` (the unit
            gallery, after ``atlas.units``), ``"inspect/NAME/index.html"`` (a report of ``atlas.inspect``).

        Returns
        -------
        Viewer
            Its ``url``; displayed as the iframe when it is a cell's value.

        Raises
        ------
        AtlasError
            If the run has no tiles yet (``atlas.tiles(run, layer)`` makes them), ``layer`` has none, or ``page`` is not
            in the run's ``tiles/`` folder.
        """
        tiles = self.path / "tiles"
        # The atlas and live pages come with the server; the gallery once atlas.units wrote its manifest; reports are files.
        known = {"index.html": True, "live.html": True, "units.html": (tiles / "units.json").is_file()}
        if ".." in Path(page).parts or not known.get(page, (tiles / page).is_file()):
            reports = sorted(tiles.glob("inspect/*/index.html"))
            raise AtlasError(f"no page {page!r} in {tiles}; pages: index.html, live.html"
                             + (", units.html" if known["units.html"] else "")
                             + "".join(f", inspect/{p.parent.name}/index.html" for p in reports))
        if layer is not None:
            tiled = [(e.get("layer"), e.get("atlas")) for e in self.info()["tiles"]]
            if (layer, atlas) not in tiled:
                raise AtlasError(f"{layer}/{atlas} has no tiles in {self.path}; tiled: "
                                 f"{', '.join(f'{a}/{b}' for a, b in tiled) or 'nothing yet'} (atlas.tiles(run, {layer!r}) makes them)")
        server = self._start()
        host, port = server.server_address[:2]
        url = f"http://{host}:{port}/tiles/{urllib.parse.quote(Path(page).as_posix())}"
        if layer is not None:
            url += "#" + urllib.parse.quote(f"{layer}/{atlas}", safe="")
        return Viewer(url, width, height, self.stop)

    def _start(self):
        with self._lock:
            if self._server is None:
                from atlas.server import make_server

                server = make_server(self.path, host="127.0.0.1", port=0)
                threading.Thread(target=server.serve_forever, name=f"atlas viewer {self.path.name}", daemon=True).start()
                self._server = server
                # Not a method of self: the finalizer must not keep the Run alive. Also runs at interpreter exit.
                self._finalizer = weakref.finalize(self, _stop_server, server)
            return self._server

    def stop(self) -> None:
        """Stop the viewer's server, if one runs (``show()`` starts a new one)."""
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._server = self._finalizer = None

    @property
    def url(self) -> str | None:
        """The viewer's address while :meth:`show` has it running, else None."""
        server = self._server
        return None if server is None else f"http://{server.server_address[0]}:{server.server_address[1]}/tiles/index.html"

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, layers={self.layers})"

    def __fspath__(self) -> str:
        """The run folder: a Run goes wherever a path does (``atlas.units(run, ...)``, ``Path(run)``)."""
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def _repr_html_(self) -> str:
        """A summary table and, when icons exist, the sheet of the first layer's whole-layer atlas as an inline PNG (its
        finest grid up to 40 x 40, icons downscaled to fit 480 pixels)."""
        try:
            data = self.info()
        except AtlasError as exc:
            return f"<p><b>atlas run</b> {html.escape(str(self.path))}: {html.escape(str(exc))}</p>"
        e = html.escape
        rows = [("folder", str(self.path)), ("model", f"{data['model']} ({Path(data['weights'] or '').name or 'no weights file'})"),
                ("images", f"{data['n_images']} ({data['n_skipped']} skipped){'' if data['complete'] else ', sampling incomplete'}")]
        for layer, entry in data["layers"].items():
            parts = [f"{entry['samples']} samples x {entry['channels']} channels",
                     "attribution" if entry["attribution"] else "no attribution"]
            for name, a in entry["atlases"].items():
                grids = ", ".join(f"{size} ({s.get('n_done', '?')} icons)" for size, s in a.get("icons", {}).items())
                parts.append(f"atlas {name}: {a.get('layout', {}).get('method', '?')} layout"
                             + (f", grids {grids}" if grids else ", no icons yet"))
            rows.append((layer, "; ".join(parts)))
        tiled = ", ".join(f"{t.get('layer')}/{t.get('atlas')}" for t in data["tiles"])
        rows.append(("viewer", f"tiles of {tiled}: run.show()" if tiled else "no tiles yet"))
        table = "".join(f'<tr><th style="text-align:left">{e(k)}</th><td style="text-align:left">{e(v)}</td></tr>' for k, v in rows)
        picture = ""
        for layer in data["layers"]:
            sizes = self.grids(layer) if store.FULL_ATLAS in data["layers"][layer]["atlases"] else []
            if sizes:
                # the finest grid that still reads at thumbnail size (and costs little to read: a 160-cell grid of
                # 80 px icons is half a gigabyte), else the coarsest
                size = max((g for g in sizes if g <= REPR_GRID), default=sizes[0])
                try:
                    sheet = self.sheet(layer, size, icon_size=max(1, min(64, REPR_PIXELS // size)))
                except AtlasError as exc:
                    picture = f"<p>{e(str(exc))}</p>"
                    break
                buffer = io.BytesIO()
                sheet.save(buffer, "PNG")
                picture = (f'<p>{e(layer)}, grid {size}:</p><img src="data:image/png;base64,'
                           f'{base64.b64encode(buffer.getvalue()).decode()}" alt="icons of {e(layer)}, grid {size}"/>')
                break
        return f"<div><table>{table}</table>{picture}</div>"


def open_run(path: str | Path) -> Run:
    """Open a run folder: ``atlas.open_run("runs/demo")`` -> :class:`Run`.

    Parameters
    ----------
    path : str or Path
        The run folder (holding ``store.zarr``).

    Returns
    -------
    Run

    Raises
    ------
    AtlasError
        If ``path`` is not a run folder (the runs inside it, if any, are named).
    """
    return Run(path)


def build_run(images: str | Path, out: str | Path, *, layers: Sequence[str] | str | None = None, grids: Sequence[int] | int | None = None,
              config: str | Path | Mapping[str, Mapping[str, Any]] | None = None, echo: Callable[[str], None] | None = print,
              **settings: Any) -> Run:
    """Build an atlas of ``images`` into the run folder ``out`` (``atlas build``), and open it.

    Every stage that is already done with the same settings is skipped, so calling it again is cheap and a changed
    setting redoes only the stages it affects.

    Parameters
    ----------
    images : str or Path
        A folder of images (sub-folders included) or a list file (docs/images.md).
    out : str or Path
        The run folder (created; a run of another model there is refused).
    layers : sequence of str, str or None, default None
        Layers to sample and lay out; None: the config's (``["mixed4c"]``).
    grids : sequence of int, int or None, default None
        Grid sizes to render; None: the config's (20, 40, 80, 160).
    config : str, Path, mapping or None, default None
        A TOML config file (``configs/cpu.toml``) or a mapping of its tables (``{"render": {"steps": 64}}``),
        applied before the keyword settings.
    echo : callable or None, default print
        Receives each progress line; None: silent.
    **settings
        Any setting of the build's tables, by name (``max_images=200``, ``quality="draft"``, ``method="tsne"``; a
        name several tables share, such as ``seed`` or ``device``, goes to each of them, as the command's options do),
        or a whole table (``render={"steps": 64, "size": 48}``). docs/settings.md lists them with their defaults.

    Returns
    -------
    Run
        The finished run.

    Raises
    ------
    AtlasError
        Before any work for an unknown or bad setting (one line naming it and what is allowed), missing images, an
        unknown layer; during a stage, as that stage says.
    """
    from atlas.build import DEFAULTS, build, load_config, merge

    if isinstance(config, Mapping):
        resolved = merge(load_config(None), {k: dict(v) for k, v in config.items()}, source="config")
    else:
        resolved = load_config(config)
    overrides: dict[str, dict[str, Any]] = {"run": {"images": str(images), "out": str(out)}}
    if layers is not None:
        overrides["run"]["layers"] = [layers] if isinstance(layers, str) else list(layers)
    if grids is not None:
        overrides["grid"] = {"sizes": [grids] if isinstance(grids, (int, np.integer)) else list(grids)}
    for name, value in settings.items():
        if name in DEFAULTS and isinstance(value, Mapping):
            overrides.setdefault(name, {}).update(value)
            continue
        tables = [t for t in BUILD_TABLES if name in DEFAULTS[t]]
        if not tables:
            known = sorted({k for t in BUILD_TABLES for k in DEFAULTS[t]} - {"images", "out"})
            raise AtlasError(f"unknown build setting {name!r}; settings: {', '.join(known)}; or a whole table, e.g. "
                             f"render={{'steps': 64}} (tables: {', '.join(DEFAULTS)})")
        for table in tables:
            overrides.setdefault(table, {})[name] = value
    build(merge(resolved, overrides), echo=echo if echo is not None else (lambda *_: None))
    return Run(out)
