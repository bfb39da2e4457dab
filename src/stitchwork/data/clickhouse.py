"""ClickHouse server: ``clickhouse://[user[:password]@]host:8123/database[?secure=1]`` via ``clickhouse-connect``.

Uses the HTTP interface. Every query runs with the settings in :data:`stitchwork.data._clickhouse.SETTINGS`; the
database is created if it does not exist. Needs a server recent enough for ``clickhouse-connect`` and lightweight
updates (ClickHouse 25.7 or newer; Debian's 18.16 package is far too old).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from stitchwork.data._clickhouse import SETTINGS, ClickHouseFamilyStore
from stitchwork.errors import StoreError


class ClickHouseStore(ClickHouseFamilyStore):
    """One ``clickhouse-connect`` HTTP client, serialised by a lock."""

    def __init__(self, uri: str, *, connect_timeout_s: float = 5.0) -> None:
        parts = urlsplit(uri)
        database = parts.path.strip("/") or "stitchwork"
        super().__init__(uri, database)
        query = parse_qs(parts.query)
        secure = query.get("secure", ["0"])[0] in ("1", "true")
        safe = f"clickhouse://{parts.hostname}:{parts.port or 8123}/{database}"
        try:
            admin = clickhouse_connect.get_client(
                host=parts.hostname or "127.0.0.1", port=parts.port or (8443 if secure else 8123),
                username=unquote(parts.username or "default"), password=unquote(parts.password or ""),
                secure=secure, connect_timeout=connect_timeout_s,
            )  # fmt: skip
            admin.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
            admin.close()
            self._client = clickhouse_connect.get_client(
                host=parts.hostname or "127.0.0.1", port=parts.port or (8443 if secure else 8123),
                username=unquote(parts.username or "default"), password=unquote(parts.password or ""),
                database=database, secure=secure, connect_timeout=connect_timeout_s, settings=dict(SETTINGS),
            )  # fmt: skip
        except Exception as exc:  # connection refused, auth, too-old server
            raise StoreError(f"cannot connect to ClickHouse at {safe}: {exc}") from exc
        self.uri = safe  # never keep the password in messages

    def _run(self, sql: str) -> list[dict[str, Any]]:
        try:
            result = self._client.query(sql)
        except (ClickHouseError, OSError) as exc:
            raise StoreError(f"{self.uri}: {exc}") from exc
        names = list(result.column_names)
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]

    def _run_readonly(self, sql: str, settings: Mapping[str, int | float | str]) -> list[dict[str, Any]]:
        """Runs ``sql`` with query-level settings sent beside it (HTTP parameters, not part of the text)."""
        try:
            result = self._client.query(sql, settings=dict(settings) if settings else None)
        except (ClickHouseError, OSError) as exc:
            raise StoreError(f"{self.uri}: {exc}") from exc
        names = list(result.column_names)
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]

    def _insert(self, table: str, columns: list[str], rows: Sequence[dict[str, Any]]) -> None:
        try:
            self._client.insert(table, [[row[c] for c in columns] for row in rows], column_names=columns)
        except (ClickHouseError, OSError) as exc:
            raise StoreError(f"{self.uri}: insert into {table} failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._client.close()
