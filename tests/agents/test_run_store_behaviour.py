"""One behaviour suite for the run store port, over every adapter.

:class:`DatabaseRunStore` runs on every store adapter (``store`` fixture: ``memory://``, DuckDB, chDB, and
ClickHouse when configured) and :class:`BusRunStore` on every bus (``bus`` fixture: ``memory://`` and NATS). What
only the bus store does (compare-and-set fencing, incremental checkpoint bodies) is tested in ``tests/workers``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest

from stitchwork.agents.runs import THROUGH, DatabaseRunStore, RunRecord, RunStatus, RunStore
from stitchwork.errors import RunError, StoreError
from stitchwork.messaging._base import Bus
from stitchwork.messaging.bridge import SyncBus
from stitchwork.workers.runstore import BusRunStore
from stitchwork.workers.subjects import Subjects
from tests.plugins.stores import StoreFactory

OpenRuns = Callable[[], RunStore]
"""Opens a run store over the backend under test (again: a second one sees what the first stored)."""

MESSAGES = (
    {"role": "system", "content": "You are careful."},
    {"role": "user", "content": "Résumé: \"quotes\", back\\slash, newline\n, emoji \U0001f680"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "send_email", "arguments": "{\"to\": \"a@b\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": {"nested": [1, 2.5, True, None]}},
)


def full_record(run_id: str, *, created_at: float = 1_700_000_000.125) -> RunRecord:
    """A run with every field set to something other than its default."""
    return RunRecord(
        id=run_id, agent="scribe", task="Write the note", model="scripted://fixtures/x.jsonl",
        status=RunStatus.WAITING_APPROVAL, steps=3, messages=MESSAGES,
        provenance={"call_1": {"source": "mail", "trust": "untrusted", "labels": ["external"]}},
        pending={"calls": [{"id": "call_1", "name": "send_email", "arguments": {"to": "a@b"}}],
                 "approvals": ["apv_1"]},
        result="partial é", error="an earlier attempt failed", created_at=created_at, updated_at=created_at + 1.5,
    )


class RunStoreBehaviour:
    """What every run store does; a subclass provides ``open_runs`` for its adapter."""

    @pytest.fixture
    def runs(self, open_runs: OpenRuns) -> RunStore:
        return open_runs()

    def test_create_stores_a_running_run_with_a_fresh_id_and_both_timestamps(self, runs: RunStore) -> None:
        before = time.time()
        record = runs.create("scribe", "Write the note", "scripted://m")
        after = time.time()
        assert record.id.startswith("run_") and len(record.id) == len("run_") + 16
        assert (record.agent, record.task, record.model) == ("scribe", "Write the note", "scripted://m")
        assert (record.status, record.steps, record.messages, record.provenance, record.pending) == (
            RunStatus.RUNNING, 0, (), {}, {})
        assert record.result is None and record.error is None
        assert before <= record.created_at == record.updated_at <= after
        assert runs.get(record.id) == record
        assert runs.create("scribe", "Write the note", "scripted://m").id != record.id

    def test_every_field_round_trips_through_save_and_get(self, runs: RunStore, open_runs: OpenRuns) -> None:
        created = runs.create("scribe", "Write the note", "scripted://fixtures/x.jsonl")
        full = replace(full_record(created.id), created_at=created.created_at)
        before = time.time()
        saved = runs.save(full)
        assert before <= saved.updated_at <= time.time()
        assert saved == replace(full, updated_at=saved.updated_at)
        assert runs.get(created.id) == saved
        assert open_runs().get(created.id) == saved  # stored, not only remembered

    def test_insert_stores_a_record_exactly_as_given(self, runs: RunStore, open_runs: OpenRuns) -> None:
        record = full_record("run_inserted000001")
        assert runs.insert(record) == record
        assert runs.get(record.id) == record
        assert open_runs().get(record.id) == record

    def test_save_replaces_the_checkpoint_and_keeps_created_at(self, runs: RunStore) -> None:
        record = runs.create("scribe", "t", "m")
        first = runs.save(replace(record, steps=1, messages=MESSAGES[:2]))
        second = runs.save(replace(first, steps=2, messages=MESSAGES))
        assert runs.get(record.id) == second
        assert (second.steps, second.messages) == (2, MESSAGES)
        assert second.created_at == record.created_at <= first.updated_at <= second.updated_at
        assert [r.id for r in runs.list()] == [record.id]  # one run, however many checkpoints

    async def test_asave_stores_like_save(self, runs: RunStore) -> None:
        record = runs.create("scribe", "t", "m")
        saved = await runs.asave(replace(record, steps=4, result="done"))
        assert saved.updated_at >= record.updated_at
        assert runs.get(record.id) == saved == replace(record, steps=4, result="done", updated_at=saved.updated_at)

    def test_an_unknown_id_is_a_run_error(self, runs: RunStore) -> None:
        runs.create("scribe", "t", "m")
        assert runs.fetch("run_0000000000000000") is None
        with pytest.raises(RunError, match="no run with id 'run_0000000000000000'"):
            runs.get("run_0000000000000000")

    def test_list_is_newest_first_limited_and_filtered_by_status(self, runs: RunStore) -> None:
        statuses = {100.0: RunStatus.COMPLETED, 300.0: RunStatus.RUNNING, 200.0: RunStatus.COMPLETED,
                    400.0: RunStatus.FAILED}
        for created_at, status in statuses.items():  # not in created_at order
            runs.insert(RunRecord(id=f"run_{int(created_at):016d}", agent="a", task="t", model="m", status=status,
                                  created_at=created_at, updated_at=created_at))
        assert [r.created_at for r in runs.list()] == [400.0, 300.0, 200.0, 100.0]
        assert [r.created_at for r in runs.list(limit=2)] == [400.0, 300.0]
        assert [r.created_at for r in runs.list(status=RunStatus.COMPLETED)] == [200.0, 100.0]
        assert [r.created_at for r in runs.list(status=RunStatus.COMPLETED, limit=1)] == [200.0]
        assert runs.list(status=RunStatus.WAITING_APPROVAL) == []
        assert runs.list()[1] == runs.get("run_0000000000000300")

    def test_status_transitions_are_stored_and_listed(self, runs: RunStore) -> None:
        record = runs.create("scribe", "t", "m")
        waiting = runs.save(replace(record, status=RunStatus.WAITING_APPROVAL,
                                    pending={"calls": [{"id": "c1", "name": "send_email"}], "approvals": ["apv_9"]}))
        assert runs.get(record.id).status is RunStatus.WAITING_APPROVAL
        assert runs.get(record.id).to_dict()["pending_approvals"] == ["apv_9"]
        assert [r.id for r in runs.list(status=RunStatus.WAITING_APPROVAL)] == [record.id]
        resumed = runs.save(replace(waiting, status=RunStatus.RUNNING, pending={}))
        assert runs.list(status=RunStatus.WAITING_APPROVAL) == []
        assert [r.id for r in runs.list(status=RunStatus.RUNNING)] == [record.id]
        done = runs.save(replace(resumed, status=RunStatus.COMPLETED, steps=2, result="sent"))
        got = runs.get(record.id)
        assert got == done and got.status.finished and not resumed.status.finished
        assert [r.id for r in runs.list(status=RunStatus.COMPLETED)] == [record.id]
        assert runs.list(status=RunStatus.RUNNING) == []
        for status in (RunStatus.FAILED, RunStatus.BUDGET_EXHAUSTED):
            other = runs.create("scribe", "t", "m")
            ended = runs.save(replace(other, status=status, error=f"{status.value}: why"))
            assert runs.get(other.id) == ended and ended.status.finished
            assert runs.get(other.id).to_dict(messages=False)["error"] == f"{status.value}: why"

    def test_incremental_checkpoints_append_to_the_provenance(self, runs: RunStore, open_runs: OpenRuns) -> None:
        record = runs.create("scribe", "t", "m")
        base = {"untrusted": [], "trusted": ["the task"], "confidential": []}
        runs.save(replace(record, provenance=base))
        runs.checkpoint(record.id, 1, {"untrusted": [["mcp:a", "out 1", ""]], "trusted": [], "confidential": []})
        runs.checkpoint(record.id, 2, {"untrusted": [], "trusted": [], "confidential": []})  # the steps only
        runs.checkpoint(record.id, 3, {"untrusted": [["mcp:a", "out 2", "secret"]], "trusted": ["t2"],
                                       "confidential": [["vault", "k"]]})
        want = {"untrusted": [["mcp:a", "out 1", ""], ["mcp:a", "out 2", "secret"]], "trusted": ["the task", "t2"],
                "confidential": [["vault", "k"]]}
        got = open_runs().get(record.id)  # stored, not only remembered
        assert got.steps == 3 and provenance_of(got) == want
        runs.checkpoint("run_0000000000000000", 1, {"trusted": ["x"]})  # no such run: nothing is created
        assert runs.fetch("run_0000000000000000") is None
        # A full save of what was fetched holds them all once (no duplicates on the next fetch) ...
        done = runs.save(replace(got, status=RunStatus.COMPLETED))
        again = open_runs().get(record.id)
        assert provenance_of(again) == want and again.status is RunStatus.COMPLETED
        assert [provenance_of(r) for r in runs.list() if r.id == record.id] == [want]
        # ... and a checkpoint after it, from this store or a new one, is appended after them.
        open_runs().checkpoint(record.id, 4, {"untrusted": [["mcp:b", "out 3", ""]]})  # a store opened since
        runs.checkpoint(record.id, 5, {"trusted": ["t3"]})
        final = open_runs().get(record.id)
        assert final.steps == 5 and final.status is RunStatus.COMPLETED and done.steps == 3
        assert provenance_of(final) == {**want, "untrusted": [*want["untrusted"], ["mcp:b", "out 3", ""]],
                                        "trusted": [*want["trusted"], "t3"]}


def provenance_of(record: RunRecord) -> dict[str, Any]:
    """The record's provenance without the bookkeeping key of folded incremental checkpoints."""
    return {k: v for k, v in record.provenance.items() if k != THROUGH}


