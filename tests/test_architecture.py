"""The shape of the package, checked from its source (issue 12): no import circle among atlas modules.

The import graph is built with :mod:`ast` over ``atlas/**/*.py``, counting every import
statement wherever it stands (module level, inside functions, under ``if TYPE_CHECKING``),
because a lazy import inside a function still ties the two modules together. An edge goes
to the most specific atlas module an import names: ``from atlas import tiles`` is an edge to
``atlas.tiles``, ``from atlas.store import open_store`` one to ``atlas.store``. The implicit
import of a parent package when a submodule is imported is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "atlas"

# Cycles allowed for now, as frozensets of module names, each with a comment naming why and the
# issue that will remove it. Empty: issue 12 removed tiles <-> classes and the CLI's app circle.
KNOWN_CYCLES: set[frozenset[str]] = set()


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``package`` (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of its first import}, over the package's own modules only."""
    mods = modules(package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: strip level-1 trailing parts of the current package
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
            for target in targets:
                if target in mods and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def describe(graph: dict[str, dict[str, int]], component: frozenset[str]) -> str:
    return "; ".join(f"{a} -> {b} (line {line})" for a in sorted(component) for b, line in sorted(graph[a].items()) if b in component)


def test_no_import_cycle_among_atlas_modules():
    graph = import_graph(PACKAGE)
    assert {"atlas.tiles", "atlas.classes", "atlas.classnames", "atlas.cli", "atlas.render.run"} <= set(graph)
    unexpected = [c for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not unexpected, "import circles: " + " | ".join(describe(graph, c) for c in unexpected)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The check above can fail: a circle closed by a lazy import inside a function is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub.c import g\n    return g\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("def g():\n    from .. import a\n    return a\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub.c": 2} and graph["pkg.sub.c"] == {"pkg.a": 2}
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.b", "pkg.sub.c"})]


def test_class_resolution_has_one_home_reexported_by_classes():
    from atlas import classes, classnames

    assert classes.resolve_class is classnames.resolve_class and classes.ClassRef is classnames.ClassRef


# ----------------------------------------------------------------------------- stages
# The rule: a stage module (any module of the stages below, subpackages included) uses another stage
# only through that stage's top module and only by the names listed here, its public entry functions
# (``from atlas import layout`` then ``layout.project(...)``, or ``from atlas.render import sample_patches``);
# never a submodule (``atlas.render.examples``, ``atlas.layout.neighbors``) nor any other name. Helpers
# two stages share live outside the stages: ``atlas.store``, ``atlas.classnames``, ``atlas.models``, ...
# The orchestrator ``atlas.build``, ``atlas.info`` and the CLI are not stages and are not held to it.
STAGE_ENTRIES: dict[str, set[str]] = {
    "atlas.sample": {"sample"},
    "atlas.layout": {"project", "embed", "save_layout", "aligned_project"},
    "atlas.grid": {"grid"},
    "atlas.render": {"render", "visualize", "sample_patches"},
    "atlas.tiles": {"make_tiles"},
    "atlas.classes": {"class_atlas", "compare_atlas"},
    # the lens's array cores are public too: other instruments (atlas.inspect, atlas.weights) build on them
    "atlas.units": {"units", "write_gallery", "project_units", "to_display", "max_positions", "fit_patch", "receptive_field", "Field",
                    "check_unit_layers", "class_scores"},
    # the inspection engine is public: the live page calls it per frame
    "atlas.inspect": {"inspect", "report_name", "InspectSettings", "batched_forward", "channel_grid", "channels_last", "forward",
                      "grid_layout", "image_positions", "place_on_atlas", "probabilities", "read_image", "strongest_channel", "top_classes",
                      "view_layers"},
    "atlas.weights": {"evolution", "evolve", "filter_sheet", "filter_stats", "input_filters", "load_checkpoint", "random_network",
                      "reconstruct", "reconstruct_report", "table_markdown", "write_evolution", "write_filters"},
}
# The image-optimisation toolkit lives inside the render package but is a shared building block (Lucent's optvis):
# objectives, parameterisations, transforms, regularisers and the loop itself, for every instrument that optimises
# an image. These modules belong to no stage.
SHARED = {"atlas.render.objectives", "atlas.render.param", "atlas.render.transforms", "atlas.render.optimize",
          "atlas.render.regularizers"}


def _stage(module: str, entries: dict[str, set[str]]) -> str | None:
    if module in SHARED:
        return None
    return next((s for s in entries if module == s or module.startswith(s + ".")), None)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def stage_violations(package: Path, entries: dict[str, set[str]]) -> list[str]:
    """Every use of another stage that breaks the rule above, as "module:line: what"."""
    mods = modules(package)
    bad = []
    for name, path in mods.items():
        own = _stage(name, entries)
        if own is None:
            continue
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}  # local name -> the other stage's top module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    other = _stage(alias.name, entries)
                    if other and other != own:
                        if alias.name != other:
                            bad.append(f"{name}:{node.lineno}: imports {alias.name}, inside stage {other}")
                        else:  # `import atlas.layout [as x]`: used as atlas.layout.X or x.X
                            bound[alias.asname or alias.name] = other
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in mods else base
                    other = _stage(target, entries)
                    if not other or other == own:
                        continue
                    if target == full == other:  # from atlas import layout
                        bound[alias.asname or alias.name] = other
                    elif target != other:
                        bad.append(f"{name}:{node.lineno}: imports {target}, inside stage {other}")
                    elif alias.name not in entries[other]:
                        bad.append(f"{name}:{node.lineno}: imports {other}.{alias.name}, not an entry function of {other}")
        for node in ast.walk(tree):
            dotted = _dotted(node) if isinstance(node, ast.Attribute) else None
            if dotted is None:
                continue
            for local, other in bound.items():
                if dotted.startswith(local + "."):
                    attr = dotted[len(local) + 1 :].split(".")[0]
                    if attr not in entries[other]:
                        bad.append(f"{name}:{node.lineno}: uses {other}.{attr}, not an entry function of {other}")
    return sorted(set(bad))


def test_stages_use_each_other_only_through_their_entry_functions():
    assert set(STAGE_ENTRIES) <= set(modules(PACKAGE))
    violations = stage_violations(PACKAGE, STAGE_ENTRIES)
    assert not violations, "stage internals used across stages:\n" + "\n".join(violations)


def test_the_stage_rule_can_fail(tmp_path):
    """The check above can fail: a submodule import, a non-entry attribute and a non-entry name are each found."""
    pkg = tmp_path / "pkg"
    (pkg / "b").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "b" / "__init__.py").write_text("from pkg.b.inner import run, helper\n")
    (pkg / "b" / "inner.py").write_text("def run():\n    pass\n\n\ndef helper():\n    pass\n")
    (pkg / "a.py").write_text("from pkg import b\nfrom pkg.b import run\n\n\n"
                              "def f():\n    from pkg.b.inner import helper\n    return b.run(), b.helper(), run, helper\n\n\n"
                              "def g():\n    from pkg.b import helper\n    return helper\n")
    entries = {"pkg.a": set(), "pkg.b": {"run"}}
    assert set(stage_violations(pkg, entries)) == {"pkg.a:6: imports pkg.b.inner, inside stage pkg.b",
                                                   "pkg.a:7: uses pkg.b.helper, not an entry function of pkg.b",
                                                   "pkg.a:11: imports pkg.b.helper, not an entry function of pkg.b"}


