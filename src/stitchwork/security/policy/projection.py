"""Which policies can decide a tool's calls, and which context attributes they read.

Both are found once, when the engine loads, from the policies in Cedar's JSON form. Cedar evaluates every
policy of a set on every request and spends 10-20 us converting each context attribute, so each tool gets a
policy set holding only the policies whose action scope can match it (:func:`policy_slices`), and its requests
carry only the context attributes those policies read (:func:`context_projections`, applied by
:func:`project`). Neither changes a decision: the analysis is conservative by construction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import cedarpy

from stitchwork.errors import PolicyLoadError
from stitchwork.security.policy.schema import ACTION, CedarTool


def may_apply(action_scope: Any, tool: CedarTool) -> bool:
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
                if uid["type"] != ACTION or uid["id"] in names:
                    return True
            return False
    except (KeyError, TypeError, AttributeError):
        pass
    return True


def _applicable(bodies: Sequence[Mapping[str, Any]], tool: CedarTool) -> frozenset[int]:
    """The load-order indices of the policies whose action scope can match the tool."""
    return frozenset(i for i, body in enumerate(bodies) if may_apply(body.get("action"), tool))


def policy_slices(
    bodies: Sequence[Mapping[str, Any]], tools: Mapping[str, CedarTool]
) -> dict[str, cedarpy.PolicySet]:
    """One policy set per tool holding only the policies whose action scope can match the tool.

    Cedar evaluates every policy of a set for every request; a policy whose scope excludes the action
    can neither decide nor fail, so leaving it out changes no decision and saves its evaluation. Each
    policy keeps its global id (``policy<N>``, its load-order index), so reasons map back unchanged.

    Raises:
        PolicyLoadError: Cedar cannot read back a slice of the policies in its JSON form.
    """
    shared: dict[frozenset[int], cedarpy.PolicySet] = {}
    sliced: dict[str, cedarpy.PolicySet] = {}
    for tool in tools.values():
        keep = _applicable(bodies, tool)
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


def context_projections(
    bodies: Sequence[Mapping[str, Any]], tools: Mapping[str, CedarTool]
) -> dict[str, Mapping[str, Any] | None]:
    """Per tool, the context attributes that the policies of its slice (see :func:`policy_slices`) can read.

    A context attribute no policy of the slice reads cannot change its decision, its deciding policies or
    its errors (an attribute a policy reads and the context lacks is an error either way).
    """
    shared: dict[frozenset[int], Mapping[str, Any] | None] = {}
    projections: dict[str, Mapping[str, Any] | None] = {}
    for tool in tools.values():
        keep = _applicable(bodies, tool)
        if keep not in shared:
            shared[keep] = context_projection([bodies[i] for i in sorted(keep)])
        projections[tool.name] = shared[keep]
    return projections


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


def context_projection(bodies: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The part of a request context that the policies can read, or None when they may read all of it."""
    projection: dict[str, Any] = {}
    try:
        for body in bodies:
            _collect_context_uses(body.get("conditions"), projection)
    except _WholeContext:
        return None
    return projection


def project(value: Any, projection: Any) -> Any:
    """``value`` cut down to the attributes of ``projection`` (a node of :func:`context_projection`)."""
    if projection is _KEEP_ALL or not isinstance(value, dict):
        return value
    return {name: project(value[name], node) for name, node in projection.items() if name in value}
