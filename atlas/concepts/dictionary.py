"""Sparse dictionaries of a layer's activations: plain arrays in, plain arrays out (nothing here reads a run).

Two methods learn ``K`` concept directions ``D`` (K, C) and a non-negative code ``z`` (K,) per sample such that
``x ~ z @ D + b``:

- ``topk-sae``: a TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
  ``z = TopK(ReLU(W (x - b) + e))``, exactly ``k`` concepts active per sample, a linear decoder with unit-norm rows, and
  the auxiliary loss that trains concepts which have not fired for a while on the residual (so few stay dead).
- ``nmf``: non-negative matrix factorisation (scikit-learn's coordinate descent), for activations after a ReLU
  (non-negative); ``b`` is zero and the codes are whatever sparsity NMF finds.

:func:`fit` returns a :class:`Dictionary` (atoms of unit norm, codes in the activations' units, so
``codes @ atoms + bias`` reconstructs the activations); :func:`encode` codes new samples with a fitted dictionary;
:func:`r2`, :func:`active_per_sample` and :func:`dead_concepts` are the measures the bench and the store report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

METHODS = ("topk-sae", "nmf")
# A code counts as active above this fraction of the largest code in the whole code matrix (NMF's coordinate descent
# leaves tiny positive values where an exact solver would give zero; the SAE's inactive codes are exactly zero).
ACTIVE_FRACTION = 1e-4


class Dictionary(NamedTuple):
    """A fitted dictionary.

    ``atoms`` (K, C) float32, rows of unit L2 norm (the concept directions in activation space); ``bias`` (C,)
    float32 (the SAE's decoder bias, zero for NMF); ``encoder`` (C, K) and ``encoder_bias`` (K,) float32 (the SAE's
    encoder, in units of the scaled input; None for NMF, whose codes are a non-negative least-squares fit); ``scale``
    float (the input was divided by it for the SAE's training); ``method`` str; ``sparsity`` int (k of the SAE, 0 for
    NMF).
    """

    atoms: np.ndarray
    bias: np.ndarray
    encoder: np.ndarray | None
    encoder_bias: np.ndarray | None
    scale: float
    method: str
    sparsity: int


def r2(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Explained variance: ``1 - |x - x_hat|^2 / |x - mean(x)|^2`` over all samples and channels.

    Parameters
    ----------
    x : ndarray of shape (N, C)
        The activations.
    x_hat : ndarray of shape (N, C)
        Their reconstruction.

    Returns
    -------
    float
        1 for a perfect reconstruction, 0 for predicting the mean of every channel.
    """
    x = np.asarray(x, np.float64)
    total = float(((x - x.mean(0)) ** 2).sum())
    return 1.0 - float(((x - np.asarray(x_hat, np.float64)) ** 2).sum()) / max(total, 1e-30)


def active_threshold(codes: np.ndarray) -> float:
    """The value a code must exceed to count as active (see :data:`ACTIVE_FRACTION`)."""
    top = float(np.max(codes)) if codes.size else 0.0
    return max(top, 0.0) * ACTIVE_FRACTION


def active_per_sample(codes: np.ndarray) -> float:
    """Mean number of active concepts per sample (L0 of the code).

    Parameters
    ----------
    codes : ndarray of shape (N, K)
        Non-negative codes.

    Returns
    -------
    float
    """
    return float((codes > active_threshold(codes)).sum(1).mean()) if len(codes) else 0.0


def dead_concepts(codes: np.ndarray) -> int:
    """Concepts active on none of the samples.

    Parameters
    ----------
    codes : ndarray of shape (N, K)
        Non-negative codes.

    Returns
    -------
    int
    """
    return int((~(codes > active_threshold(codes)).any(0)).sum()) if len(codes) else int(codes.shape[1])


def reconstruct(dictionary: Dictionary, codes: np.ndarray) -> np.ndarray:
    """``codes @ atoms + bias``: the activations the codes stand for, (N, C) float32."""
    return (np.asarray(codes, np.float32) @ dictionary.atoms + dictionary.bias).astype(np.float32)


# ----------------------------------------------------------------------------- TopK sparse autoencoder


def _sae_codes(torch, x, w, e, b, k: int):
    """The SAE's codes of a batch (scaled units) and its pre-activations: ReLU, then the k largest kept."""
    pre = torch.relu((x - b) @ w + e)
    top = torch.topk(pre, k, dim=1)
    return torch.zeros_like(pre).scatter_(1, top.indices, top.values), pre


