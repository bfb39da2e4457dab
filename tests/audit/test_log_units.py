"""The audit log's own decisions, one at a time, on an in-memory DuckDB store: what an event and a batch become in
the chain (hashes recomputed here from the documented formula), what the journal file holds before and after a copy,
which signed head is stored (and with which statement), how a failed copy is retried without duplicates, what
recovery inserts, signs and records as damage, and the exact message of every refusal. These are the first tests the
mutation run of ``audit/log.py`` executes: each takes milliseconds (no subprocesses, no sleeps)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import stitchwork.audit.log as log_module
from stitchwork.audit.batch import _Batch, _prepare_event
from stitchwork.audit.canonical import GENESIS_HASH, canonical
from stitchwork.audit.journal import JOURNAL_PREALLOC
from stitchwork.audit.log import AuditLog, _Group, _Sealed, _settle
from stitchwork.audit.records import (
    _EVENTS_DDL,
    _HEADS_DDL,
    DAMAGE_KEY,
    EVENTS_TABLE,
    SIGNED_HEAD_TABLE,
    AuditEvent,
    _Record,
)
from stitchwork.data._base import Store, open_store
from stitchwork.errors import AuditError, StoreError
from tests.signing import Ed25519Signer

SIGNER = Ed25519Signer("unit-key")
OTHER = Ed25519Signer("other-key", seed=bytes(range(1, 33)))
FIELDS = ("seq", "ts", "kind", "agent", "run_id", "tool", "decision", "data", "prev_hash", "hash")


def chain_hash(prev: str, event: Mapping[str, Any]) -> str:
    """The documented rule: SHA-256 of the previous hash followed by the canonical JSON of the event's fields."""
    fields = {k: event[k] for k in ("seq", "ts", "kind", "agent", "run_id", "tool", "decision", "data")}
    return hashlib.sha256(prev.encode() + canonical(fields)).hexdigest()


def journal_event(seq: int, prev: str, *, ts: float = 1000.0, tool: str = "t") -> dict[str, Any]:
    event = {"agent": "a", "data": {"i": seq}, "decision": "allow", "kind": "tool", "run_id": "r", "seq": seq,
             "tool": tool, "ts": ts}
    return {"event": event, "hash": chain_hash(prev, event), "prev_hash": prev}


def journal_chain(first: int, last: int, prev: str = GENESIS_HASH, **kw: Any) -> list[dict[str, Any]]:
    lines = []
    for seq in range(first, last + 1):
        lines.append(journal_event(seq, prev, **kw))
        prev = lines[-1]["hash"]
    return lines


def head_line(signer: Ed25519Signer, seq: int, hash_: str) -> dict[str, Any]:
    signature = signer.sign(canonical({"seq": seq, "hash": hash_, "key_id": signer.key_id})).hex()
    return {"head": {"hash": hash_, "key_id": signer.key_id, "seq": seq, "signature": signature, "ts": 7.0}}


def write_journal(path: Path, lines: Sequence[Mapping[str, Any]]) -> None:
    path.write_bytes(b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines))


def store_row(line: Mapping[str, Any]) -> dict[str, Any]:
    """A journal event line as a row of ``audit_events``."""
    event = line["event"]
    return {**event, "data": canonical(event["data"]).decode(), "prev_hash": line["prev_hash"], "hash": line["hash"]}


def with_tables(store: SpyStore) -> Store:
    """The inner store with the audit tables created (as the log would on open)."""
    store.inner.execute(_EVENTS_DDL)
    store.inner.execute(_HEADS_DDL)
    return store.inner


def as_line(event: AuditEvent) -> dict[str, Any]:
    """An event as its journal line."""
    body = {k: getattr(event, k) for k in ("agent", "data", "decision", "kind", "run_id", "seq", "tool", "ts")}
    return {"event": body, "hash": event.hash, "prev_hash": event.prev_hash}


def journal_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a journal file, up to its preallocated zeros."""
    content = path.read_bytes().partition(b"\0")[0]
    return [json.loads(line) for line in content.split(b"\n") if line]


class SpyStore(Store):
    """A memory:// DuckDB store that records what the log asks of it and fails on request (rows of a query without
    ORDER BY come back newest first)."""

    def __init__(self, dialect: str = "duckdb") -> None:
        self.inner = open_store("memory://")
        self.uri = "spy://"
        self.dialect = dialect
        self.statements: list[tuple[str, list[Any]]] = []
        self.inserts: list[int] = []  # how many rows each append_columns call brought
        self.fail_inserts = 0
        self.fail_heads = 0
        self.fail_queries = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        if SIGNED_HEAD_TABLE in sql and sql.lstrip().startswith(("INSERT", "UPDATE")):
            self.statements.append((sql.split()[0], list(params)))
            if self.fail_heads:
                self.fail_heads -= 1
                raise StoreError("heads table locked")
        self.inner.execute(sql, params)

    def append(self, table: str, rows: Sequence[dict[str, Any]]) -> None:  # pragma: no cover - the log uses columns
        self.inner.append(table, rows)

    def append_columns(self, table: str, columns: Mapping[str, Sequence[Any]]) -> None:
        if self.fail_inserts:
            self.fail_inserts -= 1
            raise StoreError("disk full")
        self.inserts.append(len(columns["seq"]))
        self.inner.append_columns(table, columns)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if self.fail_queries:
            self.fail_queries -= 1
            raise StoreError("store unreadable")
        rows = self.inner.query(sql, params)
        return rows if "ORDER BY" in sql else rows[::-1]  # SQL promises no order unless asked: not the insertion order

    def events(self) -> list[dict[str, Any]]:
        return self.inner.query(f"SELECT * FROM {EVENTS_TABLE} ORDER BY seq")

    def heads(self) -> list[dict[str, Any]]:
        return self.inner.query(f"SELECT * FROM {SIGNED_HEAD_TABLE} ORDER BY key_id")


@pytest.fixture
def store() -> Iterator[SpyStore]:
    spy = SpyStore()
    yield spy
    spy.inner.close()


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    return tmp_path / "j" / "audit.journal"


@pytest.fixture
def opened() -> Iterator[list[AuditLog]]:
    logs: list[AuditLog] = []
    yield logs
    for log in logs:
        with_closed_fds = not log._fds
        if not with_closed_fds:
            try:
                log.close()
            except AuditError:
                log._close_fds()


def open_log(store: Store, jpath: Path | None, opened: list[AuditLog], *, signer: Ed25519Signer = SIGNER,
             flush_ms: float = 1e9) -> AuditLog:
    log = AuditLog(store, signer=signer, journal_path=jpath, flush_ms=flush_ms)
    opened.append(log)
    return log


def crash(log: AuditLog) -> None:
    """Stops the log's threads and closes its journal without copying anything: what a killed process leaves."""
    with log._cond:
        log._closed = True
        log._cond.notify_all()
    log._writer.join()
    if log._flusher is not None:
        log._stop_flusher.set()
        log._flush_now.set()
        log._flusher.join()
    log._close_fds()


