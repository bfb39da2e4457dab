"""The operator's side of agent memory: ``stitchwork memory ...`` and ``/v1/memory`` (grants, listing, search), and
the retention timer of ``stitchwork up``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from stitchwork.config import RetentionConfig
from stitchwork.interfaces.cli.app import app
from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import Platform
from stitchwork.security.taint import Label
from stitchwork.service import Service

MAIL = Label("tool:read_email", False)


@pytest.fixture
def api(make_config: Any) -> Iterator[tuple[TestClient, Platform]]:
    platform = Platform.open(make_config([{"content": "done"}], sandbox="inline://"), role="server")
    service = Service(platform)
    token = service.create_operator_token()
    with TestClient(create_app(service, expiry_interval_s=3600)) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, platform
    asyncio.run(platform.aclose())


def test_grants_listing_and_search_over_the_api(api: tuple[TestClient, Platform]) -> None:
    client, platform = api
    assert platform.memory is not None
    platform.memory.put("tester", "invoice", text="invoice 2291 due on the 15th", labels=[MAIL])
    assert client.get("/v1/memory").json()[0] | {"updated_at": 0} == {"agent": "tester", "items": 1,
                                                                        "updated_at": 0}
    items = client.get("/v1/memory/tester").json()
    assert [(i["key"], i["trusted"], i["labels"]) for i in items] == [
        ("invoice", False, ["tool:read_email (untrusted)"])]
    assert [h["key"] for h in client.get("/v1/memory/tester/search", params={"q": "invoice"}).json()] == ["invoice"]

    body = {"owner": "tester", "grantee": "assistant"}
    assert client.post("/v1/memory/grants", json=body).json()["granted"] is True
    assert platform.memory.allowed("assistant", "tester", "default", "read")
    assert [(g["owner"], g["grantee"], g["granted_by"])
            for g in client.get("/v1/memory/grants").json()] == [("tester", "assistant", "operator:api")]
    assert client.post("/v1/memory/grants/revoke", json=body).json()["granted"] is False
    assert not platform.memory.allowed("assistant", "tester", "default", "read")
    unknown = client.post("/v1/memory/grants", json={"owner": "tester", "grantee": "nobody"})
    assert unknown.status_code == 404 and "nobody" in unknown.json()["message"]
    assert client.post("/v1/memory/grants", json={"owner": "tester", "grantee": "x y"}).status_code == 422
    audited = [e for e in platform.audit.tail(50) if e.kind == "memory"]
    assert [e.decision for e in audited] == ["grant", "revoke"]
    assert client.get("/v1/memory", headers={"Authorization": "Bearer swo_wrong"}).status_code == 401


def test_memory_commands_open_the_platform_locally(make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config([{"content": "done"}], sandbox="inline://")
    (config.state_dir).mkdir(parents=True, exist_ok=True)
    toml = config.state_dir / "stitchwork.toml"
    toml.write_text(f"tool_dirs = {json.dumps(list(config.tool_dirs))}\nagent_dirs = "
                    f"{json.dumps(list(config.agent_dirs))}\n[isolation]\ndefault = \"inline://\"\n"
                    "allow_inline = true\n")
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(config.state_dir))
    runner = CliRunner()

    def invoke(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    assert "assistant may read tester's memory" in invoke("memory", "grant", "tester", "assistant")
    assert json.loads(invoke("memory", "grants", "--format", "json"))[0]["grantee"] == "assistant"
    assert "no longer" in invoke("memory", "revoke", "tester", "assistant")
    assert json.loads(invoke("memory", "grants", "--format", "json")) == []
    assert json.loads(invoke("memory", "ls", "--format", "json")) == []
    failed = runner.invoke(app, ["memory", "grant", "tester", "ghost"])
    assert failed.exit_code == 2 and "ghost" in failed.output


def test_up_applies_retention_on_its_timer(make_config: Any, tmp_path: Path) -> None:
    base = make_config([{"content": "done"}], sandbox="inline://")
    retention = RetentionConfig(memory_days=1e-9, interval_s=0.05)
    platform = Platform.open(base.replace(data=dataclasses.replace(base.data, retention=retention)), role="server")
    assert platform.memory is not None
    platform.memory.put("tester", "old", text="stale", labels=[Label("user", True)])
    try:
        with TestClient(create_app(Service(platform), expiry_interval_s=3600)):
            deadline = time.monotonic() + 30
            while platform.memory.keys("tester") and time.monotonic() < deadline:
                time.sleep(0.05)
        assert platform.memory.keys("tester") == []
        assert any(e.kind == "retention" for e in platform.audit.tail(20))
    finally:
        asyncio.run(platform.aclose())


def test_memory_commands_go_through_a_running_server(api: tuple[TestClient, Platform],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from stitchwork.interfaces.cli import client as client_module

    test_client, platform = api
    http = client_module.HttpClient("http://testserver", "unused")
    http.http = test_client
    monkeypatch.setattr(client_module, "connect", lambda config: http)
    runner = CliRunner()
    result = runner.invoke(app, ["memory", "grant", "tester", "assistant", "--namespace", "team"])
    assert result.exit_code == 0, result.output
    assert platform.memory is not None and platform.memory.allowed("assistant", "tester", "team", "read")
    listed = runner.invoke(app, ["memory", "grants", "tester", "--format", "json"])
    assert json.loads(listed.output)[0]["granted_by"] == "operator:api"
    refused = runner.invoke(app, ["memory", "grant", "tester", "ghost"])
    assert refused.exit_code == 2 and "ghost" in refused.output
    platform.memory.put("tester", "invoice", text="the march invoice is paid", labels=[Label("user", True)],
                        namespace="team")
    owners = json.loads(runner.invoke(app, ["memory", "ls", "--format", "json"]).output)
    assert [o["agent"] for o in owners] == ["tester"]
    items = json.loads(runner.invoke(app, ["memory", "ls", "tester", "-n", "team", "--format", "json"]).output)
    assert [i["key"] for i in items] == ["invoice"]
    assert json.loads(runner.invoke(app, ["memory", "ls", "tester", "-n", "other", "--format", "json"]).output) == []
    hits = json.loads(runner.invoke(app, ["memory", "search", "tester", "march", "--format", "json"]).output)
    assert [h["key"] for h in hits] == ["invoice"]
    revoked = runner.invoke(app, ["memory", "revoke", "tester", "assistant", "--namespace", "team"])
    assert revoked.exit_code == 0 and not platform.memory.allowed("assistant", "tester", "team", "read")
