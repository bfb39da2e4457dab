"""Only the context attributes a tool's policies read are sent to Cedar, and decisions are remembered by them.

Neither may change a decision.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from stitchwork.security.policy import PolicyEngine, Request, ToolAction, builtin_policy_dir
from stitchwork.security.policy.projection import context_projection

TOOLS = (
    ToolAction(
        "send_email",
        "external",
        {
            "type": "object",
            "required": ["to"],
            "properties": {"to": {"type": "string"}, "priority": {"type": "integer"}, "cc": {"type": "string"}},
        },
    ),
    ToolAction("read_file", "read", {"type": "object", "properties": {"path": {"type": "string"}}}),
    ToolAction("delete_file", "irreversible", {"type": "object", "properties": {"path": {"type": "string"}}}),
)

EXTRA = """
@id("night") forbid(principal, action in Stitchwork::Action::"external", resource) when { context.time.hour < 6 };
@id("urgent") forbid(principal, action == Stitchwork::Action::"send_email", resource)
  when { context.args has priority && context.args.priority > 5 && context.taint.sources.contains("tool:web") };
@id("cc") forbid(principal, action == Stitchwork::Action::"send_email", resource)
  when { context.args has cc && context.args.cc == "boss" && !context.approved };
@id("overflow") forbid(principal, action == Stitchwork::Action::"read_file", resource)
  when { context.budget.steps + 9223372036854775807 < 0 };
"""


def parsed(text: str) -> list[dict[str, Any]]:
    est = json.loads(cedarpy.policies_to_json_str(text))
    return [est["staticPolicies"][key] for key in sorted(est["staticPolicies"])]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("permit(principal, action, resource);", {}),
        (
            "permit(principal, action, resource) when { context.budget.steps > 1 && context.args has a.b };",
            {"budget": {"steps": True}, "args": {"a": True}},
        ),
        (
            "permit(principal, action, resource) when { context.taint.target } unless { context.taint };",
            {"taint": True},
        ),
        ("permit(principal, action, resource) when { context == {} };", None),
        ('permit(principal, action, resource) when { context["approved"] };', {"approved": True}),
        ("permit(principal, action, resource) when { [context].contains(context) };", None),
        ("permit(principal, action, resource) when { {a: context}.a has approved };", None),
    ],
)
def test_projection_keeps_every_path_a_policy_reads(text: str, expected: dict[str, Any] | None) -> None:
    assert context_projection(parsed(text)) == expected


def test_projected_decisions_equal_whole_context_decisions(tmp_path: Path) -> None:
    (tmp_path / "extra.cedar").write_text(EXTRA)
    paths = [builtin_policy_dir(), builtin_policy_dir() / "strict", tmp_path / "extra.cedar"]
    projected = PolicyEngine.load(paths, TOOLS, agents=["alice"])
    whole = PolicyEngine.load(paths, TOOLS, agents=["alice"])
    whole._projections.clear()  # every request carries its whole context
    read = {"budget": {"steps": True, "max_steps": True}, "args": {"memory_owner": True},
            "taint": {"outward_level": True}}
    assert projected._projections["read_file"] == read

    requests = []
    for tool, hour, priority, cc, sources, target_tainted, approved, steps in itertools.product(
        ("send_email", "read_file", "delete_file"), (3, 12), (None, 9), (None, "boss"), ([], ["tool:web"]),
        (False, True), (False, True), (0, 1, 30),
    ):
        args: dict[str, Any] = {"to": "bob@example.org", "path": "notes.txt"}
        if priority is not None:
            args["priority"] = priority
        if cc is not None:
            args["cc"] = cc
        context = {
            "approved": approved,
            "taint": {"any": bool(sources), "target": target_tainted, "target_level": "record", "args": [],
                      "sources": sources},
            "budget": {"steps": steps, "max_steps": 20},
            "time": {"unix": 1_700_000_000, "hour": hour, "weekday": 2},
            "args": args,
        }
        requests.append(Request("alice", tool, "bob@example.org", context))

    mine, theirs = projected.decide_batch(requests), whole.decide_batch(requests)

    for request, a, b in zip(requests, mine, theirs, strict=True):
        assert (a.effect, a.policy_ids, a.reasons) == (b.effect, b.policy_ids, b.reasons), request
        assert a.errors == b.errors, request
    assert {d.effect.value for d in mine} == {"allow", "deny", "ask"}
    assert any(d.errors for d in mine) and any("overflow" in " ".join(d.errors) for d in mine)


def read(agent: str = "alice", *, steps: int = 1, path: str = "notes.txt", hour: int = 12) -> Request:
    context = {
        "approved": False,
        "taint": {"any": False, "target": False, "args": [], "sources": []},
        "budget": {"steps": steps, "max_steps": 20},
        "time": {"unix": 1_700_000_000 + steps, "hour": hour, "weekday": 2},
        "args": {"path": path},
    }
    return Request(agent, "read_file", path, context)


def test_cached_decisions_equal_fresh_ones_and_the_key_holds_what_policies_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = PolicyEngine.load([builtin_policy_dir()], TOOLS, agents=["alice"], decision_cache=64)
    fresh = PolicyEngine.load([builtin_policy_dir()], TOOLS, agents=["alice"], decision_cache=0)
    requests = [read(steps=s, hour=h) for s in (1, 21, 1, 21) for h in (3, 12)]
    evaluated: list[PolicyEngine] = []
    run = PolicyEngine._run

    def counting(self: PolicyEngine, prepared: Any, entities: Any) -> Any:
        evaluated.extend([self] * len(prepared))
        return run(self, prepared, entities)

    monkeypatch.setattr(PolicyEngine, "_run", counting)

    decisions = [engine.decide(r) for r in requests]

    assert decisions == [fresh.decide(r) for r in requests]
    assert [d.effect.value for d in decisions[:2]] == ["allow", "allow"]
    assert [d.effect.value for d in decisions[2:4]] == ["deny", "deny"]  # steps is read: not the cached allow
    assert decisions[2].policy_ids == ("budget-exceeded",)
    # read_file's policies read budget.steps, not the time: a new hour changes nothing and the cache answers.
    assert evaluated.count(engine) == 2
    assert evaluated.count(fresh) == len(requests)


def test_the_cache_is_bounded_and_cleared_when_agents_are_added(tmp_path: Path) -> None:
    engine = PolicyEngine.load([builtin_policy_dir()], TOOLS, agents=["alice"], decision_cache=3)
    for index in range(6):
        engine.decide(read(path=f"file{index}"))
    assert len(engine._cache) == 3

    decision = engine.decide(read("newcomer"))  # first call of an agent: the entity set grows

    assert decision.effect.value == "allow"
    assert len(engine._cache) == 1


def test_an_approved_call_is_not_answered_with_the_unapproved_decision(tmp_path: Path) -> None:
    (tmp_path / "p.cedar").write_text(
        '@id("all") permit(principal, action, resource);\n'
        '@id("held") @approval("required") forbid(principal, action == Stitchwork::Action::"read_file", resource);\n'
    )
    engine = PolicyEngine.load([tmp_path / "p.cedar"], TOOLS, agents=["alice"], decision_cache=64)
    fresh = PolicyEngine.load([tmp_path / "p.cedar"], TOOLS, agents=["alice"], decision_cache=0)
    unapproved = read()
    approved = Request(unapproved.agent, unapproved.tool, unapproved.target, {**unapproved.context, "approved": True})

    for request in (unapproved, approved, unapproved, approved):
        assert engine.decide(request) == fresh.decide(request)
    assert engine.decide(unapproved).reasons != engine.decide(approved).reasons  # no policy reads `approved`
