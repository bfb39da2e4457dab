"""``stitchwork sandbox prepare | run | bench`` and ``stitchwork doctor``."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import JsonOpt, console, err, escape, fail, print_json, server_side, working
from stitchwork.isolation._base import (
    Command,
    Limits,
    Mount,
    SandboxResult,
    SandboxSpec,
    is_inline,
    isolation_label,
    open_sandbox,
)
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


#: Terminal control characters (C0 but tab and newline, DEL, C1) and bidirectional overrides: escaped when a
#: sandboxed program's output is printed, so it cannot move the cursor, rewrite lines or recolour the summary.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escape_output(data: bytes) -> str:
    """Program output as printable text: invalid UTF-8 and control characters as ``\\xNN`` escapes."""
    text = data.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


#: Marks the summary line on stderr. It always starts a line of its own, after all of the program's output.
SUMMARY_PREFIX = "stitchwork-sandbox-summary: "


@sandbox_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_cmd(
    ctx: typer.Context,
    backend: str = typer.Option("", help="Sandbox URI (default: [isolation] default)."),
    mem: int = typer.Option(512, help="Memory limit for the whole sandbox, MiB."),
    cpu_s: float = typer.Option(10.0, "--cpu-s", help="CPU time budget for the whole sandbox, seconds."),
    timeout: float = typer.Option(20.0, help="Wall-clock limit, seconds."),
    disk_mb: int = typer.Option(256, "--disk-mb", help="Writable space (/work, /tmp, /dev/shm together), MiB."),
    pids: int = typer.Option(64, help="Processes (and threads) of the whole sandbox."),
    cpus: float = typer.Option(1.0, help="CPU cores the sandbox may use at once."),
    output: int = typer.Option(1_000_000, help="Output cap, bytes (stdout and stderr together)."),
    dirs: list[str] = typer.Option([], "--dir", help="PATH[:ro] to make visible at the same path (repeatable)."),
    workdir: Path | None = typer.Option(None, help="Host directory mounted as /work (default: a scratch dir)."),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the summary (JSON) to this file: a stream the program cannot write to."
    ),
    raw: bool = typer.Option(False, help="Write the program's output unescaped (control characters included)."),
) -> None:
    """Run FILE.py (as a Python script) or `-- CMD...` in a sandbox; report exit status, output and usage.

    The program's stdout and stderr are printed with control characters escaped; then, on a line of its own at the
    end of stderr, the summary (``stitchwork-sandbox-summary: {json}``) and with --json the same JSON in a file.
    Exit status: 0 when the program succeeded, 1 when it failed or a limit stopped it, 2 when it could not start.
    """
    from stitchwork.config import load_config

    args = list(ctx.args)
    if not args:
        raise typer.BadParameter("give FILE.py or -- CMD ...")
    try:
        isolation = load_config().isolation
    except StitchworkError as exc:
        fail(exc)
    uri = backend or isolation.default
    mounts = tuple(_parse_dir(d) for d in dirs)
    if len(args) == 1 and args[0].endswith(".py") and Path(args[0]).is_file():
        script = Path(args[0]).resolve()
        # Seen at /script/<name>. wasm:// preopens directories; the others bind the file itself (its directory may
        # be closed to the sandbox's unprivileged user).
        if uri.startswith("wasm:"):
            mounts += (Mount(source=script.parent, target="/script", writable=False),)
        else:
            mounts += (Mount(source=script, target=f"/script/{script.name}", writable=False),)
        command = Command(("python3", f"/script/{script.name}"))
    else:
        command = Command(tuple(args), stdin=b"" if sys.stdin.isatty() else sys.stdin.buffer.read())
    limits = Limits(mem_mb=mem, cpu_s=cpu_s, timeout_s=timeout, disk_mb=disk_mb, max_pids=pids, cpus=cpus,
                    max_output_bytes=output)  # fmt: skip
    spec = SandboxSpec(command, workdir=workdir.resolve() if workdir else None, mounts=mounts, limits=limits)

    options = {"pool": 0} if uri.startswith("wasm:") and "pool=" not in uri else {}  # one run: no warm pool

    async def go() -> SandboxResult:
        async with open_sandbox(uri, allow_inline=isolation.allow_inline, **options) as sandbox:
            return await sandbox.run(spec)

    if is_inline(uri) and isolation.allow_inline:
        err.print("[bold red]inline:// -- NO ISOLATION:[/bold red] the program runs as this user, on this host")
    try:
        with working(f"running in {uri}"):
            result = asyncio.run(go())
    except StitchworkError as exc:
        err.print(f"[red]{escape(uri)}:[/red] {escape(str(exc))}")
        _hint_backends()
        raise typer.Exit(2) from exc
    _emit(result.stdout, sys.stdout, raw=raw)
    _emit(result.stderr, sys.stderr, raw=raw)
    summary = {
        "backend": uri, "isolation": isolation_label(uri), "exit_code": result.exit_code, "killed": result.killed,
        "error": result.error, "duration_s": round(result.duration_s, 4), "cpu_s": round(result.cpu_s, 4),
        "max_rss_kb": result.max_rss_kb, "truncated": result.truncated,
    }  # fmt: skip
    line = json.dumps(summary)
    if json_path is not None:
        json_path.write_text(line + "\n")
    ends_line = not result.stderr or result.stderr.endswith(b"\n")
    sys.stderr.write(("" if ends_line else "\n") + SUMMARY_PREFIX + line + "\n")
    sys.stderr.flush()
    raise typer.Exit(0 if result.ok else 1)


def _emit(data: bytes, stream: Any, *, raw: bool) -> None:
    if raw:
        stream.flush()
        stream.buffer.write(data)
    else:
        stream.write(escape_output(data))
    stream.flush()


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


def enforcement() -> list[tuple[str, str]]:
    """(what, how) of the host facts every sandbox's limits rest on, for ``doctor``."""
    from stitchwork.isolation import _process

    support = _process.cgroup_support()
    rows = [("cgroups", support.describe())]
    if not support.complete:
        rows.append(("whole-sandbox limits", "NOT enforceable here: bwrap:// and gvisor:// refuse to run "
                                             "(bwrap://?limits=process accepts per-process limits only)"))  # fmt: skip
    rows.append(("sandbox user", "uid 65534 in a user namespace (host root is never the sandbox's user)"
                 if os.geteuid() == 0 else f"uid {os.geteuid()} (this user)"))  # fmt: skip
    return rows


