"""`atlas info`: what a run folder holds, as a stable JSON-able dict.

Schema (version 1)::

    {"schema": 1, "run_dir": str, "model": str, "weights": str, "weights_sha256": str,
     "seed": int, "per_image": int, "n_images": int, "n_skipped": int, "complete": bool,
     "layers": {layer: {"channels": int, "grid_hw": [h, w], "samples": int, "attribution": bool,
                        "atlases": {atlas: {"layout": {...summary}, "grids": {size: {...summary}},
                                            "icons": {size: {...summary}}}}}},
     "tiles": [...the "atlases" entries of tiles/atlases.json]}

Stages add to it by storing a ``summary`` dict in the attrs of the node they write.
"""

from __future__ import annotations

import json
from pathlib import Path

from atlas import store


def _summary(node) -> dict:
    return dict(store.attrs(node).get("summary", {}))


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
        ``per_image``, ``n_images``, ``n_skipped`` (unreadable images in finished shards) and ``complete``; per
        sampled layer its channels, ``grid_hw`` (positions), valid ``samples``, whether it has attributions and a
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
    }
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
        out["layers"][layer] = entry
    manifest = run_dir / "tiles" / "atlases.json"
    out["tiles"] = json.loads(manifest.read_text()).get("atlases", []) if manifest.exists() else []
    return out


def format_info(data: dict) -> str:
    """A short human-readable version of :func:`info`."""
    lines = [f"run {data['run_dir']}: model {data['model']} ({Path(data['weights'] or '').name}), seed {data['seed']}",
             f"images {data['n_images']} ({data['n_skipped']} skipped){'' if data['complete'] else ', sampling incomplete'}"]
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
                cosine = s.get("mean_cosine")
                lines.append(f"      icons {size}: {s.get('n_done', '?')} of {s.get('n_render', '?')} done"
                             + (f", mean cos(h, v) {cosine:.3f}" if cosine is not None else ""))
    for entry in data["tiles"]:
        lines.append(f"  tiles: {entry.get('layer')}/{entry.get('atlas')} -> {entry.get('dzi')}")
    return "\n".join(lines)
