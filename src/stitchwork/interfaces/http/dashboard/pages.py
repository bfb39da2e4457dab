"""The dashboard's pages: runs, a run, approvals (inbox, one approval, decide), audit (search, verify,
reports), platform. Every handler reads through :mod:`stitchwork.service.dashboard` and
:mod:`stitchwork.service.insights` in a worker thread, so a slow query never stalls the gateway's event loop."""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import hmac
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

import stitchwork.interfaces.http.dashboard.charts as charts
from stitchwork.agents.runs import RunStatus
from stitchwork.errors import ApprovalError, RunError, StitchworkError, StoreError, UnknownAgent
from stitchwork.interfaces.http.dashboard.render import SECURITY_HEADERS, page, safe_next
from stitchwork.interfaces.http.dashboard.sessions import Session, SessionStore
from stitchwork.service import dashboard as views
from stitchwork.service import insights
from stitchwork.service.undo import describe, recorded_states

if TYPE_CHECKING:
    from fastapi import FastAPI

    from stitchwork.interfaces.http.dashboard.board import Dashboard

__all__ = ["operator_token_id", "refused", "register"]

PREFIX = "/ui"
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_STATUS = {RunError: 404, UnknownAgent: 404, ApprovalError: 409, StoreError: 400}
NO_USAGE = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?$")


def operator_token_id(board: Dashboard, token: str) -> str | None:
    """The id of the live operator token ``token``, or None (compared by SHA-256 in constant time)."""
    digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
    found = None
    for row in board.platform.store.query("SELECT id, token_sha256 FROM operator_tokens WHERE NOT revoked"):
        if hmac.compare_digest(digest, row["token_sha256"]):
            found = str(row["id"])
    return found


def _context(board: Dashboard, session: Session, nav: str, **values: Any) -> dict[str, Any]:
    pending = board.platform.store.query("SELECT count(*) AS n FROM approvals WHERE status = 'pending'")
    return {"session": session, "nav": nav, "pending_count": int(pending[0]["n"]) if pending else 0, **values}


def refused(board: Dashboard, session: Session | None, message: str, *, status: int = 403) -> Response:
    """An error page (the message is text)."""
    return page("error.html", {"session": session, "nav": "", "pending_count": 0, "message": message,
                               "status": status}, status=status)


def parse_time(text: str) -> float | None:
    """``YYYY-MM-DD[THH:MM[:SS]]`` (UTC) or Unix seconds, as Unix seconds.

    Raises:
        ValueError: neither form, or out of range.
    """
    text = text.strip()
    if not text:
        return None
    match = _TIME.match(text)
    if match:
        parts = [int(p) if p else 0 for p in match.groups()]
        stamp = float(calendar.timegm((*parts[:6], 0, 0, 0)))
        time.gmtime(stamp)  # range check
        return stamp
    value = float(text)
    if not math.isfinite(value) or not 0 <= value < 1e11:
        raise ValueError(text)
    return value


Body = Callable[[Session], Awaitable[Response]]


