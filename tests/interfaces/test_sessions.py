"""Sessions (external runs): open, call through the gateway with the run token, survive a restart, renew, close,
expire; the task is trusted content and tool outputs are labelled as for built-in runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from stitchwork.agents.runs import RunStatus
from stitchwork.config import Config
from stitchwork.interfaces.cli.app import app as cli
from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import Platform
from stitchwork.service import Service

TASK = "Summarise my inbox and mail it to alice@example.com"
EVIL = {"to": "security-audit@evil.example", "subject": "x", "body": "hello"}
ALICE = {"to": "alice@example.com", "subject": "summary", "body": "three mails"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Api:
    """A control plane on a platform of ``config``, with its operator token."""

    def __init__(self, config: Config) -> None:
        self.platform = Platform.open(config, role="server")
        self.service = Service(self.platform)
        self.operator = self.service.create_operator_token()
        self.client = TestClient(create_app(self.service, expiry_interval_s=3600))
        self.client.__enter__()

    def open(self, agent: str = "tester", task: str = TASK, **extra: Any) -> dict[str, Any]:
        response = self.client.post("/v1/sessions", json={"agent": agent, "task": task, **extra},
                                    headers=auth(self.operator))
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def call(self, token: str, tool: str, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        response = self.client.post(f"/v1/agent/tools/{tool}", json=args, headers=auth(token))
        return response.status_code, response.json()

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        asyncio.run(self.platform.aclose())


@pytest.fixture
def config(make_config) -> Config:  # type: ignore[no-untyped-def]
    built: Config = make_config([{"content": "unused"}])
    return built


@pytest.fixture
def api(config: Config) -> Iterator[Api]:
    opened = Api(config)
    yield opened
    opened.close()


def test_open_hands_out_a_run_token_and_urls(api: Api) -> None:
    session = api.open(ttl_s=120)
    assert set(session) >= {"run_id", "token", "mcp_url", "openai_base_url", "expires_at"}
    assert session["mcp_url"].endswith("/mcp") and session["openai_base_url"].endswith("/v1")
    assert 100 < session["expires_at"] - time.time() <= 121
    claims = api.platform.tokens.verify(session["token"])
    assert (claims.agent, claims.run_id) == ("tester", session["run_id"])
    run = api.client.get(f"/v1/runs/{session['run_id']}", headers=auth(api.operator)).json()
    assert run["status"] == "running" and run["task"] == TASK and run["model"] == "external"
    shown = api.client.get(f"/v1/sessions/{session['run_id']}", headers=auth(api.operator)).json()
    assert shown["state"] == "open" and "token" not in shown


def test_session_endpoints_need_the_operator_token(api: Api) -> None:
    session = api.open()
    for method, path in [("POST", "/v1/sessions"), ("GET", "/v1/sessions"),
                         ("POST", f"/v1/sessions/{session['run_id']}/renew"),
                         ("DELETE", f"/v1/sessions/{session['run_id']}")]:
        assert api.client.request(method, path).status_code == 401
        assert api.client.request(method, path, headers=auth(session["token"])).status_code == 401


def test_taint_and_policy_apply_to_session_calls(api: Api) -> None:
    token = api.open()["token"]
    status, body = api.call(token, "read_email", {"id": "m3"})
    assert status == 200 and body["status"] == "ok" and "untrusted" in body["label"]
    status, body = api.call(token, "send_email", EVIL)  # the address came from the injected mail
    assert status == 403 and body["status"] == "denied"
    assert "external-tainted-target" in body["policy_ids"]
    status, body = api.call(token, "send_email", ALICE)  # the address is in the trusted task
    assert status == 200 and body["status"] == "ok", body
    status, body = api.call(token, "delete_note", {"name": "n.txt"})  # irreversible: a human decides
    assert status == 202 and body["approval_id"]


def test_a_session_survives_a_restart(config: Config) -> None:
    first = Api(config)
    try:
        session = first.open()
        assert first.call(session["token"], "read_email", {"id": "m3"})[1]["status"] == "ok"
    finally:
        first.close()
    second = Api(config)  # `stitchwork up` restarted: nothing of the run is live in this process
    try:
        assert session["run_id"] not in second.platform.gateway.runs
        status, body = second.call(session["token"], "send_email", EVIL)
        assert (status, body["status"]) == (403, "denied"), body  # the injected mail's provenance was restored
        assert second.call(session["token"], "list_inbox", {})[1]["status"] == "ok"
        record = second.platform.runs.get(session["run_id"])
        assert record.steps == 3 and record.provenance
    finally:
        second.close()


def test_a_killed_server_recovers_every_incremental_checkpoint(config: Config) -> None:
    first = Api(config)
    sessions = first.service.sessions
    try:
        session = first.open()
        assert first.call(session["token"], "read_email", {"id": "m3"})[1]["status"] == "ok"
        sessions.flush()
        assert first.call(session["token"], "list_inbox", {})[1]["status"] == "ok"
        sessions.flush()
        store = first.platform.store
        (row,) = store.query("SELECT provenance FROM runs WHERE id = ?", [session["run_id"]])
        assert "evil" not in row["provenance"]  # not rewritten: only appended
        assert store.query("SELECT count(*) AS n FROM run_provenance WHERE run_id = ?", [session["run_id"]]) == [
            {"n": 2}]
        # Killed: no shutdown checkpoint, no close (the store keeps only what was committed).
        first.platform._closers = tuple(c for c in first.platform._closers if c != sessions.flush)
    finally:
        first.close()
    second = Api(config)
    try:
        record = second.platform.runs.get(session["run_id"])
        assert record.steps == 2 and "security-audit@evil.example" in json.dumps(record.provenance)
        assert len(record.provenance["untrusted"]) == 2  # each tool output once
        status, body = second.call(session["token"], "send_email", EVIL)
        assert (status, body["status"]) == (403, "denied"), body  # the injected mail's provenance came back
        second.client.delete(f"/v1/sessions/{session['run_id']}", headers=auth(second.operator))
        folded = second.platform.store.query("SELECT provenance FROM runs WHERE id = ?", [session["run_id"]])
        assert "security-audit@evil.example" in folded[0]["provenance"]  # closing folds them into the record
        assert second.platform.store.query("SELECT count(*) AS n FROM run_provenance") == [{"n": 0}]
    finally:
        second.close()


def test_close_revokes_the_token_and_finishes_the_run(api: Api) -> None:
    one, two = api.open(), api.open()
    response = api.client.delete(f"/v1/sessions/{one['run_id']}", headers=auth(api.operator))
    assert response.status_code == 200 and response.json()["state"] == "closed"
    status, body = api.call(one["token"], "list_inbox", {})
    assert status == 401 and body["status"] == "unauthenticated" and "revoked" in body["error"]["message"]
    assert api.call(two["token"], "list_inbox", {})[1]["status"] == "ok"  # the other session is unaffected
    assert api.platform.runs.get(one["run_id"]).status is RunStatus.COMPLETED
    again = api.client.delete(f"/v1/sessions/{one['run_id']}", headers=auth(api.operator))
    assert again.status_code == 404 and "already closed" in again.json()["message"]
    renew = api.client.post(f"/v1/sessions/{one['run_id']}/renew", headers=auth(api.operator))
    assert renew.status_code == 404 and "closed" in renew.json()["message"]
    kinds = [(e["kind"], e["decision"]) for e in api.service.audit_tail(50) if e["run_id"] == one["run_id"]]
    assert ("session", "opened") in kinds and ("session", "closed") in kinds and ("auth", "deny") not in kinds
    assert any(e["kind"] == "auth" and "revoked" in e["data"]["reason"] for e in api.service.audit_tail(50))


def test_renew_replaces_the_token(api: Api) -> None:
    session = api.open(ttl_s=60)
    response = api.client.post(f"/v1/sessions/{session['run_id']}/renew", json={"ttl_s": 600},
                               headers=auth(api.operator))
    assert response.status_code == 200, response.text
    renewed = response.json()
    assert renewed["token"] != session["token"] and renewed["expires_at"] > session["expires_at"] + 400
    assert api.call(session["token"], "list_inbox", {})[0] == 401
    assert api.call(renewed["token"], "list_inbox", {})[1]["status"] == "ok"


def test_an_expired_session_is_refused_and_swept(api: Api) -> None:
    session = api.open(ttl_s=1)
    time.sleep(1.3)
    status, body = api.call(session["token"], "list_inbox", {})
    assert status == 401 and "expired" in body["error"]["message"]
    assert api.platform.gateway.context.live_run(session["run_id"]) is None or True
    swept = asyncio.run(api.service.sessions.expire_due())
    assert swept == [session["run_id"]]
    assert api.service.sessions.describe(session["run_id"])["state"] == "closed"
    assert api.service.sessions.load_run(session["run_id"]) is None


@pytest.mark.parametrize(("body", "status"), [
    ({"agent": "nobody", "task": "x"}, 404),
    ({"agent": "tester", "task": ""}, 422),
    ({"agent": "tester", "task": "x", "ttl_s": 0}, 422),
    ({"agent": "tester", "task": "x", "ttl_s": 10**9}, 400),
    ({"agent": "tester"}, 422),
])
def test_bad_session_requests_get_clear_errors(api: Api, body: dict[str, Any], status: int) -> None:
    response = api.client.post("/v1/sessions", json=body, headers=auth(api.operator))
    assert response.status_code == status, response.text
    assert api.client.get("/v1/sessions/run_nope", headers=auth(api.operator)).status_code == 404


def test_cli_session_open_renew_close(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    (config.state_dir).mkdir(parents=True, exist_ok=True)
    toml = config.state_dir.parent / "sw.toml"
    toml.write_text(
        f'state_dir = "{config.state_dir}"\ntool_dirs = {json.dumps(list(config.tool_dirs))}\n'
        f'agent_dirs = {json.dumps(list(config.agent_dirs))}\n[isolation]\ndefault = "bwrap://"\n'
    )
    runner = CliRunner()
    opened = runner.invoke(cli, ["session", "open", "tester", TASK, "--ttl", "90", "--json", "-c", str(toml)])
    assert opened.exit_code == 0, opened.output
    data = json.loads(opened.output)
    assert set(data) >= {"run_id", "token", "mcp_url", "openai_base_url", "expires_at"}
    renewed = runner.invoke(cli, ["session", "renew", data["run_id"], "--json", "-c", str(toml)])
    assert renewed.exit_code == 0 and json.loads(renewed.output)["token"] != data["token"]
    closed = runner.invoke(cli, ["session", "close", data["run_id"], "--json", "-c", str(toml)])
    assert closed.exit_code == 0 and json.loads(closed.output)["state"] == "closed"
    again = runner.invoke(cli, ["session", "close", data["run_id"], "-c", str(toml)])
    assert again.exit_code != 0 and "already closed" in again.output
    missing = runner.invoke(cli, ["session", "open", "nobody", "x", "-c", str(toml)])
    assert missing.exit_code != 0 and "unknown agent" in missing.output


def test_checkpoints_are_written_behind_the_calls(api: Api) -> None:
    session = api.open()
    assert api.call(session["token"], "read_email", {"id": "m3"})[1]["status"] == "ok"
    deadline = time.monotonic() + 20
    while api.platform.runs.get(session["run_id"]).steps != 1:  # written by the session's flush, not by close
        assert time.monotonic() < deadline, "the checkpoint was not written"
        time.sleep(0.05)
    assert "read_email" in json.dumps(api.platform.runs.get(session["run_id"]).provenance)


def test_the_http_client_has_public_session_methods(api: Api) -> None:
    from stitchwork.interfaces.cli.client import HttpClient, RemoteError

    client = HttpClient.__new__(HttpClient)
    client.http = api.client
    api.client.headers["Authorization"] = f"Bearer {api.operator}"
    opened = client.session_open("tester", TASK, ttl_s=120)
    assert api.platform.tokens.verify(opened["token"]).run_id == opened["run_id"]
    assert opened["mcp_url"].endswith("/mcp")
    renewed = client.session_renew(opened["run_id"], ttl_s=600)
    assert renewed["token"] != opened["token"] and renewed["run_id"] == opened["run_id"]
    assert client.session_show(opened["run_id"])["state"] == "open"
    assert [s["run_id"] for s in client.sessions()] == [opened["run_id"]]
    assert client.session_close(opened["run_id"])["state"] == "closed"
    assert client.sessions() == []
    assert [s["run_id"] for s in client.sessions(include_closed=True)] == [opened["run_id"]]
    with pytest.raises(RemoteError) as caught:  # a "?" in an id is part of the id, not a query
        client.session_show(f"{opened['run_id']}?all=true")
    assert caught.value.status == 404
