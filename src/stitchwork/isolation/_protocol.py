"""The runner protocol, host side: the request a sandbox hands :mod:`._runner` and the result line it gets back.

The sandbox side is :mod:`stitchwork.isolation._runner` (standard library only, compiled at every sandbox start).
This module is what the backends share around it, so every backend shapes a
:class:`~stitchwork.isolation.PythonCall` and reads its result the same way:

* the request: ``{"file": "/tool/<name>", "function": ..., "payload": ...}`` (plus ``"env"`` for an interpreter
  that started before its call, the ``wasm://`` warm pool), encoded as one line of compact JSON by
  :func:`encode_request`; a payload JSON cannot encode is a :class:`~stitchwork.errors.SandboxError`;
* the runner: the interpreter runs :data:`RUNNER_HOST_PATH` mounted at :data:`SANDBOX_PATH` with
  :data:`RUNNER_FLAGS`;
* the answer: one JSON line ``{"ok": bool, "value" | "error": ..., "usage"?: {...}}``, read by
  :func:`parse_answer` (the line itself), :func:`last_line_answer` (the last line of stdout: ``bwrap://``,
  ``gvisor://``, ``nanos://``) or :func:`split_marked` (what follows the last :data:`RESULT_MARKER`: ``wasm://``,
  whose guest cannot point fd 1 elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from stitchwork.errors import SandboxError
from stitchwork.isolation import _runner
from stitchwork.isolation._base import PythonCall

#: The runner file on the host (bound read-only into each sandbox at :data:`SANDBOX_PATH`).
RUNNER_HOST_PATH = str(Path(_runner.__file__).resolve())
#: Where a sandbox sees the runner.
SANDBOX_PATH = _runner.SANDBOX_PATH
#: Interpreter flags before the runner path: isolated mode, no ``site``, no bytecode written.
RUNNER_FLAGS = ("-I", "-S", "-B")
#: Written by the WASI entry point before its result line (see :data:`._runner.RESULT_MARKER`).
RESULT_MARKER = _runner.RESULT_MARKER


def tool_path(call: PythonCall) -> str:
    """Where a sandbox sees the tool file of ``call``: ``/tool/<file name>``."""
    return f"/tool/{call.file.name}"


def runner_argv(python: str) -> list[str]:
    """The command line that runs the runner with ``python`` inside a sandbox."""
    return [python, *RUNNER_FLAGS, SANDBOX_PATH]


def request(call: PythonCall, *, env: Mapping[str, str] | None = None, tool: str | None = None) -> dict[str, Any]:
    """The request for ``call``.

    Args:
        call: The call.
        env: The environment, for an interpreter that learns it from the request (started before its call).
        tool: Where the sandbox sees the tool file (default: :func:`tool_path`).
    """
    message: dict[str, Any] = {"file": tool or tool_path(call), "function": call.function, "payload": call.payload}
    if env is not None:
        message["env"] = dict(env)
    return message


def encode_request(
    call: PythonCall, *, env: Mapping[str, str] | None = None, tool: str | None = None, newline: bool = False
) -> bytes:
    """:func:`request` as compact JSON on one line (``newline`` appends ``\\n``, for a runner that reads a line).

    Raises:
        SandboxError: The payload (or ``env``) is not JSON.
    """
    try:
        text = json.dumps(request(call, env=env, tool=tool), separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise SandboxError(f"payload for {call.file}:{call.function} is not JSON: {exc}") from exc
    return text.encode() + b"\n" if newline else text.encode()


def json_payload(call: PythonCall) -> Any:
    """The payload after a JSON round trip, as a sandbox would receive it (tuples become lists).

    Raises:
        SandboxError: The payload is not JSON.
    """
    try:
        return json.loads(json.dumps(call.payload))
    except (TypeError, ValueError) as exc:
        raise SandboxError(f"payload for {call.file}:{call.function} is not JSON: {exc}") from exc


class Answer(NamedTuple):
    """The runner's result line, read."""

    ok: bool
    value: Any
    error: str | None
    """The exception text (``"<ExcType>: <message>"``) when the tool raised."""
    usage: dict[str, Any] | None
    """``cpu_s`` and ``max_rss_kb`` as the runner measured them (absent under WASI)."""


def is_memory_error(error: str | None) -> bool:
    """Whether an error text names a :class:`MemoryError` (the backends report it as ``killed="memory"``)."""
    return error is not None and error.startswith("MemoryError")


def parse_answer(line: bytes | str) -> Answer | None:
    """The answer in one result line, or None when it is not one (not JSON, or no boolean ``ok``)."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("ok"), bool):
        return None
    ok = message["ok"]
    usage = message.get("usage")
    # Positional arguments: keywords cost a NamedTuple about a microsecond, and the inline double reads one answer
    # per tool call (~20 us).
    return Answer(
        ok, message.get("value"), None if ok else str(message.get("error")), usage if isinstance(usage, dict) else None
    )


def last_line_answer(stdout: bytes) -> Answer | None:
    """The answer on the last non-blank line of ``stdout`` (the runner writes nothing else there)."""
    lines = stdout.strip().splitlines()
    return parse_answer(lines[-1]) if lines else None


def split_marked(stdout: bytes) -> tuple[bytes, bytes] | None:
    """``(before, line)`` around the last :data:`RESULT_MARKER` in ``stdout``; None when there is no marker."""
    head, marker, tail = stdout.rpartition(RESULT_MARKER)
    return (head, tail) if marker else None
