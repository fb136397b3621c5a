"""Concepts on the map (atlas.concepts): the dictionary core on known sparse data, the placing functions, and
`atlas concepts` on a tiny real run (8 photos x 8 positions with attribution, a 4x4 atlas): what it stores, what
`Run.concepts` returns, resuming, and each bad input as one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_run import CONFIG, build_tiny, cli, copy_run, one_line

from atlas import store
from atlas.concepts import dictionary as dl
from atlas.concepts.place import shares, top_examples, veil
from atlas.settings import CONCEPT_METHODS, ConceptsSettings

LAYER = "mixed4c"
FAST = ("--concepts", "8", "--sparsity", "2", "--epochs", "3", "--steps", "2", "--top-k", "3", "--patch", "16")


def sparse_data(n=1500, c=32, k_true=16, active=3, seed=0):
    """Non-negative rows made of ``active`` of ``k_true`` random non-negative directions each."""
    rng = np.random.default_rng(seed)
    atoms = np.abs(rng.normal(size=(k_true, c)))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, k_true))
    for i in range(n):
        codes[i, rng.choice(k_true, active, replace=False)] = rng.uniform(1, 5, active)
    return (codes @ atoms).astype(np.float32), atoms


def test_methods_agree_with_settings():
    assert CONCEPT_METHODS == dl.METHODS


def test_topk_sae_and_nmf_reconstruct_sparse_data():
    x, _ = sparse_data()
    d = dl.fit_topk_sae(x, 16, 4, epochs=8, lr=1e-2, seed=0, threads=1)
    z = dl.encode(d, x)
    assert d.atoms.shape == (16, 32) and np.allclose(np.linalg.norm(d.atoms, axis=1), 1, atol=1e-5)
    assert ((z > 0).sum(1) <= 4).all() and (z >= 0).all()  # exactly TopK: never more than k active
    assert dl.r2(x, dl.reconstruct(d, z)) > 0.85
    assert dl.dead_concepts(z) == 0
    nmf, w = dl.fit(x, 16, "nmf", seed=0)
    assert dl.r2(x, dl.reconstruct(nmf, w)) > 0.95
    assert dl.r2(x[:200], dl.reconstruct(nmf, dl.encode(nmf, x[:200]))) > 0.95  # held-in rows coded again: as good
    assert dl.dead_concepts(w) == 0 and 1 <= dl.active_per_sample(w) <= 16
    with pytest.raises(ValueError, match="non-negative"):
        dl.fit(x - 1, 4, "nmf")
    with pytest.raises(ValueError, match="at least as many samples"):
        dl.fit(x[:3], 4, "topk-sae", 2)


def test_measures_on_known_codes():
    codes = np.array([[0, 2, 0], [1, 0, 0], [3, 1, 0]], np.float32)
    assert dl.active_per_sample(codes) == pytest.approx(4 / 3)
    assert dl.dead_concepts(codes) == 1
    x = np.random.default_rng(0).normal(size=(50, 4))
    assert dl.r2(x, x) == 1.0 and dl.r2(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(0.0)


def test_top_examples_one_per_image_in_the_unit_lens_order():
    # 4 rows: images 0, 0, 1, 2; concept 0 is strongest twice in image 0, and tied between images 1 and 2
    codes = np.array([[5, 0], [4, 1], [3, 0], [3, 0]], np.float32)
    image = np.array([0, 0, 1, 2])
    pos = np.array([[0, 0], [1, 1], [2, 2], [0, 1]])
    top = top_examples(codes, image, pos, 3)
    assert top.image[0].tolist() == [0, 1, 2] and top.value[0].tolist() == [5, 3, 3]
    assert top.pos[0, 0].tolist() == [0, 0]
    assert top.image[1].tolist() == [0, -1, -1]  # silent elsewhere: no padding with images where it is zero


def test_veil_and_shares():
    codes = np.array([[1, 0], [3, 0], [0, 2], [9, 9]], np.float32)
    mean, count = veil(codes, np.array([0, 0, 3, -1]), 2)
    assert count.tolist() == [[2, 0], [0, 1]]
    assert mean[0, 0].tolist() == [2, 0] and mean[1, 1].tolist() == [0, 2] and mean[0, 1].tolist() == [0, 0]
    atoms = np.eye(2, dtype=np.float32)
    m = np.zeros((2, 2, 2), np.float32)
    m[0, 0] = [2, 0]  # a cell whose mean is exactly concept 0's code times its atom: all of it is concept 0's
    s = shares(mean, atoms, m)
    assert s[0, 0].tolist() == [1, 0] and s[0, 1].tolist() == [0, 0]


# ----------------------------------------------------------------------------- a tiny real run


@pytest.fixture(scope="module")
def base(tmp_path_factory, photos):
    """A finished tiny build with attribution (8 photos x 8 positions: 64 rows), 4x4 grid."""
    cfg = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    cfg.write_text(CONFIG.replace("attribution = false", "attribution = true").replace("per_image = 4", "per_image = 8"))
    return build_tiny(tmp_path_factory, photos, cfg)


@pytest.fixture(scope="module")
def done(base, tmp_path_factory):
    """The tiny run after `atlas concepts` (the command line, in this process)."""
    run = copy_run(base, tmp_path_factory.mktemp("done"))
    result = cli("concepts", run, "--layer", LAYER, *FAST)
    assert result.returncode == 0, result.stderr
    return run, result


def test_concepts_stores_every_part(done):
    run, result = done
    assert "8 concepts (topk-sae)" in result.stdout and "classes skipped" not in result.stdout
    root = store.open_store(run)
    store.verify(run, ["concepts"])  # finished and sealed
    g = root[f"concepts/{LAYER}"]
    n_rows = root[f"samples/{LAYER}/activations"].shape[0]
    assert g["dictionary/atoms"].shape == (8, root[f"samples/{LAYER}/activations"].shape[1]) and g["codes"].shape == (n_rows, 8)
    assert g["top/patch"].shape == (8, 3, 16, 16, 3) and g["top/image"][:].max() < 8
    assert g["classes/top"].shape == (8, 5)
    assert g["veil/4/mean"].shape == (4, 4, 8) and g["veil/4/share"].shape == (4, 4, 8)
    assert g["icons/done"][:].all() and g["icons/image"][:].std() > 0  # every icon drawn, and not blank
    assert store.stage_status(run, f"concepts:{LAYER}", store.read_ledger(run)["records"][f"concepts:{LAYER}"]["key"]) is None


def test_run_concepts_returns_the_dictionary_and_codes(done):
    import atlas

    run, _ = done
    c = atlas.open_run(run).concepts(LAYER)
    samples = atlas.open_run(run).samples(LAYER)
    assert np.array_equal(c.rows, samples.rows) and c.codes.shape == (len(samples.rows), 8)
    x_hat = c.codes @ c.atoms + c.bias
    assert dl.r2(samples.activations, x_hat) == pytest.approx(c.summary["r2"], abs=1e-3)
    assert ((c.codes > 0).sum(1) <= 2).all() and c.method == "topk-sae" and c.sparsity == 2
    assert c.top_classes is not None and c.top_classes.shape == (8, 5)
    with pytest.raises(atlas.AtlasError, match="no concepts of layer 'mixed3a'.*atlas concepts RUN --layer mixed3a"):
        atlas.open_run(run).concepts("mixed3a")


def test_rerun_keeps_everything(done, tmp_path):
    run = copy_run(done[0], tmp_path)
    from atlas.concepts import concepts

    lines = []
    report = concepts(run, LAYER, ConceptsSettings(concepts=8, sparsity=2, epochs=3, steps=2, top_k=3, patch=16), echo=lines.append)
    assert report["fitted"] is False and report["icons"] == 0
    assert not any("fitting" in line for line in lines)


def test_veil_lights_the_cell_a_concept_was_built_from(done):
    """A dictionary whose atoms are the cells' mean directions: each concept's veil is brightest on its own cell."""
    run, _ = done
    root = store.open_store(run)
    grid = root[f"grids/{LAYER}/full/4"]
    mean = grid["mean_activation"][:]
    filled = np.argwhere(grid["count"][:] > 0)
    atoms = np.stack([mean[gy, gx] / np.linalg.norm(mean[gy, gx]) for gy, gx in filled]).astype(np.float32)
    d = dl.Dictionary(atoms, np.zeros(atoms.shape[1], np.float32), None, None, 1.0, "nmf", 0)
    layout = root[f"layouts/{LAYER}/full"]
    acts = root[f"samples/{LAYER}/activations"][:].astype(np.float32)[layout["rows"][:]]
    codes = dl.encode(d, acts)
    lit, _ = veil(codes, grid["cell"][:], 4)
    for k, (gy, gx) in enumerate(filled):
        assert np.unravel_index(np.argmax(lit[..., k]), (4, 4)) == (gy, gx), k


def test_a_run_without_attributions_skips_classes_once(photos, tmp_path_factory):
    run = build_tiny(tmp_path_factory, photos)  # CONFIG: no attribution, 4 positions
    result = cli("concepts", run, "--layer", LAYER, *FAST, "--no-icons")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("classes skipped") == 1
    assert "classes" not in store.open_store(run)[f"concepts/{LAYER}"]


def test_bad_input_is_one_line(base, tmp_path):
    one_line(cli("concepts", base, "--layer", LAYER, "--concepts", "1000"), "1000 concepts need at least as many sampled rows",
             "has 64")
    one_line(cli("concepts", base, "--layer", "mixed5b"), "layer 'mixed5b' was not sampled", "mixed4c")
    one_line(cli("concepts", base, "--layer", LAYER, "--method", "pca"), "concepts.method must be one of topk-sae, nmf")
    one_line(cli("concepts", base, "--layer", LAYER, "--concepts", "4", "--sparsity", "5"), "concepts.sparsity must be at most")
    one_line(cli("concepts", tmp_path, "--layer", LAYER), "no atlas run")


def test_a_killed_fit_starts_again_cleanly(base, tmp_path):
    run = copy_run(base, tmp_path)
    args = ["concepts", str(run), "--layer", LAYER, "--concepts", "8", "--sparsity", "2", "--epochs", "100000", "--no-icons"]
    proc = subprocess.Popen([sys.executable, "-c", "from atlas.cli import main; main()", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # killed in the middle of the fit
            if "fitting" in line:
                time.sleep(1.0)
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "fit_done" not in store.open_store(run)[f"concepts/{LAYER}"]
    result = cli("concepts", run, "--layer", LAYER, "--concepts", "8", "--sparsity", "2", "--epochs", "100000", "--no-icons",
                 "--epochs", "3")
    assert result.returncode == 0, result.stderr
    # another epoch count is other settings; the same settings say "interrupted"
    again = copy_run(base, tmp_path / "again")
    root = store.open_for_update(again)
    store.take_lock(again)
    from atlas.concepts.writer import _fit_key, _source

    s = ConceptsSettings(concepts=8, sparsity=2, epochs=3, icons=False)
    root.require_group(f"concepts/{LAYER}").attrs["key"] = _fit_key(s, _source(again, LAYER))  # as a killed fit leaves it
    store.release_lock(again)
    result = cli("concepts", again, "--layer", LAYER, "--concepts", "8", "--sparsity", "2", "--epochs", "3", "--no-icons")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("interrupted: fitting again from the start") == 1
    store.verify(again, ["concepts"])


# ----------------------------------------------------------------------------- the panel in the browser


def test_panel_in_the_browser(done, page):
    """The concepts page beside the atlas: the icon grid, a concept's patches, classes and veil, a cell's concepts."""
    import json

    from conftest import serving

    from atlas.viewer import url_of

    run, _ = done
    panel = json.loads((run / "tiles" / "concepts" / LAYER / "panel.json").read_text())
    assert panel["atlas"]["size"] == 4 and len(panel["concepts"]) == 8
    with serving(run) as srv:
        page.goto(f"{url_of(srv).rsplit('/', 1)[0]}/concepts.html?layer={LAYER}")
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=20000)
        assert page.locator("#grid .concept").count() == 8
        k = max(range(8), key=lambda i: len(panel["concepts"][i].get("top", [])))
        page.click(f'#grid .concept[data-k="{k}"]')
        page.wait_for_function(f"document.getElementById('veil').dataset.concept === '{k}'", timeout=10000)
        page.wait_for_function("document.getElementById('patches').complete && document.getElementById('patches').naturalWidth > 0")
        assert page.locator("#classes li").count() == len(panel["concepts"][k]["classes"]) >= 1
        # the veil is clearest on the concept's strongest cell
        gy, gx = panel["concepts"][k]["peak"]
        alphas = page.evaluate("() => Array.from(document.getElementById('veil').getContext('2d').getImageData(0, 0, 4, 4).data)"
                               ".filter((_, i) => i % 4 === 3)")
        assert alphas[gy * 4 + gx] == min(alphas) < max(alphas)
        # hovering a cell lists its strongest concepts with their share
        cell = next(iter(panel["atlas"]["cells"]))
        cy, cx = (int(v) for v in cell.split(","))
        box = page.locator("#atlas-box").bounding_box()
        page.mouse.move(box["x"] + (cx + 0.5) * box["width"] / 4, box["y"] + (cy + 0.5) * box["height"] / 4)
        page.wait_for_function("document.querySelectorAll('#cell li').length > 0", timeout=10000)
        shown = [int(v) for v in page.eval_on_selector_all("#cell li", "els => els.map(e => e.dataset.k)")]
        assert shown == [k for k, _ in panel["atlas"]["cells"][cell]] and "%" in page.inner_text("#cell")
        # the atlas page links to the panel of its layer
        page.goto(url_of(srv))
        page.wait_for_function("document.getElementById('concepts-link') && !document.getElementById('concepts-link').hidden",
                               timeout=20000)
        assert page.get_attribute("#concepts-link", "href") == f"concepts.html?layer={LAYER}"
    assert 'src="atlas_concepts.js"' in (run / "tiles" / "index.html").read_text()  # as written, not only as served
    assert page.errors == []


# ----------------------------------------------------------------------------- a Vision Transformer's block

VIT_FILE = "/work/shared/models/vit_tiny_patch16_224.safetensors"
VIT_LAYER = "blocks.6"


@pytest.fixture(scope="module")
def vit_done(photo_list, tmp_path_factory):
    """The real ViT-Ti sampled at ``blocks.6`` (4 photos x 16 tokens: 64 rows, no attribution), laid out on a 4x4
    grid, then `atlas concepts` (8 concepts, k = 2, icons of 2 steps) from the command line."""
    pytest.importorskip("timm")
    from conftest import require_shared

    from atlas.data import list_images
    from atlas.models import load_model
    from atlas.sample import sample

    require_shared()
    net = load_model("timm:vit_tiny_patch16_224", VIT_FILE)
    run = tmp_path_factory.mktemp("vit") / "run"
    sample(list_images(photo_list).head(4), [VIT_LAYER], run, model="timm:vit_tiny_patch16_224", weights=VIT_FILE, per_image=16,
           workers=0, attribution=False, progress=False, net=net, precision="float32")
    for args in (("project", run, "--layer", VIT_LAYER, "--method", "pca"), ("grid", run, "--layer", VIT_LAYER, "--grid", "4",
                                                                              "--min-count", "1")):
        assert (result := cli(*args)).returncode == 0, result.stderr
    result = cli("concepts", run, "--layer", VIT_LAYER, "--concepts", "8", "--sparsity", "2", "--epochs", "40", "--steps", "2",
                 "--top-k", "3", "--patch", "32")
    assert result.returncode == 0, result.stderr
    return net, run, result


def test_concepts_of_a_vit_block(vit_done, photo_list):
    """On a token layer the positions are patch tokens: the codes reconstruct the tokens' activations, each example's
    patch is its token's own 16 px square of the photo as the ViT read it (bicubic), the veil and the icons are drawn."""
    import atlas
    from atlas.data import list_images, load_image, photo_reading
    from atlas.units.topk import fit_patch

    net, run, result = vit_done
    assert "classes skipped" in result.stdout and "veil is skipped" not in result.stdout
    samples = atlas.open_run(run).samples(VIT_LAYER)
    assert samples.activations.shape == (64, 192) and float(samples.activations.min()) < 0  # GELU block: negative values
    c = atlas.open_run(run).concepts(VIT_LAYER)
    assert c.atoms.shape == (8, 192) and np.isfinite(c.atoms).all() and np.allclose(np.linalg.norm(c.atoms, axis=1), 1, atol=1e-5)
    assert c.codes.shape == (64, 8) and np.isfinite(c.codes).all() and ((c.codes > 0).sum(1) <= 2).all()
    r2 = dl.r2(samples.activations, c.codes @ c.atoms + c.bias)
    assert r2 == pytest.approx(c.summary["r2"], abs=1e-3) and r2 > 0.15, r2  # 8 concepts, 2 per token, 64 tokens
    shuffled = np.random.default_rng(0).permutation(c.codes)  # each token's own code, not any token's, does it
    assert dl.r2(samples.activations, shuffled @ c.atoms + c.bias) < r2 - 0.2

    g = store.open_store(run)[f"concepts/{VIT_LAYER}"]
    prep = dict(store.open_store(run).attrs)["preprocessing"]
    resize, crop, interpolation = photo_reading(prep)
    assert (interpolation, crop) == ("bicubic", 224)
    paths = list_images(photo_list).head(4).paths
    image, pos, box, patch = g["top/image"][:], g["top/pos"][:], g["top/box"][:], g["top/patch"][:]
    checked = 0
    for k, j in zip(*np.nonzero(image >= 0), strict=True):
        y, x = (int(v) for v in pos[k, j])
        assert box[k, j].tolist() == [16 * y, 16 * x, 16 * y + 16, 16 * x + 16]  # the token's own patch
        want = fit_patch(load_image(paths[image[k, j]], resize, crop, interpolation), box[k, j], 32)
        assert np.array_equal(patch[k, j], want)
        checked += 1
    assert checked >= 8
    # the best example's value is the concept's largest code over the sampled tokens
    assert np.allclose(g["top/value"][:, 0], np.where(c.codes.max(0) > 0, c.codes.max(0), -np.inf))

    mean, share = g["veil/4/mean"][:], g["veil/4/share"][:]
    assert mean.shape == share.shape == (4, 4, 8) and np.isfinite(mean).all() and np.isfinite(share).all()
    assert mean.sum() > 0 and g["veil/4/count"][:].sum() == 64
    assert g["icons/done"][:].all() and g["icons/image"].shape == (8, 80, 80, 3) and g["icons/image"][:].std() > 0
    assert np.isfinite(g["icons/cosine"][:]).all()


