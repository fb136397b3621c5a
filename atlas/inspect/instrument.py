""":func:`inspect`: checks the request, reads the photos, runs the parts the settings ask for on each photo and
publishes the report folder (the parts themselves are the sibling modules' array cores and writers).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from atlas import store
from atlas.data import photo_reading
from atlas.errors import AtlasError
from atlas.inspect.engine import forward, read_image, top_classes
from atlas.inspect.folder import _fresh, _galleries, _jsonable, _list_report, _prefixed, _publish, _safe, _save_png, _without_paths
from atlas.inspect.labels import _label_of, _run_labels
from atlas.inspect.onatlas import image_positions, place_on_atlas
from atlas.inspect.views import channel_grid, strongest_channel
from atlas.models.inference import run_kernels
from atlas.settings import InspectSettings, check_device, check_out_folder


def _settings(settings: InspectSettings | None, options: dict) -> InspectSettings:
    return InspectSettings.merged(settings, options)


def report_name(images: Sequence[str | os.PathLike]) -> str:
    """The report's folder name: the first image's file stem (plus ``-and-N`` for N more), safe for URLs."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "_", Path(os.fspath(images[0])).stem).strip("._") or "image"
    return stem[:80] + (f"-and-{len(images) - 1}" if len(images) > 1 else "")


def _model(run: Path | None, model: str | None, weights: str | None, device: str, net):
    """The network and the run's root attrs: the run's own model, or ``model``/``weights`` without a run."""
    from atlas.models import load_model, load_run_model

    if run is None:
        return (net if net is not None else load_model(model or "inceptionv1", weights, device)), None, {}
    root = store.open_store(run)
    meta = store.attrs(root)
    if model and meta.get("model") and model != meta["model"]:
        raise AtlasError(f"{run} was sampled with model {meta['model']}, not {model}; drop --model (the run's model is used)")
    return (net if net is not None else load_run_model(meta, device)), root, meta


@store.writer
def inspect(images: Sequence[str | os.PathLike] | str | os.PathLike, run: str | os.PathLike | None = None,
            settings: InspectSettings | None = None, out: str | os.PathLike | None = None, *, model: str | None = None,
            weights: str | None = None, net=None, name: str | None = None, echo: Callable[[str], None] | None = print,
            **options) -> dict:
    """Inspect one or more photos and write the report; returns its summary (``report.json``'s content).

    Parameters
    ----------
    images : path or sequence of paths
        Photos (any format atlas reads). An unreadable one is named in the report and on the console and the others
        are inspected; none readable is an error.
    run : path or None, default None
        A run folder (``atlas sample`` / ``atlas build``): its model is used, the report goes to
        ``RUN/tiles/inspect/NAME/`` (served by ``atlas serve``, linked into the atlas viewer) and the images are
        placed on the run's atlas. None: no placement, and ``out`` is required.
    settings : InspectSettings or None, default None
        Every setting (:class:`atlas.settings.InspectSettings`): which layers, parts and ranges.
    out : path or None, default None
        The report folder (default with a run: ``RUN/tiles/inspect/NAME``).
    model, weights : str or None, default None
        Without a run: the model (default ``inceptionv1``) and its weights file (the usual lookup when None).
    net : atlas.models.Network or None, default None
        An already loaded model (the run's, or ``model``'s).
    name : str or None, default None
        The report's name (default :func:`report_name` of the images).
    echo : callable or None, default print
        Receives one progress line per part.
    **options
        Overrides of single settings, e.g. ``inspect(photo, run, occlusion=False)``.

    Returns
    -------
    dict
        The report: ``{"name", "index" (path of index.html), "images": [...], "skipped": [...], ...}``.
    """
    s = _settings(settings, options)
    say = echo or (lambda _line: None)
    start = time.perf_counter()
    paths = _check_request(images, run, out, s)
    run_dir = Path(run) if run is not None else None
    net, root, meta = _model(run_dir, model, weights, s.device, net)
    if run_dir is not None and out is None:
        store.take_lock(run_dir)  # the report goes into the run's tiles/: one writer at a time
    # the run's record, else the model's own: resize, crop and resampling (bicubic for a ViT) as the sampler reads
    resize, crop, interpolation = photo_reading(meta.get("preprocessing") or net.preprocess)
    layer, shown = _layers(net, s, meta, crop)

    name = name or report_name(paths)
    target = Path(out) if out is not None else run_dir / "tiles" / "inspect" / name
    run_labels = _run_labels(root) if root is not None else {}
    galleries = _galleries(run_dir) if run_dir is not None else set()
    loaded, skipped = _read_photos(paths, resize, crop, say, interpolation)
    photos = _check_content(loaded, s, net, crop, resize, interpolation)

    work = target.with_name(target.name + ".partial")
    _fresh(work)
    try:
        summary = _report(loaded, skipped, photos, s, net, root, run_dir, out, layer, shown, name, galleries, run_labels, crop,
                          work, start, say)
    except BaseException:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # a failed report leaves no half-written folder behind
        raise
    _publish(work, target)
    if run_dir is not None and out is None:
        _list_report(run_dir, summary)
        if (run_dir / "tiles" / "atlases.json").is_file():  # a page being served now loads the overlay add-on too
            from atlas.viewer import install_viewer

            install_viewer(run_dir / "tiles")
    summary["index"] = str(target / "index.html")
    return summary


