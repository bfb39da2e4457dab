"""What every command shares: consoles, the error exit, table/CSV/JSON output, the config option, the client."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from stitchwork.config import Config, load_config

console = Console()
err = Console(stderr=True)


def config_from(config_path: Path | None = None) -> Config:
    return load_config(config_path)


def fail(exc: BaseException) -> NoReturn:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


def client_for(config: Config) -> Any:
    from stitchwork.interfaces.cli.client import connect

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



__all__ = ["ConfigOpt", "client_for", "config_from", "console", "err", "fail", "print_rows"]
