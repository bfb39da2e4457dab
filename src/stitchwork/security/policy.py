"""Cedar policy engine: every tool call an agent makes is decided here.

A call becomes one Cedar request::

    principal  Stitchwork::Agent::"<agent name>"
    action     Stitchwork::Action::"<tool name>"      (in "read" | "write" | "external" | "irreversible")
    resource   Stitchwork::Target::"<target value>"   ("" when the tool has no target argument)
    context    { side_effect, approved, taint, budget, time, args }

The schema is generated from the registered tools (:attr:`PolicyEngine.schema_text`), and every policy file is
validated against it in strict mode when the engine loads, so a policy that names an unknown attribute or
compares mismatched types is refused at start-up with its file and line, not at the first call.

Approvals are written in Cedar: a ``forbid`` annotated ``@approval("required")`` with
``unless { context.approved }``. A Deny whose deciding policies are all such forbids becomes
:attr:`Effect.ASK`, provided the same call with ``approved: true`` would be allowed (asking a human for a call
that stays denied anyway is pointless, so that case is a plain DENY). Any evaluation error is a DENY: the
engine fails closed.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import cedarpy

from stitchwork.errors import ConfigError, PolicyLoadError

NAMESPACE = "Stitchwork"
SIDE_EFFECTS = ("read", "write", "external", "irreversible")
"""The side-effect classes; each is also the id of the action group its tools belong to."""

_AGENT = f"{NAMESPACE}::Agent"
_GROUP = f"{NAMESPACE}::Group"
_ACTION = f"{NAMESPACE}::Action"
_TARGET = f"{NAMESPACE}::Target"
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_MAX_BATCH = 256
"""Largest number of requests one :meth:`PolicyEngine.adecide` batch evaluates at once."""
_MAX_DYNAMIC_AGENTS = 10_000
"""Agents first seen at decide time are added to the shared entity set up to this many; beyond, per batch."""
_POLICY_REF = re.compile(r"\bpolicy(\d+)\b")
_INVALID = "invalid request (fail closed)"
_FAILED = "evaluation errors (fail closed)"
_DEFAULT_DENY = "no policy permits (default deny)"
_RESERVED_ARG_NAMES = frozenset({"__entity", "__extn", "__expr"})
"""Record keys Cedar's JSON format reads as escapes; such argument names are left out of the schema."""


def builtin_policy_dir() -> Path:
    """The directory of the default policy pack shipped with Stitchwork."""
    return Path(__file__).resolve().parent.parent / "policies"


class Effect(StrEnum):
    """What the gateway does with a call."""

    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


@dataclass(frozen=True)
class ToolAction:
    """What the engine needs to know of a tool to build its Cedar action.

    Attributes:
        name: The tool name; becomes ``Stitchwork::Action::"<name>"``.
        side_effect: ``read``, ``write``, ``external`` or ``irreversible``; the action group of the tool.
        args_schema: The JSON schema of the tool's arguments; its string, integer and boolean properties
            become ``context.args`` (optional unless listed in ``required``), other properties are left out.
    """

    name: str
    side_effect: str
    args_schema: Mapping[str, Any] = field(default_factory=dict)


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


@dataclass(frozen=True)
class PolicyInfo:
    """One loaded policy.

    Attributes:
        id: Its ``@id`` annotation, else ``<file>:<line>``.
        effect: ``permit`` or ``forbid``.
        file: Short label of its file (``default/read.cedar`` for the built-in pack).
        path: The file's full path.
        line: Line of the policy's first token (its first annotation), 0 if it could not be located.
        annotations: All its annotations (a bare ``@name`` has the value ``""``).
    """

    id: str
    effect: str
    file: str
    path: str
    line: int
    annotations: Mapping[str, str]

    @property
    def needs_approval(self) -> bool:
        """Whether this is a forbid that a human approval lifts."""
        return self.effect == "forbid" and self.annotations.get("approval") == "required"

    @property
    def location(self) -> str:
        """``<file>:<line>``, or just the file when the line is unknown."""
        return f"{self.file}:{self.line}" if self.line else self.file


# -- policy text: statements and lines --------------------------------------------------------------------


@dataclass(frozen=True)
class _Statement:
    """One policy's text in its file: from its first token to its terminating ``;``."""

    line: int
    text: str
    terminated: bool


