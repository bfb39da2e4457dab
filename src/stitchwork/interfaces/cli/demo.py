"""``stitchwork demo``: the inbox-assistant scenario."""

from __future__ import annotations

from pathlib import Path

import typer

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import ConfigOpt, config_from, console, fail, server_side


def demo(
    state_dir: Path = typer.Option(None, help="Where the demo keeps its state (default: <state dir>/demo, wiped)."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """The inbox-assistant scenario (SCRIPTED model): a prompt injection tries to exfiltrate an API key."""
    run_demo = server_side("stitchwork.demo.scenario", "stitchwork demo").run_demo
    try:
        ok = run_demo(config_from(config_path), state_dir=state_dir, console=console)
    except StitchworkError as exc:
        fail(exc)
    raise typer.Exit(0 if ok else 1)


def register(app: typer.Typer) -> None:
    app.command()(demo)
