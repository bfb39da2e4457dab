"""Per-run usage and cost, and policy rule hits, derived from the audit log on every store adapter."""

from __future__ import annotations

import time

import pytest

from stitchwork.audit import activity
from stitchwork.audit.activity import denials_over_time, refresh_activity, rule_hits, run_usage, usage_by_agent_model
from stitchwork.audit.log import AuditLog
from stitchwork.data._base import Store
from tests.signing import Ed25519Signer


def _append_all(log: AuditLog, part: int) -> None:
    if part == 0:
        log.append("decision", agent="a", run_id="r1", tool="send_email", decision="deny",
                   data={"policy_ids": ["external-tainted-target", "p2"]})
        log.append("decision", agent="a", run_id="r1", tool="read_email", decision="allow",
                   data={"policy_ids": ["read-permit"]})
        log.append("decision", agent="a", run_id="r1", tool="nope", decision="deny", data={"error": "unknown_tool"})
        log.append("model", agent="a", run_id="r1", tool="model_call", decision="ok",
                   data={"model": "m1", "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.25})
        log.append("tool", agent="a", run_id="r1", tool="read_email", decision="ok",
                   data={"policy_ids": ["read-permit"], "duration_ms": 3})  # execution: not a second hit
    else:
        log.append("model", agent="a", run_id="r1", tool="model_call", decision="ok",
                   data={"model": "m1", "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.25})
        log.append("model", agent="b", run_id="r2", decision="ok", data={"model": "m2", "prompt_tokens": 7})
        log.append("model", agent="b", run_id="r2", decision="error", data={"model": "m2", "prompt_tokens": 99})
        log.append("approval", agent="a", run_id="r1", tool="rm", decision="ask", data={"policy_ids": ["irr"]})
        log.append("approval", agent="a", run_id="r1", tool="rm", decision="approved", data={"approval_id": "x"})
        log.append("model", agent="b", run_id="r2", decision="deny", data={"policy_ids": ["model-not-allowed"]})
        log.append("decision", agent="b", run_id="r2", tool="x", decision="allow", data={"policy_ids": "odd"})


def test_usage_and_rule_hits_are_folded_incrementally(store: Store) -> None:
    with AuditLog(store, signer=Ed25519Signer("k1"), journal_path=None) as log:
        _append_all(log, 0)
        assert refresh_activity(store) == 5
        assert run_usage(store, ["r1"])["r1"]["calls"] == 1
        _append_all(log, 1)
        assert refresh_activity(store) == 7
        assert refresh_activity(store) == 0
    usage = run_usage(store, ["r1", "r2", "r3"])
    assert set(usage) == {"r1", "r2"}
    assert {k: usage["r1"][k] for k in ("calls", "prompt_tokens", "completion_tokens", "model")} == {
        "calls": 2, "prompt_tokens": 20, "completion_tokens": 10, "model": "m1"}
    assert usage["r1"]["cost_usd"] == pytest.approx(0.5)
    assert usage["r2"]["calls"] == 1 and usage["r2"]["prompt_tokens"] == 7  # the failed call does not count
    assert [(r["agent"], r["model"], r["calls"]) for r in usage_by_agent_model(store)] == [("a", "m1", 2),
                                                                                          ("b", "m2", 1)]
    hits = {(r["rule"], r["decision"]): r["hits"] for r in rule_hits(store)}
    assert hits == {("external-tainted-target", "deny"): 1, ("p2", "deny"): 1, ("read-permit", "allow"): 1,
                    ("irr", "ask"): 1, ("model-not-allowed", "deny"): 1}
    assert run_usage(store, []) == {}


def test_small_chunks_give_the_same_answer(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activity, "CHUNK", 2)
    with AuditLog(store, signer=Ed25519Signer("k1"), journal_path=None) as log:
        _append_all(log, 0)
        _append_all(log, 1)
    assert refresh_activity(store) == 12
    hits = {(r["rule"], r["decision"]): r["hits"] for r in rule_hits(store)}
    assert hits[("read-permit", "allow")] == 1 and len(hits) == 5
    assert run_usage(store, ["r1"])["r1"]["calls"] == 2


def test_denials_over_time_counts_calls_per_bucket(store: Store) -> None:
    with AuditLog(store, signer=Ed25519Signer("k1"), journal_path=None) as log:
        log.append("decision", agent="a", run_id="r1", tool="s", decision="deny", data={"policy_ids": ["x", "y"]})
        log.append("decision", agent="a", run_id="r1", tool="s", decision="deny", data={"error": "bad"})
        log.append("decision", agent="a", run_id="r1", tool="s", decision="allow", data={"policy_ids": ["x"]})
    now = time.time()
    series = denials_over_time(store, since=now - 3600, until=now + 1, buckets=4)
    assert [p["denied"] for p in series] == [0, 0, 0, 2]  # two denied calls, though one names two rules
    assert series[0]["ts"] == pytest.approx(now - 3600)
    assert denials_over_time(store, since=now, until=now - 1) == []
    assert sum(p["denied"] for p in denials_over_time(store, since=now - 7200, until=now - 3600)) == 0