def _split_statements(text: str) -> list[_Statement]:
    """Splits Cedar policy text into policies, tracking the line each starts on.

    Cedar has ``//`` comments and double-quoted strings with backslash escapes; a ``;`` outside both ends a
    policy. Text after the last ``;`` that is not blank or a comment is returned as an unterminated statement.
    """
    statements: list[_Statement] = []
    line = 1
    start = -1
    start_line = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
            continue
        if ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch.isspace():
            i += 1
            continue
        if start < 0:
            start, start_line = i, line
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                if i < n and text[i] == "\n":
                    line += 1
                i += 1
            i += 1
            continue
        if ch == ";":
            statements.append(_Statement(start_line, text[start : i + 1], True))
            start = -1
        i += 1
    if start >= 0:
        statements.append(_Statement(start_line, text[start:], False))
    return statements


def _parse_error(text: str) -> str | None:
    """Cedar's parse error for ``text``, or None if it parses."""
    try:
        cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        return str(exc) or "syntax error"
    return None


def _locate_parse_error(text: str, message: str) -> tuple[int | None, str]:
    """Finds the line of a parse error that Cedar reports without a location.

    Each statement is parsed alone; the first that fails holds the error. Within a multi-line statement the
    offending line is the shortest prefix of lines that already fails with the same message.

    Returns:
        The line (None if no single statement fails) and the message to report.
    """
    for statement in _split_statements(text):
        error = _parse_error(statement.text)
        if error is None:
            continue
        lines = statement.text.split("\n")
        count = next(
            (k for k in range(1, len(lines)) if _parse_error("\n".join(lines[:k])) == error), len(lines)
        )
        if count == 1:
            return statement.line, error
        return statement.line + count - 1, f"{error} (in the policy starting at line {statement.line})"
    return None, message


# -- schema --------------------------------------------------------------------------------------------------


def _cedar_string(value: str) -> str:
    """A Cedar string literal (Cedar escapes, not JSON's ``\\uXXXX``)."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_JSON_TO_CEDAR = {"string": "String", "integer": "Long", "boolean": "Bool"}


@dataclass(frozen=True)
class _ArgSpec:
    name: str
    kind: str  # "String" | "Long" | "Bool"
    required: bool


def _arg_specs(args_schema: Mapping[str, Any]) -> tuple[_ArgSpec, ...]:
    """The arguments of a tool that have a Cedar type, from its JSON schema."""
    properties = args_schema.get("properties") or {}
    required = set(args_schema.get("required") or ())
    specs: list[_ArgSpec] = []
    if not isinstance(properties, Mapping):
        return ()
    for name, prop in properties.items():
        if not isinstance(name, str) or name in _RESERVED_ARG_NAMES or not isinstance(prop, Mapping):
            continue
        json_type = prop.get("type")
        if isinstance(json_type, list):
            non_null = [t for t in json_type if t != "null"]
            # ["string", "null"] is a string that may be absent; a real union has no single Cedar type.
            json_type = non_null[0] if len(non_null) == 1 else None
            nullable = True
        else:
            nullable = False
        kind = _JSON_TO_CEDAR.get(json_type) if isinstance(json_type, str) else None
        if kind is None:
            continue
        specs.append(_ArgSpec(name, kind, name in required and not nullable))
    return tuple(specs)


_BASE_SCHEMA = f"""\
// Generated by Stitchwork from the registered tools; rebuilt at every start. Do not edit.
namespace {NAMESPACE} {{
  // Groups of agents for shared grants: `principal in {NAMESPACE}::Group::"ops"`.
  entity Group;
  // An agent, by its registered name.
  entity Agent in [Group] {{ name: String }};
  // What a call acts on: the value of the tool's target argument ("" when the tool has none).
  entity Target;

  // Which parts of the call came from untrusted content.
  //   any: some argument is tainted; target: the target argument is;
  //   args: names of tainted arguments; sources: where the taint came from, e.g. "tool:read_inbox".
  //   target_level: how the target was found in untrusted content: "" (not tainted), "record" (only as a
  //   whole short field of structured output, e.g. a listed user or a mail's sender), "prose" (inside free
  //   text: where injected instructions live), "unattributed" (an address found in no content at all).
  type Taint = {{ any: Bool, target: Bool, target_level: String, args: Set<String>, sources: Set<String> }};
  // Steps taken by the run so far (this call included) and the run's limit.
  type Budget = {{ steps: Long, max_steps: Long }};
  // When the call is made: unix seconds, local hour 0-23, weekday 0 (Monday) to 6 (Sunday).
  type Time = {{ unix: Long, hour: Long, weekday: Long }};

