"""The NATS replay consumer keeps creating its consumer across callers' timeouts (no server: a scripted JetStream)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from stitchwork.messaging.nats import _NatsReplay


class _Sub:
    def __init__(self) -> None:
        self.unsubscribed = False
        self.sent = [SimpleNamespace(subject="events.r1", data=b"hello", headers=None,
                                     metadata=SimpleNamespace(sequence=SimpleNamespace(stream=7)))]

    async def next_msg(self, timeout: float) -> Any:
        if self.sent:
            return self.sent.pop(0)
        await asyncio.sleep(timeout)
        raise TimeoutError

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


class _SlowJetStream:
    """Creating a consumer takes ``delay`` seconds, like a cluster electing a new meta leader."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.created: list[_Sub] = []
        self.started = 0

    async def subscribe(self, subject: str, **_: Any) -> _Sub:
        self.started += 1
        await asyncio.sleep(self.delay)
        self.created.append(_Sub())
        return self.created[-1]


def _bus(js: _SlowJetStream) -> Any:
    async def ensure_stream(stream: str) -> None:
        return None

    return SimpleNamespace(js=js, ensure_stream=ensure_stream)


async def test_short_waits_do_not_abort_a_slow_consumer_creation() -> None:
    js = _SlowJetStream(delay=0.3)
    replay = _NatsReplay(_bus(js), "events.r1", "events", 1, 64)
    got = None
    for _ in range(200):  # each wait is far shorter than the creation
        try:
            got = await replay.next(0.02)
            break
        except TimeoutError:
            continue
    assert got is not None and (got.seq, got.data) == (7, b"hello")
    assert js.started == 1  # one creation, not one per wait
    await replay.aclose()
    assert js.created[0].unsubscribed


async def test_closing_while_the_consumer_is_being_created_removes_it() -> None:
    js = _SlowJetStream(delay=0.2)
    replay = _NatsReplay(_bus(js), "events.r1", "events", 1, 64)
    with pytest.raises(TimeoutError):
        await replay.next(0.01)
    await replay.aclose()
    assert len(js.created) == 1 and js.created[0].unsubscribed  # not left behind on the server
