"""A small upstream MCP server for the client tests: echo, an error, a secret from its environment, a 10 MB
answer, a hang, a crash, and a tool list that grows (announced in both protocol eras).

stdio: python upstream_server.py
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import mcp.types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.lowlevel import NotificationOptions
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged

names = ["echo", "fail", "env_token", "big", "hang", "crash", "grow", "send_message"]
bus = InMemorySubscriptionBus()
SCHEMAS: dict[str, dict[str, Any]] = {
    "echo": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    "send_message": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}}},
}


async def list_tools(ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[
        types.Tool(name=n, description=f"test tool {n}", input_schema=SCHEMAS.get(n, {"type": "object"}))
        for n in names])


async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    name = params.name

    def text(value: str, *, error: bool = False) -> types.CallToolResult:
        return types.CallToolResult(content=[types.TextContent(text=value)], is_error=error)

    if name == "echo":
        return text(f"echo: {args.get('text', '')} pid={os.getpid()}")
    if name == "send_message":
        return text(f"sent to {args.get('to')}")
    if name == "fail":
        return text("the upstream tool failed on purpose", error=True)
    if name == "env_token":
        return text(f"token={os.environ.get('UPSTREAM_TOKEN', '<unset>')}")
    if name == "big":
        return text("x" * 10_500_000)
    if name == "hang":
        await anyio.sleep(3600)
    if name == "crash":
        os._exit(3)
    if name == "grow":
        names.append(f"extra_{len(names)}")
        try:
            await ctx.session.send_tool_list_changed()
        except Exception as exc:
            print("send_tool_list_changed:", exc, file=sys.stderr)
        await bus.publish(ToolsListChanged())
        return text(f"now {len(names)} tools")
    return text(f"no tool {name}", error=True)


server = Server("upstream-test", version="1.0", on_list_tools=list_tools, on_call_tool=call_tool,
                on_subscriptions_listen=ListenHandler(bus))


async def main() -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options(NotificationOptions(tools_changed=True)))




def serve_http(port: int) -> None:
    """Streamable HTTP on 127.0.0.1:PORT, refusing requests without ``Authorization: Bearer upstream-key``."""
    import contextlib

    import uvicorn
    from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    manager = StreamableHTTPSessionManager(app=server)
    inner = StreamableHTTPASGIApp(manager)

    class Guarded:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if dict(scope["headers"]).get(b"authorization", b"") != b"Bearer upstream-key":
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
            await inner(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        async with manager.run():
            yield

    app = Starlette(routes=[Route("/mcp", endpoint=Guarded(), methods=["GET", "POST", "DELETE"])], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        serve_http(int(sys.argv[2]))
    else:
        anyio.run(main)
