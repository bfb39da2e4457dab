"""``stitchwork sandbox prepare | run | bench`` and ``stitchwork doctor``."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import typer
from rich.table import Table

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import JsonOpt, console, err, escape, fail, print_json, server_side, working
from stitchwork.isolation._base import Command, Limits, Mount, SandboxResult, SandboxSpec, open_sandbox
from stitchwork.isolation.availability import backend_status

sandbox_app = typer.Typer(help="Run programs in sandboxes; prepare and benchmark the backends.", no_args_is_help=True)


@sandbox_app.command("prepare")
def prepare_cmd(cache: Path | None = typer.Option(None, help="Cache directory (default: XDG cache)."),
                as_json: bool = JsonOpt) -> None:
    """Compile the CPython WASI module once and cache it (the first compile takes seconds)."""
    wasm = server_side("stitchwork.isolation.wasm", "stitchwork sandbox prepare")
    try:
        with working("compiling the CPython WASI module for wasm:// (once; about 20 s)"):
            path, compiled, seconds = wasm.prepare(cache)
    except StitchworkError as exc:
        err.print(f"[red]wasm:// not prepared:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    if as_json:
        print_json({"path": str(path), "compiled": compiled, "seconds": round(seconds, 3)})
        return
    verb = "compiled" if compiled else "already cached"
    console.print(f"wasm:// module {verb}: {path} ({seconds:.1f} s)", markup=False)


def _parse_dir(value: str) -> Mount:
    path, _, mode = value.partition(":")
    if mode not in ("", "ro", "rw"):
        raise typer.BadParameter(f"--dir {value!r}: mode must be ro or rw")
    source = Path(path).resolve()
    return Mount(source=source, target=str(source), writable=mode != "ro")


@sandbox_app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def run_cmd(
    ctx: typer.Context,
    backend: str = typer.Option("", help="Sandbox URI (default: [isolation] default)."),
    mem: int = typer.Option(512, help="Memory limit, MiB."),
    cpu_s: float = typer.Option(10.0, "--cpu-s", help="CPU limit, seconds."),
    timeout: float = typer.Option(20.0, help="Wall-clock limit, seconds."),
    dirs: list[str] = typer.Option([], "--dir", help="PATH[:ro] to make visible at the same path (repeatable)."),
    workdir: Path | None = typer.Option(None, help="Host directory mounted as /work (default: a scratch dir)."),
) -> None:
    """Run FILE.py (as a Python script) or `-- CMD...` in a sandbox; report exit status, output and usage."""
    args = list(ctx.args)
    if not args:
        raise typer.BadParameter("give FILE.py or -- CMD ...")
    uri = backend
    if not uri:
        from stitchwork.config import load_config

        try:
            uri = load_config().isolation.default
        except StitchworkError as exc:
            fail(exc)
    mounts = tuple(_parse_dir(d) for d in dirs)
    if len(args) == 1 and args[0].endswith(".py") and Path(args[0]).is_file():
        script = Path(args[0]).resolve()
        mounts += (Mount(source=script.parent, target=str(script.parent), writable=False),)
        command = Command(("python3", str(script)))
    else:
        command = Command(tuple(args), stdin=b"" if sys.stdin.isatty() else sys.stdin.buffer.read())
    limits = Limits(mem_mb=mem, cpu_s=cpu_s, timeout_s=timeout)
    spec = SandboxSpec(command, workdir=workdir.resolve() if workdir else None, mounts=mounts, limits=limits)

    options = {"pool": 0} if uri.startswith("wasm:") and "pool=" not in uri else {}  # one run: no warm pool

    async def go() -> SandboxResult:
        async with open_sandbox(uri, **options) as sandbox:
            return await sandbox.run(spec)

    try:
        with working(f"running in {uri}"):
            result = asyncio.run(go())
    except StitchworkError as exc:
        err.print(f"[red]{escape(uri)}:[/red] {escape(str(exc))}")
        _hint_backends()
        raise typer.Exit(2) from exc
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    summary = {
        "backend": uri, "exit_code": result.exit_code, "killed": result.killed, "error": result.error,
        "duration_s": round(result.duration_s, 4), "cpu_s": round(result.cpu_s, 4), "max_rss_kb": result.max_rss_kb,
        "truncated": result.truncated,
    }  # fmt: skip
    print(json.dumps(summary), file=sys.stderr)
    raise typer.Exit(0 if result.ok else 1)


def _hint_backends() -> None:
    usable = [name for name, ok, _ in backend_status() if ok and name != "inline"]
    err.print(f"backends usable on this host: {', '.join(f'{n}://' for n in usable) or 'none'} "
                  "(`stitchwork doctor` says why not the others)")  # fmt: skip


@sandbox_app.command("bench")
def bench_cmd(
    quick: bool = typer.Option(False, help="Fewer iterations and a smaller density test."),
) -> None:
    """Run bench/sandbox.py (cold start, warm acquire, print(1+1) p50/p99, density vs a plain subprocess)."""
    script = Path(__file__).resolve().parents[3] / "bench" / "sandbox.py"
    if not script.is_file():
        console.print(f"[red]no benchmark at {script}[/red] (it ships with the source tree)")
        raise typer.Exit(1)
    argv = [sys.executable, str(script), *(["--quick"] if quick else [])]
    raise typer.Exit(subprocess.call(argv))


def doctor(as_json: bool = JsonOpt) -> None:
    """Which sandbox backends this host supports (and why not the others), plus configuration warnings."""
    from stitchwork.config import load_config

    backends = backend_status()
    warnings = []
    try:
        config = load_config()
    except StitchworkError as exc:
        err.print(f"[red]config:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    default = config.isolation.default
    status = {f"{n}://": ok for n, ok, _ in backends}
    scheme = default.split("://", 1)[0] + "://"
    if not status.get(scheme, False):
        warnings.append(f"the default sandbox {default} is not usable here; tools without their own sandbox fail")
    if scheme == "inline://":
        warnings.append("the default sandbox is inline:// (the in-process test double): tools are NOT isolated")
    host = config.server.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        warnings.append(f"the control plane binds {host}, not loopback: it is reachable from the network")
    if scheme == "wasm://" and status.get("wasm://"):
        from stitchwork.isolation import wasm

        if not wasm.cwasm_path().exists():
            warnings.append("the wasm module is not compiled yet: run `stitchwork sandbox prepare` (a few seconds)")
        state = config.state_dir if config.state_dir.exists() else config.state_dir.parent
        apart = state.exists() and os.stat(state).st_dev != os.stat(tempfile.gettempdir()).st_dev
        if "staging=" not in default and apart:
            warnings.append(
                f"{tempfile.gettempdir()} and the state dir are on different filesystems: the wasm:// warm pool "
                f"cannot bind tool work dirs, every call starts cold; set wasm://?staging=<dir beside {state}>"
            )
    if os.environ.get("STITCHWORK_VAULT_KEY"):
        warnings.append("STITCHWORK_VAULT_KEY is set in the environment: every child process of this shell sees it")
    if as_json:
        print_json({"backends": [{"backend": f"{n}://", "usable": ok, "why_not": reason} for n, ok, reason in backends],
                    "warnings": warnings})
        return
    table = Table("backend", "usable", "why not / notes")
    for name, ok, reason in backends:
        table.add_row(f"{name}://", "[green]yes[/green]" if ok else "[red]no[/red]", escape(reason))
    console.print(table)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if not warnings:
        console.print("[green]no warnings[/green]")


def register(app: typer.Typer) -> None:
    """Adds ``sandbox`` and ``doctor`` to the main CLI."""
    app.add_typer(sandbox_app, name="sandbox")
    app.command("doctor")(doctor)
