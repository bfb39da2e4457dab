"""The audit log: hash chain, group commit, journal recovery, signed head, tamper detection."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pytest

import stitchwork.audit.log as audit_module
import stitchwork.audit.verify as verify_module
from stitchwork.audit.canonical import GENESIS_HASH, canonical
from stitchwork.audit.journal import JOURNAL_PREALLOC
from stitchwork.audit.log import AuditLog
from stitchwork.audit.records import EVENTS_TABLE, SIGNED_HEAD_TABLE, AuditEvent
from stitchwork.audit.verify import VerifyReport
from stitchwork.data._base import Store, open_store
from stitchwork.errors import AuditError, StoreError
from tests.signing import Ed25519Signer

# A child process that appends events and dies without flushing or closing: a real crash. With "rotate",
# a store copy fails half way, so the first half sits in a sealed journal file (with its signed head line)
# and the second half in the other file.
CRASH_CHILD = """
import importlib.util, os, sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]).resolve().parents[2]))  # the repository root, for tests.signing
spec = importlib.util.spec_from_file_location("audit_tests", sys.argv[1])
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)
from stitchwork.data._base import open_store
from stitchwork.errors import AuditError, StoreError
from stitchwork.audit.log import AuditLog
store = open_store("duckdb://" + sys.argv[2])
log = AuditLog(store, signer=tests.Ed25519Signer(), journal_path=Path(sys.argv[3]), flush_ms=1e9)
count, rotate = int(sys.argv[4]), sys.argv[5] == "rotate"
for i in range(count):
    if rotate and i == count // 2:
        def refuse(table, rows):
            raise StoreError("disk full")
        store.append = store.append_columns = refuse
        try:
            log.flush()
        except AuditError:
            pass
    log.append("tool", agent="agent-1", run_id="run-1", tool="fs.read", decision="allow", data={"i": i})
os._exit(0)
"""
CRASH_EVENTS = 10


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.duckdb"


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "audit.journal"


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify reads 4 rows per query, so every test crosses chunk boundaries."""
    monkeypatch.setattr(verify_module, "VERIFY_CHUNK", 4)


def open_log(db: Path, journal: Path | None, signer: Ed25519Signer, **kw: Any) -> tuple[Store, AuditLog]:
    store = open_store(f"duckdb://{db}")
    try:
        return store, AuditLog(store, signer=signer, journal_path=journal, **kw)
    except BaseException:
        store.close()
        raise


def append_n(log: AuditLog, n: int, start: int = 0) -> list[AuditEvent]:
    return [
        log.append("tool", agent="agent-1", run_id="run-1", tool="fs.read", decision="allow", data={"i": i})
        for i in range(start, start + n)
    ]


def verify_db(db: Path, journal: Path | None, signer: Ed25519Signer) -> VerifyReport:
    store, log = open_log(db, journal, signer)
    try:
        return log.verify()
    finally:
        log.close()
        store.close()


def tamper(db: Path, *statements: str | tuple[str, Sequence[Any]]) -> None:
    """Edits the closed database directly, as an attacker with file access would."""
    conn = duckdb.connect(str(db))
    try:
        for statement in statements:
            if isinstance(statement, tuple):
                conn.execute(statement[0], list(statement[1]))
            else:
                conn.execute(statement)
    finally:
        conn.close()


def row(db: Path, seq: int) -> dict[str, Any]:
    conn = duckdb.connect(str(db))
    try:
        cursor = conn.execute(f"SELECT * FROM {EVENTS_TABLE} WHERE seq = ?", [seq])
        names = [d[0] for d in cursor.description or ()]
        found = cursor.fetchone()
        assert found is not None
        return dict(zip(names, found, strict=True))
    finally:
        conn.close()


def chained_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """The documented formula, computed independently of the module's fast path."""
    body = {k: fields[k] for k in ("seq", "ts", "kind", "agent", "run_id", "tool", "decision", "data")}
    return hashlib.sha256(prev_hash.encode() + canonical(body)).hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database holding a clean chain of 10 events, closed (built once; tests tamper with copies)."""
    directory = tmp_path_factory.mktemp("pristine")
    store, log = open_log(directory / "audit.duckdb", directory / "audit.journal", Ed25519Signer())
    append_n(log, 10)
    log.close()
    store.close()
    return directory / "audit.duckdb"


@pytest.fixture
def closed_log(pristine: Path, db_path: Path) -> Path:
    shutil.copyfile(pristine, db_path)
    return db_path


@pytest.fixture(scope="module")
def crash_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories left by child processes that appended CRASH_EVENTS events and crashed (run in parallel)."""
    dirs = {mode: tmp_path_factory.mktemp(f"crashed_{mode}") for mode in ("plain", "rotate")}

    def child(mode: str, directory: Path) -> subprocess.Popen[bytes]:
        database, journal = str(directory / "audit.duckdb"), str(directory / "audit.journal")
        argv = [sys.executable, "-c", CRASH_CHILD, __file__, database, journal, str(CRASH_EVENTS), mode]
        return subprocess.Popen(argv)

    children = [child(mode, directory) for mode, directory in dirs.items()]
    for process in children:
        assert process.wait(timeout=60) == 0
    return dirs


