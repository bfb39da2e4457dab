"""The model door: every model call of an agent, in-process (:meth:`Gateway.complete
<stitchwork.gateway.core.Gateway.complete>`) or over HTTP (``/v1/chat/completions``, ``/v1/models``,
OpenAI-compatible, streaming too), passes here.

One call, through the gateway's stages (:mod:`stitchwork.gateway.stages`)::

    authenticate (run token) → redact secrets from the prompt → authorize (Cedar action "model_call":
    allowlist, token and cost budgets) → secrets (the provider key from the vault) and route → redact the
    answer → meter tokens and cost → audit (prompt and completion hashes; full text only with [compute]
    record_text)

Agents never hold provider keys: deployments name ``secret://`` references that only resolve inside a call.
The completion event is queued on the audit chain without waiting for its fsync (a model call changes nothing
in the world; refusals are awaited durably), so the gateway adds little latency.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stitchwork.compute._base import Model, ModelTurn, Usage
from stitchwork.compute._wire import turn_from_completion, usage_from
from stitchwork.compute.router import Deployment, Routed, RoutedModel, Router, RouterSettings, parse_deployments
from stitchwork.config import ComputeConfig
from stitchwork.errors import ConfigError, ModelError, PolicyDenied, StitchworkError
from stitchwork.gateway.context import GatewayContext, digest
from stitchwork.gateway.stages import Audit, Authenticate, Authorize, Secrets, policy_context
from stitchwork.security.identity.tokens import TokenClaims
from stitchwork.security.policy import Effect, ToolAction

MODEL_ACTION = "model_call"
HTTP_CONVERSATION = "http:"
"""Prefix of the redactor's conversation key for a run's requests over HTTP (apart from its in-process calls)."""
_ARGS = {"model_name": "string", "model_listed": "boolean", "model_tokens_used": "integer",
         "model_max_tokens": "integer", "model_cost_used_microusd": "integer", "model_max_cost_microusd": "integer"}
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


def _agent_limits(raw: Mapping[str, Any]) -> dict[str, AgentModels]:
    out: dict[str, AgentModels] = {}
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"compute.agents.{name} must be a table")
        if unknown := sorted(set(table) - {"models", "max_tokens", "max_cost_usd"}):
            raise ConfigError(f"compute.agents.{name}: unknown key(s) {', '.join(unknown)}")
        models = table.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise ConfigError(f"compute.agents.{name}.models must be a list of model names")
        try:
            out[name] = AgentModels(tuple(models) if models is not None else None, int(table.get("max_tokens", 0)),
                                    float(table.get("max_cost_usd", 0.0)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"compute.agents.{name}: {exc}") from exc
    return out


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
    """

    def __init__(self, context: GatewayContext, config: ComputeConfig | None = None,
                 router: Router | None = None) -> None:
        config = config if config is not None else ComputeConfig()
        self.context = context
        self.config = config
        self.router = router or Router(
            parse_deployments(config.deployments),
            RouterSettings.from_config(config),
        )
        self.limits = _agent_limits(config.agents)
        self.meters: dict[str, Meter] = {}
        self.prompt_digests = PromptDigests()
        self.authenticate = Authenticate(context)
        self.authorize = Authorize(context)
        self.secrets = Secrets(context)
        self.audit = Audit(context)

    async def aclose(self) -> None:
        await self.router.aclose()

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
        limits = self.limits_for(claims.agent)
        meter = self.meters.setdefault(claims.agent, Meter())
        args = {
            "model_name": name, "model_listed": limits.models is None or name in limits.models,
            "model_tokens_used": meter.tokens, "model_max_tokens": limits.max_tokens,
            "model_cost_used_microusd": int(meter.cost_usd * 1_000_000),
            "model_max_cost_microusd": int(limits.max_cost_usd * 1_000_000),
        }
        context = policy_context(side_effect="external", steps=0, max_steps=1, args=args)
        decision = await self.authorize.decide(claims.agent, MODEL_ACTION, name, context)
        if decision.effect is not Effect.ALLOW:
            await self.audit.record(
                "model", self._who(claims),
                {"model": name, "policy_ids": list(decision.policy_ids), "reasons": list(decision.reasons),
                 "tokens_used": meter.tokens, "cost_usd": round(meter.cost_usd, 6)})
            raise PolicyDenied(f"model call to {name!r} denied: {'; '.join(decision.reasons) or 'no policy permits'}",
                               policy_ids=decision.policy_ids)

    # -- accounting -------------------------------------------------------------------------------------------

    def _record(self, claims: TokenClaims, name: str, prompt: Any, completion: Mapping[str, Any],
                deployment: Deployment | None, attempts: int, started: float, *, stream: bool) -> Usage:
        usage = usage_from(completion.get("usage"))
        cost = deployment.cost_usd(usage.prompt_tokens, usage.completion_tokens) if deployment else 0.0
        meter = self.meters.setdefault(claims.agent, Meter())
        meter.prompt_tokens += usage.prompt_tokens
        meter.completion_tokens += usage.completion_tokens
        meter.cost_usd += cost
        meter.calls += 1
        message = ((completion.get("choices") or [{}])[0]).get("message") or {}
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

    async def complete(self, token: str | None, model: Model, messages: Sequence[Mapping[str, Any]],
                       tools: Sequence[Mapping[str, Any]]) -> ModelTurn:
        """The in-process path (the agent loop): authenticated, secrets redacted from the prompt, admitted by
        policy, routed (or ``model`` called directly when it is not routed), metered and audited."""
        claims = await self.authenticate(token, action="model")
        safe_messages = self.context.redactor.redact_messages(claims.run_id, messages)  # only new ones are redacted
        name, direct = self._target(model)
        await self._admit(claims, name)
        request: dict[str, Any] = {"model": name, "messages": list(safe_messages)}
        if tools:
            request["tools"] = list(tools)
        started = time.perf_counter()
        try:
            routed = await self._chat(name, direct, request)
            completion = self.context.redactor.redact(routed.completion)
            turn = turn_from_completion(completion)
        except StitchworkError as exc:
            await self._failed(claims, name, exc)
            raise
        self._record(claims, name, request["messages"], completion, routed.deployment, routed.attempts, started,
                     stream=False)
        return turn

    async def _prepare_http(self, token: str | None, body: Mapping[str, Any]) -> tuple[TokenClaims, str,
                                                                                         dict[str, Any]]:
        claims = await self.authenticate(token, action=MODEL_ACTION)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ModelError("the request names no model; GET /v1/models lists them")
        if name not in self.router:
            raise ModelError(f"unknown model {name!r}; known: {', '.join(self.models_for(claims.agent)) or 'none'}")
        await self._admit(claims, name)
        return claims, name, self._redact_request(claims, body)

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
        claims, name, request = await self._prepare_http(token, body)
        started = time.perf_counter()
        try:
            routed = await self._chat(name, None, request)
        except StitchworkError as exc:
            await self._failed(claims, name, exc)
            raise
        completion: dict[str, Any] = self.context.redactor.redact(routed.completion)
        completion["model"] = name
        self._record(claims, name, request.get("messages"), completion, routed.deployment, routed.attempts, started,
                     stream=False)
        return completion

    async def chat_stream(self, token: str | None, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """``POST /v1/chat/completions`` with ``stream: true``: chunks as they come (authentication, policy and
        routing errors are raised before the first chunk)."""
        claims, name, request = await self._prepare_http(token, body)
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
                yield redactor.redact(chunk) if redactor.contains_secret(json.dumps(chunk)) else chunk
        except StitchworkError as exc:
            await self._failed(claims, name, exc)
            raise
        except (GeneratorExit, asyncio.CancelledError):  # the agent went away mid-stream
            self.audit.queue("model", self._who(claims),
                             {"model": name, "stream": True, "prompt_sha256": digest(request.get("messages")),
                              "latency_ms": round((time.perf_counter() - started) * 1000, 3)},
                             decision="cancelled")
            raise
        if routed:
            self._record(claims, name, request.get("messages"), routed[0].completion, routed[0].deployment,
                         routed[0].attempts, started, stream=True)


__all__ = ["MODEL_ACTION", "MODEL_TOOL_ACTION", "AgentModels", "Meter", "ModelDoor", "PromptDigests"]
