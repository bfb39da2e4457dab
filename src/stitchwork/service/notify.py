"""Approval notifications: each pending approval is posted to the configured webhooks (``[notifications]``).

The body is Slack-compatible JSON (``text`` and ``blocks``, so a Slack or Mattermost incoming webhook shows it
as is) with the approval itself under ``stitchwork`` for other receivers, and a link to the approval's page on
the dashboard. Every POST is signed::

    X-Stitchwork-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>." + body)>
    X-Stitchwork-Event: approval.pending
    X-Stitchwork-Delivery: <approval id>:<webhook id>   (the same on every retry: receivers de-duplicate on it)

keyed by the vault secret ``[notifications] signing_secret``; without that secret nothing is sent (a delivery is
recorded as failed, saying so). A receiver checks the signature over the raw body and refuses an old ``t``.

Delivery never blocks the gateway: :class:`ApprovalNotifier` runs beside the server, finds new pending approvals
when a run event announces one (:meth:`ApprovalNotifier.wake`) and every ``poll_s`` otherwise (approvals
requested through the HTTP tool door or by workers), and records each (approval, webhook) pair in
``notification_deliveries`` before sending, so a restart neither loses nor repeats a finished delivery (one in
flight at a crash is sent again: at least once). A failure (connection error, timeout, 408, 429, 5xx) is retried
``retries`` times with doubling backoff from ``backoff_s`` (``Retry-After`` honoured up to 5 minutes); another
4xx is final. Text from arguments is untrusted: it is escaped for Slack (``&``, ``<``, ``>``, so it cannot
mention ``@channel`` or forge a link) and cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from stitchwork.config import NotificationsConfig
from stitchwork.errors import ConfigError, SecretError, StitchworkError
from stitchwork.security.approvals import Approval, ApprovalStatus

if TYPE_CHECKING:
    from stitchwork.platform import Platform

__all__ = ["DELIVERIES", "ApprovalNotifier", "payload", "sign", "slack_escape", "verify_signature"]

log = logging.getLogger(__name__)

DELIVERIES = """
CREATE TABLE IF NOT EXISTS notification_deliveries (
    approval_id VARCHAR NOT NULL, webhook VARCHAR NOT NULL, status VARCHAR NOT NULL, attempts INTEGER NOT NULL,
    last_error VARCHAR NOT NULL, created_at DOUBLE NOT NULL, updated_at DOUBLE NOT NULL,
    PRIMARY KEY (approval_id, webhook)
)
"""
MAX_BACKOFF_S = 300.0
RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})
SIGNATURE_HEADER = "X-Stitchwork-Signature"


def slack_escape(text: str, limit: int = 500) -> str:
    """Untrusted text for Slack ``mrkdwn``: control characters ``&``, ``<``, ``>`` escaped, cut to ``limit``."""
    cut = text if len(text) <= limit else text[:limit] + "…"
    return cut.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sign(key: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Stitchwork-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(key: bytes, body: bytes, header: str, *, now: float | None = None, tolerance_s: float = 300.0
                     ) -> bool:
    """What a receiver does: True if ``header`` signs ``body`` with ``key`` and is at most ``tolerance_s`` old."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        stamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - stamp) > tolerance_s:
        return False
    expected = sign(key, body, stamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def webhook_id(url: str) -> str:
    """A stable id of a webhook that does not reveal its URL (which may hold a token)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def payload(approval: Mapping[str, Any], link: str) -> dict[str, Any]:
    """The JSON body announcing one pending approval (Slack-compatible; the approval under ``stitchwork``)."""
    policies = ", ".join(approval.get("policy_ids") or ()) or "(none)"
    arguments = json.dumps(approval.get("arguments") or {}, ensure_ascii=False, sort_keys=True)
    title = (f"Approval needed: agent {slack_escape(str(approval['agent']), 80)} wants to call "
             f"{slack_escape(str(approval['tool']), 80)}")
    details = (f"*Run* {slack_escape(str(approval['run_id']), 80)}  *Policy* {slack_escape(policies, 200)}\n"
               f"*Why* {slack_escape(str(approval.get('reason') or ''), 300)}\n"
               f"*Arguments* `{slack_escape(arguments, 600).replace('`', 'ʼ')}`")
    return {
        "text": f"{title} ({slack_escape(str(approval['id']), 40)}): <{link}|review it>",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{title}*\n{details}"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"<{link}|Review and decide>"}},
        ],
        "stitchwork": {"event": "approval.pending", "url": link, "approval": dict(approval)},
    }


@dataclass(frozen=True)
class Outcome:
    """One webhook's answer to one attempt."""

    ok: bool
    retry: bool
    error: str = ""
    wait_s: float | None = None


class ApprovalNotifier:
    """Tells the configured webhooks about every new pending approval (see the module docstring)."""

    def __init__(self, platform: Platform, config: NotificationsConfig, *, base_url: str,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, concurrency: int = 4) -> None:
        if config.retries < 0 or config.backoff_s < 0 or config.timeout_s <= 0 or config.poll_s <= 0:
            raise ConfigError("[notifications] retries and backoff_s must be >= 0, timeout_s and poll_s > 0")
        for url in config.webhooks:
            if not url.startswith(("http://", "https://", "secret://")):
                raise ConfigError(f"[notifications] webhook {url[:40]!r}: give an http(s):// URL or secret://NAME")
        self.platform = platform
        self.config = config
        self.base_url = base_url.rstrip("/")
        self._transport = transport
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(concurrency)
        self._client: httpx.AsyncClient | None = None
        platform.store.execute(DELIVERIES)

    @property
    def enabled(self) -> bool:
        return bool(self.config.webhooks)

    def wake(self) -> None:
        """Look for new pending approvals now (a run event said one may exist)."""
        self._wake.set()

    def link(self, approval_id: str) -> str:
        return f"{self.base_url}/ui/approvals/{approval_id}"

    # -- the loop ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Scans and delivers until cancelled; a failed scan is logged and retried at the next tick."""
        if not self.enabled:
            return
        await asyncio.to_thread(self._resume_unfinished)
        try:
            while True:
                try:
                    await self.scan()
                except StitchworkError as exc:
                    log.warning("approval notifications: scan failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.config.poll_s)
                self._wake.clear()
        finally:
            await self.aclose()

    def _resume_unfinished(self) -> None:
        """Deliveries in flight when the server stopped are sent again (at least once)."""
        rows = self.platform.store.query(
            "SELECT approval_id, webhook FROM notification_deliveries WHERE status = 'sending'")
        for row in rows:
            self.platform.store.execute("DELETE FROM notification_deliveries WHERE approval_id = ? AND webhook = ?",
                                        [row["approval_id"], row["webhook"]])

    async def scan(self) -> int:
        """Starts a delivery for every (pending approval, webhook) pair not yet recorded; returns how many."""
        claimed = await asyncio.to_thread(self._claim)
        for approval, url in claimed:
            task = asyncio.get_running_loop().create_task(self._deliver(approval, url))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claimed)

    def _claim(self) -> list[tuple[Approval, str]]:
        pending = self.platform.approvals.find(ApprovalStatus.PENDING)
        if not pending:
            return []
        ids = [webhook_id(u) for u in self.config.webhooks]
        marks = ", ".join("?" for _ in pending)
        seen = {(r["approval_id"], r["webhook"]) for r in self.platform.store.query(
            f"SELECT approval_id, webhook FROM notification_deliveries WHERE approval_id IN ({marks})",
            [a.id for a in pending])}
        now = time.time()
        claimed = []
        for approval in pending:
            for url, hook in zip(self.config.webhooks, ids, strict=True):
                if (approval.id, hook) in seen:
                    continue
                self.platform.store.append("notification_deliveries", [{
                    "approval_id": approval.id, "webhook": hook, "status": "sending", "attempts": 0,
                    "last_error": "", "created_at": now, "updated_at": now}])
                claimed.append((approval, url))
        return claimed

    async def wait_idle(self) -> None:
        """Waits for the deliveries started so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- one delivery -----------------------------------------------------------------------------------------

    def _record(self, approval_id: str, hook: str, status: str, attempts: int, error: str) -> None:
        self.platform.store.execute(
            "UPDATE notification_deliveries SET status = ?, attempts = ?, last_error = ?, updated_at = ? "
            "WHERE approval_id = ? AND webhook = ?", [status, attempts, error[:500], time.time(), approval_id, hook])

    def _key(self) -> bytes:
        try:
            return self.platform.vault.get(self.config.signing_secret).encode()
        except SecretError as exc:
            raise ConfigError(f"[notifications] signing secret {self.config.signing_secret!r} is not in the vault "
                              f"(stitchwork secrets set {self.config.signing_secret}); nothing was sent") from exc

    def _url(self, url: str) -> str:
        if url.startswith("secret://"):
            try:
                url = self.platform.vault.get(url.removeprefix("secret://"))
            except SecretError as exc:
                raise ConfigError(f"[notifications] webhook {url} is not in the vault") from exc
            if not url.startswith(("http://", "https://")):
                raise ConfigError("[notifications] a webhook secret must hold an http(s):// URL")
        return url

    async def _deliver(self, approval: Approval, url: str) -> None:
        hook = webhook_id(url)
        async with self._limit:
            attempts = 0
            try:
                key = self._key()
                target = self._url(url)
            except ConfigError as exc:
                await asyncio.to_thread(self._record, approval.id, hook, "failed", attempts, str(exc))
                log.warning("approval notification %s not sent: %s", approval.id, exc)
                return
            shown = self.platform.gateway.redactor.redact(approval.to_dict())
            body = json.dumps(payload(shown, self.link(approval.id)), ensure_ascii=False).encode()
            delay = self.config.backoff_s
            while True:
                attempts += 1
                outcome = await self._post(target, body, key, f"{approval.id}:{hook}")
                if outcome.ok:
                    await asyncio.to_thread(self._record, approval.id, hook, "sent", attempts, "")
                    return
                if not outcome.retry or attempts > self.config.retries:
                    await asyncio.to_thread(self._record, approval.id, hook, "failed", attempts, outcome.error)
                    log.warning("approval notification %s to webhook %s failed after %d attempt(s): %s",
                                approval.id, hook, attempts, outcome.error)
                    return
                await asyncio.to_thread(self._record, approval.id, hook, "sending", attempts, outcome.error)
                wait = outcome.wait_s if outcome.wait_s is not None else delay
                await self._sleep(min(wait, MAX_BACKOFF_S))
                delay = min(delay * 2, MAX_BACKOFF_S)
                if not await asyncio.to_thread(self._still_pending, approval.id):
                    await asyncio.to_thread(self._record, approval.id, hook, "skipped", attempts,
                                            f"decided before delivery; last error: {outcome.error}")
                    return

    def _still_pending(self, approval_id: str) -> bool:
        try:
            return self.platform.approvals.get(approval_id).status is ApprovalStatus.PENDING
        except StitchworkError:
            return False

    async def _post(self, url: str, body: bytes, key: bytes, delivery: str) -> Outcome:
        if self._client is None:
            self._client = httpx.AsyncClient(transport=self._transport, timeout=self.config.timeout_s,
                                             follow_redirects=False)
        headers = {"Content-Type": "application/json", "User-Agent": "stitchwork-notifications/1",
                   SIGNATURE_HEADER: sign(key, body, int(time.time())), "X-Stitchwork-Event": "approval.pending",
                   "X-Stitchwork-Delivery": delivery}
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return Outcome(False, True, f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= response.status_code < 300:
            return Outcome(True, False)
        error = f"HTTP {response.status_code}: {response.text[:200]}"
        wait = None
        if response.status_code == 429:
            with contextlib.suppress(ValueError):
                wait = max(0.0, float(response.headers.get("retry-after", "")))
        return Outcome(False, response.status_code in RETRYABLE, error, wait)

    def deliveries(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest deliveries (for the platform page)."""
        return self.platform.store.query(
            "SELECT approval_id, webhook, status, attempts, last_error, updated_at FROM notification_deliveries "
            "ORDER BY updated_at DESC LIMIT ?", [limit])
