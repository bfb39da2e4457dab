"""Tamper-evident, durable, group-committed audit log.

Every audited action becomes one :class:`~stitchwork.audit.records.AuditEvent` in a SHA-256 hash chain (the rule
and its canonical JSON: :mod:`stitchwork.audit.canonical`).

Write path (``journal_path`` set). One writer thread owns sequence numbers and hashing, so the chain is
linear however many threads and asyncio tasks append at once. It takes every pending append, writes the
batch to the journal (one JSON line per event) with a single ``pwrite``, calls ``os.fdatasync`` once and
then wakes every caller of the batch: ``append``/``aappend`` return only once their event is on disk.

A second thread copies journaled events into the store's ``audit_events`` table in one transaction per
store batch, every ``flush_ms`` (sooner once 5,000 events wait, and on ``flush``/``close``). A copy costs
milliseconds of CPU however few events it holds, so copies are spaced out (250 ms by default); an emptied journal
file is refilled with twice as many zeros as it took in the last interval, so batches never grow the file. The journal
is two files, ``journal_path`` and ``journal_path + ".1"``, used in turn: a copy seals the active file (the
writer carries on in the other, empty, one), signs the head of the batch, appends that signed head to the
sealed file, inserts the events, upserts the head into ``audit_heads`` and then empties the sealed file.
The writer never waits for the store. (The journal's files and recovery: :mod:`stitchwork.audit.journal`.)

On open, events in the journal beyond the store's last event are inserted into the store and signed, so a
crash between ``fdatasync`` and the store insert loses nothing.

Without a journal (``journal_path=None``) each batch is one store transaction, followed by its signed head.

Batches (:mod:`stitchwork.audit.batch`). :meth:`AuditLog.append_many` hands a whole list of events to the writer
together; a crash during the batch's journal write can leave a prefix of the (unacknowledged) batch recorded, never
a gap. The store copy goes in column by column (:meth:`Store.append_columns`: an Arrow table on DuckDB and chdb)
instead of as row dicts.

The signed head and what :meth:`AuditLog.verify` checks: :mod:`stitchwork.audit.verify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from stitchwork.audit.batch import AuditBatch, _Batch, _Item, _prepare_event, _prepare_events
from stitchwork.audit.canonical import _ENCODER, GENESIS_HASH
from stitchwork.audit.journal import (
    JOURNAL_PREALLOC,
    _head_line,
    _open_journal,
    _read_all,
    _recover_journal,
    _reset_journal_file,
    _write_at,
    prealloc_for,
)
from stitchwork.audit.records import (
    _EVENTS_DDL,
    _HEADS_DDL,
    _SELECT_EVENTS,
    _UPDATE_HEAD,
    _UPSERT_HEAD,
    DAMAGE_KEY,
    EVENTS_TABLE,
    SIGNED_HEAD_TABLE,
    AuditEvent,
    Signer,
    _columns,
    _decode_row,
    _DecodeError,
    _Head,
    _head_message,
    _Record,
    _Row,
    _to_event,
)
from stitchwork.audit.verify import VerifyReport, _check_head, _pick_head, _Problem, _verify_chain
from stitchwork.data._base import Store
from stitchwork.errors import AuditError, StoreError

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)

#: Copy journaled events into the store as soon as this many are waiting.
FLUSH_THRESHOLD = 5_000
#: How long the writer holds events nobody waits for (:meth:`AuditLog.append_nowait`) for an awaited append to
#: share their journal write and fsync. An awaited append is committed at once, with every event queued before it.
NOWAIT_LINGER_S = 0.01

_Waiter = tuple["asyncio.Future[Any]", "_Item | _Batch"]


class _Group:
    """The appends that one journal write (or one store transaction) makes durable together."""

    __slots__ = ("done", "error", "items", "urgent", "waiters")

    def __init__(self) -> None:
        self.items: list[_Item | _Batch] = []
        self.done = threading.Event()
        self.error: AuditError | None = None
        self.waiters: dict[asyncio.AbstractEventLoop, list[_Waiter]] = {}
        self.urgent = False  # someone waits for this group to be durable: commit it at once


class _Sealed:
    """Journaled events being copied into the store, and the journal file that holds them."""

    __slots__ = ("file", "head", "head_done", "inserted", "records")

    def __init__(self, records: list[_Row], file: int) -> None:
        self.records = records
        self.file = file
        self.head: _Head | None = None  # signed, and written to the end of the sealed file
        self.inserted = False
        self.head_done = False


def _settle(waiters: list[_Waiter], error: AuditError | None) -> None:
    """Runs in the caller's event loop: completes the futures of one group."""
    for future, item in waiters:
        if future.done():  # the awaiting task was cancelled; the event is recorded all the same
            continue
        if error is None:
            future.set_result(item.event() if isinstance(item, _Item) else AuditBatch(item))
        else:
            future.set_exception(AuditError(str(error)))


