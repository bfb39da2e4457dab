"""Conformance of the OpenAI-compatible client: each backend's documented request and response shapes and error
bodies, replayed over ``httpx.MockTransport`` (no server), for vLLM, SGLang, llama.cpp server, Ollama and the
OpenAI API itself (``generic``).

The recorded bodies follow each project's documentation and source: vLLM's and SGLang's ``ErrorResponse``
(top-level ``{"object": "error", "message", "type", "param", "code"}``; newer vLLM nests it under ``"error"``),
llama.cpp server's ``{"error": {"code", "message", "type"}}`` (``exceed_context_size_error``), Ollama's
OpenAI-compatible errors (``model "x" not found, try pulling it first``), and the OpenAI API's
(``model_not_found``, ``context_length_exceeded``, ``rate_limit_exceeded`` with ``Retry-After``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from stitchwork.compute.openai import OpenAICompatModel
from stitchwork.errors import (
    ContextLengthExceeded,
    ModelError,
    ModelNotFound,
    ModelRejected,
    ModelUnavailable,
)

USER = [{"role": "user", "content": "hi"}]


def _listing(*names: str, owner: str = "vllm") -> dict[str, Any]:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 1733000000, "owned_by": owner}
                                       for n in names]}


@dataclass(frozen=True)
class Backend:
    """One backend's documented shapes."""

    profile: str
    models: dict[str, Any]
    """``GET /v1/models`` with one model."""
    unknown_model: tuple[int, dict[str, Any]]
    context_length: tuple[int, dict[str, Any]]
    overloaded: tuple[int, dict[str, Any]]
    rate_limit: tuple[int, dict[str, Any]] = (429, {"error": {"message": "Too many requests", "type": "rate_limit",
                                                              "code": 429}})
    extra: dict[str, Any] = field(default_factory=dict)


