"""`stitchwork run --model openai+http://... "TASK"`: the default assistant, no agent file."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stitchwork.interfaces.cli.app import app
from tests.fakes.openai_server import FakeOpenAIServer
from tests.plugins.models import FIXTURES


@pytest.fixture
def vllm() -> Iterator[FakeOpenAIServer]:
    """A fake vLLM on its own event loop (the CLI runs its own)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = FakeOpenAIServer.from_fixture("vllm", FIXTURES)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    yield server
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_run_with_only_a_model_and_a_task_uses_the_default_assistant(
        vllm: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STITCHWORK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STITCHWORK_ISOLATION__DEFAULT", "inline://")
    monkeypatch.setenv("STITCHWORK_ISOLATION__ALLOW_INLINE", "1")
    result = CliRunner().invoke(app, ["run", "--model", vllm.uri(), "--json", "What is in my inbox?"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert (record["agent"], record["status"], record["steps"]) == ("assistant", "completed", 2)
    assert "3 messages" in record["result"]
    assert len(vllm.requests) == 2 and {t["function"]["name"] for t in vllm.requests[0]["tools"]} >= {
        "list_inbox", "read_email"}
