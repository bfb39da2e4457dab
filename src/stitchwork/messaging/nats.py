"""``nats://host:port[,host:port...][?replicas=N]``: NATS JetStream via ``nats-py``.

Each stream (the subject's first token) is a JetStream file stream ``<token>`` with subjects ``<token>.>``,
created on first use with ``replicas`` copies (1 unless the URI says otherwise; 3 on a three-node cluster).
Groups are durable pull consumers with explicit acks; replays are ordered push consumers from a start sequence.
The client reconnects forever; a publish that gets no acknowledgement (the server restarts, a cluster node dies)
is retried with the same ``Nats-Msg-Id`` until ``publish_timeout_s``, so a retry never stores a message twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RawStreamMsg,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from stitchwork.errors import BusConflict, BusError, BusFull
from stitchwork.messaging._base import RETENTION_FIXED, Bus, Consumer, Delivery, StreamLimits, check_subject

log = logging.getLogger(__name__)

_RETRYABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
              nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
              nats.js.errors.ServiceUnavailableError, nats.js.errors.NoStreamResponseError,
              nats.errors.OutboundBufferLimitError, TimeoutError)
"""What a failover, a restart or a leader election looks like from the client: wait and try again."""

T = TypeVar("T")


_WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a failed ``Nats-Expected-Last-Subject-Sequence`` check."""


_DUPLICATE_WINDOW_S = 120.0
"""How long a ``Nats-Msg-Id`` de-duplicates a retried publish (never longer than a stream's max age)."""

_FULL = frozenset({10077, 10047})
"""JetStream's error codes for a message refused by a full stream (``DiscardPolicy.NEW``: messages, bytes)."""


def _limit_fields(limits: StreamLimits) -> dict[str, Any]:
    window = min(_DUPLICATE_WINDOW_S, limits.max_age_s) if limits.max_age_s else _DUPLICATE_WINDOW_S
    return {"max_age": float(limits.max_age_s), "duplicate_window": window, "max_bytes": limits.max_bytes or -1,
            "max_msgs": limits.max_msgs or -1,
            "discard": DiscardPolicy.NEW if limits.discard_new else DiscardPolicy.OLD}


def _limit_view(config: StreamConfig) -> tuple[Any, ...]:
    return (float(config.max_age or 0), float(config.duplicate_window or 0), config.max_bytes or -1,
            config.max_msgs or -1, config.discard or DiscardPolicy.OLD, bool(config.allow_msg_ttl))


def _durable_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", group)[:200]


def _servers(uri: str) -> tuple[list[str], dict[str, list[str]]]:
    parts = urlsplit(uri)
    hosts = [h for h in parts.netloc.split(",") if h]
    if not hosts:
        raise BusError(f"nats URI {uri!r} names no server (nats://127.0.0.1:4222)")
    return [f"nats://{h}" for h in hosts], parse_qs(parts.query)


