"""Run steps through the platform on NATS against raw nats-py with the same message pattern, in the same run.

    python3 bench/bus.py [--runs 8] [--steps 25] [--clients 100] [--events 200]

1. Platform: a worker (in this process) drives queued runs; each step is a scripted model turn and one tool call
   (``inline://``) through the whole gateway (token, policy, taint, audit with fsync), with the durable-run
   traffic on JetStream: a model event, a checkpoint, the idempotency record, a tool event and a checkpoint.
   Step latency = time between consecutive tool events of one run. The same runs on ``memory://`` separate the
   cost of the gateway and run loop from the cost of the bus.
2. Raw nats-py, same pattern: five JetStream publishes awaited one after the other per step (same payload sizes),
   no platform work; and core request/reply for reference.
3. WebSocket fan-out: ``clients`` sockets on ``/v1/events`` of a real control plane (uvicorn, loopback); the
   platform publishes ``events`` run events; delivery latency publish → every client.

Wall-clock on a shared 2-core machine: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.messaging.durable_fixtures import build, call  # noqa: E402

from stitchwork.messaging._base import open_bus  # noqa: E402
from stitchwork.messaging.durable import Subjects, Worker, enqueue_run, wait_for_run  # noqa: E402
from stitchwork.messaging.server import NatsServer, free_port  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def platform_steps(root: Path, url: str, runs: int, steps: int) -> dict[str, Any]:
    turns = [{"tool_calls": [call(f"c{i}", f"line {i}")]} for i in range(steps)] + [{"content": "done"}]
    config = build(root, turns, bus=url)
    config = config.replace(agents=config.agents.__class__(max_steps=steps + 5))
    (Path(config.agent_dirs[0]) / "scribe.toml").write_text(
        f'name = "scribe"\nmodel = "scripted://scribe.jsonl"\ntools = ["append"]\nmax_steps = {steps + 5}\n')
    subjects = Subjects("bench")
    worker = await Worker(config, bus_uri=url, name="bench", subjects=subjects, concurrency=runs).start()
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    client = await open_bus(url)
    started = time.perf_counter()
    ids = [await enqueue_run(client, "scribe", f"bench {i}", subjects=subjects) for i in range(runs)]
    finals = [await wait_for_run(client, run_id, subjects=subjects, timeout_s=600) for run_id in ids]
    wall = time.perf_counter() - started
    assert all(f["status"] == "completed" for f in finals), finals
    latencies: list[float] = []
    for run_id in ids:
        async with client.consume(subjects.events(run_id)) as events:
            stamps: list[float] = []
            while True:
                event = json.loads((await events.next(10)).data)
                if event["kind"] == "tool":
                    stamps.append(event["ts"])
                if event["kind"] == "finished":
                    break
        latencies += [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    stop.set()
    await serving
    await worker.aclose()
    await client.aclose()
    return {"steps_per_s": runs * steps / wall, "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}


async def raw_pattern(url: str, runs: int, steps: int) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="raw", subjects=["raw.>"])
    payloads = [b"x" * 300, b"x" * 1500, b"x" * 400, b"x" * 300, b"x" * 1600]  # event, ckpt, idem, event, ckpt
    latencies: list[float] = []

    async def one_run(r: int) -> None:
        for _ in range(steps):
            t = time.perf_counter()
            for k, body in enumerate(payloads):
                await js.publish(f"raw.r{r}.{k}", body)
            latencies.append((time.perf_counter() - t) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(one_run(r) for r in range(runs)))
    wall = time.perf_counter() - started

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
            "request_p50_ms": pct(rr, 0.5), "request_p99_ms": pct(rr, 0.99)}


async def fanout(root: Path, url: str, clients: int, events: int) -> dict[str, Any]:
    import uvicorn
    import websockets

    from stitchwork.agents.runs import RunRecord
    from stitchwork.platform import Platform
    from stitchwork.service import Service
    from stitchwork.web.server import create_app

    os.environ["STITCHWORK_BUS"] = url
    config = build(root / "fan", [{"content": "x"}], bus=url)
    platform = Platform.open(config)
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
    print(f"runs={args.runs} steps/run={args.steps} (concurrent runs; 5 JetStream publishes per step)")
    print(f"raw nats-py pattern : {raw['steps_per_s']:8.1f} steps/s  p50 {raw['p50_ms']:6.2f} ms  "
          f"p99 {raw['p99_ms']:6.2f} ms   (core request/reply p50 {raw['request_p50_ms']:.2f} ms, "
          f"p99 {raw['request_p99_ms']:.2f} ms)")
    print(f"platform on NATS    : {plat['steps_per_s']:8.1f} steps/s  p50 {plat['p50_ms']:6.2f} ms  "
          f"p99 {plat['p99_ms']:6.2f} ms")
    print(f"platform on memory  : {local['steps_per_s']:8.1f} steps/s  p50 {local['p50_ms']:6.2f} ms  "
          f"p99 {local['p99_ms']:6.2f} ms   (the same runs without NATS: the gateway and run loop alone)")
    print(f"overhead            : {raw['steps_per_s'] / plat['steps_per_s']:.2f}x throughput, "
          f"{plat['p50_ms'] / raw['p50_ms']:.2f}x p50, {plat['p99_ms'] / raw['p99_ms']:.2f}x p99 (target <= 2x)")
    print(f"websocket fan-out   : {args.clients} clients x {args.events} events: "
          f"{fan['deliveries_per_s']:.0f} deliveries/s, latency p50 {fan['p50_ms']:.1f} ms, p99 {fan['p99_ms']:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
