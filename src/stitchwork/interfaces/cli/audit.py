"""``stitchwork audit tail / query / verify / report / export / compact`` and ``stitchwork data retention``.

Each command goes through the platform's API when ``stitchwork up`` runs (DuckDB has one writer), otherwise it
opens the platform in this process.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from stitchwork.audit.reports import REPORTS
from stitchwork.errors import ConfigError, StitchworkError
from stitchwork.interfaces.cli._common import ConfigOpt, client_for, config_from, console, err, fail, print_rows

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
    """Adds the ``audit`` group (tail, query, verify, report, export, compact) and the ``data`` group."""
    audit_app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)
    app.add_typer(audit_app, name="audit")
    audit_app.command("tail")(audit_tail)
    audit_app.command("query")(audit_query)
    audit_app.command("verify")(audit_verify)
    names = ", ".join(f"{name} ({r.title.lower()})" for name, r in REPORTS.items())

    @audit_app.command("report")
    def audit_report(
        name: str = typer.Argument(..., help=f"One of: {names}."),
        since: str = typer.Option(None, "--since", help="From: Unix seconds, ISO date, or an age (7d, 24h)."),
        until: str = typer.Option(None, "--until", help="Until (same forms as --since)."),
        fmt: str = typer.Option("table", "--format", help="table | csv | json"),
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """A ready report over the audit log: denied, approvals, tools, tokens, runs."""
        try:
            rows = client_for(config_from(config_path)).audit_report(name, parse_time(since), parse_time(until))
        except StitchworkError as exc:
            fail(exc)
        report = REPORTS.get(name)
        print_rows(rows, fmt, title=report.title if report else name)

    @audit_app.command("export")
    def audit_export(
        to: str = typer.Option(..., "--to", help="iceberg+sqlite:///catalog.db?warehouse=file:///wh, or "
                                                 "iceberg+https://rest-catalog/...?warehouse=..."),
        since: str = typer.Option(None, "--since", help="First export only: start at this time (later runs "
                                                        "continue after the last exported event)."),
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Append new audit events to an Iceberg table (incremental: no duplicates on re-run)."""
        try:
            result: dict[str, Any] = client_for(config_from(config_path)).audit_export(to, parse_time(since))
        except StitchworkError as exc:
            fail(exc)
        if result["exported"]:
            console.print(f"exported {result['exported']} events ({result['first_seq']}..{result['last_seq']}) in "
                          f"{result['snapshots']} snapshot(s)")
        else:
            console.print(f"nothing new: the archive holds events up to {result['last_seq']}")

    @audit_app.command("compact")
    def audit_compact(
        to: str = typer.Option(..., "--to", help="The Iceberg archive (as for export)."),
        older_than_days: float = typer.Option(None, "--older-than-days", help="Move events older than this."),
        upto_seq: int = typer.Option(None, "--upto-seq", help="Move events up to this seq."),
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Move old audit events into Iceberg, keeping a signed checkpoint so verify spans both."""
        if older_than_days is None and upto_seq is None:
            fail(ConfigError("give --older-than-days or --upto-seq"))
        try:
            result = client_for(config_from(config_path)).audit_compact(to, older_than_days, upto_seq)
        except StitchworkError as exc:
            fail(exc)
        console.print(f"checkpoint at seq {result['checkpoint_seq']}: {result['exported']} exported, "
                      f"{result['deleted']} removed from the live store")

    data_app = typer.Typer(help="Data retention.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("retention")
    def data_retention(config_path: Path | None = ConfigOpt) -> None:
        """Apply [data.retention]: old finished runs, decided approvals, revocations, memory; compact the audit log."""
        try:
            deleted = client_for(config_from(config_path)).data_retention()
        except StitchworkError as exc:
            fail(exc)
        print_rows([{"table": t, "deleted": n} for t, n in deleted.items()], "table", title="retention")


def audit_tail(n: int = typer.Option(20, "-n", help="How many events."),
               fmt: str = typer.Option("table", "--format", help="table | csv | json"),
               config_path: Path | None = ConfigOpt) -> None:
    """The newest audit events."""
    try:
        rows = client_for(config_from(config_path)).audit_tail(n)
    except StitchworkError as exc:
        fail(exc)
    if fmt == "table":
        rows = [{k: r[k] for k in ("seq", "kind", "agent", "run_id", "tool", "decision")} for r in rows]
    print_rows(rows, fmt, title="audit")


def audit_query(sql: str = typer.Argument(..., help="One read-only SELECT over audit_events, audit_heads, "
                                         "audit_checkpoints, audit_facts, audit_denials, audit_rollup, runs, "
                                         "approvals."),
                fmt: str = typer.Option("table", "--format", help="table | csv | json"),
                config_path: Path | None = ConfigOpt) -> None:
    """Run a read-only SQL query over the audit store."""
    try:
        rows = client_for(config_from(config_path)).audit_query(sql)
    except StitchworkError as exc:
        fail(exc)
    print_rows(rows, fmt)


def audit_verify(config_path: Path | None = ConfigOpt) -> None:
    """Verify the hash chain and the signed head; names the first bad event."""
    try:
        report = client_for(config_from(config_path)).audit_verify()
    except StitchworkError as exc:
        fail(exc)
    if report["ok"]:
        console.print(f"[green]audit chain verified[/]: {report['events']} events, signed head at "
                      f"{report['head_seq']}")
        return
    err.print(f"[bold red]audit chain BROKEN[/] at event {report['first_bad_seq']}: {report['reason']}")
    raise typer.Exit(1)


