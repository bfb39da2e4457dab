"""The dashboard in a real browser: Playwright driving Debian's chromium against `stitchwork up`.

Needs ``pip install 'playwright==1.65.*'`` and ``apt-get install -y chromium`` (Playwright cannot download its own
browser here; it is pointed at ``/usr/bin/chromium``, or ``$STITCHWORK_CHROMIUM``). Skipped with the reason when
either is missing. ``STITCHWORK_SCREENSHOTS=DIR`` saves a screenshot of each page into DIR, and
``STITCHWORK_TEST_SANDBOX`` picks the tools' sandbox (default ``inline://``, the fast test double). The README's
screenshots are made with ``STITCHWORK_SCREENSHOTS=docs/dashboard STITCHWORK_TEST_SANDBOX=wasm://``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interfaces.dashboard_fixtures import Server, build, start

CHROMIUM = os.environ.get("STITCHWORK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
TASK = "Summarise my inbox and email the summary to me at alice@example.com."


def _missing() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install 'playwright==1.65.*')"
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).exists()):
        return f"no chromium at {CHROMIUM} (apt-get install -y chromium, or set STITCHWORK_CHROMIUM)"
    return ""


pytestmark = [pytest.mark.skipif(bool(_missing()), reason=_missing() or "browser available"), pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("dashboard")
    running = start(build(root, sandbox=os.environ.get("STITCHWORK_TEST_SANDBOX", "inline://")), root)
    try:
        status, _ = running.api("PUT", "/v1/secrets/crm_api_key", {"value": "crm_live_0123456789abcdef"})
        assert status == 204
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Watch:
    """Every dialog, page error and console message of one page: evidence that no injected script ran."""

    def __init__(self, page: Any) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.console: list[str] = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.console.append(m.text))


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(20_000)
    opened.watch = Watch(opened)
    try:
        yield opened
    finally:
        context.close()


def sign_in(page: Any, server: Server, token: str | None = None) -> None:
    page.goto(server.url + "/ui/")
    page.wait_for_selector("#login-form")
    page.fill("#token", token if token is not None else server.token)
    page.click("#login-form button[type=submit]")


def shot(page: Any, name: str) -> None:
    target = os.environ.get("STITCHWORK_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)


def test_sign_in_with_the_operator_token(page: Any, server: Server) -> None:
    page.goto(server.url + "/ui/approvals")
    assert "/ui/login" in page.url
    shot(page, "login")
    page.fill("#token", server.token)
    page.click("#login-form button[type=submit]")
    page.wait_for_url("**/ui/approvals")
    assert page.locator("h1").inner_text() == "Approvals"
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["sw_session"]["httpOnly"] and cookies["sw_session"]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie").find("sw_session") == -1  # invisible to scripts
    page.click("header form.logout button")
    page.wait_for_url("**/ui/login")
    page.goto(server.url + "/ui/runs")
    assert "/ui/login" in page.url


def test_a_wrong_token_cannot_sign_in(page: Any, server: Server) -> None:
    sign_in(page, server, token=server.token[:-3] + "abc")
    page.wait_for_selector("#login-error")
    assert "not a valid operator token" in page.inner_text("#login-error")
    assert "sw_session" not in {c["name"] for c in page.context.cookies()}
    page.goto(server.url + "/ui/runs")
    assert "/ui/login" in page.url


def test_the_demo_runs_timeline_shows_the_refused_call_with_policy_and_provenance(page: Any, server: Server) -> None:
    status, run = server.api("POST", "/v1/runs", {"agent": "inbox-assistant", "task": TASK, "wait": True})
    assert status == 201 and run["status"] == "completed"
    sign_in(page, server)
    page.wait_for_url("**/ui/runs")
    page.click(f'tr[data-run="{run["id"]}"] a')
    page.wait_for_selector("#timeline")
    refused = page.locator('#timeline tr[data-tool="send_email"][data-decision="deny"]')
    assert refused.count() == 1
    text = refused.inner_text()
    assert "external-tainted-target" in text
    assert "security-audit@evil.example" in text and "from tool:read_email" in text
    sent = page.locator('#timeline tr[data-tool="send_email"][data-decision="allow"]').inner_text()
    assert "alice@example.com" in sent and "not from untrusted content" in sent
    assert "crm_live_0123456789abcdef" not in page.content()
    shot(page, "run")
    page.goto(server.url + "/ui/runs")
    shot(page, "runs")


def _pending_card(page: Any, server: Server) -> tuple[str, str]:
    """Opens the inbox, starts a run that needs a human, and waits for its card to appear without a reload."""
    sign_in(page, server)
    page.wait_for_url("**/ui/runs")
    page.goto(server.url + "/ui/approvals")
    page.wait_for_selector("#live-status:text('live')")
    page.evaluate("window.__sameDocument = true")
    before = page.locator("article.approval").count()
    status, run = server.api("POST", "/v1/runs", {"agent": "janitor", "task": "clean up", "wait": False})
    assert status == 201
    server.wait_run(run["id"], {"waiting_approval"})
    card = page.locator("article.approval").nth(before)
    card.wait_for()
    assert page.evaluate("window.__sameDocument") is True  # appeared live: the page was not reloaded
    approval_id = card.get_attribute("data-approval")
    assert approval_id and "/srv/old-report.csv" in card.inner_text()
    assert "irreversible-approval" in card.inner_text()
    return run["id"], approval_id


def test_a_pending_approval_appears_live_is_approved_and_the_run_completes(page: Any, server: Server) -> None:
    run_id, approval_id = _pending_card(page, server)
    shot(page, "approvals")
    card = page.locator(f'article.approval[data-approval="{approval_id}"]')
    card.locator("input[name=note]").fill("old report, fine to delete")
    card.locator("button[value=approve]").click()
    page.wait_for_selector("#flash")
    assert f"Approval {approval_id} approved" in page.inner_text("#flash")
    # the run resumes in the background; the inbox's history shows its state (kept current by the live feed)
    page.wait_for_selector(f'#approval-history tr[data-approval="{approval_id}"] .status:text("completed")')
    server.wait_run(run_id, {"completed"})
    page.goto(f"{server.url}/ui/runs/{run_id}")
    page.wait_for_selector("#run-status:text('completed')")
    timeline = page.inner_text("#timeline")
    assert "approved" in timeline and "old report, fine to delete" in timeline
    page.goto(server.url + "/ui/approvals")
    history = page.locator(f'#approval-history tr[data-approval="{approval_id}"]').inner_text()
    assert "used" in history or "approved" in history
    assert "completed" in history  # the run's state beside its approval


def test_deny_from_the_inbox(page: Any, server: Server) -> None:
    run_id, approval_id = _pending_card(page, server)
    card = page.locator(f'article.approval[data-approval="{approval_id}"]')
    card.locator("input[name=note]").fill("keep it")
    card.locator("button[value=deny]").click()
    page.wait_for_selector("#flash")
    assert "denied" in page.inner_text("#flash")
    run = server.wait_run(run_id, {"completed"})
    assert any(m.get("role") == "tool" and "denied" in m["content"] for m in run["messages"])
    history = page.locator(f'#approval-history tr[data-approval="{approval_id}"]').inner_text()
    assert "denied" in history and "keep it" in history


def test_a_running_runs_status_changes_on_the_list_without_a_reload(page: Any, server: Server) -> None:
    sign_in(page, server)
    page.wait_for_url("**/ui/runs")
    page.wait_for_selector("#live-status:text('live')")
    page.evaluate("window.__sameDocument = true")
    status, run = server.api("POST", "/v1/runs", {"agent": "web-reader", "task": "read", "wait": False})
    assert status == 201
    page.wait_for_selector(f'tr[data-run="{run["id"]}"] .status:text("completed")')
    assert page.evaluate("window.__sameDocument") is True


def test_hostile_output_is_shown_inert(page: Any, server: Server) -> None:
    status, run = server.api("POST", "/v1/runs", {"agent": "web-reader", "task": "read the report", "wait": True})
    assert status == 201 and run["status"] == "completed"
    sign_in(page, server)
    page.wait_for_url("**/ui/runs")
    page.goto(f"{server.url}/ui/runs/{run['id']}")
    page.wait_for_selector("#conversation")
    text = page.inner_text("main")
    assert '<script>window.__pwned = "script"' in text  # the markup is there, as text
    assert "<img src=\"x\" onerror=" in text and "javascript:window.__pwned" in text
    # ... and none of it became an element or ran
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main script, main img, main a#evil, main svg[onload], [onerror], [onload]").count() == 0
    assert page.locator('a[href^="javascript:"]').count() == 0
    page.get_by_text("click me").first.click()  # clicking the text of the link does nothing either
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    # the live refresh swaps in fresh server-rendered parts: still inert
    page.evaluate("document.querySelector('#run-live').setAttribute('data-marker', '1')")
    server.api("POST", "/v1/runs", {"agent": "janitor", "task": "x", "wait": False})
    page.wait_for_timeout(1500)
    assert page.evaluate("window.__pwned") is None
    assert page.watch.dialogs == [] and page.watch.errors == []
    page.goto(server.url + "/ui/audit?agent=web-reader")
    assert page.evaluate("window.__pwned") is None and page.watch.dialogs == []


def test_a_change_without_the_csrf_token_is_refused(page: Any, server: Server) -> None:
    sign_in(page, server)
    page.wait_for_url("**/ui/runs")
    status, run = server.api("POST", "/v1/runs", {"agent": "janitor", "task": "clean", "wait": True})
    (approval_id,) = run["pending_approvals"]
    forged = page.request.post(f"{server.url}/ui/approvals/{approval_id}/decide",
                               form={"decision": "approve", "note": "no token"}, max_redirects=0)
    assert forged.status == 403
    stale = page.request.post(f"{server.url}/ui/approvals/{approval_id}/decide",
                              form={"decision": "approve", "csrf": "stale"}, max_redirects=0)
    assert stale.status == 403
    _, pending = server.api("GET", "/v1/approvals")
    assert approval_id in [a["id"] for a in pending]
    # a form on another site posting here: the Strict cookie is not sent, so it lands on the sign-in page
    page.set_content(f'<form id="f" method="post" action="{server.url}/ui/approvals/{approval_id}/decide">'
                     '<input name="decision" value="approve"></form>')
    page.evaluate("document.getElementById('f').submit()")
    page.wait_for_load_state()
    _, pending = server.api("GET", "/v1/approvals")
    assert approval_id in [a["id"] for a in pending]
    status, _ = server.api("POST", f"/v1/approvals/{approval_id}/deny", {"note": "cleanup"})
    assert status == 200


def test_screens_of_the_audit_and_platform_pages(page: Any, server: Server) -> None:
    server.api("POST", "/v1/runs", {"agent": "inbox-assistant", "task": TASK, "wait": True})
    sign_in(page, server)
    page.wait_for_url("**/ui/runs")
    page.goto(server.url + "/ui/audit")
    page.click("#chain button[type=submit]")
    page.wait_for_selector("#verify-result")
    for _ in range(50):
        if "Verified" in page.inner_text("#verify-result"):
            break
        page.wait_for_timeout(200)
        page.reload()
    assert "Verified" in page.inner_text("#verify-result")
    assert page.locator("svg.chart").count() >= 7
    shot(page, "audit")
    page.goto(server.url + "/ui/platform")
    assert "external-tainted-target" in page.inner_text("#policies")
    assert page.locator("#sandboxes tr").count() >= 6
    shot(page, "platform")
    assert page.watch.errors == []


def test_live_updates_over_the_embedded_nats_bus(browser: Any, tmp_path: Path) -> None:
    from tests.conftest import nats_available

    if why := nats_available():
        pytest.skip(why)
    nats = start(build(tmp_path, bus="nats://embedded"), tmp_path)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        sign_in(page, nats)
        page.wait_for_url("**/ui/runs")
        page.wait_for_selector("#live-status:text('live')")
        page.evaluate("window.__sameDocument = true")
        status, run = nats.api("POST", "/v1/runs", {"agent": "janitor", "task": "clean", "wait": False})
        assert status == 201
        page.wait_for_selector(f'tr[data-run="{run["id"]}"] .status:text("waiting_approval")')
        assert page.evaluate("window.__sameDocument") is True
    finally:
        context.close()
        nats.stop()
