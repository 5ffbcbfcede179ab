"""Host test: the package's imports run one way, with no cycle.

Walks every module of the installed-or-checkout `iobridge` package, reads
each import statement (at module level and inside functions) with ast, and
fails on a cycle between modules, or on an import against the layering:
core at the bottom, kernel on core, daemon and offline on kernel and core,
lab and the CLI on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import iobridge

PKG_DIR = Path(iobridge.__file__).resolve().parent
# What each layer may import (besides itself).
ALLOWED = {
    "core": set(),
    "kernel": {"core"},
    "daemon": {"core", "kernel"},
    "offline": {"core", "kernel"},
    "lab": {"core", "kernel", "daemon", "offline"},
    "": {"core", "kernel", "daemon", "offline", "lab"},   # cli, __main__, __init__
}


def module_name(path: Path) -> str:
    parts = ["iobridge", *path.relative_to(PKG_DIR).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every iobridge module `path` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "iobridge"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "iobridge":
                continue
            for a in node.names:    # "from pkg import module" names a module
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in MODULES else mod)
    return {m for m in out if m in MODULES}


MODULES = {module_name(p): p for p in PKG_DIR.rglob("*.py")}
GRAPH = {name: imports_of(path, name) - {name} for name, path in MODULES.items()}


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def test_the_walk_sees_the_package():
    assert len(MODULES) > 20
    assert "iobridge.kernel.route_policy" in GRAPH["iobridge.daemon.agent"]
    assert "iobridge.core.abi" in GRAPH["iobridge.kernel.route_policy"]


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)


def test_imports_follow_the_layers():
    wrong = []
    for n, deps in GRAPH.items():
        for m in deps:
            a, b = layer(n), layer(m)
            if b != a and b not in ALLOWED[a] and b != "":
                wrong.append(f"{n} ({a or 'top'}) imports {m} ({b})")
            if b == "" and a != "" and m != "iobridge":
                wrong.append(f"{n} ({a}) imports the top-level {m}")
    assert not wrong, "\n".join(sorted(wrong))
