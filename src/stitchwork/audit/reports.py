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
facts.

Rollups. Even typed, a ``GROUP BY`` over millions of facts takes too long on a loaded machine (chdb took 2.3 s
for ``tools`` over 10 million events), so the refresh also folds each new range of facts into ``audit_rollup``:
one row per report and group at the finest grain the report needs to stay exact (``tools`` per tool, outcome and
agent, so ``count(DISTINCT agent)`` is a count of rows; ``denied`` per agent and rule, counting in each fold the
runs not yet in its ``denied_run`` rows, one per agent, rule and run seen; ``approvals`` a histogram per agent,
tool, decision and latency value, so the median is exact; ``tokens`` per agent and model) with counts, sums,
minima and maxima. DuckDB upserts the rows (primary key, ``ON CONFLICT DO UPDATE``);
ClickHouse appends them to an ``AggregatingMergeTree`` that merges them in the background; the reports aggregate
again, so unmerged rows give the same answer. Each fold is ONE ``INSERT`` carrying a ``_mark`` row with the
highest ``seq`` it covers (``max`` on merge), so the rollup and its mark are written atomically and a fold cut
short is simply redone from the facts. Reports without ``since``/``until`` read the rollup (a few thousand rows,
whatever the number of events); reports bounded in time read the fact tables, one ``GROUP BY`` over typed
columns within the bounds (``rollup=False`` forces that path; the tests check both give the same rows).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from stitchwork.data._base import Store
from stitchwork.data.schema import Column, Table
from stitchwork.errors import StoreError

__all__ = [
    "DENIALS", "FACTS", "REPORTS", "ROLLUP", "Dialect", "Report", "dialect_of", "refresh_facts", "reset_facts",
    "run_report",
]  # fmt: skip

REFRESH_CHUNK = 2_000_000

