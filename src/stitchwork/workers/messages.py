"""Agent-to-agent messages through the gateway: signed envelopes, Cedar decides who may talk to whom.

An agent sends with its run token: the sender is the token's SPIFFE id (never a field the agent fills in). The
messaging policy (``workers/policies/*.cedar`` plus ``<policy_dir>/messaging/*.cedar`` of each configured policy
directory) decides ``send_message`` with the recipient as the resource and the run's taint of the recipient.
Allowed messages are signed by the platform's CA over a canonical JSON encoding, published on
``<p>msg.agent.<name>`` or ``<p>msg.topic.<name>``, and audited. A receiver verifies the signature and the
sender's trust domain before it uses a message, and its content enters the receiving run labelled
``agent:<sender spiffe id>`` (untrusted), so the taint rules apply to what one agent tells another.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from stitchwork.errors import AuthError, InvalidArguments, PolicyDenied, TokenInvalid
from stitchwork.gateway.core import Gateway
from stitchwork.gateway.stages import policy_context
from stitchwork.messaging._base import Bus, Consumer
from stitchwork.security.identity.ca import CertificateAuthority
from stitchwork.security.policy import Effect, PolicyEngine, Request, ToolAction
from stitchwork.security.taint import Label
from stitchwork.workers.subjects import Subjects

ACTION = "send_message"
POLICY_DIR = Path(__file__).resolve().parent / "policies"
MAX_BODY = 65_536
_RECIPIENT = re.compile(r"^(agent|topic):([a-z0-9][a-z0-9._-]{0,62})$")


def _token(name: str) -> str:
    """A subject token for a name that may contain '.'."""
    return re.sub(r"[^A-Za-z0-9_-]", lambda m: f"_{ord(m.group()):02x}", name)


@dataclass(frozen=True)
class Envelope:
    """One signed message. ``signature`` is the CA's Ed25519 signature of :meth:`signed_bytes` (base64)."""

    id: str
    sender: str
    recipient: str
    body: str
    run_id: str
    sent_at: float
    signature: str = ""

    def signed_bytes(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        return json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in ("id", "sender", "recipient", "body", "run_id", "sent_at",
                                              "signature")})
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenInvalid("the message envelope is malformed") from exc


