"""The audit log's batch API and its fast path: byte identity with the slow path, order, chain, durability."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import enum
import itertools
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import stitchwork.audit.batch as batch_module
import stitchwork.audit.canonical as canonical_module
import stitchwork.audit.log as audit_module
from stitchwork.audit.canonical import canonical
from stitchwork.audit.log import AuditLog
from stitchwork.audit.records import EVENTS_TABLE, AuditEvent
from stitchwork.data._base import Store, open_store
from stitchwork.errors import AuditError
from tests.signing import Ed25519Signer


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    store = open_store(f"duckdb://{tmp_path / 'audit.duckdb'}")
    audit = AuditLog(store, signer=Ed25519Signer("batch-key"), journal_path=tmp_path / "audit.journal", flush_ms=1e9)
    yield audit
    audit.close()
    store.close()


def slow_text(data: Any) -> str | None:
    """What the audit log recorded as ``data`` before the fast path: sanitise, then the standard encoder."""
    try:
        return canonical(canonical_module._sanitise(data)).decode("utf-8")
    except AuditError:
        return None


def fast_text(data: Any) -> str | None:
    return canonical_module._fast_canonical(data)


def batch_text(data: Any) -> str | None:
    batch = batch_module._prepare_plain_batch([{"kind": "tool", "data": data}])
    return None if batch is None else batch.data_jsons[0]


def assert_same(data: Any) -> None:
    """The fast paths either decline ``data`` or produce exactly the slow path's bytes."""
    expected = slow_text(data)
    for fast in (fast_text(data), batch_text(data)):
        if fast is not None:
            assert expected is not None, f"the fast path accepted what the slow path refuses: {data!r}"
            assert fast.encode("utf-8") == expected.encode("utf-8"), data


# ---------------------------------------------------------------------------------------------- byte identity
class Colour(enum.Enum):
    RED = 1


class Mode(str, enum.Enum):  # noqa: UP042 - str() of a member is "Mode.READ", its JSON value "read"
    READ = "read"


class Level(enum.IntEnum):
    HIGH = 3


class Kind(enum.StrEnum):
    TOOL = "tool"


@dataclasses.dataclass
class Point:
    x: int


class Text(str):
    def __str__(self) -> str:
        return "other"


NASTY: list[Any] = [
    {}, {"a": 1}, {"b": 1, "a": [1.5, "é", None, True, False]},
    {"s": "\x00\x01\x1f\x7f\b\f\n\r\t\"\\/ \u2028\u2029\ufeff\uffff\U0001f600"},
    {"é": 1, "z": 2, "\uffff": 3, "\U0001f600": 4, "\ue000": 5, "A": 6, "": 7},  # sorting beyond the BMP
    {"f": [0.0, -0.0, 1.0, 0.1, 1e-4, 9.99e-5, 1e-5, 1e-7, 1.5e-10, 5e-324, 2.2250738585072014e-308,
           1e15, 1e16, 1e17, 1.7976931348623157e308, -1e-5, 123456789.123456789, 1 / 3, 1.7e9]},
    {"i": [0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]},
    {"big": 2**64}, {"big": -(2**63) - 1}, {"big": 10**40},
    {"nan": float("nan")}, {"inf": [1, {"x": float("inf")}]}, {"ninf": -float("inf")},
    {"surrogate": "a\ud800b"}, {"a\udfffkey": 1}, {"pair": (1, 2)}, {"set": {3, 1, 2}}, {"bytes": b"\x00ab"},
    {1: "int key"}, {True: "bool key"}, {None: "none key"}, {1.5: "float key"}, {1: "a", "1": "b"},
    {"enum": Colour.RED}, {"mode": Mode.READ}, {"level": Level.HIGH}, {"kind": Kind.TOOL}, {Kind.TOOL: 1},
    {Mode.READ: 1}, {"text": Text("x")}, {Text("k"): 1}, {"uuid": uuid.UUID(int=1)},
    {"when": datetime.datetime(2026, 1, 1)}, {"day": datetime.date(2026, 1, 1)}, {"point": Point(1)},
    {"fragment": orjson.Fragment(b"[1]")}, {"od": collections.OrderedDict(b=1, a=2)},
    {"dd": collections.defaultdict(int, a=1)}, {"obj": object()}, {"true": True, "false": False, "null": None},
    {"text with number forms": "1e-05 0.00001 2e-7", "n": 1},  # declined on the output; still correct
]


@pytest.mark.parametrize("data", NASTY, ids=[f"nasty{i}" for i in range(len(NASTY))])  # stable ids: no addresses
def test_fast_path_is_byte_identical_or_declines(data: Any) -> None:
    assert_same(data)
    assert_same(collections.OrderedDict(data) if isinstance(data, dict) else data)  # a Mapping, not a dict
    assert_same({"nested": [data, {"deeper": data}]})


