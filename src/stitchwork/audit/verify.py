"""Verification of the audit chain and its signed head.

The signed head, ``sign(canonical({"seq", "hash", "key_id"}))`` of the newest stored event, reveals
deletion of the newest events, which the chain alone cannot. If the log is opened on a store whose head does
not match its events (events after the head, missing events, a bad signature), it keeps working but its
next batch starts with an event of kind ``"audit"`` (decision ``"error"``) recording the damage, and
:meth:`~stitchwork.audit.log.AuditLog.verify` keeps reporting it: later heads never make earlier tampering look
clean.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from stitchwork.audit.canonical import GENESIS_HASH
from stitchwork.audit.records import (
    _SELECT_EVENTS,
    DAMAGE_KEY,
    EVENTS_TABLE,
    SIGNED_HEAD_TABLE,
    Signer,
    _decode_head,
    _decode_row,
    _DecodeError,
    _Head,
    _head_message,
    _Record,
    _record_hash,
)
from stitchwork.data._base import Store

__all__ = ["VERIFY_CHUNK", "VerifyReport"]

#: Rows per query while verifying (the chain is streamed, never loaded whole).
VERIFY_CHUNK = 20_000


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Result of :meth:`AuditLog.verify <stitchwork.audit.log.AuditLog.verify>`.

    Attributes:
        ok: True if every event and the signed head check out.
        events: Events whose hash and link were checked before the first problem (all of them if ok).
        first_bad_seq: Sequence number of the first bad event, or None.
        reason: One sentence: what was checked, or what is wrong and where.
        head_seq: Sequence number named by the signed head (0 if there is none).
        head_signed: True if the head's signature is valid for this signer.
    """

    ok: bool
    events: int
    first_bad_seq: int | None
    reason: str
    head_seq: int
    head_signed: bool


class _Problem(NamedTuple):
    """Something wrong with the log: where (a sequence number, if one can be named) and what."""

    seq: int | None
    reason: str


def _check_head(
    head: _Head | None, signed: bool, max_seq: int, hash_at: Callable[[int], str | None]
) -> _Problem | None:
    """What is wrong with the signed head of a log whose events end at ``max_seq``, if anything."""
    if head is None:
        if max_seq == 0:
            return None
        return _Problem(
            None, f"the log has events up to {max_seq} but no signed head in {SIGNED_HEAD_TABLE} (deleted?)"
        )
    if not signed:
        return _Problem(
            head.seq,
            f"the signed head (seq {head.seq}, key {head.key_id}) has an invalid signature (forged or altered)",
        )
    if head.seq > max_seq:
        return _Problem(
            max_seq + 1,
            f"events after {max_seq} are missing: the signed head is at seq {head.seq} "
            f"but the log ends at seq {max_seq} (truncated)",
        )
    if head.seq > 0 and hash_at(head.seq) != head.hash:
        return _Problem(head.seq, f"event {head.seq}: hash does not match the signed head (the chain was rewritten)")
    if max_seq > head.seq:
        return _Problem(
            head.seq + 1,
            f"events {head.seq + 1}..{max_seq} are not covered by the signed head at seq {head.seq} "
            "(added to the store after the last signature)",
        )
    return None


def _pick_head(rows: list[dict[str, Any]], signer: Signer) -> tuple[_Head | None, bool, _Problem | None]:
    """The head to check: this signer's, else the newest. Returns it, whether it is signed, and a
    problem if the row cannot be decoded."""
    if not rows:
        return None, False, None
    mine = [r for r in rows if r.get("key_id") == signer.key_id]
    row = mine[0] if mine else max(rows, key=lambda r: r["seq"] if isinstance(r.get("seq"), int) else -1)
    try:
        head = _decode_head(row)
    except _DecodeError as exc:
        problem = _Problem(None, f"the signed head in {SIGNED_HEAD_TABLE} cannot be decoded ({exc})")
        return None, False, problem
    message = _head_message(head.seq, head.hash, head.key_id)
    signed = signer.verify(message, bytes.fromhex(head.signature))
    return head, signed, None


