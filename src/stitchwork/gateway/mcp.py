"""The MCP door: Model Context Protocol ``tools/list`` and ``tools/call`` translated into the tool door's call.

An MCP client (any agent runtime that speaks MCP) presents a run token (an operator's session,
:mod:`stitchwork.service.sessions`) and sees only the tools the run's agent is given, with their JSON schemas
(upstream MCP servers' tools as ``NAME.tool``). ``tools/call`` takes the whole gateway path (identity → policy →
taint → approval → secrets → sandbox → label → audit) through :meth:`ToolDoor.call
<stitchwork.gateway.tools.ToolDoor.call>`; policy refusals, unknown tools and bad arguments are tool results with
``isError`` that the model can read (never protocol errors), each audited by the stage that refused.

A call a policy sends to a human waits here for the decision, reporting progress, for at most
``approval_wait_s`` (MCP clients' read timeouts are not extended by progress: keep it below theirs); then it answers
``approval_required`` with the approval id, and the agent calls again once a human decided.

:class:`McpDoor` is protocol logic only; :func:`build_server` wraps it in the official SDK's low-level server
(served over Streamable HTTP at ``/mcp`` by ``stitchwork up`` and over stdio by ``stitchwork mcp serve --stdio``).
Needs the ``mcp`` extra (``pip install 'stitchwork[mcp]'``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import mcp.types as types
from mcp.server import Server, ServerRequestContext

from stitchwork.errors import ApprovalError, AuthError
from stitchwork.gateway.context import ToolOutcome
from stitchwork.gateway.core import Gateway
from stitchwork.security.approvals import ApprovalStatus
from stitchwork.tools.manifest import SideEffect, ToolManifest

TOOLS_TTL_MS = 10_000
"""How long a 2026-07-28 client may cache ``tools/list`` (upstream tool lists rarely change; grants never do)."""

Progress = Callable[[float, str], Awaitable[None]]
"""Reports progress of a waiting call: ``(step, message)``."""

TokenOf = Callable[[ServerRequestContext[Any, Any]], str | None]
"""Reads the caller's run token from a request's context (a bearer header, or the stdio server's own token)."""


def tool_of(manifest: ToolManifest) -> types.Tool:
    """A manifest as an MCP tool: name, description, input schema, and hints from its side-effect class."""
    effect = manifest.side_effect
    hints = types.ToolAnnotations(
        read_only_hint=effect is SideEffect.READ,
        destructive_hint=effect is SideEffect.IRREVERSIBLE,
        open_world_hint=effect is SideEffect.EXTERNAL,
    )
    return types.Tool(name=manifest.name, description=manifest.description, input_schema=dict(manifest.args_schema),
                      annotations=hints)


def result_of(outcome: ToolOutcome) -> types.CallToolResult:
    """A gateway outcome as an MCP tool result: ``ok`` is the tool's content; anything else ``isError`` with the
    gateway's JSON body (status, error, approval id) as text the model can read."""
    meta = {"stitchwork": {"status": outcome.status, "label": outcome.label, "audit_seq": outcome.audit_seq,
                           "approval_id": outcome.approval_id or None,
                           "policy_ids": list(outcome.policy_ids)}}
    if outcome.status == "ok":
        content = outcome.content
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)
        structured = content if isinstance(content, dict) else None
        return types.CallToolResult(content=[types.TextContent(text=text)], structured_content=structured,
                                    is_error=False, _meta=meta)
    body = outcome.to_message_content()
    return types.CallToolResult(content=[types.TextContent(text=body)], is_error=True, _meta=meta)


