"""A conformance suite every CheckpointStore must pass, and a clock for tests of loops. Needs pytest.

Subclass :class:`StoreConformance` in a test module and give it a ``store``
fixture that returns a fresh, empty store::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def store(self, tmp_path):
            return MyStore(tmp_path / "db")

Every test then runs against that store: round-trips, ordering, duplicate
commits, totals, charges and leases.

:class:`FakeClock` is a clock a test moves by hand (``@loop(clock=FakeClock())``), so that a test of a
wall-clock cap or a backoff wait never sleeps.
"""

from __future__ import annotations

import json
import math
import time
from decimal import Decimal
from typing import Any

import pytest

from loomc.errors import LeaseLost, RunLocked, RunNotFound, StepConflict, StoreError
from loomc.stores.base import CheckpointStore, Drive, RunRecord, StoredStep, Totals

class FakeClock:
    """A clock a test moves by hand: ``clock.advance(60)`` inside ``fn`` stands for a call of a minute. A
    backtracker's backoff wait sleeps on it (``sleep``), so it moves on and nobody waits."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    sleep = advance


OWNER = "conformance-host:1:owner"
OTHER = "conformance-host:2:other"


def make_run(run_id: str = "run-1", created_at: float | None = None, **fields: Any) -> RunRecord:
    now = time.time() if created_at is None else created_at
    return RunRecord(id=run_id, status="running", spec_hash="h", fn_path="m:f", policy="Budget(iterations=3)",
                     initial_state='{"x": 0}', created_at=now, updated_at=now, owner=OWNER,
                     lease_expires=now + 600, **fields)


def make_step(n: int, state: Any = None, cost: str = "0.05", **fields: Any) -> StoredStep:
    return StoredStep(n=n, state_json=json.dumps(state if state is not None else {"n": n}, ensure_ascii=False),
                      cost=Decimal(cost), started_at=time.time(), **fields)


def commit(store: CheckpointStore, run_id: str, steps: list[StoredStep], owner: str | None = OWNER) -> None:
    total = Decimal(0)
    for i, step in enumerate(steps):
        total += step.cost
        store.commit_step(run_id, step, Totals(total, i + 1, float(i)), owner, 600)


class StoreConformance:
    """The behaviour loomc relies on from a store. Provide a ``store`` fixture."""

    def test_a_run_round_trips(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        got = store.get_run("r1")
        assert (got.id, got.status, got.spec_hash, got.fn_path, got.initial_state) == \
            ("r1", "running", "h", "m:f", '{"x": 0}')

    def test_the_time_its_process_was_last_seen_is_kept_and_a_claim_sets_it(self, store: CheckpointStore) -> None:
        """``seen_at``: a resume counts a call whose process died as active time from its start until then, so a
        claim sets it to the claim's own time (``updated_at``): time from before the claim never counts."""
        store.create_run(make_run("r1", seen_at=1234.5).replace(lease_expires=time.time() - 1))
        assert store.get_run("r1").seen_at == 1234.5
        claimed = store.claim_run("r1", OTHER, 600)
        for got in (claimed, store.get_run("r1")):
            assert got.seen_at == got.updated_at and got.seen_at > 1234.5

    def test_an_unknown_run_is_named_in_the_error(self, store: CheckpointStore) -> None:
        with pytest.raises(RunNotFound, match="nope"):
            store.get_run("nope")
        with pytest.raises(RunNotFound, match="nope"):
            store.load_steps("nope")

    def test_a_run_id_is_created_once(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        with pytest.raises(StepConflict):
            store.create_run(make_run("r1"))

    @pytest.mark.parametrize("state", [
        {"text": "naïve café ☕ — 日本語 🚀", "nested": {"list": [1, 2.5, None, True], "deep": {"a": {"b": "c"}}}},
        {"big": "x" * 1_200_000},
        [1, "two", {"three": [3]}],
        "just a string",
    ])
    def test_states_round_trip_exactly(self, store: CheckpointStore, state: Any) -> None:
        store.create_run(make_run("r1"))
        commit(store, "r1", [make_step(0, state)])
        (got,) = store.load_steps("r1")
        assert got.state_json is not None and json.loads(got.state_json) == state

    def test_steps_come_back_in_step_order_with_every_field(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        steps = [make_step(0, score=0.25, duration=1.5, metrics={"d": 0.1}, events=("backtrack to step 0",)),
                 make_step(1, score=None, error="RuntimeError: rate limit", cost="0"),
                 make_step(2, score=float("nan"))]
        commit(store, "r1", steps)
        got = store.load_steps("r1")
        assert [s.n for s in got] == [0, 1, 2]
        assert got[0].score == 0.25 and got[0].duration == 1.5 and got[0].metrics == {"d": 0.1}
        assert got[0].events == ("backtrack to step 0",)
        assert got[1].error == "RuntimeError: rate limit" and got[1].score is None
        assert got[2].score is not None and math.isnan(got[2].score)
        assert all(isinstance(s.cost, Decimal) for s in got)

    def test_latest_means_the_highest_step_number_not_the_newest_timestamp(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        late_clock = time.time() + 1000
        commit(store, "r1", [StoredStep(0, '{"n": 0}', Decimal(0), started_at=late_clock),
                             StoredStep(1, '{"n": 1}', Decimal(0), started_at=late_clock - 500)])
        assert store.load_steps("r1")[-1].n == 1

    def test_states_can_be_left_out_of_a_listing(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        commit(store, "r1", [make_step(0), make_step(1)])
        assert [s.state_json for s in store.load_steps("r1", with_states=False)] == [None, None]

    def test_one_step_reads_back_whole_where_the_store_offers_load_step(self, store: CheckpointStore) -> None:
        """Optional for a store of your own: with ``load_step(run_id, n)`` loomc keeps large states out of
        memory. A store that leaves it out sets this test to ``None`` in its subclass."""
        load_step = store.load_step  # type: ignore[attr-defined]
        store.create_run(make_run("r1"))
        commit(store, "r1", [make_step(0, {"first": "é" * 10}), make_step(1, {"big": "x" * 100_000})])
        got = load_step("r1", 1)
        assert got.n == 1 and json.loads(got.state_json) == {"big": "x" * 100_000}
        with pytest.raises(StoreError, match="no step 2"):
            load_step("r1", 2)

    def test_a_step_number_is_committed_at_most_once(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        commit(store, "r1", [make_step(0, {"first": True})])
        with pytest.raises(StepConflict, match="step 0"):
            store.commit_step("r1", make_step(0, {"second": True}), Totals(Decimal("0.10"), 1, 0.0), OWNER, 600)
        (got,) = store.load_steps("r1")
        assert json.loads(got.state_json or "") == {"first": True}
        assert store.get_run("r1").total_cost == Decimal("0.05"), "a refused commit changes no total"

    def test_totals_are_committed_with_each_step(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        commit(store, "r1", [make_step(i, cost="0.1") for i in range(3)])
        run = store.get_run("r1")
        assert run.total_cost == Decimal("0.3") and run.steps == 3 and run.active_seconds == 2.0

    def test_finishing_records_status_and_reason_and_releases_the_lease(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        commit(store, "r1", [make_step(0, cost="0.1"), make_step(1, cost="0.2")])
        store.finish_run("r1", "budget_exhausted", "usd: cap", OWNER)
        run = store.get_run("r1")
        assert (run.status, run.reason, run.owner) == ("budget_exhausted", "usd: cap", None)
        assert (run.total_cost, run.steps, run.active_seconds) == (Decimal("0.3"), 2, 1.0), \
            "a finished run keeps its totals"

    def test_runs_list_newest_first_with_filters(self, store: CheckpointStore) -> None:
        for i in range(5):
            store.create_run(make_run(f"r{i}", created_at=1000.0 + i))
        store.finish_run("r3", "completed", "done", OWNER)
        assert [r.id for r in store.list_runs()] == ["r4", "r3", "r2", "r1", "r0"]
        assert [r.id for r in store.list_runs(status="completed")] == ["r3"]
        assert [r.id for r in store.list_runs(limit=2)] == ["r4", "r3"]

    def test_a_live_lease_refuses_a_second_owner_and_an_expired_one_is_taken_over(
            self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        with pytest.raises(RunLocked, match="r1"):
            store.claim_run("r1", OTHER, 600)
        store.create_run(make_run("r2").replace(lease_expires=time.time() - 1))
        taken = store.claim_run("r2", OTHER, 600, note="took over")
        assert taken.owner == OTHER and taken.attempts == 2 and "took over" in taken.notes
        with pytest.raises(RunLocked):
            store.commit_step("r2", make_step(0), Totals(Decimal("0.05"), 1, 0.0), OWNER, 600)

    def test_an_owner_that_lost_the_run_neither_commits_nor_says_how_it_ended(self, store: CheckpointStore) -> None:
        """Its lease ran out (the machine slept) and another owner took the run over, and perhaps ended it: the
        first owner's commit raises LeaseLost, and its finish leaves the run as the other owner left it."""
        store.create_run(make_run("r1").replace(lease_expires=time.time() - 1))
        store.claim_run("r1", OTHER, 600)
        with pytest.raises(LeaseLost, match=f"{OTHER} drives it now"):
            store.commit_step("r1", make_step(0), Totals(Decimal("0.05"), 1, 0.0), OWNER, 600)
        store.finish_run("r1", "failed", "LeaseLost", OWNER)
        assert (store.get_run("r1").status, store.get_run("r1").owner) == ("running", OTHER)
        commit(store, "r1", [make_step(0)], owner=OTHER)
        store.finish_run("r1", "completed", "done", OTHER)
        with pytest.raises(LeaseLost, match="it has ended since; status completed"):
            store.commit_step("r1", make_step(1), Totals(Decimal("0.10"), 2, 1.0), OWNER, 600)
        store.finish_run("r1", "failed", "LeaseLost", OWNER)
        run = store.get_run("r1")
        assert (run.status, run.reason, run.steps) == ("completed", "done", 1)

    def test_take_over_takes_a_fresh_lease_but_never_from_a_live_drive_of_this_process(
            self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))  # OWNER: another process, its lease fresh for 600 s
        taken = store.claim_run("r1", OTHER, 600, take_over=True)
        assert taken.owner == OTHER and taken.attempts == 2
        drive = Drive()
        store.create_run(make_run("r2").replace(owner=drive.owner))
        with pytest.raises(RunLocked, match="already being run in this process"):
            store.claim_run("r2", OTHER, 600, take_over=True)

    def test_children_are_listed_by_parent_step_then_creation(self, store: CheckpointStore) -> None:
        store.create_run(make_run("p"))
        store.create_run(make_run("other"))
        for run_id, step, created in (("p-1-0", 1, 3.0), ("p-0-1", 0, 2.0), ("p-0-0", 0, 1.0)):
            store.create_run(make_run(run_id, created_at=created).replace(parent_run_id="p", parent_step=step))
        commit(store, "p-1-0", [make_step(0, cost="0.1"), make_step(1, cost="0.2")])
        kids = store.children("p")
        assert [(r.id, r.parent_step) for r in kids] == [("p-0-0", 0), ("p-0-1", 0), ("p-1-0", 1)]
        assert kids[2].total_cost == Decimal("0.3"), "a child's totals are its latest commit's"
        assert store.children("other") == [] and store.children("p-0-0") == []

    def test_write_ahead_charges_are_pending_until_their_step_commits(self, store: CheckpointStore) -> None:
        store.create_run(make_run("r1"))
        store.charge("r1", 0, Decimal("0.02"))
        store.charge("r1", 0, Decimal("0.03"))
        assert store.pending_charges("r1") == {0: Decimal("0.05")}
        commit(store, "r1", [make_step(0)])
        assert store.pending_charges("r1") == {}
        store.charge("r1", 1, Decimal(0))  # kept too: it says the call of step 1 began (after a backoff wait)
        assert store.pending_charges("r1") == {1: Decimal(0)}
        store.commit_step("r1", make_step(1), Totals(Decimal(0), 2, 1.0), OWNER, 600)
        assert store.pending_charges("r1") == {}
