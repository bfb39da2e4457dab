"""The audit log's write-ahead journal: file I/O, and recovery of what it holds after a crash.

The journal is two files, ``journal_path`` and ``journal_path + ".1"``, used in turn. Each batch is written to the
active file (one JSON line per event) with a single ``pwrite`` and one ``fdatasync``. A copy into the store seals
the active file (the writer carries on in the other, empty, one), appends the signed head of the batch to the
sealed file as a ``{"head": ...}`` line, and empties the sealed file once the store holds its events. Emptied files
are refilled with zeros, so batches overwrite allocated blocks and ``fdatasync`` has no file-size change to commit.

On open, both files are parsed and checked as one stream (:func:`_recover_journal`). A damaged final line (a write
cut short by a crash) is ignored with a warning; damage anywhere else raises :class:`AuditError` naming the file
and line, and the journal is left as it is.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

from stitchwork._files import fsync_dir
from stitchwork.audit.canonical import _ENCODER, _is_hash, canonical
from stitchwork.audit.records import (
    Signer,
    _decode_head,
    _decode_row,
    _DecodeError,
    _Head,
    _head_message,
    _Record,
    _record_hash,
)
from stitchwork.errors import AuditError

__all__ = ["JOURNAL_PREALLOC", "JOURNAL_PREALLOC_MAX", "prealloc_for"]

log = logging.getLogger(__name__)

#: Bytes of zeros each journal file is refilled with when it is emptied. Batches overwrite these allocated
#: blocks, so ``fdatasync`` need not also commit a new file size, as appending does (measured under load:
#: p99 0.5 ms instead of 3 ms). A batch that does not fit simply extends the file.
JOURNAL_PREALLOC = 256 * 1024
#: The most zeros a file is refilled with: a busier log sizes its files to twice what the last copy held (so a copy
#: interval's batches fit), up to this.
JOURNAL_PREALLOC_MAX = 8 * 1024 * 1024


def prealloc_for(used: int) -> int:
    """How many zeros to refill a file with, given that it held ``used`` bytes between two copies."""
    return min(max(JOURNAL_PREALLOC, 2 * used), JOURNAL_PREALLOC_MAX)


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


def _open_journal(paths: list[Path]) -> list[int]:
    """Opens both journal files (created with mode 0600) and locks the first, so one audit log uses them.

    Returns:
        The file descriptors, in the order of ``paths``.

    Raises:
        AuditError: another audit log holds the lock.
        OSError: the directory or a file cannot be created or opened.
    """
    directory = paths[0].parent
    directory.mkdir(parents=True, exist_ok=True)
    created = False
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW  # no O_APPEND: batches are pwritten
    fds: list[int] = []
    try:
        for path in paths:
            created = created or not path.exists()
            fd = os.open(path, flags, 0o600)
            fds.append(fd)
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        try:
            fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise AuditError(
                f"the audit journal {paths[0]} is in use by another audit log (another process, or "
                "an AuditLog in this process that was not closed)"
            ) from exc
        if created:
            fsync_dir(directory)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _reset_journal_file(fd: int, size: int = JOURNAL_PREALLOC) -> None:
    """Empties a journal file once the store holds all its events.

    The file is truncated, then refilled with ``size`` zeros for the writer to overwrite.
    A crash in between leaves either the old, complete content (already in the store, so skipped on
    recovery) or zeros: never old lines behind a zeroed gap.
    """
    os.ftruncate(fd, 0)
    _write_at(fd, bytes(size), 0)
    os.fdatasync(fd)


def _head_line(head: _Head) -> bytes:
    """The journal line of a signed head (written after the events it covers)."""
    return (_ENCODER.encode({"head": head._asdict()}) + "\n").encode("utf-8")


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
