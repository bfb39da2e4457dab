"""scripts/mutate.py: the mutants it makes, and that one mutated module is scored against its tests."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "scripts" / "mutate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutate"] = module
    spec.loader.exec_module(module)
    return module


mutate = _tool()

SOURCE = '''"""Docstring: never mutated."""
from __future__ import annotations

__all__ = ["limit"]


def limit(n: int, flag: bool) -> int:
    """Docstring."""
    if n > 3 and flag:
        return 3
    total = n + 0
    return total
'''


def _mutants() -> dict[str, str]:
    return {m.description: mutate.mutated_source(m, SOURCE) for m in mutate.enumerate_mutants("x.py", SOURCE)}


def test_every_kind_of_mutation_is_made_once_where_it_applies() -> None:
    descriptions = sorted(m.description for m in mutate.enumerate_mutants("x.py", SOURCE))
    assert descriptions == sorted([
        "> -> <=", "> -> >=", "and -> or", "condition negated", "constant 3 -> 4", "constant 3 -> 2",
        "constant 3 -> 4", "constant 3 -> 2", "constant 0 -> 1", "return ... -> return None",
        "return ... -> return None", "statement deleted (if)", "statement deleted (return)",
        "statement deleted (return)", "statement deleted (assign)",
    ])


def test_each_mutant_changes_exactly_what_it_says() -> None:
    made = {m.key: mutate.mutated_source(m, SOURCE) for m in mutate.enumerate_mutants("x.py", SOURCE)}
    assert "if n <= 3 and flag:" in made["x.py:9: > -> <="]
    assert "if n >= 3 and flag:" in made["x.py:9: > -> >="]
    assert "if n > 3 or flag:" in made["x.py:9: and -> or"]
    assert "if not (n > 3 and flag):" in made["x.py:9: condition negated"]
    assert "total = n + 1" in made["x.py:11: constant 0 -> 1"]
    assert "return None" in made["x.py:12: return ... -> return None"]
    deleted = made["x.py:11: statement deleted (assign)"]
    assert "total = n" not in deleted and "pass" in deleted
    for code in made.values():  # docstrings, annotations and __all__ are left alone; every mutant still parses
        ast.parse(code)
        assert '"""Docstring: never mutated."""' in code or "'Docstring: never mutated.'" in code
        assert "__all__ = ['limit']" in code and "def limit(n: int, flag: bool) -> int:" in code


def test_the_original_is_restored_after_a_mutant_runs(tmp_path: Path, monkeypatch: object) -> None:
    src = tmp_path / "src"
    (src / "stitchwork").mkdir(parents=True)
    target = src / "stitchwork" / "x.py"
    target.write_text(SOURCE)
    mutant = next(m for m in mutate.enumerate_mutants("x.py", SOURCE) if m.description == "and -> or")
    seen: list[str] = []
    mutate._workdirs[__import__("threading").get_ident()] = src
    try:
        original = mutate._pytest
        mutate._pytest = lambda s, tests, timeout: (seen.append(target.read_text()) or ("killed", "1 failed"))
        result = mutate.run_mutant(mutant, SOURCE, ["tests/none.py"], 5)
    finally:
        mutate._pytest = original
        del mutate._workdirs[__import__("threading").get_ident()]
    assert result.status == "killed" and "n > 3 or flag" in seen[0]
    assert target.read_text() == SOURCE


def test_equivalents_are_read_with_their_reasons(tmp_path: Path) -> None:
    listed = tmp_path / "eq.txt"
    listed.write_text("# comment\nsecurity/x.py:3: > -> >=  # n is never 3 here\n\n")
    previous = mutate.EQUIVALENTS
    mutate.EQUIVALENTS = listed
    try:
        assert mutate.load_equivalents() == {"security/x.py:3: > -> >=": "n is never 3 here"}
    finally:
        mutate.EQUIVALENTS = previous


def test_every_configured_module_exists_and_has_tests() -> None:
    modules = mutate.load_config()["modules"]
    assert modules
    for module, tests in modules.items():
        path, _, names = module.partition("::")
        assert (ROOT / "src" / "stitchwork" / path).is_file(), module
        if names:  # every function or class named exists at the top of the module (else the tool refuses)
            source = (ROOT / "src" / "stitchwork" / path).read_text()
            assert mutate.within(mutate.enumerate_mutants(path, source), source, names), module
        assert tests and all((ROOT / t).is_file() for t in tests), module


TWO = """def a(x):
    return x > 1


class B:
    def b(self, y):
        return y or 2
"""


def test_a_module_can_name_the_functions_and_classes_to_mutate() -> None:
    every = mutate.enumerate_mutants("x.py", TWO)
    assert mutate.within(every, TWO, "") == every
    assert {m.line for m in mutate.within(every, TWO, "a")} == {2}
    assert {m.line for m in mutate.within(every, TWO, "B")} == {7}
    assert mutate.within(every, TWO, " a , B ") == every
    with pytest.raises(SystemExit, match="top-level function or class"):
        mutate.within(every, TWO, "a,missing")


@pytest.mark.timeout(900)  # three short pytest runs: ~20 s on an idle 2-core machine, minutes on a loaded one
def test_the_ci_sample_runs_and_scores() -> None:
    """What CI runs of the tool: a small seeded sample of one configured module, end to end (three pytest runs:
    the clean one, then two mutants of the sandbox result classification against its fast unit tests)."""
    module = next(m for m in mutate.load_config()["modules"] if m.startswith("isolation/_process.py::"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutate.py"), "--sample", "2", "--seed", "1",
                           module], cwd=ROOT, capture_output=True, text=True, timeout=880)
    score = re.search(r"^(\S+): (\d+)/(\d+) killed = (\d+)% \((\d+) listed equivalent\)$", done.stdout, re.M)
    assert score is not None, done.stdout + done.stderr
    assert score[1] == module and int(score[3]) + int(score[5]) == 2
    assert done.returncode == 0 and score[2] == score[3], done.stdout


def test_every_listed_equivalent_is_a_mutant_the_tool_makes() -> None:
    """A line left behind after its module changed would silently stop matching (and hide nothing it claims to)."""
    listed = mutate.load_equivalents()
    made: set[str] = set()
    for module in {key.split(":", 1)[0] for key in listed}:
        made |= {m.key for m in mutate.enumerate_mutants(module, (ROOT / "src" / "stitchwork" / module).read_text())}
    assert sorted(set(listed) - made) == []
