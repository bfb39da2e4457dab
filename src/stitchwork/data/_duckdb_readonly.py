"""DuckDB's read-only query: one checked SELECT over a locked, in-memory snapshot of the tables it may read.

DuckDB classifies ``WITH d AS (DELETE FROM t RETURNING x) SELECT … FROM d`` as a SELECT and runs the delete, and
with its defaults ``read_text``, ``read_csv``, ``glob`` or ``ATTACH`` reach any file of the host. So a checked
"SELECT only" is not enough. The query runs instead in a separate in-memory database that holds read-only Arrow
copies of the tables it names (and only those it may read), opened with external access off, extension loading
off and the configuration locked (``SET`` cannot undo any of it). Before that, the text must parse as exactly one
SELECT whose tree has no INSERT, UPDATE or DELETE node. A timer interrupts it after ``timeout_s``; the result is
fetched in chunks and refused past ``max_rows``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import duckdb

from stitchwork.errors import QueryRefused, StoreError

#: Query-node types a read-only statement may contain; anything else (DELETE_QUERY_NODE, INSERT_QUERY_NODE,
#: UPDATE_QUERY_NODE, MERGE_INTO…) is refused.
_READ_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})

#: The snapshot database: no files, network, extensions or secrets, and the configuration locked last.
SNAPSHOT_CONFIG: dict[str, Any] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "threads": 2,
    "max_memory": "1GB",
    "lock_configuration": True,
}


def check_limits(max_rows: int, timeout_s: float) -> None:
    """Refuses nonsensical limits (a caller bug, not the query's)."""
    if max_rows < 1 or not timeout_s > 0:
        raise StoreError(f"read-only query limits must be positive (max_rows={max_rows}, timeout_s={timeout_s})")


def _nodes(tree: Any) -> Iterator[dict[str, Any]]:
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_select(conn: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    """Refuses anything but one read-only SELECT (no data-modifying CTE anywhere in it)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"the query does not parse: {exc}") from exc
    if len(statements) != 1:
        raise QueryRefused(f"give exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(f"only SELECT queries are allowed here, got {kind.name}")
    try:
        rows = conn.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
        tree = json.loads(rows[0][0]) if rows else {"error": True}
    except (duckdb.Error, ValueError) as exc:
        raise QueryRefused(f"the query cannot be checked: {exc}") from exc
    if tree.get("error"):
        raise QueryRefused(f"only plain SELECT queries are allowed here: {tree.get('error_message', 'not a SELECT')}")
    for node in _nodes(tree):
        kind_name = node.get("type")
        if isinstance(kind_name, str) and kind_name.endswith("_NODE") and kind_name not in _READ_NODES:
            raise QueryRefused(f"the query may only read: it contains a {kind_name.removesuffix('_NODE')} "
                               "(data-modifying CTEs are refused)")
    return dict(tree)


def referenced_tables(sql: str, tree: dict[str, Any], allowed: Collection[str]) -> list[str]:
    """The tables the query names (lower case), each one it may read, else refused.

    Names come from the parsed tree (base tables with their catalog and schema, minus WITH names) and, when it
    can bind the text (not with ``?`` parameters), DuckDB's own scan, which also sees ``query_table('x')``. A name
    missed by both is harmless: the snapshot holds only the tables chosen here.
    """
    try:
        scanned = {n.lower() for n in duckdb.get_table_names(sql)}
    except duckdb.Error:
        scanned = set()
    permitted = {t.lower() for t in allowed}
    ctes: set[str] = set()
    bases: list[dict[str, Any]] = []
    for node in _nodes(tree):
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            ctes.update(str(entry.get("key", "")).lower() for entry in cte_map.get("map", ()) if
                        isinstance(entry, dict))
        if node.get("type") == "BASE_TABLE":
            bases.append(node)
    names = set(scanned)
    for node in bases:
        name = str(node.get("table_name", "")).lower()
        qualifier = [str(node.get(k, "")).lower() for k in ("catalog_name", "schema_name") if node.get(k)]
        if qualifier and qualifier not in (["main"], ["memory", "main"], ["memory"]):
            raise QueryRefused(f"table {'.'.join([*qualifier, name])!r}: the query may read only the tables "
                               f"{', '.join(sorted(permitted))}")
        if name not in ctes:
            names.add(name)
    for name in sorted(names):
        if name not in permitted:
            raise QueryRefused(f"table {name!r} is not open to this query; it may read: "
                               f"{', '.join(sorted(permitted))}")
    return sorted(names)


def needed_columns(tree: dict[str, Any]) -> set[str] | None:
    """Names the query may use as columns (every string of its tree, lower case), or None when it needs all of a
    table's columns (``*``, ``COLUMNS(...)``, ``DESCRIBE``, ``SUMMARIZE``). Over-inclusion only costs a copy."""
    words: set[str] = set()
    stack: list[Any] = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("class") in ("STAR", "COLUMNS") or item.get("type") in ("STAR", "COLUMNS", "SHOW_REF"):
                return None
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            words.add(item.lower())
    return words


def open_snapshot() -> duckdb.DuckDBPyConnection:
    """A fresh in-memory database with external access off and its configuration locked."""
    return duckdb.connect(":memory:", config=dict(SNAPSHOT_CONFIG))


def run_locked_down(
    source: duckdb.DuckDBPyConnection, source_lock: threading.RLock, sql: str, params: Sequence[Any], *,
    tables: Collection[str], max_rows: int, timeout_s: float, where: str,
) -> list[dict[str, Any]]:
    """Checks ``sql``, copies the tables it reads out of ``source`` and runs it in a locked snapshot."""
    check_limits(max_rows, timeout_s)
    snapshot = open_snapshot()
    try:
        tree = check_select(snapshot, sql)
        wanted = referenced_tables(sql, tree, tables)
        copies = _copy(source, source_lock, wanted, needed_columns(tree), where)
        for name, data in copies.items():
            snapshot.register(name, data)
        return _fetch(snapshot, sql, params, max_rows=max_rows, timeout_s=timeout_s, where=where)
    finally:
        snapshot.close()


def _copy(source: duckdb.DuckDBPyConnection, source_lock: threading.RLock, wanted: list[str],
          columns: set[str] | None, where: str) -> dict[str, Any]:
    """Arrow copies of the tables (only the ``columns`` the query may use, at least one), read in one transaction
    on a cursor of their own, so writers are not blocked meanwhile."""
    with source_lock:
        reader = source.cursor()
    copies: dict[str, Any] = {}
    try:
        reader.execute("BEGIN TRANSACTION")
        present: dict[str, list[str]] = {}
        for table, column in reader.execute(
                "SELECT table_name, column_name FROM duckdb_columns() WHERE schema_name = 'main' AND database_name "
                "= current_database() ORDER BY table_name, column_index").fetchall():
            present.setdefault(table.lower(), []).append(column)
        for name in wanted:
            if name in present:
                chosen = present[name] if columns is None else [c for c in present[name] if c.lower() in columns]
                names = ", ".join('"' + c.replace('"', '""') + '"' for c in chosen or present[name][:1])
                copies[name] = reader.sql(f'SELECT {names} FROM "{name}"').to_arrow_table()
        reader.execute("ROLLBACK")
    except duckdb.Error as exc:
        raise StoreError(f"{where}: cannot read the tables {', '.join(wanted)}: {exc}") from exc
    finally:
        reader.close()
    return copies


def _fetch(snapshot: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any], *, max_rows: int,
           timeout_s: float, where: str) -> list[dict[str, Any]]:
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        snapshot.interrupt()

    timer = threading.Timer(timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        cursor = snapshot.execute(sql, list(params))
        names = [d[0] for d in cursor.description or ()]
        rows = cursor.fetchmany(max_rows + 1)
    except duckdb.InterruptException as exc:
        raise QueryRefused(f"the query ran longer than {timeout_s:g} s and was stopped") from exc
    except duckdb.PermissionException as exc:
        raise QueryRefused(f"the query may read only its tables (no files, network or extensions): {exc}") from exc
    except duckdb.Error as exc:
        if stopped.is_set():
            raise QueryRefused(f"the query ran longer than {timeout_s:g} s and was stopped") from exc
        raise StoreError(f"{where}: {exc}") from exc
    finally:
        timer.cancel()
    if len(rows) > max_rows:
        raise QueryRefused(f"the query returns more than {max_rows} rows (the limit); narrow it or add LIMIT")
    return [dict(zip(names, row, strict=True)) for row in rows]
