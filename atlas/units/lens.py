""":func:`units`: the unit lens over a sampled run, every part in order for each layer (top-k examples, projections,
visualisations, class scores and their check, the gallery), each resumable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from atlas import store
from atlas.errors import AtlasError
from atlas.settings import UnitsSettings, check_device, parse_channels
from atlas.units.receptive import check_unit_layers
from atlas.units.scores import write_class_scores


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
    from atlas.units.gallery import write_gallery
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
