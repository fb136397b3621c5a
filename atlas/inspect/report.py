"""The inspection report's page: one static ``index.html`` over the figures and JSON the parts wrote.

Nothing here computes: :func:`write_page` turns the summary :func:`atlas.inspect.inspect` assembled (the content
of ``report.json``) into HTML with relative links only, so the folder can be opened from disk, copied elsewhere or
served by ``atlas serve`` (where it also links into the run's atlas viewer and unit gallery).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #111318; color: #e6e6e6; }
header, section { padding: 12px 24px; }
header { border-bottom: 1px solid #2a2d35; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 18px 0 8px; } h3 { font-size: 15px; margin: 14px 0 6px; }
a { color: #7fb5ff; } .muted { color: #9aa0aa; } .bad { color: #ff8a7a; }
table { border-collapse: collapse; margin: 6px 0; } td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
th { color: #9aa0aa; font-weight: normal; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.image { border-top: 1px solid #2a2d35; }
.row { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
img.photo { width: 224px; height: 224px; image-rendering: auto; }
img.fig { max-width: 100%; background: #fff; }
.layers { display: flex; gap: 14px; flex-wrap: wrap; }
.layers figure { margin: 0; } .layers img { image-rendering: pixelated; max-width: 480px; }
figcaption { color: #9aa0aa; font-size: 12px; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _href(path: str) -> str:
    """A relative link to a file the report wrote (each path segment URL-quoted)."""
    from urllib.parse import quote

    return "/".join(quote(part) for part in str(path).split("/"))


def _top_table(top: list[dict], target: int | None) -> str:
    rows = "".join(f"<tr><td>{'&#9654;' if t['index'] == target else ''}</td><td>{_e(t['name'])}</td>"
                   f"<td class='num'>{t['index']}</td><td class='num'>{t['probability']:.4f}</td></tr>" for t in top)
    return f"<table><tr><th></th><th>class</th><th>index</th><th>probability</th></tr>{rows}</table>"


def _layers(entry: dict) -> str:
    figures = []
    for view in entry["layers"]:
        c, h, w = view["shape"]
        card = f" &middot; <a href='{_href(view['unit_card'])}'>unit card</a>" if view.get("unit_card") else ""
        figures.append(f"<figure><img src='{_href(view['figure'])}' alt='{_e(view['layer'])} channels' "
                       f"width='{2 * _width(view['layout'])}'><figcaption>{_e(view['layer'])}: {c} channels of {h}x{w}; "
                       f"strongest {view['strongest']} (max {view['value']:.3g}, outlined){card}</figcaption></figure>")
    return "<div class='layers'>" + "".join(figures) + "</div>"


def _width(layout: dict) -> int:
    return layout["columns"] * (layout["tile"] + layout["pad"]) + layout["pad"]


def _part(title: str, part: dict | None, lines: list[str]) -> str:
    if not part:
        return ""
    body = f"<img class='fig' src='{_href(part['figure'])}' alt='{_e(title)}'>" if part.get("figure") else ""
    if part.get("strip"):
        body += f"<div><img class='fig' src='{_href(part['strip'])}' alt='{_e(title)}: cells'></div>"
    facts = "".join(f"<div class='muted'>{line}</div>" for line in lines if line)
    numbers = f" <a href='{_href(part['json'])}'>numbers (JSON)</a>" if part.get("json") else ""
    return f"<h3>{_e(title)}</h3>{facts}{body}<div>{numbers}</div>"


def _occlusion_lines(occ: dict, classes: dict[int, str]) -> list[str]:
    lines = []
    if "channel" in occ:
        lines.append(f"strongest feature map: channel {occ['channel']} of {_e(occ.get('layer', ''))}")
    if "target" in occ:
        p, low = occ.get("probability"), occ.get("min_probability")
        lines.append(f"class: {_e(classes.get(occ['target'], occ['target']))}"
                     + (f", unoccluded probability {p:.4f}" if isinstance(p, float) else "")
                     + (f", lowest under the occluder {low:.4f}" if isinstance(low, float) else ""))
    return lines


def _atlas_lines(placed: dict, viewer: str | None) -> list[str]:
    lines = []
    if viewer:
        lines.append(f"<a href='{_href(viewer)}'>open in the atlas viewer</a> (the image's positions drawn over the atlas)")
    for key in ("method", "note"):
        if placed.get(key):
            lines.append(_e(placed[key]))
    return lines


def _correspondence(table: dict | None) -> str:
    if not table:
        return ""
    body = table.get("html") or ""
    numbers = f" <a href='{_href(table['json'])}'>numbers (JSON)</a>" if table.get("json") else ""
    return (f"<section><h2>Correspondence analysis</h2><div class='muted'>Sum over image pairs of the Hamming distance "
            f"between the signs of the feature-vector changes when the part is occluded (lower: more consistent), against "
            f"random parts of the same size (Zeiler &amp; Fergus, Sec. 5.1).</div>{body}<div>{numbers}</div></section>")


def write_page(summary: dict, folder: str | os.PathLike) -> Path:
    """Write ``folder/index.html`` for the report ``summary``; returns its path."""
    folder = Path(folder)
    classes: dict[int, str] = {}
    for entry in summary["images"]:
        for t in entry["top"]:
            classes[t["index"]] = t["name"]
        if entry.get("label"):
            classes[entry["label"]["index"]] = entry["label"]["name"]
    parts = [f"<header><h1>atlas inspect: {_e(summary['name'])}</h1><div class='muted'>model {_e(summary['model'])}"
             + (f", run {_e(summary['run'])}" if summary.get("run") else "")
             + f"; atlas layer {_e(summary['layer'])}; {len(summary['images'])} image(s) in {summary.get('seconds', 0):.1f} s"
             + " &middot; <a href='report.json'>all numbers (JSON)</a></div>"]
    for bad in summary.get("skipped", []):
        parts.append(f"<div class='bad'>skipped {_e(bad['error'])}</div>")
    parts.append("</header>")
    for entry in summary["images"]:
        label = entry.get("label")
        truth = (f"true class: {_e(label['name'])} ({label['index']}, from {_e(label['source'])})" if label
                 else "no true class given: the top-1 class stands in for it")
        parts.append(f"<section class='image' id='{_e(entry['folder'])}'><h2>{_e(entry['name'])}</h2>"
                     f"<div class='row'><img class='photo' src='{_href(entry['picture'])}' alt='the photo as the model sees it'>"
                     f"<div><div class='muted'>{truth}</div>{_top_table(entry['top'], entry['target'])}</div></div>"
                     f"<h3>Layer views</h3><div class='muted'>Every channel's activation map, one brightness scale per layer "
                     f"(black 0, white the layer's maximum); the strongest channel outlined.</div>{_layers(entry)}")
        if entry.get("occlusion"):
            parts.append(_part("Occlusion sensitivity", entry["occlusion"], _occlusion_lines(entry["occlusion"], classes)))
        if entry.get("atlas"):
            viewer = entry["atlas"].get("viewer") if summary.get("run") else None
            parts.append(_part("The image on the atlas", entry["atlas"], _atlas_lines(entry["atlas"], viewer)))
        parts.append("</section>")
    if summary.get("invariance"):
        parts.append("<section>" + _part("Invariance (Zeiler & Fergus, Fig. 5)", summary["invariance"],
                                         [_e(summary["invariance"].get("note", ""))]) + "</section>")
    parts.append(_correspondence(summary.get("correspondence")))
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>atlas inspect: {_e(summary['name'])}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
