"""The Python face: ``import atlas`` (cheap, curated, callable instruments), ``__all__`` lists, and every method of
``atlas.Run`` on a tiny run built with ``atlas.build``."""

from __future__ import annotations

import ast
import base64
import gc
import http.client
import io
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import WEIGHTS
from PIL import Image
from tiny_run import CONFIG, LAYER

import atlas
from atlas.errors import AtlasError
from atlas.info import info

PACKAGE = Path(atlas.__file__).parent


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos) -> atlas.Run:
    """The tiny run (8 photos x 4 positions, t-SNE, a 4x4 grid of 16 px icons), with attributions, via atlas.build."""
    cfg = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    cfg.write_text(CONFIG)
    out = tmp_path_factory.mktemp("face") / "run"
    lines: list[str] = []
    result = atlas.build(photos, out, config=cfg, sample={"attribution": True}, echo=lines.append)
    assert isinstance(result, atlas.Run) and result.path == out.resolve()
    assert sum("not run yet" in line for line in lines) == 5, lines
    return result


def group(run: atlas.Run, node: str) -> zarr.Group:
    return zarr.open_group(str(run.path / "store.zarr"), mode="r")[node]


# ----------------------------------------------------------------------------- the top level
def test_import_atlas_is_cheap_and_lists_the_face():
    code = ("import sys, atlas; heavy = [m for m in ('torch', 'zarr', 'numpy', 'PIL', 'starlette') if m in sys.modules]; "
            "print(heavy); print(sorted(atlas.__all__) == dir(atlas)); print(atlas.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert out[0] == "[]", f"import atlas loaded {out[0]}"
    assert out[1] == "True"
    face = set(ast.literal_eval(out[2]))
    assert {"build", "open_run", "Run", "load_model", "visualize", "sample", "project", "grid", "render", "tiles", "units",
            "inspect", "class_atlas", "compare_atlas", "__version__"} <= face
    assert len(face) <= 20  # a curated face, not the package


def test_every_face_name_resolves():
    from atlas.classes import class_atlas
    from atlas.models import load_model
    from atlas.render import visualize
    from atlas.run import Run, open_run

    for name in atlas.__all__:
        assert getattr(atlas, name) is not None, name
    assert (atlas.open_run, atlas.Run, atlas.load_model, atlas.visualize, atlas.class_atlas) == (open_run, Run, load_model, visualize,
                                                                                                 class_atlas)
    assert atlas.AtlasError is AtlasError and isinstance(atlas.__version__, str)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        atlas.nope  # noqa: B018


# The two ways a submodule gets bound on the package: the face's __getattr__ (`from atlas import render`, `atlas.render`)
# and the import system (`import atlas.render`, or any module importing it, as atlas.classes does).
@pytest.mark.parametrize("first", ["from atlas import render", "import atlas.classes"])
def test_instrument_modules_are_modules_and_callable_whatever_imported_them_first(first):
    """``atlas.render`` stays the module the package uses (``atlas.render.objectives``) and calling it runs
    ``atlas.render.render``, whichever import came first (``atlas.classes`` imports ``atlas.render`` itself)."""
    code = (f"{first}\nimport inspect, types, atlas\n"
            "for name in ('build', 'sample', 'grid', 'render', 'tiles', 'units', 'inspect'):\n"
            "    mod = getattr(atlas, name)\n"
            "    assert isinstance(mod, types.ModuleType) and mod.__name__ == 'atlas.' + name and callable(mod), name\n"
            "assert inspect.signature(atlas.render).parameters['sizes'] and 'run_dir' in inspect.signature(atlas.tiles).parameters\n"
            "assert list(inspect.signature(atlas.build).parameters)[:2] == ['images', 'out']\n"
            "assert atlas.render.objectives.channel and atlas.build.load_config\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def all_lists(package: Path) -> dict[str, tuple[list[str], set[str]]]:
    """module file -> (its ``__all__``, the names its top level binds), read with :mod:`ast` (nothing imported)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names, bound = None, set()
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        bound.add(target.id)
                        if target.id == "__all__":
                            names = list(ast.literal_eval(node.value))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.Import):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                bound |= {a.asname or a.name for a in node.names}
        if names is not None:
            found[path.relative_to(package.parent).as_posix()] = (names, bound)
    return found


def test_all_lists_name_only_public_existing_names():
    lists = all_lists(PACKAGE)
    assert "atlas/render/__init__.py" in lists and "atlas/run.py" in lists
    private = {f: [n for n in names if n.startswith("_") and not n.endswith("__")] for f, (names, _) in lists.items()}
    assert not {f: p for f, p in private.items() if p}, "private names exported"
    lazy = set(atlas.__all__)  # the top level binds its face on first use (PEP 562)
    missing = {f: [n for n in names if n not in bound and not (f == "atlas/__init__.py" and n in lazy)]
               for f, (names, bound) in lists.items()}
    assert not {f: m for f, m in missing.items() if m}, "__all__ names nothing by that name"
    dupes = {f: names for f, (names, _) in lists.items() if len(set(names)) != len(names)}
    assert not dupes


def test_the_all_check_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("from os import path\n\n__all__ = ['path', '_hidden', 'gone']\n\n\ndef _hidden():\n    pass\n")
    assert all_lists(pkg)["pkg/m.py"] == (["path", "_hidden", "gone"], {"path", "__all__", "_hidden"})


# ----------------------------------------------------------------------------- Run
def test_open_run_and_what_it_holds(run):
    same = atlas.open_run(str(run.path))
    assert same == run and same.layers == [LAYER] and same.atlases(LAYER) == ["full"] and same.grids(LAYER) == [4]
    assert repr(same) == f"Run({str(run.path)!r}, layers=['mixed4c'])"
    assert same.info() == info(run.path) and same.info()["layers"][LAYER]["samples"] == 32
    assert len(same.images) == 8 and all(p.is_file() for p in same.images)
    assert same.url is None


def test_layout_is_the_stored_layout(run):
    layout = run.layout(LAYER)
    g = group(run, f"layouts/{LAYER}/full")
    assert layout.xy.shape == (32, 2) and layout.xy.dtype == np.float32 and layout.rows.dtype == np.int64
    np.testing.assert_array_equal(layout.xy, g["xy"][:])
    np.testing.assert_array_equal(layout.rows, g["rows"][:])
    np.testing.assert_array_equal(layout.inside, g["inside"][:])
    assert layout.xy.min() >= 0 and layout.xy.max() <= 1
    xy, rows, inside = layout  # a named tuple
    assert rows is layout.rows


def test_samples_read_the_stored_rows_in_the_order_asked(run):
    s = run.samples(LAYER)
    g = group(run, f"samples/{LAYER}")
    assert s.rows.tolist() == list(range(32))
    np.testing.assert_array_equal(s.activations, g["activations"][:].astype(np.float32))
    np.testing.assert_array_equal(s.image_index, g["image_index"][:])
    np.testing.assert_array_equal(s.position, g["position"][:])
    assert s.attributions.shape == (32, 1000) and s.attributions.dtype == np.float32
    np.testing.assert_array_equal(s.attributions, g["attributions"][:].astype(np.float32))
    assert np.isin(s.image_index, np.arange(8)).all()
    picked = run.samples(LAYER, rows=[7, 2, 2, 30], attributions=False)
    assert picked.rows.tolist() == [7, 2, 2, 30] and picked.attributions is None
    np.testing.assert_array_equal(picked.activations, s.activations[[7, 2, 2, 30]])
    along = run.samples(LAYER, rows=run.layout(LAYER).rows)  # one sample per layout point, in its order
    np.testing.assert_array_equal(along.activations, s.activations[run.layout(LAYER).rows])
    with pytest.raises(AtlasError, match="not valid samples of mixed4c .first: 99.; valid rows: 32 between 0 and 31"):
        run.samples(LAYER, rows=[1, 99])


def test_icons_are_masked_where_no_icon_was_rendered(run):
    icons = run.icons(LAYER, 4)
    g = group(run, f"icons/{LAYER}/full/4")
    done = g["done"][:]
    assert isinstance(icons, np.ma.MaskedArray) and icons.shape == (4, 4, 16, 16, 3) and icons.dtype == np.uint8
    np.testing.assert_array_equal(~icons.mask[:, :, 0, 0, 0], done)
    assert icons.mask.all(axis=(2, 3, 4)).tolist() == icons.mask.any(axis=(2, 3, 4)).tolist()  # whole cells
    np.testing.assert_array_equal(icons.data[done], g["images"][:][done])
    assert not icons.data[~done].any() and (icons.filled(255)[~done] == 255).all()
    assert 0 < done.sum() < 16  # the tiny run leaves some cells empty: both branches are exercised


def test_sheet_places_each_icon_in_its_cell(run):
    icons = run.icons(LAYER, 4)
    sheet = run.sheet(LAYER, 4)
    assert sheet.mode == "RGB" and sheet.size == (64, 64)
    px = np.asarray(sheet)
    for gy in range(4):
        for gx in range(4):
            cell = px[gy * 16:(gy + 1) * 16, gx * 16:(gx + 1) * 16]
            if icons.mask[gy, gx, 0, 0, 0]:
                assert (cell == 255).all()
            else:
                np.testing.assert_array_equal(cell, icons.data[gy, gx])
    small = run.sheet(LAYER, 4, icon_size=5, background=(0, 0, 0))
    assert small.size == (20, 20)
    empty = np.argwhere(icons.mask[:, :, 0, 0, 0])[0]
    assert not np.asarray(small)[empty[0] * 5:(empty[0] + 1) * 5, empty[1] * 5:(empty[1] + 1) * 5].any()
    with pytest.raises(AtlasError, match="icon_size must be a positive integer"):
        run.sheet(LAYER, 4, icon_size=0)


def test_errors_are_one_line_naming_what_exists(run, tmp_path):
    cases = [
        (lambda: run.icons("mixed3a", 4), "layer 'mixed3a' is not in the run .*; its layers: mixed4c"),
        (lambda: run.sheet(LAYER, 8), "grid 8 of mixed4c/full has no icons .*; rendered grids: 4 "),
        (lambda: run.icons(LAYER, "4"), "grid '4' of mixed4c/full has no icons"),
        (lambda: run.layout(LAYER, "class-snorkel"), "atlas 'class-snorkel' of mixed4c is not in the run .*; its atlases: full"),
        (lambda: run.samples("logits"), "layer 'logits' is not in the run"),
        (lambda: run.show("mixed3a"), "mixed3a/full has no tiles .*; tiled: mixed4c/full"),
        (lambda: run.show(page="units.html"), r"no page 'units.html' in .*; pages: index.html, live.html$"),  # before atlas.units
        (lambda: atlas.open_run(run.path.parent), r"is not an atlas run \(no store.zarr\); runs inside it: run"),
        (lambda: atlas.open_run(tmp_path), r"is not an atlas run \(no store.zarr\); build one with atlas.build"),
        (lambda: atlas.open_run(tmp_path / "nowhere"), "no run folder at .*nowhere .it does not exist."),
    ]
    for call, pattern in cases:
        with pytest.raises(AtlasError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and re.search(pattern, message), (pattern, message)


def test_repr_html_shows_a_summary_and_the_sheet(run):
    page = run._repr_html_()
    assert "<table>" in page and "32 samples x 512 channels" in page and "atlas full: tsne layout, grids 4 (" in page
    assert "run.show()" in page
    match = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    shown = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    assert shown.size == (4 * 64, 4 * 64)  # icons scaled up to 64 px for a 4-cell grid
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(run.sheet(LAYER, 4, icon_size=64)))


def _get(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", parts.path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_show_serves_the_viewer_until_stopped_or_collected(run):
    viewer = run.show(LAYER)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/tiles/index\.html#mixed4c%2Ffull", viewer.url), viewer.url
        assert f'<iframe src="{viewer.url}"' in viewer._repr_html_()
        base = viewer.url.split("#")[0]
        assert _get(base) == 200 and _get(base.replace("index.html", "atlases.json")) == 200
        assert _get(base.replace("index.html", "openseadragon/openseadragon.min.js")) == 200
        assert _get(base.replace("index.html", f"{LAYER}/full/atlas_files/0/0_0.jpg")) == 200
        assert _get(base.replace("index.html", "../store.zarr/zarr.json")) in (403, 404)  # still atlas serve's rules
        assert run.show().url == base  # one server per Run
    finally:
        viewer.stop()
    with pytest.raises(OSError):
        _get(base)
    # a second Run on the same folder, dropped without stop(): the garbage collector stops its server
    other = atlas.open_run(run.path)
    url = other.show().url
    assert _get(url) == 200
    del other
    gc.collect()
    with pytest.raises(OSError):
        _get(url)


def test_build_again_skips_every_stage_and_checks_settings(run, photos):
    lines: list[str] = []
    cfg = {"sample": {"weights": str(WEIGHTS), "max_images": 8, "per_image": 4, "workers": 0, "batch_size": 8},
           "project": {"method": "tsne"}, "grid": {"min_count": 1}, "render": {"quality": "draft", "steps": 4, "size": 16},
           "tiles": {"examples": False}}
    again = atlas.build(photos, run.path, layers=LAYER, grids=4, config=cfg, attribution=True, echo=lines.append)
    assert again == run and sum("up to date, skipped" in line for line in lines) == 5, lines
    with pytest.raises(AtlasError, match="unknown build setting 'qualty'; settings: .*quality"):
        atlas.build(photos, run.path, qualty="draft")
    with pytest.raises(AtlasError, match="quality"):
        atlas.build(photos, run.path, config=cfg, quality="ultra")


def test_unit_views_read_what_the_lens_computed(run):
    """Last in this file: it adds the unit lens to the shared run."""
    with pytest.raises(AtlasError, match=r"the unit lens has not run on 'mixed4c' .*; it ran on: no layer \(atlas.units\(run,"):
        run.unit_views(LAYER)
    atlas.units(run, LAYER, channels="2-3", top_k=3, projections=["deconvnet"], kinds=["fft"], steps=4, size=24, progress=False,
                echo=None)  # a Run goes where a run folder does
    views = run.unit_views(LAYER)
    g = group(run, f"units/{LAYER}")
    assert views["channels"].tolist() == [2, 3]
    assert views["top_patch"].shape[:2] == (2, 3) and views["top_patch"].dtype == np.uint8
    np.testing.assert_array_equal(views["top_value"], g["top/value"][2:4])
    np.testing.assert_array_equal(views["top_image"], g["top/image"][2:4])
    np.testing.assert_array_equal(views["projection/deconvnet"], g["projection/deconvnet/image"][2:4])
    assert views["vis/fft"].shape == (2, 1, 24, 24, 3) and views["vis/fft"].any()
    assert views["class_top"].shape == (2, 5) and len(run.classes) == 1000
    assert (views["top_value"][:, :-1] >= views["top_value"][:, 1:]).all()  # strongest first
    assert run.unit_views(LAYER, channels=[3])["channels"].tolist() == [3]
    with pytest.raises(AtlasError, match="channels of mixed4c are 0..511; got 0..600"):
        run.unit_views(LAYER, channels=[0, 600])
    viewer = run.show(page="units.html")
    try:
        assert viewer.url.endswith("/tiles/units.html") and _get(viewer.url) == 200
    finally:
        viewer.stop()
    with pytest.raises(AtlasError, match="no page .nope.html. in .*; pages: index.html, live.html, units.html"):
        run.show(page="nope.html")
