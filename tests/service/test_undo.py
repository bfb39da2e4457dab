"""Reversible actions: a run's compensations newest first through the gateway (identity, policy, approval, audit),
each linked to the call it reverses, never twice; failures stay undoable; an uncertain call resolved by undoing it."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stitchwork.agents.loop import idempotency_key
from stitchwork.errors import ApprovalError, NothingToUndo, RunError
from stitchwork.gateway.stages import Authenticate, Replay, Validate
from stitchwork.gateway.tools import ToolDoor
from stitchwork.gateway.undo import Reversal, UndoDoor
from stitchwork.platform import Platform
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.service import Service
from tests.service.undo_fixtures import (
    AGENT_TOOLS,
    SHORT,
    TURNS,
    UNDO_ASKS,
    UNDO_DENIED,
    calendar,
    call,
    policy_dir,
    write_tools,
)


@pytest.fixture
def tools_dir(tools_dir: Path) -> Path:
    write_tools(tools_dir)
    return tools_dir


@dataclass
class Ops:
    platform: Platform
    service: Service
    run_id: str
    cwd: Path

    def events(self, kind: str) -> list[Any]:
        return self.platform.audit.for_run(self.run_id, (kind,))

    async def states(self) -> dict[str, str]:
        return {c["call"]: c["state"] for c in await self.service.run_calls(self.run_id)}


@pytest.fixture
async def open_ops(make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """Opens a platform with the calendar tools and runs ``turns`` once; closes what it opened."""
    monkeypatch.chdir(tmp_path)  # the inline sandbox runs the tools in the working directory
    opened: list[Platform] = []

    async def build(turns: list[dict[str, Any]] = SHORT, policy: str = "") -> Ops:
        policies = (policy_dir(tmp_path, policy),) if policy else ()
        platform = Platform.open(make_config(turns, sandbox="inline://", tools=AGENT_TOOLS, policy_dirs=policies))
        opened.append(platform)
        record = await platform.runner.start("tester", "plan the week")
        assert record.status.value == "completed", record
        return Ops(platform, Service(platform), record.id, tmp_path)

    yield build
    for platform in opened:
        await platform.aclose()


async def test_undo_reverses_the_calls_newest_first_through_the_gateway_linked_in_the_audit(open_ops: Any) -> None:
    ops = await open_ops(TURNS)
    assert sorted(calendar(ops.cwd)) == ["ev1", "ev2"]
    assert await ops.states() == {"c1": "undoable", "c2": "undoable", "c3": "not_undoable", "c4": "not_undoable",
                                  "c5": "not_undoable"}
    tool_events = {e.data["idempotency_key"].split(":")[-1]: e for e in ops.events("tool")}
    report = await ops.service.undo(ops.run_id, by="operator:cli")
    assert [(r["call"], r["status"]) for r in report["results"]] == [("c2", "ok"), ("c1", "ok")]
    assert report["undone"] == 2 and report["failed"] == report["waiting"] == 0
    assert calendar(ops.cwd) == {}
    assert (ops.cwd / "deletions.log").read_text().split() == ["ev2", "ev1"]  # newest first
    undos = ops.events("undo")
    assert [(u.decision, u.data["reverses"], u.data["call"]) for u in undos] == [
        ("ok", tool_events["c2"].seq, "c2"), ("ok", tool_events["c1"].seq, "c1")]
    assert all(u.data["by"] == "operator:cli" and u.tool == "delete_event" and u.agent == "tester" for u in undos)
    # the undo calls themselves: a decision and a tool event each, both linked to the call they reverse
    linked = [e for e in ops.platform.audit.for_run(ops.run_id) if "reverses" in e.data and e.kind != "undo"]
    assert sorted((e.kind, e.data["reverses"]) for e in linked) == sorted(
        [("decision", tool_events["c2"].seq), ("tool", tool_events["c2"].seq),
         ("decision", tool_events["c1"].seq), ("tool", tool_events["c1"].seq)])
    assert {e.tool for e in linked} == {"delete_event"}
    decision = next(e for e in linked if e.kind == "decision" and e.data["reverses"] == tool_events["c2"].seq)
    assert decision.data["arguments"] == {"id": "ev2", "calendar": "work"} and decision.decision == "allow"
    assert ops.service.audit_verify()["ok"] is True
    states = {c["call"]: c for c in await ops.service.run_calls(ops.run_id)}
    assert states["c1"]["state"] == states["c2"]["state"] == "undone"
    assert states["c2"]["undo_seq"] == undos[0].seq

    # a second undo reports "already undone" and runs nothing
    again = await ops.service.undo(ops.run_id, by="operator:api")
    assert [(r["call"], r["status"]) for r in again["results"]] == [("c2", "already_undone"),
                                                                    ("c1", "already_undone")]
    assert again["already_undone"] == 2 and again["undone"] == 0
    one = await ops.service.undo(ops.run_id, call="c1", by="operator:cli")
    assert [r["status"] for r in one["results"]] == ["already_undone"]
    assert len(ops.events("undo")) == 2  # no new attempt
    assert (ops.cwd / "deletions.log").read_text().split() == ["ev2", "ev1"]

    # calls without an undo are reported, and refused by name
    assert states["c3"]["reason"] == "its manifest declares no undo"
    assert states["c4"]["reason"] == "a read changes nothing"
    with pytest.raises(NothingToUndo, match=r"c3 .post_message. of run .* cannot be undone: its manifest declares no"):
        await ops.service.undo(ops.run_id, call="c3", by="operator:cli")
    with pytest.raises(RunError, match="has no call 'c9'"):
        await ops.service.undo(ops.run_id, call="c9", by="operator:cli")
    with pytest.raises(RunError, match="no run with id"):
        await ops.service.undo("run_nope", by="operator:cli")

    # a mapping path missing at run time: recorded with the call, which is then not undoable
    (booked,) = [e for e in ops.events("tool") if e.tool == "book_room"]
    assert "undo_call" not in booked.data
    assert booked.data["undo_error"] == "undo.args.ref = 'result.ref': the call's result has no value there"
    assert states["c5"]["state"] == "not_undoable" and "result.ref" in states["c5"]["reason"]
    with pytest.raises(NothingToUndo, match=r"result\.ref"):
        await ops.service.undo(ops.run_id, call="c5", by="operator:cli")
    assert len(ops.events("undo")) == 2


async def test_a_run_with_nothing_reversible_has_nothing_to_undo(open_ops: Any) -> None:
    ops = await open_ops([call("post_message", {"channel": "t", "text": "x"}, "c1"), {"content": "done"}])
    with pytest.raises(NothingToUndo, match=r"no call that can be undone: c1 .post_message.: its manifest declares"):
        await ops.service.undo(ops.run_id, by="operator:cli")


async def test_one_call_by_id_or_event_number_and_the_agent_with_its_own_run_token_only(open_ops: Any) -> None:
    ops = await open_ops()
    other = ops.platform.tokens.issue("tester", "run_other")
    wrong = await ops.service.undo(ops.run_id, call="c1", by="agent:tester", token=other)
    assert wrong["results"][0]["status"] == "unauthenticated" and sorted(calendar(ops.cwd)) == ["ev1", "ev2"]
    bad = await ops.service.undo(ops.run_id, call="c1", by="agent:tester", token="not-a-token")
    assert bad["results"][0]["status"] == "unauthenticated"
    assert (await ops.states())["c1"] == "undo_failed"  # a refused attempt leaves it undoable
    own = ops.platform.tokens.issue("tester", ops.run_id)
    report = await ops.service.undo(ops.run_id, call="c1", by="agent:tester", token=own)
    assert [(r["call"], r["status"]) for r in report["results"]] == [("c1", "ok")]
    assert sorted(calendar(ops.cwd)) == ["ev2"] and ops.events("undo")[-1].data["by"] == "agent:tester"
    assert (await ops.states()) == {"c1": "undone", "c2": "undoable"}
    by_seq = next(c for c in await ops.service.run_calls(ops.run_id) if c["call"] == "c2")["seq"]
    second = await ops.service.undo(ops.run_id, call=str(by_seq), by="operator:cli")  # by its event number
    assert [(r["call"], r["status"]) for r in second["results"]] == [("c2", "ok")] and calendar(ops.cwd) == {}


async def test_undo_denied_by_policy_is_audited_stays_undoable_and_stops_the_older_ones(open_ops: Any) -> None:
    ops = await open_ops(policy=UNDO_DENIED)
    report = await ops.service.undo(ops.run_id, by="operator:cli")
    assert [(r["call"], r["status"]) for r in report["results"]] == [("c2", "denied"), ("c1", "not_attempted")]
    assert "undo-create-denied" in report["results"][0]["error"]["policy_ids"]
    assert sorted(calendar(ops.cwd)) == ["ev1", "ev2"]
    (undo,) = ops.events("undo")
    assert undo.decision == "denied"
    assert await ops.states() == {"c1": "undoable", "c2": "undo_failed"}
    denied = [e for e in ops.events("decision") if e.data.get("reverses")]
    assert denied and "undo-create-denied" in denied[0].data["policy_ids"] and denied[0].decision == "deny"
    token = ops.platform.tokens.issue("tester", ops.run_id)
    agent = await ops.service.undo(ops.run_id, call="c2", by="agent:tester", token=token)  # the rule names operators
    assert agent["results"][0]["status"] == "ok" and sorted(calendar(ops.cwd)) == ["ev1"]
    own = await ops.service.undo(ops.run_id, call="c1", by="agent:tester", token=token)  # the undo tool's own rule
    assert own["results"][0]["status"] == "denied" and sorted(calendar(ops.cwd)) == ["ev1"]
    assert own["results"][0]["error"]["policy_ids"] == ["delete-ev1-denied"]


async def test_undo_needing_approval_waits_then_runs_once_approved(open_ops: Any) -> None:
    ops = await open_ops(policy=UNDO_ASKS)
    first = await ops.service.undo(ops.run_id, call="c2", by="operator:cli")
    (result,) = first["results"]
    assert result["status"] == "approval_required" and first["waiting"] == 1
    approval = ops.platform.approvals.get(result["approval_id"])
    assert approval.tool == "delete_event" and approval.arguments["reverses"] > 0
    assert approval.arguments["arguments"] == {"id": "ev2", "calendar": "work"}
    assert "undo of call c2" in approval.reason and "undo-create-asks" in approval.policy_ids
    assert sorted(calendar(ops.cwd)) == ["ev1", "ev2"]  # nothing ran
    assert (await ops.states())["c2"] == "undo_waiting"
    again = await ops.service.undo(ops.run_id, call="c2", by="operator:cli")
    assert again["results"][0]["approval_id"] == result["approval_id"]  # the same approval, not another
    decided = await ops.service.decide(result["approval_id"], approve=True, by="ops", resume=False)
    # approving it carried the undo out: nothing more to ask
    assert [(r["call"], r["status"]) for r in decided["undo"]["results"]] == [("c2", "ok")]
    assert sorted(calendar(ops.cwd)) == ["ev1"] and (ops.cwd / "deletions.log").read_text() == "ev2\n"
    assert ops.platform.approvals.get(result["approval_id"]).status is ApprovalStatus.USED
    done = await ops.service.undo(ops.run_id, call="c2", by="operator:cli")
    assert done["results"][0]["status"] == "already_undone" and (ops.cwd / "deletions.log").read_text() == "ev2\n"
    undo_events = [e for e in ops.events("undo") if e.data.get("call") == "c2"]
    assert [e.decision for e in undo_events] == ["approval_required", "approval_required", "ok"]
    assert undo_events[-1].data["by"] == "ops"
    refused = await ops.service.undo(ops.run_id, call="c1", by="operator:cli")
    no = await ops.service.decide(refused["results"][0]["approval_id"], approve=False, by="ops", resume=False)
    assert [(r["call"], r["status"]) for r in no["undo"]["results"]] == [("c1", "denied")]
    assert sorted(calendar(ops.cwd)) == ["ev1"]  # the action stays in place
    c1 = next(c for c in await ops.service.run_calls(ops.run_id) if c["call"] == "c1")
    assert c1["state"] == "undo_denied" and refused["results"][0]["approval_id"] in c1["reason"]
    denied = await ops.service.undo(ops.run_id, call="c1", by="operator:cli")
    assert denied["results"][0]["status"] == "denied" and sorted(calendar(ops.cwd)) == ["ev1"]
    assert ops.events("approval")[-1].decision == "denied"


async def test_racing_deciders_and_a_stop_before_the_undo_still_undo_exactly_once(open_ops: Any) -> None:
    ops = await open_ops(policy=UNDO_ASKS)
    waiting = await ops.service.undo(ops.run_id, call="c2", by="operator:cli")
    approval_id = waiting["results"][0]["approval_id"]
    results = await asyncio.gather(ops.service.decide(approval_id, approve=True, by="a", resume=False),
                                   ops.service.decide(approval_id, approve=True, by="b", resume=False),
                                   return_exceptions=True)
    assert sum(isinstance(r, ApprovalError) for r in results) == 1  # the second decider is told it was decided
    assert (ops.cwd / "deletions.log").read_text() == "ev2\n"
    # c1: the decision is stored, then the platform stops before carrying it out; the next start does it, once
    other = await ops.service.undo(ops.run_id, call="c1", by="operator:cli")
    ops.platform.approvals.decide(other["results"][0]["approval_id"], approve=True, by="ops")
    assert (await ops.states())["c1"] == "undo_waiting" and sorted(calendar(ops.cwd)) == ["ev1"]
    assert await ops.service.finish_decided_undos() == [other["results"][0]["approval_id"]]
    assert await ops.service.finish_decided_undos() == []
    assert (ops.cwd / "deletions.log").read_text() == "ev2\nev1\n" and calendar(ops.cwd) == {}
    assert await ops.states() == {"c1": "undone", "c2": "undone"}


async def test_two_concurrent_undoers_of_one_call_compensate_once(open_ops: Any) -> None:
    ops = await open_ops()
    door = ops.platform.gateway.undo_door
    _, states = await ops.service.reversals.calls(ops.run_id)
    c2 = next(s for s in states if s.call == "c2")
    item = Reversal(c2.seq, c2.call, c2.tool, c2.side_effect, c2.undo_tool, dict(c2.undo_args or {}))
    run = ops.service.reversals._run(ops.run_id, "tester")
    both = await asyncio.gather(door.undo(run, item, by="operator:a"), UndoDoor(door.door).undo(run, item,
                                                                                                 by="operator:b"))
    assert sorted(o.status for o in both) == ["error", "ok"]
    loser = next(o for o in both if o.status == "error")
    assert (loser.error or {})["error"] in ("undo_in_progress", "already_undone"), loser.error
    assert (ops.cwd / "deletions.log").read_text() == "ev2\n"
    # Another live process on this host holds the claim (its started record): told so, nothing run, no approval.
    c1 = next(s for s in states if s.call == "c1")
    other = Reversal(c1.seq, c1.call, c1.tool, c1.side_effect, c1.undo_tool, dict(c1.undo_args or {}))
    ledger = ops.platform.gateway.context.idempotency
    assert ledger is not None
    await ledger.aput(ops.run_id, other.key, {"status": "started", "tool": "delete_event", "started_at": 1.0,
                                              "decision_seq": 1, "host": socket.gethostname(), "pid": os.getppid()})
    busy = await door.undo(run, other, by="operator:a")
    assert busy.status == "error" and (busy.error or {})["error"] == "undo_in_progress"
    assert "being undone right now" in (busy.error or {})["message"]
    assert sorted(calendar(ops.cwd)) == ["ev1"] and ops.platform.approvals.find(ApprovalStatus.PENDING) == []


async def test_a_failed_undo_stays_undoable_and_an_undo_that_died_midway_is_not_run_blindly(open_ops: Any) -> None:
    ops = await open_ops()
    (ops.cwd / "delete_fails").write_text("")
    failed = await ops.service.undo(ops.run_id, by="operator:cli")
    assert [(r["call"], r["status"]) for r in failed["results"]] == [("c2", "error"), ("c1", "not_attempted")]
    assert "unavailable" in failed["results"][0]["error"]["message"] and failed["failed"] == 1
    c2 = next(c for c in await ops.service.run_calls(ops.run_id) if c["call"] == "c2")
    assert c2["state"] == "undo_failed" and c2["attempts"] == 1 and "unavailable" in c2["last_error"]["message"]
    (ops.cwd / "delete_fails").unlink()
    # the next attempt of c2 died after its intent was recorded: it may have happened, so a human decides
    ledger = ops.platform.gateway.context.idempotency
    assert ledger is not None
    await ledger.aput(ops.run_id, f"undo:{c2['seq']}:1", {"status": "started", "tool": "delete_event",
                                                          "started_at": 1.0, "decision_seq": 7, "host": "h",
                                                          "pid": 1})
    held = await ops.service.undo(ops.run_id, by="operator:cli")
    assert [(r["call"], r["status"]) for r in held["results"]] == [("c2", "approval_required"),
                                                                   ("c1", "not_attempted")]
    assert sorted(calendar(ops.cwd)) == ["ev1", "ev2"]
    approval = ops.platform.approvals.get(held["results"][0]["approval_id"])
    assert "uncertain" in approval.policy_ids and "this undo may already have happened" in approval.reason
    still = await ops.service.undo(ops.run_id, by="operator:cli")  # asking again does not get round the human
    assert [(r["status"], r["approval_id"]) for r in still["results"][:1]] == [("approval_required", approval.id)]
    assert sorted(calendar(ops.cwd)) == ["ev1", "ev2"]
    decided = await ops.service.decide(approval.id, approve=True, by="ops", resume=False)
    assert [(r["call"], r["status"]) for r in decided["undo"]["results"]] == [("c2", "ok")]  # carried out at once
    fixed = await ops.service.undo(ops.run_id, by="operator:cli")
    assert [(r["call"], r["status"]) for r in fixed["results"]] == [("c2", "already_undone"), ("c1", "ok")]
    assert calendar(ops.cwd) == {}


async def test_an_uncertain_call_is_resolved_by_undoing_it(open_ops: Any) -> None:
    ops = await open_ops()
    context = ops.platform.gateway.context
    context.open_run(ops.run_id, "tester", workdir=ops.cwd / "w", max_steps=20)
    token = ops.platform.tokens.issue("tester", ops.run_id)
    door = ToolDoor(context)

    async def crash(tool: str, args: dict[str, Any], cid: str, decision_seq: int) -> Any:
        key = idempotency_key(ops.run_id, cid)
        checked = await Validate(context)(await Authenticate(context)(token, action=tool), tool, args)
        await Replay(context).start(checked, key, decision_seq)  # its worker died while it ran
        return await door.call(token, tool, args, idempotency_key=key)

    args = {"account": "acme", "amount": 40}
    held = await crash("pay", args, "c9", 99)
    assert held.status == "approval_required"
    await crash("create_event", {"calendar": "home", "title": "x"}, "c8", 98)
    calls = {c["call"]: c for c in await ops.service.run_calls(ops.run_id)}
    assert calls["c9"]["state"] == "uncertain" and calls["c9"]["seq"] == 99
    assert calls["c9"]["undo_args"] == args and calls["c9"]["approval_id"] == held.approval_id
    assert calls["c8"]["state"] == "not_undoable" and "result is unknown" in calls["c8"]["reason"]
    assert "result.id" in calls["c8"]["reason"]
    (ops.cwd / "refund_fails").write_text("")
    failed = await ops.service.undo(ops.run_id, call="c9", by="operator:cli")
    assert failed["results"][0]["status"] == "error"
    assert (await ops.states())["c9"] == "undo_failed"  # still held for its human, still undoable
    assert ops.platform.approvals.get(held.approval_id).status is ApprovalStatus.PENDING
    (ops.cwd / "refund_fails").unlink()
    report = await ops.service.undo(ops.run_id, call="c9", by="operator:cli")
    assert report["results"][0]["status"] == "ok"
    assert (ops.cwd / "ledger.log").read_text() == "refund acme 40\n"
    approval = ops.platform.approvals.get(held.approval_id)
    assert approval.status is ApprovalStatus.DENIED and "undone" in (approval.note or "")
    told = await door.call(token, "pay", args, idempotency_key=idempotency_key(ops.run_id, "c9"))
    assert told.status == "uncertain" and "not run again" in (told.error or {})["message"]
    assert (ops.cwd / "ledger.log").read_text() == "refund acme 40\n"  # never paid blindly
    assert (await ops.states())["c9"] == "undone"


async def test_an_undo_approval_denied_or_expired_without_the_service_still_shows_denied(open_ops: Any) -> None:
    ops = await open_ops(policy=UNDO_ASKS)
    waiting = await ops.service.undo(ops.run_id, call="c2", by="operator:cli")
    ops.platform.approvals.decide(waiting["results"][0]["approval_id"], approve=False, by="ops")  # no undo event
    c2 = next(c for c in await ops.service.run_calls(ops.run_id) if c["call"] == "c2")
    assert c2["state"] == "undo_denied" and "denied by ops" in c2["reason"]
    assert await ops.service.finish_decided_undos() == [] and sorted(calendar(ops.cwd)) == ["ev1", "ev2"]


async def test_an_undo_approval_that_cannot_be_carried_out_says_why_and_is_audited(open_ops: Any) -> None:
    ops = await open_ops()
    stray = ops.platform.approvals.request(run_id=ops.run_id, agent="tester", tool="delete_event", target="work",
                                           arguments={"arguments": {}, "reverses": 999_999, "undo": True,
                                                      "uncertain": False}, policy_ids=("x",), reason="r")
    decided = await ops.service.decide(stray.id, approve=True, by="ops", resume=False)
    assert decided["undo"]["error"] == "run_error" and "999999" in decided["undo"]["message"]
    (event,) = [e for e in ops.events("undo") if e.data.get("approval_id") == stray.id]
    assert event.decision == "error" and event.data["not_carried_out"] is True
    assert sorted(calendar(ops.cwd)) == ["ev1", "ev2"]
