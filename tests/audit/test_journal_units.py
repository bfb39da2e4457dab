"""The audit journal's files and recovery, one function at a time, with exact answers: the preallocation sizes,
partial writes and reads, how the files are opened (created 0600, permissions repaired, locked, the directory synced
only when a file was created), what a reset leaves, the head line's bytes, each check of an event and head line
(and its message), the zeroed-gap rule, the order of the two files, torn and damaged lines, and the signature of
the last head. Journal lines are built here from the documented hash formula (not by the module), so no store or
writer thread is needed and these tests run in well under a second (they are the first tests the mutation run of
``audit/journal.py`` executes)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stitchwork.audit.journal as journal
from stitchwork.audit.canonical import GENESIS_HASH, canonical
from stitchwork.audit.journal import (
    JOURNAL_PREALLOC,
    JOURNAL_PREALLOC_MAX,
    _check_after_gap,
    _head_line,
    _open_journal,
    _parse_event_line,
    _parse_head_line,
    _read_all,
    _recover_journal,
    _reset_journal_file,
    _write_at,
    prealloc_for,
)
from stitchwork.audit.records import _DecodeError, _Head, _Record
from stitchwork.errors import AuditError
from tests.signing import Ed25519Signer

SIGNER = Ed25519Signer("mine")
OTHER = Ed25519Signer("other", seed=bytes(range(1, 33)))
P0 = Path("/j/audit.journal")
P1 = Path("/j/audit.journal.1")
CORRUPT = "the journal is corrupt and was left untouched"


# --- journal lines, built from the documented formula ---------------------------------------------------------


def fields(seq: int, *, ts: float | None = None, data: Any = None) -> dict[str, Any]:
    return {
        "seq": seq,
        "ts": 1000.0 + seq if ts is None else ts,
        "kind": "tool",
        "agent": "a",
        "run_id": "r",
        "tool": "t",
        "decision": "allow",
        "data": {"i": seq} if data is None else data,
    }


def digest(prev: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + canonical(body)).hexdigest()


def event_obj(seq: int, prev: str, **kw: Any) -> dict[str, Any]:
    body = fields(seq, **kw)
    return {"event": body, "hash": digest(prev, body), "prev_hash": prev}


def line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def events(first: int, last: int, prev: str = GENESIS_HASH, **kw: Any) -> tuple[list[dict[str, Any]], str]:
    """Chained event objects ``first..last`` after ``prev``; returns them and the last hash."""
    out = []
    for seq in range(first, last + 1):
        out.append(event_obj(seq, prev, **kw))
        prev = out[-1]["hash"]
    return out, prev


def head_obj(seq: int, hash_: str, signer: Ed25519Signer = SIGNER) -> dict[str, Any]:
    signature = signer.sign(canonical({"seq": seq, "hash": hash_, "key_id": signer.key_id})).hex()
    return {"head": {"seq": seq, "hash": hash_, "key_id": signer.key_id, "signature": signature, "ts": 7.0}}


def content(*objs: Any, zeros: int = 64) -> bytes:
    return b"".join(line(obj) for obj in objs) + bytes(zeros)


def seqs(files: list[tuple[Path, bytes]]) -> list[int]:
    return [rec.seq for rec in _recover_journal(files, SIGNER).records]


def corrupt(files: list[tuple[Path, bytes]]) -> str:
    with pytest.raises(AuditError) as caught:
        _recover_journal(files, SIGNER)
    return str(caught.value)


# --- preallocation ---------------------------------------------------------------------------------------------


def test_preallocation_sizes() -> None:
    assert JOURNAL_PREALLOC == 256 * 1024
    assert JOURNAL_PREALLOC_MAX == 8 * 1024 * 1024
    assert prealloc_for(200_000) == 400_000  # twice the use between the bounds
    assert prealloc_for(131_073) == 262_146
    assert prealloc_for(131_071) == JOURNAL_PREALLOC
    assert prealloc_for(4 * 1024 * 1024 + 1) == JOURNAL_PREALLOC_MAX


# --- writing and reading ---------------------------------------------------------------------------------------


def whole(descriptor: int) -> bytes:
    return os.pread(descriptor, os.fstat(descriptor).st_size, 0)


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    descriptor = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    yield descriptor
    os.close(descriptor)


def test_write_at_writes_at_the_offset_and_returns_the_new_end(fd: int) -> None:
    os.pwrite(fd, b"0123456789", 0)
    assert _write_at(fd, b"abc", 4) == 7
    assert whole(fd) == b"0123abc789"
    assert _write_at(fd, b"", 5) == 5


def test_write_at_carries_on_after_a_short_write(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = os.pwrite, []

    def short(descriptor: int, data: Any, offset: int) -> int:
        calls.append((bytes(data), offset))
        assert len(calls) < 50, "the write makes no progress"
        return real(descriptor, bytes(data)[:3], offset)

    monkeypatch.setattr(os, "pwrite", short)
    assert _write_at(fd, b"abcdefgh", 10) == 18
    monkeypatch.undo()
    assert calls == [(b"abcdefgh", 10), (b"defgh", 13), (b"gh", 16)]
    assert whole(fd) == bytes(10) + b"abcdefgh"


class Reads:
    """``os.pread`` that serves at most ``cap`` bytes a call and refuses to be called 50 times (a loop that makes
    no progress fails at once instead of filling memory)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.offsets, self.real = cap, list[int](), os.pread

    def __call__(self, descriptor: int, size: int, offset: int) -> bytes:
        self.offsets.append(offset)
        assert len(self.offsets) < 50, "the read makes no progress"
        return self.real(descriptor, min(size, self.cap), offset)


