"""The image on the atlas: where one photo's activations fall on a run's activation atlas.

Every spatial position of the atlas layer is one activation vector of the image, of the same kind as the run's
samples. :func:`image_positions` computes them with each position's attribution to the target class (one backward
pass); :func:`place_on_atlas` puts each on the run's layout by its ``k`` nearest sampled activations;
:func:`write_placement` draws the dots over the rendered atlas, shows the icons of the cells they fall in, and
writes the numbers (and, inside a run's ``tiles/``, the points the viewer's overlay draws: ``index.html?inspect=NAME``,
``atlas/viewer_static/atlas_inspect.js``).

Why k-NN and not the layout method's own transform: a run keeps the layout's coordinates, not the fitted model.
umap-learn's ``UMAP.transform`` needs the fitted object (its kNN index, fuzzy graph and embedding state), t-SNE has no
out-of-sample map at all, and the PCA layout's axes are not stored either (they are recomputed from the laid-out
samples only by the project stage). The nearest sampled activations, under the metric the layout was computed with,
are what every method agrees on: a point of the atlas is where its neighbours in activation space are. This is also
what umap-learn's own transform starts from (it initialises new points at the weighted mean of their neighbours'
embeddings before a few optimisation epochs).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from atlas import store
from atlas.errors import AtlasError
from atlas.models import Network
from atlas.models.inference import run_activations
from atlas.store import FULL_ATLAS

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the module
    from matplotlib.figure import Figure

BLOCK = 32768  # sample rows read and compared at once: 32k x 512 float32 is 64 MB
EXACT_COSINE = 1e-5  # a cosine distance below this (about 0.26 degrees) is the same activation: take its point exactly
EXACT_RELATIVE = 1e-3  # likewise a Euclidean / Manhattan distance below this fraction of the query's norm
BACKGROUND = (17, 19, 24)  # the viewer's page colour (atlas.tiles draws empty cells in it too)
CMAP = "RdBu_r"  # diverging: red attributes to the class, blue against it, white neither
STRIP_MAX = 12  # icons shown in the strip of cells the image falls in
# Shepard's inverse-distance weights 1 / d**2. Measured leave-one-out on a real 2,000-sample mixed4c UMAP run (each
# sample placed by its 8 nearest others): the same 10x10 cell as its own point for 0.44 of them with p = 2 (0.44 p = 1,
# 0.47 p = 4, 0.63 the nearest alone), median distance 0.045 of the atlas's side (0.047, 0.040, 0.020).
POWER = 2.0
TRANSFORMS = {
    "umap": "umap-learn has a transform, but it needs the fitted UMAP object, which the run does not keep; "
            "placed by the k nearest sampled activations instead (umap-learn's transform also starts from them)",
    "tsne": "t-SNE has no out-of-sample transform; placed by the k nearest sampled activations",
    "pca": "a PCA layout is a linear map, but the run does not store its axes; placed by the k nearest sampled activations",
}


@dataclass(frozen=True)
class Placement:
    """An image's positions on one atlas: see :func:`place_on_atlas`. Position ``p`` is ``(y, x) = divmod(p, w)``."""

    layer: str
    atlas: str
    hw: tuple[int, int]
    xy: np.ndarray  # (P, 2) float32 in [0, 1]: x to the right, y downwards, as layouts/{layer}/{atlas}/xy
    neighbours: np.ndarray  # (P, k) int64: sample rows (indices into samples/{layer}), nearest first
    distances: np.ndarray  # (P, k) float32, under ``metric``
    exact: np.ndarray  # (P,) bool: a neighbour at distance ~0, whose point was taken as it is
    cells: dict[int, np.ndarray]  # grid size -> (P,) int32 flat cell gy * S + gx (as grids/.../cell); -1 if not binned
    has_icon: dict[int, np.ndarray]  # grid size -> (P,) bool: that cell's icon is rendered
    counts: dict[int, np.ndarray]  # grid size -> (P,) int32: samples of the run in that cell
    method: str  # the layout's method (umap, tsne, pca)
    metric: str  # the distance the neighbours are found with (the layout's metric)
    k: int
    outside: str  # the layout's handling of points outside its clip ("edge" or "drop")
    transform: str  # why the layout method's own transform is not used
    n_samples: int  # sampled activations searched
    seconds: float
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the image's activations


