"""Read models of the operator's dashboard: runs with their cost, a run's conversation and gateway timeline,
the approvals inbox with where risky values came from, and audit search.

Every list is bounded and paginated by a keyset cursor (no ``OFFSET``), every query filters on indexed or
zone-mapped columns (``seq``, ``ts``, ``created_at``), and secrets are redacted before anything leaves here.
What is shown is untrusted text (tool output, model text, arguments): the caller escapes it.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stitchwork.audit.activity import refresh_activity, run_usage
from stitchwork.errors import StitchworkError
from stitchwork.security.approvals import ApprovalStatus

if TYPE_CHECKING:
    from stitchwork.platform import Platform

__all__ = [
    "MAX_TEXT", "PAGE", "Page", "approval_provenance", "approvals_history", "audit_search", "clip", "decode_cursor",
    "pending_approvals", "run_timeline", "runs_page",
]

PAGE = 50
"""Rows per list page."""
MAX_TEXT = 20_000
"""Characters of one message or argument shown; the rest is cut with a note."""
TIMELINE_PAGE = 500
_RUN_COLUMNS = "id, agent, task, model, status, steps, error, created_at, updated_at"
_EVENT_COLUMNS = "seq, ts, kind, agent, run_id, tool, decision, data"
_FINISHED = ("completed", "failed", "budget_exhausted")
LATE_EVENTS_S = 600.0
"""Events of a finished run are looked for up to this long after its last checkpoint (an approval decided late)."""


@dataclass(frozen=True)
class Page:
    """One page of a list, newest first, and the cursor of the next (older) page, if any."""

    rows: list[dict[str, Any]]
    next_cursor: str = ""
    total: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… ({len(text) - limit:,} more characters not shown)"


def pretty(value: Any, limit: int = MAX_TEXT) -> str:
    """A JSON value as indented text for display (strings as they are)."""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return clip(text, limit)


def decode_cursor(cursor: str) -> tuple[float, str] | None:
    """A runs cursor ``<created_at>~<id>``; ``None`` when empty or malformed."""
    stamp, sep, run_id = cursor.partition("~")
    if not sep or not run_id or len(cursor) > 200:
        return None
    try:
        value = float(stamp)
    except ValueError:
        return None
    return (value, run_id) if math.isfinite(value) else None


def runs_page(platform: Platform, *, status: str = "", agent: str = "", cursor: str = "",
              limit: int = PAGE) -> Page:
    """Runs newest first, with model calls, tokens and cost from the audit log; filtered by status and agent."""
    where: list[str] = ["true"]
    params: list[Any] = []
    if status:
        where.append("status = ?")
        params.append(status)
    if agent:
        where.append("agent = ?")
        params.append(agent)
    count_sql = f"SELECT count(*) AS n FROM runs WHERE {' AND '.join(where)}"
    total = int(platform.store.query(count_sql, params)[0]["n"])
    position = decode_cursor(cursor)
    if position is not None:
        where.append("(created_at < ? OR (created_at = ? AND id < ?))")
        params += [position[0], position[0], position[1]]
    rows = platform.store.query(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?",
        [*params, limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    refresh_activity(platform.store)
    usage = run_usage(platform.store, [r["id"] for r in rows])
    redact = platform.gateway.redactor.redact
    out = []
    for row in rows:
        used = usage.get(row["id"], {})
        out.append(redact({**row, "task": clip(row["task"], 200), "error": clip(row["error"] or "", 400),
                           "model_calls": int(used.get("calls") or 0),
                           "tokens": int(used.get("prompt_tokens") or 0) + int(used.get("completion_tokens") or 0),
                           "cost_usd": float(used.get("cost_usd") or 0.0)}))
    last = rows[-1] if rows else None
    return Page(out, f"{last['created_at']!r}~{last['id']}" if more and last else "", total)


def conversation(platform: Platform, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A run's messages for display: role, text (cut), tool calls with their arguments, the tool answered."""
    shown = []
    for message in messages:
        calls = []
        for call in message.get("tool_calls") or ():
            function = call.get("function") or call
            arguments = function.get("arguments", "")
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            calls.append({"id": str(call.get("id", "")), "name": str(function.get("name", "")),
                          "arguments": pretty(arguments, 4000)})
        content = message.get("content")
        text = content if isinstance(content, str) else "" if content is None else pretty(content)
        if message.get("role") == "tool" and text.startswith("{"):
            with contextlib.suppress(ValueError, RecursionError):
                text = pretty(json.loads(text))
        shown.append({"role": str(message.get("role", "")), "name": str(message.get("name") or ""),
                      "text": clip(text), "tool_calls": calls, "tool_call_id": str(message.get("tool_call_id") or "")})
    redacted: list[dict[str, Any]] = platform.gateway.redactor.redact(shown)
    return redacted


