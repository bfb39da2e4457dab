"""The agent-memory behaviour suite over the bus-backed memory (``memory://`` and NATS): one memory for every
worker and the platform."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from stitchwork.config import MessagingConfig
from stitchwork.memory.bus import BusMemory, owner_token
from stitchwork.memory.store import AgentMemory, MemoryDenied
from stitchwork.platform import Platform
from tests.memory.test_behaviour import (
    USER,
    test_agents_read_only_their_own_memory_unless_granted,
    test_put_get_replace_delete,
    test_put_many_indexes_like_put,
    test_search_ranks_by_bm25,
    test_untrusted_labels_survive_the_round_trip,
)

__all__ = [  # the shared behaviour tests, collected here against the bus-backed memory
    "test_agents_read_only_their_own_memory_unless_granted", "test_put_get_replace_delete",
    "test_put_many_indexes_like_put", "test_search_ranks_by_bm25", "test_untrusted_labels_survive_the_round_trip",
]


@pytest.fixture(params=["memory", "nats"])
def bus_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("nats_url")
    return url


@pytest.fixture
def connect(bus_uri: str) -> Iterator[object]:
    """``connect()`` opens another connection to one shared bus (another worker, the platform)."""
    from stitchwork.messaging._base import open_bus
    from stitchwork.messaging.bridge import SyncBus
    from stitchwork.messaging.bridge import _run_now as run_now

    prefix = "m" + uuid.uuid4().hex[:8]
    opened: list[SyncBus] = []
    shared = run_now(open_bus("memory://")) if bus_uri == "memory://" else None

    def make() -> BusMemory:
        sync = SyncBus(bus_uri, bus=shared) if shared is not None else SyncBus(bus_uri)
        opened.append(sync)
        return BusMemory(sync, prefix=prefix)

    yield make
    for sync in opened:
        sync.close()


@pytest.fixture
def memory(connect) -> AgentMemory:  # type: ignore[no-untyped-def]
    made: AgentMemory = connect()
    return made


def test_a_second_worker_sees_what_the_first_wrote_and_the_grants_it_was_given(connect) -> None:  # type: ignore[no-untyped-def]
    first, second, platform = connect(), connect(), connect()
    first.put("alice", "progress", text="step three of the report", value={"step": 3}, labels=[USER])
    resumed = second.get("alice", "progress")
    assert resumed is not None and resumed.value == {"step": 3} and resumed.labels == (USER,)
    assert [h.item.key for h in second.search("alice", "report")] == ["progress"]
    with pytest.raises(MemoryDenied):
        second.get("bob", "progress", owner="alice")
    platform.grant("alice", "bob", namespace="default", mode="read", by="operator")
    assert second.get("bob", "progress", owner="alice") is not None  # a grant made on the platform
    assert platform.grants("alice")[0]["grantee"] == "bob"
    assert [o["agent"] for o in platform.owners()] == ["alice"]
    platform.revoke("alice", "bob", namespace="default", mode="read", by="operator")
    with pytest.raises(MemoryDenied):
        first.get("bob", "progress", owner="alice")
    assert second.delete("alice", "progress") and first.get("alice", "progress") is None
    assert first.items("alice") == [] and first.reindex() == 0


def test_names_that_are_not_subject_tokens_are_kept_apart(connect) -> None:  # type: ignore[no-untyped-def]
    memory = connect()
    for name in ("a.b", "a_b", "a b", "a*>", "ä"):
        memory.put(name, "k", text=f"owner {name}", labels=[USER])
    for name in ("a.b", "a_b", "a b", "a*>", "ä"):
        item = memory.get(name, "k")
        assert item is not None and item.text == f"owner {name}" and item.agent == name
    assert len({owner_token(n) for n in ("a.b", "a_b", "a b")}) == 3


def test_expire_removes_items_written_before_a_time(connect) -> None:  # type: ignore[no-untyped-def]
    memory = connect()
    memory.clock = lambda: 100.0
    memory.put("alice", "old", text="old", labels=[USER])
    memory.clock = lambda: 200.0
    memory.put("alice", "new", text="new", labels=[USER])
    assert memory.expire(150.0) == 1
    assert memory.keys("alice") == ["new"]



@pytest.mark.parametrize("chosen", ["", "store", "bus"])
async def test_fleet_mode_keeps_memory_on_the_bus_by_default(chosen: str, make_config: Any, nats_url: str) -> None:
    base = make_config([{"content": "hi"}], sandbox="inline://")
    base = replace(base, data=replace(base.data, memory=chosen))
    platform = Platform.open(replace(base, messaging=MessagingConfig(bus=nats_url)), role="server")  # a fleet's `up`
    try:
        assert isinstance(platform.memory, BusMemory) is (chosen in ("", "bus"))
    finally:
        await platform.aclose()
    if chosen == "bus":
        return
    for role in ("server", "local"):  # no fleet (an in-process bus, or none): each process's own store
        single = Platform.open(replace(base, messaging=MessagingConfig(bus="memory://")), role=role)
        try:
            assert isinstance(single.memory, AgentMemory) and not isinstance(single.memory, BusMemory)
        finally:
            await single.aclose()
