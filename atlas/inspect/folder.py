"""The report folder: PNG and JSON writing, file names relative to the report, no path of this machine in a report
that is served, the whole folder swapped in at the end, and the run's list of reports.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np


def _galleries(run_dir: Path) -> set[str]:
    """Layers with a unit gallery in the run's viewer."""
    try:
        listing = json.loads((run_dir / "tiles" / "units.json").read_text())
    except (OSError, json.JSONDecodeError):
        return set()
    return {x.get("layer") for x in listing.get("layers", []) if isinstance(x, dict)}


def _list_report(run_dir: Path, summary: dict) -> None:
    """Add the report to ``RUN/tiles/inspect.json`` (what the viewer's inspect overlay lists)."""
    from atlas.viewer import update_listing

    tiles = run_dir / "tiles"
    entry = {"name": summary["name"], "layer": summary["layer"], "atlas": summary["atlas"],
             "images": [i["name"] for i in summary["images"]], "index": f"inspect/{summary['name']}/index.html"}
    update_listing(tiles / "inspect.json", "reports", entry, lambda x: x.get("name") == entry["name"],
                   lambda x: (tiles / "inspect" / str(x.get("name")) / "index.html").is_file(), lambda x: x.get("name", ""))


def _without_paths(summary: dict, run_dir: Path, photos: list[str], files: list) -> dict:
    """``summary`` with every path of this machine replaced by a bare file name: the photos', the weights' and the
    boxes file's (anywhere in a string, error lines included), and the run folder's (by its name)."""
    names: dict[str, str] = {}
    for path in [*photos, *(f for f in files if f)]:
        text = os.fspath(path)
        for form in (text, os.path.abspath(text), os.path.realpath(text)):
            names[form] = Path(text).name
    for form in (str(run_dir), os.path.abspath(run_dir), os.path.realpath(run_dir)):
        names[form] = Path(os.path.abspath(run_dir)).name
    order = sorted((k for k in names if k), key=len, reverse=True)  # a photo inside the run before the run itself

    def clean(value):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            for form in order:
                value = value.replace(form, names[form])
            return value
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(summary)


def _prefixed(written: dict, sub: str) -> dict:
    """A part writer's file names made relative to the report folder (they wrote into its image sub-folder)."""
    return {k: (f"{sub}/{v}" if k in ("figure", "json", "strip", "points") and isinstance(v, str) else v) for k, v in written.items()}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text)


def _save_png(picture: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(picture)).save(path, optimize=False)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _fresh(folder: Path) -> None:
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _publish(work: Path, target: Path) -> None:
    """Swap the finished report in whole: a killed report never leaves a half-written folder under its name."""
    from atlas.viewer import swap_folder

    swap_folder(work, target)
