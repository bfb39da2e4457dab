"""ClickHouse in-process: ``chdb:///path/dir[?database=name]`` (package ``chdb``, ClickHouse 26.9 embedded).

One process can open one chdb data directory (the embedded server is initialised once per process with its
path); opening a second, different path raises :class:`~stitchwork.errors.StoreError`. Several stores may share
the directory with different ``database`` names. ``chdb://`` alone uses a temporary directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
from chdb import session as chdb_session  # untyped

from stitchwork.data._clickhouse import SETTINGS, ClickHouseFamilyStore, literal
from stitchwork.errors import StoreError

_ARROW_TYPES: dict[str, pa.DataType] = {
    "String": pa.string(), "Int64": pa.int64(), "Int32": pa.int32(), "Float64": pa.float64(), "Bool": pa.bool_(),
    "UInt64": pa.uint64(), "UInt32": pa.uint32(), "Float32": pa.float32(), "UInt8": pa.uint8(),
}  # fmt: skip


def arrow_type(clickhouse_type: str) -> pa.DataType:
    """The Arrow type for a ClickHouse column type (``Nullable(...)`` unwrapped)."""
    name = clickhouse_type.removeprefix("Nullable(").removesuffix(")") if clickhouse_type.startswith("Nullable(") \
        else clickhouse_type
    return _ARROW_TYPES.get(name, pa.string())


class ChdbStore(ClickHouseFamilyStore):
    """A chdb session on a data directory, serialised by a lock."""

    def __init__(self, uri: str) -> None:
        parts = urlsplit(uri)
        database = parse_qs(parts.query).get("database", ["stitchwork"])[0]
        super().__init__(uri, database)
        self.path = parts.netloc + parts.path
        session_class: Any = chdb_session.Session
        try:
            if self.path:
                Path(self.path).mkdir(parents=True, exist_ok=True)
                self._session: Any = session_class(self.path)
            else:
                self._session = session_class()
        except Exception as exc:  # chdb raises RuntimeError subclasses
            raise StoreError(
                f"{uri}: cannot open chdb at {self.path or '(temporary)'}: {exc} (one process can open only one "
                "chdb data directory)"
            ) from exc
        self._column_types: dict[str, list[tuple[str, pa.DataType]]] = {}
        self._run(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        self._run(f"USE `{database}`")
        for name, value in SETTINGS.items():
            self._run(f"SET {name} = {value}")

    def _run(self, sql: str) -> list[dict[str, Any]]:
        try:
            result = self._session.query(sql, "ArrowTable")
        except Exception as exc:
            self._settle()
            raise StoreError(f"{self.uri}: {exc}") from exc
        if isinstance(result, pa.Table):
            rows: list[dict[str, Any]] = result.to_pylist()
            return rows
        return []

    def _settle(self) -> None:
        """After a failed query chdb 4.4 hands the next Arrow result a stale buffer ("Message metadata too long");
        a throwaway query takes it, so the platform's next statement is not the one that fails."""
        with contextlib.suppress(Exception):
            self._session.query("SELECT 1", "ArrowTable")

    def _run_readonly(self, sql: str, settings: Mapping[str, int | float | str]) -> list[dict[str, Any]]:
        """Runs ``sql`` with a trailing ``SETTINGS`` clause (on its own line, so a final comment cannot hide it)."""
        if settings:
            sql = sql + "\nSETTINGS " + ", ".join(f"{k} = {literal(v)}" for k, v in settings.items())
        return self._run(sql)

    def _types(self, table: str) -> list[tuple[str, pa.DataType]]:
        types = self._column_types.get(table)
        if types is None:
            rows = self._run(
                f"SELECT name, type FROM system.columns WHERE database = '{self.database}' AND table = '{table}' "
                "ORDER BY position"
            )
            if not rows:
                raise StoreError(f"{self.uri}: no table {table!r} in database {self.database}")
            types = [(r["name"], arrow_type(r["type"])) for r in rows]
            self._column_types[table] = types
        return types

    def _insert(self, table: str, columns: list[str], rows: Sequence[dict[str, Any]]) -> None:
        types = dict(self._types(table))
        try:
            arrays = {c: pa.array([row[c] for row in rows], type=types.get(c)) for c in columns}
        except (pa.ArrowException, KeyError) as exc:
            raise StoreError(f"{self.uri}: insert into {table} failed: {exc}") from exc
        self.insert_arrow(table, pa.table(arrays))

    def append_columns(self, table: str, columns: Mapping[str, Sequence[Any]]) -> None:
        """Inserts column-wise rows as one Arrow block, typed from the table's columns (no row dicts)."""
        if not columns or not len(next(iter(columns.values()))):
            return
        types = dict(self._types(table))
        try:
            arrays = {c: pa.array(values, type=types.get(c)) for c, values in columns.items()}
            data = pa.table(arrays)
        except (pa.ArrowException, KeyError) as exc:
            raise StoreError(f"{self.uri}: insert into {table} failed: {exc}") from exc
        self.insert_arrow(table, data)

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        """Inserts an Arrow table (columns by name) in one block."""
        names = ", ".join(f"`{c}`" for c in data.column_names)
        batch = data  # read by name by chdb's Python() table function
        with self._lock:
            try:
                self._session.query(f"INSERT INTO `{self.database}`.`{table}` ({names}) SELECT * FROM Python(batch)")
            except Exception as exc:
                self._settle()
                raise StoreError(f"{self.uri}: insert into {table} failed: {exc}") from exc
        del batch

    def close(self) -> None:
        with self._lock:
            self._session.close()
