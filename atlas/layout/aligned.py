"""Aligned layouts of consecutive layers: umap-learn's ``AlignedUMAP``, so the same image regions sit in similar places.

The article follows one concept from layer to layer (mixed4a -> mixed4e). For that, the layouts of consecutive
layers are optimised together: AlignedUMAP lays out each layer's samples with UMAP and pulls the points that are
related across neighbouring layers toward each other (its ``relations``).

How samples correspond across layers of different resolution. A sample is (image, position of its layer's grid).
Its position is mapped to the centre of its cell in input pixels (``(y + 0.5) * crop / h``, as the tiles and
``sample_patches`` do); a sample of the next layer corresponds to it when it comes from the same image and its own
input-pixel centre is the nearest among that image's samples of the next layer and lies within ``tolerance`` cells of
the coarser of the two layers (default 1: the two centres are less than one coarse stride apart, so the
coarse position covers the fine one's centre or its neighbour). By default the sampler draws each layer's positions
independently (``atlas.sample.sample_positions``), so with ``--per-image K`` only part of the samples find a partner;
unmatched samples are laid out too, just not tied. A run sampled with ``aligned_positions`` (``atlas sample
--aligned-positions``) takes every layer's positions from the first layer's (``atlas.sample.corresponding_positions``),
so every sample has its partner. Every pair is used once (one-to-one, nearest first).

The atlas's own optimiser stays the default for single layers (``atlas project``); this is the multi-layer option.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from atlas import store
from atlas.errors import AtlasError
from atlas.settings import LayersSettings as L

ALIGNED_ATLAS = L.aligned_atlas


def input_centres(positions: np.ndarray, grid_hw: tuple[int, int], crop: int = 224) -> np.ndarray:
    """(n, 2) float64 centres (y, x) in input pixels of (n, 2) layer positions of a layer of ``grid_hw``."""
    h, w = grid_hw
    p = np.asarray(positions, np.float64)
    return np.stack([(p[:, 0] + 0.5) * crop / h, (p[:, 1] + 0.5) * crop / w], 1)


def corresponding_pairs(images_a: np.ndarray, centres_a: np.ndarray, images_b: np.ndarray, centres_b: np.ndarray,
                        max_distance: float) -> np.ndarray:
    """(m, 2) index pairs (i into a, j into b) of samples of the same image whose input-pixel centres are nearest and
    at most ``max_distance`` pixels apart (Chebyshev), one-to-one, the closest pairs first. Pure."""
    images_a, images_b = np.asarray(images_a), np.asarray(images_b)
    pairs: list[tuple[float, int, int]] = []
    by_image: dict[int, list[int]] = {}
    for j, img in enumerate(images_b.tolist()):
        by_image.setdefault(int(img), []).append(j)
    for i, img in enumerate(images_a.tolist()):
        cand = by_image.get(int(img))
        if not cand:
            continue
        d = np.abs(centres_b[cand] - centres_a[i]).max(1)
        for k in np.flatnonzero(d <= max_distance):
            pairs.append((float(d[k]), i, cand[int(k)]))
    pairs.sort()
    used_a, used_b, out = set(), set(), []
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j))
    return np.asarray(sorted(out), np.int64).reshape(-1, 2)


def mean_displacement(xy_a: np.ndarray, xy_b: np.ndarray, pairs: np.ndarray, procrustes: bool = False) -> float:
    """Mean distance between the paired points of two [0, 1] layouts; with ``procrustes``, after the best rotation or
    reflection, shift and scale of the first onto the second (so independent layouts are not penalised for an
    arbitrary orientation)."""
    a, b = np.asarray(xy_a, np.float64)[pairs[:, 0]], np.asarray(xy_b, np.float64)[pairs[:, 1]]
    if procrustes and len(pairs) >= 3:
        ma, mb = a.mean(0), b.mean(0)
        u, s, vt = np.linalg.svd((a - ma).T @ (b - mb))
        r = u @ vt
        scale = s.sum() / max(((a - ma) ** 2).sum(), 1e-12)
        a = (a - ma) @ r * scale + mb
    return float(np.linalg.norm(a - b, axis=1).mean())


def _load(run_dir: Path, layer: str, root) -> dict:
    group = store.require_layer(root, layer)
    rows = store.valid_rows(root, layer)
    if rows.size < 4:
        raise AtlasError(f"layer '{layer}' has only {rows.size} valid samples; aligned layouts need at least 4")
    hw = group.attrs.get("grid_hw")
    if hw is None:
        raise AtlasError(f"samples/{layer} has no grid_hw attribute; re-run `atlas sample`")
    return {"rows": rows, "acts": store.read_rows(group["activations"], rows), "image": group["image_index"][:][rows],
            "pos": group["position"][:][rows], "hw": (int(hw[0]), int(hw[1]))}


def aligned_embeddings(datasets: Sequence[np.ndarray], relations: Sequence[dict[int, int]], n_neighbors: int = 15,
                       min_dist: float = 0.1, seed: int = 0, alignment: float = 1.0, n_epochs: int | None = None) -> list[np.ndarray]:
    """AlignedUMAP embeddings (one (n_t, 2) array per dataset) of ``datasets`` tied by ``relations`` ({i in t: j in t+1})."""
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba/umap chatter (n_jobs with a random_state, ...)
        model = umap.AlignedUMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed, alignment_regularisation=alignment,
                                 alignment_window_size=2, n_epochs=n_epochs, init="random")
        model.fit([np.asarray(d, np.float32) for d in datasets], relations=list(relations))
    return [np.asarray(e, np.float32) for e in model.embeddings_]


def independent_embeddings(datasets: Sequence[np.ndarray], n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
                           n_epochs: int | None = None) -> list[np.ndarray]:
    """The same UMAP of each dataset on its own (the baseline aligned layouts are measured against)."""
    import umap

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for d in datasets:
            model = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed, n_epochs=n_epochs, init="random")
            out.append(np.asarray(model.fit_transform(np.asarray(d, np.float32)), np.float32))
    return out


def aligned_layouts(run_dir: str | Path, layers: Sequence[str], *, normalize: Callable, save: Callable, atlas: str = L.aligned_atlas,
                    n_neighbors: int = L.n_neighbors, min_dist: float = L.min_dist, seed: int = L.seed, tolerance: float = L.tolerance,
                    alignment: float = L.alignment, n_epochs: int | None = L.n_epochs, compare: bool = False) -> dict:
    """Lay out consecutive ``layers`` of a run together with AlignedUMAP and store each as ``layouts/{layer}/{atlas}``.

    Parameters
    ----------
    run_dir : the run folder; its store must hold every layer's samples (``atlas sample --layer A --layer B``).
    layers : two or more sampled layers, in network order (consecutive ones are tied).
    atlas : the layouts' name (default "aligned"); grid, render and tile it like any atlas (``--atlas aligned``).
    n_neighbors, min_dist, seed, n_epochs : UMAP's settings, the same for every layer.
    (Defaults and checks of every setting: :class:`atlas.settings.LayersSettings`, the ``[layers]`` table.)
    tolerance : how far apart, in cells of the coarser layer, two samples' input-pixel centres may be to correspond.
    alignment : AlignedUMAP's ``alignment_regularisation`` (how strongly related points are pulled together).
    compare : also lay out each layer on its own with the same UMAP and report both mean displacements.
    normalize, save : the layout stage's ``normalize_layout`` and ``save_layout`` (``atlas.layout.aligned_project`` passes
        them: this module is imported by the stage's top module and must not import it back).

    Returns
    -------
    dict
        ``layers``, ``pairs`` (matched samples per consecutive pair), ``n`` per layer, ``displacement`` (mean distance in
        the [0, 1] layouts between paired samples, per consecutive pair), with ``compare`` also
        ``independent_displacement`` and ``independent_procrustes`` (after the best similarity transform), ``seconds``.
    """
    start = time.perf_counter()
    # The settings' own checks (one line naming layers.<field>), the same as the command's and a [layers] table's.
    checked = L(aligned_atlas=atlas, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed, tolerance=tolerance, alignment=alignment,
                n_epochs=n_epochs)
    atlas, n_neighbors, min_dist, seed = checked.aligned_atlas, checked.n_neighbors, checked.min_dist, checked.seed
    tolerance, alignment, n_epochs = checked.tolerance, checked.alignment, checked.n_epochs
    layers = list(dict.fromkeys(layers))
    if len(layers) < 2:
        raise AtlasError("aligned layouts need at least two layers (--layer A --layer B)")
    run_dir = Path(run_dir)
    root = store.open_store(run_dir)
    store.verify(root, [f"samples/{layer}" for layer in layers] + ["images"])
    crop = int((root.attrs.get("preprocessing") or {}).get("crop", 224))
    data = [_load(run_dir, layer, root) for layer in layers]
    pairs, relations = [], []
    for a, b in zip(data, data[1:], strict=False):
        coarse = crop / min(a["hw"][0], b["hw"][0])
        p = corresponding_pairs(a["image"], input_centres(a["pos"], a["hw"], crop), b["image"], input_centres(b["pos"], b["hw"], crop),
                                tolerance * coarse)
        if p.shape[0] == 0:
            raise AtlasError(f"no samples of {layers[len(pairs)]} and {layers[len(pairs) + 1]} correspond (same image, centres within "
                             f"{tolerance * coarse:.0f} px); sample more positions per image (--per-image)")
        pairs.append(p)
        relations.append({int(i): int(j) for i, j in p})
    nn = [min(n_neighbors, d["rows"].size - 1) for d in data]
    embeddings = aligned_embeddings([d["acts"] for d in data], relations, min(nn), min_dist, seed, alignment, n_epochs)
    xys = [normalize(e) for e in embeddings]
    report = {"layers": layers, "atlas": atlas, "n": [int(d["rows"].size) for d in data], "pairs": [int(p.shape[0]) for p in pairs],
              "displacement": [mean_displacement(xys[t][0], xys[t + 1][0], p) for t, p in enumerate(pairs)]}
    if compare:
        alone = [normalize(e)[0] for e in independent_embeddings([d["acts"] for d in data], min(nn), min_dist, seed, n_epochs)]
        report["independent_displacement"] = [mean_displacement(alone[t], alone[t + 1], p) for t, p in enumerate(pairs)]
        report["independent_procrustes"] = [mean_displacement(alone[t], alone[t + 1], p, procrustes=True) for t, p in enumerate(pairs)]
    for t, (d, e, (xy, inside)) in enumerate(zip(data, embeddings, xys, strict=True)):
        attrs = {"kind": "aligned", "method": "aligned-umap", "layers": layers, "seed": seed,
                 "params": {"n_neighbors": min(nn), "min_dist": min_dist, "alignment_regularisation": alignment, "tolerance": tolerance,
                            "n_epochs": n_epochs},
                 "pairs_before": report["pairs"][t - 1] if t else None, "pairs_after": report["pairs"][t] if t < len(pairs) else None,
                 "summary": {"method": "aligned-umap", "n": int(d["rows"].size), "layers": layers}}
        save(run_dir, layers[t], atlas, d["rows"], e, xy, inside, attrs)
    report["seconds"] = time.perf_counter() - start
    return report
