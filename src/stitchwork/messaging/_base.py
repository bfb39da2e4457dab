"""Bus port: durable subjects, shared work queues with explicit acks, replay by sequence number.

A bus keeps every published message in a *stream* chosen by the subject's first token (``runs.queue`` and
``runs.state.run_1`` live in stream ``runs``), numbered from 1 in publish order. Three operations:

* :meth:`Bus.publish`: append a message; returns its sequence number once it is durable. ``msg_id`` makes a
  retried publish a no-op (the first sequence number is returned again).
* :meth:`Bus.consume`: with ``group``, a shared work queue: every message matching the subject goes to exactly
  one consumer of the group, which must :meth:`~Delivery.ack` it; an unacknowledged message (the consumer died,
  or ``ack_wait_s`` passed without :meth:`~Delivery.progress`) is delivered again, ``max_in_flight`` bounds
  how many unacknowledged messages one consumer holds (backpressure). Without ``group``, an ordered replay from
  ``start_seq`` that then follows new messages (no acks).
* :meth:`Bus.last`: the newest message on one exact subject (subjects as keys: checkpoints, idempotency records).
  :meth:`Bus.purge` removes a subject's older messages (a finished run's checkpoints but its last).

Bounds (:meth:`Bus.limit`, :class:`StreamLimits`): a stream keeps messages up to an age, a size and a count; a
*work-queue* stream drops a message once its group acknowledges it, and a stream marked ``discard_new`` refuses
a new message at its limit (:class:`~stitchwork.errors.BusFull`) instead of dropping an old one, so a limit never
removes something unfinished. A message published with the :data:`MESSAGE_TTL` header is removed that long after
it was stored (a finished record: a decided approval, a completed call's outcome).

Adapters (chosen by URI, :func:`open_bus`): ``memory://`` (in-process, the test double and single-process
default) and ``nats://host:port[,host:port...]`` (NATS JetStream). ``kafka://`` is an export sink, not a bus:
see :mod:`stitchwork.messaging.kafka`.
"""

from __future__ import annotations

import asyncio
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stitchwork._registry import Registry
from stitchwork.errors import BusError

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
"""Publish header for compare-and-set: store the message only if the newest one on its subject has this sequence
number (``0``: no message yet); otherwise :meth:`Bus.publish` raises :class:`~stitchwork.errors.BusConflict`."""

MESSAGE_TTL = "Nats-TTL"
"""Publish header: the message is removed this long after it was stored, whatever its stream's limits
(``"3600s"``: whole seconds, at least 1; see :func:`ttl_header`)."""


def ttl_header(seconds: float) -> dict[str, str]:
    """The :data:`MESSAGE_TTL` header for ``seconds`` (rounded up to whole seconds); empty for 0 (keep)."""
    if seconds <= 0:
        return {}
    return {MESSAGE_TTL: f"{max(1, math.ceil(seconds))}s"}


def parse_ttl(value: str) -> float:
    """Seconds in a :data:`MESSAGE_TTL` value (``"90s"``, ``"90"``); raises :class:`BusError` on anything else."""
    text = value.strip().lower()
    number = text[:-1] if text.endswith("s") else text
    try:
        seconds = float(number)
    except ValueError:
        raise BusError(f"{MESSAGE_TTL} must be whole seconds like '3600s', got {value!r}") from None
    if not seconds >= 1 or seconds != int(seconds):
        raise BusError(f"{MESSAGE_TTL} must be whole seconds, at least 1, got {value!r}")
    return seconds


