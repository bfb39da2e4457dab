"""``stitchwork session open|renew|close|ls|show``: external runs for agents outside the platform.

``session open AGENT "TASK" --json`` prints ``{"run_id", "token", "mcp_url", "openai_base_url", "expires_at"}``:
hand the token to the agent (LangGraph, the OpenAI Agents SDK, any MCP client); it calls tools at ``mcp_url`` and
models at ``openai_base_url`` through the gateway. Goes through ``stitchwork up`` when it runs, else opens the
platform here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import (
    ConfigOpt,
    FormatOpt,
    JsonOpt,
    client_for,
    config_from,
    console,
    fail,
    output_format,
    print_json,
    print_rows,
)

if TYPE_CHECKING:
    from stitchwork.interfaces.cli.client import HttpClient
    from stitchwork.interfaces.cli.local import LocalClient

session_app = typer.Typer(help="External runs: a run token for an agent outside the platform (MCP, SDK, OpenAI).",
                          no_args_is_help=True)


def _client(config_path: Path | None) -> HttpClient | LocalClient:
    """The running control plane's client, or one that opens the platform here (both have the session methods)."""
    client: HttpClient | LocalClient = client_for(config_from(config_path))
    return client


def _show(data: Any, as_json: bool) -> None:
    if as_json:
        print_json(data)
        return
    if isinstance(data, dict):
        for key, value in data.items():
            console.print(f"[bold]{key}[/]: {value}", highlight=False)


@session_app.command("open")
def open_session(
    agent: str = typer.Argument(..., help="The agent identity the external run acts as."),
    task: str = typer.Argument(..., help="The task (recorded as trusted user content)."),
    ttl: int = typer.Option(None, "--ttl", help="Lifetime of the session and its token, seconds (default 3600)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """Open a session: prints the run id, its token, the MCP URL and the OpenAI-compatible base URL."""
    try:
        data = _client(config_path).session_open(agent, task, ttl)
    except StitchworkError as exc:
        fail(exc)
    _show(data, as_json)


@session_app.command("renew")
def renew_session(
    run_id: str = typer.Argument(..., help="The session's run id."),
    ttl: int = typer.Option(None, "--ttl", help="New lifetime from now, seconds (default 3600)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """A new token for an open session (the previous token is revoked)."""
    try:
        data = _client(config_path).session_renew(run_id, ttl)
    except StitchworkError as exc:
        fail(exc)
    _show(data, as_json)


@session_app.command("close")
def close_session(
    run_id: str = typer.Argument(..., help="The session's run id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """Close a session: its tokens are revoked and its run finishes."""
    try:
        data = _client(config_path).session_close(run_id)
    except StitchworkError as exc:
        fail(exc)
    _show(data, as_json)


@session_app.command("show")
def show_session(
    run_id: str = typer.Argument(..., help="The session's run id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """A session's state (open, expired, closed), steps and expiry."""
    try:
        data = _client(config_path).session_show(run_id)
    except StitchworkError as exc:
        fail(exc)
    _show(data, as_json)


@session_app.command("ls")
def list_sessions(
    include_closed: bool = typer.Option(False, "--all", help="Closed sessions too."),
    fmt: str = FormatOpt,
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Sessions, newest first."""
    fmt = output_format(fmt, as_json)
    try:
        rows = _client(config_path).sessions(include_closed)
    except StitchworkError as exc:
        fail(exc)
    print_rows(rows, fmt, title="sessions")


def register(app: typer.Typer) -> None:
    app.add_typer(session_app, name="session")


__all__ = ["register"]
