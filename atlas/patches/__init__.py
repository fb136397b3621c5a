"""Human-designed adversarial patches, the Activation Atlas article's last experiment, as tools.

``patch_images`` pastes one patch (any picture, or an atlas cell's icon or best dataset-example patch) into every
image at several sizes and positions and reports what it did to the model's top-1 prediction: per image and overall,
the top-1 before and after, the rate at which the prediction flips to a target class and the mean change of
logit(target) - logit(original), with a figure of the strongest examples.

``guided_search`` is the article's method of finding the steam locomotive that turns snorkels into scuba divers,
done automatically: the cells of a class-difference atlas (``atlas compare A B``) are ranked by their mean
attribution toward B (to B minus to A), each top cell's icon and best dataset patch is pasted into A's images, and
the cells are ranked by how often they flip A to B.

The arithmetic (placements, pasting, flip rate) is :mod:`atlas.patches.core`, pure functions on arrays. This
module reads the run's store only through :mod:`atlas.store` and the render stage's public ``sample_patches``.

Definitions (docs/experiments.md):

- an image's *original* class is the model's top-1 on it before pasting (not its label, which may be unknown);
- a *variant* is one image with the patch pasted at one size and one position;
- the *flip rate* is the share of variants whose top-1 is the target, among the variants of images whose original
  class is not already the target (those are counted apart, as ``already_target``);
- *delta* is (logit(target) - logit(original)) of the variant minus the same of the image.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from atlas import store
from atlas.classnames import resolve_class
from atlas.errors import AtlasError
from atlas.patches.core import CORNERS, NAMED, POSITIONS, Placement, expand_positions, flip_rate, outcome, paste, placements, resize_patch
from atlas.settings import PatchSettings

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the module
    from matplotlib.figure import Figure

__all__ = ["CORNERS", "NAMED", "POSITIONS", "CellRef", "Placement", "augment_images", "cell_patch", "expand_positions", "flip_rate",
           "guided_search", "load_patch", "load_source", "outcome", "parse_cell", "paste", "patch_images", "placements", "plot_patched",
           "resize_patch", "search_table"]

CROP, RESIZE = 224, 256  # the model's input, as the sampler prepares it
KINDS = ("icon", "example")
PICTURES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class CellRef:
    """One cell of an atlas grid: ``x`` to the right, ``y`` from the top (the store's arrays are indexed [y, x])."""

    run: Path
    layer: str
    atlas: str
    grid: int
    x: int
    y: int

    def __str__(self) -> str:
        return f"{self.run}:{self.layer}:{self.atlas}:{self.grid}:{self.x},{self.y}"


def parse_cell(spec: str) -> CellRef:
    """``RUN:LAYER:ATLAS:GRID:X,Y`` (the run folder may itself hold colons: the fields are split from the right)."""
    parts = str(spec).rsplit(":", 4)
    bad = f"--cell must be RUN:LAYER:ATLAS:GRID:X,Y (e.g. outputs/cpu:mixed4c:full:20:3,7); got {spec!r}"
    if len(parts) != 5 or not all(parts[:3]):
        raise AtlasError(bad)
    run, layer, atlas, grid, xy = parts
    x, _, y = xy.partition(",")
    if not (grid.strip().isdigit() and x.strip().isdigit() and y.strip().isdigit()):
        raise AtlasError(bad)
    return CellRef(Path(run), layer, atlas, int(grid), int(x), int(y))


# --------------------------------------------------------------------------------------
# Patches: a picture, or an atlas cell
# --------------------------------------------------------------------------------------
def load_patch(path: str | Path) -> np.ndarray:
    """(h, w, 3) uint8 RGB of a picture file; transparency is flattened onto mid grey (the sampler's padding colour)."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"patch file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info:
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (127, 127, 127, 255)), im)
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise AtlasError(f"cannot read the patch {path}: {exc}") from None


def _square(patch: np.ndarray) -> np.ndarray:
    """The largest centred square of a picture (patches are pasted as squares)."""
    h, w = patch.shape[:2]
    s = min(h, w)
    return patch[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def _check_layer(root, run_dir: Path, layer: str) -> None:
    """One line for a layer the run did not sample (a typo such as ``mixed9z``), before any talk of missing atlases."""
    sampled = sorted(root["samples"].group_keys()) if "samples" in root else []
    if layer not in sampled:
        raise AtlasError(f"unknown layer '{layer}' in {run_dir}: the run's layers are {', '.join(sampled) or 'none (sample it first)'}")


def _grid_group(root, cell: CellRef):
    _check_layer(root, cell.run, cell.layer)
    where = f"grids/{cell.layer}/{cell.atlas}/{cell.grid}"
    if f"grids/{cell.layer}/{cell.atlas}" not in root:
        have = sorted(root[f"grids/{cell.layer}"].group_keys()) if f"grids/{cell.layer}" in root else []
        raise AtlasError(f"no grids of atlas '{cell.atlas}' at layer '{cell.layer}' in {cell.run}; atlases: {', '.join(have) or 'none'}")
    if where not in root:
        sizes = sorted(int(k) for k in root[f"grids/{cell.layer}/{cell.atlas}"].group_keys() if k.isdigit())
        raise AtlasError(f"atlas {cell.layer}/{cell.atlas} has no {cell.grid}x{cell.grid} grid; "
                         f"grids: {', '.join(map(str, sizes)) or 'none'}")
    group = root[where]
    if not (0 <= cell.x < cell.grid and 0 <= cell.y < cell.grid):
        raise AtlasError(f"cell {cell.x},{cell.y} is outside the {cell.grid}x{cell.grid} grid (x and y run from 0 to {cell.grid - 1})")
    if int(group["count"][cell.y, cell.x]) == 0:
        raise AtlasError(f"cell {cell.x},{cell.y} of {cell.layer}/{cell.atlas} grid {cell.grid} is empty (no samples fell in it)")
    return group


def cell_patch(cell: CellRef | str, kind: str = "icon", size: int = 112) -> np.ndarray:
    """The patch of one atlas cell: its rendered icon (``kind="icon"``) or the dataset-example patch of its sample
    nearest the cell's mean (``kind="example"``, cut by :func:`atlas.render.sample_patches` at ``size`` px).

    One line for a cell outside the grid, an empty cell, or an icon not rendered (or rendered from an older grid).
    """
    cell = parse_cell(cell) if isinstance(cell, str) else cell
    if kind not in KINDS:
        raise AtlasError(f"unknown cell patch kind '{kind}'; use {', '.join(KINDS)}")
    root = store.open_store(cell.run)
    grid_path = f"grids/{cell.layer}/{cell.atlas}/{cell.grid}"
    group = _grid_group(root, cell)
    if kind == "icon":
        icons_path = f"icons/{cell.layer}/{cell.atlas}/{cell.grid}"
        if icons_path not in root or not bool(root[icons_path]["done"][cell.y, cell.x]):
            raise AtlasError(f"cell {cell.x},{cell.y} of {cell.layer}/{cell.atlas} grid {cell.grid} has no rendered icon; run "
                             f"`atlas render {cell.run} --layer {cell.layer} --atlas {cell.atlas} --grid {cell.grid}` "
                             "(or use its dataset patch: --cell-patch example)")
        store.verify(root, [grid_path, icons_path])
        return np.asarray(root[icons_path]["images"][cell.y, cell.x], np.uint8)
    store.verify(root, [grid_path, f"samples/{cell.layer}", "images"])
    rows = [int(r) for r in np.asarray(group["nearest"][cell.y, cell.x]).tolist() if r >= 0] if "nearest" in group else []
    if not rows:
        raise AtlasError(f"cell {cell.x},{cell.y} of {cell.layer}/{cell.atlas} grid {cell.grid} keeps no nearest samples; "
                         "re-run `atlas grid` with --nearest 1 or more")
    from atlas.render import sample_patches

    patch = np.asarray(sample_patches(cell.run, cell.layer, [rows[0]], size=size)[0], np.uint8)
    if (patch == 127).all():
        raise AtlasError(f"the image behind cell {cell.x},{cell.y} of {cell.layer}/{cell.atlas} cannot be read any more")
    return patch


def _cell_target(cell: CellRef) -> int | None:
    """The class an atlas cell argues for: a class atlas's class, a compare atlas's second class, else the cell's top class."""
    root = store.open_store(cell.run)
    layout = root.get(f"layouts/{cell.layer}/{cell.atlas}")
    classes = store.attrs(layout).get("classes") if layout is not None else None
    if classes:
        return int(classes[-1])
    group = root[f"grids/{cell.layer}/{cell.atlas}/{cell.grid}"]
    if "top_classes" in group:
        top = int(group["top_classes"][cell.y, cell.x, 0])
        return top if top >= 0 else None
    return None


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------
def augment_images(images: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``k`` seeded variants of every (N, S, S, 3) image, after the images themselves: a random square crop of 60 to
    100% of the side, scaled back to S, mirrored half of the time. Widens a source set of one photo per class."""
    if k <= 0:
        return images
    n, side = images.shape[0], images.shape[1]
    out = [images]
    for i in range(n):
        rng = np.random.default_rng([seed, i, 7])
        for _ in range(k):
            s = int(round(side * rng.uniform(0.6, 1.0)))
            top, left = (int(v) for v in rng.integers(0, side - s + 1, size=2))
            crop = Image.fromarray(images[i, top : top + s, left : left + s]).resize((side, side), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(np.asarray(crop, np.uint8)[None])
    return np.concatenate(out)


def load_source(images: str | Path | Sequence[str | Path], classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(N, 224, 224, 3) uint8 and the paths of a folder, a list file or a list of paths, prepared as the sampler does
    (shorter side 256, centre crop 224). Unreadable files are skipped and counted in the paths' absence; none readable
    is one line."""
    from atlas.data import class_table, list_images, load_image

    if isinstance(images, (str, Path)) and Path(images).suffix.lower() in PICTURES:  # one photo, not a list file
        listed = [str(images)]
    elif isinstance(images, (str, Path)):
        listed = list_images(images, class_table() if classes is None else classes).paths
    else:
        listed = [str(p) for p in images]
    arrays, kept = [], []
    for path in listed:
        try:
            arrays.append(np.asarray(load_image(path, RESIZE, CROP), np.uint8))
            kept.append(str(path))
        except (OSError, ValueError, SyntaxError):
            continue
    if not arrays:
        raise AtlasError(f"none of the {len(listed)} images of {images} could be read")
    return np.stack(arrays), kept


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------
def _logits(net, images: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """(N, K) float32 logits of uint8 (N, S, S, 3) images, batch by batch."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            out.append(net.module(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(net.classes)), np.float32)


def _evaluate(net, images: np.ndarray, before: np.ndarray, patch: np.ndarray, target: int, settings: PatchSettings) -> dict:
    """Paste ``patch`` into every image at every placement, run the model, and measure (arrays per variant)."""
    side = images.shape[1]
    square = _square(patch)
    resized = {s: resize_patch(square, s) for s in settings.sizes}
    places: list[tuple[int, Placement]] = []
    for i in range(images.shape[0]):
        places += [(i, p) for p in placements(side, settings.sizes, settings.positions, settings.n_random, settings.seed, i)]
    after = np.zeros((len(places), before.shape[1]), np.float32)
    chunk = max(settings.batch_size, 1)
    for start in range(0, len(places), chunk):
        batch = np.stack([paste(images[i], resized[p.size], p.top, p.left) for i, p in places[start : start + chunk]])
        after[start : start + batch.shape[0]] = _logits(net, batch, chunk, settings.device)
    image_of = np.array([i for i, _ in places], np.int64)
    result = outcome(before, after, image_of, target)
    result |= {"after": after, "image_of": image_of, "places": [p for _, p in places], "resized": resized}
    return result


def _summary(result: dict, paths: list[str], target: int, class_names: list[str]) -> dict:
    """Per-image and overall figures of one patch (JSON-able)."""
    image_of, flipped, eligible = result["image_of"], result["flipped"], result["eligible"]
    per_image = []
    for i, path in enumerate(paths):
        sel = image_of == i
        tops, counts = np.unique(result["top1"][sel], return_counts=True)
        per_image.append({"image": path, "before": class_names[int(result["original"][i])],
                          "after": class_names[int(tops[counts.argmax()])] if tops.size else None,
                          "after_share": float(counts.max() / counts.sum()) if tops.size else None,
                          "already_target": not bool(eligible[sel].any()) if sel.any() else None,
                          "flip_rate": flip_rate(flipped[sel], eligible[sel]), "mean_delta": float(result["delta"][sel].mean())})
    by_place: dict[str, list[int]] = {}
    for v, p in enumerate(result["places"]):
        by_place.setdefault(f"{p.size}px {p.name.split('-')[0] if p.name.startswith('random') else p.name}", []).append(v)
    places = {k: {"flip_rate": flip_rate(flipped[v], eligible[v]), "mean_delta": float(result["delta"][v].mean()), "n": len(v)}
              for k, v in by_place.items()}
    return {"target": class_names[target], "target_index": int(target), "n_images": len(paths), "n_variants": int(image_of.size),
            "already_target": int(sum(1 for r in per_image if r["already_target"])),
            "flip_rate": flip_rate(flipped, eligible), "changed_rate": float(result["changed"].mean()) if image_of.size else None,
            "mean_delta": float(result["delta"].mean()) if image_of.size else None,
            "n_flipped": int(np.count_nonzero(flipped)), "n_eligible": int(np.count_nonzero(eligible)),
            "per_place": places, "per_image": per_image}


def _strongest(result: dict, k: int) -> list[int]:
    """The ``k`` variants with the largest delta, at most one per image (the figure should show different photos)."""
    order = np.argsort(-result["delta"], kind="stable")
    seen, out = set(), []
    for v in order.tolist():
        i = int(result["image_of"][v])
        if i not in seen:
            seen.add(i)
            out.append(v)
        if len(out) == k:
            break
    return out


def plot_patched(images: np.ndarray, before: np.ndarray, result: dict, target: int, class_names: list[str], k: int,
                 title: str) -> Figure | None:
    """Each of the ``k`` strongest patched variants (one per image) under its image: class and probability before,
    after, and of the target; None when there is no variant.

    ``images`` (n, H, W, 3) uint8 and ``before`` (n, classes) logits are the unpatched photos and their logits,
    ``result`` the pasting's evaluation (the ``images``' variants, their logits and places), ``target`` the class the
    patch aims for, ``class_names`` the model's class names and ``title`` the figure's title. Returns a Figure of its
    own (no pyplot state; ``fig.savefig(path)`` writes it, a notebook shows it).
    """
    chosen = _strongest(result, k)
    if not chosen:
        return None
    from matplotlib.figure import Figure

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()

    fig = Figure(figsize=(max(2.4 * len(chosen), 5.0), 6.2), dpi=100)
    axes = fig.subplots(2, len(chosen), squeeze=False)
    for col, v in enumerate(chosen):
        i, place = int(result["image_of"][v]), result["places"][v]
        shown = paste(images[i], result["resized"][place.size], place.top, place.left)
        p0, p1 = softmax(before[i].astype(np.float64)), softmax(result["after"][v].astype(np.float64))
        orig, top = int(result["original"][i]), int(result["top1"][v])
        axes[0, col].imshow(images[i])
        axes[0, col].set_title(f"{class_names[orig][:22]}\n{p0[orig]:.2f}", fontsize=8)
        axes[1, col].imshow(shown)
        axes[1, col].set_title(f"{class_names[top][:22]} {p1[top]:.2f}\n{class_names[target][:16]} {p0[target]:.2f}->{p1[target]:.2f}",
                               fontsize=8, color="crimson" if top == target else "black")
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.06, hspace=0.42)  # room for two-line titles
    return fig


def _figure(path: Path, images: np.ndarray, before: np.ndarray, result: dict, target: int, class_names: list[str], k: int,
            title: str) -> Path | None:
    """:func:`plot_patched` saved to ``path``; the path, or None when there is nothing to draw."""
    fig = plot_patched(images, before, result, target, class_names, k, title)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _net_for(run: Path | None, model: str, weights: str | Path | None, device: str):
    from atlas.models import load_model, load_run_model

    if run is not None:
        return load_run_model(store.attrs(store.open_store(run)), device)
    return load_model(model, weights, device)


def _resolve_target(target: str | int | None, net, fallback: Callable[[], int | None]) -> int:
    if target is not None:
        return resolve_class(target, net.classes, net.weights).index
    found = fallback()
    if found is None:
        raise AtlasError("give --target CLASS: the patch names no class of its own")
    return int(found)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------
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
    arrays, paths = load_source(images, None)
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


def search_table(rows: list[dict]) -> str:
    """The ranked table of :func:`guided_search` as fixed-width text."""
    head = f"{'rank':>4}  {'cell':>7}  {'kind':<7}  {'attr B-A':>9}  {'flip rate':>9}  {'changed':>7}  {'mean delta':>10}"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows, 1):
        rate = "n/a" if r["flip_rate"] is None else f"{r['flip_rate']:.1%}"
        lines.append(f"{i:>4}  {r['x']:>3},{r['y']:<3}  {r['kind']:<7}  {r['attribution']:>9.3f}  {rate:>9}  {r['changed_rate']:>7.1%}  "
                     f"{r['mean_delta']:>10.2f}")
    return "\n".join(lines)


def guided_search(run_dir: str | Path, layer: str, atlas: str, images: str | Path | Sequence[str | Path] | None = None,
                  grid: int | None = None, settings: PatchSettings | None = None, near: bool = False, out: str | Path | None = None,
                  net=None, echo: Callable[[str], None] | None = None) -> dict:
    """Rank the cells of a class-difference atlas by attribution toward its second class B and measure how often each
    top cell's icon and best dataset patch, pasted into images of its first class A, flips them to B.

    Parameters
    ----------
    run_dir, layer, atlas : the run, layer and a ``compare-A-vs-B`` atlas of it (``atlas compare RUN --layer L A B``).
    images : folder, list file or list of paths, optional
        A's images. Default: the run's images labelled A, and with ``near`` also those whose stored top-5 holds A
        (never those the model already calls B); ``settings.augment`` adds seeded crops and flips of each.
    grid : int, optional
        The atlas grid whose cells are tried (default: its largest grid with rendered icons, else its largest grid).
    settings : PatchSettings, optional
        ``top`` cells tried, ``kinds`` (icon, example), sizes, positions, seed, augmentation, batch, device.
    out : folder, optional
        ``search.json``, ``table.txt``, each tried patch as ``cells/X_Y-KIND.png`` and ``figure.png`` of the best one.
    net : Network, optional
        The run's model, already loaded (default: loaded from the run's record).

    Returns
    -------
    dict
        ``classes`` [A, B], ``grid``, ``n_images``, ``rows`` (cell x, y, kind, attribution toward B, flip rate, changed
        rate, mean delta, n variants; best first), ``skipped`` (cells without a rendered icon, per kind), ``seconds``.
    """
    settings = settings or PatchSettings()
    start = time.perf_counter()
    run_dir = Path(run_dir)
    root = store.open_store(run_dir)
    _check_layer(root, run_dir, layer)
    layout = root.get(f"layouts/{layer}/{atlas}")
    meta = store.attrs(layout) if layout is not None else {}
    if layout is None:
        raise AtlasError(f"no atlas '{atlas}' at layer '{layer}' in {run_dir}; build it with `atlas compare {run_dir} --layer {layer} A B`")
    if meta.get("kind") != "compare" or len(meta.get("classes") or []) != 2:
        raise AtlasError(f"atlas {layer}/{atlas} is not a class-difference atlas; "
                         f"build one with `atlas compare {run_dir} --layer {layer} A B`")
    a, b = (int(c) for c in meta["classes"])
    sizes = sorted(int(k) for k in root[f"grids/{layer}/{atlas}"].group_keys() if k.isdigit()) if f"grids/{layer}/{atlas}" in root else []
    if not sizes:
        raise AtlasError(f"atlas {layer}/{atlas} has no grid; run `atlas grid {run_dir} --layer {layer} --atlas {atlas} --grid 8`")
    rendered = [s for s in sizes if f"icons/{layer}/{atlas}/{s}" in root and bool(root[f"icons/{layer}/{atlas}/{s}/done"][:].any())]
    grid = grid if grid is not None else (rendered or sizes)[-1]  # default: the largest grid with icons
    if grid not in sizes:
        raise AtlasError(f"atlas {layer}/{atlas} has no {grid}x{grid} grid; grids: {', '.join(map(str, sizes))}")
    group = root[f"grids/{layer}/{atlas}/{grid}"]
    store.verify(root, [f"grids/{layer}/{atlas}/{grid}"])
    count = group["count"][:]
    attribution = group["mean_attribution"].oindex[:, :, [a, b]]
    score = np.where(count > 0, attribution[..., 1] - attribution[..., 0], -np.inf)
    order = np.argsort(-score, axis=None, kind="stable")[: min(settings.top, int((count > 0).sum()))]
    cells = [(int(f % grid), int(f // grid)) for f in order.tolist()]

    net = net or _net_for(run_dir, "", None, settings.device)
    names = net.classes
    if images is None:
        labels = root["images/label"][:]
        chosen = labels == a
        if near and "top5" in root["images"]:
            top5 = root["images/top5"][:]
            chosen |= (top5 == a).any(1) & (top5[:, 0] != b)
        paths = [str(p) for p in np.asarray(root["images/path"][:])[chosen & root["images/ok"][:]]]
        if not paths:
            raise AtlasError(f"the run holds no image labelled '{names[a]}'{' or near it' if near else ''}; give its photos with --images")
        from atlas.data import real_path

        images = [real_path(p) for p in paths]
    arrays, paths = load_source(images)
    arrays = augment_images(arrays, settings.augment, settings.seed)
    before = _logits(net, arrays, settings.batch_size, settings.device)
    if echo:
        echo(f"{len(cells)} cells of {layer}/{atlas} grid {grid} toward '{names[b]}', on {arrays.shape[0]} images of '{names[a]}' "
             f"({len(paths)} photos{f' x {settings.augment + 1} with crops and flips' if settings.augment else ''})")
    rows, skipped, best = [], {k: 0 for k in settings.kinds}, None
    outdir = Path(out) if out is not None else None
    for x, y in cells:
        ref = CellRef(run_dir, layer, atlas, grid, x, y)
        for kind in settings.kinds:
            try:
                picture = cell_patch(ref, kind)
            except AtlasError:
                skipped[kind] += 1  # an icon not rendered, an image no longer readable: counted, the others still tried
                continue
            result = _evaluate(net, arrays, before, picture, b, settings)
            row = {"x": x, "y": y, "kind": kind, "attribution": float(score[y, x]), "count": int(count[y, x]),
                   "flip_rate": flip_rate(result["flipped"], result["eligible"]), "changed_rate": float(result["changed"].mean()),
                   "mean_delta": float(result["delta"].mean()), "n_variants": int(result["image_of"].size)}
            rows.append(row)
            if outdir is not None:
                (outdir / "cells").mkdir(parents=True, exist_ok=True)
                Image.fromarray(_square(picture)).save(outdir / "cells" / f"{x}_{y}-{kind}.png")
            key = ((row["flip_rate"] or 0.0), row["mean_delta"])
            if best is None or key > best[0]:
                best = (key, row, result, picture)
            if echo:
                rate = "n/a" if row["flip_rate"] is None else f"{row['flip_rate']:.1%}"
                echo(f"  cell {x},{y} {kind}: flip rate {rate}, mean delta {row['mean_delta']:.2f}")
    rows.sort(key=lambda r: (-(r["flip_rate"] or 0.0), -r["mean_delta"]))
    report = {"run": str(run_dir), "layer": layer, "atlas": atlas, "grid": grid, "classes": [names[a], names[b]],
              "n_images": int(arrays.shape[0]), "n_photos": len(paths), "already_target": int((before.argmax(1) == b).sum()),
              "rows": rows, "skipped": skipped, "settings": settings.as_table(), "files": {}}
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "table.txt").write_text(search_table(rows) + "\n")
        if best is not None:
            _, row, result, _picture = best
            fig = _figure(outdir / "figure.png", arrays, before, result, b, names, settings.figure,
                          f"{layer}/{atlas} cell {row['x']},{row['y']} ({row['kind']}) on '{names[a]}' -> '{names[b]}'")
            report["files"]["figure"] = str(fig) if fig else None
        report["files"] |= {"table": str(outdir / "table.txt"), "report": str(outdir / "search.json")}
    report["seconds"] = time.perf_counter() - start
    if outdir is not None:
        (outdir / "search.json").write_text(json.dumps(report, indent=1))
    return report