def _check_request(images: Sequence[str | os.PathLike] | str | os.PathLike, run: str | os.PathLike | None,
                   out: str | os.PathLike | None, s: InspectSettings) -> list[str]:
    """The image paths; one line, before the model loads, for no image, no destination, a bad device or boxes file."""
    paths = [os.fspath(images)] if isinstance(images, (str, os.PathLike)) else [os.fspath(p) for p in images]
    if not paths:
        raise AtlasError("give at least one image")
    if run is None and out is None:
        raise AtlasError("give --run RUN (the report goes into the run's viewer) or --out DIR")
    if out is not None:
        check_out_folder(out)
    check_device(s.device)
    if s.boxes is not None and not Path(s.boxes).is_file():  # before the model loads; its content is checked by parse_boxes
        raise AtlasError(f"--boxes {s.boxes}: no such file")
    return paths


def _layers(net, s: InspectSettings, meta: dict, crop: int) -> tuple[str, list[str]]:
    """The atlas layer (settings, else the run's first, else mixed4c) and the layers shown; one line for a layer
    without spatial positions."""
    from atlas.inspect import views

    layer = s.layer or ((meta.get("layers") or [None])[0]) or ("mixed4c" if "mixed4c" in net.layer_names() else None)
    shown = list(s.layers) or views.view_layers(net, crop)
    if layer is None:
        raise AtlasError(f"choose the atlas layer with --layer (model {net.name} has no mixed4c); layers: {', '.join(shown)}")
    shapes = net.layer_shapes(crop)
    for name_ in [layer, *shown]:
        net.resolve(name_)
        if len(shapes.get(name_) or shapes.get(net.aliases.get(name_, name_), ())) != 3:
            raise AtlasError(f"layer '{name_}' has no spatial positions; layers with positions: {', '.join(views.view_layers(net, crop))}")
    return layer, shown


def _read_photos(paths: list[str], resize: int, crop: int, say: Callable[[str], None],
                 interpolation: str = "bilinear") -> tuple[list, list[dict]]:
    """[(path, tensor, picture)] of the readable photos and the skipped ones with their error; none readable is one line."""
    loaded, skipped = [], []
    for path in paths:
        try:
            x, picture = read_image(path, resize, crop, interpolation)
        except AtlasError as exc:
            skipped.append({"path": path, "error": str(exc)})
            say(f"inspect: skipped {exc}")
            continue
        loaded.append((path, x, picture))
    if not loaded:
        raise AtlasError(f"no image could be read ({skipped[0]['error']})" if len(skipped) == 1 else
                         f"none of the {len(skipped)} images could be read (first: {skipped[0]['error']})")
    return loaded, skipped