def _verify_chain(
    store: Store, stats: dict[str, Any], head: _Head | None, head_signed: bool, head_problem: _Problem | None
) -> VerifyReport:
    """Recomputes the chain in ``store`` from genesis, in chunks of ``VERIFY_CHUNK`` rows, and checks the head.

    Args:
        store: The store holding the events.
        stats: ``n`` (rows), ``n_seq`` (rows with a seq), ``lo`` and ``hi`` (lowest and highest seq) of the events.
        head: The signed head picked by :func:`_pick_head`, or None.
        head_signed: Whether its signature is valid.
        head_problem: Why the head could not be decoded, if it could not.

    Returns:
        The report; the first problem found names its sequence number where it can.
    """
    head_seq = head.seq if head is not None else 0
    checked = 0

    def bad(seq: int | None, reason: str) -> VerifyReport:
        return VerifyReport(False, checked, seq, reason, head_seq, head_signed)

    total, with_seq, lo, hi = stats["n"], stats["n_seq"], stats["lo"], stats["hi"] or 0
    if with_seq < total:
        missing = total - with_seq
        return bad(None, f"{missing} stored row(s) have no sequence number (corrupt or inserted)")
    if lo is not None and lo < 1:
        return bad(lo, f"event {lo}: sequence numbers start at 1; this row was inserted")

    expected, prev = 1, GENESIS_HASH
    head_hash_seen: str | None = None
    damage: _Problem | None = None
    chain_problem: _Problem | None = None
    while expected <= hi and chain_problem is None:
        rows = store.query(
            f"{_SELECT_EVENTS} WHERE seq >= ? AND seq < ? ORDER BY seq, hash",
            [expected, min(expected + VERIFY_CHUNK, hi + 1)],  # rows appended since are not examined
        )
        if not rows:
            after = f"SELECT min(seq) AS s FROM {EVENTS_TABLE} WHERE seq > ? AND seq <= ?"
            nxt = store.query(after, [expected, hi])[0]["s"]
            chain_problem = _Problem(expected, _gap_reason(expected, nxt))
            break
        for row in rows:
            rec, chain_problem = _check_row(row, expected, prev)
            if rec is None:
                break
            if rec.kind == "audit" and damage is None:
                damage = _damage_recorded(rec)
            if rec.seq == head_seq:
                head_hash_seen = rec.hash
            prev = rec.hash
            expected += 1
            checked += 1

    if damage is not None:
        return bad(damage.seq, damage.reason)
    if chain_problem is not None:
        return bad(chain_problem.seq, chain_problem.reason)
    if head_problem is not None:
        return bad(head_problem.seq, head_problem.reason)
    problem = _check_head(head, head_signed, checked, lambda _seq: head_hash_seen)
    if problem is not None:
        return bad(problem.seq, problem.reason)
    if head is None:
        return VerifyReport(True, 0, None, "the audit log is empty", 0, False)
    return VerifyReport(
        True, checked, None,
        f"{checked} events verified: the hash chain is intact and the head at seq {head.seq} is signed "
        f"by key {head.key_id}",
        head_seq, head_signed,
    )  # fmt: skip


def _check_row(row: dict[str, Any], expected: int, prev: str) -> tuple[_Record | None, _Problem | None]:
    """The decoded row if it is event ``expected`` and links to ``prev``; else what is wrong."""
    seq = row["seq"]
    if seq < expected:
        return None, _Problem(seq, f"event {seq} appears more than once (an event was inserted)")
    if seq > expected:
        return None, _Problem(expected, _gap_reason(expected, seq))
    try:
        rec = _decode_row(row)
        if rec.prev_hash != prev:
            return None, _Problem(
                seq,
                f"event {seq}: prev_hash does not match the hash of event {seq - 1} "
                "(events were inserted, deleted or reordered)",
            )
        if _record_hash(rec) != rec.hash:
            return None, _Problem(seq, f"event {seq}: hash does not match its contents (edited)")
    except _DecodeError as exc:
        return None, _Problem(seq, f"event {seq}: the stored row cannot be decoded ({exc})")
    return rec, None


def _gap_reason(expected: int, found: int | None) -> str:
    if found is None:
        return f"event {expected} is missing (deleted): the log ends at event {expected - 1}"
    return f"event {expected} is missing (deleted): the log jumps from event {expected - 1} to event {found}"


def _damage_recorded(rec: _Record) -> _Problem | None:
    try:
        data = json.loads(rec.data)
    except ValueError:
        return None
    damage = data.get(DAMAGE_KEY) if isinstance(data, dict) else None
    if not isinstance(damage, dict):
        return None
    seq = damage.get("first_bad_seq")
    return _Problem(
        seq if isinstance(seq, int) else rec.seq,
        f"{damage.get('reason')} (found when the log was reopened; recorded in event {rec.seq})",
    )
