"""The model door: every model call of an agent, in-process (:meth:`Gateway.complete
<stitchwork.gateway.core.Gateway.complete>`) or over HTTP (``/v1/chat/completions``, ``/v1/models``,
OpenAI-compatible, streaming too), passes here.

One call, through the gateway's stages (:mod:`stitchwork.gateway.stages`)::

    authenticate (run token) → redact secrets from the prompt → authorize (Cedar action "model_call":
    allowlist, token and cost budgets per period, requests- and tokens-per-minute limits per agent and per
    model, all fed by the shared meters) → secrets (the provider key from the vault) and route → redact the
    answer → meter tokens and cost → audit (prompt and completion hashes; full text only with [compute]
    record_text)

Meters (:mod:`stitchwork.gateway.meters`) live in the store or on the bus, so a restart or another worker sees
the same spend. A refusal by a per-minute limit raises :class:`~stitchwork.errors.RateLimited` (HTTP 429 with
``Retry-After``); an exhausted budget raises :class:`~stitchwork.errors.PolicyDenied` naming when its period ends.

Agents never hold provider keys: deployments name ``secret://`` references that only resolve inside a call.
The completion event is queued on the audit chain without waiting for its fsync (a model call changes nothing
in the world; refusals are awaited durably), so the gateway adds little latency.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from stitchwork.compute._base import Model, ModelTurn, Usage
from stitchwork.compute._wire import normalize_messages, turn_from_completion, usage_from
from stitchwork.compute.router import Deployment, Routed, RoutedModel, Router, RouterSettings, parse_deployments
from stitchwork.config import ComputeConfig
from stitchwork.errors import ConfigError, ModelError, ModelNotFound, PolicyDenied, RateLimited, StitchworkError
from stitchwork.gateway.context import GatewayContext, digest
from stitchwork.gateway.meters import Delta, MemoryMeters, Meters, MeterStore, Reading, Windows
from stitchwork.gateway.stages import Audit, Authenticate, Authorize, Secrets, policy_context
from stitchwork.observability import METRICS, TRACING
from stitchwork.observability.tracing import NoSpan
from stitchwork.security.identity.tokens import TokenClaims
from stitchwork.security.policy import Effect, ToolAction

MODEL_ACTION = "model_call"
HTTP_CONVERSATION = "http:"
"""Prefix of the redactor's conversation key for a run's requests over HTTP (apart from its in-process calls)."""
_ARGS = {"model_name": "string", "model_listed": "boolean", "model_tokens_used": "integer",
         "model_max_tokens": "integer", "model_cost_used_microusd": "integer", "model_max_cost_microusd": "integer",
         "rate_agent_requests_minute": "integer", "rate_agent_rpm": "integer",
         "rate_agent_tokens_minute": "integer", "rate_agent_tpm": "integer",
         "rate_model_requests_minute": "integer", "rate_model_rpm": "integer",
         "rate_model_tokens_minute": "integer", "rate_model_tpm": "integer"}
RATE_POLICIES = frozenset({"model-agent-rpm", "model-agent-tpm", "model-rpm", "model-tpm"})
"""Policy ids of the per-minute limits (policies/model.cedar): a refusal by these alone is :class:`RateLimited`."""
PERIODS = ("total", "day", "month")
MODEL_TOOL_ACTION = ToolAction(MODEL_ACTION, "external", {
    "type": "object", "required": list(_ARGS), "properties": {k: {"type": v} for k, v in _ARGS.items()},
})
"""The Cedar action of model calls; the platform registers it with the tools."""


@dataclass(frozen=True)
class AgentModels:
    """What one agent may do with models (``[compute.agents.<name>]``, or ``"*"``)."""

    models: tuple[str, ...] | None = None
    """Allowed model names; None allows all."""
    max_tokens: int = 0
    max_cost_usd: float = 0.0
    period: str = "total"
    """The budgets' period: ``total``, ``day`` or ``month`` (UTC)."""
    rpm: int = 0
    """Requests per minute (0: no limit)."""
    tpm: int = 0
    """Tokens per minute (0: no limit)."""

    @property
    def metered(self) -> bool:
        """Whether admission must read this agent's meter."""
        return bool(self.max_tokens or self.max_cost_usd or self.rpm or self.tpm)


