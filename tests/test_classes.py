"""Class-filtered and class-difference atlases on the real model and photos."""

import numpy as np
import pytest
import zarr

from atlas.classes import compare_atlas, resolve_class, select_class
from atlas.errors import AtlasError
from atlas.models import imagenet_classes
from atlas.sample import sample
from atlas.settings import RenderSettings

MARINE = ["n04251144_snorkel", "n10565667_scuba_diver", "n01491361_tiger_shark", "n02066245_grey_whale",
          "n01484850_great_white_shark", "n09256479_coral_reef", "n01496331_electric_ray", "n01498041_stingray",
          "n02071294_killer_whale", "n01443537_goldfish", "n09428293_seashore", "n04606251_wreck"]


@pytest.fixture(scope="module")
def marine_run(tmp_path_factory, net, photos):
    """mixed5b samples, 8 positions per image, of sea photos plus a spread of other classes."""
    names = [f"{m}.JPEG" for m in MARINE if (photos / f"{m}.JPEG").exists()]
    others = sorted(p.name for p in photos.glob("*.JPEG"))[::40]
    listing = tmp_path_factory.mktemp("marine") / "images.txt"
    listing.write_text("".join(f"{photos / n}\n" for n in dict.fromkeys(names + others)))
    run = tmp_path_factory.mktemp("run") / "r"
    sample(listing, ["mixed5b"], run, net=net, per_image=8, workers=0, progress=False, batch_size=16)
    return run


def test_class_names_resolve_by_name_synset_and_index():
    classes = imagenet_classes(1000)
    assert resolve_class("snorkel", classes).index == 801
    assert resolve_class("Scuba_Diver", classes).index == 983
    assert resolve_class("n10565667", classes).index == 983
    assert resolve_class("983", classes).name == "scuba diver"
    with pytest.raises(AtlasError, match="unknown class 'snorkle'.*snorkel"):
        resolve_class("snorkle", classes)
    with pytest.raises(AtlasError, match="ambiguous"):
        resolve_class("crane", classes)


def test_selection_holds_the_snorkel_photos_own_samples(marine_run):
    classes = imagenet_classes(1000)
    rows = select_class(marine_run, "mixed5b", resolve_class("snorkel", classes), top_k=40)
    root = zarr.open_group(marine_run / "store.zarr", mode="r")
    paths = root["images/path"][:]
    snorkel_image = next(i for i, p in enumerate(paths.tolist()) if "snorkel" in p)
    image_of_row = root["samples/mixed5b/image_index"][:][rows]
    assert (image_of_row == snorkel_image).sum() >= 4
    assert np.unique(rows).size == rows.size
    attributions = root["samples/mixed5b/attributions"][:].astype(np.float32)
    winners = np.flatnonzero(attributions.argmax(1) == 801)
    assert np.isin(winners, rows).all()


def test_snorkel_vs_scuba_diver_end_to_end(marine_run):
    name = compare_atlas(marine_run, "mixed5b", "snorkel", "scuba diver", top_k=40, sizes=(4,), quality="draft",
                         render=RenderSettings(quality="draft", steps=16, size=48))
    root = zarr.open_group(marine_run / "store.zarr", mode="r")
    layout = root[f"layouts/mixed5b/{name}"]
    assert layout.attrs["axis_labels"] == ["snorkel", "scuba diver"]
    xy = layout["xy"][:]
    assert (xy >= 0).all() and (xy <= 1).all()
    g = root[f"grids/mixed5b/{name}/4"]
    count, att = g["count"][:], g["mean_attribution"][:]
    left, right = count[:, :2].sum(1) > 0, count[:, 2:].sum(1) > 0
    assert left.any() and right.any()
    weights_left, weights_right = count[:, :2], count[:, 2:]
    scuba_left = (att[:, :2, 983] * weights_left).sum() / weights_left.sum()
    scuba_right = (att[:, 2:, 983] * weights_right).sum() / weights_right.sum()
    snorkel_left = (att[:, :2, 801] * weights_left).sum() / weights_left.sum()
    snorkel_right = (att[:, 2:, 801] * weights_right).sum() / weights_right.sum()
    assert scuba_right > scuba_left
    assert snorkel_left > snorkel_right
    icons = root[f"icons/mixed5b/{name}/4"]
    assert icons["done"][:][g["render"][:]].all()
    assert (marine_run / "tiles" / "atlases.json").exists()
    assert name in (marine_run / "tiles" / "atlases.json").read_text()
    import json

    metas = list((marine_run / "tiles" / "mixed5b" / name / "meta" / "4").glob("*.json"))
    cells = [c for m in metas for c in json.loads(m.read_text())["cells"]]
    assert cells and all([n for n, _ in c["cls"]] == ["snorkel", "scuba diver"] for c in cells)


def test_unknown_class_in_compare_fails_clearly(marine_run):
    with pytest.raises(AtlasError, match="unknown class 'scuba dievr'.*scuba diver"):
        compare_atlas(marine_run, "mixed5b", "snorkel", "scuba dievr")


def test_class_filtered_atlas_from_the_command_line(marine_run):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", "class", str(marine_run), "--layer", "mixed5b",
                             "--class", "n04251144", "--top-k", "30", "--grid", "3", "--steps", "8", "--size", "32"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    root = zarr.open_group(marine_run / "store.zarr", mode="r")
    layout = root["layouts/mixed5b/class-snorkel"]
    assert layout.attrs["kind"] == "class" and layout.attrs["class_names"] == ["snorkel"]
    assert root["grids/mixed5b/class-snorkel/3/count"][:].sum() == layout["rows"].shape[0]
    assert "class-snorkel" in (marine_run / "tiles" / "atlases.json").read_text()
    bad = subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", "class", str(marine_run), "--layer", "mixed5b",
                          "--class", "snorkle"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown class 'snorkle'" in bad.stderr and bad.stderr.strip().count("\n") == 0


def test_a_class_atlas_is_recorded_and_skipped_when_current(marine_run, tmp_path):
    """The class atlas's steps are recorded as `class-NAME:stage`: the same call again skips them all; a new render
    setting redoes render and tiles only; sampling again drops every one of its records."""
    import shutil

    from atlas import store
    from atlas.classes import class_atlas

    run = tmp_path / "run"
    shutil.copytree(marine_run, run)
    icons = RenderSettings(quality="draft", steps=4, size=48)
    name = class_atlas(run, "mixed5b", "snorkel", top_k=20, sizes=(4,), render=icons)
    records = store.read_ledger(run)["records"]
    stages = [f"{name}:{s}" for s in ("project", "grid", "render", "tiles")]
    assert all("key" in records[s] for s in stages), records
    before = store.read_ledger(run)["records"]
    class_atlas(run, "mixed5b", "snorkel", top_k=20, sizes=(4,), render=icons)
    after = store.read_ledger(run)["records"]
    assert all(after[s]["finished"] == before[s]["finished"] for s in stages)  # nothing ran again
    class_atlas(run, "mixed5b", "snorkel", top_k=20, sizes=(4,), render=RenderSettings(quality="draft", steps=5, size=48))
    again = store.read_ledger(run)["records"]
    assert [again[s]["key"] == after[s]["key"] for s in stages] == [True, True, False, False]
    store.begin_stage(run, "sample", ["images"])  # what `atlas sample` does first when it rewrites the samples
    dropped = store.read_ledger(run)["records"]
    assert all("invalidated_by" in dropped[s] for s in stages)
