"""The audit log and what lives beside it.

* ``canonical.py``: canonical JSON (with its orjson fast path) and the hash rule of the chain.
* ``records.py``: the tables ``audit_events`` and ``audit_heads``, events and signed heads as rows, the ``Signer``.
* ``batch.py``: appends prepared for the writer, one event or a batch column by column; ``AuditBatch``.
* ``journal.py``: the write-ahead journal's files and their recovery after a crash.
* ``log.py``: ``AuditLog``: the writer thread (numbers, hashes, journal, fsync) and the copier into the store.
* ``verify.py``: ``VerifyReport`` and the verification of the chain and its signed head.
* ``retention.py``: retention per table; compaction into Iceberg with signed checkpoints; verify across both.
* ``reports.py``: ready reports over incrementally derived fact tables.
"""
