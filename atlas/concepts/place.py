"""Where concepts live: their top dataset examples and their mean code per atlas cell (arrays in, arrays out).

- :func:`top_examples` ranks, per concept, the run's images by the largest code among their sampled positions (one
  example per image), with the unit lens's tie-breaking (:func:`atlas.units.topk.merge_topk`: a higher code first,
  then the lower image index, then the lower (y, x)).
- :func:`veil` is the mean code of each concept over the samples of each cell of an atlas grid: the map of where the
  concept lives on the atlas.
- :func:`shares` splits a cell's mean activation into the concepts' contributions: concept k's share of cell m is
  ``veil[m, k] * (atom_k . mean_m) / |mean_m|^2``, its part of the mean activation's length along itself (the shares
  and the dictionary's bias and residual add up to 1).
"""

from __future__ import annotations

import numpy as np

from atlas.units.topk import Top, empty_top, merge_topk


def top_examples(codes: np.ndarray, image_index: np.ndarray, position: np.ndarray, k: int) -> Top:
    """Each concept's k images with the highest code, one example (their best sampled position) per image.

    Parameters
    ----------
    codes : ndarray of shape (N, K)
        Codes of the sampled rows (rows of unreadable images all zero).
    image_index : ndarray of shape (N,)
        The image of each row.
    position : ndarray of shape (N, 2)
        (y, x) of each row in the layer's grid.
    k : int
        Examples per concept (>= 1).

    Returns
    -------
    Top
        ``value`` (K, k) codes, ``image`` (K, k), ``pos`` (K, k, 2); concepts with fewer than k images whose code is
        above zero are padded (value -inf, image -1): an image where the concept is silent is no example of it.
    """
    n, n_concepts = codes.shape
    image_index = np.asarray(image_index, np.int64)
    position = np.asarray(position, np.int32)
    per_image = int(np.bincount(image_index).max()) if n else 1
    top = empty_top(n_concepts, k)
    if n == 0:
        return top
    # The k best images are among the k * (rows per image) best rows: candidates first, then one row per image.
    m = min(n, k * per_image)
    for c in range(n_concepts):
        col = codes[:, c]
        cand = np.argpartition(-col, m - 1)[:m] if m < n else np.arange(n)
        cand = cand[col[cand] > 0]
        if cand.size == 0:
            continue
        # best row per image: sort by (image, -code, y, x) and keep each image's first
        order = np.lexsort((position[cand, 1], position[cand, 0], -col[cand], image_index[cand]))
        cand = cand[order]
        first = np.ones(cand.size, bool)
        first[1:] = image_index[cand][1:] != image_index[cand][:-1]
        cand = cand[first]
        one = Top(col[cand][None, :].astype(np.float32), image_index[cand][None, :], position[cand][None, :, :])
        best = merge_topk(one, empty_top(1, 0), k)
        top.value[c], top.image[c], top.pos[c] = best.value[0], best.image[0], best.pos[0]
    return top


def veil(codes: np.ndarray, cell: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean code of every concept over the samples of each cell of a ``size`` x ``size`` grid.

    Parameters
    ----------
    codes : ndarray of shape (M, K)
        Codes of the laid-out samples.
    cell : ndarray of shape (M,)
        Flat cell ``gy * size + gx`` of each sample (-1: dropped by the layout, not counted).
    size : int
        Grid side.

    Returns
    -------
    (ndarray of shape (size, size, K) float32, ndarray of shape (size, size) int64)
        The mean codes (zero in empty cells) and the samples per cell.
    """
    cell = np.asarray(cell, np.int64)
    keep = cell >= 0
    n_concepts = codes.shape[1]
    total = np.zeros((size * size, n_concepts), np.float64)
    np.add.at(total, cell[keep], np.asarray(codes, np.float64)[keep])
    count = np.bincount(cell[keep], minlength=size * size).astype(np.int64)
    mean = total / np.maximum(count, 1)[:, None]
    return mean.reshape(size, size, n_concepts).astype(np.float32), count.reshape(size, size)


def shares(mean_codes: np.ndarray, atoms: np.ndarray, mean_activation: np.ndarray) -> np.ndarray:
    """Each concept's share of each cell's mean activation (see the module's docstring).

    Parameters
    ----------
    mean_codes : ndarray of shape (S, S, K)
        :func:`veil`'s mean codes.
    atoms : ndarray of shape (K, C)
        The dictionary's unit-norm directions.
    mean_activation : ndarray of shape (S, S, C)
        The grid's mean activation per cell.

    Returns
    -------
    ndarray of shape (S, S, K) float32
        Zero in cells whose mean activation is zero.
    """
    m = np.asarray(mean_activation, np.float64)
    along = m @ np.asarray(atoms, np.float64).T  # (S, S, K): atom_k . mean
    norm2 = (m * m).sum(-1, keepdims=True)
    return np.where(norm2 > 0, mean_codes * along / np.where(norm2 > 0, norm2, 1.0), 0.0).astype(np.float32)
