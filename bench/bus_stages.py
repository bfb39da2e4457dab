"""Where a run step's CPU goes: the main thread's CPU time per stage of a step, one run at a time.

    python3 bench/bus_stages.py [--steps 50] [--runs 3] [--bus memory://stages]

Drives the same runs as ``bench/bus.py`` (a scripted model turn and one ``inline://`` tool call per step, through
the whole gateway, with the durable-run traffic) and wraps the stages of a step with a timer of the calling
thread's CPU time (``time.thread_time``). One run at a time, so the only other work on the loop is the run's own.
On a ``nats://`` bus (``--bus nats`` starts a server) the awaited publishes also count the other tasks of the
loop while they wait. Time spent by the audit writer and flusher threads is not in these figures; it competes for
the GIL with the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bus import platform_steps  # noqa: E402

from stitchwork.gateway.core import Gateway  # noqa: E402
from stitchwork.gateway.models import ModelDoor  # noqa: E402
from stitchwork.gateway.stages import Audit, Authorize, LabelOutput  # noqa: E402
from stitchwork.gateway.tools import SandboxExecute  # noqa: E402
from stitchwork.isolation.inline import InlineSandbox  # noqa: E402
from stitchwork.messaging.server import NatsServer  # noqa: E402
from stitchwork.security.redact import Redactor  # noqa: E402
from stitchwork.workers.runstore import BusRunStore  # noqa: E402
from stitchwork.workers.worker import Worker  # noqa: E402

STAGES: list[tuple[type, str, str]] = [
    (Gateway, "complete", "model call through the gateway (total)"),
    (Redactor, "redact_messages", "  redact the conversation"),
    (ModelDoor, "_admit", "  Cedar admission (model_call)"),
    (ModelDoor, "_chat", "  the scripted model"),
    (ModelDoor, "_record", "  meter + audit event (prompt digest)"),
    (Gateway, "call_tool", "tool call through the gateway (total)"),
    (Authorize, "__call__", "  Cedar decision"),
    (SandboxExecute, "__call__", "  sandbox (execute stage)"),
    (InlineSandbox, "run", "    the inline:// sandbox"),
    (LabelOutput, "__call__", "  redact + label output"),
    (Audit, "executed", "  tool audit event (awaited)"),
    (BusRunStore, "apublish", "checkpoints (encode + publish)"),
    (BusRunStore, "publish", "checkpoints (encode + publish, blocking)"),
    (BusRunStore, "_body", "  encode"),
    (Worker, "_on_event", "run events (encode + schedule)"),
]


def timed(function: Callable[..., Any], label: str, spent: dict[str, float], calls: dict[str, int]) -> Any:
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def wrapper_async(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return await function(*args, **kwargs)
            finally:
                spent[label] += time.thread_time() - started
                calls[label] += 1
        return wrapper_async

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - started
            calls[label] += 1
    return wrapper


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bus", default="memory://stages", help="memory://NAME, nats://HOST:PORT or 'nats'")
    args = parser.parse_args()
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for cls, name, label in STAGES:
        if hasattr(cls, name):  # an older tree may lack a stage
            setattr(cls, name, timed(getattr(cls, name), label, spent, calls))
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start() if args.bus == "nats" else None
        url = server.url if server is not None else args.bus
        try:
            await platform_steps(Path(tmp) / "warm", url, 1, 5)
            spent.clear()
            calls.clear()
            cpu = 0.0
            for i in range(args.runs):
                started = time.thread_time()
                await platform_steps(Path(tmp) / f"run{i}", url, 1, args.steps)
                cpu += time.thread_time() - started
        finally:
            if server is not None:
                server.stop()
    steps = args.runs * args.steps
    print(f"{args.runs} runs x {args.steps} steps on {url}: main thread {cpu / steps * 1000:.2f} ms CPU per step "
          "(including worker start and stop, and reading the events)")
    for _, _, label in STAGES:
        if calls[label]:
            print(f"  {label:46s} {spent[label] / steps * 1000:7.3f} ms/step  ({calls[label] / steps:.1f} calls/step)")


if __name__ == "__main__":
    asyncio.run(main())
