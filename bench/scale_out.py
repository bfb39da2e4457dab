"""Scale out: the same queued runs driven by 1, then 2 (then N) ``stitchwork worker`` processes on one NATS server.

    python3 bench/scale_out.py [--workers 1,2] [--runs 48] [--steps 4] [--concurrency 4] [--sandbox inline://]

Per phase: a fresh subject prefix on one bundled ``nats-server -js``; in this process the platform
(``Platform.open(role="server")``) ingesting every worker's audit events into its one chain, as ``stitchwork up``
does; ``N`` worker processes (``--concurrency`` runs each at a time). A scripted agent makes ``--steps`` tool calls
(a write with a side effect, through the whole gateway: token, Cedar, taint, idempotency ledger, audit, sandbox),
one per model turn, then answers. One warm-up round of ``N x concurrency`` runs is not timed; then ``--runs`` runs
are queued at once and the clock stops when the last one completed.

Printed per phase: runs/s and tool calls/s (wall), CPU seconds used meanwhile by the workers, by this process
(platform + audit ingest) and by the NATS server, and CPU ms per tool call in each. The scale-out ratio is phase
N's calls/s over phase 1's, measured in the same run. On a machine with C cores the wall-clock ratio cannot exceed
what the cores allow (the NATS server and the platform share them); the CPU per call says how it scales on many
machines: calls/s per worker core = 1000 / worker CPU ms per call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stitchwork.config import load_config  # noqa: E402
from stitchwork.messaging._base import open_bus  # noqa: E402
from stitchwork.messaging.server import NatsServer  # noqa: E402
from stitchwork.workers.queue import enqueue_run, run_state  # noqa: E402
from stitchwork.workers.subjects import Subjects  # noqa: E402

TOOL = '''
def note(name: str) -> dict:
    return {"noted": name}
'''
MANIFEST = ('name = "note"\ndescription = "note"\nside_effect = "write"\nentry = "bench.py:note"\n'
            '[args]\ntype = "object"\nrequired = ["name"]\nadditionalProperties = false\n'
            'properties.name = { type = "string" }\n')
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def build(root: Path, bus: str, prefix: str, steps: int, sandbox: str) -> Path:
    tools, agents = root / "tools", root / "agents"
    tools.mkdir(parents=True)
    agents.mkdir(parents=True)
    (tools / "bench.py").write_text(TOOL)
    (tools / "note.toml").write_text(MANIFEST)
    turns = [{"tool_calls": [{"id": f"c{i}", "name": "note", "arguments": {"name": f"n{i}"}}]} for i in range(steps)]
    (agents / "clerk.jsonl").write_text("\n".join(json.dumps(t) for t in [*turns, {"content": "done"}]) + "\n")
    (agents / "clerk.toml").write_text('name = "clerk"\nmodel = "scripted://clerk.jsonl"\ntools = ["note"]\n'
                                       f"max_steps = {steps + 5}\n")
    inline = "allow_inline = true\n" if sandbox.startswith("inline") else ""
    path = root / "stitchwork.toml"
    path.write_text(
        f'state_dir = "{root / "state"}"\ntool_dirs = ["{tools}"]\nagent_dirs = ["{agents}"]\n'
        f'[isolation]\ndefault = "{sandbox}"\n{inline}timeout_s = 60\n'
        f'[messaging]\nbus = "{bus}"\nnats_port = 0\nsubject_prefix = "{prefix}"\n'
    )
    return path


async def _settle(client: Any, runs: list[str], subjects: Subjects, timeout_s: float) -> dict[str, str]:
    finished: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(finished) < len(runs) and time.monotonic() < deadline:
        for run_id in [r for r in runs if r not in finished]:
            state = await run_state(client, run_id, subjects=subjects)
            if state and state["status"] not in ("running", "waiting_approval"):
                finished[run_id] = str(state["status"])
        await asyncio.sleep(0.05)
    return finished


async def phase(server: NatsServer, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from stitchwork.platform import Platform
    from stitchwork.service import Service

    root = Path(tempfile.mkdtemp(prefix=f"sw-scale{n}-"))
    prefix = "so" + uuid.uuid4().hex[:6]
    config_path = build(root, server.url, prefix, args.steps, args.sandbox)
    subjects = Subjects(prefix)
    platform = Platform.open(load_config(config_path), role="server")
    stop_feed = asyncio.Event()
    feed = asyncio.create_task(Service(platform).ingest_fleet_audit(stop_feed))
    client = await open_bus(server.url)
    env = {**os.environ, "STITCHWORK_CONFIG": str(config_path), "PYTHONPATH": str(ROOT / "src")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            log = open(root / f"worker-w{i}.log", "ab")  # noqa: SIM115 - the process owns it
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "stitchwork", "worker", "--bus", server.url, "--name", f"w{i}",
                 "--concurrency", str(args.concurrency)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        for i in range(n):
            deadline = time.monotonic() + 120
            while f"worker w{i} on" not in (root / f"worker-w{i}.log").read_text(errors="replace"):
                if time.monotonic() > deadline or procs[i].poll() is not None:
                    raise SystemExit(f"worker w{i} did not start: see {root / f'worker-w{i}.log'}")
                await asyncio.sleep(0.1)
        warm = [await enqueue_run(client, "clerk", f"warm {i}", subjects=subjects) for i in range(n * args.concurrency)]
        await _settle(client, warm, subjects, 300)
        workers_before = [cpu_s(p.pid) for p in procs]
        nats_before, me_before = cpu_s(server.process.pid), time.process_time()  # type: ignore[union-attr]
        started = time.perf_counter()
        runs = [await enqueue_run(client, "clerk", f"task {i}", subjects=subjects) for i in range(args.runs)]
        finished = await _settle(client, runs, subjects, args.timeout)
        wall = time.perf_counter() - started
        workers_cpu = sum(cpu_s(p.pid) - b for p, b in zip(procs, workers_before, strict=True))
        nats_cpu = cpu_s(server.process.pid) - nats_before  # type: ignore[union-attr]
        me_cpu = time.process_time() - me_before
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_feed.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(feed, 15)
        await client.aclose()
        await platform.aclose()
    completed = sum(1 for s in finished.values() if s == "completed")
    calls = completed * args.steps
    return {"workers": n, "runs": args.runs, "completed": completed, "wall_s": round(wall, 2),
            "runs_per_s": round(completed / wall, 2), "calls_per_s": round(calls / wall, 1),
            "cpu_s": {"workers": round(workers_cpu, 2), "platform": round(me_cpu, 2), "nats": round(nats_cpu, 2)},
            "cpu_ms_per_call": {"workers": round(1000 * workers_cpu / max(calls, 1), 2),
                                "platform": round(1000 * me_cpu / max(calls, 1), 2),
                                "nats": round(1000 * nats_cpu / max(calls, 1), 2)},
            "load": os.getloadavg()[0]}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sw-scale-"))
    server = NatsServer(root / "nats").start()
    try:
        phases = [await phase(server, int(n), args) for n in args.workers.split(",")]
    finally:
        server.stop()
    base = phases[0]["calls_per_s"] or 1e-9
    for p in phases:
        p["ratio_to_first"] = round(p["calls_per_s"] / base, 2)
    return {"cores": os.cpu_count(), "steps_per_run": args.steps, "sandbox": args.sandbox, "phases": phases}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, one phase each (first is the baseline)")
    parser.add_argument("--runs", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4, help="tool calls per run")
    parser.add_argument("--concurrency", type=int, default=4, help="runs each worker drives at a time")
    parser.add_argument("--sandbox", default="inline://", help="the tools' sandbox (wasm://, bwrap://, inline://)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"{result['cores']} cores, {args.steps} tool calls per run, sandbox {args.sandbox}")
    for p in result["phases"]:
        cpu = p["cpu_ms_per_call"]
        print(f"  {p['workers']} worker(s): {p['completed']}/{p['runs']} runs in {p['wall_s']} s = "
              f"{p['runs_per_s']} runs/s, {p['calls_per_s']} calls/s (x{p['ratio_to_first']} of 1st phase); "
              f"CPU ms per call: workers {cpu['workers']}, platform {cpu['platform']}, nats {cpu['nats']}; "
              f"load {p['load']:.1f}")
    return result


if __name__ == "__main__":
    main()
