"""In-sandbox entry point for a :class:`~stitchwork.isolation.PythonCall`.

Sandboxes run this file as ``python3 -I -S -B /stitchwork/_runner.py``. It reads one JSON request from stdin::

    {"file": "/tool/<name>.py", "function": "...", "payload": {"args": {...}, ...}}

loads ``file`` as a module, calls ``function(**payload["args"])`` (awaiting it if it returns a coroutine) and
writes exactly one JSON line to the process's *original* stdout::

    {"ok": true, "value": <result>, "usage": {...}}            # or
    {"ok": false, "error": "<ExcType>: <msg>", "usage": {...}}

``usage`` holds ``cpu_s`` and ``max_rss_kb`` of the runner process and the children it reaped (measured here
because the supervisor's ``wait4()`` figures include bwrap's and, for the peak RSS, the spawning process's).

Before the tool is imported, file descriptor 1 is pointed at stderr (and ``sys.stdout`` at ``sys.stderr``), so
anything the tool or its subprocesses print ends up on stderr and can never forge or corrupt the result line.
A result that JSON cannot encode is encoded piecewise with :func:`repr` (or as one ``repr`` string).

The environment is the process environment the sandbox set up (``SandboxSpec.env``); the runner does not take
an environment from the request. Child processes the tool forks (``os.fork``) never write a result line: when
they leave the tool function they exit with :func:`os._exit`.

This module uses the standard library only and has no side effects on import: the in-process test double
(:mod:`stitchwork.isolation.inline`) imports :func:`load_module`, :func:`encode_ok`, :func:`encode_error` and
:func:`error_text` from it so both backends load tools and shape results identically.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import sys
import types
from typing import Any

#: Path of this file inside a sandbox.
SANDBOX_PATH = "/stitchwork/_runner.py"


def error_text(exc: BaseException) -> str:
    """``"<ExcType>: <message>"`` (just the type name when the message is empty)."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def load_module(path: str, name: str = "tool", *, register: bool = True) -> types.ModuleType:
    """Executes the Python file ``path`` as a fresh module called ``name``.

    Args:
        path: The tool's Python file.
        name: Module name (``__name__`` inside the tool).
        register: Whether to put the module into :data:`sys.modules` (dataclasses and pickling in the tool
            look it up there). The module is removed again if executing it fails.

    Raises:
        ImportError: ``path`` cannot be loaded as a module.
        BaseException: Whatever executing the module body raises.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if register:
            sys.modules.pop(name, None)
        raise
    return module


def resolve_function(module: types.ModuleType, function: str) -> Any:
    """Returns the callable ``function`` of ``module``.

    Raises:
        AttributeError: There is no such attribute, or it is not callable.
    """
    target = getattr(module, function, None)
    if target is None or not callable(target) or function.startswith("__"):
        raise AttributeError(f"{module.__file__} has no function {function!r}")
    return target


def call_args(payload: Any) -> dict[str, Any]:
    """``payload["args"]`` as keyword arguments (``{}`` when absent).

    Raises:
        TypeError: The payload or its ``args`` is not a JSON object.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a JSON object, not {type(payload).__name__}")
    args = payload.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
        raise TypeError("payload['args'] must be a JSON object")
    return args


def encode_ok(value: Any, extra: dict[str, Any] | None = None) -> bytes:
    """The result line for a returned ``value``; values JSON cannot encode become :func:`repr` strings.

    Args:
        value: What the tool function returned.
        extra: More keys for the line (the sandbox runner adds ``usage``).
    """
    try:
        text = json.dumps({"ok": True, "value": value, **(extra or {})}, default=repr, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        # Non-string dict keys, circular references, a __repr__ that raises...
        try:
            fallback = repr(value)
        except Exception as exc:
            error = TypeError(f"result is not JSON-serialisable and repr() failed: {exc!r}")
            return encode_error(error, extra)
        text = json.dumps({"ok": True, "value": fallback, **(extra or {})}, separators=(",", ":"))
    return text.encode() + b"\n"


def encode_error(exc: BaseException, extra: dict[str, Any] | None = None) -> bytes:
    """The result line for an exception (``extra`` as in :func:`encode_ok`)."""
    message = {"ok": False, "error": error_text(exc), **(extra or {})}
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _usage() -> dict[str, Any]:
    """CPU seconds and peak RSS of this process and the children it reaped."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return {"usage": {"cpu_s": round(cpu, 6), "max_rss_kb": max(own.ru_maxrss, children.ru_maxrss)}}


def _run_request(raw: bytes) -> Any:
    request = json.loads(raw)
    if not isinstance(request, dict):
        raise TypeError("request must be a JSON object")
    path, function = request.get("file"), request.get("function")
    if not isinstance(path, str) or not isinstance(function, str):
        raise TypeError("request needs string fields 'file' and 'function'")
    args = call_args(request.get("payload", {}))
    module = load_module(path, "tool")
    value = resolve_function(module, function)(**args)
    if isinstance(value, types.CoroutineType):
        import asyncio  # imported only when needed: it costs ~10 ms of start-up

        value = asyncio.run(value)
    return value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    """Runs one request from stdin; returns the process exit code (0 also when the tool raised)."""
    result_fd = os.dup(1)
    os.set_inheritable(result_fd, False)
    os.dup2(2, 1)  # fd 1 (prints, os.write(1, ...), subprocesses) now goes to stderr
    sys.stdout = sys.stderr
    main_pid = os.getpid()
    try:
        value = _run_request(sys.stdin.buffer.read())
    except BaseException as exc:  # the result line must report everything, SystemExit included
        line = encode_error(exc, _usage())
    else:
        line = encode_ok(value, _usage())
    finally:
        if os.getpid() != main_pid:  # a child the tool forked is leaving the tool function
            os._exit(0)
    with contextlib.suppress(OSError, ValueError):  # a broken stderr must not cost the result line
        sys.stderr.flush()
    _write_all(result_fd, line)
    os.close(result_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
