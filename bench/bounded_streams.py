"""How much the bus keeps after a burst of durable-run traffic, with and without ``[messaging.limits]``.

Starts a nats-server, then for two subject prefixes (one with the default limits applied, one without, as before
they existed) queues and acknowledges ``--jobs`` jobs, publishes ``--events`` run events and records ``--calls``
completed idempotency outcomes, and prints what each stream still holds (messages, bytes). With limits, the run
queue keeps only unacknowledged jobs (a work queue) and the other kinds stay within their bounds; unfinished
messages (one job left unacknowledged) are kept either way.

    python3 bench/bounded_streams.py --jobs 2000 --events 5000 --calls 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stitchwork.config import EventLimits, MessagingLimits
from stitchwork.messaging.nats import NatsBus
from stitchwork.messaging.server import NatsServer
from stitchwork.workers.limits import apply_stream_limits
from stitchwork.workers.subjects import Subjects


async def traffic(bus: NatsBus, subjects: Subjects, args: argparse.Namespace, *, ttl: bool) -> dict[str, Any]:
    for i in range(args.jobs):
        await bus.publish(subjects.queue, json.dumps({"run_id": f"run_{i}"}).encode())
    async with bus.consume(subjects.queue, group="workers", max_in_flight=256) as consumer:
        held = await consumer.next(10)  # one job stays unacknowledged: it must survive every limit
        for _ in range(args.jobs - 1):
            await (await consumer.next(10)).ack()
        held.abandon()
    for i in range(args.events):
        await bus.publish(subjects.events(f"run_{i % 50}"), b'{"kind": "tool"}' + b" " * 200)
    headers = {"Nats-TTL": "1s"} if ttl else None
    for i in range(args.calls):
        await bus.publish(subjects.idem(f"run_{i % 50}", f"k{i}"), b'{"status": "ok"}', headers=headers)
    if ttl:
        await asyncio.sleep(2.5)  # the completed outcomes' TTL (1 s here instead of days)
    out = {}
    for kind, subject in (("jobs", subjects.queue), ("events", subjects.events("x")),
                          ("idempotency", subjects.idem("x", "y"))):
        info = await bus.js.stream_info(subject.split(".")[0])
        out[kind] = {"messages": info.state.messages, "bytes": info.state.bytes}
    out["held_job_kept"] = (await bus.last(subjects.queue)) is not None
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp)).start()
        bus = await NatsBus.connect(server.url)
        try:
            plain = await traffic(bus, Subjects("plain"), args, ttl=False)
            bounded = Subjects("bounded")
            limits = MessagingLimits(events=EventLimits(max_bytes=args.events_max_bytes))
            await apply_stream_limits(bus, bounded, limits)
            limited = await traffic(bus, bounded, args, ttl=True)
        finally:
            await bus.aclose()
            server.stop()
    return {"without_limits": plain, "with_limits": limited,
            "events_max_bytes": args.events_max_bytes, "jobs": args.jobs, "events": args.events, "calls": args.calls}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--events-max-bytes", type=int, default=256 * 1024)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