def image_positions(net: Network, image: torch.Tensor, layer: str, target: int | None = None,
                    arithmetic: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int]:
    """The image's activation at every spatial position of ``layer`` and each position's attribution to ``target``.

    ``image`` is one RGB [0, 1] tensor ``(3, H, W)`` as the model sees it (the run's resize and crop). The attribution
    of position p is ``h_p . d logit_c / d h_p`` (summed over channels), the sampler's definition
    (:mod:`atlas.sample`), for all positions from one backward pass of ``logit_c`` in float32; ``target`` None is the
    top-1 class. ``arithmetic``, a run's ``(precision, forward)`` (:func:`atlas.models.inference.run_kernels`), computes
    the activations as that run's sampler did (its kernels and precision: a photo of the run gives exactly its samples,
    docs/precision.md); None takes them from the float32 attribution pass.

    Returns ``(acts (H*W, C) float32, attribution (H*W,) float32, (h, w), target)``, positions in row-major order.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise AtlasError(f"the image must be a (3, H, W) tensor, got {got}")
    net.resolve(layer)
    held: dict[str, torch.Tensor] = {}

    def edit(name: str, out: torch.Tensor):
        if name != layer:
            return None
        leaf = out.detach().float().requires_grad_(True)  # the graph from here on is all the backward needs
        held["h"] = leaf
        return leaf

    with torch.enable_grad(), net.hooks([layer], edit=edit, stop=False):
        logits = net.module(image[None].float())
    h = held.get("h")
    if h is None:
        raise AtlasError(f"layer '{layer}' of model {net.name} was not reached by the forward pass; choose a layer the model runs")
    if h.dim() != 4:
        raise AtlasError(f"layer '{layer}' has no spatial positions (shape {tuple(h.shape[1:])}); choose a convolutional layer")
    logits = logits.reshape(-1)
    n = logits.shape[0]
    c = int(logits.detach().argmax()) if target is None else int(target)
    if not 0 <= c < n:
        raise AtlasError(f"target class {target} is out of range: model {net.name} has {n} classes")
    (grad,) = torch.autograd.grad(logits[c], h)
    _, channels, hh, ww = h.shape
    attribution = (h * grad).sum(1)[0].reshape(-1)
    acts = h.detach()[0]
    if arithmetic is not None:
        acts = run_activations(net, image[None].float(), [layer], *arithmetic)[layer][0].float()
    acts = acts.permute(1, 2, 0).reshape(hh * ww, channels)
    return acts.numpy().astype(np.float32), attribution.detach().numpy().astype(np.float32), (int(hh), int(ww)), c


# ----------------------------------------------------------------------------- placing them on the atlas


def check_run_model(run_dir: str | Path, net: Network) -> None:
    """The run was sampled with ``net``'s model and weights, else one line (its atlas is another network's)."""
    meta = store.attrs(store.open_store(run_dir))
    model, sha = meta.get("model"), meta.get("weights_sha256") or ""
    if model and model != net.name:
        raise AtlasError(f"the run in {run_dir} was sampled with model {model}, not {net.name}; inspect with the run's model "
                         "(or another run)")
    if sha and net.weights_sha256 and sha != net.weights_sha256:
        raise AtlasError(f"the run in {run_dir} was sampled with other weights of {model} (sha256 {sha[:12]}..., these are "
                         f"{net.weights_sha256[:12]}...); inspect with the run's weights")


def _metric(layout_attrs: dict) -> str:
    """The distance the layout was computed with: its ``params.metric``; a PCA layout preserves Euclidean geometry."""
    params = layout_attrs.get("params") or {}
    metric = params.get("metric") or ("euclidean" if layout_attrs.get("method") == "pca" else "cosine")
    return "euclidean" if metric == "l2" else str(metric)


def _prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Vectors in which ``metric``'s neighbours are found: unit vectors for cosine, centred unit vectors for correlation."""
    if metric == "correlation":
        x = x - x.mean(1, keepdim=True)
    if metric in ("cosine", "correlation"):
        return torch.nn.functional.normalize(x, dim=1)
    return x