@dataclass(frozen=True)
class StreamLimits:
    """How much one stream keeps (every bound 0: no limit).

    Attributes:
        max_age_s: messages older than this are removed.
        max_bytes: the payloads (and subjects) of the stream's messages together.
        max_msgs: messages in the stream.
        work_queue: a message is removed once the group consuming it acknowledges (or terminates) it; an
            unacknowledged one stays. One group per subject; no replays of the stream.
        discard_new: at ``max_bytes``/``max_msgs`` a new message is refused with
            :class:`~stitchwork.errors.BusFull` (a message that replaces its subject's only kept one, see
            :meth:`Bus.keep_last`, is still taken) instead of the oldest being dropped. Cannot be combined with
            ``max_age_s``: an age limit would drop unfinished messages (give finished ones a :data:`MESSAGE_TTL`).
    """

    max_age_s: float = 0.0
    max_bytes: int = 0
    max_msgs: int = 0
    work_queue: bool = False
    discard_new: bool = False

    def __post_init__(self) -> None:
        for name in ("max_age_s", "max_bytes", "max_msgs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise BusError(f"stream limit {name} must be a number >= 0 (0: no limit), got {value!r}")
        if self.max_age_s and (self.discard_new or self.work_queue):
            raise BusError("a stream that keeps unfinished messages (work_queue or discard_new) takes no max_age_s: "
                           "it would drop them; give finished messages a TTL instead")


RETENTION_FIXED = ("stream %s keeps its %s retention: a stream's retention is chosen when it is created (an existing "
                   "stream cannot become or stop being a work queue); other limits were applied")
"""Logged by :meth:`Bus.limit` when it cannot change an existing stream's retention."""

Settle = Callable[[str, float], Awaitable[None]]
"""Called with ``ack``/``nak``/``term``/``progress`` and a delay in seconds (for ``nak``)."""


def check_subject(subject: str, *, wildcards: bool = False) -> str:
    """Validates a subject (``a.b.c``, at least two tokens); returns its stream (the first token).

    Raises:
        BusError: a subject with empty or invalid tokens, or wildcards where they are not allowed.
    """
    if not isinstance(subject, str) or not subject:
        raise BusError("a subject must be a non-empty string")
    tokens = subject.split(".")
    if len(tokens) < 2:
        raise BusError(f"subject {subject!r} needs at least two tokens (stream.name)")
    for index, token in enumerate(tokens):
        if wildcards and (token == "*" or (token == ">" and index == len(tokens) - 1)) and index > 0:
            continue
        if not _TOKEN.match(token):
            raise BusError(f"subject {subject!r}: token {token!r} may hold only letters, digits, '_' and '-'"
                           + ("" if wildcards else " (no wildcards here)"))
    return tokens[0]


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` is one or more tokens."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or token not in ("*", have[index]):
            return False
    return len(have) == len(want)


@dataclass
class Delivery:
    """One message handed to a consumer.

    Attributes:
        subject: the subject it was published on.
        data: the payload.
        seq: its sequence number in its stream (the same on every redelivery).
        attempt: 1 on the first delivery, 2 on the next, ...
        headers: string headers given at publish.
    """

    subject: str
    data: bytes
    seq: int
    attempt: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)
    _settle: Settle | None = field(default=None, repr=False)
    _on_done: Callable[[], None] | None = field(default=None, repr=False)
    settled: bool = False

    async def ack(self) -> None:
        """Done: the message is not delivered again."""
        await self._finish("ack", 0.0)

    async def nak(self, delay_s: float = 0.0) -> None:
        """Not done: deliver it again (to any consumer of the group) after ``delay_s``."""
        await self._finish("nak", delay_s)

    async def term(self) -> None:
        """Give up: never deliver it again (the caller has dead-lettered it)."""
        await self._finish("term", 0.0)

    async def progress(self) -> None:
        """Still working: restarts the ``ack_wait_s`` clock."""
        if not self.settled and self._settle is not None:
            await self._settle("progress", 0.0)

    def abandon(self) -> None:
        """Stops holding it (frees the consumer's slot) without telling the bus: whoever owns it now settles it."""
        if not self.settled:
            self.settled = True
            if self._on_done is not None:
                self._on_done()

    async def _finish(self, verb: str, delay_s: float) -> None:
        if self.settled:
            return
        self.settled = True
        try:
            if self._settle is not None:
                await self._settle(verb, delay_s)
        finally:
            if self._on_done is not None:
                self._on_done()


class Consumer(ABC):
    """An async iterator of deliveries; holds at most ``max_in_flight`` unsettled ones."""

    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise BusError("max_in_flight must be at least 1")
        self._slots = asyncio.Semaphore(max_in_flight)
        self.max_in_flight = max_in_flight
        self.unsettled = 0
        self.closed = False

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Delivery:
        if self.closed:
            raise StopAsyncIteration
        await self._slots.acquire()
        try:
            delivery = await self._next()
        except BaseException:
            self._slots.release()
            raise
        if delivery.settled:
            self._slots.release()
        else:
            self.unsettled += 1
            delivery._on_done = self._settled
        return delivery

    def _settled(self) -> None:
        self.unsettled -= 1
        self._slots.release()

    async def next(self, timeout: float) -> Delivery:
        """The next delivery, or :class:`TimeoutError` after ``timeout`` seconds."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    @abstractmethod
    async def _next(self) -> Delivery:
        """Waits for the next message (raises :class:`StopAsyncIteration` once closed)."""

    async def aclose(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Bus(ABC):
    """A durable message bus (see the module docstring)."""

    uri: str

    @abstractmethod
    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None, msg_id: str = ""
    ) -> int:
        """Appends a message; returns its sequence number once the bus has stored it.

        Raises:
            BusError: the bus is unreachable or refused the message.
        """

    @abstractmethod
    def consume(
        self, subject: str, *, group: str = "", start_seq: int = 1, max_in_flight: int = 64,
        ack_wait_s: float = 30.0, max_deliver: int = 0,
    ) -> Consumer:
        """Messages matching ``subject`` (wildcards allowed): a shared work queue with ``group``, else a replay.

        Args:
            subject: subject or pattern within one stream (``runs.queue``, ``events.run_1.>``).
            group: work-queue name; consumers with the same group share the messages, each delivered once
                until acknowledged. Empty: an ordered replay (no acks needed).
            start_seq: replay only: the first sequence number to deliver (later ones follow).
            max_in_flight: unsettled deliveries this consumer may hold.
            ack_wait_s: group only: redeliver a message not settled (nor progressed) within this time.
            max_deliver: group only: stop after this many deliveries of one message (0: no limit).
        """

    @abstractmethod
    async def last(self, subject: str) -> Delivery | None:
        """The newest message published on exactly ``subject``, or ``None``."""

    async def latest(self, pattern: str) -> list[Delivery]:
        """The newest message of every subject matching ``pattern`` (subjects as keys), in subject order.

        Raises:
            BusError: the adapter cannot list subjects, or the bus is unreachable.
        """
        raise BusError(f"{type(self).__name__} cannot list the subjects of {pattern!r}")

    async def keep_last(self, subject: str, per_subject: int) -> None:
        """From now on keeps only the newest ``per_subject`` messages of each subject in ``subject``'s stream.

        For subjects where only the newest message matters (run checkpoints): older ones are dropped as new ones
        arrive, so history does not grow without bound. ``last`` and compare-and-set publishes are unaffected.

        Raises:
            BusError: the adapter cannot limit a stream, or the bus refused the change.
        """
        raise BusError(f"{type(self).__name__} cannot limit the history of {subject!r}")

    async def purge(self, subject: str, *, keep: int = 0) -> None:
        """Removes the messages of exactly ``subject`` except its newest ``keep`` (a finished run's old checkpoints).

        Raises:
            BusError: the adapter cannot purge a subject, or the bus refused.
        """
        raise BusError(f"{type(self).__name__} cannot purge {subject!r}")

    async def limit(self, subject: str, limits: StreamLimits) -> None:
        """Applies ``limits`` to ``subject``'s stream (creating it if needed; an existing stream is updated).

        Raises:
            BusError: the adapter cannot limit a stream, or the bus refused the change.
        """
        raise BusError(f"{type(self).__name__} cannot limit the stream of {subject!r}")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Closes connections."""

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


BUSES = Registry(
    "bus",
    {
        "memory": ("stitchwork.messaging.memory:MemoryBus", None),
        "nats": ("stitchwork.messaging.nats:NatsBus", "nats"),
    },
)


async def open_bus(uri: str, **options: Any) -> Bus:
    """Opens (and connects) the bus named by ``uri``."""
    cls = BUSES.load(uri)
    bus: Bus = await cls.connect(uri, **options)
    return bus
