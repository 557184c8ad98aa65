"""The package's import graph, read from the source with `ast` (every import, function-local ones too):
no module of sparrow_core imports streamer, and no two modules of the repository's packages import each
other, directly or around a longer cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sparrow_core", "streamer")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Modules of `modules` that the file imports anywhere in its body (`from a import b` counts a.b
    when a.b is a module, else a)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = [f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py") if "_proto" not in f.parts]
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_sparrow_core_never_imports_streamer():
    bad = {m: sorted(i for i in deps if i.split(".")[0] == "streamer")
           for m, deps in graph().items() if m.split(".")[0] == "sparrow_core"}
    assert not {m: d for m, d in bad.items() if d}


def within(edges: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    inside = lambda m: m.split(".")[0] == package  # noqa: E731
    return {m: {d for d in deps if inside(d)} for m, deps in edges.items() if inside(m)}


def test_no_import_cycles_in_sparrow_core():
    assert find_cycle(within(graph(), "sparrow_core")) is None


def test_no_import_cycles_in_streamer():
    assert find_cycle(within(graph(), "streamer")) is None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
