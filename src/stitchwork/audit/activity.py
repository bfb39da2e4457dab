"""Per-run model usage and cost, and how often each policy rule fired, derived from the audit log.

The operator's dashboard lists runs with their cost and the policy rules with their hit counts. Both live only
inside the JSON ``data`` of audit events, and parsing it on every page over millions of events does not scale,
so, as :mod:`stitchwork.audit.reports` does for its reports, this module folds the events into one small derived
table, ``audit_activity``, incrementally: each :func:`refresh_activity` reads only the events after the high-water
mark (in chunks of ``CHUNK``) and upserts one row per group:

==========  ===========================  ================================================================
``report``  group ``k1``, ``k2``, ``k3``  measures
==========  ===========================  ================================================================
``usage``   run, agent, model            ``n`` model calls, ``i1``/``i2`` prompt/completion tokens, ``s`` cost (USD)
``rule``    policy id, decision          ``n`` times the rule was among the deciding policies (``allow``,
                                         ``deny`` or ``ask``)
``_mark``   (empty)                      ``mark``: the highest ``seq`` folded
==========  ===========================  ================================================================

Usage counts the model calls that succeeded (``kind='model'``, ``decision='ok'``); rule hits count decision
events, approval requests and refused model calls (each names its deciding policies in ``data.policy_ids``).
A fold is ONE ``INSERT`` that carries its ``_mark`` row, so the groups and the mark are written together or not
at all. DuckDB upserts (primary key, ``ON CONFLICT DO UPDATE``); ClickHouse appends to an
``AggregatingMergeTree`` that merges in the background; readers aggregate, so unmerged rows read the same.
Events compacted into Iceberg keep their contribution. This is analytics: integrity is ``audit verify``'s job.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

from stitchwork.audit.reports import CLICKHOUSE, dialect_of, refresh_facts
from stitchwork.data._base import Store
from stitchwork.data.schema import Column, Table

__all__ = [
    "ACTIVITY", "CHUNK", "denials_over_time", "refresh_activity", "rule_hits", "run_usage", "usage_by_agent_model",
]

CHUNK = 2_000_000

ACTIVITY = Table("audit_activity", (
    Column("report", "VARCHAR", False), Column("k1", "VARCHAR", False), Column("k2", "VARCHAR", False),
    Column("k3", "VARCHAR", False), Column("n", "BIGINT", False), Column("i1", "BIGINT", False),
    Column("i2", "BIGINT", False), Column("s", "DOUBLE", False), Column("last_ts", "DOUBLE", False),
    Column("mark", "BIGINT", False),
), key=("report", "k1", "k2", "k3"), dictionary=("report",), aggregates=(
    ("n", "sum"), ("i1", "sum"), ("i2", "sum"), ("s", "sum"), ("last_ts", "max"), ("mark", "max"),
))  # fmt: skip
_MERGE = {"sum": "{c} + excluded.{c}", "max": "greatest({c}, excluded.{c})"}
_RULE_KINDS = (
    "(kind = 'decision' OR (kind = 'approval' AND decision = 'ask') OR (kind = 'model' AND decision = 'deny'))"
)

_DUCKDB_FOLD = (
    "SELECT 'usage' AS report, run_id AS k1, agent AS k2, coalesce(j[1], '') AS k3, CAST(count(*) AS BIGINT) AS n, "
    "CAST(sum(coalesce(TRY_CAST(j[2] AS BIGINT), 0)) AS BIGINT) AS i1, "
    "CAST(sum(coalesce(TRY_CAST(j[3] AS BIGINT), 0)) AS BIGINT) AS i2, "
    "CAST(sum(coalesce(TRY_CAST(j[4] AS DOUBLE), 0.0)) AS DOUBLE) AS s, max(ts) AS last_ts, "
    "CAST(0 AS BIGINT) AS mark FROM (SELECT run_id, agent, ts, CASE WHEN json_valid(data) THEN "
    "json_extract_string(data, ['$.model', '$.prompt_tokens', '$.completion_tokens', '$.cost_usd']) END AS j "
    "FROM audit_events WHERE seq > ? AND seq <= ? AND kind = 'model' AND decision = 'ok') AS u "
    "GROUP BY run_id, agent, coalesce(j[1], '') "
    "UNION ALL SELECT 'rule', rule, decision, '', CAST(count(*) AS BIGINT), CAST(0 AS BIGINT), CAST(0 AS BIGINT), "
    "0.0, max(ts), CAST(0 AS BIGINT) FROM (SELECT decision, ts, unnest(r) AS rule FROM (SELECT decision, ts, "
    "CASE WHEN json_valid(data) THEN json_extract_string(data, '$.policy_ids[*]') END AS r FROM audit_events "
    f"WHERE seq > ? AND seq <= ? AND {_RULE_KINDS}) AS d WHERE r IS NOT NULL) AS h GROUP BY rule, decision "
    "UNION ALL SELECT '_mark', '', '', '', CAST(0 AS BIGINT), CAST(0 AS BIGINT), CAST(0 AS BIGINT), 0.0, 0.0, "
    "CAST(? AS BIGINT)"
)
_CLICKHOUSE_FOLD = (
    "SELECT 'usage' AS report, run_id AS k1, agent AS k2, JSONExtractString(data, 'model') AS k3, "
    "CAST(count(*) AS Int64) AS n, CAST(sum(ifNull(JSONExtract(data, 'prompt_tokens', 'Nullable(Int64)'), 0)) "
    "AS Int64) AS i1, CAST(sum(ifNull(JSONExtract(data, 'completion_tokens', 'Nullable(Int64)'), 0)) AS Int64) "
    "AS i2, CAST(sum(ifNull(JSONExtract(data, 'cost_usd', 'Nullable(Float64)'), 0.0)) AS Float64) AS s, "
    "max(ts) AS last_ts, CAST(0 AS Int64) AS mark FROM audit_events "
    "WHERE seq > ? AND seq <= ? AND kind = 'model' AND decision = 'ok' GROUP BY k1, k2, k3 "
    "UNION ALL SELECT 'rule', rule, decision, '', CAST(count(*) AS Int64), CAST(0 AS Int64), CAST(0 AS Int64), "
    "0.0, max(ts), CAST(0 AS Int64) FROM (SELECT decision, ts, arrayJoin(JSONExtract(data, 'policy_ids', "
    f"'Array(String)')) AS rule FROM audit_events WHERE seq > ? AND seq <= ? AND {_RULE_KINDS}) "
    "GROUP BY rule, decision "
    "UNION ALL SELECT '_mark', '', '', '', CAST(0 AS Int64), CAST(0 AS Int64), CAST(0 AS Int64), 0.0, 0.0, "
    "CAST(? AS Int64)"
)

_locks: dict[int, threading.Lock] = {}
_guard = threading.Lock()
_ensured: weakref.WeakSet[Store] = weakref.WeakSet()


def _lock_of(store: Store) -> threading.Lock:
    with _guard:
        return _locks.setdefault(id(store), threading.Lock())


def _max(store: Store, sql: str, params: Sequence[Any] = ()) -> int:
    rows = store.query(sql, params)
    return int(rows[0]["m"] or 0) if rows else 0


def _fold_sql(store: Store) -> str:
    dialect = dialect_of(store)
    columns = ", ".join(c.name for c in ACTIVITY.columns)
    if dialect is CLICKHOUSE:
        return f"INSERT INTO {ACTIVITY.name} ({columns}) SELECT * FROM ({_CLICKHOUSE_FOLD}) AS f{dialect.fold_settings}"
    merge = ", ".join(f"{c} = " + _MERGE[fn].format(c=c) for c, fn in ACTIVITY.aggregates)
    return (f"INSERT INTO {ACTIVITY.name} ({columns}) SELECT * FROM ({_DUCKDB_FOLD}) AS f "
            f"ON CONFLICT ({', '.join(ACTIVITY.key)}) DO UPDATE SET {merge}")


def refresh_activity(store: Store) -> int:
    """Folds the audit events after the high-water mark into ``audit_activity``.

    Returns:
        How many sequence numbers were folded (0 when up to date).
    """
    with _lock_of(store):
        if store not in _ensured:
            store.ensure(ACTIVITY)
            _ensured.add(store)
        settings = dialect_of(store).read_settings
        done = _max(store, f"SELECT max(mark) AS m FROM {ACTIVITY.name} WHERE report = '_mark'{settings}")
        top = _max(store, f"SELECT max(seq) AS m FROM audit_events WHERE seq > ?{settings}", [done])
        start = done
        while done < top:
            hi = min(done + CHUNK, top)
            store.execute(_fold_sql(store), [done, hi, done, hi, hi])
            done = hi
        return max(top - start, 0)


def run_usage(store: Store, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Model calls, tokens and cost of each run in ``run_ids`` (runs without model calls are absent)."""
    if not run_ids:
        return {}
    marks = ", ".join("?" for _ in run_ids)
    rows = store.query(
        "SELECT k1 AS run_id, CAST(sum(n) AS BIGINT) AS calls, CAST(sum(i1) AS BIGINT) AS prompt_tokens, "
        "CAST(sum(i2) AS BIGINT) AS completion_tokens, sum(s) AS cost_usd, "
        f"max(k3) AS model FROM {ACTIVITY.name} WHERE report = 'usage' AND k1 IN ({marks}) GROUP BY k1"
        f"{dialect_of(store).read_settings}", list(run_ids))
    return {r["run_id"]: r for r in rows}


