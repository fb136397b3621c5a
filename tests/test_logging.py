"""What the library reports goes through ``logging`` (or a caller's ``echo``), never ``print``; its progress bars are
``tqdm.auto`` (widgets in a notebook, text in a terminal). Read from the source, so a new module is held to it too."""

from __future__ import annotations

import ast
from pathlib import Path

ATLAS = Path(__file__).resolve().parents[1] / "atlas"

# The one print left outside the command line: ``atlas serve``'s first line, the URL to open, which the caller of a
# blocking server needs whatever logging handlers the application has set up.
PRINTS_ALLOWED = {("server.py", "serve")}


def modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(ATLAS.rglob("*.py"))]


def test_no_print_outside_the_command_line():
    found = []
    for path, tree in modules():
        rel = path.relative_to(ATLAS)
        if rel.parts[0] == "cli":
            continue
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    if (rel.as_posix(), func.name) not in PRINTS_ALLOWED:
                        found.append(f"{rel}:{node.lineno} in {func.name}")
        for node in tree.body:  # module-level code, outside any function
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "print":
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"print() in the library (use logging.getLogger(__name__), or the caller's echo): {found}"


def test_progress_bars_are_tqdm_auto():
    found = []
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("tqdm", "tqdm.std", "tqdm.notebook"):
                found.append(f"{path.relative_to(ATLAS)}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import) and any(a.name in ("tqdm", "tqdm.std") for a in node.names):
                found.append(f"{path.relative_to(ATLAS)}:{node.lineno} import {node.names[0].name}")
    assert not found, f"progress bars not from tqdm.auto: {found}"
