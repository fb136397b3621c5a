"""Build hook: the wheel carries the pinned OpenSeadragon build, fetched from npm at build time.

OpenSeadragon is never committed to git. When a wheel is built (``pip wheel .``,
``pip install .``, ``python -m build``), ``build_py`` copies
``node_modules/openseadragon/build/openseadragon`` (``openseadragon.min.js`` and ``images/``)
into ``atlas/viewer_static/openseadragon/`` of the built package, running ``npm ci`` first
when ``node_modules`` does not hold the version pinned in ``package-lock.json``. So a user who
installs the wheel needs no npm. ``ATLAS_OPENSEADRAGON`` (a folder holding
``openseadragon.min.js``) replaces npm. Editable installs copy nothing: they use the
checkout's ``node_modules`` (see ``atlas.viewer.find_openseadragon``).

Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PACKAGE = "node_modules/openseadragon"


def pinned_version() -> str:
    """The OpenSeadragon version of package-lock.json (the one `npm ci` installs)."""
    lock = HERE / "package-lock.json"
    if not lock.is_file():
        raise SystemExit(f"error: building atlas needs {lock} (it pins OpenSeadragon for the viewer)")
    return json.loads(lock.read_text())["packages"][PACKAGE]["version"]


def openseadragon_build() -> Path:
    """The folder holding openseadragon.min.js and images/, installing it with `npm ci` when needed."""
    env = os.environ.get("ATLAS_OPENSEADRAGON")
    if env:
        folder = Path(env).expanduser()
        if not (folder / "openseadragon.min.js").is_file():
            raise SystemExit(f"error: ATLAS_OPENSEADRAGON={env} holds no openseadragon.min.js")
        return folder
    version = pinned_version()
    installed = HERE / PACKAGE / "package.json"
    if not installed.is_file() or json.loads(installed.read_text()).get("version") != version:
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit(f"error: building the atlas wheel needs npm to fetch OpenSeadragon {version} (pinned in package-lock.json) "
                             "for the viewer: install Node.js/npm, or run `npm ci` here first, or set ATLAS_OPENSEADRAGON to a folder "
                             "holding openseadragon.min.js")
        print(f"atlas build: npm ci (OpenSeadragon {version} for the viewer)", flush=True)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True)
    folder = HERE / PACKAGE / "build" / "openseadragon"
    if not (folder / "openseadragon.min.js").is_file():
        raise SystemExit(f"error: {folder} holds no openseadragon.min.js after `npm ci`")
    return folder


class BuildPyWithViewer(build_py):
    """build_py that also puts OpenSeadragon into the built package (not into the source tree)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads node_modules of the checkout
        source = openseadragon_build()
        target = Path(self.build_lib) / "atlas" / "viewer_static" / "openseadragon"
        if target.exists():
            shutil.rmtree(target)
        (target / "images").mkdir(parents=True)
        shutil.copyfile(source / "openseadragon.min.js", target / "openseadragon.min.js")
        licence = source.parents[1] / "LICENSE.txt"  # BSD-3-Clause: a redistributed build carries its notice
        if licence.is_file():
            shutil.copyfile(licence, target / "LICENSE.txt")
        for image in sorted((source / "images").glob("*")) if (source / "images").is_dir() else []:
            if image.is_file():
                shutil.copyfile(image, target / "images" / image.name)


setup(cmdclass={"build_py": BuildPyWithViewer})
