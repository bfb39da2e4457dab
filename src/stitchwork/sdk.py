"""The Python SDK: open a session for an agent that runs outside Stitchwork and call through the gateway.

::

    from stitchwork import Stitchwork

    sw = Stitchwork("http://127.0.0.1:8470", operator_token)      # or $STITCHWORK_URL / $STITCHWORK_TOKEN
    with sw.session("inbox-assistant", "Summarise my inbox", ttl=3600) as session:
        result = session.call("read_email", {"id": "m1"})          # ToolResult: status, result, error, ...
        if result.status == "approval_required":
            session.wait_for_approval(result.approval_id, timeout=600)
            result = session.call("read_email", {"id": "m1"})
        client = session.openai_client()                           # openai.AsyncOpenAI at the model gateway
        session.mcp_url, session.token                             # for any MCP client

    async with await sw.asession("inbox-assistant", "...") as session:   # the same, async
        result = await session.call("list_inbox", {})
        async for event in session.events():                       # run events (WebSocket), resumable by seq
            ...

A session is an external run (:mod:`stitchwork.service.sessions`): tool calls go through ``POST
/v1/agent/tools/{name}`` with the run token, so identity, policy, taint, approvals, secrets, sandbox and audit apply
as for built-in runs. The operator token (``Stitchwork(url, token)``) opens, renews and closes sessions, waits for
approvals and reads events; the session's run token is what the agent uses.

This module imports nothing of the server side. It needs ``httpx`` (a dependency of every install); ``events()``
needs ``websockets`` and ``openai_client()`` needs ``openai`` (``pip install 'stitchwork[sdk]'``); a missing one is
named in the error.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from stitchwork.errors import ApprovalError, AuthError, ConfigError, StitchworkError

DEFAULT_URL = "http://127.0.0.1:8470"
FINAL_APPROVAL = frozenset({"approved", "denied", "expired", "consumed"})


class RemoteError(StitchworkError):
    """The control plane refused a request (``status`` is the HTTP status, ``body`` its JSON error)."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)
        self.code = str(body.get("error", "error")) if isinstance(body, dict) else "error"
        super().__init__(f"{message} (HTTP {status})")


