"""The Cedar policy engine and the default policy pack."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from stitchwork.errors import ConfigError, PolicyLoadError
from stitchwork.security.policy import (
    Decision,
    Effect,
    PolicyEngine,
    Request,
    ToolAction,
    builtin_policy_dir,
)

TOOLS = (
    ToolAction(
        "send_email",
        "external",
        {
            "type": "object",
            "required": ["to", "body"],
            "properties": {
                "to": {"type": "string"},
                "body": {"type": "string"},
                "priority": {"type": "integer"},
                "attachments": {"type": "array"},
            },
        },
    ),
    ToolAction(
        "read_file",
        "read",
        {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}},
    ),
    ToolAction(
        "delete_file",
        "irreversible",
        {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}},
    ),
    ToolAction(
        "write_file",
        "write",
        {
            "type": "object",
            "required": ["path", "content"],
            "properties": {
                "path": {"type": "string"},
                "content": {"type": "string"},
                "append": {"type": "boolean"},
            },
        },
    ),
)

ARGS = {
    "send_email": {"to": "bob@example.org", "body": "hello"},
    "read_file": {"path": "notes.txt"},
    "delete_file": {"path": "notes.txt"},
    "write_file": {"path": "notes.txt", "content": "x"},
}


def ctx(
    *,
    tainted: Sequence[str] = (),
    target_tainted: bool = False,
    approved: bool = False,
    steps: int = 1,
    max_steps: int = 20,
    args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A gateway-shaped context: ``tainted`` names tainted arguments."""
    return {
        "side_effect": "ignored",
        "approved": approved,
        "taint": {
            "any": bool(tainted) or target_tainted,
            "target": target_tainted,
            "args": list(tainted),
            "sources": ["tool:read_inbox"] if tainted or target_tainted else [],
        },
        "budget": {"steps": steps, "max_steps": max_steps},
        "time": {"unix": 1_700_000_000, "hour": 10, "weekday": 2},
        "args": dict(args) if args is not None else {},
    }


def call(tool: str, agent: str = "alice", **kwargs: Any) -> Request:
    kwargs.setdefault("args", ARGS.get(tool, {}))
    target = str(kwargs["args"].get("to") or kwargs["args"].get("path") or "")
    return Request(agent=agent, tool=tool, target=target, context=ctx(**kwargs))


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load([builtin_policy_dir(), builtin_policy_dir() / "strict"], TOOLS, agents=["alice"])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def matrix() -> list[Request]:
    """Requests covering every tool, taint, approval and budget combination, plus invalid ones."""
    requests = [
        call(tool, agent=agent, tainted=tainted, target_tainted=target, approved=approved, steps=steps)
        for tool, agent, (tainted, target), approved, steps in itertools.product(
            ARGS,
            ("alice", "stranger"),
            [((), False), (("body",), False), (("to", "path"), True)],
            (False, True),
            (1, 21),
        )
    ]
    requests.append(Request("alice", "no_such_tool", "", ctx()))
    requests.append(Request("alice", "send_email", "x", {"approved": False}))
    return requests


# -- the default pack ------------------------------------------------------------------------------------


def test_read_is_allowed_for_every_agent(engine: PolicyEngine) -> None:
    for agent in ("alice", "never-registered"):
        decision = engine.decide(call("read_file", agent=agent, tainted=["path"], target_tainted=True))
        assert decision.effect is Effect.ALLOW
        assert decision.policy_ids == ("read-permit",)
        assert decision.reasons == ("permit read-permit (default/read.cedar:9)",)


def test_external_untainted_is_allowed(engine: PolicyEngine) -> None:
    decision = engine.decide(call("send_email"))
    assert decision == Decision(
        Effect.ALLOW, ("external-permit",), ("permit external-permit (default/external.cedar:31)",), ()
    )


