"""The concepts stage's writer: :func:`concepts` fits the dictionary, codes every sampled row and stores every part
under ``concepts/{layer}/`` of the run's store; :func:`read_concepts` reads it back (``Run.concepts``).

The store's layout::

    concepts/{layer}/                    attrs: key (what the fit depends on), method, sparsity, summary, top_k
    concepts/{layer}/dictionary/atoms    (K, C) float32 unit-norm concept directions; ``bias`` (C,), and for topk-sae
                                         ``encoder`` (C, K), ``encoder_bias`` (K,); attrs: scale, method, sparsity
    concepts/{layer}/codes               (n_rows, K) float32, one row per sampled row (rows of unreadable images 0)
    concepts/{layer}/top/{value,image,pos,box,patch}   each concept's top-k images by code, their receptive-field patches
    concepts/{layer}/classes/{top,score} (K, 5): the classes each concept contributes to most (with attributions)
    concepts/{layer}/veil/{size}/{mean,share,count}    mean code and share per cell of each whole-layer atlas grid
    concepts/{layer}/icons/{image,cosine,done}         each concept's feature visualisation
    concepts/{layer}/fit_done, top_done, classes_done  the parts' completion flags (written last)
"""


from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from atlas import store
from atlas.errors import AtlasError
from atlas.settings import ConceptsSettings, RenderSettings, check_device

STAGE = "concepts"
TOP_CLASSES = 5
TOP_SHARES = 5  # concepts listed per atlas cell in the viewer


class Concepts(NamedTuple):
    """A layer's stored dictionary (:meth:`atlas.Run.concepts`).

    ``atoms`` (K, C) float32 unit-norm concept directions; ``bias`` (C,); ``codes`` (N, K) float32, one row per sampled
    row of :meth:`atlas.Run.samples` (the same ``rows``); ``rows`` (N,) int64; ``method`` and ``sparsity``;
    ``summary`` (R^2, active concepts per sample, dead concepts, fit time); ``top_image`` (K, k) int64 and
    ``top_value`` (K, k) of each concept's top examples (-1 pads), ``top_classes`` (K, 5) int32 or None.
    """

    atoms: np.ndarray
    bias: np.ndarray
    codes: np.ndarray
    rows: np.ndarray
    method: str
    sparsity: int
    summary: dict
    top_image: np.ndarray | None
    top_value: np.ndarray | None
    top_classes: np.ndarray | None


def _source(run_dir: str | Path, layer: str) -> str:
    """What the dictionary is computed from, by the seals the store keeps of the samples (a changed sample: another key)."""
    seals = store.read_ledger(run_dir)["seals"]
    parts = [seals.get(f"samples/{layer}/{name}") for name in ("activations", "valid", "image_index", "position")]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _fit_key(s: ConceptsSettings, source: str) -> dict:
    key = {"method": s.method, "concepts": s.concepts, "seed": s.seed, "source": source}
    key |= {"sparsity": s.sparsity, "epochs": s.epochs} if s.method == "topk-sae" else {"max_iter": s.max_iter}
    return key


def _flag(group, name: str) -> bool:
    return name in group and bool(store.read_flags(group[name]).all())


def _set_flag(group, name: str, n: int = 1) -> None:
    store.write_array(group, name, np.ones(n, bool))


