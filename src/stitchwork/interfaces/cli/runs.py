"""``stitchwork run``: run an agent through the gateway."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import ConfigOpt, client_for, config_from, console, err, fail


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
        from stitchwork.interfaces.cli.follow import follow_command
        return follow_command(config_path, agent, task, model, as_json)
    try:
        record = client_for(config_from(config_path)).run(agent, task, model)
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


def register(app: typer.Typer) -> None:
    app.command()(run)
