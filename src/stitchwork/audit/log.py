"""Tamper-evident, durable, group-committed audit log.

Every audited action becomes one :class:`AuditEvent` in a SHA-256 hash chain::

    hash(n) = sha256(prev_hash(n) + canonical({seq, ts, kind, agent, run_id, tool, decision, data}))
    prev_hash(1) = "0" * 64,  prev_hash(n) = hash(n - 1)

Write path (``journal_path`` set). One writer thread owns sequence numbers and hashing, so the chain is
linear however many threads and asyncio tasks append at once. It takes every pending append, writes the
batch to the journal (one JSON line per event) with a single ``pwrite``, calls ``os.fdatasync`` once and
then wakes every caller of the batch: ``append``/``aappend`` return only once their event is on disk.

A second thread copies journaled events into the store's ``audit_events`` table in one transaction per
store batch, every ``flush_ms`` (sooner once 5,000 events wait, and on ``flush``/``close``). The journal
is two files, ``journal_path`` and ``journal_path + ".1"``, used in turn: a copy seals the active file (the
writer carries on in the other, empty, one), signs the head of the batch, appends that signed head to the
sealed file, inserts the events, upserts the head into ``audit_heads`` and then empties the sealed file.
The writer never waits for the store. Emptied files are refilled with zeros, so batches overwrite
allocated blocks and ``fdatasync`` has no file-size change to commit.

On open, events in the journal beyond the store's last event are inserted into the store and signed, so a
crash between ``fdatasync`` and the store insert loses nothing. A damaged final line (a write cut short by
a crash) is ignored with a warning; damage anywhere else raises :class:`AuditError` naming the file and
line, and the journal is left as it is.

Without a journal (``journal_path=None``) each batch is one store transaction, followed by its signed head.

Batches. :meth:`AuditLog.append_many` (and ``aappend_many``) prepares a whole list of events in the caller's
thread, hands them to the writer together (so they get consecutive sequence numbers, in order) and returns once
the group holding them is durable: one journal ``pwrite`` and one ``fdatasync`` for the batch. An invalid event
refuses the whole batch before anything is recorded. A crash during the batch's journal write can leave a prefix
of the (unacknowledged) batch recorded, never a gap. The store copy goes in column by column
(:meth:`Store.append_columns`: an Arrow table on DuckDB and chdb) instead of as row dicts.

Canonical JSON fast path. Preparing an event used to be mostly the recursive ``_sanitise`` copy of ``data`` and the
standard encoder. For plain data (exact dicts with str keys, lists, tuples, str, int, bool, None, finite floats)
``orjson`` with sorted keys produces the same bytes (checked in the tests over every code point, random floats and
generated data), except floats below 1e-4 (``1e-05`` vs ``0.00001``), which are spotted on the output and sent
down the slow path, as are integers beyond 64 bits and lone surrogates (orjson refuses them) and anything not
plain. The hashed bytes, and so the chain, are the same whichever path an event takes.

The signed head, ``sign(canonical({"seq", "hash", "key_id"}))`` of the newest stored event, reveals
deletion of the newest events, which the chain alone cannot. If the log is opened on a store whose head does
not match its events (events after the head, missing events, a bad signature), it keeps working but its
next batch starts with an event of kind ``"audit"`` (decision ``"error"``) recording the damage, and
:meth:`AuditLog.verify` keeps reporting it: later heads never make earlier tampering look clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol, overload

import orjson

from stitchwork.data._base import Store
from stitchwork.errors import AuditError, StoreError

__all__ = [
    "EVENTS_TABLE",
    "GENESIS_HASH",
    "SIGNED_HEAD_TABLE",
    "AuditBatch",
    "AuditEvent",
    "AuditLog",
    "Signer",
    "VerifyReport",
    "canonical",
]

log = logging.getLogger(__name__)

EVENTS_TABLE = "audit_events"
SIGNED_HEAD_TABLE = "audit_heads"
GENESIS_HASH = "0" * 64

#: Copy journaled events into the store as soon as this many are waiting.
FLUSH_THRESHOLD = 5_000
#: Rows per query while verifying (the chain is streamed, never loaded whole).
VERIFY_CHUNK = 20_000
#: Bytes of zeros each journal file is refilled with when it is emptied. Batches overwrite these allocated
#: blocks, so ``fdatasync`` need not also commit a new file size, as appending does (measured under load:
#: p99 0.5 ms instead of 3 ms). A batch that does not fit simply extends the file.
JOURNAL_PREALLOC = 256 * 1024
#: ``data`` of the event that records damage found on open.
DAMAGE_KEY = "audit_damage"

_MAX_DEPTH = 64
_HEX_DIGITS = frozenset("0123456789abcdef")
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_encode_str = json.encoder.encode_basestring  # what _ENCODER does with a str, without its overhead
#: orjson refuses (instead of converting) subclasses, dataclasses and datetimes: those take the slow path.
_ORJSON_OPTIONS = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)
#: The only numbers orjson writes differently from ``float.__repr__``: below 1e-4, orjson writes ``0.00001`` and
#: ``1e-7`` where Python writes ``1e-05`` and ``1e-07``. Strings matching this merely take the slow path.
_FLOAT_FORM_DIFFERS = re.compile(rb"[0-9]e-|0\.0000")
_FLOAT_FORM_DIFFERS_TEXT = re.compile(r"[0-9]e-|0\.0000")
_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})
_PLAIN_CONTAINERS = frozenset({dict, list, tuple})
_APPEND_FIELDS = frozenset({"kind", "agent", "run_id", "tool", "decision", "data"})
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


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8, no NaN or infinities.

    Args:
        obj: JSON-compatible value (dict, list, str, int, float, bool, None).

    Returns:
        The UTF-8 encoding; equal values always give equal bytes.

    Raises:
        AuditError: ``obj`` holds NaN, an infinity, a non-JSON type or a string that is not valid Unicode.
    """
    try:
        return _ENCODER.encode(obj).encode("utf-8")
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise AuditError(f"cannot encode audit value as canonical JSON: {exc}") from exc


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


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Result of :meth:`AuditLog.verify`.

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


# --------------------------------------------------------------------------------------------------------
# encoding helpers


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
    seq: int
    hash: str
    key_id: str
    signature: str
    ts: float


class _Problem(NamedTuple):
    seq: int | None
    reason: str


class _DecodeError(Exception):
    """A stored row or journal line does not have the shape of an event."""


def _body(seq: int, ts: float, kind: str, agent: str, run_id: str, tool: str, decision: str, data: str) -> str:
    """``canonical({...})`` of an event's hashed fields, built from ``data`` already in canonical JSON."""
    enc = _encode_str
    return (
        f'{{"agent":{enc(agent)},"data":{data},"decision":{enc(decision)},"kind":{enc(kind)},'
        f'"run_id":{enc(run_id)},"seq":{seq},"tool":{enc(tool)},"ts":{float.__repr__(ts)}}}'
    )


