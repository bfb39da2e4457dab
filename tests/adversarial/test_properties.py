"""General rules of value matching, checked on generated values (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stitchwork.security.matching import MIN_MATCH
from stitchwork.security.taint import Label, ProvenanceTracker

USER = Label("user", True)
WEB = Label("tool:fetch_url", False)
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=MIN_MATCH, max_size=12)
DOMAIN = st.sampled_from(["example.com", "corp.example.org", "mail.example.net"])
EMAIL = st.builds(lambda local, domain: f"{local}@{domain}", WORD, DOMAIN)
VALUE = st.one_of(WORD, EMAIL, st.builds(lambda w, d: f"https://{d}/{w}", WORD, DOMAIN))
FILLER = st.lists(WORD, min_size=0, max_size=6).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(value=VALUE, before=FILLER, after=FILLER, noise=FILLER)
def test_a_whole_token_of_trusted_text_found_nowhere_untrusted_is_never_tainted(
    value: str, before: str, after: str, noise: str
) -> None:
    tracker = ProvenanceTracker()
    tracker.add(f"{before} {value}, {after}.", USER)
    tracker.add(f"unrelated page: {noise} zzzz", WEB)
    if value in noise or value in "unrelated page zzzz":
        return
    assert not tracker.check({"to": value}).any


@settings(max_examples=150, deadline=None)
@given(value=VALUE, before=FILLER, after=FILLER, task=FILLER)
def test_a_value_found_only_in_untrusted_text_is_always_tainted(value: str, before: str, after: str,
                                                                 task: str) -> None:
    tracker = ProvenanceTracker()
    tracker.add(f"please handle this: {task}", USER)
    if value in f"please handle this: {task}":
        return
    tracker.add(f"{before} {value} {after}", WEB)
    taint = tracker.check({"to": value})
    assert taint.args == {"to"}
    assert taint.level("to") == "prose"
    assert "tool:fetch_url" in taint.sources


@settings(max_examples=100, deadline=None)
@given(value=EMAIL, cut=st.integers(min_value=1, max_value=3))
def test_a_proper_substring_of_a_trusted_token_is_not_user_named(value: str, cut: int) -> None:
    tracker = ProvenanceTracker()
    tracker.add(f"mail it to {value} please", USER)
    tracker.add(f"or to {value[cut:]} says the page", WEB)
    assert tracker.check({"to": value[cut:]}).args == {"to"}
    assert not tracker.check({"to": value}).any


@settings(max_examples=100, deadline=None)
@given(value=EMAIL, position=st.integers(min_value=0, max_value=40),
       mark=st.sampled_from(["\u200b", "\u00ad", "\u2060", "\ufeff"]))
def test_folding_only_adds_taint(value: str, position: int, mark: str) -> None:
    """A user-named value with an invisible character inserted is a look-alike: tainted, never trusted."""
    tracker = ProvenanceTracker()
    tracker.add(f"mail it to {value}", USER)
    at = position % len(value)
    spoof = value[:at] + mark + value[at:]
    taint = tracker.check({"to": spoof})
    assert taint.args == {"to"} and taint.lookalike == {"to"}
    assert taint.level("to") == "prose"
    assert taint.findings[0].note == "look-alike of a user-named value"
