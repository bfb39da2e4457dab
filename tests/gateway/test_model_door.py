"""The model gateway end to end: a tool-using agent loop through it against every recorded backend style, the
OpenAI-compatible endpoint (with the OpenAI SDK), allowlists and budgets in Cedar, metering, audit, and the
provider key never reaching anything an agent, a log or the audit log can see."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from stitchwork.agents.runs import RunStatus
from stitchwork.config import ComputeConfig, Config, DataConfig, IsolationConfig
from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import BUILTIN_TOOLS, Platform
from stitchwork.service import Service, event_dict
from tests.fakes.openai_server import STYLES, FakeOpenAIServer
from tests.plugins.models import TOOLS

KEY = "sk-prov-Zq8xW2vN5mR7tY1uI3oP"
TASK = "What is in my inbox? Read the first mail."


def config(tmp_path: Path, **compute: Any) -> Config:
    return Config(state_dir=tmp_path / "state", tool_dirs=(str(BUILTIN_TOOLS),),
                  isolation=IsolationConfig(default="inline://", timeout_s=10, allow_inline=True),
                  data=DataConfig(audit_flush_ms=5),
                  compute=ComputeConfig(**compute))


def open_platform(cfg: Config) -> Platform:
    platform = Platform.open(cfg, role="server")
    platform.vault.set("provider_key", KEY)
    platform.gateway.refresh_secrets()
    return platform


def audit(platform: Platform, kind: str | None = None) -> list[dict[str, Any]]:
    platform.audit.flush()
    return [event_dict(e) for e in platform.audit.tail(10_000) if kind is None or e.kind == kind]


@pytest.mark.parametrize("stream", ["0", "1"])
@pytest.mark.parametrize("style", STYLES)
async def test_default_assistant_runs_a_tool_loop_through_the_gateway_and_the_key_stays_hidden(
        style: str, stream: str, fake: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = await fake(style)
    platform = open_platform(config(tmp_path))
    try:
        uri = server.uri(key="secret://provider_key", stream=stream)
        record = await platform.runner.start("assistant", TASK, model=uri)
        assert record.status is RunStatus.COMPLETED, record.error
        assert "3 messages" in record.result
        results = {m["name"]: json.loads(m["content"]) for m in record.messages if m["role"] == "tool"}
        assert results["list_inbox"]["status"] == "ok" and len(results["list_inbox"]["result"]) == 3
        assert results["read_email"]["status"] == "ok" and results["read_email"]["result"]["id"] == "m1"
        # the provider got the key in its Authorization header, and only there
        assert {h["authorization"] for h in server.headers} == {f"Bearer {KEY}"}
        assert KEY not in json.dumps(server.requests)
        events = audit(platform)
        model_events = [e for e in events if e["kind"] == "model"]
        assert [e["decision"] for e in model_events] == ["ok", "ok"]
        assert all(len(e["data"]["prompt_sha256"]) == 64 and "prompt" not in e["data"] for e in model_events)
        assert model_events[0]["data"]["tool_calls"] == ["list_inbox", "read_email"]
        assert model_events[0]["data"]["prompt_tokens"] > 0
        visible = json.dumps([record.to_dict(), events], default=str) + caplog.text
        assert KEY not in visible and "Zq8xW2vN5mR7" not in visible
    finally:
        await platform.aclose()


async def test_a_secret_in_the_conversation_is_redacted_before_the_provider(fake: Callable[..., Any],
                                                                             tmp_path: Path) -> None:
    server = await fake("generic")
    platform = open_platform(config(tmp_path))
    try:
        record = await platform.runner.start("assistant", f"my key is {KEY}, keep it safe",
                                             model=server.uri(key="secret://provider_key"))
        assert record.status is RunStatus.COMPLETED
        sent = json.dumps(server.requests)
        assert KEY not in sent and "[secret:provider_key]" in sent
    finally:
        await platform.aclose()


async def test_without_the_gateway_a_keyed_model_cannot_be_called(fake: Callable[..., Any], tmp_path: Path) -> None:
    from stitchwork.compute._base import open_model
    from stitchwork.errors import ModelError

    server = await fake("generic")
    model = open_model(server.uri(key="secret://provider_key"))
    with pytest.raises(ModelError, match="model gateway"):
        await model.complete([{"role": "user", "content": "hi"}], TOOLS)
    assert server.requests == []
    await model.aclose()


# -- the HTTP endpoint ---------------------------------------------------------------------------------------------


async def serve(app: Any) -> tuple[str, Callable[[], Any]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto TCP: asyncio sets NODELAY
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await task

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@pytest.fixture
async def endpoint(fake: Callable[..., Any], tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    vllm: FakeOpenAIServer = await fake("vllm")
    ollama: FakeOpenAIServer = await fake("ollama")
    cfg = config(
        tmp_path, strategy="failover", affinity="none",
        deployments=[
            {"model": "llama", "uri": vllm.uri(key="secret://provider_key"), "id": "vllm-a", "cost_in": 1,
             "cost_out": 2},
            {"model": "llama", "uri": ollama.uri(key="secret://provider_key"), "id": "ollama-b"},
            {"model": "big", "uri": vllm.uri(key="secret://provider_key"), "id": "vllm-big"},
        ],
        agents={"*": {"models": ["llama"], "max_tokens": 400}},
    )
    platform = open_platform(cfg)
    service = Service(platform)
    operator = service.create_operator_token()
    url, stop = await serve(create_app(service))
    token = platform.tokens.issue("assistant", "run-http-1")
    try:
        yield {"url": url, "token": token, "operator": operator, "platform": platform, "vllm": vllm,
               "ollama": ollama}
    finally:
        await stop()
        await platform.aclose()


async def test_openai_sdk_against_the_gateway_streamed_and_not(endpoint: dict[str, Any]) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=endpoint["url"] + "/v1", api_key=endpoint["token"], max_retries=0)
    messages = [{"role": "user", "content": "inbox?"}]
    models = await client.models.list()
    assert [m.id for m in models.data] == ["llama"]
    answer = await client.chat.completions.create(model="llama", messages=messages, tools=TOOLS,
                                                  tool_choice="auto")
    assert [c.function.name for c in answer.choices[0].message.tool_calls] == ["list_inbox", "read_email"]
    assert answer.model == "llama" and answer.usage.prompt_tokens > 0
    assert "tool_choice" not in endpoint["vllm"].requests[-1]  # the vLLM profile's workaround, behind the gateway
    assert endpoint["vllm"].headers[-1]["authorization"] == f"Bearer {KEY}"  # the key replaces the run token
    stream = await client.chat.completions.create(model="llama", messages=messages, tools=TOOLS, stream=True)
    names: dict[int, str] = {}
    async for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.function and call.function.name:
                names[call.index] = call.function.name
    assert names == {0: "list_inbox", 1: "read_email"}
    agent_base = openai.AsyncOpenAI(base_url=endpoint["url"] + "/v1/agent", api_key=endpoint["token"])
    assert [m.id for m in (await agent_base.models.list()).data] == ["llama"]
    await client.close()
    await agent_base.close()


async def test_endpoint_authenticates_enforces_allowlist_and_budget_and_meters(endpoint: dict[str, Any]) -> None:
    url, token, platform = endpoint["url"], endpoint["token"], endpoint["platform"]
    body = {"model": "llama", "messages": [{"role": "user", "content": "inbox?"}], "tools": TOOLS}
    async with httpx.AsyncClient(base_url=url) as http:
        missing = await http.post("/v1/chat/completions", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "token_missing"
        operator = await http.post("/v1/chat/completions", json=body,
                                   headers={"authorization": f"Bearer {endpoint['operator']}"})
        assert operator.status_code == 401  # an operator token is not a run token
        auth = {"authorization": f"Bearer {token}"}
        not_listed = await http.post("/v1/chat/completions", json={**body, "model": "big"}, headers=auth)
        assert not_listed.status_code == 403
        assert not_listed.json()["error"]["policy_ids"] == ["model-not-allowed"]
        unknown = await http.post("/v1/chat/completions", json={**body, "model": "gpt-5"}, headers=auth)
        assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]["message"]
        spent = 0
        while spent < 400:
            ok = await http.post("/v1/chat/completions", json=body, headers=auth)
            assert ok.status_code == 200, ok.text
            spent += ok.json()["usage"]["total_tokens"]
        over = await http.post("/v1/chat/completions", json=body, headers=auth)
        assert over.status_code == 403 and over.json()["error"]["policy_ids"] == ["model-token-budget"]
        denied_state = await http.get("/v1/compute/deployments", headers=auth)
        assert denied_state.status_code == 401  # operator only
        state = (await http.get("/v1/compute/deployments",
                                headers={"authorization": f"Bearer {endpoint['operator']}"})).json()
    usage = state["usage"]["assistant"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == spent
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2) / 1e6)
    assert {d["id"]: d["healthy"] for d in state["deployments"]} == {"vllm-a": True, "ollama-b": True,
                                                                       "vllm-big": True}
    assert KEY not in json.dumps(state)
    events = audit(platform, "model")
    assert [e["data"]["policy_ids"] for e in events if e["decision"] == "deny"] == [["model-not-allowed"],
                                                                                     ["model-token-budget"]]
    assert KEY not in json.dumps(audit(platform))


async def test_endpoint_fails_over_when_a_deployment_dies(endpoint: dict[str, Any]) -> None:
    await endpoint["vllm"].stop()
    body = {"model": "llama", "messages": [{"role": "user", "content": "inbox?"}], "tools": TOOLS}
    async with httpx.AsyncClient(base_url=endpoint["url"]) as http:
        auth = {"authorization": f"Bearer {endpoint['token']}"}
        answer = await http.post("/v1/chat/completions", json=body, headers=auth)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["tool_calls"]
        state = (await http.get("/v1/compute/deployments",
                                headers={"authorization": f"Bearer {endpoint['operator']}"})).json()
    health = {d["id"]: d for d in state["deployments"]}
    assert health["vllm-a"]["healthy"] is False and health["vllm-a"]["consecutive_failures"] == 1
    assert health["ollama-b"]["calls"] == 1
    events = [e for e in audit(endpoint["platform"], "model") if e["decision"] == "ok"]
    assert events[-1]["data"]["deployment"] == "ollama-b" and events[-1]["data"]["attempts"] == 2


async def test_record_text_puts_the_redacted_prompt_in_the_audit(fake: Callable[..., Any], tmp_path: Path) -> None:
    server = await fake("generic")
    platform = open_platform(config(tmp_path, record_text=True))
    try:
        await platform.runner.start("assistant", f"inbox please ({KEY})", model=server.uri(key="secret://provider_key"))
        first = audit(platform, "model")[0]["data"]
        assert "inbox please ([secret:provider_key])" in json.dumps(first["prompt"])
        assert first["completion"]["tool_calls"]
    finally:
        await platform.aclose()


async def test_agent_loop_through_the_router_fails_over_to_another_provider(fake: Callable[..., Any],
                                                                           tmp_path: Path) -> None:
    vllm: FakeOpenAIServer = await fake("vllm")
    llamacpp: FakeOpenAIServer = await fake("llamacpp")
    await vllm.stop()  # the primary is down from the start
    cfg = config(tmp_path, affinity="prefix", deployments=[
        {"model": "llama", "uri": vllm.uri(key="secret://provider_key"), "id": "primary"},
        {"model": "llama", "uri": llamacpp.uri(key="secret://provider_key"), "id": "local"}])
    platform = open_platform(cfg)
    try:
        record = await platform.runner.start("assistant", TASK, model="router://llama")
        assert record.status is RunStatus.COMPLETED, record.error
        assert [m["name"] for m in record.messages if m["role"] == "tool"] == ["list_inbox", "read_email"]
        assert platform.gateway.models is not None
        health = {s["id"]: s for s in platform.gateway.models.router.state()}
        assert health["primary"]["healthy"] is False and health["local"]["calls"] == 2
        assert [e["data"]["deployment"] for e in audit(platform, "model")] == ["local", "local"]
    finally:
        await platform.aclose()
