"""Verify's decisions one at a time, with exact answers: which signed head is checked among several signers, the
sequence number and sentence each problem names, which problem wins when there are several, and how stored rows
and heads are decoded (the bad column named). No database: rows are built from the documented hash formula and
served by a tiny store double, so these tests run in well under a second (they are also the first tests the
mutation run of ``audit/verify.py`` and ``audit/records.py`` executes)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import pytest

import stitchwork.audit.verify as verify_module
from stitchwork.audit.canonical import GENESIS_HASH, canonical
from stitchwork.audit.records import (
    _EVENT_COLUMNS,
    DAMAGE_KEY,
    _columns,
    _decode_head,
    _decode_row,
    _DecodeError,
    _Head,
    _head_message,
    _Record,
    _record_hash,
    _to_event,
)
from stitchwork.audit.verify import (
    VerifyReport,
    _check_head,
    _check_row,
    _damage_recorded,
    _gap_reason,
    _pick_head,
    _Problem,
    _verify_chain,
)
from tests.signing import Ed25519Signer

SIGNER = Ed25519Signer("mine")
OTHER = Ed25519Signer("other", seed=bytes(range(1, 33)))


def event_row(seq: int, prev: str, *, kind: str = "tool", data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stored row whose hash follows the documented formula (computed here, not by the module)."""
    fields = {"seq": seq, "ts": 1000.0 + seq, "kind": kind, "agent": "a", "run_id": "r", "tool": "t",
              "decision": "allow", "data": data if data is not None else {"i": seq}}
    digest = hashlib.sha256(prev.encode() + canonical(fields)).hexdigest()
    return {**fields, "data": canonical(fields["data"]).decode(), "prev_hash": prev, "hash": digest}


def chain(n: int, **overrides: dict[str, Any]) -> list[dict[str, Any]]:
    rows, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        rows.append(event_row(seq, prev, **overrides.get(str(seq), {})))
        prev = rows[-1]["hash"]
    return rows


def head_row(signer: Ed25519Signer, seq: int, hash_: str) -> dict[str, Any]:
    signature = signer.sign(canonical({"seq": seq, "hash": hash_, "key_id": signer.key_id})).hex()
    return {"key_id": signer.key_id, "seq": seq, "hash": hash_, "signature": signature, "ts": 5.0}


