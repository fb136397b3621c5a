"""Correspondence analysis (Zeiler & Fergus 2014, Sec. 5.1 and Table 1): occlude the same part (an eye, the nose)
in several images and measure how consistently the representation changes, against boxes of the same size at
random positions.

For image ``i`` and layer ``l``: ``eps_i = x_i - x~_i``, the layer's feature vector (the whole map, flattened) of
the original minus that of the occluded image. The paper's measure is
``Delta_l = sum over ordered pairs i != j of Hamming(sign(eps_i), sign(eps_j))``: lower means the part's occlusion
changes the images' representations the same way (a correspondence the network has learnt). Its Table 1 prints the
*mean feature sign change*: the Hamming distance as a fraction of the vector's length, averaged over the pairs
(``mean`` here, with ``std`` over the pairs). For the random baseline each image's box is moved to a uniformly
random position of the same size (``n_random`` trials from ``seed``); its numbers are the means over the trials
(``std``: over the trials), and the table's "random" row averages every part's random trials.

**Boxes file** (``--boxes FILE``, :func:`parse_boxes`): a JSON object whose keys are part names and whose values
map an image to its box ``[top, left, bottom, right]`` in whole pixels of the 224 x 224 crop the model sees
(``read_image``'s centre crop; bottom and right exclusive, so ``[0, 0, 224, 224]`` is the whole crop). An image is
named by its path as given on the command line, its file name, or its file name without the suffix. A part may
leave images out; it needs boxes in at least two images::

    {"left eye":  {"dog1.jpg": [60, 70, 90, 100], "dog2.jpg": [52, 88, 80, 116]},
     "nose":      {"dog1":     [100, 90, 130, 130], "dog2":    [96, 100, 126, 140]}}
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from atlas.errors import AtlasError
from atlas.inspect.engine import batched_forward
from atlas.models import Network

Box = tuple[int, int, int, int]  # top, left, bottom (exclusive), right (exclusive), pixels of the crop
RANDOM = "random"


# --------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------
def _image_index(key: str, names: Sequence[str], source: str) -> int:
    """The image ``key`` names: its path as given, file name or stem; unknown or ambiguous keys are one line."""
    hits = [i for i, name in enumerate(names) if key in (name, Path(name).name, Path(name).stem)]
    exact = [i for i in hits if names[i] == key]
    if exact:
        return exact[0]
    if len(hits) == 1:
        return hits[0]
    shown = ", ".join(Path(n).name for n in names[:6]) + (", ..." if len(names) > 6 else "")
    if not hits:
        raise AtlasError(f"{source}: image '{key}' is not among the images given ({shown})")
    raise AtlasError(f"{source}: image '{key}' names several of the images given; use its path")


def check_box(box, size: int, where: str) -> Box:
    """``box`` as a ``(top, left, bottom, right)`` tuple of whole pixels inside ``size`` x ``size`` with an area."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise AtlasError(f"{where}: a box is [top, left, bottom, right], got {json.dumps(box) if _jsonable(box) else box!r}")
    values = []
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
            raise AtlasError(f"{where}: box {list(box)} must be four whole pixel numbers")
        values.append(int(v))
    top, left, bottom, right = values
    if bottom <= top or right <= left:
        raise AtlasError(f"{where}: box {values} has zero area (bottom must exceed top and right exceed left)")
    if top < 0 or left < 0 or bottom > size or right > size:
        raise AtlasError(f"{where}: box {values} lies outside the {size} x {size} image (0 <= top < bottom <= {size}, same for left/right)")
    return top, left, bottom, right


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_boxes(source: str | Path | Mapping, names: Sequence[str], size: int = 224) -> dict[str, list[Box | None]]:
    """The boxes of a boxes file (a path, or its already-parsed object) as ``{part: [box or None per image]}``, in the
    order of ``names`` (the images as given). Every problem is one line naming the file, the part and the image."""
    where = str(source) if not isinstance(source, Mapping) else "boxes"
    if isinstance(source, Mapping):
        data = source
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AtlasError(f"boxes file {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AtlasError(f"boxes file {path}: cannot read it ({' '.join(str(exc).split())[:120]})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AtlasError(f"boxes file {path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        where = f"boxes file {path}"
    if not isinstance(data, Mapping) or not data:
        raise AtlasError(f"{where}: must be a JSON object {{part: {{image: [top, left, bottom, right]}}}} with at least one part")
    parts: dict[str, list[Box | None]] = {}
    for part, per_image in data.items():
        if part == RANDOM:
            raise AtlasError(f"{where}: '{RANDOM}' is the name of the baseline row; call the part something else")
        if not isinstance(per_image, Mapping):
            raise AtlasError(f"{where}: part '{part}' must map images to boxes, got {type(per_image).__name__}")
        boxes: list[Box | None] = [None] * len(names)
        for key, box in per_image.items():
            i = _image_index(str(key), names, f"{where}, part '{part}'")
            if boxes[i] is not None:
                raise AtlasError(f"{where}, part '{part}': image '{names[i]}' has two boxes")
            boxes[i] = check_box(box, size, f"{where}, part '{part}', image '{key}'")
        if sum(b is not None for b in boxes) < 2:
            raise AtlasError(f"{where}, part '{part}': needs boxes in at least two images (the measure compares pairs)")
        parts[str(part)] = boxes
    return parts


def random_boxes(boxes: Sequence[Box | None], n_random: int, rng: np.random.Generator, size: int) -> list[list[Box | None]]:
    """``n_random`` trials of each image's box moved to a uniformly random position of the same size."""
    trials = []
    for _ in range(n_random):
        trial: list[Box | None] = []
        for box in boxes:
            if box is None:
                trial.append(None)
                continue
            h, w = box[2] - box[0], box[3] - box[1]
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            trial.append((top, left, top + h, left + w))
        trials.append(trial)
    return trials


# --------------------------------------------------------------------------------------
# The measure
# --------------------------------------------------------------------------------------
def sign_change(signs: np.ndarray) -> tuple[int, float, float]:
    """For the sign vectors ``signs`` (m, D) of m images' feature changes: (Delta = the sum over ordered pairs
    i != j of their Hamming distances, the mean over the pairs of the Hamming distance as a fraction of D, its std)."""
    m, d = signs.shape
    pair = [int(np.count_nonzero(signs[i] != signs[j])) for i in range(m) for j in range(i + 1, m)]
    if not pair:
        return 0, math.nan, math.nan
    fractions = np.asarray(pair, dtype=np.float64) / d
    return 2 * sum(pair), float(fractions.mean()), float(fractions.std())


def occlude(images: torch.Tensor, boxes: Sequence[Box | None], fill: float | Sequence[float] = 0.5) -> torch.Tensor:
    """Copies of the images that have a box, each with its box filled with ``fill`` (grey)."""
    value = torch.as_tensor(fill, dtype=images.dtype).reshape(-1, 1, 1)
    out = []
    for image, box in zip(images, boxes, strict=True):
        if box is not None:
            edited = image.clone()
            top, left, bottom, right = box
            edited[:, top:bottom, left:right] = value
            out.append(edited)
    return torch.stack(out)


@dataclass
class CorrespondenceTable:
    """``parts[part][layer]`` and ``random[part][layer]``: ``{"delta", "mean", "std"}`` (see the module docstring);
    ``random_row[layer]`` the random trials of every part averaged; ``boxes``/``random_boxes`` what was occluded."""

    layers: list[str]
    n_images: int
    n_random: int
    seed: int
    parts: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    random: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    random_row: dict[str, dict[str, float]] = field(default_factory=dict)
    boxes: dict[str, list[Box | None]] = field(default_factory=dict)
    random_boxes: dict[str, list[list[Box | None]]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)


def correspondence(net: Network, images: torch.Tensor, boxes: Mapping[str, Sequence[Box | None]], layers: Sequence[str], *,
                   n_random: int = 10, seed: int = 0, fill: float | Sequence[float] = 0.5, batch_size: int = 32) -> CorrespondenceTable:
    """The correspondence measure of each part in ``boxes`` (``{part: [box or None per image]}``, as
    :func:`parse_boxes` returns) at each of ``layers``, and of ``n_random`` random boxes of the same sizes (seeded),
    for ``images`` ``(n, 3, H, W)`` RGB [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AtlasError(f"images must be a (n, 3, H, W) tensor, got {got}")
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise AtlasError("no layers given for the correspondence analysis")
    for layer in layers:
        net.resolve(layer)
    if not boxes:
        raise AtlasError("no boxes given for the correspondence analysis")
    if n_random < 0:
        raise AtlasError(f"n_random must be 0 or more, got {n_random}")
    n, size = images.shape[0], images.shape[2]
    if images.shape[3] != size:
        raise AtlasError(f"the correspondence images must be square crops, got {images.shape[2]} x {images.shape[3]}")
    checked: dict[str, list[Box | None]] = {}
    for part, per in boxes.items():
        if part == RANDOM:
            raise AtlasError(f"'{RANDOM}' is the name of the baseline row; call the part something else")
        if len(per) != n:
            raise AtlasError(f"part '{part}': {len(per)} boxes for {n} images (use None for an image without the part)")
        checked[part] = [None if b is None else check_box(b, size, f"part '{part}', image {i}") for i, b in enumerate(per)]
        if sum(b is not None for b in checked[part]) < 2:
            raise AtlasError(f"part '{part}': needs boxes in at least two images (the measure compares pairs)")
    rng = np.random.default_rng(seed)
    table = CorrespondenceTable(layers, n, n_random, seed, boxes=checked)
    chunk = max(1, min(batch_size, n))
    originals = _fixed_forward(net, images, layers, chunk)
    flat = {layer: originals[layer].reshape(n, -1).float() for layer in layers}
    table.dims = {layer: int(flat[layer].shape[1]) for layer in layers}

    def measure(part_boxes: Sequence[Box | None]) -> dict[str, tuple[int, float, float]]:
        keep = [i for i, b in enumerate(part_boxes) if b is not None]
        acts = _fixed_forward(net, occlude(images, part_boxes, fill), layers, chunk)
        result = {}
        for layer in layers:
            eps = flat[layer][keep] - acts[layer].reshape(len(keep), -1).float()
            result[layer] = sign_change(torch.sign(eps).to(torch.int8).numpy())
        return result

    for part, part_boxes in checked.items():
        table.parts[part] = {layer: dict(zip(("delta", "mean", "std"), v, strict=True)) for layer, v in measure(part_boxes).items()}
        trials = random_boxes(part_boxes, n_random, rng, size)
        table.random_boxes[part] = trials
        runs = [measure(trial) for trial in trials]
        table.random[part] = {layer: _over_trials([r[layer] for r in runs]) for layer in layers}
    for layer in layers:
        every = [table.random[part][layer] for part in checked]
        table.random_row[layer] = {"delta": float(np.mean([r["delta"] for r in every])), "mean": float(np.mean([r["mean"] for r in every])),
                                   "std": float(np.mean([r["std"] for r in every]))}
    return table


def _fixed_forward(net: Network, images: torch.Tensor, layers: Sequence[str], chunk: int) -> dict[str, torch.Tensor]:
    """Activations computed in batches of exactly ``chunk`` images (the last padded with copies). The CPU kernels'
    rounding depends on the batch size (a feature differs by ~1e-5 between a batch of 1 and of 5), and a sign is
    only meaningful if an unchanged feature gives eps exactly 0: so originals and occluded images always go through
    batches of one size."""
    n = images.shape[0]
    pad = (-n) % chunk
    if pad:
        images = torch.cat([images, images[-1:].expand(pad, *images.shape[1:])])
    acts, _ = batched_forward(net, images, layers, chunk)
    return {layer: a[:n] for layer, a in acts.items()}


def _over_trials(values: list[tuple[int, float, float]]) -> dict[str, float]:
    if not values:
        return {"delta": math.nan, "mean": math.nan, "std": math.nan}
    deltas = np.asarray([v[0] for v in values], dtype=np.float64)
    means = np.asarray([v[1] for v in values], dtype=np.float64)
    return {"delta": float(deltas.mean()), "mean": float(means.mean()), "std": float(means.std())}


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------
def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), 6)


def _cell(entry: Mapping[str, float]) -> str:
    if not math.isfinite(entry["mean"]):
        return "n/a"
    return f"{entry['mean']:.3f} ± {entry['std']:.3f} (Δ {entry['delta']:,.0f})"


def write_correspondence(table: CorrespondenceTable, out: Path, names: Sequence[str] | None = None) -> dict:
    """``correspondence.json`` in ``out``; returns ``{"json", "columns", "rows", "markdown", "html", ...}`` where
    ``rows`` are the parts then "random", each ``{"part", layer: {"delta", "mean", "std"}}`` (the paper's Table 1:
    mean feature sign change ± std, and the summed Hamming distance Delta)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = {**table.parts, RANDOM: table.random_row}

    def numbers(cells: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
        return {layer: {k: _num(v) for k, v in cells[layer].items()} for layer in table.layers}

    rows = [{"part": part, **numbers(cells)} for part, cells in full.items()]
    header = "| occluded | " + " | ".join(f"{layer}: mean sign change ± std (Δ)" for layer in table.layers) + " |"
    lines = [header, "|---|" + "---|" * len(table.layers)]
    lines += [f"| {part} | " + " | ".join(_cell(cells[layer]) for layer in table.layers) + " |" for part, cells in full.items()]
    head = "".join(f"<th>{html.escape(layer)}</th>" for layer in table.layers)
    body = "".join(f"<tr><th>{html.escape(part)}</th>" + "".join(f"<td>{html.escape(_cell(cells[layer]))}</td>" for layer in table.layers)
                   + "</tr>" for part, cells in full.items())
    html_table = f'<table class="correspondence"><thead><tr><th>occluded</th>{head}</tr></thead><tbody>{body}</tbody></table>'

    def listed(boxes: Sequence[Box | None]) -> list[list[int] | None]:
        return [list(b) if b else None for b in boxes]

    data = {"layers": table.layers, "n_images": table.n_images, "n_random": table.n_random, "seed": table.seed, "dims": table.dims,
            "images": list(names) if names is not None else None,
            "measure": "Delta = sum over ordered image pairs i != j of Hamming(sign(eps_i), sign(eps_j)), eps = features(original) - "
                       "features(occluded); mean = Hamming / vector length averaged over the pairs (std: over the pairs; random: over "
                       "the trials)",
            "rows": rows,
            "random_by_part": {part: numbers(cells) for part, cells in table.random.items()},
            "boxes": {part: listed(boxes) for part, boxes in table.boxes.items()},
            "random_boxes": {part: [listed(trial) for trial in trials] for part, trials in table.random_boxes.items()}}
    (out / "correspondence.json").write_text(json.dumps(data, indent=1))
    return {"json": "correspondence.json", "columns": table.layers, "rows": rows, "markdown": "\n".join(lines), "html": html_table,
            "n_images": table.n_images, "n_random": table.n_random}