def register(app: FastAPI, board: Dashboard) -> None:
    """Adds the pages to ``app``."""
    platform = board.platform

    async def guarded(request: Request, body: Body) -> Response:
        session = await board.session(request)
        if session is None:
            return board.to_login(request)
        try:
            return await body(session)
        except StitchworkError as exc:
            status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
            return refused(board, session, platform.gateway.redactor.redact_text(str(exc)), status=status)

    async def checked(request: Request, session: Session) -> dict[str, str] | Response:
        from stitchwork.interfaces.http.dashboard.board import FormError

        try:
            fields = await board.form(request)
        except FormError as exc:
            return refused(board, session, str(exc), status=400)
        if not board.same_site(request) or not SessionStore.csrf_ok(session, fields.get("csrf", "")):
            await platform.audit.aappend("auth", tool=request.url.path, decision="deny",
                                         data={"error": "csrf", "reason": "dashboard change without a valid "
                                               "CSRF token or from another site"})
            return refused(board, session, "This change was refused: its form token is missing or stale "
                           "(reload the page and try again).")
        return fields

    # -- runs ------------------------------------------------------------------------------------------------

    @app.get(PREFIX + "/runs", include_in_schema=False)
    async def runs(request: Request, status: str = "", agent: str = "", cursor: str = "",
                   fragment: str = "") -> Response:
        async def body(session: Session) -> Response:
            chosen = status if status in {s.value for s in RunStatus} else ""
            listed = await asyncio.to_thread(views.runs_page, platform, status=chosen, agent=agent[:128],
                                             cursor=cursor)
            filters = {"status": chosen, "agent": agent[:128]}
            context = await asyncio.to_thread(
                _context, board, session, "runs", listed=listed, filters=filters, cursor=cursor,
                statuses=[s.value for s in RunStatus], agents=platform.agents.names())
            return page("runs_table.html" if fragment else "runs.html", context)
        return await guarded(request, body)

    @app.get(PREFIX + "/runs/{run_id}", include_in_schema=False)
    async def run(request: Request, run_id: str, after: str = "", fragment: str = "") -> Response:
        async def body(session: Session) -> Response:
            if not _ID.match(run_id):
                raise RunError(f"no run with id {run_id!r}")
            start = int(after) if after.isdigit() else 0
            context = await asyncio.to_thread(_run_context, board, session, run_id, start)
            if context is None:
                context = await _worker_run(board, session, run_id)
            return page("run_live.html" if fragment else "run.html", context)
        return await guarded(request, body)

    # -- approvals -------------------------------------------------------------------------------------------

    @app.get(PREFIX + "/approvals", include_in_schema=False)
    async def approvals(request: Request, cursor: str = "", fragment: str = "", decided: str = "",
                        verdict: str = "", conflict: str = "") -> Response:
        async def body(session: Session) -> Response:
            def gather() -> dict[str, Any]:
                pending = views.pending_approvals(platform)
                history = views.approvals_history(platform, cursor=cursor)
                statuses = _run_statuses(board, [a["run_id"] for a in history.rows])
                return _context(board, session, "approvals", pending=pending, history=history, cursor=cursor,
                                run_status=statuses, decided=decided if _ID.match(decided) else "",
                                verdict=verdict if verdict in {"approved", "denied"} else "",
                                conflict=conflict if _ID.match(conflict) else "")
            context = await asyncio.to_thread(gather)
            template = {"": "approvals.html", "history": "approvals_history.html"}.get(fragment,
                                                                                      "approvals_pending.html")
            return page(template, context)
        return await guarded(request, body)

    @app.get(PREFIX + "/approvals/{approval_id}", include_in_schema=False)
    async def approval(request: Request, approval_id: str) -> Response:
        async def body(session: Session) -> Response:
            if not _ID.match(approval_id):
                raise ApprovalError(f"no approval with id {approval_id!r}")

            def gather() -> dict[str, Any]:
                found = platform.gateway.redactor.redact(platform.approvals.get(approval_id).to_dict())
                provenance = views.approval_provenance(platform, [found]).get(approval_id)
                found["provenance"] = provenance
                found["arguments_shown"] = provenance["arguments"] if provenance else [
                    {"name": k, "value": views.pretty(v, 4000), "sources": [], "level": ""}
                    for k, v in (found["arguments"] or {}).items()]
                statuses = _run_statuses(board, [found["run_id"]])
                return _context(board, session, "approvals", approval=found, run_status=statuses)
            return page("approval.html", await asyncio.to_thread(gather))
        return await guarded(request, body)

    @app.post(PREFIX + "/approvals/{approval_id}/decide", include_in_schema=False)
    async def decide(request: Request, approval_id: str) -> Response:
        async def body(session: Session) -> Response:
            fields = await checked(request, session)
            if isinstance(fields, Response):
                return fields
            choice = fields.get("decision", "")
            if choice not in {"approve", "deny"}:
                return refused(board, session, "Choose approve or deny.", status=400)
            if not _ID.match(approval_id):
                raise ApprovalError(f"no approval with id {approval_id!r}")
            back = safe_next(fields.get("back", "") or f"{PREFIX}/approvals")
            back = back.split("?", 1)[0]
            try:
                decided = await board.service.decide(approval_id, approve=choice == "approve",
                                                     by=f"operator:dashboard:{session.token_id}",
                                                     note=fields.get("note", "")[:2000], resume=False)
            except ApprovalError:
                return RedirectResponse(f"{back}?conflict={quote(approval_id)}", status_code=303,
                                        headers=SECURITY_HEADERS)
            board.spawn(board.service.resume_if_ready(decided["run_id"]))
            return RedirectResponse(f"{back}?decided={quote(approval_id)}&verdict={decided['status']}",
                                    status_code=303, headers=SECURITY_HEADERS)
        return await guarded(request, body)

    # -- audit -----------------------------------------------------------------------------------------------

    @app.get(PREFIX + "/audit", include_in_schema=False)
    async def audit(request: Request, before: str = "") -> Response:
        params = request.query_params

        async def body(session: Session) -> Response:
            filters = {name: params.get(name, "")[:200] for name in views.AUDIT_FILTERS}
            problems = []
            window: dict[str, float | None] = {}
            for name in ("since", "until"):
                try:
                    window[name] = parse_time(params.get(name, ""))
                except (ValueError, OverflowError):
                    window[name] = None
                    problems.append(f"{name}: give YYYY-MM-DDTHH:MM (UTC) or Unix seconds")

            def gather() -> dict[str, Any]:
                found = views.audit_search(platform, filters, since=window["since"], until=window["until"],
                                           before=int(before) if before.isdigit() else None)
                overview = insights.audit_overview(platform, since=window["since"], until=window["until"])
                return _context(board, session, "audit", found=found, filters=filters, problems=problems,
                                raw={k: params.get(k, "")[:40] for k in ("since", "until")},
                                head=insights.chain_head(platform), check=board.chain.last,
                                verifying=board.chain.running, overview=overview, charts=_charts(overview))
            return page("audit.html", await asyncio.to_thread(gather))
        return await guarded(request, body)

    @app.post(PREFIX + "/audit/verify", include_in_schema=False)
    async def verify(request: Request) -> Response:
        async def body(session: Session) -> Response:
            fields = await checked(request, session)
            if isinstance(fields, Response):
                return fields
            if not board.chain.running:
                board.chain.running = True
                board.spawn(asyncio.to_thread(board.chain.verify, platform))
            return RedirectResponse(f"{PREFIX}/audit", status_code=303, headers=SECURITY_HEADERS)
        return await guarded(request, body)

    # -- platform --------------------------------------------------------------------------------------------

    @app.get(PREFIX + "/platform", include_in_schema=False)
    async def platform_page(request: Request) -> Response:
        async def body(session: Session) -> Response:
            def gather() -> dict[str, Any]:
                notifier = board.notifier
                webhooks = [_mask(u) for u in platform.config.notifications.webhooks]
                deliveries = notifier.deliveries() if notifier is not None else []
                return _context(board, session, "platform", info=insights.platform_overview(platform),
                                webhooks=webhooks, deliveries=deliveries,
                                signing_secret=platform.config.notifications.signing_secret,
                                signing_ready=platform.config.notifications.signing_secret in platform.vault.names())
            return page("platform.html", await asyncio.to_thread(gather))
        return await guarded(request, body)


