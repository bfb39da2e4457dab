"""The folder tree is the architecture: no import cycles, no oversized modules, layers as import-linter states.

The layer order itself is checked by ``lint-imports`` (pyproject.toml); these tests add what a layers contract
cannot see: rings of modules importing each other inside one layer, and files that have grown into several modules.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stitchwork"
MAX_LINES = 800
OVERSIZED_BY_DESIGN: dict[str, str] = {}
"""Files allowed past ``MAX_LINES``, with why each is one thing (none today)."""


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("stitchwork", include_external_packages=False)


def test_no_two_modules_import_each_other(graph: grimp.ImportGraph) -> None:
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_ring() -> None:
    ring = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c", "p.d"):
        ring.add_module(name)
    ring.add_import(importer="p.a", imported="p.b")
    ring.add_import(importer="p.b", imported="p.c")
    ring.add_import(importer="p.c", imported="p.a")
    ring.add_import(importer="p.c", imported="p.d")
    assert _cycles(ring) == [["p.a", "p.b", "p.c"]]


def test_no_source_file_is_several_modules() -> None:
    oversized = {
        str(path.relative_to(SRC)): lines
        for path in SRC.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
        and str(path.relative_to(SRC)) not in OVERSIZED_BY_DESIGN
    }
    assert oversized == {}

