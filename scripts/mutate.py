#!/usr/bin/env python3
"""Mutation testing of Stitchwork's security core: one small change at a time, run against the module's own tests.

A mutant is a copy of the source tree with exactly one change in one module (a flipped comparison, ``and``/``or``
swapped, a negated condition, a changed constant, a deleted statement, ``return None``). Each mutant runs the test
files mapped to its module (``[tool.stitchwork.mutation]`` in ``pyproject.toml``); it is *killed* when they fail or
time out and *survives* when they pass. A surviving mutant is a behaviour no test pins down: add a test, or list it
in ``tests/mutation_equivalents.txt`` with the reason it cannot change behaviour.

Usage::

    python3 scripts/mutate.py                         # every configured module (slow: minutes per module)
    python3 scripts/mutate.py security/taint.py       # one module (a path under src/stitchwork)
    python3 scripts/mutate.py --sample 20 --seed 1    # a random sample of 20 mutants per module (quick mode)
    python3 scripts/mutate.py --list security/taint.py  # the mutants, without running anything
    python3 scripts/mutate.py --json out.json          # also write every result as JSON

A configured module may name only some of its top-level functions and classes, after ``::`` (comma-separated):
``"isolation/_process.py::sandbox_result,why_stopped"`` mutates just those (a part of a large module that has
its own tests).

Exit status: 0 when every module meets ``min_score`` (equivalents excluded), 1 otherwise, 2 on bad usage or when
the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "stitchwork"
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.txt"

_FLIP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_BOUNDARY: dict[type[ast.cmpop], type[ast.cmpop]] = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in",
        ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One change: where (module, line, column), what (a short description), and which node it applies to."""

    module: str
    """The path under ``src/stitchwork``, e.g. ``security/taint.py``."""
    line: int
    col: int
    description: str
    node_index: int
    """The position of the mutated node in the module's ``ast.walk`` order."""
    variant: int = 0
    text: str = ""
    """The mutated line's source, stripped."""
    occurrence: int = 1
    """1 for the first mutant with this module, line text and description (in source order), 2 for the next..."""

    @property
    def key(self) -> str:
        """What names this mutant in ``tests/mutation_equivalents.txt``: the module, the line's text and the change
        (not the line number, so edits elsewhere in the module leave it valid)."""
        suffix = f" [{self.occurrence}]" if self.occurrence > 1 else ""
        return f"{self.module} :: {self.text} :: {self.description}{suffix}"

    @property
    def where(self) -> str:
        return f"{self.module}:{self.line}"


