"""Every wrong option or config value is one line, exit status 2, no traceback, and nothing is touched (issues 11, 12).

Each case runs the real command line in a subprocess against a finished tiny run (made once for
the module) and checks: exit status 2, exactly one non-empty line on stderr (the expected one),
no "Traceback", and the run folder byte for byte as before. Cases that fail on an option alone
never import torch, so they take a fraction of a second each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import WEIGHTS

from atlas import settings
from atlas.errors import AtlasError

RUN, IMAGES, FILE, FRESH, CONFIG = "{run}", "{images}", "{file}", "{fresh}", "{config}"
LAYER = "mixed4c"


def _atlas(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", *args], capture_output=True, text=True,
                          timeout=timeout)


def _digest(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes (folders: '')."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = ""
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos) -> Path:
    names = sorted(p.name for p in photos.glob("*.JPEG"))[::100][:6]
    path = tmp_path_factory.mktemp("errors-images") / "images.txt"
    path.write_text("".join(f"{photos / n}\n" for n in names))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, images) -> Path:
    """A finished tiny run: 6 photos x 4 positions, PCA layout, one 3x3 grid, 4-step 32 px icons, tiles."""
    from atlas.build import build, load_config, merge

    out = tmp_path_factory.mktemp("errors-run") / "run"
    config = merge(load_config(None), {
        "run": {"images": str(images), "out": str(out), "layers": [LAYER]},
        "sample": {"weights": str(WEIGHTS), "per_image": 4, "workers": 0, "attribution": False},
        "project": {"method": "pca"},
        "grid": {"sizes": [3], "min_count": 1},
        "render": {"quality": "draft", "steps": 4, "size": 32},
        "tiles": {"examples": False},
    })
    result = build(config, echo=lambda *_: None)
    assert result.ran == ["sample", "project", "grid", "render", "tiles"]
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad inputs on disk: a plain file, garbage weights, and configs of every kind of wrongness."""
    folder = tmp_path_factory.mktemp("errors-files")
    made = {"file": folder / "a-file.txt", "garbage.safetensors": folder / "garbage.safetensors", "garbage.pth": folder / "garbage.pth"}
    made["file"].write_text("not a folder\n")
    noise = random.Random(0).randbytes(4096)  # fixed garbage: the same failure every run
    made["garbage.safetensors"].write_bytes(noise)
    made["garbage.pth"].write_bytes(noise)
    configs = {
        "ten": '[sample]\nmax_images = "ten"\n',
        "sizes8": "[grid]\nsizes = 8\n",
        "sizes-str": '[grid]\nsizes = ["20"]\n',
        "quality": '[render]\nquality = "ultra"\n',
        "attribution": '[sample]\nattribution = "yes"\n',
        "min-dist": '[project]\nmin_dist = "small"\n',
        "not-table": "sample = 5\n",
        "unknown-key": "[grid]\nsize = [3]\n",
        "bad-toml": "[grid\nsizes = [3]\n",
    }
    for name, text in configs.items():
        made[f"config-{name}"] = folder / f"{name}.toml"
        made[f"config-{name}"].write_text(text)
    made["config-latin1"] = folder / "latin1.toml"
    made["config-latin1"].write_bytes('# caf\u00e9 settings\n[grid]\nsizes = [3]\n'.encode("latin-1"))
    return made


B = ["build", "--images", IMAGES, "--layer", LAYER, "--out", RUN, "--grid", "3", "--weights", str(WEIGHTS)]
S = ["sample", "--images", IMAGES, "--layer", LAYER, "--out", RUN, "--weights", str(WEIGHTS), "--workers", "0"]
P = ["project", RUN, "--layer", LAYER]
G = ["grid", RUN, "--layer", LAYER]
R = ["render", RUN, "--layer", LAYER, "--grid", "3"]
T = ["tiles", RUN, "--layer", LAYER]

