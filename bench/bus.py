"""Run steps through the platform on NATS against raw nats-py with the same message pattern, in the same run.

    python3 bench/bus.py [--runs 8] [--steps 25] [--clients 100] [--events 200]

1. Platform: a worker (in this process) drives queued runs; each step is a scripted model turn and one tool call
   (``inline://``) through the whole gateway (token, policy, taint, audit with fsync), with the durable-run
   traffic on JetStream: a model event, a checkpoint (with the idempotency lookup of its call sent alongside),
   the idempotency record, a tool event and a checkpoint (the record is confirmed with it). Events are not
   awaited in line (each run's events are chained, in order, on the worker's connection). Step latency = time
   between consecutive tool events of one run. The same runs on ``memory://`` separate the cost of the gateway
   and run loop from the cost of the bus.
2. Raw nats-py, same pattern (same payload sizes and headers), no platform work: per step an event published
   in the background (chained after the run's previous event), a last-message lookup sent while a checkpoint
   with the compare-and-set header is awaited, an idempotency record sent, a second background event, and a
   second checkpoint awaited, then the record's acknowledgement; and core request/reply for reference.
3. WebSocket fan-out: ``clients`` sockets on ``/v1/events`` of a real control plane (uvicorn, loopback); the
   platform publishes ``events`` run events; delivery latency publish → every client.

Wall-clock on a shared 2-core machine: compare the ratios, not the absolute numbers. ``cpu`` is this process's
CPU time (all threads; the NATS server is another process) per step: less disturbed by other load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.workers.durable_fixtures import build, call  # noqa: E402

from stitchwork.config import DataConfig  # noqa: E402
from stitchwork.messaging._base import open_bus  # noqa: E402
from stitchwork.messaging.server import NatsServer, free_port  # noqa: E402
from stitchwork.platform import open_worker  # noqa: E402
from stitchwork.workers.queue import enqueue_run, run_state  # noqa: E402
from stitchwork.workers.subjects import Subjects  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def platform_steps(root: Path, url: str, runs: int, steps: int) -> dict[str, Any]:
    turns = [{"tool_calls": [call(f"c{i}", f"line {i}")]} for i in range(steps)] + [{"content": "done"}]
    config = build(root, turns, bus=url)
    # The deployed defaults, not the test fixture's 5 ms audit copy interval (a per-interval cost that would be
    # charged to every step of a slower run).
    config = config.replace(agents=config.agents.__class__(max_steps=steps + 5),
                            data=replace(config.data, audit_flush_ms=DataConfig().audit_flush_ms))
    (Path(config.agent_dirs[0]) / "scribe.toml").write_text(
        f'name = "scribe"\nmodel = "scripted://scribe.jsonl"\ntools = ["append"]\nmax_steps = {steps + 5}\n')
    subjects = Subjects("bench")
    worker = await open_worker(config, bus_uri=url, name="bench", subjects=subjects, concurrency=runs)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    client = await open_bus(url)
    ids = ["run_" + uuid.uuid4().hex[:16] for _ in range(runs)]
    stamps: dict[str, list[float]] = {run_id: [] for run_id in ids}
    # One follower of every run's events (as a dashboard would): no per-event state reads charged to the platform.
    async with client.consume(subjects.events()) as events:
        started, cpu = time.perf_counter(), time.process_time()
        for run_id in ids:
            await enqueue_run(client, "scribe", f"bench {run_id}", subjects=subjects, run_id=run_id)
        running = set(ids)
        while running:
            event = json.loads((await events.next(600)).data)
            if event["run_id"] not in stamps:
                continue  # an earlier run on the same server
            if event["kind"] == "tool":
                stamps[event["run_id"]].append(event["ts"])
            elif event["kind"] == "finished":
                running.discard(event["run_id"])
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finals = [await run_state(client, run_id, subjects=subjects) for run_id in ids]
    assert all(f is not None and f["status"] == "completed" for f in finals), finals
    latencies = [(b - a) * 1000 for run_id in ids for a, b in itertools.pairwise(stamps[run_id])]
    stop.set()
    await serving
    await worker.aclose()
    await client.aclose()
    return {"steps_per_s": runs * steps / wall, "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
            "cpu_ms": cpu * 1000 / (runs * steps)}


async def raw_pattern(url: str, runs: int, steps: int) -> dict[str, Any]:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="raw", subjects=["raw.>"])
    event, ckpt, idem = b"x" * 300, b"x" * 1500, b"x" * 400
    latencies: list[float] = []

    async def one_run(r: int) -> None:
        tail: asyncio.Task[Any] | None = None
        seq = 0

        async def emit(previous: asyncio.Task[Any] | None, body: bytes) -> None:
            if previous is not None:
                await previous
            await js.publish(f"raw.ev.r{r}", body, stream="raw")

        async def checkpoint(body: bytes) -> None:
            nonlocal seq
            headers = {"Nats-Expected-Last-Subject-Sequence": str(seq), "Nats-Msg-Id": f"c{r}-{time.time_ns()}"}
            seq = (await js.publish(f"raw.st.r{r}", body, stream="raw", headers=headers)).seq

        async def lookup(subject: str) -> None:
            with contextlib.suppress(NotFoundError):
                await js.get_last_msg("raw", subject)

        for step in range(steps):
            t = time.perf_counter()
            tail = asyncio.create_task(emit(tail, event))
            looking = asyncio.create_task(lookup(f"raw.idem.r{r}.{step}"))  # while the checkpoint is stored
            await checkpoint(ckpt)
            await looking
            put = asyncio.create_task(js.publish(f"raw.idem.r{r}.{step}", idem, stream="raw",
                                                 headers={"Nats-Msg-Id": f"i{r}.{step}"}))
            tail = asyncio.create_task(emit(tail, event))
            await checkpoint(b"x" * 1600)
            await put  # confirmed with the checkpoint
            latencies.append((time.perf_counter() - t) * 1000)
        if tail is not None:
            await tail

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_run(r) for r in range(runs)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("rr.echo", cb=echo)
    rr: list[float] = []
    for _ in range(500):
        t = time.perf_counter()
        await nc.request("rr.echo", b"x" * 256, timeout=5)
        rr.append((time.perf_counter() - t) * 1000)
    await nc.close()
    return {"steps_per_s": runs * steps / wall, "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
            "cpu_ms": cpu * 1000 / (runs * steps), "request_p50_ms": pct(rr, 0.5), "request_p99_ms": pct(rr, 0.99)}


async def fanout(root: Path, url: str, clients: int, events: int) -> dict[str, Any]:
    import uvicorn
    import websockets

    from stitchwork.agents.runs import RunRecord
    from stitchwork.interfaces.http.app import create_app
    from stitchwork.platform import Platform
    from stitchwork.service import Service

    os.environ["STITCHWORK_BUS"] = url
    config = build(root / "fan", [{"content": "x"}], bus=url)
    platform = Platform.open(config, role="server")
    service = Service(platform)
    token = service.create_operator_token()
    app = create_app(service, expiry_interval_s=3600)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           ws_ping_interval=None))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    hub = app.state.events
    record = RunRecord(id="run_fanout", agent="scribe", task="t", model="m")
    after = hub.publish(record, "start", {})
    sockets = [await websockets.connect(f"ws://127.0.0.1:{port}/v1/events?run_id=run_fanout&after={after}",
                                        additional_headers={"Authorization": f"Bearer {token}"}, max_queue=None)
               for _ in range(clients)]
    latencies: list[float] = []

    async def reader(ws: Any) -> None:
        for _ in range(events):
            event = json.loads(await ws.recv())
            latencies.append((time.time() - event["data"]["sent"]) * 1000)

    readers = [asyncio.create_task(reader(ws)) for ws in sockets]
    started = time.perf_counter()
    for i in range(events):
        await asyncio.to_thread(hub.publish, record, "tick", {"i": i, "sent": time.time()})
    await asyncio.gather(*readers)
    wall = time.perf_counter() - started
    for ws in sockets:
        await ws.close()
    server.should_exit = True
    await serving
    await platform.aclose()
    return {"deliveries_per_s": clients * events / wall, "p50_ms": pct(latencies, 0.5),
            "p99_ms": pct(latencies, 0.99)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = NatsServer(root / "nats").start()
        try:
            raw = await raw_pattern(server.url, args.runs, args.steps)
            plat = await platform_steps(root / "platform", server.url, args.runs, args.steps)
            local = await platform_steps(root / "local", "memory://bench", args.runs, args.steps)
            fan = await fanout(root, server.url, args.clients, args.events)
        finally:
            server.stop()
    print(f"runs={args.runs} steps/run={args.steps} (concurrent runs; per step 6 JetStream publishes, 2 awaited in "
          "line, and 1 last-message lookup alongside the first)")
    print(f"raw nats-py pattern : {raw['steps_per_s']:8.1f} steps/s  p50 {raw['p50_ms']:6.2f} ms  "
          f"p99 {raw['p99_ms']:6.2f} ms  cpu {raw['cpu_ms']:5.2f} ms/step   "
          f"(core request/reply p50 {raw['request_p50_ms']:.2f} ms, "
          f"p99 {raw['request_p99_ms']:.2f} ms)")
    print(f"platform on NATS    : {plat['steps_per_s']:8.1f} steps/s  p50 {plat['p50_ms']:6.2f} ms  "
          f"p99 {plat['p99_ms']:6.2f} ms  cpu {plat['cpu_ms']:5.2f} ms/step")
    print(f"platform on memory  : {local['steps_per_s']:8.1f} steps/s  p50 {local['p50_ms']:6.2f} ms  "
          f"p99 {local['p99_ms']:6.2f} ms  cpu {local['cpu_ms']:5.2f} ms/step   "
          "(the same runs without NATS: the gateway and run loop alone)")
    print(f"overhead            : {raw['steps_per_s'] / plat['steps_per_s']:.2f}x throughput, "
          f"{plat['p50_ms'] / raw['p50_ms']:.2f}x p50, {plat['p99_ms'] / raw['p99_ms']:.2f}x p99, "
          f"{plat['cpu_ms'] / raw['cpu_ms']:.2f}x CPU per step (target <= 2x)")
    print(f"websocket fan-out   : {args.clients} clients x {args.events} events: "
          f"{fan['deliveries_per_s']:.0f} deliveries/s, latency p50 {fan['p50_ms']:.1f} ms, p99 {fan['p99_ms']:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
