"""`atlas build` end to end on the shared photos, its skip logic and its up-front checks."""

import subprocess
import sys

import pytest
import zarr
from conftest import REPO, WEIGHTS

from atlas.build import build, load_config, merge
from atlas.errors import AtlasError


def _config(images, out, **tables):
    overrides = {
        "run": {"images": str(images), "out": str(out), "layers": ["mixed4c"]},
        "sample": {"weights": str(WEIGHTS), "per_image": 3, "workers": 0},
        "project": {"n_neighbors": 15},
        "grid": {"sizes": [10], "min_count": 2},
        "render": {"quality": "draft", "steps": 12, "size": 32},
        "tiles": {"examples": False},
    }
    for table, values in tables.items():
        overrides[table] = overrides.get(table, {}) | values
    return merge(load_config(None), overrides)


@pytest.fixture(scope="module")
def hundred(tmp_path_factory, photos):
    names = sorted(p.name for p in photos.glob("*.JPEG"))[::10]
    path = tmp_path_factory.mktemp("hundred") / "images.txt"
    path.write_text("".join(f"{photos / n}\n" for n in names))
    return path


def test_build_end_to_end_then_skip_then_regrid(hundred, tmp_path):
    out = tmp_path / "run"
    first = build(_config(hundred, out), echo=lambda *_: None)
    assert first.ran == ["sample", "project", "grid", "render", "tiles"]
    root = zarr.open_group(out / "store.zarr", mode="r")
    assert root["samples/mixed4c/valid"][:].sum() == 300
    assert root["layouts/mixed4c/full/xy"].shape == (300, 2)
    g = root["grids/mixed4c/full/10"]
    assert g["count"][:].sum() == 300
    icons = root["icons/mixed4c/full/10"]
    assert icons["done"][:][g["render"][:]].all() and g["render"][:].sum() > 5
    assert (out / "tiles" / "index.html").exists() and list((out / "tiles").rglob("*.dzi"))
    assert first.summary["layers"]["mixed4c"]["samples"] == 300
    from atlas.info import format_info, info

    report = info(out)
    assert report["tiles"][0]["id"] == "mixed4c/full"
    assert report["layers"]["mixed4c"]["atlases"]["full"]["grids"]["10"]["n_render"] == int(g["render"][:].sum())
    assert "tiles: mixed4c/full" in format_info(report)

    again = build(_config(hundred, out), echo=lambda *_: None)
    assert again.ran == [] and again.skipped == ["sample", "project", "grid", "render", "tiles"]

    regrid = build(_config(hundred, out, grid={"sizes": [6]}), echo=lambda *_: None)
    assert regrid.ran == ["grid", "render", "tiles"] and regrid.skipped == ["sample", "project"]
    assert "6" in zarr.open_group(out / "store.zarr", mode="r")["icons/mixed4c/full"]


def test_bad_input_fails_before_any_work(hundred, tmp_path, photos):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (_config(tmp_path / "missing", tmp_path / "a"), "images not found"),
        (_config(empty, tmp_path / "b"), "no images in"),
        (_config(hundred, tmp_path / "c", run={"layers": ["mixed9z"]}), "unknown layer 'mixed9z'.*mixed4c"),
        (_config(hundred, tmp_path / "d", grid={"sizes": [1]}), "grid sizes must be at least 2"),
        (_config(hundred, tmp_path / "e", sample={"weights": str(tmp_path / "none.safetensors")}), "weights file not found"),
    ]
    for config, message in cases:
        with pytest.raises(AtlasError, match=message):
            build(config, echo=lambda *_: None)
        assert not (tmp_path / config["run"]["out"] / "store.zarr").exists()
    with pytest.raises(AtlasError, match="unknown setting grid.size"):
        merge(load_config(None), {"grid": {"size": [3]}})


def test_dry_run_and_configs_resolve(hundred, tmp_path):
    lines = []
    build(_config(hundred, tmp_path / "dry"), dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert "estimated" in text and "render" in text and not (tmp_path / "dry" / "store.zarr").exists()
    paper = load_config(REPO / "configs" / "paper.toml")
    assert paper["project"]["n_neighbors"] == 50 and paper["sample"]["max_images"] == 1_000_000
    assert paper["project"]["min_dist"] == 0.05 and paper["project"]["metric"] == "cosine"
    assert paper["grid"]["sizes"] == [20, 40, 80, 160] and paper["render"]["quality"] == "paper"
    assert load_config(REPO / "configs" / "cpu.toml")["render"]["quality"] == "draft"


def test_cli_build_rejects_other_model_run(hundred, tmp_path):
    out = tmp_path / "run"
    root = zarr.open_group(out / "store.zarr", mode="w")
    root.attrs.update({"model": "resnet50", "weights_sha256": "abc"})
    result = subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", "build", "--images", str(hundred),
                             "--layer", "mixed4c", "--grid", "4", "--out", str(out), "--weights", str(WEIGHTS)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "holds a run of model resnet50" in result.stderr
    assert result.stderr.strip().count("\n") == 0
