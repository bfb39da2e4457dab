"""Budgets and rate limits that hold: per-agent and per-model requests- and tokens-per-minute limits (RateLimited,
HTTP 429 with Retry-After), budget periods that reset at their boundary (an injected clock), budgets that survive
a restart, and two workers on one bus sharing one budget."""

from __future__ import annotations

import asyncio
import calendar
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from stitchwork.compute._base import Model, ModelTurn, Usage
from stitchwork.config import ComputeConfig, Config, DataConfig, IsolationConfig, MessagingConfig
from stitchwork.errors import ConfigError, PolicyDenied, RateLimited
from stitchwork.gateway.meters import Meters
from stitchwork.gateway.models import ModelDoor
from stitchwork.messaging._base import open_bus
from stitchwork.platform import BUILTIN_TOOLS, Platform
from stitchwork.workers.worker import worker_config

T0 = calendar.timegm((2026, 12, 31, 23, 58, 10))  # 50 s before the minute, 110 s before the day/month/year end
USER = [{"role": "user", "content": "hi"}]


class Fixed(Model):
    """A model that answers every call with 10 prompt and 5 completion tokens."""

    def __init__(self, uri: str = "fixed://m") -> None:
        self.uri = uri
        self.calls = 0

    async def complete(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
                       ) -> ModelTurn:
        self.calls += 1
        return ModelTurn("ok", (), Usage(10, 5), model="fixed")


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cfg(tmp_path: Path, *, state: str = "state", **compute: Any) -> Config:
    return Config(state_dir=tmp_path / state, tool_dirs=(str(BUILTIN_TOOLS),),
                  isolation=IsolationConfig(default="inline://", allow_inline=True), data=DataConfig(audit_flush_ms=5),
                  compute=ComputeConfig(**compute))


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[list[Platform]]:
    platforms: list[Platform] = []
    yield platforms
    for platform in platforms:
        await platform.aclose()


def door_of(platform: Platform, clock: Clock) -> ModelDoor:
    door = platform.gateway.models
    door.meters = Meters(door.meters.store, clock)
    return door


async def call(door: ModelDoor, token: str, model: Model) -> ModelTurn:
    return await door.complete(token, model, USER, [])


async def test_agent_requests_per_minute_trip_and_reset(tmp_path: Path, opened: list[Platform]) -> None:
    platform = Platform.open(cfg(tmp_path, agents={"assistant": {"rpm": 3}}))
    opened.append(platform)
    clock = Clock()
    door, model = door_of(platform, clock), Fixed()
    token = platform.tokens.issue("assistant", "run-1")
    for _ in range(3):
        await call(door, token, model)
    with pytest.raises(RateLimited) as limited:
        await call(door, token, model)
    assert limited.value.policy_ids == ("model-agent-rpm",) and limited.value.code == "rate_limited"
    assert limited.value.retry_after_s == pytest.approx(50.0)
    assert isinstance(limited.value, PolicyDenied) and model.calls == 3  # the provider never saw the 4th
    clock.now += 50  # the next minute
    await call(door, token, model)
    assert model.calls == 4


async def test_tokens_per_minute_count_what_answered(tmp_path: Path, opened: list[Platform]) -> None:
    platform = Platform.open(cfg(tmp_path, agents={"*": {"tpm": 30}}))
    opened.append(platform)
    clock = Clock()
    door, model = door_of(platform, clock), Fixed()
    token = platform.tokens.issue("assistant", "run-1")
    await call(door, token, model)
    await call(door, token, model)  # 30 tokens now
    with pytest.raises(RateLimited) as limited:
        await call(door, token, model)
    assert limited.value.policy_ids == ("model-agent-tpm",)
    clock.now += 60
    await call(door, token, model)


async def test_per_model_limit_counts_every_agent(tmp_path: Path, opened: list[Platform], make_agents: Any) -> None:
    platform = Platform.open(cfg(tmp_path, models={"fixed://m": {"rpm": 2}}).replace(agent_dirs=(str(make_agents),)))
    opened.append(platform)
    clock = Clock()
    door, model = door_of(platform, clock), Fixed()
    await call(door, platform.tokens.issue("alpha", "run-a"), model)
    await call(door, platform.tokens.issue("beta", "run-b"), model)
    with pytest.raises(RateLimited) as limited:
        await call(door, platform.tokens.issue("alpha", "run-a"), model)
    assert limited.value.policy_ids == ("model-rpm",)
    # another model name is not limited
    await call(door, platform.tokens.issue("alpha", "run-a"), Fixed("fixed://other"))