def test_external_tainted_target_is_denied_even_when_approved(engine: PolicyEngine) -> None:
    for approved in (False, True):
        decision = engine.decide(call("send_email", tainted=["to"], target_tainted=True, approved=approved))
        assert decision == Decision(
            Effect.DENY,
            ("external-tainted-target",),
            ("forbid external-tainted-target (default/external.cedar:45)",),
            (),
        )


def test_external_target_from_a_record_asks_and_approval_allows(engine: PolicyEngine) -> None:
    request = call("send_email", tainted=["to"], target_tainted=True)
    taint = dict(request.context["taint"], target_level="record")
    asked = engine.decide(Request(request.agent, request.tool, request.target, {**request.context, "taint": taint}))
    assert asked.effect is Effect.ASK
    assert asked.policy_ids == ("external-record-target",)
    approved = {**request.context, "taint": taint, "approved": True}
    assert engine.decide(Request(request.agent, request.tool, request.target, approved)).effect is Effect.ALLOW
    for level in ("prose", "unattributed"):
        hard = {**request.context, "taint": dict(taint, target_level=level), "approved": True}
        denied = engine.decide(Request(request.agent, request.tool, request.target, hard))
        assert denied.policy_ids == ("external-tainted-target",)


def test_external_tainted_body_asks_and_approval_allows(engine: PolicyEngine) -> None:
    asked = engine.decide(call("send_email", tainted=["body"]))
    assert asked.effect is Effect.ASK
    assert asked.policy_ids == ("external-tainted-args",)
    assert asked.reasons == ("approval required by external-tainted-args (strict/external-tainted-args.cedar:9)",)
    approved = engine.decide(call("send_email", tainted=["body"], approved=True))
    assert approved.effect is Effect.ALLOW
    assert approved.policy_ids == ("external-permit",)


def test_irreversible_always_asks(engine: PolicyEngine) -> None:
    decision = engine.decide(call("delete_file"))
    assert decision.effect is Effect.ASK
    assert decision.policy_ids == ("irreversible-approval",)
    assert engine.decide(call("delete_file", approved=True)).effect is Effect.ALLOW
    tainted = engine.decide(call("delete_file", tainted=["path"], target_tainted=True, approved=True))
    assert tainted.effect is Effect.DENY
    assert tainted.policy_ids == ("irreversible-tainted-target",)


def test_write_asks_only_for_a_tainted_target(engine: PolicyEngine) -> None:
    assert engine.decide(call("write_file", tainted=["content"])).effect is Effect.ALLOW
    decision = engine.decide(call("write_file", tainted=["path"], target_tainted=True))
    assert decision.effect is Effect.ASK
    assert decision.policy_ids == ("write-tainted-target",)


def test_budget_exceeded_is_denied(engine: PolicyEngine) -> None:
    assert engine.decide(call("read_file", steps=20, max_steps=20)).effect is Effect.ALLOW
    decision = engine.decide(call("read_file", steps=21, max_steps=20))
    assert decision.effect is Effect.DENY
    assert decision.policy_ids == ("budget-exceeded",)
    # an approval cannot lift the budget: the irreversible call is denied, not asked
    over = engine.decide(call("delete_file", steps=21, max_steps=20))
    assert over.effect is Effect.DENY
    assert over.policy_ids == ("budget-exceeded", "irreversible-approval")


def test_unknown_tool_is_denied_with_an_error(engine: PolicyEngine) -> None:
    decision = engine.decide(Request("alice", "launch_rockets", "moon", ctx()))
    assert decision.effect is Effect.DENY
    assert decision.policy_ids == ()
    assert len(decision.errors) == 1
    assert "launch_rockets" in decision.errors[0]


def test_malformed_context_fails_closed(engine: PolicyEngine) -> None:
    missing_taint = {k: v for k, v in ctx().items() if k != "taint"}
    bad_budget = {**ctx(), "budget": {"steps": "one", "max_steps": 20}}
    wrong_required_arg = ctx(args={"to": 42, "body": "hi"})
    for context in (missing_taint, bad_budget, wrong_required_arg, {"approved": True}):
        decision = engine.decide(Request("alice", "send_email", "bob@example.org", context))
        assert decision.effect is Effect.DENY
        assert decision.errors


