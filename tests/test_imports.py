"""The project's modules import each other without a cycle (at module level or inside functions), and the layers
keep to their places: components/ and schemas/ never import Prefect, schemas/ imports neither components/ nor
flows/, components/ does not import flows/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "flows", "schemas")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (functions included)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named.add(node.module)
            named.update(f"{node.module}.{alias.name}" for alias in node.names)
    return named


def test_no_import_cycle_among_the_projects_modules():
    modules = _modules()
    graph = {name: sorted(m for m in _imports(path) if m in modules and m != name) for name, path in modules.items()}
    cycles, state = [], {}

    def visit(name: str, trail: list[str]) -> None:  # depth-first; a grey node met again closes a cycle
        state[name] = "grey"
        for nxt in graph[name]:
            if state.get(nxt) == "grey":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[name] = "black"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_each_layer_imports_only_what_it_may():
    wrong = []
    for name, path in _modules().items():
        imported = _imports(path)
        layer = name.split(".")[0]
        if layer in ("components", "schemas"):
            wrong += [f"{name} imports {m}" for m in imported if m == "prefect" or m.startswith("prefect.")
                      or m.startswith("prefect_")]
        if layer == "schemas":
            wrong += [f"{name} imports {m}" for m in imported if m.split(".")[0] in ("components", "flows")]
        if layer == "components":
            wrong += [f"{name} imports {m}" for m in imported if m.split(".")[0] == "flows"]
    assert not wrong, "\n".join(sorted(wrong))
