"""Agent memory through the gateway against the same memory calls made directly, measured in the same run.

    python3 bench/memory.py [--calls 1000] [--items 2000]

Path measured per call: run-token check, argument validation, taint check, Cedar decision, the host-side handler
(the :class:`~stitchwork.memory.store.AgentMemory` call in a worker thread) and the durable audit of the decision
and the execution. The baseline is the same ``AgentMemory`` call on the same store. The DuckDB store is the default
one. Figures are wall-clock on a shared machine: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stitchwork.config import Config, DataConfig, IsolationConfig
from stitchwork.platform import Platform
from stitchwork.security.taint import Label

WORDS = ["invoice", "meeting", "budget", "rocket", "launch", "planning", "partner", "newsletter", "contract",
         "travel", "hotel", "flight"]


def setup(root: Path) -> Config:
    agents = root / "agents"
    agents.mkdir()
    (agents / "bench.jsonl").write_text('{"content": "x"}\n')
    (agents / "bench.toml").write_text('name = "bench"\nmodel = "scripted://bench.jsonl"\n'
                                       'tools = ["memory_put", "memory_get", "memory_search"]\n')
    return Config(state_dir=root / "state", agent_dirs=(str(agents),),
                  isolation=IsolationConfig(default="inline://", allow_inline=True), data=DataConfig(audit_flush_ms=50))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(calls: int, fn: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(calls):
        t0 = time.perf_counter()
        await fn(i)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    return {"calls_per_s": calls / elapsed, "p50_us": pct(latencies, 0.5) * 1e6, "p99_us": pct(latencies, 0.99) * 1e6}


async def main(calls: int, items: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        platform = Platform.open(setup(Path(tmp)))
        try:
            memory = platform.memory
            assert memory is not None
            docs = [(f"k{i}", " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + f" item{i}")
                    for i in range(items)]
            memory.put_many("bench", docs, labels=[Label("agent:bench", True)])
            gateway = platform.gateway
            gateway.open_run("r1", "bench", workdir=Path(tmp) / "w", max_steps=10**9)
            token = platform.tokens.issue("bench", "r1")

            async def via_gateway(tool: str, args: dict[str, Any]) -> None:
                outcome = await gateway.call_tool(token, tool, json.dumps(args))
                if outcome.status != "ok":
                    raise SystemExit(f"benchmark call failed: {outcome}")

            results: dict[str, Any] = {"items": items, "calls": calls}
            cases: dict[str, tuple[Callable[[int], Awaitable[Any]], Callable[[int], Awaitable[Any]]]] = {
                "get": (lambda i: via_gateway("memory_get", {"key": f"k{i % items}"}),
                        lambda i: asyncio.to_thread(memory.get, "bench", f"k{i % items}")),
                "search": (lambda i: via_gateway("memory_search", {"query": f"{WORDS[i % 12]} launch", "limit": 5}),
                           lambda i: asyncio.to_thread(memory.search, "bench", f"{WORDS[i % 12]} launch", limit=5)),
                "put": (lambda i: via_gateway("memory_put", {"key": f"n{i}", "text": f"note {i} about budget"}),
                        lambda i: asyncio.to_thread(memory.put, "bench", f"d{i}", text=f"note {i} about budget",
                                                    labels=[Label("agent:bench", True)])),
            }
            for name, (gw, direct) in cases.items():
                base = await timed(calls, direct)
                through = await timed(calls, gw)
                results[name] = {"direct": base, "gateway": through,
                                 "overhead_ratio": round(base["calls_per_s"] / through["calls_per_s"], 2)}
            return results
        finally:
            await platform.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--items", type=int, default=2000)
    ns = parser.parse_args()
    out = asyncio.run(main(ns.calls, ns.items))
    for case in ("get", "search", "put"):
        r = out[case]
        print(f"memory_{case:<7} direct {r['direct']['calls_per_s']:8.0f}/s p50 {r['direct']['p50_us']:7.0f} µs | "
              f"gateway {r['gateway']['calls_per_s']:7.0f}/s p50 {r['gateway']['p50_us']:7.0f} µs "
              f"p99 {r['gateway']['p99_us']:7.0f} µs | direct/gateway throughput {r['overhead_ratio']}x")
    json.dump(out, sys.stderr, indent=1)
    sys.stderr.write("\n")
