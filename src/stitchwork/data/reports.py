"""Ready reports over the audit log and the run table, on DuckDB and ClickHouse.

======================  =====================================================================================
``denied``              denied calls by agent and rule (``kind='decision'``, ``decision='deny'``; the rule is each
                        of ``data.policy_ids``, else ``data.error`` for calls refused before policy)
``approvals``           approval requests and decisions by agent and tool, with decision latency (``data.latency_s``)
``tools``               tool executions by tool and outcome, with calls, agents and duration
``tokens``              token spend by agent, provider and model (``kind='model'``: prompt and completion tokens)
``runs``                runs by agent and outcome (the ``runs`` table)
======================  =====================================================================================

Fact tables. Parsing the JSON ``data`` of every event on every report does not scale (about 1.5 s per report over
10 million events here). The reports therefore read two derived, typed, append-only tables that the data layer
keeps up to date incrementally: ``audit_facts`` (tool, model and approval events with their numbers extracted) and
``audit_denials`` (one row per denied call and rule). Before each report, events after the high-water mark in
``audit_rollup_state`` are parsed once (in chunks of ``REFRESH_CHUNK``) and appended; a crash between the append and
the mark is repaired on the next refresh (rows past the mark are deleted first). The fact tables are analytics
only: integrity is ``audit verify``'s job, on ``audit_events`` itself; events compacted into Iceberg keep their
facts. Each report is then one ``GROUP BY`` over typed columns; ``since``/``until`` bound the event time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stitchwork.data._base import Store
from stitchwork.data.schema import Column, Table
from stitchwork.errors import StoreError

__all__ = ["DENIALS", "FACTS", "REPORTS", "Dialect", "Report", "dialect_of", "refresh_facts", "run_report"]

REFRESH_CHUNK = 2_000_000

FACTS = Table("audit_facts", (
    Column("seq", "BIGINT", False), Column("ts", "DOUBLE", False), Column("kind", "VARCHAR", False),
    Column("agent", "VARCHAR", False), Column("run_id", "VARCHAR", False), Column("tool", "VARCHAR", False),
    Column("decision", "VARCHAR", False), Column("model", "VARCHAR"), Column("prompt_tokens", "BIGINT"),
    Column("completion_tokens", "BIGINT"), Column("duration_ms", "DOUBLE"), Column("latency_s", "DOUBLE"),
), order_by=("kind", "agent", "tool", "ts"), dictionary=("kind", "agent", "tool", "decision", "model"))  # fmt: skip
DENIALS = Table("audit_denials", (
    Column("seq", "BIGINT", False), Column("ts", "DOUBLE", False), Column("agent", "VARCHAR", False),
    Column("run_id", "VARCHAR", False), Column("rule", "VARCHAR", False),
), order_by=("agent", "rule", "ts"), dictionary=("agent", "rule"))  # fmt: skip
STATE = Table("audit_rollup_state", (Column("name", "VARCHAR", False), Column("seq", "BIGINT", False)),
              key=("name",))  # fmt: skip
_FACT_KINDS = "('tool', 'model', 'approval')"


@dataclass(frozen=True)
class Dialect:
    """The SQL that differs between engines: deriving facts, a median, a URI's provider."""

    name: str
    facts: str
    denials: str
    median: Callable[[str], str]
    provider: Callable[[str], str]


