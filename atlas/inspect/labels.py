"""An image's true class for the report: ``--label``, the run's own label of that file, or an ImageNet-style file
name (``n01440764_tench.JPEG``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from atlas.errors import AtlasError
from atlas.settings import InspectSettings

SYNSET_NAME = re.compile(r"^(n\d{8})[_.\-]")


def _run_labels(root) -> dict[str, int]:
    """The run's labels by the real path of each image it listed."""
    from atlas.data import real_path

    if "images" not in root or "label" not in root["images"]:
        return {}
    paths, labels = root["images"]["path"][:], root["images"]["label"][:]
    out = {}
    for p, lab in zip(paths, labels, strict=True):
        if int(lab) >= 0:
            out[os.path.realpath(real_path(str(p)))] = int(lab)
    return out


def _label_of(path: str, settings: InspectSettings, net, run_labels: dict[str, int]) -> tuple[int | None, str]:
    """The true class of one image and where it came from: --label, the run's own label, or an ImageNet-style file
    name (``n01440764_tench.JPEG``); None when there is none (the parts then use the top-1 class)."""
    from atlas.classnames import resolve_class

    if settings.label is not None:
        return resolve_class(settings.label, net.classes).index, "--label"
    real = os.path.realpath(path)
    if real in run_labels:
        return run_labels[real], "the run's label"
    m = SYNSET_NAME.match(Path(path).name)
    if m:
        try:
            return resolve_class(m.group(1), net.classes).index, "the file name's synset"
        except AtlasError:
            pass
    return None, "none (the top-1 class is used)"
