"""Translation of the platform's DuckDB-dialect SQL for ClickHouse engines, and the server adapter's errors."""

from __future__ import annotations

import socket

import pytest

from stitchwork.audit.records import _EVENTS_DDL, _HEADS_DDL
from stitchwork.data._clickhouse import bind, literal, translate
from stitchwork.data.schema import parse_create_table
from stitchwork.errors import ConfigError, StoreError


def test_literals_escape_and_round_trip_floats() -> None:
    assert literal("it's \\ x") == "'it\\'s \\\\ x'"
    assert literal(None) == "NULL" and literal(True) == "true" and literal(3) == "3"
    assert float(literal(0.1 + 0.2)) == 0.1 + 0.2
    assert literal(["a", 1]) == "['a', 1]"
    with pytest.raises(StoreError):
        literal(object())


def test_bind_skips_quoted_question_marks_and_counts_parameters() -> None:
    sql = "SELECT '?' AS q, \"a?\" FROM t WHERE x = ? -- why?\nAND y = ?"
    assert bind(sql, [1, "z"]) == "SELECT '?' AS q, \"a?\" FROM t WHERE x = 1 -- why?\nAND y = 'z'"
    with pytest.raises(StoreError, match="placeholder"):
        bind("SELECT ?", [])
    with pytest.raises(StoreError, match="placeholder"):
        bind("SELECT ?", [1, 2])


def test_upsert_becomes_an_insert_and_indexes_are_skipped() -> None:
    sql, table = translate("INSERT INTO h (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                           ["a", 1])
    assert sql == "INSERT INTO h (k, v) VALUES ('a', 1)" and table is None
    assert translate("CREATE INDEX IF NOT EXISTS i ON t (x)") == (None, None)


def test_audit_tables_get_their_analytic_layout() -> None:
    events = parse_create_table(_EVENTS_DDL)
    assert events is not None and events.order_by == ("agent", "ts", "tool", "seq") and events.key == ()
    ddl = events.clickhouse_ddl("db")
    assert "ENGINE = MergeTree ORDER BY (`agent`, `ts`, `tool`, `seq`)" in ddl
    assert "INDEX `audit_events_seq` `seq` TYPE minmax" in ddl
    heads = parse_create_table(_HEADS_DDL)
    assert heads is not None and heads.key == ("key_id",)
    assert "ReplacingMergeTree ORDER BY (`key_id`)" in heads.clickhouse_ddl()
    assert parse_create_table("SELECT 1") is None
    with pytest.raises(StoreError, match="type"):
        parse_create_table("CREATE TABLE t (x BLOB)")


def test_unreachable_clickhouse_server_is_a_store_error_without_the_password() -> None:
    pytest.importorskip("clickhouse_connect", reason="needs pip install 'stitchwork[clickhouse]'")
    from stitchwork.data._base import open_store

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError) as caught:
        open_store(f"clickhouse://user:s3cret-pw@127.0.0.1:{port}/db")
    assert f"127.0.0.1:{port}/db" in str(caught.value) and "s3cret-pw" not in str(caught.value)


def test_unknown_scheme_suggests_one() -> None:
    from stitchwork.data._base import open_store

    with pytest.raises(ConfigError, match="did you mean chdb"):
        open_store("chbd:///x")