DUCKDB = Dialect(
    "duckdb",
    facts=(
        "SELECT seq, ts, kind, agent, run_id, tool, decision, j[1] AS model, TRY_CAST(j[2] AS BIGINT), "
        "TRY_CAST(j[3] AS BIGINT), TRY_CAST(j[4] AS DOUBLE), TRY_CAST(j[5] AS DOUBLE) FROM (SELECT *, CASE WHEN "
        "json_valid(data) THEN json_extract_string(data, ['$.model', '$.prompt_tokens', '$.completion_tokens', "
        "'$.duration_ms', '$.latency_s']) END AS j FROM audit_events "
        f"WHERE seq > ? AND seq <= ? AND kind IN {_FACT_KINDS}) AS e"
    ),
    denials=(
        "SELECT seq, ts, agent, run_id, unnest(CASE WHEN r IS NULL OR len(r) = 0 THEN [coalesce(nullif(err, ''), "
        "'(no rule)')] ELSE r END) FROM (SELECT seq, ts, agent, run_id, CASE WHEN json_valid(data) THEN "
        "json_extract_string(data, '$.policy_ids[*]') END AS r, CASE WHEN json_valid(data) THEN "
        "json_extract_string(data, '$.error') END AS err FROM audit_events "
        "WHERE seq > ? AND seq <= ? AND kind = 'decision' AND decision = 'deny') AS d"
    ),
    median=lambda expr: f"quantile_cont({expr}, 0.5)",
    provider=lambda expr: f"split_part(split_part({expr}, '://', 1), '+', 1)",
)
CLICKHOUSE = Dialect(
    "clickhouse",
    facts=(
        "SELECT seq, ts, kind, agent, run_id, tool, decision, if(kind = 'model', JSONExtractString(data, 'model'), "
        "NULL), JSONExtract(data, 'prompt_tokens', 'Nullable(Int64)'), "
        "JSONExtract(data, 'completion_tokens', 'Nullable(Int64)'), JSONExtract(data, 'duration_ms', "
        "'Nullable(Float64)'), JSONExtract(data, 'latency_s', 'Nullable(Float64)') FROM audit_events "
        f"WHERE seq > ? AND seq <= ? AND kind IN {_FACT_KINDS}"
    ),
    denials=(
        "SELECT seq, ts, agent, run_id, arrayJoin(if(empty(r), [if(err = '', '(no rule)', err)], r)) FROM "
        "(SELECT seq, ts, agent, run_id, JSONExtract(data, 'policy_ids', 'Array(String)') AS r, "
        "JSONExtractString(data, 'error') AS err FROM audit_events "
        "WHERE seq > ? AND seq <= ? AND kind = 'decision' AND decision = 'deny')"
    ),
    median=lambda expr: f"quantile(0.5)({expr})",
    provider=lambda expr: f"splitByChar('+', splitByString('://', {expr})[1])[1]",
)


def dialect_of(store: Store) -> Dialect:
    """The dialect of ``store`` (ClickHouse for ``chdb://`` and ``clickhouse://``, else DuckDB)."""
    return CLICKHOUSE if getattr(store, "dialect", "duckdb") == "clickhouse" else DUCKDB


_refresh_locks: dict[int, threading.Lock] = {}
_refresh_guard = threading.Lock()


def refresh_facts(store: Store) -> int:
    """Derives facts for events after the high-water mark; returns how many events were examined."""
    with _refresh_guard:
        lock = _refresh_locks.setdefault(id(store), threading.Lock())
    with lock:
        for table in (FACTS, DENIALS, STATE):
            store.ensure(table)
        rows = store.query("SELECT seq FROM audit_rollup_state WHERE name = 'facts'")
        done = int(rows[0]["seq"]) if rows else 0
        top = int(store.query("SELECT max(seq) AS m FROM audit_events")[0]["m"] or 0)
        if top <= done:
            return 0
        dialect = dialect_of(store)
        for name in (FACTS.name, DENIALS.name):  # repair a refresh cut short after its insert
            if (store.query(f"SELECT max(seq) AS m FROM {name}")[0]["m"] or 0) > done:
                store.execute(f"DELETE FROM {name} WHERE seq > ?", [done])
        start = done
        while done < top:
            hi = min(done + REFRESH_CHUNK, top)
            facts = ", ".join(c.name for c in FACTS.columns)
            store.execute(f"INSERT INTO {FACTS.name} ({facts}) {dialect.facts}", [done, hi])
            store.execute(f"INSERT INTO {DENIALS.name} (seq, ts, agent, run_id, rule) {dialect.denials}", [done, hi])
            store.execute(
                "INSERT INTO audit_rollup_state (name, seq) VALUES ('facts', ?) ON CONFLICT (name) DO UPDATE "
                "SET seq = excluded.seq", [hi],
            )  # fmt: skip
            done = hi
        return top - start


def _denied(d: Dialect, where: str) -> str:
    return (
        "SELECT agent, rule, count(*) AS denied, count(DISTINCT run_id) AS runs, min(ts) AS first_ts, "
        f"max(ts) AS last_ts FROM audit_denials WHERE true{where} GROUP BY agent, rule "
        "ORDER BY denied DESC, agent, rule"
    )