def hold_inserts(store: SpyStore) -> tuple[threading.Event, threading.Event]:
    """Makes the store's inserts wait until ``gate`` (second) is set; ``entered`` (first) is set when one waits."""
    entered, gate = threading.Event(), threading.Event()
    real = store.append_columns

    def held(table: str, columns: Mapping[str, Sequence[Any]]) -> None:
        entered.set()
        gate.wait()
        real(table, columns)

    store.append_columns = held  # type: ignore[method-assign]
    return entered, gate


def as_dict(event: AuditEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in FIELDS}


def stored(store: SpyStore) -> list[dict[str, Any]]:
    return [{**row, "data": json.loads(row["data"])} for row in store.events()]


# ------------------------------------------------------------------------------------------------ settle, groups
def test_settle_completes_each_pending_future_and_skips_the_cancelled_ones() -> None:
    loop = asyncio.new_event_loop()
    try:
        item = _prepare_event("tool", "a", "r", "t", "ok", {"x": 1})
        item.rec = _Record(4, 2.5, "tool", "a", "r", "t", "ok", '{"x":1}', "p" * 64, "h" * 64)
        cancelled, first, second = loop.create_future(), loop.create_future(), loop.create_future()
        cancelled.cancel()
        _settle([(cancelled, item), (first, item), (second, _Batch())], None)
        assert first.result() == AuditEvent(4, 2.5, "tool", "a", "r", "t", "ok", {"x": 1}, "p" * 64, "h" * 64)
        assert len(second.result()) == 0 and second.result().first_seq == 0
        failed, after = loop.create_future(), loop.create_future()
        done = loop.create_future()
        done.set_result("earlier")
        _settle([(done, item), (failed, item), (after, item)], AuditError("journal gone"))
        assert done.result() == "earlier"
        for future in (failed, after):
            error = future.exception()
            assert type(error) is AuditError and str(error) == "journal gone"
    finally:
        loop.close()


def test_a_new_group_is_empty_and_not_urgent_and_a_sealed_file_starts_uncopied() -> None:
    group = _Group()
    assert (group.items, group.error, group.waiters, group.urgent, group.done.is_set()) == ([], None, {}, False, False)
    sealed = _Sealed([], 1)
    assert (sealed.records, sealed.file, sealed.head, sealed.inserted, sealed.head_done) == ([], 1, None, False, False)


# ------------------------------------------------------------------------------------------------ constructor
@pytest.mark.parametrize("flush_ms", [0, -1.0, float("nan")])
def test_a_flush_interval_that_is_not_positive_is_refused(store: SpyStore, flush_ms: float) -> None:
    with pytest.raises(AuditError) as caught:
        AuditLog(store, signer=SIGNER, journal_path=None, flush_ms=flush_ms)
    assert str(caught.value) == f"flush_ms must be positive, got {flush_ms!r}"


def test_the_flush_interval_is_in_milliseconds_and_capped(store: SpyStore, opened: list[AuditLog]) -> None:
    assert open_log(store, None, opened, flush_ms=250)._flush_s == 0.25
    assert open_log(SpyStore(), None, opened, flush_ms=0.5)._flush_s == 0.0005
    assert open_log(SpyStore(), None, opened, flush_ms=1e300)._flush_s == threading.TIMEOUT_MAX
    assert AuditLog.__init__.__kwdefaults__["flush_ms"] == 250.0