@dataclass(frozen=True)
class ModelLimits:
    """Rate limits of one model name over every agent (``[compute.models.<name>]``)."""

    rpm: int = 0
    tpm: int = 0


@dataclass
class Meter:
    """Usage of one agent."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _count(table: Mapping[str, Any], key: str, where: str) -> int:
    value = table.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}.{key} must be a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError as exc:
        raise ConfigError(f"{where}.{key} must be a whole number, got {value!r}") from exc
    if number < 0:
        raise ConfigError(f"{where}.{key} must not be negative, got {number}")
    return number


def _agent_limits(raw: Mapping[str, Any]) -> dict[str, AgentModels]:
    out: dict[str, AgentModels] = {}
    for name, table in raw.items():
        where = f"compute.agents.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        if unknown := sorted(set(table) - {"models", "max_tokens", "max_cost_usd", "period", "rpm", "tpm"}):
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: max_cost_usd, max_tokens, "
                              "models, period, rpm, tpm")
        models = table.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise ConfigError(f"{where}.models must be a list of model names")
        period = table.get("period", "total")
        if period not in PERIODS:
            raise ConfigError(f"{where}.period must be one of {', '.join(PERIODS)}, got {period!r}")
        try:
            cost = float(table.get("max_cost_usd", 0.0))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.max_cost_usd: {exc}") from exc
        if not cost >= 0 or cost == float("inf"):
            raise ConfigError(f"{where}.max_cost_usd must be a non-negative number, got {cost!r}")
        out[name] = AgentModels(tuple(models) if models is not None else None, _count(table, "max_tokens", where),
                                cost, period, _count(table, "rpm", where), _count(table, "tpm", where))
    return out


def _model_limits(raw: Mapping[str, Any]) -> dict[str, ModelLimits]:
    out: dict[str, ModelLimits] = {}
    for name, table in raw.items():
        where = f"compute.models.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        if unknown := sorted(set(table) - {"rpm", "tpm"}):
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: rpm, tpm")
        out[name] = ModelLimits(_count(table, "rpm", where), _count(table, "tpm", where))
    return out


def meter_retention(agents: Mapping[str, Any], models: Mapping[str, Any],
                    floor_s: float) -> Callable[[str], float]:
    """How long a meter document must outlive its last update (0: forever), per meter key.

    At least ``floor_s`` (``[messaging.limits.meters] max_age_s``; 0 keeps every meter), and never less than the
    key's budgets need: an agent's ``total`` token or cost budget forever, a ``month`` budget 32 days, a ``day``
    budget 2 days, per-minute limits 2 minutes. An unknown kind of key is kept forever.
    """
    if not floor_s:
        return lambda key: 0.0
    per_agent, per_model = _agent_limits(agents), _model_limits(models)

    def retention(key: str) -> float:
        kind, _, name = key.partition(":")
        if kind == "agent":
            limits = per_agent.get(name) or per_agent.get("*") or AgentModels()
            if (limits.max_tokens or limits.max_cost_usd) and limits.period == "total":
                return 0.0
            need = ({"month": 32 * 86_400.0, "day": 2 * 86_400.0}.get(limits.period, 0.0)
                    if limits.max_tokens or limits.max_cost_usd else 0.0)
            need = max(need, 120.0 if limits.rpm or limits.tpm else 0.0)
        elif kind == "model":
            rates = per_model.get(name) or ModelLimits()
            need = 120.0 if rates.rpm or rates.tpm else 0.0
        else:
            return 0.0
        return max(floor_s, need)

    return retention


def period_end(period: str, windows: Windows) -> str:
    """When a budget period that holds ``windows`` ends, as ISO 8601 UTC ("" for ``total``)."""
    if period == "total":
        return ""
    year, month, day = (int(x) for x in windows.day.split("-"))
    if period == "day":
        end = calendar.timegm((year, month, day, 0, 0, 0)) + 86_400
    else:
        end = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))


class PromptDigests:
    """``prompt_sha256`` of each model call, without re-serialising the whole conversation at every step.

    The value is exactly ``digest(prompt)``: the SHA-256 of ``json.dumps(prompt, sort_keys=True, ...)``. A
    run's prompts grow by appending, and the JSON of a list is its items' JSON joined by ``", "`` inside
    brackets, so the hash state after the previous prompt of the same run is kept and only the new messages are
    encoded and hashed: O(new messages) per call instead of O(conversation), which made a run O(steps²). The
    kept prefix is compared (``==``) with the new prompt's first messages, so an edited history is hashed again
    from the start. The previous prompt's messages are held as they were passed (the model layer does not change
    request messages in place). At most ``size`` runs are remembered (least recently used dropped).
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._runs: OrderedDict[str, tuple[list[Any], Any]] = OrderedDict()

    def digest(self, run_id: str, prompt: Any) -> str:
        """``digest(prompt)``, reusing the hash of ``run_id``'s previous prompt when this one extends it."""
        if not run_id or not isinstance(prompt, list):
            return digest(prompt)
        cached = self._runs.pop(run_id, None)
        start = 0
        if cached is not None and len(cached[0]) <= len(prompt) and prompt[: len(cached[0])] == cached[0]:
            start, hasher = len(cached[0]), cached[1].copy()
        else:
            hasher = hashlib.sha256(b"[")
        for index in range(start, len(prompt)):
            item = json.dumps(prompt[index], sort_keys=True, ensure_ascii=False, default=str)
            hasher.update(((", " if index else "") + item).encode("utf-8", "replace"))
        self._runs[run_id] = (list(prompt), hasher.copy())
        while len(self._runs) > self.size:
            self._runs.popitem(last=False)
        hasher.update(b"]")
        return str(hasher.hexdigest())


