"""What ClickHouse adapters share: translating the platform's DuckDB-dialect SQL, and the store around it.

The platform issues a small SQL subset (see :mod:`stitchwork.data.schema`). On ClickHouse:

* ``CREATE TABLE IF NOT EXISTS`` is parsed into a :class:`~stitchwork.data.schema.Table` and re-rendered as a
  MergeTree table; tables with a primary key become ``ReplacingMergeTree`` ordered by the key.
* ``INSERT … ON CONFLICT (key) DO UPDATE …`` (an upsert) becomes a plain ``INSERT``: the replacing engine keeps the
  newest row per key, and every read runs with ``final = 1`` so it sees only that row.
* ``UPDATE`` and ``DELETE`` run as ClickHouse lightweight updates and deletes (enabled on every table created here):
  correct but slow compared with DuckDB (each writes a patch part), so mutable platform tables such as ``runs`` and
  ``approvals`` belong on DuckDB in production; they work here so one behaviour suite covers both.
* ``CREATE INDEX`` is ignored (sort keys and skip indexes come from the table layout).
* ``?`` placeholders are bound client-side as escaped literals. Floats are parsed with
  ``precise_float_parsing = 1`` so they round-trip exactly (the audit chain hashes timestamps).
* Aggregates over no rows return NULL (``aggregate_functions_null_for_empty = 1``), as in standard SQL.
"""

from __future__ import annotations

import math
import re
import threading
from abc import abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from stitchwork.data._base import DEFAULT_READONLY_ROWS, DEFAULT_READONLY_TIMEOUT_S, Store
from stitchwork.data._clickhouse_readonly import check_ast, parse_ast, readonly_settings, single_statement
from stitchwork.data._duckdb_readonly import check_limits
from stitchwork.data.schema import Table, parse_create_table
from stitchwork.errors import QueryRefused, StoreError

#: Session settings that make ClickHouse answer the platform's queries as DuckDB does.
SETTINGS: dict[str, int] = {
    "final": 1,
    "aggregate_functions_null_for_empty": 1,
    "precise_float_parsing": 1,
    "mutations_sync": 2,
    "join_use_nulls": 1,
}

_ON_CONFLICT = re.compile(r"\s+ON\s+CONFLICT\b.*$", re.IGNORECASE | re.DOTALL)
_CREATE_INDEX = re.compile(r"^\s*CREATE\s+(UNIQUE\s+)?INDEX\b", re.IGNORECASE)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def literal(value: Any) -> str:
    """``value`` as a ClickHouse SQL literal.

    Raises:
        StoreError: A type with no literal form here.
    """
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(float(value))
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    raise StoreError(f"cannot bind a {type(value).__name__} as a ClickHouse SQL parameter")


def bind(sql: str, params: Sequence[Any]) -> str:
    """Replaces each ``?`` outside quotes and comments with the next parameter as a literal.

    Raises:
        StoreError: The number of placeholders and parameters differ.
    """
    if not params and "?" not in sql:
        return sql
    out: list[str] = []
    it = iter(params)
    used = 0
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i : j + 1])
            i = j + 1
            continue
        if ch == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append(sql[i:j])
            i = j
            continue
        if ch == "?":
            try:
                out.append(literal(next(it)))
            except StopIteration:
                raise StoreError(f"SQL has more ? placeholders than the {len(params)} parameter(s) given") from None
            used += 1
            i += 1
            continue
        out.append(ch)
        i += 1
    if used != len(params):
        raise StoreError(f"SQL has {used} ? placeholder(s) but {len(params)} parameter(s) were given")
    return "".join(out)


def translate(sql: str, params: Sequence[Any] = ()) -> tuple[str | None, Table | None]:
    """The ClickHouse statement for one platform statement (None: nothing to run) and its table if it creates one."""
    if _CREATE_INDEX.match(sql):
        return None, None
    table = parse_create_table(sql)
    if table is not None:
        return None, table
    bound = bind(sql, params)
    if re.match(r"^\s*INSERT\b", bound, re.IGNORECASE):
        bound = _ON_CONFLICT.sub("", bound)
    return bound, None


class ClickHouseFamilyStore(Store):
    """A store on a ClickHouse engine; subclasses supply the connection (``_run``, ``_insert``)."""

    dialect = "clickhouse"

    def __init__(self, uri: str, database: str) -> None:
        if not _IDENT.match(database):
            raise StoreError(f"{uri}: database name {database!r} must be a plain identifier")
        self.uri = uri
        self.database = database
        self._lock = threading.RLock()
        self._tables: dict[str, Table] = {}

    @abstractmethod
    def _run(self, sql: str) -> list[dict[str, Any]]:
        """Runs one ClickHouse statement; rows as dicts. Raises StoreError."""

    @abstractmethod
    def _run_readonly(self, sql: str, settings: Mapping[str, int | float | str]) -> list[dict[str, Any]]:
        """Runs one query with these query-level settings (none: as given). Raises StoreError."""

    @abstractmethod
    def _insert(self, table: str, columns: list[str], rows: Sequence[dict[str, Any]]) -> None:
        """Inserts rows (one block, atomic). Raises StoreError."""

    def ensure(self, table: Table) -> None:
        """Creates ``table`` as a MergeTree table if it does not exist."""
        with self._lock:
            self._run(table.clickhouse_ddl(self.database))
            self._tables[table.name] = table

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        statement, table = translate(sql, params)
        if table is not None:
            self.ensure(table)
        elif statement is not None:
            with self._lock:
                self._run(statement)

    def append(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        with self._lock:
            self._insert(table, list(rows[0]), rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        statement, _ = translate(sql, params)
        if statement is None:
            return []
        with self._lock:
            return self._run(statement)

    def query_readonly(
        self, sql: str, params: Sequence[Any] = (), *, tables: Collection[str],
        max_rows: int = DEFAULT_READONLY_ROWS, timeout_s: float = DEFAULT_READONLY_TIMEOUT_S,
    ) -> list[dict[str, Any]]:
        """One checked SELECT on the live database with ``readonly = 1`` and the engine's own limits (see
        :mod:`stitchwork.data._clickhouse_readonly`)."""
        check_limits(max_rows, timeout_s)
        text = single_statement(bind(single_statement(sql), params))
        with self._lock:
            try:
                explained = self._run_readonly("EXPLAIN AST " + text, {})
            except StoreError as exc:
                raise QueryRefused(f"the query does not parse: {exc}") from exc
            names = self._run(f"SELECT name FROM system.tables WHERE database = {literal(self.database)}")
            databases = self._run("SELECT name FROM system.databases")
            check_ast(parse_ast([str(next(iter(r.values()), "")) for r in explained]), database=self.database,
                      allowed=tables, tables=[r["name"] for r in names], databases=[r["name"] for r in databases])
            try:
                rows = self._run_readonly(text, readonly_settings(max_rows, timeout_s))
            except StoreError as exc:
                message = str(exc)
                if "TIMEOUT_EXCEEDED" in message or "Timeout exceeded" in message:
                    raise QueryRefused(f"the query ran longer than {timeout_s:g} s and was stopped") from exc
                if "READONLY" in message or "readonly mode" in message:
                    raise QueryRefused(f"the query may only read: {message}") from exc
                raise
        if len(rows) > max_rows:
            raise QueryRefused(f"the query returns more than {max_rows} rows (the limit); narrow it or add LIMIT")
        return rows