FACTS = Table("audit_facts", (
    Column("seq", "BIGINT", False), Column("ts", "DOUBLE", False), Column("kind", "VARCHAR", False),
    Column("agent", "VARCHAR", False), Column("run_id", "VARCHAR", False), Column("tool", "VARCHAR", False),
    Column("decision", "VARCHAR", False), Column("model", "VARCHAR"), Column("prompt_tokens", "BIGINT"),
    Column("completion_tokens", "BIGINT"), Column("duration_ms", "DOUBLE"), Column("latency_s", "DOUBLE"),
), order_by=("kind", "seq"), dictionary=("kind", "agent", "tool", "decision", "model"))  # fmt: skip
DENIALS = Table("audit_denials", (
    Column("seq", "BIGINT", False), Column("ts", "DOUBLE", False), Column("agent", "VARCHAR", False),
    Column("run_id", "VARCHAR", False), Column("rule", "VARCHAR", False),
), order_by=("seq",), dictionary=("agent", "rule"))  # fmt: skip
#: Pre-aggregated report groups: ``report`` names the report (``_mark``: the fold's high-water mark in ``mark``),
#: ``k1``..``k4``/``kv`` its group, then counts (``n`` rows, ``c`` non-null measures), integer sums ``i1``/``i2``,
#: a float sum ``s`` and extremes ``lo``/``hi``.
ROLLUP = Table("audit_rollup", (
    Column("report", "VARCHAR", False), Column("k1", "VARCHAR", False), Column("k2", "VARCHAR", False),
    Column("k3", "VARCHAR", False), Column("k4", "VARCHAR", False), Column("kv", "DOUBLE", False),
    Column("n", "BIGINT", False), Column("c", "BIGINT", False), Column("i1", "BIGINT", False),
    Column("i2", "BIGINT", False), Column("s", "DOUBLE", False), Column("lo", "DOUBLE"), Column("hi", "DOUBLE"),
    Column("mark", "BIGINT", False),
), key=("report", "k1", "k2", "k3", "k4", "kv"), dictionary=("report",), aggregates=(
    ("n", "sum"), ("c", "sum"), ("i1", "sum"), ("i2", "sum"), ("s", "sum"), ("lo", "min"), ("hi", "max"),
    ("mark", "max"),
))  # fmt: skip
_ROLLUP_MERGE = {"sum": "{c} + excluded.{c}", "min": "least({c}, excluded.{c})", "max": "greatest({c}, excluded.{c})"}
_NULL = "nullif(0.0, 0.0)"  # a NULL DOUBLE both engines type alike
_DECIDED = "('approved', 'denied')"
#: The fold of facts with ``seq`` in (lo, hi] into rollup rows, then the mark row (parameters: :func:`_fold_params`).
#: ``denied_run`` rows are the distinct (run, agent, rule) seen, run first so ClickHouse finds a batch's runs by
#: primary key, with the mark of the fold that first saw them in ``lo`` (``min`` on merge); ``denied`` rows count,
#: in ``c``, the runs new to them: absent from ``denied_run`` up to this fold's start (so it does not matter whether
#: the engine lets the statement see its own rows), and the report reads one small row per agent and rule.
#: The first branch names every column (ClickHouse would otherwise merge same-text columns such as two zeros).
_FOLD = (
    "SELECT 'tools' AS report, tool AS k1, decision AS k2, agent AS k3, '' AS k4, 0.0 AS kv, "
    "CAST(count(*) AS BIGINT) AS n, CAST(count(duration_ms) AS BIGINT) AS c, CAST(0 AS BIGINT) AS i1, "
    "CAST(0 AS BIGINT) AS i2, CAST(coalesce(sum(duration_ms), 0.0) AS DOUBLE) AS s, "
    f"{_NULL} AS lo, max(duration_ms) AS hi, CAST(0 AS BIGINT) AS mark "
    "FROM audit_facts WHERE kind = 'tool' AND seq > ? AND seq <= ? GROUP BY tool, decision, agent "
    "UNION ALL SELECT 'tokens', agent, coalesce(model, ''), '', '', 0.0, CAST(count(*) AS BIGINT), "
    "CAST(0 AS BIGINT), CAST(sum(coalesce(prompt_tokens, 0)) AS BIGINT), "
    f"CAST(sum(coalesce(completion_tokens, 0)) AS BIGINT), 0.0, {_NULL}, {_NULL}, CAST(0 AS BIGINT) "
    "FROM audit_facts WHERE kind = 'model' AND seq > ? AND seq <= ? GROUP BY agent, coalesce(model, '') "
    "UNION ALL SELECT 'approvals', agent, tool, decision, CASE WHEN latency_s IS NULL THEN 'null' ELSE '' END, "
    "CAST(coalesce(latency_s, 0.0) AS DOUBLE), CAST(count(*) AS BIGINT), CAST(count(latency_s) AS BIGINT), "
    f"CAST(0 AS BIGINT), CAST(0 AS BIGINT), 0.0, {_NULL}, {_NULL}, CAST(0 AS BIGINT) "
    "FROM audit_facts WHERE kind = 'approval' AND seq > ? AND seq <= ? "
    "GROUP BY agent, tool, decision, CASE WHEN latency_s IS NULL THEN 'null' ELSE '' END, coalesce(latency_s, 0.0) "
    "UNION ALL SELECT 'denied_run', run_id, agent, rule, '', 0.0, CAST(count(*) AS BIGINT), CAST(0 AS BIGINT), "
    f"CAST(0 AS BIGINT), CAST(0 AS BIGINT), 0.0, CAST(? AS DOUBLE), {_NULL}, CAST(0 AS BIGINT) "
    "FROM audit_denials WHERE seq > ? AND seq <= ? GROUP BY agent, rule, run_id "
    "UNION ALL SELECT 'denied', agent, rule, '', '', 0.0, CAST(sum(n) AS BIGINT), CAST(sum(CASE WHEN e.k1 IS NULL "
    "THEN 1 ELSE 0 END) AS BIGINT), CAST(0 AS BIGINT), CAST(0 AS BIGINT), 0.0, CAST(min(lo) AS DOUBLE), "
    "CAST(max(hi) AS DOUBLE), CAST(0 AS BIGINT) FROM (SELECT agent, rule, run_id, count(*) AS n, min(ts) AS lo, "
    "max(ts) AS hi FROM audit_denials WHERE seq > ? AND seq <= ? GROUP BY agent, rule, run_id) AS b LEFT JOIN "
    "(SELECT k1, k2, k3 FROM audit_rollup WHERE report = 'denied_run' AND lo <= ? AND k1 IN (SELECT run_id FROM "
    "audit_denials WHERE seq > ? AND seq <= ?) GROUP BY k1, k2, k3) AS e "
    "ON e.k1 = b.run_id AND e.k2 = b.agent AND e.k3 = b.rule "
    "GROUP BY agent, rule "
    "UNION ALL SELECT '_mark', '', '', '', '', 0.0, CAST(0 AS BIGINT), CAST(0 AS BIGINT), CAST(0 AS BIGINT), "
    f"CAST(0 AS BIGINT), 0.0, {_NULL}, {_NULL}, CAST(? AS BIGINT)"
)
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
    read_settings: str = ""
    """Appended to reads of the append-only fact tables and of the rollup (reports aggregate the rollup
    themselves): ClickHouse need not merge on read (the store's sessions set ``final = 1`` for keyed tables)."""
    fold_settings: str = ""
    """Appended to the fold's ``INSERT`` (ClickHouse: keep it one block, hence atomic)."""


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
    median=lambda expr: f"quantileExactInclusive(0.5)({expr})",
    provider=lambda expr: f"splitByChar('+', splitByString('://', {expr})[1])[1]",
    read_settings=" SETTINGS final = 0",
    fold_settings=(  # one block, so one part: the fold and its mark land together or not at all
        " SETTINGS final = 0, max_insert_block_size = 1000000000, min_insert_block_size_rows = 1000000000, "
        "min_insert_block_size_bytes = 1000000000000"
    ),
)


