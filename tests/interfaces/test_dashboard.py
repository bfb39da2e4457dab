"""The dashboard over HTTP (no browser): sign-in, sessions, CSRF, escaping, pages, pagination, bad input."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stitchwork.config import load_config
from stitchwork.interfaces.http.app import create_app
from stitchwork.interfaces.http.dashboard.render import CSP, safe_next, safe_url
from stitchwork.platform import Platform
from stitchwork.service import Service
from tests.interfaces.dashboard_fixtures import HOSTILE, build

TASK = "Summarise my inbox and email the summary to me at alice@example.com."


class Board:
    """A signed-out browser's view of a control plane, with the API beside it."""

    def __init__(self, client: TestClient, service: Service, token: str) -> None:
        self.client = client
        self.service = service
        self.token = token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, headers={"Authorization": f"Bearer {self.token}"}, **kwargs)
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def sign_in(self, token: str | None = None) -> str:
        """Signs in; returns the session's CSRF token."""
        form = self.client.get("/ui/login")
        login = re.search(r'name="login" value="([^"]+)"', form.text)
        assert login, form.text
        response = self.client.post("/ui/login", data={"login": login.group(1), "token": token or self.token,
                                                        "next": "/ui/runs"}, follow_redirects=False)
        assert response.status_code == 303, response.text
        return self.csrf()

    def csrf(self) -> str:
        page = self.client.get("/ui/runs")
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, page.text[:500]
        return found.group(1)

    def run(self, agent: str, task: str = "go") -> dict[str, Any]:
        result: dict[str, Any] = self.api("POST", "/v1/runs", json={"agent": agent, "task": task, "wait": True})
        return result


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Board]:
    monkeypatch.chdir(tmp_path)  # inline:// tools write relative paths (the demo's outbox) in the cwd
    config = load_config(build(tmp_path), environ={})
    platform = Platform.open(config, role="server")
    platform.vault.set("crm_api_key", "crm_live_0123456789abcdef")
    platform.gateway.refresh_secrets()
    service = Service(platform)
    token = service.create_operator_token()
    with TestClient(create_app(service, expiry_interval_s=3600)) as client:
        yield Board(client, service, token)
    asyncio.run(platform.aclose())


PAGES = ["/ui/runs", "/ui/runs/run_x", "/ui/approvals", "/ui/approvals/apv_x", "/ui/audit", "/ui/platform",
         "/ui/runs?fragment=1", "/ui/approvals?fragment=1"]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_sends_a_signed_out_browser_to_sign_in(board: Board, path: str) -> None:
    response = board.client.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/ui/login?next=%2Fui%2F")
    assert "dashboard_sessions" not in response.text


