"""Retention per table, and compaction of the audit chain into Iceberg that keeps it verifiable.

Retention. A :class:`RetentionPolicy` names a table, its time column, a maximum age and an optional SQL condition
(for example, only finished runs). :func:`apply_retention` deletes rows older than that. ``audit_events`` is never
deleted by a retention policy: old audit events leave the live store only through :func:`compact_audit`. The
operator sets the ages in ``[data.retention]`` (:class:`~stitchwork.config.RetentionConfig`);
:func:`policies_from` turns that section into policies, and ``stitchwork data retention`` (or the timer of
``stitchwork up``) applies them, expires agent memory and compacts the audit log when the section asks for it.

Compaction (``audit_events`` → Iceberg). :func:`compact_audit` exports every event up to the cut, verifies the
archived chain from its start (genesis, or the previous checkpoint) to the cut, signs a *checkpoint*
``sign(canonical({"seq", "hash", "key_id"}))`` of the event at the cut, stores it in ``audit_checkpoints`` with the
archive URI, and only then deletes the events up to the cut from the live store. The cut never passes the signed
head, so the live store keeps the newest events and the head that covers them.

Verification across both (:func:`verify_across`): the archived events are re-hashed from genesis to the newest
checkpoint (read back from Iceberg), the checkpoint's signature and hash are checked against them, and the chain
continues in the live store from ``checkpoint.seq + 1`` with ``prev_hash = checkpoint.hash`` up to the signed head
in ``audit_heads``. Any edit, deletion, insertion or reordering in either part is named by its ``seq``; a forged or
moved checkpoint is reported as such. The hash rule is the one documented in :mod:`stitchwork.audit.canonical`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from stitchwork.audit.canonical import GENESIS_HASH, canonical
from stitchwork.audit.records import EVENTS_TABLE, SIGNED_HEAD_TABLE, Signer
from stitchwork.audit.verify import VerifyReport
from stitchwork.config import RetentionConfig
from stitchwork.data._base import Store
from stitchwork.data.iceberg import IcebergArchive
from stitchwork.data.schema import Column, Table
from stitchwork.errors import AuditError, StoreError

__all__ = [
    "CHECKPOINTS",
    "Checkpoint",
    "CompactReport",
    "RetentionPolicy",
    "apply_retention",
    "compact_audit",
    "latest_checkpoint",
    "policies_from",
    "verify_across",
]

CHECKPOINTS = Table("audit_checkpoints", (
    Column("seq", "BIGINT", False), Column("hash", "VARCHAR", False), Column("key_id", "VARCHAR", False),
    Column("signature", "VARCHAR", False), Column("archive", "VARCHAR", False), Column("ts", "DOUBLE", False),
), key=("seq",))  # fmt: skip
_CHUNK = 50_000
_COLUMNS = ("seq", "ts", "kind", "agent", "run_id", "tool", "decision", "data", "prev_hash", "hash")


@dataclass(frozen=True)
class RetentionPolicy:
    """How long rows of one table are kept.

    Attributes:
        table: Table name (not ``audit_events``: compact it instead).
        column: Its time column (Unix seconds).
        max_age_days: Rows older than this are deleted.
        where: Extra SQL condition rows must also meet to be deleted (e.g. ``status <> 'running'``).
        optional: The table exists only where its feature is used (missing: nothing to delete).
    """

    table: str
    column: str
    max_age_days: float
    where: str = ""
    optional: bool = False


#: Runs that are not finished: their rows elsewhere are kept whatever their age.
_LIVE_RUNS = "SELECT id FROM runs WHERE status IN ('running', 'waiting_approval')"


#: Sensible defaults: finished runs for 90 days, decided approvals for 365, expired revocations after a day.
DEFAULT_POLICIES = (
    RetentionPolicy("runs", "updated_at", 90,
                    "status IN ('completed', 'failed', 'budget_exhausted', 'denied', 'timed_out')"),
    RetentionPolicy("run_provenance", "written_at", 90, f"run_id NOT IN ({_LIVE_RUNS})", optional=True),
    RetentionPolicy("a2a_tasks", "updated_at", 90, f"run_id <> '' AND run_id NOT IN ({_LIVE_RUNS})", optional=True),
    RetentionPolicy("approvals", "created_at", 365, "status <> 'pending'"),
    RetentionPolicy("revoked_tokens", "expires_at", 1),
)


def policies_from(config: RetentionConfig) -> tuple[RetentionPolicy, ...]:
    """The table policies ``[data.retention]`` names (an age of 0 keeps the table; memory and audit are handled
    apart: :meth:`~stitchwork.memory.store.AgentMemory.expire` and :func:`compact_audit`)."""
    ages = {"runs": config.runs_days, "run_provenance": config.runs_days, "approvals": config.approvals_days,
            "revoked_tokens": config.revoked_tokens_days, "a2a_tasks": config.a2a_tasks_days}
    return tuple(dataclasses.replace(p, max_age_days=ages[p.table]) for p in DEFAULT_POLICIES if ages[p.table] > 0)


def apply_retention(store: Store, policies: Iterable[RetentionPolicy], *, now: float | None = None) -> dict[str, int]:
    """Deletes rows past their policy's age; returns rows deleted per table.

    Raises:
        StoreError: A policy names ``audit_events`` or the delete failed.
    """
    now = time.time() if now is None else now
    deleted: dict[str, int] = {}
    for policy in policies:
        if policy.table in (EVENTS_TABLE, SIGNED_HEAD_TABLE, CHECKPOINTS.name):
            raise StoreError(f"{policy.table} is not subject to retention: compact the audit log into Iceberg instead")
        cutoff = now - policy.max_age_days * 86400.0
        cond = f"{policy.column} < ?" + (f" AND ({policy.where})" if policy.where else "")
        if policy.optional and not _exists(store, policy.table):
            deleted[policy.table] = 0
            continue
        count = store.query(f"SELECT count(*) AS n FROM {policy.table} WHERE {cond}", [cutoff])[0]["n"]
        if count:
            store.execute(f"DELETE FROM {policy.table} WHERE {cond}", [cutoff])
        deleted[policy.table] = int(count)
    return deleted


def _exists(store: Store, table: str) -> bool:
    try:
        store.query(f"SELECT 1 FROM {table} LIMIT 1")
    except StoreError:
        return False
    return True


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that the chain up to ``seq`` ends in ``hash`` and is archived in ``archive``."""

    seq: int
    hash: str
    key_id: str
    signature: str
    archive: str
    ts: float

    def message(self) -> bytes:
        return canonical({"seq": self.seq, "hash": self.hash, "key_id": self.key_id})