def _mask(url: str) -> str:
    """A webhook as shown: ``secret://NAME`` as is, a URL as scheme and host (its path may hold a token)."""
    if url.startswith("secret://"):
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/…"


def _run_statuses(board: Dashboard, run_ids: list[str]) -> dict[str, str]:
    ids = sorted(set(run_ids))[:200]
    if not ids:
        return {}
    marks = ", ".join("?" for _ in ids)
    rows = board.platform.store.query(f"SELECT id, status FROM runs WHERE id IN ({marks})", ids)
    return {r["id"]: r["status"] for r in rows}


def _run_context(board: Dashboard, session: Session, run_id: str, after: int) -> dict[str, Any] | None:
    from stitchwork.audit.activity import refresh_activity, run_usage

    platform = board.platform
    record = platform.runs.fetch(run_id)
    if record is None:
        return None
    run = platform.gateway.redactor.redact(record.to_dict(messages=False))
    platform.audit.flush()  # the run's newest model events, still in the journal, count in its usage
    refresh_activity(platform.store)
    usage = run_usage(platform.store, [run_id]).get(run_id, NO_USAGE)
    pending = views.pending_approvals(platform, run_id)
    calls = [platform.gateway.redactor.redact(c) for c in describe(recorded_states(platform, run_id))]
    return _context(board, session, "runs", run=run, usage=usage, worker=False,
                    messages=views.conversation(platform, record.messages),
                    timeline=views.run_timeline(platform, run, after=after), pending=pending, after=after,
                    calls=calls)