BACKENDS = {
    "vllm": Backend(
        "vllm", _listing("meta-llama/Llama-3.1-8B-Instruct"),
        (404, {"object": "error", "message": "The model `gpt-4o` does not exist.", "type": "NotFoundError",
               "param": None, "code": 404}),
        (400, {"object": "error", "message": "This model's maximum context length is 8192 tokens. However, you "
               "requested 9000 tokens (8000 in the messages, 1000 in the completion). Please reduce the length of "
               "the messages or completion.", "type": "BadRequestError", "param": None, "code": 400}),
        (503, {"error": {"message": "The engine is overloaded", "type": "ServiceUnavailableError", "code": 503}}),
    ),
    "sglang": Backend(
        "sglang", _listing("Qwen/Qwen2.5-7B-Instruct", owner="sglang"),
        (400, {"object": "error", "message": "The model 'gpt-4o' does not exist", "type": "BadRequestError",
               "param": None, "code": 400}),
        (400, {"object": "error", "message": "The input (9000 tokens) is longer than the model's context length "
               "(8192 tokens).", "type": "BadRequestError", "param": None, "code": 400}),
        (500, {"object": "error", "message": "Internal server error", "type": "InternalServerError", "param": None,
               "code": 500}),
    ),
    "llamacpp": Backend(
        "llamacpp", {"object": "list", "data": [{"id": "qwen2.5-1.5b-instruct-q4_k_m.gguf", "object": "model",
                                                 "created": 1733000000, "owned_by": "llamacpp",
                                                 "meta": {"n_ctx_train": 32768}}]},
        (404, {"error": {"code": 404, "message": "model not found", "type": "not_found_error"}}),
        (400, {"error": {"code": 400, "message": "the request exceeds the available context size, try increasing "
               "it", "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}}),
        (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
    ),
    "ollama": Backend(
        "ollama", {"object": "list", "data": [{"id": "llama3.2:latest", "object": "model", "created": 1733000000,
                                               "owned_by": "library"}]},
        (404, {"error": {"message": "model \"gpt-4o\" not found, try pulling it first", "type": "api_error",
                         "param": None, "code": None}}),
        (400, {"error": {"message": "prompt is too long for the context window", "type": "invalid_request_error",
                         "param": None, "code": None}}),
        (500, {"error": {"message": "llama runner process has terminated: exit status 2", "type": "api_error",
                         "param": None, "code": None}}),
    ),
    "generic": Backend(
        "generic", {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1721172741,
                                                "owned_by": "system"}]},
        (404, {"error": {"message": "The model `gpt-5-turbo` does not exist or you do not have access to it.",
                         "type": "invalid_request_error", "param": None, "code": "model_not_found"}}),
        (400, {"error": {"message": "This model's maximum context length is 128000 tokens. However, your messages "
                         "resulted in 130000 tokens. Please reduce the length of the messages.",
                         "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
        (500, {"error": {"message": "The server had an error while processing your request. Sorry about that!",
                         "type": "server_error", "param": None, "code": None}}),
        (429, {"error": {"message": "Rate limit reached for gpt-4o-mini in organization org-x on requests per min "
                         "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
                         "type": "requests", "param": None, "code": "rate_limit_exceeded"}}),
    ),
}


def completion(model: str, *, tool_call: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None if tool_call else "hello"}
    if tool_call:
        message["tool_calls"] = [{"id": "call_abc123", "type": "function",
                                  "function": {"name": "list_inbox", "arguments": "{\"limit\": 3}"}}]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1733000000, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_call else "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}


class Replay:
    """Answers ``/models`` and ``/chat/completions`` with recorded bodies; records what the client sent."""

    def __init__(self, models: Any, chat: Callable[[dict[str, Any]], httpx.Response] | None = None,
                 *, models_status: int = 200) -> None:
        self.models = models
        self.models_status = models_status
        self.chat = chat
        self.sent: list[dict[str, Any]] = []
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(f"{request.method} {request.url.path}")
        if request.url.path.endswith("/models"):
            return httpx.Response(self.models_status, json=self.models)
        body = json.loads(request.content)
        self.sent.append(body)
        if self.chat is not None:
            return self.chat(body)
        return httpx.Response(200, json=completion(body["model"]))


def model(uri: str, replay: Replay) -> OpenAICompatModel:
    return OpenAICompatModel(uri, http=httpx.AsyncClient(transport=httpx.MockTransport(replay)))


def served(backend: Backend) -> str:
    return str(backend.models["data"][0]["id"])


# -- the model name ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BACKENDS))
async def test_without_model_in_the_uri_the_one_served_model_is_sent(name: str) -> None:
    backend = BACKENDS[name]
    replay = Replay(backend.models)
    client = model(f"openai+http://gpu:8000/v1?profile={backend.profile}", replay)
    # the gateway passes the URI itself as the request's model for a direct model: it must never reach the server
    turn = await client.complete(USER, [])
    await client.chat({"model": "openai+http://gpu:8000/v1", "messages": USER})
    assert turn.content == "hello"
    assert [body["model"] for body in replay.sent] == [served(backend)] * 2
    assert replay.paths.count("GET /v1/models") == 1  # asked once, then remembered


@pytest.mark.parametrize("name", sorted(BACKENDS))
async def test_several_served_models_are_listed_in_a_clear_error_and_model_selects(name: str) -> None:
    backend = BACKENDS[name]
    listing = {"object": "list", "data": [{"id": n, "object": "model"} for n in ("alpha-7b", "beta-70b")]}
    replay = Replay(listing)
    client = model(f"openai+http://gpu:8000/v1?profile={backend.profile}", replay)
    with pytest.raises(ModelNotFound) as error:
        await client.complete(USER, [])
    assert "alpha-7b" in str(error.value) and "beta-70b" in str(error.value) and "?model=" in str(error.value)
    assert replay.sent == []  # nothing was sent with a made-up name
    chosen = model(f"openai+http://gpu:8000/v1?profile={backend.profile}&model=beta-70b", replay)
    await chosen.complete(USER, [])
    assert replay.sent[-1]["model"] == "beta-70b"
    # a router's logical name that the server serves is used as it is
    await client.chat({"model": "alpha-7b", "messages": USER})
    assert replay.sent[-1]["model"] == "alpha-7b"


async def test_a_server_without_a_model_listing() -> None:
    replay = Replay({"detail": "Not Found"}, models_status=404)
    client = model("openai+http://gpu:8000/v1", replay)
    await client.chat({"model": "served-name", "messages": USER})
    assert replay.sent[-1]["model"] == "served-name"
    with pytest.raises(ModelNotFound, match=r"\?model=NAME"):
        await client.complete(USER, [])  # the request's name is a URI: never sent


@pytest.mark.parametrize("listing", [{"object": "list", "data": "x"}, ["not", "objects"], {"data": None}, "text"])
async def test_a_listing_in_an_unknown_shape_is_a_clear_error(listing: Any) -> None:
    client = model("openai+http://gpu:8000/v1", Replay(listing))
    with pytest.raises(ModelError) as error:
        await client.complete(USER, [])
    assert type(error.value) in {ModelError, ModelNotFound}
    assert "gpu:8000" in str(error.value)


async def test_the_listing_unreachable_is_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = OpenAICompatModel("openai+http://gpu:8000/v1", http=httpx.AsyncClient(transport=httpx.MockTransport(
        refuse)))
    with pytest.raises(ModelUnavailable):
        await client.complete(USER, [])


# -- documented error bodies -------------------------------------------------------------------------------------


def answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None
           ) -> Callable[[dict[str, Any]], httpx.Response]:
    return lambda _: httpx.Response(status, json=body, headers=headers or {})


@pytest.mark.parametrize("name", sorted(BACKENDS))
async def test_unknown_model_is_model_not_found_naming_what_is_served(name: str) -> None:
    backend = BACKENDS[name]
    replay = Replay(backend.models, answer(*backend.unknown_model))
    client = model(f"openai+http://gpu:8000/v1?profile={backend.profile}&model=gpt-4o", replay)
    with pytest.raises(ModelNotFound) as error:
        await client.complete(USER, [])
    assert error.value.status == 404 and isinstance(error.value, ModelRejected)
    assert served(backend) in str(error.value)  # the models the server does serve


@pytest.mark.parametrize("name", sorted(BACKENDS))
async def test_context_length_exceeded(name: str) -> None:
    backend = BACKENDS[name]
    client = model(f"openai+http://gpu:8000/v1?profile={backend.profile}&model=m",
                   Replay(backend.models, answer(*backend.context_length)))
    with pytest.raises(ContextLengthExceeded) as error:
        await client.complete(USER, [])
    assert not isinstance(error.value, ModelUnavailable)  # a router must not retry it elsewhere blindly
    assert error.value.code == "context_length_exceeded"


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("retry_after", ["20", "0.5", None, "Wed, 21 Oct 2026 07:28:00 GMT", "-3", "nan"])
async def test_rate_limit_429_carries_retry_after(name: str, retry_after: str | None) -> None:
    backend = BACKENDS[name]
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    client = model(f"openai+http://gpu:8000/v1?profile={backend.profile}&model=m",
                   Replay(backend.models, answer(*backend.rate_limit, headers)))
    with pytest.raises(ModelUnavailable) as error:
        await client.complete(USER, [])
    assert error.value.status == 429
    expected = {"20": 20.0, "0.5": 0.5}.get(retry_after or "")
    assert error.value.retry_after_s == expected


@pytest.mark.parametrize("name", sorted(BACKENDS))
async def test_server_errors_are_unavailable(name: str) -> None:
    backend = BACKENDS[name]
    client = model(f"openai+http://gpu:8000/v1?profile={backend.profile}&model=m",
                   Replay(backend.models, answer(*backend.overloaded)))
    with pytest.raises(ModelUnavailable) as error:
        await client.complete(USER, [])
    assert error.value.status == backend.overloaded[0]
    assert backend.overloaded[1].get("message", backend.overloaded[1].get("error", {}).get("message")) in str(
        error.value)


@pytest.mark.parametrize("name", sorted(BACKENDS))
async def test_errors_when_streaming_are_classified_alike(name: str) -> None:
    backend = BACKENDS[name]
    client = model(f"openai+http://gpu:8000/v1?profile={backend.profile}&model=m",
                   Replay(backend.models, answer(*backend.context_length)))
    with pytest.raises(ContextLengthExceeded):
        async for _ in client.chat_stream({"messages": USER}):
            pass


async def test_an_error_event_inside_a_stream_is_raised() -> None:
    def stream(_: dict[str, Any]) -> httpx.Response:
        text = ('data: {"id":"1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"he"}}]}'
                '\n\ndata: {"error": {"message": "This model\'s maximum context length is 10 tokens", '
                '"type": "BadRequestError", "code": 400}}\n\n')
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    client = model("openai+http://gpu:8000/v1?profile=vllm&model=m", Replay({}, stream))
    seen = []
    with pytest.raises(ModelError):
        async for chunk in client.chat_stream({"messages": USER}):
            seen.append(chunk)
    assert len(seen) == 1


@pytest.mark.parametrize("name", sorted(BACKENDS))
async def test_documented_tool_call_response_is_read(name: str) -> None:
    backend = BACKENDS[name]
    replay = Replay(backend.models, lambda body: httpx.Response(200, json=completion(body["model"], tool_call=True)))
    client = model(f"openai+http://gpu:8000/v1?profile={backend.profile}", replay)
    tools = [{"type": "function", "function": {"name": "list_inbox", "parameters": {"type": "object"}}}]
    turn = await client.complete(USER, tools)
    assert [(c.id, c.name, c.arguments) for c in turn.tool_calls] == [("call_abc123", "list_inbox", '{"limit": 3}')]
    assert turn.usage.prompt_tokens == 9 and turn.usage.completion_tokens == 3
    sent = replay.sent[-1]
    assert sent["tools"] == tools and sent["messages"] == USER and "stream" not in sent


def test_error_class_mapping_is_complete() -> None:
    """Every documented status lands in exactly one class of the tree (a router retries only the unavailable)."""
    client = OpenAICompatModel("openai+http://gpu:8000/v1?model=m")
    cases = {400: ModelRejected, 401: ModelRejected, 403: ModelRejected, 404: ModelNotFound, 409: ModelRejected,
             413: ModelRejected, 422: ModelRejected, 429: ModelUnavailable, 500: ModelUnavailable,
             502: ModelUnavailable, 503: ModelUnavailable, 504: ModelUnavailable}
    for status, cls in cases.items():
        error = client._error(httpx.Response(status), json.dumps({"error": {"message": "nope"}}))
        assert type(error) is cls, status
