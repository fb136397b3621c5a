"""Features over training (Zeiler & Fergus 2014, Fig. 4): how each unit's strongest input changes from checkpoint to
checkpoint.

For every checkpoint (a state dict of one architecture, :func:`atlas.weights.load_checkpoint`) and every chosen unit
(a channel of one layer), :func:`evolve` finds the unit's strongest activation over an image set (the maximum over
images and positions), the patch of that image its receptive field covers there, and the projection of that one
activation back to pixels (deconvnet by default), all with the unit lens's machinery (:mod:`atlas.units`: its
``max_positions``, ``receptive_field``, ``fit_patch``, ``project_units`` and ``to_display``, so a cell here looks
like a top-1 example of ``atlas units``). :func:`write_evolution` draws one figure, units down and checkpoints
across, each cell the patch beside its projection with the activation written under it, and a JSON of the numbers.

The images are decoded once (shorter side 256, centre crop 224, as the models expect); an image that fails to decode
is skipped and counted, and an image set none of which decodes is one line. Each checkpoint is checked against the
architecture before any is evaluated, so a wrong file costs no work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from atlas.data import IMAGE_SUFFIXES, ImageDataset, ImageList, list_images, printable, storable_path
from atlas.errors import AtlasError
from atlas.models import Network
from atlas.settings import EvolutionSettings, check_device, parse_channels
from atlas.units import check_unit_layers, fit_patch, max_positions, project_units, receptive_field, to_display
from atlas.weights.checkpoint import check_checkpoint, load_checkpoint

RESIZE, CROP = 256, 224
GAP = 6  # pixels between cells
INNER = 3  # pixels between a cell's patch and its projection
BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)


@dataclass
class Evolution:
    """What :func:`evolve` found: K checkpoints x U units.

    ``values`` (K, U) float32 the strongest activation; ``image`` (K, U) int64 its index into ``images``; ``pos``
    (K, U, 2) int32 its (y, x) at the layer; ``box`` (K, U, 4) int32 the receptive field there (top, left, bottom,
    right in input pixels); ``patches`` and ``projections`` (K, U, P, P, 3) uint8.
    """

    layer: str
    channels: list[int]
    labels: list[str]
    checkpoints: list[str]
    images: list[str]
    skipped: int
    skipped_first: str
    values: np.ndarray
    image: np.ndarray
    pos: np.ndarray
    box: np.ndarray
    patches: np.ndarray
    projections: np.ndarray
    field: dict
    projection: str
    seconds: float = 0.0


def _settings(settings: EvolutionSettings | None, options: dict) -> EvolutionSettings:
    return EvolutionSettings.merged(settings, options)


def _labels(checkpoints: Sequence) -> list[str]:
    """Column titles: the file names (a Network: its weights' file name), numbered when two share one."""
    names = [Path(c.weights).name if isinstance(c, Network) and c.weights else f"checkpoint {i}" if isinstance(c, Network)
             else Path(c).name for i, c in enumerate(checkpoints)]
    return [name if names.count(name) == 1 else f"{i}: {name}" for i, name in enumerate(names)]


def _image_list(images) -> ImageList:
    """A folder or list file through :func:`list_images`; one image file, or a sequence of them, as given."""
    if isinstance(images, (str, Path)) and not (Path(images).is_file() and Path(images).suffix.lower() in IMAGE_SUFFIXES):
        return list_images(images)
    if isinstance(images, (str, Path)):
        images = [images]
    paths = [storable_path(Path(p).expanduser().absolute()) for p in images]
    if not paths:
        raise AtlasError("no images given")
    return ImageList(paths, np.full(len(paths), -1, np.int32), f"{len(paths)} images given")


def _decode(images: ImageList, batch_size: int, workers: int) -> tuple[torch.Tensor, list[str], int, str]:
    """All readable images as one uint8 tensor (N, 3, 224, 224), their paths, how many failed and the first failure."""
    loader = torch.utils.data.DataLoader(ImageDataset(images, RESIZE, CROP), batch_size=batch_size, num_workers=workers)
    kept, paths, failed, first = [], [], 0, ""
    for index, batch, errors in loader:
        ok = torch.tensor([not e for e in errors], dtype=torch.bool)
        for i, e in zip(index.tolist(), errors, strict=True):
            if e:
                failed += 1
                first = first or f"{printable(images.paths[i])}: {e}"
            else:
                paths.append(images.paths[i])
        if ok.any():
            kept.append(batch[ok].mul(255).round_().to(torch.uint8))
    if not kept:
        raise AtlasError(f"none of the {len(images)} images could be read (first: {first})")
    return torch.cat(kept), paths, failed, first


def _strongest(net: Network, layer: str, pixels: torch.Tensor, chosen: list[int], batch_size: int,
               device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit the largest activation over every image and position: value (U,), image index (U,), (y, x) (U, 2);
    among equal maxima the first image, then the first position in row-major order."""
    best = np.full(len(chosen), -np.inf, np.float32)
    where = np.zeros(len(chosen), np.int64)
    pos = np.zeros((len(chosen), 2), np.int32)
    index = torch.as_tensor(chosen)
    for lo in range(0, len(pixels), batch_size):
        x = pixels[lo:lo + batch_size].to(device).float().div_(255.0)
        with torch.inference_mode():
            acts = net.activations(x, [layer])[layer][:, index.to(device)]
            values, positions = max_positions(acts.float())
        values, positions = values.cpu().numpy(), positions.cpu().numpy()
        top = values.argmax(0)  # the first image of the batch with the largest value, per unit
        v = values[top, np.arange(len(chosen))]
        better = v > best
        best[better] = v[better]
        where[better] = lo + top[better]
        pos[better] = positions[top[better], np.flatnonzero(better)]
    return best, where, pos


def evolve(checkpoints: Sequence[str | Path | Network], images, layer: str | None = None, settings: EvolutionSettings | None = None,
           *, model: str = "inceptionv1", echo: Callable[[str], None] | None = None, **options) -> Evolution:
    """Each unit's strongest activation, its patch and its projection at every checkpoint.

    Parameters
    ----------
    checkpoints : sequence of paths (or Networks)
        State dicts of architecture ``model`` (``.safetensors``, ``.pth``, ``.pt``; see
        :func:`atlas.weights.load_checkpoint`), in training order; an already loaded Network may stand for one.
    images : folder, list file, one image file, or a sequence of image paths
        The image set searched (a folder or list file read by :func:`atlas.data.list_images`).
    layer : str
        A layer with spatial positions, e.g. ``conv2d0`` or ``mixed4c`` (overrides ``settings.layer``).
    settings : EvolutionSettings or None
        ``channels`` "0-7", ``patch`` 64, ``projection`` "deconvnet", ``max_images`` None (all), and speed:
        ``batch_size``, ``workers``, ``device``.
    model : str, default "inceptionv1"
        The architecture (a torchvision classifier name otherwise).
    echo : callable or None
        Receives one line per checkpoint as it starts.
    **options
        Overrides of single settings, e.g. ``channels="0-3"``.

    Raises
    ------
    AtlasError
        One line, before any evaluation, for: no checkpoint, a missing or unreadable file, a state dict of another
        architecture (its first mismatching key named), no layer, an unknown layer or one without positions, channels
        out of range; and for an image set none of which decodes (a few unreadable ones are skipped and counted).
    """
    s = _settings(settings, options | ({"layer": layer} if layer is not None else {}))
    say = echo or (lambda _line: None)
    start = time.perf_counter()
    if not checkpoints:
        raise AtlasError("give at least one checkpoint (--checkpoints A B ...)")
    if s.layer is None:
        raise AtlasError("give a layer whose units to follow (--layer NAME)")
    check_device(s.device)
    for c in checkpoints:  # every file is checked (exists, reads, fits) before any work
        if not isinstance(c, Network):
            check_checkpoint(c, model)
    listed = _image_list(images).head(s.max_images)
    first = checkpoints[0] if isinstance(checkpoints[0], Network) else load_checkpoint(checkpoints[0], model, s.device)
    shape = check_unit_layers(first, [s.layer], CROP)[s.layer]
    chosen = parse_channels(s.channels, shape[0], s.layer)
    field = receptive_field(first, s.layer, CROP)
    pixels, paths, failed, first_failure = _decode(listed, s.batch_size, s.workers)
    k, u, p = len(checkpoints), len(chosen), s.patch
    values = np.zeros((k, u), np.float32)
    image = np.zeros((k, u), np.int64)
    pos = np.zeros((k, u, 2), np.int32)
    box = np.zeros((k, u, 4), np.int32)
    patches = np.zeros((k, u, p, p, 3), np.uint8)
    projections = np.zeros((k, u, p, p, 3), np.uint8)
    labels = _labels(checkpoints)
    for i, c in enumerate(checkpoints):
        say(f"evolution {i + 1}/{k}: {labels[i]}")
        net = first if i == 0 else c if isinstance(c, Network) else load_checkpoint(c, model, s.device)
        net.module.to(s.device)
        values[i], image[i], pos[i] = _strongest(net, s.layer, pixels, chosen, s.batch_size, s.device)
        x = pixels[image[i]].to(s.device).float().div_(255.0)
        units = np.stack([np.asarray(chosen), pos[i, :, 0], pos[i, :, 1]], axis=1)
        projected = project_units(net, s.layer, x, units, method=s.projection)
        for j in range(u):
            box[i, j] = field.box(int(pos[i, j, 0]), int(pos[i, j, 1]), CROP)
            picture = Image.fromarray(pixels[image[i, j]].permute(1, 2, 0).numpy())
            patches[i, j] = fit_patch(picture, box[i, j], p)
            projections[i, j] = to_display(projected[j], box[i, j], p)
        first = net = None  # one checkpoint's weights in memory at a time
    return Evolution(layer=s.layer, channels=chosen, labels=labels,
                     checkpoints=[c.weights if isinstance(c, Network) else str(c) for c in checkpoints], images=paths,
                     skipped=failed, skipped_first=first_failure, values=values, image=image, pos=pos, box=box, patches=patches,
                     projections=projections, field=field.as_dict(), projection=s.projection,
                     seconds=round(time.perf_counter() - start, 2))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def layout(units: int, checkpoints: int, patch: int) -> dict:
    """Where :func:`write_evolution` puts things: ``cell(row, column) -> (x, y)`` of a cell's patch (its projection
    is ``patch + INNER`` to the right), the figure's ``size`` (width, height) and the header and label sizes."""
    line = max(14, patch // 4)
    left, head = 8 * line // 2 + GAP, 2 * line + GAP
    cell_w, cell_h = 2 * patch + INNER, patch + line + 2
    size = (left + checkpoints * (cell_w + GAP), head + units * (cell_h + GAP))

    def cell(row: int, column: int) -> tuple[int, int]:
        return left + column * (cell_w + GAP), head + row * (cell_h + GAP)

    return {"cell": cell, "size": size, "line": line, "left": left, "head": head, "cell_w": cell_w, "cell_h": cell_h}


def figure(result: Evolution) -> np.ndarray:
    """The figure as (H, W, 3) uint8: one row per unit, one column per checkpoint; each cell the unit's strongest
    patch, its projection to the right, and under them the activation and the image it came from."""
    k, u = result.values.shape
    p = result.patches.shape[2]
    g = layout(u, k, p)
    font = _font(g["line"] - 3)
    sheet = Image.new("RGB", g["size"], BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(result.labels):
        x, _ = g["cell"](0, column)
        text = label
        while len(text) > 4 and draw.textlength(text, font=font) > g["cell_w"]:
            text = text[:-2] + "\u2026" if not text.endswith("\u2026") else text[:-2] + "\u2026"
        draw.text((x + g["cell_w"] // 2, g["head"] - GAP), text, fill=TEXT, font=font, anchor="md")
    draw.text((GAP, GAP), f"{result.layer}", fill=TEXT, font=font)
    for row, channel in enumerate(result.channels):
        _, y = g["cell"](row, 0)
        draw.text((g["left"] - GAP, y + p // 2), f"unit {channel}", fill=TEXT, font=font, anchor="rm")
        for column in range(k):
            x, y = g["cell"](row, column)
            sheet.paste(Image.fromarray(result.patches[column, row]), (x, y))
            sheet.paste(Image.fromarray(result.projections[column, row]), (x + p + INNER, y))
            value = float(result.values[column, row])
            note = f"{value:.3g}" + (" (silent)" if value <= 0 else f"  img {int(result.image[column, row])}")
            draw.text((x, y + p + 1), note, fill=TEXT, font=font)
    return np.asarray(sheet, dtype=np.uint8)


def write_evolution(result: Evolution, out: str | Path) -> dict:
    """Write :func:`figure` as the PNG ``out`` and the numbers beside it (``out`` with ``.json``); returns the summary
    ``{"figure", "json", "layer", "channels", "checkpoints", "labels", "images", "skipped", "values", "image",
    "positions", "boxes", "field", "projection", "seconds"}`` (``image`` are image paths; rows are checkpoints)."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise AtlasError(f"--out {out}: the figure is a .png file")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(figure(result)).save(out)
    summary = {"figure": str(out), "json": str(out.with_suffix(".json")), "layer": result.layer, "channels": result.channels,
               "checkpoints": result.checkpoints, "labels": result.labels, "images": len(result.images), "skipped": result.skipped,
               "skipped_first": result.skipped_first, "values": result.values.astype(float).round(6).tolist(),
               "image": [[result.images[i] for i in row] for row in result.image.tolist()], "positions": result.pos.tolist(),
               "boxes": result.box.tolist(), "field": result.field, "projection": result.projection, "seconds": result.seconds}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary


def evolution(checkpoints: Sequence[str | Path | Network], images, layer: str | None = None, settings: EvolutionSettings | None = None,
              *, out: str | Path = "evolution.png", model: str = "inceptionv1", echo: Callable[[str], None] | None = None,
              **options) -> dict:
    """:func:`evolve` then :func:`write_evolution` to ``out``: the figure's path is the summary's ``"figure"``."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png" or out.is_dir():  # before any work
        raise AtlasError(f"--out {out}: the figure is a .png file")
    return write_evolution(evolve(checkpoints, images, layer, settings, model=model, echo=echo, **options), out)