@dataclasses.dataclass
class Result:
    mutant: Mutant
    status: str
    """``killed``, ``survived``, ``timeout`` (counted as killed) or ``equivalent``."""
    seconds: float
    detail: str = ""


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """Nodes never mutated: docstrings, annotations, ``__all__`` and ``TYPE_CHECKING`` blocks, logging calls."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                mark(first)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            mark(node)  # attribute docstrings
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.arg):
            mark(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            mark(node.returns)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            mark(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            mark(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                node.func.value, ast.Name) and node.func.value.id in {"log", "logger", "logging"}:
            mark(node)
        if isinstance(node, ast.Import | ast.ImportFrom):
            mark(node)
    return skip


def _constant_variants(value: object) -> list[tuple[Any, str]]:
    if isinstance(value, bool):
        return [(not value, f"{value} -> {not value}")]
    if isinstance(value, int):
        return [(value + 1, f"{value} -> {value + 1}")] + ([(value - 1, f"{value} -> {value - 1}")] if value else [])
    if isinstance(value, float):
        return [(value * 2 + 1, f"{value} -> {value * 2 + 1}")]
    if isinstance(value, str):
        return [("", f"{value[:20]!r} -> ''")] if value else [("XX", "'' -> 'XX'")]
    return []


def _deletable(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr | ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Raise | ast.Return
                      | ast.Continue | ast.Break | ast.If | ast.For | ast.With | ast.Try) and not (
        isinstance(stmt, ast.AnnAssign) and stmt.value is None)


def enumerate_mutants(module: str, source: str) -> list[Mutant]:
    """Every mutant of one module, in a stable order."""
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    lines = source.splitlines()
    keywords = {id(k.value): k.arg for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg}
    found: list[Mutant] = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        line, col = getattr(node, "lineno", 0), getattr(node, "col_offset", 0)

        def add(description: str, variant: int = 0, *, line: int = line, col: int = col, index: int = index) -> None:
            text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
            found.append(Mutant(module, line, col, description, index, variant, text))

        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                flipped = _FLIP.get(type(op))
                if flipped is not None:
                    add(f"{_OPS[type(op)]} -> {_OPS[flipped]}", i * 2)
                boundary = _BOUNDARY.get(type(op))
                if boundary is not None:
                    add(f"{_OPS[type(op)]} -> {_OPS[boundary]}", i * 2 + 1)
        elif isinstance(node, ast.BoolOp):
            add("and -> or" if isinstance(node.op, ast.And) else "or -> and")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add("not x -> x")
        elif isinstance(node, ast.If | ast.While | ast.IfExp | ast.Assert):
            add("condition negated")
        elif isinstance(node, ast.Constant) and not isinstance(node.value, bytes):
            name = f"{keywords[id(node)]}=" if id(node) in keywords else ""
            for i, (_value, description) in enumerate(_constant_variants(node.value)):
                add(f"constant {name}{description}", i)
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            add("return ... -> return None")
        if isinstance(node, ast.stmt) and _deletable(node):
            add(f"statement deleted ({type(node).__name__.lower()})", 100)
    seen: dict[str, int] = {}
    numbered = []
    for m in sorted(found, key=lambda m: (m.line, m.col, m.node_index, m.variant)):
        seen[m.key] = seen.get(m.key, 0) + 1
        numbered.append(dataclasses.replace(m, occurrence=seen[m.key]))
    order = {(m.node_index, m.variant): i for i, m in enumerate(found)}
    return sorted(numbered, key=lambda m: order[(m.node_index, m.variant)])


class _Apply(ast.NodeTransformer):
    def __init__(self, mutant: Mutant, targets: dict[int, int]) -> None:
        self.mutant = mutant
        self.targets = targets  # id(node) -> walk index

    def visit(self, node: ast.AST) -> ast.AST | None:
        if self.targets.get(id(node)) != self.mutant.node_index:
            return self.generic_visit(node)
        m = self.mutant
        if m.variant == 100:  # statement deleted
            return ast.copy_location(ast.Pass(), node)
        if isinstance(node, ast.Compare):
            i, boundary = divmod(m.variant, 2)
            table = _BOUNDARY if boundary else _FLIP
            node.ops[i] = table[type(node.ops[i])]()
        elif isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.UnaryOp):
            return node.operand
        elif isinstance(node, ast.If | ast.While | ast.IfExp | ast.Assert):
            node.test = ast.copy_location(ast.UnaryOp(op=ast.Not(), operand=node.test), node.test)
        elif isinstance(node, ast.Constant):
            node.value = _constant_variants(node.value)[m.variant][0]
        elif isinstance(node, ast.Return):
            assert node.value is not None
            node.value = ast.copy_location(ast.Constant(value=None), node.value)
        return node


def within(mutants: list[Mutant], source: str, names: str) -> list[Mutant]:
    """The mutants inside the named top-level functions and classes of ``source`` (all of them if ``names`` is
    empty)."""
    if not names:
        return mutants
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    spans = [(node.lineno, node.end_lineno or node.lineno) for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name in wanted]
    if len(spans) != len(wanted):
        raise SystemExit(f"not every one of {sorted(wanted)} is a top-level function or class of the module")
    return [m for m in mutants if any(lo <= m.line <= hi for lo, hi in spans)]


def mutated_tree(mutant: Mutant, source: str) -> ast.Module:
    """The module's syntax tree with the one change made (line numbers kept: it compiles to code whose lines and
    functions match the original's)."""
    tree = ast.parse(source)
    targets = {id(node): index for index, node in enumerate(ast.walk(tree))}
    mutated = _Apply(mutant, targets).visit(tree)
    assert isinstance(mutated, ast.Module)
    return ast.fix_missing_locations(mutated)