# ----------------------------------------------------------------------------- settings by construction
# Each stage and instrument takes its settings object (one frozen class of atlas.settings, the one home of its
# defaults), after its subjects (run folder, layers, images), and at most MAX_KEYWORDS other keyword parameters
# (echo, engine, net, ...). The settings' own fields come as ``**overrides``, checked by the class.
MAX_KEYWORDS = 6
SETTINGS_ENTRIES = {"atlas.sample": "sample", "atlas.layout": ("project", "aligned_project"), "atlas.grid": "grid",
                    "atlas.render": "render", "atlas.tiles": "make_tiles", "atlas.classes": ("class_atlas", "compare_atlas"),
                    "atlas.units": "units", "atlas.inspect": "inspect", "atlas.layers": "class_layers",
                    "atlas.concepts": "concepts", "atlas.patches": ("patch_images", "guided_search")}


def keyword_excess(fn, limit: int = MAX_KEYWORDS) -> list[str]:
    """What breaks the rule in ``fn``'s signature: no ``settings`` parameter, or more than ``limit`` keyword
    parameters after it (``**overrides`` not counted)."""
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params]
    if "settings" not in names:
        return [f"{fn.__name__} takes no settings object"]
    after = [p.name for p in params[names.index("settings") + 1:] if p.kind is not p.VAR_KEYWORD]
    return [f"{fn.__name__} has {len(after)} keyword parameters beyond its settings: {', '.join(after)}"] if len(after) > limit else []


def _entries(table: dict) -> list:
    import importlib

    out = []
    for module, names in table.items():
        for name in (names,) if isinstance(names, str) else names:
            out.append(getattr(importlib.import_module(module), name))
    return out


def test_every_stage_takes_its_settings_object_and_a_handful_of_keywords():
    bad = [line for fn in _entries(SETTINGS_ENTRIES) for line in keyword_excess(fn)]
    assert not bad, "\n".join(bad)


def test_the_keyword_rule_can_fail():
    def crowded(run_dir, layer, settings=None, *, a=1, b=2, c=3, d=4, e=5, f=6, g=7, **overrides):
        pass

    def bare(run_dir, layer, method="umap"):
        pass

    assert keyword_excess(crowded) == ["crowded has 7 keyword parameters beyond its settings: a, b, c, d, e, f, g"]
    assert keyword_excess(bare) == ["bare takes no settings object"]
    assert keyword_excess(crowded, limit=7) == []