@store.writer
def concepts(run_dir: str | Path, layer: str, settings: ConceptsSettings | None = None, *, net=None, progress: bool = True,
             echo: Callable[[str], None] | None = print, panel: bool = True, **options) -> dict:
    """Learn a sparse dictionary of ``layer``'s sampled activations and place its concepts on the atlas.

    Parameters
    ----------
    run_dir : str or Path
        A run folder that sampled ``layer`` (``atlas sample`` or ``atlas build``).
    layer : str
        A sampled layer of the run.
    settings : ConceptsSettings or None, default None
        Every setting (:class:`atlas.settings.ConceptsSettings`: ``concepts`` 256, ``method`` "topk-sae", ``sparsity`` 8,
        ``epochs`` 20, ``max_iter`` 200, ``seed`` 0, ``top_k`` 9, ``patch`` 64, ``icons`` True, ``quality`` "draft",
        ``steps`` None, ``device`` "cpu"); None: the defaults.
    net : atlas.models.Network or None, default None
        The run's model, already loaded; None: loaded from the store when the patches or icons need it.
    progress : bool, default True
        Progress bars (only on a terminal).
    echo : callable or None, default print
        Receives one line per part as it starts, and each note (classes skipped, a fit restarted) once.
    panel : bool, default True
        Also write the viewer's concepts panel (:func:`write_panel`).
    **options
        Overrides of single settings, e.g. ``concepts(run, "mixed4c", concepts=64, method="nmf")``.

    Returns
    -------
    dict
        ``{"layer", "method", "concepts", "rows", "r2", "active_per_sample", "dead", "fit_seconds", "fitted" (False when
        the stored dictionary was kept), "classes" (bool), "veil" (grid sizes), "icons" (rendered now), "notes",
        "panel" (path or None), "seconds"}``.

    Raises
    ------
    AtlasError
        One line, before any work: no run, a layer the run did not sample (the sampled ones listed), more concepts
        than sampled rows, NMF on a layer with negative activations, a device this machine lacks.
    """
    s = ConceptsSettings.merged(settings, options)
    say = echo or (lambda _line: None)
    start = time.perf_counter()
    root = store.open_store(run_dir)
    rows = store.valid_rows(root, layer)  # a layer not sampled, or no samples: one line
    check_device(s.device)
    samples = root[f"samples/{layer}"]
    n_rows, channels = samples["activations"].shape
    if s.concepts > rows.size:
        raise AtlasError(f"{s.concepts} concepts need at least as many sampled rows; layer '{layer}' has {rows.size:,}: "
                         "ask for fewer (--concepts) or sample more (--per-image, --max-images)")

    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        say(f"concepts {layer}: {text}")

    source = _source(run_dir, layer)
    key = _fit_key(s, source)
    path = f"concepts/{layer}"
    node = root.get(path)
    fitted = False
    if node is not None and store.attrs(node).get("key") == key and _flag(node, "fit_done"):
        if path not in store.read_ledger(run_dir)["writing"]:  # a finished run's dictionary is checked; a killed one's is ours
            store.verify(run_dir, [f"{path}/dictionary", f"{path}/codes"])
        activations = None
    else:
        activations = store.read_rows(samples["activations"], rows)
        if s.method == "nmf" and float(activations.min()) < 0:
            raise AtlasError(f"nmf needs non-negative activations (a layer after a ReLU); '{layer}' has negative values: "
                             "use --method topk-sae")
        if node is not None:
            old = store.attrs(node).get("key")
            note("a previous fit with these settings was interrupted: fitting again from the start" if old == key
                 else "replacing the concepts stored with other settings or from other samples")
    root = store.open_for_update(run_dir)
    store.begin_stage(run_dir, STAGE, [path])
    if activations is not None:
        _fit(root, path, layer, s, key, rows, activations, n_rows, say)
        del activations
        fitted = True
    node = root[path]
    summary = dict(store.attrs(node)["summary"])
    atoms = node["dictionary/atoms"][:]
    codes = store.read_rows(node["codes"], rows)

    # --- top dataset patches, by code, one per image
    need_net = (not _flag(node, "top_done")) or (s.icons and not _icons_complete(node, s))
    if need_net and net is None:
        from atlas.models import load_run_model

        net = load_run_model(store.attrs(root), s.device)
    if not _flag(node, "top_done") or store.attrs(node).get("top_k") != [s.top_k, s.patch]:
        say(f"concepts {layer}: top-{s.top_k} dataset patches per concept")
        _write_top(run_dir, root, node, layer, rows, codes, s, net)
    # --- classes
    has_attr = "attributions" in samples and samples["attributions"].shape[1] > 0
    if not has_attr:
        note("the run was sampled without attributions: classes skipped")
    elif not _flag(node, "classes_done"):
        _write_classes(node, samples, rows, codes)
    # --- veil over every grid of the whole-layer atlas
    sizes = _write_veils(run_dir, root, node, layer, atoms, codes, rows, note)
    # --- icons
    rendered = 0
    if s.icons:
        rendered = _write_icons(root, node, layer, atoms, s, net, progress, say)
    store.finish_stage(run_dir, STAGE, [path])
    store.record_stage(run_dir, f"{STAGE}:{layer}", json.dumps(key, sort_keys=True), [path])
    report = {"layer": layer, "method": s.method, "concepts": s.concepts, **summary, "fitted": fitted, "classes": has_attr,
              "veil": sizes, "icons": rendered, "notes": notes, "panel": None}
    if panel:
        report["panel"] = str(write_panel(run_dir, layer))
        say(f"concepts {layer}: panel -> {report['panel']}")
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _fit(root, path: str, layer: str, s: ConceptsSettings, key: dict, rows: np.ndarray, activations: np.ndarray, n_rows: int,
         say) -> None:
    """Fit the dictionary on the sampled rows and store it, the codes of every row and the fit's summary; ``fit_done`` last."""
    from atlas.concepts import dictionary as dl

    channels = activations.shape[1]
    if path in root:
        del root[path]
    node = root.require_group(path)
    node.attrs.update({"key": key, "layer": layer, "method": s.method, "sparsity": s.sparsity if s.method == "topk-sae" else 0})
    say(f"concepts {layer}: fitting {s.concepts} concepts ({s.method}) to {rows.size:,} x {channels} activations")
    t0 = time.perf_counter()
    try:
        d, codes = dl.fit(activations, s.concepts, s.method, s.sparsity, epochs=s.epochs, max_iter=s.max_iter, seed=s.seed,
                          device=s.device)
    except ValueError as exc:
        raise AtlasError(str(exc)) from None
    fit_seconds = time.perf_counter() - t0
    summary = {"rows": int(rows.size), "channels": int(channels), "r2": round(dl.r2(activations, dl.reconstruct(d, codes)), 4),
               "active_per_sample": round(dl.active_per_sample(codes), 2), "dead": dl.dead_concepts(codes),
               "fit_seconds": round(fit_seconds, 1)}
    g = node.require_group("dictionary")
    store.write_array(g, "atoms", d.atoms)
    store.write_array(g, "bias", d.bias)
    if d.encoder is not None:
        store.write_array(g, "encoder", d.encoder)
        store.write_array(g, "encoder_bias", d.encoder_bias)
    g.attrs.update({"scale": d.scale, "method": d.method, "sparsity": d.sparsity})
    full = store.create_array(node, "codes", (n_rows, s.concepts), np.float32)
    for lo in range(0, rows.size, 65536):  # rows of unreadable images keep the fill value 0
        part = rows[lo:lo + 65536]
        full.set_orthogonal_selection((part, slice(None)), codes[lo:lo + 65536])
    node.attrs["summary"] = summary
    _set_flag(node, "fit_done")  # last: a kill before it refits, never uses half a dictionary
    say(f"concepts {layer}: R^2 {summary['r2']}, {summary['active_per_sample']} active per sample, {summary['dead']} dead, "
        f"{fit_seconds:.0f}s")


