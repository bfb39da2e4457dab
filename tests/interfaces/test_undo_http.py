"""Undo over HTTP: the operator's ``/v1/runs/{id}/undo`` and ``/calls``, the agent's ``/v1/agent/undo``; their
answers and error shapes (401, 400, 404, 409), and ``stitchwork undo`` / ``runs show`` / ``audit reversible``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from stitchwork.interfaces.cli.app import app as cli
from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import Platform
from stitchwork.service import Service
from tests.service.undo_fixtures import AGENT_TOOLS, SHORT, TURNS, calendar, write_tools


@pytest.fixture
def tools_dir(tools_dir: Path) -> Path:
    write_tools(tools_dir)
    return tools_dir


@pytest.fixture
def api(make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, Service,
                                                                                             dict[str, str], str]]:
    monkeypatch.chdir(tmp_path)  # the inline sandbox runs the tools in the working directory
    platform = Platform.open(make_config(TURNS, sandbox="inline://", tools=AGENT_TOOLS), role="server")
    service = Service(platform)
    headers = {"Authorization": f"Bearer {service.create_operator_token()}"}
    try:
        with TestClient(create_app(service, expiry_interval_s=3600)) as client:
            run = client.post("/v1/runs", json={"agent": "tester", "task": "plan", "wait": True}, headers=headers)
            assert run.status_code == 201 and run.json()["status"] == "completed", run.text
            yield client, service, headers, run.json()["id"]
    finally:
        asyncio.run(platform.aclose())


def test_undo_over_http_for_operators_and_the_runs_agent_with_clear_errors(api: Any, tmp_path: Path) -> None:
    client, service, headers, run_id = api
    undo, calls = f"/v1/runs/{run_id}/undo", f"/v1/runs/{run_id}/calls"
    for method, path in (("GET", calls), ("POST", undo)):  # the operator token on every route
        assert client.request(method, path).status_code == 401
        assert client.request(method, path, headers={"Authorization": "Bearer swo_wrong"}).status_code == 401
    states = client.get(calls, headers=headers).json()
    assert {c["call"]: c["state"] for c in states} == {"c1": "undoable", "c2": "undoable", "c3": "not_undoable",
                                                        "c4": "not_undoable", "c5": "not_undoable"}
    for body in (b"not json", b"[1]", b'"c1"', b'{"call": true}', b'{"call": ""}', b'{"calls": "c1"}',
                 b'{"call": {"id": 1}}', b'{"call": "' + b"x" * 600 + b'"}'):
        bad = client.post(undo, content=body, headers={**headers, "content-type": "application/json"})
        assert bad.status_code == 400, (body, bad.text)
        assert set(bad.json()) >= {"error", "message"}
    assert sorted(calendar(tmp_path)) == ["ev1", "ev2"]  # nothing ran
    unknown = client.post("/v1/runs/run_nope/undo", headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"] == "run_error"
    assert client.get("/v1/runs/run_nope/calls", headers=headers).status_code == 404
    no_call = client.post(undo, json={"call": "c99"}, headers=headers)
    assert no_call.status_code == 404 and "has no call 'c99'" in no_call.json()["message"]
    nothing = client.post(undo, json={"call": "c3"}, headers=headers)
    assert nothing.status_code == 409 and nothing.json()["error"] == "nothing_to_undo"
    assert "declares no undo" in nothing.json()["message"]
    # the run's agent, with its run token (not the operator's), for its own run only
    assert client.post("/v1/agent/undo", headers=headers).status_code == 401
    assert client.post("/v1/agent/undo", headers={"Authorization": "Bearer nope"}).status_code == 401
    bearer = {"Authorization": f"Bearer {service.platform.tokens.issue('tester', run_id)}"}
    assert client.post("/v1/agent/undo", content=b"[", headers=bearer).status_code == 400
    other = {"Authorization": f"Bearer {service.platform.tokens.issue('tester', 'run_other')}"}
    assert client.post("/v1/agent/undo", headers=other).status_code == 404
    by_agent = client.post("/v1/agent/undo", json={"call": "c2"}, headers=bearer)
    assert by_agent.status_code == 200 and by_agent.json()["results"][0]["status"] == "ok"
    assert sorted(calendar(tmp_path)) == ["ev1"]
    login = re.search(r'name="login" value="([^"]+)"', client.get("/ui/login").text)
    assert login is not None
    signed = client.post("/ui/login", data={"login": login.group(1), "token": headers["Authorization"][7:],
                                            "next": "/ui/runs"}, follow_redirects=False)
    assert signed.status_code == 303
    page = client.get(f"/ui/runs/{run_id}").text  # the dashboard's run page shows the same
    assert 'data-call="c2" data-state="undone"' in page and 'data-call="c1" data-state="undoable"' in page
    assert 'data-call="c3" data-state="not_undoable"' in page and "its manifest declares no undo" in page
    every = client.post(undo, headers=headers)  # no body: every call, newest first
    assert every.status_code == 200 and every.json()["ok"] is True
    assert [(r["call"], r["status"]) for r in every.json()["results"]] == [("c2", "already_undone"), ("c1", "ok")]
    assert calendar(tmp_path) == {}
    again = client.post(undo, json={"call": "c1"}, headers=headers)
    assert again.status_code == 200 and [r["status"] for r in again.json()["results"]] == ["already_undone"]
    undos = [e for e in client.get("/v1/audit/tail", params={"n": 200}, headers=headers).json() if e["kind"] == "undo"]
    assert [(u["data"]["call"], u["data"]["by"], u["decision"]) for u in undos] == [
        ("c2", "agent:tester", "ok"), ("c1", "operator:api", "ok")]
    assert client.get("/v1/audit/verify", headers=headers).json()["ok"] is True


def test_the_cli_undoes_and_shows_what_can_be_undone(make_config: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = make_config(SHORT, sandbox="inline://", tools=AGENT_TOOLS)

    async def start() -> str:
        platform = Platform.open(config)
        try:
            return (await platform.runner.start("tester", "plan")).id
        finally:
            await platform.aclose()

    run_id = asyncio.run(start())
    path = tmp_path / "stitchwork.toml"
    path.write_text(f'state_dir = "{config.state_dir}"\ntool_dirs = {json.dumps(list(config.tool_dirs))}\n'
                    f'agent_dirs = {json.dumps(list(config.agent_dirs))}\n'
                    '[isolation]\ndefault = "inline://"\nallow_inline = true\n')
    runner = CliRunner()
    shown = runner.invoke(cli, ["runs", "show", run_id, "--config", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "can be undone" in shown.output and "delete_event" in shown.output
    one = runner.invoke(cli, ["undo", run_id, "--call", "c1", "--json", "--config", str(path)])
    assert one.exit_code == 0, one.output
    assert json.loads(one.output)["results"][0]["status"] == "ok" and sorted(calendar(tmp_path)) == ["ev2"]
    listed = runner.invoke(cli, ["audit", "reversible", run_id, "--json", "--config", str(path)])
    assert {c["call"]: c["state"] for c in json.loads(listed.output)} == {"c1": "undone", "c2": "undoable"}
    (tmp_path / "delete_fails").write_text("")
    failed = runner.invoke(cli, ["undo", run_id, "--config", str(path)])
    assert failed.exit_code == 1 and "unavailable" in failed.output


def test_the_answer_is_202_while_an_undo_waits_for_a_human_and_ok_only_when_all_were_undone() -> None:
    from stitchwork.interfaces.http.undo import answer

    waiting = answer({"run_id": "r", "results": [{"status": "approval_required"}], "waiting": 1})
    assert waiting.status_code == 202 and json.loads(waiting.body)["ok"] is False
    mixed = answer({"run_id": "r", "results": [{"status": "ok"}, {"status": "error"}], "waiting": 0})
    assert mixed.status_code == 200 and json.loads(mixed.body)["ok"] is False
    done = answer({"run_id": "r", "results": [{"status": "ok"}, {"status": "already_undone"}], "waiting": 0})
    assert done.status_code == 200 and json.loads(done.body)["ok"] is True
