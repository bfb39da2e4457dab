"""The adversarial suite: every attack variation is refused or held, and its matching benign call still runs."""

from __future__ import annotations

import pytest

from stitchwork.security.policy import Effect, PolicyEngine
from tests.adversarial.harness import World, engine
from tests.adversarial.variations import VARIATIONS, Variation


@pytest.fixture(scope="module")
def policy() -> PolicyEngine:
    return engine()


def test_there_are_enough_variations() -> None:
    assert len(VARIATIONS) >= 40
    assert len({v.name for v in VARIATIONS}) == len(VARIATIONS)


@pytest.mark.parametrize("variation", VARIATIONS, ids=lambda v: v.name)
def test_attack_is_stopped_and_benign_call_runs(policy: PolicyEngine, variation: Variation) -> None:
    world = World(policy)
    variation.setup(world)
    tool, args = variation.attack
    assert world.outcome(tool, args) == variation.expect
    tool, args = variation.benign
    decision = world.decide(tool, args)
    if decision.effect is not Effect.ALLOW:  # a human can let it through
        assert decision.effect is Effect.ASK, decision
        assert world.decide(tool, args, approved=True).effect is Effect.ALLOW
    if variation.expect == "held":  # and what a human is shown says why
        assert world.taint(*variation.attack).taint.explain()


def test_the_sender_of_a_mail_is_asked_with_its_provenance(policy: PolicyEngine) -> None:
    """Replying to whoever wrote is a decision a human can make: held (not refused) and shown where it came from,
    even though the sender's address also occurs in the mail's text."""
    from tests.adversarial.variations import mail, thread

    world = World(policy)
    thread(world)
    tool, args = mail("carol@partner.example")
    decision = world.decide(tool, args)
    assert decision.effect is Effect.ASK and decision.policy_ids == ("external-record-target",)
    tainted = world.taint(tool, args)
    assert tainted.record["target_level"] == "record"
    assert tainted.record["findings"] == [{"arg": "to", "level": "record", "sources": ["tool:read_inbox"],
                                           "value": "carol@partner.example", "field": "sender"}]
    assert "'sender' field of tool:read_inbox" in tainted.taint.explain()