def _write_classes(node, samples, rows: np.ndarray, codes: np.ndarray) -> None:
    """The classes each concept contributes to most: the unit lens's class scores with the codes in place of a channel."""
    from atlas.units import class_scores

    attributions = store.read_rows(samples["attributions"], rows)
    top, score = class_scores(codes, attributions, top=TOP_CLASSES)
    g = node.require_group("classes")
    store.write_array(g, "top", top)
    store.write_array(g, "score", score)
    _set_flag(node, "classes_done")


def _write_top(run_dir, root, node, layer: str, rows: np.ndarray, codes: np.ndarray, s: ConceptsSettings, net) -> None:
    """Each concept's top images by code and the receptive-field patch at its best position (the unit lens's boxes)."""
    from atlas.concepts.place import top_examples

    samples = root[f"samples/{layer}"]
    image_index = samples["image_index"].get_coordinate_selection(rows)
    position = samples["position"].get_orthogonal_selection((rows, slice(None)))
    top = top_examples(codes, image_index, position, s.top_k)
    box, patches = example_patches(run_dir, layer, top, net, s.patch)
    g = node.require_group("top")
    for name, data in (("value", top.value), ("image", top.image), ("pos", top.pos), ("box", box), ("patch", patches)):
        store.write_array(g, name, data)
    node.attrs["top_k"] = [s.top_k, s.patch]
    _set_flag(node, "top_done")