@dataclass(frozen=True)
class CompactReport:
    """What :func:`compact_audit` did."""

    exported: int
    checkpoint_seq: int
    deleted: int


def latest_checkpoint(store: Store) -> Checkpoint | None:
    """The newest checkpoint, or None if the audit log was never compacted."""
    store.ensure(CHECKPOINTS)
    rows = store.query(f"SELECT * FROM {CHECKPOINTS.name} ORDER BY seq DESC LIMIT 1")
    if not rows:
        return None
    r = rows[0]
    return Checkpoint(int(r["seq"]), r["hash"], r["key_id"], r["signature"], r["archive"], float(r["ts"]))


def _hash(row: dict[str, Any]) -> str:
    body = canonical({
        "agent": row["agent"], "data": json.loads(row["data"]), "decision": row["decision"], "kind": row["kind"],
        "run_id": row["run_id"], "seq": row["seq"], "tool": row["tool"], "ts": row["ts"],
    }).decode("utf-8")  # fmt: skip
    return hashlib.sha256((row["prev_hash"] + body).encode("utf-8")).hexdigest()


class _Chain:
    """Walks events in seq order and names the first that does not continue the chain."""

    def __init__(self, seq: int, prev: str, where: str) -> None:
        self.expected, self.prev, self.where = seq, prev, where
        self.checked = 0
        self.problem: tuple[int | None, str] | None = None

    def feed(self, rows: Sequence[dict[str, Any]]) -> bool:
        for row in rows:
            seq = row["seq"]
            if seq != self.expected:
                what = "appears more than once" if seq < self.expected else f"is missing (next is {seq})"
                bad = seq if seq < self.expected else self.expected
                self.problem = (bad, f"{self.where}: event {bad} {what}")
                return False
            if row["prev_hash"] != self.prev:
                self.problem = (seq, f"{self.where}: event {seq}: prev_hash does not match the previous event "
                                     "(inserted, deleted or reordered)")
                return False
            try:
                digest = _hash(row)
            except (ValueError, TypeError, AuditError) as exc:
                self.problem = (seq, f"{self.where}: event {seq} cannot be decoded ({exc})")
                return False
            if digest != row["hash"]:
                self.problem = (seq, f"{self.where}: event {seq}: hash does not match its contents (edited)")
                return False
            self.prev = row["hash"]
            self.expected += 1
            self.checked += 1
        return True