def dialect_of(store: Store) -> Dialect:
    """The dialect of ``store`` (ClickHouse for ``chdb://`` and ``clickhouse://``, else DuckDB)."""
    return CLICKHOUSE if getattr(store, "dialect", "duckdb") == "clickhouse" else DUCKDB


_refresh_locks: dict[int, threading.Lock] = {}
_refresh_guard = threading.Lock()
_ensured: weakref.WeakSet[Store] = weakref.WeakSet()


def _lock_of(store: Store) -> threading.Lock:
    with _refresh_guard:
        return _refresh_locks.setdefault(id(store), threading.Lock())


def _ensure(store: Store) -> None:
    if store not in _ensured:
        clickhouse = dialect_of(store) is CLICKHOUSE
        for table in (FACTS, DENIALS, STATE, ROLLUP):
            # folds read the newest facts by seq range, reports bounded in time by ts: on DuckDB zone maps prune
            # both (rows arrive in seq order, ts follows seq); on ClickHouse the sort key (by seq, so background
            # merges never mix old and new facts in one granule) and a minmax skip index on ts (DuckDB would build
            # an ART index instead, so DuckDB gets none)
            store.ensure(replace(table, indexes=("ts",)) if clickhouse and table in (FACTS, DENIALS) else table)
        _ensured.add(store)


def _max(store: Store, sql: str, params: list[Any]) -> int:
    rows = store.query(sql, params)
    return int(rows[0]["m"] or 0) if rows else 0


