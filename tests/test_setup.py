"""Set-up: declared dependencies, where the weights come from, a wheel that carries the viewer, the two make commands.

The wheel test builds atlas from a copy of this checkout into a temporary folder with no npm or node
on PATH, installs it into a fresh venv and serves a run from there to headless Chromium. To stay well under a
minute it does not re-install torch and the rest: the fresh venv gets only the wheel
(``pip install --no-deps``), and then a ``.pth`` file naming the test interpreter's
site-packages, so its dependencies resolve there. A ``.pth`` line only appends that folder to
``sys.path`` (the ``.pth`` files inside it, such as the editable install's, are not run),
after the venv's own site-packages, so ``import atlas`` there finds the wheel's atlas, not
this checkout; the test checks that, from a working folder outside the repository.
"""

from __future__ import annotations

import ast
import contextlib
import email
import hashlib
import http.server
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import WEIGHTS, http_folder, require_shared
from packaging.requirements import Requirement
from PIL import Image

import atlas.models as models
from atlas.errors import AtlasError
from atlas.models import cache_dir, load_model, resolve_weights

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ATLAS = [sys.executable, "-c", "from atlas.cli import main; main()"]  # the CLI, as a user runs it
CHROMIUM = Path(os.environ.get("ATLAS_CHROMIUM", "/usr/bin/chromium"))
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def _norm(name: str) -> str:
    """A distribution name in PEP 503 form (scikit-learn, pillow, opentsne)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    return {_norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def _top_level_imports(folder: Path) -> dict[str, str]:
    """Top-level module of every absolute import in the .py files under ``folder`` -> the first file importing it."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def _undeclared(folder: Path, declared: set[str], local: set[str], optional: dict[str, str]) -> list[str]:
    """Third-party modules imported under ``folder`` whose distribution is not in ``declared``."""
    providers = importlib.metadata.packages_distributions()  # module -> the installed distributions that provide it
    problems = []
    for module, where in _top_level_imports(folder).items():
        if module in sys.stdlib_module_names or module in local or module in optional:
            continue
        dists = {_norm(d) for d in providers.get(module, [])}
        if not dists and _norm(module) in declared:
            continue  # declared under its own name but not installed here (e.g. the bench extra in a dev-only venv)
        if not dists:
            problems.append(f"{module} (imported in {where}) is not installed, so not declared by any installed distribution")
        elif not dists & declared:
            problems.append(f"{module} (imported in {where}) comes from {', '.join(sorted(dists))}, which is not declared")
    return problems


# ------------------------------------------------------------------------------------- dependencies
def test_every_import_of_the_package_is_a_declared_dependency():
    declared = _declared(PYPROJECT["project"]["dependencies"])
    # Ray is the optional [ray] extra: atlas.engine imports it only for --engine ray (one line says how to install it)
    assert "ray" in _declared(PYPROJECT["project"]["optional-dependencies"]["ray"])
    # timm is the optional [timm] extra: atlas.models.wrap imports it only for --model timm:NAME (one line says how)
    assert "timm" in _declared(PYPROJECT["project"]["optional-dependencies"]["timm"])
    optional = {"ray": "atlas/engine.py, the [ray] extra", "timm": "atlas/models/wrap.py, the [timm] extra"}
    assert _undeclared(REPO / "atlas", declared, local={"atlas"}, optional=optional) == []


def test_every_import_of_the_benchmarks_is_declared_in_dependencies_or_the_bench_extra():
    declared = _declared(PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["bench"])
    local = {"atlas"} | {p.stem for p in (REPO / "bench").glob("*.py")} | {p.stem for p in (REPO / "tests").glob("*.py")}
    # bench/render.py compares with lucent when it is installed (its docstring says how: it pins an old
    # kornia, so it cannot be a dependency of the extra without breaking the install).
    # bench/inspect.py's captum row runs when captum (the dev extra, for tests/test_captum.py) is installed.
    optional = {"lucent": "bench/render.py, optional", "captum": "bench/inspect.py, optional (the dev extra)",
                "timm": "bench/sample.py --vit, optional (the timm extra)",
                # its own columns run when the package imports: it needs matplotlib < 3.9 and pulls in OpenCV and
                # scikit-image, so it cannot be a dependency of the extra (the bench docstring and docs/concepts.md say how to run it)
                "overcomplete": "bench/concepts.py, optional"}
    assert _undeclared(REPO / "bench", declared, local=local, optional=optional) == []


