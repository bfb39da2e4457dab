"""Model gateway overhead against calling the model server directly, and failover time, measured in one run.

    python3 bench/compute.py [--requests 400] [--concurrency 1,100] [--style vllm]

Three processes: the fake OpenAI-compatible server (replaying the recorded ``--style`` turn), the model gateway
(the control plane app: run-token check, Cedar decision for ``model_call``, prompt redaction, vault key
injection, routing, metering, audit) and this client. The client sends the same chat request (with tools) to the
fake server directly and through the gateway, alternating rounds, at each concurrency, unstreamed (latency of the
whole answer) and streamed (time to the first chunk). "Added" is gateway minus direct, at p50 and p99.

Failover: two deployments of one model; the first is killed (connections refused) or frozen (SIGSTOP: the client
waits for its timeout), and the latency of the first request afterwards is reported against a normal one.
Figures are wall-clock on a shared 2-core machine: compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "compute"
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("list_inbox", "read_email")]
BODY = {"model": "bench", "messages": [{"role": "system", "content": "You are a careful assistant. " * 20},
                                       {"role": "user", "content": "What is in my inbox?"}], "tools": TOOLS}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- child processes -------------------------------------------------------------------------------------------


def serve_fake(style: str, port: int) -> None:
    sys.path.insert(0, str(ROOT))  # the fake server is a test server: tests/fakes/openai_server.py
    from tests.fakes.openai_server import FakeOpenAIServer

    async def main() -> None:
        server = FakeOpenAIServer.from_fixture(style, FIXTURES)
        server.requests = _Discard()
        server.headers = _Discard()
        await server.start(port)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class _Discard(list):  # type: ignore[type-arg]
    def append(self, item: Any) -> None:
        return None


def serve_gateway(port: int, deployments: str, state: str, audit: bool = True, http: str = "auto") -> None:
    import uvicorn

    from stitchwork.config import ComputeConfig, Config, DataConfig, SecurityConfig
    from stitchwork.interfaces.http.app import create_app
    from stitchwork.platform import Platform
    from stitchwork.service import Service

    config = Config(state_dir=Path(state), security=SecurityConfig(token_ttl_s=3600),
                    data=DataConfig(),  # the default audit copy interval
                    compute=ComputeConfig(deployments=json.loads(deployments), affinity="none", retries=1,
                                          backoff_s=0.0, cooldown_s=60))
    platform = Platform.open(config, role="server")
    platform.vault.set("bench_key", "sk-bench-0123456789")
    platform.gateway.refresh_secrets()
    if not audit:  # diagnostic only (--no-audit): what the audit chain costs per call
        platform.audit.append_nowait = lambda *a, **k: None  # type: ignore[method-assign]
    service = Service(platform)
    token = platform.tokens.issue("assistant", "bench-run")
    print(json.dumps({"token": token}), flush=True)
    uvicorn.run(create_app(service), host="127.0.0.1", port=port, log_level="error", access_log=False,
                timeout_keep_alive=120, http=http)  # type: ignore[arg-type]


def spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    return process, line


async def wait_up(url: str, headers: dict[str, str] | None = None) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(400):
            try:
                await http.get(url, headers=headers)
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


# -- measurement -----------------------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(http: httpx.AsyncClient, url: str, headers: dict[str, str], stream: bool) -> float:
    started = time.perf_counter()
    if not stream:
        response = await http.post(url, json=BODY, headers=headers)
        response.raise_for_status()
        response.json()
        return time.perf_counter() - started
    first = 0.0
    async with http.stream("POST", url, json={**BODY, "stream": True}, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:") and not first:
                first = time.perf_counter() - started
    return first


async def run_round(url: str, headers: dict[str, str], requests: int, concurrency: int, stream: bool,
                    http: httpx.AsyncClient) -> list[float]:
    latencies: list[float] = []
    per = max(requests // concurrency, 1)

    async def worker() -> None:
        for _ in range(per):
            latencies.append(await one(http, url, headers, stream))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def overhead(direct: str, gateway: str, token: str, requests: int, concurrency: int,
                   stream: bool, pids: dict[str, int]) -> dict[str, float]:
    results: dict[str, list[float]] = {"direct": [], "gateway": []}
    cpu = {name: 0.0 for name in pids}
    auth = {"authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency + 10, max_keepalive_connections=concurrency + 10)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        for _target, url, headers in (("direct", direct, {}), ("gateway", gateway, auth)):  # warm-up
            await run_round(url, headers, concurrency * 2, concurrency, stream, http)
        for _ in range(4):  # alternate rounds so both see the same machine
            for target, url, headers in (("direct", direct, {}), ("gateway", gateway, auth)):
                before = {name: cpu_s(pid) for name, pid in pids.items()}
                results[target] += await run_round(url, headers, requests // 4, concurrency, stream, http)
                if target == "gateway":
                    for name, pid in pids.items():
                        cpu[name] += cpu_s(pid) - before[name]
    d, g = results["direct"], results["gateway"]
    return {"n": len(g), "direct_p50_ms": pct(d, 0.5) * 1e3, "gateway_p50_ms": pct(g, 0.5) * 1e3,
            "added_p50_ms": (pct(g, 0.5) - pct(d, 0.5)) * 1e3, "direct_p99_ms": pct(d, 0.99) * 1e3,
            "gateway_p99_ms": pct(g, 0.99) * 1e3, "added_p99_ms": (pct(g, 0.99) - pct(d, 0.99)) * 1e3,
            "ratio_p50": pct(g, 0.5) / pct(d, 0.5),
            **{f"{name}_cpu_ms_per_request": cpu[name] / len(g) * 1e3 for name in pids}}


async def failover(style: str, mode: str) -> dict[str, float]:
    """Latency of the first request after the primary deployment dies, and of a normal request."""
    a_port, b_port, g_port = free_port(), free_port(), free_port()
    primary, _ = spawn("--serve-fake", style, str(a_port))
    backup, _ = spawn("--serve-fake", style, str(b_port))
    uri = "openai+http://127.0.0.1:{}/v1?profile=" + style + "&model=m&key=secret://bench_key&timeout=1"
    deployments = [{"model": "bench", "uri": uri.format(a_port), "id": "primary"},
                   {"model": "bench", "uri": uri.format(b_port), "id": "backup"}]
    with tempfile.TemporaryDirectory() as state:
        gateway, line = spawn("--serve-gateway", str(g_port), json.dumps(deployments), state)
        token = json.loads(line)["token"]
        url = f"http://127.0.0.1:{g_port}/v1/chat/completions"
        auth = {"authorization": f"Bearer {token}"}
        await wait_up(f"http://127.0.0.1:{g_port}/v1/models", auth)
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                normal = [await one(http, url, auth, False) for _ in range(30)]
                if mode == "killed":
                    primary.kill()
                    primary.wait()
                else:
                    os.kill(primary.pid, signal.SIGSTOP)
                first = await one(http, url, auth, False)
                after = [await one(http, url, auth, False) for _ in range(10)]
        finally:
            if mode != "killed":
                os.kill(primary.pid, signal.SIGCONT)
            for process in (primary, backup, gateway):
                process.kill()
                process.wait()
    return {"normal_p50_ms": pct(normal, 0.5) * 1e3, "first_after_death_ms": first * 1e3,
            "next_p50_ms": pct(after, 0.5) * 1e3}


async def main(args: argparse.Namespace) -> None:
    fake_port, gateway_port = free_port(), free_port()
    fake, _ = spawn("--serve-fake", args.style, str(fake_port))
    uri = f"openai+http://127.0.0.1:{fake_port}/v1?profile={args.style}&model=m&key=secret://bench_key"
    with tempfile.TemporaryDirectory() as state:
        gateway, line = spawn("--serve-gateway", str(gateway_port),
                              json.dumps([{"model": "bench", "uri": uri, "id": "fake"}]), state,
                              "0" if args.no_audit else "1", args.http)
        token = json.loads(line)["token"]
        direct = f"http://127.0.0.1:{fake_port}/v1/chat/completions"
        via = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        await wait_up(f"http://127.0.0.1:{gateway_port}/v1/models", {"authorization": f"Bearer {token}"})
        rows: list[dict[str, Any]] = []
        try:
            for concurrency in args.concurrency:
                for stream in (False, True):
                    requests = max(args.requests, concurrency * 4)
                    result = await overhead(direct, via, token, requests, concurrency, stream,
                                            {"gateway": gateway.pid})
                    rows.append({"concurrency": concurrency, "measure": "TTFT" if stream else "completion",
                                 **result})
                    r = rows[-1]
                    print(f"c={concurrency:<4} {r['measure']:<10} n={r['n']:<5} direct p50 {r['direct_p50_ms']:7.2f} "
                          f"ms  gateway p50 {r['gateway_p50_ms']:7.2f} ms  added p50 {r['added_p50_ms']:+7.2f} ms "
                          f"(x{r['ratio_p50']:.2f})  added p99 {r['added_p99_ms']:+8.2f} ms  gateway CPU "
                          f"{r['gateway_cpu_ms_per_request']:.2f} ms/request", flush=True)
        finally:
            for process in (fake, gateway):
                process.kill()
                process.wait()
    for mode in () if args.skip_failover else ("killed", "frozen"):
        result = await failover(args.style, mode)
        rows.append({"failover": mode, **result})
        print(f"failover ({mode:<6}): normal p50 {result['normal_p50_ms']:.2f} ms, first request after the primary "
              f"died {result['first_after_death_ms']:.2f} ms, then p50 {result['next_p50_ms']:.2f} ms", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-fake":
        serve_fake(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-gateway":
        serve_gateway(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:6] != ["0"],
                      sys.argv[6] if len(sys.argv) > 6 else "auto")
    else:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--requests", type=int, default=400)
        parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 100])
        parser.add_argument("--style", default="vllm")
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--no-audit", action="store_true", help="diagnostic: the gateway skips model audit events")
        parser.add_argument("--skip-failover", action="store_true")
        parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                            help="the gateway's HTTP parser (uvicorn's; auto: httptools when installed)")
        asyncio.run(main(parser.parse_args()))
