"""One behaviour suite for every sandbox backend: what a caller of ``Sandbox.run`` can rely on everywhere."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stitchwork.errors import ConfigError, SandboxError
from stitchwork.isolation._base import Command, Limits, PythonCall, Sandbox, SandboxSpec, open_sandbox
from stitchwork.isolation.inline import InlineSandbox, current_env

ToolFactory = Callable[[str], Path]  # the make_tool fixture (tests/ is not a package)

TOOL = """
import asyncio
import os
import time


def add(a, b):
    return a + b


def fail(message):
    raise ValueError(message)


def raise_named(kind):
    raise {"timeout": TimeoutError, "stop": StopIteration, "exit": SystemExit}[kind]("from the tool")


def chatty():
    print("chatter from the tool")
    os.write(1, b"raw fd-1 write\\n")
    return "clean"


def read_env(name):
    return os.environ.get(name)


def whole_env():
    return dict(os.environ)


def sleep(seconds):
    time.sleep(seconds)
    return "woke up"


def big(size):
    return "x" * size


def odd_value():
    return {"set": {1}, "tuple": (1, 2)}


async def twice(x):
    await asyncio.sleep(0)
    return 2 * x
"""

ALLOWED_DEFAULT_ENV = {"PATH", "HOME", "LANG", "PWD"}  # bwrap sets PWD for --chdir


def call(tool: Path, function: str, **args: object) -> PythonCall:
    return PythonCall(tool, function, {"args": args})


def program(sandbox: Sandbox, native: tuple[str, ...], python: str, stdin: bytes = b"") -> Command:
    """``native`` where the backend runs host programs, else the same behaviour as ``python3 -c python``."""
    if sandbox.native_commands:
        return Command(native, stdin=stdin)
    return Command(("python3", "-c", python), stdin=stdin)


async def test_python_call_returns_value(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    result = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "add", a=2, b=3)))

    assert result.ok, result
    assert result.value == 5
    assert result.error is None and result.killed is None and result.exit_code == 0


async def test_async_tool_function_is_awaited(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    result = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "twice", x=21)))

    assert result.value == 42, result


async def test_exception_becomes_error_not_raise(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    result = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "fail", message="bad input")))

    assert not result.ok
    assert result.error == "ValueError: bad input"
    assert result.value is None and result.killed is None


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("timeout", "TimeoutError"), ("stop", "StopIteration"), ("exit", "SystemExit")],
)
async def test_awkward_exceptions_are_errors_too(
    sandbox: Sandbox, make_tool: ToolFactory, kind: str, expected: str
) -> None:
    # The tool's own TimeoutError is not the sandbox's timeout; StopIteration and SystemExit do not escape.
    result = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "raise_named", kind=kind)))

    assert result.error == f"{expected}: from the tool", result
    assert result.killed is None


async def test_unknown_function_is_an_error(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    result = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "no_such_function")))

    assert result.error is not None and result.error.startswith("AttributeError"), result
    assert "no_such_function" in result.error


async def test_unserialisable_values_become_repr_and_json_types(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    result = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "odd_value")))

    assert result.value == {"set": "{1}", "tuple": [1, 2]}, result


async def test_prints_go_to_stderr_not_into_the_value(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    result = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "chatty")))

    assert result.value == "clean", result
    assert b"chatter from the tool" in result.stderr
    assert b"chatter" not in result.stdout
    if not isinstance(sandbox, InlineSandbox):  # a raw write to fd 1 cannot be captured in-process
        assert b"raw fd-1 write" in result.stderr and b"raw" not in result.stdout


async def test_command_stdout_stderr_and_exit_code(sandbox: Sandbox, workdir: Path) -> None:
    python = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(7)"
    spec = SandboxSpec(program(sandbox, ("/bin/sh", "-c", "echo out; echo err >&2; exit 7"), python), workdir=workdir)

    result = await sandbox.run(spec)

    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    assert not result.ok and result.killed is None


async def test_command_reads_stdin_and_runs_in_workdir(sandbox: Sandbox, workdir: Path) -> None:
    python = "import sys; open('in.txt', 'w').write(sys.stdin.read()); print(open('in.txt').read(), end='')"
    native = ("/bin/sh", "-c", "cat > in.txt; cat in.txt")
    spec = SandboxSpec(program(sandbox, native, python, stdin=b"hello\n"), workdir=workdir)

    result = await sandbox.run(spec)

    assert result.ok, result
    assert result.stdout == b"hello\n"
    assert (workdir / "in.txt").read_bytes() == b"hello\n"


async def test_env_is_visible_inside(sandbox: Sandbox, make_tool: ToolFactory, workdir: Path) -> None:
    env = {"STITCHWORK_SECRET_DEMO": "s3cr3t-value"}
    python = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "read_env", name="STITCHWORK_SECRET_DEMO"), env=env))
    command = await sandbox.run(
        SandboxSpec(
            program(
                sandbox,
                ("/bin/sh", "-c", 'printf %s "$STITCHWORK_SECRET_DEMO"'),
                "import os, sys; sys.stdout.write(os.environ['STITCHWORK_SECRET_DEMO'])",
            ),
            workdir=workdir,
            env=env,
        )
    )

    assert python.value == "s3cr3t-value", python
    assert command.stdout == b"s3cr3t-value", command


async def test_nothing_else_of_the_host_env_is_visible(
    sandbox: Sandbox, make_tool: ToolFactory, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if isinstance(sandbox, InlineSandbox):
        pytest.skip("inline:// runs in the host process: no environment isolation to test")
    monkeypatch.setenv("STITCHWORK_HOST_ONLY", "host-value-must-not-leak")
    env = {"GRANTED": "yes"}

    python = await sandbox.run(SandboxSpec(call(make_tool(TOOL), "whole_env"), env=env))
    env_program = program(sandbox, ("/usr/bin/env",), "import os\nfor k, v in os.environ.items(): print(f'{k}={v}')")
    command = await sandbox.run(SandboxSpec(env_program, workdir=workdir, env=env))

    assert python.value["GRANTED"] == "yes"
    assert set(python.value) <= {"GRANTED"} | ALLOWED_DEFAULT_ENV, python.value
    lines = command.stdout.decode().splitlines()
    assert "GRANTED=yes" in lines
    assert {line.split("=", 1)[0] for line in lines} <= {"GRANTED"} | ALLOWED_DEFAULT_ENV, lines
    assert b"host-value-must-not-leak" not in python.stdout + command.stdout


async def test_python_timeout_is_reported(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    spec = SandboxSpec(call(make_tool(TOOL), "sleep", seconds=30), limits=Limits(timeout_s=0.5))

    started = time.perf_counter()
    result = await sandbox.run(spec)

    assert result.killed == "timeout", result
    assert result.value is None and result.error is not None and "timed out" in result.error
    assert time.perf_counter() - started < 5
    assert not result.ok


async def test_command_timeout_kills_the_whole_sandbox(sandbox: Sandbox, workdir: Path) -> None:
    # A background child and the shell both append to a file: after the timeout, nothing may write any more.
    script = (
        "(while true; do echo child >> ticks; sleep 0.05; done) & while true; do echo parent >> ticks; sleep 0.05; done"
    )
    python = (  # WASI has neither processes nor threads: only the parent loop
        "import time\n"
        "while True:\n"
        "    with open('ticks', 'a') as f: f.write('parent\\n')\n"
        "    time.sleep(0.05)\n"
    )
    # gVisor boots its kernel first (0.2 s idle, seconds on a loaded host): give the program time to start ticking.
    timeout = 3.0 if sandbox.uri.startswith("gvisor") else 0.5
    spec = SandboxSpec(
        program(sandbox, ("/bin/sh", "-c", script), python), workdir=workdir, limits=Limits(timeout_s=timeout)
    )

    result = await sandbox.run(spec)
    await asyncio.sleep(0.3)
    size = (workdir / "ticks").stat().st_size
    await asyncio.sleep(0.5)

    assert result.killed == "timeout", result
    assert size > 0
    assert (workdir / "ticks").stat().st_size == size, "a process of the sandbox outlived the timeout"


async def test_python_output_cap_truncates(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    spec = SandboxSpec(call(make_tool(TOOL), "big", size=50_000), limits=Limits(max_output_bytes=1_000))

    result = await sandbox.run(spec)

    assert result.killed == "output", result
    assert result.truncated
    assert result.value is None
    assert len(result.stdout) + len(result.stderr) <= 1_000


async def test_command_output_cap_truncates(sandbox: Sandbox, workdir: Path) -> None:
    yes = program(sandbox, ("/usr/bin/yes",), "while True: print('y')")
    spec = SandboxSpec(yes, workdir=workdir, limits=Limits(max_output_bytes=10_000))

    result = await sandbox.run(spec)

    assert result.killed == "output", result  # the cap stopped it, not its timeout
    assert result.truncated
    assert len(result.stdout) == 10_000 and result.stdout.startswith(b"y\ny\n")


async def test_output_below_the_cap_is_not_truncated(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    spec = SandboxSpec(call(make_tool(TOOL), "big", size=500), limits=Limits(max_output_bytes=1_000))

    result = await sandbox.run(spec)

    assert result.value == "x" * 500 and not result.truncated and result.killed is None


async def test_payload_that_is_not_json_cannot_start(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    with pytest.raises(SandboxError, match="not JSON"):
        await sandbox.run(SandboxSpec(PythonCall(make_tool(TOOL), "add", {"args": {"a": object()}})))


async def test_concurrent_runs_do_not_mix(sandbox: Sandbox, make_tool: ToolFactory) -> None:
    tool = make_tool(TOOL)
    specs = [SandboxSpec(call(tool, "read_env", name="N"), env={"N": str(i)}) for i in range(8)]

    results = await asyncio.gather(*(sandbox.run(spec) for spec in specs))

    assert [r.value for r in results] == [str(i) for i in range(8)]


# -- inline:// specifics (the double's documented emulation, not isolation) -----------------------------


async def test_inline_exposes_the_call_env_and_keeps_os_environ_of_the_host(make_tool: ToolFactory) -> None:
    tool = make_tool(
        """
        import os
        from stitchwork.isolation.inline import current_env

        def probe():
            os.environ["WRITTEN_BY_TOOL"] = "1"
            return {"current": current_env().get("K"), "environ": os.environ.get("K"), "home": "HOME" in os.environ}
        """
    )
    sandbox = InlineSandbox("inline://")

    result = await sandbox.run(SandboxSpec(call(tool, "probe"), env={"K": "v"}))

    assert result.value == {"current": "v", "environ": "v", "home": True}, result
    assert "WRITTEN_BY_TOOL" not in os.environ and "K" not in os.environ
    assert current_env() == {}


async def test_inline_reloads_a_tool_file_that_changed(
    make_tool: ToolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stitchwork.isolation.inline import _ToolCache

    monkeypatch.setattr(_ToolCache, "REVALIDATE_S", 0.0)  # files are re-checked at most once per interval
    tool = make_tool("def version():\n    return 1\n")
    sandbox = InlineSandbox("inline://?mode=direct")
    first = await sandbox.run(SandboxSpec(call(tool, "version")))
    tool.write_text("def version():\n    return 2  # changed\n")

    second = await sandbox.run(SandboxSpec(call(tool, "version")))

    assert (first.value, second.value) == (1, 2)


async def test_inline_auto_mode_moves_cheap_functions_into_the_loop(make_tool: ToolFactory) -> None:
    tool = make_tool("import threading\n\ndef where():\n    return threading.current_thread().name\n")
    sandbox = InlineSandbox("inline://")
    main = threading.current_thread().name

    names = [(await sandbox.run(SandboxSpec(call(tool, "where")))).value for _ in range(3)]
    for _ in range(50):  # three cheap calls in a row; a loaded machine may need a few more tries
        names.append((await sandbox.run(SandboxSpec(call(tool, "where")))).value)
        if names[-1] == main:
            break

    assert main not in names[:3]  # the first calls run in a worker thread
    assert names[-1] == main  # proven cheap: now directly in the event loop


async def test_inline_direct_mode_reports_a_slow_call_as_timeout(make_tool: ToolFactory) -> None:
    sandbox = InlineSandbox("inline://", mode="direct")
    spec = SandboxSpec(call(make_tool(TOOL), "sleep", seconds=0.3), limits=Limits(timeout_s=0.1))

    result = await sandbox.run(spec)

    assert result.killed == "timeout" and result.value is None


def test_unknown_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="mode"):
        open_sandbox("inline://?mode=fast", allow_inline=True)
    with pytest.raises(ConfigError, match="unknown option"):
        open_sandbox("inline://?colour=blue", allow_inline=True)


@pytest.mark.parametrize("uri", ["inline://", "inline://?mode=direct", "INLINE://", " inline://"])
def test_inline_is_refused_by_uri_unless_allowed(uri: str) -> None:
    with pytest.raises(ConfigError, match=r"NO isolation.*allow_inline"):
        open_sandbox(uri)
    assert not open_sandbox(uri.strip().lower(), allow_inline=True).isolated


# -- the runner's JSON (it avoids importing json to start faster; it must agree with json) -------------------

JSON_SAMPLES = [
    {"ok": True, "value": [1, -2.5, 1e300, 10**30, None, True, False, "", 'é\n\t"\\\u2028', {"nested": []}]},
    {"emoji": "🙂", "control": "\x00\x1f", "keys": {"1": 1}},
    [float("inf"), float("-inf")],
    "just a string",
    3,
]


@pytest.mark.parametrize("accelerated", [True, False], ids=["_json", "json-fallback"])
@pytest.mark.parametrize("sample", JSON_SAMPLES)
def test_runner_json_agrees_with_the_json_module(
    sample: object, accelerated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from stitchwork.isolation import _runner

    if not accelerated:
        monkeypatch.setitem(sys.modules, "_json", None)  # import _json now raises ImportError
    expected = json.dumps(sample, default=repr, separators=(",", ":"))

    assert _runner.dumps(sample) == expected
    assert _runner.dumps(_runner.loads(" " + expected + "\n")) == expected


@pytest.mark.parametrize("accelerated", [True, False], ids=["_json", "json-fallback"])
@pytest.mark.parametrize("text", ["", "{", '{"a": 1} trailing', "[1,]", "nope"])
def test_runner_json_rejects_what_json_rejects(text: str, accelerated: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from stitchwork.isolation import _runner

    if not accelerated:
        monkeypatch.setitem(sys.modules, "_json", None)

    with pytest.raises(ValueError):
        _runner.loads(text)


def test_runner_encodes_unencodable_results_as_repr() -> None:
    import json

    from stitchwork.isolation import _runner

    circular: list[object] = []
    circular.append(circular)

    assert json.loads(_runner.encode_ok({1j: "complex key"})) == {"ok": True, "value": "{1j: 'complex key'}"}
    assert json.loads(_runner.encode_ok(circular))["value"] == "[[...]]"
    assert json.loads(_runner.encode_ok({"when": object}))["value"] == {"when": "<class 'object'>"}
