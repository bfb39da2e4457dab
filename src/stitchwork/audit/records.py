"""What the audit log stores: its two tables, an event and a signed head as rows, and decoding them back.

``audit_events`` holds the chain (see :mod:`stitchwork.audit.canonical` for the hash rule); ``audit_heads`` holds,
per signing key, the signed head ``sign(canonical({"seq", "hash", "key_id"}))`` of the newest stored event.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from stitchwork.audit.canonical import _body, _chain_hash, canonical
from stitchwork.errors import AuditError

__all__ = ["DAMAGE_KEY", "EVENTS_TABLE", "SIGNED_HEAD_TABLE", "AuditEvent", "Signer"]

EVENTS_TABLE = "audit_events"
SIGNED_HEAD_TABLE = "audit_heads"
#: ``data`` of the event that records damage found on open.
DAMAGE_KEY = "audit_damage"
_EVENT_COLUMNS = ("seq", "ts", "kind", "agent", "run_id", "tool", "decision", "data", "prev_hash", "hash")
_SELECT_EVENTS = f"SELECT {', '.join(_EVENT_COLUMNS)} FROM {EVENTS_TABLE}"
_EVENTS_DDL = f"""
CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} (
    seq BIGINT NOT NULL, ts DOUBLE NOT NULL, kind VARCHAR NOT NULL, agent VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL, tool VARCHAR NOT NULL, decision VARCHAR NOT NULL, data VARCHAR NOT NULL,
    prev_hash VARCHAR NOT NULL, hash VARCHAR NOT NULL
)
"""
_HEADS_DDL = f"""
CREATE TABLE IF NOT EXISTS {SIGNED_HEAD_TABLE} (
    key_id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL, hash VARCHAR NOT NULL, signature VARCHAR NOT NULL,
    ts DOUBLE NOT NULL
)
"""
_UPSERT_HEAD = (
    f"INSERT INTO {SIGNED_HEAD_TABLE} (key_id, seq, hash, signature, ts) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
    "signature = excluded.signature, ts = excluded.ts"
)
_UPDATE_HEAD = f"UPDATE {SIGNED_HEAD_TABLE} SET seq = ?, hash = ?, signature = ?, ts = ? WHERE key_id = ?"


class Signer(Protocol):
    """Signs audit heads. ``verify`` returns False for a bad signature; it never raises."""

    @property
    def key_id(self) -> str:
        """A stable id of the signing key, stored with each signed head."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Signs ``data``."""
        ...

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True if ``signature`` is this key's signature of ``data``."""
        ...


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event of the chain, as recorded.

    Attributes:
        seq: Position in the chain: 1, 2, 3, … without gaps.
        ts: Unix time the writer recorded it.
        kind: "auth", "decision", "approval", "tool", "model", "secret", "run", "sandbox" (and "audit" for
            damage the log found in itself).
        agent: Agent name, or "".
        run_id: Run id, or "".
        tool: Tool or action name, or "".
        decision: "allow", "deny", "ask", "ok", "error", ….
        data: Details, JSON-safe (bytes and sets were converted when appended).
        prev_hash: Hex SHA-256 of the previous event ("0" * 64 for event 1).
        hash: Hex SHA-256 of ``prev_hash`` followed by the canonical JSON of the fields above.
    """

    seq: int
    ts: float
    kind: str
    agent: str
    run_id: str
    tool: str
    decision: str
    data: dict[str, Any]
    prev_hash: str
    hash: str


class _Record(NamedTuple):
    """An event as stored: ``data`` is its canonical JSON text."""

    seq: int
    ts: float
    kind: str
    agent: str
    run_id: str
    tool: str
    decision: str
    data: str
    prev_hash: str
    hash: str


class _Head(NamedTuple):
    """A signed head: the newest event a signature covers, and the signature (hex)."""

    seq: int
    hash: str
    key_id: str
    signature: str
    ts: float


class _DecodeError(Exception):
    """A stored row or journal line does not have the shape of an event."""


_Row = tuple[int, float, str, str, str, str, str, str, str, str]  # a _Record, or a plain tuple (GC-untracked)


def _head_message(seq: int, hash_: str, key_id: str) -> bytes:
    return canonical({"seq": seq, "hash": hash_, "key_id": key_id})


def _decode_row(row: Mapping[str, Any]) -> _Record:
    """Checks the types of one stored row.

    Raises:
        _DecodeError: a column is NULL or of the wrong type.
    """
    values: list[Any] = list(map(row.get, _EVENT_COLUMNS))
    rec = _Record(*values)
    if (
        type(rec.seq) is int
        and type(rec.ts) is float
        and math.isfinite(rec.ts)
        and type(rec.kind) is str
        and type(rec.agent) is str
        and type(rec.run_id) is str
        and type(rec.tool) is str
        and type(rec.decision) is str
        and type(rec.data) is str
        and type(rec.prev_hash) is str
        and type(rec.hash) is str
    ):
        return rec
    for name, value in zip(_EVENT_COLUMNS, values, strict=True):
        wanted = int if name == "seq" else float if name == "ts" else str
        if type(value) is not wanted or (isinstance(value, float) and not math.isfinite(value)):
            raise _DecodeError(f"column {name} holds {value!r}")
    raise _DecodeError("unexpected column types")  # pragma: no cover - the loop above finds the column


def _record_hash(rec: _Record) -> str:
    """The hash ``rec`` should have; its ``data`` text is re-canonicalised only if the fast path fails."""
    body = _body(rec.seq, rec.ts, rec.kind, rec.agent, rec.run_id, rec.tool, rec.decision, rec.data)
    digest = _chain_hash(rec.prev_hash, body)
    if digest == rec.hash:
        return digest
    try:
        data = json.loads(rec.data)
    except ValueError as exc:
        raise _DecodeError(f"data is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _DecodeError("data is not a JSON object")
    try:
        data_json = canonical(data).decode("utf-8")
    except AuditError as exc:
        raise _DecodeError(str(exc)) from exc
    body = _body(rec.seq, rec.ts, rec.kind, rec.agent, rec.run_id, rec.tool, rec.decision, data_json)
    return _chain_hash(rec.prev_hash, body)


def _columns(records: Sequence[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """The records as one list per column of ``audit_events`` (for :meth:`Store.append_columns`)."""
    if not records:
        return {name: [] for name in _EVENT_COLUMNS}
    return dict(zip(_EVENT_COLUMNS, map(list, zip(*records, strict=True)), strict=True))


def _to_event(rec: _Record) -> AuditEvent:
    try:
        data = json.loads(rec.data)
    except ValueError as exc:
        raise _DecodeError(f"data is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _DecodeError("data is not a JSON object")
    return AuditEvent(
        rec.seq,
        rec.ts,
        rec.kind,
        rec.agent,
        rec.run_id,
        rec.tool,
        rec.decision,
        data,
        rec.prev_hash,
        rec.hash,
    )


def _decode_head(row: Mapping[str, Any]) -> _Head:
    seq, hash_, key_id, signature, ts = (row.get(k) for k in ("seq", "hash", "key_id", "signature", "ts"))
    if not (isinstance(seq, int) and isinstance(hash_, str) and isinstance(key_id, str)):
        raise _DecodeError(f"seq/hash/key_id hold {seq!r}/{hash_!r}/{key_id!r}")
    if not isinstance(signature, str):
        raise _DecodeError(f"signature holds {signature!r}")
    try:
        bytes.fromhex(signature)
    except ValueError as exc:
        raise _DecodeError("signature is not hex") from exc
    return _Head(seq, hash_, key_id, signature, float(ts) if isinstance(ts, int | float) else 0.0)

