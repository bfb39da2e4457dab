"""What the audit query's fences cost: ``Store.query_readonly`` against ``Store.query`` on the same rows, same run.

    python3 bench/audit_query.py [--events 200000] [--store duckdb|chdb] [--repeat 5]

Fills a temporary store with audit-shaped rows, then times a few typical audit queries both ways (median of
``--repeat``). On DuckDB the read-only path copies the columns the query uses into a locked in-memory snapshot, so
its cost grows with the table; on chdb it adds an ``EXPLAIN AST`` round and two catalogue reads. Prints each ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from stitchwork.data._base import open_store

QUERIES = [
    "SELECT count(*) AS n FROM audit_events",
    "SELECT agent, count(*) AS n FROM audit_events GROUP BY agent ORDER BY agent",
    "SELECT max(length(data)) AS m FROM audit_events",
    "SELECT seq, kind, agent, tool, decision FROM audit_events ORDER BY seq DESC LIMIT 20",
]
DDL = ("CREATE TABLE IF NOT EXISTS audit_events (seq BIGINT NOT NULL, ts DOUBLE NOT NULL, kind VARCHAR NOT NULL, "
       "agent VARCHAR NOT NULL, run_id VARCHAR NOT NULL, tool VARCHAR NOT NULL, decision VARCHAR NOT NULL, "
       "data VARCHAR NOT NULL, prev_hash VARCHAR NOT NULL, hash VARCHAR NOT NULL)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--store", choices=("duckdb", "chdb"), default="duckdb")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"duckdb://{Path(tmp) / 'a.duckdb'}" if args.store == "duckdb" else f"chdb://{tmp}"
        store = open_store(uri)
        store.execute(DDL)
        n = args.events
        store.append_columns("audit_events", {
            "seq": list(range(1, n + 1)), "ts": [float(i) for i in range(n)], "kind": ["tool"] * n,
            "agent": [f"agent{i % 7}" for i in range(n)], "run_id": [f"r{i // 20}" for i in range(n)],
            "tool": ["send_email"] * n, "decision": ["ok"] * n,
            "data": [json.dumps({"i": i, "arguments": {"to": "x@example.com", "body": "hello " * 20}})
                     for i in range(n)],
            "prev_hash": ["a" * 64] * n, "hash": ["b" * 64] * n})
        print(f"{args.store}, {n} audit events, median of {args.repeat}")
        for sql in QUERIES:
            direct, fenced = [], []
            for _ in range(args.repeat):
                started = time.perf_counter()
                store.query(sql)
                direct.append(time.perf_counter() - started)
                started = time.perf_counter()
                store.query_readonly(sql, tables=("audit_events",), max_rows=1000, timeout_s=60)
                fenced.append(time.perf_counter() - started)
            d, f = statistics.median(direct), statistics.median(fenced)
            print(f"  {sql[:60]:60} query {d * 1000:8.1f} ms  read-only {f * 1000:8.1f} ms  ratio {f / d:6.1f}x")
        store.close()


if __name__ == "__main__":
    main()
