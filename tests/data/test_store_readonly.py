"""One behaviour suite for ``Store.query_readonly`` (the audit query) on every store: it reads only the tables it is
given, changes nothing, reaches no file, network, extension or setting, and is stopped by its row and time limits.

Every known way around a "SELECT only" check is tried on every store (the DuckDB spellings and the ClickHouse
ones); whatever the engine answers, the tables must be unchanged afterwards, no file may appear, no secret file's
content may come back and no connection may reach the listener.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stitchwork.audit.log import AuditLog
from stitchwork.data._base import Store
from stitchwork.data.schema import Column, Table
from stitchwork.errors import QueryRefused, StoreError
from tests.plugins.stores import StoreFactory
from tests.signing import Ed25519Signer

NOTES = Table("notes", (Column("seq", "BIGINT", False), Column("note", "VARCHAR", False)), key=("seq",))
TOKENS = Table("operator_tokens", (Column("id", "VARCHAR", False), Column("token_sha256", "VARCHAR", False),
                                   Column("created_at", "DOUBLE", False), Column("revoked", "BOOLEAN", False)),
               key=("id",))
REVOKED = Table("revoked_tokens", (Column("jti", "VARCHAR", False), Column("exp", "DOUBLE", False)), key=("jti",))
ALLOWED = ("audit_events", "notes")
HIDDEN = ("operator_tokens", "revoked_tokens", "audit_heads")
SECRET = "s3cr3t-host-file-content-1234"


@pytest.fixture
def listener() -> Iterator[tuple[int, socket.socket]]:
    """A TCP port that records whether anything connected (url(), httpfs, remote(), s3())."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server.getsockname()[1], server
    server.close()


