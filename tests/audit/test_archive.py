"""Iceberg export (incremental, read back with pyiceberg and DuckDB), compaction with a checkpoint, retention."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import pytest

from stitchwork.audit.log import AuditLog
from stitchwork.audit.records import EVENTS_TABLE
from stitchwork.audit.retention import (
    RetentionPolicy,
    apply_retention,
    compact_audit,
    latest_checkpoint,
    verify_across,
)
from stitchwork.data._base import Store
from stitchwork.data.iceberg import IcebergArchive
from stitchwork.errors import AuditError, StoreError
from tests.signing import Ed25519Signer

pytest.importorskip("pyiceberg", reason="needs pip install 'stitchwork[iceberg]'")


@pytest.fixture(autouse=True)
def _not_twice_on_duckdb(store_backend: str) -> None:
    if store_backend == "memory":
        pytest.skip("memory:// is the DuckDB engine in RAM; the archive tests run on duckdb:// (saves CI time)")


@pytest.fixture
def archive_uri(tmp_path: Path) -> str:
    return f"iceberg+sqlite:///{tmp_path}/catalog.db?warehouse=file://{tmp_path}/wh"


def _append(store: Store, n: int, start_agent: int = 0) -> None:
    with AuditLog(store, signer=Ed25519Signer("k1"), journal_path=None) as log:
        for i in range(n):
            log.append("tool", agent=f"agent{(i + start_agent) % 3}", tool="read", decision="ok", data={"i": i})


def _stored(store: Store) -> list[dict[str, object]]:
    return store.query(f"SELECT seq, ts, kind, agent, run_id, tool, decision, data, prev_hash, hash "
                       f"FROM {EVENTS_TABLE} ORDER BY seq")


def test_export_is_incremental_and_reads_back_identically(store: Store, archive_uri: str) -> None:
    _append(store, 25)
    archive = IcebergArchive(archive_uri)
    first = archive.export(store, batch_rows=10)
    assert (first.exported, first.first_seq, first.last_seq, first.snapshots) == (25, 1, 25, 3)
    again = IcebergArchive(archive_uri).export(store)
    assert again.exported == 0 and again.last_seq == 25
    _append(store, 7)
    more = IcebergArchive(archive_uri).export(store)
    assert (more.exported, more.first_seq, more.last_seq) == (7, 26, 32)

    reopened = IcebergArchive(archive_uri)
    table = reopened.scan()
    cols = ["seq", "ts", "kind", "agent", "run_id", "tool", "decision", "data", "prev_hash", "hash"]
    assert table.select(cols).to_pylist() == _stored(store)
    arrow = reopened.table().scan().to_arrow()  # noqa: F841 - read by name below
    by_duckdb = duckdb.sql("SELECT seq, hash FROM arrow ORDER BY seq").fetchall()
    assert by_duckdb == [(r["seq"], r["hash"]) for r in _stored(store)]
    assert [f.name for f in reopened.table().spec().fields] == ["event_day"]
    assert reopened.table().properties["stitchwork.exported-seq"] == "32"


def test_export_since_starts_later_and_refuses_gaps(store: Store, archive_uri: str) -> None:
    _append(store, 10)
    cut_ts = store.query(f"SELECT ts FROM {EVENTS_TABLE} WHERE seq = 10")[0]["ts"]
    archive = IcebergArchive(archive_uri)
    report = archive.export(store, since=cut_ts)
    assert report.first_seq == 10 and archive.first_seq() == 10
    _append(store, 5)
    store.execute(f"DELETE FROM {EVENTS_TABLE} WHERE seq = 13")
    with pytest.raises(StoreError, match="not contiguous"):
        archive.export(store)


def test_compaction_keeps_the_chain_verifiable_across_archive_and_store(store: Store, archive_uri: str) -> None:
    _append(store, 40)
    archive = IcebergArchive(archive_uri)
    report = compact_audit(store, archive, Ed25519Signer("k1"), upto_seq=30)
    assert (report.exported, report.checkpoint_seq, report.deleted) == (30, 30, 30)
    assert store.query(f"SELECT min(seq) AS lo FROM {EVENTS_TABLE}") == [{"lo": 31}]
    _append(store, 5)  # the live log carries on after compaction
    result = verify_across(store, Ed25519Signer("k1"))
    assert result.ok, result.reason
    assert result.events == 45 and result.head_seq == 45
    again = compact_audit(store, archive, Ed25519Signer("k1"), upto_seq=40)
    assert again.checkpoint_seq == 40 and latest_checkpoint(store).seq == 40  # type: ignore[union-attr]
    assert verify_across(store, Ed25519Signer("k1")).ok


def test_tampering_on_either_side_of_the_checkpoint_is_found(store: Store, archive_uri: str) -> None:
    _append(store, 30)
    archive = IcebergArchive(archive_uri)
    compact_audit(store, archive, Ed25519Signer("k1"), upto_seq=20)
    store.execute(f"UPDATE {EVENTS_TABLE} SET decision = 'allow' WHERE seq = 25")
    bad = verify_across(store, Ed25519Signer("k1"))
    assert not bad.ok and bad.first_bad_seq == 25
    store.execute("UPDATE audit_checkpoints SET signature = '00' WHERE seq = 20")
    forged = verify_across(store, Ed25519Signer("k1"))
    assert not forged.ok and forged.first_bad_seq == 20 and "checkpoint" in forged.reason


def test_tampered_archive_is_found(store: Store, archive_uri: str, tmp_path: Path) -> None:
    _append(store, 12)
    archive = IcebergArchive(archive_uri)
    compact_audit(store, archive, Ed25519Signer("k1"), upto_seq=10)
    table = archive.table()
    data = table.scan().to_arrow()
    edited = data.to_pylist()
    edited[4]["decision"] = "deny"  # seq 5
    import pyarrow as pa

    table.overwrite(pa.Table.from_pylist(edited, schema=data.schema))
    report = verify_across(store, Ed25519Signer("k1"))
    assert not report.ok and report.first_bad_seq == 5 and "archive" in report.reason


def test_compaction_refuses_an_archive_that_does_not_verify(store: Store, archive_uri: str) -> None:
    _append(store, 10)
    store.execute(f"UPDATE {EVENTS_TABLE} SET decision = 'allow' WHERE seq = 3")
    with pytest.raises(AuditError, match="event 3"):
        compact_audit(store, IcebergArchive(archive_uri), Ed25519Signer("k1"), upto_seq=8)
    assert store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE}") == [{"n": 10}]


def test_retention_deletes_old_rows_but_never_audit_events(store: Store) -> None:
    store.execute("CREATE TABLE IF NOT EXISTS runs2 (id VARCHAR PRIMARY KEY, status VARCHAR NOT NULL, "
                  "updated_at DOUBLE NOT NULL)")
    now = time.time()
    store.append("runs2", [{"id": "old-done", "status": "completed", "updated_at": now - 100 * 86400},
                           {"id": "old-running", "status": "running", "updated_at": now - 100 * 86400},
                           {"id": "new-done", "status": "completed", "updated_at": now}])
    policy = RetentionPolicy("runs2", "updated_at", 90, "status <> 'running'")
    assert apply_retention(store, [policy], now=now) == {"runs2": 1}
    assert [r["id"] for r in store.query("SELECT id FROM runs2 ORDER BY id")] == ["new-done", "old-running"]
    with pytest.raises(StoreError, match="compact"):
        apply_retention(store, [RetentionPolicy(EVENTS_TABLE, "ts", 1)])
