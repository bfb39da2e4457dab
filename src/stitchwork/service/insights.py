"""What the dashboard's audit and platform pages show: the chain's head and the last verification, the five
reports with the series their charts draw, policy packs with how often each rule fired, sandbox backends,
model deployments with health and budgets, memory grants."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stitchwork.audit.activity import denials_over_time, refresh_activity, rule_hits, usage_by_agent_model
from stitchwork.audit.reports import REPORTS
from stitchwork.errors import StitchworkError
from stitchwork.isolation.availability import backend_status
from stitchwork.security.policy import builtin_policy_dir
from stitchwork.service import audit as audit_ops
from stitchwork.service import memory as memory_ops

if TYPE_CHECKING:
    from stitchwork.platform import Platform

__all__ = ["HUMAN_REFUSAL", "ChainCheck", "audit_overview", "chain_head", "platform_overview"]

HUMAN_REFUSAL = "approval:* (a human denied the call, or its approval expired)"


@dataclass(frozen=True)
class ChainCheck:
    """The outcome of one ``audit verify`` (kept by the server: verifying millions of events takes seconds)."""

    ok: bool
    events: int
    first_bad_seq: int | None
    reason: str
    head_seq: int
    head_signed: bool
    checked_at: float
    seconds: float


class ChainChecker:
    """Runs ``audit verify`` one at a time and remembers the newest outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last: ChainCheck | None = None
        self.running = False

    def verify(self, platform: Platform) -> ChainCheck:
        """Verifies now (waits for a verification already running rather than starting a second)."""
        with self._lock:
            self.running = True
            started = time.perf_counter()
            try:
                report = audit_ops.verify(platform)
                self.last = ChainCheck(report.ok, report.events, report.first_bad_seq, report.reason,
                                       report.head_seq, report.head_signed, time.time(),
                                       round(time.perf_counter() - started, 3))
            except StitchworkError as exc:  # the store failed: say so rather than report a verdict
                self.last = ChainCheck(False, 0, None, f"verification could not run: {exc}", 0, False, time.time(),
                                       round(time.perf_counter() - started, 3))
            finally:
                self.running = False
            return self.last


def chain_head(platform: Platform) -> dict[str, Any]:
    """The newest event and the signed heads (cheap: no verification)."""
    platform.audit.flush()
    head = platform.store.query("SELECT max(seq) AS seq, max(ts) AS ts FROM audit_events")
    heads = platform.store.query("SELECT key_id, seq, ts FROM audit_heads ORDER BY seq DESC LIMIT 5")
    row = head[0] if head else {}
    return {"seq": int(row.get("seq") or 0), "ts": row.get("ts"), "signed_heads": heads}


def audit_overview(platform: Platform, *, since: float | None = None, until: float | None = None,
                   buckets: int = 24) -> dict[str, Any]:
    """The five reports (rows), the denial series over [since, until) and cost by agent and model."""
    now = time.time()
    end = until if until is not None else now
    start = since if since is not None else end - 7 * 86400.0
    reports: dict[str, Any] = {}
    for name, spec in REPORTS.items():
        try:
            rows = audit_ops.report(platform, name, since, until)
        except StitchworkError as exc:
            rows = []
            reports[name] = {"title": spec.title, "rows": rows, "error": str(exc)}
            continue
        reports[name] = {"title": spec.title, "rows": rows, "error": ""}
    refresh_activity(platform.store)
    return {
        "reports": reports,
        "denials": denials_over_time(platform.store, since=start, until=end, buckets=buckets),
        "window": (start, end),
        "cost": platform.gateway.redactor.redact(usage_by_agent_model(platform.store)),
    }


def _packs(platform: Platform) -> list[dict[str, Any]]:
    hits: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    last: dict[str, float] = {}
    refresh_activity(platform.store)
    for row in rule_hits(platform.store):
        # a call refused because a human denied (or let expire) its approval names that approval: one line for all
        rule = HUMAN_REFUSAL if str(row["rule"]).startswith("approval:") else str(row["rule"])
        hits[rule][row["decision"]] += int(row["hits"])
        last[rule] = max(last.get(rule, 0.0), float(row["last_ts"] or 0.0))
    packs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    builtin = builtin_policy_dir().resolve()
    for policy in platform.policy.describe():
        folder = Path(policy["path"]).resolve().parent if policy["path"] else builtin
        directory = f"built-in pack ({folder})" if folder == builtin else str(folder)
        packs[directory].append({**policy, "hits": dict(hits.get(policy["id"], {})),
                                 "total": sum(hits.get(policy["id"], {}).values()), "last_ts": last.get(policy["id"])})
    known = {p["id"] for rows in packs.values() for p in rows}
    other = [{"id": rule, "hits": dict(counts), "total": sum(counts.values()), "last_ts": last.get(rule)}
             for rule, counts in hits.items() if rule not in known]
    out = [{"pack": name, "policies": rows} for name, rows in packs.items()]
    if other:
        out.append({"pack": "decided outside the packs (gateway checks, human refusals, rules no longer loaded)",
                    "policies": other})
    return out


_BACKENDS: list[tuple[str, bool, str]] = []


def sandbox_backends(*, refresh: bool = False) -> list[dict[str, Any]]:
    """``stitchwork doctor``'s table: each backend, whether this host runs it, and why not (probed once)."""
    if refresh or not _BACKENDS:
        _BACKENDS[:] = backend_status()
    return [{"backend": f"{name}://", "usable": ok, "reason": reason} for name, ok, reason in _BACKENDS]


def _models(platform: Platform) -> dict[str, Any]:
    config = platform.config.compute
    gateway = platform.gateway.models
    out: dict[str, Any] = {"strategy": config.strategy, "deployments": [], "usage": [], "budgets": [],
                           "default_model": config.default_model}
    if gateway is not None:
        out["deployments"] = platform.gateway.redactor.redact(gateway.router.state())
        out["usage"] = [{"agent": agent, "calls": m.calls, "prompt_tokens": m.prompt_tokens,
                         "completion_tokens": m.completion_tokens, "cost_usd": m.cost_usd}
                        for agent, m in sorted(gateway.meters.items())]
    for agent, limits in sorted(config.agents.items()):
        models = ", ".join(map(str, limits.get("models") or [])) or "any"
        out["budgets"].append({"agent": agent, "models": models, "max_tokens": limits.get("max_tokens", 0),
                               "max_cost_usd": limits.get("max_cost_usd", 0)})
    return out


def platform_overview(platform: Platform) -> dict[str, Any]:
    """Policy packs with rule hits, sandbox backends, model deployments and budgets, memory grants, tools."""
    try:
        grants = memory_ops.grants(platform)
    except StitchworkError:
        grants = []
    tools = [{"name": t.name, "side_effect": t.side_effect.value, "sandbox": t.sandbox or
              (f"host:{t.host}" if t.host else platform.config.isolation.default), "secrets": ", ".join(t.secrets)}
             for t in sorted(platform.tools, key=lambda t: t.name)]
    return {
        "packs": _packs(platform),
        "sandboxes": sandbox_backends(),
        "default_sandbox": platform.config.isolation.default,
        "limits": asdict(platform.config.isolation.limits),
        "models": _models(platform),
        "grants": grants,
        "tools": tools,
        "agents": [{"name": a.name, "model": a.model, "tools": ", ".join(a.tools), "max_steps": a.max_steps}
                   for a in platform.agents],
    }
