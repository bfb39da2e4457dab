"""Models that work with real servers: ``--model openai+http://HOST/v1`` without ``model=`` sends the name the server
serves (asked at ``GET /v1/models``), never the URI; and the model gateway accepts tool results as a string or as a
list of content parts (the OpenAI Agents SDK sends lists), for the official ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from stitchwork.agents.runs import RunStatus
from stitchwork.config import ComputeConfig, Config, DataConfig, IsolationConfig, MessagingConfig
from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import BUILTIN_TOOLS, Platform
from stitchwork.service import Service
from tests.fakes.openai_server import FakeOpenAIServer

TASK = "What is in my inbox? Read the first mail."


def config(tmp_path: Path, **compute: Any) -> Config:
    return Config(state_dir=tmp_path / "state", tool_dirs=(str(BUILTIN_TOOLS),),
                  isolation=IsolationConfig(default="inline://", timeout_s=10, allow_inline=True),
                  data=DataConfig(audit_flush_ms=5),
                  messaging=MessagingConfig(bus="memory://"), compute=ComputeConfig(**compute))


@pytest.mark.parametrize("style", ["vllm", "ollama", "llamacpp"])
async def test_run_with_a_bare_server_uri_sends_the_served_model(style: str, fake: Callable[..., Any],
                                                                 tmp_path: Path) -> None:
    server: FakeOpenAIServer = await fake(style, model="served/model-7b")
    platform = Platform.open(config(tmp_path))
    try:
        uri = f"openai+http://127.0.0.1:{server.port}/v1?profile={style}"  # as `stitchwork run --model URI`
        record = await platform.runner.start("assistant", TASK, model=uri)
        assert record.status is RunStatus.COMPLETED, record.error
        assert {body["model"] for body in server.requests} == {"served/model-7b"}
    finally:
        await platform.aclose()


async def test_a_server_with_several_models_fails_the_run_with_the_list(fake: Callable[..., Any],
                                                                        tmp_path: Path) -> None:
    server: FakeOpenAIServer = await fake("generic", served=("small", "large"))
    platform = Platform.open(config(tmp_path))
    try:
        record = await platform.runner.start("assistant", TASK, model=f"openai+http://127.0.0.1:{server.port}/v1")
        assert record.status is RunStatus.FAILED
        assert "small" in (record.error or "") and "large" in (record.error or "") and "?model=" in (record.error
                                                                                                    or "")
        assert server.requests == []
    finally:
        await platform.aclose()


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "list_inbox", "arguments": "{}"}}


@pytest.mark.parametrize("content", [
    "3 messages",
    [{"type": "text", "text": "3 "}, {"type": "text", "text": "messages"}],
    [{"type": "output_text", "text": "3 messages"}],
])
async def test_tool_results_as_string_or_content_parts_through_the_openai_client(
        content: Any, fake: Callable[..., Any], tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    upstream: FakeOpenAIServer = await fake("sglang")
    platform = Platform.open(config(tmp_path, deployments=[{"model": "m", "uri": upstream.uri()}]), role="server")
    try:
        app = create_app(Service(platform))
        token = platform.tokens.issue("assistant", "run-1")
        client = openai.AsyncOpenAI(base_url="http://sw/v1", api_key=token, max_retries=0,
                                    http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))
        sglang_id = "abcDEF123"  # SGLang checks ids are echoed: 9 alphanumerics
        messages = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                    {"role": "user", "content": "inbox?"},
                    {"role": "assistant", "content": None, "tool_calls": [{**TOOL_CALL, "id": sglang_id}]},
                    {"role": "tool", "tool_call_id": sglang_id, "content": content}]
        answer = await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
        assert answer.choices[0].message is not None
        sent = upstream.requests[-1]["messages"]
        assert sent[-1]["content"] == "3 messages" and sent[0]["content"] == "be brief"
        await client.close()
    finally:
        await platform.aclose()


@pytest.mark.parametrize("messages,fragment", [
    ([{"role": "tool", "tool_call_id": "x", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
     "text parts only"),
    ([{"role": "tool", "tool_call_id": "x", "content": [{"type": "text"}]}], "text parts only"),
    ([{"role": "tool", "tool_call_id": "x", "content": 42}], "must be a string"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "no role"}], "string role"),
    (["not an object"], "string role"),
])
async def test_malformed_messages_are_a_clear_400(messages: Any, fragment: str, fake: Callable[..., Any],
                                                  tmp_path: Path) -> None:
    upstream: FakeOpenAIServer = await fake("generic")
    platform = Platform.open(config(tmp_path, deployments=[{"model": "m", "uri": upstream.uri()}]), role="server")
    try:
        app = create_app(Service(platform))
        token = platform.tokens.issue("assistant", "run-1")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sw") as http:
            response = await http.post("/v1/chat/completions", json={"model": "m", "messages": messages},
                                       headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 400, response.text
        assert fragment in response.json()["error"]["message"]
        assert upstream.requests == []
        assert json.dumps(response.json())
    finally:
        await platform.aclose()
