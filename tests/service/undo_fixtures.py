"""A calendar with reversible tools, and a run that used them (shared by the undo tests of the service, the HTTP API
and the CLI). The tools keep their state in files of the working directory (the inline sandbox runs there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CALENDAR = '''
import json, os

DB = "calendar.json"


def _load():
    if not os.path.exists(DB):
        return {}
    with open(DB, encoding="utf-8") as handle:
        return json.load(handle)


def _save(data):
    with open(DB, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


def create_event(calendar, title):
    data = _load()
    number = 1 + max([int(k[2:]) for k in data] or [0])
    event_id = f"ev{number}"
    data[event_id] = {"calendar": calendar, "title": title}
    _save(data)
    return {"id": event_id}


def delete_event(calendar, id):
    if os.path.exists("delete_fails"):
        raise RuntimeError("the calendar service is unavailable")
    data = _load()
    if id not in data or data[id]["calendar"] != calendar:
        raise KeyError(f"no event {id} in {calendar}")
    del data[id]
    _save(data)
    with open("deletions.log", "a", encoding="utf-8") as handle:
        handle.write(id + "\\n")
    return {"deleted": id}


def read_events(calendar):
    return [dict(v, id=k) for k, v in _load().items() if v["calendar"] == calendar]


def post_message(channel, text):
    return {"posted": channel}


def book_room(room):
    return {"booking": {"room": room}}


def cancel_room(room, ref):
    return {"cancelled": room}


def pay(account, amount):
    with open("ledger.log", "a", encoding="utf-8") as handle:
        handle.write(f"pay {account} {amount}\\n")
    return {"paid": amount}


def refund(account, amount):
    if os.path.exists("refund_fails"):
        raise RuntimeError("the bank is closed")
    with open("ledger.log", "a", encoding="utf-8") as handle:
        handle.write(f"refund {account} {amount}\\n")
    return {"refunded": amount}
'''


def _manifest(name: str, side_effect: str, args: dict[str, str], *, target: str = "", undo: str = "") -> str:
    props = "\n".join(f"properties.{a} = {{ type = \"{t}\" }}" for a, t in args.items())
    return (f'name = "{name}"\ndescription = "{name}"\nside_effect = "{side_effect}"\nentry = "calendar.py:{name}"\n'
            + (f'target = "{target}"\n' if target else "") + undo
            + f'\n[args]\ntype = "object"\nrequired = {json.dumps(list(args))}\nadditionalProperties = false\n'
            + props + "\n")


TOOLS = {
    "create_event": _manifest("create_event", "write", {"calendar": "string", "title": "string"}, target="calendar",
                              undo='undo = { tool = "delete_event", args = { id = "result.id", calendar = '
                                   '"args.calendar" } }\n'),
    "delete_event": _manifest("delete_event", "write", {"calendar": "string", "id": "string"}, target="calendar"),
    "read_events": _manifest("read_events", "read", {"calendar": "string"}),
    "post_message": _manifest("post_message", "external", {"channel": "string", "text": "string"}),
    "book_room": _manifest("book_room", "write", {"room": "string"},
                           undo='undo = { tool = "cancel_room", args = { room = "result.booking.room", '
                                'ref = "result.ref" } }\n'),
    "cancel_room": _manifest("cancel_room", "write", {"room": "string", "ref": "string"}),
    "pay": _manifest("pay", "external", {"account": "string", "amount": "integer"}, undo='undo = "refund"\n'),
    "refund": _manifest("refund", "external", {"account": "string", "amount": "integer"}),
}
AGENT_TOOLS = sorted(TOOLS)


def write_tools(directory: Path) -> None:
    """Adds the calendar tools to a tools directory."""
    (directory / "calendar.py").write_text(CALENDAR)
    for name, text in TOOLS.items():
        (directory / f"{name}.toml").write_text(text)


def call(name: str, args: dict[str, Any], cid: str) -> dict[str, Any]:
    return {"tool_calls": [{"id": cid, "name": name, "arguments": args}]}


TURNS = [
    call("create_event", {"calendar": "work", "title": "standup"}, "c1"),
    call("create_event", {"calendar": "work", "title": "review"}, "c2"),
    call("post_message", {"channel": "team", "text": "planned"}, "c3"),
    call("read_events", {"calendar": "work"}, "c4"),
    call("book_room", {"room": "r1"}, "c5"),
    {"content": "done"},
]
"""Two reversible calls (c1, c2), one without an undo (c3), a read (c4), one whose mapping finds no value (c5)."""

SHORT = [*TURNS[:2], {"content": "done"}]
"""Just the two reversible calls (c1, c2)."""

UNDO_ASKS = '''
@id("undo-create-asks")
@approval("required")
forbid (principal, action == Stitchwork::Action::"undo", resource == Stitchwork::Target::"create_event")
unless { context.approved };
'''

UNDO_DENIED = '''
@id("undo-create-denied")
forbid (principal, action == Stitchwork::Action::"undo", resource == Stitchwork::Target::"create_event")
when { context.args has by && context.args.by like "operator:*" };

@id("delete-ev1-denied")
forbid (principal, action == Stitchwork::Action::"delete_event", resource)
when { context.args.id == "ev1" };
'''


def policy_dir(root: Path, text: str) -> str:
    directory = root / "undo-policies"
    directory.mkdir(exist_ok=True)
    (directory / "undo.cedar").write_text(text)
    return str(directory)


def calendar(cwd: Path) -> dict[str, Any]:
    path = cwd / "calendar.json"
    return json.loads(path.read_text()) if path.exists() else {}
