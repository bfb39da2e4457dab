"""Store port: SQL tables for audit, runs, approvals and identity state.

The platform process is the single writer. Implementations are synchronous and thread-safe (they serialise
access internally); async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from stitchwork._registry import Registry
from stitchwork.data.schema import Table
from stitchwork.errors import QueryRefused, StoreError

DEFAULT_READONLY_ROWS = 10_000
DEFAULT_READONLY_TIMEOUT_S = 10.0


class Store(ABC):
    """A SQL store. SQL is DuckDB's dialect (standard SQL with ``CREATE TABLE IF NOT EXISTS``)."""

    uri: str
    dialect: str = "duckdb"
    """SQL dialect of analytical queries beyond the platform's portable subset: "duckdb" or "clickhouse"."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Runs one statement that returns nothing (DDL, UPDATE, DELETE), committed on return."""

    @abstractmethod
    def append(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Inserts ``rows`` (same keys each) into ``table`` in one transaction, committed on return."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Runs a query and returns rows as dicts."""

    def query_readonly(
        self, sql: str, params: Sequence[Any] = (), *, tables: Collection[str],
        max_rows: int = DEFAULT_READONLY_ROWS, timeout_s: float = DEFAULT_READONLY_TIMEOUT_S,
    ) -> list[dict[str, Any]]:
        """Runs one untrusted read-only query (the audit query) where it can change nothing and reach nothing else.

        The query must be a single ``SELECT`` (or ``WITH … SELECT``) with no data-modifying parts; it sees only
        ``tables`` (read-only), no files, network, extensions or settings; it is stopped after ``timeout_s`` and
        refused when it returns more than ``max_rows`` rows. Adapters that cannot guarantee this refuse every
        query (the default).

        Raises:
            QueryRefused: The query was refused (with the reason) or stopped.
            StoreError: The query itself failed (unknown column, type error).
        """
        raise QueryRefused(f"{self.uri}: this store cannot run untrusted read-only queries")

    def append_columns(self, table: str, columns: Mapping[str, Sequence[Any]]) -> None:
        """Inserts rows given column by column (equal lengths) into ``table`` in one transaction.

        Engines with a columnar path (Arrow) override this; the default turns the columns into rows for
        :meth:`append`.
        """
        names = list(columns)
        if len({len(values) for values in columns.values()}) > 1:
            raise StoreError(f"{self.uri}: insert into {table} failed: columns of different lengths")
        rows = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        self.append(table, rows)

    def ensure(self, table: Table) -> None:
        """Creates ``table`` (and its indexes) if it does not exist; engines render their own DDL."""
        for statement in table.duckdb_ddl():
            self.execute(statement)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases the database."""

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


STORES = Registry(
    "store",
    {
        "duckdb": ("stitchwork.data.duckdb:DuckDBStore", None),
        "memory": ("stitchwork.data.duckdb:DuckDBStore", None),
        "chdb": ("stitchwork.data.chdb:ChdbStore", "chdb"),
        "clickhouse": ("stitchwork.data.clickhouse:ClickHouseStore", "clickhouse"),
    },
)


def open_store(uri: str, **options: Any) -> Store:
    """Opens the store named by ``uri`` (``duckdb:///path``, ``memory://``, ``chdb:///path``,
    ``clickhouse://host:8123/db``)."""
    store: Store = STORES.load(uri)(uri, **options)
    return store