@pytest.mark.parametrize("path", ["/ui/approvals/apv_x/decide", "/ui/audit/verify"])
def test_changes_need_a_session(board: Board, path: str) -> None:
    response = board.client.post(path, data={"csrf": "x", "decision": "approve"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/ui/login")


def test_sign_in_sets_a_strict_http_only_cookie_and_the_api_keeps_bearer_tokens(board: Board) -> None:
    form = board.client.get("/ui/login")
    login = re.search(r'name="login" value="([^"]+)"', form.text)
    assert login
    response = board.client.post("/ui/login", data={"login": login.group(1), "token": board.token},
                                 follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/runs"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("sw_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http here; see the https test
    assert board.client.get("/ui/runs").status_code == 200
    # the session cookie is no credential for the API: bearer tokens only
    assert board.client.get("/v1/runs").status_code == 401
    assert board.client.get("/v1/runs", headers={"Authorization": f"Bearer {board.token}"}).status_code == 200


def test_the_cookie_is_secure_over_https(board: Board) -> None:
    client = TestClient(board.client.app, base_url="https://testserver")
    form = client.get("/ui/login")
    login = re.search(r'name="login" value="([^"]+)"', form.text)
    assert login
    response = client.post("/ui/login", data={"login": login.group(1), "token": board.token}, follow_redirects=False)
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("sw_session="))
    assert "Secure" in cookie and "HttpOnly" in cookie


def test_a_wrong_token_cannot_sign_in_and_is_audited(board: Board) -> None:
    form = board.client.get("/ui/login")
    login = re.search(r'name="login" value="([^"]+)"', form.text)
    assert login
    response = board.client.post("/ui/login", data={"login": login.group(1), "token": board.token + "x"},
                                  follow_redirects=False)
    assert response.status_code == 401 and "not a valid operator token" in response.text
    assert not any(c.startswith("sw_session=") for c in response.headers.get_list("set-cookie"))
    assert board.client.get("/ui/runs", follow_redirects=False).status_code == 303
    board.service.platform.audit.flush()
    denied = [e for e in board.service.platform.audit.tail(20) if e.kind == "auth" and e.tool == "/ui/login"]
    assert denied and denied[-1].decision == "deny"
    assert board.token not in str([e.data for e in board.service.platform.audit.tail(50)])


def test_repeated_failures_are_throttled_even_for_the_right_token(board: Board) -> None:
    for _ in range(5):
        form = board.client.get("/ui/login")
        login = re.search(r'name="login" value="([^"]+)"', form.text)
        assert login
        assert board.client.post("/ui/login", data={"login": login.group(1), "token": "swo_guess"}).status_code == 401
    form = board.client.get("/ui/login")
    login = re.search(r'name="login" value="([^"]+)"', form.text)
    assert login
    response = board.client.post("/ui/login", data={"login": login.group(1), "token": board.token},
                                 follow_redirects=False)
    assert response.status_code == 429


def test_sign_in_needs_its_own_form_token(board: Board) -> None:
    board.client.get("/ui/login")
    forged = board.client.post("/ui/login", data={"login": "made-up", "token": board.token}, follow_redirects=False)
    assert forged.status_code == 403
    board.client.cookies.clear()
    bare = board.client.post("/ui/login", data={"token": board.token}, follow_redirects=False)
    assert bare.status_code == 403
    assert board.client.get("/ui/runs", follow_redirects=False).status_code == 303


def test_sign_out_needs_the_csrf_token_and_ends_the_session_for_good(board: Board) -> None:
    csrf = board.sign_in()
    stolen = board.client.cookies.get("sw_session", path="/ui")
    assert stolen
    refused = board.client.post("/ui/logout", data={"csrf": "nope"}, follow_redirects=False)
    assert refused.status_code == 403
    assert board.client.get("/ui/runs").status_code == 200
    done = board.client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert done.status_code == 303
    board.client.cookies.clear()
    board.client.cookies.set("sw_session", stolen, path="/ui")  # a copy of the old cookie is worth nothing
    assert board.client.get("/ui/runs", follow_redirects=False).status_code == 303


def test_revoking_the_operator_token_ends_its_sessions(board: Board) -> None:
    board.sign_in()
    board.service.platform.store.execute("UPDATE operator_tokens SET revoked = true")
    assert board.client.get("/ui/runs", follow_redirects=False).status_code == 303


def _pending(board: Board) -> tuple[dict[str, Any], str]:
    run = board.run("janitor", "clean up")
    assert run["status"] == "waiting_approval"
    (approval_id,) = run["pending_approvals"]
    return run, approval_id


@pytest.mark.parametrize("attack", ["no-token", "wrong-token", "other-origin", "cross-site-fetch", "json-body"])
def test_a_change_without_a_valid_csrf_token_or_from_another_site_is_refused(board: Board, attack: str) -> None:
    csrf = board.sign_in()
    run, approval_id = _pending(board)
    data: dict[str, str] = {"decision": "approve", "note": "forged"}
    headers: dict[str, str] = {}
    if attack == "wrong-token":
        data["csrf"] = csrf[:-2] + "xx"
    elif attack == "other-origin":
        data["csrf"] = csrf
        headers["Origin"] = "https://evil.example"
    elif attack == "cross-site-fetch":
        data["csrf"] = csrf
        headers["Sec-Fetch-Site"] = "cross-site"
    if attack == "json-body":
        response = board.client.post(f"/ui/approvals/{approval_id}/decide", json={**data, "csrf": csrf},
                                      follow_redirects=False)
        assert response.status_code == 400
    else:
        response = board.client.post(f"/ui/approvals/{approval_id}/decide", data=data, headers=headers,
                                      follow_redirects=False)
        assert response.status_code == 403 and "refused" in response.text
    assert board.api("GET", f"/v1/runs/{run['id']}")["status"] == "waiting_approval"
    assert [a["id"] for a in board.api("GET", "/v1/approvals")] == [approval_id]


def test_approve_with_a_note_resumes_the_run(board: Board) -> None:
    csrf = board.sign_in()
    run, approval_id = _pending(board)
    page = board.client.get("/ui/approvals")
    assert approval_id in page.text and "/srv/old-report.csv" in page.text and "irreversible-approval" in page.text
    response = board.client.post(f"/ui/approvals/{approval_id}/decide",
                                 data={"csrf": csrf, "decision": "approve", "note": "old file <b>ok</b>",
                                       "back": "/ui/approvals"}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/approvals?decided={approval_id}&verdict=approved"
    _wait(lambda: board.api("GET", f"/v1/runs/{run['id']}")["status"] == "completed")
    history = board.client.get(response.headers["location"]).text
    assert "old file &lt;b&gt;ok&lt;/b&gt;" in history and "operator:dashboard:" in history
    again = board.client.post(f"/ui/approvals/{approval_id}/decide", data={"csrf": csrf, "decision": "deny"},
                              follow_redirects=False)
    assert again.headers["location"].endswith(f"conflict={approval_id}")


def test_deny_resumes_the_run_with_the_refusal(board: Board) -> None:
    csrf = board.sign_in()
    run, approval_id = _pending(board)
    response = board.client.post(f"/ui/approvals/{approval_id}/decide",
                                 data={"csrf": csrf, "decision": "deny", "note": "keep it"}, follow_redirects=False)
    assert response.status_code == 303
    _wait(lambda: board.api("GET", f"/v1/runs/{run['id']}")["status"] == "completed")
    messages = board.api("GET", f"/v1/runs/{run['id']}")["messages"]
    assert any(m.get("role") == "tool" and "denied" in m["content"] for m in messages)
    timeline = board.client.get(f"/ui/runs/{run['id']}").text
    assert "keep it" in timeline and 'data-decision="denied"' in timeline


@pytest.mark.parametrize("choice", ["", "maybe", "APPROVE"])
def test_a_decision_must_be_approve_or_deny(board: Board, choice: str) -> None:
    csrf = board.sign_in()
    _, approval_id = _pending(board)
    response = board.client.post(f"/ui/approvals/{approval_id}/decide", data={"csrf": csrf, "decision": choice})
    assert response.status_code == 400
    assert [a["id"] for a in board.api("GET", "/v1/approvals")] == [approval_id]


def test_the_demo_run_timeline_shows_the_refused_call_with_its_policy_and_provenance(board: Board) -> None:
    board.sign_in()
    run = board.run("inbox-assistant", TASK)
    assert run["status"] == "completed"
    page = board.client.get(f"/ui/runs/{run['id']}").text
    row = re.search(r'<tr class="row-deny"[^>]*data-tool="send_email" data-decision="deny">(.*?)</tr>', page, re.S)
    assert row, page
    assert "external-tainted-target" in row.group(1)
    assert "security-audit@evil.example" in row.group(1)
    assert "from tool:read_email" in row.group(1)  # where the recipient came from
    assert "crm_live_0123456789abcdef" not in page  # the key the CRM tool echoed is redacted
    assert "[secret:crm_api_key]" in page
    for step in ("list_inbox", "read_email", "crm_lookup"):
        assert f'data-tool="{step}" data-decision="allow"' in page
    assert "inline://" in page  # the sandbox of each executed call


def test_hostile_tool_output_model_text_and_arguments_are_escaped(board: Board) -> None:
    board.sign_in()
    run = board.run("web-reader", "read the report")
    for path in (f"/ui/runs/{run['id']}", f"/ui/runs/{run['id']}?fragment=1", "/ui/audit", "/ui/runs"):
        page = board.client.get(path)
        assert page.status_code == 200
        assert "<script>window" not in page.text and "<img src=\"x\"" not in page.text
        assert 'href="javascript:' not in page.text and "<svg onload" not in page.text
        assert page.headers["content-security-policy"] == CSP
    text = board.client.get(f"/ui/runs/{run['id']}").text
    assert "&lt;script&gt;window.__pwned = &#34;script&#34;" in text  # shown, as text
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP and "script-src 'self'" in CSP
    assert HOSTILE not in text


def test_pages_carry_security_headers_and_errors_are_pages_not_500s(board: Board) -> None:
    board.sign_in()
    for path in ("/ui/runs/run_missing", "/ui/runs/" + "x" * 300, "/ui/approvals/apv_missing", "/ui/runs/a%20b"):
        response = board.client.get(path)
        assert response.status_code in {404, 409}, (path, response.status_code)
        assert response.headers["x-frame-options"] == "DENY" and "text/html" in response.headers["content-type"]
    weird = ["/ui/runs?cursor=garbage", "/ui/runs?cursor=nan~x", "/ui/runs?status=nope&agent=" + "a" * 5000,
             "/ui/audit?since=yesterday&until=99999999999999", "/ui/audit?before=-1&seq=abc",
             "/ui/audit?kind=%00&agent=%27%3B%20DROP%20TABLE%20runs", "/ui/runs/run_x?after=-5",
             "/ui/approvals?cursor=1e999~x", "/ui/audit?since=2026-13-45"]
    for path in weird:
        response = board.client.get(path)
        assert response.status_code in {200, 404}, (path, response.status_code, response.text[:300])
    assert board.api("GET", "/v1/runs") is not None  # the runs table survived the quote
    text = board.client.get("/ui/audit?since=yesterday").text
    assert "since: give YYYY-MM-DDTHH:MM" in text


def test_bad_form_bodies_are_refused_clearly(board: Board) -> None:
    csrf = board.sign_in()
    _, approval_id = _pending(board)
    path = f"/ui/approvals/{approval_id}/decide"
    huge = board.client.post(path, data={"csrf": csrf, "decision": "approve", "note": "x" * 70_000})
    assert huge.status_code == 400 and "larger than" in huge.text
    binary = board.client.post(path, content=b"\xff\xfe=\xff", headers={"content-type":
                                                                        "application/x-www-form-urlencoded"})
    assert binary.status_code == 400
    multipart = board.client.post(path, files={"csrf": (None, csrf)})
    assert multipart.status_code == 400
    assert [a["id"] for a in board.api("GET", "/v1/approvals")] == [approval_id]


def test_the_runs_list_pages_through_every_run_once(board: Board) -> None:
    board.sign_in()
    runs = board.service.platform.runs
    ids = {runs.create("janitor", f"task {i}", "scripted://x").id for i in range(123)}
    seen: list[str] = []
    path = "/ui/runs"
    pages = 0
    while path:
        text = board.client.get(path).text
        seen += re.findall(r'<tr data-run="([^"]+)"', text)
        more = re.search(r'<a class="more" href="([^"]+)"', text)
        path = more.group(1).replace("&amp;", "&") if more else ""
        pages += 1
    assert pages == 3 and len(seen) == len(set(seen)) == 123 and set(seen) == ids
    fresh = board.client.get(f"/ui/runs/{seen[0]}")  # a run that has not started: no model calls, no events
    assert fresh.status_code == 200 and "No gateway decisions recorded" in fresh.text
    assert "123 runs" in board.client.get("/ui/runs").text


def test_audit_search_filters_and_pages(board: Board) -> None:
    board.sign_in()
    log = board.service.platform.audit
    for i in range(130):
        log.append("decision", agent="finder", run_id=f"run_s{i % 3}", tool="t", decision="deny" if i % 2 else
                   "allow", data={"policy_ids": [f"rule-{i % 2}"], "i": i})
    log.flush()
    seen: list[str] = []
    path = "/ui/audit?agent=finder&decision=deny"
    while path:
        text = board.client.get(path).text
        seen += re.findall(r'<tr data-seq="(\d+)"', text)
        more = re.search(r'<a class="more" href="([^"]+)"', text)
        path = more.group(1).replace("&amp;", "&") if more else ""
    assert len(seen) == len(set(seen)) == 65
    assert [int(s) for s in seen] == sorted((int(s) for s in seen), reverse=True)
    only = board.client.get("/ui/audit?agent=finder&run_id=run_s1&decision=deny").text
    assert len(re.findall(r'<tr data-seq="', only)) == 22


def test_verify_names_the_first_bad_event(board: Board) -> None:
    csrf = board.sign_in()
    board.run("inbox-assistant", TASK)
    board.service.platform.audit.flush()
    assert board.client.post("/ui/audit/verify", data={"csrf": "x"}).status_code == 403
    assert board.client.post("/ui/audit/verify", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    _wait(lambda: "Verified" in board.client.get("/ui/audit").text)
    board.service.platform.store.execute("UPDATE audit_events SET decision = 'allow' WHERE seq = 7")
    board.client.post("/ui/audit/verify", data={"csrf": csrf})
    _wait(lambda: "FAILED at event" in board.client.get("/ui/audit").text)
    assert "<strong>#7</strong>" in board.client.get("/ui/audit").text


def test_the_audit_page_draws_the_five_reports(board: Board) -> None:
    board.sign_in()
    board.run("inbox-assistant", TASK)
    text = board.client.get("/ui/audit").text
    for name in ("denied", "approvals", "tools", "tokens", "runs"):
        assert f'id="report-{name}"' in text
    assert text.count("<svg class=\"chart\"") >= 7
    assert "Denied calls over time" in text and "Cost by agent and model" in text


def test_the_platform_page_lists_packs_with_hits_backends_and_agents(board: Board) -> None:
    board.sign_in()
    board.run("inbox-assistant", TASK)
    text = board.client.get("/ui/platform").text
    hits = re.search(r'<tr data-rule="external-tainted-target">(.*?)</tr>', text, re.S)
    assert hits and re.search(r'<td class="num">1</td>', hits.group(1))
    assert "read-permit" in text and "wasm://" in text and "bwrap://" in text
    assert "janitor" in text and "remove_file" in text and "irreversible" in text
    assert "No webhooks configured" in text


def test_the_live_feed_tells_signed_in_pages_about_runs(board: Board) -> None:
    board.sign_in()
    cookie = board.client.cookies.get("sw_session", path="/ui")
    with board.client.websocket_connect("/ui/live", headers={"cookie": f"sw_session={cookie}"}) as socket:
        run = board.run("web-reader", "read")
        kinds = set()
        while "finished" not in kinds:
            event = socket.receive_json()
            assert set(event) == {"run_id", "agent", "kind", "status", "steps", "seq", "ts"}
            assert event["run_id"] == run["id"]
            kinds.add(event["kind"])
        assert "<script>" not in str(event)


@pytest.mark.parametrize("how", ["no-cookie", "bad-cookie", "other-origin"])
def test_the_live_feed_refuses_strangers(board: Board, how: str) -> None:
    board.sign_in()
    cookie = board.client.cookies.get("sw_session", path="/ui")
    headers = {"cookie": f"sw_session={cookie}"}
    if how == "no-cookie":
        headers = {}
    elif how == "bad-cookie":
        headers = {"cookie": "sw_session=forged"}
    else:
        headers["origin"] = "https://evil.example"
    board.client.cookies.clear()
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as closed, board.client.websocket_connect("/ui/live", headers=headers):
        pass
    assert closed.value.code == 4401


@pytest.mark.parametrize("value", ["//evil.example/ui", "https://evil.example", "/\\evil", "javascript:alert(1)",
                                   "/ui\n/x", "ui/runs", "/other"])
def test_sign_in_never_redirects_away(value: str) -> None:
    assert safe_next(value) == "/ui/runs"
    assert safe_next("/ui/approvals/apv_1") == "/ui/approvals/apv_1"


@pytest.mark.parametrize("value", ["javascript:alert(1)", "JaVaScRiPt:x", " javascript:x", "data:text/html,x",
                                   "vbscript:x", "//evil", "java\nscript:x"])
def test_unsafe_url_schemes_become_inert(value: str) -> None:
    assert safe_url(value) == "#"
    assert safe_url("https://example.com/a") == "https://example.com/a" and safe_url("/ui/runs") == "/ui/runs"


def test_the_dashboard_can_be_turned_off(tmp_path: Path) -> None:
    config = load_config(build(tmp_path), environ={})
    config = replace(config, dashboard=replace(config.dashboard, enabled=False))
    platform = Platform.open(config, role="server")
    try:
        service = Service(platform)
        service.create_operator_token()
        with TestClient(create_app(service, expiry_interval_s=3600)) as client:
            assert client.get("/ui/login").status_code == 404
            assert client.get("/ui/runs", follow_redirects=False).status_code == 404
    finally:
        asyncio.run(platform.aclose())


def _wait(check: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def test_expired_approvals_are_in_the_history(board: Board) -> None:
    board.sign_in()
    _, approval_id = _pending(board)
    board.service.platform.store.execute("UPDATE approvals SET expires_at = 0 WHERE id = ?", [approval_id])
    page = board.client.get("/ui/approvals").text
    row = re.search(rf'<tr data-approval="{approval_id}">(.*?)</tr>', page, re.S)
    assert row and "expired" in row.group(1) and "timeout" in row.group(1)
    assert 'id="no-pending"' in page


def test_a_run_driven_by_a_worker_shows_its_checkpoint_from_the_bus(board: Board) -> None:
    import json

    from stitchwork.agents.runs import RunRecord, RunStatus, record_to_row

    board.sign_in()
    hub = board.service.platform.events
    record = RunRecord(id="run_worker00000001", agent="janitor", task="queued <b>task</b>", model="m",
                       status=RunStatus.COMPLETED, messages=({"role": "user", "content": "hello <i>there</i>"},),
                       created_at=1.0, updated_at=2.0)
    hub.sync.publish(hub.subjects.state(record.id), json.dumps(record_to_row(record)).encode())
    page = board.client.get(f"/ui/runs/{record.id}")
    assert page.status_code == 200 and "A worker drives this run" in page.text
    assert "hello &lt;i&gt;there&lt;/i&gt;" in page.text and "queued &lt;b&gt;task&lt;/b&gt;" in page.text


def test_behind_a_proxy_the_public_url_is_our_origin(board: Board) -> None:
    csrf = board.sign_in()
    dashboard = board.client.app.state.dashboard  # type: ignore[attr-defined]
    dashboard.config = replace(dashboard.config, public_url="https://sw.example")
    _, approval_id = _pending(board)
    path = f"/ui/approvals/{approval_id}/decide"
    refused = board.client.post(path, data={"csrf": csrf, "decision": "deny"}, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403
    done = board.client.post(path, data={"csrf": csrf, "decision": "deny"}, headers={"Origin": "https://sw.example"},
                             follow_redirects=False)
    assert done.status_code == 303
