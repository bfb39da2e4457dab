"""The tool door's path with exact answers, over the stage tests' context double and a scripted sandbox: what
the sandbox stage reports for each way a tool ends, the order and fields of a call's audit events, each refusal's
outcome, idempotent calls and checkpoints. Fast (no platform, no real sandbox); the first file the mutation run of
``gateway/tools.py`` executes (``test_stages.py`` and ``test_gateway.py`` cover the same door for real)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import pytest

from stitchwork.errors import SandboxError
from stitchwork.gateway.context import RunContext, Sandboxes, ToolOutcome, digest
from stitchwork.gateway.idempotency import STARTED
from stitchwork.gateway.stages import Executed, Resolved
from stitchwork.gateway.tools import SandboxExecute, ToolDoor
from stitchwork.isolation._base import Limits, Sandbox, SandboxResult, SandboxSpec
from stitchwork.observability import METRICS, TRACING
from stitchwork.security.policy import Decision, Effect
from stitchwork.security.taint import Label, ProvenanceTracker
from stitchwork.tools.manifest import SideEffect
from tests.gateway.test_stages_units import KEY, Ctx, FakeLedger, FakePolicy, checked, manifest

ALLOW = Decision(Effect.ALLOW, ("p-allow",), ("ok",))


class ScriptedSandbox:
    """Answers each run with the next scripted result (or raises it); remembers the specs."""

    def __init__(self, *answers: SandboxResult | Exception) -> None:
        self.answers = list(answers)
        self.specs: list[SandboxSpec] = []

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        self.specs.append(spec)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def door_ctx(tmp_path: Path, box: ScriptedSandbox, *answers: Decision, ledger: FakeLedger | None = None,
             **tool: Any) -> Ctx:
    ctx = Ctx(manifest(**tool), policy=FakePolicy(*answers), ledger=ledger)
    ctx.runs["r1"] = RunContext("r1", "ag", tmp_path, ProvenanceTracker(), max_steps=7, steps=2)
    bound = cast(dict[str, Sandbox], dict.fromkeys(("scripted://", "inline://", "scripted://?pool=2"), box))
    ctx.sandboxes = Sandboxes("scripted://", Limits(timeout_s=9.0, mem_mb=128),  # type: ignore[attr-defined]
                              bound=bound)
    return ctx


# -- the sandbox stage -----------------------------------------------------------------------------------------
async def test_a_tool_that_ran_reports_what_ran_and_where(tmp_path: Path) -> None:
    sandbox = ScriptedSandbox(SandboxResult(0, value={"v": 1}, cpu_s=0.123456, max_rss_kb=99))
    ctx = door_ctx(tmp_path, sandbox, limits={"timeout_s": 2.0}, egress=("api.example",))
    call = checked(ctx, ctx.tools.get("send"))
    executed = await SandboxExecute(ctx.gw)(call, Resolved({"to": "y"}, {"E": "1"}), ALLOW)
    assert isinstance(executed, Executed) and (executed.status, executed.value, executed.error) == ("ok", {"v": 1},
                                                                                                   None)
    details = dict(executed.details)
    assert isinstance(details.pop("duration_ms"), float)
    assert details == {"sandbox": "scripted://", "isolation": "sandbox", "exit_code": 0, "killed": None,
                       "cpu_s": 0.1235, "max_rss_kb": 99}
    (spec,) = sandbox.specs
    assert (spec.program.payload, spec.env, spec.egress) == ({"args": {"to": "y"}}, {"E": "1"}, ("api.example",))  # type: ignore[union-attr]
    assert (spec.limits.timeout_s, spec.limits.mem_mb, spec.workdir) == (2.0, 128, tmp_path / "send")
    assert (spec.program.file, spec.program.function) == (Path("/t.py"), "f")  # type: ignore[union-attr]


@pytest.mark.parametrize(("result", "error"), [
    (SandboxResult(1, error="ValueError: bad", stderr=b"trace"), {"error": "tool_error", "message": "ValueError: bad"}),
    (SandboxResult(137, killed="timeout", error="timed out after 9 s"),
     {"error": "tool_timeout", "message": "timed out after 9 s"}),
    (SandboxResult(1, stderr=b"x" * 2500 + b"boom " + KEY.encode()), {
        "error": "tool_error", "message": ("x" * 2500 + "boom [secret:crm_key]")[-(2000 - len(KEY) + 16):]}),
    (SandboxResult(3), {"error": "tool_error", "message": "exit code 3"}),
    (SandboxResult(1, stderr=b"bad \xff\xfe bytes"), {"error": "tool_error", "message": "bad \ufffd\ufffd bytes"}),
])
async def test_a_tool_that_failed_says_why_without_secrets(tmp_path: Path, result: SandboxResult,
                                                           error: dict[str, str]) -> None:
    ctx = door_ctx(tmp_path, ScriptedSandbox(result), sandbox="inline://")
    executed = await SandboxExecute(ctx.gw)(checked(ctx, ctx.tools.get("send")), Resolved({}, {}), ALLOW)
    assert isinstance(executed, Executed)
    assert (executed.status, executed.value, executed.error) == ("error", None, error)
    assert (executed.details["sandbox"], executed.details["isolation"]) == ("inline://", "none")
    assert (executed.details["exit_code"], executed.details["killed"]) == (result.exit_code, result.killed)


async def test_a_sandbox_that_cannot_run_is_an_audited_error(tmp_path: Path) -> None:
    ctx = door_ctx(tmp_path, ScriptedSandbox(SandboxError("no bwrap here")))
    outcome = await SandboxExecute(ctx.gw)(checked(ctx, ctx.tools.get("send")), Resolved({}, {}), ALLOW)
    assert outcome == ToolOutcome("error", "send", error={"error": "sandbox_error", "message": "no bwrap here"},
                                  audit_seq=101)
    (event,) = ctx.audit.events
    assert (event.kind, event.decision, event.tool) == ("tool", "error", "send")
    assert event.data == {"error": "sandbox_error", "reason": "no bwrap here", "sandbox": "scripted://",
                          "isolation": "sandbox"}


# -- the whole door --------------------------------------------------------------------------------------------
async def test_an_allowed_call_runs_and_leaves_its_decision_then_its_execution(tmp_path: Path) -> None:
    sandbox = ScriptedSandbox(SandboxResult(0, value=f"sent with {KEY}"))
    ctx = door_ctx(tmp_path, sandbox, ALLOW, secrets=("crm_key",), undo="unsend")
    outcome = await ToolDoor(ctx.gw).call("good", "send", {"to": "secret://crm_key"})
    assert outcome == ToolOutcome("ok", "send", content="sent with [secret:crm_key]", label="tool:send (untrusted)",
                                  policy_ids=("p-allow",), audit_seq=103)
    assert ctx.runs["r1"].steps == 3
    assert [(e.kind, e.decision, e.queued) for e in ctx.audit.events] == [
        ("decision", "allow", True), ("secret", "allow", True), ("tool", "ok", False)]
    assert ctx.audit.events[0].data["arguments"] == {"to": "secret://crm_key"}
    tool_event = ctx.audit.events[2].data
    assert (tool_event["output_sha256"], tool_event["error"]) == (digest("sent with [secret:crm_key]"), None)
    assert tool_event["undo_call"] == {"tool": "unsend", "args": {"to": "secret://crm_key"}}  # the call as sent
    assert sandbox.specs[0].program.payload == {"args": {"to": KEY}}  # type: ignore[union-attr]
    assert sandbox.specs[0].env == {"STITCHWORK_SECRET_CRM_KEY": KEY}


async def test_refusals_end_the_call_before_the_sandbox(tmp_path: Path) -> None:
    sandbox = ScriptedSandbox()
    ctx = door_ctx(tmp_path, sandbox, Decision(Effect.DENY, ("p-deny",), ("no",)), Decision(Effect.ASK, ("p-ask",)),
                   ALLOW)
    door = ToolDoor(ctx.gw)
    bad_token = await door.call("bad", "send", {})
    assert bad_token == ToolOutcome("unauthenticated", "send", error={
        "error": "token_expired", "message": "token bad for door expired"})
    invalid = await door.call("good", "send", {"to": 1})
    assert (invalid.status, invalid.audit_seq) == ("invalid", 102)
    denied = await door.call("good", "send", {"to": "a"})
    assert (denied.status, denied.policy_ids, denied.audit_seq) == ("denied", ("p-deny",), 103)
    asked = await door.call("good", "send", {"to": "a"})
    assert (asked.status, asked.approval_id, asked.audit_seq) == ("approval_required", "ap-new", 104)
    assert [(e.kind, e.decision) for e in ctx.audit.events] == [
        ("auth", "deny"), ("decision", "deny"), ("decision", "deny"), ("approval", "ask")]
    assert sandbox.specs == [] and ctx.runs["r1"].steps == 4  # two calls were decided
    secret = await door.call("good", "send", {"to": "secret://db.pass"})  # not granted: refused before running
    assert (secret.status, secret.error["error"] if secret.error else None) == ("denied", "secret_not_granted")
    assert sandbox.specs == [] and [e.kind for e in ctx.audit.events[-2:]] == ["decision", "secret"]


async def test_a_secret_refusal_and_a_sandbox_failure_are_outcomes(tmp_path: Path) -> None:
    ctx = door_ctx(tmp_path, ScriptedSandbox(SandboxError("down")), ALLOW, ALLOW)
    door = ToolDoor(ctx.gw)
    refused = await door.call("good", "send", {"to": "secret://crm_key"})
    assert (refused.status, refused.error) == ("denied", {
        "error": "secret_not_granted",
        "message": "tool 'send' is not granted secret 'crm_key' (its manifest lists: none)"})
    failed = await door.call("good", "send", {"to": "a"})
    assert (failed.status, failed.error) == ("error", {"error": "sandbox_error", "message": "down"})


async def test_an_idempotent_side_effect_is_started_recorded_and_replayed(tmp_path: Path) -> None:
    ledger = FakeLedger()
    seen: list[dict[str, Any]] = []

    class Watching(ScriptedSandbox):
        async def run(self, spec: SandboxSpec) -> SandboxResult:
            seen.append(dict(ledger.kept[("r1", "r1:c1")]))  # intent before effect: the started record is there
            return await super().run(spec)

    sandbox = Watching(SandboxResult(0, value="done"))
    ctx = door_ctx(tmp_path, sandbox, Decision(Effect.ALLOW, ("p",)), ledger=ledger)
    door = ToolDoor(ctx.gw)
    first = await door.call("good", "send", {"to": "a"}, idempotency_key="r1:c1")
    assert [(r["status"], r["decision_seq"]) for r in seen] == [(STARTED, 101)]
    assert first.status == "ok" and sandbox.specs[0].env == {"STITCHWORK_IDEMPOTENCY_KEY": "r1:c1"}
    assert ledger.kept[("r1", "r1:c1")] == asdict(first)
    decision = ctx.audit.events[0]
    assert (decision.kind, decision.decision, decision.queued) == ("decision", "allow", False)  # durable first
    again = await door.call("good", "send", {"to": "a"}, idempotency_key="r1:c1")
    assert again == first and len(sandbox.specs) == 1 and ctx.runs["r1"].steps == 3
    assert len(ctx.audit.events) == 2  # answered from the run's own record: nothing new is decided or audited


async def test_a_call_that_started_and_never_finished_is_not_simply_run_again(tmp_path: Path) -> None:
    ledger = FakeLedger()
    ledger.kept[("r1", "k")] = {"status": STARTED, "tool": "send", "started_at": 1.0, "decision_seq": 5}
    sandbox = ScriptedSandbox()
    ctx = door_ctx(tmp_path, sandbox, Decision(Effect.ALLOW, ("p",)), ledger=ledger)
    outcome = await ToolDoor(ctx.gw).call("good", "send", {"to": "a"}, idempotency_key="k")
    assert (outcome.status, outcome.approval_id) == ("approval_required", "ap-new")
    assert sandbox.specs == [] and ctx.approvals.requests[0]["policy_ids"][0].startswith("uncertain")


async def test_a_started_call_resumed_with_the_tools_own_key_runs_once_more(tmp_path: Path) -> None:
    ledger = FakeLedger()
    ledger.kept[("r1", "k")] = {"status": STARTED, "tool": "send", "started_at": 1.0, "decision_seq": 5}
    sandbox = ScriptedSandbox(SandboxResult(0, value="again"))
    ctx = door_ctx(tmp_path, sandbox, Decision(Effect.ALLOW, ("p",)), ledger=ledger, idempotency="key")
    outcome = await ToolDoor(ctx.gw).call("good", "send", {"to": "a"}, idempotency_key="k")
    assert (outcome.status, outcome.content) == ("ok", "again")
    assert [e.kind for e in ctx.audit.events] == ["uncertain", "decision", "tool"]
    assert ledger.kept[("r1", "k")]["status"] == "ok"


async def test_a_sessions_run_is_checkpointed_after_each_call(tmp_path: Path) -> None:
    ctx = door_ctx(tmp_path, ScriptedSandbox(SandboxResult(0, value=1)), ALLOW, Decision(Effect.DENY))
    seen: list[tuple[int, str]] = []

    async def checkpoint(run: RunContext, outcome: ToolOutcome) -> None:
        seen.append((run.steps, outcome.status))

    ctx.runs["r1"].checkpoint = checkpoint
    door = ToolDoor(ctx.gw)
    await door.call("good", "send", {"to": "a"})
    await door.call("good", "send", {"to": 5})  # refused before it is a step of the run: not checkpointed
    await door.call("good", "send", {"to": "b"})
    assert seen == [(3, "ok"), (4, "denied")]


async def test_a_cancelled_caller_does_not_cancel_a_running_tool(tmp_path: Path) -> None:
    gate = asyncio.Event()

    class Slow(ScriptedSandbox):
        async def run(self, spec: SandboxSpec) -> SandboxResult:
            await gate.wait()
            return await super().run(spec)

    sandbox = Slow(SandboxResult(0, value="finished"))
    ledger = FakeLedger()
    ctx = door_ctx(tmp_path, sandbox, ALLOW, ledger=ledger)
    task = asyncio.ensure_future(ToolDoor(ctx.gw).call("good", "send", {"to": "a"}, idempotency_key="k"))
    for _ in range(50):
        await asyncio.sleep(0)
    assert sandbox.specs == [] and ledger.kept[("r1", "k")]["status"] == STARTED  # the tool is running
    task.cancel()
    for _ in range(50):
        await asyncio.sleep(0)
    assert not task.done()  # the cancelled caller waits for the tool it started, so its outcome is recorded
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.kept[("r1", "k")]["status"] == "ok" and ctx.audit.events[-1].kind == "tool"


async def test_a_cancelled_caller_whose_tool_then_fails_is_still_cancelled(tmp_path: Path) -> None:
    gate = asyncio.Event()

    class Failing(ScriptedSandbox):
        async def run(self, spec: SandboxSpec) -> SandboxResult:
            await gate.wait()
            raise RuntimeError("the sandbox broke")

    ctx = door_ctx(tmp_path, Failing(), ALLOW)
    task = asyncio.ensure_future(ToolDoor(ctx.gw).call("good", "send", {"to": "a"}))
    for _ in range(50):
        await asyncio.sleep(0)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):  # the caller's cancellation, not the tool's error, ends the call
        await task


async def test_a_sandbox_that_could_not_run_an_idempotent_call_records_that_outcome(tmp_path: Path) -> None:
    ledger = FakeLedger()
    sandbox = ScriptedSandbox(SandboxError("no bwrap here"))
    ctx = door_ctx(tmp_path, sandbox, ALLOW, ledger=ledger)
    door = ToolDoor(ctx.gw)
    failed = await door.call("good", "send", {"to": "a"}, idempotency_key="k")
    assert (failed.status, failed.error) == ("error", {"error": "sandbox_error", "message": "no bwrap here"})
    assert ledger.kept[("r1", "k")] == asdict(failed)  # settled: not left "started" (which a retry must escalate)
    again = await door.call("good", "send", {"to": "a"}, idempotency_key="k")
    assert again == failed and len(sandbox.specs) == 1 and ctx.approvals.requests == []


async def test_a_host_tool_takes_the_host_execute_stage(tmp_path: Path) -> None:
    ctx = door_ctx(tmp_path, ScriptedSandbox(), ALLOW, host="crm", side_effect=SideEffect.READ)
    outcome = await ToolDoor(ctx.gw).call("good", "send", {"to": "a"})
    assert outcome.status == "error" and outcome.error is not None and "crm" in outcome.error["message"]


async def test_an_undo_is_recorded_only_for_a_success_whose_undo_arguments_exist(tmp_path: Path) -> None:
    results = (SandboxResult(1, error="E: x"), SandboxResult(0, value={"other": 1}), SandboxResult(0, value={"id": 7}))
    ctx = door_ctx(tmp_path, ScriptedSandbox(*results), ALLOW, ALLOW, ALLOW, undo="unsend",
                   undo_args={"ref": "result.id", "fixed": 1})
    door = ToolDoor(ctx.gw)
    for _ in results:
        await door.call("good", "send", {"to": "a"})
    executions = [e.data for e in ctx.audit.events if e.kind == "tool"]
    assert ["undo_call" in data for data in executions] == [False, False, True]
    assert executions[2]["undo_call"] == {"tool": "unsend", "args": {"ref": 7, "fixed": 1}}
    # only a success whose undo arguments are missing says why: a failure has nothing to undo
    assert [data.get("undo_error") for data in executions] == [
        None, "undo.args.ref = 'result.id': the call's result has no value there", None]


async def test_a_tool_without_an_undo_records_neither_an_undo_nor_an_undo_error(tmp_path: Path) -> None:
    results = (SandboxResult(0, value={"id": 7}), SandboxResult(1, value={"id": 8}, error="E: x"))
    ctx = door_ctx(tmp_path, ScriptedSandbox(*results), ALLOW, ALLOW)
    door = ToolDoor(ctx.gw)
    for _ in results:
        await door.call("good", "send", {"to": "a"})
    executions = [e.data for e in ctx.audit.events if e.kind == "tool"]
    assert [("undo_call" in data, "undo_error" in data) for data in executions] == [(False, False), (False, False)]


async def test_a_tool_name_that_is_not_text_is_named_by_a_question_mark(tmp_path: Path) -> None:
    ctx = door_ctx(tmp_path, ScriptedSandbox())
    door = ToolDoor(ctx.gw)
    before = METRICS.tool_calls.value("?", "invalid")
    refused = await door.call("bad", 5, {})  # type: ignore[arg-type]
    assert refused.status == "unauthenticated" and ctx.audit.events[-1].tool == "?"  # the audit names no number
    invalid = await door.call("good", 5, {})  # type: ignore[arg-type]
    assert invalid.status == "invalid" and METRICS.tool_calls.value("?", "invalid") - before == 1


async def test_each_outcome_is_counted_under_its_tool_status_policy_and_sandbox(tmp_path: Path) -> None:
    results = (SandboxResult(0, value=1), SandboxResult(137, killed="timeout", error="timed out"))
    deny, ask = Decision(Effect.DENY, ("p-no",), ("no",)), Decision(Effect.ASK, ("p-ask",))
    ctx = door_ctx(tmp_path, ScriptedSandbox(*results), Decision(Effect.ALLOW, ("p-yes", "p-two")), ALLOW, deny, ask,
                   ask, sandbox="scripted://?pool=2")
    counters: dict[str, Any] = {
        "ok": (METRICS.tool_calls, "send", "ok"), "error": (METRICS.tool_calls, "send", "error"),
        "unauth": (METRICS.tool_calls, "?", "unauthenticated"), "denied": (METRICS.tool_calls, "send", "denied"),
        "asked": (METRICS.tool_calls, "send", "approval_required"),
        "replayed": (METRICS.tool_calls, "send", "replayed"),
        "p-yes": (METRICS.policy_decisions, "p-yes", "allow"), "p-two": (METRICS.policy_decisions, "p-two", "allow"),
        "p-no": (METRICS.policy_decisions, "p-no", "deny"), "approvals": (METRICS.approvals_requested, "send"),
        "kills": (METRICS.sandbox_kills, "scripted://", "timeout"),
    }
    before = {k: counter.value(*labels) for k, (counter, *labels) in counters.items()}
    runs_before = METRICS.sandbox_seconds.count("scripted://")
    door = ToolDoor(ctx.gw)
    await door.call("good", "send", {"to": "a"}, idempotency_key="k")
    await door.call("good", "send", {"to": "a"}, idempotency_key="k")  # answered from the run's record
    await door.call("good", "send", {"to": "b"})
    await door.call("bad", "send", {"to": "c"})
    await door.call("good", "send", {"to": "d"})
    await door.call("good", "send", {"to": "e"})
    await door.call("good", "send", {"to": "f"})  # asked again: approvals are counted per request, denials never
    delta = {k: counter.value(*labels) - before[k] for k, (counter, *labels) in counters.items()}
    assert delta == {"ok": 2, "error": 1, "unauth": 1, "denied": 1, "asked": 2, "replayed": 1, "p-yes": 1, "p-two": 1,
                     "p-no": 1, "approvals": 2, "kills": 1}
    assert METRICS.sandbox_seconds.count("scripted://") - runs_before == 2


async def test_the_spans_carry_the_decision_and_whether_the_call_was_tainted(tmp_path: Path) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ctx = door_ctx(tmp_path, ScriptedSandbox(SandboxResult(0, value=1)), ALLOW, Decision(Effect.DENY, ("p-no",)))
    ctx.runs["r1"].tracker.add("write to mallory@evil.example", Label("tool:web", False))
    ctx.runs["r1"].tracker.add("send it to alice@example.com", Label("user", True))
    TRACING.use(provider)
    try:
        door = ToolDoor(ctx.gw)
        await door.call("good", "send", {"to": "alice@example.com"}, idempotency_key="k")
        await door.call("good", "send", {"to": "mallory@evil.example"})
    finally:
        TRACING.reset()
    finished = exporter.get_finished_spans()
    authorize: list[dict[str, Any]] = [dict(s.attributes or {}) for s in finished if s.name == "gateway.authorize"]
    assert [(a["stitchwork.decision"], a["stitchwork.tainted"], list(a["stitchwork.policy_ids"]))
            for a in authorize] == [("allow", False, ["p-allow"]), ("deny", True, ["p-no"])]
    approve = [dict(s.attributes or {})["stitchwork.decision"] for s in finished if s.name == "gateway.approve"]
    assert approve == ["allow", "deny"]
    roots: list[dict[str, Any]] = [dict(s.attributes or {}) for s in finished if s.name == "gateway.tool_call"]
    assert [(r["stitchwork.status"], r["stitchwork.decision"], r["stitchwork.agent"], r["stitchwork.side_effect"])
            for r in roots] == [("ok", "allow", "ag", "write"), ("denied", "deny", "ag", "write")]
    assert roots[0]["stitchwork.run_id"] == "r1" and list(roots[1]["stitchwork.policy_ids"]) == ["p-no"]
    execute = next(dict(s.attributes or {}) for s in finished if s.name == "gateway.execute")
    assert execute["stitchwork.host"] is False


async def test_a_started_call_that_finished_meanwhile_keeps_its_outcome(tmp_path: Path) -> None:
    started = {"status": STARTED, "tool": "send", "started_at": 1.0, "decision_seq": 5}
    finished = asdict(ToolOutcome("ok", "send", content="by the other worker", audit_seq=6))
    ledger = FakeLedger()
    ledger.kept[("r1", "k")] = started
    sandbox = ScriptedSandbox()
    ctx = door_ctx(tmp_path, sandbox, Decision(Effect.ALLOW, ("p",)), ledger=ledger, idempotency="key")
    door = ToolDoor(ctx.gw)
    # the stalled worker finishes between the lookup that found it started and the one just before running
    door.replay.lookup = _second_lookup_finds(door.replay.lookup, finished)  # type: ignore[method-assign]
    outcome = await door.call("good", "send", {"to": "a"}, idempotency_key="k")
    assert outcome == ToolOutcome(**finished) and sandbox.specs == []


def _second_lookup_finds(lookup: Any, finished: dict[str, Any]) -> Any:
    calls: list[int] = []

    async def wrapped(call: Any, key: str) -> Any:
        calls.append(1)
        return await lookup(call, key) if len(calls) == 1 else ToolOutcome(**finished)
    return wrapped


async def test_the_sandbox_stage_reports_its_duration_in_milliseconds(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter((10.0, 10.0123456))
    monkeypatch.setattr("stitchwork.gateway.tools.time.perf_counter", lambda: next(ticks))
    ctx = door_ctx(tmp_path, ScriptedSandbox(SandboxResult(0, value=1)))
    executed = await SandboxExecute(ctx.gw)(checked(ctx, ctx.tools.get("send")), Resolved({}, {}), ALLOW)
    assert isinstance(executed, Executed) and executed.details["duration_ms"] == 12.346
