"""``stitchwork audit tail | query | verify | report``: read and verify the audit log.

Each command goes through the platform's API when ``stitchwork up`` runs (DuckDB has one writer), otherwise it
opens the platform in this process. Export and compaction are ``stitchwork data export | compact``
(:mod:`~stitchwork.interfaces.cli.data`); ``audit export`` and ``audit compact`` remain as hidden old spellings.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

import typer

from stitchwork.errors import ConfigError
from stitchwork.interfaces.cli._common import (
    ConfigOpt,
    FormatOpt,
    JsonOpt,
    StitchworkError,
    client_for,
    config_from,
    console,
    err,
    escape,
    fail,
    group,
    output_format,
    print_json,
    print_rows,
    working,
)
from stitchwork.interfaces.cli.undo import calls_rows

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str | None, *, now: float | None = None) -> float | None:
    """``--since``/``--until`` values: Unix seconds, an ISO date or date-time (UTC unless it says), or an age
    such as ``90m``, ``24h``, ``7d``, ``2w``.

    Raises:
        ConfigError: None of those.
    """
    if text is None or text == "":
        return None
    text = text.strip()
    if match := _RELATIVE.match(text):
        return (time.time() if now is None else now) - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"cannot read time {text!r}: give Unix seconds, an ISO date (2026-11-01) or an age (7d)"
                          ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def register(app: typer.Typer) -> None:
    """Adds the ``audit`` group: tail, query, verify, report (``data`` adds the hidden export and compact)."""
    audit_app = group(app, "audit", AUDIT_HELP)
    audit_app.command("tail")(audit_tail)
    audit_app.command("query")(audit_query)
    audit_app.command("verify")(audit_verify)
    audit_app.command("report")(audit_report)
    audit_app.command("reversible")(audit_reversible)


def audit_reversible(
    run_id: str = typer.Argument(..., help="A run id (run_...)."),
    fmt: str = FormatOpt,
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """A run's calls from the audit log: which can be undone (`stitchwork undo`), which were, and why not."""
    fmt = output_format(fmt, as_json)
    try:
        calls = client_for(config_from(config_path)).run_calls(run_id)
    except StitchworkError as exc:
        fail(exc)
    print_rows(calls if fmt == "json" else calls_rows(calls), fmt, title="calls",
               empty=f"run {run_id} made no tool calls")


AUDIT_HELP = "Read and verify the tamper-evident audit log."


REPORT_NAMES = {"denied": "Denied calls by agent and rule", "approvals": "Approvals and their latency",
                "tools": "Tool usage", "tokens": "Token spend by agent, provider and model", "runs": "Runs by outcome"}
"""The ready reports (``stitchwork.audit.reports.REPORTS``, listed here so that ``--help`` imports no server code;
``tests/interfaces`` keeps the two in step)."""
REPORTS_HELP = "One of: " + ", ".join(f"{name} ({title.lower()})" for name, title in REPORT_NAMES.items()) + "."


def audit_report(
    name: str = typer.Argument(..., help=REPORTS_HELP),
    since: str = typer.Option(None, "--since", help="From: Unix seconds, ISO date, or an age (7d, 24h)."),
    until: str = typer.Option(None, "--until", help="Until (same forms as --since)."),
    fmt: str = FormatOpt,
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """A ready report over the audit log: denied, approvals, tools, tokens, runs."""
    fmt = output_format(fmt, as_json)
    try:
        window = parse_time(since), parse_time(until)
        client = client_for(config_from(config_path))
        with working(f"report {name}"):
            rows = client.audit_report(name, *window)
    except StitchworkError as exc:
        fail(exc)
    print_rows(rows, fmt, title=REPORT_NAMES.get(name, name), empty=f"report {name}: nothing in this window")


def audit_tail(n: int = typer.Option(20, "-n", min=1, max=10_000, help="How many events."),
               fmt: str = FormatOpt,
               as_json: bool = JsonOpt,
               config_path: Path | None = ConfigOpt) -> None:
    """The newest audit events."""
    fmt = output_format(fmt, as_json)
    try:
        rows = client_for(config_from(config_path)).audit_tail(n)
    except StitchworkError as exc:
        fail(exc)
    if fmt == "table":
        rows = [{k: r[k] for k in ("seq", "kind", "agent", "run_id", "tool", "decision")} for r in rows]
    print_rows(rows, fmt, title="audit", empty="no audit events yet")


def audit_query(sql: str = typer.Argument(..., help="One read-only SELECT over audit_events, audit_heads, "
                                         "audit_checkpoints, audit_facts, audit_denials, audit_rollup, runs, "
                                         "approvals."),
                fmt: str = FormatOpt,
                as_json: bool = JsonOpt,
                config_path: Path | None = ConfigOpt) -> None:
    """Run a read-only SQL query over the audit store."""
    fmt = output_format(fmt, as_json)
    try:
        rows = client_for(config_from(config_path)).audit_query(sql)
    except StitchworkError as exc:
        fail(exc)
    print_rows(rows, fmt, empty="no rows")


def audit_verify(as_json: bool = JsonOpt, config_path: Path | None = ConfigOpt) -> None:
    """Verify the hash chain and the signed head; names the first bad event (exit 1 when broken)."""
    try:
        client = client_for(config_from(config_path))
        with working("verifying the audit chain"):
            report = client.audit_verify()
    except StitchworkError as exc:
        fail(exc)
    if as_json:
        print_json(report)
    elif report["ok"]:
        console.print(f"[green]audit chain verified[/]: {report['events']} events, signed head at "
                      f"{report['head_seq']}")
    else:
        err.print(f"[bold red]audit chain BROKEN[/] at event {report['first_bad_seq']}: "
                  f"{escape(str(report['reason']))}")
    if not report["ok"]:
        raise typer.Exit(1)