# (command line, the one line expected on stderr after "atlas: error: "); none of these needs the model.
FAST = [
    # atlas build: every setting is checked before anything is imported or loaded, --dry-run too
    (B + ["--quality", "ultra", "--dry-run"], "render.quality must be one of draft, standard, paper; got 'ultra'"),
    (B + ["--quality", "ultra"], "render.quality must be one of draft, standard, paper; got 'ultra'"),
    (B + ["--grid", "100000"], "grid.sizes must be a list of integers in 2..2048; got [3, 100000] (grid sizes must be at most 2048)"),
    (B + ["--method", "mds"], "project.method must be one of umap, tsne, pca; got 'mds'"),
    (B + ["--icons", "pictures"], "render.icons must be one of optimize, examples; got 'pictures'"),
    (B + ["--max-images", "0"], "sample.max_images must be an integer >= 1; got 0"),
    (B + ["--max-images", "-995"], "sample.max_images must be an integer >= 1; got -995"),
    (B + ["--per-image", "0"], "sample.per_image must be an integer >= 1; got 0"),
    (B + ["--seed", "-1"], "sample.seed must be an integer in 0..4294967295; got -1"),
    (B + ["--device", "tpu"], "sample.device must be cpu, cuda, cuda:N or mps; got 'tpu'"),
    (B + ["--knn", "annoy"], "project.knn must be one of atlas, faiss; got 'annoy'"),
    (["build", "--images", IMAGES, "--layer", LAYER, "--out", FILE], "--out {file} is a file, not a folder; give a folder"),
    (B + ["--config", "{config-ten}"], "sample.max_images must be an integer >= 1; got 'ten' (in {config-ten})"),
    (B[:-4] + ["--config", "{config-sizes8}"], "grid.sizes must be a list of integers in 2..2048; got 8 (in {config-sizes8})"),
    (B[:-4] + ["--config", "{config-sizes-str}"], "grid.sizes must be a list of integers in 2..2048; got ['20'] (in {config-sizes-str})"),
    (B + ["--config", "{config-quality}"], "render.quality must be one of draft, standard, paper; got 'ultra' (in {config-quality})"),
    (B + ["--config", "{config-attribution}"], "sample.attribution must be true or false; got 'yes' (in {config-attribution})"),
    (B + ["--config", "{config-min-dist}"], "project.min_dist must be a number in 0.0..1.0; got 'small' (in {config-min-dist})"),
    (B + ["--config", "{config-not-table}"], "[sample] in {config-not-table} must be a table of settings; got 5"),
    (B + ["--config", "{config-unknown-key}"], "unknown setting grid.size in {config-unknown-key}; known: sizes, min_count"),
    (B + ["--config", "{config-latin1}"], "config file {config-latin1} is not UTF-8 text (byte 0xe9 at offset 5); save it as UTF-8"),
    (B + ["--config", "{config-bad-toml}"],
     "config file {config-bad-toml} is not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 6)"),
    (B + ["--config", "{fresh}.toml"], "config file not found: {fresh}.toml"),
    # atlas sample: checked before the model is loaded and before the run folder is created
    (S + ["--workers", "-1"], "sample.workers must be an integer >= 0; got -1"),
    (S + ["--batch-size", "0"], "sample.batch_size must be an integer >= 1; got 0"),
    (S + ["--shard-size", "0"], "sample.shard_size must be an integer >= 1; got 0"),
    (S + ["--max-images", "0"], "sample.max_images must be an integer >= 1; got 0"),
    (S + ["--max-images", "-995"], "sample.max_images must be an integer >= 1; got -995"),
    (S + ["--per-image", "0"], "sample.per_image must be an integer >= 1; got 0"),
    (S + ["--seed", "-1"], "sample.seed must be an integer in 0..4294967295; got -1"),
    (S + ["--dtype", "int8"], "sample.dtype must be one of float16, float32; got 'int8'"),
    (S + ["--precision", "half"], "sample.precision must be one of auto, float32, bfloat16; got 'half'"),
    (S + ["--device", "gpu"], "sample.device must be cpu, cuda, cuda:N or mps; got 'gpu'"),
    (["sample", "--images", IMAGES, "--layer", LAYER, "--out", FILE], "--out {file} is a file, not a folder; give a folder"),
    (S + ["--workers", "two"], "Invalid value for '--workers': Input should be a valid integer, unable to parse string as an integer "
                               "(see `atlas sample --help`)"),
    (["sample", "--images", IMAGES, "--out", RUN], "Missing option '--layer'. (see `atlas sample --help`)"),
    # atlas project / grid
    (P + ["--method", "mds"], "project.method must be one of umap, tsne, pca; got 'mds'"),
    (P + ["--n-neighbors", "1"], "project.n_neighbors must be an integer >= 2; got 1"),
    (P + ["--neighbors", "1"], "project.n_neighbors must be an integer >= 2; got 1"),
    (P + ["--pca", "0"], "project.pca must be an integer >= 1; got 0"),
    (P + ["--min-dist", "-0.5"], "project.min_dist must be a number in 0.0..1.0; got -0.5"),
    (P + ["--min-dist", "2"], "project.min_dist must be a number in 0.0..1.0; got 2.0"),
    (P + ["--metric", "hamming"], "project.metric must be one of cosine, euclidean, l2, manhattan, correlation; got 'hamming'"),
    (P + ["--outside", "wrap"], "project.outside must be one of edge, drop; got 'wrap'"),
    (P + ["--seed", "-1"], "project.seed must be an integer in 0..4294967295; got -1"),
    (P + ["--knn", "annoy"], "project.knn must be one of atlas, faiss; got 'annoy'"),
    (G + ["--grid", "100000"], "grid.sizes must be a list of integers in 2..2048; got [100000] (grid sizes must be at most 2048)"),
    (G + ["--grid", "1"], "grid.sizes must be a list of integers in 2..2048; got [1] (grid sizes must be at least 2)"),
    (G + ["--min-count", "0"], "grid.min_count must be an integer >= 1; got 0"),
    (G + ["--nearest", "-1"], "grid.n_nearest must be an integer >= 0; got -1"),
    # atlas render / export-icons
    (R + ["--steps", "0"], "render.steps must be an integer >= 1; got 0"),
    (R + ["--quality", "ultra"], "render.quality must be one of draft, standard, paper; got 'ultra'"),
    (R + ["--icons", "pictures"], "render.icons must be one of optimize, examples; got 'pictures'"),
    (R + ["--size", "0"], "render.size must be an integer in 8..1024; got 0"),
    (R + ["--attempts", "0"], "render.attempts must be an integer >= 1; got 0"),
    (R + ["--batch", "0"], "render.batch must be an integer >= 1; got 0"),
    (R + ["--p", "-1"], "render.p must be a number >= 0.0; got -1.0"),
    (R + ["--p", "nan"], "render.p must be a number >= 0.0; got nan"),
    (R + ["--seed", "-1"], "render.seed must be an integer in 0..4294967295; got -1"),
    (R[:-1] + ["100000"], "grid.sizes must be a list of integers in 2..2048; got [100000] (grid sizes must be at most 2048)"),
    (["export-icons", RUN, "--layer", LAYER, "--grid", "3", "--out", FILE], "--out {file} is a file, not a folder; give a folder"),
    # atlas tiles / serve
    (T + ["--format", "gif"], "tiles.format must be one of jpg, png, webp; got 'gif'"),
    (T + ["--tile-size", "0"], "tiles.tile_size must be an integer in 16..4096; got 0"),
    (T + ["--overlap", "-1"], "tiles.overlap must be an integer in 0..64; got -1"),
    (T + ["--tile-size", "16", "--overlap", "8"], "tiles.overlap must be less than half of tiles.tile_size (16); got 8"),
    (T + ["--icon-size", "0"], "tiles.icon_size must be an integer in 1..1024; got 0"),
    (T + ["--size", "1"], "grid.sizes must be a list of integers in 2..2048; got [1] (grid sizes must be at least 2)"),
    (["serve", RUN, "--port", "70000"], "serve.port must be an integer in 0..65535; got 70000"),
    (["serve", RUN, "--port", "-1"], "serve.port must be an integer in 0..65535; got -1"),
    # atlas class / compare
    (["class", RUN, "--layer", LAYER, "--class", "snorkel", "--quality", "ultra"],
     "render.quality must be one of draft, standard, paper; got 'ultra'"),
    (["class", RUN, "--layer", LAYER, "--class", "snorkel", "--method", "mds"], "project.method must be one of umap, tsne, pca; got 'mds'"),
    (["class", RUN, "--layer", LAYER, "--class", "snorkel", "--top-k", "0"], "--top-k must be an integer >= 1; got 0"),
    (["compare", RUN, "snorkel", "scuba diver", "--layer", LAYER, "--grid", "100000"],
     "grid.sizes must be a list of integers in 2..2048; got [100000] (grid sizes must be at most 2048)"),
    (["compare", RUN, "snorkel", "scuba diver", "--layer", LAYER, "--steps", "0"], "render.steps must be an integer >= 1; got 0"),
    (["layers", "--size", "0"], "layers.size must be an integer in 1..4096; got 0"),
]