@pytest.fixture
def make_agents(tmp_path: Path) -> Path:
    agents = tmp_path / "agents"
    agents.mkdir()
    for name in ("alpha", "beta"):
        (agents / f"{name}.toml").write_text(f'name = "{name}"\nmodel = "fixed://m"\ntools = ["list_inbox"]\n')
    return agents


async def test_a_burst_of_concurrent_calls_cannot_all_pass_the_limit(tmp_path: Path, opened: list[Platform]) -> None:
    platform = Platform.open(cfg(tmp_path, agents={"*": {"rpm": 5}}))
    opened.append(platform)
    door, model = door_of(platform, Clock()), Fixed()
    token = platform.tokens.issue("assistant", "run-1")
    results = await asyncio.gather(*(call(door, token, model) for _ in range(12)), return_exceptions=True)
    assert sum(isinstance(r, ModelTurn) for r in results) == 5
    assert all(isinstance(r, RateLimited) for r in results if not isinstance(r, ModelTurn))


@pytest.mark.parametrize("period,step,resets", [("day", 120, True), ("month", 120, True), ("total", 86_400 * 40,
                                                                                              False)])
async def test_budget_periods_reset_at_their_boundary(period: str, step: float, resets: bool, tmp_path: Path,
                                                      opened: list[Platform]) -> None:
    platform = Platform.open(cfg(tmp_path, agents={"*": {"max_tokens": 30, "period": period}}))
    opened.append(platform)
    clock = Clock()
    door, model = door_of(platform, clock), Fixed()
    token = platform.tokens.issue("assistant", "run-1")
    await call(door, token, model)
    await call(door, token, model)
    with pytest.raises(PolicyDenied) as denied:
        await call(door, token, model)
    assert not isinstance(denied.value, RateLimited) and denied.value.policy_ids == ("model-token-budget",)
    if period != "total":
        assert "renews at 2027-01-01T00:00:00Z" in str(denied.value)
    clock.now += 60  # a minute later, same period: still exhausted
    with pytest.raises(PolicyDenied):
        await call(door, token, model)
    clock.now = T0 + step
    if resets:
        await call(door, token, model)
    else:
        with pytest.raises(PolicyDenied):
            await call(door, token, model)


async def test_cost_budget_per_month_through_a_priced_deployment(tmp_path: Path, opened: list[Platform]) -> None:
    script = tmp_path / "turns.jsonl"
    script.write_text('{"content": "' + "x" * 40 + '"}\n')
    platform = Platform.open(cfg(
        tmp_path, deployments=[{"model": "priced", "uri": f"scripted://{script}", "cost_in": 0, "cost_out": 100_000}],
        agents={"*": {"max_cost_usd": 2.0, "period": "month"}}))
    opened.append(platform)
    clock = Clock()
    door = door_of(platform, clock)
    token = platform.tokens.issue("assistant", "run-1")
    body = {"model": "priced", "messages": USER}
    await door.chat(token, body)  # 10 completion tokens at 0.1 USD per token: 1 USD
    await door.chat(token, body)
    with pytest.raises(PolicyDenied) as denied:
        await door.chat(token, body)
    assert denied.value.policy_ids == ("model-cost-budget",)
    clock.now = T0 + 120  # January
    await door.chat(token, body)


async def test_budgets_survive_a_restart(tmp_path: Path) -> None:
    config = cfg(tmp_path, agents={"*": {"max_tokens": 30}})
    first = Platform.open(config)
    try:
        token = first.tokens.issue("assistant", "run-1")
        model = Fixed()
        await call(first.gateway.models, token, model)
        await call(first.gateway.models, token, model)
    finally:
        await first.aclose()
    again = Platform.open(config)
    try:
        with pytest.raises(PolicyDenied) as denied:
            await call(again.gateway.models, again.tokens.issue("assistant", "run-2"), Fixed())
        assert denied.value.policy_ids == ("model-token-budget",)
    finally:
        await again.aclose()


