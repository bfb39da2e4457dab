"""A fake OpenAI-compatible server on loopback that replays recorded turns in one backend's style.

Real HTTP (uvicorn on ``127.0.0.1``, a free port), for tests and benchmarks without a model::

    async with FakeOpenAIServer.from_fixture("vllm", directory) as server:
        model = open_model(server.uri())          # openai+http://127.0.0.1:PORT/v1?profile=vllm&model=...

A fixture (``tests/fixtures/compute/<style>.json``) holds the backend's style and its turns, each an assistant
``message`` as that backend writes it, optionally with the exact ``stream`` of deltas it sends. The turn
replayed is the number of assistant messages in the request (like ``scripted://``), so a conversation advances.

Each style enforces its backend's quirk: ``vllm`` refuses ``tool_choice="auto"`` without a parser, ``llamacpp``
refuses ``tools`` without ``--jinja``, ``ollama`` ignores ``tool_choice`` and drops tool calls when streaming,
``sglang`` refuses a history whose tool-call ids were not echoed unchanged. Faults (429, 500, timeouts, cut
streams) are queued with :meth:`FakeOpenAIServer.inject`. RunPod serverless (``/v2/{id}/run``, ``/runsync``,
``/status/{job}``) is served on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

STYLES = ("generic", "vllm", "sglang", "llamacpp", "ollama")
_NINE = re.compile(r"^[A-Za-z0-9]{9}$")


@dataclass(frozen=True)
class Fault:
    """One injected failure: ``status`` (429, 500, ...), ``timeout`` (hang ``delay_s``), ``truncate`` (cut the
    stream or body short)."""

    kind: str
    status: int = 500
    delay_s: float = 30.0
    retry_after_s: float | None = None


@dataclass
class Backend:
    """Style and switches of the fake backend."""

    style: str = "generic"
    model: str = "fake-model"
    turns: list[dict[str, Any]] = field(default_factory=list)
    vllm_tool_parser: bool = False
    """vLLM started with ``--enable-auto-tool-choice --tool-call-parser``."""
    llamacpp_jinja: bool = True
    """llama-server started with ``--jinja``."""
    latency_s: float = 0.0
    """Delay before the first byte of every answer."""
    chunk_delay_s: float = 0.0
    """Delay between streamed chunks."""
    runpod_queue: bool = False
    """RunPod ``/runsync`` answers IN_QUEUE first, so the client polls ``/status``."""
    served: tuple[str, ...] = ()
    """The model ids ``GET /v1/models`` lists (default: ``model`` alone)."""


def load_fixture(style: str, directory: Path) -> Backend:
    """The recorded turns of ``style`` (``<directory>/<style>.json``)."""
    data = json.loads((directory / f"{style}.json").read_text(encoding="utf-8"))
    return Backend(style=data.get("style", style), model=data.get("model", "fake-model"), turns=data["turns"])


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class FakeOpenAIServer:
    """Serves ``/v1/chat/completions`` and ``/v1/models`` on loopback in one backend's style."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.faults: deque[Fault] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.issued_ids: set[str] = set()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v2/{endpoint}/runsync", self._runpod_runsync, methods=["POST"]),
            Route("/v2/{endpoint}/run", self._runpod_run, methods=["POST"]),
            Route("/v2/{endpoint}/status/{job}", self._runpod_status, methods=["GET", "POST"]),
        ])

    @classmethod
    def from_fixture(cls, style: str, directory: Path, **switches: Any) -> FakeOpenAIServer:
        backend = load_fixture(style, directory)
        for name, value in switches.items():
            setattr(backend, name, value)
        return cls(backend)

    # -- lifecycle --------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def uri(self, **options: str) -> str:
        """An ``openai+http://`` URI for this server with its profile and model."""
        query = {"profile": self.backend.style, "model": self.backend.model, **options}
        return f"openai+http://127.0.0.1:{self.port}/v1?" + "&".join(f"{k}={v}" for k, v in query.items())

    async def start(self, port: int = 0) -> FakeOpenAIServer:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
        # every keep-alive response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="error", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=1, timeout_keep_alive=120)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.005)
        return self

    async def stop(self) -> None:
        """Stops serving (a dead deployment: connections are refused afterwards)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
            self._server = None
            self._task = None

    async def __aenter__(self) -> FakeOpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Fails the next ``times`` requests with ``fault``."""
        self.faults.extend([fault] * times)

    # -- answers ----------------------------------------------------------------------------------------------

    def _turn(self, body: Mapping[str, Any]) -> dict[str, Any]:
        index = sum(1 for m in body.get("messages") or () if m.get("role") == "assistant")
        turns = self.backend.turns
        return copy.deepcopy(turns[min(index, len(turns) - 1)])

    def _check(self, body: Mapping[str, Any]) -> JSONResponse | None:
        style = self.backend.style
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "messages must be a non-empty list")
        if style == "vllm" and body.get("tool_choice") == "auto" and not self.backend.vllm_tool_parser:
            return _error(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                               "set", "BadRequestError")
        if style == "llamacpp" and body.get("tools") and not self.backend.llamacpp_jinja:
            return _error(400, "tools param requires --jinja flag")
        if style == "sglang":
            expected: set[str] = set()
            for message in body["messages"]:
                if message.get("role") == "assistant":
                    expected = {c.get("id", "") for c in message.get("tool_calls") or ()}
                    for call_id in expected:
                        if call_id not in self.issued_ids and not _NINE.match(call_id):
                            return _error(400, f"tool call id {call_id!r} was not issued by this server and is not "
                                               "9 alphanumerics")
                elif message.get("role") == "tool" and message.get("tool_call_id") not in expected:
                    return _error(400, f"tool_call_id {message.get('tool_call_id')!r} does not match an id of the "
                                       "preceding assistant message")
        return None

    def _message(self, body: Mapping[str, Any], turn: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": turn.get("content")}
        calls = turn.get("tool_calls") or []
        if calls and body.get("tools"):
            message["tool_calls"] = calls
            for call in calls:
                if call.get("id"):
                    self.issued_ids.add(call["id"])
        elif calls and not message["content"]:
            message["content"] = "I have no tools for that."
        return message

    def _completion(self, body: Mapping[str, Any], message: dict[str, Any]) -> dict[str, Any]:
        prompt = sum(len(str(m.get("content") or "")) for m in body.get("messages") or ()) // 4 + 1
        completion = len(json.dumps(message)) // 4
        return {
            "id": "chatcmpl-" + secrets.token_hex(8), "object": "chat.completion", "created": int(time.time()),
            "model": str(body.get("model") or self.backend.model),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }

    def _deltas(self, body: Mapping[str, Any], turn: dict[str, Any], message: dict[str, Any]) -> list[dict[str, Any]]:
        if turn.get("stream") is not None and (body.get("tools") or not turn.get("tool_calls")):
            return list(turn["stream"])
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        text = message.get("content") or ""
        for start in range(0, len(text), 8):
            deltas.append({"content": text[start:start + 8]})
        calls = message.get("tool_calls") or []
        if self.backend.style == "ollama" and body.get("tools"):
            calls = []  # the quirk: tool calls are lost when streaming
        for index, call in enumerate(calls):
            arguments = call["function"].get("arguments") or ""
            arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
            deltas.append({"tool_calls": [{"index": index, "id": call.get("id"), "type": "function",
                                           "function": {"name": call["function"]["name"], "arguments": ""}}]})
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        return deltas

    async def _fault(self, stream: bool) -> Response | str | None:
        if not self.faults:
            return None
        fault = self.faults.popleft()
        if fault.kind == "status":
            headers = {"retry-after": str(fault.retry_after_s)} if fault.retry_after_s is not None else {}
            response = _error(fault.status, f"injected HTTP {fault.status}", "server_error")
            response.headers.update(headers)
            return response
        if fault.kind == "timeout":
            await asyncio.sleep(fault.delay_s)
            return None
        return "truncate"

    async def _chat(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        stream = bool(body.get("stream"))
        fault = await self._fault(stream)
        if isinstance(fault, Response):
            return fault
        if (refused := self._check(body)) is not None:
            return refused
        if self.backend.latency_s:
            await asyncio.sleep(self.backend.latency_s)
        turn = self._turn(body)
        message = self._message(body, turn)
        completion = self._completion(body, message)
        if not stream:
            if fault == "truncate":
                text = json.dumps(completion)
                return Response(text[: len(text) // 2], media_type="application/json")
            return JSONResponse(completion)
        deltas = self._deltas(body, turn, message)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(self._sse(completion, deltas, usage, truncate=fault == "truncate"),
                                 media_type="text/event-stream")

    async def _sse(self, completion: dict[str, Any], deltas: list[dict[str, Any]], usage: bool,
                   *, truncate: bool) -> AsyncIterator[bytes]:
        base = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
                "model": completion["model"]}
        finish = completion["choices"][0]["finish_reason"]
        frames = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        frames.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if usage:
            frames.append({**base, "choices": [], "usage": completion["usage"]})
        if truncate:
            frames = frames[: max(1, len(frames) // 2)]
        for frame in frames:
            yield b"data: " + json.dumps(frame).encode() + b"\n\n"
            if self.backend.chunk_delay_s:
                await asyncio.sleep(self.backend.chunk_delay_s)
        if not truncate:
            yield b"data: [DONE]\n\n"

    async def _models(self, request: Request) -> Response:
        names = self.backend.served or (self.backend.model,)
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": self.backend.style}
                                                        for name in names]})

    # -- RunPod serverless ------------------------------------------------------------------------------------

    async def _runpod_answer(self, request: Request) -> dict[str, Any] | Response:
        try:
            payload = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        self.headers.append(dict(request.headers))
        if not request.headers.get("authorization"):
            return _error(401, "missing RunPod API key")
        body = (payload.get("input") or {}).get("openai_input")
        if not isinstance(body, dict):
            return _error(400, "input.openai_input is required")
        self.requests.append(body)
        fault = await self._fault(False)
        if isinstance(fault, Response):
            return fault
        if (refused := self._check(body)) is not None:
            return refused
        return self._completion(body, self._message(body, self._turn(body)))

    async def _runpod_runsync(self, request: Request) -> Response:
        answer = await self._runpod_answer(request)
        if isinstance(answer, Response):
            return answer
        job = "job-" + secrets.token_hex(6)
        if self.backend.runpod_queue:
            self.jobs[job] = {"id": job, "status": "COMPLETED", "output": [answer]}
            return JSONResponse({"id": job, "status": "IN_QUEUE"})
        return JSONResponse({"id": job, "status": "COMPLETED", "output": [answer], "executionTime": 5})

    async def _runpod_run(self, request: Request) -> Response:
        answer = await self._runpod_answer(request)
        if isinstance(answer, Response):
            return answer
        job = "job-" + secrets.token_hex(6)
        self.jobs[job] = {"id": job, "status": "COMPLETED", "output": [answer]}
        return JSONResponse({"id": job, "status": "IN_QUEUE"})

    async def _runpod_status(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job"])
        if job is None:
            return _error(404, "unknown job")
        return JSONResponse(job)


__all__ = ["STYLES", "Backend", "FakeOpenAIServer", "Fault", "load_fixture"]