def usage_by_agent_model(store: Store) -> list[dict[str, Any]]:
    """Model calls, tokens and cost per agent and model, largest cost first."""
    return store.query(
        "SELECT k2 AS agent, k3 AS model, CAST(sum(n) AS BIGINT) AS calls, CAST(sum(i1) AS BIGINT) AS prompt_tokens, "
        "CAST(sum(i2) AS BIGINT) AS completion_tokens, sum(s) AS cost_usd FROM "
        f"{ACTIVITY.name} WHERE report = 'usage' GROUP BY k2, k3 ORDER BY cost_usd DESC, agent, model"
        f"{dialect_of(store).read_settings}")


def rule_hits(store: Store) -> list[dict[str, Any]]:
    """How often each policy rule decided a call, per decision (``allow``, ``deny``, ``ask``), with the last time."""
    return store.query(
        "SELECT k1 AS rule, k2 AS decision, CAST(sum(n) AS BIGINT) AS hits, max(last_ts) AS last_ts FROM "
        f"{ACTIVITY.name} WHERE report = 'rule' GROUP BY k1, k2 ORDER BY hits DESC, rule, decision"
        f"{dialect_of(store).read_settings}")


def denials_over_time(store: Store, *, since: float, until: float, buckets: int = 24) -> list[dict[str, Any]]:
    """Denied calls (``kind='decision'``, ``decision='deny'``) per time bucket in [since, until): one row per
    bucket, empty buckets included, each with its start ``ts`` and ``denied`` count. Reads the reports' fact
    table ``audit_denials`` (brought up to date first), pruned by time."""
    if not until > since or buckets < 1:
        return []
    refresh_facts(store)
    width = (until - since) / buckets
    rows = store.query(
        "SELECT CAST(floor((ts - ?) / ?) AS BIGINT) AS b, count(DISTINCT seq) AS n FROM audit_denials "
        f"WHERE ts >= ? AND ts < ? GROUP BY b{dialect_of(store).read_settings}", [since, width, since, until])
    counts = {int(r["b"]): int(r["n"]) for r in rows}
    return [{"ts": since + i * width, "denied": counts.get(i, 0)} for i in range(buckets)]