def _connected(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.fixture
def filled(make_store: StoreFactory, tmp_path: Path) -> Store:
    """A store with an audit chain, a table it may read and the tables it may not."""
    with AuditLog(make_store(), signer=Ed25519Signer("k1"), journal_path=None) as log:
        for i in range(12):
            log.append("tool", agent=f"agent{i % 3}", run_id=f"r{i // 4}", tool=("read", "send")[i % 2],
                       decision=("ok", "deny")[i % 2 == 0 and i > 5], data={"i": i})
    store = make_store()
    for table in (NOTES, TOKENS, REVOKED):
        store.ensure(table)
    store.append("notes", [{"seq": i, "note": f"n{i}"} for i in range(1, 4)])
    store.append("operator_tokens", [{"id": "t1", "token_sha256": "a" * 64, "created_at": 1.0, "revoked": False}])
    store.append("revoked_tokens", [{"jti": "j1", "exp": 2.0}])
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (tmp_path / "secret.csv").write_text(f"a\n{SECRET}\n")
    return store


def _state(store: Store) -> dict[str, Any]:
    return {
        "events": store.query("SELECT seq, kind, agent, decision, data, hash FROM audit_events ORDER BY seq"),
        "heads": store.query("SELECT key_id, seq, hash, signature FROM audit_heads ORDER BY key_id"),
        "notes": store.query("SELECT seq, note FROM notes ORDER BY seq"),
        "tokens": store.query("SELECT id, token_sha256, revoked FROM operator_tokens ORDER BY id"),
        "revoked": store.query("SELECT jti FROM revoked_tokens ORDER BY jti"),
    }


def _ro(store: Store, sql: str, params: tuple[Any, ...] = (), **limits: Any) -> list[dict[str, Any]]:
    return store.query_readonly(sql, params, tables=ALLOWED, **limits)


# ------------------------------------------------------------------------------------------------ what keeps working
def test_benign_queries_over_the_tables_it_may_read(filled: Store) -> None:
    assert _ro(filled, "SELECT count(*) AS n FROM audit_events") == [{"n": 12}]
    got = _ro(filled, "SELECT agent, count(*) AS n FROM audit_events GROUP BY agent ORDER BY agent")
    assert got == [{"agent": "agent0", "n": 4}, {"agent": "agent1", "n": 4}, {"agent": "agent2", "n": 4}]
    joined = _ro(filled, "SELECT e.seq AS seq, n.note AS note FROM audit_events AS e JOIN notes AS n "
                         "ON e.seq = n.seq ORDER BY e.seq")
    assert joined == [{"seq": 1, "note": "n1"}, {"seq": 2, "note": "n2"}, {"seq": 3, "note": "n3"}]
    assert _ro(filled, "WITH d AS (SELECT seq FROM audit_events WHERE decision = 'deny') "
                       "SELECT count(*) AS n FROM d") == [{"n": 3}]
    assert _ro(filled, "SELECT seq FROM audit_events WHERE agent = ? AND seq > ? ORDER BY seq LIMIT 2",
               ("agent1", 2)) == [{"seq": 5}, {"seq": 8}]
    assert _ro(filled, "SELECT max(seq) AS hi FROM audit_events;") == [{"hi": 12}]
    assert _ro(filled, "SELECT seq FROM audit_events WHERE seq IN (SELECT seq FROM notes) ORDER BY seq -- last"
               ) == [{"seq": 1}, {"seq": 2}, {"seq": 3}]


@pytest.mark.parametrize("sql", [
    "SELECT * FROM audit_events ORDER BY seq",
    "SELECT e.* FROM audit_events AS e ORDER BY e.seq",
    "SELECT count(*) AS n FROM audit_events",
    "SELECT seq, note FROM notes JOIN audit_events USING (seq) ORDER BY seq",
    "SELECT agent, max(seq) AS hi, min(tool) AS lo FROM audit_events GROUP BY agent ORDER BY agent",
    "SELECT seq, row_number() OVER (PARTITION BY agent ORDER BY seq) AS k FROM audit_events ORDER BY seq",
])
def test_answers_match_the_plain_query(filled: Store, sql: str) -> None:
    assert _ro(filled, sql) == filled.query(sql)


def test_a_write_behind_a_comment_is_only_a_comment(filled: Store) -> None:
    before = _state(filled)
    with contextlib.suppress(QueryRefused):  # ClickHouse engines refuse any ';' before the end
        assert _ro(filled, "SELECT 1 AS x -- ; DELETE FROM audit_events") == [{"x": 1}]
    assert _state(filled) == before


def test_the_row_limit_refuses_a_larger_result(filled: Store) -> None:
    assert len(_ro(filled, "SELECT seq FROM audit_events", max_rows=12)) == 12
    with pytest.raises(QueryRefused, match="more than 11 rows"):
        _ro(filled, "SELECT seq FROM audit_events", max_rows=11)


def test_the_time_limit_stops_a_long_query(filled: Store) -> None:
    heavy = ("SELECT count(*) AS n FROM audit_events a, audit_events b, audit_events c, audit_events d, "
             "audit_events e, audit_events f, audit_events g, audit_events h, audit_events i, audit_events j "
             "WHERE a.data || b.data || c.data || d.data || e.data || f.data || g.data || h.data || i.data "
             "|| j.data LIKE '%never%'")
    with pytest.raises(QueryRefused, match="longer than"):
        _ro(filled, heavy, timeout_s=0.3)
    assert _ro(filled, "SELECT count(*) AS n FROM notes") == [{"n": 3}]  # the store still answers


# ------------------------------------------------------------------------------------------------ every way around
WRITES = [
    "WITH d AS (DELETE FROM audit_events RETURNING seq) SELECT count(*) AS n FROM d",
    "WITH d AS (DELETE FROM audit_events WHERE seq > 5 RETURNING seq) SELECT * FROM d",
    "WITH d AS (UPDATE audit_events SET decision = 'allow' RETURNING seq) SELECT count(*) FROM d",
    "WITH d AS MATERIALIZED (UPDATE notes SET note = 'x' RETURNING seq) SELECT * FROM d",
    "WITH d AS (INSERT INTO operator_tokens VALUES ('forged', 'b', 0, false) RETURNING id) SELECT * FROM d",
    "WITH d AS (INSERT INTO audit_events SELECT * FROM audit_events RETURNING seq) SELECT 1",
    "SELECT 1 AS x UNION ALL (WITH d AS (DELETE FROM notes RETURNING seq) SELECT count(*) FROM d)",
    "SELECT * FROM (WITH d AS (DELETE FROM notes RETURNING seq) SELECT * FROM d) AS s",
    "DELETE FROM audit_events",
    "DELETE FROM audit_events WHERE seq = 3",
    "UPDATE audit_events SET decision = 'allow'",
    "INSERT INTO operator_tokens VALUES ('forged', 'b', 0, false)",
    "INSERT INTO notes SELECT seq + 100, note FROM notes",
    "TRUNCATE audit_events",
    "ALTER TABLE audit_events DELETE WHERE 1",
    "ALTER TABLE audit_events UPDATE decision = 'allow' WHERE 1",
    "ALTER TABLE notes ADD COLUMN z INTEGER",
    "DROP TABLE audit_events",
    "DROP TABLE IF EXISTS notes",
    "CREATE TABLE forged AS SELECT 1 AS x",
    "CREATE VIEW forged AS SELECT 1 AS x",
    "CREATE MACRO forged(a) AS a",
    "CREATE OR REPLACE TEMP VIEW audit_events AS SELECT 1 AS seq",
    "CREATE SECRET forged (TYPE s3, KEY_ID 'x', SECRET 'y')",
    "MERGE INTO notes USING notes AS s ON notes.seq = s.seq WHEN MATCHED THEN DELETE",
    "SELECT 1; DELETE FROM audit_events",
    "SELECT 1; SELECT 2",
    "SELECT 1 AS x; DROP TABLE notes;",
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "SET readonly = 0",
    "SELECT * FROM notes SETTINGS readonly = 0",
    "PRAGMA enable_external_access",
    "PRAGMA database_list",
    "INSTALL httpfs",
    "LOAD httpfs",
    "FORCE INSTALL httpfs",
    "CALL duckdb_settings()",
    "CHECKPOINT",
    "VACUUM",
    "OPTIMIZE TABLE audit_events FINAL",
    "DETACH memory",
    "SYSTEM DROP MARK CACHE",
    "KILL QUERY WHERE 1",
    "GRANT SELECT ON *.* TO default",
    "USE system",
    "EXPLAIN ANALYZE WITH d AS (DELETE FROM audit_events RETURNING seq) SELECT * FROM d",
]

FILES = [  # {tmp} is the test's directory; secret.txt / secret.csv hold SECRET
    "SELECT * FROM read_text('{tmp}/secret.txt')",
    "SELECT content FROM read_blob('{tmp}/secret.txt')",
    "SELECT * FROM read_csv('{tmp}/secret.csv')",
    "SELECT * FROM read_csv_auto('{tmp}/secret.csv')",
    "SELECT * FROM read_json('{tmp}/secret.txt')",
    "SELECT * FROM read_json_auto('{tmp}/secret.txt')",
    "SELECT * FROM read_parquet('{tmp}/secret.txt')",
    "SELECT * FROM parquet_metadata('{tmp}/secret.txt')",
    "SELECT * FROM sniff_csv('{tmp}/secret.csv')",
    "SELECT * FROM glob('{tmp}/*')",
    "SELECT * FROM '{tmp}/secret.csv'",
    "FROM '{tmp}/secret.csv'",
    "SELECT * FROM read_text('{tmp}/secret.txt') UNION ALL SELECT 'x'",
    "SELECT (SELECT content FROM read_text('{tmp}/secret.txt')) AS c",
    "WITH f AS (SELECT * FROM read_csv('{tmp}/secret.csv')) SELECT * FROM f",
    "SELECT * FROM query('SELECT * FROM read_text(''{tmp}/secret.txt'')')",
    "ATTACH '{tmp}/attached.duckdb' AS other",
    "ATTACH ':memory:' AS other",
    "COPY audit_events TO '{tmp}/out.csv'",
    "COPY (SELECT * FROM audit_events) TO '{tmp}/out.csv' (FORMAT csv)",
    "COPY notes FROM '{tmp}/secret.csv'",
    "EXPORT DATABASE '{tmp}/exported'",
    "IMPORT DATABASE '{tmp}/exported'",
    "SELECT file('{tmp}/secret.txt') AS c",
    "SELECT * FROM file('{tmp}/secret.txt', 'LineAsString')",
    "SELECT * FROM file('{tmp}/secret.csv', 'CSV', 'a String')",
    "SELECT * FROM executable('cat {tmp}/secret.txt', 'LineAsString', 'x String')",
    "SELECT * FROM executable('echo pwned > {tmp}/pwned', 'LineAsString', 'x String')",
    "SELECT * FROM input('x String')",
    "SELECT * FROM Python(store)",
    "SELECT * FROM merge(currentDatabase(), '.*')",
    "SELECT * FROM numbers(3)",
    "SELECT * FROM generateRandom('a String') LIMIT 1",
    "SELECT * FROM audit_events INTO OUTFILE '{tmp}/out.csv'",
    "SELECT * FROM audit_events INTO OUTFILE '{tmp}/out.csv' FORMAT CSV",
    "SELECT * FROM audit_events FORMAT JSON",
    "SELECT dictGet('d', 'x', 1)",
    "SELECT joinGet('operator_tokens', 'token_sha256', 't1')",
    "SELECT getSetting('readonly')",
    "SELECT hasColumnInTable(currentDatabase(), 'operator_tokens', 'id')",
]

NETWORK = [  # {port} is a local listener that must never see a connection
    "SELECT * FROM read_csv('http://127.0.0.1:{port}/x.csv')",
    "SELECT * FROM read_text('http://127.0.0.1:{port}/x')",
    "SELECT * FROM read_parquet('s3://bucket/x.parquet')",
    "SELECT * FROM url('http://127.0.0.1:{port}/x', 'LineAsString')",
    "SELECT * FROM s3('http://127.0.0.1:{port}/bucket/x.csv', 'CSV', 'a String')",
    "SELECT * FROM remote('127.0.0.1:{port}', system.one)",
    "SELECT * FROM remoteSecure('127.0.0.1:{port}', system.one)",
    "SELECT * FROM mysql('127.0.0.1:{port}', 'db', 't', 'u', 'p')",
    "SELECT * FROM postgresql('127.0.0.1:{port}', 'db', 't', 'u', 'p')",
    "SELECT * FROM cluster('default', system.one)",
    "ATTACH 'http://127.0.0.1:{port}/x.duckdb' AS other",
    "ATTACH 'postgres:host=127.0.0.1 port={port}' AS pg (TYPE postgres)",
]

HIDDEN_READS = [
    "SELECT * FROM operator_tokens",
    "SELECT token_sha256 FROM main.operator_tokens",
    "SELECT * FROM revoked_tokens",
    "SELECT * FROM audit_heads",
    "SELECT (SELECT count(*) FROM operator_tokens) AS n",
    "SELECT seq FROM audit_events WHERE agent IN (SELECT id FROM operator_tokens)",
    "SELECT seq IN operator_tokens FROM audit_events",
    "SELECT * FROM audit_events JOIN operator_tokens ON true",
    "SELECT * FROM notes UNION ALL SELECT id, token_sha256 FROM operator_tokens",
    "WITH x AS (SELECT * FROM operator_tokens) SELECT * FROM x",
    "SELECT * FROM query_table('operator_tokens')",
    "SELECT * FROM query('SELECT * FROM operator_tokens')",
    "SELECT * FROM system.tables",
    "SELECT * FROM system.settings",
    "SELECT * FROM system.processes",
    "SELECT * FROM system.query_log",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM duckdb_secrets()",
    "SELECT * FROM other_db.operator_tokens",
    "SELECT * FROM \"operator_tokens\"",
    "SELECT * FROM `operator_tokens`",
    "SELECT * FROM OPERATOR_TOKENS",
]


def _leaked(value: Any) -> bool:
    return SECRET in repr(value)


@pytest.mark.parametrize("sql", WRITES)
def test_writes_are_refused_and_nothing_changes(filled: Store, sql: str, tmp_path: Path) -> None:
    before = _state(filled)
    with pytest.raises(StoreError):
        _ro(filled, sql)
    assert _state(filled) == before
    # the store's configuration is untouched too: the next query is still locked down
    with pytest.raises(StoreError) as caught:
        _ro(filled, f"SELECT * FROM read_text('{tmp_path}/secret.txt')")
    assert not _leaked(caught.value)


@pytest.mark.parametrize("sql", FILES)
def test_no_file_is_read_or_written(filled: Store, sql: str, tmp_path: Path) -> None:
    before = _state(filled)
    listing = sorted(p.name for p in tmp_path.iterdir())
    try:
        rows = _ro(filled, sql.format(tmp=tmp_path))
    except StoreError as exc:
        assert not _leaked(exc)
    else:
        pytest.fail(f"not refused: {sql} -> {rows!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert _state(filled) == before


@pytest.mark.parametrize("sql", NETWORK)
def test_no_network_is_reached(filled: Store, sql: str, listener: tuple[int, socket.socket]) -> None:
    port, server = listener
    with pytest.raises(StoreError):
        _ro(filled, sql.format(port=port), timeout_s=3.0)
    assert not _connected(server)


@pytest.mark.parametrize("sql", HIDDEN_READS)
def test_tables_it_may_not_read_are_unreachable(filled: Store, sql: str) -> None:
    with pytest.raises(StoreError) as caught:
        rows = _ro(filled, sql)
        pytest.fail(f"not refused: {sql} -> {rows!r}")
    assert "a" * 64 not in repr(caught.value)


def test_refusals_name_what_is_open(filled: Store) -> None:
    with pytest.raises(QueryRefused, match="notes"):
        _ro(filled, "SELECT * FROM operator_tokens")
    with pytest.raises(QueryRefused, match="one SQL statement"):
        _ro(filled, "SELECT 1; SELECT 2")


def test_stores_without_a_safe_read_only_path_refuse_everything() -> None:
    class Bare(Store):
        uri = "bare://"

        def execute(self, sql: str, params: Any = ()) -> None: ...
        def append(self, table: str, rows: Any) -> None: ...
        def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
            return []

    with pytest.raises(QueryRefused, match="cannot run untrusted"):
        Bare().query_readonly("SELECT 1", tables=ALLOWED)
