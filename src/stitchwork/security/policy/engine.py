"""The policy engine: Cedar policies, schema and entities, parsed once, deciding tool calls."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import cedarpy

from stitchwork.errors import ConfigError, PolicyLoadError
from stitchwork.security.policy.batch import Batcher
from stitchwork.security.policy.cache import LruCache
from stitchwork.security.policy.context import BadContext, Prepared, cedar_context
from stitchwork.security.policy.projection import (
    Abstraction,
    context_abstractions,
    context_projections,
    policy_slices,
    project,
)
from stitchwork.security.policy.schema import (
    ACTION,
    AGENT,
    TARGET,
    CedarTool,
    ToolAction,
    agent_entity,
    build_schema,
    cedar_tools,
    principal_entities,
)
from stitchwork.security.policy.text import (
    POLICY_REF,
    PolicyInfo,
    cedar_string,
    load_policy_files,
    reason,
    validate_against_schema,
)

_MAX_DYNAMIC_AGENTS = 10_000
"""Agents first seen at decide time are added to the shared entity set up to this many; beyond, per batch."""
_INVALID = "invalid request (fail closed)"
_FAILED = "evaluation errors (fail closed)"
_DEFAULT_DENY = "no policy permits (default deny)"

_CacheKey = tuple[str, str, str, bool, str]
"""Tool, agent, target, approved, and the projected context as JSON (only-compared attributes as outcomes)."""


class Effect(StrEnum):
    """What the gateway does with a call."""

    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


@dataclass(frozen=True)
class Request:
    """One call to decide.

    Attributes:
        agent: The agent's name (the principal).
        tool: The tool's name (the action).
        target: The value of the tool's target argument, ``""`` when it has none (the resource).
        context: ``approved`` (bool, default false), ``taint`` (``any``, ``target``, ``args``, ``sources``;
            required; ``target_level`` optional, ``"prose"`` when the target is tainted and it is absent),
            ``budget`` (``steps``, ``max_steps``; required), ``time`` (``unix``, ``hour``,
            ``weekday`` with Monday = 0; default: now, local time) and ``args`` (the call's arguments).
            ``side_effect`` is always taken from the tool's declaration, whatever the caller passes.
    """

    agent: str
    tool: str
    target: str
    context: Mapping[str, Any]


@dataclass(frozen=True)
class Decision:
    """The engine's answer for one call.

    Attributes:
        effect: Allow, deny, or ask a human.
        policy_ids: The deciding policies: their ``@id`` annotation, else ``<file>:<line>``.
        reasons: Human-readable explanations, e.g.
            ``forbid external-tainted-target (default/external.cedar:12)``.
        errors: Evaluation or request errors; any error makes the decision a DENY.
    """

    effect: Effect
    policy_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


class PolicyEngine:
    """Cedar policies, schema and entities, parsed once, deciding tool calls.

    Build one with :meth:`load`. Thread-safe; :meth:`adecide` batches concurrent calls per event loop.

    Performance: the schema, entities and policies are parsed once. Each tool gets a policy set holding only
    the policies whose action scope can match it (Cedar evaluates every policy of a set on every request),
    and requests are not re-validated by Cedar against the schema since the engine builds their contexts
    to the schema's shape. Each request carries only the context attributes its tool's policies read (Cedar
    spends 10-20 us converting each attribute), and decisions are remembered in a bounded LRU keyed by tool,
    agent, target and those attributes (see ``decision_cache`` of :meth:`load`).

    Attributes:
        schema_text: The generated Cedar schema, for operators.
        policies: Every loaded policy, in load order.
    """

    def __init__(
        self,
        *,
        tool_policies: Mapping[str, cedarpy.PolicySet],
        schema: cedarpy.Schema,
        schema_text: str,
        entities: cedarpy.Entities,
        policies: Sequence[PolicyInfo],
        tools: Mapping[str, CedarTool],
        agents: set[str],
        validate_requests: bool,
        offload: bool,
        context_projections: Mapping[str, Mapping[str, Any] | None] | None = None,
        decision_cache: int = 0,
        context_abstractions: Mapping[str, Abstraction | None] | None = None,
    ) -> None:
        """Use :meth:`load`; this takes already-parsed handles."""
        self.schema_text = schema_text
        self.policies: tuple[PolicyInfo, ...] = tuple(policies)
        self._reason_texts = tuple(reason(p) for p in self.policies)
        self._tool_policies = dict(tool_policies)
        self._schema = schema
        self._request_schema = schema if validate_requests else None
        # Per tool, the context attributes its policies can read (None: all). Only they are sent to Cedar,
        # which spends ~10-20 us converting each context attribute; requests validated against the schema
        # need the whole context.
        self._projections: dict[str, Mapping[str, Any] | None] = (
            {} if validate_requests else dict(context_projections or {})
        )
        # Per tool, the context attributes its policies only compare (a step counter, a meter): decisions are
        # cached by the comparisons' outcomes instead of their values (see Abstraction).
        self._abstractions: dict[str, Abstraction | None] = (
            {} if validate_requests else dict(context_abstractions or {})
        )
        self._entities = entities
        self._tools = dict(tools)
        self._known_agents = set(agents)
        self._dynamic_agents = 0
        self._lock = threading.Lock()
        # Decisions by (tool, agent, target, approved, projected context JSON): everything a decision depends on
        # besides the policies and entities of this engine (an engine's policies never change; the cache is
        # cleared when the shared entity set grows).
        self._cache: LruCache[_CacheKey, Decision] = LruCache(decision_cache)
        self._batcher: Batcher[Request, Decision] = Batcher(
            self.decide_batch, offload=offload, thread_name="stitchwork-cedar"
        )

    # -- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        paths: Sequence[Path],
        tools: Sequence[ToolAction],
        *,
        agents: Sequence[str] = (),
        groups: Mapping[str, Sequence[str]] | None = None,
        validate_requests: bool = False,
        offload: bool = False,
        decision_cache: int = 4096,
    ) -> PolicyEngine:
        """Loads policy files, builds the schema from ``tools`` and validates every policy against it.

        Args:
            paths: Policy files, or directories whose ``*.cedar`` files are loaded in name order.
            tools: The registered tools; each becomes an action in its side-effect group.
            agents: Agents to pre-register as entities (others are added the first time they call).
            groups: Group name to member agent names, for ``principal in Stitchwork::Group::"<name>"``.
            validate_requests: Also have Cedar check every request against the schema. The engine builds
                contexts of the schema's shape itself and checks the tool, so decisions are the same; this
                only costs time (measured: 35% more per call, twice as much per call in batches).
            offload: Evaluate :meth:`adecide` batches in a worker thread instead of on the event loop.
                cedarpy holds the GIL while it evaluates, so this adds a thread hand-off and gains nothing
                unless cedarpy changes.
            decision_cache: How many decisions to remember (least recently used first out; 0: none). A
                decision is reused only for a call with the same tool, agent, target and the same values of
                every context attribute the tool's policies read, except attributes the policies only compare
                (``context.budget.steps > context.budget.max_steps``, a meter against its limit): for those,
                the same outcome of every such comparison (so a run's growing step count reuses decisions).

        Returns:
            The engine.

        Raises:
            ConfigError: A tool is declared twice, has an unknown side effect, or is named like a group.
            PolicyLoadError: A policy file is missing or unreadable, a policy does not parse or validate, is a
                template, misuses ``@approval``, or repeats an ``@id``; the error names the file and line.
        """
        tool_specs = cedar_tools(tools)
        schema_text = build_schema(list(tools))
        try:
            schema = cedarpy.Schema.from_str(schema_text)
        except ValueError as exc:  # a bug here, not the operator's: tool names are escaped
            raise ConfigError(f"generated Cedar schema does not parse: {exc}") from exc

        loaded = load_policy_files(paths)
        validate_against_schema(loaded.text, schema, loaded.infos)
        try:
            policy_set = cedarpy.PolicySet.from_str(loaded.text)
        except ValueError as exc:
            raise PolicyLoadError(f"policies do not parse together: {exc}") from exc
        if len(policy_set) != len(loaded.infos):
            raise PolicyLoadError(f"expected {len(loaded.infos)} policies, Cedar parsed {len(policy_set)}")

        entity_list, agent_names = principal_entities(agents, groups)
        try:
            entities = cedarpy.Entities.from_json_str(json.dumps(entity_list), schema)
        except ValueError as exc:
            raise ConfigError(f"agent entities do not match the schema: {exc}") from exc

        return cls(
            tool_policies=policy_slices(loaded.bodies, tool_specs),
            schema=schema,
            schema_text=schema_text,
            entities=entities,
            policies=loaded.infos,
            tools=tool_specs,
            agents=set(agent_names),
            validate_requests=validate_requests,
            offload=offload,
            context_projections=context_projections(loaded.bodies, tool_specs),
            decision_cache=decision_cache,
            context_abstractions=context_abstractions(loaded.bodies, tool_specs),
        )

    # -- describing ------------------------------------------------------------------------------------------

    def describe(self) -> list[dict[str, str]]:
        """One row per policy: id, effect, file, path, line, annotations (Cedar syntax), in load order."""
        return [
            {
                "id": p.id,
                "effect": p.effect,
                "file": p.file,
                "path": p.path,
                "line": str(p.line),
                "annotations": " ".join(f"@{k}({cedar_string(v)})" for k, v in p.annotations.items()),
            }
            for p in self.policies
        ]

    # -- deciding --------------------------------------------------------------------------------------------

    def decide(self, request: Request) -> Decision:
        """Decides one call. Never raises for what the request holds: problems are a DENY with errors."""
        return self.decide_batch([request])[0]

    def decide_batch(self, requests: Sequence[Request]) -> list[Decision]:
        """Decides many calls together.

        Requests are grouped by the policy slice of their tool (tools whose policies are the same share one,
        typically one per side-effect class) and each group is one ``is_authorized_batch`` call; the calls
        that may become ASK are re-evaluated with ``approved: true`` in one more batch.

        Returns:
            One decision per request, in order; each equal to what :meth:`decide` gives for it alone.
        """
        decisions: list[Decision | None] = [None] * len(requests)
        prepared: list[Prepared] = []
        for index, request in enumerate(requests):
            outcome = self._prepare(index, request)
            if isinstance(outcome, Decision):
                decisions[index] = outcome
            elif self._cache.enabled and (cached := self._cache.get(self._cache_key(outcome))) is not None:
                decisions[index] = cached
            else:
                prepared.append(outcome)
        if prepared:
            entities = self._entities_for(prepared)
            candidates: list[Prepared] = []
            for item, result in self._run(prepared, entities):
                decision, may_ask = self._interpret(result)
                if may_ask and not item.context["approved"]:
                    candidates.append(item)
                decisions[item.index] = decision
            if candidates:
                self._confirm_asks(candidates, decisions, entities)
            self._remember(prepared, decisions, entities)
        return [
            d if d is not None else Decision(Effect.DENY, errors=("internal: no decision",))
            for d in decisions
        ]

    async def adecide(self, request: Request) -> Decision:
        """Decides one call, batching it with the calls that arrive while the engine is busy.

        Evaluation runs on the event loop (cedarpy holds the GIL, so a worker thread would only add a
        hand-off) unless the engine was loaded with ``offload=True``. On the loop, the first call of an
        event-loop iteration is decided at once; the calls that follow it in the same iteration are collected
        and decided together, with one Cedar batch, at the start of the next iteration. With
        ``offload=True``, calls arriving while a batch is evaluated in the worker thread form the next batch.
        """
        return await self._batcher.submit(request)

    def close(self) -> None:
        """Stops the worker thread of ``offload=True`` engines; the engine still decides afterwards."""
        self._batcher.close()

    # -- internals -------------------------------------------------------------------------------------------

    def _prepare(self, index: int, request: Request) -> Prepared | Decision:
        tool = self._tools.get(request.tool)
        if tool is None:
            return Decision(
                Effect.DENY,
                reasons=(_INVALID,),
                errors=(
                    f"unknown action {ACTION}::{cedar_string(str(request.tool))}: not a tool in the schema",
                ),
            )
        if not isinstance(request.agent, str) or not isinstance(request.target, str):
            return Decision(
                Effect.DENY, reasons=(_INVALID,), errors=("request agent and target must be strings",)
            )
        try:  # Cedar takes UTF-8 only: a lone surrogate has no UTF-8 form
            request.agent.encode()
            request.target.encode()
        except UnicodeEncodeError:
            return Decision(
                Effect.DENY, reasons=(_INVALID,), errors=("request agent and target must be valid Unicode text",)
            )
        try:
            context = cedar_context(tool, request.context)
            projection = self._projections.get(tool.name)
            projected = context if projection is None else project(context, projection)
            context_json = json.dumps(projected)
            abstraction = self._abstractions.get(tool.name) if self._cache.enabled else None
            key = abstraction.key(context, projected) if abstraction is not None else None
        except (BadContext, TypeError, ValueError) as exc:
            return Decision(Effect.DENY, reasons=(_INVALID,), errors=(f"bad request context: {exc}",))
        cedar = {
            "principal": {"type": AGENT, "id": request.agent},
            "action": tool.action,
            "resource": {"type": TARGET, "id": request.target},
            "context": context_json,
        }
        return Prepared(index, request.agent, tool.name, cedar, context, key or context_json)

    @staticmethod
    def _cache_key(item: Prepared) -> _CacheKey:
        # ``approved`` also decides whether an approval-only deny is checked for ASK, even if no policy reads it.
        return (item.tool, item.agent, item.cedar["resource"]["id"], item.context["approved"],
                item.cache_context or item.cedar["context"])

    def _remember(
        self, prepared: Sequence[Prepared], decisions: Sequence[Decision | None], entities: cedarpy.Entities
    ) -> None:
        if not self._cache.enabled:
            return
        entries = [(self._cache_key(item), d) for item in prepared if (d := decisions[item.index]) is not None]
        with self._lock:
            if entities is not self._entities:  # a per-batch entity set, or it grew meanwhile
                return
            self._cache.put_many(entries)

    def _context_json(self, tool: str, context: dict[str, Any]) -> str:
        """The Cedar context of a call as JSON, cut down to what the tool's policies read."""
        projection = self._projections.get(tool)
        return json.dumps(context if projection is None else project(context, projection))

    def _entities_for(self, prepared: Sequence[Prepared]) -> cedarpy.Entities:
        """The entity set for a batch: every principal exists, with its ``name`` attribute."""
        unknown = {p.agent for p in prepared} - self._known_agents
        if not unknown:
            return self._entities
        with self._lock:
            unknown -= self._known_agents
            if not unknown:
                return self._entities
            delta = json.dumps([agent_entity(name) for name in sorted(unknown)])
            entities = self._entities.with_added_json_str(delta, self._schema)
            if self._dynamic_agents + len(unknown) <= _MAX_DYNAMIC_AGENTS:
                self._entities = entities
                self._cache.clear()  # conservatively: decisions were made against the previous entity set
                self._known_agents |= unknown
                self._dynamic_agents += len(unknown)
            return entities

    def _evaluate(
        self, cedar_requests: list[dict[str, Any]], policies: cedarpy.PolicySet, entities: cedarpy.Entities
    ) -> list[Any]:
        """Cedar results for the requests: AuthzResult, or the exception a request raised."""
        try:
            return list(cedarpy.is_authorized_batch(cedar_requests, policies, entities, self._request_schema))
        except Exception as exc:  # one bad request spoils the batch: evaluate each alone to isolate it
            if len(cedar_requests) == 1:
                return [exc]
            return [self._evaluate([r], policies, entities)[0] for r in cedar_requests]

    def _index(self, policy_ref: str) -> int | None:
        """The load-order index of a Cedar policy id ``policy<N>``."""
        if policy_ref.startswith("policy") and policy_ref[6:].isdigit():
            index = int(policy_ref[6:])
            if index < len(self.policies):
                return index
        return None

    def _readable(self, text: str) -> str:
        """Cedar's message with its positional policy ids replaced by the human-readable ones."""

        def replace(match: re.Match[str]) -> str:
            index = self._index(match.group(0))
            return self.policies[index].id if index is not None else match.group(0)

        return POLICY_REF.sub(replace, text)

    def _interpret(self, result: Any) -> tuple[Decision, bool]:
        """Turns a Cedar result into a decision; the flag says it is an approval-only deny (maybe ASK)."""
        if isinstance(result, BaseException):
            return Decision(
                Effect.DENY, reasons=(_FAILED,), errors=(f"policy evaluation failed: {result}",)
            ), False
        diagnostics = result.diagnostics
        refs = diagnostics.reasons
        indices = sorted(i for i in map(self._index, refs) if i is not None)
        ids = tuple(self.policies[i].id for i in indices)
        reasons = tuple(self._reason_texts[i] for i in indices)
        if diagnostics.errors:
            errors = tuple(self._readable(str(e)) for e in diagnostics.errors)
            return Decision(Effect.DENY, ids, (*reasons, _FAILED), errors), False
        decision = result.decision
        if decision is cedarpy.Decision.Allow:
            return Decision(Effect.ALLOW, ids, reasons), False
        if decision is not cedarpy.Decision.Deny:
            return Decision(Effect.DENY, ids, (*reasons, _FAILED), ("Cedar reached no decision",)), False
        if not indices:
            return Decision(Effect.DENY, (), (_DEFAULT_DENY,)), False
        approval_only = len(indices) == len(refs) and all(self.policies[i].needs_approval for i in indices)
        return Decision(Effect.DENY, ids, reasons), approval_only

    def _confirm_asks(
        self, candidates: Sequence[Prepared], decisions: list[Decision | None], entities: cedarpy.Entities
    ) -> None:
        """Makes approval-only denies ASK if the approved call would be allowed, else a plain DENY."""
        approved = [
            Prepared(
                item.index,
                item.agent,
                item.tool,
                {**item.cedar, "context": self._context_json(item.tool, {**item.context, "approved": True})},
                item.context,
            )
            for item in candidates
        ]
        for item, result in self._run(approved, entities):
            held = decisions[item.index]
            assert held is not None
            after, _ = self._interpret(result)
            if after.effect is Effect.ALLOW:
                decisions[item.index] = Decision(Effect.ASK, held.policy_ids, held.reasons)
            else:
                decisions[item.index] = Decision(
                    Effect.DENY,
                    after.policy_ids,
                    (*after.reasons, f"approval would not allow it (held by {', '.join(held.policy_ids)})"),
                    after.errors,
                )

    def _run(self, prepared: Sequence[Prepared], entities: cedarpy.Entities) -> list[tuple[Prepared, Any]]:
        """Evaluates prepared requests: one Cedar batch per distinct policy set (usually per side effect)."""
        groups: dict[int, tuple[cedarpy.PolicySet, list[Prepared]]] = {}
        for item in prepared:
            policies = self._tool_policies[item.tool]
            groups.setdefault(id(policies), (policies, []))[1].append(item)
        out: list[tuple[Prepared, Any]] = []
        for policies, items in groups.values():
            results = self._evaluate([item.cedar for item in items], policies, entities)
            out.extend(zip(items, results, strict=True))
        return out