def test_the_journal_is_two_files_and_both_start_as_preallocated_zeros(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    log = open_log(store, jpath, opened)
    second = jpath.with_name("audit.journal.1")
    assert log._paths == [jpath, second]
    for path in (jpath, second):
        assert path.read_bytes() == bytes(JOURNAL_PREALLOC)
    assert log.health() == "" and log.lag() == 0
    assert {r["name"] for r in store.inner.query("SELECT table_name AS name FROM information_schema.tables")} >= {
        EVENTS_TABLE, SIGNED_HEAD_TABLE}


def test_a_journal_path_given_as_text_works(store: SpyStore, tmp_path: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, str(tmp_path / "text.journal"), opened)  # type: ignore[arg-type]
    log.append("tool")
    assert (tmp_path / "text.journal.1").exists()
    assert journal_lines(tmp_path / "text.journal")[0]["event"]["seq"] == 1


def test_a_failed_recovery_closes_the_journal_files(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    jpath.parent.mkdir()
    jpath.write_text("not json\n{}\n")
    with pytest.raises(AuditError, match="line 1: not valid JSON"):
        open_log(store, jpath, opened)
    jpath.write_bytes(b"")  # the lock on the journal is gone with the failed log
    assert open_log(SpyStore(), jpath, opened).health() == ""


# ------------------------------------------------------------------------------------------------ append & chain
@pytest.mark.parametrize("with_journal", [True, False])
def test_events_are_chained_by_the_documented_hash(
    store: SpyStore, jpath: Path, opened: list[AuditLog], with_journal: bool
) -> None:
    log = open_log(store, jpath if with_journal else None, opened)
    first = log.append("auth", agent="ag", run_id="run", tool="login", decision="allow", data={"b": [1, 2]})
    second = log.append("tool", data=None)
    assert (first.seq, first.kind, first.agent, first.run_id, first.tool, first.decision, first.data) == (
        1, "auth", "ag", "run", "login", "allow", {"b": [1, 2]})
    assert (second.seq, second.agent, second.run_id, second.tool, second.decision, second.data) == (
        2, "", "", "", "", {})
    assert first.prev_hash == GENESIS_HASH and first.hash == chain_hash(GENESIS_HASH, as_dict(first))
    assert second.prev_hash == first.hash and second.hash == chain_hash(first.hash, as_dict(second))
    assert second.ts >= first.ts > 0
    log.flush()
    assert stored(store) == [as_dict(first), as_dict(second)]
    assert [(h["key_id"], h["seq"], h["hash"]) for h in store.heads()] == [("unit-key", 2, second.hash)]


def test_time_never_goes_backwards_in_the_chain(
    store: SpyStore, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, None, opened)
    clock = iter([5000.5, 4000.25, 6000.0])
    real = time.time
    monkeypatch.setattr(time, "time",
                        lambda: next(clock) if threading.current_thread() is log._writer else real())
    a, b, c = log.append("tool"), log.append("tool"), log.append("tool")
    assert (a.ts, b.ts, c.ts) == (5000.5, 5000.5, 6000.0)
    assert b.hash == chain_hash(a.hash, as_dict(b))


def test_a_batch_is_contiguous_and_chained_after_single_events(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    log = open_log(store, jpath, opened)
    one = log.append("tool", data={"n": 0})
    batch = log.append_many([{"kind": "tool", "data": {"n": 1}}, {"kind": "model", "agent": "b", "data": {"n": 2}}])
    assert (batch.first_seq, batch.last_seq, len(batch)) == (2, 3, 2)
    events = list(batch)
    assert [e.kind for e in events] == ["tool", "model"] and events[1].agent == "b"
    assert events[0].prev_hash == one.hash and events[1].prev_hash == events[0].hash
    for prev, event in ((one.hash, events[0]), (events[0].hash, events[1])):
        assert event.hash == chain_hash(prev, as_dict(event))
    assert batch.last_hash == events[1].hash and events[0].ts == events[1].ts
    last = log.append("tool")
    assert (last.seq, last.prev_hash) == (4, events[1].hash)
    lines = journal_lines(jpath)
    assert [line["event"]["seq"] for line in lines] == [1, 2, 3, 4]
    for line, event in zip(lines, [one, *events, last], strict=True):
        assert line == {"event": {k: v for k, v in as_dict(event).items() if k not in ("hash", "prev_hash")},
                        "hash": event.hash, "prev_hash": event.prev_hash}
    log.flush()
    assert [r["seq"] for r in stored(store)] == [1, 2, 3, 4]
    assert stored(store)[2] == as_dict(events[1])


def test_a_batch_without_a_journal_goes_to_the_store_with_its_head(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    batch = log.append_many([{"kind": "tool", "data": {"n": i}} for i in range(3)])
    assert [r["seq"] for r in stored(store)] == [1, 2, 3] and store.inserts == [3]
    assert [(h["seq"], h["hash"]) for h in store.heads()] == [(3, batch.last_hash)]
    assert log.lag() == 0


@pytest.mark.parametrize("with_journal", [True, False])
def test_an_empty_batch_is_not_committed(
    store: SpyStore, jpath: Path, opened: list[AuditLog], with_journal: bool
) -> None:
    log = open_log(store, jpath if with_journal else None, opened)
    seen: list[list[AuditEvent]] = []
    log.listen(seen.append)
    assert len(log.append_many([])) == 0 and len(asyncio.run(log.aappend_many([]))) == 0
    assert store.statements == [] and store.inserts == [] and store.heads() == []  # no head for "seq 0"
    assert log.append("tool").seq == 1 and seen[0][0].seq == 1


def test_an_empty_batch_records_nothing(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    empty = log.append_many([])
    assert (len(empty), empty.first_seq, empty.last_seq, empty.last_hash) == (0, 0, 0, "")
    assert asyncio.run(log.aappend_many(iter([]))).last_seq == 0
    assert journal_lines(jpath) == [] and log.append("tool").seq == 1


def test_async_appends_return_the_recorded_events(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)

    async def go() -> tuple[AuditEvent, Any, AuditEvent]:
        one = await log.aappend("tool", agent="x", run_id="r1", tool="t1", decision="ok", data={"k": "v"})
        many = await log.aappend_many([{"kind": "model"}, {"kind": "tool"}])
        two = await log.aappend("run")
        return one, many, two

    one, many, two = asyncio.run(go())
    assert (two.agent, two.run_id, two.tool, two.decision, two.data) == ("", "", "", "", {})
    assert (one.seq, one.agent, one.run_id, one.tool, one.decision, one.data) == (1, "x", "r1", "t1", "ok", {"k": "v"})
    assert (many.first_seq, many.last_seq, [e.kind for e in many]) == (2, 3, ["model", "tool"])
    assert (two.seq, two.prev_hash) == (4, many.last_hash)


def test_a_queued_event_is_seen_by_every_read(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    log.append_nowait("decision", agent="a", run_id="r", tool="t", decision="allow", data={"q": 1})
    assert [(e.seq, e.kind, e.agent, e.run_id, e.tool, e.decision, e.data) for e in log.tail(5)] == [
        (1, "decision", "a", "r", "t", "allow", {"q": 1})]
    log.append_nowait("decision")
    [bare] = log.for_run("")
    assert (bare.seq, bare.agent, bare.run_id, bare.tool, bare.decision, bare.data) == (2, "", "", "", "", {})
    log.append_nowait("decision")
    assert [e.seq for e in log.after(0)] == [1, 2, 3]


def test_a_lone_queued_event_becomes_durable_by_itself(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    durable = threading.Event()
    log.listen(lambda events: durable.set())
    log.append_nowait("tool")  # nobody waits and nothing follows: the writer's linger ends on its own
    assert durable.wait(60)
    assert [r["seq"] for r in stored(store)] == [1]


def test_close_commits_queued_events(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    log.append_nowait("tool")
    log.append_nowait("tool")
    log.close()
    assert [r["seq"] for r in stored(store)] == [1, 2]


# ------------------------------------------------------------------------------------------------ failures
def test_a_failed_store_commit_fails_that_batch_only(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    first = log.append("tool")
    store.fail_inserts = 1
    with pytest.raises(AuditError) as caught:
        log.append("tool")
    assert str(caught.value) == "audit events could not be recorded: disk full"
    assert isinstance(caught.value.__cause__, AuditError)
    store.fail_inserts = 1
    with pytest.raises(AuditError, match=r"^audit events could not be recorded: disk full$"):
        log.append_many([{"kind": "tool"}])
    again = log.append("tool")
    assert (again.seq, again.prev_hash) == (2, first.hash) and log.health() == ""


def test_a_failing_signer_fails_the_batch_and_the_writer_carries_on(
    store: SpyStore, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Ed25519Signer):
        fail = True

        def sign(self, data: bytes) -> bytes:
            if self.fail:
                raise ValueError("no key")
            return super().sign(data)

    signer = Broken("unit-key")
    log = open_log(store, None, opened, signer=signer)
    with caplog.at_level(logging.ERROR, logger="stitchwork.audit.log"), pytest.raises(AuditError) as caught:
        log.append("tool")
    assert str(caught.value) == "audit events could not be recorded: ValueError('no key')"
    assert [r.getMessage() for r in caplog.records] == ["audit writer: batch failed"]
    signer.fail = False
    assert log.append("tool").seq == 1 and log.health() == ""


def test_an_audit_error_from_the_commit_is_passed_on_unchanged(
    store: SpyStore, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, None, opened)

    def refuse(*_: Any) -> None:
        raise AuditError("exactly this")

    monkeypatch.setattr(store, "append_columns", refuse)
    with pytest.raises(AuditError, match=r"^exactly this$"):
        log.append("tool")


def test_a_failed_journal_write_stops_the_log(
    store: SpyStore, jpath: Path, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")

    def failing_sync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", failing_sync)
    message = (f"writing the audit journal {jpath} failed ([Errno 28] No space left on device); "
               "the audit log refuses further events until it is reopened")
    with pytest.raises(AuditError) as caught:
        log.append("tool")
    assert str(caught.value) == message
    monkeypatch.undo()
    assert log.health() == f"the audit log failed: {message}"
    for attempt in (lambda: log.append("tool"), lambda: log.append_nowait("tool"),
                    lambda: log.append_many([{"kind": "tool"}])):
        with pytest.raises(AuditError) as refused:
            attempt()
        assert str(refused.value) == message
    assert log.lag() == 1
    log.close()
    assert [r["seq"] for r in stored(store)] == [1]


async def test_an_awaited_append_gets_the_error_of_its_batch(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    store.fail_inserts = 1
    with pytest.raises(AuditError, match=r"^audit events could not be recorded: disk full$"):
        await log.aappend("tool")
    store.fail_inserts = 1
    with pytest.raises(AuditError, match=r"^audit events could not be recorded: disk full$"):
        await log.aappend_many([{"kind": "tool"}])
    assert (await log.aappend("tool")).seq == 1


def test_a_writer_on_a_closed_event_loop_carries_on(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    _, gate = hold_inserts(store)
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    log._enqueue(_prepare_event("tool", "", "", "", "", None), (loop, future))
    loop.close()
    gate.set()
    assert log.append("tool").seq == 2 and log.health() == ""


# ------------------------------------------------------------------------------------------------ listeners
def test_listeners_get_each_durable_batch_in_order_and_a_failing_one_is_ignored(
    store: SpyStore, jpath: Path, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(store, jpath, opened)
    seen: list[list[int]] = []

    def broken(events: list[AuditEvent]) -> None:
        raise RuntimeError("listener bug")

    log.listen(broken)
    log.listen(lambda events: seen.append([e.seq for e in events]))
    with caplog.at_level(logging.ERROR, logger="stitchwork.audit.log"):
        one = log.append("tool", data={"x": 1})
        log.append_many([{"kind": "tool"}, {"kind": "model"}])
        log.append("tool")  # returns after the listeners of the batches before it ran (one writer thread)
    assert seen[:2] == [[1], [2, 3]]
    assert [r.getMessage() for r in caplog.records][:2] == ["audit listener failed"] * 2
    got: list[AuditEvent] = []
    log.listen(got.extend)
    two = log.append("tool", data={"y": 2})
    log.append("tool")
    assert [e for e in got if e.seq == two.seq] == [two] and one.seq == 1


def test_a_failed_batch_is_not_announced(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    seen: list[list[int]] = []
    log.listen(lambda events: seen.append([e.seq for e in events]))
    store.fail_inserts = 1
    with pytest.raises(AuditError):
        log.append("tool")
    log.append("tool")
    log.append("tool")
    assert seen[0] == [1]


# ------------------------------------------------------------------------------------------------ reads
def test_after_and_for_run_read_from_the_store_in_order(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    for i in range(6):
        log.append("tool" if i % 2 else "model", run_id="r1" if i < 4 else "r2", data={"i": i})
    assert [e.seq for e in log.after(2)] == [3, 4, 5, 6]
    assert [e.seq for e in log.after(2, limit=2)] == [3, 4]
    assert [e.seq for e in log.after(6)] == []
    assert [e.seq for e in log.for_run("r1")] == [1, 2, 3, 4]
    assert [e.seq for e in log.for_run("r1", kinds=["tool"])] == [2, 4]
    assert [e.seq for e in log.for_run("r1", kinds=("tool", "model"))] == [1, 2, 3, 4]
    assert [e.data for e in log.for_run("r2", kinds=["model"])] == [{"i": 4}]
    assert log.for_run("nobody") == []


def test_reads_name_a_stored_event_that_cannot_be_decoded(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    log.append("tool", run_id="r")
    log.append("tool", run_id="r")
    store.inner.execute(f"UPDATE {EVENTS_TABLE} SET data = 'oops' WHERE seq = 2")
    with pytest.raises(AuditError, match=r"^an audit event after 1 cannot be decoded \(data is not valid JSON: .*\); "
                                         r"run verify$"):
        log.after(1)
    with pytest.raises(AuditError, match=r"^an audit event of run r cannot be decoded \(data is not valid JSON.*"
                                         r"\); run verify$"):
        log.for_run("r")
    with pytest.raises(AuditError, match=r"^audit event 2 in the store cannot be decoded \(data is not valid JSON.*"
                                         r"\); run verify$"):
        log.tail(1)
    assert [e.seq for e in log.after(0, limit=1)] == [1]


def test_tail_joins_stored_and_journaled_events(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    assert log.tail(3) == [] and log.tail(0) == [] and log.tail(-1) == []
    for i in range(1, 5):
        log.append("tool", data={"i": i})
    log.flush()  # 1..4 in the store
    for i in range(5, 8):
        log.append("tool", data={"i": i})  # 5..7 in the journal only
    assert [e.seq for e in log.tail(2)] == [6, 7]
    assert [e.seq for e in log.tail(3)] == [5, 6, 7]
    assert [e.seq for e in log.tail(5)] == [3, 4, 5, 6, 7]
    assert [e.seq for e in log.tail(4)] == [4, 5, 6, 7]  # one event from the store
    assert [e.seq for e in log.tail(100)] == list(range(1, 8))
    assert log.tail(1)[0].data == {"i": 7} and log.tail(7)[0].data == {"i": 1}
    assert log.tail(0) == []
    log.flush()
    assert [e.seq for e in log.tail(2)] == [6, 7] and [e.seq for e in log.tail(9)] == list(range(1, 8))


def test_tail_includes_a_sealed_file_the_store_refused(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    for _ in range(3):
        log.append("tool")
    store.fail_inserts = 1
    with pytest.raises(AuditError):
        log.flush()  # 1..3 sealed but not inserted
    log.append("tool")
    assert [e.seq for e in log.tail(10)] == [1, 2, 3, 4]
    assert [e.seq for e in log.tail(2)] == [3, 4]
    store.fail_heads = 1
    with pytest.raises(AuditError):
        log.flush()  # inserted, head not stored: the sealed file's events are read from the store now
    assert [e.seq for e in log.tail(10)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ store copy
def test_a_copy_seals_the_active_file_and_the_writer_moves_on(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    log = open_log(store, jpath, opened)
    second = jpath.with_name("audit.journal.1")
    a, b = log.append("tool"), log.append("tool")
    assert log.lag() == 2
    store.fail_inserts = 1
    with pytest.raises(AuditError) as caught:
        log.flush()
    assert str(caught.value) == (f"cannot copy audit events into the store: disk full; they are safe in the journal "
                                 f"{jpath}")
    lines = journal_lines(jpath)  # the sealed file: its events, then their signed head
    assert [line.get("event", {}).get("seq") for line in lines] == [1, 2, None]
    head = lines[2]["head"]
    assert (head["seq"], head["hash"], head["key_id"]) == (2, b.hash, "unit-key")
    assert SIGNER.verify(canonical({"seq": 2, "hash": b.hash, "key_id": "unit-key"}), bytes.fromhex(head["signature"]))
    c = log.append("tool")
    assert [line["event"]["seq"] for line in journal_lines(second)] == [3]
    assert log.lag() == 3 and store.events() == []
    log.flush()
    assert [r["seq"] for r in stored(store)] == [1, 2, 3] and store.inserts == [2, 1]
    assert [(h["seq"], h["hash"]) for h in store.heads()] == [(3, c.hash)]
    assert log.lag() == 0 and a.seq == 1
    for path in (jpath, second):  # both emptied: zeros again
        assert path.read_bytes() == bytes(JOURNAL_PREALLOC)
    d = log.append("tool")  # the writer is in the first file again, at its start
    assert [line["event"]["seq"] for line in journal_lines(jpath)] == [d.seq]


def test_a_head_that_could_not_be_stored_is_retried_without_inserting_twice(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")
    last = log.append("tool")
    store.fail_heads = 1
    with pytest.raises(AuditError, match="heads table locked"):
        log.flush()
    assert [r["seq"] for r in stored(store)] == [1, 2] and store.heads() == []
    signed = journal_lines(jpath)[-1]["head"]
    log.flush()
    assert [r["seq"] for r in stored(store)] == [1, 2] and store.inserts == [2]
    assert [(h["seq"], h["hash"], h["signature"]) for h in store.heads()] == [(2, last.hash, signed["signature"])]
    assert log.lag() == 0
    log.flush()
    assert store.inserts == [2]


def test_the_head_row_is_inserted_once_then_updated(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    for _ in range(3):
        log.append("tool")
        log.flush()
    assert [kind for kind, _ in store.statements] == ["INSERT", "UPDATE", "UPDATE"]
    assert store.statements[0][1][:2] == ["unit-key", 1]
    assert store.statements[2][1][0] == 3 and store.statements[2][1][-1] == "unit-key"
    assert [h["seq"] for h in store.heads()] == [3]


def test_clickhouse_heads_are_always_inserted(jpath: Path, opened: list[AuditLog]) -> None:
    store = SpyStore(dialect="clickhouse")
    log = open_log(store, None, opened)
    log.append("tool")
    log.append("tool")
    assert [kind for kind, _ in store.statements] == ["INSERT", "INSERT"]


def test_without_a_journal_a_head_the_store_refused_is_logged_and_the_events_stay(
    store: SpyStore, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(store, None, opened)
    store.fail_heads = 1
    with caplog.at_level(logging.ERROR, logger="stitchwork.audit.log"):
        event = log.append("tool")
    assert event.seq == 1 and [r["seq"] for r in stored(store)] == [1] and store.heads() == []
    assert [r.getMessage() for r in caplog.records] == ["audit: could not store the signed head at seq 1"]
    log.append("tool")
    assert [h["seq"] for h in store.heads()] == [2]
    assert log.verify().ok


def test_flush_with_nothing_to_copy_touches_nothing(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    log.flush()
    assert store.inserts == [] and store.statements == [] and log._active == 0
    log_nj = open_log(SpyStore(), None, opened)
    log_nj.flush()
    assert log_nj.lag() == 0


def test_a_full_backlog_wakes_the_copy(
    store: SpyStore, jpath: Path, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, jpath, opened)

    class Recorder(threading.Event):
        calls = 0

        def set(self) -> None:
            Recorder.calls += 1

    original, log._flush_now = log._flush_now, Recorder()  # the flusher sleeps on the original (flush_ms=1e9)
    monkeypatch.setattr(log_module, "FLUSH_THRESHOLD", 3)
    try:
        log.append_many([{"kind": "tool"}, {"kind": "tool"}])
        assert Recorder.calls == 0
        log.append("tool")
        assert Recorder.calls == 1
        log.append("tool")
        assert Recorder.calls == 2
        assert log.lag() == 4 and store.events() == []
    finally:
        log._flush_now = original  # close wakes the flusher through it


def test_the_default_thresholds() -> None:
    assert log_module.FLUSH_THRESHOLD == 5000 and log_module.NOWAIT_LINGER_S == 0.01


def test_the_flusher_copies_on_its_own_and_logs_a_failure_once(
    store: SpyStore, jpath: Path, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(store, jpath, opened)
    copied = threading.Event()
    real = store.append_columns
    failures = [StoreError("first"), StoreError("second")]

    def insert(table: str, columns: Mapping[str, Sequence[Any]]) -> None:
        if failures:
            raise failures.pop(0)
        real(table, columns)
        copied.set()

    store.append_columns = insert  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="stitchwork.audit.log"):
        log.append("tool")
        for _ in range(3):
            log._flush_now.set()  # what the timer or a full backlog does; the flusher clears it as it wakes
            while log._flush_now.is_set() and not copied.is_set():
                copied.wait(0.001)
        assert copied.wait(60)
    assert not log._flush_now.is_set()  # cleared as the flusher woke: it sleeps again until the next reason
    assert [r.getMessage() for r in caplog.records] == [
        "audit: copying journaled events into the store failed (will retry): first"]
    assert [r["seq"] for r in stored(store)] == [1]


# ------------------------------------------------------------------------------------------------ verify, close
def test_verify_reports_a_failed_copy_and_an_unreadable_store(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")
    store.fail_inserts = 1
    report = log.verify()
    assert (report.ok, report.events, report.first_bad_seq, report.head_seq, report.head_signed) == (
        False, 0, None, 0, False)
    assert report.reason == (f"cannot copy audit events into the store: disk full; they are safe in the journal "
                             f"{jpath}")
    store.fail_queries = 1
    report = log.verify()
    assert (report.ok, report.events, report.first_bad_seq, report.head_seq, report.head_signed) == (
        False, 0, None, 0, False)
    assert report.reason == "cannot read the audit store: store unreadable"
    report = log.verify()
    assert (report.ok, report.events, report.head_seq, report.head_signed) == (True, 1, 1, True)


def test_verify_checks_the_head_of_this_signer(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    log.append("tool")
    event = log.append("tool")
    other = head_line(OTHER, 1, "f" * 64)["head"]
    store.inner.execute(f"INSERT INTO {SIGNED_HEAD_TABLE} VALUES (?, ?, ?, ?, ?)",
                        [other["key_id"], 1, other["hash"], other["signature"], 1.0])
    report = log.verify()
    assert (report.ok, report.events, report.head_seq, report.head_signed) == (True, 2, 2, True)
    store.inner.execute(f"UPDATE {EVENTS_TABLE} SET tool = 'x' WHERE seq = 2")
    report = log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 2) and event.seq == 2


def test_close_copies_everything_empties_the_journal_and_refuses_more(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")
    log.append_nowait("tool")
    log.close()
    assert [r["seq"] for r in stored(store)] == [1, 2] and [h["seq"] for h in store.heads()] == [2]
    assert jpath.read_bytes() == b"" and jpath.with_name("audit.journal.1").read_bytes() == b""
    assert log.health() == "the audit log is closed" and log._fds == []
    assert log._flusher is not None and not log._flusher.is_alive() and not log._writer.is_alive()
    for attempt in (lambda: log.append("tool"), lambda: log.append_nowait("tool"),
                    lambda: log.append_many([{"kind": "tool"}]), lambda: asyncio.run(log.aappend("tool"))):
        with pytest.raises(AuditError, match=r"^the audit log is closed$"):
            attempt()
    log.close()  # twice is fine
    assert log.tail(5)[-1].seq == 2 and log.lag() == 0
    log.flush()
    again = open_log(store, jpath, opened)  # the lock was released
    assert again.append("tool").seq == 3


def test_close_without_a_journal(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    log.append_nowait("tool")
    with log:
        pass
    assert [r["seq"] for r in stored(store)] == [1] and log.health() == "the audit log is closed"


def test_aclose_and_a_context_manager_close_the_log(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    with open_log(store, jpath, opened) as log:
        log.append("tool")
    assert log.health() == "the audit log is closed" and [r["seq"] for r in stored(store)] == [1]
    second = open_log(store, jpath, opened)
    second.append("tool")
    asyncio.run(second.aclose())
    assert second.health() == "the audit log is closed" and [r["seq"] for r in stored(store)] == [1, 2]


def test_a_close_whose_copy_fails_keeps_the_events_for_the_next_open(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    log = open_log(store, jpath, opened)
    event = log.append("tool")
    store.fail_inserts = 1
    with pytest.raises(AuditError, match=r"^cannot copy audit events into the store: disk full"):
        log.close()
    assert log._fds == [] and store.events() == []
    log.close()  # once closed, a second close does nothing (the journal is left for the next open)
    assert store.events() == [] and store.inserts == []
    again = open_log(store, jpath, opened)
    assert [r["seq"] for r in stored(store)] == [1] and again.tail(1)[0].hash == event.hash


def test_a_close_that_cannot_truncate_the_journal_says_so(
    store: SpyStore, jpath: Path, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")
    log.flush()

    def refuse(fd: int, size: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "ftruncate", refuse)
    with pytest.raises(AuditError) as caught:
        log.close()
    assert str(caught.value) == f"cannot truncate the audit journal {jpath}: [Errno 5] I/O error"
    assert log._fds == []
    assert [r["seq"] for r in stored(store)] == [1]


def test_health_names_a_stopped_writer(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    assert log.health() == ""
    with log._cond:
        log._closed = True
        log._cond.notify_all()
    log._writer.join()
    log._closed = False
    assert log.health() == "the audit writer thread has stopped"
    log._closed = True


def test_a_read_from_a_listener_does_not_wait_for_itself(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    seen: list[list[int]] = []

    def reader(events: list[AuditEvent]) -> None:
        if not seen:
            log.append_nowait("queued")  # pending when the listener reads: the writer must not wait for itself
            seen.append([e.seq for e in log.tail(5)])

    log.listen(reader)
    log.append("tool")
    assert log.append("tool").seq == 3
    assert seen == [[1]] and [e.kind for e in log.tail(3)] == ["tool", "queued", "tool"]


# ------------------------------------------------------------------------------------------------ recovery
def test_recovery_inserts_the_journal_and_signs_its_end(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    lines = journal_chain(1, 3)
    jpath.parent.mkdir()
    write_journal(jpath, lines)
    log = open_log(store, jpath, opened)
    assert [r["seq"] for r in stored(store)] == [1, 2, 3] and store.inserts == [3]
    assert stored(store)[2]["hash"] == lines[2]["hash"]
    [head] = store.heads()
    assert (head["key_id"], head["seq"], head["hash"]) == ("unit-key", 3, lines[2]["hash"])
    assert SIGNER.verify(canonical({"seq": 3, "hash": lines[2]["hash"], "key_id": "unit-key"}),
                         bytes.fromhex(head["signature"]))
    assert jpath.read_bytes() == bytes(JOURNAL_PREALLOC)
    event = log.append("tool")
    assert (event.seq, event.prev_hash) == (4, lines[2]["hash"]) and event.ts >= 1000.0
    assert log.lag() == 1 and log.verify().ok


def test_recovery_skips_what_the_store_has_and_continues_across_both_files(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    lines = journal_chain(1, 5)
    jpath.parent.mkdir()
    write_journal(jpath.with_name("audit.journal.1"), [*lines[:3], head_line(SIGNER, 3, lines[2]["hash"])])
    write_journal(jpath, lines[3:])
    with_tables(store).append(EVENTS_TABLE, [store_row(line) for line in lines[:2]])  # the store holds events 1-2
    log = open_log(store, jpath, opened)
    assert [r["seq"] for r in stored(store)] == [1, 2, 3, 4, 5] and store.inserts == [3]
    assert [(h["seq"], h["hash"]) for h in store.heads()] == [(5, lines[4]["hash"])]
    assert log.append("tool").prev_hash == lines[4]["hash"]
    assert log.verify().ok


def test_recovery_uses_the_signed_head_line_of_the_journal(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    lines = journal_chain(1, 2)
    journal_head = head_line(SIGNER, 2, lines[1]["hash"])
    jpath.parent.mkdir()
    write_journal(jpath, [*lines, journal_head])
    open_log(store, jpath, opened)
    [head] = store.heads()
    assert (head["seq"], head["signature"], head["ts"]) == (2, journal_head["head"]["signature"], 7.0)


def test_recovery_signs_afresh_when_the_journal_head_is_older(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    lines = journal_chain(1, 3)
    old_head = head_line(SIGNER, 2, lines[1]["hash"])
    jpath.parent.mkdir()
    write_journal(jpath.with_name("audit.journal.1"), [*lines[:2], old_head])
    write_journal(jpath, lines[2:])
    open_log(store, jpath, opened)
    [head] = store.heads()
    assert (head["seq"], head["hash"]) == (3, lines[2]["hash"]) and head["signature"] != old_head["head"]["signature"]
    assert head["ts"] != 7.0


@pytest.mark.parametrize("journaled", [2, 3])
def test_recovery_keeps_a_stored_head_as_new_as_the_journal(
    store: SpyStore, jpath: Path, opened: list[AuditLog], journaled: int
) -> None:
    log = open_log(store, None, opened)
    events = [log.append("tool") for _ in range(3)]
    log.close()
    statements = len(store.statements)
    jpath.parent.mkdir()
    write_journal(jpath, [as_line(event) for event in events[:journaled]])  # events the store has already
    again = open_log(store, jpath, opened)
    assert len(store.statements) == statements  # no head written
    assert [(h["seq"], h["hash"]) for h in store.heads()] == [(3, events[2].hash)]
    assert store.inserts == [1, 1, 1]
    assert again.append("tool").prev_hash == events[2].hash


def test_recovery_signs_nothing_the_store_does_not_hold_as_journaled(
    store: SpyStore, jpath: Path, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(store, None, opened)
    log.append("tool")
    log.append("tool")
    log.close()
    store.inner.execute(f"DELETE FROM {SIGNED_HEAD_TABLE}")
    lines = journal_chain(1, 2)  # a different chain for the same seqs: the store's event 2 is not the journal's
    jpath.parent.mkdir()
    write_journal(jpath, lines)
    store.statements.clear()
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.log"):
        open_log(store, jpath, opened)
    assert store.heads() == [] and store.statements == [] and store.inserts == [1, 1]
    assert [r.getMessage().startswith("audit: the log is damaged") for r in caplog.records] == [True]


def test_recovery_warns_when_the_journal_does_not_continue_the_store(
    store: SpyStore, jpath: Path, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(store, None, opened)
    log.append("tool")
    log.close()
    lines = journal_chain(1, 3)  # its event 2 follows another event 1
    jpath.parent.mkdir()
    write_journal(jpath, lines[1:])
    with caplog.at_level(logging.INFO, logger="stitchwork.audit.log"):
        open_log(store, jpath, opened)
    messages = [r.getMessage() for r in caplog.records]
    assert ("audit: the journal continues at event 2 but the store ends at event 1 with a different hash; the store "
            "was changed (verify will say where)") in messages
    assert "audit: recovered 2 event(s) from the journal" in messages
    assert [r["seq"] for r in stored(store)] == [1, 2, 3]


def test_recovery_of_a_continuing_journal_does_not_warn(
    store: SpyStore, jpath: Path, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    lines = journal_chain(1, 3)
    with_tables(store).append(EVENTS_TABLE, [store_row(lines[0])])
    jpath.parent.mkdir()
    write_journal(jpath, lines[1:])
    with caplog.at_level(logging.INFO, logger="stitchwork.audit.log"):
        log = open_log(store, jpath, opened)
    assert [r.getMessage() for r in caplog.records] == ["audit: recovered 2 event(s) from the journal"]
    assert log.verify().ok and [h["seq"] for h in store.heads()] == [3]


def test_a_store_with_duplicate_rows_at_the_journal_end_gets_no_head(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    lines = journal_chain(1, 1)
    with_tables(store).append(EVENTS_TABLE, [store_row(lines[0]), store_row(lines[0])])
    jpath.parent.mkdir()
    write_journal(jpath, lines)
    open_log(store, jpath, opened)
    assert store.heads() == [] and store.statements == []


def test_damage_found_on_open_is_recorded_once_as_the_next_event(
    store: SpyStore, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(store, None, opened)
    events = [log.append("tool") for _ in range(3)]
    log.close()
    store.inner.execute(f"DELETE FROM {EVENTS_TABLE} WHERE seq = 3")  # the signed head names event 3
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.log"):
        again = open_log(store, None, opened)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("audit: the log is damaged (") and warning.endswith("); its next event records this")
    marker_event = again.append("tool", data={"after": 1})
    marker, after = again.tail(2)
    assert (marker.seq, marker.kind, marker.agent, marker.run_id, marker.tool, marker.decision) == (
        3, "audit", "stitchwork", "", "audit.open", "error")
    damage = marker.data[DAMAGE_KEY]
    assert set(damage) == {"first_bad_seq", "reason"} and damage["first_bad_seq"] == 3
    assert damage["reason"] and damage["reason"] in warning
    assert marker.prev_hash == events[1].hash and marker.hash == chain_hash(events[1].hash, as_dict(marker))
    assert (after.seq, after.prev_hash, after.data) == (4, marker.hash, {"after": 1}) and marker_event == after
    again.append("tool")
    assert [e.kind for e in again.tail(3)] == ["audit", "tool", "tool"]


def test_damage_is_recorded_before_a_batch(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    log.append("tool")
    log.close()
    store.inner.execute(f"DELETE FROM {SIGNED_HEAD_TABLE}")
    again = open_log(store, jpath, opened)
    batch = again.append_many([{"kind": "tool"}, {"kind": "tool"}])
    assert batch.first_seq == 3
    marker = again.tail(3)[0]
    assert (marker.seq, marker.kind) == (2, "audit") and batch[0].prev_hash == marker.hash


def test_a_store_end_with_a_strange_timestamp_starts_from_zero(
    store: SpyStore, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, None, opened)
    log.append("tool")
    log.close()
    monkeypatch.setattr(time, "time", lambda: 0.5)
    store.inner.execute(f"UPDATE {EVENTS_TABLE} SET ts = 'inf'::DOUBLE")
    assert open_log(store, None, opened).append("kept").ts == 0.5


def test_a_store_end_timestamp_is_kept(
    store: SpyStore, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, None, opened)
    log.append("tool")
    log.close()
    store.inner.execute(f"UPDATE {EVENTS_TABLE} SET ts = 99.5")
    monkeypatch.setattr(time, "time", lambda: 1.5)
    event = open_log(store, None, opened).append("next")
    assert event.ts == 99.5 and event.seq == 2


def test_a_crashed_log_loses_nothing(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")
    log.flush()
    store.fail_inserts = 1
    log.append("tool")
    with pytest.raises(AuditError):
        log.flush()  # event 2 sealed in the second file with its head line
    log.append("tool")
    crash(log)
    again = open_log(store, jpath, opened)
    assert [r["seq"] for r in stored(store)] == [1, 2, 3] and [h["seq"] for h in store.heads()] == [3]
    assert again.verify().ok and again.append("tool").seq == 4


def test_flush_waits_for_a_sealed_file_even_when_the_journal_is_caught_up(
    store: SpyStore, jpath: Path, opened: list[AuditLog]
) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")
    store.fail_heads = 1
    with pytest.raises(AuditError):
        log.flush()
    assert log.lag() == 0 and log._sealed is not None  # inserted, head pending
    log.flush()
    assert log._sealed is None and [h["seq"] for h in store.heads()] == [1]


def test_events_queued_while_the_writer_is_busy_are_committed_after_their_linger(
    store: SpyStore, opened: list[AuditLog]
) -> None:
    log = open_log(store, None, opened)
    entered, gate = hold_inserts(store)
    durable = threading.Event()
    log.listen(lambda events: durable.set() if events[-1].seq == 2 else None)
    log.append_nowait("tool")
    assert entered.wait(60)  # the writer holds event 1 at the store
    log.append_nowait("tool")  # queued, nobody waits: the writer finds it lingering when it comes back
    gate.set()
    assert durable.wait(60)
    assert [r["seq"] for r in stored(store)] == [1, 2] and log.health() == ""


def test_a_file_that_could_not_be_emptied_is_emptied_on_the_next_copy(
    store: SpyStore, jpath: Path, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")
    real = log_module._reset_journal_file
    failures = [OSError(5, "I/O error")]

    def reset(fd: int, size: int = JOURNAL_PREALLOC) -> None:
        if failures:
            raise failures.pop()
        real(fd, size)

    monkeypatch.setattr(log_module, "_reset_journal_file", reset)
    with pytest.raises(AuditError, match=r"^cannot copy audit events into the store: \[Errno 5\] I/O error; "):
        log.flush()
    assert [r["seq"] for r in stored(store)] == [1] and [k for k, _ in store.statements] == ["INSERT"]
    log.flush()  # only the emptying is left to do: no second insert, no second head
    assert store.inserts == [1] and [k for k, _ in store.statements] == ["INSERT"]
    assert jpath.read_bytes() == bytes(JOURNAL_PREALLOC)


@pytest.mark.parametrize("with_journal", [True, False])
def test_an_awaited_append_is_committed_at_once_and_takes_the_queued_events_along(
    store: SpyStore, jpath: Path, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch, with_journal: bool
) -> None:
    """With an hour-long linger, anything that waits for the writer would hang here: only queued events linger."""
    monkeypatch.setattr(log_module, "NOWAIT_LINGER_S", 3600.0)
    log = open_log(store, jpath if with_journal else None, opened)
    seen: list[list[int]] = []
    log.listen(lambda events: seen.append([e.seq for e in events]))
    log.append_nowait("queued")
    log.append_nowait("queued")
    assert log.append("tool").seq == 3
    assert log.append_many([{"kind": "tool"}]).first_seq == 4
    assert asyncio.run(log.aappend("tool")).seq == 5
    assert asyncio.run(log.aappend_many([{"kind": "tool"}])).first_seq == 6
    log.append_nowait("queued")
    assert [e.seq for e in log.tail(1)] == [7]  # a read commits what was queued before it
    log.append_nowait("queued")
    log.flush()
    assert log.append("tool").seq == 9
    assert seen[:6] == [[1, 2, 3], [4], [5], [6], [7], [8]]


def test_close_drains_events_queued_while_the_writer_was_busy(store: SpyStore, opened: list[AuditLog]) -> None:
    log = open_log(store, None, opened)
    entered, gate = hold_inserts(store)
    log.append_nowait("tool")
    assert entered.wait(60)
    log.append_nowait("tool")
    closing = threading.Thread(target=log.close)
    closing.start()
    while not log._closed:
        entered.wait(0.001)
    gate.set()  # the writer comes back to a closed log with an event still queued
    closing.join()
    assert [r["seq"] for r in stored(store)] == [1, 2]


@pytest.mark.parametrize("limit", ["after", "tail"])
def test_the_default_read_sizes(store: SpyStore, opened: list[AuditLog], limit: str) -> None:
    log = open_log(store, None, opened)
    log.append_many([{"kind": "tool"}] * 1001)
    if limit == "after":
        assert [e.seq for e in log.after(0)] == list(range(1, 1001))
    else:
        assert [e.seq for e in log.tail()] == list(range(982, 1002))


def test_the_log_threads_are_named_daemons(store: SpyStore, jpath: Path, opened: list[AuditLog]) -> None:
    log = open_log(store, jpath, opened)
    assert log._flusher is not None
    threads = [(t.name, t.daemon) for t in (log._writer, log._flusher)]
    assert threads == [("audit-writer", True), ("audit-flusher", True)]


def test_the_flusher_waking_with_nothing_to_copy_does_nothing(
    store: SpyStore, jpath: Path, opened: list[AuditLog], caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(store, jpath, opened)
    outcomes: list[object] = []
    woke = threading.Event()

    def copy_once() -> bool:
        try:
            outcomes.append(AuditLog._copy_once(log))
        except Exception as exc:
            outcomes.append(exc)
            raise
        finally:
            woke.set()
        return bool(outcomes[-1])

    log._copy_once = copy_once  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="stitchwork.audit.log"):
        log._flush_now.set()
        assert woke.wait(60)
        event = log.append("tool")
        log.flush()
    assert outcomes[0] is False and caplog.records == []
    assert [r["hash"] for r in stored(store)] == [event.hash] and log._active == 1


def test_an_empty_store_starts_the_clock_at_zero(
    store: SpyStore, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(store, None, opened)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: 0.5 if threading.current_thread() is log._writer else real())
    assert log.append("tool").ts == 0.5


def test_copy_failures_are_logged_at_most_once_every_ten_seconds(
    store: SpyStore, jpath: Path, opened: list[AuditLog], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = open_log(store, jpath, opened)
    log.append("tool")
    clock = [0.0]
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: clock[0] if threading.current_thread() is log._flusher else real())
    entered, release = threading.Semaphore(0), threading.Semaphore(0)
    failing = [True]
    inner = store.append_columns

    def insert(table: str, columns: Mapping[str, Sequence[Any]]) -> None:
        if not failing[0]:
            inner(table, columns)
            return
        entered.release()
        release.acquire()
        raise StoreError(f"failure at {clock[0]}")

    store.append_columns = insert  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="stitchwork.audit.log"):
        for now in (1000.0, 1005.0, 1010.0, 1010.5, 1015.0):
            log._flush_now.set()
            assert entered.acquire(timeout=60)  # the flusher is in the store: the previous attempt has ended
            clock[0] = now
            release.release()
        log._flush_now.set()
        assert entered.acquire(timeout=60)  # ... and so has the last one
        failing[0] = False
        release.release()
    assert [r.getMessage() for r in caplog.records] == [
        "audit: copying journaled events into the store failed (will retry): failure at 1000.0",
        "audit: copying journaled events into the store failed (will retry): failure at 1010.5",
    ]


def test_a_read_ends_the_linger_of_a_queued_event_the_writer_already_holds(
    store: SpyStore, opened: list[AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    lingering = threading.Event()

    class Watched(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            if timeout is not None and threading.current_thread().name == "audit-writer":
                lingering.set()  # the writer holds a queued event for NOWAIT_LINGER_S
            return super().wait(timeout)

    monkeypatch.setattr(log_module, "NOWAIT_LINGER_S", 3600.0)
    monkeypatch.setattr(threading, "Condition", Watched)
    log = open_log(store, None, opened)
    monkeypatch.setattr(threading, "Condition", Watched.__mro__[1])
    log.append_nowait("queued")
    assert lingering.wait(60)
    assert [e.seq for e in log.tail(1)] == [1]  # the read wakes the writer: it does not wait out the hour