def _verify_archive(archive: IcebergArchive, upto: int, start: tuple[int, str]) -> _Chain:
    """Re-hashes archived events ``start[0]..upto`` (``start[1]`` is the hash before them)."""
    chain = _Chain(start[0], start[1], f"archive {archive.identifier}")
    last = start[0] - 1
    while last < upto and chain.problem is None:
        hi = min(last + _CHUNK, upto)
        rows = archive.scan(after_seq=last, upto_seq=hi).select(list(_COLUMNS)).to_pylist()
        if not chain.feed(rows):
            break
        last = hi
    if chain.problem is None and chain.expected <= upto:
        chain.problem = (chain.expected, f"archive {archive.identifier}: event {chain.expected} is missing")
    return chain


def compact_audit(
    store: Store, archive: IcebergArchive, signer: Signer, *, older_than_s: float | None = None,
    upto_seq: int | None = None, now: float | None = None,
) -> CompactReport:
    """Moves audit events up to a cut from the live store into ``archive``, leaving a signed checkpoint.

    The cut is the newest event older than ``older_than_s`` (or ``upto_seq``), never past the signed head. Flush
    the audit log first (``AuditLog.flush``): events still in its journal are not in the store yet.

    Raises:
        AuditError: The archived chain does not verify (nothing is deleted).
        StoreError: The store or the archive failed.
    """
    now = time.time() if now is None else now
    store.ensure(CHECKPOINTS)
    heads = store.query(f"SELECT seq FROM {SIGNED_HEAD_TABLE} WHERE key_id = ?", [signer.key_id])
    if not heads:
        raise AuditError("the audit log has no signed head for this key; nothing can be compacted")
    cut = int(heads[0]["seq"]) - 1  # keep at least the head's event live: it anchors the signed head
    if older_than_s is not None:
        rows = store.query(f"SELECT max(seq) AS s FROM {EVENTS_TABLE} WHERE ts < ?", [now - older_than_s])
        cut = min(cut, int(rows[0]["s"] or 0))
    if upto_seq is not None:
        cut = min(cut, upto_seq)
    previous = latest_checkpoint(store)
    base = previous.seq if previous else 0
    if cut <= base:
        return CompactReport(0, base, 0)
    report = archive.export(store, upto_seq=cut)
    if archive.exported_seq() < cut:
        raise AuditError(f"the archive ends at event {archive.exported_seq()}, before the cut at {cut}")
    start = (base + 1, previous.hash) if previous else (archive.first_seq(), GENESIS_HASH)
    if start[0] != 1 and previous is None:
        raise AuditError(f"the archive starts at event {start[0]}, not 1: it cannot anchor a checkpoint")
    chain = _verify_archive(archive, cut, start)
    if chain.problem is not None:
        raise AuditError(f"not compacting: {chain.problem[1]}")
    signature = signer.sign(canonical({"seq": cut, "hash": chain.prev, "key_id": signer.key_id})).hex()
    store.append(CHECKPOINTS.name, [{"seq": cut, "hash": chain.prev, "key_id": signer.key_id,
                                     "signature": signature, "archive": archive.uri, "ts": now}])
    from stitchwork.audit.reports import refresh_facts  # reports keep the facts of events that leave the store

    refresh_facts(store)
    deleted = store.query(f"SELECT count(*) AS n FROM {EVENTS_TABLE} WHERE seq <= ?", [cut])[0]["n"]
    store.execute(f"DELETE FROM {EVENTS_TABLE} WHERE seq <= ?", [cut])
    return CompactReport(report.exported, cut, int(deleted))