def _chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _head_message(seq: int, hash_: str, key_id: str) -> bytes:
    return canonical({"seq": seq, "hash": hash_, "key_id": key_id})


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and _HEX_DIGITS.issuperset(value)


def _clean_str(value: str) -> str:
    """Strings that cannot be encoded as UTF-8 (lone surrogates) get them backslash-escaped."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


_Path = tuple[str | int | None, ...]  # keys, list indexes, None for "a member of a set"


def _where(path: _Path) -> str:
    parts = ("{…}" if p is None else f"[{p!r}]" for p in path)
    return "data" + "".join(parts)


def _clean_key(key: object, path: _Path) -> str:
    if isinstance(key, str):
        return _clean_str(str(key))
    if isinstance(key, bool) or key is None:
        return _ENCODER.encode(key)  # what json.dumps would do: "true", "false", "null"
    if isinstance(key, int):
        return str(int(key))
    if isinstance(key, float) and math.isfinite(key):
        return repr(float(key))
    raise AuditError(f"audit {_where(path)} has a key of type {type(key).__name__} ({key!r}); keys must be strings")


def _sanitise(value: Any, path: _Path = (), active: set[int] | None = None) -> Any:
    """A JSON-safe copy of ``value``: bytes become their repr, sets sorted lists, tuples lists.

    Raises:
        AuditError: NaN or infinity, a type with no JSON form, a reference cycle or excessive nesting;
            the message names where in ``data`` it is.
    """
    kind = type(value)
    if kind is str:
        return _clean_str(value)
    if kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if math.isfinite(value):
            return value
        raise AuditError(f"audit {_where(path)} is {value!r}: NaN and infinities are not valid JSON")
    if isinstance(value, str):  # subclasses (StrEnum, …) become plain values
        return _clean_str(str(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _sanitise(float(value), path, active)
    if isinstance(value, bytes | bytearray | memoryview):
        return repr(bytes(value))
    if len(path) >= _MAX_DEPTH:
        raise AuditError(f"audit {_where(path)} is nested more than {_MAX_DEPTH} levels deep")
    active = set() if active is None else active
    if id(value) in active:
        raise AuditError(f"audit {_where(path)} contains itself (a reference cycle)")
    active.add(id(value))
    result: Any
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            name = key if type(key) is str and key.isascii() else _clean_key(key, path)
            if name in result:  # {1: …, "1": …}
                raise AuditError(f"audit {_where(path)} has two keys that both become {name!r} in JSON")
            result[name] = _sanitise(item, (*path, name), active)
    elif isinstance(value, list | tuple):
        result = [_sanitise(item, (*path, i), active) for i, item in enumerate(value)]
    elif isinstance(value, set | frozenset):
        items = [_sanitise(item, (*path, None), active) for item in value]
        result = sorted(items, key=_ENCODER.encode)
    else:
        raise AuditError(
            f"audit {_where(path)} is a {type(value).__name__}, which has no JSON form; "
            "convert it to str, int, float, bool, None, list or dict first"
        )
    active.discard(id(value))
    return result


def _is_plain(data: dict[str, Any]) -> bool:
    """True if ``data`` holds only exact dicts (str keys), lists, tuples, str, int, bool, None and finite floats.

    Call it only on data orjson has encoded (so it has no reference cycle). For such data ``_sanitise`` changes
    nothing but tuples (to lists, as orjson writes them) and lone surrogates (which orjson refuses).
    """
    scalars, containers = _PLAIN_SCALARS, _PLAIN_CONTAINERS
    stack: list[Any] = [data]
    while stack:
        container = stack.pop()
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    return False
            values = container.values()
        else:
            values = container
        for value in values:
            kind = type(value)
            if kind in scalars:
                continue
            if kind is float:
                if value - value != 0.0:  # NaN or an infinity
                    return False
            elif kind in containers:
                stack.append(value)
            else:
                return False
    return True


def _fast_canonical(data: Mapping[str, Any]) -> str | None:
    """``canonical(_sanitise(data))`` as text, by orjson, when that is certain to give the same bytes; else None.

    orjson's output equals the standard encoder's (sorted keys, same escapes, shortest float digits) for plain
    data, except floats below 1e-4 in magnitude (checked on the output), integers beyond 64 bits and strings
    with lone surrogates (orjson refuses both). Data nested deeper than ``_sanitise`` allows, and anything not
    plain (subclasses, sets, bytes, enums, non-str keys, NaN), takes the slow path, which converts or refuses it.
    """
    if type(data) is not dict:
        return None
    try:
        raw = orjson.dumps(data, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:  # unsupported type, big int, surrogate, cycle or too deep
        return None
    if (b"e-" in raw or b"0.0000" in raw) and _FLOAT_FORM_DIFFERS.search(raw):
        return None
    if raw.count(b"{") + raw.count(b"[") > _MAX_DEPTH:  # might be nested deeper than _sanitise allows
        return None
    if not _is_plain(data):
        return None
    return raw.decode("utf-8")


def _prepare_plain_batch(events: list[Any]) -> _Batch | None:
    """Prepares a batch whose events are all plain (see :func:`_fast_canonical`), or returns None.

    The same checks as :func:`_fast_canonical`, made once over the whole batch where they can be: one search
    for float forms over all encoded data, and a type check over all values of flat data. None sends the whole
    batch down the per-event path, which converts or refuses (naming the event) what is not plain.
    """
    dumps, options, encode, fields = orjson.dumps, _ORJSON_OPTIONS, _encode_str, _APPEND_FIELDS
    batch = _Batch()
    kinds, agents, run_ids, tools, decisions = batch.kinds, batch.agents, batch.run_ids, batch.tools, batch.decisions
    pres, mids, data_jsons = batch.pres, batch.mids, batch.data_jsons
    datas: list[dict[str, Any]] = []
    texts: list[str] = []  # not orjson's bytes: keeping those alive costs 10x the encoding (1 KiB mallocs)
    try:
        for event in events:
            if type(event) is not dict:
                return None
            kind, agent, run_id = event["kind"], event.get("agent", ""), event.get("run_id", "")
            tool, decision, data = event.get("tool", ""), event.get("decision", ""), event.get("data")
            if not (
                type(kind) is str and type(agent) is str and type(run_id) is str and type(tool) is str
                and type(decision) is str and kind and kind != "audit"
            ):  # fmt: skip
                return None
            if not (kind + agent + run_id + tool + decision).isascii():
                kind, agent, run_id, tool, decision = map(_clean_str, (kind, agent, run_id, tool, decision))
            if data is None:
                data_json = "{}"
            elif type(data) is dict:
                data_json = dumps(data, option=options).decode("utf-8")
                datas.append(data)
                texts.append(data_json)
            else:
                return None
            kinds.append(kind)
            agents.append(agent)
            run_ids.append(run_id)
            tools.append(tool)
            decisions.append(decision)
            data_jsons.append(data_json)
            pres.append(
                f'{{"agent":{encode(agent)},"data":{data_json},"decision":{encode(decision)},"kind":{encode(kind)},'
                f'"run_id":{encode(run_id)},"seq":'
            )
            mids.append(f',"tool":{encode(tool)},"ts":')
    except (KeyError, orjson.JSONEncodeError):  # no kind; a value orjson refuses
        return None
    if not fields.issuperset(itertools.chain.from_iterable(events)):  # an unknown field (one pass over all keys)
        return None
    if not texts:
        return batch
    joined = "\n".join(texts)
    if ("e-" in joined or "0.0000" in joined) and _FLOAT_FORM_DIFFERS_TEXT.search(joined):
        return None
    if joined.count("{") + joined.count("[") == len(texts):  # flat data: one object each, no lists
        values = set(map(type, itertools.chain.from_iterable(map(dict.values, datas))))
        keys = set(map(type, itertools.chain.from_iterable(datas)))
        if keys <= {str} and values <= _PLAIN_SCALARS:
            return batch
    for data, text in zip(datas, texts, strict=True):
        if text.count("{") + text.count("[") > _MAX_DEPTH or not _is_plain(data):
            return None
    return batch


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


# --------------------------------------------------------------------------------------------------------
# write path


class _Item:
    """One pending append: prepared (checked, encoded) by the caller, completed by the writer."""

    __slots__ = ("agent", "data", "data_json", "decision", "kind", "mid", "pre", "rec", "run_id", "tool")

    def __init__(
        self, kind: str, agent: str, run_id: str, tool: str, decision: str, data: dict[str, Any] | None,
        data_json: str,
    ) -> None:  # fmt: skip
        self.kind, self.agent, self.run_id, self.tool, self.decision = kind, agent, run_id, tool, decision
        self.data = data  # None: parsed back from data_json if the event is read (the fast path keeps no copy)
        self.data_json = data_json
        enc = _encode_str
        self.pre = (
            f'{{"agent":{enc(agent)},"data":{data_json},"decision":{enc(decision)},"kind":{enc(kind)},'
            f'"run_id":{enc(run_id)},"seq":'
        )
        self.mid = f',"tool":{enc(tool)},"ts":'
        self.rec: _Record | None = None  # set by the writer

    def event(self) -> AuditEvent:
        rec = self.rec
        assert rec is not None, "the writer has not committed this item"
        data = self.data
        if data is None:
            data = self.data = orjson.loads(self.data_json)
        return AuditEvent(
            rec.seq, rec.ts, rec.kind, rec.agent, rec.run_id, rec.tool, rec.decision, data, rec.prev_hash,
            rec.hash,
        )  # fmt: skip


class _Batch:
    """The events of one ``append_many``, column by column: no object per event for the garbage collector to
    track (per-event objects kept alive made preparing a batch several times slower)."""

    __slots__ = (
        "agents", "data_jsons", "datas", "decisions", "first_seq", "hashes", "kinds", "mids", "pres", "prev_hash",
        "run_ids", "tools", "ts",
    )  # fmt: skip

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.agents: list[str] = []
        self.run_ids: list[str] = []
        self.tools: list[str] = []
        self.decisions: list[str] = []
        self.data_jsons: list[str] = []
        self.datas: list[dict[str, Any] | None] | None = None  # sanitised copies (slow path); None: parse the JSON
        self.pres: list[str] = []
        self.mids: list[str] = []
        self.first_seq = 0  # set by the writer, with ts, prev_hash (of the event before) and the hashes
        self.ts = 0.0
        self.prev_hash = ""
        self.hashes: list[str] = []

    @classmethod
    def of(cls, items: list[_Item]) -> _Batch:
        batch = cls()
        batch.kinds = [item.kind for item in items]
        batch.agents = [item.agent for item in items]
        batch.run_ids = [item.run_id for item in items]
        batch.tools = [item.tool for item in items]
        batch.decisions = [item.decision for item in items]
        batch.data_jsons = [item.data_json for item in items]
        batch.datas = [item.data for item in items]
        batch.pres = [item.pre for item in items]
        batch.mids = [item.mid for item in items]
        return batch

    def __len__(self) -> int:
        return len(self.pres)

    def event(self, i: int) -> AuditEvent:
        data = self.datas[i] if self.datas is not None else None
        if data is None:
            data = orjson.loads(self.data_jsons[i])
        return AuditEvent(
            self.first_seq + i, self.ts, self.kinds[i], self.agents[i], self.run_ids[i], self.tools[i],
            self.decisions[i], data, self.hashes[i - 1] if i else self.prev_hash, self.hashes[i],
        )  # fmt: skip


class AuditBatch(Sequence[AuditEvent]):
    """The events of one :meth:`AuditLog.append_many`, in order; each :class:`AuditEvent` is built when read.

    Attributes:
        first_seq: Sequence number of the first event (0 for an empty batch).
        last_seq: Sequence number of the last event (0 for an empty batch).
        last_hash: Hash of the last event ("" for an empty batch).
    """

    __slots__ = ("_batch", "first_seq", "last_hash", "last_seq")

    def __init__(self, batch: _Batch | None) -> None:
        self._batch = batch if batch is not None else _Batch()
        n = len(self._batch)
        self.first_seq = self._batch.first_seq if n else 0
        self.last_seq = self.first_seq + n - 1 if n else 0
        self.last_hash = self._batch.hashes[-1] if n else ""

    def __len__(self) -> int:
        return len(self._batch)

    @overload
    def __getitem__(self, index: int) -> AuditEvent: ...

    @overload
    def __getitem__(self, index: slice) -> list[AuditEvent]: ...

    def __getitem__(self, index: int | slice) -> AuditEvent | list[AuditEvent]:
        n = len(self._batch)
        if isinstance(index, slice):
            return [self._batch.event(i) for i in range(n)[index]]
        if not -n <= index < n:
            raise IndexError("audit batch index out of range")
        return self._batch.event(index % n)

    def __iter__(self) -> Iterator[AuditEvent]:
        return (self._batch.event(i) for i in range(len(self._batch)))

    def __repr__(self) -> str:
        return f"AuditBatch({len(self)} events, seq {self.first_seq}..{self.last_seq})"


_Waiter = tuple["asyncio.Future[Any]", "_Item | _Batch"]
_Row = tuple[int, float, str, str, str, str, str, str, str, str]  # a _Record, or a plain tuple (GC-untracked)


class _Group:
    """The appends that one journal write (or one store transaction) makes durable together."""

    __slots__ = ("done", "error", "items", "waiters")

    def __init__(self) -> None:
        self.items: list[_Item | _Batch] = []
        self.done = threading.Event()
        self.error: AuditError | None = None
        self.waiters: dict[asyncio.AbstractEventLoop, list[_Waiter]] = {}


class _Sealed:
    """Journaled events being copied into the store, and the journal file that holds them."""

    __slots__ = ("file", "head", "head_done", "inserted", "records")

    def __init__(self, records: list[_Row], file: int) -> None:
        self.records = records
        self.file = file
        self.head: _Head | None = None  # signed, and written to the end of the sealed file
        self.inserted = False
        self.head_done = False


def _settle(waiters: list[_Waiter], error: AuditError | None) -> None:
    """Runs in the caller's event loop: completes the futures of one group."""
    for future, item in waiters:
        if future.done():  # the awaiting task was cancelled; the event is recorded all the same
            continue
        if error is None:
            future.set_result(item.event() if isinstance(item, _Item) else AuditBatch(item))
        else:
            future.set_exception(AuditError(str(error)))


