"""Sandbox benchmark: start-up, warm-pool acquire, ``print(1+1)`` end to end, and density, per backend.

Every figure is printed next to a baseline measured in the same run (a plain ``subprocess`` Python start), so
ratios hold on a shared, noisy machine. Run ``python3 bench/sandbox.py [--quick]`` or ``stitchwork sandbox bench``.

* cold: a fresh sandbox per call (``wasm://?pool=0`` starts CPython inside the module each time);
* warm acquire: taking a parked interpreter out of the ``wasm://`` pool;
* warm e2e: ``print(1+1)``-style call through a full pool (the pool refills between calls);
* back-to-back: calls with no pause, so the pool may run dry and calls fall back to cold starts;
* density: live parked wasm interpreters held in this process until the count, the time or the memory budget
  runs out, against plain ``python3`` processes held the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stitchwork.isolation._base import Command, PythonCall, SandboxSpec, open_sandbox

TOOL = "def main():\n    print(1 + 1)\n    return 1 + 1\n"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def line(name: str, values: list[float], baseline: float | None = None) -> None:
    p50, p99 = pct(values, 0.5), pct(values, 0.99)
    ratio = f"  ({p50 / baseline:5.2f}x subprocess)" if baseline else ""
    print(f"  {name:<44} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  n={len(values)}{ratio}")


def rss_kb(pid: int | str = "self") -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1])
    return 0


def subprocess_baseline(n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-c", "print(1+1)"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


async def timed(sandbox: object, spec: SandboxSpec, n: int, between: object = None) -> list[float]:
    times = []
    for _ in range(n):
        if between is not None:
            await asyncio.to_thread(between)  # type: ignore[arg-type]
        started = time.perf_counter()
        result = await sandbox.run(spec)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - started)
        assert result.value == 2 or result.exit_code == 0, result
    return times


async def latency(n: int, tool: Path, base: float) -> None:
    call = SandboxSpec(PythonCall(tool, "main"))
    print("\nlatency (print(1+1)):")
    from stitchwork.isolation import wasm

    if wasm.WasmSandbox.available()[0]:
        prep = time.perf_counter()
        _, compiled, _ = wasm.prepare()
        print(f"  wasm module {'compiled' if compiled else 'loaded from cache'} in {time.perf_counter() - prep:.2f} s")
        async with open_sandbox("wasm://", pool=0) as cold:
            line("wasm:// cold (instantiate + CPython start-up)", await timed(cold, call, n), base)
        async with open_sandbox("wasm://", pool=2) as warm:
            assert isinstance(warm, wasm.WasmSandbox)
            warm.prepare()
            acquire = []
            for _ in range(n):
                await asyncio.to_thread(warm.wait_pool)
                started = time.perf_counter()
                instance = warm._take_warm()
                acquire.append(time.perf_counter() - started)
                if instance is not None:
                    instance.discard()
            line("wasm:// warm-pool acquire", acquire)
            line("wasm:// warm e2e (pool refilled between calls)", await timed(warm, call, n, warm.wait_pool), base)
            await asyncio.to_thread(warm.wait_pool)
            before = dict(warm.stats)
            back = await timed(warm, call, n)
            used = {k: warm.stats[k] - before[k] for k in before}
            line(f"wasm:// back-to-back ({used['warm']} warm, {used['cold']} cold)", back, base)
    for uri, runs in (("bwrap://", n), ("gvisor://", max(3, n // 5))):
        ok, reason = _available(uri)
        if not ok:
            print(f"  {uri:<44} skipped: {reason}")
            continue
        async with open_sandbox(uri) as sandbox:
            spawn = await timed(sandbox, SandboxSpec(Command(("/bin/true",))), runs)
            line(f"{uri} spawn /bin/true", spawn, base)
            line(f"{uri} e2e", await timed(sandbox, call, runs), base)
    for uri in ("firecracker://", "nanos://"):
        print(f"  {uri:<44} skipped: {_available(uri)[1]}")


def _available(uri: str) -> tuple[bool, str]:
    from stitchwork.isolation._base import SANDBOXES

    try:
        ok, reason = SANDBOXES.load(uri).available()
    except Exception as exc:
        return False, str(exc)
    return bool(ok), str(reason)


def _max_map_count() -> str:
    try:
        return Path("/proc/sys/vm/max_map_count").read_text().strip()
    except OSError:
        return "?"


def density(target: int, seconds: float, budget_mb: int, baseline_n: int) -> None:
    from stitchwork.isolation import wasm
    from stitchwork.isolation._wasm_instance import RUNNER_ARGV, Instance

    print(f"\ndensity (stop at {target} live, {seconds:g} s or {budget_mb} MiB of RSS growth):")
    procs = []
    start_rss = rss_kb()
    started = time.perf_counter()
    try:
        for _ in range(baseline_n):
            procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", "import sys; sys.stdin.read()"],
                                          stdin=subprocess.PIPE))  # fmt: skip
        time.sleep(0.5)
        total = sum(rss_kb(p.pid) for p in procs)
        took = time.perf_counter() - started
        per_proc = total / len(procs) / 1024
        print(f"  plain python3 processes: {len(procs)} held, {per_proc:.1f} MiB RSS each, "
              f"{took / len(procs) * 1000:.1f} ms per start")  # fmt: skip
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if not wasm.WasmSandbox.available()[0]:
        print("  wasm:// skipped: unavailable")
        return
    rt = wasm.runtime()
    staging = Path(tempfile.mkdtemp(prefix="stitchwork-bench-"))
    live: list[Instance] = []
    start_rss = rss_kb()
    started = time.perf_counter()
    why = "count reached"
    try:
        while len(live) < target:
            if time.perf_counter() - started > seconds:
                why = "time budget"
                break
            if (rss_kb() - start_rss) / 1024 > budget_mb:
                why = "memory budget"
                break
            try:
                batch = [Instance(rt, staging, RUNNER_ARGV, workdir=None, mem_mb=64) for _ in range(8)]
            except Exception as exc:
                why = f"start failed: {exc}"
                break
            stalled = [i for i in batch if not i.ready.wait(15)]
            live += [i for i in batch if not i.finished.is_set()]
            if stalled:
                why = f"stalled: {len(stalled)} interpreter(s) not ready within 15 s (max_map_count {_max_map_count()})"
                break
            if len(live) % 100 < 8:
                print(f"    ... {len(live)} live, {(rss_kb() - start_rss) / 1024:.0f} MiB", flush=True)
        took = time.perf_counter() - started
        grown = (rss_kb() - start_rss) / 1024
        print(f"  wasm:// parked interpreters: {len(live)} live ({why}) in {took:.1f} s, "
              f"{grown / max(len(live), 1):.2f} MiB RSS each ({grown:.0f} MiB total); "
              f"vs plain processes {per_proc / max(grown / max(len(live), 1), 1e-9):.1f}x denser")  # fmt: skip
    finally:
        for instance in live:
            instance.discard()
        deadline = time.monotonic() + 30
        for instance in live:
            instance.finished.wait(max(0.0, deadline - time.monotonic()))


#: wasmtime serves each parked interpreter's blocking stdin read from tokio's blocking pool, capped at 512 threads
#: per process: past that, new interpreters stall. Density beyond it is measured across worker processes.
PER_PROCESS = 480


def density_worker(count: int, seconds: float) -> None:
    """Holds up to ``count`` parked interpreters; prints ``live rss_kb``; waits for stdin to close."""
    from stitchwork.isolation import wasm
    from stitchwork.isolation._wasm_instance import RUNNER_ARGV, Instance

    rt = wasm.runtime()
    staging = Path(tempfile.mkdtemp(prefix="stitchwork-bench-"))
    start_rss, started, live = rss_kb(), time.perf_counter(), []
    while len(live) < count and time.perf_counter() - started < seconds:
        batch = [Instance(rt, staging, RUNNER_ARGV, workdir=None, mem_mb=64) for _ in range(8)]
        if [i for i in batch if not i.ready.wait(15)]:
            break
        live += batch
    print(len(live), rss_kb() - start_rss, flush=True)
    sys.stdin.read()
    os._exit(0)  # the parked interpreters die with the process


def density_processes(target: int, seconds: float) -> None:
    workers = [
        subprocess.Popen([sys.executable, __file__, "--density-worker", str(min(PER_PROCESS, target - i)),
                          "--seconds", str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(0, target, PER_PROCESS)
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        rows = [w.stdout.readline().split() for w in workers if w.stdout is not None]
        took = time.perf_counter() - started
        live = sum(int(r[0]) for r in rows if r)
        grown = sum(int(r[1]) for r in rows if r) / 1024
        print(f"  wasm:// across {len(workers)} processes: {live} live parked interpreters in {took:.1f} s, "
              f"{grown / max(live, 1):.2f} MiB RSS each ({grown:.0f} MiB total)")  # fmt: skip
    finally:
        for w in workers:
            w.kill()
            w.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and a smaller density test")
    parser.add_argument("-n", type=int, default=0, help="iterations per latency figure")
    parser.add_argument("--density", type=int, default=0, help="live wasm sandboxes to aim for")
    parser.add_argument("--density-worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=240.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.density_worker:
        density_worker(args.density_worker, args.seconds)
        return
    n = args.n or (10 if args.quick else 40)
    target = args.density or (100 if args.quick else 1000)
    with tempfile.TemporaryDirectory() as scratch:
        tool = Path(scratch) / "tool.py"
        tool.write_text(TOOL)
        base = subprocess_baseline(n)
        print(f"host: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
        print("\nbaseline:")
        line("plain subprocess python3 -I -S -c 'print(1+1)'", base)
        asyncio.run(latency(n, tool, pct(base, 0.5)))
    seconds = 30 if args.quick else 240
    density(min(target, PER_PROCESS), seconds=seconds, budget_mb=16 * 1024, baseline_n=20 if args.quick else 50)
    if target > PER_PROCESS:
        density_processes(target, seconds)


if __name__ == "__main__":
    main()