def test_bench_only_packages_are_not_runtime_dependencies():
    runtime = _declared(PYPROJECT["project"]["dependencies"])
    assert not {"pyvips", "pyvips-binary", "psutil"} & runtime
    assert "pyvips" not in _top_level_imports(REPO / "atlas") and "psutil" not in _top_level_imports(REPO / "atlas")


# ------------------------------------------------------------------------------------- weights
@pytest.fixture
def no_weights(tmp_path, monkeypatch) -> Path:
    """No --weights, no ATLAS_WEIGHTS, an empty user cache under tmp_path; returns the cache folder."""
    monkeypatch.delenv("ATLAS_WEIGHTS", raising=False)
    monkeypatch.delenv("ATLAS_WEIGHTS_URL", raising=False)
    monkeypatch.delenv("ATLAS_WEIGHTS_SHA1", raising=False)
    monkeypatch.delenv("ATLAS_WEIGHTS_SHA256", raising=False)
    monkeypatch.delenv("TORCH_HOME", raising=False)  # torch's hub cache then follows XDG_CACHE_HOME too
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "atlas"


def test_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "atlas"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "atlas"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says to ignore a relative path
    assert cache_dir() == tmp_path / "home" / ".cache" / "atlas"


def test_weights_precedence_argument_then_env_then_cache(no_weights, tmp_path, monkeypatch):
    given, env = tmp_path / "given.safetensors", tmp_path / "env.safetensors"
    cached = no_weights / "bvlc_googlenet.safetensors"
    cached.parent.mkdir(parents=True)
    for path in (given, env, cached):
        path.write_bytes(b"x")
    monkeypatch.setenv("ATLAS_WEIGHTS", str(env))
    assert resolve_weights(given) == given
    assert resolve_weights(None) == env
    monkeypatch.delenv("ATLAS_WEIGHTS")
    assert resolve_weights(None) == cached
    # a named file that does not exist is an error, never a silent fall-through to the next place
    with pytest.raises(AtlasError, match="weights file not found"):
        resolve_weights(tmp_path / "absent.safetensors")
    monkeypatch.setenv("ATLAS_WEIGHTS", str(tmp_path / "absent.safetensors"))
    with pytest.raises(AtlasError, match=r"not found: .*absent.safetensors \(from ATLAS_WEIGHTS\)"):
        resolve_weights(None)


def test_real_weights_found_in_the_user_cache(no_weights):
    require_shared()
    no_weights.mkdir(parents=True)
    (no_weights / "bvlc_googlenet.safetensors").symlink_to(WEIGHTS)  # a link, not a copy of the shared file
    net = load_model("inceptionv1")
    assert net.weights == str(no_weights / "bvlc_googlenet.safetensors") and len(net.classes) == 1000


def test_class_list_beside_the_weights_else_in_the_cache(no_weights, tmp_path):
    require_shared()
    words = WEIGHTS.parent / "synset_words.txt"
    assert models.synset_words_file(WEIGHTS) == words and len(models.synset_words(WEIGHTS)) == 1000
    elsewhere = tmp_path / "w" / "weights.safetensors"  # weights in a folder without the list, and an empty cache
    assert models.synset_words_file(elsewhere) is None and models.synset_words(elsewhere) == []
    assert models.imagenet_classes(1000, elsewhere)[1] == "goldfish"  # names still come from torchvision's list
    no_weights.mkdir(parents=True)
    (no_weights / "synset_words.txt").symlink_to(words)
    assert models.synset_words_file(elsewhere) == no_weights / "synset_words.txt"
    assert models.synset_words(elsewhere)[1] == ("n01443537", "goldfish")


