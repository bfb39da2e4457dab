"""Ready reports on every store adapter: the same events give the same rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from stitchwork.agents.runs import DatabaseRunStore, RunStatus
from stitchwork.audit.log import AuditLog
from stitchwork.audit.reports import REPORTS, run_report
from stitchwork.data._base import Store
from stitchwork.errors import StoreError
from tests.signing import Ed25519Signer


def seed(store: Store) -> None:
    with AuditLog(store, signer=Ed25519Signer("k1"), journal_path=None) as log:
        for run in ("r1", "r2"):
            log.append("decision", agent="a", run_id=run, tool="send_email", decision="deny",
                       data={"policy_ids": ["external-tainted-target"], "effect": "deny"})
        log.append("decision", agent="a", run_id="r1", tool="send_email", decision="deny",
                   data={"policy_ids": ["p1", "p2"]})
        log.append("decision", agent="b", run_id="r3", tool="nope", decision="deny",
                   data={"error": "unknown_tool", "reason": "no such tool"})
        log.append("decision", agent="a", run_id="r1", tool="read_email", decision="allow",
                   data={"policy_ids": ["read-ok"]})
        log.append("approval", agent="a", run_id="r1", tool="send_email", decision="ask", data={"approval_id": "x1"})
        log.append("approval", agent="a", run_id="r1", tool="send_email", decision="ask", data={"approval_id": "x2"})
        log.append("approval", agent="a", run_id="r1", tool="send_email", decision="approved",
                   data={"approval_id": "x1", "latency_s": 1.5})
        log.append("approval", agent="a", run_id="r1", tool="send_email", decision="denied",
                   data={"approval_id": "x2", "latency_s": 3.5})
        for ms in (10.0, 20.0, 30.0):
            log.append("tool", agent="a", run_id="r1", tool="read_email", decision="ok", data={"duration_ms": ms})
        log.append("tool", agent="b", run_id="r3", tool="send_email", decision="error", data={"duration_ms": 5.0})
        for _ in range(2):
            log.append("model", agent="a", run_id="r1", decision="ok",
                       data={"model": "scripted://tester.jsonl", "prompt_tokens": 10, "completion_tokens": 5})
        log.append("model", agent="b", run_id="r3", decision="ok",
                   data={"model": "openai+http://127.0.0.1:8000/v1", "prompt_tokens": 100, "completion_tokens": 50})
    runs = DatabaseRunStore(store)
    first = runs.create("a", "task", "scripted://x")
    runs.create("a", "task", "scripted://x")
    runs.save(replace(first, status=RunStatus.COMPLETED, steps=4))


@pytest.fixture
def seeded(store: Store) -> Store:
    seed(store)
    return store


def test_reports_on_the_same_events_agree_on_every_adapter(seeded: Store) -> None:
    denied = [{k: r[k] for k in ("agent", "rule", "denied", "runs")} for r in run_report(seeded, "denied")]
    assert denied == [
        {"agent": "a", "rule": "external-tainted-target", "denied": 2, "runs": 2},
        {"agent": "a", "rule": "p1", "denied": 1, "runs": 1},
        {"agent": "a", "rule": "p2", "denied": 1, "runs": 1},
        {"agent": "b", "rule": "unknown_tool", "denied": 1, "runs": 1},
    ]
    assert run_report(seeded, "approvals") == [
        {"agent": "a", "tool": "send_email", "requested": 2, "approved": 1, "denied": 1, "expired": 0,
         "avg_latency_s": 2.5, "p50_latency_s": 2.5, "max_latency_s": 3.5}]
    assert run_report(seeded, "tools") == [
        {"tool": "read_email", "outcome": "ok", "calls": 3, "agents": 1, "avg_ms": 20.0, "max_ms": 30.0},
        {"tool": "send_email", "outcome": "error", "calls": 1, "agents": 1, "avg_ms": 5.0, "max_ms": 5.0},
    ]
    assert run_report(seeded, "tokens") == [
        {"agent": "b", "provider": "openai", "model": "openai+http://127.0.0.1:8000/v1", "calls": 1,
         "prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
        {"agent": "a", "provider": "scripted", "model": "scripted://tester.jsonl", "calls": 2,
         "prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
    ]
    runs = [{k: r[k] for k in ("agent", "outcome", "runs")} for r in run_report(seeded, "runs")]
    assert runs == [{"agent": "a", "outcome": "completed", "runs": 1}, {"agent": "a", "outcome": "running", "runs": 1}]


def test_time_bounds_and_unknown_report(seeded: Store) -> None:
    assert run_report(seeded, "denied", since=4e9) == []
    assert len(run_report(seeded, "denied", until=4e9)) == 4
    with pytest.raises(StoreError, match="unknown report"):
        run_report(seeded, "nope")
    assert set(REPORTS) == {"denied", "approvals", "tools", "tokens", "runs"}


def test_facts_are_incremental_and_repair_a_cut_short_refresh(seeded: Store) -> None:
    from stitchwork.audit.reports import refresh_facts

    assert run_report(seeded, "denied")[0]["denied"] == 2
    assert refresh_facts(seeded) == 0
    with AuditLog(seeded, signer=Ed25519Signer("k1"), journal_path=None) as log:
        log.append("decision", agent="a", run_id="r9", tool="send_email", decision="deny",
                   data={"policy_ids": ["external-tainted-target"]})
    assert refresh_facts(seeded) == 1
    # a refresh that inserted but died before moving its mark: the next one must not double count
    seeded.execute("INSERT INTO audit_rollup_state (name, seq) VALUES ('facts', ?) ON CONFLICT (name) DO UPDATE "
                   "SET seq = excluded.seq", [3])
    rows = run_report(seeded, "denied")
    assert rows[0] == {**rows[0], "agent": "a", "rule": "external-tainted-target", "denied": 3, "runs": 3}
    assert sum(r["denied"] for r in rows) == 6


def _append_batch(store: Store, round_: int) -> None:
    """A batch of every kind of event the reports read, different in each round (new groups and old ones)."""
    with AuditLog(store, signer=Ed25519Signer("k1"), journal_path=None) as log:  # queued, stored together on close
        for i in range(6):
            agent, run = f"agent{(round_ + i) % 3}", f"run{round_}-{i % 2}"
            log.append_nowait("tool", agent=agent, run_id=run, tool=f"tool{i % 3}", decision=("ok", "error")[i % 2],
                              data={"duration_ms": float(round_ * 10 + i)} if i % 4 else {})
            log.append_nowait("model", agent=agent, run_id=run, decision="ok",
                              data={"model": f"openai+http://h/v1/m{(round_ + i) % 2}",
                                    "prompt_tokens": 10 * i + round_, "completion_tokens": i}
                              if i % 5 else {"prompt_tokens": 3})
            log.append_nowait("approval", agent=agent, run_id=run, tool="send_email", decision="ask", data={})
            log.append_nowait("approval", agent=agent, run_id=run, tool="send_email",
                              decision=("approved", "denied", "expired")[i % 3], data={"latency_s": 0.5 * (round_ + i)})
            log.append_nowait("decision", agent=agent, run_id=run, tool="send_email", decision="deny",
                              data={"policy_ids": [f"rule{i % 2}", "rule-x"]} if i % 3 else {"error": "unknown_tool"})
            log.append_nowait("decision", agent=agent, run_id=run, tool="read", decision="allow", data={})
        # the same run denied again in every round: its runs count must not grow
        log.append_nowait("decision", agent="agent0", run_id="run-long", tool="send_email", decision="deny",
                          data={"policy_ids": ["rule-long"]})
    assert store.query("SELECT count(*) AS n FROM audit_events")[0]["n"] == 37 * (round_ + 1)


def test_incremental_rollup_equals_a_full_recomputation(store: Store) -> None:
    from stitchwork.audit.reports import refresh_facts, reset_facts

    names = [name for name, report in REPORTS.items() if report.facts]
    incremental: dict[str, list[dict[str, object]]] = {}
    for round_ in range(4):  # several appends, each folded into the rollup by the report that follows it
        _append_batch(store, round_)
        incremental = {name: run_report(store, name) for name in names}
        assert refresh_facts(store) == 0
    assert incremental["tools"] and incremental["approvals"] and incremental["tokens"] and incremental["denied"]
    scanned = {name: run_report(store, name, rollup=False) for name in names}  # the fact tables, no rollup
    reset_facts(store)
    rebuilt = {name: run_report(store, name) for name in names}  # one refresh from scratch
    assert incremental == scanned == rebuilt
    long = [r for r in rebuilt["denied"] if r["rule"] == "rule-long"]
    assert [(r["denied"], r["runs"]) for r in long] == [(4, 1)]
    bounded = {name: run_report(store, name, since=0.0) for name in names}  # time bounds read the facts
    assert bounded == rebuilt
    assert max(r["p50_latency_s"] for r in rebuilt["approvals"]) > 0  # the median is exercised, not all NULL


def test_reports_keep_events_compacted_before_any_report(store: Store, tmp_path: Path) -> None:
    pytest.importorskip("pyiceberg", reason="needs pip install 'stitchwork[iceberg]'")
    from stitchwork.audit.retention import compact_audit
    from stitchwork.data.iceberg import IcebergArchive

    with AuditLog(store, signer=Ed25519Signer("k1"), journal_path=None) as log:
        for i in range(12):
            log.append("tool", agent="a", run_id="r", tool="read", decision="ok", data={"duration_ms": float(i)})
    archive = IcebergArchive(f"iceberg+sqlite:///{tmp_path}/catalog.db?warehouse=file://{tmp_path}/wh")
    assert compact_audit(store, archive, Ed25519Signer("k1"), upto_seq=10).deleted == 10  # no report has run yet
    assert [r["calls"] for r in run_report(store, "tools")] == [12]
    assert [r["calls"] for r in run_report(store, "tools", rollup=False)] == [12]


def test_rollup_ddl_is_shared_by_the_clickhouse_adapters() -> None:
    from stitchwork.audit.reports import ROLLUP

    ddl = ROLLUP.clickhouse_ddl("db")  # chdb and the ClickHouse server both render this
    assert "ENGINE = AggregatingMergeTree ORDER BY (`report`, `k1`, `k2`, `k3`, `k4`, `kv`)" in ddl
    assert "`n` SimpleAggregateFunction(sum, Int64)" in ddl
    assert "`lo` SimpleAggregateFunction(min, Nullable(Float64))" in ddl
    assert "`mark` SimpleAggregateFunction(max, Int64)" in ddl
    assert "`report` LowCardinality(String)" in ddl
    assert "PRIMARY KEY (report, k1, k2, k3, k4, kv)" in ROLLUP.duckdb_ddl()[0]