# These need torch or the model itself, and still fail before any work.
SLOW = [
    (B + ["--device", "cuda"], "--device cuda: no CUDA GPU is available on this machine (torch sees none); use --device cpu"),
    (S + ["--device", "cuda"], "--device cuda: no CUDA GPU is available on this machine (torch sees none); use --device cpu"),
    (R + ["--device", "cuda:0"], "--device cuda:0: no CUDA GPU is available on this machine (torch sees none); use --device cpu"),
    (B[:-2] + ["--weights", "{garbage.safetensors}"],
     "weights file {garbage.safetensors} is not readable InceptionV1 weights (not a safetensors file: Error while deserializing header: "),
    (S[:-4] + ["--weights", "{garbage.pth}"],
     "weights file {garbage.pth} is not readable InceptionV1 weights (not a PyTorch state dict that torch.load can read: "),
    (["build", "--images", IMAGES, "--layer", "logits", "--out", RUN, "--grid", "3"],
     "layer 'logits' has no spatial positions (shape (1000,)); choose a convolutional layer"),
    (["sample", "--images", IMAGES, "--layer", "logits", "--out", RUN],
     "layer 'logits' has no spatial positions (shape (1000,)); choose a convolutional layer"),
    (["build", "--images", IMAGES, "--layer", "softmax9", "--out", RUN, "--grid", "3"], "unknown layer 'softmax9' for model inceptionv1; "),
    (["layers", "--size", "8"], "--size 8 is too small an input for inceptionv1 ("),
]


