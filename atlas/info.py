"""`atlas info`: what a run folder holds, as a stable JSON-able dict.

Schema (version 1)::

    {"schema": 1, "run_dir": str, "model": str, "weights": str, "weights_sha256": str,
     "seed": int, "per_image": int, "n_images": int, "n_skipped": int, "complete": bool,
     "layers": {layer: {"channels": int, "grid_hw": [h, w], "samples": int, "attribution": bool,
                        "atlases": {atlas: {"layout": {...summary}, "grids": {size: {...summary}},
                                            "icons": {size: {...summary}}}}}},
     "tiles": [...the "atlases" entries of tiles/atlases.json],
     "labels": {...label_agreement} or None,
     "units": {layer: {"channels": int, "top_done": int, "projections": {method: int}, "vis": {kind: int},
                       "classes": bool, "effects": int}},
     "instruments": {folder of tiles/: [names]}}

Stages add to it by storing a ``summary`` dict in the attrs of the node they write.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from atlas import store

# Labels that agree with the model's top-5 less often than this (and with at least MIN_LABELLED labelled photos) are
# doubted in one line: InceptionV1 gets about 89% top-5 on ImageNet's validation photos, so even a hard or out-of-domain
# set lands far above it, while a list in another class order lands near chance (0.5%).
LOW_TOP5 = 0.25
MIN_LABELLED = 10


def _summary(node) -> dict:
    return dict(store.attrs(node).get("summary", {}))


def label_agreement(root) -> dict | None:
    """How often the images' labels agree with the model's own predictions, from ``images/label`` and ``images/top5``.

    Parameters
    ----------
    root : zarr.Group
        An opened run store.

    Returns
    -------
    dict or None
        ``{"labelled": n, "top1": fraction, "top5": fraction, "shifted": {"+1": fraction, "-1": fraction},
        "warning": str or None}`` over the readable, labelled images the model classified (``shifted`` is the top-1
        agreement of label+1 and label-1); None when no image has both a label and a prediction (no labels, a run
        sampled without attribution, or nothing sampled yet).
    """
    if "images/label" not in root or "images/top5" not in root:
        return None
    labels = root["images/label"][:].astype(np.int64)
    top5 = root["images/top5"][:].astype(np.int64)
    keep = (labels >= 0) & (top5[:, 0] >= 0)
    if "images/ok" in root:
        keep &= root["images/ok"][:].astype(bool)
    if not keep.any():
        return None
    labels, top5 = labels[keep], top5[keep]
    out = {"labelled": int(keep.sum()), "top1": float((top5[:, 0] == labels).mean()),
           "top5": float((top5 == labels[:, None]).any(1).mean()),
           "shifted": {"+1": float((top5[:, 0] == labels + 1).mean()), "-1": float((top5[:, 0] == labels - 1).mean())}}
    out["warning"] = _agreement_warning(out)
    return out


def _agreement_warning(a: dict) -> str | None:
    """One line when the labels look wrong for the model, with the likely cause; None when they look right."""
    if a["labelled"] < MIN_LABELLED or a["top5"] >= LOW_TOP5:
        return None
    shift, best = max(a["shifted"].items(), key=lambda kv: kv[1])
    head = f"the labels agree with the model's top-5 on only {a['top5']:.1%} of {a['labelled']} photos (expected far more)"
    if best >= max(2 * a["top1"], LOW_TOP5):
        # a list of the 1001-class convention (0 = background) labels every class one higher than the model's index
        hint = "the 1001-class convention with a background class 0" if shift == "-1" else "a list counting classes from 1"
        return f"{head}: labels look shifted by one (label{shift} matches top-1 on {best:.1%}; {hint}?)"
    return f"{head}: the list's labels may follow another class order or belong to other photos"


def format_agreement(a: dict | None) -> str:
    """The one-line report of :func:`label_agreement` (empty when there is nothing to report)."""
    if a is None:
        return ""
    line = f"labels vs the model: top-1 {a['top1']:.1%}, top-5 {a['top5']:.1%} of {a['labelled']} labelled photos"
    return line + (f"\nwarning: {a['warning']}" if a["warning"] else "")


def _units(root) -> dict:
    """What the unit lens holds per layer (counts of channels done per part)."""
    out = {}
    for layer in sorted(root["units"].group_keys()) if "units" in root else []:
        g = root[f"units/{layer}"]
        entry = {"channels": int(g["top/done"].shape[0]) if "top/done" in g else 0,
                 "top_done": int(g["top/done"][:].sum()) if "top/done" in g else 0, "projections": {}, "vis": {},
                 "classes": "classes" in g,
                 "effects": int(g["effects/done"][:].sum()) if "effects/done" in g else 0}
        for kind, key in (("projection", "projections"), ("vis", "vis")):
            for method in sorted(g[kind].group_keys()) if kind in g else []:
                node = g[f"{kind}/{method}"]
                entry[key][method] = int(node["done"][:].sum()) if "done" in node else 0
        out[layer] = entry
    return out


def _instruments(run_dir: Path, layers) -> dict[str, list[str]]:
    """Folders of ``tiles/`` other than the atlases' own: the reports and pages of the other instruments, by name."""
    tiles = run_dir / "tiles"
    if not tiles.is_dir():
        return {}
    skip = set(layers) | {"openseadragon"}
    out = {}
    for folder in sorted(p for p in tiles.iterdir() if p.is_dir() and p.name not in skip):
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if names or any(folder.iterdir()):
            out[folder.name] = names
    return out


