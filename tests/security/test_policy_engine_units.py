"""The policy engine's edges (security/policy/engine.py): load-time errors for what Cedar cannot take, requests it
cannot take, the approval message naming every holding policy, fail-closed fallbacks, and where decisions run."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cedarpy
import pytest

import stitchwork.security.policy.engine as engine_module
from stitchwork.errors import ConfigError, PolicyLoadError
from stitchwork.security.policy.engine import Decision, Effect, PolicyEngine, Request
from stitchwork.security.policy.schema import ToolAction
from stitchwork.security.policy.text import load_policy_files

TOOLS = [ToolAction("mail", "external", {"required": ["to"], "properties": {"to": {"type": "string"}}}),
         ToolAction("look", "read")]
LONE = "\ud800"
"""A lone surrogate: a Python string that has no UTF-8 form, which Cedar (Rust) cannot take."""


def ctx(**extra: Any) -> dict[str, Any]:
    return {"taint": {}, "budget": {"steps": 1, "max_steps": 5}, "time": {"unix": 1, "hour": 1, "weekday": 1},
            "args": {"to": "bob"}, **extra}


def policy_file(tmp_path: Path, text: str = "permit(principal, action, resource);") -> Path:
    path = tmp_path / "p.cedar"
    path.write_text(text, encoding="utf-8")
    return path


def engine_for(tmp_path: Path, text: str = "permit(principal, action, resource);", **kwargs: Any) -> PolicyEngine:
    return PolicyEngine.load([policy_file(tmp_path, text)], TOOLS, **kwargs)


# -- loading: what Cedar cannot take is a clear error ----------------------------------------------------------


@pytest.mark.parametrize("tool", [
    ToolAction(f"look{LONE}", "read"),
    ToolAction("look", "read", {"properties": {f"a{LONE}": {"type": "string"}}}),
], ids=["tool-name", "argument-name"])
def test_a_tool_cedar_cannot_take_is_a_config_error_naming_the_schema(tmp_path: Path, tool: ToolAction) -> None:
    with pytest.raises(ConfigError) as caught:
        PolicyEngine.load([policy_file(tmp_path)], [tool])
    assert str(caught.value).startswith("generated Cedar schema does not parse: ")
    assert "surrogates not allowed" in str(caught.value)
    assert isinstance(caught.value.__cause__, ValueError)


@pytest.mark.parametrize("kwargs", [{"agents": [f"ann{LONE}"]}, {"groups": {f"ops{LONE}": ["ann"]}},
                                    {"groups": {"ops": [LONE]}}], ids=["agent", "group", "member"])
def test_agents_or_groups_cedar_cannot_take_are_a_config_error(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        engine_for(tmp_path, **kwargs)
    assert str(caught.value).startswith("agent entities do not match the schema: ")
    assert isinstance(caught.value.__cause__, ValueError)


def test_policies_cedar_does_not_parse_together_are_a_policy_load_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_policy_files parses each file's text with Cedar first, so only a loader and Cedar that disagree
    # reach this: the engine must still refuse with a PolicyLoadError, not a ValueError.
    loaded = load_policy_files([policy_file(tmp_path)])
    monkeypatch.setattr(engine_module, "load_policy_files", lambda _paths: SimpleNamespace(
        infos=loaded.infos, bodies=loaded.bodies, text="permit(principal, action, resource"))
    monkeypatch.setattr(engine_module, "validate_against_schema", lambda *_: None)
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load([tmp_path], TOOLS)
    assert str(caught.value).startswith("policies do not parse together: ")
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_loader_and_cedar_counting_policies_differently_is_a_policy_load_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_policy_files([policy_file(tmp_path)])
    monkeypatch.setattr(engine_module, "load_policy_files", lambda _paths: SimpleNamespace(
        infos=loaded.infos * 2, bodies=loaded.bodies * 2, text=loaded.text))
    with pytest.raises(PolicyLoadError, match=r"^expected 2 policies, Cedar parsed 1$"):
        PolicyEngine.load([tmp_path], TOOLS)


# -- requests Cedar cannot take --------------------------------------------------------------------------------


def test_an_agent_or_target_with_no_utf8_form_is_an_invalid_request_not_a_crash(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    invalid = Decision(Effect.DENY, reasons=("invalid request (fail closed)",),
                       errors=("request agent and target must be valid Unicode text",))
    assert engine.decide(Request(f"ann{LONE}", "look", "", ctx())) == invalid
    assert engine.decide(Request("ann", "look", f"x{LONE}", ctx())) == invalid
    # in a batch, it spoils neither the others nor the shared entity set
    decisions = engine.decide_batch([Request("ann", "look", "", ctx()), Request(LONE, "look", "", ctx()),
                                     Request("bob", "look", "", ctx())])
    assert [d.effect for d in decisions] == [Effect.ALLOW, Effect.DENY, Effect.ALLOW]
    assert decisions[1] == invalid
    assert engine._known_agents == {"ann", "bob"}
    assert engine.decide(Request("ann\u00e9\U0001f600", "look", "\u00e9", ctx())).effect is Effect.ALLOW


# -- decisions ---------------------------------------------------------------------------------------------------


def test_an_approval_that_would_not_allow_names_every_holding_policy(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "permit(principal, action, resource) when { !context.approved };\n"
                        '@id("ask-a") @approval("required") forbid(principal, action, resource) '
                        "when { context.taint.any } unless { context.approved };\n"
                        '@id("ask-b") @approval("required") forbid(principal, action, resource) '
                        "when { context.taint.target } unless { context.approved };\n")
    denied = engine.decide(Request("ann", "mail", "y", ctx(taint={"any": True, "target": True})))
    assert denied == Decision(Effect.DENY, (), ("no policy permits (default deny)",
                                                "approval would not allow it (held by ask-a, ask-b)"))


def test_a_request_left_without_a_decision_is_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_for(tmp_path)
    monkeypatch.setattr(engine, "_run", lambda prepared, entities: [])  # an evaluation that answered nothing
    assert engine.decide_batch([Request("ann", "look", "", ctx()), Request("ann", "nope", "", ctx())]) == [
        Decision(Effect.DENY, errors=("internal: no decision",)),
        Decision(Effect.DENY, reasons=("invalid request (fail closed)",),
                 errors=('unknown action Stitchwork::Action::"nope": not a tool in the schema',)),
    ]


def test_only_positional_policy_ids_map_to_policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_for(tmp_path, '@id("all") permit(principal, action, resource);')
    assert engine._index("policy0") == 0
    assert [engine._index(ref) for ref in ("xolicy0", "Policy0", "policy-0", "policy00x", "policy1")] == [None] * 5
    # an answer naming ids that are not positional ones keeps them out of the decision
    odd = SimpleNamespace(decision=cedarpy.Decision.Allow,
                          diagnostics=SimpleNamespace(reasons=["custom0", "policy0"], errors=[]))
    monkeypatch.setattr(cedarpy, "is_authorized_batch", lambda requests, *_: [odd for _ in requests])
    assert engine.decide(Request("ann", "look", "", ctx())) == Decision(
        Effect.ALLOW, ("all",), ("permit all (p.cedar:1)",))


async def test_a_loaded_engine_decides_on_the_event_loop_unless_offloaded(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_for(tmp_path)
    real = cedarpy.is_authorized_batch
    threads: list[threading.Thread] = []

    def recording(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(cedarpy, "is_authorized_batch", recording)
    assert (await engine.adecide(Request("ann", "look", "", ctx()))).effect is Effect.ALLOW
    assert threads == [threading.current_thread()]
    engine.close()
    offloaded = engine_for(tmp_path, offload=True)
    try:
        assert (await offloaded.adecide(Request("ann", "look", "", ctx()))).effect is Effect.ALLOW
        assert threads[1] is not threading.current_thread() and threads[1].name.startswith("stitchwork-cedar")
    finally:
        offloaded.close()


def test_an_agent_another_thread_added_meanwhile_is_not_added_twice(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, 'permit(principal, action, resource) when { principal.name == "late" };')
    engine.decide(Request("ann", "look", "", ctx()))  # ann is added and her decision cached
    assert engine._dynamic_agents == 1 and len(engine._cache) == 1
    real_lock = engine._lock

    class Racing:
        """The engine's lock, taken just after another thread added the agent (between the two checks)."""

        def __enter__(self) -> None:
            real_lock.acquire()
            if "late" not in engine._known_agents:
                engine._entities = engine._entities.with_added_json_str(
                    '[{"uid": {"type": "Stitchwork::Agent", "id": "late"}, "attrs": {"name": "late"}, '
                    '"parents": []}]', engine._schema)
                engine._known_agents.add("late")

        def __exit__(self, *_: object) -> None:
            real_lock.release()

    engine._lock = Racing()  # type: ignore[assignment]
    shared = engine._entities
    assert engine.decide(Request("late", "look", "", ctx())) == Decision(
        Effect.ALLOW, ("p.cedar:1",), ("permit p.cedar:1",))
    assert engine._entities is not shared  # the other thread's set, used as is
    assert engine._dynamic_agents == 1  # not counted again by this thread
    assert len(engine._cache) == 2  # the cache was not cleared: the set this thread saw did not grow under it