def test_fast_path_is_taken_for_plain_data() -> None:
    plain = {"b": [1, 2.5, "x"], "a": {"y": None, "z": True}, "s": "é\n", "f": 0.0001}
    assert fast_text(plain) == slow_text(plain)
    assert batch_text(plain) == slow_text(plain)
    flat = [{"kind": "tool", "agent": "a", "data": {"i": i, "s": str(i)}} for i in range(5)]
    batch = batch_module._prepare_plain_batch(flat)
    assert batch is not None and batch.data_jsons == [slow_text(e["data"]) for e in flat]


@pytest.mark.parametrize("depth", [63, 64, 65, 70])
def test_nesting_limit_is_the_slow_paths(depth: int) -> None:
    data: Any = 1
    for _ in range(depth - 1):
        data = [data]
    data = {"d": data}  # ``depth`` nested containers
    assert_same(data)
    assert (slow_text(data) is None) == (depth > 64)


def test_every_code_point_encodes_the_same() -> None:
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(points), 50_000):
        chunk = "".join(points[start : start + 50_000])
        data = {"v": chunk, chunk[:20]: 1, chunk[-20:]: 2}
        assert fast_text(data) == slow_text(data) is not None


def test_random_floats_encode_the_same_or_decline() -> None:
    rng = random.Random(5)
    floats = [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(20_000)]
    floats += [rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 20) for _ in range(20_000)]
    declined = 0
    for value in floats:
        expected = slow_text({"x": value})
        fast = fast_text({"x": value})
        assert fast is None or fast == expected, value
        declined += fast is None
    assert declined < len(floats) // 2  # most finite floats take the fast path
    values = [v for v in floats if v == v and abs(v) != float("inf")]
    assert batch_text({"xs": values}) in (None, slow_text({"xs": values}))


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_TEXT = st.text(st.characters(codec=None, categories=None), max_size=12)  # includes lone surrogates
_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.floats(min_value=-1e-3, max_value=1e-3) | _TEXT
    | st.binary(max_size=4)
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(_TEXT, inner, max_size=4)
    | st.frozensets(st.integers(), max_size=3),
    max_leaves=20,
)


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
@hypothesis.given(st.dictionaries(_TEXT | st.integers(), _VALUES, max_size=5))
def test_hypothesis_fast_and_slow_paths_agree(data: dict[Any, Any]) -> None:
    assert_same(data)


