"""Durable runs over the bus: a run queue shared by workers, checkpoints, idempotency records and run events.

Architecture (DuckDB allows one writer process, so workers cannot share the platform's database file):

* Each worker is a platform of its own (:func:`stitchwork.platform.open_worker`, on ``<state>/workers/<name>``:
  its own DuckDB, audit chain, CA and tool work directories; the platform's vault file is shared read-only).
* What must survive a worker is on the bus, under a subject prefix (default ``sw``):

  ==========================  ======================================================================
  ``<p>runs.queue``           run jobs ``{run_id, agent, task, model}``; a work queue (group ``workers``);
                              also resume jobs ``{run_id, resume}`` and timers (``not_before``: a job
                              that comes early is put back with the remaining delay)
  ``<p>runs.dead.<run_id>``   the run's dead letter (why, attempts, worker), or a note it was re-submitted
  ``<p>state.<run_id>``       the run's checkpoint (the newest message is the current state; the stream keeps
                              the newest ``[messaging] checkpoints_kept`` per run)
  ``<p>idem.<digest>``        the outcome of a completed side-effecting call, by (run, idempotency key)
  ``<p>events.<run_id>``      the run's steps, in order, numbered by the stream
  ``<p>apv.id.<id>``          approvals requested inside workers (:mod:`stitchwork.workers.approvals`)
  ==========================  ======================================================================

A worker takes a job, loads the newest checkpoint, drives the run with the ordinary
:class:`~stitchwork.agents.loop.Runner` (checkpoints are published before the next step starts), and acknowledges
the job when the run finished or waits for a human. A worker killed mid-run never acknowledges: after
``ack_wait_s`` another worker gets the job, resumes from the checkpoint, and the gateway answers calls that
already completed from the idempotency records instead of running the tools again.

Fencing: every checkpoint is a compare-and-set on the sequence number of the checkpoint the worker last read or
wrote (``Nats-Expected-Last-Subject-Sequence``). A worker that stalled past ``ack_wait_s`` while another took the
run over fails its next write with :class:`~stitchwork.errors.BusConflict` and abandons the run (no acknowledgement,
no further call). The started record of a side-effecting call is a compare-and-set too, so the stalled worker
cannot start a call the other one started; a call found started but unfinished is *uncertain*
(:mod:`stitchwork.gateway.uncertain`: resumed with the tool's own key, or held for a human).

Audit: each worker's events are forwarded on ``<p>audit.<worker>`` to the platform's one chain
(:mod:`stitchwork.workers.auditfeed`).

Bounds: each kind of traffic (run events, idempotency records, approvals, jobs, the audit feed) has the limits of
``[messaging.limits.KIND]``, applied by every worker and `stitchwork up` at start; nothing unfinished is ever
removed by them (:mod:`stitchwork.workers.limits`).

Failures: a transient one (:data:`TRANSIENT`: the model or the bus unavailable; a worker shutting down mid-run puts
the job back at once) is retried from the checkpoint after a backoff (``nak`` with a delay, kept by the bus) up
to ``max_deliver`` attempts; a permanent one (an unknown agent, a bad model URI, ...) is not retried. Either way
the job is then dead-lettered and the run marked failed; ``stitchwork runs dead`` lists the letters and ``stitchwork
runs resubmit RUN`` queues the run again (:mod:`stitchwork.workers.deadletters`). A run the model or a policy
ended (``failed``, ``budget_exhausted``, ``denied``, ``timed_out``) is a finished run, not a failure of the job.

Approvals: requested inside a worker, they are stored on the bus, listed and decided on the platform (CLI and
HTTP API), and a decision or the expiry timer queues the run to resume on any worker
(:mod:`stitchwork.workers.approvals`).
"""
