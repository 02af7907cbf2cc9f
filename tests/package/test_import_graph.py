"""The shape of the library: one direction of imports (no cycle), no module reaching into another's
private names, torch-free request rules, and no print or signal handler outside entry modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "magi"
ENTRY_MODULES = {
    "magi.infer",
    "magi.cli",
    "magi.serve.__main__",
    "magi.serve.worker",
    "magi.plan",
    "magi.download",
    "magi.demo",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported magi module, names taken from it, line) for every import in the file, also in functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "magi"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] != "magi":
                continue
            for alias in node.names:  # `from magi import video_io` imports a module
                sub = f"{base}.{alias.name}"
                out.append((sub, [], node.lineno) if sub in modules else (base, [alias.name], node.lineno))
    return [(m, names, line) for m, names, line in out if m in modules]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            # importing magi.a.b runs magi and magi.a first; a package's own __init__ is not an edge
            if target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_magi() -> None:
    graph = _graph()
    assert "magi.generation" in graph["magi.pipeline"]  # the walk sees real edges
    assert _cycles(graph) == []


def test_no_module_imports_another_modules_private_names() -> None:
    modules = _modules()
    bad = [
        f"{path.relative_to(REPO)}:{line} takes {target}.{n}"
        for name, path in modules.items()
        for target, names, line in _imports(name, path, modules)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target != name
    ]
    assert bad == []


def test_request_rules_and_budget_import_no_torch() -> None:
    code = "import sys, magi.request, magi.budget; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_library_modules_neither_print_nor_own_signals() -> None:
    bad = []
    for name, path in _modules().items():
        if name in ENTRY_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id == "print":
                    bad.append(f"{name}:{node.lineno} print")
                if isinstance(f, ast.Attribute) and f.attr == "signal" and getattr(f.value, "id", "") == "signal":
                    bad.append(f"{name}:{node.lineno} signal.signal")
    assert bad == []
