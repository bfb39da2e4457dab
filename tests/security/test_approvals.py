"""One behaviour suite for approval stores: the platform's database (``ApprovalStore``) and the bus
(``BusApprovalStore`` on ``memory://``, and on NATS when a nats-server is installed)."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stitchwork.data._base import open_store
from stitchwork.errors import ApprovalError
from stitchwork.security.approvals import ApprovalStatus, ApprovalStore

Make = Callable[..., ApprovalStore]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["store", "bus-memory", "bus-nats"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    """``make(**options)`` opens a store of this adapter; stores made in one test share their backing state."""
    if request.param == "store":
        store = open_store(f"duckdb://{tmp_path}/s.duckdb")
        yield lambda **options: ApprovalStore(store, **options)
        store.close()
        return
    import uuid

    from stitchwork.messaging._base import open_bus
    from stitchwork.messaging.bridge import SyncBus
    from stitchwork.messaging.bridge import _run_now as run_now
    from stitchwork.workers.approvals import BusApprovalStore
    from stitchwork.workers.subjects import Subjects

    subjects = Subjects("a" + uuid.uuid4().hex[:8])
    if request.param == "bus-memory":
        bus = run_now(open_bus("memory://"))
        sync = SyncBus("memory://", bus=bus)
    else:
        sync = SyncBus(request.getfixturevalue("nats_url"))
    yield lambda **options: BusApprovalStore(sync, subjects, **options)
    sync.close()


def request(store: ApprovalStore, **args: Any):  # type: ignore[no-untyped-def]
    return store.request(run_id="r1", agent="a", tool="send", target="x@y.z", arguments=args or {"to": "x@y.z"},
                         policy_ids=("p1",), reason="tainted body")


def test_request_is_idempotent_per_exact_call(make: Make) -> None:
    approvals = make()
    first = request(approvals)
    assert request(approvals).id == first.id
    assert request(approvals, to="other@y.z").id != first.id


def test_approve_then_consume_once(make: Make) -> None:
    approvals = make()
    pending = request(approvals)
    assert approvals.consume("r1", "a", "send", {"to": "x@y.z"}) is None
    approvals.decide(pending.id, approve=True, by="op")
    assert approvals.consume("r1", "a", "send", {"to": "x@y.z"}) is not None
    assert approvals.consume("r1", "a", "send", {"to": "x@y.z"}) is None
    assert approvals.get(pending.id).status is ApprovalStatus.USED
    assert request(approvals).id != pending.id  # used: the same call again needs a new approval


def test_deny_and_double_decision(make: Make) -> None:
    approvals = make()
    pending = request(approvals)
    approvals.decide(pending.id, approve=False, by="op", note="no")
    assert approvals.denied("r1", "a", "send", {"to": "x@y.z"}) is not None
    assert approvals.consume("r1", "a", "send", {"to": "x@y.z"}) is None
    with pytest.raises(ApprovalError, match="already denied"):
        approvals.decide(pending.id, approve=True, by="op")
    with pytest.raises(ApprovalError, match="no approval with id"):
        approvals.decide("apv_nope", approve=True, by="op")
    decided = approvals.get(pending.id)
    assert (decided.decided_by, decided.note) == ("op", "no")


def test_unanswered_approval_expires_to_deny(make: Make) -> None:
    clock = Clock()
    approvals = make(timeout_s=60, clock=clock)
    pending = request(approvals)
    assert approvals.expire_due() == []
    clock.now += 61
    assert approvals.get(pending.id).status is ApprovalStatus.EXPIRED
    assert approvals.denied("r1", "a", "send", {"to": "x@y.z"}) is not None
    with pytest.raises(ApprovalError, match="already expired"):
        approvals.decide(pending.id, approve=True, by="op")


def test_expire_due_names_what_it_expired(make: Make) -> None:
    clock = Clock()
    approvals = make(timeout_s=60, clock=clock)
    pending = request(approvals)
    clock.now += 61
    assert approvals.expire_due() == [pending.id]
    assert approvals.expire_due() == []
    assert [a.id for a in approvals.find(ApprovalStatus.EXPIRED)] == [pending.id]


def test_pending_approvals_survive_reopen_and_are_listed(make: Make) -> None:
    pending = request(make())
    other = request(make(), to="b@y.z")
    reopened = make()
    assert [a.id for a in reopened.find()] == [pending.id, other.id]
    reopened.decide(other.id, approve=True, by="op")
    assert [a.id for a in make().find()] == [pending.id]
    assert [a.id for a in make().find(ApprovalStatus.APPROVED)] == [other.id]
    assert {a.id for a in make().find(None)} == {pending.id, other.id}


def test_a_decision_is_seen_by_another_store_on_the_same_backend(make: Make) -> None:
    worker, platform = make(), make()
    pending = request(worker)
    platform.decide(pending.id, approve=True, by="op")
    assert worker.consume("r1", "a", "send", {"to": "x@y.z"}) is not None
    assert platform.consume("r1", "a", "send", {"to": "x@y.z"}) is None  # single use across stores


def test_expire_takes_only_the_named_due_approvals_and_watchers_see_each_new_one(make: Make) -> None:
    clock = Clock()
    approvals = make(clock=clock, timeout_s=60)
    seen: list[str] = []
    approvals.watch(lambda approval: seen.append(approval.id))
    first = request(approvals)
    assert request(approvals).id == first.id  # the open one again: not a new approval
    second = request(approvals, to="b@y.z")
    assert seen == [first.id, second.id]
    assert approvals.expire([first.id, second.id]) == []  # not due yet
    clock.now += 61
    assert approvals.expire([first.id, "apv_missing"]) == [first.id]
    assert approvals.get(first.id).status is ApprovalStatus.EXPIRED
    assert approvals.expire([first.id]) == []  # already expired: not again
    with pytest.raises(ApprovalError, match="already expired"):  # the second is past due too, expired when read
        approvals.decide(second.id, approve=True, by="op")
