"""In-sandbox entry point for a :class:`~stitchwork.isolation.PythonCall`.

Sandboxes run this file as ``python3 -I -S -B /stitchwork/_runner.py``. It reads one JSON request from stdin::

    {"file": "/tool/<name>.py", "function": "...", "payload": {"args": {...}, ...}}

loads ``file`` as a module, calls ``function(**payload["args"])`` (running the coroutine if it returns one) and
writes exactly one JSON line to the process's *original* stdout::

    {"ok": true, "value": <result>, "usage": {...}}            # or
    {"ok": false, "error": "<ExcType>: <msg>", "usage": {...}}

``usage`` holds ``cpu_s`` and ``max_rss_kb`` of the runner process and the children it reaped (measured here
because the supervisor's ``wait4()`` figures include bwrap's and, for the peak RSS, the spawning process's).

Before the tool is imported, file descriptor 1 is pointed at stderr (and ``sys.stdout`` at ``sys.stderr``), so
anything the tool or its subprocesses print ends up on stderr and cannot corrupt the result line. A result
that JSON cannot encode is encoded piecewise with :func:`repr` (or as one ``repr`` string). Exceptions of any
kind, ``SystemExit`` included, become ``{"ok": false}``. Child processes the tool forks never write a result
line: when they leave the tool function they exit with :func:`os._exit`.

The environment is the process environment the sandbox set up (``SandboxSpec.env``); the request carries none.

Start-up time matters (every call starts a fresh interpreter), so this module imports neither :mod:`typing`,
:mod:`json` nor :mod:`importlib.util` (together ~40 ms of imports): JSON goes through the C accelerator
:mod:`_json` that :mod:`json` itself uses (with :mod:`json` as the fallback) and tools are loaded with
:mod:`importlib.machinery`. It uses the standard library only and has no side effects on import: the in-process
test double (:mod:`stitchwork.isolation.inline`) uses :func:`load_module`, :func:`resolve_function`,
:func:`call_args`, :func:`encode_ok` and :func:`encode_error` too, so both backends shape calls and results
identically.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Path of this file inside a sandbox.
SANDBOX_PATH = "/stitchwork/_runner.py"
#: WASI has no ``dup2``, so fd 1 cannot be pointed at stderr there: the WASI entry point (:func:`wasi_main`)
#: writes this marker before the result line, and the host takes what follows the last marker as the line.
RESULT_MARKER = b"\n\x1estitchwork-result\x1e"
#: Written to stdout by :func:`wasi_main` once the interpreter is ready and waits for its request.
READY_MARKER = b"\x1estitchwork-ready\x1e"
#: Modules :func:`wasi_main` imports while it waits, so tools that need them do not pay for them per call.
WASI_PRELOAD = ("json", "time", "hashlib")


# -- JSON without importing json (it pulls in re, enum, functools...) -----------------------------------------


class _ScannerContext:
    """The settings :func:`_json.make_scanner` reads (those of ``json.loads`` with no hooks)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


def dumps(value: Any) -> str:
    """``json.dumps(value, default=repr, separators=(",", ":"))``.

    Raises:
        TypeError: A dict key that is not a string, number, bool or None.
        ValueError: A circular reference.
    """
    try:
        from _json import encode_basestring_ascii, make_encoder

        encode = make_encoder({}, repr, encode_basestring_ascii, None, ":", ",", False, False, True)
    except (ImportError, TypeError):  # no accelerator, or its private signature changed
        import json

        return json.dumps(value, default=repr, separators=(",", ":"))
    return "".join(encode(value, 0))


def loads(text: str) -> Any:
    """``json.loads(text)``.

    Raises:
        ValueError: ``text`` is not one JSON document.
    """
    try:
        from _json import make_scanner

        scan = make_scanner(_ScannerContext())  # type: ignore[arg-type]  # typeshed: any attribute bag works
    except (ImportError, TypeError, AttributeError):
        import json

        return json.loads(text)
    text = text.strip(" \t\n\r")
    try:
        value, end = scan(text, 0)
    except StopIteration as exc:
        raise ValueError(f"not JSON (at character {exc.value})") from None
    if end != len(text):
        raise ValueError(f"extra data after the JSON document (at character {end})")
    return value


# -- loading and calling a tool -------------------------------------------------------------------------------


