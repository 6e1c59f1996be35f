"""The layout's rules, checked on the source: no import cycle among the project's modules (imports inside
functions counted), no project module imported inside a function, and evaluation never imports reglue."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("evaluation", "reglue", "reglue_cli")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict) -> set[str]:
    """The project modules a file imports, anywhere in it (a name imported from a package counts as its module
    when it is one, else as the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def graph_of_modules() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's own modules importing the package's __init__ are left
    out: Python initialises the package first, so that edge cannot form a cycle at import)."""
    known = modules()
    return {m: {t for t in imports(p, known) if t != m and not m.startswith(t + ".")} for m, p in known.items()}


def test_no_import_cycle_among_the_projects_modules():
    assert cycles(graph_of_modules()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_evaluation_never_imports_reglue():
    graph = graph_of_modules()
    leaks = {m: sorted(t for t in targets if not t.startswith("evaluation"))
             for m, targets in graph.items() if m.startswith("evaluation")}
    assert {m: t for m, t in leaks.items() if t} == {}


def imports_inside_functions(path: Path) -> list[str]:
    """'LINE module' for every import of a project module made inside a function of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                module = (inner.module if isinstance(inner, ast.ImportFrom) and inner.level == 0 else
                          inner.names[0].name if isinstance(inner, ast.Import) else None)
                if module and module.split(".")[0] in PACKAGES:
                    found.append(f"{inner.lineno} {module}")
    return found


def test_a_files_top_shows_what_it_depends_on():
    """No project module is imported inside a function: there is no cycle to break, so every dependency is at the
    top of its file (heavy optional third-party packages, wandb and matplotlib, may still load late)."""
    inside = {str(path.relative_to(ROOT)): found for path in modules().values()
              if (found := imports_inside_functions(path))}
    assert inside == {}


def test_the_inner_import_finder_sees_one(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from reglue import presets\n    import numpy\n    return presets\n")
    assert imports_inside_functions(source) == ["4 reglue"]


def imports_of_test_files(path: Path) -> list[str]:
    """'LINE module' for every import of a tests/test_*.py module in ``path``, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found += [f"{node.lineno} {name}" for name in names if name.split(".")[0].startswith("test_")]
    return found


def test_no_test_file_imports_another(tmp_path):
    """Test files share code through conftest.py (fixtures) and helpers.py (functions), never through each other."""
    tests = Path(__file__).resolve().parent
    shared = {path.name: found for path in tests.glob("*.py") if (found := imports_of_test_files(path))}
    assert shared == {}
    source = tmp_path / "test_m.py"
    source.write_text("import os\nfrom helpers import make_folder\n\ndef f():\n    from test_encode import folder\n")
    assert imports_of_test_files(source) == ["5 test_encode"]