def _write_at(fd: int, payload: bytes, offset: int) -> int:
    """Writes ``payload`` at ``offset`` (one ``pwrite`` unless the kernel writes less); returns the new end."""
    view = memoryview(payload)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
    return offset


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------
# journal recovery


class _Recovered(NamedTuple):
    records: list[_Record]  # every complete event, checked and chained, in seq order
    head: _Head | None  # the last signed head line (its signature checked)


def _parse_event_line(obj: dict[str, Any]) -> _Record:
    if set(obj) != {"event", "hash", "prev_hash"}:
        raise _DecodeError(f"unexpected keys {sorted(obj)}")
    body = obj["event"]
    if not isinstance(body, dict) or set(body) != {
        "agent", "data", "decision", "kind", "run_id", "seq", "tool", "ts"
    }:  # fmt: skip
        raise _DecodeError("the event has missing or unexpected fields")
    if not isinstance(body["data"], dict):
        raise _DecodeError("data is not a JSON object")
    try:
        data_json = canonical(body["data"]).decode("utf-8")
    except AuditError as exc:
        raise _DecodeError(str(exc)) from exc
    row = {**body, "data": data_json, "prev_hash": obj["prev_hash"], "hash": obj["hash"]}
    rec = _decode_row(row)
    if not (_is_hash(rec.prev_hash) and _is_hash(rec.hash)):
        raise _DecodeError("hash or prev_hash is not a SHA-256 hex digest")
    if _record_hash(rec) != rec.hash:
        raise _DecodeError(f"event {rec.seq}: hash does not match its contents")
    return rec