def _fold_sql(dialect: Dialect) -> str:
    columns = ", ".join(c.name for c in ROLLUP.columns)
    sql = f"INSERT INTO {ROLLUP.name} ({columns}) SELECT * FROM ({_FOLD}) AS f"
    if dialect is DUCKDB:  # ClickHouse: the AggregatingMergeTree merges by the same functions
        merge = ", ".join(f"{c} = " + _ROLLUP_MERGE[fn].format(c=c) for c, fn in ROLLUP.aggregates)
        sql += f" ON CONFLICT ({', '.join(ROLLUP.key)}) DO UPDATE SET {merge}"
    return sql + dialect.fold_settings


def _fold_params(lo: int, hi: int) -> list[int]:
    """The parameters of :data:`_FOLD` in the order of its placeholders."""
    return [lo, hi] * 3 + [hi, lo, hi] + [lo, hi] + [lo, lo, hi] + [hi]


def refresh_facts(store: Store) -> int:
    """Derives facts for events after the high-water mark and folds new facts into the rollup.

    Returns:
        How many events were examined (0 when the facts were up to date).
    """
    with _lock_of(store):
        _ensure(store)
        done = _max(store, "SELECT max(seq) AS m FROM audit_rollup_state WHERE name = 'facts'", [])
        # only the newest events are read: seq ranges prune DuckDB zone maps and the ClickHouse seq skip index
        newest = f"SELECT max(seq) AS m FROM audit_events WHERE seq > ?{dialect_of(store).read_settings}"
        top = max(done, _max(store, newest, [done]))
        dialect = dialect_of(store)
        start = done
        if top > done:
            for name in (FACTS.name, DENIALS.name):  # repair a refresh cut short after its insert
                if _max(store, f"SELECT max(seq) AS m FROM {name} WHERE seq > ?{dialect.read_settings}", [done]) > done:
                    store.execute(f"DELETE FROM {name} WHERE seq > ?", [done])
            while done < top:
                hi = min(done + REFRESH_CHUNK, top)
                facts = ", ".join(c.name for c in FACTS.columns)
                store.execute(f"INSERT INTO {FACTS.name} ({facts}) {dialect.facts}{dialect.read_settings}", [done, hi])
                store.execute(f"INSERT INTO {DENIALS.name} (seq, ts, agent, run_id, rule) {dialect.denials}"
                              f"{dialect.read_settings}", [done, hi])
                store.execute(
                    "INSERT INTO audit_rollup_state (name, seq) VALUES ('facts', ?) ON CONFLICT (name) DO UPDATE "
                    "SET seq = excluded.seq", [hi],
                )  # fmt: skip
                done = hi
        mark = f"SELECT max(mark) AS m FROM audit_rollup WHERE report = '_mark'{dialect.read_settings}"
        folded = _max(store, mark, [])
        while folded < done:  # also catches up after a fold that died before its (atomic) insert
            hi = min(folded + REFRESH_CHUNK, done)
            store.execute(_fold_sql(dialect), _fold_params(folded, hi))
            folded = hi
        return top - start


def reset_facts(store: Store) -> None:
    """Drops the fact tables and the rollup; the next report derives them again from ``audit_events``."""
    with _lock_of(store):
        for table in (FACTS, DENIALS, STATE, ROLLUP):
            store.execute(f"DROP TABLE IF EXISTS {table.name}")
        _ensured.discard(store)


def _denied(d: Dialect, where: str) -> str:
    return (
        "SELECT agent, rule, count(*) AS denied, count(DISTINCT run_id) AS runs, min(ts) AS first_ts, "
        f"max(ts) AS last_ts FROM audit_denials WHERE true{where} GROUP BY agent, rule "
        f"ORDER BY denied DESC, agent, rule{d.read_settings}"
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
        f"{d.read_settings}"
    )


def _tools(d: Dialect, where: str) -> str:
    return (
        "SELECT tool, decision AS outcome, count(*) AS calls, count(DISTINCT agent) AS agents, "
        "round(avg(duration_ms), 3) AS avg_ms, round(max(duration_ms), 3) AS max_ms "
        f"FROM audit_facts WHERE kind = 'tool'{where} GROUP BY tool, decision ORDER BY calls DESC, tool, outcome"
        f"{d.read_settings}"
    )


