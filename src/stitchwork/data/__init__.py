"""Data layer: the Store port and what lives in it.

* ``_base.py``: the port (``execute``/``append``/``query``, ``ensure(Table)``), adapters chosen by URI:
  ``duckdb:///path`` (default; single writer), ``memory://``, ``chdb:///path`` (ClickHouse in-process) and
  ``clickhouse://host:8123/db`` (a ClickHouse server).
* ``schema.py``: portable table definitions; ClickHouse adapters render MergeTree DDL from them and translate the
  platform's DuckDB-dialect SQL (``_clickhouse.py``).
* ``memory.py``: agent memory (key-value and documents, BM25 search, grants, provenance labels).
* ``reports.py``: ready reports over incrementally derived fact tables.
* ``iceberg.py``: incremental export of the audit chain to Iceberg (``iceberg+sqlite://``, ``iceberg+https://``).
* ``retention.py``: retention per table; compaction into Iceberg with a signed checkpoint; verify across both.
* ``api.py`` / ``cli.py``: the HTTP routes and ``stitchwork audit report/export/compact``, ``stitchwork data``.
"""
