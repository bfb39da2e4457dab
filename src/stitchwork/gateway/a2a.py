"""The A2A client door: a remote A2A agent called as a tool, behind every stage of the gateway.

A remote-agent tool (``[a2a.remotes.NAME]`` in config, or ``a2a = "a2a+https://…"`` in a manifest) is a host-side
tool whose handler is :class:`A2ACaller`: identity, argument validation, taint, Cedar (the action is the tool, the
resource the remote URL), approval and audit happen before it runs, like for any external tool. It then sends the
``message`` argument to the remote agent (``SendMessage``, A2A 1.0 over JSON-RPC, with the vault-held bearer key
when the tool has one) and returns the remote's answer, labelled untrusted as ``a2a:<tool>``.

The caller only talks to the configured origin: an agent card that points elsewhere is refused, redirects are not
followed, and an answer larger than the platform's output limit or slower than the tool's timeout is an error.
Needs the ``a2a`` extra (``pip install 'stitchwork[a2a]'``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from stitchwork.errors import ConfigError, RemoteAgentError, SecretError, StitchworkError
from stitchwork.gateway.context import GatewayContext
from stitchwork.security.taint import Label
from stitchwork.tools.host import HostCall, HostResult

EXTRA = "pip install 'stitchwork[a2a]'"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _capped_transport(cap: int) -> Any:
    """An httpx transport whose response bodies stop with :class:`RemoteAgentError` past ``cap`` bytes."""
    import httpx

    class CappedStream(httpx.AsyncByteStream):
        def __init__(self, stream: Any) -> None:
            self.stream, self.seen = stream, 0

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self.stream:
                self.seen += len(chunk)
                if self.seen > cap:
                    raise RemoteAgentError(f"the remote agent's answer exceeds {cap} bytes")
                yield chunk

        async def aclose(self) -> None:
            await self.stream.aclose()

    class CappedTransport(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await super().handle_async_request(request)
            response.stream = CappedStream(response.stream)
            return response

    return CappedTransport()


def answer_of(chunks: list[Any]) -> dict[str, Any]:
    """The remote's answer from the ``StreamResponse`` objects of one ``send_message``: the final text, the task
    state (``completed``, ``working``, ``input_required``...), and the task and context ids to continue with."""
    from a2a.helpers import get_artifact_text, get_message_text
    from a2a.types import TaskState

    text, state, task_id, context_id = "", "completed", "", ""
    for chunk in chunks:
        kind = chunk.WhichOneof("payload")
        if kind == "message":
            text = get_message_text(chunk.message, delimiter="\n")
            context_id = chunk.message.context_id or context_id
        elif kind == "task":
            task = chunk.task
            task_id, context_id = task.id, task.context_id
            state = TaskState.Name(task.status.state)
            artifacts = "\n".join(get_artifact_text(a, delimiter="") for a in task.artifacts)
            status_text = get_message_text(task.status.message, delimiter="\n") if task.status.HasField(
                "message") else ""
            text = artifacts or status_text or text
        elif kind == "status_update":
            state = TaskState.Name(chunk.status_update.status.state)
            if chunk.status_update.status.HasField("message"):
                text = get_message_text(chunk.status_update.status.message, delimiter="\n") or text
        elif kind == "artifact_update":
            text += get_artifact_text(chunk.artifact_update.artifact, delimiter="")
    state = state.removeprefix("TASK_STATE_").lower()
    return {"state": state, "text": text, "task_id": task_id, "context_id": context_id}


class A2ACaller:
    """The host-side handler ``a2a``: one call of a remote-agent tool.

    Args:
        context: The gateway's shared context (the tool manifests, the vault, the audit log, the limits).
    """

    def __init__(self, context: GatewayContext) -> None:
        self.context = context

    async def __call__(self, call: HostCall) -> HostResult:
        tool = self.context.tools.get(call.tool)
        if not tool.remote:
            raise ConfigError(f"tool {tool.name!r} names no remote agent")
        try:
            import httpx
            from a2a.client import A2ACardResolver, ClientConfig, create_client
            from a2a.client.errors import A2AClientError
            from a2a.types import Message, Part, Role, SendMessageRequest
        except ImportError as exc:
            raise ConfigError(f"calling remote A2A agents needs the a2a extra: {EXTRA}") from exc
        headers = {}
        if tool.remote_key:
            try:
                headers["Authorization"] = "Bearer " + self.context.vault.get(tool.remote_key)
            except SecretError as exc:
                raise ConfigError(f"tool {tool.name!r}: its key secret://{tool.remote_key} is not in the vault") \
                    from exc
            self.context.audit.append_nowait("secret", agent=call.agent, run_id=call.run_id, tool=tool.name,
                                             decision="allow", data={"secrets": [tool.remote_key]})
        limits = tool.limits_over(self.context.sandboxes.limits)
        timeout = limits.timeout_s
        message = Message(role=Role.ROLE_USER, parts=[Part(text=str(call.arguments["message"]))],
                          message_id=uuid.uuid4().hex)
        if task_id := str(call.arguments.get("task_id") or ""):
            message.task_id = task_id
        chunks: list[Any] = []
        try:
            async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout),
                                         transport=_capped_transport(limits.max_output_bytes),
                                         follow_redirects=False) as http:
                async with asyncio.timeout(timeout):
                    card = await A2ACardResolver(http, tool.remote).get_agent_card()
                    interfaces = [i for i in card.supported_interfaces if i.protocol_binding.upper() == "JSONRPC"]
                    if not interfaces or any(_origin(i.url) != _origin(tool.remote) for i in interfaces):
                        raise RemoteAgentError(
                            f"the agent card of {tool.remote} points to another origin "
                            f"({', '.join(i.url for i in card.supported_interfaces) or 'none'}); refused")
                    client = await create_client(card, client_config=ClientConfig(streaming=False, httpx_client=http))
                    async with client:
                        async for chunk in client.send_message(SendMessageRequest(message=message)):
                            chunks.append(chunk)
        except TimeoutError as exc:
            raise RemoteAgentError(f"the remote agent {tool.remote} did not answer within {timeout:g} s") from exc
        except StitchworkError:
            raise
        except (A2AClientError, httpx.HTTPError, ValueError) as exc:
            cause: BaseException = exc
            while cause.__cause__ is not None and not isinstance(cause, RemoteAgentError):
                cause = cause.__cause__
            if isinstance(cause, RemoteAgentError):
                raise cause from exc
            raise RemoteAgentError(f"the remote agent {tool.remote} failed: {type(exc).__name__}: {exc}") from exc
        answer = {"agent": tool.remote, **answer_of(chunks)}
        return HostResult(answer, labels=(Label(f"a2a:{tool.name}", False),))


__all__ = ["A2ACaller", "RemoteAgentError", "answer_of"]