def _fill(arg: str, run: Path, images: Path, files: dict[str, Path], fresh: Path) -> str:
    arg = arg.replace(RUN, str(run)).replace(IMAGES, str(images)).replace(FILE, str(files["file"])).replace(FRESH, str(fresh))
    for name, path in files.items():
        arg = arg.replace("{" + name + "}", str(path))
    return arg


def _check(args, expected, run, images, files, tmp_path, prefix_only=False) -> float:
    fresh = tmp_path / "fresh"
    args = [_fill(a, run, images, files, fresh) for a in args]
    expected = _fill(expected, run, images, files, fresh)
    before = _digest(run)
    start = time.perf_counter()
    result = _atlas(*args)
    seconds = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (args, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, lines
    line = lines[0]
    wanted = f"atlas: error: {expected}"
    assert line.startswith(wanted) if prefix_only else line == wanted, line
    assert _digest(run) == before, "the run folder changed"
    assert not fresh.exists() and not Path(f"{fresh}.toml").exists()
    return seconds


@pytest.mark.parametrize("args, expected", FAST, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FAST])
def test_bad_option_is_one_line_and_touches_nothing(args, expected, run, images, files, tmp_path):
    _check(args, expected, run, images, files, tmp_path)


@pytest.mark.parametrize("args, expected", SLOW, ids=[" ".join(a[:1] + a[-2:]) for a, _ in SLOW])
def test_bad_device_weights_or_layer_is_one_line_before_any_work(args, expected, run, images, files, tmp_path):
    _check(args, expected, run, images, files, tmp_path, prefix_only=expected.endswith((": ", "(", "; ")))


def test_a_bad_shard_size_creates_no_folder(images, files, tmp_path):
    """Today's --shard-size 0 left a store that could never be resumed: now nothing is created at all."""
    fresh = tmp_path / "new-run"
    args = ["sample", "--images", str(images), "--layer", LAYER, "--out", str(fresh), "--shard-size", "0"]
    result = _atlas(*args)
    assert result.returncode == 2 and result.stderr.strip() == "atlas: error: sample.shard_size must be an integer >= 1; got 0"
    assert not fresh.exists()
    for extra in (["--max-images", "-995"], ["--quality", "ultra", "--dry-run"]):
        build = _atlas("build", "--images", str(images), "--layer", LAYER, "--out", str(fresh), *extra)
        assert build.returncode == 2 and build.stderr.count("\n") == 1 and not fresh.exists()


# ----------------------------------------------------------------------------- the settings classes themselves