def test_approved_must_be_exactly_true(engine: PolicyEngine) -> None:
    context = {**ctx(tainted=["body"], args=ARGS["send_email"]), "approved": "yes"}
    assert engine.decide(Request("alice", "send_email", "b", context)).effect is Effect.ASK


def test_taint_is_read_conservatively(engine: PolicyEngine, tmp_path: Path) -> None:
    # a tainted argument list without the "any" flag still counts as tainted, for the pack ...
    context = ctx(args=ARGS["send_email"])
    context["taint"] = {"any": False, "target": False, "args": ["body"], "sources": []}
    assert engine.decide(Request("alice", "send_email", "b", context)).effect is Effect.ASK
    # ... and for a policy that only looks at context.taint.any
    write(
        tmp_path / "p" / "any.cedar",
        '@id("all") permit(principal, action, resource);\n'
        '@id("no-taint") forbid(principal, action, resource) when { context.taint.any };\n',
    )
    custom = PolicyEngine.load([tmp_path / "p"], TOOLS)
    assert custom.decide(Request("alice", "send_email", "b", context)).policy_ids == ("no-taint",)
    context["taint"] = {"any": 0, "target": 1, "args": [], "sources": []}
    assert custom.decide(Request("alice", "send_email", "b", context)).policy_ids == ("no-taint",)


def test_decide_batch_equals_decide(engine: PolicyEngine) -> None:
    requests = matrix()
    batch = engine.decide_batch(requests)
    assert batch == [engine.decide(r) for r in requests]
    assert {d.effect for d in batch} == {Effect.ALLOW, Effect.DENY, Effect.ASK}
    assert engine.decide_batch([]) == []


def test_request_validation_by_cedar_gives_the_same_decisions(engine: PolicyEngine) -> None:
    """The engine builds contexts of the schema's shape itself; Cedar's own request check agrees."""
    strict = PolicyEngine.load(
        [builtin_policy_dir(), builtin_policy_dir() / "strict"], TOOLS, agents=["alice"], validate_requests=True
    )
    for request in matrix():
        ours, cedars = engine.decide(request), strict.decide(request)
        assert (ours.effect, ours.policy_ids) == (cedars.effect, cedars.policy_ids), request


async def test_adecide_under_64_concurrent_tasks_matches_decide(engine: PolicyEngine) -> None:
    requests = matrix()
    expected = [engine.decide(r) for r in requests]
    got = await asyncio.gather(*(engine.adecide(requests[i % len(requests)]) for i in range(64)))
    assert got == [expected[i % len(requests)] for i in range(64)]


async def test_adecide_offloaded_to_a_thread_matches_decide() -> None:
    engine = PolicyEngine.load([builtin_policy_dir()], TOOLS, agents=["alice"], offload=True)
    try:
        requests = matrix()
        expected = [engine.decide(r) for r in requests]

        async def worker(offset: int) -> list[Decision]:
            return [await engine.adecide(requests[(offset + k) % len(requests)]) for k in range(5)]

        results = await asyncio.gather(*(worker(i) for i in range(64)))
        for offset, decisions in enumerate(results):
            assert decisions == [expected[(offset + k) % len(requests)] for k in range(5)]
        workers = list(engine._batcher._executor._threads)  # type: ignore[union-attr]
        assert workers and all(t.is_alive() and t.name.startswith("stitchwork-cedar") for t in workers)
        engine.close()
        assert not any(t.is_alive() for t in workers)  # close() stops the worker thread
        assert engine.decide(requests[0]) == expected[0]  # and the engine still decides
    finally:
        engine.close()


