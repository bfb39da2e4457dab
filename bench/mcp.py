"""MCP ``tools/call`` through the MCP door against calling the same upstream MCP server directly, in the same run.

    python3 bench/mcp.py [--calls 300] [--sessions 32] [--per-session 20]

The upstream is the test server ``tests/gateway/upstream_server.py`` (its ``echo`` tool), run twice: over stdio, and
over Streamable HTTP on loopback (its own process, a bearer key). Paths:

1. direct stdio: the official ``mcp`` client talks to its own upstream process over stdio (the old baseline);
2. direct http: the same client over Streamable HTTP to the HTTP upstream (the baseline of the headline figure:
   HTTP to HTTP, so what is added is what the gateway adds, not a change of transport);
3. gateway: ``Gateway.call_tool`` in process (a session's run token; identity, validation, taint, Cedar, audit
   with fsync, the upstream call, labelling) without the door's transport, to each upstream;
4. door: a real ``stitchwork up`` (a subprocess, loopback) and the official ``mcp`` client over Streamable HTTP at
   ``/mcp`` with the session's run token, calling ``fake.echo`` (the stdio upstream: the old figure, against 1)
   and ``web.echo`` (the HTTP upstream, its key from the vault: the headline figure, against 2).

The over-the-wire paths (1, 2, 4) are timed interleaved, call by call, so a load swing on a shared machine hits
them alike. Reported: p50 and p99 per call at one client and the added latency against the baseline; the time of
one fdatasync in the state directory (each call waits for its audit event to be durable: a floor under the added
latency on this disk); the `stitchwork up` process's CPU per door call; then throughput at ``--sessions``
concurrent sessions (one MCP client each, ``--per-session`` calls each) through the door, beside the same number of
direct clients over HTTP (and the old figure: concurrent calls on one direct stdio client). Targets: added p50
<= 2 ms and p99 <= 5 ms at one client. Wall clock on a shared 2-core machine: compare within the run.
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
UPSTREAM_KEY = "upstream-key"  # what the test server's HTTP mode accepts as its bearer


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


def write_setup(root: Path, http_url: str) -> Path:
    """A state dir with one agent given both upstreams' tools, the config naming them, and the HTTP one's key in
    the vault."""
    from stitchwork.config import load_config
    from stitchwork.platform import open_vault_for

    agents = root / "agents"
    agents.mkdir()
    (agents / "bench.toml").write_text(
        'name = "bench"\nmodel = ""\ntools = ["fake.*", "web.*"]\nmax_steps = 1000000\n')
    config = root / "stitchwork.toml"
    config.write_text(
        f'state_dir = "{root / "state"}"\nagent_dirs = ["{agents}"]\n'
        '[messaging]\nbus = "memory://"\n[data]\nmemory_tools = false\n[isolation]\nallow_inline = true\n'
        f'[mcp.servers.fake]\ncommand = {json.dumps([sys.executable, SERVER])}\nsandbox = "inline://"\n'
        '[mcp.servers.fake.tools.echo]\nside_effect = "read"\n'
        f'[mcp.servers.web]\nurl = "{http_url}"\nkey = "secret://upstream_key"\n'
        '[mcp.servers.web.tools.echo]\nside_effect = "read"\n'
    )
    vault = open_vault_for(load_config(config))
    try:
        vault.set("upstream_key", UPSTREAM_KEY)
    finally:
        vault.close()
    return config


@contextlib.contextmanager
def http_upstream() -> Any:
    """The test upstream serving Streamable HTTP on a loopback port (its own process); yields its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, SERVER, "http", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the HTTP upstream did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)


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


@contextlib.asynccontextmanager
async def direct_http_client(url: str) -> AsyncIterator[Any]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
                              timeout=httpx2.Timeout(60, read=300))
    async with http, Client(streamable_http_client(url, http_client=http), read_timeout_seconds=60) as client:
        yield client


