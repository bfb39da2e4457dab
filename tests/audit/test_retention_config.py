"""Retention from config: ``[data.retention]`` (TOML and environment) → policies → rows removed, memory expired,
the audit log compacted into Iceberg, and ``audit verify`` still passing across archive and live store."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from stitchwork.agents.runs import RunStatus
from stitchwork.audit.retention import DEFAULT_POLICIES, latest_checkpoint, policies_from
from stitchwork.config import DataConfig, RetentionConfig, load_config
from stitchwork.errors import ConfigError
from stitchwork.platform import Platform
from stitchwork.security.taint import Label
from stitchwork.service import audit as api

DAY = 86400.0


def test_section_from_toml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "stitchwork.toml"
    path.write_text('[data]\naudit_flush_ms = 10\n[data.retention]\nruns_days = 7\nmemory_days = 30\n'
                    'audit_archive = "iceberg+sqlite:///c.db?warehouse=file:///wh"\n')
    config = load_config(path, environ={"STITCHWORK_DATA__RETENTION__RUNS_DAYS": "3",
                                        "STITCHWORK_DATA__RETENTION__INTERVAL_S": "60"})
    assert config.data.audit_flush_ms == 10
    assert config.data.retention == RetentionConfig(runs_days=3, memory_days=30, interval_s=60,
                                                    audit_archive="iceberg+sqlite:///c.db?warehouse=file:///wh")
    with pytest.raises(ConfigError, match="runs_dayz"):
        load_config(path, environ={"STITCHWORK_DATA__RETENTION__RUNS_DAYZ": "3"})
    with pytest.raises(ConfigError, match="expected float"):
        load_config(path, environ={"STITCHWORK_DATA__RETENTION__RUNS_DAYS": "soon"})


def test_policies_follow_the_section() -> None:
    assert policies_from(RetentionConfig()) == DEFAULT_POLICIES
    chosen = {p.table: p.max_age_days for p in policies_from(RetentionConfig(runs_days=2, approvals_days=0))}
    assert chosen == {"runs": 2, "run_provenance": 2, "revoked_tokens": 1, "a2a_tasks": 90}


async def _finished_run(platform: Platform) -> str:
    record = await platform.runner.start("tester", "say done")
    assert record.status is RunStatus.COMPLETED
    return record.id


async def test_config_policy_effect_and_verify_after_compaction(make_config: Any, tmp_path: Path) -> None:
    pytest.importorskip("pyiceberg", reason="audit compaction needs pip install 'stitchwork[iceberg]'")
    base = make_config([{"content": "done"}], sandbox="inline://")
    archive = f"iceberg+sqlite:///{tmp_path}/catalog.db?warehouse=file://{tmp_path}/wh"
    retention = RetentionConfig(runs_days=1, memory_days=1, audit_days=1, audit_archive=archive)
    config = base.replace(data=dataclasses.replace(base.data, retention=retention))
    platform = Platform.open(config)
    try:
        run_id = await _finished_run(platform)
        assert platform.memory is not None
        platform.memory.put("tester", "note", text="remember the milk", labels=[Label("user", True)])
        live = platform.runner.create("tester", "still going")  # a running run is never removed

        same_day = api.retain(platform)
        assert same_day["runs"] == 0 and same_day["memory_items"] == 0 and same_day["audit_events"] == 0
        assert platform.runs.get(run_id) and platform.memory.keys("tester") == ["note"]

        removed = api.retain(platform, now=time.time() + 2 * DAY)
        assert removed["runs"] == 1 and removed["memory_items"] == 1 and removed["audit_events"] > 0
        assert [r.id for r in platform.runs.list()] == [live.id]
        assert platform.memory.keys("tester") == [] and platform.memory.search("tester", "milk") == []
        checkpoint = latest_checkpoint(platform.store)
        assert checkpoint is not None and checkpoint.archive == archive
        report = api.verify(platform)
        assert report.ok, report.reason
        assert "archive" in report.reason
        applied = [e for e in platform.audit.tail(50) if e.kind == "retention"]
        assert applied[-1].data["removed"]["runs"] == 1
    finally:
        await platform.aclose()


async def test_audit_days_without_an_archive_is_refused(make_config: Any) -> None:
    base = make_config([{"content": "done"}], sandbox="inline://")
    config = base.replace(data=DataConfig(audit_flush_ms=5, retention=RetentionConfig(audit_days=30)))
    platform = Platform.open(config)
    try:
        with pytest.raises(ConfigError, match="audit_archive"):
            api.retain(platform)
    finally:
        await platform.aclose()


def test_a2a_tasks_and_checkpoint_rows_go_only_once_their_run_is_finished_or_gone(make_store: Any) -> None:
    from stitchwork.agents.runs import DatabaseRunStore, RunRecord
    from stitchwork.audit.retention import apply_retention
    from stitchwork.service.a2a import A2ATasks

    store = make_store()
    policies = [p for p in policies_from(RetentionConfig(a2a_tasks_days=1)) if p.table == "a2a_tasks"]
    assert apply_retention(store, policies) == {"a2a_tasks": 0}  # no table yet: nothing to do
    runs = DatabaseRunStore(store)
    for run_id, status in [("run_done", RunStatus.COMPLETED), ("run_live", RunStatus.RUNNING),
                           ("run_wait", RunStatus.WAITING_APPROVAL)]:
        runs.insert(RunRecord(id=run_id, agent="a", task="t", model="m", status=status))
    tasks = A2ATasks(store)
    old = time.time() - 2 * DAY
    for task_id, run_id in [("t_done", "run_done"), ("t_live", "run_live"), ("t_wait", "run_wait"),
                            ("t_gone", "run_deleted"), ("t_unlinked", "")]:
        tasks.save("peer", "agent", task_id, "ctx", '{"id": "x"}')
        if run_id:
            tasks.link("peer", "agent", task_id, "ctx", run_id)
    store.execute("UPDATE a2a_tasks SET updated_at = ? WHERE updated_at > 0", [old])
    tasks.save("peer", "agent", "t_recent", "ctx", "{}")
    tasks.link("peer", "agent", "t_recent", "ctx", "run_done")
    removed = apply_retention(store, policies)
    assert removed["a2a_tasks"] == 2
    left = {r["id"] for r in store.query("SELECT id FROM a2a_tasks")}
    assert left == {"t_live", "t_wait", "t_unlinked", "t_recent"}  # running ones never; fresh ones kept
    runs.checkpoint("run_live", 1, {"trusted": ["x"]})
    runs.checkpoint("run_done", 1, {"trusted": ["y"]})
    store.execute("UPDATE run_provenance SET written_at = ? WHERE written_at > 0", [old])
    rows = [p for p in policies_from(RetentionConfig(runs_days=1)) if p.table == "run_provenance"]
    assert apply_retention(store, rows) == {"run_provenance": 1}
    assert [r["run_id"] for r in store.query("SELECT run_id FROM run_provenance")] == ["run_live"]
