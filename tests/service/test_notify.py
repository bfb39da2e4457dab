"""Approval notifications: Slack-compatible, signed, linked, retried, never repeated, never blocking."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from stitchwork.config import NotificationsConfig, load_config
from stitchwork.errors import ConfigError
from stitchwork.platform import Platform
from stitchwork.service.notify import ApprovalNotifier, payload, sign, slack_escape, verify_signature
from tests.interfaces.dashboard_fixtures import build

KEY = "whsec_test_0123456789"
HOOK = "https://hooks.example/services/T000/B000/XXXX"


@pytest.fixture
async def platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    monkeypatch.chdir(tmp_path)
    opened = Platform.open(load_config(build(tmp_path), environ={}))
    opened.vault.set("notifications_hmac", KEY)
    try:
        yield opened
    finally:
        await opened.aclose()


class Receiver:
    """A webhook endpoint scripted to answer with ``codes`` in turn (then 200)."""

    def __init__(self, *codes: int, headers: dict[str, str] | None = None) -> None:
        self.codes = list(codes)
        self.headers = headers or {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        code = self.codes.pop(0) if self.codes else 200
        return httpx.Response(code, text="ok" if code < 300 else "nope", headers=self.headers)


def notifier(platform: Platform, receiver: Callable[[httpx.Request], httpx.Response], *, sleeps: list[float] | None
             = None, **config: Any) -> ApprovalNotifier:
    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    settings = NotificationsConfig(webhooks=config.pop("webhooks", (HOOK,)), retries=config.pop("retries", 3),
                                   backoff_s=0.5, **config)
    return ApprovalNotifier(platform, settings, base_url="https://sw.example", transport=httpx.MockTransport(receiver),
                            sleep=sleep)


async def pending(platform: Platform, path: str = "/srv/old-report.csv") -> str:
    run = await platform.runner.start("janitor", "clean up")
    (approval_id,) = run.pending["approvals"]
    return str(approval_id)


async def test_a_pending_approval_is_posted_signed_with_a_link(platform: Platform) -> None:
    approval_id = await pending(platform)
    receiver = Receiver()
    notify = notifier(platform, receiver)
    assert await notify.scan() == 1
    await notify.wait_idle()
    (request,) = receiver.requests
    body = request.content
    assert str(request.url) == HOOK and request.headers["content-type"] == "application/json"
    assert verify_signature(KEY.encode(), body, request.headers["x-stitchwork-signature"])
    assert not verify_signature(b"other key", body, request.headers["x-stitchwork-signature"])
    assert not verify_signature(KEY.encode(), body + b" ", request.headers["x-stitchwork-signature"])
    assert request.headers["x-stitchwork-event"] == "approval.pending"
    assert request.headers["x-stitchwork-delivery"].startswith(approval_id + ":")
    sent = json.loads(body)
    link = f"https://sw.example/ui/approvals/{approval_id}"
    assert link in sent["text"] and sent["stitchwork"]["url"] == link
    assert sent["blocks"][0]["type"] == "section" and "remove_file" in sent["blocks"][0]["text"]["text"]
    assert "irreversible-approval" in sent["blocks"][0]["text"]["text"]
    assert sent["stitchwork"]["approval"]["arguments"] == {"path": "/srv/old-report.csv"}
    # delivered once: later scans (and a new notifier after a restart) do not post it again
    assert await notify.scan() == 0
    again = notifier(platform, receiver)
    assert await again.scan() == 0
    assert notify.deliveries()[0]["status"] == "sent"
    await notify.aclose()


async def test_failures_are_retried_with_backoff_then_given_up(platform: Platform) -> None:
    await pending(platform)
    receiver, sleeps = Receiver(503, 500, 429, 502), []
    notify = notifier(platform, receiver, sleeps=sleeps, retries=3)
    await notify.scan()
    await notify.wait_idle()
    assert len(receiver.requests) == 4 and sleeps == [0.5, 1.0, 2.0]
    row = notify.deliveries()[0]
    assert row["status"] == "failed" and row["attempts"] == 4 and "HTTP 502" in row["last_error"]
    delivery_ids = {r.headers["x-stitchwork-delivery"] for r in receiver.requests}
    assert len(delivery_ids) == 1  # the same id on every retry: receivers can de-duplicate


async def test_a_transient_failure_then_success_and_retry_after(platform: Platform) -> None:
    await pending(platform)
    receiver, sleeps = Receiver(429, headers={"Retry-After": "7"}), []
    notify = notifier(platform, receiver, sleeps=sleeps)
    await notify.scan()
    await notify.wait_idle()
    assert sleeps == [7.0] and len(receiver.requests) == 2 and notify.deliveries()[0]["status"] == "sent"


async def test_a_client_error_is_not_retried(platform: Platform) -> None:
    await pending(platform)
    receiver = Receiver(404)
    notify = notifier(platform, receiver)
    await notify.scan()
    await notify.wait_idle()
    assert len(receiver.requests) == 1 and notify.deliveries()[0]["status"] == "failed"


async def test_connection_errors_are_retried(platform: Platform) -> None:
    await pending(platform)
    calls: list[int] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200)

    notify = notifier(platform, refuse)
    await notify.scan()
    await notify.wait_idle()
    assert len(calls) == 3 and notify.deliveries()[0]["status"] == "sent"


async def test_without_the_signing_secret_nothing_is_sent(platform: Platform) -> None:
    platform.vault.delete("notifications_hmac")
    await pending(platform)
    receiver = Receiver()
    notify = notifier(platform, receiver)
    await notify.scan()
    await notify.wait_idle()
    assert receiver.requests == []
    row = notify.deliveries()[0]
    assert row["status"] == "failed" and "stitchwork secrets set notifications_hmac" in row["last_error"]


async def test_a_decided_approval_stops_its_retries(platform: Platform) -> None:
    approval_id = await pending(platform)
    receiver = Receiver(503, 503, 503)
    decided = asyncio.Event()

    async def sleep(_: float) -> None:
        platform.approvals.decide(approval_id, approve=False, by="test")
        decided.set()

    notify = ApprovalNotifier(platform, NotificationsConfig(webhooks=(HOOK,), retries=5),
                              base_url="https://sw.example", transport=httpx.MockTransport(receiver), sleep=sleep)
    await notify.scan()
    await notify.wait_idle()
    assert decided.is_set() and len(receiver.requests) == 1 and notify.deliveries()[0]["status"] == "skipped"


async def test_a_delivery_cut_by_a_restart_is_sent_again(platform: Platform) -> None:
    await pending(platform)
    stalled = asyncio.Event()

    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async def sleep(_: float) -> None:
        stalled.set()
        await asyncio.sleep(3600)

    first = ApprovalNotifier(platform, NotificationsConfig(webhooks=(HOOK,)), base_url="https://sw.example",
                             transport=httpx.MockTransport(hang), sleep=sleep)
    await first.scan()
    await stalled.wait()
    await first.aclose()  # the server stopped mid-delivery
    receiver = Receiver()
    second = notifier(platform, receiver)
    await asyncio.to_thread(second._resume_unfinished)
    await second.scan()
    await second.wait_idle()
    assert len(receiver.requests) == 1 and second.deliveries()[0]["status"] == "sent"


async def test_a_webhook_url_can_live_in_the_vault_and_every_hook_gets_one_post(platform: Platform) -> None:
    platform.vault.set("slack_hook", "https://hooks.example/secret-path")
    await pending(platform)
    receiver = Receiver()
    notify = notifier(platform, receiver, webhooks=(HOOK, "secret://slack_hook"))
    await notify.scan()
    await notify.wait_idle()
    assert sorted(str(r.url) for r in receiver.requests) == sorted([HOOK, "https://hooks.example/secret-path"])
    assert "secret-path" not in json.dumps(notify.deliveries())


async def test_the_run_loop_wakes_on_a_new_approval_and_never_blocks_the_gateway(platform: Platform) -> None:
    receiver = Receiver()
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        arrived.set()
        await release.wait()  # a webhook that does not answer
        return receiver(request)

    notify = ApprovalNotifier(platform, NotificationsConfig(webhooks=(HOOK,), poll_s=3600),
                              base_url="https://sw.example", transport=httpx.MockTransport(slow))
    loop = asyncio.create_task(notify.run())
    await asyncio.sleep(0.05)
    await pending(platform)
    notify.wake()  # what the dashboard's live feed does on a "waiting_approval" event (poll_s is an hour)
    await asyncio.wait_for(arrived.wait(), 30)
    # while the webhook hangs, the gateway runs other agents to the end
    other = await asyncio.wait_for(platform.runner.start("web-reader", "read"), 30)
    assert other.status.value == "completed"
    release.set()
    for _ in range(500):
        if receiver.requests:
            break
        await asyncio.sleep(0.02)
    assert len(receiver.requests) == 1
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)


async def test_real_http_delivery_to_a_local_receiver(platform: Platform) -> None:
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        await pending(platform)
        url = f"http://127.0.0.1:{http.server_address[1]}/hook"
        notify = ApprovalNotifier(platform, NotificationsConfig(webhooks=(url,)), base_url="http://127.0.0.1:8470")
        await notify.scan()
        await notify.wait_idle()
        await notify.aclose()
    finally:
        http.shutdown()
    ((headers, body),) = got
    assert verify_signature(KEY.encode(), body, headers["x-stitchwork-signature"])


def test_untrusted_text_cannot_mention_everyone_or_forge_links() -> None:
    approval = {"id": "apv_1", "agent": "a", "tool": "t<!channel>", "run_id": "r", "policy_ids": ["p"],
                "reason": "<https://evil.example|click> @here", "arguments": {"x": "<!everyone> & `code`"}}
    body = payload(approval, "https://sw.example/ui/approvals/apv_1")
    sent = json.dumps([body["text"], body["blocks"]])  # what Slack renders (``stitchwork`` is data, not mrkdwn)
    assert "<!channel>" not in sent and "<!everyone>" not in sent and "<https://evil.example" not in sent
    assert "&lt;!channel&gt;" in sent
    assert slack_escape("a" * 900, 10) == "a" * 10 + "…"


def test_signatures_expire_and_reject_garbage() -> None:
    header = sign(b"k", b"{}", 1_000)
    assert verify_signature(b"k", b"{}", header, now=1_100)
    assert not verify_signature(b"k", b"{}", header, now=2_000)
    for bad in ("", "t=abc,v1=00", "v1=00", "t=1000", "garbage"):
        assert not verify_signature(b"k", b"{}", bad, now=1_000)


@pytest.mark.parametrize("settings", [
    {"webhooks": ("ftp://x",)}, {"webhooks": ("javascript:alert(1)",)}, {"webhooks": (HOOK,), "retries": -1},
    {"webhooks": (HOOK,), "timeout_s": 0}, {"webhooks": (HOOK,), "poll_s": 0},
])
async def test_bad_settings_are_config_errors(platform: Platform, settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ApprovalNotifier(platform, replace(NotificationsConfig(), **settings), base_url="http://x")


def test_stitchwork_up_posts_pending_approvals_from_its_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from stitchwork.interfaces.http.app import create_app
    from stitchwork.service import Service

    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    hook = f"http://127.0.0.1:{http.server_address[1]}/slack"
    config = load_config(build(tmp_path, extra_toml=f'[notifications]\nwebhooks = ["{hook}"]\npoll_s = 3600\n'
                               '[dashboard]\npublic_url = "https://sw.example"\n'), environ={})
    platform = Platform.open(config, role="server")
    try:
        platform.vault.set("notifications_hmac", KEY)
        service = Service(platform)
        token = service.create_operator_token()
        with TestClient(create_app(service, expiry_interval_s=3600)) as client:
            run = client.post("/v1/runs", json={"agent": "janitor", "task": "x", "wait": True},
                              headers={"Authorization": f"Bearer {token}"}).json()
            (approval_id,) = run["pending_approvals"]
            for _ in range(500):  # woken by the run's "waiting_approval" event (the poll is an hour)
                if got:
                    break
                threading.Event().wait(0.02)
        ((headers, body),) = got
        assert verify_signature(KEY.encode(), body, headers["x-stitchwork-signature"])
        assert json.loads(body)["stitchwork"]["url"] == f"https://sw.example/ui/approvals/{approval_id}"
    finally:
        http.shutdown()
        asyncio.run(platform.aclose())
