"""MCP ``tools/call`` through the MCP door against calling the same upstream MCP server directly, in the same run.

    python3 bench/mcp.py [--calls 300] [--sessions 32] [--per-session 20]

The upstream is the test server ``tests/gateway/upstream_server.py`` (stdio; its ``echo`` tool). Three paths:

1. direct: the official ``mcp`` client talks to its own upstream process over stdio (the baseline);
2. gateway: ``Gateway.call_tool`` in process (a session's run token; identity, validation, taint, Cedar, audit
   with fsync, the upstream call over its own stdio connection, labelling) without the door's transport;
3. door: a real ``stitchwork up`` (a subprocess, loopback) and the official ``mcp`` client over Streamable HTTP at
   ``/mcp`` with the session's run token, calling ``fake.echo``.

Reported: p50 and p99 per call at one client, and the added latency of 2 and 3 over 1; the time of one fdatasync in
the state directory (each call waits for its audit event to be durable: a floor under the added latency on this
disk); then throughput at
``--sessions`` concurrent sessions (one MCP client each, ``--per-session`` calls each) through the door, beside
the same number of concurrent calls on one direct client. Targets: added p50 <= 2 ms and p99 <= 5 ms at one client.
Wall clock on a shared 2-core machine: compare within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# This file is bench/mcp.py: its directory must not shadow the mcp package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "src"))

import httpx2  # noqa: E402
from mcp import Client, StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from stitchwork import Stitchwork  # noqa: E402

SERVER = str(ROOT / "tests" / "gateway" / "upstream_server.py")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_setup(root: Path) -> Path:
    """A state dir with one agent given the upstream's tools, and the config naming the upstream."""
    agents = root / "agents"
    agents.mkdir()
    (agents / "bench.toml").write_text('name = "bench"\nmodel = ""\ntools = ["fake.*"]\nmax_steps = 1000000\n')
    config = root / "stitchwork.toml"
    config.write_text(
        f'state_dir = "{root / "state"}"\nagent_dirs = ["{agents}"]\n'
        '[messaging]\nbus = "memory://"\n[data]\nmemory_tools = false\n'
        f'[mcp.servers.fake]\ncommand = {json.dumps([sys.executable, SERVER])}\nsandbox = "inline://"\n'
        '[mcp.servers.fake.tools.echo]\nside_effect = "read"\n'
    )
    return config


@contextlib.asynccontextmanager
async def direct_client() -> AsyncIterator[Any]:
    with open(os.devnull, "w") as errlog:
        async with Client(stdio_client(StdioServerParameters(command=sys.executable, args=[SERVER]), errlog=errlog),
                          read_timeout_seconds=60) as client:
            yield client


def fdatasync_ms(directory: Path, count: int = 100) -> list[float]:
    """Times ``count`` append + fdatasync pairs of a small file in ``directory`` (what the audit journal pays per
    group commit: a call returns only once its audit event is durable)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    out: list[float] = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 400)
            started = time.perf_counter()
            os.fdatasync(fd)
            out.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return out


async def timed(calls: int, call: Any) -> list[float]:
    for _ in range(min(20, calls)):
        await call()
    out: list[float] = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def line(name: str, values: list[float], base: list[float] | None = None) -> None:
    text = f"{name:<10} p50 {pct(values, 0.5):7.3f} ms  p99 {pct(values, 0.99):7.3f} ms"
    if base is not None:
        text += (f"   added p50 {pct(values, 0.5) - pct(base, 0.5):+7.3f} ms  "
                 f"added p99 {pct(values, 0.99) - pct(base, 0.99):+7.3f} ms")
    print(text, flush=True)


async def in_process_gateway(config_path: Path, calls: int) -> list[float]:
    from stitchwork.config import load_config
    from stitchwork.platform import Platform
    from stitchwork.service import Service

    config = load_config(config_path)
    platform = Platform.open(config)
    try:
        info = await Service(platform).sessions.open("bench", "benchmark the door")

        async def call() -> None:
            outcome = await platform.gateway.call_tool(info.token, "fake.echo", {"text": "hello"})
            assert outcome.status == "ok", outcome.error

        result = await timed(calls, call)
        await Service(platform).sessions.close(info.run_id)
        return result
    finally:
        await platform.aclose()


@contextlib.contextmanager
def control_plane(config: Path) -> Any:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "STITCHWORK_CONFIG": str(config)}
    env.pop("STITCHWORK_URL", None)
    env.pop("STITCHWORK_TOKEN", None)
    process = subprocess.Popen([sys.executable, "-m", "stitchwork", "up", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        token_file = config.parent / "state" / "operator.token"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"stitchwork up exited: {process.stderr.read().decode() if process.stderr else ''}")
            with socket.socket() as probe:
                if token_file.exists() and probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("stitchwork up did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", token_file.read_text().strip(), process.pid
    finally:
        process.send_signal(2)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.asynccontextmanager
async def door_client(url: str, token: str) -> AsyncIterator[Any]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(60, read=300))
    async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http),
                            read_timeout_seconds=60) as client:
        yield client


async def throughput(clients: list[Any], per_client: int, tool: str) -> float:
    async def one(client: Any) -> None:
        for _ in range(per_client):
            result = await client.call_tool(tool, {"text": "hello"})
            assert not result.is_error, result.content

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in clients))
    return len(clients) * per_client / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--per-session", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sw-bench-mcp-") as tmp:
        config = write_setup(Path(tmp))
        async with direct_client() as client:
            direct = await timed(args.calls, lambda: client.call_tool("echo", {"text": "hello"}))
        gateway = await in_process_gateway(config, args.calls)
        with control_plane(config) as (url, operator, pid):
            sw = Stitchwork(url, operator)
            session = await sw.asession("bench", "benchmark the door")
            async with door_client(url, session.token) as client:
                cpu_before = cpu_s(pid)
                door = await timed(args.calls, lambda: client.call_tool("fake.echo", {"text": "hello"}))
                door_cpu = (cpu_s(pid) - cpu_before) / (args.calls + min(20, args.calls)) * 1000
            print(f"one client, {args.calls} calls each (echo on the test upstream over stdio); load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            line("direct", direct)
            line("gateway", gateway, direct)
            line("door", door, direct)
            line("fdatasync", fdatasync_ms(Path(tmp)))
            print(f"door: CPU of the `stitchwork up` process per call {door_cpu:.2f} ms (gateway, MCP, HTTP)")
            sessions = [await sw.asession("bench", f"session {i}") for i in range(args.sessions)]
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(door_client(url, s.token)) for s in sessions]
                door_rate = await throughput(clients, args.per_session, "fake.echo")
            async with direct_client() as client:
                direct_rate = await throughput([client] * args.sessions, args.per_session, "echo")
            print(f"{args.sessions} concurrent sessions x {args.per_session} calls: door {door_rate:8.1f} calls/s; "
                  f"direct (one client, {args.sessions} concurrent calls) {direct_rate:8.1f} calls/s; "
                  f"ratio {door_rate / direct_rate:.2f}")
            for s in [session, *sessions]:
                await s.close()


if __name__ == "__main__":
    asyncio.run(main())
