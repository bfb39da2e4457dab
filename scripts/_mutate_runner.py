"""The fast runner of scripts/mutate.py: one pytest session per module, one fork per mutant.

Started by ``mutate.py`` as ``python3 scripts/_mutate_runner.py SPEC.json`` with ``PYTHONPATH`` on the worktree's
``src``. It imports the target module under a line tracer (lines run at import), collects the mapped test files once,
runs every test once unmutated while recording which lines of the target module each test runs and how long it takes,
then, for each mutant, forks: the child swaps the mutated function's code object into the live function objects (or,
for a change outside any function body, re-executes the mutated module in its own namespace and rebinds the names other
modules imported), runs only the tests that ran the mutated statement, fastest first, and exits at the first failure.
The parent kills a child past its deadline (a timeout counts as killed).

Results go to ``SPEC["out"]`` as JSON lines; progress goes to the terminal.
"""

from __future__ import annotations

import ast
import functools
import gc
import importlib
import json
import os
import select
import signal
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutate

_Key = tuple[str, int]
"""A code object's (qualified name, first line): unique within one module."""


def _codes(code: types.CodeType) -> dict[_Key, types.CodeType]:
    """Every code object inside ``code`` (functions, methods, nested functions, class bodies), by key."""
    found: dict[_Key, types.CodeType] = {}
    stack = [code]
    while stack:
        current = stack.pop()
        found[(current.co_qualname, current.co_firstlineno)] = current
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return found


def _function_body_lines(tree: ast.Module) -> list[tuple[int, int]]:
    """The line spans of function bodies (not their headers: defaults and decorators run in the enclosing scope)."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            spans.append((node.body[0].lineno, node.end_lineno or node.body[-1].lineno))
        elif isinstance(node, ast.Lambda):
            spans.append((node.body.lineno, node.body.end_lineno or node.body.lineno))
    return spans


def _statement_span(tree: ast.Module, node_index: int) -> tuple[int, int]:
    """The lines whose execution shows the mutated node's statement ran (a compound statement: its header and the
    first line of its body)."""
    parents: dict[int, ast.AST] = {}
    nodes = list(ast.walk(tree))
    for node in nodes:
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    node: ast.AST = nodes[node_index]
    while not isinstance(node, ast.stmt) and id(node) in parents:
        node = parents[id(node)]
    if not isinstance(node, ast.stmt):
        return (1, 1)
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
        return (node.lineno, max(node.lineno, body[0].lineno))
    return (node.lineno, node.end_lineno or node.lineno)


class _Tracer:
    """Records the lines of one file each test runs (all threads started while it is on)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: set[int] = set()

    def _local(self, frame: types.FrameType, event: str, arg: object) -> Any:
        if event == "line":
            self.lines.add(frame.f_lineno)
        return self._local

    def _global(self, frame: types.FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_filename == self.filename:
            self.lines.add(frame.f_lineno)
            return self._local
        return None

    def start(self) -> None:
        sys.settrace(self._global)
        threading.settrace(self._global)

    def stop(self) -> None:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]


