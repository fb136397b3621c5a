"""The README and the pages under docs/: every relative link leads somewhere, the README stays short and its Python
quickstart runs as written (on a few real photos, with small settings), and the user-facing pages speak to
researchers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at the first space (a title may follow) or ")"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())  # a link inside a code block is code, not a link
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def test_every_relative_link_points_at_a_file_and_every_anchor_at_a_heading():
    broken = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)} -> {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading with that anchor")
    assert broken == []


def test_the_readme_is_short_and_shows_an_atlas():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert "![" in text and "](docs/atlas.png)" in text
    for needed in ("pip install activation-atlas", "'activation-atlas[ray]'", "atlas build --config configs/cpu.toml",
                   "atlas serve RUN", "docs/performance.md", "CITATION.cff", "LICENSE", "Apache-2.0"):
        assert needed in text, needed


def test_user_pages_use_no_development_vocabulary():
    """The README and the pages written for users name no issue numbers, sessions, helpers or commits."""
    pattern = re.compile(r"\bissues? \d+|#\d{2,}\b|\bsessions?\b|\bhelpers?\b|\bat [0-9a-f]{7}\b", re.I)
    pages = [README, REPO / "docs" / "performance.md", REPO / "docs" / "guide.md"]
    found = [f"{p.name}:{i}: {m.group(0)}" for p in pages for i, line in enumerate(p.read_text().splitlines(), 1)
             for m in pattern.finditer(line)]
    assert found == []


def _quickstart() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert len(blocks) == 1, "the README has one Python block, the quickstart"
    return blocks[0]


def test_the_quickstart_is_under_ten_lines_of_the_public_face():
    code = _quickstart()
    assert len([ln for ln in code.splitlines() if ln.strip()]) < 10
    for call in ("atlas.build(", "atlas.open_run(", ".sheet(", ".show()"):
        assert call in code, call


class _Small(ast.NodeTransformer):
    """The quickstart with small settings: its photos folder becomes a list of 8 real photos, its run folder a
    temporary one, and its build a tiny one (32 samples, t-SNE, 16 px icons of 4 steps) on the grids it names."""

    def __init__(self, images: Path, run: Path) -> None:
        self.images, self.run = str(images), str(run)

    def visit_Call(self, node: ast.Call) -> ast.Call:  # noqa: N802 - the ast visitor's name
        self.generic_visit(node)
        name = ast.unparse(node.func)
        if name == "atlas.build":
            node.args = [ast.Constant(self.images), ast.Constant(self.run)]
            kept = {k.arg: k.value for k in node.keywords if k.arg == "grids"}
            small = ast.parse("dict(max_images=8, per_image=4, method='tsne', workers=0, batch_size=8, attribution=False,"
                              " min_count=1, render={'steps': 4, 'size': 16, 'quality': 'draft'}, tiles={'examples': False})",
                              mode="eval").body
            node.keywords = [*small.keywords, *(ast.keyword(arg=k, value=v) for k, v in kept.items())]
        elif name == "atlas.open_run":
            node.args = [ast.Constant(self.run)]
        return node


def test_the_quickstart_runs(tmp_path, photo_list):
    tree = _Small(photo_list, tmp_path / "runs" / "demo").visit(ast.parse(_quickstart()))
    script = ast.unparse(ast.fix_missing_locations(tree))
    # what the snippet leaves in `run`, checked in the same process; show() outside Jupyter returns the viewer's frame
    script += ("\nimport PIL.Image\nimg = PIL.Image.open('atlas.png')\nassert img.size[0] > 0\n"
               "assert run.layers == ['mixed4c'], run.layers\n"
               "frame = run.show()._repr_html_()\nassert '<iframe' in frame and '/tiles/index.html' in frame, frame\n"
               "run.stop()\nprint('ok', img.size)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    assert (tmp_path / "runs" / "demo" / "tiles" / "index.html").is_file()