async def _worker_run(board: Dashboard, session: Session, run_id: str) -> dict[str, Any]:
    """A run a worker drives (its checkpoint on the bus); its gateway decisions are in the worker's audit log."""
    from stitchwork.workers.events import EventHub
    from stitchwork.workers.queue import run_state

    hub = board.platform.events
    state = None
    if isinstance(hub, EventHub):
        try:
            state = await run_state(await hub.bus(), run_id, subjects=hub.subjects)
        except StitchworkError:
            state = None
    if state is None:
        raise RunError(f"no run with id {run_id!r}")
    platform = board.platform
    run = platform.gateway.redactor.redact({k: v for k, v in state.items() if k != "messages"})

    def rest() -> dict[str, Any]:
        return _context(board, session, "runs", run=run, usage=NO_USAGE, worker=True, pending=[], after=0,
                        messages=views.conversation(platform, state.get("messages") or []),
                        timeline=views.Page([]))
    return await asyncio.to_thread(rest)


def _charts(overview: Mapping[str, Any]) -> dict[str, Any]:
    reports = overview["reports"]
    tools: dict[str, dict[str, float]] = {}
    for row in reports["tools"]["rows"]:
        tools.setdefault(str(row["tool"]), {})[str(row["outcome"])] = float(row["calls"] or 0)
    outcomes = sorted({o for v in tools.values() for o in v})
    tool_rows = sorted(tools.items(), key=lambda kv: -sum(kv[1].values()))
    approvals = [(f"{r['agent']} · {r['tool']}", [r["approved"] or 0, r["denied"] or 0, r["expired"] or 0])
                 for r in reports["approvals"]["rows"]]
    return {
        "denials": charts.time_bars([(p["ts"], p["denied"]) for p in overview["denials"]],
                                    title="Denied calls over time"),
        "denied_rules": charts.bars([(f"{r['rule']} ({r['agent']})", r["denied"]) for r in reports["denied"]["rows"]],
                                    title="Denials by rule"),
        "tools": charts.stacked_bars([(t, [v.get(o, 0.0) for o in outcomes]) for t, v in tool_rows],
                                     title="Tool calls by outcome", series=outcomes,
                                     colors=[_TOOL_COLOURS.get(o, 0) for o in outcomes]),
        "approvals": charts.stacked_bars(approvals, title="Approvals by decision",
                                         series=["approved", "denied", "expired"], colors=[3, 1, 2]),
        "tokens": charts.stacked_bars(
            [(f"{r['agent']} · {r['model']}", [r["prompt_tokens"] or 0, r["completion_tokens"] or 0])
             for r in reports["tokens"]["rows"]], title="Tokens by agent and model", series=["prompt", "completion"]),
        "cost": charts.bars([(f"{r['agent']} · {r['model']}", r["cost_usd"] or 0) for r in overview["cost"]],
                            title="Cost by agent and model (USD)", unit=" USD"),
        "runs": charts.stacked_bars(_runs_series(reports["runs"]["rows"]), title="Runs by agent and outcome",
                                    series=[s.value for s in RunStatus], colors=_RUN_COLOURS),
    }


_TOOL_COLOURS = {"ok": 3, "error": 1, "deny": 5, "replayed": 2}
_RUN_COLOURS = [{"running": 0, "waiting_approval": 4, "completed": 3, "failed": 1, "budget_exhausted": 5,
                 "denied": 1, "timed_out": 2}.get(s.value, 2) for s in RunStatus]


def _runs_series(rows: list[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    agents: dict[str, dict[str, float]] = {}
    for row in rows:
        agents.setdefault(str(row["agent"]), {})[str(row["outcome"])] = float(row["runs"] or 0)
    return [(agent, [v.get(s.value, 0.0) for s in RunStatus]) for agent, v in sorted(agents.items())]
