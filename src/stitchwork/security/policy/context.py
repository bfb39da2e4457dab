"""The Cedar request of one call: its context built exactly to the schema's shape, checked on the way."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stitchwork.security.policy.schema import CedarTool

_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


class BadContext(Exception):
    """A request context the engine cannot turn into a Cedar context."""


@dataclass(frozen=True)
class Prepared:
    """A request turned into Cedar's form.

    Attributes:
        index: The request's position in its batch.
        agent: The principal's name.
        tool: The action's name.
        cedar: The Cedar request (principal, action, resource, and the context as projected JSON).
        context: The whole Cedar context, before projection.
        cache_context: The context as the decision cache keys it ("": the projected JSON of ``cedar``).
    """

    index: int
    agent: str
    tool: str
    cedar: dict[str, Any]
    context: dict[str, Any]
    cache_context: str = ""


def _is_long(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _LONG_MIN <= value <= _LONG_MAX


def _target_count(value: Any, tainted: bool) -> int:
    """How many destinations are tainted; unknown (absent) counts as several, so no rule for a single tainted
    destination applies to a caller that did not say."""
    if value is None:
        return 2 if tainted else 0
    if not isinstance(value, int) or isinstance(value, bool) or not _is_long(value) or value < 0:
        raise BadContext(f"context.taint.target_count must be a non-negative integer, got {value!r}")
    return max(value, 1) if tainted else value


def _long(record: Mapping[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or not _is_long(value):
        raise BadContext(f"context.{where}.{key} must be an integer, got {value!r}")
    return value


def _string_set(value: Any, where: str) -> list[str]:
    if value is None or value == []:
        return []
    if not isinstance(value, list | tuple | set | frozenset):
        raise BadContext(f"context.{where} must be a list of strings, got {value!r}")
    return sorted({str(v) for v in value})


def _record(context: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = context.get(key)
    if not isinstance(value, Mapping):
        raise BadContext(f"context.{key} is required and must be a record, got {value!r}")
    return value


def cedar_context(tool: CedarTool, context: Mapping[str, Any]) -> dict[str, Any]:
    """Builds the Cedar context of one call, exactly of the schema's shape.

    Values of the wrong type in ``args`` are dropped (a required one missing is an error); a malformed base
    field is an error. Taint is read conservatively: any truthy ``any``/``target``/``code``/``confidential``
    counts, and ``any`` is set whenever some argument or the target is tainted; fields a caller leaves out
    (``destinations``, ``code``, ``lookalike``, ``confidential``, ``links``, ``outward``...) are false or empty.
    ``approved`` counts only when it is exactly ``True``.

    Raises:
        BadContext: A base field is missing or malformed, or a required argument is missing or mistyped.
    """
    taint = _record(context, "taint")
    taint_args = _string_set(taint.get("args"), "taint.args")
    taint_target = bool(taint.get("target"))
    taint_code = bool(taint.get("code"))
    budget = _record(context, "budget")
    clock = context.get("time")
    if clock is None:
        now = time.time()
        local = time.localtime(now)
        clock_record = {"unix": int(now), "hour": local.tm_hour, "weekday": local.tm_wday}
    elif isinstance(clock, Mapping):
        clock_record = {k: _long(clock, k, "time") for k in ("unix", "hour", "weekday")}
    else:
        raise BadContext(f"context.time must be a record, got {clock!r}")
    raw_args = context.get("args")
    if raw_args is None:
        raw_args = {}
    if not isinstance(raw_args, Mapping):
        raise BadContext(f"context.args must be a record, got {type(raw_args).__name__}")
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
            raise BadContext(f"required argument {spec.name!r} of {tool.name!r} is {state}")
    return {
        "side_effect": tool.side_effect,
        "approved": context.get("approved") is True,
        "taint": {
            "any": bool(taint.get("any")) or taint_target or bool(taint_args),
            "target": taint_target,
            "target_level": (str(taint.get("target_level") or "prose") if taint_target else ""),
            "args": taint_args,
            "sources": _string_set(taint.get("sources"), "taint.sources"),
            "destinations": _string_set(taint.get("destinations"), "taint.destinations"),
            "code": taint_code,
            "code_level": (str(taint.get("code_level") or "prose") if taint_code else ""),
            "lookalike": bool(taint.get("lookalike")),
            "confidential": bool(taint.get("confidential")),
            "secret_sources": _string_set(taint.get("secret_sources"), "taint.secret_sources"),
            "links": str(taint.get("links") or ""),
            "copied": bool(taint.get("copied")),
            "outward": bool(taint.get("outward")),
            "outward_level": str(taint.get("outward_level") or ""),
            "target_levels": (_string_set(taint.get("target_levels"), "taint.target_levels")
                              or ([str(taint.get("target_level") or "prose")] if taint_target else [])),
            "target_roles": _string_set(taint.get("target_roles"), "taint.target_roles"),
            "target_count": _target_count(taint.get("target_count"), taint_target),
            "dictated": taint.get("dictated") is True,
        },
        "budget": {
            "steps": _long(budget, "steps", "budget"),
            "max_steps": _long(budget, "max_steps", "budget"),
        },
        "time": clock_record,
        "args": args,
    }
