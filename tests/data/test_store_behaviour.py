"""One behaviour suite for the Store port and the audit chain on it, run on every adapter this host supports."""

from __future__ import annotations

from pathlib import Path

import pytest

from stitchwork.audit.log import AuditLog
from stitchwork.audit.records import EVENTS_TABLE, SIGNED_HEAD_TABLE
from stitchwork.data._base import Store
from stitchwork.data.schema import Column, Table
from stitchwork.errors import StoreError
from tests.plugins.stores import StoreFactory
from tests.signing import Ed25519Signer

THINGS = Table("things", (Column("id", "VARCHAR", False), Column("n", "BIGINT", False), Column("x", "DOUBLE"),
                          Column("ok", "BOOLEAN")), key=("id",))


# ------------------------------------------------------------------------------------------------ the port
def test_append_and_query_round_trip_types(store: Store) -> None:
    store.ensure(THINGS)
    tricky = "it's a \\ back'slash\n“quoted” \u00e9"
    rows = [{"id": "a", "n": 2**40, "x": 0.1 + 0.2, "ok": True}, {"id": tricky, "n": -1, "x": None, "ok": False}]
    store.append("things", rows)
    got = store.query("SELECT id, n, x, ok FROM things ORDER BY n DESC")
    assert got == rows
    assert type(got[0]["n"]) is int and type(got[0]["x"]) is float and got[0]["x"] == 0.30000000000000004
    assert store.query("SELECT id FROM things WHERE id = ?", [tricky]) == [{"id": tricky}]


def test_platform_ddl_is_translated_and_upsert_keeps_the_newest(store: Store) -> None:
    store.execute("CREATE TABLE IF NOT EXISTS heads (key_id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL, sig VARCHAR)")
    store.execute("CREATE TABLE IF NOT EXISTS heads (key_id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL, sig VARCHAR)")
    upsert = ("INSERT INTO heads (key_id, seq, sig) VALUES (?, ?, ?) ON CONFLICT (key_id) DO UPDATE SET "
              "seq = excluded.seq, sig = excluded.sig")
    for seq in (1, 5, 3):
        store.execute(upsert, ["k", seq, f"s{seq}"])
    store.execute(upsert, ["other", 9, None])
    assert store.query("SELECT key_id, seq, sig FROM heads ORDER BY key_id") == [
        {"key_id": "k", "seq": 3, "sig": "s3"}, {"key_id": "other", "seq": 9, "sig": None}]


def test_update_and_delete(store: Store) -> None:
    store.ensure(THINGS)
    store.append("things", [{"id": str(i), "n": i, "x": float(i), "ok": False} for i in range(5)])
    store.execute("UPDATE things SET ok = ?, x = ? WHERE n >= ?", [True, 9.5, 3])
    store.execute("DELETE FROM things WHERE n = ?", [0])
    got = store.query("SELECT n, x, ok FROM things ORDER BY n")
    assert got == [{"n": 1, "x": 1.0, "ok": False}, {"n": 2, "x": 2.0, "ok": False},
                   {"n": 3, "x": 9.5, "ok": True}, {"n": 4, "x": 9.5, "ok": True}]


def test_aggregates_over_no_rows_are_null(store: Store) -> None:
    store.ensure(THINGS)
    assert store.query("SELECT count(*) AS c, min(n) AS lo, max(n) AS hi FROM things") == [
        {"c": 0, "lo": None, "hi": None}]


def test_errors_are_store_errors(store: Store) -> None:
    with pytest.raises(StoreError):
        store.query("SELECT nope FROM no_such_table")
    store.ensure(THINGS)
    with pytest.raises(StoreError):
        store.append("no_such_table", [{"a": 1}])


def test_question_marks_inside_literals_are_not_placeholders(store: Store) -> None:
    store.ensure(THINGS)
    store.append("things", [{"id": "what?", "n": 1, "x": None, "ok": None}])
    assert store.query("SELECT n FROM things WHERE id = 'what?' AND n = ?", [1]) == [{"n": 1}]


def test_append_columns_round_trips_and_checks_lengths(store: Store) -> None:
    store.ensure(THINGS)
    tricky = "it's a \\ back'slash\n“quoted” \u00e9"
    store.append_columns("things", {"id": ["a", tricky, "c"], "n": [2**40, -1, 0], "x": [0.1 + 0.2, None, 1.5],
                                    "ok": [True, False, None]})
    store.append_columns("things", {"id": [], "n": [], "x": [], "ok": []})  # nothing to insert
    got = store.query("SELECT id, n, x, ok FROM things ORDER BY n DESC")
    assert got == [{"id": "a", "n": 2**40, "x": 0.30000000000000004, "ok": True},
                   {"id": "c", "n": 0, "x": 1.5, "ok": None}, {"id": tricky, "n": -1, "x": None, "ok": False}]
    with pytest.raises(StoreError):
        store.append_columns("things", {"id": ["d", "e"], "n": [1], "x": [None, None], "ok": [True, True]})
    assert store.query("SELECT count(*) AS c FROM things") == [{"c": 3}]


