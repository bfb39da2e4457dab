"""``stitchwork data retention | export | compact``: what the platform keeps, and the audit archive in Iceberg.

``stitchwork audit export`` and ``audit compact`` (the old spellings) still work, hidden, with a note on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from stitchwork.errors import ConfigError
from stitchwork.interfaces.cli._common import (
    ConfigOpt,
    JsonOpt,
    StitchworkError,
    client_for,
    config_from,
    console,
    err,
    fail,
    group,
    print_json,
    print_rows,
    working,
)
from stitchwork.interfaces.cli.audit import AUDIT_HELP, parse_time

ToOpt = typer.Option(..., "--to", help="iceberg+sqlite:///catalog.db?warehouse=file:///wh, or "
                                       "iceberg+https://rest-catalog/...?warehouse=...")


def data_retention(as_json: bool = JsonOpt, config_path: Path | None = ConfigOpt) -> None:
    """Apply [data.retention]: delete finished runs, decided approvals, expired revocations and old agent memory
    past their age; compact old audit events into Iceberg."""
    try:
        client = client_for(config_from(config_path))
        with working("applying retention"):
            deleted = client.data_retention()
    except StitchworkError as exc:
        fail(exc)
    if as_json:
        print_json(deleted)
        return
    print_rows([{"table": t, "deleted": n} for t, n in deleted.items()], "table", title="retention",
               empty="retention: nothing to delete")


def data_export(
    to: str = ToOpt,
    since: str = typer.Option(None, "--since", help="First export only: start at this time (later runs "
                                                    "continue after the last exported event)."),
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Append new audit events to an Iceberg table (incremental: no duplicates on re-run)."""
    try:
        start = parse_time(since)
        client = client_for(config_from(config_path))
        with working("exporting audit events"):
            result: dict[str, Any] = client.audit_export(to, start)
    except StitchworkError as exc:
        fail(exc)
    if as_json:
        print_json(result)
    elif result["exported"]:
        console.print(f"exported {result['exported']} events ({result['first_seq']}..{result['last_seq']}) in "
                      f"{result['snapshots']} snapshot(s)")
    else:
        console.print(f"nothing new: the archive holds events up to {result['last_seq']}")


def data_compact(
    to: str = typer.Option(..., "--to", help="The Iceberg archive (as for export)."),
    older_than_days: float = typer.Option(None, "--older-than-days", help="Move events older than this."),
    upto_seq: int = typer.Option(None, "--upto-seq", help="Move events up to this seq."),
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Move old audit events into Iceberg, keeping a signed checkpoint so verify spans both."""
    if older_than_days is None and upto_seq is None:
        fail(ConfigError("give --older-than-days or --upto-seq"))
    try:
        client = client_for(config_from(config_path))
        with working("compacting the audit log"):
            result = client.audit_compact(to, older_than_days, upto_seq)
    except StitchworkError as exc:
        fail(exc)
    if as_json:
        print_json(result)
        return
    console.print(f"checkpoint at seq {result['checkpoint_seq']}: {result['exported']} exported, "
                  f"{result['deleted']} removed from the live store")


def audit_export_alias(
    to: str = ToOpt,
    since: str = typer.Option(None, "--since", help="As for `data export`."),
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    err.print("note: `stitchwork audit export` is now `stitchwork data export`", markup=False)
    data_export(to, since, as_json, config_path)


def audit_compact_alias(
    to: str = typer.Option(..., "--to", help="As for `data compact`."),
    older_than_days: float = typer.Option(None, "--older-than-days", help="As for `data compact`."),
    upto_seq: int = typer.Option(None, "--upto-seq", help="As for `data compact`."),
    as_json: bool = JsonOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    err.print("note: `stitchwork audit compact` is now `stitchwork data compact`", markup=False)
    data_compact(to, older_than_days, upto_seq, as_json, config_path)


def register(app: typer.Typer) -> None:
    """Adds the ``data`` group: retention, export, compact."""
    data_app = typer.Typer(help="Retention of runs, approvals and memory; the audit archive in Iceberg.",
                           no_args_is_help=True)
    app.add_typer(data_app, name="data")
    data_app.command("retention")(data_retention)
    data_app.command("export")(data_export)
    data_app.command("compact")(data_compact)
    audit_app = group(app, "audit", AUDIT_HELP)  # the old spellings, hidden
    audit_app.command("export", hidden=True, help="Old spelling of `stitchwork data export`.")(audit_export_alias)
    audit_app.command("compact", hidden=True, help="Old spelling of `stitchwork data compact`.")(audit_compact_alias)