class Runner:
    """A pytest plugin that takes over the test loop."""

    def __init__(self, spec: dict[str, Any], module: types.ModuleType, import_lines: set[int]) -> None:
        self.spec = spec
        self.module = module
        self.filename = str(module.__file__)
        self.source = Path(self.filename).read_text()
        self.import_lines = import_lines
        self.failures: list[str] = []
        self.progress = os.fdopen(os.dup(2), "w", buffering=1)
        self.out = open(spec["out"], "w", buffering=1)  # noqa: SIM115
        self.clean_failed = False
        self.caches: list[Any] = []

    def say(self, text: str) -> None:
        self.progress.write(text + "\n")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.failures.append(f"{report.nodeid} ({report.when})")

    def _run(self, items: list[pytest.Item], *, stop_at_failure: bool) -> None:
        for i, item in enumerate(items):
            nextitem = items[i + 1] if i + 1 < len(items) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            if stop_at_failure and self.failures:
                item.session._setupstate.teardown_exact(None)
                return

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        items = list(session.items)
        covered: dict[str, set[int]] = {}
        seconds: dict[str, float] = {}
        tracer = _Tracer(self.filename)
        started = time.monotonic()
        for i, item in enumerate(items):
            tracer.lines = set()
            began = time.monotonic()
            tracer.start()
            try:
                item.config.hook.pytest_runtest_protocol(item=item, nextitem=items[i + 1] if i + 1 < len(items)
                                                         else None)
            finally:
                tracer.stop()
            seconds[item.nodeid] = time.monotonic() - began
            covered[item.nodeid] = tracer.lines
        if self.failures:
            self.say(f"{self.spec['module']}: its tests fail without any mutation ({self.failures[0]}); fix them first")
            self.clean_failed = True
            return True
        self.say(f"   clean run with line tracing: {len(items)} tests in {time.monotonic() - started:.1f} s")
        self._mutants(items, covered, seconds)
        return True

    def _mutants(self, items: list[pytest.Item], covered: dict[str, set[int]], seconds: dict[str, float]) -> None:
        tree = ast.parse(self.source)
        bodies = _function_body_lines(tree)
        original = _codes(compile(tree, self.filename, "exec"))
        live: dict[_Key, list[types.FunctionType]] = {}
        for obj in gc.get_objects():
            if isinstance(obj, types.FunctionType) and obj.__code__.co_filename == self.filename:
                live.setdefault((obj.__code__.co_qualname, obj.__code__.co_firstlineno), []).append(obj)
            elif isinstance(obj, functools._lru_cache_wrapper) and getattr(
                    getattr(obj, "__wrapped__", None), "__code__", None) is not None and (
                    obj.__wrapped__.__code__.co_filename == self.filename):
                self.caches.append(obj)  # answers the clean run cached: cleared in each child
        by_time = sorted(items, key=lambda it: seconds[it.nodeid])
        jobs = max(1, int(self.spec["jobs"]))
        floor = float(self.spec.get("timeout") or 0)
        queue = [mutate.Mutant(**m) for m in self.spec["mutants"]]
        running: dict[int, tuple[mutate.Mutant, float, float, int]] = {}  # pid -> mutant, start, deadline, pipe
        done = 0
        total = len(queue)
        started = time.monotonic()
        while queue or running:
            while queue and len(running) < jobs:
                mutant = queue.pop(0)
                in_body = any(lo <= mutant.line <= hi for lo, hi in bodies)
                lo, hi = _statement_span(tree, mutant.node_index)
                at_import = any(line in self.import_lines for line in range(lo, hi + 1))
                if in_body and not at_import:
                    chosen = [it for it in by_time if any(line in covered[it.nodeid] for line in range(lo, hi + 1))]
                else:  # module level, class bodies, defaults, decorators, or run at import: every test
                    chosen = by_time
                if not chosen:
                    self._record(mutant, "survived", 0.0, "no test runs this line")
                    done += 1
                    continue
                budget = sum(seconds[it.nodeid] for it in chosen)
                timeout = floor or (20.0 + 5 * budget)
                read, write = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child
                    os.close(read)
                    self._child(mutant, tree, original, live, chosen, in_body and not at_import, write)
                os.close(write)
                now = time.monotonic()
                running[pid] = (mutant, now, now + timeout, read)
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                now = time.monotonic()
                for child, (_mutant, _began, deadline, _read) in list(running.items()):
                    if now > deadline:
                        os.kill(child, signal.SIGKILL)
                time.sleep(0.005)
                continue
            if pid not in running:
                continue
            mutant, began, _deadline, read = running.pop(pid)
            detail = _drain(read)
            code = os.waitstatus_to_exitcode(status)
            verdict = {0: "survived", 1: "killed", 3: "killed"}.get(code, "timeout" if code == -signal.SIGKILL
                                                                       else "killed")
            if code == 3:
                detail = f"the mutant does not load: {detail}"
            elif verdict == "timeout":
                detail = "timed out"
            elif code not in (0, 1):
                detail = f"the tests crashed (exit {code}) {detail}".strip()
            self._record(mutant, verdict, time.monotonic() - began, detail)
            done += 1
            if done % 25 == 0:
                elapsed = time.monotonic() - started
                self.say(f"   {done}/{total} mutants in {elapsed:.0f} s ({60 * done / elapsed:.1f}/min)")

    def _record(self, mutant: mutate.Mutant, status: str, seconds: float, detail: str) -> None:
        if status == "survived":
            self.say(f"  SURVIVED line {mutant.line}: {mutant.key}" + (f"  ({detail})" if detail else ""))
        self.out.write(json.dumps({"key": mutant.key, "status": status, "seconds": round(seconds, 3),
                                   "detail": detail}) + "\n")

    def _child(self, mutant: mutate.Mutant, tree: ast.Module, original: dict[_Key, types.CodeType],
               live: dict[_Key, list[types.FunctionType]], chosen: list[pytest.Item], swap: bool, pipe: int) -> None:
        code = 4
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                for cache in self.caches:
                    cache.cache_clear()
                mutated = mutate.mutated_tree(mutant, self.source)
                compiled = compile(mutated, self.filename, "exec")
                if not (swap and self._swap(compiled, original, live)):
                    self._reexec(compiled)
            except Exception as exc:
                os.write(pipe, f"{type(exc).__name__}: {exc}"[:300].encode())
                code = 3
            else:
                self.failures.clear()
                reporter = chosen[0].config.pluginmanager.get_plugin("terminalreporter")
                if reporter is not None:  # its writer would reach the terminal through pytest's capture
                    chosen[0].config.pluginmanager.unregister(reporter)
                self._run(chosen, stop_at_failure=True)
                if self.failures:
                    os.write(pipe, self.failures[0][:300].encode())
                code = 1 if self.failures else 0
        finally:
            os._exit(code)

    @staticmethod
    def _swap(compiled: types.CodeType, original: dict[_Key, types.CodeType],
              live: dict[_Key, list[types.FunctionType]]) -> bool:
        """Put the changed code objects into the live functions; False if no live function has one."""
        swapped = False
        for key, code in _codes(compiled).items():
            if key in original and original[key] != code and key in live:
                for function in live[key]:
                    function.__code__ = code
                    swapped = True
        return swapped

    def _reexec(self, compiled: types.CodeType) -> None:
        """Run the mutated module in its own namespace and rebind every name other modules took from the old one.

        Only a binding under the same name that holds the very same object is one taken by ``from module import
        name`` (matching by identity alone would also rebind every other ``3`` or ``True`` in the process: small
        ints and singletons are shared). Modules outside this repository (the standard library, site-packages)
        never import ours and are left alone.
        """
        namespace = self.module.__dict__
        old = dict(namespace)
        for name in old:
            if not (name.startswith("__") and name.endswith("__")):
                del namespace[name]  # a deleted assignment must leave its name undefined
        exec(compiled, namespace)
        changed = {name: (value, namespace[name]) for name, value in old.items()
                   if name in namespace and namespace[name] is not value and not name.startswith("__")}
        gone = {name: value for name, value in old.items() if name not in namespace}
        for other in list(sys.modules.values()):
            names = getattr(other, "__dict__", None)
            if other is self.module or not isinstance(names, dict) or not _ours(other):
                continue
            for name, value in gone.items():
                if name in names and names[name] is value:  # `from module import name` would fail
                    raise ImportError(f"cannot import name {name!r} from {self.module.__name__} "
                                      f"(imported by {getattr(other, '__name__', '?')})")
            for name, (before, after) in changed.items():
                if name in names and names[name] is before:
                    names[name] = after


def _ours(module: object) -> bool:
    """A module of this repository (or one made at run time, without a file): one that may import ours."""
    where = getattr(module, "__file__", None)
    if not where:
        return True
    try:
        return Path(where).resolve().is_relative_to(mutate.ROOT) and "site-packages" not in where
    except (OSError, ValueError):
        return False


def _drain(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    name = "stitchwork." + spec["module"].removesuffix(".py").replace("/", ".")
    filename = str((mutate.PACKAGE / spec["module"]).resolve())
    tracer = _Tracer(filename)
    tracer.start()
    try:
        module = importlib.import_module(name)
    finally:
        tracer.stop()
    if str(Path(str(module.__file__)).resolve()) != filename:
        print(f"{name} loads from {module.__file__}, not {filename}: PYTHONPATH must name this tree's src",
              file=sys.stderr)
        return 2
    runner = Runner(spec, module, tracer.lines)
    status = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist", *mutate.NOT_NEEDED,
                          "-o", "addopts=", *spec["tests"]], plugins=[runner])
    if runner.clean_failed or status not in (0, pytest.ExitCode.OK):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
