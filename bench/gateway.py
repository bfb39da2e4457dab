"""Gateway overhead per tool call against a bare function call, measured in the same run.

    python3 bench/gateway.py [--calls 4000] [--concurrency 1,64]

Path measured per call: run-token check, argument validation, provenance (taint) check, Cedar decision, durable
audit (journal fsync, group commit) of the decision and the execution, and the ``inline://`` sandbox. The
baseline is the same tool function called directly. Figures are wall-clock on a shared machine: compare ratios.
"CPU us/call" is this process's CPU time (all threads: the audit writer and copier too) per call, which a busy
host disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from stitchwork.config import Config, DataConfig, IsolationConfig
from stitchwork.platform import Platform

TOOL = '''
def lookup(key: str, limit: int = 1) -> dict:
    return {"key": key, "limit": limit}
'''


def setup(root: Path) -> Config:
    tools = root / "tools"
    tools.mkdir()
    (tools / "kv.py").write_text(TOOL)
    (tools / "lookup.toml").write_text(
        'name = "lookup"\ndescription = "Look a key up."\nside_effect = "read"\nentry = "kv.py:lookup"\n'
        'target = "key"\n[args]\ntype = "object"\nrequired = ["key"]\nadditionalProperties = false\n'
        'properties.key = { type = "string", maxLength = 100 }\nproperties.limit = { type = "integer" }\n'
    )
    agents = root / "agents"
    agents.mkdir()
    (agents / "bench.jsonl").write_text('{"content": "x"}\n')
    (agents / "bench.toml").write_text('name = "bench"\nmodel = "scripted://bench.jsonl"\ntools = ["lookup"]\n')
    return Config(state_dir=root / "state", tool_dirs=(str(tools),), agent_dirs=(str(agents),),
                  isolation=IsolationConfig(default="inline://?mode=direct", allow_inline=True),
                  data=DataConfig())  # the default audit copy interval


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(platform: Platform, calls: int, concurrency: int) -> dict[str, float]:
    gateway = platform.gateway
    tokens = []
    for i in range(concurrency):
        run_id = f"bench_{concurrency}_{i}"
        gateway.open_run(run_id, "bench", workdir=platform.config.state_dir / "w" / run_id, max_steps=10**9)
        tokens.append(platform.tokens.issue("bench", run_id))
    latencies: list[float] = []
    per_task = calls // concurrency

    async def worker(token: str) -> None:
        for i in range(per_task):
            started = time.perf_counter()
            outcome = await gateway.call_tool(token, "lookup", json.dumps({"key": f"k{i}", "limit": 3}))
            latencies.append(time.perf_counter() - started)
            if outcome.status != "ok":
                raise SystemExit(f"benchmark call failed: {outcome}")

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(t) for t in tokens))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    n = per_task * concurrency
    return {"calls": n, "calls_per_s": n / elapsed, "p50_us": pct(latencies, 0.50) * 1e6,
            "p99_us": pct(latencies, 0.99) * 1e6, "cpu_us": cpu / n * 1e6}


def bare(calls: int) -> dict[str, float]:
    namespace: dict[str, object] = {}
    exec(TOOL, namespace)  # the same function the tool runs
    fn = namespace["lookup"]
    latencies = []
    for i in range(calls):
        started = time.perf_counter()
        fn(key=f"k{i}", limit=3)  # type: ignore[operator]
        latencies.append(time.perf_counter() - started)
    return {"p50_us": pct(latencies, 0.5) * 1e6, "p99_us": pct(latencies, 0.99) * 1e6}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", default="1,64")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        platform = Platform.open(setup(Path(tmp)))
        try:
            await measure(platform, 200, 1)  # warm caches, compile validators, load the tool module
            base = bare(options.calls)
            print(f"bare function call: p50 {base['p50_us']:.2f} us, p99 {base['p99_us']:.2f} us")
            print(f"{'concurrency':>11} {'calls/s':>9} {'p50 us':>8} {'p99 us':>8} {'p50 overhead':>13} "
                  f"{'p99 overhead':>13} {'CPU us/call':>12}")
            for c in (int(x) for x in options.concurrency.split(",")):
                r = await measure(platform, options.calls, c)
                print(f"{c:>11} {r['calls_per_s']:>9.0f} {r['p50_us']:>8.0f} {r['p99_us']:>8.0f} "
                      f"{r['p50_us'] - base['p50_us']:>10.0f} us {r['p99_us'] - base['p99_us']:>10.0f} us "
                      f"{r['cpu_us']:>12.0f}")
            report = platform.audit.verify()
            print(f"audit: {report.events} events, verified={report.ok}")
        finally:
            await platform.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
