"""A small world for attack variations: real manifests (classified by the general rule), the real taint stage and the
default policy pack through the real Cedar engine. No sandbox and no AgentDojo: decisions only, so the suite is fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stitchwork.gateway.stages import Taint, Tainted, policy_context
from stitchwork.security.policy import Decision, Effect, PolicyEngine, Request, ToolAction, builtin_policy_dir
from stitchwork.security.taint import Label, ProvenanceTracker
from stitchwork.tools.classify import classify
from stitchwork.tools.manifest import SideEffect, ToolManifest

AGENT = "assistant"
USER = Label("user", True)
MAIL = Label("tool:read_inbox", False)
WEB = Label("tool:fetch_url", False)
ISSUE = Label("tool:get_issue", False)
PROFILE = Label("tool:get_user_profile", False, "confidential")
RELAY = Label("agent:spiffe://stitchwork.test/agent/researcher", False)


def _schema(*names: str, lists: tuple[str, ...] = ()) -> dict[str, Any]:
    props: dict[str, Any] = {n: {"type": "string"} for n in names}
    for n in lists:
        props[n] = {"type": "array", "items": {"type": "string"}}
    return {"type": "object", "properties": props}


def _tool(name: str, schema: dict[str, Any], **overrides: Any) -> ToolManifest:
    found = classify(name, schema)
    fields: dict[str, Any] = {
        "name": name, "description": name, "side_effect": SideEffect(found.side_effect), "entry_file": Path(__file__),
        "entry_function": name, "args_schema": schema, "target": found.target,
        "confidential": found.confidential,
    }
    fields.update(overrides)
    return ToolManifest(**fields)


TOOLS = {t.name: t for t in (
    _tool("send_email", _schema("to", "subject", "body", lists=("cc", "bcc"))),
    _tool("fetch_url", _schema("url")),
    _tool("send_direct_message", _schema("recipient", "body")),
    _tool("create_calendar_event", _schema("title", "start", lists=("participants",))),
    _tool("create_mail_rule", _schema("name", "forward_to")),
    _tool("add_webhook", _schema("event", "webhook_url")),
    _tool("git_push", _schema("remote", "branch")),
    _tool("run_shell", _schema("command")),
    _tool("run_python", _schema("code")),
    _tool("send_money", _schema("iban", "amount", "subject")),
    _tool("write_note", _schema("path", "content")),
    _tool("send_message", _schema("to", "body")),
    _tool("get_user_profile", _schema()),
    _tool("invite_user", _schema("user", "user_email")),
    _tool("add_user_to_channel", _schema("channel", "user")),
    _tool("send_channel_message", _schema("channel", "body")),
    _tool("pay_bill", _schema("iban", "amount", "subject")),
    _tool("reserve_hotel", _schema("hotel", "start_day", "end_day")),
    _tool("delete_file", _schema("file_id")),
)}


@dataclass
class World:
    """One run: what the user asked, what the run read, and the decisions of the default pack on its calls."""

    engine: PolicyEngine
    tracker: ProvenanceTracker = field(default_factory=ProvenanceTracker)

    def read(self, content: str | dict[str, Any] | list[Any], label: Label) -> World:
        self.tracker.add(content if isinstance(content, str) else json.dumps(content), label)
        return self

    def taint(self, tool: str, args: dict[str, Any]) -> Tainted:
        call = SimpleNamespace(tool=TOOLS[tool], args=args, run=SimpleNamespace(tracker=self.tracker))
        return Taint()(call)  # type: ignore[arg-type]

    def decide(self, tool: str, args: dict[str, Any], *, approved: bool = False) -> Decision:
        tainted = self.taint(tool, args)
        manifest = TOOLS[tool]
        context = policy_context(side_effect=manifest.side_effect.value, args=args, approved=approved,
                                 taint=tainted.record, steps=1, max_steps=50)
        return self.engine.decide(Request(agent=AGENT, tool=tool, target=tainted.target, context=context))

    def outcome(self, tool: str, args: dict[str, Any]) -> str:
        """``runs`` (allowed, or allowed once a human approves), ``held`` (waits for a human) or ``refused``.

        An irreversible call always waits for a human; it is ``runs`` when nothing in it is tainted or
        confidential (the human approves a clean call), ``held`` when the human is shown taint or secrecy.
        """
        decision = self.decide(tool, args)
        if decision.effect is Effect.DENY:
            return "refused"
        if decision.effect is Effect.ALLOW:
            return "runs"
        record = self.taint(tool, args).record
        flagged = record["any"] or record["confidential"]
        if decision.policy_ids == ("irreversible-approval",) and not flagged:
            return "runs"
        return "held"


def engine() -> PolicyEngine:
    tools = [ToolAction(t.name, t.side_effect.value, t.args_schema) for t in TOOLS.values()]
    return PolicyEngine.load([builtin_policy_dir()], tools, agents=[AGENT])