def mutated_source(mutant: Mutant, source: str) -> str:
    return ast.unparse(mutated_tree(mutant, source))


def load_config() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data.get("tool", {}).get("stitchwork", {}).get("mutation", {}))


def load_equivalents() -> dict[str, str]:
    """``module :: line text :: description [n]  # reason`` lines of ``tests/mutation_equivalents.txt`` (the reason
    follows the last ``  # ``, so a line text may hold a comment of its own)."""
    found: dict[str, str] = {}
    if EQUIVALENTS.exists():
        for raw in EQUIVALENTS.read_text().splitlines():
            if raw.strip() and not raw.lstrip().startswith("#"):
                key, _, reason = raw.rpartition("  # ")
                if not key:
                    raise SystemExit(f"{EQUIVALENTS}: no '  # reason' on the line {raw!r}")
                found[key.strip()] = reason.strip()
    return found


NOT_NEEDED = [arg for name in ("langsmith_plugin", "schemathesis", "benchmark") for arg in ("-p", f"no:{name}")]
"""Installed pytest plugins no mapped test uses; loading them doubled the start-up cost of every mutant."""


def _pytest(src: Path, tests: list[str], timeout: float) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
               *NOT_NEEDED, "-o", "addopts=", *tests]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return ("survived" if done.returncode == 0 else "killed"), tail[0]


_workdirs: dict[int, Path] = {}


def _workdir() -> Path:
    """A private copy of ``src/`` for this worker thread (made once)."""
    key = threading.get_ident()
    if key not in _workdirs:
        target = Path(tempfile.mkdtemp(prefix="stitchwork-mutant-")) / "src"
        shutil.copytree(SRC, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        _workdirs[key] = target
    return _workdirs[key]


def run_mutant(mutant: Mutant, source: str, tests: list[str], timeout: float) -> Result:
    src = _workdir()
    path = src / "stitchwork" / mutant.module
    started = time.monotonic()
    try:
        path.write_text(mutated_source(mutant, source))
        status, detail = _pytest(src, tests, timeout)
    finally:
        path.write_text(source)
    return Result(mutant, status, time.monotonic() - started, detail)


def iter_modules(config: dict[str, object], only: list[str]) -> Iterator[tuple[str, list[str]]]:
    modules = config.get("modules", {})
    if not isinstance(modules, dict):
        raise SystemExit("[tool.stitchwork.mutation] modules must be a table of module = [test files]")
    names = only or sorted(modules)
    for name in names:
        if name not in modules:
            raise SystemExit(f"{name} has no tests mapped in [tool.stitchwork.mutation.modules] (pyproject.toml)")
        if not (PACKAGE / name.partition("::")[0]).is_file():
            raise SystemExit(f"no module src/stitchwork/{name.partition('::')[0]}")
        yield name, list(modules[name])


def run_fast(path: str, tests: list[str], mutants: list[Mutant], jobs: int, timeout: float) -> list[Result] | None:
    """Every mutant through one long-lived runner (``scripts/_mutate_runner.py``): one collection, one traced clean
    run, then a fork per mutant running only the tests that reach the mutated line. None if the clean run fails."""
    with tempfile.TemporaryDirectory(prefix="stitchwork-mutate-") as scratch:
        spec, out = Path(scratch) / "spec.json", Path(scratch) / "out.jsonl"
        spec.write_text(json.dumps({"module": path, "tests": tests, "jobs": jobs, "timeout": timeout, "out": str(out),
                                    "mutants": [dataclasses.asdict(m) for m in mutants]}))
        env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "_mutate_runner.py"), str(spec)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            return None
        by_key = {m.key: m for m in mutants}
        results = []
        for line in out.read_text().splitlines():
            row = json.loads(line)
            results.append(Result(by_key[row["key"]], row["status"], row["seconds"], row["detail"]))
        missing = set(by_key) - {r.mutant.key for r in results}
        if missing:
            raise SystemExit(f"the runner stopped before {len(missing)} mutants ran (one was {sorted(missing)[0]})")
        return results


