"""The unit lens end to end (issue 13): `atlas units` on a small real run, its resume, its place in `atlas build`,
its class scores, and every bad input as one line.

The run: 10 shared photos sampled at mixed4c with attribution; the lens on 4 channels, top-3, tiny
visualisations (few steps, small images), so the whole pipeline runs in well under a minute.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import WEIGHTS
from tiny_run import CONFIG, LAYER, cli, one_line, snapshot

from atlas import store

FAST = ["--channels", "0-3", "--top-k", "3", "--steps", "4", "--size", "32", "--patch", "32", "--n-diverse", "2",
        "--kind", "fft", "--kind", "alpha", "--kind", "diverse", "--projection", "deconvnet", "--workers", "0", "--batch-size", "5"]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, photos):
    """A sampled run of 10 photos copied into their own folder (so a test can take the photos away)."""
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(photos.glob("*.JPEG"))[::97][:10]:
        shutil.copy(path, folder / path.name)
    from atlas.sample import sample

    out = tmp_path_factory.mktemp("units") / "run"
    sample(folder, [LAYER], out, weights=WEIGHTS, attribution=True, workers=0, batch_size=5, progress=False)
    return out, folder


@pytest.fixture(scope="module")
def lensed(sampled, tmp_path_factory):
    """The sampled run after `atlas units` with the fast settings; returns (run, first result, second result)."""
    base, _ = sampled
    run = tmp_path_factory.mktemp("lensed") / "run"
    shutil.copytree(base, run)
    first = cli("units", run, "--layer", LAYER, *FAST)
    before = snapshot(run / "store.zarr")
    second = cli("units", run, "--layer", LAYER, *FAST)
    return run, first, second, before


def test_units_writes_every_part_for_the_chosen_channels(lensed):
    run, first, _, _ = lensed
    assert first.returncode == 0, first.stderr
    root = store.open_store(run)
    top = root[f"units/{LAYER}/top"]
    c = top["value"].shape[0]
    assert c == 512 and top["value"].shape[1] == 3
    values = top["value"][:]
    assert np.isfinite(values[:4]).all() and np.all(np.diff(values[:4], axis=1) <= 0)
    assert top["patch"].shape == (512, 3, 32, 32, 3)
    done = root[f"units/{LAYER}/projection/deconvnet/done"][:]
    assert done[:4].all() and not done[4:].any()
    for kind in ("fft", "alpha", "diverse"):
        vis = root[f"units/{LAYER}/vis/{kind}"]
        assert vis["done"][:4].all() and not vis["done"][4:].any(), kind
    assert root[f"units/{LAYER}/vis/alpha/image"].shape[-1] == 4
    assert root[f"units/{LAYER}/vis/diverse/image"].shape[1] == 2
    classes = root[f"units/{LAYER}/classes/top"][:]
    assert classes.shape == (512, 5) and (classes[:4] >= 0).all()
    assert (run / "tiles" / "units" / LAYER).is_dir()
    store.verify(run, [f"units/{LAYER}"])


def test_a_second_run_recomputes_nothing(lensed):
    run, _, second, before = lensed
    assert second.returncode == 0, second.stderr
    after = snapshot(run / "store.zarr")
    changed = [k for k in before if k.startswith("units/") and "/c/" in k and before[k] != after.get(k)]
    assert not changed, changed[:5]


def test_class_scores_are_the_activation_weighted_mean_attribution(sampled):
    from atlas.units import class_scores

    run, _ = sampled
    root = store.open_store(run)
    acts = root[f"samples/{LAYER}/activations"][:].astype(np.float64)
    attrs = root[f"samples/{LAYER}/attributions"][:].astype(np.float64)
    classes, scores = class_scores(acts, attrs, block=3)
    for c in (0, 7, 100):
        if acts[:, c].sum() == 0:
            assert (classes[c] == -1).all()
            continue
        mean = acts[:, c] @ attrs / acts[:, c].sum()
        np.testing.assert_array_equal(classes[c], np.argsort(-mean, kind="stable")[:5])
        np.testing.assert_allclose(scores[c], np.sort(mean)[::-1][:5], rtol=1e-5)


@pytest.mark.parametrize("args, needles", [
    (["--layer", "mixed9z"], ["unknown layer 'mixed9z' for model inceptionv1", "mixed4c"]),
    (["--layer", "logits"], ["layer 'logits' of model inceptionv1 has no spatial positions; layers with positions:", "mixed3a"]),
    (["--layer", LAYER, "--channels", "0-600"], ["channel 600 is out of range of layer 'mixed4c'", "512 channels"]),
    (["--layer", LAYER, "--channels", "9-2"], ["channel range 9-2 is reversed"]),
    (["--layer", LAYER, "--channels", "a-b"], ["units.channels must be channel ranges"]),
    (["--layer", LAYER, "--top-k", "0"], ["units.top_k must be an integer in 1..100"]),
    (["--layer", LAYER, "--kind", "fancy"], ["units.kinds must be a list of", "'fancy' is not one of them"]),
    (["--layer", LAYER, "--projection", "saliency"], ["units.projections must be a list of auto, deconvnet, guided, gradient"]),
    (["--layer", LAYER, "--device", "cuda:7"], ["--device cuda:7"]),
    (["--layer", LAYER, "--objective", "centre"], ["units.objective must be one of channel, neuron"]),
])
def test_bad_options_are_one_line_and_write_nothing(sampled, args, needles):
    run, _ = sampled
    before = snapshot(run)
    one_line(cli("units", run, *args), *needles)
    assert snapshot(run) == before


def test_no_run_is_one_line(tmp_path):
    one_line(cli("units", tmp_path / "nothing", "--layer", LAYER), "no atlas run")


def test_a_run_copied_without_its_photos_names_the_missing_folder(sampled, tmp_path):
    base, folder = sampled
    run = tmp_path / "run"
    shutil.copytree(base, run)
    moved = tmp_path / "elsewhere"
    shutil.move(folder, moved)
    try:
        before = snapshot(run)
        one_line(cli("units", run, "--layer", LAYER, *FAST), "the run's photos are missing", f"folder {folder} does not exist")
        assert snapshot(run) == before
    finally:
        shutil.move(moved, folder)


def test_build_runs_the_lens_when_the_config_asks_and_skips_it_when_current(tmp_path, photos):
    from atlas.build import build, load_config, merge

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG + '[units]\nbuild = true\nchannels = "0-1"\ntop_k = 2\nsteps = 2\nsize = 16\npatch = 16\n'
                   'kinds = ["fft"]\nprojections = ["gradient"]\nworkers = 0\n')
    out = tmp_path / "run"
    config = merge(load_config(cfg), {"run": {"images": str(photos), "out": str(out)}})
    lines: list[str] = []
    first = build(config, echo=lines.append)
    assert first.ran == ["sample", "project", "grid", "render", "tiles", "units", "gallery"], lines
    root = store.open_store(out)
    assert root[f"units/{LAYER}/vis/fft/done"][:2].all() and root[f"units/{LAYER}/projection/gradient/done"][:2].all()
    again = build(config, echo=lines.append)
    assert again.ran == [] and again.skipped[-2:] == ["units", "gallery"]
    # a new unit setting redoes the lens and its gallery, nothing of the atlas
    config["units"]["kinds"] = ["fft", "pixel"]
    third = build(config, echo=lines.append)
    assert third.ran == ["units", "gallery"]


def test_a_run_with_only_the_lens_is_served_and_its_gallery_page_loads(lensed):
    import urllib.request

    from conftest import serving

    from atlas.viewer import url_of

    run = lensed[0]
    assert not (run / "tiles" / "atlases.json").exists()  # no atlas tiled: the gallery alone is served
    with serving(run) as server:
        base = url_of(server).rsplit("/", 1)[0]
        with urllib.request.urlopen(f"{base}/units.html", timeout=10) as response:
            assert response.status == 200 and b"units.js" in response.read()
        with urllib.request.urlopen(f"{base}/units.json", timeout=10) as response:
            assert LAYER.encode() in response.read()