def doctor(as_json: bool = JsonOpt) -> None:
    """Which sandbox backends this host supports (and why not the others), what their limits rest on, plus
    configuration warnings."""
    from stitchwork.config import load_config

    try:
        config = load_config()
    except StitchworkError as exc:
        err.print(f"[red]config:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    allowed = config.isolation.allow_inline
    backends = backend_status()
    rows = []
    for name, ok, reason in backends:
        if name == "inline":
            ok = allowed
            reason = "NO ISOLATION: the in-process test double (tools run as this user on this host); " + (
                "enabled by [isolation] allow_inline" if allowed else "refused unless [isolation] allow_inline")
        rows.append((name, ok, reason))
    facts = enforcement()
    warnings = []
    default = config.isolation.default
    status = {f"{n}://": ok for n, ok, _ in backends}
    scheme = default.split("://", 1)[0] + "://"
    if not status.get(scheme, False):
        warnings.append(f"the default sandbox {default} is not usable here; tools without their own sandbox fail")
    if is_inline(default):
        warnings.append(
            "the default sandbox is inline:// (the in-process test double): tools are NOT isolated"
            + ("" if allowed else "; it is refused until allow_inline is set")
        )
    if allowed:
        warnings.append("[isolation] allow_inline is on: a tool naming inline:// runs with NO isolation")
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
    if os.environ.get("STITCHWORK_VAULT_KEY"):
        warnings.append("STITCHWORK_VAULT_KEY is set in the environment: every child process of this shell sees it")
    if as_json:
        print_json({
            "backends": [{"backend": f"{n}://", "usable": ok, "why_not": reason,
                          "isolation": isolation_label(f"{n}://")} for n, ok, reason in rows],
            "limits_rest_on": {what: how for what, how in facts},
            "warnings": warnings,
        })  # fmt: skip
        return
    table = Table("backend", "usable", "why not / notes")
    for name, ok, reason in rows:
        if name == "inline":
            table.add_row("inline://", "[yellow]allowed[/yellow]" if ok else "[red]refused[/red]", escape(reason))
        else:
            table.add_row(f"{name}://", "[green]yes[/green]" if ok else "[red]no[/red]", escape(reason))
    console.print(table)
    limits = Table("limits rest on", "on this host")
    for what, how in facts:
        limits.add_row(what, escape(how))
    console.print(limits)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if not warnings:
        console.print("[green]no warnings[/green]")


def register(app: typer.Typer) -> None:
    """Adds ``sandbox`` and ``doctor`` to the main CLI."""
    app.add_typer(sandbox_app, name="sandbox")
    app.command("doctor")(doctor)
