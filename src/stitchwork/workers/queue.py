"""The run queue seen from outside a worker: submit a run, read its state, wait for it."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any

from stitchwork.agents.runs import record_from_row
from stitchwork.errors import RunError, RunTimedOut
from stitchwork.messaging._base import Bus
from stitchwork.workers.subjects import Subjects

log = logging.getLogger(__name__)


async def enqueue_run(bus: Bus, agent: str, task: str, *, model: str | None = None,
                      subjects: Subjects = Subjects(), run_id: str = "") -> str:
    """Puts a run on the queue for the workers; returns its id (a retry with the same ``run_id`` is a no-op)."""
    if not task.strip():
        raise RunError("a run needs a non-empty task")
    run_id = run_id or "run_" + uuid.uuid4().hex[:16]
    job = {"run_id": run_id, "agent": agent, "task": task, "model": model}
    await bus.publish(subjects.queue, json.dumps(job).encode(), msg_id=f"job:{run_id}")
    return run_id


async def run_state(bus: Bus, run_id: str, *, subjects: Subjects = Subjects()) -> dict[str, Any] | None:
    """The newest checkpoint of ``run_id`` as a run dict (``RunRecord.to_dict``), or ``None``."""
    found = await bus.last(subjects.state(run_id))
    if found is None:
        return None
    return record_from_row(json.loads(found.data)).to_dict()


async def wait_for_run(bus: Bus, run_id: str, *, subjects: Subjects = Subjects(),
                       timeout_s: float = 300.0) -> dict[str, Any]:
    """Follows ``run_id``'s events until it finishes or waits for approval; returns its state then."""
    async with bus.consume(subjects.events(run_id)) as events:
        deadline = time.monotonic() + timeout_s
        while True:
            state = await run_state(bus, run_id, subjects=subjects)
            if state is not None and state["status"] != "running":
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunTimedOut(f"run {run_id} did not finish within {timeout_s:.0f}s")
            with contextlib.suppress(TimeoutError):
                await events.next(min(left, 1.0))
