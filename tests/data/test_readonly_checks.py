"""Each fence of the read-only query alone (the behaviour suite checks them together, where one hides another)."""

from __future__ import annotations

import duckdb
import pytest

from stitchwork.data._clickhouse_readonly import check_ast, parse_ast, single_statement
from stitchwork.data._duckdb_readonly import check_select, open_snapshot, referenced_tables
from stitchwork.errors import QueryRefused


@pytest.mark.parametrize("sql", [
    "WITH d AS (DELETE FROM t RETURNING x) SELECT count(*) FROM d",
    "WITH d AS (UPDATE t SET x = 1 RETURNING x) SELECT * FROM d",
    "WITH d AS (INSERT INTO t VALUES (1) RETURNING x) SELECT * FROM d",
    "SELECT 1 UNION ALL (WITH d AS (DELETE FROM t RETURNING x) SELECT count(*) FROM d)",
    "SELECT * FROM (WITH d AS MATERIALIZED (DELETE FROM t RETURNING x) SELECT * FROM d) s",
])
def test_data_modifying_ctes_are_refused_before_running(sql: str) -> None:
    conn = open_snapshot()
    with pytest.raises(QueryRefused, match="may only read"):
        check_select(conn, sql)


@pytest.mark.parametrize("sql", ["SELECT 1; SELECT 2", "DELETE FROM t", "PRAGMA version", "SET threads = 1",
                                 "ATTACH ':memory:' AS x", "CALL duckdb_settings()", "CREATE TABLE x (a INT)"])
def test_only_one_select_passes(sql: str) -> None:
    with pytest.raises(QueryRefused):
        check_select(open_snapshot(), sql)


def test_tables_come_from_the_tree_and_with_names_are_not_tables() -> None:
    sql = "WITH c AS (SELECT 1 AS x) SELECT * FROM c, a AS x JOIN b ON true WHERE 1 IN (SELECT 1 FROM d)"
    tree = check_select(open_snapshot(), sql)
    assert referenced_tables(sql, tree, {"a", "b", "d"}) == ["a", "b", "d"]
    with pytest.raises(QueryRefused, match="'d' is not open"):
        referenced_tables(sql, tree, {"a", "b"})
    qualified = "SELECT * FROM other.main.a"
    with pytest.raises(QueryRefused, match=r"other\.main\.a"):
        referenced_tables(qualified, check_select(open_snapshot(), qualified), {"a"})


def test_the_snapshot_is_closed_to_the_host_and_locked() -> None:
    conn = open_snapshot()
    for sql in ("SELECT * FROM read_text('/etc/hostname')", "SELECT * FROM glob('/*')", "INSTALL httpfs",
                "SET enable_external_access = true", "RESET enable_external_access", "SET lock_configuration = false"):
        with pytest.raises(duckdb.Error):
            conn.execute(sql).fetchall()


@pytest.mark.parametrize(("sql", "ok"), [
    ("SELECT 1", True), ("SELECT 1;", True), ("  SELECT 1 ;  ", True), ("SELECT 1; SELECT 2", False),
    ("SELECT ';'", False), ("", False), (";", False),
])
def test_one_statement_means_no_semicolon_before_the_end(sql: str, ok: bool) -> None:
    if ok:
        assert single_statement(sql) == "SELECT 1"
    else:
        with pytest.raises(QueryRefused):
            single_statement(sql)


AST = """SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 3)
   ExpressionList (children 1)
    Function {fn} (alias c) (children 1)
     ExpressionList (children 1)
      Identifier {ident}
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      {table}
"""


def _check(fn: str = "count", ident: str = "seq", table: str = "TableIdentifier audit_events") -> None:
    nodes = parse_ast(AST.format(fn=fn, ident=ident, table=table).splitlines())
    check_ast(nodes, database="db", allowed={"audit_events"}, tables={"audit_events", "operator_tokens"},
              databases={"db", "system", "default"})


def test_the_clickhouse_tree_check() -> None:
    _check()
    _check(table="TableIdentifier db.audit_events")
    _check(table="TableIdentifier some_with_name")
    for bad in ({"fn": "file"}, {"fn": "dictGetString"}, {"fn": "joinGet"}, {"fn": "getSetting"},
                {"ident": "operator_tokens"}, {"ident": "system.settings"}, {"ident": "db.operator_tokens.id"},
                {"table": "TableIdentifier operator_tokens"}, {"table": "TableIdentifier system.one"},
                {"table": "TableIdentifier default.audit_events"}, {"table": "Function numbers (children 1)"},
                {"table": "Function url (children 1)"}):
        with pytest.raises(QueryRefused):
            _check(**bad)
    for root in ("SelectWithUnionQuery (children 2)", "InsertQuery (children 1)", "AlterQuery (children 1)"):
        with pytest.raises(QueryRefused):
            check_ast(parse_ast([root]), database="db", allowed=(), tables=(), databases=())