class ModelDoor:
    """Policy, keys, routing, metering and audit for model calls.

    Args:
        context: The gateway's shared context.
        config: ``[compute]``: deployments, routing, per-agent limits (default: none; a direct
            :class:`~stitchwork.compute._base.Model` is still served, through the same stages).
        router: A router to use instead of one built from ``config``.
        meters: Where spend and rate meters are kept (default: this process's memory).
        clock: Seconds since the epoch, for the meters' windows (tests cross a period's end with it).
    """

    def __init__(self, context: GatewayContext, config: ComputeConfig | None = None,
                 router: Router | None = None, *, meters: MeterStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        config = config if config is not None else ComputeConfig()
        self.context = context
        self.config = config
        self.router = router or Router(
            parse_deployments(config.deployments),
            RouterSettings.from_config(config),
        )
        self.limits = _agent_limits(config.agents)
        self.model_limits = _model_limits(config.models)
        self.meters = Meters(meters if meters is not None else MemoryMeters(), clock,
                             flush_s=max(config.meters_flush_ms, 0) / 1000)
        """Shared spend and rate meters (store or bus): what budgets and limits are checked against."""
        self.usage: dict[str, Meter] = {}
        """Usage through this process, per agent (``/v1/compute/deployments``)."""
        self.prompt_digests = PromptDigests()
        self.authenticate = Authenticate(context)
        self.authorize = Authorize(context)
        self.secrets = Secrets(context)
        self.audit = Audit(context)

    async def aclose(self) -> None:
        await self.router.aclose()
        await self.meters.aclose()

    # -- policy -----------------------------------------------------------------------------------------------

    def limits_for(self, agent: str) -> AgentModels:
        return self.limits.get(agent) or self.limits.get("*") or AgentModels()

    def models_for(self, agent: str) -> list[str]:
        allowed = self.limits_for(agent).models
        return [m for m in self.router.models() if allowed is None or m in allowed]

    @staticmethod
    def _who(claims: TokenClaims) -> dict[str, str]:
        return {"agent": claims.agent, "run_id": claims.run_id, "tool": MODEL_ACTION}

    async def _admit(self, claims: TokenClaims, name: str) -> None:
        """Cedar decides ``model_call`` over the allowlist and the meters; an admitted call counts one request."""
        agent = claims.agent
        limits = self.limits_for(agent)
        model_limits = self.model_limits.get(name) or ModelLimits()
        windows = self.meters.windows()
        keys = (f"agent:{agent}", f"model:{name}")
        mine = await self.meters.read(keys[0], windows) if limits.metered else Reading()
        theirs = await self.meters.read(keys[1], windows) if model_limits.rpm or model_limits.tpm else Reading()
        tokens_used, cost_used = mine.tokens(limits.period), mine.cost(limits.period)
        args = {
            "model_name": name, "model_listed": limits.models is None or name in limits.models,
            "model_tokens_used": tokens_used, "model_max_tokens": limits.max_tokens,
            "model_cost_used_microusd": cost_used,
            "model_max_cost_microusd": int(limits.max_cost_usd * 1_000_000),
            "rate_agent_requests_minute": mine.requests_minute, "rate_agent_rpm": limits.rpm,
            "rate_agent_tokens_minute": mine.tokens_minute, "rate_agent_tpm": limits.tpm,
            "rate_model_requests_minute": theirs.requests_minute, "rate_model_rpm": model_limits.rpm,
            "rate_model_tokens_minute": theirs.tokens_minute, "rate_model_tpm": model_limits.tpm,
        }
        context = policy_context(side_effect="external", steps=0, max_steps=1, args=args, now=windows.now)
        decision = await self.authorize.decide(agent, MODEL_ACTION, name, context)
        for policy_id in decision.policy_ids:
            METRICS.policy_decisions.inc(policy_id, decision.effect.value)
        if decision.effect is not Effect.ALLOW:
            ids = tuple(decision.policy_ids)
            limited = bool(ids) and set(ids) <= RATE_POLICIES
            await self.audit.record(
                "model", self._who(claims),
                {"model": name, "policy_ids": list(ids), "reasons": list(decision.reasons),
                 "tokens_used": tokens_used, "cost_usd": round(cost_used / 1_000_000, 6), "period": limits.period,
                 "requests_minute": mine.requests_minute, "tokens_minute": mine.tokens_minute})
            METRICS.model_calls.inc(agent, name, "rate_limited" if limited else "denied")
            reasons = "; ".join(decision.reasons) or "no policy permits"
            if limited:
                retry = round(windows.seconds_left_in_minute, 3)
                raise RateLimited(f"model call to {name!r} rate-limited ({', '.join(ids)}): {reasons}; retry after "
                                  f"{retry:g}s", policy_ids=ids, retry_after_s=retry)
            ends = period_end(limits.period, windows)
            budget = f" (the {limits.period}'s budget renews at {ends})" if ends and {
                "model-token-budget", "model-cost-budget"} & set(ids) else ""
            raise PolicyDenied(f"model call to {name!r} denied: {reasons}{budget}", policy_ids=ids)
        self.meters.add(self._meter_keys(agent, name), Delta(requests=1), windows)

    def _meter_keys(self, agent: str, model: str) -> tuple[str, ...]:
        """The meters a call counts in: its agent's always (spend survives a change of limits), its model's only
        when that model has limits (one row fewer per call in a store)."""
        limits = self.model_limits.get(model)
        return (f"agent:{agent}", f"model:{model}") if limits and (limits.rpm or limits.tpm) else (f"agent:{agent}",)

    # -- accounting -------------------------------------------------------------------------------------------

    def _record(self, claims: TokenClaims, name: str, prompt: Any, completion: Mapping[str, Any],
                deployment: Deployment | None, attempts: int, started: float, *, stream: bool,
                span: NoSpan | Any = None) -> Usage:
        usage = usage_from(completion.get("usage"))
        cost = deployment.cost_usd(usage.prompt_tokens, usage.completion_tokens) if deployment else 0.0
        meter = self.usage.setdefault(claims.agent, Meter())
        meter.prompt_tokens += usage.prompt_tokens
        meter.completion_tokens += usage.completion_tokens
        meter.cost_usd += cost
        meter.calls += 1
        self.meters.add(self._meter_keys(claims.agent, name),
                        Delta(tokens=usage.prompt_tokens + usage.completion_tokens,
                              cost_microusd=round(cost * 1_000_000)))
        agent = claims.agent
        METRICS.model_calls.inc(agent, name, "ok")
        METRICS.model_tokens.inc(agent, name, "input", amount=usage.prompt_tokens)
        METRICS.model_tokens.inc(agent, name, "output", amount=usage.completion_tokens)
        if cost:
            METRICS.model_cost.inc(agent, name, amount=cost)
        METRICS.model_latency.observe(time.perf_counter() - started, name)
        choice = (completion.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        if span is not None:
            span.set_attributes({
                "gen_ai.response.model": str(completion.get("model") or name),
                "gen_ai.usage.input_tokens": usage.prompt_tokens, "gen_ai.usage.output_tokens": usage.completion_tokens,
                "gen_ai.response.finish_reasons": [str(choice.get("finish_reason") or "stop")],
                "stitchwork.deployment": deployment.id if deployment else "", "stitchwork.attempts": attempts,
            })
        data: dict[str, Any] = {
            "model": name, "deployment": deployment.id if deployment else "", "attempts": attempts,
            "stream": stream, "prompt_sha256": self.prompt_digests.digest(claims.run_id, prompt),
            "completion_sha256": digest(message),
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cost_usd": round(cost, 8), "tool_calls": [(c.get("function") or {}).get("name")
                                                       for c in message.get("tool_calls") or ()],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if self.config.record_text:
            data["prompt"] = prompt
            data["completion"] = message
        self.audit.queue("model", self._who(claims), data, decision="ok")
        return usage

    async def _failed(self, claims: TokenClaims, name: str, exc: StitchworkError) -> None:
        METRICS.model_calls.inc(claims.agent, name, "error")
        await self.audit.record("model", self._who(claims), {
            "model": name, "error": exc.code, "reason": self.context.redactor.redact_text(str(exc))}, decision="error")

    # -- calls ------------------------------------------------------------------------------------------------

    def _target(self, model: Model | str) -> tuple[str, Model | None]:
        """The model name for policy and, for a model that is not routed, the model itself."""
        if isinstance(model, str):
            return model, None
        if isinstance(model, RoutedModel):
            return model.name, None
        return model.uri.split("?", 1)[0], model

    async def _chat(self, name: str, direct: Model | None, request: Mapping[str, Any]) -> Routed:
        with self.secrets.provider_keys():
            if direct is not None:
                return Routed(await direct.chat(request), Deployment(name, direct.uri, name), 1)
            return await self.router.chat(name, request)

    @staticmethod
    def _span(claims: TokenClaims, name: str, *, stream: bool) -> NoSpan | Any:
        """The ``chat <model>`` span (GenAI semantic conventions; no prompt or completion text)."""
        return TRACING.begin(f"chat {name}", {
            "gen_ai.operation.name": "chat", "gen_ai.request.model": name, "gen_ai.provider.name": "openai",
            "stitchwork.agent": claims.agent, "stitchwork.run_id": claims.run_id, "stitchwork.stream": stream,
        })

    async def _admit_traced(self, span: NoSpan | Any, claims: TokenClaims, name: str) -> None:
        try:
            await self._admit(claims, name)
        except PolicyDenied as exc:
            span.set_attributes({"stitchwork.decision": "deny", "stitchwork.policy_ids": list(exc.policy_ids)})
            span.record_error(exc)
            raise
        span.set_attribute("stitchwork.decision", "allow")

    async def complete(self, token: str | None, model: Model, messages: Sequence[Mapping[str, Any]],
                       tools: Sequence[Mapping[str, Any]]) -> ModelTurn:
        """The in-process path (the agent loop): authenticated, secrets redacted from the prompt, admitted by
        policy, routed (or ``model`` called directly when it is not routed), metered and audited."""
        claims = await self.authenticate(token, action="model")
        safe_messages = self.context.redactor.redact_messages(claims.run_id, messages)  # only new ones are redacted
        name, direct = self._target(model)
        span = self._span(claims, name, stream=False)
        try:
            await self._admit_traced(span, claims, name)
            request: dict[str, Any] = {"model": name, "messages": list(safe_messages)}
            if tools:
                request["tools"] = list(tools)
            started = time.perf_counter()
            try:
                routed = await self._chat(name, direct, request)
                completion = self.context.redactor.redact(routed.completion)
                turn = turn_from_completion(completion)
            except StitchworkError as exc:
                span.record_error(exc)
                await self._failed(claims, name, exc)
                raise
            self._record(claims, name, request["messages"], completion, routed.deployment, routed.attempts, started,
                         stream=False, span=span)
            return turn
        finally:
            span.end()

    async def _prepare_http(self, token: str | None, body: Mapping[str, Any], span_of: list[Any],
                            *, stream: bool) -> tuple[TokenClaims, str, dict[str, Any]]:
        claims = await self.authenticate(token, action=MODEL_ACTION)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ModelError("the request names no model; GET /v1/models lists them")
        if name not in self.router:
            raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(self.models_for(claims.agent)) or 'none'}",
                                status=404)
        messages = normalize_messages(body.get("messages"))
        span = self._span(claims, name, stream=stream)
        span_of.append(span)
        await self._admit_traced(span, claims, name)
        request = self._redact_request(claims, {**body, "messages": messages})
        return claims, name, request

    def _redact_request(self, claims: TokenClaims, body: Mapping[str, Any]) -> dict[str, Any]:
        """``redact(dict(body))``, with the messages a client sends again (its whole conversation, each request)
        redacted only when they differ from the ones at the same place in its previous request (per run)."""
        redactor = self.context.redactor
        messages = body.get("messages")
        if not (type(messages) is list and all(type(m) is dict for m in messages)):
            whole: dict[str, Any] = redactor.redact(dict(body))
            return whole
        request: dict[str, Any] = {}
        for key, value in body.items():
            if key == "messages":
                request[key] = redactor.redact_messages(HTTP_CONVERSATION + claims.run_id, messages)
            else:
                request[redactor.redact(key)] = redactor.redact(value)
        return request

    async def chat(self, token: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/chat/completions`` without streaming."""
        spans: list[Any] = []
        try:
            claims, name, request = await self._prepare_http(token, body, spans, stream=False)
            started = time.perf_counter()
            try:
                routed = await self._chat(name, None, request)
            except StitchworkError as exc:
                spans[0].record_error(exc)
                await self._failed(claims, name, exc)
                raise
            completion: dict[str, Any] = self.context.redactor.redact(routed.completion)
            completion["model"] = name
            self._record(claims, name, request.get("messages"), completion, routed.deployment, routed.attempts,
                         started, stream=False, span=spans[0])
            return completion
        finally:
            for span in spans:
                span.end()

    async def chat_stream(self, token: str | None, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """``POST /v1/chat/completions`` with ``stream: true``: chunks as they come (authentication, policy and
        routing errors are raised before the first chunk)."""
        spans: list[Any] = []
        try:
            claims, name, request = await self._prepare_http(token, body, spans, stream=True)
            started = time.perf_counter()
            routed: list[Routed] = []
            redactor = self.context.redactor
            chunks = aiter(self.router.chat_stream(name, request, routed))
            try:
                while True:
                    # The key scope is entered per step: a streaming response resumes this generator in other tasks.
                    with self.secrets.provider_keys():
                        try:
                            chunk = await anext(chunks)
                        except StopAsyncIteration:
                            break
                    chunk["model"] = name
                    yield redactor.redact(chunk) if redactor.contains_secret(_text(chunk)) else chunk
            except StitchworkError as exc:
                spans[0].record_error(exc)
                await self._failed(claims, name, exc)
                raise
            except (GeneratorExit, asyncio.CancelledError):  # the agent went away mid-stream
                spans[0].set_attribute("stitchwork.cancelled", True)
                METRICS.model_calls.inc(claims.agent, name, "cancelled")
                self.audit.queue("model", self._who(claims),
                                 {"model": name, "stream": True, "prompt_sha256": digest(request.get("messages")),
                                  "latency_ms": round((time.perf_counter() - started) * 1000, 3)},
                                 decision="cancelled")
                raise
            if routed:
                self._record(claims, name, request.get("messages"), routed[0].completion, routed[0].deployment,
                             routed[0].attempts, started, stream=True, span=spans[0])
        finally:
            for span in spans:
                span.end()


def _text(chunk: Mapping[str, Any]) -> str:
    """A streamed chunk as JSON text to look for secrets in (orjson: unescaped UTF-8, so a secret with non-ASCII
    characters reads as itself; the standard library for what orjson refuses)."""
    try:
        return orjson.dumps(chunk).decode()
    except TypeError:
        return json.dumps(chunk, ensure_ascii=False)


__all__ = ["MODEL_ACTION", "MODEL_TOOL_ACTION", "RATE_POLICIES", "AgentModels", "Meter", "ModelDoor", "ModelLimits",
           "PromptDigests", "period_end"]