def _parse_head_line(obj: dict[str, Any]) -> _Head:
    head = obj["head"]
    if set(obj) != {"head"} or not isinstance(head, dict):
        raise _DecodeError("malformed head line")
    return _decode_head(head)


def _check_after_gap(path: Path, line: int, after: bytes) -> None:
    """Bytes after a zeroed gap can only be the rest of the final, unfinished write: one batch at most.

    All events of a batch carry the same ``ts``, so complete events with different ``ts`` after the gap
    mean an acknowledged batch lies beyond it.

    Raises:
        AuditError: acknowledged data follows the gap: the journal is damaged.
    """
    stamps = set()
    after_head = False
    for piece in after.replace(b"\0", b"\n").split(b"\n"):
        try:
            obj = json.loads(piece)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if "head" in obj:
            after_head = True
        elif isinstance(obj.get("event"), dict):
            stamps.add(repr(obj["event"].get("ts")))
            if after_head or len(stamps) > 1:
                raise AuditError(
                    f"audit journal {path}, line {line}: zeroed bytes are followed by acknowledged events; "
                    "the journal is corrupt and was left untouched"
                )
    log.warning("audit journal %s, line %d: ignoring the rest of an unfinished write after a zeroed gap", path, line)


def _recover_journal(files: list[tuple[Path, bytes]], signer: Signer) -> _Recovered:
    """Parses and checks both journal files as one stream.

    Raises:
        AuditError: a line other than the very last one is damaged; names the file and line.
    """
    parsed: list[tuple[Path, list[tuple[int, dict[str, Any]]], bool]] = []
    for path, content in files:
        content, _, after = content.partition(b"\0")  # the journal's data ends at the preallocated zeros
        if after.strip(b"\0"):
            _check_after_gap(path, content.count(b"\n") + 1, after)
        if not content:
            continue
        lines = content.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        entries: list[tuple[int, dict[str, Any]]] = []
        for number, raw in enumerate(lines, start=1):
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                raise AuditError(
                    f"audit journal {path}, line {number}: not valid JSON ({exc}); the journal is corrupt "
                    "and was left untouched"
                ) from exc
            entries.append((number, obj))
        torn = False
        if tail:
            try:
                obj = json.loads(tail)
                torn = not isinstance(obj, dict)
            except ValueError:
                torn = True
            if not torn:
                entries.append((len(lines) + 1, obj))
            else:
                log.warning(
                    "audit journal %s, line %d: ignoring a torn final line (%d bytes of a write that never "
                    "completed)", path, len(lines) + 1, len(tail),
                )  # fmt: skip
                # A head line is written to a sealed file without a sync of its own: it may be torn even
                # though the other file holds later, complete batches.
                torn = not tail.startswith(b'{"head"')
        parsed.append((path, entries, torn))

    def first_seq(item: tuple[Path, list[tuple[int, dict[str, Any]]], bool]) -> float:
        for _, obj in item[1]:
            event = obj.get("event")
            if isinstance(event, dict) and isinstance(event.get("seq"), int):
                return float(event["seq"])
        return math.inf

    parsed.sort(key=first_seq)
    for path, entries, torn in parsed[:-1]:
        if torn:
            raise AuditError(
                f"audit journal {path}, line {len(entries) + 1}: damaged line before the end of the journal; "
                "the journal is corrupt and was left untouched"
            )

    records: list[_Record] = []
    head: _Head | None = None
    head_where = ""
    for path, entries, _ in parsed:
        for number, obj in entries:
            where = f"audit journal {path}, line {number}"
            last = records[-1] if records else None
            try:
                if "head" in obj:
                    line_head = _parse_head_line(obj)
                    if last is None or (line_head.seq, line_head.hash) != (last.seq, last.hash):
                        raise _DecodeError("the signed head does not name the event before it")
                    head, head_where = line_head, where
                else:
                    rec = _parse_event_line(obj)
                    if last is not None and rec.seq != last.seq + 1:
                        raise _DecodeError(f"event {rec.seq} follows event {last.seq}")
                    if last is not None and rec.prev_hash != last.hash:
                        raise _DecodeError(f"event {rec.seq}: prev_hash does not match event {last.seq}")
                    records.append(rec)
            except (_DecodeError, KeyError) as exc:
                raise AuditError(f"{where}: {exc}; the journal is corrupt and was left untouched") from exc
    # Each head is chained to every event before it, so checking the last signature covers them all.
    if head is not None and not signer.verify(
        _head_message(head.seq, head.hash, head.key_id), bytes.fromhex(head.signature)
    ):
        raise AuditError(
            f"{head_where}: the signed head has an invalid signature (key {head.key_id}); the journal is "
            "corrupt and was left untouched"
        )
    return _Recovered(records, head)