def test_nmf_is_refused_in_one_line_on_a_vit_block(vit_done):
    _, run, _ = vit_done
    one_line(cli("concepts", run, "--layer", VIT_LAYER, "--method", "nmf", "--concepts", "8", "--no-icons"),
             "nmf needs non-negative activations", f"'{VIT_LAYER}' has negative values")


def test_the_sheets_draw_skips_dead_and_rare_columns_and_says_how_many(capsys):
    """bench/concepts.py --sheet draws its 20 concepts and 20 channels at random among those active on 9 images or
    more; the dead and the rare ones are skipped and counted in one line, and a seed gives the same draw."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("concepts_bench", REPO / "bench" / "concepts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    image = np.repeat(np.arange(12), 2)  # 12 images x 2 rows
    scores = np.random.default_rng(0).uniform(0.1, 1, size=(24, 30))
    scores[:, 3] = 0  # dead
    scores[:, 7] = np.where(image < 5, 1.0, 0.0)  # active on 5 images only
    scores[:, 11] = np.where(image < 9, 1.0, 0.0)  # active on exactly 9: drawn like the others
    picks = [bench.draw_picks(scores, image, 20, np.random.default_rng(seed), "columns") for seed in (0, 0, 1)]
    assert picks[0].tolist() == picks[1].tolist() != picks[2].tolist()
    assert all(len(p) == 20 and len(set(p.tolist())) == 20 and not {3, 7} & set(p.tolist()) for p in picks)
    assert capsys.readouterr().out.count("30, of which 1 dead (never active) and 1 active on fewer than 9 images: skipped; "
                                         "20 drawn at random from the other 28") == 3