def _distances(q: torch.Tensor, q_sq: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """(P, B) distances of prepared queries to a prepared block of samples."""
    if metric in ("cosine", "correlation"):
        return (1.0 - q @ b.T).clamp_(min=0.0)
    if metric == "manhattan":
        return torch.cdist(q, b, p=1.0)
    return (q_sq[:, None] - 2.0 * (q @ b.T) + (b * b).sum(1)[None, :]).clamp_(min=0.0).sqrt_()


def nearest_samples(acts: np.ndarray, samples, rows: np.ndarray, k: int, metric: str, block: int = BLOCK
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest of ``acts (P, C)`` among ``samples[rows]`` (ascending rows of a numpy or zarr array), streamed.

    Reads ``block`` rows at a time and keeps a running top-k, so memory is one block plus (P, k). Returns the
    neighbours' indices into ``rows`` (P, k) int64 and their distances (P, k) float32, nearest first (ties: lower row).
    """
    q = _prepare(torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)), metric)
    q_sq = (q * q).sum(1)
    p, kk = q.shape[0], min(k, rows.size)
    best_d = torch.full((p, 0), math.inf)
    best_i = torch.zeros((p, 0), dtype=torch.int64)
    for a in range(0, rows.size, block):
        sel = rows[a : a + block]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        # one contiguous read per block (chunk-aligned in the store), then the layout's rows of it
        part = torch.from_numpy(np.ascontiguousarray(samples[lo:hi][sel - lo], dtype=np.float32))
        if not torch.isfinite(part).all():
            raise AtlasError("the run's activations contain NaN or infinite values; re-run `atlas sample` for this layer")
        d = _distances(q, q_sq, _prepare(part, metric), metric)
        d_top, i_top = torch.topk(d, min(kk, d.shape[1]), dim=1, largest=False, sorted=True)
        best_d = torch.cat([best_d, d_top], 1)
        best_i = torch.cat([best_i, i_top + a], 1)
        # keep the k best; a stable sort on distance keeps the lower index first among equal distances
        order = torch.sort(best_d, dim=1, stable=True).indices[:, :kk]
        best_d, best_i = torch.gather(best_d, 1, order), torch.gather(best_i, 1, order)
    return best_i.numpy(), best_d.numpy().astype(np.float32)


def weighted_points(xy: np.ndarray, index: np.ndarray, dist: np.ndarray, exact_below: np.ndarray, power: float = POWER
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-distance weighted mean of the neighbours' layout points ``xy[index]`` (P, k, 2), weights ``1 / d**power``.

    A neighbour closer than ``exact_below`` (per position) is the same activation: its point is taken as it is
    (the mean of such points when there are several). Returns ``(points (P, 2) float32, exact (P,) bool)``.
    """
    pts = xy[index].astype(np.float64)  # (P, k, 2)
    d = dist.astype(np.float64)
    same = d < exact_below[:, None]
    exact = same.any(1)
    w = np.where(exact[:, None], same.astype(np.float64), 1.0 / np.maximum(d, 1e-30) ** power)
    out = (pts * w[..., None]).sum(1) / w.sum(1, keepdims=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32), exact


def cell_of(xy: np.ndarray, size: int) -> np.ndarray:
    """Flat cell ``gy * size + gx`` of points in [0, 1]^2, by the grid stage's rule (``atlas/grid.py``):
    ``g = min(floor(v * size), size - 1)`` per axis, so 1.0 falls in the last cell."""
    g = np.clip(np.floor(np.asarray(xy, np.float64) * size), 0, size - 1).astype(np.int64)
    return (g[:, 1] * size + g[:, 0]).astype(np.int32)


def place_on_atlas(run_dir: str | Path, layer: str, acts: np.ndarray, *, atlas: str = FULL_ATLAS, k: int = 8,
                   net: Network | None = None, power: float = POWER) -> Placement:
    """Place activations ``acts (P, C)`` (an image's positions, :func:`image_positions`) on the run's atlas layout.

    Each is put at the inverse-distance weighted mean (weights ``1 / d**power``) of the layout points of its ``k`` nearest
    sampled activations
    (exact search, under the layout's metric, over the laid-out rows ``layouts/{layer}/{atlas}/rows``, streamed from
    ``samples/{layer}/activations`` in blocks); a neighbour at distance ~0 (the same activation, as for a position the
    run sampled) gives its point exactly. Layout points clipped to the edge are neighbours like any other when the
    layout keeps them at the edge (``outside = "edge"``, the default: they are drawn there, in the edge cells); when
    it drops them (``outside = "drop"``) they are not on the atlas and are not searched. For each grid of the atlas
    the cell of each position (the grid stage's binning rule), the run's sample count there and whether its icon is
    rendered. The layout method's own transform is not used (see the module docstring; ``Placement.transform``).

    ``net``, when given, must be the run's model and weights. A missing layout, another model's run, activations of
    the wrong channel count or a damaged store is one :class:`AtlasError` line.
    """
    started = time.perf_counter()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AtlasError(f"k (neighbours) must be a positive integer, got {k!r}")
    if not (isinstance(power, (int, float)) and 0 <= power <= 16):
        raise AtlasError(f"power (of the inverse-distance weights) must be between 0 and 16, got {power!r}")
    root = store.open_store(run_dir)
    if net is not None:
        check_run_model(run_dir, net)
    samples = store.require_layer(root, layer)
    node = root.get(f"layouts/{layer}/{atlas}")
    if node is None:
        have = sorted(root["layouts"][layer].group_keys()) if f"layouts/{layer}" in root else []
        hint = f" (layouts of this layer: {', '.join(have)})" if have else ""
        raise AtlasError(f"no layout '{atlas}' for layer '{layer}' in {run_dir}{hint}; run `atlas project {run_dir} --layer {layer}` "
                         "(or `atlas build`) first")
    grids_path, icons_path = f"grids/{layer}/{atlas}", f"icons/{layer}/{atlas}"
    store.verify(root, [f"samples/{layer}", f"layouts/{layer}/{atlas}", grids_path])
    icons_intact = _icons_intact(root, icons_path)  # a grid still rendering: placed all the same, without its icons
    activations = samples["activations"]
    acts = np.asarray(acts, dtype=np.float32)
    if acts.ndim != 2 or acts.shape[1] != activations.shape[1]:
        raise AtlasError(f"activations of shape {acts.shape} cannot be placed on {layer}/{atlas}: its samples have "
                         f"{activations.shape[1]} channels (give the image's (positions, {activations.shape[1]}) activations of {layer})")
    if acts.shape[0] == 0 or not np.isfinite(acts).all():
        raise AtlasError("the image's activations are empty or not finite; nothing to place")
    rows, xy, inside = node["rows"][:], node["xy"][:], node["inside"][:]
    layout_attrs = store.attrs(node)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise AtlasError(f"layout '{atlas}' of layer '{layer}' is not 2-D (shape {xy.shape}); an image is placed on a 2-D atlas")
    outside = layout_attrs.get("outside", "edge")
    keep = inside if outside == "drop" else np.ones(rows.size, bool)
    if not keep.any():
        raise AtlasError(f"layout '{atlas}' of layer '{layer}' has no points inside its clip to place the image by")
    rows_k, xy_k = rows[keep], xy[keep]
    metric = _metric(layout_attrs)
    index, dist = nearest_samples(acts, activations, rows_k, k, metric)
    if metric in ("cosine", "correlation"):
        exact_below = np.full(acts.shape[0], EXACT_COSINE)
    else:
        norm = np.abs(acts).sum(1) if metric == "manhattan" else np.linalg.norm(acts, axis=1)
        exact_below = EXACT_RELATIVE * np.maximum(norm, 1e-12)
    points, exact = weighted_points(xy_k, index, dist, exact_below, power)

    cells, has_icon, counts = {}, {}, {}
    for size in _grid_sizes(root, grids_path):
        cell = cell_of(points, size)
        count = root[f"{grids_path}/{size}/count"][:].reshape(-1)
        icons = root.get(f"{icons_path}/{size}") if icons_intact else None
        done = (np.asarray(store.read_flags(icons["done"]), bool).reshape(-1) if icons is not None and "done" in icons
                else np.zeros(size * size, bool))
        cells[size], counts[size], has_icon[size] = cell, count[cell].astype(np.int32), done[cell]
    method = str(layout_attrs.get("method", "?"))
    seconds = round(time.perf_counter() - started, 3)
    summary = {"layer": layer, "atlas": atlas, "method": method, "placement": "knn", "metric": metric, "k": int(min(k, rows_k.size)),
               "power": power, "outside": outside, "n_positions": int(acts.shape[0]), "n_exact": int(exact.sum()),
               "n_samples": int(rows_k.size),
               "seconds": seconds}
    if not icons_intact:
        summary["icons"] = f"incomplete: placed without icons (`atlas render RUN --layer {layer}` completes them)"
    return Placement(layer=layer, atlas=atlas, hw=_hw(acts.shape[0]), xy=points, neighbours=rows_k[index], distances=dist, exact=exact,
                     cells=cells, has_icon=has_icon, counts=counts, method=method, metric=metric, k=int(min(k, rows_k.size)),
                     outside=outside, transform=TRANSFORMS.get(method, "placed by the k nearest sampled activations"),
                     n_samples=int(rows_k.size), seconds=seconds, summary=summary)


def _icons_intact(root, icons_path: str) -> bool:
    """Whether the icons of an atlas can be read (absent icons count as intact: there is nothing to show)."""
    try:
        store.verify(root, [icons_path])
    except AtlasError:
        return False
    return True


def _hw(p: int) -> tuple[int, int]:
    """(h, w) of P row-major positions of a square map (the layers here are square); (P, 1) otherwise."""
    s = math.isqrt(p)
    return (s, s) if s * s == p else (p, 1)


def _grid_sizes(root, grids_path: str) -> list[int]:
    group = root.get(grids_path)
    if group is None:
        return []
    return sorted(int(s) for s in group.group_keys() if s.isdigit() and "count" in group[s])


# ----------------------------------------------------------------------------- the figure, the numbers, the viewer's points


def _colours(values: np.ndarray, scale: float) -> list[str]:
    """Hex colours of ``values`` on the diverging map, symmetric about 0 (``scale`` is the largest |value|)."""
    from matplotlib import colormaps

    cmap = colormaps[CMAP]
    rgba = cmap(0.5 + 0.5 * np.clip(values / scale, -1.0, 1.0))
    return ["#{:02x}{:02x}{:02x}".format(*(np.round(c[:3] * 255).astype(int))) for c in rgba]


def _icon_canvas(root, icons_path: str, size: int, cell_px: int) -> np.ndarray:
    """The atlas of one grid size as one picture: each rendered icon shrunk to ``cell_px``, empty cells background."""
    from PIL import Image

    canvas = np.empty((size * cell_px, size * cell_px, 3), np.uint8)
    canvas[:] = BACKGROUND
    icons = root.get(f"{icons_path}/{size}")
    if icons is None:
        return canvas
    done = np.asarray(store.read_flags(icons["done"]), bool).reshape(size, size)
    images = icons["images"]
    for gy in range(size):
        if not done[gy].any():
            continue
        band = np.asarray(images[gy])  # (S, P, P, 3): one row of icons at a time
        for gx in np.flatnonzero(done[gy]):
            icon = Image.fromarray(band[gx]).resize((cell_px, cell_px), Image.Resampling.BOX)
            canvas[gy * cell_px : (gy + 1) * cell_px, gx * cell_px : (gx + 1) * cell_px] = np.asarray(icon)[..., :3]
    return canvas


def _figure_size(sizes: list[int], root, icons_path: str) -> int | None:
    """The grid the figure is drawn from: the middle one of the sizes with rendered icons (else of all sizes)."""
    drawn = [s for s in sizes if f"{icons_path}/{s}" in root]
    pool = drawn or sizes
    return pool[(len(pool) - 1) // 2] if pool else None


def _tiles_of(out: Path, run_dir: Path) -> tuple[Path | None, str | None]:
    """``(RUN/tiles, NAME)`` when ``out`` is ``RUN/tiles/inspect/NAME`` (or a folder inside it), else ``(None, None)``.

    A report assembled in ``NAME.partial`` (and swapped in whole when finished) is report NAME."""
    tiles = (Path(run_dir) / "tiles").resolve()
    try:
        rel = out.resolve().relative_to(tiles / "inspect")
    except ValueError:
        return None, None
    return (tiles, rel.parts[0].removesuffix(".partial")) if rel.parts else (None, None)


def plot_placement(placement: Placement, attribution: np.ndarray, canvas: np.ndarray | None, name: str, *, size: int | None = None,
                   target_name: str = "the top class") -> Figure:
    """The atlas with the image's positions as dots coloured by attribution (``CMAP``, symmetric about 0), and a colour bar.

    Parameters
    ----------
    placement : Placement
        What :func:`place` returns.
    attribution : ndarray (positions,)
        One value per placed position (:func:`attribution`).
    canvas : ndarray (S, S, 3) uint8 or None
        The atlas of one grid size as one picture (the writer builds it from the run's icons); None: an empty atlas.
    name : str
        Labels the image in the title.
    size : int or None, default None
        The grid the canvas shows (its side in cells), for the title.
    target_name : str, default "the top class"
        The class the attribution is to, for the colour bar.

    Returns
    -------
    matplotlib.figure.Figure
        A Figure of its own (no pyplot state; ``fig.savefig(path)`` writes it, a notebook shows it).
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    attribution = np.asarray(attribution, np.float32).reshape(-1)
    h, w = placement.hw
    scale = float(np.abs(attribution).max()) or 1.0
    fig = Figure(figsize=(8.6, 7.6), dpi=110)
    ax = fig.add_axes((0.03, 0.05, 0.8, 0.86))
    if canvas is not None:
        ax.imshow(canvas, extent=(0, 1, 1, 0), interpolation="nearest")
    else:
        ax.imshow(np.full((2, 2, 3), BACKGROUND, np.uint8), extent=(0, 1, 1, 0))
    order = np.argsort(np.abs(attribution), kind="stable")  # strongest dots drawn last, on top
    norm = Normalize(-scale, scale)
    dots = ax.scatter(placement.xy[order, 0], placement.xy[order, 1], c=attribution[order], cmap=CMAP, norm=norm,
                      s=max(12.0, 900.0 / max(h, w)), edgecolors="black", linewidths=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    grid_text = f"{size}×{size} icons" if size is not None else "no grid"
    ax.set_title(f"{name} on {placement.layer}/{placement.atlas} ({grid_text}): {placement.xy.shape[0]} positions, "
                 f"{placement.k} nearest samples ({placement.metric})", fontsize=9)
    cax = fig.add_axes((0.86, 0.15, 0.03, 0.66))
    bar = fig.colorbar(dots, cax=cax)
    bar.set_label(f"attribution to {target_name}  (h · ∂logit/∂h)", fontsize=8)
    return fig


def plot_placement_cells(cells: list[dict], pictures: list[np.ndarray | None], size: int, name: str) -> Figure:
    """The icons of the cells the image's positions fall in, each with its count of positions.

    Parameters
    ----------
    cells : list of dict
        ``{"gx", "gy", "positions"}`` per cell, in the order shown (``placement.json``'s ``cells`` of one grid).
    pictures : list of ndarray (P, P, 3) uint8 or None
        Each cell's icon; None: the cell has no icon (shown as such).
    size : int
        The grid's side in cells, for the title.
    name : str
        Labels the image in the title.

    Returns
    -------
    matplotlib.figure.Figure
        A Figure of its own (no pyplot state; ``fig.savefig(path)`` writes it, a notebook shows it).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.25 * len(cells) + 0.3, 1.9), dpi=110)
    for i, (c, picture) in enumerate(zip(cells, pictures, strict=True)):
        ax = fig.add_subplot(1, len(cells), i + 1)
        if picture is not None:
            ax.imshow(picture, interpolation="nearest")
        else:
            ax.imshow(np.full((2, 2, 3), BACKGROUND, np.uint8))
            ax.text(0.5, 0.5, "no icon", color="white", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{c['positions']} pos.", fontsize=8)
        ax.set_xlabel(f"cell {c['gx']},{c['gy']}", fontsize=7)
    fig.suptitle(f"cells of the {size}×{size} grid that {name}'s positions fall in", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.72, bottom=0.12, wspace=0.15)
    return fig


def write_placement(run_dir: str | Path, placement: Placement, attribution: np.ndarray, out: Path, name: str, *,
                    target: int | None = None, classes: list[str] | None = None, size: int | None = None) -> dict:
    """Write the image on the atlas into ``out``; returns the JSON-able summary the report embeds.

    - ``placement.png``: the atlas of one grid size (``size``, default the middle of the sizes with rendered icons)
      built from the run's icons, the image's positions as dots coloured by attribution (``CMAP``, symmetric about 0),
      with a colour bar;
    - ``placement_cells.png``: the icons of the cells the positions fall in at that size, most positions first
      (up to ``STRIP_MAX``), each with its count;
    - ``placement.json``: every position's (y, x), layout point, whether it was exact, attribution, and its cell per
      grid size; the cells with their counts; the method and its note;
    - ``points.json``: the dots the viewer add-on draws over the atlas (``index.html?inspect=NAME``; the summary's
      ``viewer`` is that link from the report's folder ``RUN/tiles/inspect/NAME``, ``viewer_in_tiles`` from ``RUN/tiles``,
      both None outside a run's tiles). When ``out`` is
      ``RUN/tiles/inspect/NAME`` itself (a report folder of its own, not inside one the report writer assembles),
      the report is also listed in ``RUN/tiles/inspect.json`` and the viewer re-installed with its overlay.

    ``name`` labels the image; ``target`` / ``classes`` name the class the attribution is to.
    """
    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    attribution = np.asarray(attribution, np.float32).reshape(-1)
    p = placement.xy.shape[0]
    if attribution.shape[0] != p:
        raise AtlasError(f"attribution has {attribution.shape[0]} values for {p} placed positions")
    root = store.open_store(run_dir)
    icons_path = f"icons/{placement.layer}/{placement.atlas}"
    if not _icons_intact(root, icons_path):  # icons being rendered: the dots on an empty atlas rather than no report
        icons_path = f"{icons_path}/missing"
    sizes = sorted(placement.cells)
    if size is None:
        size = _figure_size(sizes, root, icons_path)
    elif size not in placement.cells:
        raise AtlasError(f"grid {size} is not one of {placement.layer}/{placement.atlas}'s grids ({', '.join(map(str, sizes)) or 'none'})")
    out.mkdir(parents=True, exist_ok=True)
    target_name = (classes[target] if classes is not None and target is not None and 0 <= target < len(classes)
                   else (str(target) if target is not None else "the top class"))
    h, w = placement.hw

    # the atlas with the dots
    canvas = _icon_canvas(root, icons_path, size, int(max(2, min(64, 1024 // size)))) if size is not None else None
    plot_placement(placement, attribution, canvas, name, size=size, target_name=target_name).savefig(out / "placement.png")

    cells_out = placement_cells(placement, attribution)
    strip = cells_out.get(str(size), [])[:STRIP_MAX] if size is not None else []
    if strip:  # the cells the positions fall in, most positions first
        icons = root.get(f"{icons_path}/{size}")
        pictures = [np.asarray(icons["images"][c["gy"], c["gx"]])[..., :3] if c["icon"] and icons is not None else None for c in strip]
        plot_placement_cells(strip, pictures, size, name).savefig(out / "placement_cells.png")

    doc = {"version": 1, "image": name, "target": {"index": target, "name": target_name}, **placement.summary,
           "transform": placement.transform, "hw": [h, w], "sizes": sizes, "figure_size": size,
           "positions": placement_positions(placement, attribution), "cells": cells_out}
    (out / "placement.json").write_text(json.dumps(doc, indent=1))

    tiles, report = _tiles_of(out, run_dir)
    points = viewer_points(placement, attribution, name, {"index": target, "name": target_name})
    (out / "points.json").write_text(json.dumps(points, separators=(",", ":")))
    viewer = in_tiles = None
    if tiles is not None:
        in_tiles = f"index.html?inspect={report}#{placement.layer}/{placement.atlas}"
        viewer = f"../../{in_tiles}"  # from the report's folder, RUN/tiles/inspect/NAME, where its page is
        if out.resolve() == tiles / "inspect" / report:
            _list_standalone(tiles, report, placement, name)

    top = strip[:5]
    n_exact = int(placement.exact.sum())
    seconds = round(time.perf_counter() - started, 2)
    return {"figure": "placement.png", "strip": "placement_cells.png" if strip else None, "json": "placement.json",
            "points": "points.json", "viewer": viewer, "viewer_in_tiles": in_tiles,
            "layer": placement.layer, "atlas": placement.atlas, "method": placement.method,
            "placement": "knn", "metric": placement.metric, "k": placement.k, "transform": placement.transform,
            "note": placement_note(placement, top, size), "n_positions": p, "n_exact": n_exact, "n_samples": placement.n_samples,
            "figure_size": size, "n_cells": len(cells_out.get(str(size), [])) if size is not None else 0, "top_cells": top,
            "seconds_place": placement.seconds, "seconds_write": seconds}


def placement_cells(placement: Placement, attribution: np.ndarray) -> dict[str, list[dict]]:
    """The cells the image's positions fall in, per grid size, most positions first.

    Parameters
    ----------
    placement : Placement
        The image's positions on the atlas (:func:`place_on_atlas`).
    attribution : (P,) float array
        Each position's attribution.

    Returns
    -------
    dict
        ``{str(size): [{"cell", "gx", "gy", "positions", "attribution" (summed), "samples", "icon"}]}``.
    """
    cells_out: dict[str, list[dict]] = {}
    for s in sorted(placement.cells):
        cell = placement.cells[s]
        uniq, n = np.unique(cell[cell >= 0], return_counts=True)
        ranked = sorted(zip(uniq.tolist(), n.tolist(), strict=True), key=lambda t: (-t[1], t[0]))
        cells_out[str(s)] = [{"cell": c, "gx": c % s, "gy": c // s, "positions": m,
                              "attribution": float(attribution[cell == c].sum()),
                              "samples": int(placement.counts[s][cell == c][0]), "icon": bool(placement.has_icon[s][cell == c][0])}
                             for c, m in ranked]
    return cells_out


def placement_positions(placement: Placement, attribution: np.ndarray) -> list[dict]:
    """Every position's record for ``placement.json``: (y, x), layout point, whether it was exact, attribution, its cell
    and whether that cell has an icon per grid size, its nearest samples and their distances.

    Parameters
    ----------
    placement : Placement
        The image's positions on the atlas.
    attribution : (P,) float array
        Each position's attribution.

    Returns
    -------
    list of dict
        One record per position, in row-major order of the layer's grid.
    """
    sizes, w = sorted(placement.cells), placement.hw[1]
    positions = []
    for i in range(placement.xy.shape[0]):
        y, x = divmod(i, w)
        positions.append({"p": i, "y": y, "x": x, "xy": [round(float(v), 6) for v in placement.xy[i]], "exact": bool(placement.exact[i]),
                          "attribution": float(attribution[i]),
                          "cells": {str(s): int(placement.cells[s][i]) for s in sizes},
                          "icon": {str(s): bool(placement.has_icon[s][i]) for s in sizes},
                          "neighbours": placement.neighbours[i].tolist(),
                          "distances": [round(float(d), 6) for d in placement.distances[i]]})
    return positions


def viewer_points(placement: Placement, attribution: np.ndarray, name: str, target: dict) -> dict:
    """The dots the viewer add-on draws over the atlas (``points.json``): layout point, attribution and colour each,
    with the colour ramp (``CMAP``, symmetric about 0).

    Parameters
    ----------
    placement : Placement
        The image's positions on the atlas.
    attribution : (P,) float array
        Each position's attribution.
    name : str
        The image's label.
    target : dict
        ``{"index", "name"}`` of the class the attribution is to.

    Returns
    -------
    dict
        The JSON document.
    """
    scale = float(np.abs(attribution).max()) or 1.0
    colours = _colours(attribution, scale)
    h, w = placement.hw
    return {"version": 1, "image": name, "layer": placement.layer, "atlas": placement.atlas,
            "target": target, "scale": scale, "cmap": CMAP, "hw": [h, w],
            "ramp": _colours(np.linspace(-scale, scale, 9), scale),
            "points": [[round(float(placement.xy[i, 0]), 6), round(float(placement.xy[i, 1]), 6), round(float(attribution[i]), 6),
                        colours[i]] for i in range(placement.xy.shape[0])]}


def placement_note(placement: Placement, top: list[dict], size: int | None) -> str:
    """One sentence saying how the image was placed and where most of its positions fell.

    Parameters
    ----------
    placement : Placement
        The image's positions on the atlas.
    top : list of dict
        The figure grid's cells with the most positions (:func:`placement_cells`), most first.
    size : int or None
        That grid's size.

    Returns
    -------
    str
    """
    p = placement.xy.shape[0]
    n_exact = int(placement.exact.sum())
    return (f"placed by the {placement.k} nearest of {placement.n_samples:,} sampled activations ({placement.metric}), "
            f"inverse-distance weighted (power {placement.summary.get('power', POWER):g}); "
            + (f"{n_exact} of {p} positions are the run's own samples; " if n_exact else "")
            + (f"the most positions ({top[0]['positions']}) fall in cell {top[0]['gx']},{top[0]['gy']} of the {size}x{size} grid; "
               if top else "") + placement.transform)


def _list_standalone(tiles: Path, report: str, placement: Placement, name: str) -> None:
    """List a placement written straight into ``tiles/inspect/NAME`` in ``tiles/inspect.json`` (the report writer's
    listing, same entry shape) and re-install the viewer so its atlas page loads the overlay."""
    from atlas.viewer import install_viewer, update_listing

    entry = {"name": report, "layer": placement.layer, "atlas": placement.atlas, "images": [name], "index": f"inspect/{report}/index.html",
             "points": [f"inspect/{report}/points.json"]}
    update_listing(tiles / "inspect.json", "reports", entry, lambda x: x.get("name") == report,
                   lambda x: any((tiles / "inspect" / str(x.get("name")) / f).is_file() for f in ("index.html", "points.json")),
                   lambda x: x.get("name", ""))
    if (tiles / "atlases.json").is_file():
        install_viewer(tiles)
