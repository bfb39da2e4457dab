"""Fixtures for the compute layer: recorded backend styles served by the fake OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.openai_server import STYLES, FakeOpenAIServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "compute"
TOOLS = [
    {"type": "function", "function": {"name": "list_inbox", "description": "List mail",
                                      "parameters": {"type": "object", "properties": {"limit": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "read_email", "description": "Read one mail",
                                      "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}},
]
USER = [{"role": "user", "content": "What is in my inbox?"}]


@pytest.fixture
async def fake() -> AsyncIterator[Callable[..., Any]]:
    """Starts fake servers (``await fake("vllm", **switches)``) and stops them after the test."""
    started: list[FakeOpenAIServer] = []

    async def start(style: str, **switches: Any) -> FakeOpenAIServer:
        server = await FakeOpenAIServer.from_fixture(style, FIXTURES, **switches).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


__all__ = ["FIXTURES", "STYLES", "TOOLS", "USER"]
