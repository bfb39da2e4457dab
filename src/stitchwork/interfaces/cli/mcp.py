"""``stitchwork mcp serve --stdio``: the MCP door over stdin/stdout for local MCP clients (desktop agents, the MCP
Inspector), authenticated by a session's run token (``--token`` or ``$STITCHWORK_RUN_TOKEN``).

With ``stitchwork up`` running for this state directory the requests are forwarded to its ``/mcp`` (one writer of
the store); otherwise the platform is opened in this process.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import typer

from stitchwork.errors import AuthError, ConfigError, StitchworkError
from stitchwork.interfaces.cli._common import ConfigOpt, config_from, fail

TOKEN_ENV = "STITCHWORK_RUN_TOKEN"

mcp_app = typer.Typer(help="The MCP door: serve it over stdio for local MCP clients.", no_args_is_help=True)


@mcp_app.command("serve")
def serve(
    stdio: bool = typer.Option(False, "--stdio", help="Serve over stdin/stdout (the only transport here; HTTP is "
                               "served by `stitchwork up` at /mcp)."),
    token: str = typer.Option(None, "--token", help=f"The run token (default: ${TOKEN_ENV})."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """Serve the MCP door over stdio with one session's run token."""
    if not stdio:
        fail(ConfigError("give --stdio (MCP over HTTP is served by `stitchwork up` at /mcp)"))
    run_token = (token or os.environ.get(TOKEN_ENV, "")).strip()
    if not run_token:
        fail(AuthError(f"no run token: pass --token or set {TOKEN_ENV} (from `stitchwork session open`)"))
    try:
        import mcp  # noqa: F401
    except ImportError as exc:
        fail(ConfigError(f"the MCP door needs the mcp extra: pip install 'stitchwork[mcp]' ({exc})"))
    try:
        config = config_from(config_path)
        from stitchwork.interfaces.cli.client import running_server

        url = running_server(config)
        asyncio.run(_forward(url, run_token) if url else _local(config, run_token))
    except StitchworkError as exc:
        fail(exc)


async def _local(config: Any, token: str) -> None:
    from stitchwork.gateway.mcp import McpDoor, serve_stdio
    from stitchwork.platform import Platform
    from stitchwork.service import Service

    platform = Platform.open(config)
    try:
        Service(platform)  # sessions: the run loader restores the token's run
        door = McpDoor(platform.gateway, approval_wait_s=config.mcp.approval_wait_s)
        await serve_stdio(door, token)
    finally:
        await platform.aclose()


async def _forward(url: str, token: str) -> None:
    """Serves stdio by forwarding ``tools/list`` and ``tools/call`` to the running server's ``/mcp``."""
    import httpx2
    import mcp.types as types
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server import Server, ServerRequestContext
    from mcp.server.stdio import stdio_server

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http)) as upstream:

        async def on_list_tools(ctx: ServerRequestContext[Any, Any],
                                params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
            return await upstream.list_tools(cache_mode="refresh")

        async def on_call_tool(ctx: ServerRequestContext[Any, Any],
                               params: types.CallToolRequestParams) -> types.CallToolResult:
            async def relay(progress: float, total: float | None, message: str | None) -> None:
                await ctx.session.report_progress(progress, total, message)

            return await upstream.call_tool(params.name, params.arguments or {}, progress_callback=relay)

        server: Server[Any] = Server("stitchwork", on_list_tools=on_list_tools,
                                     on_call_tool=on_call_tool)
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())


def register(app: typer.Typer) -> None:
    app.add_typer(mcp_app, name="mcp")


__all__ = ["TOKEN_ENV", "register"]
