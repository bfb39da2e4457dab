"""The built-in agent loop: the model proposes tool calls, the gateway decides and executes, results go back,
until a final answer or a budget is hit. Checkpointed after every step; a run waiting for approval resumes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from stitchwork.agents.definition import AgentRegistry, AgentSpec
from stitchwork.agents.runs import RunRecord, RunStatus, RunStore
from stitchwork.compute._base import Model, ToolCall, open_model
from stitchwork.errors import ConfigError, PolicyDenied, RunError, StitchworkError
from stitchwork.gateway.core import Gateway, ToolOutcome
from stitchwork.security.taint import Label, ProvenanceTracker

StepCallback = Callable[[RunRecord, str, dict[str, Any]], None]


def idempotency_key(run_id: str, call_id: str) -> str:
    """The idempotency key of one tool call of a run (the gateway keeps side-effecting outcomes under it)."""
    return f"{run_id}:{call_id}"


class Runner:
    """Drives runs through the gateway."""

    def __init__(
        self, gateway: Gateway, agents: AgentRegistry, runs: RunStore, *, state_dir: Path,
        max_seconds: float = 300.0, on_event: StepCallback | None = None,
        reraise: tuple[type[Exception], ...] = (),
    ) -> None:
        self.gateway = gateway
        self.agents = agents
        self.runs = runs
        self.state_dir = state_dir
        self.max_seconds = max_seconds
        self.on_event = on_event
        self.reraise = reraise
        """Errors that do not fail the run but leave :meth:`drive` (a transient failure a worker retries)."""
        self._models: dict[tuple[str, str], Model] = {}

    def _model(self, agent: AgentSpec, uri: str) -> Model:
        key = (uri, str(agent.base_dir))
        if key not in self._models:
            options: dict[str, Any] = {}
            if uri.startswith("scripted:"):
                options["base_dir"] = agent.base_dir
            self._models[key] = open_model(uri, **options)
        return self._models[key]

    def _emit(self, record: RunRecord, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(record, kind, data)

    def create(self, agent_name: str, task: str, *, model: str | None = None,
               task_source: Label | None = None) -> RunRecord:
        """Creates a run record (status running) without executing it.

        Args:
            agent_name: The agent.
            task: The task, the run's first user message.
            model: A model URI instead of the agent's own.
            task_source: Where the task came from when it is not the operator's (default: ``user``, trusted); a
                remote peer's message is untrusted content, so that what it names cannot steer sensitive calls.
        """
        agent = self.agents.get(agent_name)
        uri = model or agent.model
        if not uri:
            raise ConfigError(f"agent {agent.name!r} has no model; pass --model URI")
        self._model(agent, uri)
        if not isinstance(task, str) or not task.strip():
            raise RunError("a run needs a non-empty task")
        record = self.runs.create(agent.name, task, uri)
        messages = ({"role": "system", "content": agent.system}, {"role": "user", "content": task})
        provenance: dict[str, Any] = {}
        if task_source is not None:
            tracker = ProvenanceTracker(trusted_sources=self.gateway.context.trusted_sources)
            tracker.add(agent.system, Label("operator", True))
            tracker.add(task, task_source)
            provenance = tracker.snapshot()
        return self.runs.save(replace(record, messages=messages, provenance=provenance))

    async def start(self, agent_name: str, task: str, *, model: str | None = None) -> RunRecord:
        """Creates a run and drives it until it finishes or waits for a human."""
        record = self.create(agent_name, task, model=model)
        return await self.drive(record.id)

    async def drive(self, run_id: str, *, record: RunRecord | None = None) -> RunRecord:
        """Runs (or resumes) ``run_id`` until it finishes or waits for approval.

        Args:
            run_id: the run.
            record: its newest checkpoint when the caller has just read it (else it is read from the store).
        """
        if record is None or record.id != run_id:
            record = self.runs.get(run_id)
        if record.status.finished:
            return record
        agent = self.agents.get(record.agent)
        model = self._model(agent, record.model)
        run = self.gateway.open_run(
            record.id, agent.name, workdir=self.state_dir / "runs" / record.id,
            max_steps=agent.max_steps, provenance=record.provenance or None,
        )
        if not record.provenance:
            self.gateway.record_content(record.id, agent.system, Label("operator", True))
            self.gateway.record_content(record.id, record.task, Label("user", True))
        token = self.gateway.tokens.issue(agent.name, record.id)
        run.steps = record.steps
        record = replace(record, status=RunStatus.RUNNING)
        deadline = time.monotonic() + self.max_seconds
        tools = [self.gateway.tools.get(t).openai_schema() for t in agent.tools if t in self.gateway.tools]
        try:
            messages = list(record.messages)
            pending = [ToolCall(**c) for c in record.pending.get("calls", [])]
            while True:
                if pending:
                    waiting: list[str] = []
                    remaining: list[ToolCall] = []
                    for call in pending:
                        if waiting:
                            remaining.append(call)
                            continue
                        outcome = await self.gateway.call_tool(token, call.name, call.arguments,
                                                               idempotency_key=idempotency_key(record.id, call.id))
                        self._emit(record, "tool", {"call": call.name, "status": outcome.status,
                                                    "policy_ids": list(outcome.policy_ids)})
                        if outcome.status == "approval_required":
                            waiting.append(outcome.approval_id)
                            remaining.append(call)
                            continue
                        messages.append(self._tool_message(call, outcome))
                    record = replace(
                        record, messages=tuple(messages), steps=run.steps,
                        provenance=run.tracker.snapshot(),
                        pending={"calls": [c.__dict__ for c in remaining], "approvals": waiting} if remaining else {},
                    )
                    if waiting:
                        record = await self.runs.asave(replace(record, status=RunStatus.WAITING_APPROVAL))
                        self._emit(record, "waiting_approval", {"approvals": waiting})
                        return record
                    record = await self.runs.asave(record)
                    pending = []
                if run.steps >= agent.max_steps or time.monotonic() > deadline:
                    steps = run.steps >= agent.max_steps
                    record = await self.runs.asave(replace(
                        record, status=RunStatus.BUDGET_EXHAUSTED if steps else RunStatus.TIMED_OUT,
                        error=f"{'step' if steps else 'time'} budget exhausted after {run.steps} tool calls"))
                    self._emit(record, "finished", {"status": record.status.value})
                    return record
                turn = await self.gateway.complete(token, model, messages, tools)
                messages.append(turn.as_message())
                self._emit(record, "model", {"content": turn.content, "tool_calls": [c.name for c in turn.tool_calls]})
                if not turn.tool_calls:
                    record = await self.runs.asave(replace(
                        record, messages=tuple(messages), status=RunStatus.COMPLETED, result=turn.content or "",
                        provenance=run.tracker.snapshot(), steps=run.steps,
                    ))
                    self._emit(record, "finished", {"status": record.status.value})
                    return record
                pending = list(turn.tool_calls)
                record = await self.runs.asave(replace(record, messages=tuple(messages),
                                                pending={"calls": [c.__dict__ for c in pending]}))
        except StitchworkError as exc:
            if isinstance(exc, self.reraise):
                raise  # the caller retries the run from its last checkpoint (durable workers)
            status = RunStatus.DENIED if isinstance(exc, PolicyDenied) else RunStatus.FAILED  # its model call refused
            record = await self.runs.asave(replace(record, status=status, error=str(exc)))
            self._emit(record, "finished", {"status": record.status.value, "error": str(exc)})
            return record
        finally:
            self.gateway.tokens.revoke(token, reason="run step finished")
            self.gateway.close_run(record.id)

    @staticmethod
    def _tool_message(call: ToolCall, outcome: ToolOutcome) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": outcome.to_message_content()}
