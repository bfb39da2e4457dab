"""Units of audit/batch.py: the AuditBatch view, which batches take the plain fast path, each field's refusal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

import stitchwork.audit.batch as batch_module
import stitchwork.audit.canonical as canonical_module
from stitchwork.audit.batch import AuditBatch, _Item, _prepare_event, _prepare_events, _prepare_plain_batch
from stitchwork.audit.canonical import _MAX_DEPTH
from stitchwork.audit.log import AuditLog
from stitchwork.data._base import open_store
from stitchwork.errors import AuditError
from tests.signing import Ed25519Signer


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    store = open_store(f"duckdb://{tmp_path / 'audit.duckdb'}")
    audit = AuditLog(store, signer=Ed25519Signer("units-key"), journal_path=tmp_path / "audit.journal", flush_ms=1e9)
    yield audit
    audit.close()
    store.close()


def test_an_empty_batch() -> None:
    empty = AuditBatch(None)
    assert (len(empty), empty.first_seq, empty.last_seq, empty.last_hash) == (0, 0, 0, "")
    assert list(empty) == [] and empty[:] == [] and repr(empty) == "AuditBatch(0 events, seq 0..0)"
    for index in (0, -1):
        with pytest.raises(IndexError, match=r"^audit batch index out of range$"):
            empty[index]


def test_a_recorded_batch_indexes_like_a_list(log: AuditLog) -> None:
    log.append("run")
    batch = log.append_many([{"kind": "tool", "data": {"i": i}} for i in range(3)])
    events = list(batch)
    assert [e.seq for e in events] == [2, 3, 4] and (batch.first_seq, batch.last_seq) == (2, 4)
    assert batch.last_hash == events[-1].hash and events[0].prev_hash != ""
    assert repr(batch) == "AuditBatch(3 events, seq 2..4)"
    assert batch[-3] == events[0] and batch[2] == events[2] and batch[1:] == events[1:]
    for index in (3, -4):
        with pytest.raises(IndexError, match=r"^audit batch index out of range$"):
            batch[index]


@pytest.mark.parametrize("field", ["kind", "agent", "run_id", "tool", "decision"])
def test_each_field_that_is_not_a_string_is_named(field: str) -> None:
    fields: dict[str, Any] = {"kind": "tool", "agent": "a", "run_id": "r", "tool": "t", "decision": "d"}
    fields[field] = 7
    with pytest.raises(AuditError, match=f"^audit {field} must be a string, got int$"):
        _prepare_event(fields["kind"], fields["agent"], fields["run_id"], fields["tool"], fields["decision"], None)
    event = {**fields, "data": {"x": 1}}
    assert _prepare_plain_batch([event]) is None  # the fast path declines; the per-event path names the field
    refused = f"^audit batch event 0: audit {field} must be a string, got int; nothing of the batch was recorded$"
    with pytest.raises(AuditError, match=refused):
        _prepare_events([event])


def test_a_plain_batch_keeps_no_copies_and_data_none_is_an_empty_object() -> None:
    events: list[dict[str, Any]] = [{"kind": "tool", "data": {"x": 1}}, {"kind": "run"}]
    batch = _prepare_events(events)
    assert batch.datas is None  # the fast path: events are parsed back from their JSON when read
    assert batch.data_jsons == ['{"x":1}', "{}"] and batch.kinds == ["tool", "run"]
    assert _prepare_plain_batch([{"kind": "run"}, {"kind": "run", "data": None}]) is not None
    item = _Item("tool", "", "", "", "", None, '{"x":1}')
    with pytest.raises(AssertionError, match="the writer has not committed this item"):
        item.event()


def test_events_from_a_generator_or_mappings_that_are_not_dicts() -> None:
    odd = [{"kind": "tool", "data": {"s": {1, 2}}}, {"kind": "tool", "data": {"t": (1, [2])}}]
    batch = _prepare_events(e for e in odd)  # not plain: the per-event path must still see every event
    assert len(batch) == 2 and batch.data_jsons == ['{"s":[1,2]}', '{"t":[1,[2]]}']
    proxied = _prepare_events([MappingProxyType({"kind": "tool", "data": {"x": 1}})])
    assert proxied.data_jsons == ['{"x":1}']
    assert _prepare_plain_batch([MappingProxyType({"kind": "tool"})]) is None


@pytest.mark.parametrize(("data", "fast"), [
    ({"s": "an e-mail"}, True),  # "e-" in a string: still plain
    ({"s": "0.00001 and 1e-7 as text"}, False),  # may be a float form: the slow path decides
    ({"x": 1e-7}, False),
    ({"x": 0.00001}, False),
    ({"x": 0.5, "i": 3, "b": True, "n": None}, True),
    ({"x": [1, {"y": 2}]}, True),  # nested but plain
    ({"x": [1, {"y": "long " * 40}]}, True),  # the length of the text is not its depth
    ({f"k{i}": [] for i in range(_MAX_DEPTH - 1)}, True),  # exactly _MAX_DEPTH containers: cannot be too deep
    ({"x": {1, 2}}, False),
])
def test_which_batches_take_the_plain_path(data: dict[str, Any], fast: bool) -> None:
    batch = _prepare_plain_batch([{"kind": "tool", "data": {"first": 1}}, {"kind": "tool", "data": data}])
    assert (batch is not None) == fast
    if batch is not None:
        assert batch.data_jsons[0] == '{"first":1}'
    assert len(_prepare_events([{"kind": "tool", "data": data}])) == 1


def test_the_flat_check_does_not_replace_the_plain_check(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def is_plain(data: Any) -> bool:
        seen.append(data)
        return canonical_module._is_plain(data)

    monkeypatch.setattr(batch_module, "_is_plain", is_plain)
    assert _prepare_plain_batch([{"kind": "tool", "data": {"a": 1}}, {"kind": "tool", "data": {"b": "x"}}])
    assert _prepare_plain_batch([{"kind": "tool", "data": {"s": "x", "i": 1, "b": True, "n": None}}])
    assert seen == []  # flat data of plain scalars: one type check over the whole batch
    assert _prepare_plain_batch([{"kind": "tool", "data": {"a": [1]}}]) is not None
    assert seen == [{"a": [1]}]  # a list inside: checked event by event
    seen.clear()
    assert _prepare_plain_batch([{"kind": "tool", "data": {"a": 2**70}}]) is None


@pytest.mark.parametrize("data", [{"x": 1}, {"s": {1}}], ids=["plain", "per-event"])
def test_fields_left_out_are_empty_strings(data: dict[str, Any]) -> None:
    batch = _prepare_events([{"kind": "tool", "data": data}])
    assert (batch.agents, batch.run_ids, batch.tools, batch.decisions) == ([""], [""], [""], [""])
    assert batch.pres[0].startswith('{"agent":"","data":') and batch.mids == [',"tool":"","ts":']


def test_an_unknown_field_is_named_with_the_expected_ones() -> None:
    expected = "['agent', 'data', 'decision', 'kind', 'run_id', 'tool']"
    with pytest.raises(AuditError) as caught:
        _prepare_events([{"kind": "tool", "colour": "red", "size": 2}])
    assert str(caught.value) == (f"audit batch event 0: unknown field(s) ['colour', 'size']; expected {expected}; "
                                 "nothing of the batch was recorded")
