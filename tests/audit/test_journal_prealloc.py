"""Journal files are refilled with zeros sized to what they took between two copies (issue 18)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stitchwork.audit.journal import JOURNAL_PREALLOC, JOURNAL_PREALLOC_MAX, prealloc_for
from stitchwork.audit.log import AuditLog
from stitchwork.data._base import open_store
from tests.signing import Ed25519Signer


def test_prealloc_for_is_twice_the_use_within_bounds() -> None:
    assert prealloc_for(0) == JOURNAL_PREALLOC
    assert prealloc_for(JOURNAL_PREALLOC // 2) == JOURNAL_PREALLOC
    assert prealloc_for(JOURNAL_PREALLOC) == 2 * JOURNAL_PREALLOC
    assert prealloc_for(JOURNAL_PREALLOC + 1) == 2 * JOURNAL_PREALLOC + 2
    assert prealloc_for(JOURNAL_PREALLOC_MAX) == JOURNAL_PREALLOC_MAX


def test_a_busy_file_is_refilled_for_its_load_and_later_batches_do_not_grow_it(tmp_path: Path) -> None:
    journal = tmp_path / "audit.journal"
    second = tmp_path / "audit.journal.1"
    store = open_store(f"duckdb://{tmp_path / 'audit.duckdb'}")
    log = AuditLog(store, signer=Ed25519Signer("k"), journal_path=journal, flush_ms=1e9)
    try:
        big = [{"kind": "tool", "data": {"i": i, "pad": "x" * 200}} for i in range(1_500)]  # ~420 KiB of lines
        log.append_many(big)
        used = journal.stat().st_size
        assert used > JOURNAL_PREALLOC  # the batch grew the first file past its default zeros
        log.flush()  # copies, and refills the sealed first file; the writer now uses the second
        refilled = journal.read_bytes()
        assert refilled == bytes(len(refilled))
        # twice the events' lines plus the signed head line appended at the copy
        assert prealloc_for(used) < len(refilled) <= prealloc_for(used + 1024)
        assert second.stat().st_size == JOURNAL_PREALLOC
        log.append_many(big[:10])
        log.flush()  # seals the second file (little used): back to the default size
        assert second.read_bytes() == bytes(JOURNAL_PREALLOC)
        log.append_many(big)  # the first file again: fits in its zeros
        assert journal.stat().st_size == len(refilled)
        content = journal.read_bytes().rstrip(b"\0")
        assert len(content.splitlines()) == len(big)
        assert log.verify().ok
    finally:
        log.close()
        store.close()
    reopened = open_store(f"duckdb://{tmp_path / 'audit.duckdb'}")
    try:
        log = AuditLog(reopened, signer=Ed25519Signer("k"), journal_path=journal, flush_ms=1e9)
        assert log.tail(1)[0].seq == 2 * len(big) + 10
        log.close()
    finally:
        reopened.close()


@pytest.mark.parametrize("used", [-1, 0, 10**12])
def test_prealloc_for_extremes_stay_in_bounds(used: int) -> None:
    assert JOURNAL_PREALLOC <= prealloc_for(used) <= JOURNAL_PREALLOC_MAX