def error_text(exc: BaseException) -> str:
    """``"<ExcType>: <message>"`` (just the type name when the message is empty)."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def load_module(path: str, name: str = "tool", *, register: bool = True) -> types.ModuleType:
    """Executes the Python file ``path`` as a fresh module called ``name``.

    Args:
        path: The tool's Python file.
        name: Module name (``__name__`` inside the tool).
        register: Whether to put the module into :data:`sys.modules` while and after it executes (dataclasses
            and pickling in the tool look it up there). It is removed again if executing it fails.

    Raises:
        OSError: ``path`` cannot be read.
        BaseException: Whatever executing the module body raises (``SyntaxError``, ``ImportError``...).
    """
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.machinery.ModuleSpec(name, loader, origin=path)
    spec.has_location = True
    module = types.ModuleType(name)
    module.__spec__, module.__loader__, module.__file__, module.__package__ = spec, loader, path, ""
    if register:
        sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        if register:
            sys.modules.pop(name, None)
        raise
    return module


def resolve_function(module: types.ModuleType, function: str) -> Any:
    """Returns the callable ``function`` of ``module``.

    Raises:
        AttributeError: There is no such public callable.
    """
    target = getattr(module, function, None) if not function.startswith("__") else None
    if target is None or not callable(target):
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
    if not isinstance(args, dict):
        raise TypeError("payload['args'] must be a JSON object")
    return args


def encode_ok(value: Any, extra: dict[str, Any] | None = None) -> bytes:
    """The result line for a returned ``value``; values JSON cannot encode become :func:`repr` strings.

    Args:
        value: What the tool function returned.
        extra: More keys for the line (the sandbox runner adds ``usage``).
    """
    try:
        text = dumps({"ok": True, "value": value, **(extra or {})})
    except (TypeError, ValueError, RecursionError):
        # Non-string dict keys, circular references, a __repr__ that raises...
        try:
            fallback = repr(value)
        except Exception as exc:
            error = TypeError(f"result is not JSON-serialisable and repr() failed: {exc!r}")
            return encode_error(error, extra)
        text = dumps({"ok": True, "value": fallback, **(extra or {})})
    return text.encode() + b"\n"


def encode_error(exc: BaseException, extra: dict[str, Any] | None = None) -> bytes:
    """The result line for an exception (``extra`` as in :func:`encode_ok`)."""
    return dumps({"ok": False, "error": error_text(exc), **(extra or {})}).encode() + b"\n"


# -- the sandbox entry point ----------------------------------------------------------------------------------


def _usage() -> dict[str, Any]:
    """CPU seconds and peak RSS of this process and the children it reaped."""
    try:
        import resource
    except ImportError:  # WASI: the host measures usage
        return {}
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return {"usage": {"cpu_s": round(cpu, 6), "max_rss_kb": max(own.ru_maxrss, children.ru_maxrss)}}


def _run_request(raw: bytes) -> Any:
    request = loads(raw.decode())
    if not isinstance(request, dict):
        raise TypeError("request must be a JSON object")
    path, function = request.get("file"), request.get("function")
    if not isinstance(path, str) or not isinstance(function, str):
        raise TypeError("request needs string fields 'file' and 'function'")
    args = call_args(request.get("payload", {}))
    env = request.get("env")
    if isinstance(env, dict):  # a pre-started interpreter (wasm:// warm pool) learns its environment here
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
    value = resolve_function(load_module(path, "tool"), function)(**args)
    if isinstance(value, types.CoroutineType):
        value = _run_coroutine(value)
    return value


def _run_coroutine(coroutine: Any) -> Any:
    import asyncio  # only when needed: ~10 ms of start-up

    if sys.platform != "wasi":
        return asyncio.run(coroutine)

    class _WasiLoop(asyncio.SelectorEventLoop):
        """No self-pipe: WASI has no socketpair (nothing here wakes the loop from another thread)."""

        def _make_self_pipe(self) -> None:
            self._ssock = self._csock = None

        def _close_self_pipe(self) -> None:
            pass

        def _write_to_self(self) -> None:
            pass

    with asyncio.Runner(loop_factory=_WasiLoop) as runner:
        return runner.run(coroutine)


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
        if len(sys.argv) > 1:  # a request file (unikernels have no stdin)
            with open(sys.argv[1], "rb") as handle:
                raw = handle.read()
        else:
            raw = sys.stdin.buffer.read()
        value = _run_request(raw)
    except BaseException as exc:  # the result line must report everything, SystemExit included
        line = encode_error(exc, _usage())
    else:
        line = encode_ok(value, _usage())
    finally:
        if os.getpid() != main_pid:  # a child the tool forked is leaving the tool function
            os._exit(0)
    try:  # noqa: SIM105 - contextlib.suppress would cost an import at every sandbox start
        sys.stderr.flush()
    except (OSError, ValueError):  # a broken stderr must not cost the result line
        pass
    _write_all(result_fd, line)
    os.close(result_fd)
    return 0


def wasi_main() -> int:
    """The entry point under WASI (``wasm://``): like :func:`main`, with the result after :data:`RESULT_MARKER`.

    It imports :data:`WASI_PRELOAD`, writes :data:`READY_MARKER` to stdout and then blocks reading one request
    line from stdin, so a host can start interpreters ahead of time and hand each one request. After the result
    line it exits at once (``os._exit``): each interpreter serves one call, so finalizing it is wasted time.
    """
    sys.stdout = sys.stderr
    for name in WASI_PRELOAD:
        try:  # noqa: SIM105 - contextlib would cost an import at every start
            __import__(name)
        except ImportError:
            pass
    _write_all(1, READY_MARKER)
    raw = sys.stdin.buffer.readline()
    try:
        os.chdir("/work")
        value = _run_request(raw)
    except BaseException as exc:
        line = encode_error(exc)
    else:
        line = encode_ok(value)
    try:  # noqa: SIM105
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    _write_all(1, RESULT_MARKER + line)
    os._exit(0)  # the interpreter is never reused: skip finalization (~15-25 ms under WASI)


if __name__ == "__main__":
    sys.exit(wasi_main() if sys.platform == "wasi" else main())
