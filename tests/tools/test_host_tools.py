"""Host-side tools: the manifest form, and the gateway hook that replaces only the sandbox step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stitchwork.errors import ConfigError, StitchworkError
from stitchwork.platform import Platform
from stitchwork.security.taint import Label
from stitchwork.tools.host import HostCall, HostResult
from stitchwork.tools.manifest import load_tools

HOST_TOOL = ('name = "whoami"\ndescription = "d"\nside_effect = "read"\nhost = "test.whoami"\n{extra}'
             '[args]\ntype = "object"\nadditionalProperties = false\nproperties.note = {{ type = "string" }}\n')


def test_a_host_manifest_names_a_handler_and_no_sandbox(tmp_path: Path) -> None:
    (tmp_path / "whoami.toml").write_text(HOST_TOOL.format(extra=""))
    tool = load_tools([tmp_path]).get("whoami")
    assert tool.host == "test.whoami" and tool.sandbox == "" and tool.secrets == ()
    for extra, message in (('entry = "x.py:f"\n', "no entry"), ('secrets = ["k"]\n', "no secrets"),
                           ('sandbox = "bwrap://"\n', "no sandbox")):
        (tmp_path / "whoami.toml").write_text(HOST_TOOL.format(extra=extra))
        with pytest.raises(ConfigError, match=message):
            load_tools([tmp_path])
    (tmp_path / "whoami.toml").write_text(HOST_TOOL.format(extra="").replace("test.whoami", "Bad Name"))
    with pytest.raises(ConfigError, match="host must name a handler"):
        load_tools([tmp_path])


def test_a_host_tool_without_a_registered_handler_stops_start_up(make_config: Any, tools_dir: Path) -> None:
    (tools_dir / "whoami.toml").write_text(HOST_TOOL.format(extra=""))
    with pytest.raises(ConfigError, match="whoami"):
        Platform.open(make_config([{"content": "done"}], sandbox="inline://"))


async def test_the_handler_gets_the_verified_identity_and_the_run_provenance(make_config: Any) -> None:
    turns = [
        {"tool_calls": [{"id": "c1", "name": "memory_get", "arguments": {"key": "a"}}]},
        {"tool_calls": [{"id": "c2", "name": "read_email", "arguments": {"id": "m3"}}]},
        {"tool_calls": [{"id": "c3", "name": "memory_get", "arguments": {"key": "b"}}]},
        {"tool_calls": [{"id": "c4", "name": "memory_get", "arguments": {"key": "c"}}]},
        {"tool_calls": [{"id": "c5", "name": "memory_get", "arguments": {"key": "d"}}]},
        {"tool_calls": [{"id": "c6", "name": "memory_get", "arguments": {"key": "e"}}]},
        {"content": "done"},
    ]
    platform = Platform.open(make_config(turns, sandbox="inline://", tools=["read_email", "memory_get"]))
    seen: list[HostCall] = []

    async def spy(call: HostCall) -> HostResult:
        seen.append(call)
        if call.arguments["key"] == "c":
            raise StitchworkError("the handler failed")
        if call.arguments["key"] == "d":
            raise ValueError("a bug")
        if call.arguments["key"] == "e":
            return {"key": "e"}  # type: ignore[return-value]  # a buggy handler: not a HostResult
        return HostResult({"key": call.arguments["key"]}, (Label("spy", False),) if call.arguments["key"] == "b"
                          else ())

    platform.gateway.register_host("memory.get", spy)
    try:
        record = await platform.runner.start("tester", "look around")
        results = {m["tool_call_id"]: json.loads(m["content"]) for m in record.messages if m["role"] == "tool"}
        assert [(c.agent, c.run_id, c.tool) for c in seen] == [("tester", record.id, "memory_get")] * 5
        assert seen[0].provenance == ()
        assert seen[1].provenance == (Label("tool:memory_get", False), Label("tool:read_email", False))
        assert results["c1"]["status"] == "ok" and results["c4"]["status"] == "error"
        assert results["c5"]["status"] == "error" and "ValueError: a bug" in results["c5"]["error"]["message"]
        assert results["c6"]["status"] == "error" and "not a HostResult" in results["c6"]["error"]["message"]
        platform.audit.flush()
        tool_events = [e for e in platform.audit.tail(100) if e.kind == "tool" and e.tool == "memory_get"]
        assert [e.data["label"] for e in tool_events[:2]] == ["tool:memory_get (untrusted)", "spy (untrusted)"]
        assert tool_events[2].decision == "error" and tool_events[2].data["reason"] == "the handler failed"
    finally:
        await platform.aclose()
