"""Synthetic run folders for tests and benchmarks: a small ``store.zarr`` that follows the
store contract of ``atlas/store.py`` without running a model.

``make_store`` writes ``images/*`` and ``samples/{layer}/*`` with clustered, ReLU-like
activations, so stages after sampling can be tested quickly and deterministically.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from atlas.store import open_store, write_array


def clustered(n: int, c: int, clusters: int, seed: int = 0, spread: float = 0.15, density: float = 0.3, latent: int = 6,
              noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """``n`` non-negative float32 vectors in ``clusters`` well-separated (in cosine) groups, and their labels.

    Each cluster centre has its own random sparse set of active channels, so the groups
    differ in direction, not only in length, like post-ReLU activations of different concepts.
    Within a cluster points vary along ``latent`` random directions (scale ``spread``) plus a
    little isotropic ``noise``, so they have real neighbourhoods for a layout to keep.
    """
    rng = np.random.default_rng(seed)
    active = rng.random((clusters, c)) < density
    active[np.arange(clusters), rng.integers(0, c, clusters)] = True  # no empty centre
    centres = (rng.gamma(2.0, 1.0, (clusters, c)) * active).astype(np.float32)
    labels = rng.integers(0, clusters, n).astype(np.int64)
    x = np.empty((n, c), dtype=np.float32)
    for j in range(clusters):
        members = np.flatnonzero(labels == j)
        scale = float(centres[j].mean())
        basis = (rng.standard_normal((latent, c)) * active[j]).astype(np.float32) * (spread * 2.0 * scale)
        z = rng.standard_normal((members.size, latent), dtype=np.float32)
        iso = rng.standard_normal((members.size, c), dtype=np.float32) * (noise * scale)
        x[members] = np.maximum(centres[j] + z @ basis + iso, 0.0)
    return x, labels


def make_store(run_dir: str | Path, layer: str = "mixed4c", n: int = 2000, c: int = 64, k_classes: int = 10, clusters: int = 5,
               seed: int = 0, invalid: float = 0.0, duplicates: float = 0.0, attributions: bool = True, per_image: int = 4,
               positions: int = 14, spread: float = 0.15, dtype: str = "float32") -> dict:
    """Write a synthetic run to ``run_dir/store.zarr`` and return what was written.

    ``invalid`` is the fraction of rows marked not valid (whole images, as the sampler does),
    ``duplicates`` the fraction of rows overwritten with exact copies of one row of their
    cluster (to exercise duplicate-point handling), ``attributions=False`` mimics a run
    sampled with ``--no-attribution``; ``dtype`` "float16" stores like the sampler's default.
    Cluster ``j`` has most attribution on class ``j % k_classes``.
    Returns a dict with ``activations``, ``attributions`` (or None), ``labels``, ``valid``, ``image_index``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    x, labels = clustered(n, c, clusters, seed=seed, spread=spread)
    if duplicates > 0:
        n_dup = int(round(duplicates * n))
        rows = rng.choice(n, n_dup, replace=False)
        for j in range(clusters):
            members = np.flatnonzero(labels == j)
            if members.size:
                mine = rows[labels[rows] == j]
                x[mine] = x[members[0]]
    n_images = -(-n // per_image)
    image_index = (np.arange(n) // per_image).astype(np.int32)
    image_ok = np.ones(n_images, dtype=bool)
    if invalid > 0:
        image_ok[rng.choice(n_images, int(round(invalid * n_images)), replace=False)] = False
    valid = image_ok[image_index]
    position = np.stack([rng.integers(0, positions, n), rng.integers(0, positions, n)], axis=1).astype(np.int16)

    root = open_store(run_dir, mode="a")
    root.attrs.update({"model": "synthetic", "weights": "none", "seed": seed, "layers": [layer], "per_image": per_image,
                       "shard_size": n_images, "n_images": n_images, "attribution": attributions, "dtype": dtype,
                       "classes": [f"class_{i}" for i in range(k_classes)]})
    images = root.require_group("images")
    with warnings.catch_warnings():  # zarr warns that fixed-length strings have no v3 spec yet; the sampler stores them too
        warnings.simplefilter("ignore")
        write_array(images, "path", np.array([f"img_{i:06d}.jpg" for i in range(n_images)], dtype=str))
    write_array(images, "label", (np.arange(n_images) % k_classes).astype(np.int32))
    write_array(images, "ok", image_ok)
    write_array(images, "top5", np.tile(np.arange(5, dtype=np.int32), (n_images, 1)))
    write_array(images, "shard_done", np.ones(1, dtype=bool))
    group = root.require_group("samples").require_group(layer)
    write_array(group, "activations", x.astype(dtype))
    attr = None
    if attributions:
        attr = (rng.standard_normal((n, k_classes)) * 0.1).astype(np.float32)
        attr[np.arange(n), labels % k_classes] += 1.0
        write_array(group, "attributions", attr.astype(dtype))
    write_array(group, "image_index", image_index)
    write_array(group, "position", position)
    write_array(group, "valid", valid)
    group.attrs.update({"channels": c, "grid_hw": [positions, positions], "layer": layer, "module": layer})
    return {"activations": x, "attributions": attr, "labels": labels, "valid": valid, "image_index": image_index}