class RowStore:
    """Answers the two queries ``_verify_chain`` makes, from a list of rows; records each range it was asked for."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.asked: list[tuple[int, int]] = []

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        lo, hi = params
        if "min(seq)" in sql:  # the next stored seq after a gap: seq > lo AND seq <= hi
            found = [r["seq"] for r in self.rows if lo < r["seq"] <= hi]
            return [{"s": min(found) if found else None}]
        self.asked.append((lo, hi))
        return sorted((dict(r) for r in self.rows if lo <= r["seq"] < hi), key=lambda r: (r["seq"], r["hash"]))


def run_verify(rows: list[dict[str, Any]], heads: list[dict[str, Any]], signer: Ed25519Signer = SIGNER) -> VerifyReport:
    seqs = [r["seq"] for r in rows if r["seq"] is not None]
    stats = {"n": len(rows), "n_seq": len(seqs), "lo": min(seqs, default=None), "hi": max(seqs, default=None)}
    head, signed, problem = _pick_head(heads, signer)
    return _verify_chain(RowStore(rows), stats, head, signed, problem)  # type: ignore[arg-type]


def head(seq: int, hash_: str = "h") -> _Head:
    return _Head(seq, hash_, "mine", "00", 0.0)


# ---------------------------------------------------------------------------------------------- the signed head
def test_no_head_is_fine_only_for_an_empty_log() -> None:
    assert _check_head(None, False, 0, lambda s: None) is None
    assert _check_head(None, False, 3, lambda s: None) == _Problem(
        None, "the log has events up to 3 but no signed head in audit_heads (deleted?)")


def test_an_unsigned_head_is_named_by_its_seq_and_key() -> None:
    assert _check_head(head(4), False, 4, lambda s: "h") == _Problem(
        4, "the signed head (seq 4, key mine) has an invalid signature (forged or altered)")


def test_a_head_beyond_the_last_event_names_the_first_missing_event() -> None:
    assert _check_head(head(5), True, 3, lambda s: "h") == _Problem(
        4, "events after 3 are missing: the signed head is at seq 5 but the log ends at seq 3 (truncated)")
    assert _check_head(head(4), True, 4, lambda s: "h") is None  # exactly at the end: fine


def test_a_head_whose_hash_differs_from_its_event_names_that_event() -> None:
    asked: list[int] = []
    problem = _check_head(head(4, "signed"), True, 4, lambda s: asked.append(s) or "other")  # type: ignore[func-returns-value]
    assert problem == _Problem(4, "event 4: hash does not match the signed head (the chain was rewritten)")
    assert asked == [4]
    assert _check_head(head(0, "x"), True, 0, lambda s: None) is None  # a head at seq 0 covers no event
    assert _check_head(head(1, "signed"), True, 1, lambda s: "other") == _Problem(
        1, "event 1: hash does not match the signed head (the chain was rewritten)")  # the first event is checked too


def test_events_after_the_head_are_named_from_the_first_uncovered_one() -> None:
    assert _check_head(head(3), True, 6, lambda s: "h") == _Problem(
        4, "events 4..6 are not covered by the signed head at seq 3 (added to the store after the last signature)")


def test_this_signers_head_is_checked_even_when_another_signer_is_newer() -> None:
    rows = chain(3)
    heads = [head_row(OTHER, 3, rows[2]["hash"]), head_row(SIGNER, 2, rows[1]["hash"]),
             {**head_row(OTHER, 9, "f" * 64), "key_id": "third"}]
    picked, signed, problem = _pick_head(heads, SIGNER)
    assert picked is not None and (picked.key_id, picked.seq, picked.hash) == ("mine", 2, rows[1]["hash"])
    assert signed is True and problem is None
    report = run_verify(rows, heads)  # this signer's head at 2 leaves event 3 uncovered
    assert (report.ok, report.first_bad_seq, report.head_seq, report.head_signed) == (False, 3, 2, True)
    assert report.reason.startswith("events 3..3 are not covered by the signed head at seq 2")


def test_without_a_head_of_this_signer_the_newest_head_is_checked() -> None:
    rows = chain(3)
    heads = [head_row(OTHER, 2, rows[1]["hash"]), {**head_row(OTHER, 3, rows[2]["hash"]), "key_id": "third"},
             {"key_id": "broken", "seq": None, "hash": "x", "signature": "00", "ts": 0.0}]
    picked, signed, problem = _pick_head(heads, SIGNER)
    assert picked is not None and (picked.key_id, picked.seq) == ("third", 3)
    assert signed is False and problem is None  # another key's signature is not this signer's
    report = run_verify(rows, heads)
    assert (report.ok, report.first_bad_seq, report.head_seq, report.head_signed) == (False, 3, 3, False)
    assert "(seq 3, key third) has an invalid signature" in report.reason


def test_no_heads_at_all() -> None:
    assert _pick_head([], SIGNER) == (None, False, None)


def test_an_undecodable_head_is_a_problem_not_an_exception() -> None:
    bad = {**head_row(SIGNER, 1, "h"), "signature": "zz"}
    assert _pick_head([bad], SIGNER) == (None, False, _Problem(
        None, "the signed head in audit_heads cannot be decoded (signature is not hex)"))
    rows = chain(1)
    report = run_verify(rows, [bad])
    assert report == VerifyReport(False, 1, None,
                                  "the signed head in audit_heads cannot be decoded (signature is not hex)", 0, False)


@pytest.mark.parametrize(("change", "message"), [
    ({"seq": "1"}, "seq/hash/key_id hold '1'/'h'/'mine'"),
    ({"hash": None}, "seq/hash/key_id hold 1/None/'mine'"),
    ({"key_id": 7}, "seq/hash/key_id hold 1/'h'/7"),
    ({"signature": b"00"}, "signature holds b'00'"),
    ({"signature": "0g"}, "signature is not hex"),
])
def test_each_bad_head_column_is_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(_DecodeError) as caught:
        _decode_head({**head_row(SIGNER, 1, "h"), **change})
    assert str(caught.value) == message


def test_a_head_decodes_with_its_timestamp_or_zero() -> None:
    row = head_row(SIGNER, 1, "h")
    assert _decode_head(row) == _Head(1, "h", "mine", row["signature"], 5.0)
    assert _decode_head({**row, "ts": 7}).ts == 7.0
    assert _decode_head({**row, "ts": None}).ts == 0.0
    assert _head_message(3, "ab", "k") == b'{"hash":"ab","key_id":"k","seq":3}'


# ---------------------------------------------------------------------------------------------- stored rows
@pytest.mark.parametrize("column", _EVENT_COLUMNS)
def test_each_bad_column_is_named(column: str) -> None:
    row = chain(1)[0]
    wrong = "1" if column == "seq" else 1 if column == "ts" else 5
    with pytest.raises(_DecodeError, match=re.escape(f"column {column} holds {wrong!r}")):
        _decode_row({**row, column: wrong})
    with pytest.raises(_DecodeError, match=f"column {column} holds None"):
        _decode_row({k: v for k, v in row.items() if k != column})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_non_finite_timestamp_is_refused(value: float) -> None:
    with pytest.raises(_DecodeError, match="column ts holds"):
        _decode_row({**chain(1)[0], "ts": value})


def test_a_bool_is_not_a_seq() -> None:
    with pytest.raises(_DecodeError, match="column seq holds True"):
        _decode_row({**chain(1)[0], "seq": True})


def test_a_good_row_decodes_to_its_record() -> None:
    row = chain(1)[0]
    assert _decode_row(row) == _Record(*(row[c] for c in _EVENT_COLUMNS))


def test_the_record_hash_accepts_equal_data_in_another_form_and_refuses_bad_data() -> None:
    row = chain(1)[0]
    rec = _decode_row(row)
    assert _record_hash(rec) == row["hash"]
    assert _record_hash(rec._replace(data='{ "i" : 1 }')) == row["hash"]  # same value, other spacing
    assert _record_hash(rec._replace(data='{"i":2}')) != row["hash"]
    with pytest.raises(_DecodeError, match="data is not valid JSON"):
        _record_hash(rec._replace(data="{nope"))
    with pytest.raises(_DecodeError, match="data is not a JSON object"):
        _record_hash(rec._replace(data="[1]"))
    with pytest.raises(_DecodeError, match="cannot encode audit value"):
        _record_hash(rec._replace(data='{"x": NaN}'))


def test_rows_become_events_and_columns() -> None:
    rows = chain(2)
    recs = [_decode_row(r) for r in rows]
    event = _to_event(recs[1])
    assert (event.seq, event.kind, event.data, event.prev_hash, event.hash) == (
        2, "tool", {"i": 2}, rows[0]["hash"], rows[1]["hash"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.decision = "deny"  # type: ignore[misc]  # an event read back cannot be edited in memory either
    with pytest.raises(_DecodeError, match="data is not valid JSON"):
        _to_event(recs[0]._replace(data="{"))
    with pytest.raises(_DecodeError, match="data is not a JSON object"):
        _to_event(recs[0]._replace(data='"text"'))
    assert _columns([]) == {c: [] for c in _EVENT_COLUMNS}
    columns = _columns(recs)
    assert list(columns) == list(_EVENT_COLUMNS)
    assert columns["seq"] == [1, 2] and columns["hash"] == [rows[0]["hash"], rows[1]["hash"]]


def test_each_row_problem_names_its_event() -> None:
    rows = chain(3)
    assert _check_row(rows[1], 2, rows[0]["hash"]) == (_decode_row(rows[1]), None)
    assert _check_row(rows[0], 2, rows[0]["hash"]) == (None, _Problem(
        1, "event 1 appears more than once (an event was inserted)"))
    assert _check_row(rows[2], 2, rows[0]["hash"]) == (None, _Problem(
        2, "event 2 is missing (deleted): the log jumps from event 1 to event 3"))
    assert _check_row(rows[1], 2, GENESIS_HASH) == (None, _Problem(
        2, "event 2: prev_hash does not match the hash of event 1 (events were inserted, deleted or reordered)"))
    assert _check_row({**rows[1], "decision": "deny"}, 2, rows[0]["hash"]) == (None, _Problem(
        2, "event 2: hash does not match its contents (edited)"))
    assert _check_row({**rows[1], "tool": None}, 2, rows[0]["hash"]) == (None, _Problem(
        2, "event 2: the stored row cannot be decoded (column tool holds None)"))


def test_gap_reasons() -> None:
    assert _gap_reason(4, None) == "event 4 is missing (deleted): the log ends at event 3"
    assert _gap_reason(4, 9) == "event 4 is missing (deleted): the log jumps from event 3 to event 9"


def test_recorded_damage_is_read_back() -> None:
    rec = _decode_row(chain(1)[0])._replace(seq=8, kind="audit")
    damage = {"first_bad_seq": 5, "reason": "event 5 is missing"}
    assert _damage_recorded(rec._replace(data=json.dumps({DAMAGE_KEY: damage}))) == _Problem(
        5, "event 5 is missing (found when the log was reopened; recorded in event 8)")
    stored = '{"audit_damage": {"first_bad_seq": 5, "reason": "r"}}'  # the key as logs already on disk hold it
    assert _damage_recorded(rec._replace(data=stored)) == _Problem(
        5, "r (found when the log was reopened; recorded in event 8)")
    no_seq = {DAMAGE_KEY: {"first_bad_seq": None, "reason": "x"}}
    assert _damage_recorded(rec._replace(data=json.dumps(no_seq))) == _Problem(
        8, "x (found when the log was reopened; recorded in event 8)")
    for data in ("{", "[1]", '{"other": 1}', json.dumps({DAMAGE_KEY: "text"})):
        assert _damage_recorded(rec._replace(data=data)) is None


# ---------------------------------------------------------------------------------------------- the whole chain
def test_an_intact_chain_reports_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "VERIFY_CHUNK", 2)
    rows = chain(5)
    store = RowStore(rows)
    head_, signed, problem = _pick_head([head_row(SIGNER, 5, rows[4]["hash"])], SIGNER)
    stats = {"n": 5, "n_seq": 5, "lo": 1, "hi": 5}
    report = _verify_chain(store, stats, head_, signed, problem)  # type: ignore[arg-type]
    assert report == VerifyReport(True, 5, None, "5 events verified: the hash chain is intact and the head at "
                                  "seq 5 is signed by key mine", 5, True)
    assert store.asked == [(1, 3), (3, 5), (5, 6)]  # chunks of 2; rows appended after hi are never read


def test_an_empty_log_verifies() -> None:
    report = run_verify([], [])
    assert report == VerifyReport(True, 0, None, "the audit log is empty", 0, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.ok = False  # type: ignore[misc]  # a report cannot be turned into another after the fact


def test_rows_without_a_seq_or_below_one_are_reported_first() -> None:
    rows = chain(2)
    report = run_verify([*rows, {**rows[0], "seq": None}], [head_row(SIGNER, 2, rows[1]["hash"])])
    assert report == VerifyReport(False, 0, None, "1 stored row(s) have no sequence number (corrupt or inserted)",
                                  2, True)
    report = run_verify([{**rows[0], "seq": 0}, *rows], [head_row(SIGNER, 2, rows[1]["hash"])])
    assert (report.first_bad_seq, report.reason) == (0, "event 0: sequence numbers start at 1; this row was inserted")


def test_a_missing_chunk_names_the_next_stored_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "VERIFY_CHUNK", 2)
    rows = chain(7)
    kept = [r for r in rows if r["seq"] not in (3, 4, 5)]
    report = run_verify(kept, [head_row(SIGNER, 7, rows[6]["hash"])])
    assert report == VerifyReport(False, 2, 3, "event 3 is missing (deleted): the log jumps from event 2 to event 6",
                                  7, True)


def test_the_first_bad_event_is_named_and_only_good_events_are_counted() -> None:
    rows = chain(6)
    rows[3] = {**rows[3], "decision": "deny"}  # event 4 edited
    rows[4] = {**rows[4], "agent": "x"}  # and event 5
    report = run_verify(rows, [head_row(SIGNER, 6, rows[5]["hash"])])
    assert report == VerifyReport(False, 3, 4, "event 4: hash does not match its contents (edited)", 6, True)


def test_recorded_damage_outranks_a_later_chain_problem_and_a_bad_head() -> None:
    damage = {DAMAGE_KEY: {"first_bad_seq": 2, "reason": "events after 1 are missing"}}
    rows = chain(4, **{"2": {"kind": "audit", "data": damage}, "3": {"kind": "audit", "data": {"other": 1}}})
    good = [head_row(SIGNER, 4, rows[3]["hash"])]
    expected = "events after 1 are missing (found when the log was reopened; recorded in event 2)"
    assert run_verify(rows, good) == VerifyReport(False, 4, 2, expected, 4, True)
    broken = [*rows[:3], {**rows[3], "tool": "edited"}]
    assert run_verify(broken, good) == VerifyReport(False, 3, 2, expected, 4, True)
    assert run_verify(rows, [{**good[0], "signature": "zz"}]).reason == expected
    later = chain(4, **{"3": {"kind": "audit", "data": {DAMAGE_KEY: {"first_bad_seq": 3, "reason": "second"}}},
                        "2": {"kind": "audit", "data": damage}})
    assert run_verify(later, [head_row(SIGNER, 4, later[3]["hash"])]).first_bad_seq == 2  # the first recorded


def test_a_chain_problem_outranks_an_undecodable_head() -> None:
    rows = chain(3)
    rows[1] = {**rows[1], "kind": "edited"}
    report = run_verify(rows, [{**head_row(SIGNER, 3, rows[2]["hash"]), "signature": "zz"}])
    assert (report.first_bad_seq, report.reason) == (2, "event 2: hash does not match its contents (edited)")


def test_the_head_is_compared_with_the_hash_of_its_own_event() -> None:
    rows = chain(4)
    report = run_verify(rows, [head_row(SIGNER, 3, rows[3]["hash"])])  # signed, but names event 4's hash at seq 3
    assert report == VerifyReport(False, 4, 3, "event 3: hash does not match the signed head (the chain was "
                                  "rewritten)", 3, True)


def test_a_truncated_log_is_named_after_its_last_good_event() -> None:
    rows = chain(5)
    report = run_verify(rows[:3], [head_row(SIGNER, 5, rows[4]["hash"])])
    assert report == VerifyReport(False, 3, 4, "events after 3 are missing: the signed head is at seq 5 but the "
                                  "log ends at seq 3 (truncated)", 5, True)