def _provenance(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per argument, its untrusted sources and level; from the per-argument record, else the call's taint."""
    recorded = data.get("provenance")
    if isinstance(recorded, Mapping):
        return {str(k): dict(v) for k, v in recorded.items() if isinstance(v, Mapping)}
    taint = data.get("taint") or {}
    if not isinstance(taint, Mapping):
        return {}
    sources = [str(s) for s in taint.get("sources") or ()]
    return {str(a): {"sources": sources, "level": ""} for a in taint.get("args") or ()}


def _arguments(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    arguments = data.get("arguments")
    if not isinstance(arguments, Mapping):
        return []
    provenance = _provenance(data)
    return [{"name": str(name), "value": pretty(value, 4000),
             "sources": [str(s) for s in provenance.get(str(name), {}).get("sources", [])],
             "level": str(provenance.get(str(name), {}).get("level", ""))}
            for name, value in arguments.items()]


def _entry(event: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "seq": event["seq"], "ts": event["ts"], "kind": event["kind"], "tool": event["tool"],
        "decision": event["decision"], "policy_ids": [str(p) for p in data.get("policy_ids") or ()],
        "reasons": [str(r) for r in data.get("reasons") or ()], "reason": str(data.get("reason") or ""),
        "error": data.get("error"), "target": str(data.get("target") or ""), "arguments": _arguments(data),
        "approval_id": str(data.get("approval_id") or ""), "execution": None,
    }
    if event["kind"] == "model":
        entry["model"] = {k: data.get(k) for k in ("model", "deployment", "attempts", "prompt_tokens",
                                                    "completion_tokens", "cost_usd", "latency_ms", "stream")}
        entry["model"]["tool_calls"] = [str(c) for c in data.get("tool_calls") or ()]
    if event["kind"] == "tool":
        entry["execution"] = _execution(event, data)
    if event["kind"] == "approval":
        entry["note"] = str(data.get("note") or "")
        entry["by"] = str(data.get("by") or "")
    if event["kind"] == "secret":
        entry["secrets"] = [str(s) for s in data.get("secrets") or ()]
    return entry


def _execution(event: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    return {"seq": event["seq"], "outcome": event["decision"], "sandbox": str(data.get("sandbox") or
            (f"host:{data['host']}" if data.get("host") else "")), "duration_ms": data.get("duration_ms"),
            "exit_code": data.get("exit_code"), "killed": data.get("killed"), "label": str(data.get("label") or ""),
            "error": data.get("error"), "cpu_s": data.get("cpu_s"), "max_rss_kb": data.get("max_rss_kb")}


def _decode(row: Mapping[str, Any]) -> dict[str, Any]:
    try:
        data = json.loads(row["data"])
    except (TypeError, ValueError):
        data = {"unparsed": str(row["data"])[:2000]}
    return data if isinstance(data, dict) else {"value": data}


def run_timeline(platform: Platform, run: Mapping[str, Any], *, after: int = 0,
                 limit: int = TIMELINE_PAGE) -> Page:
    """Every gateway decision of a run in order: tool calls (decision, then execution, merged), approvals,
    secrets, model calls. Events are looked for between the run's creation and its last checkpoint (plus
    :data:`LATE_EVENTS_S` once finished), so the query reads only that slice of the log."""
    platform.audit.flush()
    where = "run_id = ? AND ts >= ? AND seq > ?"
    params: list[Any] = [run["id"], float(run["created_at"]) - 1.0, after]
    if run["status"] in _FINISHED:
        where += " AND ts <= ?"
        params.append(float(run["updated_at"]) + LATE_EVENTS_S)
    rows = platform.store.query(
        f"SELECT {_EVENT_COLUMNS} FROM audit_events WHERE {where} ORDER BY seq LIMIT ?", [*params, limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    entries: list[dict[str, Any]] = []
    waiting: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        data = platform.gateway.redactor.redact(_decode(row))
        if row["kind"] == "tool" and waiting.get(row["tool"]):
            waiting[row["tool"]].pop(0)["execution"] = _execution(row, data)
            continue
        entry = _entry(row, data)
        if row["kind"] == "decision" and row["decision"] == "allow":
            waiting.setdefault(row["tool"], []).append(entry)
        entries.append(entry)
    return Page(entries, str(rows[-1]["seq"]) if more and rows else "")


def approval_provenance(platform: Platform, approvals: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each approval, the audit event that requested it: the per-argument provenance and the taint record."""
    found: dict[str, dict[str, Any]] = {}
    if not approvals:
        return found
    platform.audit.flush()
    for approval in approvals:
        created = float(approval["created_at"])
        rows = platform.store.query(
            f"SELECT {_EVENT_COLUMNS} FROM audit_events WHERE kind = 'approval' AND decision = 'ask' AND run_id = ? "
            "AND ts >= ? AND ts <= ? ORDER BY seq LIMIT 50", [approval["run_id"], created - 5.0, created + 5.0])
        for row in rows:
            data = _decode(row)
            if data.get("approval_id") == approval["id"]:
                found[str(approval["id"])] = platform.gateway.redactor.redact({
                    "arguments": _arguments(data), "taint": data.get("taint") or {}, "seq": row["seq"],
                    "reasons": [str(r) for r in data.get("reasons") or ()]})
                break
    return found


def pending_approvals(platform: Platform, run_id: str = "") -> list[dict[str, Any]]:
    """Pending approvals (this platform's and durable runs'; of one run when given), oldest first, each with where
    its values came from."""
    pending = [platform.gateway.redactor.redact(a.to_dict())
               for a in platform.approvals.find(ApprovalStatus.PENDING) if not run_id or a.run_id == run_id]
    provenance = approval_provenance(platform, pending)
    for approval in pending:
        approval["provenance"] = provenance.get(approval["id"])
        approval["arguments_shown"] = (provenance[approval["id"]]["arguments"] if approval["id"] in provenance
                                       else [{"name": k, "value": pretty(v, 4000), "sources": [], "level": ""}
                                             for k, v in (approval["arguments"] or {}).items()])
    return pending


def approvals_history(platform: Platform, *, cursor: str = "", limit: int = PAGE) -> Page:
    """Decided, used and expired approvals, newest first (this platform's; durable runs' newest beside them)."""
    where: list[str] = ["status <> 'pending'"]
    params: list[Any] = []
    position = decode_cursor(cursor)
    if position is not None:
        where.append("(created_at < ? OR (created_at = ? AND id < ?))")
        params += [position[0], position[0], position[1]]
    rows = platform.store.query(
        "SELECT id, run_id, agent, tool, target, policy_ids, reason, status, created_at, decided_at, decided_by, "
        f"note FROM approvals WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?",
        [*params, limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    out = []
    for row in rows:
        try:
            ids = [str(p) for p in json.loads(row["policy_ids"])]
        except (TypeError, ValueError):
            ids = []
        out.append({**row, "policy_ids": ids})
    remote = getattr(platform.approvals, "remote", None)
    if remote is not None and not cursor:
        try:
            others = [a.to_dict() for a in remote.find(None) if a.status is not ApprovalStatus.PENDING]
        except StitchworkError:  # the bus being down must not hide the platform's own history
            others = []
        out = sorted(out + others[-limit:], key=lambda a: a["created_at"], reverse=True)
    last = rows[-1] if rows else None
    redacted: list[dict[str, Any]] = platform.gateway.redactor.redact(out)
    return Page(redacted, f"{last['created_at']!r}~{last['id']}" if more and last else "")


AUDIT_FILTERS = ("agent", "run_id", "tool", "decision", "kind")


def audit_search(platform: Platform, filters: Mapping[str, str], *, since: float | None = None,
                 until: float | None = None, before: int | None = None, limit: int = PAGE) -> Page:
    """Audit events matching every given filter, newest first, ``limit`` per page (keyset on ``seq``).

    Only the page's sequence numbers are found first; their rows (with the large ``data``) are read by ``seq``,
    which the log's insertion order keeps clustered.
    """
    platform.audit.flush()
    where: list[str] = ["true"]
    params: list[Any] = []
    for name in AUDIT_FILTERS:
        value = filters.get(name, "")
        if value:
            where.append(f"{name} = ?")
            params.append(value)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    if before is not None:
        where.append("seq < ?")
        params.append(before)
    seqs = [int(r["seq"]) for r in platform.store.query(
        f"SELECT seq FROM audit_events WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", [*params, limit + 1])]
    more = len(seqs) > limit
    seqs = seqs[:limit]
    if not seqs:
        return Page([])
    marks = ", ".join("?" for _ in seqs)
    rows = platform.store.query(
        f"SELECT {_EVENT_COLUMNS}, hash FROM audit_events WHERE seq >= ? AND seq <= ? AND seq IN ({marks}) "
        "ORDER BY seq DESC", [min(seqs), max(seqs), *seqs])
    out = []
    for row in rows:
        data = platform.gateway.redactor.redact(_decode(row))
        out.append({**{k: row[k] for k in ("seq", "ts", "kind", "agent", "run_id", "tool", "decision", "hash")},
                    "policy_ids": [str(p) for p in data.get("policy_ids") or ()] if isinstance(data, dict) else [],
                    "data": pretty(data, 4000)})
    return Page(out, str(seqs[-1]) if more else "")
