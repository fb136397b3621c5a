"""Layers side by side: two or three layers' atlases of one run in one page, with one class highlighted in every layer.

The article compares mixed3b, mixed4c and mixed5b on the activations that matter for "cabbage", and follows a region
from mixed4a to mixed4e. ``side_by_side(run, layers, atlas, highlight)`` makes that page: it (re)tiles each layer's
atlas with the class highlight when one is asked (the ``atlas tiles --highlight`` veil, the same in every layer),
lists the view in ``RUN/tiles/layers.json`` and installs ``layers.html`` (:mod:`atlas.viewer`), which opens one
deep-zoom viewer per layer, draws each layer's veil and, when "link views" is on, moves them together.
``class_layers(run, cls, layers)`` builds a class atlas per layer for one class (:func:`atlas.classes.class_atlas`)
and shows them side by side, highlighted. Aligned layouts (``atlas.layout.aligned_project``, atlas ``aligned``) make
linked navigation meaningful: the same image regions sit in similar places in every layer.

Not a stage: it orchestrates the tiles and class stages through their entry functions, like ``atlas.build``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from atlas import store
from atlas.errors import AtlasError
from atlas.settings import ClassSettings, RenderSettings
from atlas.settings import LayersSettings as L

LAYERS_MANIFEST = "layers.json"
MAX_LAYERS = 3


def parse_layers(run_dir: str | Path, specs: Sequence[str]) -> list[str]:
    """The layer names of ``specs``, each ``LAYER`` or ``RUN:LAYER``; a layer of another run, a layer the run did not
    sample, fewer than two or more than three layers: one line each."""
    run = Path(run_dir).resolve()
    layers = []
    for spec in specs:
        where, sep, layer = str(spec).rpartition(":")
        if sep and where and Path(where).resolve() != run:
            raise AtlasError(f"layers of different runs cannot be shown side by side: {spec} is in {where}, not in {run_dir}; "
                             "sample every layer into one run (atlas sample --layer A --layer B)")
        layers.append(layer if sep else str(spec))
    layers = list(dict.fromkeys(layers))
    if not 2 <= len(layers) <= MAX_LAYERS:
        raise AtlasError(f"side by side shows 2 or {MAX_LAYERS} layers; got {len(layers)} ({', '.join(layers) or 'none'})")
    root = store.open_store(run_dir)
    sampled = list(root["samples"].group_keys()) if "samples" in root else []
    missing = [layer for layer in layers if layer not in sampled]
    if missing:
        raise AtlasError(f"layer '{missing[0]}' was not sampled in {run_dir}; its layers: {', '.join(sampled) or 'none'}")
    return layers


def _entry(tiles_dir: Path, layer: str, atlas: str) -> dict | None:
    path = tiles_dir / layer / atlas / "atlas.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def side_by_side(run_dir: str | Path, layers: Sequence[str], atlas: str = L.atlas, highlight: str | int | None = L.highlight,
                 name: str | None = None, echo=None) -> dict:
    """Show ``layers`` (2 or 3, each ``LAYER`` or ``RUN:LAYER`` of this run) of one ``atlas`` side by side.

    With ``highlight`` each layer's atlas is tiled again with that class's veil (unless its tiles already have it);
    without, the tiles are used as they are (an atlas not tiled yet is tiled). Returns the view as listed in
    ``tiles/layers.json``: ``name``, ``layers``, ``atlas``, ``ids`` (the atlases' ids in ``atlases.json``),
    ``highlight`` and ``url`` (relative to ``tiles/``).
    """
    # The [layers] settings' checks (a class index stays an int: resolve_class takes both).
    atlas = L(atlas=atlas, highlight=None if highlight is None or isinstance(highlight, int) else highlight).atlas
    from atlas.tiles import make_tiles
    from atlas.viewer import install_viewer, update_listing

    run_dir = Path(run_dir)
    layers = parse_layers(run_dir, layers)
    tiles_dir = run_dir / "tiles"
    shown = None
    for layer in layers:
        entry = _entry(tiles_dir, layer, atlas)
        have = (entry or {}).get("highlight") or {}
        if entry is None or (highlight is not None and not _same_class(run_dir, have, highlight)):
            if echo:
                echo(f"tiling {layer}/{atlas}" + (f" with '{highlight}' highlighted" if highlight is not None else ""))
            entry = make_tiles(run_dir, layer, atlas=atlas, highlight=highlight, examples=bool((entry or {}).get("examples", True)),
                               viewer=False)
        if highlight is not None:
            shown = entry["highlight"]["class"]
    view_name = name or "-".join([atlas, *layers] + ([str(shown).replace(" ", "_")] if shown else []))
    view = {"name": view_name, "layers": layers, "atlas": atlas, "ids": [f"{layer}/{atlas}" for layer in layers],
            "highlight": shown, "url": f"layers.html?view={view_name}"}
    update_listing(tiles_dir / LAYERS_MANIFEST, "views", view, lambda v: v.get("name") == view_name,
                   lambda v: all((tiles_dir / str(i) / "atlas.json").is_file() for i in v.get("ids", [])), lambda v: v["name"])
    install_viewer(tiles_dir)
    return view


def _same_class(run_dir: Path, have: dict, wanted: str | int) -> bool:
    """Whether the tiles' highlight (``{"class", "index"}``) is the class ``wanted`` names."""
    if not have:
        return False
    from atlas.classnames import resolve_class

    meta = store.attrs(store.open_store(run_dir))
    return resolve_class(wanted, list(meta.get("classes", [])), meta.get("weights")).index == have.get("index")


def class_layers(run_dir: str | Path, cls: str | int, layers: Sequence[str], settings: L | None = None, *,
                 render: RenderSettings | None = None, echo=None, **overrides) -> dict:
    """A class atlas of ``cls`` per layer (:func:`atlas.classes.class_atlas`, each highlighted with the class), shown
    side by side; returns the view (:func:`side_by_side`) with ``atlases``, the class atlas of every layer.

    Parameters
    ----------
    run_dir : str or Path
        The run folder, sampled with attribution at every layer.
    cls : str or int
        The class: a name, synset or index (:func:`atlas.classnames.resolve_class`).
    layers : sequence of str
        Two or three layers of the run (LAYER or RUN:LAYER).
    settings : LayersSettings or None, default None
        The settings (:class:`atlas.settings.LayersSettings`; the class atlases read ``top_k``, ``method``, ``sizes``,
        ``quality`` and ``seed``); None: the defaults.
    render : RenderSettings or None, default None
        The icons' settings, its ``quality`` included; None: ``RenderSettings(quality=settings.quality)``.
    echo : callable or None, default None
        Receives a line per layer tiled.
    **overrides
        Single fields of :class:`~atlas.settings.LayersSettings` replacing those of ``settings`` (checked by the class).

    Returns
    -------
    dict
        The view (:func:`side_by_side`) with ``atlases``.
    """
    from atlas.classes import class_atlas

    s = L.merged(settings, overrides)
    layers = parse_layers(run_dir, layers)
    chosen = ClassSettings(top_k=s.top_k, method=s.method, sizes=s.sizes, quality=s.quality, seed=s.seed, tiles=True)
    icons = render if render is not None else RenderSettings(quality=s.quality)
    names = [class_atlas(run_dir, layer, cls, chosen, render=icons) for layer in layers]
    if len(set(names)) != 1:  # one class, one name: a guard, not a case
        raise AtlasError(f"class atlases of one class got different names: {names}")
    view = side_by_side(run_dir, layers, atlas=names[0], highlight=cls, echo=echo)
    return view | {"atlases": names}
