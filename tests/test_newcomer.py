"""What a new user hits on a small run of real photos: class atlases sized to the run, labels checked against the model,
failures up front, `atlas info` that lists what the run holds, wording that does not contradict itself."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from tiny_run import cli

from atlas.classes import TOP_K_FLOOR, class_atlas, compare_atlas, scaled_top_k
from atlas.info import format_info, info, label_agreement
from atlas.sample import sample
from atlas.settings import RenderSettings

SEA = ["n04251144_snorkel", "n10565667_scuba_diver", "n01491361_tiger_shark", "n09256479_coral_reef"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, net, photos):
    """mixed5b, 4 positions per photo, with attribution: 24 labelled photos, one snorkel and one scuba diver among them."""
    names = [f"{m}.JPEG" for m in SEA] + sorted(p.name for p in photos.glob("*.JPEG"))[::50][:20]
    listing = tmp_path_factory.mktemp("small") / "images.txt"
    listing.write_text("".join(f"{photos / n} {n.split('_')[0]}\n" for n in dict.fromkeys(names)))
    run = tmp_path_factory.mktemp("run") / "r"
    result = sample(listing, ["mixed5b"], run, net=net, per_image=4, workers=0, progress=False, batch_size=16)
    return run, listing, result


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory, net, small_run):
    """The same photos with the labels of the 1001-class convention: every class index one higher."""
    run, _, _ = small_run
    root = zarr.open_group(run / "store.zarr", mode="r")
    paths, labels = root["images/path"][:].tolist(), root["images/label"][:]
    listing = tmp_path_factory.mktemp("shifted") / "dataset_1001.txt"
    listing.write_text("".join(f"{p} {int(lab) + 1}\n" for p, lab in zip(paths, labels, strict=True)))
    out = tmp_path_factory.mktemp("run") / "shifted"
    return out, sample(listing, ["mixed5b"], out, net=net, per_image=1, workers=0, progress=False, batch_size=16)


def test_the_top_k_rule():
    assert scaled_top_k(2000, 0) == TOP_K_FLOOR
    assert scaled_top_k(2000, 7) == TOP_K_FLOOR
    assert scaled_top_k(2000, 100) == 400
    assert scaled_top_k(2000, 10_000) == 2000
    assert scaled_top_k(10, 100) == 10


def test_a_class_of_one_photo_gets_a_small_selection_and_a_warning(small_run):
    run, _, _ = small_run
    lines: list[str] = []
    name = class_atlas(run, "mixed5b", "snorkel", top_k=2000, sizes=(2,), tiles=False, echo=lines.append,
                       render=RenderSettings(quality="draft", steps=2, size=48))
    root = zarr.open_group(run / "store.zarr", mode="r")
    n = root[f"layouts/mixed5b/{name}/rows"].shape[0]
    valid = int(root["samples/mixed5b/valid"][:].sum())
    assert lines[0].startswith("snorkel at mixed5b: ") and "own samples" in lines[0] and "from 1 photos labelled so" in lines[0]
    assert f"top-k 2000 scaled to {TOP_K_FLOOR}" in lines[0], lines
    own = int(lines[0].split(": ")[1].split(" own")[0])
    # at most the class's own samples and the scaled top-k: not most of the run, as the unscaled 2,000 gave
    assert n <= own + TOP_K_FLOOR < valid, (n, valid)
    assert any(line.startswith("warning: ") and "belong to other classes" in line for line in lines), lines


def test_compare_says_both_classes_and_warns(small_run):
    run, _, _ = small_run
    lines: list[str] = []
    compare_atlas(run, "mixed5b", "snorkel", "scuba diver", top_k=2000, sizes=(2,), tiles=False, echo=lines.append,
                  render=RenderSettings(quality="draft", steps=2, size=48))
    assert lines[0].startswith("snorkel at mixed5b") and lines[1].startswith("scuba diver at mixed5b"), lines
    assert sum(line.startswith("warning: ") for line in lines) == 1, lines


def test_right_labels_agree_with_the_model(small_run):
    run, _, result = small_run
    agreement = result.labels
    assert agreement is not None and agreement["labelled"] == 24
    assert agreement["top5"] > 0.6 and agreement["warning"] is None, agreement
    assert "labels vs the model: top-1" in format_info(info(run))


def test_labels_shifted_by_one_are_named(shifted_run, small_run):
    out, result = shifted_run
    agreement = result.labels
    assert agreement["top1"] < 0.1 and agreement["shifted"]["-1"] == pytest.approx(small_run[2].labels["top1"])
    assert "shifted by one" in agreement["warning"] and "1001-class" in agreement["warning"]
    text = cli("info", out).stdout
    assert "warning: the labels agree with the model's top-5 on only" in text and "shifted by one" in text
    assert label_agreement(zarr.open_group(out / "store.zarr", mode="r")) == agreement


@pytest.mark.parametrize("kind", ["jpeg", "synset_words", "readme", "binary"])
def test_a_file_that_is_no_image_list_is_one_line_before_anything(tmp_path, photos, kind):
    import shutil

    from tiny_run import one_line

    source = {"jpeg": photos / "n04251144_snorkel.JPEG", "synset_words": photos.parents[1] / "models" / "synset_words.txt",
              "readme": photos.parent / "README.md"}.get(kind)
    if kind == "binary":
        source = tmp_path / "weights.bin"
        source.write_bytes(bytes(range(256)) * 8)
    elif kind == "readme" and not source.is_file():
        source = tmp_path / "README.md"
        source.write_text("# Photos\n\nThese are the photos of the held-out set, one per class, named by synset.\n"
                          "They are used by the tests and the demo, and never copied into the repository.\n")
    copy = tmp_path / source.name
    if source != copy:
        shutil.copy(source, copy)
    out = tmp_path / "run"
    expected = {"jpeg": "is an image, not an image list", "synset_words": "class names (synset words), not an image list",
                "readme": "looks like text, not an image list", "binary": "is a binary file, not an image list"}[kind]
    one_line(cli("sample", "--images", copy, "--layer", "mixed4c", "--out", out), expected, "--images takes")
    assert not out.exists()
    one_line(cli("build", "--images", copy, "--out", out, "--max-images", "2"), expected)
    assert not out.exists()


def test_real_lists_still_pass_the_check(tmp_path, photos, photo_list):
    from atlas.data import check_image_source

    check_image_source(photo_list)
    plain = tmp_path / "names.txt"  # suffix-less names relative to the list, with synset labels
    plain.write_text("".join(f"{photos.name}/{p.stem} {p.stem.split('_')[0]}\n" for p in sorted(photos.glob("*.JPEG"))[:5]))
    (tmp_path / photos.name).symlink_to(photos)
    check_image_source(plain)
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\nmissing/a.jpg,3\n")
    check_image_source(csv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photos):
    from tiny_run import build_tiny

    return build_tiny(tmp_path_factory, photos)


@pytest.fixture
def half_rendered(tiny, tmp_path):
    """A copy of the tiny run whose 4x4 icons are being rendered: half the cells done, the node marked as being written."""
    from tiny_run import copy_run

    from atlas import store

    run = copy_run(tiny, tmp_path)
    path = "icons/mixed4c/full/4"
    store.begin_stage(run, "render", [path])
    root = zarr.open_group(run / "store.zarr", mode="r+")
    done = root[f"{path}/done"][...]
    todo = int(zarr.open_group(run / "store.zarr", mode="r")["grids/mixed4c/full/4/render"][...].sum())
    flat = done.reshape(-1)
    flat[np.flatnonzero(flat)[: todo // 2]] = False
    root[f"{path}/done"][...] = flat.reshape(done.shape)
    return run, int(flat.sum()), todo


def test_an_image_is_placed_on_an_atlas_whose_icons_are_incomplete(half_rendered, net, tmp_path):
    from atlas.inspect.engine import read_image
    from atlas.inspect.onatlas import image_positions, place_on_atlas, write_placement

    run, _, _ = half_rendered
    x, _ = read_image(str(zarr.open_group(run / "store.zarr", mode="r")["images/path"][0]), 256, 224)
    acts, attribution, _, _ = image_positions(net, x, "mixed4c")
    placement = place_on_atlas(run, "mixed4c", acts, net=net)
    assert "incomplete: placed without icons" in placement.summary["icons"]
    assert not any(v.any() for v in placement.has_icon.values())
    write_placement(run, placement, attribution, tmp_path / "report", "photo")
    assert (tmp_path / "report" / "placement.png").is_file()


def test_info_counts_the_icons_of_a_grid_being_rendered(half_rendered):
    run, done, todo = half_rendered
    text = format_info(info(run))
    assert f"icons 4: {done} of {todo} done" in text and "?" not in text.split("icons 4:")[1].splitlines()[0], text


def test_serve_on_a_missing_folder_says_so(tmp_path):
    from tiny_run import one_line

    line = one_line(cli("serve", tmp_path / "nowhere", "--port", "0"), "does not exist")
    assert "atlas tiles" not in line
    (tmp_path / "file").write_text("x")
    one_line(cli("serve", tmp_path / "file", "--port", "0"), "is not a folder")


def test_patch_says_the_class_was_kept_without_contradiction(photos, tmp_path):
    result = cli("patch", "--images", photos / "n02951358_canoe.JPEG", "--patch", photos / "n04251144_snorkel.JPEG", "--size", "48",
                 "--out", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if "n02951358_canoe.JPEG:" in ln)
    assert "canoe -> canoe" not in line and line.split(": ", 1)[1].startswith("top-1 'canoe'; patched: "), line
    assert "'snorkel' in " in line and "of places" in line, line


def test_info_lists_the_unit_lens_and_the_instruments(tiny, tmp_path):
    from tiny_run import copy_run

    run = copy_run(tiny, tmp_path)
    report = run / "tiles" / "inspect" / "photo"
    report.mkdir(parents=True)
    (report / "index.html").write_text("<html></html>")
    text = format_info(info(run))
    assert "  inspect: 1 (photo) -> tiles/inspect/" in text, text
    assert "openseadragon" not in text


# ---------------------------------------------------------------------------- the unit card's classes, checked
UNITS = [6, 97]


@pytest.fixture(scope="module")
def lens_run(tmp_path_factory, net, photos):
    """64 photos sampled at mixed4c with attribution, the unit lens's top-9 examples, deconvnet projections, class scores
    and direct effects of two units, and the gallery."""
    from atlas.units import write_class_scores
    from atlas.units.effects import write_effects
    from atlas.units.gallery import write_gallery
    from atlas.units.projections import write_projections
    from atlas.units.topk import top_examples

    listing = tmp_path_factory.mktemp("lens") / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(photos.glob("*.JPEG"))[::16][:64]))
    run = tmp_path_factory.mktemp("run") / "lens"
    sample(listing, ["mixed4c"], run, net=net, workers=0, progress=False, batch_size=16)
    top_examples(run, ["mixed4c"], k=9, channels=UNITS, batch_size=16, workers=0, progress=False, net=net)
    write_projections(run, "mixed4c", method="deconvnet", channels=UNITS, progress=False, net=net)
    write_class_scores(run, "mixed4c")
    summary = write_effects(run, "mixed4c", channels=UNITS, net=net, progress=False)
    write_gallery(run, "mixed4c")
    return run, summary


def _examples(run, channel: int):
    import torch

    from atlas.data import load_image

    root = zarr.open_group(run / "store.zarr", mode="r")
    ids = [int(i) for i in root["units/mixed4c/top/image"][channel] if i >= 0]
    pictures = [np.asarray(load_image(str(root["images/path"][i]), 256, 224), np.uint8) for i in ids]
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float().div(255.0)


def test_the_direct_effect_is_activation_times_the_gradient(net):
    import torch

    from atlas.units.effects import channel_effects

    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    jvp = channel_effects(net, x, "mixed4c", 6)
    captured = {}

    def keep(name, out):
        captured[name] = out.detach().requires_grad_(True)  # a leaf: the weights need no gradient
        return captured[name]

    for k in (0, 500):
        with net.hooks(["mixed4c"], edit=keep, stop=False):
            logits = net.module(x)
        logits[:, k].sum().backward()
        a = captured["mixed4c"]
        expected = (a[:, 6] * a.grad[:, 6]).sum((1, 2))
        torch.testing.assert_close(jvp[:, k], expected.detach(), rtol=1e-3, atol=1e-4)


def test_the_card_lists_classes_the_unit_itself_raises(lens_run, net):
    import json

    import torch

    run, summary = lens_run
    assert summary["channels"] == len(UNITS)
    root = zarr.open_group(run / "store.zarr", mode="r")
    classes = list(root.attrs["classes"])
    for c in UNITS:
        card = json.loads((run / "tiles" / "units" / "mixed4c" / "unit" / f"{c}.json").read_text())
        shown = [classes.index(n) for n, _ in card["classes"]]
        assert shown and all(v > 0 for _, v in card["classes"])
        check = card["class_check"]["attribution"]
        assert len(check) == 5 and all(isinstance(ok, bool) for _, _, ok in check)
        # switching the unit off on its own top examples lowers the classes the card now shows, far more than the
        # average class: the check is against what the unit does, not against what its images are
        x = _examples(run, c)

        def off(name, out, c=c):
            out = out.clone()
            out[:, c] = 0
            return out

        with torch.no_grad():
            full = net.module(x)
            with net.hooks(["mixed4c"], edit=off, stop=False):
                ablated = net.module(x)
        drop = (full - ablated).mean(0).numpy()
        assert drop[shown].mean() > 0 and drop[shown].mean() > drop.mean() + 2 * drop.std(), (c, drop[shown], drop.mean(), drop.std())
        print(f"unit {c}: card {[n for n, _ in card['classes']]}; attribution {[(n, ok) for n, _, ok in check]}; "
              f"ablation drop of shown {drop[shown].round(3).tolist()}, of all classes {drop.mean():.3f} +- {drop.std():.3f}")


def test_support_box_and_crop():
    from atlas.units.gallery import crop_to, support_box

    grey = np.full((64, 64, 3), 127, np.uint8)
    speck = grey.copy()
    speck[30:34, 40:44] = 250
    box = support_box([grey, speck])
    top, left, bottom, right = box
    assert bottom - top == right - left and top <= 30 and bottom >= 34 and left <= 40 and right >= 44 and bottom - top <= 12
    cropped = crop_to(speck, box)
    assert cropped.shape == speck.shape and (np.abs(cropped.astype(int) - 127).max(-1) > 20).mean() > 0.2
    assert support_box([grey]) == (0, 0, 64, 64) and crop_to(grey, (0, 0, 64, 64)) is grey


def test_the_card_shows_projections_cropped_to_their_support(lens_run):
    import json

    from PIL import Image

    run, _ = lens_run
    root = zarr.open_group(run / "store.zarr", mode="r")
    gallery = run / "tiles" / "units" / "mixed4c"
    for c in UNITS:
        card = json.loads((gallery / "unit" / f"{c}.json").read_text())
        stored = root["units/mixed4c/projection/deconvnet/image"][c][: len(card["top"]["examples"])]
        shown = np.asarray(Image.open(gallery / "projection" / "deconvnet" / f"{c}.jpg").convert("RGB"))
        patches = np.asarray(Image.open(gallery / "top" / f"{c}.jpg"))
        assert shown.shape == patches.shape  # each patch cropped with its projection: they still correspond

        def grey(a):
            return (np.abs(a.astype(np.float32) - 127.5).max(-1) < 10).mean()

        assert all(e["crop"] is not None for e in card["top"]["examples"])
        assert grey(shown) < grey(stored) - 0.1, (c, grey(shown), grey(stored))


def test_the_card_in_the_browser_says_what_its_classes_are(lens_run, browser):
    from pathlib import Path

    from conftest import serving

    from atlas.viewer import url_of

    run, _ = lens_run
    with serving(run) as srv:
        context = browser.new_context(viewport={"width": 1280, "height": 820})
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url_of(srv).rsplit('/', 1)[0]}/units.html#mixed4c/{UNITS[0]}")
            page.wait_for_function(f"document.body.dataset.unit === '{UNITS[0]}'", timeout=20000)
            assert page.text_content("#unit-classes-title") == "Classes it raises most"
            note = page.inner_text("#unit-classes-note")
            assert "logit" in note and "survive the check" in note, note
            assert page.locator("#unit-classes li").count() >= 1
            out = Path(__file__).resolve().parents[1] / "outputs"
            out.mkdir(exist_ok=True)
            page.screenshot(path=str(out / "units_card_checked.png"))
            assert errors == []
        finally:
            context.close()


def test_info_lists_the_unit_lens(lens_run):
    run, _ = lens_run
    text = format_info(info(run))
    line = next(ln for ln in text.splitlines() if ln.startswith("  unit lens mixed4c: "))
    assert (f"top-k examples {len(UNITS)} of 512 channels" in line and f"deconvnet projections {len(UNITS)}" in line
            and f"direct class effects {len(UNITS)}" in line and "class scores" in line), line
    assert "  units: " not in text  # the gallery's folder is the unit lens's, not another instrument
