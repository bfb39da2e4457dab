"""LangGraph behind Stitchwork: the session's tools as LangChain tools, the chat model through the model gateway.

::

    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.prebuilt import ToolNode
    from stitchwork.agents.adapters.langgraph import chat_model, session_tools

    tools = await session_tools(session)                  # the tools the session's agent is given
    llm = chat_model(session, "llama-8b").bind_tools(tools)  # a [compute] model name
    ...  # build the graph as usual with ToolNode(tools); compile(checkpointer=InMemorySaver())

Every tool call goes to the tool door (``POST /v1/agent/tools/{name}`` with the run token): identity, policy,
taint, approval, secrets, sandbox, audit. What the gateway answers goes back to the model as the tool message
(JSON: ``status`` and ``result`` or ``error``), refusals included, so the model can read them.

**Approvals.** A call the policy holds for a human becomes a LangGraph ``interrupt()`` whose value is
``{"type": "stitchwork_approval", "approval_id", "tool", "args"}``: ``graph.ainvoke`` returns with
``__interrupt__``. A human decides in Stitchwork (``stitchwork approve ID`` / ``deny ID``, the API or the
dashboard: an agent cannot approve its own calls), then the graph resumes with ``Command(resume=...)`` (the value
is informational; Stitchwork's decision is the one that counts). LangGraph re-runs the tool node from its start on
resume, so each call carries an idempotency key (thread id + tool-call id): an approved call runs exactly once, a
denied one comes back denied, and one resumed before anybody decided interrupts again.

**Over MCP.** ``async with mcp_tools(session) as tools:`` gives the same tools through the session's MCP door
(``/mcp``, the official ``mcp`` client, extra ``mcp``): the same gateway path, upstream MCP servers' tools
included. MCP has no idempotency key, so keep calls that must not repeat on a resumed step on
:func:`session_tools`; the MCP door itself waits ``[mcp] approval_wait_s`` for a human before answering
``approval_required`` (then an ``interrupt()`` as above).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

import httpx
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langchain_openai import ChatOpenAI
from langgraph.types import interrupt

from stitchwork.agents.adapters import SessionLike, gateway_url, mcp_url

_CALL_ID: ContextVar[str] = ContextVar("stitchwork_langgraph_tool_call_id", default="")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"status": "error", "error": {"error": code, "message": message}}


class GatewayTool(BaseTool):
    """One tool of the session, called through the gateway's tool door (async only)."""

    gateway: str
    token: str
    timeout_s: float = 300.0

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        call_id = str(input.get("id") or "") if isinstance(input, dict) and input.get("type") == "tool_call" else ""
        reset = _CALL_ID.set(call_id)
        try:
            return await super().ainvoke(input, config, **kwargs)
        finally:
            _CALL_ID.reset(reset)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("Stitchwork tools are async: use ainvoke / astream (graph.ainvoke)")

    async def call(self, arguments: dict[str, Any], key: str) -> dict[str, Any]:
        """One call through the tool door; transport failures come back as an ``error`` outcome."""
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": key}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as http:
                response = await http.post(f"{self.gateway}/v1/agent/tools/{self.name}", json=arguments,
                                           headers=headers)
        except httpx.HTTPError as exc:
            return _error("gateway_unreachable", f"the Stitchwork gateway could not be reached: {exc}")
        try:
            body = response.json()
        except ValueError:
            return _error("gateway_error", f"the gateway answered HTTP {response.status_code} without JSON")
        if not isinstance(body, dict) or "status" not in body:
            return _error("gateway_error", f"the gateway answered HTTP {response.status_code}: {str(body)[:200]}")
        return body

    async def _arun(self, *args: Any, config: RunnableConfig, **kwargs: Any) -> str:
        arguments = dict(kwargs)
        thread = str((config.get("configurable") or {}).get("thread_id", ""))
        call_id = _CALL_ID.get() or hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()
        key = f"langgraph:{thread}:{call_id}"
        outcome = await self.call(arguments, key)
        while outcome.get("status") == "approval_required":
            interrupt({"type": "stitchwork_approval", "approval_id": outcome.get("approval_id"), "tool": self.name,
                       "args": arguments})
            outcome = await self.call(arguments, key)  # decided (approved: runs once; denied: refused) or pending
        message: dict[str, Any] = {"status": outcome.get("status")}
        for field in ("result", "error"):
            if outcome.get(field) is not None:
                message[field] = outcome[field]
        return json.dumps(message, ensure_ascii=False, default=str)


