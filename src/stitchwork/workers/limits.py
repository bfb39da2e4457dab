"""Bounded bus streams: each kind of traffic gets the limits of ``[messaging.limits.KIND]`` and a retention that
never removes something unfinished.

=================  =====================  =========================================================================
kind               stream                 retention
=================  =====================  =========================================================================
``events``         ``<p>events.>``        a log: at ``max_age_s``/``max_bytes``/``max_msgs`` the oldest events go
``idempotency``    ``<p>idem.>``          the newest record per call; a completed outcome carries a TTL of
                                          ``max_age_s``, a *started* record (the call may be running) none; at
                                          ``max_bytes``/``max_msgs`` a new record is refused (``BusFull``)
``approvals``      ``<p>apv.>``           the newest state per approval; a decided/expired/used one carries a TTL of
                                          ``max_age_s``, a pending one none; full: a new request is refused, a
                                          decision of a kept approval is still taken
``jobs``           ``<p>runs.>``          a work queue: an acknowledged job is removed, an unacknowledged one and a
                                          dead letter never are; full: a new job is refused; no age limit
``audit``          ``<p>audit.>``         a work queue: removed once the platform appended it to its chain; full:
                                          the worker's events wait in its own log; no age limit
``state``          ``<p>state.>``         checkpoints, the newest ``checkpoints_kept`` per run; when a run finishes
                                          its older ones are purged and its last carries a TTL of ``max_age_s``
                                          (:class:`~stitchwork.workers.runstore.BusRunStore`); unfinished: none
``meters``         ``<p>meter.>``         the newest document per meter, with the TTL its budgets allow (at least
                                          ``max_age_s``; a ``total`` budget: none)
=================  =====================  =========================================================================

A stream's retention (work queue or not) is fixed when it is created: `stitchwork up` and every worker apply the
limits when they start, before they use the streams, so a new installation gets them from the first message; a
stream created by an older version keeps its retention (a warning says so) and gets the other limits.
"""

from __future__ import annotations

import logging

from stitchwork.config import MessagingLimits, StreamLimitConfig
from stitchwork.errors import BusError
from stitchwork.messaging._base import Bus, StreamLimits
from stitchwork.workers.subjects import Subjects

log = logging.getLogger(__name__)


def stream_limits(subjects: Subjects, limits: MessagingLimits) -> list[tuple[str, str, StreamLimits]]:
    """``(kind, a subject of its stream, limits)`` for every kind."""

    def bounds(kind: StreamLimitConfig, **how: bool) -> StreamLimits:
        age = 0.0 if how else kind.max_age_s  # kinds holding unfinished messages age only by TTL
        return StreamLimits(max_age_s=age, max_bytes=kind.max_bytes, max_msgs=kind.max_msgs, **how)

    return [
        ("events", subjects.events("_"), bounds(limits.events)),
        ("idempotency", subjects.idem("_", "_"), bounds(limits.idempotency, discard_new=True)),
        ("approvals", subjects.approval("_"), bounds(limits.approvals, discard_new=True)),
        ("jobs", subjects.queue, bounds(limits.jobs, work_queue=True, discard_new=True)),
        ("audit", subjects.audit("_"), bounds(limits.audit, work_queue=True, discard_new=True)),
    ]


KEYED = ("idempotency", "approvals")
"""Kinds whose subjects are keys: only the newest message of each is kept."""


async def apply_stream_limits(bus: Bus, subjects: Subjects, limits: MessagingLimits) -> list[str]:
    """Applies every kind's limits to its stream (created or updated); returns the kinds it could not limit.

    A kind the bus refuses is logged and skipped: the platform works on, that stream only stays unbounded.
    """
    failed = []
    for kind, subject, bounds in stream_limits(subjects, limits):
        try:
            await bus.limit(subject, bounds)
            if kind in KEYED:
                await bus.keep_last(subject, 1)
        except BusError as exc:
            log.warning("bus stream of %s (%s) is not limited: %s", kind, subject, exc)
            failed.append(kind)
    return failed


__all__ = ["KEYED", "apply_stream_limits", "stream_limits"]