# ---------------------------------------------------------------------------------------------- the batch API
def test_append_many_records_in_order_with_one_write_and_one_fsync(
    log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = log.append("run", agent="a")
    calls: collections.Counter[str] = collections.Counter()
    real_pwrite, real_fdatasync = os.pwrite, os.fdatasync

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls["pwrite"] += 1
        return real_pwrite(fd, data, offset)

    def fdatasync(fd: int) -> None:
        calls["fdatasync"] += 1
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    events = [{"kind": "tool", "agent": f"agent{i % 3}", "run_id": "r", "tool": "t", "decision": "ok",
               "data": {"i": i, "tags": ["x", i], "ratio": i / 7}} for i in range(500)]
    batch = log.append_many(events)
    assert calls == {"pwrite": 1, "fdatasync": 1}
    monkeypatch.undo()

    assert len(batch) == 500 and (batch.first_seq, batch.last_seq) == (2, 501)
    with pytest.raises(IndexError):
        batch[500]
    assert [e.seq for e in batch] == list(range(2, 502))
    assert batch[0].prev_hash == first.hash and batch[-1].hash == batch.last_hash
    for before, after in itertools.pairwise(batch):
        assert after.prev_hash == before.hash
    assert [e.data for e in batch[:3]] == [events[i]["data"] for i in range(3)]
    assert [(e.agent, e.data) for e in log.tail(500)] == [(e["agent"], e["data"]) for e in events]
    log.flush()
    assert [json.loads(r["data"]) for r in log._store.query(f"SELECT data FROM {EVENTS_TABLE} ORDER BY seq")][1:] \
        == [e["data"] for e in events]
    report = log.verify()
    assert report.ok and report.events == 501, report.reason


def test_append_many_matches_append_and_the_slow_path_event_for_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same events through a batch (fast path), one by one, and one by one with the fast paths switched off
    get the same hashes (the clock is fixed): the chain does not depend on the path taken."""
    accepted = [data for data in NASTY if slow_text(data) is not None]
    plain = [{"kind": "tool", "agent": "a", "data": d} for d in accepted if batch_text(d) is not None]
    plain.append({"kind": "tool", "agent": "ä", "run_id": "r\udc80", "tool": "t\ud800", "data": {"i": 1}})
    assert batch_module._prepare_plain_batch(plain) is not None
    odd = [{"kind": "tool", "agent": "ä", "tool": "t\ud800", "data": d} for d in accepted if batch_text(d) is None]
    assert len(plain) > 5 and len(odd) > 10
    monkeypatch.setattr(audit_module.time, "time", lambda: 1_700_000_000.25)
    hashes: dict[str, list[str]] = {}
    for mode in ("batch", "single", "slow"):
        if mode == "slow":
            monkeypatch.setattr(batch_module, "_fast_canonical", lambda data: None)
            monkeypatch.setattr(batch_module, "_prepare_plain_batch", lambda events: None)
        store = open_store(f"duckdb://{tmp_path / mode}.duckdb")
        with AuditLog(store, signer=Ed25519Signer("batch-key"), journal_path=None) as audit:
            if mode == "batch":
                events = [*audit.append_many(plain), *audit.append_many(odd)]
            else:
                events = [audit.append(**event) for event in plain + odd]
            assert audit.verify().ok
            hashes[mode] = [e.hash for e in events]
            if mode == "batch":
                assert [e.data for e in events] == [json.loads(slow_text(e["data"]) or "") for e in plain + odd]
        store.close()
    assert hashes["batch"] == hashes["single"] == hashes["slow"]


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([{"kind": "tool"}, {"kind": "tool", "data": {"x": float("nan")}}], "event 1: .*NaN"),
        ([{"kind": "tool"}, {"agent": "a"}], "event 1: kind is required"),
        ([{"kind": "tool", "colour": "red"}], "event 0: unknown field"),
        ([{"kind": "audit"}], "event 0: .*reserved"),
        ([{"kind": "tool"}, "tool"], "event 1: an event must be a mapping"),
        ([{"kind": "tool", "agent": 7}], "event 0: audit agent must be a string"),
        ([{"kind": "tool", "data": [1]}], "event 0: audit data must be a mapping"),
    ],
)
def test_an_invalid_event_refuses_the_whole_batch(log: AuditLog, events: list[Any], message: str) -> None:
    with pytest.raises(AuditError, match=message):
        log.append_many(events)
    assert log.tail() == []
    assert list(log.append_many([])) == []
    assert log.append("run").seq == 1


async def test_aappend_many_interleaves_with_single_appends_and_threads(log: AuditLog) -> None:
    seen: list[AuditEvent] = []
    batches: list[list[AuditEvent]] = []
    lock = threading.Lock()

    def thread_worker(w: int) -> None:
        for i in range(10):
            if i % 3:
                event = log.append("tool", agent=f"thread{w}", data={"i": i})
                with lock:
                    seen.append(event)
            else:
                batch = list(log.append_many([{"kind": "tool", "agent": f"thread{w}", "data": {"i": i, "j": j}}
                                              for j in range(25)]))
                with lock:
                    batches.append(batch)

    async def task(t: int) -> None:
        for i in range(6):
            if i % 2:
                seen.append(await log.aappend("model", agent=f"task{t}", data={"i": i}))
            else:
                batches.append(list(await log.aappend_many(
                    {"kind": "model", "agent": f"task{t}", "data": {"i": i, "j": j}} for j in range(40))))

    threads = [threading.Thread(target=thread_worker, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    await asyncio.gather(*(task(t) for t in range(8)))
    await asyncio.to_thread(lambda: [thread.join() for thread in threads])

    for batch in batches:  # each batch is contiguous, in the order given
        assert [e.seq for e in batch] == list(range(batch[0].seq, batch[0].seq + len(batch)))
        assert [e.data["j"] for e in batch] == list(range(len(batch)))
    everything = sorted(seen + [e for b in batches for e in b], key=lambda e: e.seq)
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert len(everything) == 4 * (6 + 4 * 25) + 8 * (3 + 3 * 40)
    for before, after in itertools.pairwise(everything):
        assert after.prev_hash == before.hash
    report = log.verify()
    assert report.ok and report.events == len(everything), report.reason


async def test_cancelled_aappend_many_is_still_recorded(log: AuditLog) -> None:
    task = asyncio.create_task(log.aappend_many([{"kind": "tool", "data": {"i": i}} for i in range(3)]))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await log.aappend("run")
    assert [e.data for e in log.tail()] == [{"i": 0}, {"i": 1}, {"i": 2}, {}]


def test_append_many_without_journal_is_one_store_transaction(tmp_path: Path) -> None:
    class Counting(Store):
        def __init__(self) -> None:
            self.inner = open_store("memory://")
            self.uri = self.inner.uri
            self.inserts = 0

        def execute(self, sql: str, params: Any = ()) -> None:
            self.inner.execute(sql, params)

        def append(self, table: str, rows: Any) -> None:
            self.inserts += table == EVENTS_TABLE
            self.inner.append(table, rows)

        def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
            return self.inner.query(sql, params)

    store = Counting()
    with AuditLog(store, signer=Ed25519Signer("batch-key"), journal_path=None) as audit:
        batch = audit.append_many([{"kind": "tool", "data": {"i": i}} for i in range(200)])
        assert store.inserts == 1 and batch.last_seq == 200
        assert audit.verify().ok


def test_append_many_after_close_is_refused(log: AuditLog) -> None:
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append_many([{"kind": "tool"}])


# ---------------------------------------------------------------------------------------------- crash recovery
BATCH_CHILD = """
import os, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from stitchwork.data._base import open_store
from stitchwork.audit.log import AuditLog
class Signer:  # the test module's Signer (same key)
    key_id = "batch-key"
    def sign(self, data):
        return Ed25519PrivateKey.from_private_bytes(bytes(range(32))).sign(data)
store = open_store("duckdb://" + sys.argv[1])
log = AuditLog(store, signer=Signer(), journal_path=Path(sys.argv[2]), flush_ms=1e9)
for i in range(3):
    log.append("run", data={"before": i})
log.append_many([{"kind": "tool", "data": {"i": i, "pad": "x" * 40}} for i in range(int(sys.argv[3]))])
os._exit(0)
"""
BATCH = 200


@pytest.fixture(scope="module")
def crashed_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A child that appended 3 events, then one batch of BATCH, and died without copying to the store."""
    directory = tmp_path_factory.mktemp("crashed_batch")
    argv = [sys.executable, "-c", BATCH_CHILD, str(directory / "audit.duckdb"),
            str(directory / "audit.journal"), str(BATCH)]
    assert subprocess.run(argv, timeout=60).returncode == 0
    return directory


@pytest.mark.parametrize("cut", ["line_boundary", "mid_line", "zeroed_page"])
def test_batch_cut_mid_journal_write_recovers_a_prefix(
    crashed_batch: Path, tmp_path: Path, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = Path(shutil.copytree(crashed_batch, tmp_path / "crashed"))
    journal = directory / "audit.journal"
    content = journal.read_bytes().rstrip(b"\0")
    lines = content.split(b"\n")[:-1]
    assert len(lines) == 3 + BATCH
    keep = 3 + BATCH // 2  # complete lines that reached the disk: the 3 earlier events and half the batch
    head = b"".join(line + b"\n" for line in lines[:keep])
    rest = b"".join(line + b"\n" for line in lines[keep:])
    if cut == "line_boundary":
        damaged = head
    elif cut == "mid_line":
        damaged = head + rest[:70]
    else:  # a page in the middle of the write never reached the disk; later pages did
        damaged = head + bytes(4096) + rest[4096 + 10 :]
    journal.write_bytes(damaged + bytes(1000))

    store = open_store(f"duckdb://{directory / 'audit.duckdb'}")
    try:
        with caplog.at_level(logging.WARNING, logger="stitchwork.audit.journal"):
            audit = AuditLog(store, signer=Ed25519Signer("batch-key"), journal_path=journal)
        try:
            events = audit.tail(1000)
            assert [e.data for e in events[:3]] == [{"before": i} for i in range(3)]  # acknowledged: all kept
            recovered = [e.data["i"] for e in events[3:]]
            assert recovered == list(range(BATCH // 2))  # a prefix of the batch, no gap, nothing reordered
            assert ("torn final line" in caplog.text) == (cut == "mid_line")
            assert ("zeroed gap" in caplog.text) == (cut == "zeroed_page")
            after = audit.append("run", data={"after": True})
            assert after.seq == 3 + BATCH // 2 + 1 and after.prev_hash == events[-1].hash
            report = audit.verify()
            assert report.ok and report.events == after.seq, report.reason
        finally:
            audit.close()
    finally:
        store.close()


def test_complete_batch_in_the_journal_is_recovered_whole(crashed_batch: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(crashed_batch, tmp_path / "crashed"))
    store = open_store(f"duckdb://{directory / 'audit.duckdb'}")
    try:
        assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}") == [{"n": 0}]  # only in the journal
        with AuditLog(store, signer=Ed25519Signer("batch-key"), journal_path=directory / "audit.journal") as audit:
            assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}") == [{"n": 3 + BATCH}]
            report = audit.verify()
            assert report.ok and report.events == 3 + BATCH and report.head_seq == 3 + BATCH, report.reason
    finally:
        store.close()
