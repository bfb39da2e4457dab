"""Portable table definitions: one :class:`Table` renders DuckDB DDL and ClickHouse MergeTree DDL.

The platform's modules create their tables with DuckDB-dialect ``CREATE TABLE IF NOT EXISTS`` text. Engines that
speak another dialect parse that text with :func:`parse_create_table` (it understands the subset the platform
uses: ``name TYPE [NOT NULL] [PRIMARY KEY]`` columns and a ``PRIMARY KEY (a, b)`` clause) and render their own
DDL from the :class:`Table`. Tables the data layer knows the query patterns of carry an analytic sort order in
:data:`LAYOUTS` (the audit events are ordered by agent, time and tool for the reports), which replaces the
default (the primary key, or insertion order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from stitchwork.errors import StoreError

__all__ = ["LAYOUTS", "Column", "Table", "parse_create_table"]

_PORTABLE_TYPES = {
    "VARCHAR": "VARCHAR", "TEXT": "VARCHAR", "STRING": "VARCHAR",
    "BIGINT": "BIGINT", "INT8": "BIGINT", "LONG": "BIGINT",
    "INTEGER": "INTEGER", "INT": "INTEGER", "INT4": "INTEGER",
    "DOUBLE": "DOUBLE", "FLOAT8": "DOUBLE", "REAL": "DOUBLE", "FLOAT": "DOUBLE",
    "BOOLEAN": "BOOLEAN", "BOOL": "BOOLEAN",
}  # fmt: skip
_CLICKHOUSE_TYPES = {"VARCHAR": "String", "BIGINT": "Int64", "INTEGER": "Int32", "DOUBLE": "Float64", "BOOLEAN": "Bool"}
_CREATE = re.compile(r"^\s*CREATE\s+TABLE\s+(IF\s+NOT\s+EXISTS\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*;?\s*$",
                     re.IGNORECASE | re.DOTALL)  # fmt: skip
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Column:
    """One column.

    Attributes:
        name: Column name.
        type: Portable type: VARCHAR, BIGINT, INTEGER, DOUBLE or BOOLEAN.
        nullable: False for ``NOT NULL`` (and primary-key) columns.
    """

    name: str
    type: str
    nullable: bool = True


@dataclass(frozen=True)
class Table:
    """A table the platform owns.

    Attributes:
        name: Table name.
        columns: Columns in order.
        key: Primary key: unique on DuckDB; on ClickHouse the sorting key of a ``ReplacingMergeTree`` (a newer row
            with the same key replaces the older one, and reads see the newest).
        order_by: Analytic sort order for append-only tables (ClickHouse ``ORDER BY``); ignored when ``key`` is set.
        indexes: Secondary lookups: a DuckDB ART index each, a ClickHouse ``minmax`` skip index each.
        dictionary: VARCHAR columns with few distinct values: ``LowCardinality(String)`` on ClickHouse (DuckDB
            compresses them by itself).
        aggregates: Pre-aggregated tables (with a ``key``): ``(column, function)`` pairs, function ``sum``, ``min``
            or ``max``. On ClickHouse the table becomes an ``AggregatingMergeTree`` whose merges combine rows with
            the same key by these functions (``SimpleAggregateFunction`` columns); on DuckDB it keeps its primary
            key and writers upsert with the same functions. Readers must still aggregate (rows may be unmerged).
    """

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    order_by: tuple[str, ...] = ()
    indexes: tuple[str, ...] = field(default=())
    dictionary: tuple[str, ...] = field(default=())
    aggregates: tuple[tuple[str, str], ...] = field(default=())

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise StoreError(f"table {self.name} has no column {name!r}")

    def duckdb_ddl(self) -> list[str]:
        """``CREATE TABLE IF NOT EXISTS`` (and index) statements in DuckDB's dialect."""
        cols = [f"{c.name} {c.type}{'' if c.nullable else ' NOT NULL'}" for c in self.columns]
        if self.key:
            cols.append(f"PRIMARY KEY ({', '.join(self.key)})")
        out = [f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(cols)})"]
        out += [f"CREATE INDEX IF NOT EXISTS {self.name}_{i} ON {self.name} ({i})" for i in self.indexes]
        return out

    def clickhouse_ddl(self, database: str = "") -> str:
        """``CREATE TABLE IF NOT EXISTS`` with a MergeTree engine.

        Tables with a key become ``ReplacingMergeTree`` ordered by the key (``AggregatingMergeTree`` when they
        declare ``aggregates``); others ``MergeTree`` ordered by ``order_by`` (``tuple()``, insertion order, if
        empty). Lightweight ``UPDATE`` is enabled on every table.
        """
        sort = self.key or self.order_by
        in_sort = set(sort)
        aggregates = dict(self.aggregates) if self.key else {}
        cols = []
        for c in self.columns:
            ch = _CLICKHOUSE_TYPES[c.type]
            if c.nullable and c.name not in in_sort:
                ch = f"Nullable({ch})"
            if c.name in self.dictionary and c.type == "VARCHAR":
                ch = f"LowCardinality({ch})"
            if c.name in aggregates:
                ch = f"SimpleAggregateFunction({aggregates[c.name]}, {ch})"
            cols.append(f"`{c.name}` {ch}")
        cols += [f"INDEX `{self.name}_{i}` `{i}` TYPE minmax GRANULARITY 1" for i in self.indexes]
        engine = ("AggregatingMergeTree" if aggregates else "ReplacingMergeTree") if self.key else "MergeTree"
        order = f"({', '.join(f'`{c}`' for c in sort)})" if sort else "tuple()"
        name = f"`{database}`.`{self.name}`" if database else f"`{self.name}`"
        return (
            f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)}) ENGINE = {engine} ORDER BY {order} "
            "SETTINGS enable_block_number_column = 1, enable_block_offset_column = 1"
        )


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_create_table(sql: str) -> Table | None:
    """The :class:`Table` of a DuckDB ``CREATE TABLE`` statement, or None if ``sql`` is not one.

    Raises:
        StoreError: It is a ``CREATE TABLE`` but uses something outside the supported subset.
    """
    match = _CREATE.match(sql)
    if match is None:
        return None
    name, body = match.group(2), match.group(3)
    columns: list[Column] = []
    key: tuple[str, ...] = ()
    for part in _split_top(body):
        words = part.split()
        if words[0].upper() == "PRIMARY" and len(words) > 1 and words[1].upper().startswith("KEY"):
            inner = part[part.index("(") + 1 : part.rindex(")")]
            key = tuple(k.strip() for k in inner.split(","))
            continue
        if len(words) < 2 or not _IDENT.match(words[0]):
            raise StoreError(f"cannot translate column definition {part!r} of table {name}")
        portable = _PORTABLE_TYPES.get(words[1].upper())
        if portable is None:
            raise StoreError(f"table {name}: column type {words[1]!r} is not one the data layer translates")
        rest = " ".join(w.upper() for w in words[2:])
        if "PRIMARY KEY" in rest:
            key = (words[0],)
        nullable = "NOT NULL" not in rest and "PRIMARY KEY" not in rest
        columns.append(Column(words[0], portable, nullable))
    table = Table(name, tuple(columns), key=key)
    layout = LAYOUTS.get(name)
    if layout is not None and not key:
        table = replace(table, order_by=layout[0], indexes=layout[1], dictionary=layout[2])
    return table


#: Analytic layout of append-only tables whose query patterns the data layer knows: (sort order, skip indexes,
#: dictionary-encoded columns).
#: The audit reports filter and group by agent, time and tool. Within one agent time follows ``seq``, so a
#: ``minmax`` index on ``seq`` lets ``audit verify`` read the chain in ``seq`` ranges without full scans.
LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "audit_events": (("agent", "ts", "tool", "seq"), ("seq",), ("kind", "agent", "tool", "decision")),
}
