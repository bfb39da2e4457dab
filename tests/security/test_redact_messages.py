"""Redacting a growing conversation: only what changed since the run's previous model call is redacted again."""

from __future__ import annotations

from typing import Any

from stitchwork.security import redact as redact_module
from stitchwork.security.redact import Redactor

SECRET = "sk-live-1234567890abcdef"


def conversation(steps: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "go"}]
    for i in range(steps):
        messages.append({"role": "assistant", "content": None,
                         "tool_calls": [{"id": f"c{i}", "function": {"name": "t", "arguments": "{}"}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": f"result {i} {SECRET if i % 3 else ''}"})
    return messages


def test_a_growing_conversation_is_redacted_exactly_like_a_full_redaction() -> None:
    redactor = Redactor({"key": SECRET})
    messages = conversation(0)
    for step in range(8):
        got = redactor.redact_messages("run_1", messages)
        assert got == redactor.redact([dict(m) for m in messages])
        assert SECRET not in str(got)
        messages = conversation(step + 1)


def test_a_message_changed_since_the_previous_call_is_redacted_again() -> None:
    redactor = Redactor({"key": SECRET})
    messages = conversation(3)
    redactor.redact_messages("run_1", messages)
    messages[2] = {**messages[2], "content": f"now it holds {SECRET}"}  # a new object at an old position
    messages[1]["content"] = f"edited in place: {SECRET}"  # the same object, changed at its top level
    got = redactor.redact_messages("run_1", messages)
    assert got[2]["content"] == "now it holds [secret:key]"
    assert got[1]["content"] == "edited in place: [secret:key]"
    assert got == redactor.redact([dict(m) for m in messages])


def test_runs_are_kept_apart_and_only_the_most_recent_are_remembered(monkeypatch: Any) -> None:
    monkeypatch.setattr(redact_module, "CONVERSATIONS_KEPT", 2)
    redactor = Redactor({"key": SECRET})
    first, second = conversation(2), [{"role": "user", "content": f"other {SECRET}"}]
    assert redactor.redact_messages("a", first) == redactor.redact([dict(m) for m in first])
    assert redactor.redact_messages("b", second) == [{"role": "user", "content": "other [secret:key]"}]
    redactor.redact_messages("c", second)
    assert list(redactor._conversations) == ["b", "c"]
    assert redactor.redact_messages("", first) == redactor.redact([dict(m) for m in first])
    assert "" not in redactor._conversations
