"""``stitchwork demo [inbox|mcp]``: the inbox-assistant scenario, or a LangGraph agent with upstream MCP servers."""

from __future__ import annotations

from pathlib import Path

import typer

from stitchwork.errors import ConfigError, StitchworkError
from stitchwork.interfaces.cli._common import ConfigOpt, config_from, console, fail, server_side


def demo(
    scenario: str = typer.Argument("inbox", help="inbox (the default) or mcp (LangGraph + upstream MCP servers)."),
    state_dir: Path = typer.Option(None, help="Where the demo keeps its state (default: <state dir>/demo, wiped)."),
    config_path: Path | None = ConfigOpt,
    npm_prefix: str = typer.Option("", help="mcp: where `npm install --prefix` put @modelcontextprotocol/server-"
                                   "filesystem (else PATH, ., ~ and the global prefix are searched)."),
) -> None:
    """A scenario with a SCRIPTED model that obeys a prompt injection: ``inbox`` (an API key exfiltration through
    sandboxed tools) or ``mcp`` (a LangGraph agent using real upstream MCP servers through /mcp)."""
    run_demo = server_side("stitchwork.demo.scenario", "stitchwork demo").run_demo

    if scenario not in {"inbox", "mcp"}:
        fail(ConfigError(f"unknown demo scenario {scenario!r}; known: inbox, mcp"))
    try:
        if scenario == "mcp":
            scenario_mcp = server_side("stitchwork.demo.mcp_scenario", "stitchwork demo mcp")
            http = server_side("stitchwork.interfaces.http.app", "stitchwork demo mcp")
            ok = scenario_mcp.run_mcp_demo(config_from(config_path),
                                           lambda service: http.create_app(service, expiry_interval_s=3600),
                                           state_dir=state_dir, console=console, npm_prefix=npm_prefix)
        else:
            ok = run_demo(config_from(config_path), state_dir=state_dir, console=console)
    except StitchworkError as exc:
        fail(exc)
    raise typer.Exit(0 if ok else 1)


def register(app: typer.Typer) -> None:
    app.command()(demo)
