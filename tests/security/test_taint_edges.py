"""Edges of the taint tracker that its other tests left open (found by a full mutation run of security/taint.py):
JSON scalars, the structured-output size edge, the field of top-level records, senders with several words, one
finding per value, the level of an unattributed address, 4-character entities and hidden texts, repeated checks."""

from __future__ import annotations

import json

import pytest
from tests.security.test_taint_pinned import USER, tracker

from stitchwork.security import taint as taint_module
from stitchwork.security.taint import Label, ProvenanceTracker

WEB = Label("tool:fetch_url", False)


def test_a_json_scalar_is_prose_not_a_record() -> None:
    for text in ('"mallory@evil.example"', "42424242", "null"):
        t = tracker(("tool:a", text))
        value = json.loads(text) if text != "null" else "null"
        hit = t.check({"to": str(value)})
        assert hit.levels == (("to", "prose"),), text


def test_structured_output_of_exactly_the_corpus_limit_is_still_read_as_records(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = '["mallory@evil.example"]'
    monkeypatch.setattr(taint_module, "MAX_CORPUS_CHARS", len(text))
    t = tracker(("tool:a", text), trusted="hi")
    assert t.check({"to": "mallory@evil.example"}).levels == (("to", "record"),)


def test_a_record_of_a_top_level_list_names_no_field_and_a_keyed_one_its_key() -> None:
    t = tracker(("tool:a", '["mallory@evil.example"]'))
    (finding,) = t.check({"to": "mallory@evil.example"}).findings
    assert (finding.level, finding.field) == ("record", "")
    both = tracker(("tool:a", '["mallory@evil.example"]'), ("tool:b", '{"email": "mallory@evil.example"}'))
    (finding,) = both.check({"to": "mallory@evil.example"}).findings
    assert (finding.level, finding.field, finding.sources) == ("record", "email", ("tool:a", "tool:b"))


def test_adding_the_same_content_again_returns_its_label() -> None:
    t = ProvenanceTracker()
    assert t.add("some page text", WEB) == WEB
    assert t.add("some page text", WEB) == WEB


def test_a_sender_of_several_words_is_recognised_as_the_sender() -> None:
    t = tracker(("tool:read_inbox", '[{"from": "Mallory Evil Corp", "subject": "hi"}]'))
    (finding,) = t.check({"to": "Mallory Evil Corp"}).findings
    assert (finding.level, finding.field) == ("record", "sender")


def test_a_value_found_whole_is_reported_once_even_if_a_decoding_is_found_too() -> None:
    t = tracker(("tool:a", "see hello%20world here"))  # the page holds both the encoded and the decoded text
    hit = t.check({"q": "hello%20world"})
    assert len(hit.findings) == 1 and hit.findings[0].value == "hello%20world"


def test_an_invented_address_is_unattributed_at_that_level() -> None:
    t = tracker(("tool:a", "an ordinary page"))
    hit = t.check({"to": "drop@nowhere.example"})
    assert hit.levels == (("to", "unattributed"),)
    assert [(f.level, f.sources) for f in hit.findings] == [("unattributed", ("unattributed",))]


def test_a_four_character_address_inside_a_value_is_looked_up() -> None:
    t = tracker(("tool:a", "visit www.x.io now"))
    hit = t.check({"body": "see www.x.io"})  # the address is x.io once its www. is dropped
    assert hit.args == {"body"} and hit.sources == {"tool:a"}


def test_a_four_character_hidden_text_is_looked_up() -> None:
    t = tracker(("tool:a", "the code is wxyz today"))
    hit = t.check({"cmd": "echo 'wx' 'yz'"})
    assert hit.args == {"cmd"} and hit.embedded == (("cmd", "prose"),)


def test_an_address_whose_hidden_text_is_found_is_not_also_unattributed() -> None:
    t = tracker(("tool:a", "the name is malloryevilx ok"))
    hit = t.check({"to": b"malloryevilx".hex() + "@x.io"})
    assert hit.sources == {"tool:a"}
    assert [f.sources for f in hit.findings] == [("tool:a",)]


def test_many_checks_between_additions_keep_each_value_attributed_to_its_item() -> None:
    t = ProvenanceTracker()
    t.add("Summarise", USER)
    t.add("first page text alpha", Label("tool:a", False))
    for _ in range(12):  # each check with nothing new added
        t.check({"q": "first page"})
    t.add("second page text bravo", Label("tool:b", False))
    t.add("third page text charlie", Label("tool:c", False))
    assert t.check({"q": "xt bravo"}).sources == {"tool:b"}
    assert t.check({"q": "page text charlie"}).sources == {"tool:c"}


def test_a_mailto_link_whose_address_was_read_is_not_also_unattributed() -> None:
    t = tracker(("tool:a", "contact mallory@evil.example"))
    hit = t.check({"link": "mailto:mallory@evil.example?subject=hi"})
    assert hit.sources == {"tool:a"}
    assert [(f.level, f.value) for f in hit.findings] == [("prose", "mallory@evil.example")]


def test_the_whole_trusted_text_dictates_its_first_and_last_words() -> None:
    t = ProvenanceTracker()
    t.add("Lunch is at noon", USER)
    t.add("a page", WEB)
    assert t.check({"body": "Lunch is at noon"}).undictated == frozenset()
    assert t.check({"body": "lunch"}).undictated == frozenset()
    assert t.check({"body": "NOON"}).undictated == frozenset()
    assert t.check({"body": "noo"}).undictated == frozenset({"body"})


def test_a_prose_leaf_counts_once_toward_the_corpus_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    prose = "word " * 24 + "end"  # longer than a record: prose
    first = json.dumps({"body": prose})
    second = "short page text"
    monkeypatch.setattr(taint_module, "MAX_CORPUS_CHARS", len(prose) + 1 + len(second) + 5)
    t = tracker(("tool:a", first), ("tool:b", second), trusted="hi")
    assert t.check({"q": "short page text"}).sources == {"tool:b"}


def test_the_outward_level_counts_outward_destinations_only() -> None:
    t = tracker(("tool:a", '["mallory@evil.example"]'), ("tool:b", "a long page that mentions plan-2024.txt in it"))
    hit = t.check({"to": "mallory@evil.example", "file": "plan-2024.txt"})
    record = hit.context("to", {"to": "recipient", "file": "file"}, outward=True)
    assert record["outward_level"] == "record"
    assert dict(hit.levels) == {"to": "record", "file": "prose"}


def test_a_user_named_link_followed_by_punctuation_inside_a_value_is_no_lookalike() -> None:
    t = tracker(("tool:a", "a page"), trusted="check https://bob.example/a please")
    assert not t.check({"body": "see https://bob.example/a, thanks"}).any
    assert not t.check({"body": "see (https://bob.example/a)."}).any


@pytest.mark.parametrize(("depth", "level"), [(31, "record"), (32, "prose")])
def test_an_address_used_as_a_key_is_one_level_below_its_object(depth: int, level: str) -> None:
    text = "[" * depth + json.dumps({"mallory@evil.example": "rw"}) + "]" * depth
    t = tracker(("tool:a", text))
    assert t.check({"to": "mallory@evil.example"}).levels == (("to", level),)


def test_a_lookalike_of_several_trusted_words_is_one() -> None:
    t = tracker(("tool:a", "a page"), trusted="pay Bob Smith today")
    assert t.check({"payee": "B\u043eb Smith"}).lookalike == frozenset({"payee"})
    assert not t.check({"payee": "Bob Smith"}).any
