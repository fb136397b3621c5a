"""Class-filtered and class-difference atlases (the paper's "snorkel" vs "scuba diver").

A class's selection is the samples whose highest attribution goes to that class (the
"winning" samples) together with the ``top_k`` samples of highest positive attribution
to it. A class-difference atlas lays out the union of two selections with
x = attribution to the second class minus attribution to the first (normalised by its
99th percentile of absolute value, clipped to [-1, 1]) and y = a 1-D t-SNE of the
activations, so the horizontal position says which class a sample argues for.

``top_k`` is scaled to what the run holds for the class (:func:`scaled_top_k`): a class's "own" samples are its
winners and the samples of photos labelled with it, and at most ``TOP_K_PER_OWN`` times as many (at least
``TOP_K_FLOOR``) are added by attribution, so a class with a handful of photos does not get an atlas of thousands
of other classes' samples. Before building, one line per class says how many samples are its own, and one line warns
when most of the selection is other classes' samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atlas import layout, store
from atlas.classnames import ClassRef, resolve_class
from atlas.errors import AtlasError
from atlas.runner import Step, run_stages
from atlas.settings import ClassSettings, ProjectSettings, RenderSettings

if TYPE_CHECKING:  # the model is only passed through to the render stage: torch is not imported here
    from atlas.models import Network

__all__ = ["ClassRef", "class_atlas", "compare_atlas", "difference_layout", "resolve_class", "scaled_top_k", "select_class", "slug"]

# The rule that sizes a class's selection to the run: top_k is capped at TOP_K_PER_OWN samples per own sample of the
# class (winners and samples of photos labelled so), but never below TOP_K_FLOOR (a layout of a few points says
# nothing) -- a class with 500 own samples keeps the default 2,000, one with a single sample gets 50, not 2,000.
TOP_K_PER_OWN = 4
TOP_K_FLOOR = 50


def _attribution_columns(run_dir: str | Path, layer: str, columns: list[int], rows: np.ndarray,
                         block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Attributions of ``rows`` to ``columns`` and each row's winning class, streamed by block."""
    root = store.open_store(run_dir)
    group = store.require_layer(root, layer)
    if "attributions" not in group:
        raise AtlasError(f"layer '{layer}' was sampled with --no-attribution; class atlases need attributions")
    array = group["attributions"]
    values = np.empty((rows.size, len(columns)), np.float32)
    winners = np.empty(rows.size, np.int64)
    for start in range(0, rows.size, block):
        sel = rows[start : start + block]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        chunk = array[lo:hi][sel - lo].astype(np.float32)
        values[start : start + sel.size] = chunk[:, columns]
        winners[start : start + sel.size] = chunk.argmax(1)
    return values, winners


def select_class(run_dir: str | Path, layer: str, cls: ClassRef, top_k: int = 2000) -> np.ndarray:
    """Sorted sample rows that matter for ``cls``: winners plus the top-k by positive attribution."""
    rows = store.valid_rows(store.open_store(run_dir), layer)
    values, winners = _attribution_columns(run_dir, layer, [cls.index], rows)
    return _selection(rows, values[:, 0], winners == cls.index, top_k)


def scaled_top_k(top_k: int, own: int) -> int:
    """The ``top_k`` a class atlas uses: ``min(top_k, max(TOP_K_FLOOR, TOP_K_PER_OWN * own))``.

    Parameters
    ----------
    top_k : int
        The requested number of samples added by attribution, at least 0.
    own : int
        The class's own samples in the run: winners (highest attribution to the class) and samples of photos
        labelled with it.

    Returns
    -------
    int
        The number of samples of highest positive attribution to add.
    """
    return min(int(top_k), max(TOP_K_FLOOR, TOP_K_PER_OWN * int(own)))


