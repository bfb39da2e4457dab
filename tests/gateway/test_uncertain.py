"""No blind re-execution: a side-effecting call found started but unfinished is settled, never simply run again."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stitchwork.agents.loop import idempotency_key
from stitchwork.gateway.context import ToolOutcome
from stitchwork.gateway.stages import Checked, Executed, Resolved
from stitchwork.gateway.tools import SandboxExecute, ToolDoor
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.security.policy import Decision
from tests.gateway import test_stages
from tests.gateway.test_stages import RUN, Stack, checked

stack = test_stages.stack  # the fixture: the platform's real context, one live run

KEY = idempotency_key(RUN, "c1")
ARGS = {"name": "n.txt", "text": "hello"}


async def crash_after_start(stack: Stack, tool: str = "write_note", args: dict[str, Any] | None = None) -> None:
    """What a worker leaves when it dies while the tool runs: the started record and no outcome."""
    from stitchwork.gateway.stages import Replay

    call = await checked(stack, tool, args or ARGS)
    await Replay(stack.context).start(call, KEY, 41)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the inline sandbox runs Python calls in the host's working directory


def note(stack: Stack) -> Path:
    return Path("n.txt")


class Recording(SandboxExecute):
    """The sandbox execute stage, noting what the ledger held for the call when the tool started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Any] = []
        self.decisions: list[Any] = []

    async def __call__(self, call: Checked, resolved: Resolved, decision: Decision) -> Executed | ToolOutcome:
        ledger = self.context.idempotency
        assert ledger is not None
        self.seen.append(await ledger.aget(call.run.run_id, resolved.env.get("STITCHWORK_IDEMPOTENCY_KEY", "")))
        self.decisions.append([e for e in self.context.audit.tail(50) if e.kind == "decision"])
        return await super().__call__(call, resolved, decision)


async def test_the_intent_is_durable_before_a_side_effecting_call_runs(stack: Stack) -> None:
    execute = Recording(stack.context)
    door = ToolDoor(stack.context, execute=execute)
    outcome = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert outcome.status == "ok"
    (seen,) = execute.seen
    assert seen["status"] == "started" and seen["tool"] == "write_note" and seen["decision_seq"] > 0
    (decided,) = execute.decisions[0]  # the decision event was stored (awaited) before the tool ran
    assert decided.seq == seen["decision_seq"] and decided.decision == "allow"
    assert (await stack.context.idempotency.aget(RUN, KEY) or {})["status"] == "ok"  # type: ignore[union-attr]


async def test_a_read_call_keeps_no_record_and_may_run_again(stack: Stack) -> None:
    door = ToolDoor(stack.context)
    first = await door.call(stack.token, "list_inbox", {}, idempotency_key=KEY)
    assert first.status == "ok"
    assert await stack.context.idempotency.aget(RUN, KEY) is None  # type: ignore[union-attr]


async def test_an_uncertain_write_is_held_for_a_human_and_runs_again_once_approved(stack: Stack) -> None:
    await crash_after_start(stack)
    door = ToolDoor(stack.context)
    held = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert held.status == "approval_required" and not note(stack).exists()  # not run blindly
    approval = stack.context.approvals.get(held.approval_id)
    assert approval.policy_ids == ("uncertain",) and "may already have happened" in approval.reason
    assert "decision audit event #41" in approval.reason and approval.arguments["arguments"] == ARGS
    again = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert again.approval_id == held.approval_id  # the same approval, not a second one
    stack.context.approvals.decide(held.approval_id, approve=True, by="ops", note="it did not happen")
    rerun = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert rerun.status == "ok" and note(stack).read_text() == "hello"
    assert stack.context.approvals.get(held.approval_id).status is ApprovalStatus.USED
    (event,) = await stack.events("uncertain")
    assert event.decision == "rerun" and event.data["approval_id"] == held.approval_id
    assert event.data["started"]["decision_seq"] == 41
    stack.context.close_run(RUN)  # a later resume gets the outcome of the re-run, not another run
    stack.context.open_run(RUN, "tester", workdir=stack.run.workdir, max_steps=10)
    replayed = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert replayed.status == "ok" and replayed.audit_seq == rerun.audit_seq


async def test_an_uncertain_write_a_human_denies_is_not_run_again_and_the_agent_is_told(stack: Stack) -> None:
    await crash_after_start(stack)
    door = ToolDoor(stack.context)
    held = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    stack.context.approvals.decide(held.approval_id, approve=False, by="ops", note="it happened")
    told = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert told.status == "uncertain" and not note(stack).exists()
    assert told.error is not None and "not run again" in told.error["message"]
    assert "it happened" in told.error["message"]
    assert '"status": "uncertain"' in told.to_message_content()
    (event,) = await stack.events("uncertain")
    assert event.decision == "skipped" and event.data["status"] == "denied"
    stack.context.close_run(RUN)
    stack.context.open_run(RUN, "tester", workdir=stack.run.workdir, max_steps=10)
    again = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert again.status == "uncertain" and not note(stack).exists()  # the resolution is kept in the ledger


async def test_an_expired_uncertain_approval_means_not_run_again(stack: Stack) -> None:
    await crash_after_start(stack)
    door = ToolDoor(stack.context)
    held = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    approvals = stack.context.approvals
    approvals.clock = lambda: 1e12  # far beyond the deadline
    told = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert told.status == "uncertain" and told.approval_id == held.approval_id and not note(stack).exists()


async def test_an_uncertain_call_of_a_tool_that_deduplicates_by_key_is_resumed_with_the_same_key(stack: Stack) -> None:
    tools = stack.context.tools
    tools._tools["write_note"] = replace(tools.get("write_note"), idempotency="key")
    await crash_after_start(stack)
    execute = Recording(stack.context)
    door = ToolDoor(stack.context, execute=execute)
    resumed = await door.call(stack.token, "write_note", ARGS, idempotency_key=KEY)
    assert resumed.status == "ok" and note(stack).read_text() == "hello"
    assert stack.context.approvals.find(None) == []  # no human needed
    (event,) = await stack.events("uncertain")
    assert event.decision == "resume" and event.data["idempotency_key"] == KEY


async def test_policy_still_decides_an_uncertain_call(stack: Stack) -> None:
    await crash_after_start(stack, "delete_note", {"name": "n.txt"})
    door = ToolDoor(stack.context)
    held = await door.call(stack.token, "delete_note", {"name": "n.txt"}, idempotency_key=KEY)
    assert held.status == "approval_required"  # irreversible: a human either way, with the uncertain evidence
    assert stack.context.approvals.get(held.approval_id).policy_ids == ("uncertain",)
    stack.context.approvals.decide(held.approval_id, approve=True, by="ops")
    done = await door.call(stack.token, "delete_note", {"name": "n.txt"}, idempotency_key=KEY)
    assert done.status == "ok"  # the uncertain approval also counts as the human approval the policy asks for
    assert len(stack.context.approvals.find(None)) == 1
