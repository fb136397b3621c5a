"""Sparse dictionaries side by side on the same activations: atlas's TopK SAE and NMF, and the `overcomplete` package's.

    python bench/concepts.py --run RUN --layer mixed4c [--rows 100000] [--concepts 256] [--sparsity 8]

Reads the run's sampled activations (``atlas sample``), holds out 10% of the rows (a random tenth, seed 0), fits every
method on the rest and prints per method: R^2 of the held-out rows' reconstruction (their codes from the fitted
encoder or, for NMF, a non-negative least-squares fit against the fixed dictionary), mean active concepts per
held-out sample, dead concepts (active on none of the held-out rows), fit time and the fit's peak memory above the
data already loaded (each method runs in a forked child; its peak resident set minus the parent's).

The `overcomplete` columns run when the package imports (``pip install overcomplete``; it pulls in OpenCV and
scikit-image for its plots). ``--overcomplete-path DIR`` adds a folder to ``sys.path`` first (a ``pip install
--target DIR`` that keeps them out of the environment).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(run: str, layer: str, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` random sampled rows of the layer (all when fewer): their activations and their row numbers."""
    from atlas import store

    root = store.open_store(run)
    valid = store.valid_rows(root, layer)
    rng = np.random.default_rng(seed)
    if rows < len(valid):
        valid = np.sort(rng.choice(valid, rows, replace=False))
    return store.read_rows(root[f"samples/{layer}/activations"], valid), valid


# Coarse groups of the ImageNet-1k class indices (contiguous WordNet ranges): the shared photos hold one photo per
# class, so the purity of a top-9 is measured on these groups (a concept or channel whose 9 best images are all dogs
# has purity 1; nine different groups 1/9).
GROUPS = {"fish": [(0, 6), (389, 397)], "bird": [(7, 24), (80, 100), (127, 146)], "amphibian or reptile": [(25, 68)],
          "invertebrate": [(69, 79), (107, 126), (300, 329)], "dog": [(151, 268)],
          "other mammal": [(101, 106), (147, 150), (269, 299), (330, 388)], "artifact": [(398, 923)], "food": [(924, 969)],
          "nature and other": [(970, 999)]}


def group_of(label: int) -> int:
    for g, ranges in enumerate(GROUPS.values()):
        if any(lo <= label <= hi for lo, hi in ranges):
            return g
    return len(GROUPS)