# ----------------------------------------------------------------------------- faces and small rooms
# A package's __init__ is its face: a docstring, imports (the re-exports) and ``__all__``; the logic lives in named
# modules beside it. Two faces are allowed more, each for a reason:
FACE_EXTRAS: dict[str, set[str]] = {
    # `import atlas` must stay cheap (no torch, no zarr): its names load on first use through a module __getattr__,
    # which needs the name table, the callable-module wrapper classes and the swap of the module's class.
    "atlas": {"__version__", "_NAMES", "_CALLABLE", "_MODULES", "_entry", "_Instrument", "_Package", "sys.modules[__name__].__class__",
              "__getattr__", "__dir__"},
    # The console entry's package: importing it registers every command on the app and orders them into the panels of
    # `atlas --help`, which must be done once all command modules are imported, whoever imports the package first
    # (the `atlas` script, `from atlas.cli import app` in a test).
    "atlas.cli": {"GROUPS", "group_commands(app, GROUPS)"},
}
# Packages whose face is being emptied by their own change, with why; none now.
FACES_PENDING: dict[str, str] = {}


def _statement_name(node: ast.stmt) -> str:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return ",".join(ast.unparse(t) for t in targets)
    if isinstance(node, ast.Expr):
        return ast.unparse(node)
    return type(node).__name__


def face_problems(path: Path, extras: set[str] = frozenset()) -> list[str]:
    """Each top-level statement of a package ``__init__`` beyond its docstring, imports, ``__all__`` and ``extras``
    (names of assignments, functions or classes), as "line: what"."""
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _statement_name(node) in {"__all__", *extras}:
            continue
        bad.append(f"{node.lineno}: {_statement_name(node)}")
    return bad


def test_every_package_init_is_a_face():
    packages = {name: path for name, path in modules(PACKAGE).items() if path.name == "__init__.py"}
    assert {"atlas", "atlas.patches", "atlas.inspect", "atlas.store", "atlas.data", "atlas.units", "atlas.models"} <= set(packages)
    bad = {}
    for name, path in packages.items():
        problems = face_problems(path, FACE_EXTRAS.get(name, set()))
        if problems and name not in FACES_PENDING:
            bad[name] = problems
    assert not bad, "logic in a package __init__ (move it into a named module):\n" + "\n".join(
        f"{name}: {', '.join(p)}" for name, p in bad.items())


def test_the_face_rule_can_fail(tmp_path):
    face = tmp_path / "__init__.py"
    face.write_text('"""Doc."""\n\nfrom os import path\n\n__all__ = ["path"]\nLIMIT = 3\n\n\ndef helper():\n    pass\n\n\nhelper()\n')
    assert face_problems(face) == ["6: LIMIT", "9: helper", "13: helper()"]
    assert face_problems(face, {"LIMIT", "helper", "helper()"}) == []


# No function is longer than MAX_FUNCTION lines (its docstring not counted: a numpydoc docstring documents, it does
# not make a function harder to follow); a longer one is split into a pure computation and a short writer, or
# listed here with the reason it is not.
MAX_FUNCTION = 80
LONG_FUNCTIONS: dict[str, str] = {}
# Functions being shortened by their own change, with why; none now.
LONG_PENDING: dict[str, str] = {}


def long_functions(package: Path, limit: int = MAX_FUNCTION) -> dict[str, int]:
    """``file:function`` -> lines (without its docstring), for every function or method over ``limit`` lines."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines -= first.end_lineno - first.lineno + 1
            if lines > limit:
                out[f"{path.relative_to(package.parent).as_posix()}:{node.name}"] = lines
    return out


def test_no_function_is_over_80_lines_without_a_reason():
    found = long_functions(PACKAGE)
    unexplained = {k: v for k, v in found.items() if k not in LONG_FUNCTIONS and k not in LONG_PENDING}
    assert not unexplained, "functions over 80 lines (split them, or list them with a reason): " + ", ".join(
        f"{k} ({v})" for k, v in sorted(unexplained.items()))
    stale = sorted(k for k in LONG_FUNCTIONS if k not in found)  # the list stays short: a function shortened leaves it
    assert not stale, f"listed as long but no longer over 80 lines: {', '.join(stale)}"


def test_the_length_rule_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(79))  # with its def line: 80 lines
    doc = '    """Doc.\n\n' + "    more\n" * 10 + '    """\n'
    (pkg / "m.py").write_text(f"def short():\n{doc}{body}\n\ndef long():\n    y = 0\n{body}")
    assert long_functions(pkg) == {"pkg/m.py:long": 81}  # the docstring of short() is not counted
