"""A control plane on a real loopback port, for tests of A2A and the framework adapters (they speak real HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from stitchwork.config import (
    A2AConfig,
    ComputeConfig,
    Config,
    DataConfig,
    IsolationConfig,
    McpConfig,
    SecurityConfig,
    ServerConfig,
)
from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import BUILTIN_TOOLS, Platform
from stitchwork.service import Service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_agent(directory: Path, name: str, turns: list[dict[str, Any]], tools: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.jsonl").write_text("\n".join(json.dumps(t) for t in turns) + "\n")
    (directory / f"{name}.toml").write_text(
        f'name = "{name}"\nmodel = "scripted://{name}.jsonl"\ntools = {json.dumps(tools)}\nmax_steps = 10\n')


def a2a_config(tmp: Path, agents: dict[str, tuple[list[dict[str, Any]], list[str]]], a2a: dict[str, Any],
               *, port: int, tools_dir: Path | None = None, compute: ComputeConfig | None = None,
               sandbox: str = "bwrap://", mcp: McpConfig | None = None, **security: Any) -> Config:
    agent_dir = tmp / "agents"
    for name, (turns, tools) in agents.items():
        write_agent(agent_dir, name, turns, tools)
    if tools_dir is None:
        tools_dir = tmp / "tools"
        if not tools_dir.exists():
            shutil.copytree(BUILTIN_TOOLS, tools_dir, ignore=shutil.ignore_patterns("__pycache__"))
    return Config(
        state_dir=tmp / "state", tool_dirs=(str(tools_dir),), agent_dirs=(str(agent_dir),),
        security=SecurityConfig(**security), isolation=IsolationConfig(default=sandbox, timeout_s=10),
        data=DataConfig(audit_flush_ms=5), server=ServerConfig(port=port),
        a2a=A2AConfig(public_url=f"http://127.0.0.1:{port}", **a2a), compute=compute or ComputeConfig(),
        mcp=mcp or McpConfig(),
    )


@contextlib.asynccontextmanager
async def serve(config: Config, secrets: dict[str, str] | None = None) -> AsyncIterator[tuple[Service, str]]:
    """``stitchwork up`` in this event loop: yields the service and the operator token."""
    platform = Platform.open(config, role="server")
    for name, value in (secrets or {}).items():
        platform.vault.set(name, value)
    service = Service(platform)
    token = service.create_operator_token()
    server = uvicorn.Server(uvicorn.Config(create_app(service, expiry_interval_s=3600), host="127.0.0.1",
                                           port=config.server.port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        yield service, token
    finally:
        server.should_exit = True
        await task
        await platform.aclose()
