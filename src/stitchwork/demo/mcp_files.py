"""A small read-only MCP file server (stdio) for ``stitchwork demo mcp`` when the npm reference server
(``@modelcontextprotocol/server-filesystem``) is not installed: ``list_directory`` and ``read_text_file`` under one
root, with the reference server's tool names and argument shapes.

Run: ``python -m stitchwork.demo.mcp_files ROOT``. Paths outside ``ROOT`` are refused as tool errors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MAX_BYTES = 1_000_000
PATH_ARGS = {"type": "object", "required": ["path"], "additionalProperties": False,
             "properties": {"path": {"type": "string", "description": "Absolute path inside the allowed directory"}}}


def _inside(root: Path, raw: Any) -> Path:
    path = Path(str(raw)).resolve()
    if path != root and root not in path.parents:
        raise PermissionError(f"access denied: {raw} is outside {root}")
    return path


def list_directory(root: Path, raw: Any) -> str:
    path = _inside(root, raw)
    return "\n".join(f"[{'DIR' if p.is_dir() else 'FILE'}] {p.name}" for p in sorted(path.iterdir()))


def read_text_file(root: Path, raw: Any) -> str:
    path = _inside(root, raw)
    with path.open("rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(f"{raw} is larger than {MAX_BYTES} bytes")
    return data.decode("utf-8", "replace")


def main(argv: list[str]) -> None:
    import anyio
    import mcp.types as types
    from mcp.server import Server, ServerRequestContext
    from mcp.server.stdio import stdio_server

    if len(argv) != 1:
        raise SystemExit("usage: python -m stitchwork.demo.mcp_files ROOT")
    root = Path(argv[0]).resolve()
    tools = {"list_directory": list_directory, "read_text_file": read_text_file}

    async def on_list_tools(ctx: ServerRequestContext[Any, Any],
                            params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[
            types.Tool(name="list_directory", description="List the entries of a directory.", input_schema=PATH_ARGS,
                       annotations=types.ToolAnnotations(read_only_hint=True)),
            types.Tool(name="read_text_file", description="Read a text file.", input_schema=PATH_ARGS,
                       annotations=types.ToolAnnotations(read_only_hint=True)),
        ])

    async def on_call_tool(ctx: ServerRequestContext[Any, Any],
                           params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            text = tools[params.name](root, (params.arguments or {}).get("path", ""))
        except (KeyError, OSError, ValueError) as exc:
            return types.CallToolResult(content=[types.TextContent(text=f"Error: {exc}")], is_error=True)
        return types.CallToolResult(content=[types.TextContent(text=text)])

    server: Server[Any] = Server("stitchwork-demo-files", version="1.0", on_list_tools=on_list_tools,
                                 on_call_tool=on_call_tool)

    async def serve() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())

    anyio.run(serve)


if __name__ == "__main__":
    main(sys.argv[1:])