class McpGatewayTool(BaseTool):
    """One tool of the session, called through the session's MCP door (async only)."""

    client: Any
    timeout_s: float = 300.0

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("Stitchwork tools are async: use ainvoke / astream (graph.ainvoke)")

    async def call(self, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """One ``tools/call``: the text the model sees and the gateway's status record (``_meta.stitchwork``)."""
        from mcp.shared.exceptions import MCPError

        try:
            result = await self.client.call_tool(self.name, arguments, read_timeout_seconds=self.timeout_s)
        except MCPError as exc:
            return json.dumps(_error("mcp_error", str(exc))), {"status": "error"}
        text = "\n".join(str(getattr(part, "text", "")) for part in result.content)
        meta = dict((result.meta or {}).get("stitchwork") or {})
        meta.setdefault("status", "error" if result.is_error else "ok")
        return text, meta

    async def _arun(self, *args: Any, **kwargs: Any) -> str:
        arguments = dict(kwargs)
        text, meta = await self.call(arguments)
        while meta.get("status") == "approval_required":
            interrupt({"type": "stitchwork_approval", "approval_id": meta.get("approval_id"), "tool": self.name,
                       "args": arguments})
            text, meta = await self.call(arguments)
        return text


@contextlib.asynccontextmanager
async def mcp_tools(session: SessionLike, *, names: list[str] | None = None,
                    timeout_s: float = 300.0) -> AsyncIterator[list[BaseTool]]:
    """The session's tools through its MCP door, for as long as the block runs (one MCP connection).

    Raises:
        ConnectionError: the MCP door could not be reached or refused the session's token.
    """
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    url = mcp_url(session)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {session.token}"},
                                  timeout=httpx2.Timeout(30, read=max(timeout_s, 30))) as http:
        try:
            client = Client(streamable_http_client(url, http_client=http), read_timeout_seconds=timeout_s)
            await client.__aenter__()
        except BaseException as exc:  # the SDK reports a refused or absent door as an exception group
            raise ConnectionError(f"the MCP door at {url} could not be reached or refused the token: {exc!r}") \
                from None
        try:
            listed = await client.list_tools()
            tools: list[BaseTool] = [
                McpGatewayTool(name=tool.name, description=tool.description or tool.name,
                               args_schema=dict(tool.input_schema), client=client, timeout_s=timeout_s)
                for tool in listed.tools if names is None or tool.name in names
            ]
            yield tools
        finally:
            await client.__aexit__(None, None, None)


async def session_tools(session: SessionLike, *, names: list[str] | None = None,
                        timeout_s: float = 300.0) -> list[BaseTool]:
    """The tools the session's agent is given, as LangChain tools (``names``: only these).

    Raises:
        PermissionError: the gateway refused the session's token.
        ConnectionError: the gateway could not be reached.
    """
    gateway = gateway_url(session)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(f"{gateway}/v1/agent/tools", headers={"Authorization": f"Bearer {session.token}"})
    except httpx.HTTPError as exc:
        raise ConnectionError(f"the Stitchwork gateway at {gateway} could not be reached: {exc}") from exc
    if response.status_code == 401:
        raise PermissionError(f"the gateway refused the session's token: {response.text[:300]}")
    response.raise_for_status()
    tools: list[BaseTool] = []
    for entry in response.json():
        function = entry["function"]
        if names is not None and function["name"] not in names:
            continue
        tools.append(GatewayTool(name=function["name"], description=function.get("description") or function["name"],
                                 args_schema=function.get("parameters") or {"type": "object", "properties": {}},
                                 gateway=gateway, token=session.token, timeout_s=timeout_s))
    return tools


def chat_model(session: SessionLike, model: str, **options: Any) -> ChatOpenAI:
    """A LangChain chat model on the model gateway (``model``: a ``[compute]`` model name), with the run token as
    its key; ``options`` go to :class:`ChatOpenAI` (``temperature``, ``timeout``...)."""
    options.setdefault("max_retries", 0)  # the gateway's router retries and fails over itself
    return ChatOpenAI(model=model, base_url=session.openai_base_url, api_key=session.token,  # type: ignore[arg-type]
                      **options)


__all__ = ["GatewayTool", "McpGatewayTool", "chat_model", "mcp_tools", "session_tools"]