@pytest.fixture
def crashed(crash_dirs: dict[str, Path]) -> Path:
    """No store copy happened before the crash: every event is only in the journal."""
    return crash_dirs["plain"]


@pytest.fixture
def crashed_rotated(crash_dirs: dict[str, Path]) -> Path:
    """A store copy failed half way: the first half of the events is in a sealed journal file."""
    return crash_dirs["rotate"]


@pytest.fixture
def crash_copy(crashed: Path, tmp_path: Path) -> Path:
    target = tmp_path / "crashed"
    shutil.copytree(crashed, target)
    return target


# ---------------------------------------------------------------------------------------------- encoding
def test_canonical_is_sorted_compact_utf8_and_rejects_nan() -> None:
    assert canonical({"b": 1, "a": [1.5, "é", None, True]}) == '{"a":[1.5,"é",null,true],"b":1}'.encode()
    with pytest.raises(AuditError):
        canonical({"x": float("nan")})
    with pytest.raises(AuditError):
        canonical({"x": float("inf")})


def test_data_is_sanitised(db_path: Path, journal: Path, signer: Ed25519Signer) -> None:
    store, log = open_log(db_path, journal, signer)
    try:
        event = log.append(
            "tool",
            data={"raw": b"\x00ab", "tags": {"b", "a"}, "pair": (1, 2), 7: frozenset({3, 1}), "ok": None},
        )
        expected = {"raw": "b'\\x00ab'", "tags": ["a", "b"], "pair": [1, 2], "7": [1, 3], "ok": None}
        assert event.data == expected
        assert log.tail(1)[0].data == expected
        log.flush()
        assert json.loads(store.query(f"SELECT data FROM {EVENTS_TABLE}")[0]["data"]) == expected
        assert log.verify().ok
    finally:
        log.close()
        store.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": float("nan")}, "NaN"),
        ({"deep": [1, {"y": float("-inf")}]}, "data['deep'][1]['y']"),
        ({"obj": object()}, "object"),
        ({(1, 2): "tuple key"}, "key"),
        ({1: "a", "1": "b"}, "two keys"),
    ],
)
def test_unencodable_data_is_refused(
    db_path: Path, journal: Path, signer: Ed25519Signer, data: dict[Any, Any], message: str
) -> None:
    store, log = open_log(db_path, journal, signer)
    try:
        with pytest.raises(AuditError, match=re.escape(message)):
            log.append("tool", data=data)
        cyclic: dict[str, Any] = {}
        cyclic["self"] = cyclic
        with pytest.raises(AuditError, match="cycle"):
            log.append("tool", data=cyclic)
        with pytest.raises(AuditError, match="reserved"):
            log.append("audit")
        with pytest.raises(AuditError, match="empty"):
            log.append("")
        assert log.tail() == []  # nothing was recorded
    finally:
        log.close()
        store.close()


# ---------------------------------------------------------------------------------------------- chain
def test_append_and_tail(db_path: Path, journal: Path, signer: Ed25519Signer) -> None:
    store, log = open_log(db_path, journal, signer, flush_ms=1e9)  # nothing is copied unless asked
    try:
        first = log.append("auth", agent="a1", run_id="r1", tool="login", decision="deny", data={"why": "expired"})
        assert (first.seq, first.kind, first.agent, first.run_id, first.tool, first.decision) == (
            1, "auth", "a1", "r1", "login", "deny",
        )  # fmt: skip
        assert first.prev_hash == GENESIS_HASH
        events = [first, *append_n(log, 4)]
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        for before, after in itertools.pairwise(events):
            assert after.prev_hash == before.hash
        for event, prev in zip(events, [GENESIS_HASH] + [e.hash for e in events], strict=False):
            assert event.hash == chained_hash(prev, dataclasses.asdict(event))

        assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}")[0]["n"] == 0  # still only journaled
        assert log.tail(3) == events[2:]  # tail reads the journaled events
        log.flush()
        assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}")[0]["n"] == 5
        assert log.tail(3) == events[2:]
        assert log.tail(100) == events
        assert log.tail(0) == []
        later = append_n(log, 2, start=5)
        assert [e.seq for e in log.tail(4)] == [4, 5, 6, 7]  # 2 from the store, 2 from the journal
        assert log.tail(4)[-1] == later[-1]
        head = store.query(f"SELECT * FROM {SIGNED_HEAD_TABLE}")
        assert [(h["seq"], h["hash"], h["key_id"]) for h in head] == [(5, events[-1].hash, "test-key")]
    finally:
        log.close()
        store.close()