# ------------------------------------------------------------------------------------------------ the audit chain
def _fill(make_store: StoreFactory, tmp_path: Path, n: int = 30) -> None:
    with AuditLog(make_store(), signer=Ed25519Signer("k1"), journal_path=tmp_path / "audit.journal", flush_ms=5) as log:
        for i in range(n):
            log.append("tool", agent=f"agent{i % 3}", run_id=f"r{i // 10}", tool=("read", "send")[i % 2],
                       decision="ok", data={"i": i, "text": "it's \\ “ok”", "ts": 0.1 * i})


def _verify(make_store: StoreFactory, tmp_path: Path) -> tuple[bool, int | None, str]:
    with AuditLog(make_store(), signer=Ed25519Signer("k1"), journal_path=tmp_path / "audit.journal") as log:
        report = log.verify()
    return report.ok, report.first_bad_seq, report.reason


def test_audit_append_verify_and_reopen_continue_the_chain(make_store: StoreFactory, tmp_path: Path) -> None:
    _fill(make_store, tmp_path, 30)
    with AuditLog(make_store(), signer=Ed25519Signer("k1"), journal_path=tmp_path / "audit.journal") as log:
        event = log.append("model", agent="agent0", data={"prompt_tokens": 3})
        assert event.seq == 31
        assert [e.seq for e in log.tail(3)] == [29, 30, 31]
        report = log.verify()
    assert report.ok, report.reason
    assert report.events == 31 and report.head_seq == 31 and report.head_signed


def test_audit_batches_interleaved_with_single_appends(make_store: StoreFactory, tmp_path: Path) -> None:
    with AuditLog(make_store(), signer=Ed25519Signer("k1"), journal_path=tmp_path / "audit.journal", flush_ms=5) as log:
        log.append("run", agent="a")
        batch = log.append_many({"kind": "tool", "agent": "a", "data": {"i": i, "x": i / 8}} for i in range(300))
        log.append("run", agent="a", data={"end": True})
        assert (batch.first_seq, batch.last_seq) == (2, 301)
        log.flush()
        report = log.verify()
        assert report.ok and report.events == 302, report.reason
        assert [e.data for e in log.tail(302)[1:301]] == [{"i": i, "x": i / 8} for i in range(300)]


def test_audit_without_journal(make_store: StoreFactory) -> None:
    with AuditLog(make_store(), signer=Ed25519Signer("k1"), journal_path=None) as log:
        for i in range(5):
            log.append("tool", agent="a", data={"i": i})
        assert log.verify().ok


@pytest.mark.parametrize(("tamper", "bad_seq"), [
    (f"UPDATE {EVENTS_TABLE} SET decision = 'allow' WHERE seq = 7", 7),
    (f"UPDATE {EVENTS_TABLE} SET data = '{{\"i\": 99}}' WHERE seq = 12", 12),
    (f"DELETE FROM {EVENTS_TABLE} WHERE seq = 9", 9),
    (f"DELETE FROM {EVENTS_TABLE} WHERE seq >= 28", 28),
    (f"UPDATE {SIGNED_HEAD_TABLE} SET signature = '00' WHERE seq = 30", 30),
], ids=["edited-field", "edited-data", "deleted", "truncated", "forged-head"])
def test_audit_tampering_is_found_with_its_seq(
    make_store: StoreFactory, tmp_path: Path, tamper: str, bad_seq: int
) -> None:
    _fill(make_store, tmp_path, 30)
    make_store().execute(tamper)
    ok, first_bad, reason = _verify(make_store, tmp_path)
    assert not ok
    assert first_bad == bad_seq, reason


def test_audit_inserted_duplicate_is_found(make_store: StoreFactory, tmp_path: Path) -> None:
    _fill(make_store, tmp_path, 20)
    store = make_store()
    row = store.query(f"SELECT * FROM {EVENTS_TABLE} WHERE seq = 5")[0]
    store.append(EVENTS_TABLE, [{**row, "agent": "intruder"}])
    ok, first_bad, _ = _verify(make_store, tmp_path)
    assert not ok and first_bad == 5
