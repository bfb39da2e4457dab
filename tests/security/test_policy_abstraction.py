"""Attributes that policies only compare (a step counter, a meter) are cached by the comparisons' outcomes.

A cached decision must always equal a fresh one; a run's growing step count must not defeat the cache.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from stitchwork.security.policy import PolicyEngine, Request, ToolAction, builtin_policy_dir
from stitchwork.security.policy.projection import Abstraction, abstraction

MODEL_ARGS = ("model_tokens_used", "model_max_tokens", "model_cost_used_microusd", "model_max_cost_microusd",
              "rate_agent_requests_minute", "rate_agent_rpm", "rate_agent_tokens_minute", "rate_agent_tpm",
              "rate_model_requests_minute", "rate_model_rpm", "rate_model_tokens_minute", "rate_model_tpm")
TOOLS = (
    ToolAction("read_file", "read", {"type": "object", "properties": {"path": {"type": "string"}}}),
    ToolAction("send", "external", {"type": "object", "properties": {"n": {"type": "integer"},
                                                                    "to": {"type": "string"}}}),
    ToolAction("model_call", "external", {"type": "object", "properties": {
        "model_name": {"type": "string"}, "model_listed": {"type": "boolean"},
        **{name: {"type": "integer"} for name in MODEL_ARGS}}}),
)
EXTRA = """
@id("n-limit") forbid(principal, action == Stitchwork::Action::"send", resource)
  when { context.args has n && context.args.n >= 3 && 10 > context.args.n };
@id("n-equal") @approval("required") forbid(principal, action == Stitchwork::Action::"send", resource)
  when { context.args has n && context.args.n == context.budget.steps } unless { context.approved };
@id("to-used") forbid(principal, action == Stitchwork::Action::"send", resource)
  when { context.args has to && context.args.to == "boss" && context.budget.max_steps != 7 };
"""


def parsed(text: str) -> list[dict[str, Any]]:
    est = json.loads(cedarpy.policies_to_json_str(text))
    return [est["staticPolicies"][key] for key in sorted(est["staticPolicies"])]


@pytest.mark.parametrize(
    ("text", "leaves"),
    [
        ("permit(principal, action, resource) when { context.budget.steps > context.budget.max_steps };",
         [("budget", "max_steps"), ("budget", "steps")]),
        ("permit(principal, action, resource) when { context.args has n && context.args.n > 5 };", [("args", "n")]),
        ("permit(principal, action, resource) when { 2 <= context.args.n || context.args.m != 1 };",
         [("args", "m"), ("args", "n")]),
        # used any other way than compared with a Long or another attribute: keyed on the value
        ("permit(principal, action, resource) when { context.budget.steps + 1 > 2 };", None),
        ('permit(principal, action, resource) when { context.args.n == "x" };', None),
        ("permit(principal, action, resource) when { context.args.n > 1 && context.args.n in [1, 2] };", None),
        ("permit(principal, action, resource) when { context.budget.steps > 1 && context.budget == {} };", None),
        ("permit(principal, action, resource) when { context has budget && context.budget.steps > 1 };", None),
        ("permit(principal, action, resource) when { context.args.n > 1 && context.args.n has x };", None),
        ("permit(principal, action, resource) when { context.args.n > 1 && context == {} };", None),
        ("permit(principal, action, resource) when { context.args.n > context.args.m && context.args.m like \"*\" };",
         [("args", "n")]),
    ],
)
def test_only_attributes_used_solely_in_comparisons_are_abstracted(text: str, leaves: list[Any] | None) -> None:
    found = abstraction(parsed(text))
    assert (None if found is None else list(found.leaves)) == leaves


def test_the_key_holds_outcomes_and_presence_not_values() -> None:
    found = abstraction(parsed(
        "permit(principal, action, resource) when { context.args has n && context.args.n > context.budget.steps };"
    ))
    assert isinstance(found, Abstraction)

    def key(args: dict[str, Any], steps: int = 5) -> str | None:
        context = {"args": args, "budget": {"steps": steps}, "approved": False}
        return found.key(context, {"args": args, "budget": {"steps": steps}})

    assert key({"n": 6}) == key({"n": 600}) == key({"n": 7}, steps=6)
    assert key({"n": 5}) != key({"n": 6})  # the comparison flips
    assert key({}) != key({"n": 5}) and key({}) != key({"n": 6})  # absent is neither outcome
    assert key({"n": "6"}) is None and key({"n": True}) is None  # not a Long: keyed on the values
    assert key({"n": 6, "other": 1}) != key({"n": 6})  # everything else is still keyed on its value


def engines(tmp_path: Path) -> tuple[PolicyEngine, PolicyEngine]:
    (tmp_path / "extra.cedar").write_text(EXTRA)
    paths = [builtin_policy_dir(), tmp_path / "extra.cedar"]
    return (PolicyEngine.load(paths, TOOLS, agents=["alice"], decision_cache=4096),
            PolicyEngine.load(paths, TOOLS, agents=["alice"], decision_cache=0))


def test_cached_decisions_equal_fresh_ones_over_random_counters(tmp_path: Path) -> None:
    cached, fresh = engines(tmp_path)
    assert cached._abstractions["send"] is not None and cached._abstractions["model_call"] is not None
    rng = random.Random(18)
    small = (0, 1, 2, 3, 6, 7, 9, 10, 11, 2**63 - 1)
    for _ in range(1500):
        tool = rng.choice(("read_file", "send", "model_call"))
        args: dict[str, Any] = {}
        if tool == "send":
            pairs = (("n", rng.choice(small)), ("to", rng.choice(("boss", "bob"))))
            args = {k: v for k, v in pairs if rng.random() < 0.8}
        elif tool == "model_call":
            args = {"model_name": "m", "model_listed": rng.random() < .9}
            args.update({name: rng.choice(small) for name in MODEL_ARGS if rng.random() < .7})
        context = {
            "approved": rng.random() < .3,
            "taint": {"any": False, "target": False, "args": [], "sources": []},
            "budget": {"steps": rng.choice(small), "max_steps": rng.choice(small)},
            "time": {"unix": 1_700_000_000, "hour": 12, "weekday": 2},
            "args": args,
        }
        request = Request("alice", tool, "bob", context)
        assert cached.decide(request) == fresh.decide(request), request
    effects = {d.effect.value for d in cached._cache._entries.values()}
    assert effects == {"allow", "deny", "ask"}


def test_a_runs_growing_step_count_is_answered_from_the_cache_until_the_budget_flips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached, fresh = engines(tmp_path)
    evaluated: list[int] = []
    run = PolicyEngine._run

    def counting(self: PolicyEngine, prepared: Any, entities: Any) -> Any:
        if self is cached:
            evaluated.append(len(prepared))
        return run(self, prepared, entities)

    monkeypatch.setattr(PolicyEngine, "_run", counting)

    def call(steps: int) -> Request:
        return Request("alice", "read_file", "notes.txt", {
            "approved": False, "taint": {"any": False, "target": False, "args": [], "sources": []},
            "budget": {"steps": steps, "max_steps": 40}, "time": {"unix": 1, "hour": 12, "weekday": 2},
            "args": {"path": "notes.txt"}})

    decisions = [cached.decide(call(steps)) for steps in range(1, 46)]

    assert decisions == [fresh.decide(call(steps)) for steps in range(1, 46)]
    assert [d.effect.value for d in decisions] == ["allow"] * 40 + ["deny"] * 5
    assert decisions[-1].policy_ids == ("budget-exceeded",)
    assert sum(evaluated) == 2  # one Cedar evaluation while within the budget, one once past it