def fit_topk_sae(x: np.ndarray, n_concepts: int, k: int, *, epochs: int = 20, batch: int = 1024, lr: float = 1e-3,
                 aux_weight: float = 1 / 32, dead_after: int | None = None, seed: int = 0, device: str = "cpu",
                 threads: int | None = None, on_epoch: Callable[[int, float], None] | None = None) -> Dictionary:
    """Train a TopK sparse autoencoder on ``x``.

    Parameters
    ----------
    x : ndarray of shape (N, C)
        Activations (any sign).
    n_concepts : int
        Dictionary size K (>= 1).
    k : int
        Concepts active per sample (1 <= k <= K).
    epochs : int, default 20
        Passes over ``x``.
    batch : int, default 1024
        Samples per optimisation step at most (sets of fewer than 64 x ``batch`` rows use ``max(32, N // 64)``).
    lr : float, default 1e-3
        Adam's learning rate (the input is scaled to unit mean squared norm first, so it suits any layer).
    aux_weight : float, default 1/32
        Weight of the auxiliary loss (Gao et al.): the concepts dead for ``dead_after`` samples reconstruct the
        residual, so they get gradient and come back.
    dead_after : int or None, default None
        Samples after which a concept that has not fired counts as dead; None: half an epoch, at least one batch.
    seed : int, default 0
        Seed of the initial dictionary and of the sample order (the fit is deterministic on one machine).
    device : str, default "cpu"
        Where to train.
    threads : int or None, default None
        torch's intra-op threads during the fit (None: unchanged).
    on_epoch : callable or None, default None
        Called with (epoch index, mean training loss) after every epoch (progress, interruption points).

    Returns
    -------
    Dictionary
    """
    import torch

    n, c = x.shape
    k = int(min(k, n_concepts))
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        gen = torch.Generator().manual_seed(int(seed))
        rng = np.random.default_rng(seed)
        mean = x.mean(0, dtype=np.float64)
        # One scale for every channel keeps the directions: the fit sees unit mean squared norm around the mean.
        scale = float(np.sqrt(((x - mean) ** 2).sum(1).mean())) or 1.0
        data = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
        b = torch.tensor(mean / scale, dtype=torch.float32, device=device, requires_grad=True)
        d = torch.randn(n_concepts, c, generator=gen).to(device)
        d = d / d.norm(dim=1, keepdim=True)
        d.requires_grad_(True)
        w = d.detach().t().clone().requires_grad_(True)  # the encoder starts as the decoder's transpose (Gao et al.)
        e = torch.zeros(n_concepts, device=device, requires_grad=True)
        opt = torch.optim.Adam([b, d, w, e], lr=lr)
        dead_after = int(dead_after) if dead_after else max(batch, n // 2)
        since = torch.zeros(n_concepts, dtype=torch.long, device=device)  # samples since each concept last fired
        aux_k = min(n_concepts, max(2 * k, c // 2))
        # small sets get smaller batches: enough optimisation steps per epoch (at least ~64) to learn anything
        batch = max(1, min(int(batch), max(32, n // 64)))
        steps = max(1, math.ceil(n / batch))
        for epoch in range(int(epochs)):
            order = torch.from_numpy(rng.permutation(n)).to(device)
            total = 0.0
            for step in range(steps):
                xb = data[order[step * batch:(step + 1) * batch]] / scale
                z, pre = _sae_codes(torch, xb, w, e, b, k)
                x_hat = z @ d + b
                residual = xb - x_hat
                loss = residual.pow(2).sum(1).mean()
                fired = (z > 0).any(0)
                since = torch.where(fired, torch.zeros_like(since), since + xb.shape[0])
                dead = since >= dead_after
                if aux_weight and bool(dead.any()):
                    # the dead concepts' own top-k of the pre-activations predicts what the live ones left over
                    masked = torch.where(dead, pre, torch.zeros_like(pre))
                    top = torch.topk(masked, min(aux_k, int(dead.sum())), dim=1)
                    aux = torch.zeros_like(pre).scatter_(1, top.indices, top.values) @ d
                    loss = loss + aux_weight * (residual.detach() - aux).pow(2).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    d /= d.norm(dim=1, keepdim=True).clamp_min(1e-12)  # unit-norm atoms: codes carry the magnitude
                total += float(loss.detach())
            if on_epoch is not None:
                on_epoch(epoch, total / steps)
        return Dictionary(d.detach().cpu().numpy().astype(np.float32), (b.detach().cpu().numpy() * scale).astype(np.float32),
                          w.detach().cpu().numpy().astype(np.float32), e.detach().cpu().numpy().astype(np.float32),
                          scale, "topk-sae", k)
    finally:
        torch.set_num_threads(old_threads)


def _encode_sae(dictionary: Dictionary, x: np.ndarray, block: int) -> np.ndarray:
    import torch

    w = torch.from_numpy(dictionary.encoder)
    e = torch.from_numpy(dictionary.encoder_bias)
    b = torch.from_numpy(dictionary.bias / dictionary.scale)
    out = np.empty((len(x), dictionary.atoms.shape[0]), np.float32)
    with torch.no_grad():
        for start in range(0, len(x), block):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + block], np.float32)) / dictionary.scale
            z, _ = _sae_codes(torch, xb, w, e, b, dictionary.sparsity)
            out[start:start + block] = (z * dictionary.scale).numpy()  # back to the activations' units
    return out


# ----------------------------------------------------------------------------- NMF


def fit_nmf(x: np.ndarray, n_concepts: int, *, max_iter: int = 200, tol: float = 1e-4, seed: int = 0) -> tuple[Dictionary, np.ndarray]:
    """Non-negative matrix factorisation ``x ~ W H`` (scikit-learn, coordinate descent, NNDSVDa start).

    Parameters
    ----------
    x : ndarray of shape (N, C)
        Non-negative activations.
    n_concepts : int
        Dictionary size K.
    max_iter : int, default 200
        Coordinate-descent iterations at most.
    tol : float, default 1e-4
        Stopping tolerance (scikit-learn's).
    seed : int, default 0
        Seed of the initialisation's random fill.

    Returns
    -------
    (Dictionary, ndarray of shape (N, K) float32)
        The dictionary (atoms = H's rows normalised) and the codes of ``x`` (W, scaled by the rows' norms).
    """
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    model = NMF(n_components=int(n_concepts), init="nndsvda", solver="cd", max_iter=int(max_iter), tol=tol, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the budget; the R^2 says how good the fit is
        codes = model.fit_transform(np.asarray(x, np.float32))
    atoms, codes = _unit_atoms(model.components_, codes)
    c = x.shape[1]
    return Dictionary(atoms, np.zeros(c, np.float32), None, None, 1.0, "nmf", 0), codes


def _unit_atoms(h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``h`` to unit norm, the codes ``w`` scaled so that ``w @ h`` is unchanged (all-zero rows stay zero)."""
    norms = np.linalg.norm(h, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return (h / safe[:, None]).astype(np.float32), (w * norms[None, :]).astype(np.float32)


def _encode_nmf(dictionary: Dictionary, x: np.ndarray, max_iter: int) -> np.ndarray:
    import warnings

    from sklearn.decomposition import non_negative_factorization
    from sklearn.exceptions import ConvergenceWarning

    h = dictionary.atoms.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w, _, _ = non_negative_factorization(np.asarray(x, np.float32), H=h, n_components=h.shape[0], init="custom",
                                             update_H=False, solver="cd", max_iter=max_iter)
    return w.astype(np.float32)


# ----------------------------------------------------------------------------- one entry


def fit(x: np.ndarray, n_concepts: int, method: str = "topk-sae", sparsity: int = 8, *, epochs: int = 20, max_iter: int = 200,
        seed: int = 0, device: str = "cpu", on_epoch: Callable[[int, float], None] | None = None) -> tuple[Dictionary, np.ndarray]:
    """Learn a dictionary of ``n_concepts`` concepts over the rows of ``x`` and code every row.

    Parameters
    ----------
    x : ndarray of shape (N, C)
        Activations, one sample per row.
    n_concepts : int
        Dictionary size K (1 <= K <= N).
    method : {"topk-sae", "nmf"}, default "topk-sae"
        See the module's docstring. NMF needs non-negative ``x``.
    sparsity : int, default 8
        The SAE's k (concepts active per sample); NMF ignores it.
    epochs : int, default 20
        The SAE's passes over ``x``.
    max_iter : int, default 200
        NMF's iterations at most.
    seed : int, default 0
        Seed of the fit.
    device : str, default "cpu"
        Where the SAE trains (NMF runs on the CPU).
    on_epoch : callable or None, default None
        The SAE's per-epoch callback (epoch, loss).

    Returns
    -------
    (Dictionary, ndarray of shape (N, K) float32)
        The dictionary and the codes of ``x`` (for both methods, :func:`encode` of ``x`` with the final dictionary).

    Raises
    ------
    ValueError
        For an unknown method, K < 1 or K > N, or negative input to NMF (callers turn it into one line).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    n = len(x)
    if not 1 <= n_concepts <= n:
        raise ValueError(f"{n_concepts} concepts need at least as many samples; there are {n}")
    if method == "nmf":
        if float(np.min(x)) < 0:
            raise ValueError("nmf needs non-negative activations (a layer after a ReLU); this layer has negative values: "
                             "use topk-sae")
        d, _ = fit_nmf(x, n_concepts, max_iter=max_iter, seed=seed)
        # the codes of the final dictionary: the factorisation's own W stops where its tolerance says, short of the
        # least-squares codes of the atoms it ends with (measured on mixed4c: R^2 0.18 against 0.42 coded again)
        return d, encode(d, x, max_iter=max_iter)
    if not 1 <= sparsity <= n_concepts:
        raise ValueError(f"sparsity must be between 1 and the number of concepts ({n_concepts}); got {sparsity}")
    d = fit_topk_sae(x, n_concepts, sparsity, epochs=epochs, seed=seed, device=device, on_epoch=on_epoch)
    return d, encode(d, x)


def encode(dictionary: Dictionary, x: np.ndarray, block: int = 16384, max_iter: int = 200) -> np.ndarray:
    """The codes of new samples under a fitted dictionary: the SAE's encoder, or NMF's non-negative least squares.

    Parameters
    ----------
    dictionary : Dictionary
        From :func:`fit`.
    x : ndarray of shape (N, C)
        Activations.
    block : int, default 16384
        Rows coded at a time (the SAE).
    max_iter : int, default 200
        NMF's coordinate-descent iterations for the codes.

    Returns
    -------
    ndarray of shape (N, K) float32
    """
    if dictionary.method == "nmf":
        return _encode_nmf(dictionary, np.maximum(x, 0), max_iter)
    return _encode_sae(dictionary, x, block)
