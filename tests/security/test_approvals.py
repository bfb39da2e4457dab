import pytest

from stitchwork.data._base import open_store
from stitchwork.errors import ApprovalError
from stitchwork.security.approvals import ApprovalStatus, ApprovalStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(store: ApprovalStore, **args: str):  # type: ignore[no-untyped-def]
    return store.request(run_id="r1", agent="a", tool="send", target="x@y.z", arguments=args or {"to": "x@y.z"},
                         policy_ids=("p1",), reason="tainted body")


def test_request_is_idempotent_per_exact_call() -> None:
    approvals = ApprovalStore(open_store("memory://"))
    first = request(approvals)
    assert request(approvals).id == first.id
    assert request(approvals, to="other@y.z").id != first.id


def test_approve_then_consume_once() -> None:
    approvals = ApprovalStore(open_store("memory://"))
    pending = request(approvals)
    assert approvals.consume("r1", "a", "send", {"to": "x@y.z"}) is None
    approvals.decide(pending.id, approve=True, by="op")
    assert approvals.consume("r1", "a", "send", {"to": "x@y.z"}) is not None
    assert approvals.consume("r1", "a", "send", {"to": "x@y.z"}) is None
    assert approvals.get(pending.id).status is ApprovalStatus.USED


def test_deny_and_double_decision() -> None:
    approvals = ApprovalStore(open_store("memory://"))
    pending = request(approvals)
    approvals.decide(pending.id, approve=False, by="op", note="no")
    assert approvals.denied("r1", "a", "send", {"to": "x@y.z"}) is not None
    with pytest.raises(ApprovalError, match="already denied"):
        approvals.decide(pending.id, approve=True, by="op")
    with pytest.raises(ApprovalError, match="no approval with id"):
        approvals.decide("apv_nope", approve=True, by="op")


def test_unanswered_approval_expires_to_deny() -> None:
    clock = Clock()
    approvals = ApprovalStore(open_store("memory://"), timeout_s=60, clock=clock)
    pending = request(approvals)
    clock.now += 61
    assert approvals.get(pending.id).status is ApprovalStatus.EXPIRED
    assert approvals.denied("r1", "a", "send", {"to": "x@y.z"}) is not None
    with pytest.raises(ApprovalError, match="already expired"):
        approvals.decide(pending.id, approve=True, by="op")


def test_pending_approvals_survive_reopen(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = f"duckdb://{tmp_path}/s.duckdb"
    store = open_store(uri)
    pending = request(ApprovalStore(store))
    store.close()
    reopened = ApprovalStore(open_store(uri))
    assert [a.id for a in reopened.find()] == [pending.id]