def _need(module: str, extra: str, what: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ConfigError(f"{what} needs {module}: pip install 'stitchwork[{extra}]'") from exc


def _httpx() -> Any:
    return _need("httpx", "sdk", "the Stitchwork SDK")


def _check(response: Any) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code == 401:
            message = str(body)
            if isinstance(body, dict):
                error = body.get("error")
                detail = error.get("message") if isinstance(error, dict) else None
                message = str(body.get("message") or detail or "unauthenticated")
            raise AuthError(message)
        raise RemoteError(response.status_code, body)
    return response.json() if response.content else None


@dataclass(frozen=True)
class ToolResult:
    """The gateway's answer to one tool call.

    Attributes:
        status: ``ok``, ``error`` (the tool ran and failed), ``invalid`` (bad call), ``denied`` (policy or a human
            said no) or ``approval_required`` (a human must decide first: see :attr:`approval_id`).
        result: The tool's output (``ok``), secrets redacted.
        error: What went wrong, as the gateway reports it.
        approval_id: The approval a held call waits for.
        label: The provenance label the output was recorded under (``tool:read_email (untrusted)``).
        policy_ids: The policies that decided.
    """

    status: str
    result: Any = None
    error: dict[str, Any] | None = None
    approval_id: str | None = None
    label: str = ""
    policy_ids: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ToolResult:
        return cls(status=str(body.get("status", "error")), result=body.get("result"), error=body.get("error"),
                   approval_id=body.get("approval_id") or None, label=str(body.get("label") or ""),
                   policy_ids=tuple(body.get("policy_ids") or ()))


@dataclass
class _SessionBase:
    """What a session is: its run, token and URLs; the parts both faces share."""

    url: str
    operator_token: str
    run_id: str
    agent: str
    token: str
    expires_at: float
    mcp_url: str
    openai_base_url: str
    timeout: float = 30.0
    closed: bool = field(default=False, repr=False)

    def _update(self, body: Mapping[str, Any]) -> None:
        self.token = str(body["token"])
        self.expires_at = float(body["expires_at"])

    @property
    def openai_api_key(self) -> str:
        """The key an OpenAI-compatible client sends to the model gateway: the run token."""
        return self.token

    def openai_client(self, **kwargs: Any) -> Any:
        """An ``openai.AsyncOpenAI`` at the model gateway with the run token (extra ``sdk``: ``openai``)."""
        openai = _need("openai", "sdk", "Session.openai_client()")
        return openai.AsyncOpenAI(base_url=self.openai_base_url, api_key=self.token, **kwargs)

    async def events(self, *, after: int = 0, reconnect: int = 20) -> AsyncIterator[dict[str, Any]]:
        """The run's events as they happen (WebSocket ``/v1/events``), each with ``seq``; resumable.

        Args:
            after: Start after this sequence number (the last one seen: no event is repeated or lost).
            reconnect: Reconnections tried in a row when the connection drops (resuming after the last ``seq``).
        """
        websockets = _need("websockets", "sdk", "Session.events()")
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/events"
        last, failures = after, 0
        while True:
            try:
                async with websockets.connect(f"{ws_url}?run_id={self.run_id}&after={last}",
                                              additional_headers={"Authorization": f"Bearer {self.operator_token}"},
                                              open_timeout=self.timeout) as ws:
                    failures = 0
                    async for message in ws:
                        event: dict[str, Any] = json.loads(message)
                        last = int(event.get("seq", last))
                        yield event
            except InvalidStatus as exc:
                raise AuthError(f"the event stream refused the connection: {exc}") from exc
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 0
                if code == 4401:
                    raise AuthError("the event stream needs a valid operator token") from exc
                failures += 1
            except OSError:
                failures += 1
            if failures > reconnect:
                raise StitchworkError(f"the event stream of {self.run_id} dropped {failures} times in a row")
            await asyncio.sleep(min(2.0, 0.1 * 2 ** failures))


class Session(_SessionBase):
    """A session, synchronous face (:meth:`Stitchwork.session`). A context manager: closes on exit."""

    def _http(self, token: str) -> Any:
        return _httpx().Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=self.timeout)

    def call(self, tool: str, args: Mapping[str, Any] | None = None, *, idempotency_key: str = "") -> ToolResult:
        """One tool call through the gateway with the run token.

        Raises:
            AuthError: the token is refused (expired, revoked: renew or open a new session).
        """
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        with self._http(self.token) as http:
            response = http.post(f"/v1/agent/tools/{tool}", json=dict(args or {}), headers=headers)
        if response.status_code == 401:
            _check(response)
        return ToolResult.from_body(response.json())

    def approval(self, approval_id: str) -> dict[str, Any]:
        """One approval as the control plane shows it (``status``: pending, approved, denied, expired...)."""
        with self._http(self.operator_token) as http:
            body: dict[str, Any] = _check(http.get(f"/v1/approvals/{approval_id}"))
        return body

    def wait_for_approval(self, approval_id: str, timeout: float = 600.0, *, poll: float = 0.5) -> dict[str, Any]:
        """Waits until a human decides ``approval_id``; returns the approval (check its ``status``).

        Raises:
            ApprovalError: no decision within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            approval = self.approval(approval_id)
            if approval.get("status") in FINAL_APPROVAL:
                return approval
            if time.monotonic() >= deadline:
                raise ApprovalError(f"approval {approval_id} is still pending after {timeout:g}s")
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def renew(self, ttl: int | None = None) -> str:
        """A new run token (the previous one is revoked) valid ``ttl`` seconds; returns it."""
        with self._http(self.operator_token) as http:
            self._update(_check(http.post(f"/v1/sessions/{self.run_id}/renew", json={"ttl_s": ttl})))
        return self.token

    def close(self) -> None:
        """Closes the session (its tokens are revoked); closing twice is harmless."""
        if self.closed:
            return
        with self._http(self.operator_token) as http:
            response = http.delete(f"/v1/sessions/{self.run_id}")
        if response.status_code == 404 and "already closed" in response.text:
            self.closed = True
            return
        _check(response)
        self.closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncSession(_SessionBase):
    """A session, asynchronous face (:meth:`Stitchwork.asession`). An async context manager: closes on exit."""

    def _http(self, token: str) -> Any:
        return _httpx().AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                    timeout=self.timeout)

    async def call(self, tool: str, args: Mapping[str, Any] | None = None, *,
                   idempotency_key: str = "") -> ToolResult:
        """One tool call through the gateway with the run token (see :meth:`Session.call`)."""
        headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
        async with self._http(self.token) as http:
            response = await http.post(f"/v1/agent/tools/{tool}", json=dict(args or {}), headers=headers)
        if response.status_code == 401:
            _check(response)
        return ToolResult.from_body(response.json())

    async def approval(self, approval_id: str) -> dict[str, Any]:
        async with self._http(self.operator_token) as http:
            body: dict[str, Any] = _check(await http.get(f"/v1/approvals/{approval_id}"))
        return body

    async def wait_for_approval(self, approval_id: str, timeout: float = 600.0, *,
                                poll: float = 0.5) -> dict[str, Any]:
        """Waits until a human decides ``approval_id`` (see :meth:`Session.wait_for_approval`)."""
        deadline = time.monotonic() + timeout
        while True:
            approval = await self.approval(approval_id)
            if approval.get("status") in FINAL_APPROVAL:
                return approval
            if time.monotonic() >= deadline:
                raise ApprovalError(f"approval {approval_id} is still pending after {timeout:g}s")
            await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    async def renew(self, ttl: int | None = None) -> str:
        async with self._http(self.operator_token) as http:
            self._update(_check(await http.post(f"/v1/sessions/{self.run_id}/renew", json={"ttl_s": ttl})))
        return self.token

    async def close(self) -> None:
        if self.closed:
            return
        async with self._http(self.operator_token) as http:
            response = await http.delete(f"/v1/sessions/{self.run_id}")
        if response.status_code == 404 and "already closed" in response.text:
            self.closed = True
            return
        _check(response)
        self.closed = True

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class Stitchwork:
    """A client of one control plane, with an operator token.

    Args:
        url: The control plane (default ``$STITCHWORK_URL``, else ``http://127.0.0.1:8470``).
        token: The operator token ``stitchwork up`` printed (default ``$STITCHWORK_TOKEN``).
        timeout: Seconds per HTTP request.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.url = (url or os.environ.get("STITCHWORK_URL") or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"the control plane URL must be http(s)://host:port, got {self.url!r}")
        self.token = token or os.environ.get("STITCHWORK_TOKEN", "")
        if not self.token:
            raise AuthError("an operator token is needed: Stitchwork(url, token) or $STITCHWORK_TOKEN")
        self.timeout = timeout

    def _fields(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {"url": self.url, "operator_token": self.token, "run_id": str(body["run_id"]),
                "agent": str(body.get("agent", "")), "token": str(body["token"]),
                "expires_at": float(body["expires_at"]), "mcp_url": str(body["mcp_url"]),
                "openai_base_url": str(body["openai_base_url"]), "timeout": self.timeout}

    def session(self, agent: str, task: str, *, ttl: int | None = None) -> Session:
        """Opens a session for ``agent`` on ``task`` (``ttl`` seconds; server default 3600)."""
        with _httpx().Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
                             timeout=self.timeout) as http:
            body = _check(http.post("/v1/sessions", json={"agent": agent, "task": task, "ttl_s": ttl}))
        return Session(**self._fields(body))

    async def asession(self, agent: str, task: str, *, ttl: int | None = None) -> AsyncSession:
        """Opens a session, asynchronously."""
        async with _httpx().AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
                                        timeout=self.timeout) as http:
            body = _check(await http.post("/v1/sessions", json={"agent": agent, "task": task, "ttl_s": ttl}))
        return AsyncSession(**self._fields(body))


__all__ = ["AsyncSession", "RemoteError", "Session", "Stitchwork", "ToolResult"]