def test_read_all_reads_every_chunk_from_the_start(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    os.pwrite(fd, b"the whole journal file, in pieces", 0)
    reads = Reads(5)
    monkeypatch.setattr(os, "pread", reads)
    assert _read_all(fd) == b"the whole journal file, in pieces"
    assert reads.offsets == [0, 5, 10, 15, 20, 25, 30, 33]


def test_read_all_of_an_empty_file(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pread", Reads(1 << 30))
    assert _read_all(fd) == b""


def test_read_all_reads_past_one_mebibyte(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 4100 + b"end"  # 1 MiB + 6 KiB: more than one read
    os.pwrite(fd, data, 0)
    monkeypatch.setattr(os, "pread", Reads(1 << 30))
    assert _read_all(fd) == data


# --- opening -----------------------------------------------------------------------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    monkeypatch.setattr(journal, "fsync_dir", calls.append)
    return calls


def test_open_creates_the_directory_and_files_0600_syncs_the_directory_and_locks_the_first(
    tmp_path: Path, synced: list[Path]
) -> None:
    paths = [tmp_path / "a" / "b" / "j", tmp_path / "a" / "b" / "j.1"]
    fds = _open_journal(paths)
    try:
        assert [os.fstat(f).st_ino for f in fds] == [p.stat().st_ino for p in paths]
        assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o600, 0o600]
        assert synced == [tmp_path / "a" / "b"]
        other = os.open(paths[0], os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        other = os.open(paths[1], os.O_RDONLY)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only the first file is locked
        finally:
            os.close(other)
    finally:
        for f in fds:
            os.close(f)


def test_new_journal_files_are_0600_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not widened then narrowed: a reader that opened a file in between would keep reading the audit trail."""
    real, modes = os.fstat, []

    def spy(descriptor: int) -> os.stat_result:
        result = real(descriptor)
        modes.append(stat.S_IMODE(result.st_mode))
        return result

    monkeypatch.setattr(os, "fstat", spy)
    previous = os.umask(0o022)
    try:
        fds = _open_journal([tmp_path / "j", tmp_path / "j.1"])
    finally:
        os.umask(previous)
        monkeypatch.undo()
    for f in fds:
        os.close(f)
    assert modes == [0o600, 0o600]


def test_open_of_existing_files_does_not_sync_the_directory_and_repairs_permissions(
    tmp_path: Path, synced: list[Path]
) -> None:
    paths = [tmp_path / "j", tmp_path / "j.1"]
    paths[0].write_bytes(b"kept")
    paths[1].write_bytes(b"")
    paths[0].chmod(0o644)
    paths[1].chmod(0o601)
    fds = _open_journal(paths)
    try:
        assert synced == []
        assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o600, 0o600]
        assert paths[0].read_bytes() == b"kept"  # opened, not truncated
    finally:
        for f in fds:
            os.close(f)


def test_open_syncs_the_directory_when_only_the_second_file_is_new(tmp_path: Path, synced: list[Path]) -> None:
    paths = [tmp_path / "j", tmp_path / "j.1"]
    paths[0].write_bytes(b"")
    for f in _open_journal(paths):
        os.close(f)
    assert synced == [tmp_path]


def test_a_second_open_is_refused_and_leaks_no_descriptor(tmp_path: Path) -> None:
    paths = [tmp_path / "j", tmp_path / "j.1"]
    fds = _open_journal(paths)
    try:
        before = open_fds()
        with pytest.raises(AuditError) as caught:
            _open_journal(paths)
        assert str(caught.value).startswith(
            f"the audit journal {paths[0]} is in use by another audit log (another process, or an AuditLog"
        )
        assert isinstance(caught.value.__cause__, BlockingIOError)
        assert open_fds() == before
    finally:
        for f in fds:
            os.close(f)
    for f in _open_journal(paths):  # free again once closed
        os.close(f)


def test_open_refuses_a_symlinked_journal_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "j").symlink_to(target)
    before = open_fds()
    with pytest.raises(OSError):
        _open_journal([tmp_path / "k", tmp_path / "j"])
    assert open_fds() == before


# --- resetting ---------------------------------------------------------------------------------------------------


def test_reset_empties_the_file_and_refills_it_with_zeros(fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    os.pwrite(fd, b"x" * (JOURNAL_PREALLOC + 100), 0)
    synced: list[int] = []
    real = os.fdatasync

    def spy(descriptor: int) -> None:
        synced.append(descriptor)
        real(descriptor)

    monkeypatch.setattr(os, "fdatasync", spy)
    _reset_journal_file(fd)
    assert whole(fd) == bytes(JOURNAL_PREALLOC)
    assert synced == [fd]
    _reset_journal_file(fd, 10)
    assert whole(fd) == bytes(10)
    _reset_journal_file(fd, 0)
    assert whole(fd) == b""
    assert synced == [fd, fd, fd]


# --- head lines --------------------------------------------------------------------------------------------------


def test_head_line_bytes_and_parsing_them_back() -> None:
    head = _Head(3, "ab" * 32, "k\u00e9", "0a1b", 5.5)
    raw = _head_line(head)
    assert (
        raw
        == ('{"head":{"hash":"' + "ab" * 32 + '","key_id":"k\u00e9","seq":3,"signature":"0a1b","ts":5.5}}\n').encode()
    )
    assert _parse_head_line(json.loads(raw)) == head


@pytest.mark.parametrize(
    "obj",
    [
        {"head": {"seq": 1, "hash": "h", "key_id": "k", "signature": "00"}, "extra": 1},
        {"head": [1]},
        {"head": "x"},
    ],
    ids=["extra-key", "list", "string"],
)
def test_a_malformed_head_line_is_refused(obj: dict[str, Any]) -> None:
    with pytest.raises(_DecodeError, match=r"^malformed head line$"):
        _parse_head_line(obj)


def test_a_head_line_with_a_bad_field_is_refused() -> None:
    with pytest.raises(_DecodeError, match=r"^seq/hash/key_id hold"):
        _parse_head_line({"head": {"seq": "1", "hash": "h", "key_id": "k", "signature": "00"}})


# --- event lines -------------------------------------------------------------------------------------------------


def test_an_event_line_becomes_its_record() -> None:
    obj = event_obj(4, "cd" * 32, data={"b": [1, {"z": None, "a": "\u00e9"}], "a": 2.5})
    rec = _parse_event_line(obj)
    assert rec == _Record(
        4, 1004.0, "tool", "a", "r", "t", "allow", '{"a":2.5,"b":[1,{"a":"\u00e9","z":null}]}', "cd" * 32, obj["hash"]
    )


def bad_event(message: str, obj: Any) -> None:
    with pytest.raises(_DecodeError) as caught:
        _parse_event_line(obj)
    assert str(caught.value) == message


def test_event_line_keys() -> None:
    obj = event_obj(1, GENESIS_HASH)
    bad_event("unexpected keys ['event', 'extra', 'hash', 'prev_hash']", {**obj, "extra": 1})
    for key in ("event", "hash", "prev_hash"):
        rest = {k: v for k, v in obj.items() if k != key}
        bad_event(f"unexpected keys {sorted(rest)}", rest)


@pytest.mark.parametrize("key", ["agent", "data", "decision", "kind", "run_id", "seq", "tool", "ts"])
def test_each_event_field_is_required(key: str) -> None:
    obj = event_obj(1, GENESIS_HASH)
    obj["event"] = {k: v for k, v in obj["event"].items() if k != key}
    bad_event("the event has missing or unexpected fields", obj)


def test_event_body_shape() -> None:
    obj = event_obj(1, GENESIS_HASH)
    bad_event("the event has missing or unexpected fields", {**obj, "event": {**obj["event"], "x": 1}})
    bad_event("the event has missing or unexpected fields", {**obj, "event": [1]})
    bad_event("the event has missing or unexpected fields", {**obj, "event": "seq"})
    bad_event("data is not a JSON object", {**obj, "event": {**obj["event"], "data": [1]}})
    bad_event("column seq holds '1'", {**obj, "event": {**obj["event"], "seq": "1"}})
    bad_event("column agent holds None", {**obj, "event": {**obj["event"], "agent": None}})


@pytest.mark.parametrize("data", [[1], "text", 3, None], ids=["list", "string", "number", "null"])
def test_event_data_that_is_not_an_object_is_refused_even_with_a_matching_hash(data: Any) -> None:
    obj = event_obj(1, GENESIS_HASH, data=data)  # the hash covers this data: only its type is wrong
    if data is None:
        obj["event"]["data"] = None
        obj["hash"] = digest(GENESIS_HASH, obj["event"])
    bad_event("data is not a JSON object", obj)


@pytest.mark.parametrize("raw", [b'{"x":NaN}', b'{"x":"\\ud800"}'], ids=["nan", "lone-surrogate"])
def test_event_data_without_a_canonical_form_is_refused_with_the_canonical_message(raw: bytes) -> None:
    obj = event_obj(1, GENESIS_HASH)
    obj["event"]["data"] = json.loads(raw)
    with pytest.raises(_DecodeError, match=r"^cannot encode audit value as canonical JSON: "):
        _parse_event_line(obj)


def test_event_hashes_must_be_sha256_hex() -> None:
    obj = event_obj(2, "AB" * 32)  # a hash that matches its (upper-case) prev_hash
    bad_event("hash or prev_hash is not a SHA-256 hex digest", obj)
    obj = event_obj(2, "ab" * 31)  # 62 digits
    bad_event("hash or prev_hash is not a SHA-256 hex digest", obj)
    obj = event_obj(2, GENESIS_HASH)
    bad_event("hash or prev_hash is not a SHA-256 hex digest", {**obj, "hash": obj["hash"].upper()})
    bad_event("hash or prev_hash is not a SHA-256 hex digest", {**obj, "hash": obj["hash"][:-1]})
    bad_event("column hash holds 5", {**obj, "hash": 5})
    bad_event("column prev_hash holds None", {**obj, "prev_hash": None})


def test_event_hash_must_match_the_contents() -> None:
    obj = event_obj(9, GENESIS_HASH)
    bad_event("event 9: hash does not match its contents", {**obj, "event": {**obj["event"], "tool": "u"}})
    bad_event("event 9: hash does not match its contents", {**obj, "hash": "0" * 64})
    bad_event("event 9: hash does not match its contents", {**obj, "prev_hash": "1" * 64})


# --- a zeroed gap ------------------------------------------------------------------------------------------------


def test_the_rest_of_one_unfinished_batch_after_a_gap_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    one, _ = events(4, 6, ts=3.0)
    after = b'garbage\n["head"]\n7\n' + b"".join(map(line, one)) + b'{"no": 1}\n' + line(head_obj(6, "a" * 64))
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.journal"):
        _check_after_gap(P0, 3, after + b"\0\0" + b'{"event":{"ts":3.0')
    assert [r.getMessage() for r in caplog.records] == [
        f"audit journal {P0}, line 3: ignoring the rest of an unfinished write after a zeroed gap"
    ]


@pytest.mark.parametrize(
    "pieces",
    [
        [event_obj(4, GENESIS_HASH, ts=3.0), event_obj(5, GENESIS_HASH, ts=4.0)],
        [event_obj(4, GENESIS_HASH, ts=3.0), {"x": 1}, event_obj(5, GENESIS_HASH, ts=3.5)],
        [head_obj(3, "a" * 64), event_obj(4, GENESIS_HASH, ts=3.0)],
        [event_obj(4, GENESIS_HASH, ts=3.0), head_obj(4, "a" * 64), event_obj(5, GENESIS_HASH, ts=3.0)],
    ],
    ids=["two-batches", "two-batches-with-other-line", "head-then-event", "event-head-event"],
)
def test_acknowledged_events_after_a_gap_are_corruption(pieces: list[dict[str, Any]]) -> None:
    after = b"\0".join(line(p) for p in pieces)
    with pytest.raises(AuditError) as caught:
        _check_after_gap(P1, 12, after)
    assert str(caught.value) == (
        f"audit journal {P1}, line 12: zeroed bytes are followed by acknowledged events; {CORRUPT}"
    )


def test_the_gap_check_reads_ts_of_events_only() -> None:
    after = line(event_obj(4, GENESIS_HASH, ts=3.0)) + line({"event": {"seq": 5}}) + line({"event": {"seq": 6}})
    with pytest.raises(AuditError):
        _check_after_gap(P0, 1, after)  # 3.0 and a missing ts are two batches
    _check_after_gap(P0, 1, line({"event": {"seq": 5}}) + line({"event": {"seq": 6}}))


# --- recovery: the happy paths -----------------------------------------------------------------------------------


def test_empty_and_preallocated_files_recover_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.journal"):
        for files in ([(P0, b""), (P1, b"")], [(P0, bytes(4096)), (P1, bytes(10))]):
            assert _recover_journal(files, SIGNER) == ([], None)
    assert caplog.records == []


def test_one_file_with_events_and_their_head(caplog: pytest.LogCaptureFixture) -> None:
    objs, last = events(1, 3)
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.journal"):
        recovered = _recover_journal([(P0, content(*objs, head_obj(3, last))), (P1, bytes(100))], SIGNER)
    assert caplog.records == []
    assert [r.seq for r in recovered.records] == [1, 2, 3]
    assert recovered.records[2] == _parse_event_line(objs[2])
    assert recovered.head == _Head(3, last, "mine", head_obj(3, last)["head"]["signature"], 7.0)


def test_the_journal_may_begin_after_event_one() -> None:
    objs, _ = events(7, 9, prev="ef" * 32)
    assert seqs([(P0, content(*objs)), (P1, b"")]) == [7, 8, 9]


def test_the_file_with_the_older_events_is_read_first_whichever_it_is() -> None:
    older, mid = events(1, 3)
    newer, _ = events(4, 5, prev=mid)
    sealed = content(*older, head_obj(3, mid))
    active = content(*newer)
    for files in ([(P0, active), (P1, sealed)], [(P0, sealed), (P1, active)]):
        recovered = _recover_journal(files, SIGNER)
        assert [r.seq for r in recovered.records] == [1, 2, 3, 4, 5]
        assert recovered.head is not None and recovered.head.seq == 3


def test_a_file_holding_only_a_head_sorts_after_the_events() -> None:
    objs, last = events(1, 2)
    for files in (
        [(P0, content(head_obj(2, last))), (P1, content(*objs))],
        [(P0, content(*objs)), (P1, content(head_obj(2, last)))],
    ):
        recovered = _recover_journal(files, SIGNER)
        assert [r.seq for r in recovered.records] == [1, 2]
        assert recovered.head is not None and recovered.head.seq == 2


def test_a_file_whose_first_line_is_a_head_sorts_by_its_first_event() -> None:
    first, mid = events(1, 2)
    second, _ = events(3, 4, prev=mid)
    # a head line before the events of its file (as a later head of file 0's events would be)
    files = [(P0, content(head_obj(2, mid), *second)), (P1, content(*first))]
    assert seqs(files) == [1, 2, 3, 4]


def test_a_complete_final_line_without_its_newline_is_kept() -> None:
    objs, _ = events(1, 3)
    raw = content(*objs, zeros=0).rstrip(b"\n")
    assert seqs([(P0, raw + bytes(8)), (P1, b"")]) == [1, 2, 3]
    assert seqs([(P0, raw), (P1, b"")]) == [1, 2, 3]


def test_a_bad_final_line_without_its_newline_is_named_by_its_number() -> None:
    objs, _ = events(1, 3)
    objs[2]["hash"] = "0" * 64
    raw = content(*objs, zeros=0).rstrip(b"\n")
    assert corrupt([(P0, raw), (P1, b"")]) == (
        f"audit journal {P0}, line 3: event 3: hash does not match its contents; {CORRUPT}"
    )


# --- recovery: torn lines ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail", [b'{"event":{"agent":"a","da', b"123", b"[1, 2]", b'"text"'], ids=["cut", "number", "list", "string"]
)
def test_a_torn_final_line_is_ignored_with_a_warning(tail: bytes, caplog: pytest.LogCaptureFixture) -> None:
    objs, _ = events(1, 2)
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.journal"):
        assert seqs([(P0, b""), (P1, content(*objs, zeros=0) + tail + bytes(30))]) == [1, 2]
    assert [r.getMessage() for r in caplog.records] == [
        f"audit journal {P1}, line 3: ignoring a torn final line ({len(tail)} bytes of a write that never completed)"
    ]


def test_a_torn_line_in_the_older_file_is_corruption() -> None:
    older, mid = events(1, 2)
    newer, _ = events(3, 3, prev=mid)
    files = [(P0, content(*newer)), (P1, content(*older, zeros=0) + b'{"event":{"se' + bytes(9))]
    assert corrupt(files) == (f"audit journal {P1}, line 3: damaged line before the end of the journal; {CORRUPT}")


def test_a_torn_head_line_in_the_older_file_is_ignored() -> None:
    older, mid = events(1, 2)
    newer, _ = events(3, 4, prev=mid)
    torn_head = line(head_obj(2, mid))[:40]
    assert torn_head.startswith(b'{"head"')
    recovered = _recover_journal([(P0, content(*older, zeros=0) + torn_head), (P1, content(*newer))], SIGNER)
    assert [r.seq for r in recovered.records] == [1, 2, 3, 4]
    assert recovered.head is None


# --- recovery: damage --------------------------------------------------------------------------------------------


def test_a_line_that_is_not_json_is_corruption() -> None:
    objs, _ = events(1, 2)
    raw = line(objs[0]) + b"{not json\n" + line(objs[1])
    message = corrupt([(P0, b""), (P1, raw)])
    assert message.startswith(f"audit journal {P1}, line 2: not valid JSON (")
    assert message.endswith(f"); {CORRUPT}")


def test_a_line_that_is_not_an_object_is_corruption() -> None:
    objs, _ = events(1, 2)
    raw = line(objs[0]) + b"[1]\n" + line(objs[1])
    assert corrupt([(P0, raw), (P1, b"")]) == (
        f"audit journal {P0}, line 2: not valid JSON (not a JSON object); {CORRUPT}"
    )


def test_a_bad_event_line_is_named_by_file_and_line() -> None:
    objs, _ = events(1, 3)
    objs[1]["event"]["kind"] = "changed"
    assert corrupt([(P0, content(*objs)), (P1, b"")]) == (
        f"audit journal {P0}, line 2: event 2: hash does not match its contents; {CORRUPT}"
    )


def test_a_gap_in_the_sequence_is_corruption() -> None:
    first, mid = events(1, 1)
    later, _ = events(3, 3, prev=mid)
    assert corrupt([(P0, content(*first, *later)), (P1, b"")]) == (
        f"audit journal {P0}, line 2: event 3 follows event 1; {CORRUPT}"
    )
    again, _ = events(1, 1)
    assert corrupt([(P0, content(*first, *again)), (P1, b"")]) == (
        f"audit journal {P0}, line 2: event 1 follows event 1; {CORRUPT}"
    )


def test_a_broken_link_is_corruption() -> None:
    first, _ = events(1, 2)
    other, _ = events(3, 3, prev="9" * 64)
    assert corrupt([(P0, b""), (P1, content(*first, *other))]) == (
        f"audit journal {P1}, line 3: event 3: prev_hash does not match event 2; {CORRUPT}"
    )


def test_a_head_must_name_the_event_before_it() -> None:
    objs, last = events(1, 2)
    message = f"the signed head does not name the event before it; {CORRUPT}"
    assert corrupt([(P0, content(head_obj(0, GENESIS_HASH))), (P1, b"")]) == f"audit journal {P0}, line 1: {message}"
    assert corrupt([(P0, content(*objs, head_obj(1, objs[0]["hash"]))), (P1, b"")]) == (
        f"audit journal {P0}, line 3: {message}"
    )
    assert corrupt([(P0, content(*objs, head_obj(2, objs[0]["hash"]))), (P1, b"")]) == (
        f"audit journal {P0}, line 3: {message}"
    )
    assert corrupt([(P0, content(*objs, head_obj(3, last))), (P1, b"")]) == f"audit journal {P0}, line 3: {message}"


def test_a_malformed_head_line_is_corruption() -> None:
    objs, last = events(1, 1)
    bad = {**head_obj(1, last), "x": 1}
    assert corrupt([(P0, content(*objs, bad)), (P1, b"")]) == (
        f"audit journal {P0}, line 2: malformed head line; {CORRUPT}"
    )


def test_the_last_heads_signature_is_checked() -> None:
    objs, last = events(1, 2)
    forged = head_obj(2, last, OTHER)
    forged["head"]["key_id"] = "mine"
    assert corrupt([(P0, content(*objs[:1], head_obj(1, objs[0]["hash"]), objs[1], forged)), (P1, b"")]) == (
        f"audit journal {P0}, line 4: the signed head has an invalid signature (key mine); {CORRUPT}"
    )
    theirs = head_obj(2, last, OTHER)
    assert corrupt([(P0, content(*objs, theirs)), (P1, b"")]) == (
        f"audit journal {P0}, line 3: the signed head has an invalid signature (key other); {CORRUPT}"
    )


def test_acknowledged_events_after_a_zeroed_gap_are_corruption_named_by_line() -> None:
    objs, mid = events(1, 2)
    beyond, _ = events(3, 4, prev=mid)
    beyond[1]["event"]["ts"] = 99.0
    raw = content(*objs, zeros=16) + content(*beyond)
    assert corrupt([(P0, b""), (P1, raw)]) == (
        f"audit journal {P1}, line 3: zeroed bytes are followed by acknowledged events; {CORRUPT}"
    )


def test_one_batch_cut_by_a_zeroed_gap_is_ignored_and_the_rest_recovered(caplog: pytest.LogCaptureFixture) -> None:
    objs, mid = events(1, 2)
    beyond, _ = events(3, 4, prev=mid, ts=50.0)
    with caplog.at_level(logging.WARNING, logger="stitchwork.audit.journal"):
        assert seqs([(P0, content(*objs, zeros=16) + content(*beyond)), (P1, b"")]) == [1, 2]
    assert [r.getMessage() for r in caplog.records] == [
        f"audit journal {P0}, line 3: ignoring the rest of an unfinished write after a zeroed gap"
    ]