class AuditLog:
    """The audit log: append events, read the newest, verify the chain.

    Args:
        store: Where events end up (tables ``audit_events`` and ``audit_heads`` are created if missing).
        signer: Signs the head of the chain after every batch.
        journal_path: The write-ahead journal (a second file ``<journal_path>.1`` is used in turn). None
            commits every batch straight to the store, which is slower.
        flush_ms: How often journaled events are copied into the store.

    Raises:
        AuditError: The journal is corrupt (names the file and line; nothing is changed), or in use by
            another audit log.
        StoreError: The store cannot be read or written.
    """

    def __init__(self, store: Store, *, signer: Signer, journal_path: Path | None, flush_ms: float = 250.0) -> None:
        if not flush_ms > 0:
            raise AuditError(f"flush_ms must be positive, got {flush_ms!r}")
        self._store = store
        self._signer = signer
        self._flush_s = min(flush_ms / 1000.0, threading.TIMEOUT_MAX)
        self._paths: list[Path] = []
        if journal_path is not None:
            journal_path = Path(journal_path)
            self._paths = [journal_path, journal_path.with_name(journal_path.name + ".1")]

        self._cond = threading.Condition()  # guards _group, _closed, _failed
        self._group = _Group()
        self._closed = False
        self._failed: AuditError | None = None

        self._journal_lock = threading.Lock()  # guards _fds, _offsets, _active, _unstored, _journaled_seq
        self._fds: list[int] = []
        self._offsets = [0, 0]  # where the next batch goes in each file
        self._active = 0
        self._unstored: list[_Row] = []
        self._journaled_seq = 0

        self._copy_lock = threading.Lock()  # serialises store writes; guards _sealed, _stored_seq
        self._sealed: _Sealed | None = None
        self._stored_seq = 0
        self._flush_now = threading.Event()
        self._stop_flusher = threading.Event()
        self._last_copy_error = 0.0
        self._head_rows: set[str] = set()  # key ids whose signed-head row this log has stored (copy lock)

        # writer-thread state
        self._next_seq = 1
        self._last_hash = GENESIS_HASH
        self._last_ts = 0.0
        self._damage: _Problem | None = None

        self._store.execute(_EVENTS_DDL)
        self._store.execute(_HEADS_DDL)
        if self._paths:
            self._fds = _open_journal(self._paths)
        try:
            self._recover()
        except BaseException:
            self._close_fds()
            raise

        self._listeners: list[Callable[[list[AuditEvent]], None]] = []
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()
        self._flusher: threading.Thread | None = None
        if self._paths:
            self._flusher = threading.Thread(target=self._flush_loop, name="audit-flusher", daemon=True)
            self._flusher.start()

    # ---------------------------------------------------------------------------------------- public API
    def append(
        self,
        kind: str,
        *,
        agent: str = "",
        run_id: str = "",
        tool: str = "",
        decision: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Records one event and returns it once it is durable (journaled and fsynced, or in the store).

        Args:
            kind: What happened: "auth", "decision", "approval", "tool", "model", "secret", "run", "sandbox".
            agent: Agent name.
            run_id: Run id.
            tool: Tool or action name.
            decision: "allow", "deny", "ask", "ok", "error", ….
            data: Details. Bytes are recorded as their repr and sets as sorted lists.

        Raises:
            AuditError: ``data`` holds NaN, an infinity or a value with no JSON form; the log is closed; or
                the event could not be made durable.
        """
        item = _prepare_event(kind, agent, run_id, tool, decision, data)
        group = self._enqueue(item, None)
        group.done.wait()
        if group.error is not None:
            raise AuditError(str(group.error)) from group.error
        return item.event()

    async def aappend(
        self,
        kind: str,
        *,
        agent: str = "",
        run_id: str = "",
        tool: str = "",
        decision: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Like :meth:`append`, but awaits durability without blocking the event loop.

        Concurrent callers share one journal write and fsync. If the awaiting task is cancelled, the event
        is still recorded.
        """
        item = _prepare_event(kind, agent, run_id, tool, decision, data)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditEvent] = loop.create_future()
        self._enqueue(item, (loop, future))
        return await future

    def append_nowait(
        self,
        kind: str,
        *,
        agent: str = "",
        run_id: str = "",
        tool: str = "",
        decision: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Queues an event without waiting for it to be durable.

        The chain is linear and the journal is written in order, so the event is durable no later than any event
        appended after it: a caller that ends with an awaited :meth:`aappend` has both durable on return. The writer
        holds such an event for up to :data:`NOWAIT_LINGER_S` so that an awaited append following it shares its
        journal write and fsync (a tool call's queued decision and awaited execution: one fsync, not two).
        """
        self._enqueue(_prepare_event(kind, agent, run_id, tool, decision, data), None, urgent=False)

    def append_many(self, events: Iterable[Mapping[str, Any]]) -> AuditBatch:
        """Records a batch of events, contiguous in the chain and in order, with one journal write and one fsync.

        Args:
            events: One mapping per event with the keyword arguments of :meth:`append` (``kind`` required;
                ``agent``, ``run_id``, ``tool``, ``decision``, ``data`` optional).

        Returns:
            The recorded events, once all of them are durable (journaled and fsynced, or in the store).

        Raises:
            AuditError: An event is invalid (nothing of the batch is recorded; the message names its index);
                the log is closed; or the batch could not be made durable. A crash during the journal write
                may leave a prefix of an unacknowledged batch recorded, never a gap.
        """
        batch = _prepare_events(events)
        if not len(batch):
            return AuditBatch(None)
        group = self._enqueue(batch, None)
        group.done.wait()
        if group.error is not None:
            raise AuditError(str(group.error)) from group.error
        return AuditBatch(batch)

    async def aappend_many(self, events: Iterable[Mapping[str, Any]]) -> AuditBatch:
        """Like :meth:`append_many`, but awaits durability without blocking the event loop.

        If the awaiting task is cancelled, the batch is still recorded.
        """
        batch = _prepare_events(events)
        if not len(batch):
            return AuditBatch(None)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditBatch] = loop.create_future()
        self._enqueue(batch, (loop, future))
        return await future

    def lag(self) -> int:
        """Events journaled (durable) but not yet copied into the store (0 without a journal)."""
        with self._journal_lock:
            journaled = self._journaled_seq
        return max(journaled - self._stored_seq, 0) if self._paths else 0

    def flush(self) -> None:
        """Copies every event appended so far (queued ones are committed first) into the store, and upserts its
        signed head.

        Raises:
            AuditError: The store refused the copy (the events stay in the journal).
        """
        self._commit_pending()
        if not self._paths:
            return
        with self._journal_lock:
            target = self._journaled_seq
        try:
            while True:
                with self._copy_lock:
                    if self._stored_seq >= target and self._sealed is None:
                        return
                    if not self._copy_once():
                        return
        except Exception as exc:  # the store or the signer failed
            raise AuditError(
                f"cannot copy audit events into the store: {exc}; they are safe in the journal {self._paths[0]}"
            ) from exc

    def listen(self, callback: Callable[[list[AuditEvent]], None]) -> None:
        """Calls ``callback`` with every batch of events once it is durable, in chain order (from the writer
        thread: keep it short and thread-safe; an exception it raises is logged and ignored)."""
        self._listeners.append(callback)

    def after(self, seq: int, limit: int = 1000) -> list[AuditEvent]:
        """Up to ``limit`` events after ``seq``, oldest first (events still in the journal are copied first).

        Raises:
            AuditError: A stored event cannot be decoded, or the journal cannot be copied.
        """
        self.flush()
        rows = self._store.query(f"{_SELECT_EVENTS} WHERE seq > ? ORDER BY seq LIMIT ?", [seq, limit])
        try:
            return [_to_event(_decode_row(row)) for row in rows]
        except _DecodeError as exc:
            raise AuditError(f"an audit event after {seq} cannot be decoded ({exc}); run verify") from exc

    def for_run(self, run_id: str, kinds: Sequence[str] = ()) -> list[AuditEvent]:
        """The events of run ``run_id`` (only of ``kinds`` when given), oldest first, once every event appended
        so far is in the store.

        Raises:
            AuditError: A stored event cannot be decoded (run :meth:`verify`).
        """
        self.flush()
        where, params = "WHERE run_id = ?", [run_id]
        if kinds:
            where += f" AND kind IN ({', '.join('?' for _ in kinds)})"
            params += list(kinds)
        rows = self._store.query(f"{_SELECT_EVENTS} {where} ORDER BY seq", params)
        try:
            return [_to_event(_decode_row(row)) for row in rows]
        except _DecodeError as exc:
            raise AuditError(f"an audit event of run {run_id} cannot be decoded ({exc}); run verify") from exc

    def tail(self, n: int = 20) -> list[AuditEvent]:
        """The newest ``n`` events, oldest first (including events not yet copied into the store).

        Raises:
            AuditError: A stored event cannot be decoded (run :meth:`verify`).
            StoreError: The store cannot be read.
        """
        if n <= 0:
            return []
        self._commit_pending()
        with self._copy_lock:
            with self._journal_lock:
                memory = list(self._unstored)
            if self._sealed is not None and not self._sealed.inserted:
                memory = self._sealed.records + memory
            memory = memory[-n:]
            need = n - len(memory)
            stored: list[dict[str, Any]] = []
            if need > 0:
                if memory:
                    upper = memory[0][0]
                else:
                    rows = self._store.query(f"SELECT max(seq) AS m FROM {EVENTS_TABLE}")
                    upper = (rows[0]["m"] or 0) + 1
                stored = self._store.query(
                    f"{_SELECT_EVENTS} WHERE seq >= ? AND seq < ? ORDER BY seq", [upper - need, upper]
                )
        events = []
        for row in stored:
            try:
                events.append(_to_event(_decode_row(row)))
            except _DecodeError as exc:
                raise AuditError(
                    f"audit event {row.get('seq')!r} in the store cannot be decoded ({exc}); run verify"
                ) from exc
        events.extend(_to_event(_Record._make(rec)) for rec in memory)
        return events

    def verify(self) -> VerifyReport:
        """Recomputes the whole chain from the store and checks the signed head.

        Journaled events are copied into the store first. Rows are read in chunks of ``VERIFY_CHUNK``.
        Finds, and names by sequence number, the first event that was edited, deleted, inserted or
        reordered; a tail that was cut off or appended to; a forged head; and rows that cannot be decoded.
        Problems are reported, never raised.
        """
        try:
            self.flush()
        except AuditError as exc:
            return VerifyReport(False, 0, None, str(exc), 0, False)
        try:
            with self._copy_lock:  # a consistent head and end of chain; later events are not examined
                stats = self._store.query(
                    f"SELECT count(*) AS n, count(seq) AS n_seq, min(seq) AS lo, max(seq) AS hi FROM {EVENTS_TABLE}"
                )[0]
                head_rows = self._store.query(f"SELECT * FROM {SIGNED_HEAD_TABLE}")
            head, head_signed, head_problem = _pick_head(head_rows, self._signer)
            return _verify_chain(self._store, stats, head, head_signed, head_problem)
        except StoreError as exc:
            return VerifyReport(False, 0, None, f"cannot read the audit store: {exc}", 0, False)

    def close(self) -> None:
        """Writes every pending event, copies the journal into the store and stops the log's threads.

        Raises:
            AuditError: The final copy into the store failed (the events stay in the journal and are copied
                when the log is next opened).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        if self._flusher is not None:
            self._stop_flusher.set()
            self._flush_now.set()
            self._flusher.join()
        if not self._paths:
            return
        try:
            self.flush()
            for fd in self._fds:
                os.ftruncate(fd, 0)
        except OSError as exc:
            raise AuditError(f"cannot truncate the audit journal {self._paths[0]}: {exc}") from exc
        finally:
            self._close_fds()

    def health(self) -> str:
        """Why the log cannot take events now ("" when it can): closed, failed, or its writer thread gone."""
        with self._cond:
            if self._closed:
                return "the audit log is closed"
            if self._failed is not None:
                return f"the audit log failed: {self._failed}"
        if not self._writer.is_alive():
            return "the audit writer thread has stopped"
        return ""

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _enqueue(
        self, entry: _Item | _Batch, waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]] | None, *,
        urgent: bool = True,
    ) -> _Group:
        """Adds one event or one batch (as one entry: its events get consecutive numbers) to the pending group.

        ``urgent``: a caller waits for the group (``append``, ``aappend``…), so the writer commits it at once;
        otherwise the writer lingers for an urgent entry to join (:data:`NOWAIT_LINGER_S`).
        """
        with self._cond:
            if self._closed:
                raise AuditError("the audit log is closed")
            if self._failed is not None:
                raise AuditError(str(self._failed))
            group = self._group
            group.items.append(entry)
            if waiter is not None:
                group.waiters.setdefault(waiter[0], []).append((waiter[1], entry))
            if urgent and not group.urgent:
                group.urgent = True
                self._cond.notify()
            elif len(group.items) == 1:
                self._cond.notify()  # the writer starts its linger
        return group

    def _commit_pending(self) -> None:
        """Has the writer commit the events queued so far now (ending their linger) and waits until it has: what
        was appended before a read is in what the read sees. A failed commit is the appenders' error, not this."""
        with self._cond:
            group = self._group
            if not group.items or self._closed:
                return
            if not group.urgent:
                group.urgent = True
                self._cond.notify()
        if threading.current_thread() is not self._writer:  # a listener reading from the writer thread
            group.done.wait()

    def _next_group(self) -> _Group | None:
        """Waits for the next group to commit (writer thread); None once the log is closed and drained."""
        deadline = 0.0
        with self._cond:
            while not self._closed:
                group = self._group
                if group.urgent:
                    break
                if not group.items:
                    deadline = 0.0
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if not deadline:
                    deadline = now + NOWAIT_LINGER_S
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            group = self._group
            if not group.items:
                return None  # closed and drained
            self._group = _Group()
            return group

    def _write_loop(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            records: list[_Row] = []
            try:
                records = self._commit(group)
            except AuditError as exc:
                group.error = exc
            except (StoreError, OSError) as exc:
                group.error = AuditError(f"audit events could not be recorded: {exc}")
            except BaseException as exc:  # a bug or a failing signer: fail this batch, keep the writer alive
                log.exception("audit writer: batch failed")
                group.error = AuditError(f"audit events could not be recorded: {exc!r}")
            group.done.set()
            for loop, waiters in group.waiters.items():
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                    loop.call_soon_threadsafe(_settle, waiters, group.error)
            if records and self._listeners:
                events = [_to_event(_Record._make(rec)) for rec in records]
                for listener in self._listeners:
                    try:
                        listener(events)
                    except Exception:  # a listener must not stop the writer
                        log.exception("audit listener failed")

    def _commit(self, group: _Group) -> list[_Row]:
        """Assigns seq and hashes, makes the batch durable, then advances the chain (writer thread only); returns
        the batch's records."""
        items: list[_Item | _Batch] = group.items
        marker = self._damage_marker()
        if marker is not None:
            items = [marker, *items]
        ts = max(time.time(), self._last_ts)
        ts_text = float.__repr__(ts)
        seq = self._next_seq
        prev = self._last_hash
        lines: list[str] = []
        journal = bool(self._paths)
        records: list[_Row] = []
        sha256, record = hashlib.sha256, _Record
        for entry in items:
            if isinstance(entry, _Batch):
                entry.first_seq, entry.ts, entry.prev_hash = seq, ts, prev
                hashes = entry.hashes = []
                for pre, mid, kind, agent, run_id, tool, decision, data_json in zip(
                    entry.pres, entry.mids, entry.kinds, entry.agents, entry.run_ids, entry.tools, entry.decisions,
                    entry.data_jsons, strict=True,
                ):  # fmt: skip
                    body = f"{pre}{seq}{mid}{ts_text}}}"
                    digest = sha256((prev + body).encode("utf-8")).hexdigest()
                    records.append((seq, ts, kind, agent, run_id, tool, decision, data_json, prev, digest))
                    hashes.append(digest)
                    if journal:
                        lines.append(f'{{"event":{body},"hash":"{digest}","prev_hash":"{prev}"}}\n')
                    prev = digest
                    seq += 1
                continue
            item = entry
            body = f"{item.pre}{seq}{item.mid}{ts_text}}}"
            digest = sha256((prev + body).encode("utf-8")).hexdigest()
            item.rec = rec = record(
                seq, ts, item.kind, item.agent, item.run_id, item.tool, item.decision, item.data_json, prev, digest
            )
            records.append(rec)
            if journal:
                lines.append(f'{{"event":{body},"hash":"{digest}","prev_hash":"{prev}"}}\n')
            prev = digest
            seq += 1
        if journal:
            payload = "".join(lines).encode("utf-8")
            with self._journal_lock:
                try:
                    fd = self._fds[self._active]
                    self._offsets[self._active] = _write_at(fd, payload, self._offsets[self._active])
                    os.fdatasync(fd)
                except OSError as exc:
                    failed = AuditError(
                        f"writing the audit journal {self._paths[self._active]} failed ({exc}); "
                        "the audit log refuses further events until it is reopened"
                    )
                    with self._cond:
                        self._failed = failed
                    raise failed from exc
                self._unstored.extend(records)
                self._journaled_seq = seq - 1
                backlog = len(self._unstored)
            if backlog >= FLUSH_THRESHOLD:
                self._flush_now.set()
        else:  # each batch is a store batch: commit it, then sign and store its head
            head = self._sign_head(seq - 1, prev, ts)
            with self._copy_lock:
                self._store.append_columns(EVENTS_TABLE, _columns(records))
                self._stored_seq = seq - 1
                try:
                    self._upsert_head(head)
                except StoreError:  # the events are durable; the next batch signs a newer head
                    log.exception("audit: could not store the signed head at seq %d", head.seq)
        self._next_seq, self._last_hash, self._last_ts = seq, prev, ts
        if marker is not None:
            self._damage = None
        return records

    def _damage_marker(self) -> _Item | None:
        if self._damage is None:
            return None
        data = {DAMAGE_KEY: {"first_bad_seq": self._damage.seq, "reason": self._damage.reason}}
        return _Item("audit", "stitchwork", "", "audit.open", "error", data, _ENCODER.encode(data))

    def _sign_head(self, seq: int, hash_: str, ts: float) -> _Head:
        key_id = self._signer.key_id
        signature = self._signer.sign(_head_message(seq, hash_, key_id))
        return _Head(seq, hash_, key_id, signature.hex(), ts)

    def _upsert_head(self, head: _Head) -> None:
        if head.key_id in self._head_rows:  # its row exists: a plain UPDATE costs a third of the upsert on DuckDB
            self._store.execute(_UPDATE_HEAD, [head.seq, head.hash, head.signature, head.ts, head.key_id])
            return
        self._store.execute(_UPSERT_HEAD, [head.key_id, head.seq, head.hash, head.signature, head.ts])
        if self._store.dialect == "duckdb":  # ClickHouse engines keep the newest inserted row: always insert there
            self._head_rows.add(head.key_id)

    # ---------------------------------------------------------------------------------------- store copy
    def _flush_loop(self) -> None:
        while not self._stop_flusher.is_set():
            self._flush_now.wait(self._flush_s)
            self._flush_now.clear()
            if self._stop_flusher.is_set():
                return
            try:
                with self._copy_lock:
                    self._copy_once()
            except Exception as exc:  # the store or the signer failed; the events are safe in the journal
                now = time.monotonic()
                if now - self._last_copy_error > 10.0:
                    self._last_copy_error = now
                    log.error("audit: copying journaled events into the store failed (will retry): %s", exc)

    def _copy_once(self) -> bool:
        """Copies one sealed journal file into the store (caller holds ``_copy_lock``).

        If no file is sealed, seals the active one first: under the journal lock, between two batches, the
        writer is switched to the other (empty) file.

        Returns:
            False if there was nothing to copy.
        """
        if self._sealed is None:
            with self._journal_lock:
                if not self._unstored:
                    return False
                self._sealed = _Sealed(self._unstored, self._active)
                self._unstored = []
                self._active ^= 1
        sealed = self._sealed
        if sealed.head is None:  # the head of this store batch, kept in the journal after the events it covers
            last = _Record._make(sealed.records[-1])
            head = self._sign_head(last.seq, last.hash, time.time())
            file = sealed.file
            self._offsets[file] = _write_at(self._fds[file], _head_line(head), self._offsets[file])
            sealed.head = head
        if not sealed.inserted:
            self._store.append_columns(EVENTS_TABLE, _columns(sealed.records))
            sealed.inserted = True
            self._stored_seq = sealed.records[-1][0]
        if not sealed.head_done:
            self._upsert_head(sealed.head)
            sealed.head_done = True
        # Sized for what this file took in one interval: batches keep overwriting zeros (no file-size change
        # for fdatasync to commit) however busy the log is.
        self._reset_file(sealed.file, prealloc_for(self._offsets[sealed.file]))
        self._sealed = None
        return True

    # ---------------------------------------------------------------------------------------- open
    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _reset_file(self, index: int, size: int = JOURNAL_PREALLOC) -> None:
        """Empties journal file ``index`` and refills it with ``size`` zeros (see
        :func:`~stitchwork.audit.journal._reset_journal_file`)."""
        _reset_journal_file(self._fds[index], size)
        self._offsets[index] = 0

    def _store_end(self) -> tuple[int, str, float]:
        rows = self._store.query(
            f"SELECT seq, hash, ts FROM {EVENTS_TABLE} WHERE seq = (SELECT max(seq) FROM {EVENTS_TABLE}) LIMIT 1"
        )
        if not rows:
            return 0, GENESIS_HASH, 0.0
        row = rows[0]
        ts = row["ts"] if isinstance(row["ts"], float) and math.isfinite(row["ts"]) else 0.0
        return int(row["seq"]), str(row["hash"]), ts

    def _hash_at(self, seq: int) -> str | None:
        rows = self._store.query(f"SELECT hash FROM {EVENTS_TABLE} WHERE seq = ? LIMIT 2", [seq])
        return rows[0]["hash"] if len(rows) == 1 else None

    def _recover(self) -> None:
        """Brings the store up to date with the journal and checks the head; sets the writer's state."""
        store_seq, store_hash, _ = self._store_end()
        if self._paths:
            files = [(path, _read_all(fd)) for path, fd in zip(self._paths, self._fds, strict=True)]
            recovered = _recover_journal(files, self._signer)
            new = [rec for rec in recovered.records if rec.seq > store_seq]
            if new:
                first = new[0]
                if first.seq != store_seq + 1 or first.prev_hash != store_hash:
                    log.warning(
                        "audit: the journal continues at event %d but the store ends at event %d with a "
                        "different hash; the store was changed (verify will say where)", first.seq, store_seq,
                    )  # fmt: skip
                self._store.append_columns(EVENTS_TABLE, _columns(new))
                log.info("audit: recovered %d event(s) from the journal", len(new))
            if recovered.records:
                # The journal attests its events (written by this log, chained to the store): sign them if
                # the store's head is older, e.g. after a crash between the store insert and the head upsert.
                last = recovered.records[-1]
                current, _, _ = _pick_head(self._store.query(f"SELECT * FROM {SIGNED_HEAD_TABLE}"), self._signer)
                if (current is None or current.seq < last.seq) and self._hash_at(last.seq) == last.hash:
                    head = recovered.head
                    if head is None or head.seq != last.seq:
                        head = self._sign_head(last.seq, last.hash, time.time())
                    self._upsert_head(head)
            for index in range(len(self._fds)):
                self._reset_file(index)
        store_seq, store_hash, store_ts = self._store_end()
        heads = self._store.query(f"SELECT * FROM {SIGNED_HEAD_TABLE}")
        head, signed, problem = _pick_head(heads, self._signer)
        if problem is None:
            problem = _check_head(head, signed, store_seq, self._hash_at)
        if problem is not None:
            log.warning("audit: the log is damaged (%s); its next event records this", problem.reason)
        self._damage = problem
        self._next_seq, self._last_hash, self._last_ts = store_seq + 1, store_hash, store_ts
        self._stored_seq = self._journaled_seq = store_seq

