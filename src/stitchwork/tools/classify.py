"""A general rule that gives a function-style tool a side-effect class and a target argument.

Benchmarks and tool catalogues (AgentDojo, MCP servers, OpenAPI operations) describe a tool by a name and a JSON
schema of its arguments, not by what it does to the world. The gateway needs a side-effect class
(``read`` / ``write`` / ``external`` / ``irreversible``) and the name of the argument that is the call's target
(the Cedar resource). This module derives both from the words of the name and the *roles* of the argument names,
never from a list of particular tool names:

Side-effect class, first rule that applies:

0. ``irreversible`` with the command or program as target: the tool runs commands or code. Its name has a word
   such as ``run``, ``exec``, ``execute``, ``eval``, ``shell``, ``bash``, ``sh``, ``python``, ``script``,
   ``terminal``, ``subprocess``, ``powershell``, or an argument is unmistakably a command or a program
   (``command``, ``cmd``, ``script``, ``argv``, ``program``, ``source_code``, ``expression``; also ``code`` and
   ``source`` when the name has such a word). Every call then waits for a human unless an operator's policy
   says otherwise, and a command assembled, reversed or encoded from untrusted text is reported as ``code``
   taint (see :mod:`stitchwork.security.matching`).
1. ``irreversible``: the name moves money (``money``, ``payment``, ``transaction``, ``transfer``, ``pay``,
   ``wire``), changes a credential (``password``, ``credential``, ``secret``), or destroys (``delete``,
   ``remove``, ``cancel``, ``drop``, ``destroy``, ``purge``, ``revoke``, ``erase``). (The look-only rule 2 is
   checked first.)
2. ``read``: the name starts with a look-only verb (``get``, ``list``, ``search``, ``read``, ``find``, ``check``,
   ``fetch``, ``view``, ``show``, ``query``, ``lookup``, ``count``) and no argument is a URL.
3. ``external``: the name sends or commits to a third party (``send``, ``share``, ``post``, ``invite``,
   ``reply``, ``forward``, ``publish``, ``upload``, ``email``, ``message``, ``reserve``, ``book``, ``order``,
   ``buy``, ``purchase``, ``submit``); or an argument has the *recipient* or *account* role: whoever is named is
   notified or given access; or an argument has the *url* role: the request itself leaves the machine (a GET
   carries data in its URL), so even ``get_webpage`` is external.
4. ``write``: a change to local state (``create``, ``add``, ``append``, ``update``, ``edit``, ``set``, ``write``,
   ``schedule``, ``reschedule``, ``rename``, ``move``, ``save``).
5. anything else: ``irreversible`` (fail closed: an unknown verb waits for a human).

Destinations (:func:`roles`): every argument with a role is a destination the policy checks like the target, in
every class: ``recipient`` (``to``, ``cc``, ``bcc``, ``recipients``, ``participants``, ``email``, ``user``,
``member``, ``channel``: whoever reads it receives what is posted, ``forward_to``...), ``account`` (``iban``,
``account``, ``account_number``, ``phone``), ``url``
(``url``, ``link``, ``website``, ``endpoint``, ``webhook``, ``callback``, ``repo``...), ``path`` (``path``,
``file_path``, ``filename``, ``directory``), ``command`` and ``code`` (rule 0).

Target argument: the first argument (in schema order) of the most sensitive role present: command/code, then
recipient, then account, then url, then path / identifier / named object (``*_id``, ``id``, ``path``, ``file``,
``name``, ``channel`` and the object of a reservation verb, e.g. ``hotel`` for ``reserve_hotel``). Credential
tools have their secret value as target (``password``).

Confidentiality: a tool whose name speaks of credentials or personal or financial records (``password``,
``secret``, ``credential``, ``token``, ``private``, ``personal``, ``balance``, ``iban``, ``transaction(s)``,
``passport``, ``salary``, ``medical``, ``health``, or ``user``/``account`` with ``info``, ``information``,
``profile`` or ``details``) is ``confidential``: the values it returns must not leave without a human's approval.

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

CODE_VERBS = frozenset({"run", "exec", "execute", "eval", "shell", "bash", "sh", "zsh", "python",
                        "script", "terminal", "subprocess", "powershell", "cmd", "interpreter", "repl"})
CONFIDENTIAL = frozenset({"password", "passwd", "secret", "secrets", "credential", "credentials", "token", "tokens",
                          "private", "personal", "balance", "iban", "transaction", "transactions", "passport", "ssn",
                          "salary", "medical", "health"})
_PROFILE = frozenset({"info", "information", "profile", "details"})

_RECIPIENT = re.compile(
    r"^(recipients?|to|cc|bcc|participants?|attendees?|invitees?|emails?|user_emails?|email_address(es)?|"
    r"forward_to|forward(ing)?_address(es)?|reply_to|destination|notify|subscribers?)$"
)
_ACCOUNT = re.compile(r"^(iban|account|account_number|phone(_number)?|wallet(_address)?)$")
_PERSON = re.compile(r"^(users?|members?|user_names?|usernames?|channels?|channel_names?)$")
_URL = re.compile(r"^(url|urls|link|links|website|endpoint|uri|href|webhook|webhook_url|callback(_url)?|"
                  r"repo(sitory)?(_url)?|remote|host|server)$")
_PATH = re.compile(r"^(path|paths|.*_path|file_?name|dir|directory|folder)$")
_COMMAND = re.compile(r"^(command|commands|cmd|shell_command|script|argv|program|source_code|expression)$")
_WEAK_CODE = re.compile(r"^(code|source|query|statement|snippet)$")
_OBJECT = re.compile(r"^(.*_id|id|ids|.*_path|path|file(name)?|.*_name|name|channel|title|company)$")
ROLES = ("command", "code", "recipient", "account", "url", "path")
"""Destination roles, most sensitive first."""


@dataclass(frozen=True)
class Classification:
    """What the rule decided for one tool, and why (for operators)."""

    side_effect: SideEffect
    target: str
    reason: str
    destinations: tuple[tuple[str, str], ...] = ()
    """(argument, role) of the destination arguments (see :func:`roles`)."""
    confidential: bool = False


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[_\W]+|(?<=[a-z])(?=[A-Z])", name.lower()) if w]


def _properties(schema: Mapping[str, Any]) -> list[str]:
    props = schema.get("properties") or {}
    return [str(k) for k in props] if isinstance(props, Mapping) else []


def roles(name: str, schema: Mapping[str, Any]) -> dict[str, str]:
    """The destination arguments of a tool and their roles, in schema order (see the module)."""
    words = set(_words(name))
    out: dict[str, str] = {}
    for arg in _properties(schema):
        low = arg.lower()
        if _COMMAND.match(low) or (_WEAK_CODE.match(low) and words & CODE_VERBS):
            out[arg] = "command" if low in ("command", "commands", "cmd", "shell_command", "argv") else "code"
        elif _RECIPIENT.match(low) or _PERSON.match(low):
            out[arg] = "recipient"
        elif _ACCOUNT.match(low):
            out[arg] = "account"
        elif _URL.match(low):
            out[arg] = "url"
        elif _PATH.match(low):
            out[arg] = "path"
    return out


def confidential(name: str) -> bool:
    """Whether a tool named ``name`` returns confidential values (see the module)."""
    words = set(_words(name))
    return bool(words & CONFIDENTIAL) or bool(words & {"user", "account"} and words & _PROFILE)


def classify(name: str, schema: Mapping[str, Any]) -> Classification:
    """The side-effect class, target, destinations and confidentiality of a tool named ``name`` with argument
    schema ``schema``."""
    found = _classify(name, schema)
    dests = roles(name, schema)
    return Classification(found.side_effect, found.target, found.reason, tuple(dests.items()), confidential(name))


def _classify(name: str, schema: Mapping[str, Any]) -> Classification:
    words = _words(name)
    args = _properties(schema)
    dests = roles(name, schema)
    code = [a for a, r in dests.items() if r in ("command", "code")]
    if code or set(words) & CODE_VERBS - {"run"} or (words and words[0] == "run"):
        target = (code or [a for a in args if _WEAK_CODE.match(a.lower())] or [""])[0]
        return Classification(SideEffect.IRREVERSIBLE, target, "runs commands or code")
    recipients = [a for a, r in dests.items() if r == "recipient"]
    accounts = [a for a, r in dests.items() if r == "account"]
    urls = [a for a, r in dests.items() if r == "url"]
    nouns = set(words[1:])
    objects = [a for a in args if _OBJECT.match(a.lower()) or a.lower() in nouns]
    credential = [a for a in args if a.lower() in CREDENTIAL]
    target = (recipients or accounts or urls or credential or objects or [""])[0]
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
    if (recipients or accounts) and first not in LOOK:
        return Classification(SideEffect.EXTERNAL, target, f"names a recipient ({(recipients or accounts)[0]})")
    if urls:
        return Classification(SideEffect.EXTERNAL, target, f"reaches the network ({urls[0]})")
    if first in CHANGE:
        return Classification(SideEffect.WRITE, target, "changes local state")
    return Classification(SideEffect.IRREVERSIBLE, target, "unknown verb (fail closed)")


__all__ = ["ROLES", "Classification", "classify", "confidential", "roles"]