  // Side-effect classes: every tool action is a member of exactly one.
  action "read", "write", "external", "irreversible";
"""


def _placeholder(side_effect: str) -> str:
    """The action that stands for every tool of a side-effect class (never requested)."""
    return f"<any {side_effect} tool>"


def _action_schema(name: str, side_effect: str, specs: Sequence[_ArgSpec], comment: str) -> str:
    fields = ", ".join(f"{_cedar_string(s.name)}{'' if s.required else '?'}: {s.kind}" for s in specs)
    return (
        f"\n  // {comment}\n"
        f"  action {_cedar_string(name)} in [{_cedar_string(side_effect)}] appliesTo {{\n"
        f"    principal: [Agent],\n"
        f"    resource: [Target],\n"
        f"    context: {{\n"
        f"      side_effect: String, approved: Bool, taint: Taint, budget: Budget, time: Time,\n"
        f"      args: {f'{{ {fields} }}' if fields else '{}'}\n"
        f"    }}\n"
        f"  }};\n"
    )


def _build_schema(tools: Sequence[ToolAction]) -> str:
    parts = [_BASE_SCHEMA]
    for side_effect in SIDE_EFFECTS:
        parts.append(
            _action_schema(
                _placeholder(side_effect),
                side_effect,
                (),
                f"Stands for any {side_effect} tool, so that policies about the class are type-checked even "
                f"when no such tool is\n  // registered (and cannot assume arguments); never requested.",
            )
        )
    for tool in tools:
        comment = f"{tool.name!r} ({tool.side_effect})".replace("\n", " ")
        parts.append(_action_schema(tool.name, str(tool.side_effect), _arg_specs(tool.args_schema), comment))
    parts.append("}\n")
    return "".join(parts)


# -- requests ------------------------------------------------------------------------------------------------


class _BadContext(Exception):
    """A request context the engine cannot turn into a Cedar context."""


@dataclass(frozen=True)
class _Tool:
    name: str
    side_effect: str
    action: dict[str, str]
    args: tuple[_ArgSpec, ...]


@dataclass(frozen=True)
class _Prepared:
    """A request turned into Cedar's form."""