class McpDoor:
    """MCP's tool methods over the gateway.

    Args:
        gateway: The gateway (its tool door runs every call).
        approval_wait_s: How long a call held for a human waits for the decision before it answers
            ``approval_required`` (0: answer at once).
        poll_s: How often a waiting call looks at its approval.
    """

    def __init__(self, gateway: Gateway, *, approval_wait_s: float = 4.0, poll_s: float = 0.5) -> None:
        self.gateway = gateway
        self.approval_wait_s = max(0.0, approval_wait_s)
        self.poll_s = max(0.01, poll_s)
        self._lists: dict[str, tuple[tuple[int, int], list[types.Tool]]] = {}

    async def list_tools(self, token: str | None) -> list[types.Tool]:
        """The tools the token's agent is given, sorted by name.

        Raises:
            AuthError: the token is missing, invalid, expired or revoked (audited).
        """
        claims = await self.gateway.authenticate(token, action="tools/list")
        context = self.gateway.context
        granted = context.agents.get(claims.agent, frozenset())
        key = (id(granted), len(context.tools))  # grants are replaced, not changed, when upstream tools change
        cached = self._lists.get(claims.agent)
        if cached is not None and cached[0] == key:
            return list(cached[1])
        tools = [tool_of(context.tools.get(name)) for name in sorted(granted) if name in context.tools]
        self._lists[claims.agent] = (key, tools)
        return list(tools)

    def input_schema(self, agent: str | None, name: str) -> Mapping[str, Any] | None:
        """The input schema of tool ``name`` if ``agent`` (already authenticated) is given it, else ``None``.

        The Streamable HTTP transport checks a ``tools/call``'s ``Mcp-Param-*`` headers against this schema before
        dispatch; without this lookup the SDK runs a whole second ``tools/list`` request per call to find it.
        """
        context = self.gateway.context
        if agent is None or name not in context.agents.get(agent, frozenset()) or name not in context.tools:
            return None
        return dict(context.tools.get(name).args_schema)

    async def call_tool(self, token: str | None, name: str, arguments: Mapping[str, Any] | None,
                        progress: Progress | None = None) -> types.CallToolResult:
        """One ``tools/call``; waits for a human's decision (reporting ``progress``) when policy asks for one."""
        args = dict(arguments or {})
        outcome = await self.gateway.call_tool(token, name, args)
        if outcome.status != "approval_required" or self.approval_wait_s <= 0:
            return result_of(outcome)
        approval_id = outcome.approval_id
        deadline = time.monotonic() + self.approval_wait_s
        step = 0
        while True:
            step += 1
            if progress is not None:
                waited = self.approval_wait_s - max(0.0, deadline - time.monotonic())
                await progress(step, f"waiting for a human to decide approval {approval_id} ({waited:.1f}s)")
            await asyncio.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
            if self._decided(approval_id):
                return result_of(await self.gateway.call_tool(token, name, args))
            if time.monotonic() >= deadline:
                return self._pending(outcome)

    def _decided(self, approval_id: str) -> bool:
        try:
            return self.gateway.approvals.get(approval_id).status is not ApprovalStatus.PENDING
        except ApprovalError:
            return True  # gone (retention): the next call decides again

    def _pending(self, outcome: ToolOutcome) -> types.CallToolResult:
        result = result_of(outcome)
        message = (f"this call waits for a human: approval {outcome.approval_id} is still pending after "
                   f"{self.approval_wait_s:g}s. Once it is approved (`stitchwork approve {outcome.approval_id}`), "
                   "call the tool again with the same arguments; a denial is returned then too.")
        body = {"status": "approval_required", "approval_id": outcome.approval_id, "message": message,
                "policy_ids": list(outcome.policy_ids)}
        return types.CallToolResult(content=[types.TextContent(text=json.dumps(body))], is_error=True,
                                    _meta=result.meta)


class _Server(Server[Any]):
    """The SDK's server, announcing ``tools.listChanged`` (the session manager builds its options without it)."""

    def create_initialization_options(self, notification_options: Any = None, experimental_capabilities: Any = None,
                                      extensions: Any = None) -> Any:
        from mcp.server.lowlevel import NotificationOptions

        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True), experimental_capabilities, extensions)


def build_server(door: McpDoor, token_of: TokenOf, *, version: str = "",
                 input_schema: Callable[[str], Mapping[str, Any] | None] | None = None) -> Server[Any]:
    """The MCP server of ``door``: ``tools/list`` and ``tools/call`` with the token ``token_of`` reads per request.

    ``input_schema`` (name → schema of a tool the current caller is given) lets the HTTP transport validate
    ``Mcp-Param-*`` headers without listing every tool again per call.

    An authentication failure on ``tools/list`` is a JSON-RPC error (the client cannot go on); on ``tools/call`` it is
    a tool error result (``unauthenticated``).
    """

    async def on_list_tools(ctx: ServerRequestContext[Any, Any],
                            params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        try:
            tools = await door.list_tools(token_of(ctx))
        except AuthError as exc:
            from mcp.shared.exceptions import MCPError

            raise MCPError(code=types.INVALID_REQUEST, message=f"unauthenticated: {exc}") from exc
        # Private to this caller; a client may reuse it briefly instead of listing again around every call.
        return types.ListToolsResult(tools=tools, ttl_ms=TOOLS_TTL_MS, cache_scope="private")

    async def on_call_tool(ctx: ServerRequestContext[Any, Any],
                           params: types.CallToolRequestParams) -> types.CallToolResult:
        async def progress(step: float, message: str) -> None:
            await ctx.session.report_progress(step, None, message)

        return await door.call_tool(token_of(ctx), params.name, params.arguments, progress)

    return _Server("stitchwork", version=version, on_list_tools=on_list_tools, on_call_tool=on_call_tool,
                   get_tool_input_schema=input_schema)


def bearer_of(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The bearer token of an HTTP request's context (``None`` without one, or on stdio)."""
    request = ctx.request
    headers = getattr(request, "headers", None)
    if headers is None:
        return None
    value = str(headers.get("authorization", ""))
    return value[7:].strip() if value[:7].lower() == "bearer " else None


async def serve_stdio(door: McpDoor, token: str, *, version: str = "") -> None:
    """Serves ``door`` over stdin/stdout with one run token until the client closes the stream."""
    from mcp.server.stdio import stdio_server

    server = build_server(door, lambda ctx: token, version=version)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


__all__ = ["McpDoor", "Progress", "TokenOf", "bearer_of", "build_server", "result_of", "serve_stdio", "tool_of"]