def test_verify_ok_and_reopen_continues_the_chain(
    db_path: Path, journal: Path, signer: Ed25519Signer, small_chunks: None
) -> None:
    store, log = open_log(db_path, journal, signer)
    events = append_n(log, 9)
    report = log.verify()
    assert report == VerifyReport(True, 9, None, report.reason, 9, True)
    log.close()
    store.close()

    store, log = open_log(db_path, journal, signer)
    try:
        more = append_n(log, 3, start=9)
        assert [e.seq for e in more] == [10, 11, 12]
        assert more[0].prev_hash == events[-1].hash
        report = log.verify()
        assert (report.ok, report.events, report.head_seq, report.head_signed) == (True, 12, 12, True)
    finally:
        log.close()
        store.close()
    assert journal.read_bytes() == b""
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{journal}.1").stat().st_mode) == 0o600


def test_empty_log_verifies(db_path: Path, journal: Path, signer: Ed25519Signer) -> None:
    report = verify_db(db_path, journal, signer)
    assert (report.ok, report.events, report.head_seq) == (True, 0, 0)


def test_without_journal_each_batch_is_committed_to_the_store(db_path: Path, signer: Ed25519Signer) -> None:
    store, log = open_log(db_path, None, signer)
    try:
        events = append_n(log, 3)
        assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}")[0]["n"] == 3
        assert store.query(f"SELECT seq FROM {SIGNED_HEAD_TABLE}") == [{"seq": 3}]
        assert log.tail(2) == events[1:]
        assert log.verify().ok
    finally:
        log.close()
        store.close()


# ---------------------------------------------------------------------------------------------- concurrency
def _check_contiguous(events: list[AuditEvent]) -> None:
    by_seq = sorted(events, key=lambda e: e.seq)
    assert [e.seq for e in by_seq] == list(range(1, len(events) + 1))
    for before, after in itertools.pairwise(by_seq):
        assert after.prev_hash == before.hash


@pytest.mark.parametrize("with_journal", [True, False])
async def test_threads_and_tasks_append_concurrently(
    db_path: Path, journal: Path, signer: Ed25519Signer, with_journal: bool
) -> None:
    store, log = open_log(db_path, journal if with_journal else None, signer, flush_ms=5)
    results: list[AuditEvent] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        for i in range(15):
            event = log.append("tool", agent=f"thread-{w}", data={"i": i})
            with lock:
                results.append(event)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    try:
        for thread in threads:
            thread.start()

        async def task(t: int) -> list[AuditEvent]:
            return [await log.aappend("model", agent=f"task-{t}", data={"i": i}) for i in range(3)]

        batches = await asyncio.gather(*(task(t) for t in range(64)))
        await asyncio.to_thread(lambda: [thread.join() for thread in threads])
        results.extend(e for batch in batches for e in batch)
        assert len(results) == 8 * 15 + 64 * 3
        _check_contiguous(results)
        report = log.verify()
        assert (report.ok, report.events, report.head_seq) == (True, len(results), len(results))
        stored = store.query(f"SELECT seq, hash FROM {EVENTS_TABLE} ORDER BY seq")
        assert stored == [{"seq": e.seq, "hash": e.hash} for e in sorted(results, key=lambda e: e.seq)]
    finally:
        await log.aclose()
        store.close()


