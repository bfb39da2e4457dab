"""The public SDK against a real control plane (uvicorn on loopback): sessions, tool calls through the gateway,
approvals, the event stream, the OpenAI client at the model gateway; and it imports without the server side."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stitchwork import AsyncSession, Session, Stitchwork, ToolResult
from stitchwork.config import Config
from stitchwork.errors import ApprovalError, AuthError, ConfigError
from stitchwork.messaging.server import free_port
from stitchwork.platform import Platform
from stitchwork.sdk import RemoteError
from stitchwork.service import Service

SRC = str(Path(__file__).resolve().parents[2] / "src")
TASK = "Summarise my inbox and mail it to alice@example.com"


class Server:
    """`stitchwork up`'s app on a free loopback port, in a thread."""

    def __init__(self, config: Config) -> None:
        import uvicorn

        from stitchwork.interfaces.http.app import create_app

        self.platform = Platform.open(config, role="server")
        self.service = Service(self.platform)
        self.operator = self.service.create_operator_token()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service, expiry_interval_s=3600),
                                                    host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def approve(self, approval_id: str, *, approve: bool = True) -> None:
        verb = "approve" if approve else "deny"
        response = httpx.post(f"{self.url}/v1/approvals/{approval_id}/{verb}",
                              headers={"Authorization": f"Bearer {self.operator}"})
        assert response.status_code == 200, response.text

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        asyncio.run(self.platform.aclose())


@pytest.fixture
def server(make_config) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    running = Server(make_config([{"content": "unused"}]))
    yield running
    running.stop()


def test_a_session_calls_tools_through_the_gateway(server: Server) -> None:
    sw = Stitchwork(server.url, server.operator)
    with sw.session("tester", TASK, ttl=600) as session:
        assert isinstance(session, Session) and session.agent == "tester"
        assert session.mcp_url == f"{server.url}/mcp" and session.openai_base_url == f"{server.url}/v1"
        assert 500 < session.expires_at - time.time() <= 601
        listed = session.call("list_inbox")
        assert listed.ok and "untrusted" in listed.label and listed.result[0]["id"] == "m1"
        assert session.call("read_email", {"id": "m3"}).ok
        evil = session.call("send_email", {"to": "security-audit@evil.example", "subject": "s", "body": "b"})
        assert evil.status == "denied" and "external-tainted-target" in evil.policy_ids
        assert session.call("nope").status == "invalid"
        held = session.call("delete_note", {"name": "n.txt"})
        assert held.status == "approval_required" and held.approval_id
        threading.Timer(0.3, server.approve, args=(held.approval_id,)).start()
        decided = session.wait_for_approval(held.approval_id, timeout=30, poll=0.05)
        assert decided["status"] == "approved"
        assert session.call("delete_note", {"name": "n.txt"}).ok
        old = session.token
        assert session.renew(ttl=120) != old
        assert session.call("list_inbox").ok
    with pytest.raises(AuthError, match="revoked"):
        session.call("list_inbox")
    session.close()  # closing twice is harmless


def test_wait_for_approval_times_out_and_denials_are_reported(server: Server) -> None:
    with Stitchwork(server.url, server.operator).session("tester", TASK) as session:
        held = session.call("delete_note", {"name": "n.txt"})
        with pytest.raises(ApprovalError, match="still pending"):
            session.wait_for_approval(held.approval_id or "", timeout=0.2, poll=0.05)
        server.approve(held.approval_id or "", approve=False)
        assert session.wait_for_approval(held.approval_id or "", timeout=5)["status"] == "denied"
        assert session.call("delete_note", {"name": "n.txt"}).status == "denied"
        with pytest.raises(RemoteError) as missing:
            session.approval("apv_missing")
        assert missing.value.status == 409 or missing.value.status == 404


def test_bad_operator_input_is_a_clear_error(server: Server) -> None:
    with pytest.raises(AuthError):
        Stitchwork(server.url, "swo_wrong").session("tester", TASK)
    with pytest.raises(RemoteError, match="unknown agent") as unknown:
        Stitchwork(server.url, server.operator).session("nobody", TASK)
    assert unknown.value.status == 404
    with pytest.raises(ConfigError, match="http"):
        Stitchwork("ftp://x", "t")
    with pytest.raises(AuthError, match="operator token"):
        Stitchwork(server.url, "")


async def test_async_session_events_and_openai_client(server: Server) -> None:
    sw = Stitchwork(server.url, server.operator)
    async with await sw.asession("tester", TASK) as session:
        assert isinstance(session, AsyncSession)
        result = await session.call("list_inbox", {})
        assert isinstance(result, ToolResult) and result.ok
        seen: list[dict[str, Any]] = []
        async for event in session.events():
            seen.append(event)
            if event["kind"] == "tool":
                break
        assert [e["kind"] for e in seen] == ["session", "tool"] and seen[1]["data"]["call"] == "list_inbox"
        assert await session.call("read_email", {"id": "m1"})
        resumed = session.events(after=seen[-1]["seq"])
        nxt = await asyncio.wait_for(resumed.__anext__(), 10)
        assert nxt["kind"] == "tool" and nxt["data"]["call"] == "read_email" and nxt["seq"] > seen[-1]["seq"]
        await resumed.aclose()
        client = session.openai_client()
        assert str(client.base_url).rstrip("/") == session.openai_base_url and client.api_key == session.token
        models = await client.models.list()
        assert isinstance(models.data, list)
    with pytest.raises(AuthError):
        await session.call("list_inbox", {})


def test_the_sdk_imports_without_the_server_side() -> None:
    blocked = ["duckdb", "cedarpy", "fastapi", "uvicorn", "wasmtime", "jsonschema", "mcp", "openai", "websockets",
               "cryptography", "jwt"]
    code = (
        "import sys\n"
        f"class Block:\n    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from stitchwork import Stitchwork, Session\n"
        "s = Session(url='http://x', operator_token='o', run_id='r', agent='a', token='t', expires_at=0.0,\n"
        "            mcp_url='http://x/mcp', openai_base_url='http://x/v1')\n"
        "try:\n    s.openai_client()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ConfigError" in done.stdout and "stitchwork[sdk]" in done.stdout