def verify_across(store: Store, signer: Signer, *, archive: IcebergArchive | None = None) -> VerifyReport:
    """Verifies the chain across the Iceberg archive (up to the newest checkpoint) and the live store.

    Problems are reported, never raised. Without a checkpoint, use ``AuditLog.verify``.
    """
    checkpoint = latest_checkpoint(store)
    if checkpoint is None:
        return VerifyReport(False, 0, None, "the audit log has no checkpoint: use AuditLog.verify", 0, False)
    head_rows = store.query(f"SELECT * FROM {SIGNED_HEAD_TABLE} WHERE key_id = ?", [signer.key_id])
    head_seq = int(head_rows[0]["seq"]) if head_rows else 0
    head_signed = bool(head_rows) and signer.verify(
        canonical({"seq": head_seq, "hash": head_rows[0]["hash"], "key_id": signer.key_id}),
        bytes.fromhex(head_rows[0]["signature"]),
    )

    def bad(seq: int | None, reason: str, checked: int) -> VerifyReport:
        return VerifyReport(False, checked, seq, reason, head_seq, head_signed)

    signature = bytes.fromhex(checkpoint.signature)
    if checkpoint.key_id != signer.key_id or not signer.verify(checkpoint.message(), signature):
        return bad(checkpoint.seq, f"the checkpoint at seq {checkpoint.seq} has an invalid signature (forged)", 0)
    try:
        archive = archive or IcebergArchive(checkpoint.archive)
        chain = _verify_archive(archive, checkpoint.seq, (1, GENESIS_HASH))
    except Exception as exc:  # the archive is unreachable or unreadable
        return bad(None, f"cannot read the archive {checkpoint.archive}: {exc}", 0)
    if chain.problem is not None:
        return bad(chain.problem[0], chain.problem[1], chain.checked)
    if chain.prev != checkpoint.hash:
        return bad(checkpoint.seq, f"event {checkpoint.seq} in the archive does not match the signed checkpoint",
                   chain.checked)
    live = _Chain(checkpoint.seq + 1, checkpoint.hash, "live store")
    live.checked = chain.checked
    below = store.query(f"SELECT min(seq) AS s FROM {EVENTS_TABLE} WHERE seq <= ?", [checkpoint.seq])[0]["s"]
    if below is not None:
        return bad(int(below), f"live store: event {below} is older than the checkpoint at {checkpoint.seq} "
                               "(inserted after compaction)", live.checked)
    top = int(store.query(f"SELECT max(seq) AS m FROM {EVENTS_TABLE}")[0]["m"] or checkpoint.seq)
    last = checkpoint.seq
    while last < top and live.problem is None:
        hi = min(last + _CHUNK, top)
        rows = store.query(f"SELECT {', '.join(_COLUMNS)} FROM {EVENTS_TABLE} WHERE seq > ? AND seq <= ? "
                           "ORDER BY seq, hash", [last, hi])
        live.feed(rows)
        last = hi
    if live.problem is None and live.expected <= top:
        live.problem = (live.expected, f"live store: event {live.expected} is missing")
    if live.problem is not None:
        return bad(live.problem[0], live.problem[1], live.checked)
    if not head_rows:
        return bad(None, f"no signed head in {SIGNED_HEAD_TABLE} for key {signer.key_id}", live.checked)
    if not head_signed:
        return bad(head_seq, f"the signed head (seq {head_seq}) has an invalid signature (forged or altered)",
                   live.checked)
    if head_seq > top:
        return bad(top + 1, f"events after {top} are missing: the signed head is at seq {head_seq} (truncated)",
                   live.checked)
    if head_seq > checkpoint.seq:
        hashes = store.query(f"SELECT hash FROM {EVENTS_TABLE} WHERE seq = ?", [head_seq])
        if [r["hash"] for r in hashes] != [head_rows[0]["hash"]]:
            return bad(head_seq, f"event {head_seq}: hash does not match the signed head", live.checked)
    if top > head_seq:
        return bad(head_seq + 1, f"events {head_seq + 1}..{top} are not covered by the signed head", live.checked)
    return VerifyReport(
        True, live.checked, None,
        f"{live.checked} events verified: {chain.checked} in the archive up to the checkpoint at seq "
        f"{checkpoint.seq}, {live.checked - chain.checked} in the live store up to the signed head at seq {head_seq}",
        head_seq, head_signed,
    )  # fmt: skip
