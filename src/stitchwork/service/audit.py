"""Audit operations over an open platform: reports, export, compaction, retention, verification.

The platform process is DuckDB's single writer, so while ``stitchwork up`` runs these run in the server and the
CLI reaches them over HTTP; otherwise the CLI opens the platform itself.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from stitchwork.audit.reports import run_report
from stitchwork.errors import AuditError, ConfigError

if TYPE_CHECKING:
    from stitchwork.audit.verify import VerifyReport
    from stitchwork.platform import Platform


def report(
    platform: Platform, name: str, since: float | None = None, until: float | None = None
) -> list[dict[str, Any]]:
    """Rows of a ready report (:mod:`stitchwork.audit.reports`), after flushing the audit journal."""
    platform.audit.flush()
    rows = run_report(platform.store, name, since=since, until=until)
    return [platform.gateway.redactor.redact(r) for r in rows]


def export(platform: Platform, to: str, since: float | None = None) -> dict[str, Any]:
    """Appends new audit events to the Iceberg archive ``to`` (incremental)."""
    from stitchwork.data.iceberg import IcebergArchive

    platform.audit.flush()
    result = IcebergArchive(to).export(platform.store, since=since)
    return {"to": to, **asdict(result)}


def compact(platform: Platform, to: str, older_than_days: float | None = None, upto_seq: int | None = None
            ) -> dict[str, Any]:
    """Moves old audit events into the archive ``to``, leaving a signed checkpoint."""
    from stitchwork.audit.retention import compact_audit
    from stitchwork.data.iceberg import IcebergArchive

    platform.audit.flush()
    older = None if older_than_days is None else older_than_days * 86400.0
    result = compact_audit(platform.store, IcebergArchive(to), platform.ca, older_than_s=older, upto_seq=upto_seq)
    return asdict(result)


def retain(platform: Platform, *, now: float | None = None) -> dict[str, int]:
    """Applies ``[data.retention]``: deletes old rows per table, expires agent memory, compacts the audit log into
    its Iceberg archive. Returns rows removed per table."""
    from stitchwork.audit.retention import apply_retention, compact_audit, policies_from

    config = platform.config.data.retention
    if config.audit_days > 0 and not config.audit_archive:
        raise ConfigError("[data.retention] audit_days needs audit_archive (an iceberg+... URI)")
    now = time.time() if now is None else now
    removed = apply_retention(platform.store, policies_from(config), now=now)
    if config.memory_days > 0 and platform.memory is not None:
        removed["memory_items"] = platform.memory.expire(now - config.memory_days * 86400.0)
    if config.audit_days > 0:
        from stitchwork.data.iceberg import IcebergArchive

        platform.audit.flush()
        report = compact_audit(platform.store, IcebergArchive(config.audit_archive), platform.ca,
                               older_than_s=config.audit_days * 86400.0, now=now)
        removed["audit_events"] = report.deleted
    platform.audit.append("retention", decision="applied", data={"removed": removed})
    return removed


def verify(platform: Platform) -> VerifyReport:
    """``audit verify``: the live chain, or, once compacted, the archive up to the checkpoint and the live rest."""
    from stitchwork.audit.retention import latest_checkpoint, verify_across

    try:
        platform.audit.flush()
    except AuditError:
        return platform.audit.verify()  # reports the failed copy
    if latest_checkpoint(platform.store) is None:
        return platform.audit.verify()
    return verify_across(platform.store, platform.ca)