def _labelled(run_dir: str | Path, layer: str, rows: np.ndarray, index: int) -> tuple[np.ndarray, int]:
    """(mask over ``rows`` of samples whose photo is labelled ``index``, number of such readable photos)."""
    root = store.open_store(run_dir)
    labels = root["images/label"][:] if "images/label" in root else np.full(0, -1)
    if not labels.size:
        return np.zeros(rows.size, bool), 0
    ok = root["images/ok"][:] if "images/ok" in root else np.ones(labels.size, bool)
    image = store.read_rows(root[f"samples/{layer}/image_index"], rows).astype(np.int64)
    return labels[image] == index, int(((labels == index) & ok).sum())


def _own_report(ref: ClassRef, layer: str, winning: np.ndarray, labelled: np.ndarray, photos: int, top_k: int, used: int) -> str:
    own = int((winning | labelled).sum())
    scaled = "" if used == top_k else f"; top-k {top_k} scaled to {used} ({TOP_K_PER_OWN} per own sample, at least {TOP_K_FLOOR})"
    return (f"{ref.name} at {layer}: {own} own samples ({int(winning.sum())} whose strongest attribution is {ref.name}, "
            f"{int(labelled.sum())} from {photos} photos labelled so){scaled}")


def _filler_warning(what: str, selected: int, own: int) -> str | None:
    """One line when most of a selection is other classes' samples."""
    others = selected - own
    if selected and others * 2 > selected:
        return (f"warning: {others} of {selected} selected samples ({others / selected:.0%}) belong to other classes: the "
                f"atlas of {what} shows mostly what else argues for it; sample more photos of it (or more --per-image)")
    return None


def _selection(rows: np.ndarray, attribution: np.ndarray, winning: np.ndarray, top_k: int) -> np.ndarray:
    positive = np.flatnonzero(attribution > 0)
    top = positive[np.argsort(-attribution[positive], kind="stable")[:top_k]]
    return np.union1d(rows[winning], rows[top])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _run_classes(run_dir: str | Path) -> tuple[list[str], str | None]:
    meta = store.attrs(store.open_store(run_dir))
    return list(meta.get("classes", [])), meta.get("weights")


def _require_viewer(tiles: bool) -> None:
    """With ``tiles``, check before any layout or icon work that the viewer can be installed at the end."""
    if tiles:
        from atlas.viewer import require_viewer_assets

        require_viewer_assets()


def _icon_settings(icons: RenderSettings) -> dict:
    """The render settings that change what the icons are (speed-only ones left out), at their non-default values."""
    speed = RenderSettings.speed_only()
    return {f.name: getattr(icons, f.name) for f in dataclasses.fields(icons)
            if f.name not in speed and f.name != "quality" and getattr(icons, f.name) != f.default}


def _keys(run_dir, layer: str, atlas: str, rows: np.ndarray, layout: dict, sizes, icons: RenderSettings,
          highlight: str | None) -> dict[str, str]:
    """The chain of keys of a class or compare atlas's steps: what was laid out (the rows and the content of the
    samples they come from, by the seals the store keeps of them), how, and every setting of the later steps."""
    seals = store.read_ledger(run_dir)["seals"]
    samples = sorted((k, v.get("chunks")) for k, v in seals.items() if k.startswith(f"samples/{layer}/") or k.startswith("images/"))
    upstream = json.dumps([atlas, layer, hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest(), samples, layout],
                          sort_keys=True, default=str)
    settings = {"project": None, "grid": list(sizes), "render": [icons.quality, _icon_settings(icons)], "tiles": highlight}
    keys = {}
    for stage, value in settings.items():
        upstream = keys[stage] = hashlib.sha256(json.dumps([upstream, value], sort_keys=True, default=str).encode()).hexdigest()[:16]
    return keys


