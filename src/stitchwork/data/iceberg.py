"""Iceberg archive of the audit chain: ``iceberg+<catalog-uri>`` (package ``pyiceberg[sql-sqlite,pyarrow]``).

URIs:

* ``iceberg+sqlite:///path/catalog.db?warehouse=file:///path/wh``: pyiceberg's SQL catalog on SQLite, data files in
  the ``file://`` warehouse (the embedded case).
* ``iceberg+http://host:8181/path?warehouse=s3://bucket/wh`` (or ``https``): a REST catalog (a real lakehouse).
* ``iceberg+memory://``: the SQL catalog on ``sqlite:///:memory:`` with a temporary warehouse (the test double).

Optional query parameters: ``namespace`` (default ``stitchwork``) and ``table`` (default ``audit_events``).

The table holds the audit columns plus ``event_time`` (``ts`` as a UTC timestamp), partitioned by ``day(event_time)``.
Export is incremental: each appended batch and the table property ``stitchwork.exported-seq`` (the highest ``seq`` in
the table) are committed in one Iceberg transaction, so a re-run starts after it and never duplicates an event, and
a crash mid-export loses or repeats nothing. Exports are always a contiguous range of the chain.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from stitchwork.data._base import Store
from stitchwork.errors import ConfigError, StoreError

__all__ = ["ARROW_SCHEMA", "EXPORTED_SEQ", "FIRST_SEQ", "ExportReport", "IcebergArchive"]

EXPORTED_SEQ = "stitchwork.exported-seq"
FIRST_SEQ = "stitchwork.first-seq"
_COLUMNS = ("seq", "ts", "kind", "agent", "run_id", "tool", "decision", "data", "prev_hash", "hash")

ARROW_SCHEMA = pa.schema([
    pa.field("seq", pa.int64(), nullable=False), pa.field("ts", pa.float64(), nullable=False),
    pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
    *(pa.field(c, pa.string(), nullable=False) for c in _COLUMNS[2:]),
])  # fmt: skip


@dataclass(frozen=True)
class ExportReport:
    """What one export did.

    Attributes:
        exported: Events appended by this run.
        first_seq: First seq appended (0 if none).
        last_seq: Highest seq now in the archive.
        snapshots: Iceberg commits made.
    """

    exported: int
    first_seq: int
    last_seq: int
    snapshots: int


def _catalog(uri: str) -> tuple[Any, str, str]:
    """The pyiceberg catalog, namespace and table name for an ``iceberg+`` URI."""
    if not uri.startswith("iceberg+"):
        raise ConfigError(f"archive URI {uri!r} must start with iceberg+ (iceberg+sqlite:///catalog.db?warehouse=...)")
    inner = uri.removeprefix("iceberg+")
    parts = urlsplit(inner)
    query = parse_qs(parts.query)
    namespace = query.get("namespace", ["stitchwork"])[0]
    table = query.get("table", ["audit_events"])[0]
    warehouse = query.get("warehouse", [""])[0]
    try:
        if parts.scheme in ("sqlite", "memory"):
            from pyiceberg.catalog.sql import SqlCatalog

            if parts.scheme == "memory":
                db, warehouse = "sqlite:///:memory:", warehouse or "file://" + tempfile.mkdtemp(prefix="iceberg-")
            else:
                db = f"sqlite://{parts.netloc}{parts.path}"
            if not warehouse:
                raise ConfigError(f"{uri}: add ?warehouse=file:///path/to/warehouse")
            return SqlCatalog("stitchwork", uri=db, warehouse=warehouse), namespace, table
        if parts.scheme in ("http", "https"):
            from pyiceberg.catalog.rest import RestCatalog

            base = f"{parts.scheme}://{parts.netloc}{parts.path}"
            props = {"uri": base, **({"warehouse": warehouse} if warehouse else {})}
            return RestCatalog("stitchwork", **props), namespace, table
    except ImportError as exc:
        raise ConfigError(
            f"iceberg archives need pyiceberg ({exc.name}); run: pip install 'stitchwork[iceberg]'"
        ) from exc
    raise ConfigError(f"unknown iceberg catalog in {uri!r}; use iceberg+sqlite:///..., iceberg+http(s)://... or "
                      "iceberg+memory://")


class IcebergArchive:
    """The audit chain's Iceberg table (created on first use)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.catalog, self.namespace, self.name = _catalog(uri)
        self._table: Any = None

    @property
    def identifier(self) -> str:
        return f"{self.namespace}.{self.name}"

    def table(self) -> Any:
        """The pyiceberg table, created (partitioned by day) if missing."""
        if self._table is None:
            from pyiceberg.exceptions import NoSuchTableError
            from pyiceberg.transforms import DayTransform

            self.catalog.create_namespace_if_not_exists(self.namespace)
            try:
                self._table = self.catalog.load_table(self.identifier)
            except NoSuchTableError:
                table = self.catalog.create_table(self.identifier, schema=ARROW_SCHEMA)
                with table.update_spec() as spec:
                    spec.add_field("event_time", DayTransform(), "event_day")
                self._table = self.catalog.load_table(self.identifier)
        return self._table

    def exported_seq(self) -> int:
        """The highest seq in the archive (0 if empty)."""
        return int(self.table().properties.get(EXPORTED_SEQ, "0"))

    def first_seq(self) -> int:
        """The first seq in the archive (1 unless the first export started later with ``since``; 0 if empty)."""
        return int(self.table().properties.get(FIRST_SEQ, "0"))

    def export(self, store: Store, *, since: float | None = None, batch_rows: int = 100_000,
               upto_seq: int | None = None) -> ExportReport:
        """Appends the store's audit events after the archive's high-water seq.

        Args:
            store: The live store (``audit_events``).
            since: Only for the first export: start at the first event with ``ts >= since``.
            batch_rows: Events per Iceberg commit.
            upto_seq: Export no further than this seq (default: everything stored).

        Raises:
            StoreError: The store's events after the high-water mark are not contiguous (tampered or compacted
                beyond it), or Iceberg refused the commit.
        """
        table = self.table()
        last = self.exported_seq()
        first_new = 0
        if last == 0 and since is not None:
            rows = store.query("SELECT min(seq) AS s FROM audit_events WHERE ts >= ?", [since])
            start = rows[0]["s"]
            if start is None:
                return ExportReport(0, 0, 0, 0)
            last = int(start) - 1
        top = store.query("SELECT max(seq) AS m FROM audit_events")[0]["m"] or 0
        if upto_seq is not None:
            top = min(top, upto_seq)
        exported = snapshots = 0
        while last < top:
            hi = min(last + batch_rows, top)
            rows = store.query(
                f"SELECT {', '.join(_COLUMNS)} FROM audit_events WHERE seq > ? AND seq <= ? ORDER BY seq", [last, hi]
            )
            seqs = [r["seq"] for r in rows]
            if seqs != list(range(last + 1, hi + 1)):
                raise StoreError(
                    f"audit events {last + 1}..{hi} in the store are not contiguous (missing or duplicated seq); "
                    "run `stitchwork audit verify` before exporting"
                )
            data = self._arrow(rows)
            props = {EXPORTED_SEQ: str(hi)}
            if self.exported_seq() == 0 and exported == 0:
                props[FIRST_SEQ] = str(last + 1)
            try:
                with table.transaction() as txn:
                    txn.append(data)
                    txn.set_properties(props)
            except Exception as exc:  # pyiceberg raises CommitFailedException, OSError, ...
                raise StoreError(f"{self.uri}: appending events {last + 1}..{hi} failed: {exc}") from exc
            table = self._table = self.catalog.load_table(self.identifier)
            first_new = first_new or last + 1
            exported += len(rows)
            snapshots += 1
            last = hi
        return ExportReport(exported, first_new, max(last, self.exported_seq()), snapshots)

    @staticmethod
    def _arrow(rows: list[dict[str, Any]]) -> pa.Table:
        cols: dict[str, Any] = {c: [r[c] for r in rows] for c in _COLUMNS}
        ts = pa.array(cols["ts"], pa.float64())
        micros = pc.cast(pc.multiply(ts, 1_000_000.0), pa.int64(), safe=False)
        cols["event_time"] = micros.cast(pa.timestamp("us", tz="UTC"))
        return pa.table({f.name: pa.array(cols[f.name], f.type) if f.name != "event_time" else cols[f.name]
                         for f in ARROW_SCHEMA}, schema=ARROW_SCHEMA)

    def scan(self, *, after_seq: int = 0, upto_seq: int | None = None) -> pa.Table:
        """Archived events with ``after_seq < seq <= upto_seq`` as Arrow, ordered by seq."""
        expr = f"seq > {int(after_seq)}" + ("" if upto_seq is None else f" AND seq <= {int(upto_seq)}")
        data: pa.Table = self.table().scan(row_filter=expr).to_arrow()
        return data.sort_by("seq")

    def batches(self, *, chunk: int = 50_000) -> Iterator[list[dict[str, Any]]]:
        """Archived events in seq order, ``chunk`` at a time, as dicts with the audit columns."""
        last, top = self.first_seq() - 1, self.exported_seq()
        while last < top:
            hi = min(last + chunk, top)
            yield self.scan(after_seq=last, upto_seq=hi).select(list(_COLUMNS)).to_pylist()
            last = hi