class WriterGate:
    """Holds the audit writer thread inside its durable write (journal fsync, or store commit) until opened."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.commits = 0

    def passing(self) -> None:
        if threading.current_thread().name == "audit-writer":
            self.commits += 1
            self.open.wait()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[WriterGate]:
    gate = WriterGate()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        gate.passing()
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    yield gate
    gate.open.set()


class GatedStore(Store):
    """A DuckDB store whose inserts pass through a gate and fail while ``broken`` is set."""

    def __init__(self, gate: WriterGate | None = None) -> None:
        self.inner = open_store("memory://")
        self.uri = self.inner.uri
        self.gate = gate
        self.broken = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.inner.execute(sql, params)

    def append(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        if self.gate is not None:
            self.gate.passing()
        if self.broken:
            raise StoreError("disk full")
        self.inner.append(table, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self.inner.query(sql, params)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("with_journal", [True, False])
async def test_concurrent_aappends_share_one_commit_without_blocking_the_loop(
    journal: Path, signer: Ed25519Signer, gate: WriterGate, with_journal: bool
) -> None:
    store = GatedStore(gate)
    log = AuditLog(store, signer=signer, journal_path=journal if with_journal else None)
    try:
        tasks = [asyncio.create_task(log.aappend("tool", data={"t": t})) for t in range(64)]
        await asyncio.sleep(0)  # every task has enqueued its event and now awaits durability
        ticks = 0
        for _ in range(3):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 3 and not any(t.done() for t in tasks)  # the loop runs while the appends wait
        gate.open.set()
        events = await asyncio.gather(*tasks)
        _check_contiguous(list(events))
        assert gate.commits <= 2  # one group commit (two if the writer took the first event alone)
    finally:
        gate.open.set()
        await log.aclose()
        store.close()


async def test_cancelled_aappend_is_still_recorded(journal: Path, signer: Ed25519Signer, gate: WriterGate) -> None:
    store = GatedStore()
    log = AuditLog(store, signer=signer, journal_path=journal)
    try:
        task = asyncio.create_task(log.aappend("tool", data={"n": 1}))
        await asyncio.sleep(0)  # enqueued; the writer is held in its fsync
        task.cancel()
        gate.open.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await log.aappend("tool", data={"n": 2})  # the writer is sequential: event 1 is durable by now
        assert [e.data for e in log.tail()] == [{"n": 1}, {"n": 2}]
    finally:
        gate.open.set()
        await log.aclose()
        store.close()


def test_threshold_triggers_a_copy(
    db_path: Path, journal: Path, signer: Ed25519Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "FLUSH_THRESHOLD", 5)
    store, log = open_log(db_path, journal, signer, flush_ms=1e9)
    try:
        append_n(log, 4)
        assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}")[0]["n"] == 0
        append_n(log, 1, start=4)
        copied = threading.Event()
        for _ in range(1000):  # the flusher thread was woken; wait for it (bounded, not timed)
            if store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}")[0]["n"] == 5:
                copied.set()
                break
            copied.wait(0.01)
        assert copied.is_set()
    finally:
        log.close()
        store.close()


def test_append_after_close_is_refused(db_path: Path, journal: Path, signer: Ed25519Signer) -> None:
    store, log = open_log(db_path, journal, signer)
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditError, match="closed"):
        log.append("tool")
    store.close()


def test_second_log_on_the_same_journal_is_refused(journal: Path, signer: Ed25519Signer) -> None:
    first_store, second_store = open_store("memory://"), open_store("memory://")
    log = AuditLog(first_store, signer=signer, journal_path=journal)
    try:
        with pytest.raises(AuditError, match="in use"):
            AuditLog(second_store, signer=signer, journal_path=journal)
    finally:
        log.close()
        first_store.close()
        second_store.close()


def test_store_failure_keeps_events_in_the_journal(journal: Path, signer: Ed25519Signer) -> None:
    store = GatedStore()
    log = AuditLog(store, signer=signer, journal_path=journal, flush_ms=1e9)
    try:
        store.broken = True
        events = append_n(log, 3)  # durable in the journal even though the store is down
        with pytest.raises(AuditError, match="disk full"):
            log.flush()
        report = log.verify()
        assert not report.ok and "disk full" in report.reason
        assert log.tail(3) == events
        store.broken = False
        log.flush()
        assert log.verify().ok
        assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}")[0]["n"] == 3
    finally:
        store.broken = False
        log.close()
        store.close()


def test_without_journal_a_failed_commit_is_reported_and_not_chained(signer: Ed25519Signer) -> None:
    store = GatedStore()
    log = AuditLog(store, signer=signer, journal_path=None)
    try:
        append_n(log, 2)
        store.broken = True
        with pytest.raises(AuditError, match="disk full"):
            log.append("tool")
        store.broken = False
        assert log.append("tool").seq == 3  # the failed event did not take a sequence number
        assert log.verify().ok
    finally:
        log.close()
        store.close()


# ---------------------------------------------------------------------------------------------- durability
def test_crash_before_store_copy_loses_nothing(crash_copy: Path, signer: Ed25519Signer) -> None:
    db, journal = crash_copy / "audit.duckdb", crash_copy / "audit.journal"
    content = journal.read_bytes()
    assert len(content) == JOURNAL_PREALLOC  # batches overwrote the preallocated zeros
    assert len(content.rstrip(b"\0").splitlines()) == CRASH_EVENTS  # one line per event, no copy yet
    conn = duckdb.connect(str(db))
    assert conn.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone() == (0,)
    conn.close()

    store, log = open_log(db, journal, signer)
    try:
        assert [e.data["i"] for e in log.tail(100)] == list(range(CRASH_EVENTS))
        assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}")[0]["n"] == CRASH_EVENTS
        assert store.query(f"SELECT seq FROM {SIGNED_HEAD_TABLE}") == [{"seq": CRASH_EVENTS}]
        assert journal.read_bytes() == bytes(JOURNAL_PREALLOC)  # recovered, so emptied (and preallocated)
        assert log.append("run").seq == CRASH_EVENTS + 1
        report = log.verify()
        assert (report.ok, report.events) == (True, CRASH_EVENTS + 1)
    finally:
        log.close()
        store.close()


@pytest.mark.parametrize("torn_head", [False, True])
def test_crash_with_a_sealed_journal_file_loses_nothing(
    crashed_rotated: Path, tmp_path: Path, signer: Ed25519Signer, torn_head: bool
) -> None:
    directory = shutil.copytree(crashed_rotated, tmp_path / "crashed")
    db, journal, other = directory / "audit.duckdb", directory / "audit.journal", directory / "audit.journal.1"
    sealed = journal.read_bytes().rstrip(b"\0")
    half = CRASH_EVENTS // 2
    assert sealed.count(b'{"event"') == half and sealed.count(b'{"head"') == 1
    assert other.read_bytes().rstrip(b"\0").count(b'{"event"') == CRASH_EVENTS - half
    if torn_head:  # the head line is written without a sync of its own: a crash may tear it
        journal.write_bytes(sealed[:-40])
    store, log = open_log(db, journal, signer)
    try:
        assert [e.data["i"] for e in log.tail(100)] == list(range(CRASH_EVENTS))
        report = log.verify()
        assert (report.ok, report.events, report.head_seq) == (True, CRASH_EVENTS, CRASH_EVENTS)
    finally:
        log.close()
        store.close()


@pytest.mark.parametrize("gap", [False, True])
def test_torn_final_line_is_ignored(
    crash_copy: Path, signer: Ed25519Signer, caplog: pytest.LogCaptureFixture, gap: bool
) -> None:
    db, journal = crash_copy / "audit.duckdb", crash_copy / "audit.journal"
    data = journal.read_bytes().rstrip(b"\0")
    torn = b'{"event":{"agent":"agent-1","data":{"i":'  # a write cut short by the crash
    if gap:  # only the second page of the unfinished write reached the disk
        torn = torn[:8] + bytes(4096) + b'1},"decision":"allow"'
    journal.write_bytes(data + torn + bytes(1000))
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.journal"):
        store, log = open_log(db, journal, signer)
    try:
        assert "torn final line" in caplog.text
        assert ("zeroed gap" in caplog.text) == gap
        assert len(log.tail(100)) == CRASH_EVENTS
        assert log.verify().ok
    finally:
        log.close()
        store.close()


def test_event_cut_mid_line_is_dropped(
    crash_copy: Path, signer: Ed25519Signer, caplog: pytest.LogCaptureFixture
) -> None:
    db, journal = crash_copy / "audit.duckdb", crash_copy / "audit.journal"
    data = journal.read_bytes().rstrip(b"\0")
    journal.write_bytes(data[: data.rindex(b'{"event"') + 30])  # the last event's line is cut short
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.journal"):
        store, log = open_log(db, journal, signer)
    try:
        # its write never completed, so its append never returned: dropping it is safe
        assert [e.seq for e in log.tail(100)] == list(range(1, CRASH_EVENTS))
        assert "torn final line" in caplog.text
        assert log.verify().ok
    finally:
        log.close()
        store.close()


@pytest.mark.parametrize("damage", ["garbage", "zeroed", "edited"])
def test_corrupt_journal_mid_file_is_refused_and_left_alone(
    crash_copy: Path, signer: Ed25519Signer, damage: str
) -> None:
    db, journal = crash_copy / "audit.duckdb", crash_copy / "audit.journal"
    lines = journal.read_bytes().split(b"\n")
    if damage == "garbage":
        lines[4] = b"not json"
    elif damage == "zeroed":  # a zeroed gap inside acknowledged data, not at the end of the journal
        lines[4] = bytes(len(lines[4]))
    else:
        lines[4] = lines[4].replace(b'"decision":"allow"', b'"decision":"deny"')
    journal.write_bytes(b"\n".join(lines))
    before = journal.read_bytes()
    store = open_store(f"duckdb://{db}")
    try:
        with pytest.raises(AuditError, match=rf"{re.escape(str(journal))}, line 5: .*corrupt"):
            AuditLog(store, signer=signer, journal_path=journal)
        assert journal.read_bytes() == before  # not truncated, not deleted
        assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}")[0]["n"] == 0
    finally:
        store.close()


def _append_head_line(journal: Path, signer: Ed25519Signer, *, seq: int) -> None:
    data = journal.read_bytes().rstrip(b"\0")
    last = json.loads(data.splitlines()[seq - 1])
    assert last["event"]["seq"] == seq
    message = canonical({"seq": seq, "hash": last["hash"], "key_id": signer.key_id})
    head = {"seq": seq, "hash": last["hash"], "key_id": signer.key_id, "signature": signer.sign(message).hex()}
    journal.write_bytes(data + canonical({"head": {**head, "ts": 1.0}}) + b"\n")


def test_journal_head_line_is_checked_and_used(crash_copy: Path, signer: Ed25519Signer) -> None:
    db, journal = crash_copy / "audit.duckdb", crash_copy / "audit.journal"
    _append_head_line(journal, signer, seq=CRASH_EVENTS)
    store, log = open_log(db, journal, signer)
    try:
        assert store.query(f"SELECT seq, ts FROM {SIGNED_HEAD_TABLE}") == [{"seq": CRASH_EVENTS, "ts": 1.0}]
        assert log.verify().ok
    finally:
        log.close()
        store.close()


def test_journal_with_forged_head_is_refused(crash_copy: Path) -> None:
    db, journal = crash_copy / "audit.duckdb", crash_copy / "audit.journal"
    _append_head_line(journal, Ed25519Signer(seed=b"\x01" * 32), seq=CRASH_EVENTS)  # signed by another key
    before = journal.read_bytes()
    store = open_store(f"duckdb://{db}")
    try:
        with pytest.raises(AuditError, match=f"line {CRASH_EVENTS + 1}: the signed head has an invalid signature"):
            AuditLog(store, signer=Ed25519Signer(), journal_path=journal)
        assert journal.read_bytes() == before
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- tampering
def expect_bad(report: VerifyReport, seq: int | None, *words: str) -> None:
    assert not report.ok, report
    assert report.first_bad_seq == seq, report
    for word in words:
        assert word in report.reason, report


@pytest.mark.usefixtures("small_chunks")
def test_edited_field_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"UPDATE {EVENTS_TABLE} SET decision = 'deny' WHERE seq = 6")
    expect_bad(verify_db(closed_log, journal, signer), 6, "event 6", "edited")


@pytest.mark.usefixtures("small_chunks")
def test_edited_data_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"""UPDATE {EVENTS_TABLE} SET data = '{{"i":99}}' WHERE seq = 3""")
    report = verify_db(closed_log, journal, signer)
    expect_bad(report, 3, "event 3: hash does not match its contents (edited)")
    assert report.events == 2


@pytest.mark.usefixtures("small_chunks")
def test_reformatted_but_equal_data_still_verifies(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"""UPDATE {EVENTS_TABLE} SET data = '{{ "i" : 2 }}' WHERE seq = 3""")
    assert verify_db(closed_log, journal, signer).ok


@pytest.mark.usefixtures("small_chunks")
def test_deleted_event_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"DELETE FROM {EVENTS_TABLE} WHERE seq = 5")
    expect_bad(verify_db(closed_log, journal, signer), 5, "event 5 is missing (deleted)", "from event 4 to event 6")


@pytest.mark.usefixtures("small_chunks")
def test_deleted_chunk_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"DELETE FROM {EVENTS_TABLE} WHERE seq BETWEEN 2 AND 7")  # a whole verify chunk is empty
    expect_bad(verify_db(closed_log, journal, signer), 2, "event 2 is missing", "to event 8")


@pytest.mark.usefixtures("small_chunks")
def test_inserted_duplicate_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    original = row(closed_log, 6)
    forged = {**original, "decision": "allow", "data": '{"i":1000}'}
    forged["hash"] = chained_hash(original["prev_hash"], {**forged, "data": {"i": 1000}})
    tamper(
        closed_log,
        (f"INSERT INTO {EVENTS_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", list(forged.values())),
    )
    expect_bad(verify_db(closed_log, journal, signer), 6, "event 6")


@pytest.mark.usefixtures("small_chunks")
def test_inserted_event_with_shifted_sequence_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    # make room after event 4 and insert a well-formed event 5 that links to event 4
    four = row(closed_log, 4)
    forged = {**four, "seq": 5, "data": '{"forged":true}', "prev_hash": four["hash"]}
    forged["hash"] = chained_hash(four["hash"], {**forged, "data": {"forged": True}})
    tamper(
        closed_log,
        f"UPDATE {EVENTS_TABLE} SET seq = seq + 1 WHERE seq >= 5",
        (f"INSERT INTO {EVENTS_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", list(forged.values())),
    )
    expect_bad(verify_db(closed_log, journal, signer), 6, "event 6")


@pytest.mark.usefixtures("small_chunks")
def test_appended_event_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    last = row(closed_log, 10)
    forged = {**last, "seq": 11, "data": '{"forged":true}', "prev_hash": last["hash"]}
    forged["hash"] = chained_hash(last["hash"], {**forged, "data": {"forged": True}})
    tamper(
        closed_log,
        (f"INSERT INTO {EVENTS_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", list(forged.values())),
    )
    expect_bad(verify_db(closed_log, journal, signer), 11, "events 11..11 are not covered by the signed head")


@pytest.mark.usefixtures("small_chunks")
def test_swapped_events_are_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    three, four = row(closed_log, 3), row(closed_log, 4)
    columns = [c for c in three if c != "seq"]
    assignments = ", ".join(f"{c} = ?" for c in columns)
    tamper(
        closed_log,
        (f"UPDATE {EVENTS_TABLE} SET {assignments} WHERE seq = 3", [four[c] for c in columns]),
        (f"UPDATE {EVENTS_TABLE} SET {assignments} WHERE seq = 4", [three[c] for c in columns]),
    )
    expect_bad(verify_db(closed_log, journal, signer), 3, "event 3", "reordered")


@pytest.mark.usefixtures("small_chunks")
def test_swapped_sequence_numbers_are_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"UPDATE {EVENTS_TABLE} SET seq = CASE seq WHEN 3 THEN 4 ELSE 3 END WHERE seq IN (3, 4)")
    expect_bad(verify_db(closed_log, journal, signer), 3, "event 3")


@pytest.mark.usefixtures("small_chunks")
def test_truncated_tail_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"DELETE FROM {EVENTS_TABLE} WHERE seq > 7")
    expect_bad(verify_db(closed_log, journal, signer), 8, "events after 7 are missing", "truncated")


@pytest.mark.usefixtures("small_chunks")
def test_truncation_stays_visible_after_new_appends(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"DELETE FROM {EVENTS_TABLE} WHERE seq > 7")
    store, log = open_log(closed_log, journal, signer)
    try:
        events = append_n(log, 3, start=100)  # the log keeps working...
        assert [e.seq for e in events] == [9, 10, 11]  # ...after an event (8) that records the damage
        marker = log.tail(4)[0]
        assert (marker.seq, marker.kind, marker.decision) == (8, "audit", "error")
        report = log.verify()  # a newer signed head does not hide the truncation
        expect_bad(report, 8, "events after 7 are missing", "recorded in event 8")
        assert report.head_seq == 11 and report.head_signed
    finally:
        log.close()
        store.close()
    expect_bad(verify_db(closed_log, journal, signer), 8, "events after 7 are missing")


@pytest.mark.usefixtures("small_chunks")
def test_all_events_deleted_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"DELETE FROM {EVENTS_TABLE}")
    expect_bad(verify_db(closed_log, journal, signer), 1, "events after 0 are missing")


@pytest.mark.usefixtures("small_chunks")
def test_forged_head_signature_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    signature = row_head(closed_log)["signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    tamper(closed_log, (f"UPDATE {SIGNED_HEAD_TABLE} SET signature = ?", [flipped]))
    report = verify_db(closed_log, journal, signer)
    expect_bad(report, 10, "invalid signature")
    assert not report.head_signed


@pytest.mark.usefixtures("small_chunks")
def test_head_moved_to_an_earlier_event_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    seven = row(closed_log, 7)  # pretend the log ended at 7: the signature no longer matches
    tamper(closed_log, (f"UPDATE {SIGNED_HEAD_TABLE} SET seq = 7, hash = ?", [seven["hash"]]))
    report = verify_db(closed_log, journal, signer)
    expect_bad(report, 7, "invalid signature")


@pytest.mark.usefixtures("small_chunks")
def test_rewritten_chain_does_not_match_the_signed_head(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    # rewrite event 9 and re-link event 10 so the chain is self-consistent; only the signed head can tell
    nine, ten = row(closed_log, 9), row(closed_log, 10)
    new_nine_hash = chained_hash(nine["prev_hash"], {**nine, "data": {"i": -1}})
    new_ten_hash = chained_hash(new_nine_hash, {**ten, "data": json.loads(ten["data"])})
    tamper(
        closed_log,
        (f"UPDATE {EVENTS_TABLE} SET data = ?, hash = ? WHERE seq = 9", ['{"i":-1}', new_nine_hash]),
        (f"UPDATE {EVENTS_TABLE} SET prev_hash = ?, hash = ? WHERE seq = 10", [new_nine_hash, new_ten_hash]),
    )
    expect_bad(verify_db(closed_log, journal, signer), 10, "does not match the signed head")


@pytest.mark.usefixtures("small_chunks")
def test_deleted_head_is_found(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"DELETE FROM {SIGNED_HEAD_TABLE}")
    expect_bad(verify_db(closed_log, journal, signer), None, "no signed head")


@pytest.mark.usefixtures("small_chunks")
def test_undecodable_row_is_reported_not_raised(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"UPDATE {EVENTS_TABLE} SET data = '{{not json' WHERE seq = 2")
    expect_bad(verify_db(closed_log, journal, signer), 2, "event 2: the stored row cannot be decoded")
    store, log = open_log(closed_log, journal, signer)
    try:
        with pytest.raises(AuditError, match="cannot be decoded"):
            log.tail(10)
    finally:
        log.close()
        store.close()


def test_unreadable_table_is_reported_not_raised(closed_log: Path, journal: Path, signer: Ed25519Signer) -> None:
    tamper(closed_log, f"ALTER TABLE {EVENTS_TABLE} DROP COLUMN tool")
    report = verify_db(closed_log, journal, signer)
    assert not report.ok and "cannot read the audit store" in report.reason


def row_head(db: Path) -> dict[str, Any]:
    conn = duckdb.connect(str(db))
    try:
        cursor = conn.execute(f"SELECT * FROM {SIGNED_HEAD_TABLE}")
        names = [d[0] for d in cursor.description or ()]
        found = cursor.fetchone()
        assert found is not None
        return dict(zip(names, found, strict=True))
    finally:
        conn.close()


async def test_a_queued_event_shares_the_fsync_of_the_awaited_one_after_it(
    journal: Path, signer: Ed25519Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real = os.fdatasync
    def counted(fd: int) -> None:
        if threading.current_thread().name == "audit-writer":  # journal commits, not the copier's refills
            syncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    monkeypatch.setattr(audit_module, "NOWAIT_LINGER_S", 3600.0)  # only an awaited append ends the linger
    store = open_store("memory://")
    log = AuditLog(store, signer=signer, journal_path=journal)
    try:
        for round_ in range(3):  # a tool call: its decision queued, its execution awaited
            log.append_nowait("decision", decision="allow", data={"round": round_})
            await asyncio.sleep(0.05)  # the tool runs: the writer has time to take the queued event (it must not)
            executed = await log.aappend("tool", decision="ok", data={"round": round_})
            assert executed.seq == 2 * round_ + 2
        assert len(syncs) == 3  # one journal write and fsync per call, not two
        alone = await log.aappend("run", decision="ok")  # an awaited append alone never waits for the timer
        assert alone.seq == 7 and len(syncs) == 4
        log.append_nowait("decision", decision="allow", data={"last": True})
        assert log.tail(1)[0].data == {"last": True}  # a read commits what lingers first
        log.append_nowait("decision", decision="allow", data={"after": True})
        log.flush()
        assert store.query(f"SELECT max(seq) AS m FROM {EVENTS_TABLE}") == [{"m": 9}]
        log.append_nowait("decision", decision="allow", data={"closing": True})
    finally:
        await log.aclose()  # close commits what lingers instead of waiting for the timer
        store_rows = store.query(f"SELECT seq, kind FROM {EVENTS_TABLE} ORDER BY seq")
        store.close()
    assert [r["seq"] for r in store_rows] == list(range(1, 11)) and store_rows[-1]["kind"] == "decision"


def test_a_queued_event_alone_becomes_durable_after_the_linger(journal: Path, signer: Ed25519Signer) -> None:
    store = open_store("memory://")
    log = AuditLog(store, signer=signer, journal_path=journal)
    durable = threading.Event()
    log.listen(lambda events: durable.set())
    try:
        log.append_nowait("decision", decision="allow")
        assert durable.wait(30)  # nobody appends after it: the writer commits it once the linger is over
        assert log.tail(1)[0].seq == 1
    finally:
        log.close()
        store.close()