def _run(run_dir, layer: str, atlas: str, lay_out, settings: ClassSettings, icons: RenderSettings, net, highlight: str | None,
         keys: dict[str, str]) -> str:
    """Lay out (``lay_out``), grid, render and tile an atlas through the stage runner: the same stages as the full atlas.

    Each step is recorded in the store's ledger as ``ATLAS:stage`` under ``keys`` (:func:`_keys`), so running the
    same command again skips what is done and intact, and a changed setting redoes that step and the later ones.
    """
    from atlas import grid, render
    from atlas import tiles as tiles_stage

    sizes = list(settings.sizes)
    steps = [Step(f"{atlas}:project", keys["project"], lay_out, paths=[f"layouts/{layer}/{atlas}"]),
             # every cell with a sample gets an icon: a class selection is small
             Step(f"{atlas}:grid", keys["grid"], lambda: grid.grid(run_dir, layer, sizes=sizes, atlas=atlas, min_count=1),
                  paths=[f"grids/{layer}/{atlas}/{s}" for s in sizes]),
             Step(f"{atlas}:render", keys["render"], lambda: render.render(run_dir, layer, sizes, icons, atlas=atlas, net=net),
                  paths=[f"icons/{layer}/{atlas}/{s}" for s in sizes])]
    if settings.tiles:
        steps.append(Step(f"{atlas}:tiles", keys["tiles"], lambda: tiles_stage.make_tiles(run_dir, layer, atlas=atlas, highlight=highlight),
                          files=[f"tiles/{layer}/{atlas}/atlas.json"]))
    run_stages(run_dir, steps)
    return atlas


