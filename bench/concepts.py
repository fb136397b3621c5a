"""Sparse dictionaries side by side on the same activations: atlas's TopK SAE and NMF, and the `overcomplete` package's.

    python bench/concepts.py --run RUN --layer mixed4c [--rows 100000] [--concepts 256] [--sparsity 8]
    python bench/concepts.py --run RUN --layer mixed4c --purity         # top-9 class purity, concepts against channels
    python bench/concepts.py --run RUN --layer mixed4c --sheet OUT.jpg  # 20 concepts and 20 channels, by eye

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


def draw_picks(scores: np.ndarray, image: np.ndarray, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """``n`` columns of ``scores`` drawn at random among those active (above 0) on at least 9 images; the others are
    skipped and counted in one printed line."""
    rows_active = scores > 0
    images_active = np.array([np.unique(image[rows_active[:, k]]).size for k in range(scores.shape[1])])
    dead = int((images_active == 0).sum())
    few = int(((images_active > 0) & (images_active < 9)).sum())
    eligible = np.flatnonzero(images_active >= 9)
    print(f"  {what}: {scores.shape[1]}, of which {dead} dead (never active) and {few} active on fewer than 9 images: "
          f"skipped; {n} drawn at random from the other {eligible.size}")
    return np.sort(rng.choice(eligible, min(n, eligible.size), replace=False))


def sheet(args) -> None:
    """A sheet of 20 concepts and 20 channels drawn at random, each a row: its icon, then its top-9 dataset patches.

    The dictionary is the stored one of ``atlas concepts`` with these settings (fitted now when missing: the library's
    :func:`atlas.concepts.concepts`, without icons). Concepts' and channels' icons are the same renderer with the
    same settings (the direction objective with the run's whitening, on the concept's atom or the channel's unit
    vector); their top-9 are ranked over the sampled positions, one per image (:func:`atlas.concepts.place.top_examples`),
    and cut from the photos as the model reads them (:func:`atlas.concepts.writer.example_patches`).
    """
    import torch
    from PIL import Image, ImageDraw, ImageFont

    import atlas
    from atlas import store
    from atlas.concepts import concepts
    from atlas.concepts.place import top_examples
    from atlas.concepts.writer import example_patches, icon_settings, layer_whitening
    from atlas.models import load_run_model
    from atlas.render.run import render_batch
    from atlas.settings import ConceptsSettings

    torch.set_num_threads(args.threads)
    run, layer = args.run, args.layer
    s = ConceptsSettings(concepts=args.concepts, sparsity=args.sparsity, epochs=args.epochs, icons=False)
    concepts(run, layer, s, echo=None, progress=False, panel=False)  # the stored dictionary, or fitted now
    c = atlas.open_run(run).concepts(layer)
    root = store.open_store(run)
    samples = root[f"samples/{layer}"]
    x = store.read_rows(samples["activations"], c.rows)
    image = samples["image_index"].get_coordinate_selection(c.rows)
    position = samples["position"].get_orthogonal_selection((c.rows, slice(None)))
    labels = root["images/label"][:]
    groups = np.array([group_of(int(v)) for v in labels])
    print(f"{layer}: {len(c.rows):,} sampled rows of {np.unique(image).size} images; {c.atoms.shape[0]} concepts ({c.method}, "
          f"k={c.sparsity}, R^2 {c.summary.get('r2')})")
    rng = np.random.default_rng(args.seed)
    channels = np.maximum(x, 0)
    picked = {"concept": draw_picks(c.codes, image, 20, rng, "concepts"), "channel": draw_picks(channels, image, 20, rng, "channels")}
    scores = {"concept": c.codes, "channel": channels}
    vectors = {"concept": c.atoms, "channel": np.eye(x.shape[1], dtype=np.float32)}
    settings, _ = icon_settings(ConceptsSettings(quality=args.quality, steps=args.steps))
    net = load_run_model(store.attrs(root), "cpu")
    whitening = layer_whitening(root, layer, store.valid_rows(root, layer))
    rows = {}
    for kind, idx in picked.items():
        top = top_examples(scores[kind][:, idx], image, position, 9)
        _, patches = example_patches(run, layer, top, net, args.patch)
        counts = [np.bincount(groups[top.image[i][top.image[i] >= 0]], minlength=len(GROUPS) + 1) for i in range(len(idx))]
        purity = np.array([v.max() / 9 for v in counts])
        majority = [list(GROUPS)[int(v.argmax())] if v.argmax() < len(GROUPS) else "other" for v in counts]
        cache = Path(args.cache) / f"{layer}-{kind}-{args.seed}-{settings.steps}x{settings.attempts}.npz" if args.cache else None
        if cache is not None and cache.is_file() and np.array_equal(np.load(cache)["idx"], idx):
            icons, seconds = np.load(cache)["icons"], float(np.load(cache)["seconds"])
        else:
            # seeds as `atlas concepts` gives its icons: (seed, index, attempt); channels numbered after the concepts
            offset = 0 if kind == "concept" else c.atoms.shape[0]
            seeds = [(s.seed, offset + int(i), a) for i in idx for a in range(settings.attempts)]
            start = time.perf_counter()
            icons, cosine, _, _ = render_batch(net, layer, vectors[kind][idx], whitening, seeds, settings, "cpu")
            seconds = time.perf_counter() - start
            print(f"  {kind} icons: mean cos(h, v) {cosine.mean():.3f}", flush=True)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache, idx=idx, icons=icons, seconds=seconds)
        steps = len(idx) * settings.steps * settings.attempts
        print(f"  {kind} icons: {len(idx)} x {settings.steps} steps x {settings.attempts} attempts in {seconds:.0f}s at "
              f"{args.threads} thread(s) ({steps / seconds:.1f} icon-steps/s)", flush=True)
        print(f"  {kind} top-9 purity: mean {purity.mean():.3f} over the {len(idx)} drawn", flush=True)
        rows[kind] = (idx, icons, patches, purity, majority)

    cell, gap, label_w = settings.size, 4, 150
    column_w = label_w + cell + 2 * gap + 9 * args.patch
    header = 26
    sheet_img = Image.new("RGB", (2 * column_w + 3 * gap, header + 20 * (cell + gap)), "white")
    draw = ImageDraw.Draw(sheet_img)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    for col, kind in enumerate(("concept", "channel")):
        idx, icons, patches, purity, majority = rows[kind]
        x0 = col * (column_w + 2 * gap)
        draw.text((x0 + 4, 5), f"{kind}s (seeded random draw): icon | top-9 patches", fill="black", font=font)
        for r, i in enumerate(idx):
            y0 = header + r * (cell + gap)
            draw.text((x0 + 4, y0 + cell // 2 - 16), f"{kind} {int(i)}", fill="black", font=font)
            draw.text((x0 + 4, y0 + cell // 2 + 2), f"{round(purity[r] * 9)}/9 {majority[r]}", fill="black", font=font)
            sheet_img.paste(Image.fromarray(icons[r]), (x0 + label_w, y0))
            for j in range(9):
                at = (x0 + label_w + cell + 2 * gap + j * args.patch, y0 + (cell - args.patch) // 2)
                sheet_img.paste(Image.fromarray(patches[r, j]), at)
    out = Path(args.sheet)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet_img.save(out, quality=args.jpeg_quality, optimize=True, progressive=True)
    print(f"sheet -> {out} ({out.stat().st_size / 1024:.0f} KB)")


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
    from atlas.settings import ConceptsSettings

    defaults = ConceptsSettings()  # the dictionary's defaults are atlas's own (256 concepts, k = 8, 20 epochs)
    p.add_argument("--concepts", type=int, default=defaults.concepts)
    p.add_argument("--sparsity", type=int, default=defaults.sparsity)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", action="append", choices=list(METHODS), help="only these (repeatable)")
    p.add_argument("--overcomplete-path", default=None)
    p.add_argument("--purity", action="store_true", help="instead: class purity of top-9 images, concepts against channels")
    p.add_argument("--purity-method", action="append", choices=["topk-sae", "nmf"], help="with --purity: only these (repeatable)")
    p.add_argument("--sheet", default=None, metavar="OUT.jpg",
                   help="instead: a JPEG of 20 concepts and 20 channels drawn at random, each its icon and top-9 patches")
    p.add_argument("--seed", type=int, default=0, help="with --sheet: seed of the draw")
    p.add_argument("--quality", default="standard", help="with --sheet: the icons' preset (draft, standard, paper)")
    p.add_argument("--steps", type=int, default=None, help="with --sheet: icon steps (None: the preset's)")
    p.add_argument("--cache", default=None, help="with --sheet: folder keeping the rendered icons between runs")
    p.add_argument("--patch", type=int, default=56, help="with --sheet: side of the dataset patches in pixels")
    p.add_argument("--jpeg-quality", type=int, default=50, help="with --sheet: JPEG quality")
    args = p.parse_args()
    if args.sheet:
        sheet(args)
        return
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