def test_each_setting_has_one_default_in_its_settings_class():
    """A stage function takes its settings object (None: the class's defaults) and repeats no field as a parameter of its
    own, so each default exists once; single fields come as ``**overrides``, checked by the class."""
    from atlas.build import DEFAULTS
    from atlas.classes import class_atlas, compare_atlas
    from atlas.grid import MIN_COUNT
    from atlas.grid import grid as grid_fn
    from atlas.layout import DEFAULT_BACKEND, METHODS, OUTSIDE
    from atlas.layout import project as project_fn
    from atlas.render import PRESETS
    from atlas.render import render as render_fn
    from atlas.sample import sample as sample_fn
    from atlas.tiles import FORMATS, make_tiles

    pairs = [(settings.SampleSettings, sample_fn), (settings.ProjectSettings, project_fn), (settings.GridSettings, grid_fn),
             (settings.RenderSettings, render_fn), (settings.TilesSettings, make_tiles), (settings.ClassSettings, class_atlas),
             (settings.ClassSettings, compare_atlas)]
    for cls, fn in pairs:
        params = inspect.signature(fn).parameters
        assert params["settings"].default is None and params["settings"].annotation in (cls.__name__, f"{cls.__name__} | None"), fn
        # grid's own ``sizes`` is the library's 1 x 1 grid (the settings ask for 2..2048): its default is None, not a copy
        repeated = [f.name for f in dataclasses.fields(cls) if f.name in params and params[f.name].default is not None]
        assert not repeated, (fn.__name__, repeated)
        assert any(p.kind is p.VAR_KEYWORD for p in params.values()), fn  # keyword overrides go through the class
    with pytest.raises(AtlasError, match=r"^unknown setting sample.per_imag; known: "):
        sample_fn("photos", ["mixed4c"], "run", per_imag=2)
    with pytest.raises(AtlasError, match=r"^sample.per_image must be an integer >= 1; got 0$"):
        sample_fn("photos", ["mixed4c"], "run", settings.SampleSettings(seed=3), per_image=0)
    assert MIN_COUNT == settings.GridSettings.min_count == DEFAULTS["grid"]["min_count"] == 5
    assert settings.RenderSettings.quality == DEFAULTS["render"]["quality"] == "standard"
    assert PRESETS is settings.PRESETS
    assert METHODS == settings.PROJECT_METHODS and OUTSIDE == settings.OUTSIDE and tuple(FORMATS) == settings.TILE_FORMATS
    assert DEFAULT_BACKEND == settings.ProjectSettings.knn
    from atlas.layout.neighbors import BACKENDS, METRICS

    assert BACKENDS == settings.KNN_BACKENDS and set(METRICS) <= set(settings.PROJECT_METRICS)
    # DEFAULTS is derived: one table per settings class, its config keys, its defaults
    assert DEFAULTS == settings.defaults()
    # the pipeline's tables in order, then the instruments'
    assert list(DEFAULTS)[:7] == ["run", "sample", "project", "grid", "render", "tiles", "units"]
    assert {"inspect", "weights", "reconstruct", "evolution", "patch"} <= set(DEFAULTS)
    assert "shard_size" not in DEFAULTS["sample"] and DEFAULTS["grid"]["sizes"] == [20, 40, 80, 160]


def test_settings_are_frozen_normalised_and_documented():
    s = settings.RenderSettings(p=3, quality="paper")
    assert s.p == 3.0 and isinstance(s.p, float) and s.preset() == {"size": 80, "steps": 1024, "attempts": 4, "batch": 100, "screen": 0}
    assert settings.RenderSettings(steps=7).preset()["steps"] == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.quality = "draft"
    assert settings.GridSettings(sizes=[10, 20]).as_table() == {"sizes": [10, 20], "min_count": 5}
    for bad in (True, 2.5, "3", None):
        with pytest.raises(AtlasError, match=r"^grid.min_count must be an integer >= 1; got "):
            settings.GridSettings(min_count=bad)
    for cls in settings.STAGES.values():
        doc = cls.__doc__
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} : " in doc and ", default " in doc, (cls.__name__, f.name)
    from atlas.build import check, load_config, merge

    # merge checks names only; check (called by load_config and build) checks values
    config = merge(load_config(None), {"grid": {"sizes": [1]}})
    with pytest.raises(AtlasError, match=r"grid sizes must be at least 2"):
        check(config)


def test_the_settings_reference_in_docs_is_current():
    from conftest import REPO

    text = (REPO / "docs" / "settings.md").read_text()
    assert text.endswith(settings.reference()), "regenerate the tables of docs/settings.md from atlas.settings.reference()"