def info(run_dir: str | Path) -> dict:
    """Everything ``atlas info`` reports, read from the store (nothing is computed, nothing is written).

    Parameters
    ----------
    run_dir : str or Path
        A run folder (one holding ``store.zarr``), complete or not: a run interrupted in any stage reports what it
        has (``complete`` says whether sampling finished).

    Returns
    -------
    dict
        JSON-able, schema 1 (the module docstring): the run's model, weights and their sha256, sampling seed and
        ``per_image``, ``n_images``, ``n_skipped`` (unreadable images in finished shards) and ``complete``;
        ``damaged`` (sealed array -> what is wrong with its chunk files and how to recover; a damaged sampled array
        makes ``complete`` false); per sampled layer its channels, ``grid_hw`` (positions), valid ``samples``,
        whether it has attributions and a
        whitening matrix, and per atlas the ``summary`` each stage stored with its layout, grids and icons (by grid
        size, as strings); ``tiles``, the entries of ``tiles/atlases.json`` (empty before the tiles stage).
        :func:`format_info` turns it into the short text of ``atlas info``.

    Raises
    ------
    AtlasError
        If ``run_dir`` holds no store, or a metadata file in it is unreadable (one line naming it).
    """
    run_dir = Path(run_dir)
    root = store.open_store(run_dir)
    store.check_metadata(root)  # a garbage zarr.json anywhere is one line, not a traceback halfway through
    meta = store.attrs(root)
    ok = root["images/ok"][:] if "images/ok" in root else None
    flags = root["images/shard_done"][:] if "images/shard_done" in root else None
    out = {
        "schema": 1, "run_dir": str(run_dir), "model": meta.get("model"), "weights": meta.get("weights"),
        "weights_sha256": meta.get("weights_sha256"), "seed": meta.get("seed"), "per_image": meta.get("per_image"),
        "n_images": meta.get("n_images", 0),
        "n_skipped": int((~ok[flags.repeat(meta.get("shard_size", 256))[: ok.size]]).sum()) if ok is not None and flags is not None else 0,
        "complete": bool(flags.all()) if flags is not None else False,
        "layers": {},
        # sealed arrays whose chunk files no longer match (a stat per chunk, as the stages check before reading)
        "damaged": store.seal_problems(root),
    }
    if any(rel.split("/")[0] in ("images", "samples") for rel in out["damaged"]):
        out["complete"] = False  # sampling must redo the damaged shards before anything reads them
    for layer in sorted(root["samples"].group_keys()) if "samples" in root else []:
        g = root[f"samples/{layer}"]
        entry = {"channels": g.attrs.get("channels"), "grid_hw": g.attrs.get("grid_hw"), "samples": int(g["valid"][:].sum()),
                 "attribution": "attributions" in g, "whitening": f"whitening/{layer}/matrix" in root, "atlases": {}}
        for kind in ("layouts", "grids", "icons"):
            if f"{kind}/{layer}" not in root:
                continue
            for name in sorted(root[f"{kind}/{layer}"].group_keys()):
                atlas_entry = entry["atlases"].setdefault(name, {})
                node = root[f"{kind}/{layer}/{name}"]
                if kind == "layouts":
                    atlas_entry["layout"] = _summary(node)
                else:
                    sizes = sorted(node.group_keys(), key=int)
                    atlas_entry[kind] = {size: _summary(node[size]) for size in sizes}
                    if kind == "icons":
                        for size in sizes:  # a grid still rendering has no summary yet: its counts from the flags
                            _icon_counts(root, layer, name, size, atlas_entry[kind][size], node[size])
        out["layers"][layer] = entry
    manifest = run_dir / "tiles" / "atlases.json"
    out["tiles"] = json.loads(manifest.read_text()).get("atlases", []) if manifest.exists() else []
    out["labels"] = label_agreement(root)
    out["units"] = _units(root)
    out["instruments"] = _instruments(run_dir, {e.get("layer") for e in out["tiles"]} | set(out["layers"]) | {"units"})
    return out


