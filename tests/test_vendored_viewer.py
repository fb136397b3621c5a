"""The OpenSeadragon release vendored in the package: the exact file, its licence, its images, and that atlas uses it.

The viewer's pages load ``openseadragon/openseadragon.min.js`` and its button images from ``prefixUrl``
``openseadragon/images/``; atlas ships both in ``atlas/viewer_static/openseadragon`` (no npm at install or
run time). A changed or truncated file fails the checksum here; a new release is a deliberate update of the
files, ``atlas.viewer.OSD_VERSION``, the folder's README and the constant below together.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

import pytest

import atlas.viewer as viewer

REPO = Path(__file__).resolve().parents[1]
VENDORED = REPO / "atlas" / "viewer_static" / "openseadragon"
# sha256 of openseadragon.min.js of the openseadragon@5.0.1 npm package (build/openseadragon/), as released
OPENSEADRAGON_SHA256 = "cd6e48562264cc518224380d745a620bcf7828235c232d94964e3c9d9e7bdb63"


def test_vendored_openseadragon_is_the_pinned_release_byte_for_byte():
    script = (VENDORED / "openseadragon.min.js").read_bytes()
    assert hashlib.sha256(script).hexdigest() == OPENSEADRAGON_SHA256
    # the version the file says it is, and the one atlas and the folder's README name
    assert script.startswith(f"//! openseadragon {viewer.OSD_VERSION}\n".encode())
    assert f'versionStr:"{viewer.OSD_VERSION}"'.encode() in script
    readme = (VENDORED / "README.md").read_text()
    assert f"OpenSeadragon {viewer.OSD_VERSION}" in readme and OPENSEADRAGON_SHA256 in readme


def test_vendored_openseadragon_carries_its_bsd_licence():
    licence = (VENDORED / "LICENSE.txt").read_text()
    assert "OpenSeadragon contributors" in licence
    assert "Redistribution and use in source and binary forms, with or without" in licence  # BSD 3-Clause
    assert "Neither the name of CodePlex Foundation nor the names of its" in licence


def test_every_button_image_openseadragon_asks_for_is_vendored():
    script = (VENDORED / "openseadragon.min.js").read_text()
    asked = set(re.findall(r'"([a-z]+_(?:rest|grouphover|hover|pressed)\.png)"', script))
    assert len(asked) >= 36, sorted(asked)  # 9 buttons x 4 states in 5.0.1 (zoom in/out, home, full page, rotate, flip, ...)
    images = {p.name for p in (VENDORED / "images").iterdir()}
    assert asked <= images, sorted(asked - images)
    for name in images:
        assert (VENDORED / "images" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_every_vendored_file_is_package_data():
    """pyproject's package-data globs take every vendored file into the wheel and a non-editable install."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["atlas"]
    package = REPO / "atlas"
    taken = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}  # setuptools globs them the same way
    files = {p for p in VENDORED.rglob("*") if p.is_file()}
    assert len(files) >= 40 and sorted(p.relative_to(package).as_posix() for p in files - taken) == []


def test_the_packages_own_copy_is_used_unless_atlas_openseadragon_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("ATLAS_OPENSEADRAGON", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing in the working folder matters
    assert viewer.find_openseadragon() == viewer.STATIC / "openseadragon" == VENDORED
    monkeypatch.setenv("ATLAS_OPENSEADRAGON", str(tmp_path))  # an override is authoritative: no fallback to the package's
    with pytest.raises(viewer.AtlasError, match="holds no openseadragon.min.js"):
        viewer.find_openseadragon()
