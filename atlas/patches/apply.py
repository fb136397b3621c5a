"""One patch pasted into a set of photos at every size and position: :func:`patch_images`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.data import photo_reading
from atlas.errors import AtlasError
from atlas.patches.cells import CellRef, _cell_target, _square, cell_patch, load_patch, parse_cell
from atlas.patches.core import placements, resize_patch
from atlas.patches.images import CROP, augment_images, load_source
from atlas.patches.measure import _evaluate, _figure, _logits, _net_for, _resolve_target, _summary
from atlas.settings import PatchSettings


def patch_images(images: str | Path | Sequence[str | Path], patch: str | Path | np.ndarray | None = None, cell: CellRef | str | None = None,
                 cell_kind: str = "icon", target: str | int | None = None, settings: PatchSettings | None = None,
                 out: str | Path | None = None, model: str = "inceptionv1", weights: str | Path | None = None, net=None,
                 echo: Callable[[str], None] | None = None) -> dict:
    """Paste one patch into every image at every size and position of ``settings`` and report what it did.

    Parameters
    ----------
    images : folder, list file or list of paths
        The photos (prepared as the sampler does: shorter side 256, centre crop 224); ``settings.augment`` adds seeded
        crops and flips of each.
    patch : path or (h, w, 3) uint8 array, optional
        The patch picture (its centred square is used). Exactly one of ``patch`` and ``cell``.
    cell : CellRef or "RUN:LAYER:ATLAS:GRID:X,Y", optional
        An atlas cell whose icon (``cell_kind="icon"``) or best dataset patch (``"example"``) is the patch; the run's
        model is used.
    target : class name, synset or index, optional
        The class the patch should turn images into. Default: a cell's class (a class atlas's class, a compare
        atlas's second class, else the cell's top class), else the model's top-1 on the patch alone.
    settings : PatchSettings, optional
        Sizes, positions, random places, seed, augmentation, figure size, batch and device (``[patch]`` table).
    out : folder, optional
        Where ``report.json``, ``figure.png`` (the strongest examples) and ``patch.png`` go; None writes nothing.

    Returns
    -------
    dict
        ``target``, ``n_images``, ``n_variants``, ``flip_rate``, ``changed_rate``, ``mean_delta``, ``already_target``,
        ``per_place`` and ``per_image`` (before, after, flip rate, mean delta), ``seconds``, and ``files`` written.
    """
    settings = settings or PatchSettings()
    start = time.perf_counter()
    if (patch is None) == (cell is None):
        raise AtlasError("give exactly one of --patch FILE and --cell RUN:LAYER:ATLAS:GRID:X,Y")
    ref = parse_cell(cell) if isinstance(cell, str) else cell
    picture = cell_patch(ref, cell_kind) if ref is not None else load_patch(patch) if not isinstance(patch, np.ndarray) \
        else np.asarray(patch, np.uint8)
    if max(settings.sizes) > CROP:
        raise AtlasError(f"patch size {max(settings.sizes)} px is larger than the images ({CROP} x {CROP} px after the model's crop); "
                         f"use sizes up to {CROP}")
    net = net or _net_for(ref.run if ref else None, model, weights, settings.device)

    def own_class() -> int:
        return int(_logits(net, resize_patch(_square(picture), CROP)[None], 1, settings.device)[0].argmax())

    tgt = _resolve_target(target, net, (lambda: _cell_target(ref) if _cell_target(ref) is not None else own_class()) if ref else own_class)
    arrays, paths = load_source(images, None, photo_reading(net.preprocess))  # as the model reads photos
    arrays = augment_images(arrays, settings.augment, settings.seed)
    paths = paths + [f"{p} (variant {j + 1})" for p in paths for j in range(settings.augment)]
    before = _logits(net, arrays, settings.batch_size, settings.device)
    if echo:
        echo(f"pasting into {len(paths)} images x {len(placements(CROP, settings.sizes, settings.positions, settings.n_random))} places")
    result = _evaluate(net, arrays, before, picture, tgt, settings)
    report = _summary(result, paths, tgt, net.classes)
    report["patch"] = str(ref) + f" ({cell_kind})" if ref else (str(patch) if not isinstance(patch, np.ndarray) else "array")
    report["settings"] = settings.as_table()
    report["files"] = {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_square(picture)).save(out / "patch.png")
        fig = _figure(out / "figure.png", arrays, before, result, tgt, net.classes,
                      settings.figure, f"patch {Path(report['patch'].split(' (')[0]).name} -> {net.classes[tgt]}")
        report["files"] = {"patch": str(out / "patch.png"), "figure": str(fig) if fig else None, "report": str(out / "report.json")}
    report["seconds"] = time.perf_counter() - start
    if out is not None:
        (Path(out) / "report.json").write_text(json.dumps(report, indent=1))
    return report