async def interleaved(calls: int, paths: dict[str, Any], cpu: dict[str, Any]) -> tuple[dict[str, list[float]],
                                                                                    dict[str, float]]:
    """Times each path's call in turn, ``calls`` rounds (after 20 warm-up rounds); ``cpu`` names the paths whose
    CPU to read around each call (a function returning CPU seconds). Returns ms per call, and CPU ms per call."""
    for _ in range(min(20, calls)):
        for call in paths.values():
            await call()
    out: dict[str, list[float]] = {name: [] for name in paths}
    used = dict.fromkeys(cpu, 0.0)
    for _ in range(calls):
        for name, call in paths.items():
            before = cpu[name]() if name in cpu else 0.0
            started = time.perf_counter()
            await call()
            out[name].append((time.perf_counter() - started) * 1000)
            if name in cpu:
                used[name] += cpu[name]() - before
    return out, {name: used[name] / calls * 1000 for name in cpu}


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
    text = f"{name:<14} p50 {pct(values, 0.5):7.3f} ms  p99 {pct(values, 0.99):7.3f} ms"
    if base is not None:
        text += (f"   added p50 {pct(values, 0.5) - pct(base, 0.5):+7.3f} ms  "
                 f"added p99 {pct(values, 0.99) - pct(base, 0.99):+7.3f} ms")
    print(text, flush=True)


async def in_process_gateway(config_path: Path, calls: int) -> dict[str, list[float]]:
    from stitchwork.config import load_config
    from stitchwork.platform import Platform
    from stitchwork.service import Service

    config = load_config(config_path)
    platform = Platform.open(config)
    try:
        info = await Service(platform).sessions.open("bench", "benchmark the door")

        def caller(tool: str) -> Any:
            async def call() -> None:
                outcome = await platform.gateway.call_tool(info.token, tool, {"text": "hello"})
                assert outcome.status == "ok", outcome.error
            return call

        result, _ = await interleaved(calls, {"stdio": caller("fake.echo"), "http": caller("web.echo")}, {})
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
    with tempfile.TemporaryDirectory(prefix="sw-bench-mcp-") as tmp, http_upstream() as http_url:
        config = write_setup(Path(tmp), http_url)
        load = [os.getloadavg()[0]]
        gateway = await in_process_gateway(config, args.calls)
        with control_plane(config) as (url, operator, pid):
            sw = Stitchwork(url, operator)
            session = await sw.asession("bench", "benchmark the door")
            async with direct_client() as stdio, direct_http_client(http_url) as http, \
                    door_client(url, session.token) as door:
                load.append(os.getloadavg()[0])
                times, cpu = await interleaved(args.calls, {
                    "direct stdio": lambda: stdio.call_tool("echo", {"text": "hello"}),
                    "direct http": lambda: http.call_tool("echo", {"text": "hello"}),
                    "door stdio": lambda: door.call_tool("fake.echo", {"text": "hello"}),
                    "door http": lambda: door.call_tool("web.echo", {"text": "hello"}),
                }, {"door stdio": lambda: cpu_s(pid), "door http": lambda: cpu_s(pid)})
            load.append(os.getloadavg()[0])
            print(f"one client, {args.calls} calls per path (echo on the test upstream); load average "
                  f"{', '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} CPUs")
            print("HTTP to HTTP (the headline: what the gateway adds):")
            line("direct http", times["direct http"])
            line("gateway http", gateway["http"], times["direct http"])
            line("door http", times["door http"], times["direct http"])
            print("over stdio to the upstream (the old figure):")
            line("direct stdio", times["direct stdio"])
            line("gateway stdio", gateway["stdio"], times["direct stdio"])
            line("door stdio", times["door stdio"], times["direct stdio"])
            line("fdatasync", fdatasync_ms(Path(tmp)))
            print(f"door: CPU of the `stitchwork up` process per call {cpu['door http']:.2f} ms (http upstream), "
                  f"{cpu['door stdio']:.2f} ms (stdio upstream)")
            sessions = [await sw.asession("bench", f"session {i}") for i in range(args.sessions)]
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(door_client(url, s.token)) for s in sessions]
                door_rate = await throughput(clients, args.per_session, "web.echo")
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(direct_http_client(http_url)) for _ in sessions]
                http_rate = await throughput(clients, args.per_session, "echo")
            async with direct_client() as client:
                stdio_rate = await throughput([client] * args.sessions, args.per_session, "echo")
            print(f"{args.sessions} concurrent sessions x {args.per_session} calls: door (http upstream) "
                  f"{door_rate:8.1f} calls/s; direct http ({args.sessions} clients) {http_rate:8.1f} calls/s; "
                  f"ratio {door_rate / http_rate:.2f}; direct stdio (one client, {args.sessions} concurrent calls) "
                  f"{stdio_rate:8.1f} calls/s")
            for s in [session, *sessions]:
                await s.close()


if __name__ == "__main__":
    asyncio.run(main())
