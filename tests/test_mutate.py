"""scripts/mutate.py: the mutants it makes, and that one mutated module is scored against its tests."""

from __future__ import annotations

import ast
import importlib.util
import json
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
    made = {f"{m.line}: {m.description}": mutate.mutated_source(m, SOURCE)
            for m in mutate.enumerate_mutants("x.py", SOURCE)}
    assert "if n <= 3 and flag:" in made["9: > -> <="]
    assert "if n >= 3 and flag:" in made["9: > -> >="]
    assert "if n > 3 or flag:" in made["9: and -> or"]
    assert "if not (n > 3 and flag):" in made["9: condition negated"]
    assert "total = n + 1" in made["11: constant 0 -> 1"]
    assert "return None" in made["12: return ... -> return None"]
    deleted = made["11: statement deleted (assign)"]
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
    listed.write_text("# comment\nsecurity/x.py :: if n > 3: :: > -> >=  # n is never 3 here\n\n"
                      "security/x.py :: y = 1  # a comment of the line :: constant 1 -> 2 [2]  # reason two\n")
    previous = mutate.EQUIVALENTS
    mutate.EQUIVALENTS = listed
    try:
        assert mutate.load_equivalents() == {
            "security/x.py :: if n > 3: :: > -> >=": "n is never 3 here",
            "security/x.py :: y = 1  # a comment of the line :: constant 1 -> 2 [2]": "reason two"}
        listed.write_text("security/x.py :: if n > 3: :: > -> >=\n")
        with pytest.raises(SystemExit, match="no '  # reason'"):
            mutate.load_equivalents()
    finally:
        mutate.EQUIVALENTS = previous


REPEATED = """from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class A:
    x: int = 0


@dataclass(frozen=True, slots=True)
class B:
    y: int = 0
"""


def test_keys_name_the_line_text_not_its_number_and_count_repeats() -> None:
    keys = [m.key for m in mutate.enumerate_mutants("x.py", REPEATED)]
    assert "x.py :: @dataclass(frozen=True, slots=True) :: constant frozen=True -> False" in keys
    assert "x.py :: @dataclass(frozen=True, slots=True) :: constant slots=True -> False" in keys
    assert "x.py :: @dataclass(frozen=True, slots=True) :: constant slots=True -> False [2]" in keys  # class B's
    assert len(keys) == len(set(keys))
    moved = "import os\n\n\n" + REPEATED.replace("class B:", "class B:\n    z = os.sep")
    assert set(keys) <= {m.key for m in mutate.enumerate_mutants("x.py", moved)}  # lines added: the same keys


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


@pytest.mark.timeout(900)  # ~20 s on an idle 2-core machine, minutes on a loaded one
def test_the_ci_sample_runs_and_scores(tmp_path: Path) -> None:
    """What CI runs of the tool: a small seeded sample of one configured module, end to end, by the fast runner
    (one pytest session, a fork per mutant) and the isolated way (a copy of src/ and a pytest run per mutant): both
    give each mutant the same verdict."""
    module = next(m for m in mutate.load_config()["modules"] if m.startswith("isolation/_process.py::"))
    verdicts = []
    for mode in ([], ["--isolated"]):
        out = tmp_path / f"out{len(verdicts)}.json"
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutate.py"), "--sample", "2", "--seed", "1",
                               *mode, "--json", str(out), module], cwd=ROOT, capture_output=True, text=True,
                              timeout=880)
        score = re.search(r"^(\S+): (\d+)/(\d+) killed = (\d+)% \((\d+) listed equivalent\)$", done.stdout, re.M)
        assert score is not None, done.stdout + done.stderr
        assert score[1] == module and int(score[3]) + int(score[5]) == 2
        assert done.returncode == 0 and score[2] == score[3], done.stdout
        verdicts.append({row["key"]: row["status"] for row in json.loads(out.read_text())})
    assert verdicts[0] == verdicts[1] and len(verdicts[0]) == 2


def test_every_listed_equivalent_is_a_mutant_the_tool_makes() -> None:
    """A line left behind after its module changed would silently stop matching (and hide nothing it claims to)."""
    listed = mutate.load_equivalents()
    made: set[str] = set()
    for module in {key.split(" :: ", 1)[0] for key in listed}:
        made |= {m.key for m in mutate.enumerate_mutants(module, (ROOT / "src" / "stitchwork" / module).read_text())}
    assert sorted(set(listed) - made) == []


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_mutate_runner", ROOT / "scripts" / "_mutate_runner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LIVE = """LIMIT = 3
DROPPED = 1


def limit(n):
    return min(n, LIMIT)


class C:
    def twice(self, n):
        return n * 2 if n > 0 else 0
"""


