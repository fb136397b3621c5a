"""What pasting does to the model: logits of the patched variants, the per-image and per-place summary, and the
figure of the strongest examples (definitions in :mod:`atlas.patches`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atlas import store
from atlas.classnames import resolve_class
from atlas.errors import AtlasError
from atlas.patches.cells import _square
from atlas.patches.core import Placement, flip_rate, outcome, paste, placements, resize_patch
from atlas.settings import PatchSettings

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the module
    from matplotlib.figure import Figure


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