# --------------------------------------------------------------------------------------------------------


class AuditLog:
    """The audit log: append events, read the newest, verify the chain.

    Args:
        store: Where events end up (tables ``audit_events`` and ``audit_heads`` are created if missing).
        signer: Signs the head of the chain after every batch.
        journal_path: The write-ahead journal (a second file ``<journal_path>.1`` is used in turn). None
            commits every batch straight to the store, which is slower.
        flush_ms: How often journaled events are copied into the store.

    Raises:
        AuditError: The journal is corrupt (names the file and line; nothing is changed), or in use by
            another audit log.
        StoreError: The store cannot be read or written.
    """

    def __init__(self, store: Store, *, signer: Signer, journal_path: Path | None, flush_ms: float = 50.0) -> None:
        if not flush_ms > 0:
            raise AuditError(f"flush_ms must be positive, got {flush_ms!r}")
        self._store = store
        self._signer = signer
        self._flush_s = min(flush_ms / 1000.0, threading.TIMEOUT_MAX)
        self._paths: list[Path] = []
        if journal_path is not None:
            journal_path = Path(journal_path)
            self._paths = [journal_path, journal_path.with_name(journal_path.name + ".1")]

        self._cond = threading.Condition()  # guards _group, _closed, _failed
        self._group = _Group()
        self._closed = False
        self._failed: AuditError | None = None

        self._journal_lock = threading.Lock()  # guards _fds, _offsets, _active, _unstored, _journaled_seq
        self._fds: list[int] = []
        self._offsets = [0, 0]  # where the next batch goes in each file
        self._active = 0
        self._unstored: list[_Row] = []
        self._journaled_seq = 0

        self._copy_lock = threading.Lock()  # serialises store writes; guards _sealed, _stored_seq
        self._sealed: _Sealed | None = None
        self._stored_seq = 0
        self._flush_now = threading.Event()
        self._stop_flusher = threading.Event()
        self._last_copy_error = 0.0

        # writer-thread state
        self._next_seq = 1
        self._last_hash = GENESIS_HASH
        self._last_ts = 0.0
        self._damage: _Problem | None = None

        self._store.execute(_EVENTS_DDL)
        self._store.execute(_HEADS_DDL)
        if self._paths:
            self._open_journal()
        try:
            self._recover()
        except BaseException:
            self._close_fds()
            raise

        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()
        self._flusher: threading.Thread | None = None
        if self._paths:
            self._flusher = threading.Thread(target=self._flush_loop, name="audit-flusher", daemon=True)
            self._flusher.start()

    # ---------------------------------------------------------------------------------------- public API
    def append(
        self,
        kind: str,
        *,
        agent: str = "",
        run_id: str = "",
        tool: str = "",
        decision: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Records one event and returns it once it is durable (journaled and fsynced, or in the store).

        Args:
            kind: What happened: "auth", "decision", "approval", "tool", "model", "secret", "run", "sandbox".
            agent: Agent name.
            run_id: Run id.
            tool: Tool or action name.
            decision: "allow", "deny", "ask", "ok", "error", ….
            data: Details. Bytes are recorded as their repr and sets as sorted lists.

        Raises:
            AuditError: ``data`` holds NaN, an infinity or a value with no JSON form; the log is closed; or
                the event could not be made durable.
        """
        item = self._prepare(kind, agent, run_id, tool, decision, data)
        group = self._enqueue(item, None)
        group.done.wait()
        if group.error is not None:
            raise AuditError(str(group.error)) from group.error
        return item.event()

    async def aappend(
        self,
        kind: str,
        *,
        agent: str = "",
        run_id: str = "",
        tool: str = "",
        decision: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Like :meth:`append`, but awaits durability without blocking the event loop.

        Concurrent callers share one journal write and fsync. If the awaiting task is cancelled, the event
        is still recorded.
        """
        item = self._prepare(kind, agent, run_id, tool, decision, data)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditEvent] = loop.create_future()
        self._enqueue(item, (loop, future))
        return await future

    def append_nowait(
        self,
        kind: str,
        *,
        agent: str = "",
        run_id: str = "",
        tool: str = "",
        decision: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Queues an event without waiting for it to be durable.

        The chain is linear and the journal is written in order, so the event is durable no later than any event
        appended after it: a caller that ends with an awaited :meth:`aappend` has both durable on return.
        """
        self._enqueue(self._prepare(kind, agent, run_id, tool, decision, data), None)

    def append_many(self, events: Iterable[Mapping[str, Any]]) -> AuditBatch:
        """Records a batch of events, contiguous in the chain and in order, with one journal write and one fsync.

        Args:
            events: One mapping per event with the keyword arguments of :meth:`append` (``kind`` required;
                ``agent``, ``run_id``, ``tool``, ``decision``, ``data`` optional).

        Returns:
            The recorded events, once all of them are durable (journaled and fsynced, or in the store).

        Raises:
            AuditError: An event is invalid (nothing of the batch is recorded; the message names its index);
                the log is closed; or the batch could not be made durable. A crash during the journal write
                may leave a prefix of an unacknowledged batch recorded, never a gap.
        """
        batch = self._prepare_many(events)
        if not len(batch):
            return AuditBatch(None)
        group = self._enqueue(batch, None)
        group.done.wait()
        if group.error is not None:
            raise AuditError(str(group.error)) from group.error
        return AuditBatch(batch)

    async def aappend_many(self, events: Iterable[Mapping[str, Any]]) -> AuditBatch:
        """Like :meth:`append_many`, but awaits durability without blocking the event loop.

        If the awaiting task is cancelled, the batch is still recorded.
        """
        batch = self._prepare_many(events)
        if not len(batch):
            return AuditBatch(None)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditBatch] = loop.create_future()
        self._enqueue(batch, (loop, future))
        return await future

    def flush(self) -> None:
        """Copies every event journaled so far into the store, and upserts its signed head.

        Raises:
            AuditError: The store refused the copy (the events stay in the journal).
        """
        if not self._paths:
            return
        with self._journal_lock:
            target = self._journaled_seq
        try:
            while True:
                with self._copy_lock:
                    if self._stored_seq >= target and self._sealed is None:
                        return
                    if not self._copy_once():
                        return
        except Exception as exc:  # the store or the signer failed
            raise AuditError(
                f"cannot copy audit events into the store: {exc}; they are safe in the journal {self._paths[0]}"
            ) from exc

    def tail(self, n: int = 20) -> list[AuditEvent]:
        """The newest ``n`` events, oldest first (including events not yet copied into the store).

        Raises:
            AuditError: A stored event cannot be decoded (run :meth:`verify`).
            StoreError: The store cannot be read.
        """
        if n <= 0:
            return []
        with self._copy_lock:
            with self._journal_lock:
                memory = list(self._unstored)
            if self._sealed is not None and not self._sealed.inserted:
                memory = self._sealed.records + memory
            memory = memory[-n:]
            need = n - len(memory)
            stored: list[dict[str, Any]] = []
            if need > 0:
                if memory:
                    upper = memory[0][0]
                else:
                    rows = self._store.query(f"SELECT max(seq) AS m FROM {EVENTS_TABLE}")
                    upper = (rows[0]["m"] or 0) + 1
                stored = self._store.query(
                    f"{_SELECT_EVENTS} WHERE seq >= ? AND seq < ? ORDER BY seq", [upper - need, upper]
                )
        events = []
        for row in stored:
            try:
                events.append(_to_event(_decode_row(row)))
            except _DecodeError as exc:
                raise AuditError(
                    f"audit event {row.get('seq')!r} in the store cannot be decoded ({exc}); run verify"
                ) from exc
        events.extend(_to_event(_Record._make(rec)) for rec in memory)
        return events

    def verify(self) -> VerifyReport:
        """Recomputes the whole chain from the store and checks the signed head.

        Journaled events are copied into the store first. Rows are read in chunks of ``VERIFY_CHUNK``.
        Finds, and names by sequence number, the first event that was edited, deleted, inserted or
        reordered; a tail that was cut off or appended to; a forged head; and rows that cannot be decoded.
        Problems are reported, never raised.
        """
        try:
            self.flush()
        except AuditError as exc:
            return VerifyReport(False, 0, None, str(exc), 0, False)
        try:
            with self._copy_lock:  # a consistent head and end of chain; later events are not examined
                stats = self._store.query(
                    f"SELECT count(*) AS n, count(seq) AS n_seq, min(seq) AS lo, max(seq) AS hi FROM {EVENTS_TABLE}"
                )[0]
                head_rows = self._store.query(f"SELECT * FROM {SIGNED_HEAD_TABLE}")
            head, head_signed, head_problem = self._pick_head(head_rows)
            return self._verify_chain(stats, head, head_signed, head_problem)
        except StoreError as exc:
            return VerifyReport(False, 0, None, f"cannot read the audit store: {exc}", 0, False)

    def close(self) -> None:
        """Writes every pending event, copies the journal into the store and stops the log's threads.

        Raises:
            AuditError: The final copy into the store failed (the events stay in the journal and are copied
                when the log is next opened).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        if self._flusher is not None:
            self._stop_flusher.set()
            self._flush_now.set()
            self._flusher.join()
        if not self._paths:
            return
        try:
            self.flush()
            for fd in self._fds:
                os.ftruncate(fd, 0)
        except OSError as exc:
            raise AuditError(f"cannot truncate the audit journal {self._paths[0]}: {exc}") from exc
        finally:
            self._close_fds()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- append path
    def _prepare(
        self, kind: str, agent: str, run_id: str, tool: str, decision: str, data: Mapping[str, Any] | None
    ) -> _Item:
        if not (
            type(kind) is str and type(agent) is str and type(run_id) is str and type(tool) is str
            and type(decision) is str
        ):  # fmt: skip
            fields = {"kind": kind, "agent": agent, "run_id": run_id, "tool": tool, "decision": decision}
            for name, value in fields.items():
                if not isinstance(value, str):
                    raise AuditError(f"audit {name} must be a string, got {type(value).__name__}")
        if not kind:
            raise AuditError("audit kind must not be empty")
        if kind == "audit":
            raise AuditError('audit kind "audit" is reserved for records the audit log writes about itself')
        clean: dict[str, Any] | None = None
        if data is None:
            data_json = "{}"
        elif (fast := _fast_canonical(data)) is not None:
            data_json = fast
        elif isinstance(data, Mapping):
            clean = _sanitise(data)
            data_json = _ENCODER.encode(clean)
        else:
            raise AuditError(f"audit data must be a mapping, got {type(data).__name__}")
        if not (kind.isascii() and agent.isascii() and run_id.isascii() and tool.isascii() and decision.isascii()):
            kind, agent, run_id, tool, decision = (_clean_str(v) for v in (kind, agent, run_id, tool, decision))
        return _Item(kind, agent, run_id, tool, decision, clean, data_json)

    def _prepare_many(self, events: Iterable[Mapping[str, Any]]) -> _Batch:
        events = events if isinstance(events, list) else list(events)
        fast = _prepare_plain_batch(events)
        if fast is not None:
            return fast
        items: list[_Item] = []
        prepare = self._prepare
        for index, event in enumerate(events):
            try:
                if type(event) is not dict and not isinstance(event, Mapping):
                    raise AuditError(f"an event must be a mapping, got {type(event).__name__}")
                unknown = event.keys() - _APPEND_FIELDS
                if unknown:
                    raise AuditError(f"unknown field(s) {sorted(map(str, unknown))}; expected {sorted(_APPEND_FIELDS)}")
                get = event.get
                if "kind" not in event:
                    raise AuditError("kind is required")
                items.append(
                    prepare(event["kind"], get("agent", ""), get("run_id", ""), get("tool", ""),
                            get("decision", ""), get("data"))
                )  # fmt: skip
            except AuditError as exc:
                raise AuditError(f"audit batch event {index}: {exc}; nothing of the batch was recorded") from exc
        return _Batch.of(items)

    def _enqueue(
        self, entry: _Item | _Batch, waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]] | None
    ) -> _Group:
        """Adds one event or one batch (as one entry: its events get consecutive numbers) to the pending group."""
        with self._cond:
            if self._closed:
                raise AuditError("the audit log is closed")
            if self._failed is not None:
                raise AuditError(str(self._failed))
            group = self._group
            group.items.append(entry)
            if waiter is not None:
                group.waiters.setdefault(waiter[0], []).append((waiter[1], entry))
            if len(group.items) == 1:
                self._cond.notify()
        return group

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._group.items and not self._closed:
                    self._cond.wait()
                group = self._group
                if not group.items:
                    return  # closed and drained
                self._group = _Group()
            try:
                self._commit(group)
            except AuditError as exc:
                group.error = exc
            except (StoreError, OSError) as exc:
                group.error = AuditError(f"audit events could not be recorded: {exc}")
            except BaseException as exc:  # a bug or a failing signer: fail this batch, keep the writer alive
                log.exception("audit writer: batch failed")
                group.error = AuditError(f"audit events could not be recorded: {exc!r}")
            group.done.set()
            for loop, waiters in group.waiters.items():
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                    loop.call_soon_threadsafe(_settle, waiters, group.error)

    def _commit(self, group: _Group) -> None:
        """Assigns seq and hashes, makes the batch durable, then advances the chain (writer thread only)."""
        items: list[_Item | _Batch] = group.items
        marker = self._damage_marker()
        if marker is not None:
            items = [marker, *items]
        ts = max(time.time(), self._last_ts)
        ts_text = float.__repr__(ts)
        seq = self._next_seq
        prev = self._last_hash
        lines: list[str] = []
        journal = bool(self._paths)
        records: list[_Row] = []
        sha256, record = hashlib.sha256, _Record
        for entry in items:
            if isinstance(entry, _Batch):
                entry.first_seq, entry.ts, entry.prev_hash = seq, ts, prev
                hashes = entry.hashes = []
                for pre, mid, kind, agent, run_id, tool, decision, data_json in zip(
                    entry.pres, entry.mids, entry.kinds, entry.agents, entry.run_ids, entry.tools, entry.decisions,
                    entry.data_jsons, strict=True,
                ):  # fmt: skip
                    body = f"{pre}{seq}{mid}{ts_text}}}"
                    digest = sha256((prev + body).encode("utf-8")).hexdigest()
                    records.append((seq, ts, kind, agent, run_id, tool, decision, data_json, prev, digest))
                    hashes.append(digest)
                    if journal:
                        lines.append(f'{{"event":{body},"hash":"{digest}","prev_hash":"{prev}"}}\n')
                    prev = digest
                    seq += 1
                continue
            item = entry
            body = f"{item.pre}{seq}{item.mid}{ts_text}}}"
            digest = sha256((prev + body).encode("utf-8")).hexdigest()
            item.rec = rec = record(
                seq, ts, item.kind, item.agent, item.run_id, item.tool, item.decision, item.data_json, prev, digest
            )
            records.append(rec)
            if journal:
                lines.append(f'{{"event":{body},"hash":"{digest}","prev_hash":"{prev}"}}\n')
            prev = digest
            seq += 1
        if journal:
            payload = "".join(lines).encode("utf-8")
            with self._journal_lock:
                try:
                    fd = self._fds[self._active]
                    self._offsets[self._active] = _write_at(fd, payload, self._offsets[self._active])
                    os.fdatasync(fd)
                except OSError as exc:
                    failed = AuditError(
                        f"writing the audit journal {self._paths[self._active]} failed ({exc}); "
                        "the audit log refuses further events until it is reopened"
                    )
                    with self._cond:
                        self._failed = failed
                    raise failed from exc
                self._unstored.extend(records)
                self._journaled_seq = seq - 1
                backlog = len(self._unstored)
            if backlog >= FLUSH_THRESHOLD:
                self._flush_now.set()
        else:  # each batch is a store batch: commit it, then sign and store its head
            head = self._sign_head(seq - 1, prev, ts)
            with self._copy_lock:
                self._store.append_columns(EVENTS_TABLE, _columns(records))
                self._stored_seq = seq - 1
                try:
                    self._upsert_head(head)
                except StoreError:  # the events are durable; the next batch signs a newer head
                    log.exception("audit: could not store the signed head at seq %d", head.seq)
        self._next_seq, self._last_hash, self._last_ts = seq, prev, ts
        if marker is not None:
            self._damage = None

    def _damage_marker(self) -> _Item | None:
        if self._damage is None:
            return None
        data = {DAMAGE_KEY: {"first_bad_seq": self._damage.seq, "reason": self._damage.reason}}
        return _Item("audit", "stitchwork", "", "audit.open", "error", data, _ENCODER.encode(data))

    def _sign_head(self, seq: int, hash_: str, ts: float) -> _Head:
        key_id = self._signer.key_id
        signature = self._signer.sign(_head_message(seq, hash_, key_id))
        return _Head(seq, hash_, key_id, signature.hex(), ts)

    def _upsert_head(self, head: _Head) -> None:
        self._store.execute(_UPSERT_HEAD, [head.key_id, head.seq, head.hash, head.signature, head.ts])

    # ---------------------------------------------------------------------------------------- store copy
    def _flush_loop(self) -> None:
        while not self._stop_flusher.is_set():
            self._flush_now.wait(self._flush_s)
            self._flush_now.clear()
            if self._stop_flusher.is_set():
                return
            try:
                with self._copy_lock:
                    self._copy_once()
            except Exception as exc:  # the store or the signer failed; the events are safe in the journal
                now = time.monotonic()
                if now - self._last_copy_error > 10.0:
                    self._last_copy_error = now
                    log.error("audit: copying journaled events into the store failed (will retry): %s", exc)

    def _copy_once(self) -> bool:
        """Copies one sealed journal file into the store (caller holds ``_copy_lock``).

        If no file is sealed, seals the active one first: under the journal lock, between two batches, the
        writer is switched to the other (empty) file.

        Returns:
            False if there was nothing to copy.
        """
        if self._sealed is None:
            with self._journal_lock:
                if not self._unstored:
                    return False
                self._sealed = _Sealed(self._unstored, self._active)
                self._unstored = []
                self._active ^= 1
        sealed = self._sealed
        if sealed.head is None:  # the head of this store batch, kept in the journal after the events it covers
            last = _Record._make(sealed.records[-1])
            head = self._sign_head(last.seq, last.hash, time.time())
            line = (_ENCODER.encode({"head": head._asdict()}) + "\n").encode("utf-8")
            self._offsets[sealed.file] = _write_at(self._fds[sealed.file], line, self._offsets[sealed.file])
            sealed.head = head
        if not sealed.inserted:
            self._store.append_columns(EVENTS_TABLE, _columns(sealed.records))
            sealed.inserted = True
            self._stored_seq = sealed.records[-1][0]
        if not sealed.head_done:
            self._upsert_head(sealed.head)
            sealed.head_done = True
        self._reset_file(sealed.file)
        self._sealed = None
        return True

    # ---------------------------------------------------------------------------------------- open
    def _open_journal(self) -> None:
        directory = self._paths[0].parent
        directory.mkdir(parents=True, exist_ok=True)
        created = False
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW  # no O_APPEND: batches are pwritten
        try:
            for path in self._paths:
                created = created or not path.exists()
                fd = os.open(path, flags, 0o600)
                self._fds.append(fd)
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
            try:
                fcntl.flock(self._fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise AuditError(
                    f"the audit journal {self._paths[0]} is in use by another audit log (another process, or "
                    "an AuditLog in this process that was not closed)"
                ) from exc
            if created:
                _fsync_dir(directory)
        except BaseException:
            self._close_fds()
            raise

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _reset_file(self, index: int) -> None:
        """Empties journal file ``index`` once the store holds all its events.

        The file is truncated, then refilled with ``JOURNAL_PREALLOC`` zeros for the writer to overwrite.
        A crash in between leaves either the old, complete content (already in the store, so skipped on
        recovery) or zeros: never old lines behind a zeroed gap.
        """
        fd = self._fds[index]
        os.ftruncate(fd, 0)
        _write_at(fd, bytes(JOURNAL_PREALLOC), 0)
        os.fdatasync(fd)
        self._offsets[index] = 0

    def _store_end(self) -> tuple[int, str, float]:
        rows = self._store.query(
            f"SELECT seq, hash, ts FROM {EVENTS_TABLE} WHERE seq = (SELECT max(seq) FROM {EVENTS_TABLE}) LIMIT 1"
        )
        if not rows:
            return 0, GENESIS_HASH, 0.0
        row = rows[0]
        ts = row["ts"] if isinstance(row["ts"], float) and math.isfinite(row["ts"]) else 0.0
        return int(row["seq"]), str(row["hash"]), ts

    def _hash_at(self, seq: int) -> str | None:
        rows = self._store.query(f"SELECT hash FROM {EVENTS_TABLE} WHERE seq = ? LIMIT 2", [seq])
        return rows[0]["hash"] if len(rows) == 1 else None

    def _pick_head(self, rows: list[dict[str, Any]]) -> tuple[_Head | None, bool, _Problem | None]:
        """The head to check: this signer's, else the newest. Returns it, whether it is signed, and a
        problem if the row cannot be decoded."""
        if not rows:
            return None, False, None
        mine = [r for r in rows if r.get("key_id") == self._signer.key_id]
        row = mine[0] if mine else max(rows, key=lambda r: r["seq"] if isinstance(r.get("seq"), int) else -1)
        try:
            head = _decode_head(row)
        except _DecodeError as exc:
            problem = _Problem(None, f"the signed head in {SIGNED_HEAD_TABLE} cannot be decoded ({exc})")
            return None, False, problem
        message = _head_message(head.seq, head.hash, head.key_id)
        signed = self._signer.verify(message, bytes.fromhex(head.signature))
        return head, signed, None

    def _recover(self) -> None:
        """Brings the store up to date with the journal and checks the head; sets the writer's state."""
        store_seq, store_hash, _ = self._store_end()
        if self._paths:
            files = [(path, _read_all(fd)) for path, fd in zip(self._paths, self._fds, strict=True)]
            recovered = _recover_journal(files, self._signer)
            new = [rec for rec in recovered.records if rec.seq > store_seq]
            if new:
                first = new[0]
                if first.seq != store_seq + 1 or first.prev_hash != store_hash:
                    log.warning(
                        "audit: the journal continues at event %d but the store ends at event %d with a "
                        "different hash; the store was changed (verify will say where)", first.seq, store_seq,
                    )  # fmt: skip
                self._store.append_columns(EVENTS_TABLE, _columns(new))
                log.info("audit: recovered %d event(s) from the journal", len(new))
            if recovered.records:
                # The journal attests its events (written by this log, chained to the store): sign them if
                # the store's head is older, e.g. after a crash between the store insert and the head upsert.
                last = recovered.records[-1]
                current, _, _ = self._pick_head(self._store.query(f"SELECT * FROM {SIGNED_HEAD_TABLE}"))
                if (current is None or current.seq < last.seq) and self._hash_at(last.seq) == last.hash:
                    head = recovered.head
                    if head is None or head.seq != last.seq:
                        head = self._sign_head(last.seq, last.hash, time.time())
                    self._upsert_head(head)
            for index in range(len(self._fds)):
                self._reset_file(index)
        store_seq, store_hash, store_ts = self._store_end()
        head, signed, problem = self._pick_head(self._store.query(f"SELECT * FROM {SIGNED_HEAD_TABLE}"))
        if problem is None:
            problem = _check_head(head, signed, store_seq, self._hash_at)
        if problem is not None:
            log.warning("audit: the log is damaged (%s); its next event records this", problem.reason)
        self._damage = problem
        self._next_seq, self._last_hash, self._last_ts = store_seq + 1, store_hash, store_ts
        self._stored_seq = self._journaled_seq = store_seq

    # ---------------------------------------------------------------------------------------- verify
    def _verify_chain(
        self, stats: dict[str, Any], head: _Head | None, head_signed: bool, head_problem: _Problem | None
    ) -> VerifyReport:
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
            rows = self._store.query(
                f"{_SELECT_EVENTS} WHERE seq >= ? AND seq < ? ORDER BY seq, hash",
                [expected, min(expected + VERIFY_CHUNK, hi + 1)],  # rows appended since are not examined
            )
            if not rows:
                after = f"SELECT min(seq) AS s FROM {EVENTS_TABLE} WHERE seq > ? AND seq <= ?"
                nxt = self._store.query(after, [expected, hi])[0]["s"]
                chain_problem = _Problem(expected, self._gap_reason(expected, nxt))
                break
            for row in rows:
                rec, chain_problem = self._check_row(row, expected, prev)
                if rec is None:
                    break
                if rec.kind == "audit" and damage is None:
                    damage = self._damage_recorded(rec)
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

    def _check_row(self, row: dict[str, Any], expected: int, prev: str) -> tuple[_Record | None, _Problem | None]:
        """The decoded row if it is event ``expected`` and links to ``prev``; else what is wrong."""
        seq = row["seq"]
        if seq < expected:
            return None, _Problem(seq, f"event {seq} appears more than once (an event was inserted)")
        if seq > expected:
            return None, _Problem(expected, self._gap_reason(expected, seq))
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

    @staticmethod
    def _gap_reason(expected: int, found: int | None) -> str:
        if found is None:
            return f"event {expected} is missing (deleted): the log ends at event {expected - 1}"
        return f"event {expected} is missing (deleted): the log jumps from event {expected - 1} to event {found}"

    @staticmethod
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