def class_atlas(run_dir: str | Path, layer: str, cls: str | int, settings: ClassSettings | None = None, *,
                render: RenderSettings | None = None, net: Network | None = None, echo: Callable[[str], None] | None = print,
                **overrides) -> str:
    """Build the atlas of the activations that matter for one class; returns its atlas name.

    The selection is the samples whose highest attribution goes to the class plus the ``top_k`` of highest positive
    attribution to it (:func:`select_class`). It is laid out with ``method`` (``n_neighbors`` = a quarter of the
    selection, 2 to 50) as atlas ``class-{slug of the class name}`` of ``layer``, then gridded, rendered and,
    with ``tiles``, tiled with the class highlighted. Needs a run sampled with attribution.

    Parameters
    ----------
    run_dir : str or Path
        The run folder, sampled (``atlas sample``) with attribution at ``layer``.
    layer : str
        A sampled layer, e.g. "mixed4c".
    cls : str or int
        The class: a name ("scuba diver", any synonym, case and spaces ignored), a synset ("n10565667") or an
        index ("983" or 983) (:func:`atlas.classnames.resolve_class`).
    settings : ClassSettings or None, default None
        The settings (:class:`atlas.settings.ClassSettings`): ``top_k`` (samples of highest positive attribution added
        to the winners, scaled to the run by :func:`scaled_top_k`: at most 4 per own sample of the class, at least 50),
        ``method`` (the layout), ``sizes`` (grid sizes; every cell with a sample gets an icon), ``quality`` (the icon
        preset), ``seed`` (of the layout) and ``tiles`` (also write the tiles and viewer; OpenSeadragon is checked
        first, so a missing install fails before any layout or icon work). None: the defaults.
    render : RenderSettings or None, default None
        The icons' settings (:class:`atlas.settings.RenderSettings`: steps, size, attempts, p, seed, device, ...), its
        ``quality`` included; None: ``RenderSettings(quality=settings.quality)``.
    net : Network or None, default None
        The run's model already loaded (``atlas.models.load_run_model``), to skip loading it again for the icons.
    echo : callable or None, default print
        Receives, before any layout work, one line per class with its own samples (winners and samples of photos
        labelled with it) and the scaled ``top_k``, and a warning line when most of the selection is other classes'.

    Returns
    -------
    str
        The atlas name, ``class-{slug}`` (its layout, grids and icons are stored under that name; its tiles at
        ``tiles/{layer}/{name}``).

    Raises
    ------
    AtlasError
        For an unknown or ambiguous class, a run without attributions, fewer than 4 selected samples, a missing
        OpenSeadragon (with ``tiles``) or a render setting out of range.
    """
    s = ClassSettings.merged(settings, overrides)
    icons = render if render is not None else RenderSettings(quality=s.quality)
    _require_viewer(s.tiles)
    say = echo or (lambda _line: None)
    classes, weights = _run_classes(run_dir)
    ref = resolve_class(cls, classes, weights)
    all_rows = store.valid_rows(store.open_store(run_dir), layer)
    values, winners = _attribution_columns(run_dir, layer, [ref.index], all_rows)
    own, used = _own(run_dir, layer, ref, all_rows, winners, s.top_k, say)
    rows = _selection(all_rows, values[:, 0], winners == ref.index, used)
    _warn_filler(say, f"'{ref.name}'", rows, all_rows[own])
    top_k = used
    if rows.size < 4:
        raise AtlasError(f"only {rows.size} samples matter for '{ref.name}' at {layer}; sample more images or positions")
    name = f"class-{slug(ref.name)}"

    def lay_out() -> None:
        # a class selection is small: a quarter of it as UMAP's neighbourhood, 2 to 50
        layout.project(run_dir, layer, ProjectSettings(method=s.method, seed=s.seed, n_neighbors=min(50, max(2, rows.size // 4))),
                       atlas=name, rows=rows)
        _annotate(run_dir, layer, name, {"kind": "class", "classes": [ref.index], "class_names": [ref.name], "top_k": top_k})

    keys = _keys(run_dir, layer, name, rows, {"kind": "class", "method": s.method, "seed": s.seed, "top_k": top_k}, s.sizes, icons,
                 ref.name)
    return _run(run_dir, layer, name, lay_out, s, icons, net, ref.name, keys)


def _own(run_dir, layer: str, ref: ClassRef, rows: np.ndarray, winners: np.ndarray, top_k: int,
         say: Callable[[str], None]) -> tuple[np.ndarray, int]:
    """(mask over ``rows`` of the class's own samples, the scaled top-k), after saying both in one line."""
    winning = winners == ref.index
    labelled, photos = _labelled(run_dir, layer, rows, ref.index)
    own = winning | labelled
    used = scaled_top_k(top_k, int(own.sum()))
    say(_own_report(ref, layer, winning, labelled, photos, top_k, used))
    return own, used


def _warn_filler(say: Callable[[str], None], what: str, selected: np.ndarray, own_rows: np.ndarray) -> None:
    warning = _filler_warning(what, int(selected.size), int(np.isin(selected, own_rows).sum()))
    if warning:
        say(warning)


def difference_layout(diff: np.ndarray, activations: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw, xy): x from the attribution difference (p99-normalised, clipped), y from a 1-D t-SNE."""
    scale = float(np.percentile(np.abs(diff), 99)) or 1.0
    x = np.clip(diff / scale, -1.0, 1.0)
    y = layout.embed(activations, "tsne", n_components=1, seed=seed)[:, 0]
    span = y.max() - y.min()
    y01 = (y - y.min()) / span if span > 0 else np.full_like(y, 0.5)
    raw = np.stack([diff, y], 1).astype(np.float32)
    xy = np.stack([(x + 1) / 2, y01], 1).astype(np.float32)
    return raw, xy


def compare_atlas(run_dir: str | Path, layer: str, first: str | int, second: str | int, settings: ClassSettings | None = None, *,
                  render: RenderSettings | None = None, net: Network | None = None, echo: Callable[[str], None] | None = print,
                  **overrides) -> str:
    """Build the class-difference atlas of two classes; returns its atlas name.

    The union of both classes' selections (as in :func:`class_atlas`) is laid out with x = attribution to
    ``second`` minus attribution to ``first`` (normalised by its 99th percentile of absolute value, clipped to
    [-1, 1]) and y = a 1-D t-SNE of the activations (:func:`difference_layout`), stored as atlas
    ``compare-{first}-vs-{second}``, then gridded, rendered and, with ``tiles``, tiled with ``second``
    highlighted. Needs a run sampled with attribution.

    Parameters
    ----------
    run_dir : str or Path
        The run folder, sampled with attribution at ``layer``.
    layer : str
        A sampled layer, e.g. "mixed4c".
    first, second : str or int
        Two different classes, each a name, synset or index (:func:`atlas.classnames.resolve_class`); ``first``
        is drawn on the left, ``second`` on the right.
    settings : ClassSettings or None, default None
        The settings (:class:`atlas.settings.ClassSettings`): ``top_k`` (added to each class's winners, scaled to the run
        for each class by :func:`scaled_top_k`), ``sizes``, ``quality``, ``seed`` (of the 1-D t-SNE) and ``tiles``, as
        in :func:`class_atlas`; ``method`` is not used (the layout is the difference's own). None: the defaults.
    render : RenderSettings or None, default None
        The icons' settings, its ``quality`` included; None: ``RenderSettings(quality=settings.quality)``.
    net : Network or None, default None
        The run's model already loaded, to skip loading it again for the icons.
    echo : callable or None, default print
        Receives, before any layout work, one line per class with its own samples (winners and samples of photos
        labelled with it) and the scaled ``top_k``, and a warning line when most of the selection is other classes'.

    Returns
    -------
    str
        The atlas name, ``compare-{slug of first}-vs-{slug of second}``.

    Raises
    ------
    AtlasError
        For an unknown or ambiguous class, the same class twice, a run without attributions, fewer than 4
        selected samples, a missing OpenSeadragon (with ``tiles``) or a render setting out of range.
    """
    s = ClassSettings.merged(settings, overrides)
    icons = render if render is not None else RenderSettings(quality=s.quality)
    _require_viewer(s.tiles)
    classes, weights = _run_classes(run_dir)
    say = echo or (lambda _line: None)
    a, b = resolve_class(first, classes, weights), resolve_class(second, classes, weights)
    if a.index == b.index:
        raise AtlasError("compare needs two different classes")
    root = store.open_store(run_dir)
    all_rows = store.valid_rows(root, layer)
    values, winners = _attribution_columns(run_dir, layer, [a.index, b.index], all_rows)
    own_a, used_a = _own(run_dir, layer, a, all_rows, winners, s.top_k, say)
    own_b, used_b = _own(run_dir, layer, b, all_rows, winners, s.top_k, say)
    rows = np.union1d(_selection(all_rows, values[:, 0], winners == a.index, used_a),
                      _selection(all_rows, values[:, 1], winners == b.index, used_b))
    _warn_filler(say, f"'{a.name}' vs '{b.name}'", rows, all_rows[own_a | own_b])
    top_k = used_a if used_a == used_b else [used_a, used_b]
    if rows.size < 4:
        raise AtlasError(f"only {rows.size} samples matter for '{a.name}' or '{b.name}' at {layer}; sample more images or positions")
    picked = np.searchsorted(all_rows, rows)
    diff = values[picked, 1] - values[picked, 0]
    activations = store.read_rows(root[f"samples/{layer}/activations"], rows)
    raw, xy = difference_layout(diff, activations, s.seed)
    name = f"compare-{slug(a.name)}-vs-{slug(b.name)}"
    attrs = {"kind": "compare", "method": "attribution-difference x, 1-D t-SNE y", "seed": s.seed, "classes": [a.index, b.index],
             "class_names": [a.name, b.name], "axis_labels": [a.name, b.name], "top_k": top_k,
             "summary": {"method": "compare", "n": int(rows.size), "classes": [a.name, b.name]}}
    keys = _keys(run_dir, layer, name, rows, {"kind": "compare", "seed": s.seed, "top_k": top_k, "layout": attrs}, s.sizes, icons,
                 b.name)
    return _run(run_dir, layer, name, lambda: layout.save_layout(run_dir, layer, name, rows, raw, xy, np.ones(rows.size, bool), attrs),
                s, icons, net, b.name, keys)


def _annotate(run_dir, layer: str, atlas: str, extra: dict) -> None:
    node = store.open_store(run_dir, "r+")[f"layouts/{layer}/{atlas}"]
    node.attrs.update(extra)
