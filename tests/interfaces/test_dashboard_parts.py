"""The dashboard's parts on their own: sessions and their expiry, charts, the live feed, template filters."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest

from stitchwork.agents.runs import RunRecord
from stitchwork.config import DashboardConfig
from stitchwork.data._base import Store, open_store
from stitchwork.interfaces.http.dashboard import charts
from stitchwork.interfaces.http.dashboard.live import LiveFeed
from stitchwork.interfaces.http.dashboard.render import templates
from stitchwork.interfaces.http.dashboard.sessions import MAX_FAILURES, SessionStore, tokens_match
from stitchwork.workers.events import EventHub
from stitchwork.workers.subjects import Subjects


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> Store:
    opened = open_store("memory://")
    opened.execute("CREATE TABLE operator_tokens (id VARCHAR PRIMARY KEY, token_sha256 VARCHAR NOT NULL, "
                   "created_at DOUBLE NOT NULL, revoked BOOLEAN NOT NULL)")
    opened.append("operator_tokens", [{"id": "t1", "token_sha256": "x", "created_at": 0.0, "revoked": False}])
    return opened


def test_a_session_ends_after_its_lifetime_however_active(store: Store) -> None:
    clock = Clock()
    sessions = SessionStore(store, DashboardConfig(session_ttl_s=100, idle_ttl_s=60), clock=clock)
    cookie, session = sessions.open("t1")
    assert session.key not in cookie and len(cookie) >= 40
    for _ in range(3):
        clock.now += 30
        assert sessions.get(cookie) is not None  # used every 30 s: never idle
    clock.now += 15
    assert sessions.get(cookie) is None  # 105 s after sign-in
    assert store.query("SELECT count(*) AS n FROM dashboard_sessions")[0]["n"] == 0


def test_an_idle_session_ends(store: Store) -> None:
    clock = Clock()
    sessions = SessionStore(store, DashboardConfig(session_ttl_s=10_000, idle_ttl_s=60), clock=clock)
    cookie, _ = sessions.open("t1")
    clock.now += 59
    assert sessions.get(cookie) is not None
    clock.now += 59  # last use 59 s ago: touched then
    assert sessions.get(cookie) is not None
    clock.now += 61
    assert sessions.get(cookie) is None


def test_the_store_keeps_only_a_digest_and_bad_cookies_find_nothing(store: Store) -> None:
    sessions = SessionStore(store, DashboardConfig())
    cookie, session = sessions.open("t1")
    dump = json.dumps(store.query("SELECT * FROM dashboard_sessions"))
    assert cookie not in dump
    for bad in ("", "x", cookie + "x", cookie[:-1], "' OR 1=1 --", "a" * 5000):
        assert sessions.get(bad) is None
    got = sessions.get(cookie)
    assert got is not None and got.csrf == session.csrf and sessions.csrf_ok(got, session.csrf)
    assert not sessions.csrf_ok(got, "") and not sessions.csrf_ok(got, session.csrf + "x")
    assert not tokens_match("", "") and tokens_match("abc", "abc")


def test_sign_in_failures_are_counted_per_address_and_forgotten(store: Store) -> None:
    clock = Clock()
    sessions = SessionStore(store, DashboardConfig(), clock=clock)
    for _ in range(MAX_FAILURES):
        assert not sessions.throttled("10.0.0.1")
        sessions.failed("10.0.0.1")
    assert sessions.throttled("10.0.0.1") and not sessions.throttled("10.0.0.2")
    clock.now += 61
    assert not sessions.throttled("10.0.0.1")


def test_charts_escape_labels_and_survive_odd_numbers() -> None:
    svg = str(charts.stacked_bars([("<script>alert(1)</script>", [1, -5]), ('"><img onerror=x>', [math.nan, 3]),
                                   ("inf", [math.inf, "x"])], title="t</title><script>", series=["a<b", "c"]))
    assert "<script>" not in svg and "<img" not in svg and "&lt;script&gt;" in svg
    assert "nan" not in svg.lower() and "inf\"" not in svg
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "style=" not in svg
    assert "no data yet" in str(charts.bars([], title="empty"))
    series = str(charts.time_bars([(1.7e9, 0), (1.7e9 + 3600, 4), (1.7e9 + 7200, -1)], title="x"))
    assert series.count("<rect") == 3 and "UTC" in series


def test_templates_escape_by_default() -> None:
    text = templates.from_string("{{ x }}|{{ x|safe_url }}|{{ y|money }}|{{ z|when }}").render(
        x="<b>javascript:alert(1)</b>", y=float("nan"), z="nope")
    assert text == "&lt;b&gt;javascript:alert(1)&lt;/b&gt;|&lt;b&gt;javascript:alert(1)&lt;/b&gt;||"


def _record(run_id: str) -> RunRecord:
    return RunRecord(id=run_id, agent="a", task="t", model="m")


async def test_the_live_feed_resumes_where_it_stopped_and_skips_old_events(store: Store) -> None:
    hub = EventHub("memory://live-feed-test", Subjects("lf"))
    try:
        old = {"run_id": "run_old", "agent": "a", "kind": "finished", "status": "completed", "steps": 1, "data": {},
               "worker": "w", "ts": 1.0}  # published long before this server started: a replay, not news
        await asyncio.to_thread(hub.sync.publish, hub.subjects.events("run_old"), json.dumps(old).encode())
        feed = LiveFeed(hub, store)
        queue = feed.subscribe()
        task = asyncio.create_task(feed.run())
        for _ in range(100):
            if feed.seq:
                break
            await asyncio.sleep(0.01)
        assert feed.seq == 1 and queue.empty()  # seen, not sent
        await asyncio.to_thread(hub.publish, _record("run_new"), "tool", {"secret": "<script>"})
        event = await asyncio.wait_for(queue.get(), 10)
        assert event["run_id"] == "run_new" and event["kind"] == "tool" and "data" not in event
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert store.query("SELECT value FROM dashboard_state")[0]["value"] == 2
        again = LiveFeed(hub, store)
        seen: list[dict[str, Any]] = []
        again.on_event = seen.append
        second = asyncio.create_task(again.run())
        await asyncio.to_thread(hub.publish, _record("run_third"), "model", {})
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert [e["run_id"] for e in seen] == ["run_third"]  # nothing replayed twice after a restart
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
    finally:
        await hub.aclose()


async def test_a_slow_page_gets_a_resync_instead_of_unbounded_memory(store: Store) -> None:
    hub = EventHub("memory://live-feed-slow", Subjects("ls"))
    try:
        feed = LiveFeed(hub, store)
        queue = feed.subscribe()
        for i in range(600):
            feed.broadcast({"kind": "tool", "seq": i})
        assert queue.qsize() <= 256
        drained = [queue.get_nowait() for _ in range(queue.qsize())]
        assert {"kind": "resync"} in drained
        feed.unsubscribe(queue)
        feed.broadcast({"kind": "tool"})
        assert queue.empty()
    finally:
        await hub.aclose()
