"""Policy decisions and their failure paths pinned to exact values: the Cedar context of a call, the schema and
entities, policy text and ids, projections, and the engine's limits (issue 19: mutation testing)."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cedarpy
import pytest

import stitchwork.security.policy.engine as engine_module
import stitchwork.security.policy.projection as projection_module
from stitchwork.errors import ConfigError, PolicyLoadError
from stitchwork.security.policy.context import BadContext, cedar_context
from stitchwork.security.policy.engine import Decision, Effect, PolicyEngine, Request
from stitchwork.security.policy.schema import (
    ArgSpec,
    CedarTool,
    ToolAction,
    agent_entity,
    arg_specs,
    build_schema,
    cedar_tools,
    placeholder,
    principal_entities,
)
from stitchwork.security.policy.text import (
    PolicyInfo,
    _split_statements,
    cedar_string,
    load_policy_files,
    reason,
)

MAIL = CedarTool("send", "external", {"type": "Stitchwork::Action", "id": "send"},
                 (ArgSpec("to", "String", True), ArgSpec("n", "Long", False), ArgSpec("urgent", "Bool", False)))
NOW = {"unix": 1_700_000_000, "hour": 10, "weekday": 2}


def base(**extra: Any) -> dict[str, Any]:
    context: dict[str, Any] = {"taint": {}, "budget": {"steps": 1, "max_steps": 5}, "time": dict(NOW),
                               "args": {"to": "bob"}}
    context.update(extra)
    return context


# -- the context of a call -----------------------------------------------------------------------------------


def test_the_whole_context_of_a_clean_call() -> None:
    assert cedar_context(MAIL, base(side_effect="read", approved=1)) == {
        "side_effect": "external", "approved": False,
        "taint": {"any": False, "target": False, "target_level": "", "args": [], "sources": [], "destinations": [],
                  "code": False, "code_level": "", "lookalike": False, "confidential": False,
                  "secret_sources": [], "links": "", "copied": False, "outward": False, "outward_level": "",
                  "target_levels": [], "target_roles": [], "target_count": 0, "dictated": False},
        "budget": {"steps": 1, "max_steps": 5}, "time": NOW, "args": {"to": "bob"},
    }


def test_the_taint_record_is_read_conservatively() -> None:
    taint = {"target": "yes", "args": ("to", "body", "to"), "sources": {"tool:b", "tool:a"}, "code": 1,
             "destinations": frozenset({"to"}), "lookalike": 1, "confidential": "x", "secret_sources": ["vault"],
             "links": "record", "copied": 1, "outward": 1, "outward_level": "record", "dictated": 1}
    out = cedar_context(MAIL, base(taint=taint, approved=True))
    assert out["approved"] is True
    assert out["taint"] == {
        "any": True, "target": True, "target_level": "prose", "args": ["body", "to"], "sources": ["tool:a", "tool:b"],
        "destinations": ["to"], "code": True, "code_level": "prose", "lookalike": True, "confidential": True,
        "secret_sources": ["vault"], "links": "record", "copied": True, "outward": True, "outward_level": "record",
        "target_levels": ["prose"], "target_roles": [], "target_count": 2, "dictated": False,
    }
    said = cedar_context(MAIL, base(taint={"target": True, "target_levels": ["record"], "target_roles": ["url"],
                                           "target_count": 1, "dictated": True}))["taint"]
    assert (said["target_levels"], said["target_roles"], said["target_count"], said["dictated"]) == (
        ["record"], ["url"], 1, True)
    levels = cedar_context(MAIL, base(taint={"target": True, "target_level": "record", "code": True,
                                             "code_level": "unattributed"}))["taint"]
    assert (levels["target_level"], levels["code_level"], levels["any"]) == ("record", "unattributed", True)
    assert cedar_context(MAIL, base(taint={"args": ["x"]}))["taint"]["any"] is True
    assert cedar_context(MAIL, base(taint={"any": True}))["taint"]["any"] is True
    assert cedar_context(MAIL, base(taint={"target_level": "record", "args": None}))["taint"]["target_level"] == ""


@pytest.mark.parametrize(("change", "message"), [
    ({"taint": None}, "context.taint is required and must be a record, got None"),
    ({"taint": "yes"}, "context.taint is required and must be a record, got 'yes'"),
    ({"budget": None}, "context.budget is required and must be a record, got None"),
    ({"budget": {"steps": 1}}, "context.budget.max_steps must be an integer, got None"),
    ({"budget": {"steps": "1", "max_steps": 5}}, "context.budget.steps must be an integer, got '1'"),
    ({"budget": {"steps": True, "max_steps": 5}}, "context.budget.steps must be an integer, got True"),
    ({"budget": {"steps": 1.0, "max_steps": 5}}, "context.budget.steps must be an integer, got 1.0"),
    ({"budget": {"steps": 2**63, "max_steps": 5}}, f"context.budget.steps must be an integer, got {2**63}"),
    ({"budget": {"steps": 1, "max_steps": -(2**63) - 1}},
     f"context.budget.max_steps must be an integer, got {-(2**63) - 1}"),
    ({"time": "noon"}, "context.time must be a record, got 'noon'"),
    ({"time": {"unix": 1, "hour": 2}}, "context.time.weekday must be an integer, got None"),
    ({"time": {"unix": 1, "hour": "2", "weekday": 3}}, "context.time.hour must be an integer, got '2'"),
    ({"args": ["to"]}, "context.args must be a record, got list"),
    ({"args": {}}, "required argument 'to' of 'send' is missing"),
    ({"args": {"to": 5}}, "required argument 'to' of 'send' is not a String"),
    ({"taint": {"args": "to"}}, "context.taint.args must be a list of strings, got 'to'"),
    ({"taint": {"sources": "tool:a"}}, "context.taint.sources must be a list of strings, got 'tool:a'"),
    ({"taint": {"destinations": 1}}, "context.taint.destinations must be a list of strings, got 1"),
    ({"taint": {"secret_sources": "v"}}, "context.taint.secret_sources must be a list of strings, got 'v'"),
    ({"taint": {"target_count": -1}}, "context.taint.target_count must be a non-negative integer, got -1"),
    ({"taint": {"target_count": True}}, "context.taint.target_count must be a non-negative integer, got True"),
    ({"taint": {"target_levels": "record"}}, "context.taint.target_levels must be a list of strings, got 'record'"),
    ({"taint": {"target_roles": "url"}}, "context.taint.target_roles must be a list of strings, got 'url'"),
])
def test_malformed_contexts_are_refused_with_a_message_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BadContext) as caught:
        cedar_context(MAIL, base(**change))
    assert str(caught.value) == message


def test_target_count_and_levels_of_a_tainted_target() -> None:
    def taint(**record: Any) -> dict[str, Any]:
        return dict(cedar_context(MAIL, base(taint=record))["taint"])

    assert taint(target_count=0)["target_count"] == 0  # a count of 0 is valid; untainted, it is kept as given
    assert taint(target_count=3)["target_count"] == 3
    assert taint(target=True, target_count=0)["target_count"] == 1  # a tainted target is at least one
    assert taint(target=True, target_count=3)["target_count"] == 3
    assert taint(target=True)["target_count"] == 2 and taint()["target_count"] == 0  # unknown: several if tainted
    # without target_levels, the one target_level stands for them all
    assert taint(target=True, target_level="record")["target_levels"] == ["record"]
    assert taint(target=True)["target_levels"] == ["prose"]
    assert taint(target_level="record")["target_levels"] == []


def test_integer_edges_and_argument_types() -> None:
    edge = base(budget={"steps": 2**63 - 1, "max_steps": -(2**63)})
    assert cedar_context(MAIL, edge)["budget"] == {"steps": 2**63 - 1, "max_steps": -(2**63)}
    args = cedar_context(MAIL, base(args={"to": "bob", "n": True, "urgent": 1, "extra": "x"}))["args"]
    assert args == {"to": "bob"}  # a bool is no Long, an int no Bool; undeclared arguments are left out
    args = cedar_context(MAIL, base(args={"to": "bob", "n": 2**63, "urgent": False}))["args"]
    assert args == {"to": "bob", "urgent": False}
    assert cedar_context(MAIL, base(args={"to": "bob", "n": -3}))["args"] == {"to": "bob", "n": -3}
    none_args = CedarTool("t", "read", {"type": "Stitchwork::Action", "id": "t"}, ())
    assert cedar_context(none_args, base(args=None))["args"] == {}


def test_a_missing_time_is_now_in_local_time() -> None:
    before = int(time.time())
    clock = cedar_context(MAIL, base(time=None))["time"]
    after = int(time.time())
    assert before <= clock["unix"] <= after
    local = time.localtime(clock["unix"])
    assert (clock["hour"], clock["weekday"]) == (local.tm_hour, local.tm_wday)
    assert cedar_context(MAIL, {k: v for k, v in base().items() if k != "time"})["time"]["unix"] >= before


# -- schema and entities ----------------------------------------------------------------------------------------


def test_argument_specs_from_json_schema() -> None:
    schema = {"required": ["a", "b", "c", "z"], "properties": {
        "a": {"type": "string"}, "b": {"type": ["integer", "null"]}, "c": {"type": "boolean"},
        "d": {"type": ["string", "integer"]}, "e": {"type": "array"}, "__entity": {"type": "string"},
        "__extn": {"type": "string"}, "__expr": {"type": "boolean"},
        "f": "not a schema", "g": {"type": ["null", "boolean"]}, "h": {}}}
    assert arg_specs(schema) == (ArgSpec("a", "String", True), ArgSpec("b", "Long", False),
                                 ArgSpec("c", "Bool", True), ArgSpec("g", "Bool", False))
    assert arg_specs({"properties": ["a"]}) == ()
    assert arg_specs({}) == ()


@pytest.mark.parametrize(("tools", "message"), [
    ([ToolAction("", "read")], "a tool without a name cannot be a Cedar action"),
    ([ToolAction("x", "delete")], "tool 'x': side effect 'delete' is not one of read, write, external, irreversible"),
    ([ToolAction("write", "write")], "tool 'write' has the name of a side-effect action group"),
    ([ToolAction("<any read tool>", "read")], "tool '<any read tool>' has the name of a side-effect action group"),
    ([ToolAction("x", "read"), ToolAction("x", "write")], "tool 'x' is declared twice"),
])
def test_bad_tools_are_refused_with_their_reason(tools: list[ToolAction], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        cedar_tools(tools)
    assert str(caught.value) == message


def test_cedar_tools_and_schema_text() -> None:
    specs = cedar_tools([ToolAction("mail", "external", {"properties": {"to": {"type": "string"}}})])
    assert specs == {"mail": CedarTool("mail", "external", {"type": "Stitchwork::Action", "id": "mail"},
                                       (ArgSpec("to", "String", False),))}
    assert placeholder("read") == "<any read tool>"
    text = build_schema([ToolAction("mail", "external", {"required": ["to"], "properties": {
        "to": {"type": "string"}, "cc": {"type": "string"}}}), ToolAction("a\nb", "read")])
    assert '  action "mail" in ["external"] appliesTo {\n' in text
    assert '      args: { "to": String, "cc"?: String }\n' in text
    assert "  // 'a\\nb' (read)\n" in text and '  action "a\\nb" in ["read"]' in text
    assert '  action "<any write tool>" in ["write"] appliesTo' in text
    assert '  action "read", "write", "external", "irreversible";\n' in text
    assert text.endswith("}\n") and "      args: {}\n" in text
    cedarpy.Schema.from_str(text)


def test_agent_and_group_entities() -> None:
    assert agent_entity("ann", ["ops"]) == {"uid": {"type": "Stitchwork::Agent", "id": "ann"},
                                            "attrs": {"name": "ann"},
                                            "parents": [{"type": "Stitchwork::Group", "id": "ops"}]}
    entities, names = principal_entities(["ann", "bob"], {"ops": ["bob", "cid"], "dev": ["cid"]})
    assert names == ["ann", "bob", "cid"]
    assert entities[0] == {"uid": {"type": "Stitchwork::Group", "id": "ops"}, "attrs": {}, "parents": []}
    assert [e["uid"]["id"] for e in entities] == ["ops", "dev", "ann", "bob", "cid"]
    assert [p["id"] for p in entities[-1]["parents"]] == ["ops", "dev"]
    assert principal_entities([], None) == ([], [])


# -- policy text ---------------------------------------------------------------------------------------------------


def test_cedar_string_escapes() -> None:
    assert cedar_string('a"b\\c\nd\te\rf\x01g\x7fh\x1fé') == '"a\\"b\\\\c\\nd\\te\\rf\\u{1}g\\u{7f}h\\u{1f}é"'
    assert cedar_string(" ~") == '" ~"'


def test_statements_and_their_lines() -> None:
    text = ('// comment; not a policy\npermit(principal, action, resource)\n  when { "a;b\\"c;" == "x\ny" };\n'
            '\n@id("two") forbid(principal, action, resource);  // tail\nforbid(principal')
    found = _split_statements(text)
    assert [(s.line, s.terminated) for s in found] == [(2, True), (6, True), (7, False)]
    assert found[0].text.endswith('"x\ny" };') and found[1].text == '@id("two") forbid(principal, action, resource);'
    assert found[2].text == "forbid(principal"
    assert _split_statements("  // only\n\n") == []
    alone = _split_statements("forbid(principal")  # an unterminated statement at the very start of the text
    assert [(s.line, s.text, s.terminated) for s in alone] == [(1, "forbid(principal", False)]


def test_reasons_and_locations() -> None:
    plain = PolicyInfo("x.cedar:3", "permit", "x.cedar", "/p/x.cedar", 3, {})
    assert plain.location == "x.cedar:3" and reason(plain) == "permit x.cedar:3"
    named = PolicyInfo("no-web", "forbid", "x.cedar", "/p/x.cedar", 0, {"approval": "required"})
    assert named.location == "x.cedar" and named.needs_approval
    assert reason(named) == "approval required by no-web (x.cedar)"
    assert not PolicyInfo("p", "permit", "f", "f", 1, {"approval": "required"}).needs_approval
    assert not PolicyInfo("p", "forbid", "f", "f", 1, {"approval": "maybe"}).needs_approval


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_policy_ids_labels_and_duplicate_files(tmp_path: Path) -> None:
    a = write(tmp_path / "one" / "a.cedar", "permit(principal, action, resource);\n"
              "permit(principal, action, resource); permit(principal, action, resource);\n"
              '@id("named") @note forbid(principal, action, resource);\n')
    write(tmp_path / "two" / "a.cedar", '@id("") permit(principal, action, resource);\n')
    write(tmp_path / "one" / "skip.txt", "not cedar")
    loaded = load_policy_files([tmp_path / "one", a, tmp_path / "two"])
    assert [(i.id, i.file, i.line, i.effect) for i in loaded.infos] == [
        ("one/a.cedar:1", "one/a.cedar", 1, "permit"), ("one/a.cedar:2", "one/a.cedar", 2, "permit"),
        ("one/a.cedar:2#2", "one/a.cedar", 2, "permit"), ("named", "one/a.cedar", 3, "forbid"),
        ("two/a.cedar:1", "two/a.cedar", 1, "permit"),
    ]
    assert loaded.infos[3].annotations == {"id": "named", "note": ""}
    assert len(loaded.bodies) == 5 and loaded.text.count("permit") == 4
    same = load_policy_files([a, tmp_path / "two" / ".." / "one" / "a.cedar"])
    assert len(same.infos) == 4
    clash = write(tmp_path / "three" / "a.cedar", "permit(principal, action, resource);\n")
    other = write(tmp_path / "four" / "a.cedar", "permit(principal, action, resource);\n")
    assert [i.file for i in load_policy_files([clash, other]).infos] == ["a.cedar", str(other)]


@pytest.mark.parametrize(("text", "message", "line"), [
    ('@approval("maybe") forbid(principal, action, resource);', 'the only @approval value is "required"', 1),
    ('\n@approval("required") permit(principal, action, resource);',
     '@approval("required") only applies to forbid policies', 2),
    ("permit(principal, action, resource);\n\npermit(principal == ?principal, action, resource);",
     "policy templates (?principal / ?resource slots) are not supported", 3),
    ('@id("x") permit(principal, action, resource);\n@id("x") forbid(principal, action, resource);',
     "duplicate policy id 'x' (first declared at {path}:1)", 2),
])
def test_policy_file_errors_name_the_line(tmp_path: Path, text: str, message: str, line: int) -> None:
    path = write(tmp_path / "p.cedar", text)
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_files([path])
    assert (caught.value.path, caught.value.line) == (str(path), line)
    assert str(caught.value) == f"{path}:{line}: {message.format(path=path)}"


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cedar"
    bad.write_bytes(b"\xff\xfe permit")
    with pytest.raises(PolicyLoadError, match="cannot read policy file") as caught:
        load_policy_files([bad])
    assert caught.value.path == str(bad) and caught.value.line is None
    with pytest.raises(PolicyLoadError) as missing:
        load_policy_files([tmp_path / "nope.cedar"])
    assert str(missing.value) == f"{tmp_path / 'nope.cedar'}: no such policy file or directory"


def test_a_syntax_error_in_a_one_line_policy_names_that_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.cedar", "permit(principal, action, resource);\n\npermit(principal, action, oops);\n")
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_files([path])
    assert caught.value.line == 3 and "in the policy starting" not in str(caught.value)
    assert str(caught.value).startswith(f"{path}:3: syntax error: ")


def test_validation_errors_name_the_first_policy_and_count_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path / "p.cedar", 'permit(principal, action, resource);\n'
                 '@id("bad-one") permit(principal, action, resource) when { context.nope };\n'
                 'permit(principal, action, resource) when { context.alsonope };\n'
                 'permit(principal, action, resource) when { context.third };\n')
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([path], [ToolAction("t", "read")])
    message = str(caught.value)
    assert caught.value.line == 2 and caught.value.path == str(path)
    assert message.startswith(f"{path}:2: does not validate against the schema: policy bad-one: ")
    assert message.startswith(f"{path}:2: does not validate against the schema: policy bad-one: attribute `nope` in ")
    head, _, rest = message.partition(" more: ")
    assert re.search(r"\(and \d+$", head) and rest.count(f"{path}:") == 5  # five more shown, with file and line
    assert f"{path}:3: attribute `alsonope` in " in rest
    assert rest.endswith(" not found)")  # the list of the rest is closed
    assert "for policy `policy" not in message
    one = write(tmp_path / "one.cedar",
                'permit(principal, action == Stitchwork::Action::"t", resource) when { context.nope };\n')
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([one], [ToolAction("t", "read")])
    assert "attribute `nope`" in str(caught.value) and "(and " not in str(caught.value)  # one error: no "more"


# -- projections ------------------------------------------------------------------------------------------------


TOOL = CedarTool("mail", "external", {"type": "Stitchwork::Action", "id": "mail"}, ())


@pytest.mark.parametrize(("scope", "applies"), [
    ({"op": "All"}, True),
    ({"op": "==", "entity": {"type": "Stitchwork::Action", "id": "mail"}}, True),
    ({"op": "==", "entity": {"type": "Stitchwork::Action", "id": "external"}}, False),
    ({"op": "in", "entity": {"type": "Stitchwork::Action", "id": "external"}}, True),
    ({"op": "in", "entity": {"type": "Stitchwork::Action", "id": "read"}}, False),
    ({"op": "in", "entities": [{"type": "Stitchwork::Action", "id": "read"},
                               {"__entity": {"type": "Stitchwork::Action", "id": "mail"}}]}, True),
    ({"op": "in", "entities": [{"type": "Other::Action", "id": "read"}]}, True),
    ({"op": "in", "entities": []}, False),
    ({"op": "is"}, True), ({"op": "=="}, True), (None, True), ("odd", True),
])
def test_which_action_scopes_can_match_a_tool(scope: Any, applies: bool) -> None:
    assert projection_module.may_apply(scope, TOOL) is applies


def test_context_projection_keeps_exactly_what_policies_read() -> None:
    def attr(left: Any, name: str, op: str = ".") -> dict[str, Any]:
        return {op: {"left": left, "attr": name}}

    ctx = {"Var": "context"}
    body = {"conditions": [{"body": {"&&": {"left": attr(attr(ctx, "taint"), "target"),
                                            "right": attr(attr(ctx, "budget"), "steps", "has")}}},
                           {"body": attr(attr(attr(ctx, "args"), "to"), "x")}]}
    projection = projection_module.context_projection([body])
    assert projection == {"taint": {"target": True}, "budget": {"steps": True}, "args": {"to": {"x": True}}}
    whole_taint = projection_module.context_projection([{"conditions": [attr(ctx, "taint")]}, body])
    assert whole_taint == {"taint": True, "budget": {"steps": True}, "args": {"to": {"x": True}}}
    assert projection_module.context_projection([{"conditions": [{"==": {"left": ctx, "right": ctx}}]}]) is None
    assert projection_module.context_projection([{"conditions": [{"Var": "principal"}, 3]}]) == {}
    assert projection_module.context_projection([{}]) == {}
    value = {"taint": {"target": True, "any": True}, "budget": {"steps": 1, "max_steps": 2}, "time": {}, "args": {}}
    assert projection_module.project(value, projection) == {"taint": {"target": True}, "budget": {"steps": 1},
                                                            "args": {}}
    assert projection_module.project(value, True) is value
    assert projection_module.project(5, {"a": True}) == 5


# -- the engine ----------------------------------------------------------------------------------------------------

TOOLS = [ToolAction("mail", "external", {"required": ["to"], "properties": {"to": {"type": "string"}}}),
         ToolAction("look", "read")]


def ctx(**extra: Any) -> dict[str, Any]:
    return {"taint": {}, "budget": {"steps": 1, "max_steps": 5}, "time": dict(NOW), "args": {"to": "bob"}, **extra}


def engine_for(tmp_path: Path, text: str, **kwargs: Any) -> PolicyEngine:
    return PolicyEngine.load([write(tmp_path / "p.cedar", text)], TOOLS, **kwargs)


def test_agents_added_at_decide_time_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_module._MAX_DYNAMIC_AGENTS == 10_000  # the documented cap; 3 below keeps the test small
    monkeypatch.setattr(engine_module, "_MAX_DYNAMIC_AGENTS", 3)
    engine = engine_for(tmp_path, 'permit(principal, action, resource) when { principal.name like "a*" };',
                        agents=["ann"])
    assert engine.decide_batch([Request(n, "look", "", ctx()) for n in ("a1", "a2")])[0].effect is Effect.ALLOW
    assert engine._known_agents == {"ann", "a1", "a2"} and engine._dynamic_agents == 2
    shared = engine._entities
    assert engine.decide(Request("a3", "look", "", ctx())).effect is Effect.ALLOW  # the third: at the cap
    assert engine._dynamic_agents == 3 and engine._entities is not shared
    shared = engine._entities
    # beyond the cap an agent is decided with a per-batch entity set, never added
    assert engine.decide(Request("a4", "look", "", ctx())).effect is Effect.ALLOW
    assert engine.decide(Request("b5", "look", "", ctx())).effect is Effect.DENY
    assert "a4" not in engine._known_agents and engine._dynamic_agents == 3 and engine._entities is shared
    key = ("look", "a4", "", False, engine._context_json("look", cedar_context(engine._tools["look"], ctx())))
    assert engine._cache.get(key) is None  # decided against a per-batch entity set: not remembered
    assert engine._cache.get(("look", "a3", *key[2:])) is not None


def test_a_new_agent_clears_the_decision_cache(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "permit(principal, action, resource);")
    engine.decide(Request("a1", "look", "", ctx()))
    assert len(engine._cache) == 1
    first = engine._cache.get(("look", "a1", "", False, engine._context_json("look", cedar_context(
        engine._tools["look"], ctx()))))
    assert first == Decision(Effect.ALLOW, ("p.cedar:1",), ("permit p.cedar:1",))
    engine.decide(Request("a2", "look", "", ctx()))
    assert len(engine._cache) == 1  # only a2's decision, made against the grown entity set
    assert engine._cache.get(("look", "a1", "", False, engine._context_json("look", cedar_context(
        engine._tools["look"], ctx())))) is None


def test_one_bad_request_in_a_cedar_batch_is_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_for(tmp_path, "permit(principal, action, resource);", decision_cache=0)
    real = cedarpy.is_authorized_batch
    calls: list[int] = []

    def flaky(requests: list[dict[str, Any]], *args: Any) -> Any:
        calls.append(len(requests))
        if any(r["resource"]["id"] == "poison" for r in requests):
            raise ValueError("cannot evaluate poison")
        return real(requests, *args)

    monkeypatch.setattr(cedarpy, "is_authorized_batch", flaky)
    decisions = engine.decide_batch([Request("ann", "look", t, ctx()) for t in ("a", "poison", "b")])
    assert [d.effect for d in decisions] == [Effect.ALLOW, Effect.DENY, Effect.ALLOW]
    assert decisions[1] == Decision(Effect.DENY, reasons=("evaluation errors (fail closed)",),
                                    errors=("policy evaluation failed: cannot evaluate poison",))
    assert calls == [3, 1, 1, 1]


def test_invalid_requests_are_denied_with_exact_errors(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "permit(principal, action, resource);")
    assert engine.decide(Request("ann", 'no"pe', "", ctx())) == Decision(
        Effect.DENY, reasons=("invalid request (fail closed)",),
        errors=('unknown action Stitchwork::Action::"no\\"pe": not a tool in the schema',))
    assert engine.decide(Request(5, "look", "", ctx())) == Decision(  # type: ignore[arg-type]
        Effect.DENY, reasons=("invalid request (fail closed)",), errors=("request agent and target must be strings",))
    assert engine.decide(Request("ann", "look", None, ctx())).errors == (  # type: ignore[arg-type]
        "request agent and target must be strings",)
    assert engine.decide(Request("ann", "look", "", ctx(budget={"steps": "x", "max_steps": 1}))) == Decision(
        Effect.DENY, reasons=("invalid request (fail closed)",),
        errors=("bad request context: context.budget.steps must be an integer, got 'x'",))
    assert engine.decide(Request("ann", "mail", "", ctx(args={}))).errors == (
        "bad request context: required argument 'to' of 'mail' is missing",)


def test_default_deny_evaluation_errors_and_readable_ids(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, '@id("needs-big") permit(principal, action == Stitchwork::Action::"look", resource)'
                        ' when { context.budget.steps * 9223372036854775807 > 0 };\n'
                        'permit(principal, action == Stitchwork::Action::"mail", resource) when { false };\n')
    assert engine.decide(Request("ann", "mail", "x", ctx())) == Decision(
        Effect.DENY, (), ("no policy permits (default deny)",))
    failed = engine.decide(Request("ann", "look", "", ctx(budget={"steps": 2, "max_steps": 5})))
    assert failed.effect is Effect.DENY and failed.reasons == ("evaluation errors (fail closed)",)
    assert failed.errors and all("needs-big" in e and "policy0" not in e for e in failed.errors)


def test_positional_ids_map_back_only_when_they_exist(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, '@id("first") permit(principal, action, resource);\n'
                        'forbid(principal, action, resource) when { false };\n')
    assert engine._index("policy0") == 0 and engine._index("policy1") == 1
    assert engine._index("policy2") is None and engine._index("policyx") is None
    assert engine._index("rule0") is None and engine._index("policy") is None
    assert engine._readable("policy0 and policy1 and policy7") == "first and p.cedar:2 and policy7"


def test_approval_only_denies_ask_and_others_stay_denied(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "permit(principal, action, resource);\n"
                        '@id("ask-tainted") @approval("required") forbid(principal, action, resource) '
                        "when { context.taint.any } unless { context.approved };\n"
                        '@id("never-x") forbid(principal, action, resource) when { resource == Stitchwork::Target::"x"'
                        " && context.taint.any };\n")
    asked = engine.decide(Request("ann", "mail", "y", ctx(taint={"any": True})))
    assert asked == Decision(Effect.ASK, ("ask-tainted",), ("approval required by ask-tainted (p.cedar:2)",))
    denied = engine.decide(Request("ann", "mail", "x", ctx(taint={"any": True})))
    assert denied == Decision(Effect.DENY, ("ask-tainted", "never-x"),
                              ("approval required by ask-tainted (p.cedar:2)", "forbid never-x (p.cedar:3)"))
    approved = engine.decide(Request("ann", "mail", "y", ctx(taint={"any": True}, approved=True)))
    assert approved == Decision(Effect.ALLOW, ("p.cedar:1",), ("permit p.cedar:1",))


def test_an_approval_that_would_not_allow_is_a_plain_deny(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "permit(principal, action, resource) when { !context.approved };\n"
                        '@id("ask") @approval("required") forbid(principal, action, resource) '
                        "when { context.taint.any } unless { context.approved };")
    denied = engine.decide(Request("ann", "mail", "y", ctx(taint={"any": True})))
    assert denied == Decision(Effect.DENY, (), ("no policy permits (default deny)",
                                                "approval would not allow it (held by ask)"))


def test_describe_rows(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, '@id("a") @approval("required") forbid(principal, action, resource) when { false };')
    assert engine.describe() == [{"id": "a", "effect": "forbid", "file": "p.cedar", "path": str(tmp_path / "p.cedar"),
                                  "line": "1", "annotations": '@approval("required") @id("a")'}]


def test_requests_decisions_and_their_parts_are_immutable(tmp_path: Path) -> None:
    from stitchwork.security.policy.context import Prepared
    from stitchwork.security.policy.text import LoadedPolicies, _Statement

    values: list[Any] = [
        Request("a", "t", "", {}), Decision(Effect.ALLOW), Prepared(0, "a", "t", {}, {}), ToolAction("t", "read"),
        ArgSpec("a", "String", True), TOOL, PolicyInfo("i", "permit", "f", "f", 1, {}), LoadedPolicies((), (), ""),
        _Statement(1, "permit;", True),
    ]
    for value in values:
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.extra = 1
    assert hash(Decision(Effect.DENY, ("a",))) == hash(Decision(Effect.DENY, ("a",)))


def test_a_cedar_answer_that_is_neither_allow_nor_deny_fails_closed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_for(tmp_path, '@id("all") permit(principal, action, resource);')

    odd = SimpleNamespace(decision="maybe", diagnostics=SimpleNamespace(reasons=["policy0"], errors=[]))
    monkeypatch.setattr(cedarpy, "is_authorized_batch", lambda requests, *_: [odd for _ in requests])
    assert engine.decide(Request("ann", "look", "", ctx())) == Decision(
        Effect.DENY, ("all",), ("permit all (p.cedar:1)", "evaluation errors (fail closed)"),
        ("Cedar reached no decision",))


def test_only_context_attribute_chains_are_context_paths() -> None:
    path = projection_module._context_path
    assert path({"Var": "context"}) == []
    assert path({".": {"left": {"Var": "context"}, "attr": "taint"}}) == ["taint"]
    assert path({"Var": "context", "extra": 1}) is None
    assert path("x") is None and path(["context"]) is None and path({"Var": "principal"}) is None
    assert path({".": {"left": {"Var": "principal"}, "attr": "name"}}) is None
    assert path({".": {"left": {"Var": "context"}, "attr": 3}}) is None