def _icon_counts(root, layer: str, atlas: str, size: str, summary: dict, node) -> None:
    if "done" in node:
        summary["n_done"] = int(node["done"][...].sum())
    grid = f"grids/{layer}/{atlas}/{size}/render"
    if "n_render" not in summary and grid in root:
        summary["n_render"] = int(root[grid][...].sum())


def format_info(data: dict) -> str:
    """A short human-readable version of :func:`info`."""
    lines = [f"run {data['run_dir']}: model {data['model']} ({Path(data['weights'] or '').name}), seed {data['seed']}",
             f"images {data['n_images']} ({data['n_skipped']} skipped){'' if data['complete'] else ', sampling incomplete'}"]
    for rel, problem in data.get("damaged", {}).items():
        lines.append(f"  damaged: {rel}: {problem}")
    for layer, entry in data["layers"].items():
        c, hw = entry["channels"], entry["grid_hw"]
        lines.append(f"  {layer}: {entry['samples']} samples x {c} channels ({hw[0]}x{hw[1]} positions), "
                     f"attribution {'yes' if entry['attribution'] else 'no'}, whitening {'yes' if entry['whitening'] else 'no'}")
        for name, atlas_entry in entry["atlases"].items():
            layout = atlas_entry.get("layout", {})
            if layout:
                quality = ", ".join(f"{k} {v:.3f}" for k, v in layout.get("quality", {}).items())
                lines.append(f"    atlas {name}: layout {layout.get('method', '?')} of {layout.get('n', '?')} points"
                             + (f" ({quality})" if quality else ""))
            for size, s in atlas_entry.get("grids", {}).items():
                lines.append(f"      grid {size}: {s.get('n_cells', '?')} non-empty cells, {s.get('n_render', '?')} to render")
            for size, s in atlas_entry.get("icons", {}).items():
                cosine, white = s.get("mean_cosine"), s.get("mean_cosine_whitened")
                # whitened: cos(h, S v), what the optimiser aligns; raw: cos(h, v) to the cell mean (older runs: n/a)
                lines.append(f"      icons {size}: {s.get('n_done', '?')} of {s.get('n_render', '?')} done"
                             + (f", mean whitened cos(h, S v) {white:.3f}" if white is not None else
                                ", mean whitened cos(h, S v) n/a" if cosine is not None else "")
                             + (f", mean raw cos(h, v) {cosine:.3f}" if cosine is not None else ""))
    for entry in data["tiles"]:
        lines.append(f"  tiles: {entry.get('layer')}/{entry.get('atlas')} -> {entry.get('dzi')}")
    for layer, u in data.get("units", {}).items():
        parts = [f"top-k examples {u['top_done']} of {u['channels']} channels"]
        parts += [f"{m} projections {n}" for m, n in u["projections"].items()]
        parts += [f"{k} visualisations {n}" for k, n in u["vis"].items()]
        parts += [f"direct class effects {u['effects']}"] if u.get("effects") else []
        lines.append(f"  unit lens {layer}: {', '.join(parts)}" + (", class scores" if u["classes"] else ""))
    for folder, names in data.get("instruments", {}).items():
        lines.append(f"  {folder}: " + (f"{len(names)} ({', '.join(names)})" if names else "present")
                     + f" -> tiles/{folder}/")
    if data.get("labels"):
        lines.append("  " + format_agreement(data["labels"]).replace("\n", "\n  "))
    return "\n".join(lines)
