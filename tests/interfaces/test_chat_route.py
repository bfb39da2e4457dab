"""The chat completions route served as plain ASGI (``interfaces/http/_chat.py``): the same answers as the FastAPI
route, bad bodies refused with 400, other methods and paths passed on, and a client that disconnects mid-stream
stops the stream (and with it the upstream request)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stitchwork.errors import PolicyDenied
from stitchwork.interfaces.http._chat import ChatRoute, token_of


class Redactor:
    def redact_text(self, text: str) -> str:
        return text.replace("sk-secret", "[REDACTED]")


class Context:
    redactor = Redactor()


class Door:
    """What the route needs of the model door; records what it was given."""

    def __init__(self, *, endless: bool = False) -> None:
        self.context = Context()
        self.seen: list[tuple[str | None, dict[str, Any]]] = []
        self.endless = endless
        self.closed = asyncio.Event()
        self.sent = 0

    async def chat(self, token: str | None, body: dict[str, Any]) -> dict[str, Any]:
        self.seen.append((token, body))
        if body.get("model") == "forbidden":
            raise PolicyDenied("model not allowed (key sk-secret)", policy_ids=("model-not-allowed",))
        return {"choices": [{"message": {"content": "héllo"}}]}

    async def chat_stream(self, token: str | None, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.seen.append((token, body))
        try:
            while True:
                self.sent += 1
                yield {"choices": [{"delta": {"content": str(self.sent)}}]}
                if not self.endless and self.sent == 2:
                    return
                await asyncio.sleep(0)
        finally:
            self.closed.set()


async def passthrough(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 299, "headers": []})
    await send({"type": "http.response.body", "body": b"inner"})


async def call(route: ChatRoute, *, body: bytes, method: str = "POST", path: str = "/v1/chat/completions",
               token: str | None = "tok", parts: int = 1, disconnect_after: int | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    size = max(1, -(-len(body) // parts))
    messages = [{"type": "http.request", "body": body[i:i + size], "more_body": i + size < len(body)}
                for i in range(0, max(len(body), 1), size)]
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if disconnect_after is not None and sum(1 for m in sent if m.get("body")) >= disconnect_after:
            gone.set()

    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    await asyncio.wait_for(route(scope, receive, send), 30)
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(
        m.get("body", b"") for m in sent[1:])


async def test_an_answer_is_json_and_the_token_and_body_reach_the_door() -> None:
    door = Door()
    route = ChatRoute(passthrough, door=lambda: door)  # type: ignore[arg-type]
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    status, headers, raw = await call(route, body=body, parts=7)  # a body in several receive() messages
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(raw) == {"choices": [{"message": {"content": "héllo"}}]}
    assert door.seen == [("tok", json.loads(body))]
    await call(route, body=b"{}", token=None)
    assert door.seen[-1] == (None, {})  # no token: the door's authentication refuses it (tested with the door)


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "body is not JSON"), (b"[1, 2]", "body must be an object"), (b"\xff\xfe", "body is not JSON"),
    (b'"text"', "body must be an object")])
async def test_bad_bodies_are_refused_with_400_and_never_reach_the_door(body: bytes, message: str) -> None:
    door = Door()
    status, _, raw = await call(ChatRoute(passthrough, door=lambda: door), body=body)  # type: ignore[arg-type]
    assert status == 400 and json.loads(raw)["error"] == {"message": message, "type": "invalid_request_error",
                                                          "code": "invalid_json"}
    assert door.seen == []


async def test_a_refusal_is_an_openai_error_with_its_policy_and_secrets_redacted() -> None:
    door = Door()
    route = ChatRoute(passthrough, door=lambda: door)  # type: ignore[arg-type]
    status, _, raw = await call(route, body=b'{"model": "forbidden"}')
    error = json.loads(raw)["error"]
    assert status == 403 and error["policy_ids"] == ["model-not-allowed"] and "sk-secret" not in raw.decode()


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/chat/completions"), ("POST", "/v1/chat/completion"),
                                              ("POST", "/v1/runs"), ("PUT", "/v1/agent/chat/completions")])
async def test_other_methods_and_paths_go_on_to_the_application(method: str, path: str) -> None:
    door = Door()
    status, _, raw = await call(ChatRoute(passthrough, door=lambda: door),  # type: ignore[arg-type]
                                body=b"{}", method=method, path=path)
    assert (status, raw) == (299, b"inner") and door.seen == []


async def test_a_stream_is_sse_and_ends_with_done() -> None:
    door = Door()
    status, headers, raw = await call(ChatRoute(passthrough, door=lambda: door),  # type: ignore[arg-type]
                                      body=b'{"stream": true}', path="/v1/agent/chat/completions")
    events = [line[6:] for line in raw.decode().split("\n\n") if line]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]" and [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == [
        "1", "2"]
    assert door.closed.is_set()


async def test_a_client_that_disconnects_mid_stream_stops_the_stream() -> None:
    door = Door(endless=True)
    route = ChatRoute(passthrough, door=lambda: door)  # type: ignore[arg-type]
    await call(route, body=b'{"stream": true}', disconnect_after=3)
    await asyncio.wait_for(door.closed.wait(), 30)  # the door's stream (the upstream request) was closed
    sent = door.sent
    await asyncio.sleep(0.05)
    assert door.sent == sent  # nothing more is pulled from upstream


def test_token_of_reads_only_a_bearer_authorization() -> None:
    assert token_of([(b"authorization", b"Bearer  abc ")]) == "abc"
    assert token_of([(b"authorization", b"bearer abc")]) == "abc"
    assert token_of([(b"authorization", b"Basic abc")]) is None
    assert token_of([(b"authorization", b"Bearer ")]) is None
    assert token_of([(b"x-other", b"Bearer abc")]) is None
