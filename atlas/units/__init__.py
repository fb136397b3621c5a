"""The unit lens: what every channel of a layer responds to (Zeiler & Fergus 2014; Yosinski et al. 2015).

For each channel ("unit") of the requested layers of a sampled run, :func:`units` stores under
``units/{layer}/`` of the run's store (docs/units.md has the layout):

1. its top-k dataset examples: the k images of the run whose maximum activation over positions is highest, the
   position, the unit's receptive field there and the patch it covers (one streamed pass, :mod:`atlas.units.topk`,
   receptive fields from the architecture, :mod:`atlas.units.receptive`);
2. their projections back to pixels: deconvnet, guided backpropagation or the plain gradient
   (:mod:`atlas.units.projections`);
3. regularised feature visualisations: Yosinski et al.'s pixel-space presets, the project's FFT + decorrelated
   colour, transparent (alpha) images and diverse sets (:mod:`atlas.units.features`);
4. the classes it contributes to most, from the run's attributions (:func:`class_scores`), checked against the
   unit's direct effect on each logit over its top examples (:mod:`atlas.units.effects`);

then writes the unit gallery under ``RUN/tiles/units/{layer}/`` (:mod:`atlas.units.gallery`), reachable from the
atlas viewer. Every part is resumable: a rerun computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from atlas import store
from atlas.errors import AtlasError
from atlas.settings import UnitsSettings, check_device, parse_channels
from atlas.units.receptive import Field, check_unit_layers, receptive_field

__all__ = ["Field", "UnitsSettings", "class_scores", "check_unit_layers", "fit_patch", "max_positions", "project_units", "receptive_field",
           "projection_method", "to_display", "units", "write_class_scores", "write_gallery"]


# The lens's array cores other instruments build on (atlas.inspect, atlas.weights): re-exported here so that they
# use the lens through its top module. Imported lazily: they pull in torch and PIL.
def project_units(*args, **kwargs):
    """See :func:`atlas.units.projections.project_units`."""
    from atlas.units.projections import project_units as _project

    return _project(*args, **kwargs)


def projection_method(*args, **kwargs):
    """See :func:`atlas.units.projections.projection_method`."""
    from atlas.units.projections import projection_method as _method

    return _method(*args, **kwargs)


def to_display(*args, **kwargs):
    """See :func:`atlas.units.projections.to_display`."""
    from atlas.units.projections import to_display as _display

    return _display(*args, **kwargs)


def max_positions(acts):
    """See :func:`atlas.units.topk.max_positions`."""
    from atlas.units.topk import max_positions as _max

    return _max(acts)


def fit_patch(*args, **kwargs):
    """See :func:`atlas.units.topk.fit_patch`."""
    from atlas.units.topk import fit_patch as _fit

    return _fit(*args, **kwargs)


def write_gallery(run_dir: str | Path, layer: str) -> Path:
    """(Re)write the unit gallery of ``layer`` from what the store holds (``atlas build``'s last step); see
    :func:`atlas.units.gallery.write_gallery`."""
    from atlas.units import gallery

    return gallery.write_gallery(run_dir, layer)

TOP_CLASSES = 5


def class_scores(activations, attributions, top: int = TOP_CLASSES, block: int = 65536,
                 valid=None) -> tuple[np.ndarray, np.ndarray]:
    """The classes each unit contributes to most: the activation-weighted mean attribution.

    For unit c and class k the score is ``sum_n a[n, c] * attr[n, k] / sum_n a[n, c]`` over the sampled rows n,
    where ``attr[n, k] = h_n . d logit_k / d h_n`` is the stored attribution of row n (all channels together): the
    mean attribution to k of the positions where the unit is active, each counted as strongly as the unit fires.
    The stored attributions do not split by channel, so this is the closest cheap reading; a unit that never
    fires gets no classes.

    Parameters
    ----------
    activations : array-like, shape (N, C)
        Non-negative activations of the sampled rows (numpy or zarr; read in blocks of ``block`` rows).
    attributions : array-like, shape (N, K)
        Their attributions to every class.
    top : int, default 5, >= 1
        Classes kept per unit.
    block : int, default 65536, >= 1
        Rows read at a time.
    valid : array-like of bool, shape (N,), or None, default None
        Rows to count (e.g. ``samples/{layer}/valid``: rows of unreadable images are not); None: all.

    Returns
    -------
    (classes, scores) : (ndarray of shape (C, top) int32, ndarray of shape (C, top) float32)
        Class indices by descending score; -1 (and NaN) pad units that never fire and layers with fewer classes.
    """
    n, c = activations.shape
    k = attributions.shape[1]
    weighted = np.zeros((c, k), np.float64)
    total = np.zeros(c, np.float64)
    for start in range(0, n, block):  # blocks straight from the arrays: a 1M-row store is never held in memory
        a = np.maximum(np.asarray(activations[start:start + block], np.float64), 0.0)
        if valid is not None:
            a[~np.asarray(valid[start:start + block], bool)] = 0.0
        weighted += a.T @ np.asarray(attributions[start:start + block], np.float64)
        total += a.sum(0)
    keep = min(top, k)
    classes = np.full((c, top), -1, np.int32)
    scores = np.full((c, top), np.nan, np.float32)
    alive = total > 0
    if alive.any() and keep:
        mean = weighted[alive] / total[alive, None]
        order = np.argsort(-mean, axis=1, kind="stable")[:, :keep]
        classes[alive, :keep] = order
        scores[alive, :keep] = np.take_along_axis(mean, order, 1)
    return classes, scores


@store.writer
def write_class_scores(run_dir: str | Path, layer: str) -> dict | None:
    """Store :func:`class_scores` of ``layer`` as ``units/{layer}/classes/{top,score}``; None when the run has no attributions."""
    root = store.open_for_update(run_dir)
    group = store.require_layer(root, layer)
    if "attributions" not in group or group["attributions"].shape[1] == 0:
        return None
    store.verify(run_dir, [f"samples/{layer}"])
    # what the scores are computed from, by the seals the store keeps of it: unchanged samples are not read again
    seals = store.read_ledger(run_dir)["seals"]
    source = hashlib.sha256(json.dumps([seals.get(f"samples/{layer}/{name}") for name in ("activations", "attributions", "valid")],
                                       sort_keys=True).encode()).hexdigest()[:16]
    units_node = root.get(f"units/{layer}/classes")
    if units_node is not None and store.attrs(units_node).get("source") == source and seals.get(f"units/{layer}/classes/top"):
        store.verify(run_dir, [f"units/{layer}/classes"])
        return dict(store.attrs(units_node).get("summary", {}))
    valid = group["valid"][:]
    classes, scores = class_scores(group["activations"], group["attributions"], valid=valid)
    path = f"units/{layer}/classes"
    store.begin_stage(run_dir, "units", [path])
    node = root.require_group("units").require_group(layer)
    if "classes" in node:
        del node["classes"]
    out = node.create_group("classes")
    store.write_array(out, "top", classes)
    store.write_array(out, "score", scores)
    summary = {"rows": int(valid.sum()), "units_with_classes": int((classes[:, 0] >= 0).sum())}
    out.attrs.update({"summary": summary, "method": "activation-weighted mean attribution", "source": source})
    store.finish_stage(run_dir, "units", [path])
    return summary


def _settings(settings: UnitsSettings | None, options: dict) -> UnitsSettings:
    return UnitsSettings.merged(settings, options)


@store.writer
def units(run_dir: str | Path, layers: Sequence[str] | str | None = None, settings: UnitsSettings | None = None, *,
          net=None, progress: bool = True, echo: Callable[[str], None] | None = print, gallery: bool = True, engine="local",
          **options) -> dict:
    """Run the unit lens on a sampled run: top-k examples, projections, visualisations, class scores, gallery.

    Parameters
    ----------
    run_dir : str or Path
        A run folder written by ``atlas sample`` (or ``atlas build``); its image files must still be where the
        run's image list says.
    layers : str, sequence of str or None, default None
        Convolutional layers of the run's model (any layer with spatial positions, sampled or not); None: the
        layers the run sampled.
    settings : UnitsSettings or None, default None
        Every setting (:class:`atlas.settings.UnitsSettings`: ``top_k`` 9, ``channels`` None (all), ``patch`` 64,
        ``projections`` ("auto",: the deconvnet on a ReLU network, the gradient on any other), ``kinds`` (fft, the
        four Yosinski presets, alpha, diverse), ``objective`` "channel" (or "neuron": the centre position),
        ``n_diverse`` 4, ``size`` 80, ``steps`` 256, ``seed`` 0; speed: ``batch``, ``batch_size``, ``workers``,
        ``device``).
    net : atlas.models.Network or None, default None
        The run's model, already loaded; None: loaded from the store's ``model`` and ``weights``.
    progress : bool, default True
        Progress bars (only on a terminal).
    echo : callable or None, default print
        Receives one line per part as it starts.
    gallery : bool, default True
        Also write the unit gallery (``atlas build`` writes it in a later step of its own, after the atlas tiles).
    engine : "local", "ray" or an :class:`atlas.engine.Engine`, default "local"
        Where the top-k pass's shards run (docs/ray.md); the other parts run here.
    **options
        Overrides of single settings, e.g. ``units(run, "mixed4c", channels="0-63", kinds=["fft"])``.

    Returns
    -------
    dict
        ``{layer: {"channels": [...], "top": summary, "projections": {method: summary}, "vis": summary,
        "classes": summary or None, "effects": summary, "gallery": path (with ``gallery``)}}`` and ``"seconds"``.

    Raises
    ------
    AtlasError
        One line, before any work, for a run folder without a store, an unknown setting or value, an unknown layer
        or one without spatial positions (the valid ones listed), channel ranges out of bounds, a device this
        machine lacks, the deconvnet or guided backpropagation on a model that is no ReLU network; during the pass
        for a run whose photos are missing (the folder named).
    """
    from atlas.models import load_run_model

    s = _settings(settings, options)
    say = echo or (lambda _line: None)
    start = time.perf_counter()
    root = store.open_store(run_dir)
    meta = store.attrs(root)
    if "images" not in root or "path" not in root["images"]:
        raise AtlasError(f"{run_dir} has no image list yet; run `atlas sample` first")
    check_device(s.device)
    net = net if net is not None else load_run_model(meta, s.device)
    if layers is None:
        layers = list(meta.get("layers") or [])
    layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not layers:
        raise AtlasError("give at least one layer (--layer NAME)")
    crop = int((meta.get("preprocessing") or {}).get("crop", 224))
    shapes = check_unit_layers(net, layers, crop)
    chosen = {layer: parse_channels(s.channels, shapes[layer][0], layer) for layer in layers}
    # imported once everything is checked: a bad option costs no import of the optimisation machinery
    from atlas.units.effects import write_effects
    from atlas.units.features import write_visualizations
    from atlas.units.projections import projection_method, write_projections
    from atlas.units.topk import top_examples

    # "auto" is the deconvnet on a ReLU network and the gradient on any other (a ViT); the deconvnet or guided
    # backpropagation asked for on a model that is no ReLU network is refused here, in one line, before any work.
    methods = {layer: list(dict.fromkeys(projection_method(net, layer, m, crop) for m in s.projections)) for layer in layers}

    report: dict = {}
    for layer in layers:
        c = shapes[layer][0]
        picked = None if len(chosen[layer]) == c else chosen[layer]
        say(f"units {layer}: top-{s.top_k} examples of {len(chosen[layer])} of {c} channels")
        entry: dict = {"channels": chosen[layer]}
        entry["top"] = top_examples(run_dir, [layer], k=s.top_k, channels=picked, patch=s.patch, batch_size=s.batch_size,
                                    workers=s.workers, device=s.device, progress=progress, net=net, engine=engine)
        entry["projections"] = {}
        for method in methods[layer]:
            say(f"units {layer}: {method} projections")
            entry["projections"][method] = write_projections(run_dir, layer, method=method, channels=picked, device=s.device,
                                                             progress=progress, net=net)
        if s.kinds:
            say(f"units {layer}: visualisations ({', '.join(s.kinds)}; {s.steps} steps, {s.size} px)")
            entry["vis"] = write_visualizations(run_dir, layer, kinds=list(s.kinds), channels=picked, n_diverse=s.n_diverse,
                                                size=s.size, steps=s.steps, seed=s.seed, batch=s.batch, device=s.device,
                                                progress=progress, net=net, objective=s.objective)
        entry["classes"] = write_class_scores(run_dir, layer) if "samples" in root and layer in root["samples"] else None
        say(f"units {layer}: direct class effects (the unit's own change of each logit on its top examples)")
        entry["effects"] = write_effects(run_dir, layer, channels=picked, net=net, device=s.device, progress=progress)
        if gallery:
            entry["gallery"] = str(write_gallery(run_dir, layer))
            say(f"units {layer}: gallery -> {entry['gallery']}")
        report[layer] = entry
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report
