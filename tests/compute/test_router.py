"""The router against fake deployments: strategies, retries, cooldown, fallbacks, affinity, streaming failover."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from stitchwork.compute._wire import assemble
from stitchwork.compute.router import Deployment, Routed, Router, RouterSettings, parse_deployments
from stitchwork.errors import ConfigError, ModelRejected, ModelUnavailable
from tests.fakes.openai_server import Fault
from tests.plugins.models import TOOLS

DEAD = "openai+http://127.0.0.1:9/v1?profile=generic&model=m&connect_timeout=0.5"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def request(text: str = "What is in my inbox?") -> dict[str, Any]:
    return {"model": "llama", "messages": [{"role": "user", "content": text}], "tools": TOOLS}


async def test_ordered_failover_puts_a_dead_deployment_in_cooldown_and_shows_it(fake: Callable[..., Any]) -> None:
    live = await fake("vllm")
    clock = Clock()
    router = Router([Deployment("llama", DEAD, "dead"), Deployment("llama", live.uri(), "live")],
                    RouterSettings(affinity="none", cooldown_s=30), clock=clock, sleep=clock.sleep)
    routed = await router.chat("llama", request())
    assert (routed.deployment.id, routed.attempts) == ("live", 2)
    state = {s["id"]: s for s in router.state()}
    assert state["dead"]["healthy"] is False and state["dead"]["cooldown_s"] == 30
    assert state["dead"]["last_error"] and state["live"]["healthy"] is True
    assert "key=" not in state["live"]["uri"]
    again = await router.chat("llama", request())
    assert (again.deployment.id, again.attempts) == ("live", 1)  # the cooling one is not tried first
    clock.now += 31
    assert {s["id"]: s["healthy"] for s in router.state()} == {"dead": True, "live": True}
    await router.aclose()


async def test_rate_limit_backs_off_by_retry_after_and_retries(fake: Callable[..., Any]) -> None:
    server = await fake("generic")
    server.inject(Fault("status", 429, retry_after_s=0.5), times=2)
    clock = Clock()
    router = Router([Deployment("llama", server.uri(), "only")],
                    RouterSettings(retries=2, backoff_s=0.1, max_backoff_s=1.0, affinity="none"), clock=clock,
                    sleep=clock.sleep)
    routed = await router.chat("llama", request())
    assert routed.attempts == 3 and clock.slept == [0.5, 0.5]
    server.inject(Fault("status", 500), times=3)
    with pytest.raises(ModelUnavailable, match="every deployment failed"):
        await router.chat("llama", request())
    await router.aclose()


async def test_a_rejected_request_is_not_retried(fake: Callable[..., Any]) -> None:
    server = await fake("llamacpp", llamacpp_jinja=False)
    other = await fake("llamacpp")
    router = Router([Deployment("llama", server.uri(), "a"), Deployment("llama", other.uri(), "b")],
                    RouterSettings(affinity="none"))
    with pytest.raises(ModelRejected, match="--jinja"):
        await router.chat("llama", request())
    assert len(server.requests) == 1 and other.requests == []
    assert all(s["healthy"] for s in router.state())
    await router.aclose()


async def test_fallbacks_cross_to_another_model_and_provider(fake: Callable[..., Any]) -> None:
    small = await fake("ollama")
    router = Router([Deployment("big", DEAD, "big-a"), Deployment("small", small.uri(), "small-a")],
                    RouterSettings(retries=1, affinity="none", fallbacks={"big": ("small",)}),
                    sleep=Clock().sleep)
    routed = await router.chat("big", request())
    assert routed.deployment.id == "small-a" and routed.attempts == 3
    with pytest.raises(ConfigError, match="no deployment serves"):
        Router([Deployment("big", DEAD)], RouterSettings(fallbacks={"big": ("nope",)}))
    with pytest.raises(ModelRejected, match="no deployment serves model 'nope'"):
        await router.chat("nope", request())
    await router.aclose()


async def test_least_outstanding_spreads_concurrent_calls(fake: Callable[..., Any]) -> None:
    a = await fake("vllm", latency_s=0.05)
    b = await fake("sglang", latency_s=0.05)
    router = Router([Deployment("llama", a.uri(), "a"), Deployment("llama", b.uri(), "b")],
                    RouterSettings(strategy="least_outstanding", affinity="none"))
    await asyncio.gather(*(router.chat("llama", request()) for _ in range(6)))
    assert (len(a.requests), len(b.requests)) == (3, 3)
    await router.aclose()


async def test_cost_strategy_prefers_the_cheapest(fake: Callable[..., Any]) -> None:
    a = await fake("vllm")
    b = await fake("generic")
    router = Router([Deployment("llama", a.uri(), "dear", cost_in=3, cost_out=15),
                     Deployment("llama", b.uri(), "cheap", cost_in=0.1, cost_out=0.2)],
                    RouterSettings(strategy="cost", affinity="none"))
    routed = await router.chat("llama", request())
    assert routed.deployment.id == "cheap"
    usage = routed.completion["usage"]
    assert routed.deployment.cost_usd(usage["prompt_tokens"], usage["completion_tokens"]) > 0
    await router.aclose()


def test_latency_strategy_weights_by_observed_latency() -> None:
    router = Router([Deployment("m", DEAD, "slow"), Deployment("m", DEAD, "fast"), Deployment("m", DEAD, "new")],
                    RouterSettings(strategy="latency", affinity="none"))
    slow, fast, new = router.groups["m"]
    slow.latency_s, fast.latency_s = 1.0, 0.001
    firsts = [router.order("m", request())[:2] for _ in range(100)]
    assert all(order[0] is new for order in firsts)  # untried first, to learn its latency
    assert sum(order[1] is fast for order in firsts) >= 90


def test_prefix_affinity_keeps_a_conversation_on_one_deployment() -> None:
    router = Router([Deployment("m", DEAD, f"d{i}") for i in range(3)],
                    RouterSettings(strategy="least_outstanding", affinity="prefix"))
    chosen = {router.order("m", request("same long system prompt"))[0].deployment.id for _ in range(5)}
    assert len(chosen) == 1
    router.groups["m"][0].outstanding = 5  # load does not move a warm prefix
    assert router.order("m", request("same long system prompt"))[0].deployment.id in chosen
    spread = {router.order("m", request(f"conversation {i}"))[0].deployment.id for i in range(30)}
    assert len(spread) == 3


async def test_stream_fails_over_before_the_first_chunk_only(fake: Callable[..., Any]) -> None:
    a = await fake("vllm")
    b = await fake("generic")
    router = Router([Deployment("llama", a.uri(), "a"), Deployment("llama", b.uri(), "b")],
                    RouterSettings(affinity="none"), sleep=Clock().sleep)
    a.inject(Fault("status", 503))
    routed: list[Routed] = []
    chunks = [c async for c in router.chat_stream("llama", request(), routed)]
    assert routed[0].deployment.id == "b" and assemble(chunks)["choices"][0]["message"]["tool_calls"]
    router.groups["llama"][0].cooldown_until = 0.0
    a.inject(Fault("truncate"))
    seen: list[dict[str, Any]] = []
    with pytest.raises(ModelUnavailable, match="cut the stream"):
        async for chunk in router.chat_stream("llama", request(), []):
            seen.append(chunk)
    assert seen and len(b.requests) == 1  # not replayed elsewhere after chunks went out
    await router.aclose()


def test_deployments_from_config_tables() -> None:
    parsed = parse_deployments([{"model": "m", "uri": DEAD, "cost_in": 1, "cost_out": "2"}])
    assert parsed == [Deployment("m", DEAD, "", 1.0, 1.0, 2.0)]
    with pytest.raises(ConfigError, match="unknown key"):
        parse_deployments([{"model": "m", "uri": DEAD, "price": 1}])
    with pytest.raises(ConfigError, match="strategy"):
        RouterSettings(strategy="random")
