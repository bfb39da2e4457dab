"""The OpenAI Agents SDK behind Stitchwork: tools from the session's MCP door, the model through the model gateway.

::

    from agents import Agent, Runner
    from stitchwork.agents.adapters.openai_agents import gateway_model, mcp_server

    async with mcp_server(session) as tools:                 # the MCP door, with the session's run token
        agent = Agent(name="assistant", instructions="...", model=gateway_model(session, "llama-8b"),
                      mcp_servers=[tools])
        result = await Runner.run(agent, "Summarise my inbox")

Every tool call the agent makes is an MCP ``tools/call`` at ``/mcp`` and passes the gateway (identity, policy,
taint, approval, secrets, sandbox, audit); a refusal comes back as an MCP error result the model reads. A call held
for a human waits up to ``[mcp] approval_wait_s`` and then answers ``approval_required`` with its id: the agent can
call again once a human decided (``stitchwork approve ID``). The SDK's own MCP timeout (5 s by default) is raised
above that wait here. The model is any ``[compute]`` model name, reached through the model gateway with the run
token as key. The SDK's tracing (which uploads traces to OpenAI) is switched off unless ``tracing=True``.
"""

from __future__ import annotations

from typing import Any

from agents.mcp import MCPServerStreamableHttp
from openai import AsyncOpenAI

from agents import OpenAIChatCompletionsModel, set_tracing_disabled
from stitchwork.agents.adapters import SessionLike, mcp_url


def mcp_server(session: SessionLike, *, name: str = "stitchwork", timeout_s: float = 60.0,
               **options: Any) -> MCPServerStreamableHttp:
    """The session's MCP door as an Agents SDK MCP server (use it with ``async with``).

    Args:
        session: The session (its ``mcp_url`` and run token).
        name: The server's name in the SDK.
        timeout_s: How long one MCP request may take; keep it above ``[mcp] approval_wait_s``.
        options: More :class:`MCPServerStreamableHttp` options (``cache_tools_list``...).
    """
    options.setdefault("cache_tools_list", False)  # the gateway decides which tools the agent has, every time
    return MCPServerStreamableHttp(
        params={"url": mcp_url(session), "headers": {"Authorization": f"Bearer {session.token}"},
                "timeout": timeout_s, "sse_read_timeout": max(300.0, timeout_s)},
        name=name, client_session_timeout_seconds=timeout_s, **options,
    )


def gateway_model(session: SessionLike, model: str, *, tracing: bool = False,
                  **client: Any) -> OpenAIChatCompletionsModel:
    """An Agents SDK model on the model gateway (``model``: a ``[compute]`` model name, the run token as key).

    ``client`` goes to :class:`openai.AsyncOpenAI` (``timeout``...). ``tracing=False`` turns the SDK's trace
    upload off for this process (traces would carry prompts and tool results to a third party).
    """
    if not tracing:
        set_tracing_disabled(True)
    client.setdefault("max_retries", 0)  # the gateway's router retries and fails over itself
    openai = AsyncOpenAI(base_url=session.openai_base_url, api_key=session.token, **client)
    return OpenAIChatCompletionsModel(model=model, openai_client=openai)


__all__ = ["gateway_model", "mcp_server"]
