"""``memory://``: the in-process bus. A real adapter with the same semantics as JetStream, without durability.

``memory://`` is a fresh bus; ``memory://name`` is shared by every :func:`open_bus` call with that name in this
process (until the last one is closed). Use it for tests and for a platform that runs in one process. All users of
one bus must share one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stitchwork.errors import BusConflict, BusError
from stitchwork.messaging._base import (
    EXPECTED_LAST_SUBJECT_SEQ,
    Bus,
    Consumer,
    Delivery,
    check_subject,
    subject_matches,
)


@dataclass(frozen=True)
class _Stored:
    subject: str
    data: bytes
    headers: Mapping[str, str]
    seq: int
    removed: bool = False
    """Dropped by a per-subject limit: the sequence number stays taken, the message is gone."""


@dataclass
class _Stream:
    messages: list[_Stored] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    waiters: set[asyncio.Event] = field(default_factory=set)
    keep: int = 0
    """Messages kept per subject (0: all)."""
    kept: dict[str, deque[int]] = field(default_factory=dict)

    def trim(self, subject: str, seq: int) -> None:
        """Records ``seq`` for ``subject`` and drops what falls beyond the per-subject limit."""
        if not self.keep:
            return
        seqs = self.kept.setdefault(subject, deque())
        seqs.append(seq)
        while len(seqs) > self.keep:
            old = seqs.popleft()
            stored = self.messages[old - 1]
            self.messages[old - 1] = _Stored(stored.subject, b"", {}, old, removed=True)

    def notify(self) -> None:
        for event in self.waiters:
            event.set()

    async def wait(self, timeout: float | None) -> None:
        event = asyncio.Event()
        self.waiters.add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.waiters.discard(event)


@dataclass
class _Group:
    pattern: str
    ack_wait_s: float
    max_deliver: int
    next_index: int = 0
    pending: dict[int, float] = field(default_factory=dict)
    """seq → redelivery deadline of a delivered, unsettled message."""
    due: dict[int, float] = field(default_factory=dict)
    """seq → when a nak'd message may be delivered again."""
    attempts: dict[int, int] = field(default_factory=dict)

    def take(self, stream: _Stream, now: float) -> tuple[int, int] | None:
        for table in (self.pending, self.due):
            for seq, when in sorted(table.items(), key=lambda kv: kv[1]):
                if when > now:
                    break
                del table[seq]
                if self.max_deliver and self.attempts[seq] >= self.max_deliver:
                    self.attempts.pop(seq, None)
                    continue
                return self._hand_out(seq, now)
        while self.next_index < len(stream.messages):
            stored = stream.messages[self.next_index]
            self.next_index += 1
            if not stored.removed and subject_matches(self.pattern, stored.subject):
                return self._hand_out(stored.seq, now)
        return None

    def _hand_out(self, seq: int, now: float) -> tuple[int, int]:
        attempt = self.attempts.get(seq, 0) + 1
        self.attempts[seq] = attempt
        self.pending[seq] = now + self.ack_wait_s
        return seq, attempt

    def wait_s(self, now: float) -> float | None:
        times = [*self.pending.values(), *self.due.values()]
        return max(0.0, min(times) - now) if times else None

    def settle(self, seq: int, verb: str, delay_s: float, now: float) -> None:
        if seq not in self.pending:
            return  # already redelivered elsewhere or settled
        if verb == "progress":
            self.pending[seq] = now + self.ack_wait_s
            return
        del self.pending[seq]
        if verb == "nak":
            self.due[seq] = now + delay_s
        else:
            self.attempts.pop(seq, None)


class _MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, stream: _Stream, pattern: str, group: _Group | None, start_seq: int,
                 max_in_flight: int) -> None:
        super().__init__(max_in_flight)
        self.bus = bus
        self.stream = stream
        self.pattern = pattern
        self.group = group
        self.index = max(start_seq, 1) - 1

    async def _next(self) -> Delivery:
        while not self.closed and not self.bus.closed:
            now = time.monotonic()
            if self.group is None:
                while self.index < len(self.stream.messages):
                    stored = self.stream.messages[self.index]
                    self.index += 1
                    if not stored.removed and subject_matches(self.pattern, stored.subject):
                        return Delivery(stored.subject, stored.data, stored.seq, 1, dict(stored.headers), settled=True)
                await self.stream.wait(None)
                continue
            taken = self.group.take(self.stream, now)
            if taken is not None:
                seq, attempt = taken
                stored = self.stream.messages[seq - 1]
                group = self.group

                async def settle(verb: str, delay_s: float, seq: int = seq, group: _Group = group) -> None:
                    group.settle(seq, verb, delay_s, time.monotonic())
                    if verb == "nak":
                        self.stream.notify()

                return Delivery(stored.subject, stored.data, seq, attempt, dict(stored.headers), settle)
            await self.stream.wait(self.group.wait_s(now))
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await super().aclose()
        self.stream.notify()


