"""``memory://``: the in-process bus. A real adapter with the same semantics as JetStream, without durability.

``memory://`` is a fresh bus; ``memory://name`` is shared by every :func:`open_bus` call with that name in this
process (until the last one is closed). Use it for tests and for a platform that runs in one process. All users of
one bus must share one event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stitchwork.errors import BusConflict, BusError, BusFull
from stitchwork.messaging._base import (
    EXPECTED_LAST_SUBJECT_SEQ,
    MESSAGE_TTL,
    RETENTION_FIXED,
    Bus,
    Consumer,
    Delivery,
    StreamLimits,
    check_subject,
    parse_ttl,
    subject_matches,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stored:
    subject: str
    data: bytes
    headers: Mapping[str, str]
    seq: int
    at: float = 0.0
    """When it was stored (the bus's clock)."""
    msg_id: str = ""

    @property
    def size(self) -> int:
        return len(self.data) + len(self.subject)


@dataclass
class _Stream:
    messages: dict[int, _Stored] = field(default_factory=dict)
    """seq → message, oldest first; a removed message leaves its sequence number taken."""
    next_seq: int = 1
    size: int = 0
    ids: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    waiters: set[asyncio.Event] = field(default_factory=set)
    keep: int = 0
    """Messages kept per subject (0: all)."""
    kept: dict[str, deque[int]] = field(default_factory=dict)
    limits: StreamLimits = field(default_factory=StreamLimits)
    ttls: list[tuple[float, int]] = field(default_factory=list)
    """A heap of (removal time, seq) of messages published with a TTL."""

    def stored(self, seq: int) -> _Stored | None:
        return self.messages.get(seq)

    def remove(self, seq: int) -> None:
        stored = self.messages.pop(seq, None)
        if stored is None:
            return
        self.size -= stored.size
        kept = self.kept.get(stored.subject)
        if kept is not None and seq in kept:
            kept.remove(seq)
        if self.last.get(stored.subject) == seq:  # the subject's newest is now the one before, if any
            previous = next((m.seq for m in reversed(self.messages.values()) if m.subject == stored.subject), 0)
            if previous:
                self.last[stored.subject] = previous
            else:
                del self.last[stored.subject]
                self.kept.pop(stored.subject, None)
        if stored.msg_id and self.ids.get(stored.msg_id) == seq:
            del self.ids[stored.msg_id]

    def trim(self, subject: str, seq: int) -> None:
        """Records ``seq`` for ``subject`` and drops what falls beyond the per-subject limit."""
        if not self.keep:
            return
        seqs = self.kept.setdefault(subject, deque())
        seqs.append(seq)
        while len(seqs) > self.keep:
            self.remove(seqs.popleft())

    def at_subject_limit(self, subject: str) -> bool:
        return bool(self.keep) and len(self.kept.get(subject, ())) >= self.keep

    def full(self, adding: int) -> bool:
        limits = self.limits
        return bool((limits.max_msgs and len(self.messages) + 1 > limits.max_msgs)
                    or (limits.max_bytes and self.size + adding > limits.max_bytes))

    def expire(self, now: float) -> None:
        """Removes messages past the stream's age limit or their own TTL."""
        while self.ttls and self.ttls[0][0] <= now:
            self.remove(heapq.heappop(self.ttls)[1])
        if self.limits.max_age_s:
            while self.messages:
                oldest = next(iter(self.messages.values()))
                if now - oldest.at < self.limits.max_age_s:
                    break
                self.remove(oldest.seq)

    def shrink(self) -> None:
        """Drops the oldest messages until the stream is within ``max_msgs``/``max_bytes`` (discard old)."""
        limits = self.limits
        while self.messages and ((limits.max_msgs and len(self.messages) > limits.max_msgs)
                                 or (limits.max_bytes and self.size > limits.max_bytes)):
            self.remove(next(iter(self.messages)))

    def after(self, index: int) -> _Stored | None:
        """The first message with a sequence number above ``index``."""
        if not self.messages:
            return None
        first = next(iter(self.messages))
        for seq in range(max(index + 1, first), self.next_seq):
            stored = self.messages.get(seq)
            if stored is not None:
                return stored
        return None

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
                if seq not in stream.messages:  # removed meanwhile (a limit, an age): nothing to redeliver
                    self.attempts.pop(seq, None)
                    continue
                if self.max_deliver and self.attempts[seq] >= self.max_deliver:
                    self.attempts.pop(seq, None)
                    continue
                return self._hand_out(seq, now)
        while (stored := stream.after(self.next_index)) is not None:
            self.next_index = stored.seq
            if subject_matches(self.pattern, stored.subject):
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

    def settle(self, stream: _Stream, seq: int, verb: str, delay_s: float, now: float) -> None:
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
            if stream.limits.work_queue:  # done with: a work queue keeps only what is still to do
                stream.remove(seq)


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
            self.stream.expire(self.bus.clock())
            now = time.monotonic()
            if self.group is None:
                while (stored := self.stream.after(self.index)) is not None:
                    self.index = stored.seq
                    if subject_matches(self.pattern, stored.subject):
                        return Delivery(stored.subject, stored.data, stored.seq, 1, dict(stored.headers), settled=True)
                await self.stream.wait(None)
                continue
            taken = self.group.take(self.stream, now)
            if taken is not None:
                seq, attempt = taken
                stored = self.stream.messages[seq]
                group = self.group

                async def settle(verb: str, delay_s: float, seq: int = seq, group: _Group = group,
                                 stream: _Stream = self.stream) -> None:
                    group.settle(stream, seq, verb, delay_s, time.monotonic())
                    if verb == "nak":
                        stream.notify()

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
        self.clock: Callable[[], float] = time.monotonic
        """The time source of ages and TTLs (tests move it)."""

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
        now = self.clock()
        stream.expire(now)  # what aged out is gone before de-duplication and compare-and-set look
        if msg_id and msg_id in stream.ids:
            return stream.ids[msg_id]
        expected = (headers or {}).get(EXPECTED_LAST_SUBJECT_SEQ)
        if expected is not None and int(expected) != stream.last.get(subject, 0):
            raise BusConflict(f"publish to {subject}: wrong last sequence {stream.last.get(subject, 0)} "
                              f"(expected {expected})")
        ttl = parse_ttl(headers[MESSAGE_TTL]) if headers and MESSAGE_TTL in headers else 0.0
        stored = _Stored(subject, bytes(data), dict(headers or {}), stream.next_seq, now, msg_id)
        if stream.limits.discard_new and stream.full(stored.size) and not stream.at_subject_limit(subject):
            limits = stream.limits
            raise BusFull(f"publish to {subject}: stream {subject.split('.')[0]} is full "
                          f"({len(stream.messages)} messages, {stream.size} bytes; limits max_msgs="
                          f"{limits.max_msgs or 'none'}, max_bytes={limits.max_bytes or 'none'}); it keeps "
                          "unfinished messages, so nothing old is dropped")
        seq = stream.next_seq
        stream.next_seq += 1
        stream.messages[seq] = stored
        stream.size += stored.size
        stream.last[subject] = seq
        if msg_id:
            stream.ids[msg_id] = seq
        if ttl:
            heapq.heappush(stream.ttls, (now + ttl, seq))
        stream.trim(subject, seq)
        if not stream.limits.discard_new:
            stream.shrink()
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
        stream.expire(self.clock())
        seq = stream.last.get(subject)
        if seq is None:
            return None
        stored = stream.messages[seq]
        return Delivery(stored.subject, stored.data, seq, 1, dict(stored.headers), settled=True)

    async def keep_last(self, subject: str, per_subject: int) -> None:
        self._check_open()
        if per_subject < 1:
            raise BusError(f"keep_last needs at least one message per subject, got {per_subject}")
        stream = self._stream(check_subject(subject, wildcards=True))
        stream.keep = per_subject
        for name, seq in sorted(stream.last.items(), key=lambda kv: kv[1]):
            older = [m.seq for m in stream.messages.values() if m.subject == name and m.seq != seq]
            stream.kept[name] = deque(older)
            stream.trim(name, seq)

    async def purge(self, subject: str, *, keep: int = 0) -> None:
        self._check_open()
        if keep < 0:
            raise BusError(f"purge keeps a number of messages >= 0, got {keep}")
        stream = self._stream(check_subject(subject))
        mine = [m.seq for m in stream.messages.values() if m.subject == subject]
        for seq in mine[: max(0, len(mine) - keep)]:
            stream.remove(seq)

    async def limit(self, subject: str, limits: StreamLimits) -> None:
        self._check_open()
        name = check_subject(subject, wildcards=True)
        stream = self._stream(name)
        if limits.work_queue != stream.limits.work_queue and stream.next_seq > 1:
            log.warning(RETENTION_FIXED, name, "work-queue" if stream.limits.work_queue else "limits")
            limits = dataclasses.replace(limits, work_queue=stream.limits.work_queue)
        stream.limits = limits
        stream.expire(self.clock())
        if not limits.discard_new:
            stream.shrink()

    async def latest(self, pattern: str) -> list[Delivery]:
        self._check_open()
        stream = self._stream(check_subject(pattern, wildcards=True))
        stream.expire(self.clock())
        found = []
        for subject, seq in sorted(stream.last.items()):
            if subject_matches(pattern, subject):
                stored = stream.messages[seq]
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