def run_isolated(module: str, source: str, tests: list[str], mutants: list[Mutant], jobs: int,
                 timeout: float) -> list[Result] | None:
    """Every mutant as a file in a private copy of ``src/`` and one whole pytest run (slow, but nothing shared)."""
    started = time.monotonic()
    status, detail = _pytest(SRC, tests, 1800)
    if status != "survived":
        print(f"{module}: its tests fail without any mutation ({detail}); fix them first", file=sys.stderr)
        return None
    timeout = timeout or max(30.0, 5 * (time.monotonic() - started))
    results = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for result in pool.map(lambda m: run_mutant(m, source, tests, timeout), mutants):
            if result.status == "survived":
                print(f"  SURVIVED line {result.mutant.line}: {result.mutant.key}", flush=True)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="paths under src/stitchwork (default: every configured one)")
    parser.add_argument("--sample", type=int, default=0, help="run a random sample of N mutants per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=0,
                        help="seconds per mutant (default: 20 s + 5x the clean time of the tests it runs)")
    parser.add_argument("--isolated", action="store_true",
                        help="the slow way: a copy of src/ and a whole pytest run per mutant (to cross-check)")
    parser.add_argument("--match", action="append", default=[],
                        help="only the mutants whose key holds this text (repeatable; e.g. a survivor's line text)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--json", type=Path, help="write every result to this file")
    args = parser.parse_args(argv)
    config = load_config()
    min_score = float(config.get("min_score", 0.95))  # type: ignore[arg-type]
    equivalents = load_equivalents()
    results: list[Result] = []
    failed = False
    for module, tests in iter_modules(config, args.modules):
        path, _, names = module.partition("::")
        source = (PACKAGE / path).read_text()
        mutants = within(enumerate_mutants(path, source), source, names)
        if args.match:
            mutants = [m for m in mutants if any(text in m.key for text in args.match)]
        if args.sample and len(mutants) > args.sample:
            mutants = random.Random(f"{args.seed}:{module}").sample(mutants, args.sample)
        if args.list:
            for m in mutants:
                print(f"{m.line}: {m.key}")
            continue
        started = time.monotonic()
        to_run = [m for m in mutants if m.key not in equivalents]
        print(f"== {module}: {len(mutants)} mutants ({len(mutants) - len(to_run)} listed equivalent), "
              f"tests {' '.join(tests)}", flush=True)
        ran = (run_isolated(module, source, tests, to_run, args.jobs, args.timeout) if args.isolated
               else run_fast(path, tests, to_run, args.jobs, args.timeout))
        if ran is None:
            return 2
        mine = ran + [Result(m, "equivalent", 0.0, equivalents[m.key]) for m in mutants if m.key in equivalents]
        counted = [r for r in mine if r.status != "equivalent"]
        killed = sum(r.status in {"killed", "timeout"} for r in counted)
        score = killed / len(counted) if counted else 1.0
        minutes = (time.monotonic() - started) / 60
        print(f"{module}: {killed}/{len(counted)} killed = {score:.0%} "
              f"({sum(r.status == 'equivalent' for r in mine)} listed equivalent)", flush=True)
        print(f"   {len(to_run)} mutants run in {minutes * 60:.0f} s = {len(to_run) / max(minutes, 1e-9):.1f} "
              "mutants/min", flush=True)
        failed |= score < min_score
        results.extend(mine)
    for workdir in _workdirs.values():
        shutil.rmtree(workdir.parent, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([{**dataclasses.asdict(r.mutant), "key": r.mutant.key, "status": r.status,
                                          "seconds": round(r.seconds, 2), "detail": r.detail} for r in results],
                                        indent=1))
    return 1 if failed and not args.list else 0


if __name__ == "__main__":
    sys.exit(main())
