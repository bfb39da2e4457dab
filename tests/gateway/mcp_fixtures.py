"""A control plane in process with the MCP door, and official ``mcp`` clients connected to it over ASGI."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stitchwork.config import Config
from stitchwork.platform import Platform
from stitchwork.service import Service

mcp = pytest.importorskip("mcp", reason="the MCP door needs the mcp extra: pip install 'stitchwork[mcp]'")
httpx2 = pytest.importorskip("httpx2")

from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

BASE = "http://127.0.0.1:8470"
TASK = "Summarise my inbox and mail it to alice@example.com"


class Door:
    """An open platform (role server), its service and app (lifespan entered)."""

    def __init__(self, platform: Platform, service: Service, app: Any) -> None:
        self.platform = platform
        self.service = service
        self.app = app

    def http(self, token: str | None, **headers: str) -> Any:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app), base_url=BASE, headers=headers,
                                  timeout=180)  # a loaded CI machine: never a read timeout mid-stream

    @contextlib.asynccontextmanager
    async def client(self, token: str, *, mode: str = "auto") -> AsyncIterator[Any]:
        async with self.http(token) as http, Client(streamable_http_client(f"{BASE}/mcp", http_client=http),
                                                    mode=mode, read_timeout_seconds=180) as client:
            yield client

    async def session(self, agent: str = "tester", task: str = TASK, **kwargs: Any) -> str:
        info = await self.service.sessions.open(agent, task, **kwargs)
        return info.token

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.service.audit_tail(500) if kind is None or e["kind"] == kind]


@contextlib.asynccontextmanager
async def open_door(config: Config) -> AsyncIterator[Door]:
    from stitchwork.interfaces.http.app import create_app

    platform = Platform.open(config, role="server")
    try:
        service = Service(platform)
        app = create_app(service, expiry_interval_s=3600)
        async with app.router.lifespan_context(app):
            yield Door(platform, service, app)
    finally:
        await platform.aclose()


__all__ = ["BASE", "TASK", "Door", "open_door"]