class TestDatabaseRunStore(RunStoreBehaviour):
    """The platform's database: the ``runs`` table of every store adapter."""

    @pytest.fixture
    def open_runs(self, make_store: StoreFactory) -> OpenRuns:
        return lambda: DatabaseRunStore(make_store())


    def test_a_fold_cut_short_duplicates_nothing(self, make_store: StoreFactory) -> None:
        store = make_store()
        runs = DatabaseRunStore(store)
        record = runs.create("scribe", "t", "m")
        runs.checkpoint(record.id, 1, {"untrusted": [["mcp:a", "out 1", ""]]})
        got = runs.get(record.id)
        real = store.execute

        def no_delete(sql: str, params: Sequence[Any] = ()) -> None:
            if sql.startswith("DELETE"):
                raise StoreError("killed before the delete")
            real(sql, params)

        store.execute = no_delete  # type: ignore[method-assign]
        with pytest.raises(StoreError):
            runs.save(replace(got, steps=2))  # the record holds the delta; the delta row is still there
        store.execute = real  # type: ignore[method-assign]
        runs.checkpoint(record.id, 3, {"untrusted": [["mcp:a", "out 2", ""]]})
        again = DatabaseRunStore(store).get(record.id)
        assert again.steps == 3
        assert provenance_of(again) == {"untrusted": [["mcp:a", "out 1", ""], ["mcp:a", "out 2", ""]]}


class TestBusRunStore(RunStoreBehaviour):
    """A worker's: checkpoints on every bus adapter (each test under its own subject prefix)."""

    @pytest.fixture
    def open_runs(self, bus: Bus, bus_uri: str, root: str) -> Iterator[OpenRuns]:
        opened: list[SyncBus] = []

        def open_runs() -> RunStore:
            sync = SyncBus(bus_uri, bus=bus)
            opened.append(sync)
            return BusRunStore(sync, Subjects(root), abus=bus)

        yield open_runs
        for sync in opened:
            sync.close()
