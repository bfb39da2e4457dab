"""Policy slices, context projections and abstractions (security/policy/projection.py) on their edges: every
comparison operator, keys of absent and blanked attributes, scopes in Cedar's ``__entity`` form, and slices Cedar
cannot read back."""

from __future__ import annotations

import dataclasses
import json
import operator
from typing import Any

import cedarpy
import pytest

from stitchwork.errors import PolicyLoadError
from stitchwork.security.policy.projection import Abstraction, _blank, abstraction, may_apply, policy_slices
from stitchwork.security.policy.schema import ACTION, CedarTool

TOOL = CedarTool("mail", "external", {"type": ACTION, "id": "mail"}, ())


def parsed(text: str) -> list[dict[str, Any]]:
    est = json.loads(cedarpy.policies_to_json_str(text))
    return [est["staticPolicies"][key] for key in sorted(est["staticPolicies"])]


OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
             "!=": operator.ne}


@pytest.mark.parametrize("op", list(OPERATORS))
def test_every_long_comparison_is_abstracted_to_its_outcome(op: str) -> None:
    found = abstraction(parsed(f"permit(principal, action, resource) when {{ context.args.n {op} 3 }};"))
    assert found == Abstraction(leaves=(("args", "n"),), comparisons=((op, ("args", "n"), 3),))
    for n in (2, 3, 4):
        context = {"args": {"n": n}}
        assert found.key(context, context) == json.dumps([{"args": {"n": 0}}, [OPERATORS[op](n, 3)]])


def test_an_absent_leaf_keys_as_no_outcome_and_stays_absent() -> None:
    found = abstraction(parsed("permit(principal, action, resource) when "
                               "{ context.args has n && context.budget.steps > context.args.n };"))
    assert found is not None and found.leaves == (("args", "n"), ("budget", "steps"))
    absent = {"args": {}, "budget": {"steps": 4}}
    assert found.key(absent, absent) == json.dumps([{"args": {}, "budget": {"steps": 0}}, [None]])
    present = {"args": {"n": 9}, "budget": {"steps": 4}}
    assert found.key(present, present) == json.dumps([{"args": {"n": 0}, "budget": {"steps": 0}}, [False]])
    assert present == {"args": {"n": 9}, "budget": {"steps": 4}}  # the caller's context is not blanked in place


@pytest.mark.parametrize(("projected", "blanked"), [
    ({"args": {"n": 7}, "budget": {"steps": 2}}, {"args": {"n": 0}, "budget": {"steps": 0}}),
    ({"args": {}, "budget": {"steps": 2}}, {"args": {}, "budget": {"steps": 0}}),  # absent: not added
    ({"args": 5, "budget": {"steps": 2}}, {"args": 5, "budget": {"steps": 0}}),  # its parent is not a dict
    ({"budget": {"steps": 2}}, {"budget": {"steps": 0}}),  # its parent is absent
    ({"args": 5, "n": 3, "steps": 4}, {"args": 5, "n": 3, "steps": 4}),  # a same-named attribute higher up
    ({"args": [1], "budget": None}, {"args": [1], "budget": None}),
    (7, 7),
    ([{"n": 1}], [{"n": 1}]),
])
def test_blanking_replaces_only_present_leaves_under_dicts(projected: Any, blanked: Any) -> None:
    before = json.dumps(projected)
    assert _blank(projected, [("args", "n"), ("budget", "steps")]) == blanked
    assert json.dumps(projected) == before  # copies: the projected context itself is unchanged


def test_an_abstraction_is_immutable() -> None:
    found = Abstraction(leaves=(("a",),), comparisons=((">", ("a",), 1),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.leaves = ()  # type: ignore[misc]
    assert hash(found) == hash(Abstraction(leaves=(("a",),), comparisons=((">", ("a",), 1),)))


@pytest.mark.parametrize(("scope", "applies"), [
    ({"op": "==", "entity": {"__entity": {"type": ACTION, "id": "read"}}}, False),
    ({"op": "==", "entity": {"__entity": {"type": ACTION, "id": "mail"}}}, True),
    ({"op": "in", "entity": {"__entity": {"type": ACTION, "id": "external"}}}, True),
    ({"op": "in", "entities": [{"__entity": {"type": ACTION, "id": "read"}}]}, False),
    ({"op": "All"}, True),
])
def test_scopes_in_the_entity_escape_form_are_read_like_plain_ones(scope: Any, applies: bool) -> None:
    assert may_apply(scope, TOOL) is applies


def test_a_slice_cedar_cannot_read_back_is_a_policy_load_error() -> None:
    body = parsed("permit(principal, action, resource);")[0]
    with pytest.raises(PolicyLoadError) as caught:
        policy_slices([{**body, "effect": "allow"}], {"mail": TOOL})
    assert str(caught.value).startswith("policies do not convert to Cedar's JSON form: ")
    assert isinstance(caught.value.__cause__, ValueError)
    assert len(policy_slices([body], {"mail": TOOL})["mail"]) == 1