class _NatsGroupConsumer(Consumer):
    def __init__(self, bus: NatsBus, subject: str, stream: str, group: str, max_in_flight: int,
                 ack_wait_s: float, max_deliver: int) -> None:
        super().__init__(max_in_flight)
        self.bus, self.subject, self.stream, self.group = bus, subject, stream, _durable_name(group)
        self.config = ConsumerConfig(
            durable_name=self.group, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait_s,
            max_deliver=max_deliver or -1, max_ack_pending=-1,
        )
        self._sub: Any = None
        self._buffer: list[Msg] = []

    async def _subscription(self) -> Any:
        if self._sub is None:
            await self.bus.ensure_stream(self.stream)
            self._sub = await self.bus.js.pull_subscribe(self.subject, durable=self.group, stream=self.stream,
                                                         config=self.config)
        return self._sub

    async def _next(self) -> Delivery:
        while not self.closed:
            if self._buffer:
                return self._delivery(self._buffer.pop(0))
            try:
                sub = await self._subscription()
                batch = max(1, self.max_in_flight - self.unsettled)
                self._buffer.extend(await sub.fetch(batch, timeout=1.0))
            except _RETRYABLE:
                continue
            except nats.js.errors.NotFoundError:
                self._sub = None  # the consumer vanished (server state lost): create it again
                await asyncio.sleep(0.1)
            except nats.errors.Error as exc:
                if self.closed:
                    break
                raise BusError(f"nats consume {self.subject} ({self.group}): {exc}") from exc
        raise StopAsyncIteration

    @staticmethod
    def _delivery(msg: Msg) -> Delivery:
        meta = msg.metadata

        async def settle(verb: str, delay_s: float) -> None:
            try:
                if verb == "ack":
                    await msg.ack_sync(timeout=5)
                elif verb == "nak":
                    await msg.nak(delay=delay_s or None)
                elif verb == "term":
                    await msg.term()
                else:
                    await msg.in_progress()
            except (*_RETRYABLE, nats.errors.MsgAlreadyAckdError) as exc:
                # The server will redeliver an unacknowledged message: at-least-once, never lost.
                if verb == "ack" and not isinstance(exc, nats.errors.MsgAlreadyAckdError):
                    raise BusError(f"ack of {msg.subject} #{meta.sequence.stream} not confirmed: {exc}") from exc

        return Delivery(msg.subject, msg.data, meta.sequence.stream, meta.num_delivered or 1,
                        dict(msg.headers or {}), settle)

    async def aclose(self) -> None:
        await super().aclose()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        # Fetched but never handed out: give them back at once instead of after ack_wait.
        for msg in self._buffer:
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
        self._buffer.clear()


class _NatsReplay(Consumer):
    def __init__(self, bus: NatsBus, subject: str, stream: str, start_seq: int, max_in_flight: int) -> None:
        super().__init__(max_in_flight)
        self.bus, self.subject, self.stream, self.start_seq = bus, subject, stream, max(start_seq, 1)
        self._sub: Any = None
        self._opening: asyncio.Task[Any] | None = None
        """Creating the consumer, shielded: a caller's :meth:`next` timing out does not abort it (on a cluster
        that just lost its meta leader creation can take longer than any one wait), the next call awaits it."""

    async def _open(self) -> Any:
        await self.bus.ensure_stream(self.stream)
        return await self.bus.js.subscribe(
            self.subject, stream=self.stream, ordered_consumer=True, pending_msgs_limit=-1, pending_bytes_limit=-1,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.start_seq),
        )

    async def _subscription(self) -> Any:
        if self._sub is None:
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open())
            opening = self._opening
            try:
                self._sub = await asyncio.shield(opening)
            finally:
                if opening.done():  # failed (the next call starts afresh) or opened
                    self._opening = None
        return self._sub

    async def _next(self) -> Delivery:
        while not self.closed:
            try:
                sub = await self._subscription()
                msg = await sub.next_msg(timeout=1.0)
            except _RETRYABLE:
                continue
            except nats.errors.Error as exc:
                if self.closed:
                    break
                raise BusError(f"nats replay {self.subject}: {exc}") from exc
            seq = msg.metadata.sequence.stream
            return Delivery(msg.subject, msg.data, seq, 1, dict(msg.headers or {}), settled=True)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await super().aclose()
        if self._opening is not None:  # still being created: wait for it, then remove it like an opened one
            with contextlib.suppress(nats.errors.Error, *_RETRYABLE):
                self._sub = await asyncio.wait_for(asyncio.shield(self._opening), 10.0)
            if not self._opening.done():
                self._opening.cancel()
            self._opening = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()


