"""The layers do not leak: no module imports back into one that imports it, and no module outside
``cmma_cli/modalities/`` names a modality (what the registry is for)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cmma_cli

PACKAGE = Path(cmma_cli.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The cmma_cli modules ``path`` imports, at the top or inside functions (not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmma_cli"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from cmma_cli.x import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cmma_cli"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        # a package's own submodules are its parts, not a dependency back on it
        out[name] = {m for m in imports(path) if m in modules and m != name and not m.startswith(name + ".")}
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_modalities_name_a_modality():
    from cmma_cli.modalities import REGISTRY

    literal = re.compile("|".join(rf'["\']{name}["\']' for name in REGISTRY))
    # the same word with another meaning: splits grouped by reduced composition, a recipe record's "composition"
    # key, pymatgen's Structure.composition
    homonym = re.compile(r'split_by|GROUPINGS|\.get\(["\']composition["\']\)|hasattr\([^)]*["\']composition["\']\)')

    def names_one(path: Path) -> bool:
        return any(literal.search(line) and not homonym.search(line) for line in path.read_text().splitlines())

    outside = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if "modalities" not in p.relative_to(PACKAGE).parts and names_one(p)
               and not p.relative_to(PACKAGE).parts[0] == "sources"]  # raw-data schemas: the "structure" column
    assert outside == []
