"""A retry that arrives while its original call still runs waits for it instead of running the tool again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from stitchwork.platform import Platform
from tests.gateway.test_gateway import events


async def test_concurrent_calls_with_one_key_run_the_tool_once(make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config([{"content": "x"}]))
    try:
        gateway = platform.gateway
        gateway.open_run("run_r", "tester", workdir=tmp_path / "w", max_steps=10)
        token = gateway.tokens.issue("tester", "run_r")
        args = {"name": "n.txt", "text": "hello"}
        first, second, other = await asyncio.gather(
            gateway.call_tool(token, "write_note", args, idempotency_key="k1"),
            gateway.call_tool(token, "write_note", args, idempotency_key="k1"),
            gateway.call_tool(token, "write_note", {"name": "m.txt", "text": "x"}, idempotency_key="k2"),
        )
        assert first.status == second.status == other.status == "ok", (first, second, other)
        assert first.audit_seq == second.audit_seq  # the retry got the original's outcome
        runs = [e for e in events(platform, "tool") if e["tool"] == "write_note" and e["decision"] == "ok"]
        assert len(runs) == 2
        assert [e["decision"] for e in events(platform, "tool") if e["decision"] == "replayed"] == []
        assert not gateway.tool_door.replay._inflight  # nothing left behind
    finally:
        await platform.aclose()