def example_patches(run_dir: str | Path, layer: str, top, net, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """The receptive-field box and patch of every example of ``top`` (concepts' or channels'), cut from the run's photos.

    Parameters
    ----------
    run_dir : str or Path
        The run whose photos the examples index (``images/path`` of its store).
    layer : str
        The layer the examples' positions are in.
    top : atlas.units.topk.Top
        ``image`` (R, k) (-1: no example) and ``pos`` (R, k, 2) of each row's examples, as
        :func:`atlas.concepts.place.top_examples` returns them.
    net : atlas.models.Network
        The run's model (its receptive fields: a ViT token's own 16 px patch, a convolution's field).
    patch : int
        Side of the patches in pixels.

    Returns
    -------
    (ndarray of shape (R, k, 4) int32, ndarray of shape (R, k, patch, patch, 3) uint8)
        Boxes (top, left, bottom, right) in the model's input crop (-1 where no example) and the patches; the photos
        are read as the model reads them (its resize, crop and resampling: bicubic for most ViTs). A photo gone since
        sampling leaves its patches grey, logged in the run's log.
    """
    from concurrent.futures import ThreadPoolExecutor

    from atlas.data import load_image, photo_reading
    from atlas.units.receptive import receptive_field
    from atlas.units.topk import GREY, fit_patch

    root = store.open_store(run_dir)
    resize, crop, interpolation = photo_reading(store.attrs(root).get("preprocessing"))
    field = receptive_field(net, layer, crop)
    n, k = top.image.shape
    box = np.full((n, k, 4), -1, np.int32)
    patches = np.full((n, k, patch, patch, 3), GREY, np.uint8)
    by_image: dict[int, list[tuple[int, int]]] = {}
    for c, j in zip(*np.nonzero(top.image >= 0), strict=True):
        box[c, j] = field.box(int(top.pos[c, j, 0]), int(top.pos[c, j, 1]), crop)
        by_image.setdefault(int(top.image[c, j]), []).append((int(c), int(j)))
    paths = root["images/path"]

    def one(item: tuple[int, list[tuple[int, int]]]) -> str | None:
        image_index, slots = item
        try:
            image = load_image(str(paths[image_index]), resize, crop, interpolation)
        except (OSError, ValueError, SyntaxError) as exc:  # gone since sampling: its patches stay grey
            return f"concepts: patch of image {image_index} left grey: {exc}"
        for c, j in slots:
            patches[c, j] = fit_patch(image, box[c, j], patch)
        return None

    with ThreadPoolExecutor(2) as pool:  # decoding and resampling release the GIL
        for problem in pool.map(one, sorted(by_image.items())):
            if problem:
                store.log(run_dir, problem)
    return box, patches


def _write_veils(run_dir, root, node, layer: str, atoms: np.ndarray, codes: np.ndarray, rows: np.ndarray, note) -> list[int]:
    """Mean code and share per cell for every grid of the whole-layer atlas; a grid already veiled (same grid_id) is kept."""
    from atlas.concepts.place import shares, veil

    grids = root.get(f"grids/{layer}/{store.FULL_ATLAS}")
    layout = root.get(f"layouts/{layer}/{store.FULL_ATLAS}")
    if grids is None or layout is None:
        note("no atlas grid of this layer yet: the veil is skipped (run `atlas build`, or `atlas project` and `atlas grid`, "
             "then `atlas concepts` again)")
        return []
    store.verify(run_dir, [f"layouts/{layer}/{store.FULL_ATLAS}", f"grids/{layer}/{store.FULL_ATLAS}"])
    layout_rows = layout["rows"][:]
    where = np.searchsorted(rows, layout_rows)
    ok = (where < rows.size) & (rows[np.minimum(where, rows.size - 1)] == layout_rows)
    sizes = []
    out = node.require_group("veil")
    for name in sorted(grids.group_keys(), key=lambda v: int(v) if v.isdigit() else 0):
        if not name.isdigit():
            continue
        grid = grids[name]
        grid_id = store.attrs(grid).get("grid_id")
        have = out.get(name)
        if have is not None and store.attrs(have).get("grid_id") == grid_id and "share" in have:
            sizes.append(int(name))
            continue
        size = int(name)
        cell = grid["cell"][:]
        cell = np.where(ok, cell, -1)
        mean, count = veil(codes[np.minimum(where, rows.size - 1)], cell, size)
        share = shares(mean, atoms, grid["mean_activation"][:])
        g = out.require_group(name)
        store.write_array(g, "mean", mean)
        store.write_array(g, "share", share)
        store.write_array(g, "count", count)
        g.attrs.update({"grid_id": grid_id, "size": size})
        sizes.append(size)
    return sizes


def icon_settings(s: ConceptsSettings):
    """The renderer's settings of the concepts' icons (the ``quality`` preset's size and attempts, ``steps`` or the
    preset's) and the preset's batch size: ``(atlas.render.optimize.Settings, int)``."""
    from atlas.render.optimize import Settings

    preset = RenderSettings(quality=s.quality, steps=s.steps).preset()
    return Settings(size=preset["size"], steps=preset["steps"], attempts=preset["attempts"], screen=preset["screen"]), preset["batch"]


def _icons_complete(node, s: ConceptsSettings) -> bool:
    g = node.get("icons")
    if g is None or "done" not in g:
        return False
    settings, _ = icon_settings(s)
    return store.attrs(g).get("key") == [settings.key_dict(), s.seed] and bool(store.read_flags(g["done"]).all())


def layer_whitening(root, layer: str, rows: np.ndarray) -> np.ndarray:
    """The atlas's whitening matrix of the layer (the grid stage's), or the same matrix computed here when the run has
    no grid yet (not stored: the grid stage owns it).

    Parameters
    ----------
    root : zarr.Group
        The run's store.
    layer : str
        A sampled layer.
    rows : ndarray of int
        The layer's valid sampled rows (:func:`atlas.store.valid_rows`), used when the matrix is computed here.

    Returns
    -------
    ndarray of shape (C, C) float32
        The inverse of the activations' second moment (regularised as the grid stage does).
    """
    wpath = f"whitening/{layer}/matrix"
    if wpath in root:
        return root[wpath][...].astype(np.float32)
    from atlas.grid import WHITEN_EPS

    acts = root[f"samples/{layer}/activations"]
    moment = np.zeros((acts.shape[1],) * 2)
    for lo in range(0, rows.size, 65536):
        b = store.read_rows(acts, rows[lo:lo + 65536], np.float64)
        moment += b.T @ b
    moment /= rows.size
    eps = WHITEN_EPS * float(np.trace(moment)) / moment.shape[0] or WHITEN_EPS
    vals, vecs = np.linalg.eigh(moment + eps * np.eye(moment.shape[0]))
    return ((vecs / vals) @ vecs.T).astype(np.float32)


def _write_icons(root, node, layer: str, atoms: np.ndarray, s: ConceptsSettings, net, progress: bool, say) -> int:
    """One icon per concept: the renderer's direction objective on the atom, with the atlas's whitening; per batch."""
    from tqdm.auto import tqdm

    from atlas.render.run import render_batch

    settings, batch = icon_settings(s)
    n_concepts = atoms.shape[0]
    key = [settings.key_dict(), s.seed]
    g = node.get("icons")
    if g is None or store.attrs(g).get("key") != key or "done" not in g:
        if g is not None:
            del node["icons"]
        g = node.require_group("icons")
        store.create_array(g, "image", (n_concepts, settings.size, settings.size, 3), np.uint8,
                           chunks=(min(batch, n_concepts), settings.size, settings.size, 3))
        store.create_array(g, "cosine", (n_concepts,), np.float32, fill_value=float("nan"))
        store.create_array(g, "done", (n_concepts,), bool, chunks=(n_concepts,), fill_value=False)
        g.attrs["key"] = key
    done = store.read_flags(g["done"])
    todo = np.flatnonzero(~done)
    if todo.size == 0:
        return 0
    rows = store.valid_rows(root, layer)
    whitening = layer_whitening(root, layer, rows)
    say(f"concepts {layer}: {todo.size} icons ({s.quality}, {settings.steps} steps)")
    bar = tqdm(total=int(todo.size), unit="icon", desc=f"concept icons {layer}", disable=None if progress else True, dynamic_ncols=True)
    try:
        for lo in range(0, todo.size, batch):
            idx = todo[lo:lo + batch]
            seeds = [(s.seed, int(c), a) for c in idx for a in range(settings.attempts)]
            pixels, cosine, _, _ = render_batch(net, layer, atoms[idx], whitening, seeds, settings, s.device)
            g["image"].set_orthogonal_selection((idx,), pixels)
            g["cosine"].set_coordinate_selection(idx, cosine.astype(np.float32))
            flags = store.read_flags(g["done"])
            flags[idx] = True
            g["done"][:] = flags  # after the batch's pixels: a kill before it renders the batch again
            bar.update(len(idx))
    finally:
        bar.close()
    return int(todo.size)


def read_concepts(run_dir: str | Path, layer: str) -> Concepts:
    """The stored dictionary and codes of ``layer`` (:meth:`atlas.Run.concepts`), checked against the store's seals.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    layer : str
        A layer ``atlas concepts`` ran on.

    Returns
    -------
    Concepts

    Raises
    ------
    AtlasError
        When the layer has no concepts yet (the command to run named), or they are incomplete or damaged.
    """
    root = store.open_store(run_dir)
    path = f"concepts/{layer}"
    node = root.get(path)
    if node is None or not _flag(node, "fit_done"):
        have = sorted(root["concepts"].group_keys()) if "concepts" in root else []
        extra = f" (layers with concepts: {', '.join(have)})" if have else ""
        raise AtlasError(f"no concepts of layer '{layer}' in this run{extra}; run `atlas concepts RUN --layer {layer}` first")
    store.verify(run_dir, [path])
    rows = store.valid_rows(root, layer)
    a = store.attrs(node)
    top = node.get("top")
    classes = node.get("classes")
    return Concepts(node["dictionary/atoms"][:], node["dictionary/bias"][:], store.read_rows(node["codes"], rows), rows.astype(np.int64),
                    a.get("method", ""), int(a.get("sparsity", 0)), dict(a.get("summary", {})),
                    top["image"][:] if top is not None else None, top["value"][:] if top is not None else None,
                    classes["top"][:] if classes is not None else None)


def write_panel(run_dir: str | Path, layer: str) -> Path:
    """(Re)write the viewer's concepts panel of ``layer`` under ``RUN/tiles/concepts/{layer}/``; see
    :func:`atlas.concepts.panel.write_panel`."""
    from atlas.concepts import panel

    return panel.write_panel(run_dir, layer)
