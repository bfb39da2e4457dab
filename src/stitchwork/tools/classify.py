"""A general rule that gives a function-style tool a side-effect class and a target argument.

Benchmarks and tool catalogues (AgentDojo, MCP servers, OpenAPI operations) describe a tool by a name and a JSON
schema of its arguments, not by what it does to the world. The gateway needs a side-effect class
(``read`` / ``write`` / ``external`` / ``irreversible``) and the name of the argument that is the call's target
(the Cedar resource). This module derives both from the words of the name and the *roles* of the argument names,
never from a list of particular tool names:

Side-effect class, first rule that applies (the look-only rule 2 is checked first):

1. ``irreversible``: the name moves money (``money``, ``payment``, ``transaction``, ``transfer``, ``pay``,
   ``wire``), changes a credential (``password``, ``credential``, ``secret``), or destroys (``delete``,
   ``remove``, ``cancel``, ``drop``, ``destroy``, ``purge``, ``revoke``, ``erase``).
2. ``read``: the name starts with a look-only verb (``get``, ``list``, ``search``, ``read``, ``find``, ``check``,
   ``fetch``, ``view``, ``show``, ``query``, ``lookup``, ``count``) and no argument is a URL.
3. ``external``: the name sends or commits to a third party (``send``, ``share``, ``post``, ``invite``,
   ``reply``, ``forward``, ``publish``, ``upload``, ``email``, ``message``, ``reserve``, ``book``, ``order``,
   ``buy``, ``purchase``, ``submit``); or an argument has the *recipient* role (``recipients``, ``to``, ``cc``,
   ``participants``, ``email``, ``iban``, ``user``, ``member`` ...): whoever is named is notified or given
   access; or an argument has the *url* role: the request itself leaves the machine (a GET carries data in its
   URL), so even ``get_webpage`` is external.
4. ``write``: a change to local state (``create``, ``add``, ``append``, ``update``, ``edit``, ``set``, ``write``,
   ``schedule``, ``reschedule``, ``rename``, ``move``, ``save``).
5. anything else: ``irreversible`` (fail closed: an unknown verb waits for a human).

Target argument: the first argument (in schema order) of the most sensitive role present: recipient, then url,
then path / identifier / named object (``*_id``, ``id``, ``path``, ``file``, ``name``, ``channel`` and the
object of a reservation verb, e.g. ``hotel`` for ``reserve_hotel``). Credential tools have their secret value as
target (``password``).

The rule is a starting point for importing a catalogue; an operator reviews the result (``stitchwork eval
agentdojo --show-tools`` prints it) and writes manifests for tools that matter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stitchwork.security.policy import SideEffect

MONEY = frozenset({"money", "payment", "payments", "transaction", "transactions", "transfer", "pay", "wire"})
CREDENTIAL = frozenset({"password", "passwd", "credential", "credentials", "secret", "passphrase"})
DESTROY = frozenset({"delete", "remove", "cancel", "drop", "destroy", "purge", "revoke", "erase", "wipe"})
SEND = frozenset({
    "send", "share", "post", "invite", "reply", "forward", "publish", "upload", "email", "message", "reserve",
    "book", "order", "buy", "purchase", "submit", "notify", "tweet", "dm",
})
LOOK = frozenset({"get", "list", "search", "read", "find", "check", "fetch", "view", "show", "query", "lookup",
                  "count", "describe", "download"})
CHANGE = frozenset({"create", "add", "append", "update", "edit", "set", "write", "schedule", "reschedule",
                    "rename", "move", "save", "modify", "change", "insert", "put", "make"})

_RECIPIENT = re.compile(
    r"^(recipients?|to|cc|bcc|participants?|attendees?|invitees?|emails?|user_emails?|email_address(es)?|iban|"
    r"account|account_number|phone(_number)?)$"
)
_PERSON = re.compile(r"^(users?|members?|user_names?|usernames?)$")
_URL = re.compile(r"^(url|urls|link|links|website|endpoint|uri|href|webhook)$")
_OBJECT = re.compile(r"^(.*_id|id|ids|.*_path|path|file(name)?|.*_name|name|channel|title|company)$")


@dataclass(frozen=True)
class Classification:
    """What the rule decided for one tool, and why (for operators)."""

    side_effect: SideEffect
    target: str
    reason: str


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[_\W]+|(?<=[a-z])(?=[A-Z])", name.lower()) if w]


def _properties(schema: Mapping[str, Any]) -> list[str]:
    props = schema.get("properties") or {}
    return [str(k) for k in props] if isinstance(props, Mapping) else []


def classify(name: str, schema: Mapping[str, Any]) -> Classification:
    """The side-effect class and target argument of a tool named ``name`` with argument schema ``schema``."""
    words = _words(name)
    args = _properties(schema)
    recipients = [a for a in args if _RECIPIENT.match(a.lower())] + [a for a in args if _PERSON.match(a.lower())]
    urls = [a for a in args if _URL.match(a.lower())]
    nouns = set(words[1:])
    objects = [a for a in args if _OBJECT.match(a.lower()) or a.lower() in nouns]
    credential = [a for a in args if a.lower() in CREDENTIAL]
    target = (recipients or urls or credential or objects or [""])[0]
    first = words[0] if words else ""
    if first in LOOK and not urls:
        return Classification(SideEffect.READ, target, "looks only")
    if set(words) & MONEY:
        return Classification(SideEffect.IRREVERSIBLE, target, "moves money")
    if set(words) & CREDENTIAL:
        return Classification(SideEffect.IRREVERSIBLE, (credential or [target])[0], "changes a credential")
    if first in DESTROY or set(words) & DESTROY:
        return Classification(SideEffect.IRREVERSIBLE, target, "destroys or cancels")
    if set(words) & SEND:
        return Classification(SideEffect.EXTERNAL, target, "sends to or commits with a third party")
    if recipients and first not in LOOK:
        return Classification(SideEffect.EXTERNAL, target, f"names a recipient ({recipients[0]})")
    if urls:
        return Classification(SideEffect.EXTERNAL, target, f"reaches the network ({urls[0]})")
    if first in CHANGE:
        return Classification(SideEffect.WRITE, target, "changes local state")
    return Classification(SideEffect.IRREVERSIBLE, target, "unknown verb (fail closed)")


__all__ = ["Classification", "classify"]