def _check_content(loaded: list, s: InspectSettings, net, crop: int, resize: int = 256, interpolation: str = "bilinear"):
    """One line before any work for an unknown --label, a boxes file that does not fit the photos or a range that crops
    a photo away; returns the invariance part's photos (None when it is off)."""
    if s.label is not None:
        from atlas.classnames import resolve_class

        resolve_class(s.label, net.classes)
    if s.boxes is not None:
        from atlas.inspect.correspondence import parse_boxes

        parse_boxes(s.boxes, [p for p, _, _ in loaded], crop)
    if not s.invariance:
        return None
    from atlas.inspect.invariance import check_ranges

    return check_ranges([p for p, _, _ in loaded], s.shifts, s.scales, s.angles, [Path(p).name for p, _, _ in loaded], net.input_size,
                        resize, interpolation)


def _report(loaded, skipped, photos, s: InspectSettings, net, root, run_dir, out, layer: str, shown: list[str], name: str,
            galleries: set[str], run_labels: dict[str, int], crop: int, work: Path, start: float, say) -> dict:
    """Every part of the report for the loaded photos, written into ``work``; returns the summary."""
    from atlas.inspect import report as report_page

    summary: dict = {"name": name, "model": net.name, "weights": net.weights, "run": str(run_dir) if run_dir else None,
                     "layer": layer, "atlas": s.atlas, "settings": asdict(s), "images": [], "skipped": skipped,
                     "timings": {"load": round(time.perf_counter() - start, 2)}}
    timings = summary["timings"]

    def timed(part: str, since: float) -> None:  # seconds per part, summed over the images
        timings[part] = round(timings.get(part, 0.0) + time.perf_counter() - since, 2)

    targets = []
    for i, (path, x, picture) in enumerate(loaded):
        sub = f"{i:02d}-{report_name([path])}"
        (work / sub).mkdir(parents=True)
        t0 = time.perf_counter()
        label, source = _label_of(path, s, net, run_labels)
        acts, logits = forward(net, x[None].to(s.device), list(dict.fromkeys([*shown, layer])))
        top = top_classes(logits[0].cpu(), net.classes, s.top)
        target_class = label if label is not None else top[0]["index"]
        targets.append(target_class)
        say(f"inspect {Path(path).name}: {top[0]['name']} ({top[0]['probability']:.3f}); layer views of {len(shown)} layers")
        entry: dict = {"name": Path(path).name, "path": path, "folder": sub, "picture": f"{sub}/photo.png",
                       "label": None if label is None else {"index": label, "name": net.classes[label], "source": source},
                       "target": target_class, "top": top, "layers": []}
        _save_png(picture, work / sub / "photo.png")
        # unit cards are linked only from a report inside the run's viewer, where units.html is
        entry["layers"] = _layer_views(acts, shown, work, sub, galleries if out is None else set())
        timed("views", t0)
        if s.occlusion:
            t0 = time.perf_counter()
            from atlas.inspect.occlusion import occlusion_maps, write_occlusion

            say(f"inspect {Path(path).name}: occlusion ({s.occluder} px square, stride {s.stride}) at {layer}")
            result = occlusion_maps(net, x.to(s.device), layer, occluder=s.occluder, stride=s.stride, target=target_class,
                                    batch_size=s.batch_size)
            entry["occlusion"] = {"layer": layer, **_prefixed(write_occlusion(result, picture, work / sub, net.classes), sub)}
            timed("occlusion", t0)
        if root is not None:
            t0 = time.perf_counter()
            entry["atlas"] = _placement(run_dir, net, x.to(s.device), layer, target_class, s, work / sub, say, Path(path).name)
            if entry["atlas"] is not None:
                entry["atlas"] = _prefixed(entry["atlas"], sub)
            timed("atlas", t0)
        summary["images"].append(entry)

    names = [Path(p).name for p, _, _ in loaded]
    if s.invariance:
        t0 = time.perf_counter()
        summary["invariance"] = _invariance_part(net, photos, targets, s, work, names, say)
        timed("invariance", t0)
    if s.boxes is not None:
        t0 = time.perf_counter()
        summary["correspondence"] = _correspondence_part(net, loaded, layer, s, crop, work, names, say)
        timed("correspondence", t0)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if out is None:  # the report goes into the run's tiles/, which atlas serve serves: no path of this machine in it
        summary = _without_paths(summary, run_dir, [p for p, _, _ in loaded] + [e["path"] for e in skipped],
                                 [net.weights, s.boxes])
    (work / "report.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    report_page.write_page(summary, work)
    return summary


def _layer_views(acts: dict, shown: list[str], work: Path, sub: str, galleries: set[str]) -> list[dict]:
    """Each shown layer's channel grid written as ``SUB/layer-NAME.png``, its strongest channel and, where the run
    has a unit gallery of that layer, the link to its unit card."""
    views = []
    for layer_name in shown:
        a = acts[layer_name][0].float().cpu().numpy()
        pic, layout = channel_grid(a)
        strongest = strongest_channel(a)
        file = f"{sub}/layer-{_safe(layer_name)}.png"
        _save_png(pic, work / file)
        views.append({"layer": layer_name, "figure": file, "shape": list(a.shape), "layout": layout.as_dict(),
                      "strongest": strongest, "value": float(a[strongest].max()),
                      "unit_card": f"../../units.html#{layer_name}/{strongest}" if layer_name in galleries else None})
    return views


def _invariance_part(net, photos, targets: list[int], s: InspectSettings, work: Path, names: list[str], say) -> dict:
    """The invariance curves of every photo, written into ``work``."""
    from atlas.inspect.invariance import invariance_curves, write_invariance

    say(f"inspect: invariance curves ({len(s.shifts)} shifts, {len(s.scales)} scales, {len(s.angles)} angles)")
    curves = invariance_curves(net, photos, shifts=s.shifts, scales=s.scales, angles=s.angles,
                               low_layer=s.low_layer, high_layer=s.high_layer, targets=targets, batch_size=s.batch_size,
                               names=names)
    return write_invariance(curves, work, names)


def _correspondence_part(net, loaded: list, layer: str, s: InspectSettings, crop: int, work: Path, names: list[str], say) -> dict:
    """The correspondence analysis of the boxes file's parts across the photos, written into ``work``."""
    import torch

    from atlas.inspect.correspondence import correspondence, parse_boxes, write_correspondence
    from atlas.inspect.invariance import default_layers

    say(f"inspect: correspondence analysis ({s.n_random} random trials)")
    boxes = parse_boxes(s.boxes, [p for p, _, _ in loaded], crop)
    layers = list(dict.fromkeys([layer, s.high_layer or default_layers(net)[1]]))
    table = correspondence(net, torch.stack([x for _, x, _ in loaded]).to(s.device), boxes, layers, n_random=s.n_random,
                           seed=s.seed, batch_size=s.batch_size)
    return write_correspondence(table, work, names)


def _placement(run_dir: Path, net, x, layer: str, target: int, s: InspectSettings, folder: Path, say, shown: str):
    """The image on the atlas, or None (with a line saying why) when the run has no atlas of that layer yet."""
    from atlas.inspect.onatlas import write_placement

    root = store.open_store(run_dir)
    if "layouts" not in root or layer not in root["layouts"] or s.atlas not in root["layouts"][layer]:
        say(f"inspect {shown}: not placed on the atlas: the run has no layout '{s.atlas}' of {layer} yet (`atlas build`)")
        return None
    say(f"inspect {shown}: placing its {layer} activations on the atlas ({s.neighbors} nearest samples)")
    # the run's own arithmetic (precision, kernels): a photo of the run lands exactly on its samples
    acts, attribution, _hw, _t = image_positions(net, x, layer, target, arithmetic=run_kernels(store.attrs(root)))
    placement = place_on_atlas(run_dir, layer, acts, atlas=s.atlas, k=s.neighbors, net=net)
    return write_placement(run_dir, placement, attribution, folder, shown, target=target, classes=net.classes)