def top9_purity(scores: np.ndarray, image: np.ndarray, position: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per column of ``scores`` (N, K): the share of the most common group among its 9 best images (one per image, by
    its best row; the unit lens's ranking). NaN for columns active on fewer than 9 images."""
    from atlas.concepts.place import top_examples

    top = top_examples(scores, image, position, 9)
    out = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        imgs = top.image[k][top.image[k] >= 0]
        if imgs.size == 9:
            out[k] = np.bincount(groups[imgs]).max() / 9
    return out


def purity(args) -> None:
    """Class purity of the top-9 images of every concept (atlas topk-sae and nmf fitted on the rows) and every channel."""
    from atlas import store
    from atlas.concepts import dictionary as dl

    x, rows = load(args.run, args.layer, args.rows, 0)
    root = store.open_store(args.run)
    image = root[f"samples/{args.layer}/image_index"].get_coordinate_selection(rows)
    position = root[f"samples/{args.layer}/position"].get_orthogonal_selection((rows, slice(None)))
    groups = np.array([group_of(int(v)) for v in root["images/label"][:]])
    rng = np.random.default_rng(0)
    n_img = len(np.unique(image))
    chance = np.mean([np.bincount(groups[rng.choice(np.unique(image), 9, replace=False)]).max() / 9 for _ in range(2000)])
    print(f"{args.layer}: {len(x):,} rows of {n_img} images; top-9 purity over {len(GROUPS)} coarse class groups "
          f"(9 random images: {chance:.3f})")
    table = {"channels": np.maximum(x, 0)}
    for method in args.purity_method or ("topk-sae", "nmf"):
        start = time.perf_counter()
        d, codes = dl.fit(x, args.concepts, method, args.sparsity, epochs=args.epochs)
        print(f"  fitted {method} in {time.perf_counter() - start:.0f}s: R^2 {dl.r2(x, dl.reconstruct(d, codes)):.3f}, "
              f"{dl.active_per_sample(codes):.1f} active per sample, {dl.dead_concepts(codes)} dead", flush=True)
        table[f"{method} concepts"] = codes
    for name, scores in table.items():
        p = top9_purity(scores, image, position, groups)
        ok = p[~np.isnan(p)]
        pick = rng.choice(ok, min(20, ok.size), replace=False)
        print(f"  {name:20s} mean purity {ok.mean():.3f} (median {np.median(ok):.3f}, {ok.size} with 9 images); "
              f"20 random ones: {pick.mean():.3f}; share with purity >= 5/9: {(ok >= 5 / 9 - 1e-9).mean():.2f}", flush=True)


def atlas_sae(train, test, k_concepts, sparsity, epochs, threads):
    import torch

    from atlas.concepts import dictionary as dl

    torch.set_num_threads(threads)
    d = dl.fit_topk_sae(train, k_concepts, sparsity, epochs=epochs)
    return dl.reconstruct(d, dl.encode(d, test)), dl.encode(d, test)


def atlas_nmf(train, test, k_concepts, sparsity, epochs, threads):
    from threadpoolctl import threadpool_limits

    from atlas.concepts import dictionary as dl

    with threadpool_limits(threads):
        d, _ = dl.fit_nmf(train, k_concepts, max_iter=200)
        codes = dl.encode(d, test)
    return dl.reconstruct(d, codes), codes


def oc_sae(train, test, k_concepts, sparsity, epochs, threads):
    import torch
    from overcomplete.sae import TopKSAE, train_sae
    from overcomplete.sae.losses import top_k_auxiliary_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mean = train.mean(0)
    scale = float(np.sqrt(((train - mean) ** 2).sum(1).mean()))
    x = torch.from_numpy((train - mean) / scale).float()
    model = TopKSAE(train.shape[1], nb_concepts=k_concepts, top_k=sparsity)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=1024, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_sae(model, loader, top_k_auxiliary_loss, opt, nb_epochs=epochs, monitoring=0)
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy((test - mean) / scale).float()
        _, z, x_hat = model(xt)
    return x_hat.numpy() * scale + mean, z.numpy()


def oc_nmf(train, test, k_concepts, sparsity, epochs, threads):
    import torch
    from overcomplete.optimization import NMF

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = NMF(k_concepts, solver="hals")
    model.fit(torch.from_numpy(train).float(), max_iter=200)
    codes = model.encode(torch.from_numpy(test).float(), max_iter=200)
    return model.decode(codes).numpy(), codes.numpy()


METHODS = {"atlas topk-sae": atlas_sae, "atlas nmf (scikit-learn)": atlas_nmf,
           "overcomplete TopKSAE": oc_sae, "overcomplete NMF (hals)": oc_nmf}


def run_child(name, fn, train, test, args) -> dict:
    """Fit in a forked child so that each method's peak memory is its own."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            base = rss_peak_mb()
            start = time.perf_counter()
            x_hat, codes = fn(train, test, args.concepts, args.sparsity, args.epochs, args.threads)
            seconds = time.perf_counter() - start
            from atlas.concepts import dictionary as dl

            out = (f"{dl.r2(test, x_hat):.4f} {dl.active_per_sample(codes):.2f} {dl.dead_concepts(codes)} "
                   f"{seconds:.1f} {rss_peak_mb() - base:.0f}")
        except Exception as exc:  # noqa: BLE001 - one method failing must not stop the others
            out = f"error {type(exc).__name__}: {exc}"
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    if text.startswith("error"):
        return {"method": name, "error": text}
    r2, active, dead, seconds, mem = text.split()
    return {"method": name, "r2": float(r2), "active": float(active), "dead": int(dead), "seconds": float(seconds), "mb": float(mem)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--layer", default="mixed4c")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--concepts", type=int, default=256)
    p.add_argument("--sparsity", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", action="append", choices=list(METHODS), help="only these (repeatable)")
    p.add_argument("--overcomplete-path", default=None)
    p.add_argument("--purity", action="store_true", help="instead: class purity of top-9 images, concepts against channels")
    p.add_argument("--purity-method", action="append", choices=["topk-sae", "nmf"], help="with --purity: only these (repeatable)")
    args = p.parse_args()
    if args.purity:
        purity(args)
        return
    if args.overcomplete_path:
        sys.path.insert(0, args.overcomplete_path)
    x, _ = load(args.run, args.layer, args.rows, 0)
    rng = np.random.default_rng(0)
    held = rng.random(len(x)) < 0.1
    train, test = np.ascontiguousarray(x[~held]), np.ascontiguousarray(x[held])
    try:
        import matplotlib

        if not hasattr(matplotlib.cm, "get_cmap"):  # overcomplete 0.3.0's plots call it; matplotlib 3.9 removed it
            matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
        import overcomplete  # noqa: F401

        have_oc = True
    except Exception:  # noqa: BLE001 - any import failure means: not available here
        have_oc = False
    print(f"{args.layer}: {len(train):,} training rows, {len(test):,} held out, {x.shape[1]} channels; {args.concepts} concepts, "
          f"SAE k={args.sparsity}, "
          f"{args.epochs} epochs; {args.threads} threads; overcomplete {'available' if have_oc else 'not importable'}")
    print(f"{'method':28s} {'held-out R^2':>12s} {'active/sample':>13s} {'dead':>5s} {'fit s':>8s} {'peak MB':>8s}")
    for name in args.method or list(METHODS):
        if name.startswith("overcomplete") and not have_oc:
            continue
        r = run_child(name, METHODS[name], train, test, args)
        if "error" in r:
            print(f"{name:28s} {r['error']}")
        else:
            print(f"{name:28s} {r['r2']:12.4f} {r['active']:13.2f} {r['dead']:5d} {r['seconds']:8.1f} {r['mb']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
