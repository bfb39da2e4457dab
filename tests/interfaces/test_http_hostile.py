"""Hostile requests to the control plane (issue 13, findings 6-8): the audit query as a way around everything,
requests that break the server, unauthenticated requests that grow the audit log, probes that need a token."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stitchwork.interfaces.http._guard import FailedAuthLog, json_depth, json_problem
from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import Platform
from stitchwork.service import Service
from tests.gateway.test_gateway import APPROVAL_RUN

Api = tuple[TestClient, Service, str]


@pytest.fixture
def api(make_config) -> Iterator[Api]:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config(APPROVAL_RUN), role="server")
    service = Service(platform)
    token = service.create_operator_token()
    with TestClient(create_app(service, expiry_interval_s=3600)) as client:
        yield client, service, token
    asyncio.run(platform.aclose())


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _events(service: Service) -> int:
    service.platform.audit.flush()
    return int(service.platform.store.query("SELECT count(*) AS n FROM audit_events")[0]["n"])


def _tokens(service: Service) -> list[dict[str, Any]]:
    return service.platform.store.query("SELECT id, token_sha256, revoked FROM operator_tokens ORDER BY id")


def _deep(levels: int) -> bytes:
    return b'{"messages": ' + b"[" * levels + b"]" * levels + b"}"


# ------------------------------------------------------------------------------------------ 6: the audit query
def test_the_old_audit_query_attacks_fail_and_change_nothing(api: Api) -> None:
    client, service, token = api
    run = client.post("/v1/runs", json={"agent": "tester", "task": "write then delete", "wait": True},
                      headers=auth(token)).json()
    assert run["status"] == "waiting_approval"
    events, tokens = _events(service), _tokens(service)
    forged = "swo_forged_token_for_the_test"
    digest = hashlib.sha256(forged.encode()).hexdigest()
    attacks = [
        "WITH d AS (DELETE FROM audit_events RETURNING seq) SELECT count(*) FROM d",
        "WITH d AS (UPDATE audit_events SET decision = 'allow' RETURNING seq) SELECT count(*) FROM d",
        f"WITH d AS (INSERT INTO operator_tokens VALUES ('forged', '{digest}', 0, false) RETURNING id) "
        "SELECT * FROM d",
        "WITH d AS (UPDATE approvals SET status = 'approved' RETURNING id) SELECT * FROM d",
        "SELECT * FROM operator_tokens",
        "DELETE FROM audit_events",
        "SELECT 1; DELETE FROM audit_events",
    ]
    for sql in attacks:
        response = client.post("/v1/audit/query", json={"sql": sql}, headers=auth(token))
        assert response.status_code == 400, (sql, response.text)
        assert response.json()["error"] == "query_refused", response.text
    assert client.get("/v1/runs", headers=auth(forged)).status_code == 401
    assert _tokens(service) == tokens
    assert [a["status"] for a in client.get("/v1/approvals", headers=auth(token)).json()] == ["pending"]
    assert _events(service) == events + 1  # only the run_list refusal above was audited
    assert client.get("/v1/audit/verify", headers=auth(token)).json()["ok"] is True


def test_the_audit_query_cannot_read_host_files(api: Api) -> None:
    client, service, token = api
    assert client.put("/v1/secrets/crm_api_key", json={"value": "crm-abcdef-123456"},
                      headers=auth(token)).status_code == 204
    files = [p for p in service.platform.config.state_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        content = path.read_bytes()[:64]
        for sql in (f"SELECT * FROM read_text('{path}')", f"SELECT content FROM read_blob('{path}')",
                    f"SELECT * FROM read_csv('{path}', header = false)", f"SELECT * FROM glob('{path.parent}/*')",
                    f"SELECT * FROM '{path}'"):
            response = client.post("/v1/audit/query", json={"sql": sql}, headers=auth(token))
            assert response.status_code == 400, (sql, response.text)
            if len(content) >= 16:
                assert content[:16].decode("latin-1") not in response.text


def test_benign_audit_queries_and_blobs(api: Api) -> None:
    client, _service, token = api
    client.post("/v1/runs", json={"agent": "tester", "task": "t", "wait": True}, headers=auth(token))
    rows = client.post("/v1/audit/query", json={"sql": "SELECT kind, count(*) AS n FROM audit_events GROUP BY kind "
                       "ORDER BY kind"}, headers=auth(token))
    assert rows.status_code == 200 and {"kind": "model", "n": 2} in rows.json(), rows.text
    joined = client.post("/v1/audit/query", json={"sql": "SELECT r.id, count(e.seq) AS n FROM runs AS r JOIN "
                         "audit_events AS e ON e.run_id = r.id GROUP BY r.id"}, headers=auth(token))
    assert joined.status_code == 200 and len(joined.json()) == 1 and joined.json()[0]["n"] > 1
    blob = client.post("/v1/audit/query", json={"sql": "SELECT '\\xff\\x00'::BLOB AS b, 'nan'::DOUBLE AS x, "
                       "'inf'::DOUBLE AS y, INTERVAL 1 DAY AS d, 1.5::DECIMAL(4, 2) AS m"}, headers=auth(token))
    assert blob.status_code == 200, blob.text
    assert blob.json() == [{"b": "/wA=", "x": "NaN", "y": "Infinity", "d": 86400.0, "m": 1.5}]


# ------------------------------------------------------------------------------------------ 7: requests that break it
def test_deep_json_without_a_token_is_401_and_with_one_400(api: Api) -> None:
    client, service, token = api
    platform = service.platform
    platform.gateway.open_run("run_deep", "tester", workdir=platform.config.state_dir / "deep", max_steps=5)
    run_token = platform.tokens.issue("tester", "run_deep")
    body = _deep(2000)
    for path in ("/v1/chat/completions", "/v1/agent/chat/completions", "/v1/agent/tools/list_inbox"):
        assert client.post(path, content=body).status_code == 401
        response = client.post(path, content=body, headers=auth(run_token))
        assert response.status_code == 400, (path, response.text)
    for path in ("/v1/runs", "/v1/audit/query", "/v1/memory/grants"):
        assert client.post(path, content=body).status_code == 401
        assert client.post(path, content=body, headers=auth(token)).status_code == 400


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/runs", '{"agent": "tester", "task": NaN}'),
    ("POST", "/v1/audit/export", '{"to": "iceberg+sqlite:///x.db", "since": NaN}'),
    ("POST", "/v1/audit/compact", '{"to": "iceberg+sqlite:///x.db", "older_than_days": Infinity}'),
    ("POST", "/v1/audit/query", '{"sql": -Infinity}'),
    ("PUT", "/v1/secrets/x", '{"value": NaN}'),
    ("POST", "/v1/memory/grants", '{"owner": NaN, "grantee": "b"}'),
    ("POST", "/v1/approvals/nope/approve", '{"note": Infinity}'),
    ("POST", "/v1/queue/runs", '{"agent": "tester", "task": NaN}'),
])
def test_nan_and_infinity_are_422_with_a_json_error(api: Api, method: str, path: str, body: str) -> None:
    client, _, token = api
    response = client.request(method, path, content=body.encode(),
                              headers={**auth(token), "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert json.loads(response.text)["error"] == "invalid_json"


def test_validation_errors_with_odd_inputs_serialise(api: Api) -> None:
    client, _, token = api
    response = client.post("/v1/runs", content=b'{"agent": "tester", "task": "x", "wait": "\\u00ff\\ud800"}',
                           headers={**auth(token), "content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"


def test_bodies_over_the_limit_are_413(api: Api) -> None:
    client, service, token = api
    limit = service.platform.config.server.max_body_bytes
    big = json.dumps({"agent": "tester", "task": "x" * (limit + 10)}).encode()
    assert client.post("/v1/runs", content=big, headers=auth(token)).status_code == 413
    assert client.post("/v1/runs", content=big).status_code == 401  # no token: refused before the body


def _asgi_post(app: Any, path: str, headers: list[tuple[bytes, bytes]], chunks: int, chunk: int) -> tuple[int, int]:
    """POSTs ``chunks`` chunks straight to the ASGI app; returns (status, chunks the app pulled)."""
    pulled = 0
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled >= chunks:
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": b"x" * chunk, "more_body": pulled < chunks}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "client": ("10.9.8.7", 5555), "server": ("127.0.0.1", 8470), "scheme": "http",
             "http_version": "1.1", "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return status[0], pulled


def test_the_body_is_not_buffered_past_the_limit(api: Api) -> None:
    client, service, token = api
    app = client.app
    limit = service.platform.config.server.max_body_bytes
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"content-type", b"application/json")]
    chunk = 64 * 1024
    status, pulled = _asgi_post(app, "/v1/runs", headers, chunks=160, chunk=chunk)  # 10 MB, chunked
    assert status == 413 and pulled * chunk <= limit + chunk
    declared = [*headers, (b"content-length", str(10 * 1024 * 1024).encode())]
    status, pulled = _asgi_post(app, "/v1/runs", declared, chunks=160, chunk=chunk)
    assert (status, pulled) == (413, 0)
    status, pulled = _asgi_post(app, "/v1/runs", [(b"content-length", b"10485760")], chunks=160, chunk=chunk)
    assert (status, pulled) == (401, 0)


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[[[[["}]}') == 3
    assert json_depth(b'"[[[["') == 0
    assert json_problem(b'{"a": "' + b"[" * 5000 + b'"}', 256) is None
    assert json_problem(_deep(300), 256) is not None and json_problem(_deep(200), 256) is None
    assert json_problem(b'{"a": "NaN"}', 8) is None and json_problem(b'{"a": NaN}', 8) is not None


# ------------------------------------------------------------------------------------------ 8: probes, failed logins
def test_health_probes_are_open_and_write_nothing(api: Api) -> None:
    client, service, token = api
    before = _events(service)
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok", "bus": "ok", "audit": "ok"}
    assert _events(service) == before
    assert client.get("/v1/health").status_code == 401  # agents and tools stay behind the token
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers=auth(token)).status_code == 200


def test_readyz_reports_a_dead_audit_log(api: Api) -> None:
    client, service, _ = api
    service.platform.audit.close()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "closed" in ready.json()["checks"]["audit"]


def _auth_counts(service: Service) -> list[dict[str, Any]]:
    service.platform.audit.flush()
    rows = service.platform.store.query("SELECT data FROM audit_events WHERE kind = 'auth' ORDER BY seq")
    return [json.loads(r["data"]) for r in rows]


def test_a_thousand_failed_logins_are_a_handful_of_events(api: Api) -> None:
    client, service, _ = api
    for i in range(1000):
        path = ("/v1/runs", "/v1/secrets", "/v1/chat/completions")[i % 3]
        headers = auth("swo_wrong") if i % 2 else {}
        assert client.get(path, headers=headers).status_code in (401, 405)
    asyncio.run(client.app.state.failed_auth.flush(everything=True))  # type: ignore[attr-defined]
    events = _auth_counts(service)
    assert 1 <= len(events) <= 8, events
    assert sum(e["count"] for e in events) == 1000
    assert {e["source"] for e in events} == {"testclient"}


def test_failed_logins_are_counted_per_source_and_window() -> None:
    appended: list[dict[str, Any]] = []

    class Audit:
        async def aappend(self, kind: str, **fields: Any) -> None:
            appended.append({"kind": kind, **fields})

    now = [0.0]
    log = FailedAuthLog(Audit(), window_s=60.0, max_sources=2, clock=lambda: now[0])  # type: ignore[arg-type]

    async def scenario() -> None:
        for _ in range(5):
            await log.record("1.1.1.1", "missing operator token", "/v1/runs")
        await log.record("2.2.2.2", "missing operator token", "/v1/runs")
        for source in ("3.3.3.3", "4.4.4.4", "5.5.5.5"):  # past max_sources: one shared bucket
            await log.record(source, "missing operator token", "/v1/x")
        now[0] = 61.0
        await log.record("1.1.1.1", "missing operator token", "/v1/runs")  # a new window closes the old one
        await log.flush(everything=True)

    asyncio.run(scenario())
    by_source: dict[str, int] = {}
    for event in appended:
        by_source[event["data"]["source"]] = by_source.get(event["data"]["source"], 0) + event["data"]["count"]
    assert by_source == {"1.1.1.1": 6, "2.2.2.2": 1, "*": 3}
    assert len(appended) == 6  # 1.1.1.1: first, summary of 4, next window's first; 2.2.2.2: one; *: first + 2


def test_refused_event_sockets_are_aggregated_too(api: Api) -> None:
    from starlette.websockets import WebSocketDisconnect

    client, service, _ = api
    for i in range(30):
        path = "/v1/events" if i % 2 else "/v1/events?token=swo_wrong"
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path) as ws:
            ws.receive_json()
        assert refused.value.code == 4401
    asyncio.run(client.app.state.failed_auth.flush(everything=True))  # type: ignore[attr-defined]
    events = [e for e in _auth_counts(service) if e["paths"] == ["/v1/events"]]
    assert len(events) <= 4 and sum(e["count"] for e in events) == 30, events


def test_validation_errors_do_not_echo_a_whole_body(api: Api) -> None:
    client, _, token = api
    response = client.post("/v1/audit/query", json={"sql": "x" * 200_000}, headers=auth(token))
    assert response.status_code == 422 and len(response.content) < 2000, len(response.content)