class NatsBus(Bus):
    """JetStream streams per first subject token; see the module docstring."""

    def __init__(self, uri: str, nc: Client, *, replicas: int, publish_timeout_s: float) -> None:
        self.uri = uri
        self.nc = nc
        self.js = nc.jetstream(timeout=5.0)
        self.replicas = replicas
        self.publish_timeout_s = publish_timeout_s
        self._streams: set[str] = set()
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, uri: str, *, name: str = "stitchwork", publish_timeout_s: float = 60.0,
                      connect_timeout_s: float = 5.0) -> NatsBus:
        """Connects to the servers in ``uri``.

        Raises:
            BusError: no server answered within ``connect_timeout_s``.
        """
        servers, query = _servers(uri)
        replicas = int(query.get("replicas", ["1"])[0])

        async def quiet(exc: Exception) -> None:
            return None

        try:
            nc = await nats.connect(
                servers=servers, name=name, connect_timeout=connect_timeout_s, allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=quiet,
                pending_size=64 * 1024 * 1024,
            )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BusError(f"cannot connect to NATS at {', '.join(servers)}: {exc}") from exc
        return cls(uri, nc, replicas=replicas, publish_timeout_s=publish_timeout_s)

    async def ensure_stream(self, name: str) -> None:
        """Creates stream ``name`` (subjects ``name.>``) unless it exists."""
        if name in self._streams:
            return
        async with self._lock:
            if name in self._streams:
                return

            async def create() -> None:
                try:
                    info = await self.js.stream_info(name)
                except nats.js.errors.NotFoundError:
                    await self.js.add_stream(self._new_config(name, StreamLimits()))
                    return
                if not info.config.allow_msg_ttl:  # a stream from before TTLs: finished records carry one now
                    await self.js.update_stream(dataclasses.replace(info.config, allow_msg_ttl=True))

            await self._retrying(create, waiting=f"stream {name}", refused=f"cannot create stream {name}", pause_s=0.2)
            self._streams.add(name)

    def _new_config(self, name: str, limits: StreamLimits) -> StreamConfig:
        return StreamConfig(
            name=name, subjects=[f"{name}.>"], storage=StorageType.FILE, num_replicas=self.replicas,
            allow_msg_ttl=True,
            retention=RetentionPolicy.WORK_QUEUE if limits.work_queue else RetentionPolicy.LIMITS,
            **_limit_fields(limits),
        )

    async def limit(self, subject: str, limits: StreamLimits) -> None:
        name = check_subject(subject, wildcards=True)

        async def apply() -> None:
            try:
                info = await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(self._new_config(name, limits))
                return
            config = info.config
            work_queue = config.retention == RetentionPolicy.WORK_QUEUE
            if work_queue != limits.work_queue:
                log.warning(RETENTION_FIXED, name, "work-queue" if work_queue else "limits")
            wanted = dataclasses.replace(config, allow_msg_ttl=True, **_limit_fields(limits))
            if _limit_view(wanted) != _limit_view(config):
                await self.js.update_stream(wanted)

        await self._retrying(apply, waiting=f"stream {name}", refused=f"cannot limit stream {name}", pause_s=0.2)
        self._streams.add(name)

    async def _retrying(self, op: Callable[[], Awaitable[T]], *, waiting: str, refused: str, pause_s: float) -> T:
        """Runs ``op`` until NATS answers (through failovers and restarts, up to ``publish_timeout_s``).

        Raises:
            BusError: ``"<waiting>: no answer from NATS"`` after the timeout; ``"<refused>: <error>"`` when NATS
                answered with an error.
        """
        deadline = time.monotonic() + self.publish_timeout_s
        while True:
            try:
                return await op()
            except _RETRYABLE as exc:
                if time.monotonic() > deadline:
                    raise BusError(f"{waiting}: no answer from NATS: {exc!r}") from exc
                await asyncio.sleep(pause_s)
            except nats.errors.Error as exc:
                raise BusError(f"{refused}: {exc}") from exc

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None, msg_id: str = ""
    ) -> int:
        stream = check_subject(subject)
        await self.ensure_stream(stream)
        sent = dict(headers or {})
        if msg_id:
            sent["Nats-Msg-Id"] = msg_id
        deadline = time.monotonic() + self.publish_timeout_s
        while True:
            try:
                ack = await self.js.publish(subject, data, headers=sent or None, stream=stream, timeout=2.0)
                return int(ack.seq)
            except nats.js.errors.APIError as exc:
                if exc.err_code in _FULL:
                    raise BusFull(f"publish to {subject}: stream {stream} is full ({exc.description}); it keeps "
                                  "unfinished messages, so nothing old is dropped") from exc
                if isinstance(exc, _RETRYABLE):
                    if not msg_id:
                        sent["Nats-Msg-Id"] = msg_id = f"sw-{time.time_ns()}-{id(data)}"
                    if time.monotonic() > deadline:
                        raise BusError(f"publish to {subject}: no acknowledgement from NATS: {exc!r}") from exc
                    await asyncio.sleep(0.1)
                    continue
                if exc.err_code == _WRONG_LAST_SEQUENCE:
                    # A retried compare-and-set whose first attempt was stored looks like a lost race: check.
                    mine = await self.last(subject) if msg_id else None
                    if mine is not None and mine.headers.get("Nats-Msg-Id") == msg_id:
                        return mine.seq
                    raise BusConflict(f"publish to {subject}: {exc.description}") from exc
                raise BusError(f"publish to {subject} refused: {exc}") from exc
            except _RETRYABLE as exc:
                if not msg_id:  # a retry is safe only when the server can drop the duplicate
                    sent["Nats-Msg-Id"] = msg_id = f"sw-{time.time_ns()}-{id(data)}"
                if time.monotonic() > deadline:
                    raise BusError(f"publish to {subject}: no acknowledgement from NATS: {exc!r}") from exc
                await asyncio.sleep(0.1)
            except nats.errors.Error as exc:
                raise BusError(f"publish to {subject} refused: {exc}") from exc

    def consume(
        self, subject: str, *, group: str = "", start_seq: int = 1, max_in_flight: int = 64,
        ack_wait_s: float = 30.0, max_deliver: int = 0,
    ) -> Consumer:
        stream = check_subject(subject, wildcards=True)
        if group:
            return _NatsGroupConsumer(self, subject, stream, group, max_in_flight, ack_wait_s, max_deliver)
        return _NatsReplay(self, subject, stream, start_seq, max_in_flight)

    async def last(self, subject: str) -> Delivery | None:
        stream = check_subject(subject)
        await self.ensure_stream(stream)

        async def read() -> RawStreamMsg | None:
            try:
                return await self.js.get_last_msg(stream, subject)
            except nats.js.errors.NotFoundError:
                return None

        raw = await self._retrying(read, waiting=f"read {subject}", refused=f"read {subject}", pause_s=0.1)
        if raw is None:
            return None
        return Delivery(raw.subject or subject, raw.data or b"", int(raw.seq or 0), 1, dict(raw.headers or {}),
                        settled=True)

    async def keep_last(self, subject: str, per_subject: int) -> None:
        if per_subject < 1:
            raise BusError(f"keep_last needs at least one message per subject, got {per_subject}")
        stream = check_subject(subject, wildcards=True)
        await self.ensure_stream(stream)

        async def limit() -> None:
            info = await self.js.stream_info(stream)
            if info.config.max_msgs_per_subject != per_subject:
                await self.js.update_stream(dataclasses.replace(info.config, max_msgs_per_subject=per_subject))

        await self._retrying(limit, waiting=f"stream {stream}",
                             refused=f"cannot limit stream {stream} to {per_subject} per subject", pause_s=0.2)

    async def purge(self, subject: str, *, keep: int = 0) -> None:
        if keep < 0:
            raise BusError(f"purge keeps a number of messages >= 0, got {keep}")
        stream = check_subject(subject)
        await self.ensure_stream(stream)

        async def purge() -> None:
            await self.js.purge_stream(stream, subject=subject, keep=keep or None)

        await self._retrying(purge, waiting=f"purge {subject}", refused=f"cannot purge {subject}", pause_s=0.1)

    async def latest(self, pattern: str) -> list[Delivery]:
        stream = check_subject(pattern, wildcards=True)
        await self.ensure_stream(stream)
        try:
            info = await self.js.stream_info(stream, subjects_filter=pattern)
        except nats.errors.Error as exc:
            raise BusError(f"list {pattern}: {exc}") from exc
        found = [await self.last(subject) for subject in sorted(info.state.subjects or {})]
        return [d for d in found if d is not None]

    async def aclose(self) -> None:
        # Every publish has been acknowledged already; nothing is left to drain.
        with contextlib.suppress(nats.errors.Error, asyncio.CancelledError):
            await self.nc.close()
