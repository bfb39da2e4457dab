"""The control plane API: a token on every endpoint, runs, approvals, audit, secrets, agent tool calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import Platform
from stitchwork.service import Service
from tests.gateway.test_gateway import APPROVAL_RUN


@pytest.fixture
def api(make_config) -> Iterator[tuple[TestClient, Service, str]]:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config(APPROVAL_RUN), role="server")
    service = Service(platform)
    token = service.create_operator_token()
    with TestClient(create_app(service, expiry_interval_s=3600)) as client:
        yield client, service, token
    import asyncio

    asyncio.run(platform.aclose())


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/health"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/v1/runs"),
     ("POST", "/v1/runs"), ("GET", "/v1/approvals"), ("GET", "/v1/audit/verify"), ("GET", "/v1/secrets")],
)
def test_every_endpoint_requires_the_operator_token(api, method: str, path: str) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    assert client.request(method, path).status_code == 401
    assert client.request(method, path, headers=auth("swo_wrong")).status_code == 401


def test_the_liveness_probe_needs_no_token_and_says_nothing_else(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert client.get("/healthz/../v1/health").status_code == 401
    assert client.get("/healthzx").status_code == 401
    assert client.post("/healthz").status_code == 405


def test_runs_are_listed_newest_first_and_filtered_by_status(api) -> None:  # type: ignore[no-untyped-def]
    client, _, token = api
    run = client.post("/v1/runs", json={"agent": "tester", "task": "t", "wait": True}, headers=auth(token)).json()
    assert run["status"] == "waiting_approval"
    listed = client.get("/v1/runs", headers=auth(token)).json()
    assert [r["id"] for r in listed] == [run["id"]] and "messages" not in listed[0]
    assert client.get("/v1/runs", params={"status": "waiting_approval"}, headers=auth(token)).json() == listed
    assert client.get("/v1/runs", params={"status": "completed"}, headers=auth(token)).json() == []
    assert client.get("/v1/runs", params={"status": "all"}, headers=auth(token)).json() == listed
    bad = client.get("/v1/runs", params={"status": "exploded"}, headers=auth(token))
    assert bad.status_code == 400 and "unknown run status 'exploded'" in bad.json()["message"]


def test_openapi_is_served_with_a_token(api) -> None:  # type: ignore[no-untyped-def]
    client, _, token = api
    spec = client.get("/openapi.json", headers=auth(token)).json()
    assert "/v1/runs" in spec["paths"] and "/v1/approvals/{approval_id}/approve" in spec["paths"]


def test_run_approve_and_resume_over_the_api(api) -> None:  # type: ignore[no-untyped-def]
    client, _, token = api
    body = {"agent": "tester", "task": "write then delete n.txt", "wait": True}
    response = client.post("/v1/runs", json=body, headers=auth(token))
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    assert run["status"] == "waiting_approval", run["messages"]
    pending = client.get("/v1/approvals", headers=auth(token)).json()
    assert [a["id"] for a in pending] == run["pending_approvals"]
    decided = client.post(f"/v1/approvals/{pending[0]['id']}/approve", json={"note": "fine"}, headers=auth(token))
    assert decided.status_code == 200 and decided.json()["status"] == "approved"
    again = client.post(f"/v1/approvals/{pending[0]['id']}/approve", headers=auth(token))
    assert again.status_code == 409
    assert client.get(f"/v1/runs/{run['id']}", headers=auth(token)).json()["status"] == "completed"
    assert client.get("/v1/audit/verify", headers=auth(token)).json()["ok"] is True


def test_bad_requests_get_clear_errors(api) -> None:  # type: ignore[no-untyped-def]
    client, _, token = api
    assert client.post("/v1/runs", json={"agent": "nobody", "task": "x", "wait": True},
                       headers=auth(token)).status_code == 404
    headers = {**auth(token), "content-type": "application/json"}
    bad_json = client.post("/v1/runs", content=b"{not json", headers=headers)
    assert bad_json.status_code == 422
    assert client.get("/v1/runs/run_missing", headers=auth(token)).status_code == 404
    query = client.post("/v1/audit/query", json={"sql": "DROP TABLE audit_events"}, headers=auth(token))
    assert query.status_code == 400 and "only SELECT" in query.json()["message"]


def test_secrets_api_never_returns_values(api) -> None:  # type: ignore[no-untyped-def]
    client, _, token = api
    assert client.put("/v1/secrets/crm_api_key", json={"value": "crm-abcdef-123456"},
                      headers=auth(token)).status_code == 204
    names = client.get("/v1/secrets", headers=auth(token))
    assert names.json() == ["crm_api_key"] and "crm-abcdef" not in names.text
    rows = client.post("/v1/audit/query", json={"sql": "SELECT 'crm-abcdef-123456' AS leaked"}, headers=auth(token))
    assert rows.json() == [{"leaked": "[secret:crm_api_key]"}]


def test_agent_tool_endpoint_uses_run_tokens(api) -> None:  # type: ignore[no-untyped-def]
    client, service, _ = api
    platform = service.platform
    platform.gateway.open_run("run_ext", "tester", workdir=platform.config.state_dir / "ext", max_steps=5)
    token = platform.tokens.issue("tester", "run_ext")
    ok = client.post("/v1/agent/tools/list_inbox", content=b'{"limit": 2}', headers=auth(token))
    assert ok.status_code == 200 and len(ok.json()["result"]) == 2
    assert ok.json()["label"] == "tool:list_inbox (untrusted)"
    assert client.post("/v1/agent/tools/list_inbox", content=b"{}").status_code == 401
    bad = client.post("/v1/agent/tools/list_inbox", content=b"\xff\xfe", headers=auth(token))
    assert bad.status_code == 422 and "UTF-8" in bad.json()["error"]["message"]
