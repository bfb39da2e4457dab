"""The general rule that classifies imported tools by the verbs of their name and the roles of their arguments."""

from __future__ import annotations

from stitchwork.security.policy import SIDE_EFFECTS, SideEffect
from stitchwork.tools.classify import classify
from stitchwork.tools.manifest import SideEffect as ManifestSideEffect


def test_classification_is_by_verb_and_argument_role() -> None:
    url = {"properties": {"url": {"type": "string"}}}
    assert classify("get_webpage", url).side_effect == "external"
    assert classify("fetch_page", url).target == "url"
    assert classify("get_balance", {}).side_effect == "read"
    money = classify("send_money", {"properties": {"recipient": {}, "amount": {}}})
    assert (money.side_effect, money.target) == ("irreversible", "recipient")
    invite = classify("create_meeting", {"properties": {"title": {}, "attendees": {}}})
    assert (invite.side_effect, invite.target) == ("external", "attendees")
    assert classify("create_note", {"properties": {"title": {}}}).side_effect == "write"
    assert classify("frobnicate", {}).side_effect == "irreversible"


def test_classes_are_the_policy_action_groups() -> None:
    assert ManifestSideEffect is SideEffect
    assert tuple(SideEffect) == SIDE_EFFECTS == ("read", "write", "external", "irreversible")
    for name in ("get_balance", "create_note", "send_email", "delete_file", "frobnicate"):
        assert isinstance(classify(name, {}).side_effect, SideEffect)