def _live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    """A loaded module and another that took its names (``from live import limit, C, LIMIT``)."""
    path = tmp_path / "mutate_live_target.py"
    path.write_text(LIVE)
    spec = importlib.util.spec_from_file_location("mutate_live_target", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    holder = ModuleType("mutate_live_holder")
    holder.limit, holder.C, holder.LIMIT = module.limit, module.C, module.LIMIT  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mutate_live_target", module)
    monkeypatch.setitem(sys.modules, "mutate_live_holder", holder)
    return module, holder


def _compiled(module: ModuleType, line: int, description: str) -> object:
    mutant = next(m for m in mutate.enumerate_mutants("x.py", LIVE) if m.line == line and m.description == description)
    return compile(mutate.mutated_tree(mutant, LIVE), str(module.__file__), "exec")


def test_the_runner_swaps_a_mutated_function_into_every_live_reference(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner()
    module, holder = _live(tmp_path, monkeypatch)
    original = runner._codes(compile(ast.parse(LIVE), str(module.__file__), "exec"))
    live = {(f.__code__.co_qualname, f.__code__.co_firstlineno): [f] for f in (module.limit, module.C.twice)}
    assert runner.Runner._swap(_compiled(module, 11, "condition negated"), original, live)
    assert holder.C().twice(2) == 0 and holder.C().twice(-1) == -2  # the class another module holds
    assert runner.Runner._swap(_compiled(module, 6, "return ... -> return None"), original, live)
    assert holder.limit(5) is None
    assert not runner.Runner._swap(_compiled(module, 1, "constant 3 -> 4"), original, live)  # no function changed


def test_the_runner_reexecutes_a_module_level_mutant_and_rebinds_imported_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner()
    module, holder = _live(tmp_path, monkeypatch)
    old_limit = module.limit
    runner.Runner._reexec(type("R", (), {"module": module})(), _compiled(module, 1, "constant 3 -> 4"))
    assert module.LIMIT == 4 and holder.LIMIT == 4
    assert old_limit(10) == 4 and holder.limit is module.limit  # old functions see the new globals; names rebound
    module2, _ = _live(tmp_path, monkeypatch)
    runner.Runner._reexec(type("R", (), {"module": module2})(), _compiled(module2, 2, "statement deleted (assign)"))
    assert "DROPPED" not in vars(module2) and module2.LIMIT == 3  # a deleted assignment leaves the name undefined
    module3, _ = _live(tmp_path, monkeypatch)
    with pytest.raises(ImportError, match="cannot import name 'LIMIT'"):  # another module imported the deleted name
        runner.Runner._reexec(type("R", (), {"module": module3})(), _compiled(module3, 1, "statement deleted (assign)"))


def test_a_module_level_mutant_rebinds_only_the_names_taken_from_the_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small ints are shared objects: another module's `RM_TYPE = 3` (sqlalchemy's cursor has one) or a library's own
    # `LIMIT = 3` is not a name taken from the mutated module and must keep its value (rebinding every 3 in the
    # process broke SQLAlchemy in the test process and would count unrelated breakage as kills).
    runner = _runner()
    module, holder = _live(tmp_path, monkeypatch)
    bystander = ModuleType("mutate_live_bystander")
    bystander.RM_TYPE = 3  # type: ignore[attr-defined]
    library = ModuleType("mutate_live_library")
    library.LIMIT, library.__file__ = 3, "/usr/lib/python3/dist-packages/mutate_live_library.py"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mutate_live_bystander", bystander)
    monkeypatch.setitem(sys.modules, "mutate_live_library", library)
    runner.Runner._reexec(type("R", (), {"module": module})(), _compiled(module, 1, "constant 3 -> 4"))
    assert holder.LIMIT == 4  # taken by name from the module: rebound
    assert bystander.RM_TYPE == 3 and library.LIMIT == 3  # the same object under another name, or not ours: kept
    module2, _ = _live(tmp_path, monkeypatch)
    runner.Runner._reexec(type("R", (), {"module": module2})(), _compiled(module2, 2, "statement deleted (assign)"))
    assert bystander.RM_TYPE == 3  # DROPPED = 1 gone: nobody holding a 1 under another name is an importer


def test_the_runner_runs_only_the_tests_that_reach_the_mutated_statement() -> None:
    runner = _runner()
    tree = ast.parse(SOURCE)
    spans = {m.description: runner._statement_span(tree, m.node_index)
             for m in mutate.enumerate_mutants("x.py", SOURCE)}
    assert spans["and -> or"] == (9, 10)  # an if: its header and the first line of its body
    assert spans["constant 0 -> 1"] == (11, 11)
    assert runner._function_body_lines(tree) == [(8, 12)]  # from the docstring: the header runs at import
