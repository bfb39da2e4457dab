"""Observability: Prometheus ``/metrics`` scraped and parsed with ``prometheus_client``'s own parser, its tokens, and
OpenTelemetry spans for each gateway stage and model call captured with the SDK's in-memory exporter (names,
decisions and GenAI usage; never argument values, prompts or secrets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from stitchwork.config import ComputeConfig, Config, DataConfig, IsolationConfig, MessagingConfig, ObservabilityConfig
from stitchwork.interfaces.http.app import create_app
from stitchwork.observability import METRICS, TRACING
from stitchwork.observability.tracing import Tracing
from stitchwork.platform import BUILTIN_TOOLS, Platform
from stitchwork.service import Service

SCRAPE = "scrape-Hq7vN2xW9"
SECRET_ARG = "Zx9-argument-value-that-must-not-leak"
USER = [{"role": "user", "content": "the prompt text must not leak"}]


@dataclass
class Plane:
    platform: Platform
    service: Service
    http: httpx.AsyncClient
    operator: str
    token: str


@pytest.fixture
async def plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Plane]:
    monkeypatch.chdir(tmp_path)  # inline:// tools write relative paths (the mail tool's outbox) in the cwd
    METRICS.reset()
    script = tmp_path / "turns.jsonl"
    script.write_text('{"content": "answer"}\n')
    config = Config(
        state_dir=tmp_path / "state", tool_dirs=(str(BUILTIN_TOOLS),),
        isolation=IsolationConfig(default="inline://", allow_inline=True),
        data=DataConfig(audit_flush_ms=5), messaging=MessagingConfig(bus="memory://"),
        compute=ComputeConfig(deployments=[{"model": "m", "uri": f"scripted://{script}", "cost_in": 1_000,
                                            "cost_out": 2_000}]),
        observability=ObservabilityConfig(metrics_token=SCRAPE),
    )
    platform = Platform.open(config, role="server")
    service = Service(platform)
    operator = service.create_operator_token()
    platform.gateway.open_run("run-1", "assistant", workdir=tmp_path / "work", max_steps=10)
    token = platform.tokens.issue("assistant", "run-1")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)), base_url="http://sw") as http:
        try:
            yield Plane(platform, service, http, operator, token)
        finally:
            await platform.aclose()
            METRICS.reset()


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(plane: Plane, token: str | None = None) -> httpx.Response:
    return await plane.http.get("/metrics", headers={"authorization": f"Bearer {token or plane.operator}"})


async def test_metrics_count_calls_decisions_approvals_tokens_queue_and_audit_lag(plane: Plane) -> None:
    gateway = plane.platform.gateway
    ok = await gateway.call_tool(plane.token, "list_inbox", {"limit": 2})
    assert ok.status == "ok"
    bad = await gateway.call_tool(plane.token, "list_inbox", {"limit": SECRET_ARG})
    assert bad.status == "invalid"
    assert (await gateway.call_tool("not-a-token", "list_inbox", {})).status == "unauthenticated"
    answer = await gateway.models.chat(plane.token, {"model": "m", "messages": USER})
    usage = answer["usage"]
    approval = plane.platform.approvals.request(run_id="run-1", agent="assistant", tool="send_email", target="x@y.z",
                                                arguments={"to": "x@y.z"}, policy_ids=("p",), reason="test")
    plane.platform.approvals.request(run_id="run-1", agent="assistant", tool="send_email", target="q@y.z",
                                     arguments={"to": "q@y.z"}, policy_ids=("p",), reason="test")
    await plane.service.decide(approval.id, approve=True, by="tester", resume=False)

    response = await scrape(plane)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse(response.text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("stitchwork_tool_calls_total", tool="list_inbox", status="ok") == 1
    assert value("stitchwork_tool_calls_total", tool="list_inbox", status="invalid") == 1
    assert value("stitchwork_tool_calls_total", tool="?", status="unauthenticated") == 1
    assert value("stitchwork_policy_decisions_total", policy_id="read-permit", effect="allow") >= 1
    assert value("stitchwork_model_calls_total", agent="assistant", model="m", status="ok") == 1
    assert value("stitchwork_model_tokens_total", agent="assistant", model="m", kind="input") == usage["prompt_tokens"]
    assert value("stitchwork_model_tokens_total", agent="assistant", model="m", kind="output") == usage[
        "completion_tokens"]
    cost = (usage["prompt_tokens"] * 1_000 + usage["completion_tokens"] * 2_000) / 1e6
    assert value("stitchwork_model_cost_usd_total", agent="assistant", model="m") == pytest.approx(cost)
    assert value("stitchwork_model_latency_seconds_count", model="m") == 1
    assert value("stitchwork_approvals_decided_total", outcome="approved") == 1
    assert value("stitchwork_approval_latency_seconds_count", outcome="approved") == 1
    assert value("stitchwork_queue_depth", queue="approvals") == 1  # the second one is still pending
    assert ("stitchwork_audit_lag_events", ()) in samples
    assert value("stitchwork_sandbox_seconds_count", sandbox="inline://") == 1
    # names and counts only: no argument value, prompt or token in the exposition
    for leak in (SECRET_ARG, "the prompt text", plane.token, plane.operator):
        assert leak not in response.text


async def test_metrics_need_the_operator_or_the_scrape_token_and_the_scrape_token_opens_nothing_else(
        plane: Plane) -> None:
    assert (await plane.http.get("/metrics")).status_code == 401
    assert (await scrape(plane, "wrong")).status_code == 401
    assert (await scrape(plane, plane.token)).status_code == 401  # a run token is not enough
    assert (await scrape(plane, SCRAPE)).status_code == 200
    assert (await plane.http.get("/v1/runs", headers={"authorization": f"Bearer {SCRAPE}"})).status_code == 401
    denied = [e for e in plane.platform.audit.tail(100) if e.kind == "auth" and e.tool == "/metrics"]
    assert len(denied) == 3


async def test_a_labels_value_is_escaped(plane: Plane) -> None:
    METRICS.tool_calls.inc('we"ird\\na\nme', "ok")
    samples = parse((await scrape(plane)).text)
    assert samples[("stitchwork_tool_calls_total", (("status", "ok"), ("tool", 'we"ird\\na\nme')))] == 1


def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path / "s", tool_dirs=(str(BUILTIN_TOOLS),), messaging=MessagingConfig(
        bus="memory://"), observability=ObservabilityConfig(metrics=False))
    platform = Platform.open(config, role="server")
    try:
        app = create_app(Service(platform))
        assert "/metrics" not in {getattr(r, "path", "") for r in app.routes}
    finally:
        import asyncio

        asyncio.run(platform.aclose())


# -- OpenTelemetry ---------------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[Any]:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    TRACING.use(provider)
    try:
        yield exporter
    finally:
        TRACING.reset()


def attributes_text(finished: Any) -> str:
    return json.dumps([dict(s.attributes or {}) for s in finished], default=str)


async def test_a_tool_call_is_one_span_with_a_child_per_stage(plane: Plane, spans: Any) -> None:
    outcome = await plane.platform.gateway.call_tool(plane.token, "send_email",
                                                     {"to": "boss@example.com", "subject": "s", "body": SECRET_ARG})
    finished = spans.get_finished_spans()
    root = next(s for s in finished if s.name == "gateway.tool_call")
    children = [s.name for s in finished if s.parent is not None and s.parent.span_id == root.context.span_id]
    assert children == ["gateway.authenticate", "gateway.validate", "gateway.authorize", "gateway.approve",
                        "gateway.secrets", "gateway.execute", "gateway.audit"]
    attributes = dict(root.attributes or {})
    assert attributes["stitchwork.tool.name"] == "send_email" and attributes["stitchwork.agent"] == "assistant"
    assert attributes["stitchwork.status"] == outcome.status == "ok"
    assert attributes["stitchwork.decision"] == "allow" and attributes["stitchwork.side_effect"] == "external"
    assert list(attributes["stitchwork.policy_ids"]) == list(outcome.policy_ids) and outcome.policy_ids
    authorize = next(s for s in finished if s.name == "gateway.authorize")
    assert authorize.attributes["stitchwork.decision"] == "allow"
    text = attributes_text(finished)
    assert SECRET_ARG not in text and "boss@example.com" not in text and plane.token not in text


async def test_a_refused_tool_call_stops_after_its_stage(plane: Plane, spans: Any) -> None:
    await plane.platform.gateway.call_tool(plane.token, "list_inbox", {"limit": SECRET_ARG})
    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["gateway.authenticate", "gateway.validate", "gateway.tool_call"]
    root = spans.get_finished_spans()[-1]
    assert root.attributes["stitchwork.status"] == "invalid"
    assert SECRET_ARG not in attributes_text(spans.get_finished_spans())


async def test_a_model_call_span_follows_the_genai_conventions(plane: Plane, spans: Any) -> None:
    answer = await plane.platform.gateway.models.chat(plane.token, {"model": "m", "messages": USER})
    (span,) = [s for s in spans.get_finished_spans() if s.name == "chat m"]
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == "m"
    assert attributes["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop"]
    assert attributes["stitchwork.decision"] == "allow"
    assert "the prompt text" not in attributes_text([span]) and "answer" not in attributes_text([span])


async def test_a_denied_model_call_span_carries_the_policy(plane: Plane, spans: Any) -> None:
    from stitchwork.errors import PolicyDenied
    from stitchwork.gateway.models import AgentModels

    plane.platform.gateway.models.limits["assistant"] = AgentModels(models=("other",))
    with pytest.raises(PolicyDenied):
        await plane.platform.gateway.models.chat(plane.token, {"model": "m", "messages": USER})
    (span,) = spans.get_finished_spans()
    assert span.attributes["stitchwork.decision"] == "deny"
    assert list(span.attributes["stitchwork.policy_ids"]) == ["model-not-allowed"]
    assert span.status.is_ok is False and span.attributes["error.type"] == "policy_denied"


async def test_streamed_model_calls_are_spanned_too(plane: Plane, spans: Any) -> None:
    chunks = [c async for c in plane.platform.gateway.models.chat_stream(plane.token, {"model": "m",
                                                                                       "messages": USER})]
    assert chunks
    (span,) = [s for s in spans.get_finished_spans() if s.name == "chat m"]
    assert span.attributes["stitchwork.stream"] is True and span.attributes["gen_ai.usage.output_tokens"] >= 0


def test_tracing_is_off_unless_configured_and_honours_otel_env() -> None:
    tracing = Tracing()
    assert tracing.configure("", environ={}) is False and tracing.span("x") is tracing.span("y")  # one no-op
    assert tracing.configure("http://127.0.0.1:4318", environ={"OTEL_SDK_DISABLED": "true"}) is False
    assert tracing.configure("", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) is True
    assert tracing.span("real") is not tracing.span("real")
    tracing.shutdown()
    assert tracing.enabled is False
    configured = Tracing()
    assert configured.configure("http://127.0.0.1:9", environ={}) is True
    exporter = configured._provider._active_span_processor._span_processors[0].span_exporter
    assert exporter._endpoint == "http://127.0.0.1:9/v1/traces"
    configured.shutdown()


async def test_sandbox_kills_are_counted_by_reason(tmp_path: Path) -> None:
    from stitchwork.isolation._base import Sandbox, SandboxResult, SandboxSpec

    class Killing(Sandbox):
        uri = "killing://"

        async def run(self, spec: SandboxSpec) -> SandboxResult:
            return SandboxResult(exit_code=-9, killed="timeout", duration_s=0.01)

    METRICS.reset()
    config = Config(state_dir=tmp_path / "state", tool_dirs=(str(BUILTIN_TOOLS),),
                    isolation=IsolationConfig(default="killing://?limits=tight"), data=DataConfig(audit_flush_ms=5))
    platform = Platform.open(config)
    try:
        platform.gateway.context.sandboxes._bound["killing://?limits=tight"] = Killing()
        platform.gateway.open_run("run-k", "assistant", workdir=tmp_path / "w", max_steps=5)
        outcome = await platform.gateway.call_tool(platform.tokens.issue("assistant", "run-k"), "list_inbox", {})
        assert outcome.status == "error" and outcome.error and outcome.error["error"] == "tool_timeout"
        assert METRICS.sandbox_kills.value("killing://", "timeout") == 1  # labelled without the URI's options
        assert METRICS.sandbox_seconds.count("killing://") == 1
        assert METRICS.tool_calls.value("list_inbox", "error") == 1
    finally:
        await platform.aclose()
        METRICS.reset()
