"""Appends on their way to the writer: checked and encoded in the caller's thread, numbered by the writer.

One :meth:`~stitchwork.audit.log.AuditLog.append` becomes an ``_Item``. One ``append_many`` becomes a ``_Batch``,
held column by column (no object per event for the garbage collector to track): the whole list is prepared in the
caller's thread and handed to the writer together, so its events get consecutive sequence numbers, in order, and
are made durable by one journal ``pwrite`` and one ``fdatasync``. An invalid event refuses the whole batch before
anything is recorded. A batch of plain events takes the orjson fast path as a whole (:func:`_prepare_plain_batch`;
see :mod:`stitchwork.audit.canonical`). :class:`AuditBatch` is the caller's view of a recorded batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import orjson

from stitchwork.audit.canonical import (
    _ENCODER,
    _FLOAT_FORM_DIFFERS_TEXT,
    _MAX_DEPTH,
    _ORJSON_OPTIONS,
    _PLAIN_SCALARS,
    _clean_str,
    _encode_str,
    _fast_canonical,
    _is_plain,
    _sanitise,
)
from stitchwork.audit.records import AuditEvent, _Record
from stitchwork.errors import AuditError

__all__ = ["AuditBatch"]

_APPEND_FIELDS = frozenset({"kind", "agent", "run_id", "tool", "decision", "data"})


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


def _prepare_event(
    kind: str, agent: str, run_id: str, tool: str, decision: str, data: Mapping[str, Any] | None
) -> _Item:
    """Checks and encodes one event for the writer (in the caller's thread).

    Raises:
        AuditError: a field is not a string, ``kind`` is empty or reserved, or ``data`` has no JSON form.
    """
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


def _prepare_events(events: Iterable[Mapping[str, Any]]) -> _Batch:
    """Checks and encodes a whole batch: the plain fast path if it applies, else event by event.

    Raises:
        AuditError: an event is invalid; names its index (nothing of the batch is recorded).
    """
    events = events if isinstance(events, list) else list(events)
    fast = _prepare_plain_batch(events)
    if fast is not None:
        return fast
    items: list[_Item] = []
    prepare = _prepare_event
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
