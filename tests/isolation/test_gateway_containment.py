"""Containment seen from the gateway: a hostile tool's call ends with a clear reason and an audit event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stitchwork.platform import Platform
from stitchwork.service import event_dict

HOSTILE_TOOL = '''
def spin():
    while True:
        pass


def read_file(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read()[:64].hex()
'''

MANIFESTS = {
    "spin": 'entry = "hostile.py:spin"\n[limits]\ncpu_s = 1\ntimeout_s = 60\n[args]\ntype = "object"\n',
    "read_file": (
        'entry = "hostile.py:read_file"\n[args]\ntype = "object"\nrequired = ["path"]\n'
        'properties.path = { type = "string" }\n'
    ),
}


@pytest.fixture
def hostile_tools(tools_dir: Path) -> Path:
    (tools_dir / "hostile.py").write_text(HOSTILE_TOOL)
    for name, body in MANIFESTS.items():
        (tools_dir / f"{name}.toml").write_text(
            f'name = "{name}"\ndescription = "hostile"\nside_effect = "read"\n' + body
        )
    return tools_dir


def call(name: str, args: Any, cid: str) -> dict[str, Any]:
    return {"id": cid, "name": name, "arguments": args}


@pytest.mark.parametrize("backend", ["wasm", "bwrap"])
async def test_hostile_calls_are_contained_and_audited(
    backend: str, make_config: Any, hostile_tools: Path, tmp_path: Path
) -> None:
    from conftest import backend_available  # tests/isolation/conftest.py

    ok, reason = backend_available(backend)
    if not ok:
        pytest.skip(f"{backend}:// unavailable: {reason}")
    state = tmp_path / "state"
    turns = [
        {"tool_calls": [call("spin", {}, "c1")]},
        {"tool_calls": [call("read_file", {"path": str(state / "vault.key")}, "c2")]},
        {"content": "done"},
    ]
    config = make_config(turns, sandbox=f"{backend}://", tools=["spin", "read_file"], state=state)
    platform = Platform.open(config)
    try:
        platform.vault.set("planted", "value-the-tool-must-not-see")
        record = await platform.runner.start("tester", "do it")
        results = {m["tool_call_id"]: json.loads(m["content"]) for m in record.messages if m["role"] == "tool"}
        platform.audit.flush()
        tool_events = [event_dict(e) for e in platform.audit.tail(1000) if e.kind == "tool"]
        verified = platform.audit.verify().ok
    finally:
        await platform.aclose()

    assert (state / "vault.key").exists()  # the file the tool went for is there on the host
    assert results["c1"]["status"] == "error" and results["c1"]["error"]["error"] == "tool_cpu", results["c1"]
    assert "CPU time limit" in results["c1"]["error"]["message"]
    assert results["c2"]["status"] == "error", results["c2"]
    assert any(word in results["c2"]["error"]["message"] for word in ("FileNotFoundError", "PermissionError"))
    by_tool = {e["tool"]: e for e in tool_events}
    assert by_tool["spin"]["data"]["killed"] == "cpu" and by_tool["spin"]["decision"] == "error"
    assert by_tool["spin"]["data"]["cpu_s"] >= 1.0  # the cgroup's figure for the killed tool
    assert {e["data"]["isolation"] for e in tool_events} == {"sandbox"}
    assert by_tool["read_file"]["decision"] == "error" and by_tool["read_file"]["data"]["killed"] is None
    assert verified


# -- inline:// (no isolation) is the operator's explicit choice --------------------------------------------------


def test_inline_as_the_default_is_refused_unless_allowed(make_config: Any) -> None:
    from dataclasses import replace

    from stitchwork.errors import ConfigError

    config = make_config([{"content": "done"}], sandbox="inline://")
    refused = replace(config, isolation=replace(config.isolation, allow_inline=False))

    with pytest.raises(ConfigError, match=r"\[isolation\] default.*NO isolation.*allow_inline"):
        Platform.open(refused)


def test_a_manifest_naming_inline_is_refused_unless_allowed(make_config: Any, hostile_tools: Path) -> None:
    from stitchwork.errors import ConfigError

    (hostile_tools / "spin.toml").write_text(
        'name = "spin"\ndescription = "hostile"\nside_effect = "read"\nentry = "hostile.py:spin"\n'
        'sandbox = "inline://"\n[args]\ntype = "object"\n'
    )
    config = make_config([{"content": "done"}], sandbox="bwrap://", tools=["spin"])

    with pytest.raises(ConfigError, match=r"tool 'spin'.*allow_inline"):
        Platform.open(config)


async def test_a_call_under_allowed_inline_is_audited_as_no_isolation(
    make_config: Any, hostile_tools: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    turns = [{"tool_calls": [call("read_file", {"path": str(hostile_tools / "hostile.py")}, "c1")]}, {"content": "ok"}]
    platform = Platform.open(make_config(turns, sandbox="inline://", tools=["read_file"]))  # allow_inline: on
    try:
        await platform.runner.start("tester", "do it")
        platform.audit.flush()
        events = [event_dict(e) for e in platform.audit.tail(100) if e.kind == "tool"]
    finally:
        await platform.aclose()

    assert events and all(e["data"]["isolation"] == "none" for e in events), events