def _tokens(d: Dialect, where: str) -> str:
    return (
        f"SELECT agent, {d.provider('model_uri')} AS provider, model_uri AS model, calls, prompt_tokens, "
        "completion_tokens, prompt_tokens + completion_tokens AS total_tokens FROM (SELECT agent, "
        "coalesce(model, '') AS model_uri, count(*) AS calls, CAST(sum(coalesce(prompt_tokens, 0)) AS BIGINT) "
        "AS prompt_tokens, CAST(sum(coalesce(completion_tokens, 0)) AS BIGINT) AS completion_tokens "
        f"FROM audit_facts WHERE kind = 'model'{where} GROUP BY agent, model_uri) AS m "
        f"ORDER BY total_tokens DESC, agent, model{d.read_settings}"
    )


def _runs(d: Dialect, where: str) -> str:
    return (
        "SELECT agent, status AS outcome, count(*) AS runs, round(avg(steps), 2) AS avg_steps, "
        "round(avg(updated_at - created_at), 3) AS avg_duration_s "
        f"FROM runs WHERE true{where.replace('ts ', 'created_at ')} GROUP BY agent, status "
        "ORDER BY runs DESC, agent, outcome"
    )


def _denied_rollup(d: Dialect) -> str:
    return (
        "SELECT k1 AS agent, k2 AS rule, CAST(sum(n) AS BIGINT) AS denied, CAST(sum(c) AS BIGINT) AS runs, "
        "min(lo) AS first_ts, max(hi) AS last_ts FROM audit_rollup WHERE report = 'denied' GROUP BY k1, k2 "
        f"ORDER BY denied DESC, agent, rule{d.read_settings}"
    )


def _approvals_rollup(d: Dialect) -> str:
    def count(decision: str) -> str:
        return f"CAST(sum(CASE WHEN k3 = '{decision}' THEN n ELSE 0 END) AS BIGINT)"

    decided = f"k3 IN {_DECIDED} AND c > 0"
    # exact median (as quantile_cont) of the latency histogram: the values at 0-based ranks floor and ceil of
    # (total - 1) / 2, interpolated
    rank_lo, rank_hi = "floor((total - 1) * 0.5)", "ceil((total - 1) * 0.5)"
    median = (
        "SELECT agent, tool, min(CASE WHEN upto - w <= {lo} AND {lo} < upto THEN v END) AS v_lo, "
        "min(CASE WHEN upto - w <= {hi} AND {hi} < upto THEN v END) AS v_hi, max((total - 1) * 0.5 - {lo}) AS frac "
        "FROM (SELECT agent, tool, v, w, sum(w) OVER (PARTITION BY agent, tool ORDER BY v ROWS BETWEEN UNBOUNDED "
        "PRECEDING AND CURRENT ROW) AS upto, sum(w) OVER (PARTITION BY agent, tool) AS total FROM (SELECT k1 AS "
        f"agent, k2 AS tool, kv AS v, sum(c) AS w FROM audit_rollup WHERE report = 'approvals' AND {decided} "
        "GROUP BY k1, k2, kv) AS h) AS r GROUP BY agent, tool"
    ).format(lo=rank_lo, hi=rank_hi)
    return (
        "SELECT a.agent AS agent, a.tool AS tool, requested, approved, denied, expired, avg_latency_s, "
        "round(q.v_lo + (q.v_hi - q.v_lo) * q.frac, 3) AS p50_latency_s, max_latency_s FROM (SELECT k1 AS agent, "
        f"k2 AS tool, {count('ask')} AS requested, {count('approved')} AS approved, {count('denied')} AS denied, "
        f"{count('expired')} AS expired, round(sum(CASE WHEN {decided} THEN kv * c END) / "
        f"nullif(sum(CASE WHEN {decided} THEN c ELSE 0 END), 0), 3) AS avg_latency_s, "
        f"round(max(CASE WHEN {decided} THEN kv END), 3) AS max_latency_s FROM audit_rollup "
        f"WHERE report = 'approvals' GROUP BY k1, k2) AS a LEFT JOIN ({median}) AS q "
        f"ON a.agent = q.agent AND a.tool = q.tool ORDER BY requested DESC, agent, tool{d.read_settings}"
    )


