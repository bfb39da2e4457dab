"""The journal is copied into the store as soon as its active file nears its preallocated size, whatever the copy
interval: appends keep overwriting preallocated blocks (an fdatasync need not commit a new file size)."""

from __future__ import annotations

import time
from pathlib import Path

from stitchwork.audit.journal import JOURNAL_PREALLOC
from stitchwork.audit.log import JOURNAL_FULL, AuditLog
from stitchwork.data._base import open_store
from tests.signing import Ed25519Signer

PAD = "x" * 2000


def stored(log: AuditLog) -> int:
    rows = log._store.query("SELECT count(*) AS n FROM audit_events")
    return int(rows[0]["n"])


def test_a_journal_file_near_full_is_copied_without_waiting_for_the_interval(tmp_path: Path) -> None:
    assert JOURNAL_PREALLOC // 2 <= JOURNAL_FULL < JOURNAL_PREALLOC
    store = open_store(f"duckdb://{tmp_path / 'audit.duckdb'}")
    log = AuditLog(store, signer=Ed25519Signer(), journal_path=tmp_path / "audit.journal", flush_ms=1e9)
    try:
        few = [log.append("tool", data={"pad": PAD, "i": i}) for i in range(5)]
        time.sleep(0.2)
        assert stored(log) == 0 and few[-1].seq == 5  # under the mark: nothing is copied before the interval
        n = JOURNAL_FULL // len(PAD) + 5  # enough lines to pass the mark
        for i in range(n):
            log.append("tool", data={"pad": PAD, "i": i})
        deadline = time.monotonic() + 60  # a liveness bound, not a performance figure
        while stored(log) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stored(log) > 0  # the flusher copied on its own (the interval is 1e9 ms)
        assert log.verify().ok
    finally:
        log.close()
        store.close()