async def test_an_engine_decides_in_the_callers_thread_unless_offloaded() -> None:
    engine = PolicyEngine.load([builtin_policy_dir()], TOOLS, agents=["alice"])
    try:
        assert await engine.adecide(matrix()[0]) == engine.decide(matrix()[0])
        assert engine._batcher._executor is None  # no worker thread was started
    finally:
        engine.close()


async def test_adecide_survives_a_cancelled_caller(engine: PolicyEngine) -> None:
    first = asyncio.ensure_future(engine.adecide(call("read_file")))
    second = asyncio.ensure_future(engine.adecide(call("send_email")))
    await asyncio.sleep(0)
    second.cancel()
    assert (await first).effect is Effect.ALLOW
    assert (await engine.adecide(call("delete_file"))).effect is Effect.ASK


def test_schema_and_describe(engine: PolicyEngine) -> None:
    schema = engine.schema_text
    assert 'action "send_email" in ["external"] appliesTo' in schema
    assert 'args: { "to": String, "body": String, "priority"?: Long }' in schema
    assert 'args: { "path": String, "content": String, "append"?: Bool }' in schema
    rows = {row["id"]: row for row in engine.describe()}
    assert rows["external-tainted-target"] == {
        "id": "external-tainted-target",
        "effect": "forbid",
        "file": "default/external.cedar",
        "path": str(builtin_policy_dir() / "external.cedar"),
        "line": "45",
        "annotations": '@id("external-tainted-target")',
    }
    assert (
        rows["irreversible-approval"]["annotations"] == '@approval("required") @id("irreversible-approval")'
    )
    assert all(row["id"] for row in rows.values())  # every policy of the pack has an @id


def test_pack_loads_without_tools_of_a_class() -> None:
    only_read = PolicyEngine.load([builtin_policy_dir()], [TOOLS[1]])
    assert only_read.decide(call("read_file")).effect is Effect.ALLOW


# -- custom policies -----------------------------------------------------------------------------------


def test_default_deny_when_no_policy_matches(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    engine = PolicyEngine.load([tmp_path / "empty"], TOOLS)
    decision = engine.decide(call("read_file"))
    assert decision == Decision(Effect.DENY, (), ("no policy permits (default deny)",), ())


def test_ids_default_to_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path / "p" / "mine.cedar",
        '// "a string; in a comment"\n\n'
        "permit(principal, action, resource)\n"
        '  when { context.args has path && context.args.path like "*;*" };\n',
    )
    engine = PolicyEngine.load([tmp_path / "p"], TOOLS)
    decision = engine.decide(call("read_file", args={"path": "a;b"}))
    assert decision.policy_ids == ("p/mine.cedar:3",)
    assert decision.reasons == ("permit p/mine.cedar:3",)
    assert engine.decide(call("read_file", args={"path": "ab"})).effect is Effect.DENY


def test_approval_forbid_without_a_permit_is_a_plain_deny(tmp_path: Path) -> None:
    write(
        tmp_path / "p" / "a.cedar",
        '@id("ask-all") @approval("required")\n'
        "forbid(principal, action, resource) unless { context.approved };\n",
    )
    engine = PolicyEngine.load([tmp_path / "p"], TOOLS)
    decision = engine.decide(call("read_file"))
    assert decision.effect is Effect.DENY
    assert decision.reasons[0] == "no policy permits (default deny)"
    assert "ask-all" in decision.reasons[-1]


