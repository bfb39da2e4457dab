"""One behaviour suite for the model port, over every adapter this host runs, and each backend's quirk."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from stitchwork.compute._base import Model, open_model
from stitchwork.compute._keys import provider_keys
from stitchwork.compute._wire import assemble
from stitchwork.compute.router import Deployment, Router, RouterSettings, router_scope
from stitchwork.errors import ConfigError, ModelError, ModelRejected, ModelUnavailable
from tests.fakes.openai_server import STYLES, Fault
from tests.plugins.models import TOOLS, USER

ADAPTERS = [f"openai:{style}:{mode}" for style in STYLES for mode in ("plain", "stream")]
ADAPTERS += ["runpod:sync", "runpod:queue", "scripted", "llamacpp", "router:vllm", "router:failover"]
DEAD = "openai+http://127.0.0.1:9/v1?profile=generic&model=m&connect_timeout=0.5"
"""A deployment that refuses connections."""


@pytest.fixture(params=ADAPTERS)
async def model(request: pytest.FixtureRequest, fake: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Model]:
    kind, _, rest = request.param.partition(":")
    router: Router | None = None
    if kind == "openai":
        style, _, mode = rest.partition(":")
        server = await fake(style)
        opened = open_model(server.uri(stream="1" if mode == "stream" else "0"))
    elif kind == "runpod":
        server = await fake("vllm", runpod_queue=rest == "queue")
        opened = open_model(f"runpod://ep123?base=http://127.0.0.1:{server.port}/v2&key=secret://runpod"
                            f"&profile=vllm&model=m&poll_s=0.01")
    elif kind == "scripted":
        script = tmp_path / "turns.jsonl"
        script.write_text(json.dumps({"tool_calls": [{"id": "a", "name": "list_inbox", "arguments": {"limit": 5}},
                                                     {"id": "b", "name": "read_email", "arguments": {"id": "m1"}}]})
                          + "\n" + json.dumps({"content": "You have 3 messages."}) + "\n")
        opened = open_model(f"scripted://{script}")
    elif kind == "router":  # router://llama, served by the model gateway's router (here: its scope)
        if rest == "vllm":
            deployments = [Deployment("llama", (await fake("vllm")).uri(), "vllm")]
        else:  # the first deployment refuses connections: every call of the suite is failed over
            deployments = [Deployment("llama", DEAD, "dead"),
                           Deployment("llama", (await fake("sglang")).uri(stream="1"), "sglang")]
        router = Router(deployments, RouterSettings(affinity="none", backoff_s=0.0, cooldown_s=0.0))
        opened = open_model("router://llama")
    else:
        if shutil.which("llama-server") is None:
            pytest.skip("llama.cpp's llama-server is not installed on this host (no Linux wheel; building takes "
                        "~30 min), and no GGUF model is configured")
        pytest.skip("llamacpp:// needs a GGUF file; set one up to run this case")  # pragma: no cover
    with provider_keys(lambda name: "rp-test-key"), router_scope(router) if router else contextlib.nullcontext():
        yield opened
    await opened.aclose()
    if router is not None:
        await router.aclose()


async def test_parallel_tool_calls_then_an_answer(model: Model) -> None:
    with provider_keys(lambda name: "rp-test-key"):
        first = await model.complete(USER, TOOLS)
        assert [c.name for c in first.tool_calls] == ["list_inbox", "read_email"]
        assert [json.loads(c.arguments) for c in first.tool_calls] == [{"limit": 5}, {"id": "m1"}]
        assert all(c.id for c in first.tool_calls) and len({c.id for c in first.tool_calls}) == 2
        history = [*USER, first.as_message()] + [
            {"role": "tool", "tool_call_id": c.id, "content": "{}"} for c in first.tool_calls]
        second = await model.complete(history, TOOLS)
        assert second.tool_calls == ()
        assert second.content and "3 messages" in second.content
        if not model.uri.startswith("scripted"):
            assert first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0


async def test_chat_stream_assembles_to_the_same_answer_as_chat(model: Model) -> None:
    request = {"model": "m", "messages": USER, "tools": TOOLS}
    with provider_keys(lambda name: "rp-test-key"):
        whole = await model.chat(request)
        streamed = assemble([c async for c in model.chat_stream(request)])
    def calls(body: dict[str, Any]) -> list[tuple[str, Any]]:
        return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in body["choices"][0]["message"].get("tool_calls") or ()]
    assert calls(streamed) == calls(whole) == [("list_inbox", {"limit": 5}), ("read_email", {"id": "m1"})]


# -- quirks ------------------------------------------------------------------------------------------------------


async def test_vllm_never_gets_auto_tool_choice_and_its_refusal_names_the_flags(fake: Callable[..., Any]) -> None:
    server = await fake("vllm")
    model = open_model(server.uri())
    body = await model.chat({"messages": USER, "tools": TOOLS, "tool_choice": "auto"})
    assert "tool_choice" not in server.requests[-1]
    assert body["choices"][0]["message"]["tool_calls"]
    generic = open_model(server.uri(profile="generic"))  # the same server through a client without the quirk
    with pytest.raises(ModelRejected, match="tool-call-parser"):
        await generic.chat({"messages": USER, "tools": TOOLS, "tool_choice": "auto"})
    await model.aclose()
    await generic.aclose()


async def test_llamacpp_without_jinja_is_reported_with_the_flag(fake: Callable[..., Any]) -> None:
    server = await fake("llamacpp", llamacpp_jinja=False)
    model = open_model(server.uri())
    with pytest.raises(ModelRejected, match="--jinja"):
        await model.complete(USER, TOOLS)
    await model.aclose()


async def test_llamacpp_content_is_left_alone_when_it_is_not_a_call(fake: Callable[..., Any]) -> None:
    server = await fake("llamacpp")
    model = open_model(server.uri(stream="1"))
    history = [*USER, {"role": "assistant", "content": "hello"}]  # second turn: prose
    turn = await model.complete(history, TOOLS)
    assert turn.tool_calls == () and turn.content and turn.content.startswith("You have 3")
    await model.aclose()


async def test_ollama_tool_choice_is_emulated_and_streams_with_tools_are_not_trusted(
        fake: Callable[..., Any]) -> None:
    server = await fake("ollama")
    model = open_model(server.uri())
    none = await model.chat({"messages": USER, "tools": TOOLS, "tool_choice": "none"})
    assert "tools" not in server.requests[-1] and "tool_choice" not in server.requests[-1]
    assert not none["choices"][0]["message"].get("tool_calls")
    named = {"type": "function", "function": {"name": "read_email"}}
    await model.chat({"messages": USER, "tools": TOOLS, "tool_choice": named})
    assert [t["function"]["name"] for t in server.requests[-1]["tools"]] == ["read_email"]
    chunks = [c async for c in model.chat_stream({"messages": USER, "tools": TOOLS})]
    assert server.requests[-1].get("stream") is None  # asked unstreamed, replayed as chunks
    assert len(assemble(chunks)["choices"][0]["message"]["tool_calls"]) == 2
    raw = open_model(server.uri(profile="generic", stream="1"))  # what a naive client gets: the calls are lost
    assert (await raw.complete(USER, TOOLS)).tool_calls == ()
    await model.aclose()
    await raw.aclose()


async def test_sglang_ids_are_echoed_unchanged(fake: Callable[..., Any]) -> None:
    server = await fake("sglang")
    model = open_model(server.uri(stream="1"))
    first = await model.complete(USER, TOOLS)
    assert [c.id for c in first.tool_calls] == ["Xk29fQa7Z", "b81TqLm0c"]
    history = [*USER, first.as_message(), *({"role": "tool", "tool_call_id": c.id, "content": "{}"}
                                            for c in first.tool_calls)]
    assert (await model.complete(history, TOOLS)).content
    rewritten = json.loads(json.dumps(history).replace("Xk29fQa7Z", "call_rewritten_0"))
    with pytest.raises(ModelRejected, match="not issued"):
        await model.complete(rewritten, TOOLS)
    await model.aclose()


# -- failures ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "stream", "match"), [
    (Fault("status", 429, retry_after_s=1), False, "HTTP 429"),
    (Fault("status", 500), True, "HTTP 500"),
    (Fault("timeout", delay_s=2), False, "timed out"),
    (Fault("truncate"), True, "cut the stream"),
    (Fault("truncate"), False, "invalid JSON"),
])
async def test_failures_are_unavailable(fake: Callable[..., Any], fault: Fault, stream: bool, match: str) -> None:
    server = await fake("generic")
    server.inject(fault)
    model = open_model(server.uri(stream="1" if stream else "0", timeout="0.5"))
    with pytest.raises(ModelUnavailable, match=match) as caught:
        await model.complete(USER, TOOLS)
    if fault.status == 429:
        assert caught.value.retry_after_s == 1
    assert (await model.complete(USER, TOOLS)).tool_calls  # the next call is fine
    await model.aclose()


@pytest.mark.parametrize(("fault", "stream", "match"), [
    (Fault("status", 429, retry_after_s=0), False, "HTTP 429"),
    (Fault("status", 500), True, "HTTP 500"),
    (Fault("timeout", delay_s=2), False, "timed out"),
    (Fault("truncate"), True, "cut the stream"),
    (Fault("truncate"), False, "invalid JSON"),
])
async def test_router_model_failures_are_unavailable_once_its_retries_are_spent(
        fake: Callable[..., Any], fault: Fault, stream: bool, match: str) -> None:
    server = await fake("generic")
    server.inject(fault, times=2)
    router = Router([Deployment("llama", server.uri(stream="1" if stream else "0", timeout="0.5"), "only")],
                    RouterSettings(retries=1, backoff_s=0.0, affinity="none"))
    model = open_model("router://llama")
    with router_scope(router):
        with pytest.raises(ModelUnavailable, match=f"model 'llama': every deployment failed .*{match}"):
            await model.complete(USER, TOOLS)
        assert len(server.requests) == 2  # the first attempt and one retry
        assert (await model.complete(USER, TOOLS)).tool_calls  # the next call is fine
    await model.aclose()
    await router.aclose()


async def test_router_model_refusals_are_not_retried_and_it_is_served_only_by_a_router(
        fake: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError, match="router://MODEL_NAME"):
        open_model("router://")
    server = await fake("vllm")
    router = Router([Deployment("llama", server.uri(profile="generic"), "generic")],
                    RouterSettings(retries=2, backoff_s=0.0, affinity="none"))
    model = open_model("router://llama")
    with pytest.raises(ModelError, match="through the gateway"):
        await model.complete(USER, TOOLS)
    with router_scope(router):
        with pytest.raises(ModelRejected, match="tool-call-parser"):
            await model.chat({"messages": USER, "tools": TOOLS, "tool_choice": "auto"})
        assert len(server.requests) == 1  # a refused request fails alike everywhere: not retried
        with pytest.raises(ModelRejected, match="no deployment serves model 'nope'"):
            await open_model("router://nope").complete(USER, TOOLS)
    with pytest.raises(ModelError, match="through the gateway"):  # the scope ended
        await model.complete(USER, TOOLS)
    await model.aclose()
    await router.aclose()


async def test_refused_connection_is_unavailable() -> None:
    model = open_model("openai+http://127.0.0.1:9/v1?profile=vllm&model=m&connect_timeout=0.5")
    with pytest.raises(ModelUnavailable):
        await model.complete(USER, TOOLS)
    await model.aclose()


# -- keys ----------------------------------------------------------------------------------------------------------


async def test_provider_key_is_a_vault_reference_resolved_only_inside_the_gateway(fake: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError, match="secret://"):
        open_model("openai+http://127.0.0.1:1/v1?key=sk-raw-key")
    server = await fake("generic")
    model = open_model(server.uri(key="secret://provider"))
    with pytest.raises(ModelError, match="only injected by the model gateway"):
        await model.complete(USER, TOOLS)
    assert server.requests == []
    with provider_keys(lambda name: {"provider": "sk-prov-123"}[name]):
        await model.complete(USER, TOOLS)
    assert server.headers[-1]["authorization"] == "Bearer sk-prov-123"
    await model.aclose()


def test_unknown_profile_and_scheme_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model profile"):
        open_model("openai+http://127.0.0.1:1/v1?profile=tgi")
    with pytest.raises(ConfigError, match="did you mean"):
        open_model("openai+htp://127.0.0.1:1/v1")
