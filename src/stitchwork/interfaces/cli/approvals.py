"""``stitchwork approvals``, ``approve ID``, ``deny ID``: human-in-the-loop decisions."""

from __future__ import annotations

from pathlib import Path

import typer

from stitchwork.interfaces.cli._common import (
    ConfigOpt,
    FormatOpt,
    JsonOpt,
    StitchworkError,
    client_for,
    config_from,
    console,
    escape,
    fail,
    output_format,
    print_json,
    print_rows,
    working,
)

COLUMNS = ("id", "status", "run_id", "agent", "tool", "target", "policy_ids", "reason")


def approvals(
    status: str = typer.Option("pending", help="pending | approved | denied | expired | used | all"),
    fmt: str = FormatOpt,
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """List approvals (pending ones by default)."""
    fmt = output_format(fmt, as_json)
    try:
        rows = client_for(config_from(config_path)).approvals(status)
    except (StitchworkError, ValueError) as exc:
        fail(exc)
    shown = [{k: r.get(k) for k in COLUMNS} for r in rows]
    print_rows(shown, fmt, title=f"{status} approvals",
               empty="no approvals" if status == "all" else f"no approvals {status}")


def _decide(approval_id: str, approve: bool, note: str, as_json: bool, config_path: Path | None) -> None:
    try:
        client = client_for(config_from(config_path))
        with working(f"{'approving' if approve else 'denying'} {approval_id}; the run resumes"):
            result = client.decide(approval_id, approve, note)
    except StitchworkError as exc:
        fail(exc)
    if as_json:
        print_json(result)
        return
    console.print(f"approval {escape(result['id'])}: [bold]{escape(result['status'])}[/] "
                  f"({escape(str(result['tool']))} for run {escape(str(result['run_id']))})")
    undo = result.get("undo")
    if isinstance(undo, dict):  # an undo's approval: deciding it carried the undo out (or refused it)
        for row in undo.get("results") or []:
            error = row.get("error") or {}
            console.print(f"  undo of call {escape(str(row.get('call')))} ({escape(str(row.get('tool')))}): "
                          f"[bold]{escape(str(row.get('status')))}[/]"
                          + (f": {escape(str(error.get('message')))}" if isinstance(error, dict) and error else ""))
        if undo.get("message"):
            console.print(f"  undo not carried out: {escape(str(undo['message']))}")


def approve(approval_id: str, note: str = typer.Option("", help="Why."), as_json: bool = JsonOpt,
            config_path: Path | None = ConfigOpt) -> None:
    """Approve a pending call; its run resumes."""
    _decide(approval_id, True, note, as_json, config_path)


def deny(approval_id: str, note: str = typer.Option("", help="Why."), as_json: bool = JsonOpt,
         config_path: Path | None = ConfigOpt) -> None:
    """Deny a pending call; its run resumes with the call refused."""
    _decide(approval_id, False, note, as_json, config_path)


def register(app: typer.Typer) -> None:
    app.command()(approvals)
    app.command()(approve)
    app.command()(deny)
