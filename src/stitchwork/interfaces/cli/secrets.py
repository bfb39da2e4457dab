"""``stitchwork secrets set | list | rm``: the encrypted vault (values are never printed)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import (
    ConfigOpt,
    JsonOpt,
    client_for,
    config_from,
    console,
    fail,
    nothing,
    print_json,
)


def secrets_set(name: str, value: str = typer.Option(None, "--value", help="The value (default: read stdin)."),
                config_path: Path | None = ConfigOpt) -> None:
    """Store a secret (from --value, or standard input)."""
    if value is None:
        value = typer.prompt("value", hide_input=True) if sys.stdin.isatty() else sys.stdin.read().rstrip("\n")
    try:
        client_for(config_from(config_path)).secret_set(name, value)
    except StitchworkError as exc:
        fail(exc)
    console.print(f"secret {name!r} stored", markup=False)


def secrets_list(as_json: bool = JsonOpt, config_path: Path | None = ConfigOpt) -> None:
    """Names of stored secrets (never values), one a line."""
    try:
        names = client_for(config_from(config_path)).secret_names()
    except StitchworkError as exc:
        fail(exc)
    if as_json:
        print_json(names)
        return
    if not names:
        nothing("no secrets stored")
    for name in names:
        console.print(name, markup=False)


def secrets_rm(name: str, config_path: Path | None = ConfigOpt) -> None:
    """Delete a secret."""
    try:
        client_for(config_from(config_path)).secret_delete(name)
    except StitchworkError as exc:
        fail(exc)
    console.print(f"secret {name!r} removed", markup=False)


def register(app: typer.Typer) -> None:
    secrets_app = typer.Typer(help="Manage the secrets vault (values are never printed).", no_args_is_help=True)
    secrets_app.command("set")(secrets_set)
    secrets_app.command("list")(secrets_list)
    secrets_app.command("rm")(secrets_rm)
    app.add_typer(secrets_app, name="secrets")
