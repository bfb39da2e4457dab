"""``stitchwork run`` (run an agent through the gateway) and ``stitchwork runs ls | show``.

``run`` exits with the run's outcome (:data:`~stitchwork.interfaces.cli._common.RUN_EXIT`): 0 completed, 1 failed,
3 denied, 4 waiting for approval, 5 timed out; 2 when it could not start.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import typer

from stitchwork.interfaces.cli._common import (
    ConfigOpt,
    FormatOpt,
    JsonOpt,
    StitchworkError,
    client_for,
    config_from,
    console,
    exit_for_run,
    fail,
    group,
    output_format,
    print_json,
    print_rows,
    show_run,
    working,
)
from stitchwork.interfaces.cli.undo import print_calls

RUNS_HELP = "Runs of the platform: list and show them; dead letters of the durable queue and re-submission."
STATUSES = "running | waiting_approval | completed | failed | budget_exhausted | denied | timed_out | all"


def run(
    agent: str = typer.Argument(..., help="Agent name; with a single argument, the task for the default assistant."),
    task: str = typer.Argument(None, help="What the agent should do."),
    model: str = typer.Option(None, "--model", help="Model URI (overrides the agent's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run as JSON."),
    follow: bool = typer.Option(False, "--follow", help="Stream the run's events from `stitchwork up` (WebSocket)."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """Run an agent on a task through the gateway: `run AGENT "TASK"`, or `run --model URI "TASK"` (assistant).

    Exits 0 when the run completed, 1 failed, 3 denied, 4 waiting for approval, 5 timed out, 2 not started.
    """
    if task is None:  # one argument: the task, for the default assistant with the built-in tools
        agent, task = "assistant", agent
    if follow:  # messaging layer: events over the control plane's WebSocket, resumed by sequence number
        from stitchwork.interfaces.cli.follow import follow_command
        return follow_command(config_path, agent, task, model, as_json)
    try:
        client = client_for(config_from(config_path))
        with working(f"running {agent}"):
            record = client.run(agent, task, model)
    except StitchworkError as exc:
        fail(exc)
    show_run(record, as_json)
    exit_for_run(record)


def _when(ts: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def runs_ls(
    status: str = typer.Option("all", "--status", "-s", help=STATUSES),
    limit: int = typer.Option(50, "--limit", "-n", min=1, max=1000, help="Most runs shown (newest first)."),
    fmt: str = FormatOpt,
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """The platform's runs, newest first (runs on the durable queue: `stitchwork submit`, `runs dead`)."""
    fmt = output_format(fmt, as_json)
    try:
        rows = client_for(config_from(config_path)).list_runs(None if status == "all" else status, limit)
    except StitchworkError as exc:
        fail(exc)
    if fmt == "table":
        rows = [{"id": r["id"], "status": r["status"], "agent": r["agent"], "steps": r["steps"],
                 "started": _when(r.get("created_at")), "task": _short(r.get("task") or "")} for r in rows]
    print_rows(rows, fmt, title="runs", empty="no runs" if status == "all" else f"no {status} runs")


def _short(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def runs_show(
    run_id: str = typer.Argument(..., help="A run id (run_...)."),
    messages: bool = typer.Option(False, "--messages", help="Also print the conversation (with --json)."),
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """One run: status, steps, result or error, approvals it waits for, and its calls: which can be undone
    (`stitchwork undo`) and which were."""
    try:
        client = client_for(config_from(config_path))
        record = client.get_run(run_id)
        calls = client.run_calls(run_id)
    except StitchworkError as exc:
        fail(exc)
    if not messages:
        record.pop("messages", None)
    if as_json:
        print_json({**record, "calls": calls})
        return
    show_run(record, False)
    console.print(f"agent {record['agent']}, model {record.get('model') or '-'}, started "
                  f"{_when(record.get('created_at'))}, updated {_when(record.get('updated_at'))}", markup=False)
    console.print(f"task: {record.get('task', '')}", markup=False)
    print_calls(calls)


def register(app: typer.Typer) -> None:
    """Adds ``run`` and the ``runs`` group's ``ls`` and ``show``."""
    app.command()(run)
    runs_app = group(app, "runs", RUNS_HELP)
    runs_app.command("ls")(runs_ls)
    runs_app.command("show")(runs_show)