def test_policy_scopes_select_the_right_actions(tmp_path: Path) -> None:
    """Each tool is evaluated against the policies whose action scope can match it, and only those."""
    write(
        tmp_path / "p" / "scopes.cedar",
        '@id("all") permit(principal, action, resource);\n'
        '@id("mail-only") forbid(principal, action == Stitchwork::Action::"send_email", resource);\n'
        '@id("read-or-write") forbid(principal, action in [Stitchwork::Action::"read", '
        'Stitchwork::Action::"write"], resource)\n'
        '  when { context.args has path && context.args.path == "x" };\n'
        '@id("tool-in-itself") forbid(principal, action in Stitchwork::Action::"delete_file", resource);\n',
    )
    engine = PolicyEngine.load([tmp_path / "p"], TOOLS)
    assert engine.decide(call("send_email")).policy_ids == ("mail-only",)
    assert engine.decide(call("delete_file")).policy_ids == ("tool-in-itself",)
    assert engine.decide(call("read_file")).policy_ids == ("all",)
    assert engine.decide(call("read_file", args={"path": "x"})).policy_ids == ("read-or-write",)
    assert engine.decide(call("write_file", args={"path": "x", "content": ""})).policy_ids == (
        "read-or-write",
    )


def test_agents_groups_and_unknown_agents(tmp_path: Path) -> None:
    write(
        tmp_path / "p" / "who.cedar",
        '@id("ops") permit(principal in Stitchwork::Group::"ops", action, resource);\n'
        '@id("by-name") permit(principal, action, resource) when { principal.name == "newcomer" };\n',
    )
    engine = PolicyEngine.load([tmp_path / "p"], TOOLS, agents=["alice"], groups={"ops": ["bob"]})
    assert engine.decide(call("read_file", agent="bob")).policy_ids == ("ops",)
    assert engine.decide(call("read_file", agent="alice")).effect is Effect.DENY
    assert engine.decide(call("read_file", agent="newcomer")).policy_ids == ("by-name",)
    assert engine.decide_batch([call("read_file", agent=n) for n in ('x\n"y', "newcomer", "z")]) == [
        Decision(Effect.DENY, (), ("no policy permits (default deny)",), ()),
        engine.decide(call("read_file", agent="newcomer")),
        Decision(Effect.DENY, (), ("no policy permits (default deny)",), ()),
    ]


def test_wrong_typed_optional_argument_is_dropped(tmp_path: Path) -> None:
    write(
        tmp_path / "p" / "prio.cedar",
        '@id("urgent") permit(principal, action == Stitchwork::Action::"send_email", resource)\n'
        "  when { context.args has priority && context.args.priority > 5 };\n",
    )
    engine = PolicyEngine.load([tmp_path / "p"], TOOLS)
    base = {"to": "b@example.org", "body": "x", "attachments": ["a.pdf"]}
    assert engine.decide(call("send_email", args={**base, "priority": 9})).effect is Effect.ALLOW
    for bad in ("9", True, 2**70, 9.5):
        decision = engine.decide(call("send_email", args={**base, "priority": bad}))
        assert decision == Decision(Effect.DENY, (), ("no policy permits (default deny)",), ()), bad


def test_evaluation_error_denies_and_names_the_policy(tmp_path: Path) -> None:
    write(
        tmp_path / "p" / "overflow.cedar",
        '@id("read") permit(principal, action in Stitchwork::Action::"read", resource);\n'
        '@id("overflow") forbid(principal, action, resource)\n'
        "  when { context.budget.steps + 9223372036854775807 < 0 };\n",
    )
    engine = PolicyEngine.load([tmp_path / "p"], TOOLS)
    assert engine.decide(call("read_file", steps=0)).effect is Effect.ALLOW
    decision = engine.decide(call("read_file", steps=1))  # the forbid errors: Cedar would skip it and allow
    assert decision.effect is Effect.DENY
    assert len(decision.errors) == 1
    assert "overflow" in decision.errors[0]
    assert "policy0" not in decision.errors[0] and "policy1" not in decision.errors[0]


# -- load errors -----------------------------------------------------------------------------------------