class AgentMessenger:
    """Sends and receives agent messages for one platform over one bus."""

    def __init__(self, gateway: Gateway, bus: Bus, *, ca: CertificateAuthority, agents: Sequence[str],
                 policy_dirs: Sequence[str | Path] = (), subjects: Subjects = Subjects()) -> None:
        self.gateway = gateway
        self.audit = gateway.audit
        self.ca = ca
        self.agents = frozenset(agents)
        self.bus = bus
        self.subjects = subjects
        dirs = [POLICY_DIR] + [Path(d) / "messaging" for d in policy_dirs if (Path(d) / "messaging").is_dir()]
        schema = {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
                  "required": ["to", "body"]}
        self.policy = PolicyEngine.load(dirs, [ToolAction(ACTION, "external", schema)], agents=sorted(self.agents))

    def subject(self, recipient: str) -> str:
        kind, name = self._parse(recipient)
        return f"{self.subjects.prefix}msg.{kind}.{_token(name)}"

    def _parse(self, recipient: str) -> tuple[str, str]:
        match = _RECIPIENT.match(recipient or "")
        if not match:
            raise InvalidArguments(f"recipient {recipient!r} must be agent:<name> or topic:<name>")
        kind, name = match.group(1), match.group(2)
        if kind == "agent" and name not in self.agents:
            raise InvalidArguments(f"recipient {recipient!r}: no such agent")
        return kind, name

    async def send(self, token: str | None, to: str, body: str) -> Envelope:
        """Sends ``body`` from the token's agent to ``to``; returns the signed envelope.

        Raises:
            AuthError: the run token is refused.
            InvalidArguments: bad recipient or body.
            PolicyDenied: policy forbids this sender to message this recipient (audited).
        """
        gateway = self.gateway
        claims = await gateway.authenticate(token, action=ACTION)
        base = {"agent": claims.agent, "run_id": claims.run_id, "tool": ACTION}
        try:
            self._parse(to)
            if not isinstance(body, str) or len(body.encode()) > MAX_BODY:
                raise InvalidArguments(f"a message body is a string of at most {MAX_BODY} bytes")
        except InvalidArguments as exc:
            await self.audit.aappend("message", **base, decision="deny",
                                              data={"error": exc.code, "reason": str(exc)})
            raise
        run = gateway.runs.get(claims.run_id)
        taint = run.tracker.check({"to": to.partition(":")[2], "body": body}) if run is not None else None
        context = policy_context(side_effect="external", args={"to": to, "body": body},
                                 taint=taint.context("to") if taint is not None else None,
                                 steps=run.steps if run else 0, max_steps=run.max_steps if run else 0)
        decision = await self.policy.adecide(Request(agent=claims.agent, tool=ACTION, target=to, context=context))
        data: dict[str, Any] = {"to": to, "policy_ids": list(decision.policy_ids), "reasons": list(decision.reasons),
                                "body_sha256": hashlib.sha256(body.encode()).hexdigest()}
        if decision.effect is not Effect.ALLOW:
            await self.audit.aappend("message", **base, decision="deny", data=data)
            raise PolicyDenied(f"policy forbids {claims.agent} to message {to}: "
                               f"{'; '.join(decision.reasons) or 'no policy permits it'}",
                               policy_ids=decision.policy_ids)
        envelope = Envelope(id="msg_" + uuid.uuid4().hex, sender=claims.sub, recipient=to, body=body,
                            run_id=claims.run_id, sent_at=time.time())
        signature = base64.b64encode(self.ca.sign(envelope.signed_bytes())).decode()
        envelope = replace(envelope, signature=signature)
        seq = await self.bus.publish(self.subject(to), envelope.to_bytes(), msg_id=envelope.id)
        await self.audit.aappend("message", **base, decision="allow",
                                          data={**data, "message_id": envelope.id, "seq": seq})
        return envelope

    def verify(self, envelope: Envelope) -> Label:
        """Checks the signature and the sender; returns the label its content carries.

        Raises:
            TokenInvalid: a bad or missing signature, or a sender outside this trust domain.
        """
        try:
            signature = base64.b64decode(envelope.signature, validate=True)
        except (ValueError, TypeError) as exc:
            raise TokenInvalid("the message signature is not base64") from exc
        if not self.ca.verify(envelope.signed_bytes(), signature):
            raise TokenInvalid(f"message {envelope.id[:64]!r}: the signature does not match (altered or forged)")
        prefix = f"spiffe://{self.ca.trust_domain}/agent/"
        if not envelope.sender.startswith(prefix):
            raise TokenInvalid(f"message {envelope.id[:64]!r}: sender {envelope.sender[:120]!r} is not an agent of "
                               f"{self.ca.trust_domain}")
        return Label(f"agent:{envelope.sender}", False)

    async def receive(self, data: bytes, *, run_id: str = "") -> tuple[Envelope, Label]:
        """Verifies a delivered message, audits it, and labels its content in run ``run_id`` (if live)."""
        envelope = Envelope.from_bytes(data)
        try:
            label = self.verify(envelope)
        except AuthError as exc:
            await self.audit.aappend("message", run_id=run_id, tool=ACTION, decision="rejected",
                                              data={"message_id": envelope.id[:64], "reason": str(exc)})
            raise
        if run_id and run_id in self.gateway.runs:
            label = self.gateway.record_content(run_id, envelope.body, label)
        await self.audit.aappend("message", run_id=run_id, tool=ACTION, decision="received",
                                          data={"message_id": envelope.id, "from": envelope.sender,
                                                "to": envelope.recipient, "label": str(label)})
        return envelope, label

    def inbox(self, recipient: str, *, group: str = "") -> Consumer:
        """Messages for ``recipient`` (``agent:<name>``: a shared queue; ``topic:<name>``: a replay, or a group)."""
        kind, name = self._parse(recipient)
        if kind == "agent":
            return self.bus.consume(self.subject(recipient), group=group or f"inbox-{_token(name)}")
        return self.bus.consume(self.subject(recipient), group=group)
