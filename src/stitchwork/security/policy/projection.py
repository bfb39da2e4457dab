"""Which policies can decide a tool's calls, and which context attributes they read.

Both are found once, when the engine loads, from the policies in Cedar's JSON form. Cedar evaluates every
policy of a set on every request and spends 10-20 us converting each context attribute, so each tool gets a
policy set holding only the policies whose action scope can match it (:func:`policy_slices`), and its requests
carry only the context attributes those policies read (:func:`context_projections`, applied by
:func:`project`). Neither changes a decision: the analysis is conservative by construction.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


# -- attributes only compared: the decision depends on the comparisons' outcomes, not on the values ------------

_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}

Path = tuple[str, ...]
Operand = Path | int
"""A comparison operand: a context attribute path, or a Long literal."""

_ABSENT = object()


def _operand(expr: Any) -> Operand | None:
    path = _context_path(expr)
    if path:
        return tuple(path)
    if isinstance(expr, dict) and len(expr) == 1 and type(expr.get("Value")) is int:
        return int(expr["Value"])
    return None


def _scan(node: Any, comparisons: list[tuple[str, Operand, Operand]], uses: list[tuple[str, Path]]) -> None:
    """Collects the atomic comparisons (two operands, each a context path or a Long literal, one a path) and
    every other use of a context path: ``has`` tests (``"has"``), and anything else (``"other"``)."""
    if isinstance(node, list):
        for item in node:
            _scan(item, comparisons, uses)
        return
    if not isinstance(node, dict):
        return
    if node.get("Var") == "context":
        raise _WholeContext
    if len(node) == 1:
        op, inner = next(iter(node.items()))
        if op in _COMPARE and isinstance(inner, dict):
            left, right = _operand(inner.get("left")), _operand(inner.get("right"))
            if left is not None and right is not None and (isinstance(left, tuple) or isinstance(right, tuple)):
                comparisons.append((op, left, right))
                uses.extend(("cmp", o) for o in (left, right) if isinstance(o, tuple))
                return
        if op == "has" and isinstance(inner, dict) and isinstance(inner.get("attr"), str):
            path = _context_path(inner.get("left"))
            if path is not None:
                uses.append(("has", (*path, inner["attr"])))
                return
        if op == "." and (path := _context_path(node)) is not None:
            uses.append(("other", tuple(path)))
            return
    for value in node.values():
        _scan(value, comparisons, uses)


@dataclass(frozen=True)
class Abstraction:
    """Context attributes that policies only compare (``context.budget.steps > context.budget.max_steps``).

    A decision depends on such an attribute only through the outcomes of those comparisons (and on whether it is
    present), so a decision cache may key on the outcomes instead of the values: a run's step counter, or a meter,
    then changes no key until a comparison flips. Exact by construction: every use of the attribute is one of the
    comparisons or a ``has`` test of it; values that are not Longs key on the values themselves.

    Attributes:
        leaves: The attribute paths that are only compared.
        comparisons: Every atomic comparison with one of them as an operand: (operator, left, right).
    """

    leaves: tuple[Path, ...]
    comparisons: tuple[tuple[str, Operand, Operand], ...]

    def key(self, context: Mapping[str, Any], projected: Any) -> str | None:
        """The cache key of a request's projected context with the leaves' values replaced by the comparisons'
        outcomes; None when a value is not a Long (the caller keys on the values)."""
        values: dict[Path, Any] = {}
        for path in {*self.leaves, *(o for c in self.comparisons for o in c[1:] if isinstance(o, tuple))}:
            value = _lookup(context, path)
            if value is not _ABSENT and type(value) is not int:
                return None
            values[path] = value
        outcomes = []
        for op, left, right in self.comparisons:
            a = values[left] if isinstance(left, tuple) else left
            b = values[right] if isinstance(right, tuple) else right
            outcomes.append(None if a is _ABSENT or b is _ABSENT else _COMPARE[op](a, b))
        return json.dumps([_blank(projected, self.leaves), outcomes])


def _lookup(value: Any, path: Path) -> Any:
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return _ABSENT
        value = value[name]
    return value


def _blank(projected: Any, leaves: Sequence[Path]) -> Any:
    """``projected`` with the value of every present leaf replaced by 0 (copies only the dicts on the way)."""
    out = dict(projected) if isinstance(projected, dict) else projected
    for path in leaves:
        node = out
        for name in path[:-1]:
            child = node.get(name) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                node = None
                break
            node[name] = child = dict(child)
            node = child
        if isinstance(node, dict) and path[-1] in node:
            node[path[-1]] = 0
    return out


def abstraction(bodies: Sequence[Mapping[str, Any]]) -> Abstraction | None:
    """The attributes that the policies only compare (see :class:`Abstraction`), or None if there are none."""
    comparisons: list[tuple[str, Operand, Operand]] = []
    uses: list[tuple[str, Path]] = []
    try:
        for body in bodies:
            _scan(body.get("conditions"), comparisons, uses)
    except _WholeContext:
        return None

    def related(a: Path, b: Path) -> bool:  # one is a prefix of the other
        return a[: len(b)] == b or b[: len(a)] == a

    compared = {path for kind, path in uses if kind == "cmp"}
    leaves = tuple(sorted(
        leaf for leaf in compared
        if not any(related(leaf, path) and not (kind in ("cmp", "has") and path == leaf) for kind, path in uses)
    ))  # fmt: skip
    if not leaves:
        return None
    kept = tuple(c for c in comparisons if any(o in leaves for o in c[1:]))
    return Abstraction(leaves, kept)


def context_abstractions(
    bodies: Sequence[Mapping[str, Any]], tools: Mapping[str, CedarTool]
) -> dict[str, Abstraction | None]:
    """Per tool, the :class:`Abstraction` of the policies of its slice."""
    shared: dict[frozenset[int], Abstraction | None] = {}
    out: dict[str, Abstraction | None] = {}
    for tool in tools.values():
        keep = _applicable(bodies, tool)
        if keep not in shared:
            shared[keep] = abstraction([bodies[i] for i in sorted(keep)])
        out[tool.name] = shared[keep]
    return out