VALID_HEAD = (
    "// six valid lines first\n"
    '@id("one")\n'
    'permit(principal, action in Stitchwork::Action::"read", resource);\n'
    '@id("two") forbid(principal, action, resource)\n'
    '  when { context.args has path && context.args.path == "a;\\"b" };  // ; in a string\n'
    "\n"
)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "p" / "a_good.cedar", '@id("fine") permit(principal, action, resource);\n')
    bad = write(
        tmp_path / "p" / "b_bad.cedar", VALID_HEAD + "permit(principal, action, resource) when { 1 + };\n"
    )
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([tmp_path / "p"], TOOLS)
    assert (caught.value.path, caught.value.line) == (str(bad), 7)
    assert f"{bad}:7:" in str(caught.value)


def test_syntax_error_inside_a_multiline_policy_names_the_offending_line(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "bad.cedar", VALID_HEAD + "permit(principal, action, resource)\n  when {\n    # };\n"
    )
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([bad], TOOLS)
    assert (caught.value.path, caught.value.line) == (str(bad), 9)
    assert "starting at line 7" in str(caught.value)


def test_validation_error_names_file_and_line(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "p" / "nope.cedar",
        VALID_HEAD + '@id("typo")\npermit(principal, action, resource)\n  when { context.nope };\n',
    )
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([tmp_path / "p"], TOOLS)
    assert (caught.value.path, caught.value.line) == (str(bad), 7)
    assert "typo" in str(caught.value) and "nope" in str(caught.value)


def test_validation_checks_classes_without_tools(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "w.cedar",
        'permit(principal, action in Stitchwork::Action::"write", resource) when { context.taint.nope };\n',
    )
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([bad], [TOOLS[1]])  # no write tool registered
    assert (caught.value.path, caught.value.line) == (str(bad), 1)


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path / "p" / "a.cedar", '@id("same") permit(principal, action, resource);\n')
    second = write(tmp_path / "p" / "b.cedar", '\n\n@id("same")\nforbid(principal, action, resource);\n')
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([tmp_path / "p"], TOOLS)
    assert (caught.value.path, caught.value.line) == (str(second), 3)
    assert "same" in str(caught.value)


def test_duplicate_id_with_the_default_pack(tmp_path: Path) -> None:
    write(tmp_path / "p" / "mine.cedar", '@id("read-permit") permit(principal, action, resource);\n')
    with pytest.raises(PolicyLoadError, match="read-permit"):
        PolicyEngine.load([builtin_policy_dir(), tmp_path / "p"], TOOLS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("permit(principal == ?principal, action, resource);\n", "template"),
        ('@approval("required") permit(principal, action, resource);\n', "forbid"),
        ('@approval("maybe") forbid(principal, action, resource);\n', "required"),
    ],
)
def test_unsupported_policies_are_refused(tmp_path: Path, text: str, message: str) -> None:
    bad = write(tmp_path / "x.cedar", "// first\n" + text)
    with pytest.raises(PolicyLoadError, match=message) as caught:
        PolicyEngine.load([bad], TOOLS)
    assert (caught.value.path, caught.value.line) == (str(bad), 2)


def test_missing_policy_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([tmp_path / "absent"], TOOLS)
    assert caught.value.path == str(tmp_path / "absent")


@pytest.mark.parametrize(
    "tools",
    [
        [ToolAction("x", "dangerous", {})],
        [ToolAction("read", "read", {})],
        [ToolAction("x", "read", {}), ToolAction("x", "write", {})],
    ],
)
def test_bad_tool_declarations(tools: list[ToolAction]) -> None:
    with pytest.raises(ConfigError):
        PolicyEngine.load([], tools)


def test_odd_tool_and_argument_names_are_escaped(tmp_path: Path) -> None:
    tool = ToolAction(
        'we"ird\\tool',
        "read",
        {
            "type": "object",
            "properties": {'a "quoted" arg': {"type": "string"}, "__extn": {"type": "string"}},
        },
    )
    engine = PolicyEngine.load([builtin_policy_dir()], [tool])
    assert "__extn" not in engine.schema_text
    request = Request("alice", tool.name, "t", ctx(args={'a "quoted" arg': "v", "__extn": "v"}))
    assert engine.decide(request).effect is Effect.ALLOW
