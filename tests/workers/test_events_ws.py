"""The event WebSocket of the control plane: ordered, numbered, replayable from a sequence number, authenticated."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import Platform
from stitchwork.service import Service

TURNS = [
    {"tool_calls": [{"id": "c1", "name": "write_note", "arguments": {"name": "a.txt", "text": "one"}}]},
    {"tool_calls": [{"id": "c2", "name": "write_note", "arguments": {"name": "b.txt", "text": "two"}}]},
    {"content": "done"},
]


@pytest.fixture
def api(make_config) -> Iterator[tuple[TestClient, str]]:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config(TURNS), role="server")  # a real sandbox: inline would write into the cwd
    service = Service(platform)
    token = service.create_operator_token()
    with TestClient(create_app(service, expiry_interval_s=3600)) as client:
        yield client, token
    asyncio.run(platform.aclose())


def read_until_finished(ws: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not events or events[-1]["kind"] != "finished":
        events.append(ws.receive_json())
    return events


def test_events_stream_in_order_and_a_reconnect_resumes_without_gaps_or_duplicates(api) -> None:  # type: ignore[no-untyped-def]
    client, token = api
    run = client.post("/v1/runs", json={"agent": "tester", "task": "write two notes", "wait": True},
                      headers={"Authorization": f"Bearer {token}"}).json()
    assert run["status"] == "completed"
    with client.websocket_connect(f"/v1/events?run_id={run['id']}",
                                  headers={"Authorization": f"Bearer {token}"}) as ws:
        everything = read_until_finished(ws)
    assert [e["kind"] for e in everything] == ["model", "tool", "model", "tool", "model", "finished"]
    seqs = [e["seq"] for e in everything]
    assert seqs == sorted(set(seqs))
    assert all(e["run_id"] == run["id"] for e in everything)
    seen = everything[:2]  # the client dropped after two events
    with client.websocket_connect(f"/v1/events?run_id={run['id']}&after={seen[-1]['seq']}&token={token}") as ws:
        rest = read_until_finished(ws)
    assert seen + rest == everything


def test_all_runs_stream_and_a_second_run_follows_live(api) -> None:  # type: ignore[no-untyped-def]
    client, token = api
    auth = {"Authorization": f"Bearer {token}"}
    first = client.post("/v1/runs", json={"agent": "tester", "task": "one", "wait": True}, headers=auth).json()
    with client.websocket_connect(f"/v1/events?token={token}") as ws:
        backlog = read_until_finished(ws)
        assert {e["run_id"] for e in backlog} == {first["id"]}
        second = client.post("/v1/runs", json={"agent": "tester", "task": "two", "wait": True}, headers=auth).json()
        live = read_until_finished(ws)
    assert {e["run_id"] for e in live} == {second["id"]}
    assert live[0]["seq"] > backlog[-1]["seq"]


def test_the_event_socket_needs_an_operator_token(api) -> None:  # type: ignore[no-untyped-def]
    client, _ = api
    for path in ("/v1/events", "/v1/events?token=swo_wrong"):
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path) as ws:
            ws.receive_json()
        assert refused.value.code == 4401


def test_queue_routes_need_a_token_and_a_known_agent(api) -> None:  # type: ignore[no-untyped-def]
    client, token = api
    auth = {"Authorization": f"Bearer {token}"}
    assert client.post("/v1/queue/runs", json={"agent": "tester", "task": "x"}).status_code == 401
    assert client.post("/v1/queue/runs", json={"agent": "nobody", "task": "x"}, headers=auth).status_code == 404
    queued = client.post("/v1/queue/runs", json={"agent": "tester", "task": "x"}, headers=auth)
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    assert client.get(f"/v1/queue/runs/{queued.json()['id']}", headers=auth).status_code == 404  # no worker yet
