"""``stitchwork undo RUN [--call ID]``: reverse a run's calls through the gateway, newest first; and the table of a
run's calls (which can be undone, which were) that ``runs show`` and ``audit reversible`` print.

Exits 0 when every call tried was undone (or had been), 1 when an undo failed, 3 when policy denied one, 4 when one
waits for a human's approval (approve it, then run ``undo`` again), 2 when nothing was done (unknown run or call,
nothing to undo).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from stitchwork.interfaces.cli._common import (
    ConfigOpt,
    ExitCode,
    JsonOpt,
    StitchworkError,
    client_for,
    config_from,
    console,
    err,
    fail,
    print_json,
    print_rows,
)

STATES = {
    "undoable": "can be undone", "undo_failed": "undo failed: can be undone", "undo_waiting": "undo waits for approval",
    "undo_denied": "undo denied: the call stays", "undone": "undone", "uncertain": "uncertain: undoing resolves it",
    "not_undoable": "cannot be undone",
}


def calls_rows(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's calls as table rows: call, event, tool, class, what undoing it means."""
    rows = []
    for c in calls:
        state = STATES.get(str(c.get("state")), str(c.get("state")))
        detail = c.get("reason") or ""
        if c.get("state") == "undone":
            detail = f"undo event #{c.get('undo_seq')}"
        elif c.get("state") in ("undo_failed", "undo_waiting"):
            error = c.get("last_error") or {}
            detail = f"{c.get('attempts')} attempt(s); {error.get('message', '') if isinstance(error, dict) else ''}"
            if c.get("approval_id"):
                detail += f" approval {c['approval_id']}"
        elif c.get("undo_tool"):
            detail = f"by {c['undo_tool']}"
        rows.append({"call": c.get("call"), "event": c.get("seq"), "tool": c.get("tool"),
                     "class": c.get("side_effect"), "undo": state, "detail": detail.strip()})
    return rows


def print_calls(calls: list[dict[str, Any]]) -> None:
    """The table of a run's calls (nothing when it made none)."""
    if calls:
        print_rows(calls_rows(calls), "table", title="calls")


def undo(
    run_id: str = typer.Argument(..., help="A run id (run_...)."),
    call: str = typer.Option(None, "--call", help="Only this call: its id (`runs show`) or its audit event number."),
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Reverse a run's calls (each tool's declared undo) through the gateway, newest first; stops at the first that
    does not succeed. A call already undone is not undone again."""
    try:
        report = client_for(config_from(config_path)).undo(run_id, call)
    except StitchworkError as exc:
        fail(exc)
    results = report.get("results", [])
    if as_json:
        print_json(report)
    else:
        for r in results:
            line = f"{r.get('call')} ({r.get('tool')} → {r.get('undo_tool')}): {r.get('status')}"
            if r.get("status") == "already_undone":
                line = f"{r.get('call')} ({r.get('tool')}): already undone (undo event #{r.get('undo_seq')})"
            elif r.get("status") == "approval_required":
                line += f", approval {r.get('approval_id')}: stitchwork approve ID, then undo again"
            elif isinstance(r.get("error"), dict):
                line += f": {r['error'].get('message', '')}"
            (console if r.get("status") in ("ok", "already_undone") else err).print(line, markup=False)
    statuses = {r.get("status") for r in results}
    if statuses & {"error", "invalid", "unauthenticated"}:
        raise typer.Exit(ExitCode.FAILED)
    if "denied" in statuses:
        raise typer.Exit(ExitCode.DENIED)
    if "approval_required" in statuses:
        raise typer.Exit(ExitCode.WAITING)


def register(app: typer.Typer) -> None:
    """Adds ``undo``."""
    app.command("undo")(undo)


__all__ = ["calls_rows", "print_calls", "register", "undo"]
