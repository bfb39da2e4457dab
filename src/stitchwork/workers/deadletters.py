"""Dead letters of the run queue: listed, and put back on the queue once the cause is fixed.

A worker dead-letters a job on ``<p>runs.dead.<run_id>`` when its run failed for a permanent reason (an unknown
agent, a bad model URI) or still failed for a transient one (model unavailable, bus errors) after
``max_deliver`` attempts; the run's checkpoint then says ``failed`` with the reason. :func:`resubmit` marks the
letter re-submitted (a compare-and-set, so two operators cannot both re-submit it), sets the run back to
``running`` and queues it again: it resumes from its last checkpoint, so completed tool calls are not repeated.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from stitchwork.agents.runs import RunStatus, record_from_row, record_to_row
from stitchwork.errors import BusConflict, RunError
from stitchwork.messaging._base import EXPECTED_LAST_SUBJECT_SEQ, Bus
from stitchwork.workers.subjects import Subjects


async def dead_letters(bus: Bus, *, subjects: Subjects = Subjects()) -> list[dict[str, Any]]:
    """The runs given up on and not re-submitted since, oldest first (each letter with its ``seq``)."""
    letters = []
    for delivery in await bus.latest(subjects.dead_letter()):
        letter = json.loads(delivery.data)
        if not letter.get("resubmitted"):
            letters.append({**letter, "seq": delivery.seq})
    return sorted(letters, key=lambda letter: float(letter.get("ts") or 0.0))


async def resubmit(bus: Bus, run_id: str, *, subjects: Subjects = Subjects(), by: str = "operator") -> dict[str, Any]:
    """Puts a dead-lettered run back on the queue; returns the letter.

    Raises:
        RunError: no dead letter for ``run_id``, or it was re-submitted already.
    """
    found = await bus.last(subjects.dead_letter(run_id))
    letter: dict[str, Any] = json.loads(found.data) if found is not None else {}
    if found is None or letter.get("resubmitted"):
        raise RunError(f"run {run_id} has no dead letter" + (" (it was re-submitted)" if found else ""))
    note = {"run_id": run_id, "resubmitted": True, "by": by, "ts": time.time(), "letter": letter}
    try:
        await bus.publish(subjects.dead_letter(run_id), json.dumps(note, default=str).encode(),
                          headers={EXPECTED_LAST_SUBJECT_SEQ: str(found.seq)}, msg_id=f"resubmit:{run_id}:{found.seq}")
    except BusConflict as exc:
        raise RunError(f"run {run_id} was re-submitted meanwhile") from exc
    state = await bus.last(subjects.state(run_id))
    if state is not None:
        record = record_from_row(json.loads(state.data))
        if record.status is RunStatus.FAILED:
            again = replace(record, status=RunStatus.RUNNING, error=None, updated_at=time.time())
            body = json.dumps(record_to_row(again), ensure_ascii=False, default=str).encode()
            await bus.publish(subjects.state(run_id), body, headers={EXPECTED_LAST_SUBJECT_SEQ: str(state.seq)},
                              msg_id=f"resubmit-state:{run_id}:{found.seq}")
    job = letter.get("job") if isinstance(letter.get("job"), dict) else {"run_id": run_id}
    await bus.publish(subjects.queue, json.dumps(job).encode(), msg_id=f"requeue:{run_id}:{found.seq}")
    return letter