@pytest.mark.parametrize("bus_kind", ["memory", "nats"])
async def test_two_workers_on_one_bus_share_one_budget(bus_kind: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    uri = "memory://" if bus_kind == "memory" else str(request.getfixturevalue("nats_url"))
    bus = await open_bus(uri)
    config = cfg(tmp_path, agents={"*": {"max_tokens": 45, "rpm": 100}}).replace(
        messaging=MessagingConfig(subject_prefix="m" + str(abs(hash(tmp_path)) % 10**8)))
    workers = [Platform.open(worker_config(config, name), role="worker", bus=bus, bus_uri=uri, worker_name=name)
               for name in ("w1", "w2")]
    try:
        model = Fixed()
        one, two = (w.gateway.models for w in workers)
        await call(one, workers[0].tokens.issue("assistant", "run-1"), model)
        await call(two, workers[1].tokens.issue("assistant", "run-2"), model)
        await one.meters.flush()
        await two.meters.flush()
        await call(one, workers[0].tokens.issue("assistant", "run-1"), model)  # 45 tokens spent across both
        await one.meters.flush()
        for platform in reversed(workers):
            with pytest.raises(PolicyDenied) as denied:
                await call(platform.gateway.models, platform.tokens.issue("assistant", "run-3"), model)
            assert denied.value.policy_ids == ("model-token-budget",)
        reading = await two.meters.read("agent:assistant")
        assert (reading.tokens_total, reading.requests_total) == (45, 3)
    finally:
        for worker in workers:
            await worker.aclose()
        await bus.aclose()


@pytest.mark.parametrize("table,message", [
    ({"period": "week"}, "period must be one of"),
    ({"rpm": -1}, "must not be negative"),
    ({"tpm": "lots"}, "whole number"),
    ({"rpm": True}, "whole number"),
    ({"max_cost_usd": "nan"}, "non-negative"),
    ({"burst": 3}, "unknown key"),
])
def test_bad_limits_are_config_errors(table: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        Platform.open(cfg(tmp_path, agents={"*": table}))


def test_bad_model_limits_and_meters_choice_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"compute\.models\.m"):
        Platform.open(cfg(tmp_path, models={"m": {"max_tokens": 3}}))
    with pytest.raises(ConfigError, match=r"compute\.meters"):
        Platform.open(cfg(tmp_path, meters="redis"))


# -- over HTTP: 429 with Retry-After, for the official openai client too ---------------------------------------------


async def test_http_door_answers_429_with_retry_after(tmp_path: Path) -> None:
    from stitchwork.interfaces.http.app import create_app
    from stitchwork.service import Service

    script = tmp_path / "turns.jsonl"
    script.write_text('{"content": "fine"}\n')
    platform = Platform.open(cfg(tmp_path, deployments=[{"model": "m", "uri": f"scripted://{script}"}],
                                 agents={"*": {"rpm": 1}}).replace(messaging=MessagingConfig(bus="memory://")),
                             role="server")
    clock = Clock()
    door_of(platform, clock)
    try:
        app = create_app(Service(platform))
        token = platform.tokens.issue("assistant", "run-1")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sw") as http:
            auth = {"authorization": f"Bearer {token}"}
            body = {"model": "m", "messages": USER}
            assert (await http.post("/v1/chat/completions", json=body, headers=auth)).status_code == 200
            limited = await http.post("/v1/chat/completions", json=body, headers=auth)
            assert limited.status_code == 429 and limited.headers["retry-after"] == "50"
            error = limited.json()["error"]
            assert error["code"] == "rate_limited" and error["policy_ids"] == ["model-agent-rpm"]
            streamed = await http.post("/v1/chat/completions", json={**body, "stream": True}, headers=auth)
            assert streamed.status_code == 429 and streamed.headers["retry-after"] == "50"
        openai = pytest.importorskip("openai")
        client = openai.AsyncOpenAI(base_url="http://sw/v1", api_key=token, max_retries=0,
                                    http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))
        with pytest.raises(openai.RateLimitError) as raised:
            await client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
        assert raised.value.response.headers["retry-after"] == "50"
        clock.now += 50
        answer = await client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "fine"
        await client.close()
    finally:
        await platform.aclose()


def test_limits_meters_and_observability_from_the_environment(tmp_path: Path) -> None:
    from stitchwork.config import load_config

    config = load_config(environ={
        "STITCHWORK_STATE_DIR": str(tmp_path), "STITCHWORK_COMPUTE__METERS": "bus",
        "STITCHWORK_COMPUTE__MODELS__LLAMA__RPM": "7", "STITCHWORK_COMPUTE__AGENTS__BOT__PERIOD": "month",
        "STITCHWORK_OBSERVABILITY__METRICS_TOKEN": "scrape", "STITCHWORK_OBSERVABILITY__OTLP_ENDPOINT": "http://c:4318",
        "STITCHWORK_OBSERVABILITY__METRICS": "false"})
    assert config.compute.meters == "bus" and config.compute.models == {"llama": {"rpm": "7"}}
    assert config.compute.agents == {"bot": {"period": "month"}}
    observability = config.observability
    assert (observability.metrics_token, observability.otlp_endpoint, observability.metrics) == (
        "scrape", "http://c:4318", False)
    from stitchwork.gateway.models import _agent_limits, _model_limits

    assert _model_limits(config.compute.models)["llama"].rpm == 7
    assert _agent_limits(config.compute.agents)["bot"].period == "month"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(environ={"STITCHWORK_OBSERVABILITY__SCRAPE": "x"})