def _tools_rollup(d: Dialect) -> str:
    return (
        "SELECT k1 AS tool, k2 AS outcome, CAST(sum(n) AS BIGINT) AS calls, count(DISTINCT k3) AS agents, "
        "round(sum(s) / nullif(sum(c), 0), 3) AS avg_ms, round(max(hi), 3) AS max_ms FROM audit_rollup "
        f"WHERE report = 'tools' GROUP BY k1, k2 ORDER BY calls DESC, tool, outcome{d.read_settings}"
    )


def _tokens_rollup(d: Dialect) -> str:
    return (
        f"SELECT agent, {d.provider('model_uri')} AS provider, model_uri AS model, calls, prompt_tokens, "
        "completion_tokens, prompt_tokens + completion_tokens AS total_tokens FROM (SELECT k1 AS agent, "
        "k2 AS model_uri, CAST(sum(n) AS BIGINT) AS calls, CAST(sum(i1) AS BIGINT) AS prompt_tokens, "
        "CAST(sum(i2) AS BIGINT) AS completion_tokens FROM audit_rollup WHERE report = 'tokens' GROUP BY k1, k2) "
        f"AS m ORDER BY total_tokens DESC, agent, model{d.read_settings}"
    )


@dataclass(frozen=True)
class Report:
    """A named report: what it shows, its SQL per dialect over the facts (with a time filter) and over the
    rollup (without one), and whether it reads the fact tables."""

    name: str
    title: str
    sql: Callable[[Dialect, str], str]
    facts: bool = True
    rollup: Callable[[Dialect], str] | None = None


REPORTS: dict[str, Report] = {r.name: r for r in (
    Report("denied", "Denied calls by agent and rule", _denied, rollup=_denied_rollup),
    Report("approvals", "Approvals and their latency", _approvals, rollup=_approvals_rollup),
    Report("tools", "Tool usage", _tools, rollup=_tools_rollup),
    Report("tokens", "Token spend by agent, provider and model", _tokens, rollup=_tokens_rollup),
    Report("runs", "Runs by outcome", _runs, facts=False),
)}  # fmt: skip


def report_sql(
    store: Store, name: str, *, since: float | None = None, until: float | None = None, rollup: bool = True
) -> tuple[str, list[Any]]:
    """The SQL and parameters of report ``name`` for ``store``'s dialect (facts must be refreshed first).

    Without time bounds the report reads the rollup unless ``rollup`` is False (then it scans the fact tables,
    which gives the same rows: the tests compare the two).
    """
    report = REPORTS.get(name)
    if report is None:
        raise StoreError(f"unknown report {name!r}; known: {', '.join(REPORTS)}")
    if rollup and report.rollup is not None and since is None and until is None:
        return report.rollup(dialect_of(store)), []
    where, params = "", []
    if since is not None:
        where += " AND ts >= ?"
        params.append(float(since))
    if until is not None:
        where += " AND ts < ?"
        params.append(float(until))
    return report.sql(dialect_of(store), where), params


def run_report(
    store: Store, name: str, *, since: float | None = None, until: float | None = None, rollup: bool = True
) -> list[dict[str, Any]]:
    """Rows of report ``name`` (see the module docstring), after bringing the fact tables up to date.

    Raises:
        StoreError: Unknown report, or the store failed.
    """
    sql, params = report_sql(store, name, since=since, until=until, rollup=rollup)
    if REPORTS[name].facts:
        refresh_facts(store)
    return store.query(sql, params)
