"""What observability costs a tool call through the gateway, measured in one run.

    python3 bench/observability.py [--calls 2000] [--rounds 3]

Three figures, each against a baseline from the same run:

1. The instrumentation left on the hot path while tracing is off (8 no-op spans and 3 counter updates per tool
   call, what :meth:`ToolDoor.call` does), timed alone, as a share of one gateway call's CPU time.
2. Gateway calls (``bench/gateway.py``'s setup: ``inline://`` sandbox, durable audit) with tracing off and with
   an OpenTelemetry SDK provider exporting to a no-op exporter, rounds interleaved: CPU µs per call and p50.
3. ``/metrics`` exposition time with the counters the run produced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway import pct, setup
from stitchwork.observability import METRICS, TRACING
from stitchwork.platform import Platform


def instrumentation_off_ns() -> float:
    """ns for what one tool call adds while tracing is off: 8 spans entered and left, 3 counter updates."""
    assert not TRACING.enabled

    def one_call() -> None:
        for name in ("gateway.tool_call", "gateway.authenticate", "gateway.validate", "gateway.authorize",
                     "gateway.approve", "gateway.secrets", "gateway.execute", "gateway.audit"):
            with TRACING.span(name, {"stitchwork.tool.name": "lookup"}) as span:
                span.set_attribute("stitchwork.decision", "allow")
        METRICS.tool_calls.inc("lookup", "ok")
        METRICS.policy_decisions.inc("read-permit", "allow")
        METRICS.sandbox_seconds.observe(0.001, "inline://")

    number = 20_000
    best = min(timeit.repeat(one_call, number=number, repeat=5, timer=time.process_time))
    return best / number * 1e9


async def calls(platform: Platform, run: str, n: int) -> dict[str, float]:
    gateway = platform.gateway
    gateway.open_run(run, "bench", workdir=platform.config.state_dir / "w" / run, max_steps=10**9)
    token = platform.tokens.issue("bench", run)
    latencies: list[float] = []
    cpu = time.process_time()
    for i in range(n):
        started = time.perf_counter()
        outcome = await gateway.call_tool(token, "lookup", json.dumps({"key": f"k{i}", "limit": 3}))
        latencies.append(time.perf_counter() - started)
        if outcome.status != "ok":
            raise SystemExit(f"benchmark call failed: {outcome}")
    cpu = time.process_time() - cpu
    return {"cpu_us": cpu / n * 1e6, "p50_us": pct(latencies, 0.5) * 1e6}


def sdk_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    return provider


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    TRACING.reset()
    added = instrumentation_off_ns()
    with tempfile.TemporaryDirectory() as tmp:
        platform = Platform.open(setup(Path(tmp)))
        try:
            await calls(platform, "warm", 200)
            off: list[dict[str, float]] = []
            on: list[dict[str, float]] = []
            try:
                provider = sdk_provider()
            except ImportError:
                provider = None
            for r in range(options.rounds):
                TRACING.reset()
                off.append(await calls(platform, f"off{r}", options.calls))
                if provider is not None:
                    TRACING.use(provider)
                    on.append(await calls(platform, f"on{r}", options.calls))
            TRACING.reset()
            if provider is not None:
                provider.shutdown()
            exposition = min(timeit.repeat(METRICS.exposition, number=200, repeat=3, timer=time.process_time)) / 200
        finally:
            await platform.aclose()
    cpu_off = min(x["cpu_us"] for x in off)
    print(f"tracing off: {cpu_off:.0f} CPU us per gateway call (best of {options.rounds}), "
          f"p50 {min(x['p50_us'] for x in off):.0f} us")
    print(f"instrumentation with tracing off: {added:.0f} ns per call = {added / 1000 / cpu_off * 100:.2f}% "
          "of the call's CPU time")
    if on:
        cpu_on = min(x["cpu_us"] for x in on)
        print(f"tracing on (SDK, batch processor, discarding exporter): {cpu_on:.0f} CPU us per call, "
              f"p50 {min(x['p50_us'] for x in on):.0f} us: x{cpu_on / cpu_off:.2f} of tracing off")
    else:
        print("tracing on: not measured (pip install 'stitchwork[otel]')")
    print(f"/metrics exposition: {exposition * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
