"""The ``stitchwork`` command line."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from stitchwork.config import Config, load_config
from stitchwork.errors import StitchworkError

app = typer.Typer(help="Stitchwork: run autonomous agents safely.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
audit_app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)
secrets_app = typer.Typer(help="Manage the secrets vault (values are never printed).", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(secrets_app, name="secrets")

console = Console()
err = Console(stderr=True)


def _config(config_path: Path | None = None) -> Config:
    return load_config(config_path)


def fail(exc: BaseException) -> NoReturn:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


def _client(config: Config) -> Any:
    from stitchwork.client import connect

    return connect(config)


def print_rows(rows: list[dict[str, Any]], fmt: str, title: str = "") -> None:
    if fmt == "json":
        console.print_json(json.dumps(rows, default=str))
        return
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v, default=str) if isinstance(v, dict | list) else v
                             for k, v in row.items()})
        sys.stdout.write(buffer.getvalue())
        return
    table = Table(title=title or None)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(json.dumps(v, default=str) if isinstance(v, dict | list) else str(v) for v in row.values()))
    console.print(table)


ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (default: $STITCHWORK_CONFIG).")


@app.command()
def up(
    host: str = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default 8470)."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """Serve the control plane (HTTP API + OpenAPI) until interrupted."""
    import uvicorn

    from stitchwork.client import server_file, token_file
    from stitchwork.messaging.embedded import start_local_bus
    from stitchwork.platform import Platform
    from stitchwork.service import Service
    from stitchwork.web.server import create_app

    try:
        config = _config(config_path)
        bind_host = host or config.server.host
        bind_port = port or config.server.port
        if bind_host not in {"127.0.0.1", "localhost", "::1"}:
            err.print(f"[yellow]warning:[/] binding to {bind_host}: the API is reachable from other machines")
        platform = Platform.open(config)
        local_bus = start_local_bus(config)  # messaging: embedded nats-server unless [messaging] bus names one
    except StitchworkError as exc:
        fail(exc)
    service = Service(platform)
    if not service.has_operator_token():
        token = service.create_operator_token()
        path = token_file(config)
        path.write_text(token + "\n")
        os.chmod(path, 0o600)
        console.print(f"[bold]operator token (shown once; also saved to {path}, mode 0600):[/] {token}")
    url = f"http://{bind_host}:{bind_port}"
    server_file(config).write_text(json.dumps({"url": url, "pid": os.getpid()}))
    console.print(f"Stitchwork control plane on {url} (OpenAPI: {url}/openapi.json); state in {config.state_dir}")
    console.print(local_bus.note or f"bus: {local_bus.uri}", highlight=False)
    try:
        uvicorn.run(create_app(service), host=bind_host, port=bind_port, log_level="warning")
    finally:
        local_bus.stop()
        server_file(config).unlink(missing_ok=True)
        import asyncio

        asyncio.run(platform.aclose())


@app.command()
def run(
    agent: str = typer.Argument(..., help="Agent name; with a single argument, the task for the default assistant."),
    task: str = typer.Argument(None, help="What the agent should do."),
    model: str = typer.Option(None, "--model", help="Model URI (overrides the agent's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run as JSON."),
    follow: bool = typer.Option(False, "--follow", help="Stream the run's events from `stitchwork up` (WebSocket)."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """Run an agent on a task through the gateway: `run AGENT "TASK"`, or `run --model URI "TASK"` (assistant)."""
    if task is None:  # one argument: the task, for the default assistant with the built-in tools
        agent, task = "assistant", agent
    if follow:  # messaging layer: events over the control plane's WebSocket, resumed by sequence number
        from stitchwork.messaging.follow import follow_command
        return follow_command(config_path, agent, task, model, as_json)
    try:
        record = _client(_config(config_path)).run(agent, task, model)
    except StitchworkError as exc:
        fail(exc)
    if as_json:
        console.print_json(json.dumps(record, default=str))
        return
    console.print(f"run {record['id']}: [bold]{record['status']}[/] after {record['steps']} tool calls")
    if record.get("pending_approvals"):
        console.print("waiting for approval: " + ", ".join(record["pending_approvals"])
                      + "  (stitchwork approve ID | stitchwork deny ID)")
    if record.get("result"):
        console.print(record["result"])
    if record.get("error"):
        err.print(f"[red]{record['error']}[/]")


@app.command()
def approvals(
    status: str = typer.Option("pending", help="pending | approved | denied | expired | used | all"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
    config_path: Path | None = ConfigOpt,
) -> None:
    """List approvals."""
    try:
        rows = _client(_config(config_path)).approvals(status)
    except (StitchworkError, ValueError) as exc:
        fail(exc)
    shown = [{k: r[k] for k in ("id", "status", "run_id", "agent", "tool", "target", "policy_ids", "reason")}
             for r in rows]
    print_rows(shown, fmt, title=f"{status} approvals")


def _decide(approval_id: str, approve: bool, note: str, config_path: Path | None) -> None:
    try:
        result = _client(_config(config_path)).decide(approval_id, approve, note)
    except StitchworkError as exc:
        fail(exc)
    console.print(f"approval {result['id']}: [bold]{result['status']}[/] ({result['tool']} for run {result['run_id']})")


@app.command()
def approve(approval_id: str, note: str = typer.Option("", help="Why."), config_path: Path | None = ConfigOpt) -> None:
    """Approve a pending call; its run resumes."""
    _decide(approval_id, True, note, config_path)


@app.command()
def deny(approval_id: str, note: str = typer.Option("", help="Why."), config_path: Path | None = ConfigOpt) -> None:
    """Deny a pending call; its run resumes with the call refused."""
    _decide(approval_id, False, note, config_path)


@audit_app.command("tail")
def audit_tail(n: int = typer.Option(20, "-n", help="How many events."),
               fmt: str = typer.Option("table", "--format", help="table | csv | json"),
               config_path: Path | None = ConfigOpt) -> None:
    """The newest audit events."""
    try:
        rows = _client(_config(config_path)).audit_tail(n)
    except StitchworkError as exc:
        fail(exc)
    if fmt == "table":
        rows = [{k: r[k] for k in ("seq", "kind", "agent", "run_id", "tool", "decision")} for r in rows]
    print_rows(rows, fmt, title="audit")


@audit_app.command("query")
def audit_query(sql: str = typer.Argument(..., help="One SELECT over audit_events, runs, approvals, ..."),
                fmt: str = typer.Option("table", "--format", help="table | csv | json"),
                config_path: Path | None = ConfigOpt) -> None:
    """Run a read-only SQL query over the audit store."""
    try:
        rows = _client(_config(config_path)).audit_query(sql)
    except StitchworkError as exc:
        fail(exc)
    print_rows(rows, fmt)


@audit_app.command("verify")
def audit_verify(config_path: Path | None = ConfigOpt) -> None:
    """Verify the hash chain and the signed head; names the first bad event."""
    try:
        report = _client(_config(config_path)).audit_verify()
    except StitchworkError as exc:
        fail(exc)
    if report["ok"]:
        console.print(f"[green]audit chain verified[/]: {report['events']} events, signed head at "
                      f"{report['head_seq']}")
        return
    err.print(f"[bold red]audit chain BROKEN[/] at event {report['first_bad_seq']}: {report['reason']}")
    raise typer.Exit(1)


@secrets_app.command("set")
def secrets_set(name: str, value: str = typer.Option(None, "--value", help="The value (default: read stdin)."),
                config_path: Path | None = ConfigOpt) -> None:
    """Store a secret (from --value, or standard input)."""
    if value is None:
        value = typer.prompt("value", hide_input=True) if sys.stdin.isatty() else sys.stdin.read().rstrip("\n")
    try:
        _client(_config(config_path)).secret_set(name, value)
    except StitchworkError as exc:
        fail(exc)
    console.print(f"secret {name!r} stored")


@secrets_app.command("list")
def secrets_list(config_path: Path | None = ConfigOpt) -> None:
    """Names of stored secrets (never values)."""
    try:
        names = _client(_config(config_path)).secret_names()
    except StitchworkError as exc:
        fail(exc)
    for name in names:
        console.print(name)


@secrets_app.command("rm")
def secrets_rm(name: str, config_path: Path | None = ConfigOpt) -> None:
    """Delete a secret."""
    try:
        _client(_config(config_path)).secret_delete(name)
    except StitchworkError as exc:
        fail(exc)
    console.print(f"secret {name!r} removed")


@app.command()
def demo(
    state_dir: Path = typer.Option(None, help="Where the demo keeps its state (default: <state dir>/demo, wiped)."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """The inbox-assistant scenario (SCRIPTED model): a prompt injection tries to exfiltrate an API key."""
    from stitchwork.demo.scenario import run_demo

    try:
        ok = run_demo(_config(config_path), state_dir=state_dir, console=console)
    except StitchworkError as exc:
        fail(exc)
    raise typer.Exit(0 if ok else 1)


# Layer command groups register here, one line each: ``register(app)`` adds commands or sub-apps.
# (isolation: sandbox run/bench, doctor; data: audit export/report; messaging: worker; eval: agentdojo)
from stitchwork.eval.cli import register as _reg_eval; _reg_eval(app)  # noqa: E402, E702, I001
from stitchwork.messaging.cli import register as _reg_messaging; _reg_messaging(app)  # noqa: E402, E702, I001
from stitchwork.data.cli import register as _reg_data; _reg_data(app)  # noqa: E402, E702, I001
from stitchwork.isolation.cli import register as _reg_isolation; _reg_isolation(app)  # noqa: E402, E702, I001
from stitchwork.data.memory_cli import register as _reg_memory; _reg_memory(app)  # noqa: E402, E702, I001


def main() -> None:
    app()


if __name__ == "__main__":
    main()