def _approvals(d: Dialect, where: str) -> str:
    decided = "CASE WHEN decision IN ('approved', 'denied') THEN latency_s END"
    return (
        "SELECT agent, tool, count(*) FILTER (WHERE decision = 'ask') AS requested, "
        "count(*) FILTER (WHERE decision = 'approved') AS approved, "
        "count(*) FILTER (WHERE decision = 'denied') AS denied, "
        "count(*) FILTER (WHERE decision = 'expired') AS expired, "
        f"round(avg({decided}), 3) AS avg_latency_s, round({d.median(decided)}, 3) AS p50_latency_s, "
        f"round(max({decided}), 3) AS max_latency_s "
        f"FROM audit_facts WHERE kind = 'approval'{where} GROUP BY agent, tool ORDER BY requested DESC, agent, tool"
    )


def _tools(d: Dialect, where: str) -> str:
    return (
        "SELECT tool, decision AS outcome, count(*) AS calls, count(DISTINCT agent) AS agents, "
        "round(avg(duration_ms), 3) AS avg_ms, round(max(duration_ms), 3) AS max_ms "
        f"FROM audit_facts WHERE kind = 'tool'{where} GROUP BY tool, decision ORDER BY calls DESC, tool, outcome"
    )


def _tokens(d: Dialect, where: str) -> str:
    return (
        f"SELECT agent, {d.provider('model_uri')} AS provider, model_uri AS model, calls, prompt_tokens, "
        "completion_tokens, prompt_tokens + completion_tokens AS total_tokens FROM (SELECT agent, "
        "coalesce(model, '') AS model_uri, count(*) AS calls, CAST(sum(coalesce(prompt_tokens, 0)) AS BIGINT) "
        "AS prompt_tokens, CAST(sum(coalesce(completion_tokens, 0)) AS BIGINT) AS completion_tokens "
        f"FROM audit_facts WHERE kind = 'model'{where} GROUP BY agent, model_uri) AS m "
        "ORDER BY total_tokens DESC, agent, model"
    )


def _runs(d: Dialect, where: str) -> str:
    return (
        "SELECT agent, status AS outcome, count(*) AS runs, round(avg(steps), 2) AS avg_steps, "
        "round(avg(updated_at - created_at), 3) AS avg_duration_s "
        f"FROM runs WHERE true{where.replace('ts ', 'created_at ')} GROUP BY agent, status "
        "ORDER BY runs DESC, agent, outcome"
    )


@dataclass(frozen=True)
class Report:
    """A named report: what it shows, its SQL per dialect, and whether it reads the fact tables."""

    name: str
    title: str
    sql: Callable[[Dialect, str], str]
    facts: bool = True


REPORTS: dict[str, Report] = {r.name: r for r in (
    Report("denied", "Denied calls by agent and rule", _denied),
    Report("approvals", "Approvals and their latency", _approvals),
    Report("tools", "Tool usage", _tools),
    Report("tokens", "Token spend by agent, provider and model", _tokens),
    Report("runs", "Runs by outcome", _runs, facts=False),
)}  # fmt: skip


def report_sql(
    store: Store, name: str, *, since: float | None = None, until: float | None = None
) -> tuple[str, list[Any]]:
    """The SQL and parameters of report ``name`` for ``store``'s dialect (facts must be refreshed first)."""
    report = REPORTS.get(name)
    if report is None:
        raise StoreError(f"unknown report {name!r}; known: {', '.join(REPORTS)}")
    where, params = "", []
    if since is not None:
        where += " AND ts >= ?"
        params.append(float(since))
    if until is not None:
        where += " AND ts < ?"
        params.append(float(until))
    return report.sql(dialect_of(store), where), params


def run_report(
    store: Store, name: str, *, since: float | None = None, until: float | None = None
) -> list[dict[str, Any]]:
    """Rows of report ``name`` (see the module docstring), after bringing the fact tables up to date.

    Raises:
        StoreError: Unknown report, or the store failed.
    """
    sql, params = report_sql(store, name, since=since, until=until)
    if REPORTS[name].facts:
        refresh_facts(store)
    return store.query(sql, params)
