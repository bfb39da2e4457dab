"""Sandbox benchmark: start-up, warm-pool acquire, ``print(1+1)`` end to end, what the isolation costs, deadlines,
and density, per backend.

Every figure is printed next to a baseline measured in the same run (a plain ``subprocess`` Python start), so
ratios hold on a shared, noisy machine. Run ``python3 bench/sandbox.py [--quick]`` or ``stitchwork sandbox bench``.

* cold: a fresh sandbox per call (``wasm://?pool=0`` starts an interpreter host and CPython inside it each time);
* warm acquire: taking a parked interpreter host out of the ``wasm://`` pool;
* warm e2e: ``print(1+1)``-style call through a full pool (the pool refills between calls);
* back-to-back: calls with no pause, so the pool may run dry and calls fall back to cold starts;
* isolation cost: ``/bin/true`` under bare ``bwrap``, then through the process guard alone, the guard with a
  cgroup, with the cgroup and the disk stage, and the whole ``bwrap://`` sandbox (user namespace, seccomp,
  rlimits): each as a ratio to bare ``bwrap``;
* deadlines: how far past ``timeout_s`` and ``cpu_s`` a spinning program's result comes back;
* density: parked ``wasm://`` interpreter hosts (one process each) against plain ``python3`` processes, by PSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stitchwork.isolation import _process, _rootfs
from stitchwork.isolation._base import Command, Limits, PythonCall, SandboxSpec, open_sandbox

TOOL = "def main():\n    print(1 + 1)\n    return 1 + 1\n\n\ndef spin():\n    while True:\n        pass\n"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def line(name: str, values: list[float], baseline: float | None = None, unit: str = "subprocess") -> None:
    p50, p99 = pct(values, 0.5), pct(values, 0.99)
    ratio = f"  ({p50 / baseline:5.2f}x {unit})" if baseline else ""
    print(f"  {name:<48} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  n={len(values)}{ratio}")


def pss_kb(pid: int | str = "self") -> int:
    try:
        for row in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if row.startswith("Pss:"):
                return int(row.split()[1])
    except OSError:
        pass
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
            line("wasm:// cold (host process + CPython start-up)", await timed(cold, call, n), base)
        async with open_sandbox("wasm://", pool=2) as warm:
            assert isinstance(warm, wasm.WasmSandbox)
            warm.prepare()
            acquire = []
            for _ in range(n):
                await asyncio.to_thread(warm.wait_pool)
                started = time.perf_counter()
                host = warm._take_warm()
                acquire.append(time.perf_counter() - started)
                if host is not None:
                    host.discard()
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
            print(f"  {uri:<48} skipped: {reason}")
            continue
        async with open_sandbox(uri) as sandbox:
            spawn = await timed(sandbox, SandboxSpec(Command(("/bin/true",))), runs)
            line(f"{uri} spawn /bin/true", spawn, base)
            line(f"{uri} e2e", await timed(sandbox, call, runs), base)
    for uri in ("firecracker://", "nanos://"):
        print(f"  {uri:<48} skipped: {_available(uri)[1]}")


async def isolation_cost(n: int) -> None:
    """``/bin/true`` with each layer of the new process isolation added, as ratios to bare bwrap."""
    ok, reason = _available("bwrap://")
    print("\nisolation cost (/bin/true; ratios to bare bwrap):")
    if not ok:
        print(f"  skipped: {reason}")
        return
    bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
    bare_argv = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "/bin/true"]
    bare = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run(bare_argv, check=True)
        bare.append(time.perf_counter() - started)
    base = pct(bare, 0.5)
    line("bare bwrap (no guard, no cgroup, no stage)", bare, base, "bare")
    limits = Limits(timeout_s=30)
    env = {"PATH": _process.DEFAULT_PATH}

    async def supervised(confinement: _process.Confinement, stage: bool) -> float:
        layout = _rootfs.Layout(limits.disk_mb << 20, uid=os.getuid(), gid=os.getgid()) if stage else None
        if layout is not None:
            layout.scratch("work")
            confinement = _process.Confinement(cgroup=confinement.cgroup, stage=layout.stage())
        started = time.perf_counter()
        try:
            outcome = await _process.supervise(bare_argv, env=env, stdin=b"", limits=limits, confinement=confinement)
        finally:
            if layout is not None:
                layout.remove()
        assert outcome.code == 0, outcome
        return time.perf_counter() - started

    for name, confinement, stage in (
        ("+ process guard (pid-namespace init, parent binding)", _process.Confinement(cgroup=False), False),
        ("+ cgroup (memory, cpu, pids; budget watch)", _process.Confinement(cgroup=True), False),
        ("+ disk stage (private tmpfs)", _process.Confinement(cgroup=True), True),
    ):
        line(name, [await supervised(confinement, stage) for _ in range(n)], base, "bare")
    async with open_sandbox("bwrap://") as sandbox:
        whole = await timed(sandbox, SandboxSpec(Command(("/bin/true",))), n)
    line("bwrap:// whole (+ user namespace, seccomp, rlimits, binds)", whole, base, "bare")


async def deadlines(n: int, tool: Path) -> None:
    """How late results come back after ``timeout_s`` and ``cpu_s`` (target: within 0.5 s)."""
    print("\ndeadlines (a spinning tool; result latency past the limit):")
    for uri in ("wasm://", "bwrap://", "gvisor://"):
        ok, reason = _available(uri)
        if not ok:
            print(f"  {uri:<48} skipped: {reason}")
            continue
        async with open_sandbox(uri, **({"pool": 1} if uri == "wasm://" else {})) as sandbox:
            for kind, limits, limit in (("timeout_s=1", Limits(timeout_s=1, cpu_s=60), 1.0),
                                        ("cpu_s=1", Limits(timeout_s=60, cpu_s=1), 1.0)):  # fmt: skip
                late = []
                for _ in range(n):
                    if hasattr(sandbox, "wait_pool"):
                        await asyncio.to_thread(sandbox.wait_pool)
                    result = await sandbox.run(SandboxSpec(PythonCall(tool, "spin"), limits=limits))
                    assert result.killed in ("timeout", "cpu"), result
                    # cpu_s: the result comes back once the budget is used up; timeout_s: wall time past the limit
                    used = result.cpu_s if kind.startswith("cpu") else result.duration_s
                    late.append(max(0.0, used - limit))
                line(f"{uri} {kind}: past the limit", late)


def density(target: int, baseline_n: int) -> None:
    from stitchwork.isolation import wasm
    from stitchwork.isolation._wasm_pool import HostPool

    print(f"\ndensity (PSS; {target} parked wasm:// interpreter hosts, {baseline_n} plain processes):")
    procs = []
    try:
        for _ in range(baseline_n):
            procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", "import sys; sys.stdin.read()"],
                                          stdin=subprocess.PIPE))  # fmt: skip
        time.sleep(0.5)
        per_proc = sum(pss_kb(p.pid) for p in procs) / len(procs) / 1024
        print(f"  plain python3 processes: {len(procs)} held, {per_proc:.1f} MiB PSS each")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if not wasm.WasmSandbox.available()[0]:
        print("  wasm:// skipped: unavailable")
        return
    wasm.prepare()
    pool = HostPool(cache=None, size=target, limits=Limits(), overhead_mb=160, nofile=256)
    started = time.perf_counter()
    pool.start_filling()
    full = pool.wait_full(timeout=30 + target * 2.0)
    took = time.perf_counter() - started
    try:
        hosts = list(pool._parked)
        total = sum(pss_kb(h.sup.proc.pid) for h in hosts) / 1024
        each = total / max(len(hosts), 1)
        print(f"  wasm:// parked interpreter hosts: {len(hosts)} ({'full' if full else 'not full'}) in {took:.1f} s, "
              f"{each:.1f} MiB PSS each ({total:.0f} MiB total); {each / max(per_proc, 1e-9):.1f}x a plain process")
    finally:
        pool.close()


def _available(uri: str) -> tuple[bool, str]:
    from stitchwork.isolation._base import SANDBOXES

    try:
        ok, reason = SANDBOXES.load(uri).available()
    except Exception as exc:
        return False, str(exc)
    return bool(ok), str(reason)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and a smaller density test")
    parser.add_argument("-n", type=int, default=0, help="iterations per latency figure")
    parser.add_argument("--density", type=int, default=0, help="parked wasm hosts to hold")
    args = parser.parse_args()
    n = args.n or (10 if args.quick else 40)
    target = args.density or (10 if args.quick else 50)
    with tempfile.TemporaryDirectory() as scratch:
        tool = Path(scratch) / "tool.py"
        tool.write_text(TOOL)
        os.chmod(scratch, 0o755)
        base = subprocess_baseline(n)
        print(f"host: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
        print("\nbaseline:")
        line("plain subprocess python3 -I -S -c 'print(1+1)'", base)
        asyncio.run(latency(n, tool, pct(base, 0.5)))
        asyncio.run(isolation_cost(n))
        asyncio.run(deadlines(max(3, n // 4), tool))
    density(target, baseline_n=10 if args.quick else 30)


if __name__ == "__main__":
    main()
