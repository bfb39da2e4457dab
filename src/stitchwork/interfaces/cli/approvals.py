"""``stitchwork approvals``, ``approve ID``, ``deny ID``: human-in-the-loop decisions."""

from __future__ import annotations

from pathlib import Path

import typer

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import ConfigOpt, client_for, config_from, console, fail, print_rows


def approvals(
    status: str = typer.Option("pending", help="pending | approved | denied | expired | used | all"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
    config_path: Path | None = ConfigOpt,
) -> None:
    """List approvals."""
    try:
        rows = client_for(config_from(config_path)).approvals(status)
    except (StitchworkError, ValueError) as exc:
        fail(exc)
    shown = [{k: r[k] for k in ("id", "status", "run_id", "agent", "tool", "target", "policy_ids", "reason")}
             for r in rows]
    print_rows(shown, fmt, title=f"{status} approvals")


def _decide(approval_id: str, approve: bool, note: str, config_path: Path | None) -> None:
    try:
        result = client_for(config_from(config_path)).decide(approval_id, approve, note)
    except StitchworkError as exc:
        fail(exc)
    console.print(f"approval {result['id']}: [bold]{result['status']}[/] ({result['tool']} for run {result['run_id']})")


def approve(approval_id: str, note: str = typer.Option("", help="Why."), config_path: Path | None = ConfigOpt) -> None:
    """Approve a pending call; its run resumes."""
    _decide(approval_id, True, note, config_path)


def deny(approval_id: str, note: str = typer.Option("", help="Why."), config_path: Path | None = ConfigOpt) -> None:
    """Deny a pending call; its run resumes with the call refused."""
    _decide(approval_id, False, note, config_path)


def register(app: typer.Typer) -> None:
    app.command()(approvals)
    app.command()(approve)
    app.command()(deny)