_SHARED: dict[str, tuple[MemoryBus, int]] = {}


class MemoryBus(Bus):
    """Streams, groups and sequence numbers in this process's memory."""

    def __init__(self, uri: str = "memory://") -> None:
        self.uri = uri
        self.name = urlsplit(uri).netloc
        self.streams: dict[str, _Stream] = {}
        self.groups: dict[tuple[str, str], _Group] = {}
        self.closed = False

    @classmethod
    async def connect(cls, uri: str, **options: Any) -> MemoryBus:
        """Returns a fresh bus, or the shared bus named in the URI."""
        if options:
            raise BusError(f"memory:// takes no options, got {', '.join(sorted(options))}")
        name = urlsplit(uri).netloc
        if not name:
            return cls(uri)
        bus, users = _SHARED.get(name, (None, 0))
        if bus is None:
            bus = cls(uri)
        _SHARED[name] = (bus, users + 1)
        return bus

    def _stream(self, name: str) -> _Stream:
        return self.streams.setdefault(name, _Stream())

    def _check_open(self) -> None:
        if self.closed:
            raise BusError(f"the bus {self.uri} is closed")

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None, msg_id: str = ""
    ) -> int:
        self._check_open()
        stream = self._stream(check_subject(subject))
        if msg_id and msg_id in stream.ids:
            return stream.ids[msg_id]
        expected = (headers or {}).get(EXPECTED_LAST_SUBJECT_SEQ)
        if expected is not None and int(expected) != stream.last.get(subject, 0):
            raise BusConflict(f"publish to {subject}: wrong last sequence {stream.last.get(subject, 0)} "
                              f"(expected {expected})")
        seq = len(stream.messages) + 1
        stream.messages.append(_Stored(subject, bytes(data), dict(headers or {}), seq))
        stream.last[subject] = seq
        if msg_id:
            stream.ids[msg_id] = seq
        stream.trim(subject, seq)
        stream.notify()
        return seq

    def consume(
        self, subject: str, *, group: str = "", start_seq: int = 1, max_in_flight: int = 64,
        ack_wait_s: float = 30.0, max_deliver: int = 0,
    ) -> Consumer:
        self._check_open()
        name = check_subject(subject, wildcards=True)
        chosen: _Group | None = None
        if group:
            key = (name, group)
            chosen = self.groups.get(key)
            if chosen is None:
                chosen = self.groups[key] = _Group(subject, ack_wait_s, max_deliver)
            elif chosen.pattern != subject:
                raise BusError(f"group {group!r} of stream {name!r} consumes {chosen.pattern!r}, not {subject!r}")
        return _MemoryConsumer(self, self._stream(name), subject, chosen, start_seq, max_in_flight)

    async def last(self, subject: str) -> Delivery | None:
        self._check_open()
        stream = self._stream(check_subject(subject))
        seq = stream.last.get(subject)
        if seq is None:
            return None
        stored = stream.messages[seq - 1]
        return Delivery(stored.subject, stored.data, seq, 1, dict(stored.headers), settled=True)

    async def keep_last(self, subject: str, per_subject: int) -> None:
        self._check_open()
        if per_subject < 1:
            raise BusError(f"keep_last needs at least one message per subject, got {per_subject}")
        stream = self._stream(check_subject(subject, wildcards=True))
        stream.keep = per_subject
        for name, seq in sorted(stream.last.items(), key=lambda kv: kv[1]):
            older = [m.seq for m in stream.messages if m.subject == name and not m.removed and m.seq != seq]
            stream.kept[name] = deque(older)
            stream.trim(name, seq)

    async def latest(self, pattern: str) -> list[Delivery]:
        self._check_open()
        stream = self._stream(check_subject(pattern, wildcards=True))
        found = []
        for subject, seq in sorted(stream.last.items()):
            if subject_matches(pattern, subject):
                stored = stream.messages[seq - 1]
                found.append(Delivery(stored.subject, stored.data, seq, 1, dict(stored.headers), settled=True))
        return found

    async def aclose(self) -> None:
        if self.name and self.name in _SHARED:
            bus, users = _SHARED[self.name]
            if users > 1:
                _SHARED[self.name] = (bus, users - 1)
                return
            del _SHARED[self.name]
        self.closed = True
        for stream in self.streams.values():
            stream.notify()