    index: int
    agent: str
    tool: str
    cedar: dict[str, Any]
    context: dict[str, Any]


def _is_long(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _LONG_MIN <= value <= _LONG_MAX


def _long(record: Mapping[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or not _is_long(value):
        raise _BadContext(f"context.{where}.{key} must be an integer, got {value!r}")
    return value


def _string_set(value: Any, where: str) -> list[str]:
    if value is None or value == []:
        return []
    if not isinstance(value, list | tuple | set | frozenset):
        raise _BadContext(f"context.{where} must be a list of strings, got {value!r}")
    return sorted({str(v) for v in value})


def _record(context: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = context.get(key)
    if not isinstance(value, Mapping):
        raise _BadContext(f"context.{key} is required and must be a record, got {value!r}")
    return value


def _cedar_context(tool: _Tool, context: Mapping[str, Any]) -> dict[str, Any]:
    """Builds the Cedar context of one call, exactly of the schema's shape.

    Values of the wrong type in ``args`` are dropped (a required one missing is an error); a malformed base
    field is an error. Taint is read conservatively: any truthy ``any``/``target`` counts, and ``any`` is set
    whenever some argument or the target is tainted. ``approved`` counts only when it is exactly ``True``.
    """
    taint = _record(context, "taint")
    taint_args = _string_set(taint.get("args"), "taint.args")
    taint_target = bool(taint.get("target"))
    budget = _record(context, "budget")
    clock = context.get("time")
    if clock is None:
        now = time.time()
        local = time.localtime(now)
        clock_record = {"unix": int(now), "hour": local.tm_hour, "weekday": local.tm_wday}
    elif isinstance(clock, Mapping):
        clock_record = {k: _long(clock, k, "time") for k in ("unix", "hour", "weekday")}
    else:
        raise _BadContext(f"context.time must be a record, got {clock!r}")
    raw_args = context.get("args")
    if raw_args is None:
        raw_args = {}
    if not isinstance(raw_args, Mapping):
        raise _BadContext(f"context.args must be a record, got {type(raw_args).__name__}")
    args: dict[str, Any] = {}
    for spec in tool.args:
        value = raw_args.get(spec.name)
        ok = (
            isinstance(value, str)
            if spec.kind == "String"
            else isinstance(value, bool)
            if spec.kind == "Bool"
            else _is_long(value)
        )
        if ok:
            args[spec.name] = value
        elif spec.required:
            state = "missing" if value is None else f"not a {spec.kind}"
            raise _BadContext(f"required argument {spec.name!r} of {tool.name!r} is {state}")
    return {
        "side_effect": tool.side_effect,
        "approved": context.get("approved") is True,
        "taint": {
            "any": bool(taint.get("any")) or taint_target or bool(taint_args),
            "target": taint_target,
            "target_level": (str(taint.get("target_level") or "prose") if taint_target else ""),
            "args": taint_args,
            "sources": _string_set(taint.get("sources"), "taint.sources"),
        },
        "budget": {
            "steps": _long(budget, "steps", "budget"),
            "max_steps": _long(budget, "max_steps", "budget"),
        },
        "time": clock_record,
        "args": args,
    }


def _agent_entity(name: str, groups: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "uid": {"type": _AGENT, "id": name},
        "attrs": {"name": name},
        "parents": [{"type": _GROUP, "id": g} for g in groups],
    }


def _reason(info: PolicyInfo) -> str:
    """How a deciding policy is explained: ``forbid <id> (<file>:<line>)``."""
    where = "" if info.id == info.location else f" ({info.location})"
    if info.needs_approval:
        return f"approval required by {info.id}{where}"
    return f"{info.effect} {info.id}{where}"


def _may_apply(action_scope: Any, tool: _Tool) -> bool:
    """Whether a policy's action scope (Cedar JSON form) can match the tool's action.

    Conservative: a scope this function does not understand is taken to match.
    """
    try:
        op = action_scope["op"]
        if op == "All":
            return True
        if op in ("==", "in"):
            entities = action_scope["entities"] if "entities" in action_scope else [action_scope["entity"]]
            names = {tool.name} if op == "==" else {tool.name, tool.side_effect}
            for entity in entities:
                uid = entity.get("__entity", entity)
                if uid["type"] != _ACTION or uid["id"] in names:
                    return True
            return False
    except (KeyError, TypeError, AttributeError):
        pass
    return True


class _WholeContext(Exception):
    """A policy uses ``context`` other than through attribute accesses: the whole context is needed."""


_KEEP_ALL = True
"""A node of a context projection: keep this value whole (else a dict of the attributes to keep)."""


def _context_path(expr: Any) -> list[str] | None:
    """The attribute path of ``context.a.b`` (Cedar JSON form), ``[]`` for ``context``, None for anything else."""
    if isinstance(expr, dict) and len(expr) == 1:
        if expr.get("Var") == "context":
            return []
        inner = expr.get(".")
        if isinstance(inner, dict) and isinstance(inner.get("attr"), str):
            path = _context_path(inner.get("left"))
            return None if path is None else [*path, inner["attr"]]
    return None


def _mark(projection: dict[str, Any], path: Sequence[str]) -> None:
    node = projection
    for name in path[:-1]:
        child = node.get(name)
        if child is _KEEP_ALL:
            return
        node = node.setdefault(name, {})
    node[path[-1]] = _KEEP_ALL


def _collect_context_uses(node: Any, projection: dict[str, Any]) -> None:
    """Adds to ``projection`` every context attribute path that ``node`` (a policy in Cedar JSON form) reads.

    ``context.a.b`` and ``context.a has b`` keep ``a.b`` whole; ``context`` used any other way (compared,
    passed to an operator) raises :class:`_WholeContext`. Conservative by construction: every occurrence of the
    ``context`` variable is either the root of such a path or makes the whole context needed.
    """
    if isinstance(node, list):
        for item in node:
            _collect_context_uses(item, projection)
        return
    if not isinstance(node, dict):
        return
    if node.get("Var") == "context":
        raise _WholeContext
    if len(node) == 1:
        for op in (".", "has"):
            inner = node.get(op)
            if isinstance(inner, dict) and isinstance(inner.get("attr"), str):
                path = _context_path(inner.get("left"))
                if path is not None:
                    _mark(projection, [*path, inner["attr"]])
                    return
    for value in node.values():
        _collect_context_uses(value, projection)


def _context_projection(bodies: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The part of a request context that the policies can read, or None when they may read all of it."""
    projection: dict[str, Any] = {}
    try:
        for body in bodies:
            _collect_context_uses(body.get("conditions"), projection)
    except _WholeContext:
        return None
    return projection


def _project(value: Any, projection: Any) -> Any:
    """``value`` cut down to the attributes of ``projection`` (a node of :func:`_context_projection`)."""
    if projection is _KEEP_ALL or not isinstance(value, dict):
        return value
    return {name: _project(value[name], node) for name, node in projection.items() if name in value}


# -- the engine ----------------------------------------------------------------------------------------------


class _Batcher:
    """Requests waiting for one event loop's next :meth:`PolicyEngine.adecide` batch."""

    def __init__(self) -> None:
        self.pending: list[tuple[Request, asyncio.Future[Decision]]] = []
        self.busy = False


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
        tools: Mapping[str, _Tool],
        agents: set[str],
        validate_requests: bool,
        offload: bool,
        context_projections: Mapping[str, Mapping[str, Any] | None] | None = None,
        decision_cache: int = 0,
    ) -> None:
        """Use :meth:`load`; this takes already-parsed handles."""
        self.schema_text = schema_text
        self.policies: tuple[PolicyInfo, ...] = tuple(policies)
        self._reason_texts = tuple(_reason(p) for p in self.policies)
        self._tool_policies = dict(tool_policies)
        self._schema = schema
        self._request_schema = schema if validate_requests else None
        # Per tool, the context attributes its policies can read (None: all). Only they are sent to Cedar,
        # which spends ~10-20 us converting each context attribute; requests validated against the schema
        # need the whole context.
        self._projections: dict[str, Mapping[str, Any] | None] = (
            {} if validate_requests else dict(context_projections or {})
        )
        self._entities = entities
        self._tools = dict(tools)
        self._known_agents = set(agents)
        self._dynamic_agents = 0
        self._lock = threading.Lock()
        self._offload = offload
        self._executor: ThreadPoolExecutor | None = None
        # Decisions by (tool, agent, target, approved, projected context JSON): everything a decision depends on besides
        # the policies and entities of this engine (an engine's policies never change; the cache is cleared
        # when the shared entity set grows). Bounded LRU, guarded by ``_lock``.
        self._cache: OrderedDict[tuple[str, str, str, bool, str], Decision] = OrderedDict()
        self._cache_size = max(0, decision_cache)
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batcher] = (
            weakref.WeakKeyDictionary()
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
                every context attribute the tool's policies read (``budget.steps`` included, so within one run
                it rarely repeats; across runs doing the same steps it does).

        Returns:
            The engine.

        Raises:
            ConfigError: A tool is declared twice, has an unknown side effect, or is named like a group.
            PolicyLoadError: A policy file is missing or unreadable, a policy does not parse or validate, is a
                template, misuses ``@approval``, or repeats an ``@id``; the error names the file and line.
        """
        tool_specs = cls._tool_specs(tools)
        schema_text = _build_schema(list(tools))
        try:
            schema = cedarpy.Schema.from_str(schema_text)
        except ValueError as exc:  # a bug here, not the operator's: tool names are escaped
            raise ConfigError(f"generated Cedar schema does not parse: {exc}") from exc

        files = cls._policy_files(paths)
        infos: list[PolicyInfo] = []
        bodies: list[Mapping[str, Any]] = []
        texts: list[str] = []
        seen_ids: dict[str, PolicyInfo] = {}
        for label, path in files:
            text = cls._read(path)
            file_infos, file_bodies = cls._file_policies(label, path, text)
            for info in file_infos:
                if info.id in seen_ids:
                    first = seen_ids[info.id]
                    raise PolicyLoadError(
                        f"duplicate policy id {info.id!r} (first declared at {first.path}:{first.line})",
                        path=info.path,
                        line=info.line or None,
                    )
                seen_ids[info.id] = info
            infos.extend(file_infos)
            bodies.extend(file_bodies)
            texts.append(text)

        combined = "\n".join(texts)
        cls._validate(combined, schema, infos)
        try:
            policy_set = cedarpy.PolicySet.from_str(combined)
        except ValueError as exc:
            raise PolicyLoadError(f"policies do not parse together: {exc}") from exc
        if len(policy_set) != len(infos):
            raise PolicyLoadError(f"expected {len(infos)} policies, Cedar parsed {len(policy_set)}")
        tool_policies = cls._slice(bodies, tool_specs)
        context_projections = cls._projections_of(bodies, tool_specs)

        group_map = {str(g): [str(a) for a in members] for g, members in (groups or {}).items()}
        memberships: dict[str, list[str]] = {}
        for group, members in group_map.items():
            for member in members:
                memberships.setdefault(member, []).append(group)
        agent_names = list(dict.fromkeys([*map(str, agents), *memberships]))
        entity_list: list[dict[str, Any]] = [
            {"uid": {"type": _GROUP, "id": g}, "attrs": {}, "parents": []} for g in group_map
        ]
        entity_list += [_agent_entity(a, memberships.get(a, ())) for a in agent_names]
        try:
            entities = cedarpy.Entities.from_json_str(json.dumps(entity_list), schema)
        except ValueError as exc:
            raise ConfigError(f"agent entities do not match the schema: {exc}") from exc

        return cls(
            tool_policies=tool_policies,
            schema=schema,
            schema_text=schema_text,
            entities=entities,
            policies=infos,
            tools=tool_specs,
            agents=set(agent_names),
            validate_requests=validate_requests,
            offload=offload,
            context_projections=context_projections,
            decision_cache=decision_cache,
        )

    @staticmethod
    def _tool_specs(tools: Sequence[ToolAction]) -> dict[str, _Tool]:
        specs: dict[str, _Tool] = {}
        for tool in tools:
            side_effect = str(tool.side_effect)
            if not tool.name:
                raise ConfigError("a tool without a name cannot be a Cedar action")
            if side_effect not in SIDE_EFFECTS:
                raise ConfigError(
                    f"tool {tool.name!r}: side effect {side_effect!r} is not one of {', '.join(SIDE_EFFECTS)}"
                )
            if tool.name in SIDE_EFFECTS or tool.name in {_placeholder(c) for c in SIDE_EFFECTS}:
                raise ConfigError(f"tool {tool.name!r} has the name of a side-effect action group")
            if tool.name in specs:
                raise ConfigError(f"tool {tool.name!r} is declared twice")
            specs[tool.name] = _Tool(
                tool.name, side_effect, {"type": _ACTION, "id": tool.name}, _arg_specs(tool.args_schema)
            )
        return specs

    @staticmethod
    def _policy_files(paths: Sequence[Path]) -> list[tuple[str, Path]]:
        """The files to load with their short labels, in order, each once."""
        builtin = builtin_policy_dir()
        found: list[tuple[str, Path]] = []
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                prefix = "default" if path.resolve() == builtin else path.name
                found += [(f"{prefix}/{f.name}", f) for f in sorted(path.glob("*.cedar")) if f.is_file()]
            elif path.is_file():
                found.append((path.name, path))
            else:
                raise PolicyLoadError("no such policy file or directory", path=str(path))
        unique: list[tuple[str, Path]] = []
        seen_paths: set[Path] = set()
        labels: set[str] = set()
        for label, path in found:
            resolved = path.resolve()
            if resolved in seen_paths:
                continue
            seen_paths.add(resolved)
            if label in labels:
                label = str(path)
            labels.add(label)
            unique.append((label, path))
        return unique

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyLoadError(f"cannot read policy file: {exc}", path=str(path)) from exc

    @staticmethod
    def _file_policies(label: str, path: Path, text: str) -> tuple[list[PolicyInfo], list[Mapping[str, Any]]]:
        """Parses one file: its policies described (id, effect, line, annotations) and as Cedar JSON."""
        try:
            est = json.loads(cedarpy.policies_to_json_str(text))
        except ValueError as exc:
            line, message = _locate_parse_error(text, str(exc))
            raise PolicyLoadError(f"syntax error: {message}", path=str(path), line=line) from exc
        statements = _split_statements(text)
        templates: dict[str, Any] = est.get("templates") or {}
        static: dict[str, Any] = est.get("staticPolicies") or {}
        count = len(static) + len(templates)
        lines_known = len(statements) == count

        def line_of(index: int) -> int:
            return statements[index].line if lines_known else 0

        if templates:
            first = min(int(key.removeprefix("policy")) for key in templates)
            raise PolicyLoadError(
                "policy templates (?principal / ?resource slots) are not supported",
                path=str(path),
                line=line_of(first) or None,
            )
        infos: list[PolicyInfo] = []
        used: set[str] = set()
        for index in range(count):
            body = static[f"policy{index}"]
            line = line_of(index)
            annotations = {
                str(k): "" if v is None else str(v) for k, v in (body.get("annotations") or {}).items()
            }
            effect = str(body.get("effect"))
            if "approval" in annotations:
                if annotations["approval"] != "required":
                    raise PolicyLoadError(
                        'the only @approval value is "required"', path=str(path), line=line or None
                    )
                if effect != "forbid":
                    raise PolicyLoadError(
                        '@approval("required") only applies to forbid policies',
                        path=str(path),
                        line=line or None,
                    )
            policy_id = annotations.get("id") or (f"{label}:{line}" if line else f"{label}#{index + 1}")
            if "id" not in annotations or not annotations["id"]:
                base, suffix = policy_id, 2
                while policy_id in used:  # two policies without @id on one line
                    policy_id, suffix = f"{base}#{suffix}", suffix + 1
            used.add(policy_id)
            infos.append(PolicyInfo(policy_id, effect, label, str(path), line, annotations))
        return infos, [static[f"policy{index}"] for index in range(count)]

    @staticmethod
    def _slice(
        bodies: Sequence[Mapping[str, Any]], tools: Mapping[str, _Tool]
    ) -> dict[str, cedarpy.PolicySet]:
        """One policy set per tool holding only the policies whose action scope can match the tool.

        Cedar evaluates every policy of a set for every request; a policy whose scope excludes the action
        can neither decide nor fail, so leaving it out changes no decision and saves its evaluation. Each
        policy keeps its global id (``policy<N>``, its load-order index), so reasons map back unchanged.
        """
        shared: dict[frozenset[int], cedarpy.PolicySet] = {}
        sliced: dict[str, cedarpy.PolicySet] = {}
        for tool in tools.values():
            keep = frozenset(i for i, body in enumerate(bodies) if _may_apply(body.get("action"), tool))
            if keep not in shared:
                est = {
                    "staticPolicies": {f"policy{i}": bodies[i] for i in sorted(keep)},
                    "templates": {},
                    "templateLinks": [],
                }
                try:
                    shared[keep] = cedarpy.PolicySet.from_json_str(json.dumps(est))
                except ValueError as exc:
                    raise PolicyLoadError(f"policies do not convert to Cedar's JSON form: {exc}") from exc
            sliced[tool.name] = shared[keep]
        return sliced

    @staticmethod
    def _projections_of(
        bodies: Sequence[Mapping[str, Any]], tools: Mapping[str, _Tool]
    ) -> dict[str, Mapping[str, Any] | None]:
        """Per tool, the context attributes that the policies of its slice (see :meth:`_slice`) can read.

        A context attribute no policy of the slice reads cannot change its decision, its deciding policies or
        its errors (an attribute a policy reads and the context lacks is an error either way).
        """
        shared: dict[frozenset[int], Mapping[str, Any] | None] = {}
        projections: dict[str, Mapping[str, Any] | None] = {}
        for tool in tools.values():
            keep = frozenset(i for i, body in enumerate(bodies) if _may_apply(body.get("action"), tool))
            if keep not in shared:
                shared[keep] = _context_projection([bodies[i] for i in sorted(keep)])
            projections[tool.name] = shared[keep]
        return projections

    @staticmethod
    def _validate(combined: str, schema: cedarpy.Schema, infos: Sequence[PolicyInfo]) -> None:
        result = cedarpy.validate_policies(combined, schema)
        if result.validation_passed:
            return
        problems: list[tuple[int, PolicyInfo | None, str]] = []
        for error in result.errors:
            match = _POLICY_REF.fullmatch(error.policy_id or "")
            index = int(match.group(1)) if match else -1
            info = infos[index] if 0 <= index < len(infos) else None
            message = re.sub(r"^for policy `policy\d+`, ", "", error.error)
            problems.append((index if index >= 0 else len(infos), info, message))
        problems.sort(key=lambda p: p[0])
        _, info, message = problems[0]
        where = f"policy {info.id}: " if info is not None else ""
        more = ""
        if len(problems) > 1:
            rest = [f"{p[1].path}:{p[1].line}: {p[2]}" if p[1] else p[2] for p in problems[1:6]]
            more = f" (and {len(problems) - 1} more: {'; '.join(rest)})"
        raise PolicyLoadError(
            f"does not validate against the schema: {where}{message}{more}",
            path=info.path if info else "",
            line=(info.line or None) if info else None,
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
                "annotations": " ".join(f"@{k}({_cedar_string(v)})" for k, v in p.annotations.items()),
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
        prepared: list[_Prepared] = []
        for index, request in enumerate(requests):
            outcome = self._prepare(index, request)
            if isinstance(outcome, Decision):
                decisions[index] = outcome
            elif (cached := self._cached(outcome)) is not None:
                decisions[index] = cached
            else:
                prepared.append(outcome)
        if prepared:
            entities = self._entities_for(prepared)
            candidates: list[_Prepared] = []
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
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher()
        if not batcher.busy and not self._offload:
            batcher.busy = True  # until the flush below runs: later calls of this iteration queue for it
            loop.call_soon(self._flush, batcher, loop)
            return self.decide(request)
        future: asyncio.Future[Decision] = loop.create_future()
        batcher.pending.append((request, future))
        if not batcher.busy:
            batcher.busy = True
            loop.call_soon(self._flush, batcher, loop)
        return await future

    def close(self) -> None:
        """Stops the worker thread of ``offload=True`` engines; the engine still decides afterwards."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    # -- internals -------------------------------------------------------------------------------------------

    def _prepare(self, index: int, request: Request) -> _Prepared | Decision:
        tool = self._tools.get(request.tool)
        if tool is None:
            return Decision(
                Effect.DENY,
                reasons=(_INVALID,),
                errors=(
                    f"unknown action {_ACTION}::{_cedar_string(str(request.tool))}: not a tool in the schema",
                ),
            )
        if not isinstance(request.agent, str) or not isinstance(request.target, str):
            return Decision(
                Effect.DENY, reasons=(_INVALID,), errors=("request agent and target must be strings",)
            )
        try:
            context = _cedar_context(tool, request.context)
            context_json = self._context_json(tool.name, context)
        except (_BadContext, TypeError, ValueError) as exc:
            return Decision(Effect.DENY, reasons=(_INVALID,), errors=(f"bad request context: {exc}",))
        cedar = {
            "principal": {"type": _AGENT, "id": request.agent},
            "action": tool.action,
            "resource": {"type": _TARGET, "id": request.target},
            "context": context_json,
        }
        return _Prepared(index, request.agent, tool.name, cedar, context)

    @staticmethod
    def _cache_key(item: _Prepared) -> tuple[str, str, str, bool, str]:
        # ``approved`` also decides whether an approval-only deny is checked for ASK, even if no policy reads it.
        return (item.tool, item.agent, item.cedar["resource"]["id"], item.context["approved"], item.cedar["context"])

    def _cached(self, item: _Prepared) -> Decision | None:
        if not self._cache_size:
            return None
        key = self._cache_key(item)
        with self._lock:
            decision = self._cache.get(key)
            if decision is not None:
                self._cache.move_to_end(key)
            return decision

    def _remember(
        self, prepared: Sequence[_Prepared], decisions: Sequence[Decision | None], entities: cedarpy.Entities
    ) -> None:
        if not self._cache_size:
            return
        with self._lock:
            if entities is not self._entities:  # a per-batch entity set, or it grew meanwhile
                return
            for item in prepared:
                decision = decisions[item.index]
                if decision is not None:
                    self._cache[self._cache_key(item)] = decision
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _context_json(self, tool: str, context: dict[str, Any]) -> str:
        """The Cedar context of a call as JSON, cut down to what the tool's policies read."""
        projection = self._projections.get(tool)
        return json.dumps(context if projection is None else _project(context, projection))

    def _entities_for(self, prepared: Sequence[_Prepared]) -> cedarpy.Entities:
        """The entity set for a batch: every principal exists, with its ``name`` attribute."""
        unknown = {p.agent for p in prepared} - self._known_agents
        if not unknown:
            return self._entities
        with self._lock:
            unknown -= self._known_agents
            if not unknown:
                return self._entities
            delta = json.dumps([_agent_entity(name) for name in sorted(unknown)])
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

        return _POLICY_REF.sub(replace, text)

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
        self, candidates: Sequence[_Prepared], decisions: list[Decision | None], entities: cedarpy.Entities
    ) -> None:
        """Makes approval-only denies ASK if the approved call would be allowed, else a plain DENY."""
        approved = [
            _Prepared(
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

    def _run(self, prepared: Sequence[_Prepared], entities: cedarpy.Entities) -> list[tuple[_Prepared, Any]]:
        """Evaluates prepared requests: one Cedar batch per distinct policy set (usually per side effect)."""
        groups: dict[int, tuple[cedarpy.PolicySet, list[_Prepared]]] = {}
        for item in prepared:
            policies = self._tool_policies[item.tool]
            groups.setdefault(id(policies), (policies, []))[1].append(item)
        out: list[tuple[_Prepared, Any]] = []
        for policies, items in groups.values():
            results = self._evaluate([item.cedar for item in items], policies, entities)
            out.extend(zip(items, results, strict=True))
        return out

    def _flush(self, batcher: _Batcher, loop: asyncio.AbstractEventLoop) -> None:
        batch = batcher.pending[:_MAX_BATCH]
        del batcher.pending[:_MAX_BATCH]
        live = [(r, f) for r, f in batch if not f.done()]  # drop callers that were cancelled meanwhile
        if not live:
            self._next(batcher, loop)
            return
        requests = [r for r, _ in live]
        if self._offload:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stitchwork-cedar")
                executor = self._executor
            job = loop.run_in_executor(executor, self.decide_batch, requests)
            job.add_done_callback(lambda done: self._settle(batcher, loop, live, done))
            return
        try:
            decisions = self.decide_batch(requests)
        except Exception as exc:  # a bug: fail every waiter rather than hang them
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), decision in zip(live, decisions, strict=True):
                if not future.done():
                    future.set_result(decision)
        self._next(batcher, loop)

    def _settle(
        self,
        batcher: _Batcher,
        loop: asyncio.AbstractEventLoop,
        live: Sequence[tuple[Request, asyncio.Future[Decision]]],
        done: asyncio.Future[list[Decision]],
    ) -> None:
        error = None if done.cancelled() else done.exception()
        for index, (_, future) in enumerate(live):
            if future.done():
                continue
            if done.cancelled():
                future.cancel()
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(done.result()[index])
        self._next(batcher, loop)

    def _next(self, batcher: _Batcher, loop: asyncio.AbstractEventLoop) -> None:
        if batcher.pending:
            loop.call_soon(self._flush, batcher, loop)
        else:
            batcher.busy = False