def _free_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_offline_without_weights_is_one_line(no_weights, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/bvlc_googlenet.caffemodel"  # as offline: nothing answers
    env = {**os.environ, "ATLAS_WEIGHTS_URL": url}
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(images / "a.jpg")  # a readable image: the weights are the only thing missing
    result = subprocess.run([*ATLAS, "sample", "--images", str(images), "--layer", "mixed4c",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    line = _one_line_error(result)
    assert str(no_weights) in line and "ATLAS_WEIGHTS unset" in line  # where it looked
    assert f"could not download {url}" in line  # what it tried: what to download
    assert f"put it at {no_weights / 'bvlc_googlenet.caffemodel'}" in line and "pass --weights PATH" in line  # what to do
    assert not no_weights.exists() or list(no_weights.iterdir()) == []  # no half-written file left behind


class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves one folder and records the paths asked for."""

    served: list[str] = []

    def do_GET(self) -> None:
        self.served.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def weights_server():
    """A local HTTP server for the real weights' folder; yields the weights file's URL and the list of requests."""
    require_shared()
    handler = type("Handler", (_Files,), {"served": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(WEIGHTS.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{WEIGHTS.name}", handler.served
    server.shutdown()
    server.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_checked_by_sha256_lands_in_the_cache(no_weights, weights_server, monkeypatch):
    url, served = weights_server
    monkeypatch.setenv("ATLAS_WEIGHTS_URL", url)
    monkeypatch.setenv("ATLAS_WEIGHTS_SHA256", _sha(WEIGHTS))
    net = load_model("inceptionv1")
    assert net.weights == str(no_weights / WEIGHTS.name) and net.weights_sha256 == _sha(WEIGHTS)
    assert sorted(p.name for p in no_weights.iterdir()) == [WEIGHTS.name]  # no .partial / .unverified left
    assert load_model("inceptionv1").weights == net.weights and len(served) == 1  # second time: from the cache


def test_download_with_a_wrong_sha256_is_refused_and_deleted(no_weights, weights_server, monkeypatch):
    url, _ = weights_server
    monkeypatch.setenv("ATLAS_WEIGHTS_URL", url)
    monkeypatch.setenv("ATLAS_WEIGHTS_SHA256", "ab" * 32)
    with pytest.raises(AtlasError, match=rf"has sha256 {_sha(WEIGHTS)}, not the expected {'ab' * 32}; deleted it") as info:
        load_model("inceptionv1")
    assert "\n" not in str(info.value)
    assert list(no_weights.iterdir()) == []


def test_download_without_its_checksum_is_not_used_until_vouched_for(no_weights, weights_server, monkeypatch):
    url, served = weights_server
    monkeypatch.setenv("ATLAS_WEIGHTS_URL", url)  # no checksum given: held to the published sha1 of the BVLC caffemodel
    sha1 = hashlib.sha1(WEIGHTS.read_bytes()).hexdigest()
    with pytest.raises(AtlasError, match=rf"has sha1 {sha1}, not the expected {models.BVLC_SHA1}; deleted it.*ATLAS_WEIGHTS_SHA1={sha1}"):
        load_model("inceptionv1")
    assert list(no_weights.iterdir()) == []  # never kept unchecked
    monkeypatch.setenv("ATLAS_WEIGHTS_SHA1", sha1)  # the user vouches: downloaded again, checked and used
    assert load_model("inceptionv1").weights == str(no_weights / WEIGHTS.name) and len(served) == 2


def test_the_default_inceptionv1_download_is_the_published_bvlc_release():
    # the Caffe model zoo's own URL and the sha1 its readme publishes; no unchecked default download remains
    assert models.BVLC_URL == "http://dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel"
    assert models.BVLC_SHA1 == "405fc5acd08a3bb12de8ee5e23a96bec22f08204" and not hasattr(models, "LUCENT_URL")


def test_torchvision_weights_come_from_torchs_own_cache(no_weights):
    import torch
    import torchvision

    default = torchvision.models.ResNet18_Weights.DEFAULT
    # where torchvision.models.resnet18(weights="DEFAULT") itself keeps them, under the file name its download gives
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
    assert cached.is_relative_to(no_weights.parent)  # torch's cache follows XDG_CACHE_HOME, here the test's folder
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cached)
    net = load_model("resnet18")
    assert net.weights == f"torchvision:{default}" and net.weights_sha256 == _sha(cached)


def test_torchvision_offline_is_one_line(no_weights):
    with pytest.raises(AtlasError, match=r"no torchvision weights for resnet18: none in .*torch/hub/checkpoints; tried to download "
                                         r"https://download.pytorch.org/\S+ and couldn't .*pass --weights PATH") as info:
        load_model("resnet18")
    assert "\n" not in str(info.value)


def test_layers_need_no_weights(no_weights, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_WEIGHTS")}
    result = subprocess.run([*ATLAS, "layers", "--model", "resnet50", "--size", "64"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"layer4\s+2048\s+2x2", result.stdout), result.stdout
    assert not no_weights.exists() or not any(no_weights.rglob("*.pth"))  # nothing was downloaded


def test_inceptionv1_architecture_without_weights(no_weights):
    from atlas.models import describe_layers

    net = load_model("inceptionv1", pretrained=False)  # no weights anywhere: the BVLC architecture, nothing downloaded
    rows = {r["layer"]: (r["channels"], r["height"]) for r in describe_layers(net, 224)}
    assert rows["mixed4a"] == (512, 14) and rows["mixed5b"] == (1024, 7) and net.weights == ""
    assert not no_weights.exists()


# ------------------------------------------------------------------------------------- the wheel
def _copy_checkout(dest: Path) -> Path:
    """The checkout's sources (no venv, git, outputs, build products, nor a node_modules left from older set-ups) copied to ``dest``."""
    skip = {"__pycache__", ".pytest_cache", ".ruff_cache"}
    top = {".venv", ".git", "outputs", "build", "dist", "node_modules"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        drop = {n for n in names if n in skip or n.endswith(".egg-info")}
        if Path(folder) == REPO:
            drop |= top & set(names)
        return drop

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def _without_node(path: str) -> str:
    """``path`` (a PATH value) without the folders holding npm or node, and without this checkout's venv."""
    keep = [p for p in path.split(os.pathsep) if p and not p.startswith(str(REPO))
            and not any(Path(p, tool).exists() for tool in ("npm", "node", "nodejs"))]
    return os.pathsep.join(keep)


def _build_wheel(src: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    # an absolute path: a bare "src" would be looked up on the package index
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
                           str(src.resolve()), "-w", str(out)], capture_output=True, text=True, env=env, timeout=300)


def _require_chromium() -> None:
    if not CHROMIUM.is_file():
        reason = f"chromium not found at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _venv_env(tmp: Path) -> dict:
    """The environment of a user with the fresh venv: no ATLAS_OPENSEADRAGON, no PYTHONPATH, and no npm or node on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_OPENSEADRAGON", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = _without_node(env.get("PATH", ""))
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout with no npm or node on PATH; returns its path."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_checkout(tmp / "src")
    built = _build_wheel(src, tmp / "dist", _venv_env(tmp))
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = (tmp / "dist").glob("activation_atlas-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with atlas installed from the wheel; returns the venv folder."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-cache-dir", "-q", str(wheel)],
                   check=True, timeout=300, env=_venv_env(venv))
    # after the install, so pip never sees (or touches) the checkout's editable atlas in the main site-packages
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    Path(site, "_atlas_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_is_activation_atlas_with_its_licence_ranges_and_the_vendored_viewer(wheel):
    from atlas.viewer import OSD_VERSION, STATIC

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(archive.read(meta_name))
        vendored = {p.relative_to(STATIC.parent.parent).as_posix(): p.read_bytes()
                    for p in (STATIC / "openseadragon").rglob("*") if p.is_file()}
        assert len(vendored) >= 40
        for name, content in vendored.items():  # every vendored file, byte for byte
            assert name in names and archive.read(name) == content, name
        licences = {n.split(".dist-info/licenses/")[1] for n in names if ".dist-info/licenses/" in n}
        assert licences == {"LICENSE", "atlas/viewer_static/openseadragon/LICENSE.txt"}, licences  # atlas's and the vendored code's
        assert "atlas/viewer_static/index.html" in names
    assert meta["Name"] == "activation-atlas" and meta["Version"] == PYPROJECT["project"]["version"]
    assert meta["License-Expression"] == "Apache-2.0"
    requires = {r.name: r for r in map(Requirement, meta.get_all("Requires-Dist"))}
    # ranges, not pins: installing atlas keeps a research environment's torch
    assert [name for name, r in requires.items() if any(s.operator in ("==", "===") for s in r.specifier)] == []
    assert {(s.operator, s.version.split(".")[0]) for s in requires["torch"].specifier} == {(">=", "2"), ("<", "3")}
    assert requires["ray"].extras == {"data"} and str(requires["ray"].marker) == 'extra == "ray"'
    assert any(c.startswith("Topic :: Scientific/Engineering") for c in meta.get_all("Classifier"))
    assert OSD_VERSION in (STATIC / "openseadragon" / "README.md").read_text()


def _viewer_loads_tiles(browser, url: str, check=None) -> None:
    """The atlas viewer at ``url`` loads, requests tiles and raises no page error; ``check(page, requested)`` asserts more.
    (The session's browser: a second sync Playwright in the same thread is refused while that one is alive.)"""
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    try:
        requested, errors = [], []
        page.on("request", lambda r: requested.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("document.body.dataset.loaded === '1'", timeout=20000)
        assert any(re.search(r"/atlas_files/\d+/\d+_\d+\.jpg", u) for u in requested), requested
        if check is not None:
            check(page, requested)
        assert errors == []
    finally:
        page.close()


@contextlib.contextmanager
def _atlas_serve(atlas: Path, run: Path, env: dict, cwd: Path):
    """``atlas serve RUN --port 0`` of an installed atlas, as a user starts it; yields the viewer's URL it prints."""
    server = subprocess.Popen([str(atlas), "serve", str(run), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=cwd, env=env)
    try:
        line = server.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/tiles/index\.html", line)
        assert match, line + (server.stderr.read() if server.poll() is not None else "")
        yield match.group(0)
    finally:
        server.terminate()
        server.wait(10)


def test_wheel_installed_without_npm_serves_the_viewer(installed, tmp_path, browser):
    _require_chromium()
    from tiles_helpers import make_tile_run

    from atlas.viewer import OSD_VERSION, STATIC

    python, atlas = installed / "bin" / "python", installed / "bin" / "atlas"
    env = _venv_env(tmp_path)
    assert shutil.which("npm", path=env["PATH"]) is None and shutil.which("node", path=env["PATH"]) is None
    version = subprocess.run([str(atlas), "--version"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout == f"atlas {PYPROJECT['project']['version']}\n", version.stdout + version.stderr
    where = subprocess.run([str(python), "-c", "import atlas, atlas.viewer as v; print(atlas.__file__); print(v.find_openseadragon())"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(installed), where  # the wheel's atlas, not this checkout
    assert Path(where[1]) == Path(where[0]).parent / "viewer_static" / "openseadragon", where
    # the installed copy is the vendored release, byte for byte
    assert (Path(where[1]) / "openseadragon.min.js").read_bytes() == (STATIC / "openseadragon" / "openseadragon.min.js").read_bytes()

    run = make_tile_run(tmp_path / "run", sizes=(4, 8), icon=32)
    result = subprocess.run([str(atlas), "tiles", str(run), "--layer", "mixed4c", "--no-examples"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (run / "tiles" / "openseadragon" / "openseadragon.min.js").is_file()

    def vendored(page, requested) -> None:
        assert page.evaluate("typeof window.OpenSeadragon") == "function"
        assert page.evaluate("window.OpenSeadragon.version.versionStr") == OSD_VERSION
        assert any(u.endswith("/openseadragon/images/zoomin_rest.png") for u in requested), requested  # the vendored buttons

    with _atlas_serve(atlas, run, env, tmp_path) as url:
        _viewer_loads_tiles(browser, url, vendored)


def test_npm_is_gone_from_set_up_build_and_ci():
    for name in ("package.json", "package-lock.json", "setup.py"):
        assert not (REPO / name).exists(), name
    for name in ("Makefile", ".ci/run", "pyproject.toml", "MANIFEST.in"):
        assert not re.search(r"\bnpm\b|node_modules", (REPO / name).read_text()), name


# ------------------------------------------------------------------------------------- name, version, help
def test_version_and_the_ray_extra_in_help():
    result = subprocess.run([*ATLAS, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == f"atlas {importlib.metadata.version('activation-atlas')}\n", result.stderr
    assert importlib.metadata.version("activation-atlas") == PYPROJECT["project"]["version"]
    env = {**os.environ, "COLUMNS": "240"}  # one help line per option, so the install line is not wrapped
    for command in ("build", "sample", "render", "units"):
        result = subprocess.run([*ATLAS, command, "--help"], capture_output=True, text=True, env=env, timeout=60)
        # rich markup would swallow "[ray]" (a style tag) and leave 'activation-atlas'
        assert result.returncode == 0 and "pip install 'activation-atlas[ray]'" in result.stdout, (command, result.stdout)


def test_install_lines_name_the_distribution_not_the_other_atlas_on_pypi():
    """`pip install atlas` installs an unrelated project: no doc, help text or message may say it."""
    wrong = re.compile(r"pip install (-U |--upgrade )?['\"]?atlas(\[[a-z,]+\])?['\"]?(\s|$|`|\))")
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "atlas").rglob("*.py"))]
    found = [f"{f.relative_to(REPO)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1) if wrong.search(line)]
    assert found == []


# ------------------------------------------------------------------------------------- the two commands
def _make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed (sudo apt-get install make)")
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True, env=env, timeout=60)


def test_ci_runs_the_test_command_and_nothing_else():
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "export CI=true", "make test"]


def test_make_demo_without_images_asks_for_them_in_one_line():
    result = _make("demo", "IMAGES=")
    line = _one_line_error(result)
    assert "make demo IMAGES=DIR" in line and result.stdout == ""  # stopped before any set-up step ran


def test_make_demo_installs_the_package_alone_and_make_test_the_extras_at_the_tested_versions():
    # -B plans every step as if nothing were set up yet; -n only prints it
    demo = _make("-n", "-B", "setup-demo").stdout
    installs = [ln for ln in demo.splitlines() if " -m pip install " in ln and "--upgrade pip" not in ln]
    assert len(installs) == 1 and installs[0].endswith(" -e ."), demo  # no dev, no ray, no constraints
    test = _make("-n", "-B", "setup").stdout
    installs = [ln for ln in test.splitlines() if " -m pip install " in ln and "--upgrade pip" not in ln]
    assert len(installs) == 1 and installs[0].endswith(" -e '.[dev,ray]' -c constraints/ci.txt"), test
    pins = dict(ln.split("==") for ln in (REPO / "constraints" / "ci.txt").read_text().splitlines() if "==" in ln)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_set_up_hints_without_apt_name_no_apt(tmp_path):
    """Where apt-get is absent (macOS, ...), a missing Chromium or ffmpeg is a hint that names what to install, not apt."""
    bin_dir = tmp_path / "bin"  # a PATH with what the recipes call, and no apt-get
    bin_dir.mkdir()
    for tool in ("id", "bash"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir)}
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed (sudo apt-get install make)")
    for target, variable, hint in (("system-chromium", "CHROMIUM", "install chromium or set CHROMIUM=/path/to/chromium"),
                                   ("system-ffmpeg", "FFMPEG", "install ffmpeg or set FFMPEG=/path/to/ffmpeg")):
        result = subprocess.run([make, "--no-print-directory", "-C", str(REPO), target, f"{variable}={tmp_path}/absent"],
                                capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr  # a warning; the tests skip
        (line,) = result.stderr.splitlines()
        assert line.startswith("atlas: warning: ") and hint in line and "apt-get" not in line and "sudo" not in line, line


def test_make_test_set_up_is_done_once():
    """After `make test` (or `make setup`) has set up, a second run redoes nothing: only the report, lint and the tests are left."""
    if not (REPO / ".venv" / ".atlas-stamps" / "test").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("under CI the suite runs from `make test`, which must have left its set-up stamps")
        pytest.skip("the set-up of `make test` has not run in this checkout (run make setup)")
    if _make("-q", "setup").returncode != 0:  # -q: exit 0 only when every set-up target is up to date
        reason = "the set-up of `make test` is out of date (pyproject.toml or constraints/ci.txt changed since)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + ", right after `make test` set it up")
        pytest.skip(reason + ": run make setup")
    planned = _make("-n", "test").stdout
    assert "pip install" not in planned and "venv" not in planned.replace(".venv/bin/", ""), planned
    assert ".venv/bin/ruff check ." in planned and ".venv/bin/python -m pytest -q" in planned, planned
    report = _make("-s", "env-report")
    assert report.returncode == 0, report.stderr
    assert re.fullmatch(r"== environment: .+, \d+ CPUs; native bfloat16: .+; torch \d+\.\d+\S* \(\S+ kernels, \d+ threads\); "
                        r"Python 3\.\d+\.\d+\n", report.stdout), report.stdout


# ------------------------------------------------------------------------------- a stranger's first hour, end to end
@pytest.fixture(scope="module")
def caffe_zoo(tmp_path_factory):
    """A local HTTP server standing in for the Caffe model zoo: bvlc_googlenet.caffemodel written from the shared
    tensors (Caffe's V2 layout), its sha1, and the served paths."""
    require_shared()
    from safetensors.numpy import load_file
    from test_fetch_weights import write_caffemodel

    folder = tmp_path_factory.mktemp("zoo")
    model = write_caffemodel(folder / "bvlc_googlenet.caffemodel", load_file(str(WEIGHTS)), v1=False)
    with http_folder(folder) as (url, served):
        yield {"url": f"{url}/{model.name}", "sha1": hashlib.sha1(model.read_bytes()).hexdigest(), "served": served}


def _stranger_env(tmp: Path, zoo: dict) -> dict:
    """A user with no weights anywhere: no ATLAS_WEIGHTS, an empty cache, the documented override naming the local
    server (the canonical URL's stand-in) and the file's sha1."""
    env = _venv_env(tmp)
    env.pop("ATLAS_WEIGHTS", None)
    env.pop("ATLAS_WEIGHTS_SHA256", None)
    env.update({"XDG_CACHE_HOME": str(tmp / "xdg"), "ATLAS_WEIGHTS_URL": zoo["url"], "ATLAS_WEIGHTS_SHA1": zoo["sha1"]})
    return env


def _photo_folder(dest: Path, n: int = 8) -> Path:
    from conftest import PHOTOS

    dest.mkdir(parents=True)
    for name in sorted(p.name for p in PHOTOS.glob("*.JPEG"))[::100][:n]:
        shutil.copyfile(PHOTOS / name, dest / name)
    return dest


def _tiny_config(dest: Path) -> Path:
    """tests/tiny_run.py's build (8 photos x 4 positions, t-SNE, a 4x4 grid, 16 px draft icons) with no weights line."""
    from tiny_run import CONFIG

    dest.write_text("\n".join(line for line in CONFIG.splitlines() if not line.startswith("weights")))
    return dest




def test_wheel_fetches_the_weights_builds_an_atlas_and_shows_it(installed, caffe_zoo, tmp_path, browser):
    """The wheel in a fresh venv, no npm: `atlas fetch-weights` from the (local stand-in of the) model zoo, sha1 checked
    and converted to the shared tensors; `atlas build` with no --weights; the viewer loads its tiles in Chromium."""
    _require_chromium()
    from safetensors.numpy import load_file

    atlas = installed / "bin" / "atlas"
    env = _stranger_env(tmp_path, caffe_zoo)
    fetched = subprocess.run([str(atlas), "fetch-weights"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert fetched.returncode == 0, fetched.stderr
    cached = tmp_path / "xdg" / "atlas" / "bvlc_googlenet.safetensors"
    assert caffe_zoo["served"] == ["/bvlc_googlenet.caffemodel"] and str(cached) in fetched.stdout
    want, got = load_file(str(WEIGHTS)), load_file(str(cached))
    assert sorted(got) == sorted(want) and all((got[k] == want[k]).all() and got[k].dtype == want[k].dtype for k in want)

    photos, run = _photo_folder(tmp_path / "photos"), tmp_path / "run"
    built = subprocess.run([str(atlas), "build", "--config", str(_tiny_config(tmp_path / "tiny.toml")), "--images", str(photos),
                            "--out", str(run)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert caffe_zoo["served"] == ["/bvlc_googlenet.caffemodel"]  # the cached weights, not a second download
    with _atlas_serve(atlas, run, env, tmp_path) as url:
        _viewer_loads_tiles(browser, url)


def test_make_demo_in_a_fresh_clone_with_photos_and_no_shared_folder(caffe_zoo, tmp_path):
    """The README's command from a clone, `make demo IMAGES=DIR`, in a copy of the checkout with no ../shared beside
    it: the make steps install the package into a new venv (the packages it needs are this environment's, seen through
    a .pth file, and pip stays offline), the weights come from the local stand-in of the model zoo through the
    documented override, and the build ends with the viewer's line."""
    clone = _copy_checkout(tmp_path / "clone")
    assert not (clone.parent / "shared").exists()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_atlas_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = _stranger_env(tmp_path, caffe_zoo) | {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}
    # the system's tools (make, the shell's) without npm or node: a folder of links to every other program of PATH
    tools = tmp_path / "bin"
    tools.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if folder and Path(folder).is_dir() and not folder.startswith(str(REPO)):
            for program in Path(folder).iterdir():
                if program.name not in ("npm", "npx", "node", "nodejs") and not (tools / program.name).exists():
                    (tools / program.name).symlink_to(program)
    env["PATH"] = str(tools)
    assert shutil.which("make", path=env["PATH"]) and not shutil.which("npm", path=env["PATH"])
    photos, run = _photo_folder(tmp_path / "photos"), tmp_path / "run"
    result = subprocess.run(["make", "demo", f"IMAGES={photos}", f"VENV={venv}", f"CONFIG={_tiny_config(tmp_path / 'tiny.toml')}",
                             f"OUT={run}"], cwd=clone, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"atlas serve {run}" in result.stdout and "http://127.0.0.1:8000/tiles/index.html" in result.stdout
    atlas_file = subprocess.run([str(venv / "bin" / "python"), "-c", "import atlas; print(atlas.__file__)"], capture_output=True,
                                text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert Path(atlas_file).is_relative_to(clone)  # the clone's package, installed by make
    assert caffe_zoo["served"][-1] == "/bvlc_googlenet.caffemodel"
    assert (tmp_path / "xdg" / "atlas" / "bvlc_googlenet.safetensors").is_file()
    assert (run / "tiles" / "index.html").is_file()
