"""Nested loops: children are billed to their parent once, bound by its cap, and resumed, not re-run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from contextlib import closing
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

import loomc
from conftest import db_flag
from loomc import Budget, SQLiteStore, loop, predicate
from loomc.cli import main

HERE = Path(__file__).parent


def test_the_parents_cap_binds_the_child_and_the_child_says_so(tmp_path):
    db = str(tmp_path / "cap.db")

    @loop(budget=Budget(usd=5.00), cost_fn=lambda s: 0.10, checkpoint=db)
    def child(state):
        return state + 1

    @loop(budget=Budget(usd=1.00, iterations=3), checkpoint=db)
    def parent(state):
        loomc.charge(0.35)  # the parent's own call, paid before it starts the child
        if loomc.step_number() == 1:
            state["child"] = child.run(0).status
        return state

    run = parent.run({})
    # Step 1 starts with $0.35 spent and $0.35 charged: the child, whose own cap is $5, gets $0.30.
    kid = SQLiteStore(db).get_run(f"{run.id}-1-0")
    assert kid.status == "budget_exhausted" and kid.total_cost == Decimal("0.30")
    assert f"parent run {run.id}" in kid.reason
    assert kid.parent_run_id == run.id and kid.parent_step == 1
    assert run.history[1].cost == Decimal("0.65")
    assert run.total_cost == Decimal("1.00") and run.status == "budget_exhausted", "never over the parent's cap"


def test_the_parents_wall_clock_binds_its_children_down_every_level(tmp_path):
    """Regression: a child ran its own 30 calls of 0.1 s inside one step of a parent capped at 1 s, so
    the parent's run took 3 s; only the USD cap was passed down."""
    from conftest import FakeClock
    db, clock = str(tmp_path / "clock.db"), FakeClock()

    @loop(budget=Budget(iterations=30), clock=clock, checkpoint=db)
    def grandchild(state):
        clock.advance(0.1)  # each call takes 0.1 s of everybody's time
        return state + 1

    @loop(budget=Budget(iterations=5), clock=clock, checkpoint=db)  # no wall-clock cap of its own
    def child(state):
        return grandchild.run(state).state

    @loop(budget=Budget(wall_clock="1s", iterations=5), clock=clock, checkpoint=db)
    def parent(state):
        clock.advance(0.35)  # the parent's own call, before it starts the child
        return child.run(state).state

    with pytest.raises(loomc.BudgetExhausted) as e:
        parent(0)
    store = SQLiteStore(db)
    kid, grandkid = store.get_run(f"{e.value.run_id}-0-0"), store.get_run(f"{e.value.run_id}-0-0-0-0")
    # 0.35 s + 6 x 0.1 s leaves 0.05 s, less than a call takes: the parent's cap is counted ahead, as the
    # child's own would be, so the seventh call, which would end past it, is not made.
    assert grandkid.steps == 6 and grandkid.status == "budget_exhausted"
    assert grandkid.reason == (f"wall_clock: the parent run {kid.id}'s wall-clock budget leaves 0.05s for this child; "
                               "0.10s for the next call (as long as step 0, the longest yet) would pass it")
    assert kid.steps == 1 and kid.status == "budget_exhausted" and e.value.state == 6
    assert len(e.value.history) == 1 and e.value.reason == (
        "wall_clock: 0.95s active + 0.95s for the next call (as long as step 0, the longest yet) would pass the 1s cap")


def test_a_childs_call_may_end_exactly_at_its_parents_wall_clock_cap(tmp_path):
    """As under a cap of its own: the parent's cap stops a child only when the next call, counted at the
    child's longest, would end past it. Five calls of 2 minutes fill a 10-minute cap; the sixth is not made."""
    from conftest import FakeClock
    db, clock = str(tmp_path / "edge.db"), FakeClock()

    @loop(budget=Budget(iterations=10), clock=clock, checkpoint=db)
    def child(state):
        clock.advance(120)
        return state + 1

    @loop(budget=Budget(wall_clock="10m", iterations=1), clock=clock, checkpoint=db)
    def parent(state):
        return child.run(state).state

    run = parent.run(0)
    kid = SQLiteStore(db).get_run(f"{run.id}-0-0")
    assert run.state == 5 and kid.steps == 5 and run.active_seconds == 600
    assert kid.reason == f"wall_clock: the parent run {run.id}'s wall-clock budget has no time left for this child"


def test_exact_totals_across_three_levels(tmp_path):
    db = str(tmp_path / "three.db")

    @loop(budget=Budget(iterations=3), cost_fn=lambda s: "0.001", checkpoint=db)
    def grandchild(state):
        return state + 1

    @loop(budget=Budget(iterations=2), cost_fn=lambda s: "0.01", checkpoint=db)
    def child(state):
        return state + grandchild.run(0).state

    @loop(budget=Budget(usd=10, iterations=4), cost_fn=lambda s: "0.1", checkpoint=db)
    def parent(state):
        return state + child.run(0).state

    run = parent.run(0)
    assert run.state == 4 * 2 * 3
    # each parent step: 0.1 + 2 * (0.01 + 3 * 0.001) = 0.126
    assert run.total_cost == Decimal("0.504")
    store = SQLiteStore(db)
    assert store.get_run(run.id).total_cost == Decimal("0.504")
    kids = store.children(run.id)
    assert len(kids) == 4 and all(k.total_cost == Decimal("0.026") for k in kids)
    grandkids = [g for k in kids for g in store.children(k.id)]
    assert len(grandkids) == 8 and all(g.total_cost == Decimal("0.003") for g in grandkids)
    assert sum((s.cost for s in store.load_steps(run.id)), Decimal(0)) == Decimal("0.504")
    out = CliRunner().invoke(main, ["show", run.id, "--db", db]).output
    assert f"[child {run.id}-0-0: $0.0260]" in out
    listing = CliRunner().invoke(main, ["runs", "--db", db]).output
    assert listing.count("(child)") == 12
    header, _, *rows, total = listing.splitlines()
    assert total == "13 runs, $0.5040 in all (a child run's spend counted once, in its parent's)", "not thrice"
    column = header.index("STATUS")  # a child's longer id widens the column; it never pushes the status over
    assert all(row[column - 2:column] == "  " and row[column:].split()[0] in ("completed", "budget_exhausted")
               for row in rows), listing


def test_sync_inside_async_async_inside_sync(tmp_path):
    db = str(tmp_path / "mixed.db")

    @loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.01, checkpoint=db)
    def sync_child(state):
        return state + 1

    @loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.02, checkpoint=db)
    async def async_child(state):
        await asyncio.sleep(0)
        return state + 10

    @loop(budget=Budget(iterations=2), checkpoint=db)
    async def async_parent(state):
        return state + sync_child.run(0).state + (await async_child.run(0)).state

    @loop(budget=Budget(iterations=2), checkpoint=db)
    def sync_parent(state):
        return state + asyncio.run(async_child.run(0)).state

    a = asyncio.run(async_parent.run(0))
    assert a.state == 2 * (2 + 20) and a.total_cost == Decimal("0.12")
    s = sync_parent.run(0)
    assert s.state == 2 * 20 and s.total_cost == Decimal("0.08")
    store = SQLiteStore(db)
    assert {k.id for k in store.children(a.id)} == {f"{a.id}-0-0", f"{a.id}-0-1", f"{a.id}-1-0", f"{a.id}-1-1"}


def test_children_in_one_async_step_run_concurrently_with_stable_ids(tmp_path):
    db = str(tmp_path / "gather.db")

    @loop(budget=Budget(iterations=3), cost_fn=lambda s: 0.01, checkpoint=db)
    async def worker(state):
        await asyncio.sleep(0.001 * (3 - state["i"]))
        return {**state, "n": state["n"] + 1}

    @loop(budget=Budget(iterations=1), checkpoint=db)
    async def fan_out(state):
        runs = await asyncio.gather(*(worker.run({"i": i, "n": 0}) for i in range(3)))
        return [r.state["i"] for r in runs]

    run = asyncio.run(fan_out.run(None))
    store = SQLiteStore(db)
    for i in range(3):
        kid = store.get_run(f"{run.id}-0-{i}")
        assert json.loads(store.load_steps(kid.id)[0].state_json)["i"] == i
    assert run.total_cost == Decimal("0.09")


def test_a_crash_inside_a_child_is_resumed_through_the_parent_exactly_once(tmp_path):
    db, marker = tmp_path / "nested.db", tmp_path / "crashed-once"
    first = subprocess.run([sys.executable, str(HERE / "nested_crashy.py"), str(db), str(marker)],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == -9, first.stderr  # SIGKILL
    store = SQLiteStore(db)
    assert store.get_run("nested").steps == 1
    crashed_child = store.get_run("nested-1-0")
    assert crashed_child.status == "running" and crashed_child.steps == 2
    second = subprocess.run([sys.executable, str(HERE / "nested_crashy.py"), str(db), str(marker)],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"done": 3, "child_n": 12}
    kids = store.children("nested")
    assert [k.id for k in kids] == ["nested-0-0", "nested-1-0", "nested-2-0"], "no fresh child for step 1"
    for kid in kids:
        steps = store.load_steps(kid.id)
        # the child's step 2, which the process died in, counts as an interrupted call; its retry is step 3
        assert [s.events for s in steps] == [(), (), ("interrupted",), (), ("converged",)] if kid.id == "nested-1-0" \
            else [s.n for s in steps] == [0, 1, 2, 3]
        assert kid.status == "completed"
    resumed = store.get_run("nested-1-0")
    assert resumed.attempts == 2
    parent = store.get_run("nested")
    assert parent.status == "completed" and parent.total_cost == Decimal("0.12")
    assert [s.cost for s in store.load_steps("nested")] == [Decimal("0.04")] * 3


def test_taking_over_a_parent_takes_over_the_children_its_gone_process_left_running(tmp_path):
    """Regression: the parent was taken over, and its step then failed with RunLocked on its own
    child, which the same gone process had been running."""
    import sqlite3
    import time
    db, marker = tmp_path / "nested.db", tmp_path / "crashed-once"
    first = subprocess.run([sys.executable, str(HERE / "nested_crashy.py"), str(db), str(marker)],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == -9, first.stderr
    resume = ("import json, sys\nsys.argv = ['nested_crashy.py', sys.argv[1], sys.argv[2]]\n"
              "import nested_crashy\nprint(json.dumps(nested_crashy.parent.resume('nested', take_over=True)))")

    def left_by(parent_owner, child_owner):  # as a pod on another host left them: running, leases fresh
        with closing(sqlite3.connect(db)) as conn, conn:
            for run_id, owner in (("nested", parent_owner), ("nested-1-0", child_owner)):
                conn.execute("UPDATE runs SET status = 'running', owner = ?, lease_expires = ? WHERE id = ?",
                             (owner, time.time() + 600, run_id))

    left_by("pod-a:1:t55.aaaaaa", "pod-b:1:t77.bbbbbb")  # the child is another process's: not taken
    locked = subprocess.run([sys.executable, "-c", resume, str(db), str(marker)], capture_output=True,
                            text=True, timeout=120, cwd=HERE)
    assert locked.returncode == 1 and "RunLocked: run nested-1-0 is being run by pod-b:1:t77.bbbbbb" in locked.stderr
    store = SQLiteStore(db)
    assert [s.n for s in store.load_steps("nested")] == [0], "a locked child is no failure of the parent's step"
    assert store.get_run("nested").reason.startswith("RunLocked: run nested-1-0 is being run by pod-b")
    left_by("pod-a:1:t55.aaaaaa", "pod-a:1:t55.cccccc")  # one process, two drives: the child goes along
    second = subprocess.run([sys.executable, "-c", resume, str(db), str(marker)], capture_output=True,
                            text=True, timeout=120, cwd=HERE)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"done": 3, "child_n": 12}
    child = store.get_run("nested-1-0")
    assert child.status == "completed" and "taken over from pod-a:1:t55.cccccc" in child.notes
    assert [s.n for s in store.load_steps("nested-1-0") if s.error is None] == [0, 1, 3, 4]  # 2: interrupted
    assert store.get_run("nested").total_cost == Decimal("0.12")


def test_a_crash_after_a_child_completed_reuses_it_instead_of_paying_twice(tmp_path):
    db, marker = tmp_path / "after.db", tmp_path / "crashed-once"
    script = [sys.executable, str(HERE / "nested_crashy.py"), str(db), str(marker), "after"]
    assert subprocess.run(script, capture_output=True, timeout=120).returncode == -9
    store = SQLiteStore(db)
    assert store.get_run("nested-1-0").status == "completed" and store.get_run("nested").steps == 1
    done = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"done": 3, "child_n": 12}
    reused = store.get_run("nested-1-0")
    assert reused.attempts == 1 and reused.steps == 4, "the completed child was not run again"
    assert store.get_run("nested").total_cost == Decimal("0.12")


def test_a_reused_child_that_is_passed_another_state_says_so(tmp_path):
    """The parent's step ran again after a crash and called its completed child with another state:
    the child's stored result (from the old state) was reused without a word."""
    db, marker = tmp_path / "changed.db", tmp_path / "crashed-once"
    script = [sys.executable, str(HERE / "nested_crashy.py"), str(db), str(marker), "changed"]
    assert subprocess.run(script, capture_output=True, timeout=120).returncode == -9
    done = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"done": 3, "child_n": 12}
    assert SQLiteStore(db).get_run("nested-1-0").attempts == 1, "reused, not run again"
    assert ("StateMismatchWarning: child run nested-1-0 is stored (step 1 of run nested is running again), so its "
            "result is reused and nothing is paid for twice; but the state passed to it now differs from the one it "
            "started with: state['first_try'] is False in the state passed, True in the stored one. To start a new "
            "child for a new state, give the child a run_id= derived from its state (a hash of it)") in done.stderr
    assert done.stderr.count("StateMismatchWarning") == 1, "only the child the re-run step met again"
    assert "nested_crashy.py" in done.stderr.split("StateMismatchWarning")[0].splitlines()[-1], "at the child's call"


def test_a_child_named_once_and_called_by_every_step_says_the_later_steps_get_the_first_result(tmp_path):
    from loomc import StateMismatchWarning
    db = str(tmp_path / "named.db")

    @loop(budget=Budget(iterations=3), converge_on=predicate(lambda h: True), checkpoint=db)
    def summary(state: dict) -> dict:
        return {**state, "words": len(state["text"].split())}

    @loop(budget=Budget(iterations=2), checkpoint=db)
    def write(state: dict) -> dict:
        text = state["text"] + " more"
        return {"text": text, "words": summary({"text": text}, run_id="summary")["words"]}

    with pytest.warns(StateMismatchWarning) as told:
        run = write.run({"text": "a draft"}, run_id="w")
    assert run.state == {"text": "a draft more more", "words": 3}, "step 1 got step 0's summary"
    assert [str(w.message) for w in told] == [
        "child run summary is stored (started in step 0 of run w), so its result is reused and nothing is paid for "
        "twice; but the state passed to it now differs from the one it started with: state['text'] is 'a draft "
        "more more' in the state passed, 'a draft more' in the stored one. To start a new child for a new state, "
        "give the child a run_id= derived from its state (a hash of it)"]
    assert told[0].filename == __file__


def test_a_crash_after_the_parent_charged_counts_its_childs_spend_in_the_interrupted_step(tmp_path):
    db, marker = tmp_path / "charged.db", tmp_path / "crashed-once"
    script = [sys.executable, str(HERE / "nested_crashy.py"), str(db), str(marker), "charged"]
    assert subprocess.run(script, capture_output=True, timeout=120).returncode == -9
    done = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    store = SQLiteStore(db)
    steps = store.load_steps("nested")
    # Parent step 1 charged $0.02, then its child committed two steps ($0.011 each) and charged
    # $0.001 in the third before the crash: all of it is step 1's. The retry is step 2.
    assert steps[1].events == ("interrupted",) and steps[1].cost == Decimal("0.043")
    assert "$0.0200 charged, $0.0230 in child runs" in steps[1].error
    assert [s.cost for s in steps] == [Decimal("0.064"), Decimal("0.043"), Decimal("0.064"), Decimal("0.064")]
    assert store.get_run("nested").total_cost == Decimal("0.235")
    assert json.loads(done.stdout) == {"done": 3, "child_n": 12}


def test_a_child_left_running_after_its_parent_step_is_billed_where_it_can_be_and_told(tmp_path):
    """asyncio.gather does not cancel the other children when one fails: they outlived the parent's
    step, and their spend went to a pending total the next step reset, unseen."""
    import warnings
    from loomc import LastGood, OrphanedChildWarning
    db = str(tmp_path / "orphans.db")

    async def story():
        gates = {1: asyncio.Event(), 2: asyncio.Event()}

        @loop(budget=Budget(iterations=1), cost_fn=lambda s: 0.01, checkpoint=db)
        async def child(k):
            if k == 0:
                raise RuntimeError("child 0 fails at once")
            await gates[k].wait()
            return k

        @loop(budget=Budget(iterations=2), backtrack=LastGood(), checkpoint=db)
        async def parent(state):
            if loomc.step_number() == 0:
                await asyncio.gather(child(0), child(1), child(2))  # raises; children 1 and 2 run on
            gates[1].set()
            await asyncio.sleep(0.1)  # child 1 commits while this step is in flight
            return state

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = await parent.run(0, run_id="p")
            gates[2].set()
            await asyncio.sleep(0.1)  # child 2 commits after the parent run is over
        return run, [str(w.message) for w in caught if w.category is OrphanedChildWarning]

    run, told = asyncio.run(story())
    assert run.history[0].error.startswith("RuntimeError") and run.history[1].cost == Decimal("0.01")
    assert told[0].startswith("loomc: child run p-0-1 spent $0.0100 after its parent run p's step 0 had ended, "
                              "so p's ledger counts it in its step 1 instead")
    assert "child run p-0-2 spent $0.0100" in told[1] and "cannot count it: that run is between steps or over" in \
        told[1] and "asyncio.TaskGroup" in told[1]
    assert len(told) == 2


def test_a_failed_parent_step_is_retried_as_a_new_step_with_a_new_child(tmp_path):
    db = str(tmp_path / "again.db")
    calls = {"child": 0, "parent": 0}

    @loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.5, checkpoint=db)
    def child(state):
        calls["child"] += 1
        return state + 1

    @loop(budget=Budget(iterations=1), checkpoint=db)
    def parent(state):
        calls["parent"] += 1
        got = child.run(0).state
        if calls["parent"] == 1:
            raise ConnectionError("lost the reply after the child finished")
        return got

    import pytest
    with pytest.raises(ConnectionError) as e:
        parent(0)
    assert SQLiteStore(db).get_run(f"{e.value.run_id}-0-0").status == "budget_exhausted"
    # The failed parent step is kept; the retry is step 1, a new child. A parent resumed *within*
    # step 0 (after a crash) would reuse child 0-0 instead; see the crash test above.
    again = parent.resume_run(e.value.run_id, budget=Budget(iterations=2))
    assert again.state == 2 and calls["child"] == 4
    assert again.history[0].cost == Decimal("1.0") and again.history[1].cost == Decimal("1.0")


def test_a_child_whose_parent_step_never_committed_is_resumed_through_the_parent_only(tmp_path, monkeypatch):
    """Resumed alone after a crash, the child spent where its parent's ledger and cap never saw it,
    and its parent then resumed a run that had moved on. It is refused, naming the parent to resume.
    A child whose parent step committed (the parent caught its failure) is the user's to resume."""
    from loomc import ConfigError
    db, marker = tmp_path / "n.db", tmp_path / "crashed"
    first = subprocess.run([sys.executable, str(HERE / "nested_crashy.py"), str(db), str(marker)],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == -9  # killed during child step 2 of parent step 1
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setattr(sys, "argv", ["nested_crashy.py", str(db), str(marker)])
    monkeypatch.delitem(sys.modules, "nested_crashy", raising=False)
    import nested_crashy  # the loops as the crashed script defined them
    refused = r"run nested-1-0 is a child run started in step 1 of run nested, which never committed that step; " \
              r"resume the parent, .*: parent.resume\('nested'\), or `loomc resume --db \S+/n.db nested`"
    store = SQLiteStore(db)
    before = store.get_run("nested-1-0")
    with pytest.raises(ConfigError, match=refused):
        nested_crashy.child.resume("nested-1-0", take_over=True)
    with pytest.raises(ConfigError, match=refused):
        nested_crashy.child.run({}, run_id="nested-1-0", resume=True)
    shown = CliRunner().invoke(main, ["resume", "--db", str(db), "nested-1-0", "--take-over"])
    assert shown.exit_code == 1 and re.search(refused, shown.output)
    assert store.get_run("nested-1-0").steps == before.steps, "the refused resumes called nothing"
    shown = CliRunner().invoke(main, ["show", "--db", str(db), "nested-1-0"])
    assert "`loomc resume nested` continues it" not in shown.output
    assert "; resume its parent run nested, which goes on with it" in shown.output
    second = subprocess.run([sys.executable, str(HERE / "nested_crashy.py"), str(db), str(marker)],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert store.get_run("nested-1-0").status == "completed"  # the parent went on with it

    failing = {"on": True}

    @loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: h[-1].state >= 4), checkpoint=str(db))
    def inner(s):
        if s == 2 and failing["on"]:
            raise RuntimeError("boom")
        return s + 1

    @loop(budget=Budget(iterations=1), converge_on=predicate(lambda h: True), checkpoint=str(db))
    def forgiving(s):  # the child fails; the parent commits its step and completes
        try:
            return inner(s)
        except RuntimeError:
            return s

    assert forgiving(0, run_id="kind") == 0 and store.get_run("kind-0-0").status == "failed"
    shown = CliRunner().invoke(main, ["show", "--db", str(db), "kind-0-0"])
    assert f"Stopped: RuntimeError: boom; `loomc resume {db_flag(db)} kind-0-0` continues it" in shown.output
    failing["on"] = False
    assert inner.resume("kind-0-0") == 4
    del sys.modules["nested_crashy"]


@pytest.mark.parametrize("kind", ["tasks", "threads"])
def test_children_side_by_side_share_their_parents_cap_instead_of_each_taking_all_of_it(tmp_path, kind):
    """Four children gathered under a $1.00 parent cap each got the whole $1.00 and spent $4.00
    together. Now each sees the room its siblings left, less what they hold for their steps in
    flight (their largest step so far)."""
    import contextvars
    import time as clock
    from concurrent.futures import ThreadPoolExecutor
    db = str(tmp_path / "side.db")

    if kind == "tasks":
        @loop(budget=Budget(usd=5, iterations=20), checkpoint=db)
        async def worker(s):
            await asyncio.sleep(0.01)
            await loomc.acharge(0.10)
            return s + 1

        @loop(budget=Budget(usd=1.0, iterations=1), checkpoint=db)
        async def parent(s):
            runs = await asyncio.gather(*(worker.run(0) for _ in range(4)))
            return sum(r.state for r in runs)

        run = asyncio.run(parent.run(0, run_id="side"))
    else:
        @loop(budget=Budget(usd=5, iterations=20), checkpoint=db)
        def worker(s):
            clock.sleep(0.01)
            loomc.charge(0.10)
            return s + 1

        @loop(budget=Budget(usd=1.0, iterations=1), checkpoint=db)
        def parent(s):
            with ThreadPoolExecutor(4) as pool:
                runs = [f.result() for f in [pool.submit(contextvars.copy_context().run, worker.run, 0)
                                             for _ in range(4)]]
            return sum(r.state for r in runs)

        run = parent.run(0, run_id="side")
    store = SQLiteStore(db)
    children = store.children("side")
    assert len(children) == 4 and all(c.status == "budget_exhausted" for c in children)
    assert sum(c.total_cost for c in children) == run.total_cost
    # Each child's first step has no estimate yet, so it can hold nothing: at most one first step
    # each (4 x $0.10) can pass the cap together; after that every step is held for.
    assert run.total_cost <= Decimal("1.0") + Decimal("0.4"), run.total_cost
    assert run.total_cost >= Decimal("0.9")
    assert any("parent run side" in (c.reason or "") for c in children)


def test_children_with_a_step_estimate_hold_it_from_their_first_step_so_the_cap_holds_exactly(tmp_path):
    @loop(budget=Budget(usd=5, iterations=20, step_estimate=0.10), checkpoint="memory")
    async def worker(s):
        await asyncio.sleep(0.01)
        await loomc.acharge(0.10)
        return s + 1

    @loop(budget=Budget(usd=1.0, iterations=1), checkpoint="memory")
    async def parent(s):
        runs = await asyncio.gather(*(worker.run(0) for _ in range(12)))
        return sum(r.state for r in runs)

    run = asyncio.run(parent.run(0))
    assert run.total_cost == Decimal("1.0") and run.state == 10  # twelve children, ten paid steps in all


def test_a_sibling_sees_what_a_child_has_charged_in_its_step_before_that_step_is_billed():
    """Children side by side share the parent's room, but a child's charges counted for its siblings only once
    its step was billed, and a first step (no largest step yet to hold) held nothing: here the second child's
    usd_left() said the whole $1.00 was left while the first had spent $0.50 of it, so each could spend it all."""
    seen = {}

    async def story():
        charged, looked = asyncio.Event(), asyncio.Event()

        @loop(budget=Budget(iterations=1), checkpoint="memory")
        async def spender(s):
            await loomc.acharge(0.5)
            charged.set()
            await looked.wait()  # its step is not billed yet
            return s + 1

        @loop(budget=Budget(iterations=1), checkpoint="memory")
        async def looker(s):
            await charged.wait()
            seen["left"] = loomc.usd_left()
            looked.set()
            await loomc.acharge(0.25)
            return s + 1

        @loop(budget=Budget(usd=1.0, iterations=1), checkpoint="memory")
        async def parent(s):
            a, b = await asyncio.gather(spender.run(0), looker.run(0))
            seen["after"] = loomc.usd_left()
            return a.state + b.state

        return await parent.run(0)

    run = asyncio.run(story())
    assert seen == {"left": Decimal("0.5"), "after": Decimal("0.25")}
    assert run.total_cost == Decimal("0.75")


@pytest.mark.parametrize("aio", [False, True], ids=["sync ctrl-c", "async cancel"])
def test_a_childs_step_whose_commit_was_interrupted_is_still_billed_to_its_parent(tmp_path, monkeypatch, aio):
    """Regression: the parent's ledger heard of a child's step only after its commit; a Ctrl-C inside the
    commit, or a task cancelled while the commit waited for the writer thread, left the parent's interrupted
    step $0.10 short of what its child spent, for good (a resume goes on after that step)."""
    import threading
    store = SQLiteStore(tmp_path / "n.db", durability="normal")
    gate = threading.Event()

    def body(s):
        if s == 1 and aio:
            store.writer.submit(gate.wait)  # another run's work holds the writer thread
            asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)  # lands on the commit's await
            threading.Timer(0.3, gate.set).start()
        return s + 1

    if aio:
        async def child_fn(s: int) -> int:
            return body(s)

        async def parent_fn(s: int) -> int:
            return await child(0) + s
    else:
        real, landed = SQLiteStore._insert_step, []

        def interrupted_after_insert(self, cur, run_id, step, *args):
            real(self, cur, run_id, step, *args)
            if run_id.endswith("-0-0") and step.n == 1 and not landed:
                landed.append(1)
                raise KeyboardInterrupt  # a Ctrl-C that lands right after the child's INSERT

        monkeypatch.setattr(SQLiteStore, "_insert_step", interrupted_after_insert)

        def child_fn(s: int) -> int:
            return body(s)

        def parent_fn(s: int) -> int:
            return child(0) + s
    child = loop(budget=Budget(iterations=3), cost_fn=lambda s: 0.1, checkpoint=store)(child_fn)
    parent = loop(budget=Budget(iterations=2), checkpoint=store)(parent_fn)
    with pytest.raises(asyncio.CancelledError if aio else KeyboardInterrupt):
        asyncio.run(parent(0, run_id="par")) if aio else parent(0, run_id="par")
    kid = store.get_run("par-0-0")
    assert kid.steps == 2 and kid.total_cost == Decimal("0.2"), "the child's interrupted commit went in"
    assert store.get_run("par").total_cost == Decimal("0.2"), "the parent counts all its child spent"
    assert store.load_steps("par")[0].error.endswith("after spending $0.2000")


@pytest.mark.parametrize("when", ["after the child's step committed", "a second one while the first is recorded"])
def test_a_ctrl_c_between_a_childs_step_and_its_bill_to_the_parent_waits_for_the_bill(tmp_path, when):
    """A Ctrl-C is raised at the next bytecode. One landing after a child's step was committed but before
    the parent was billed for it, or a second press landing while the first was being recorded (the child's
    interrupted step committed, its bill not yet made), left that spend out of the parent's ledger for good.
    Here a real SIGINT is sent at the very moment the bill is about to be made (from a profile hook)."""
    import signal
    store = SQLiteStore(tmp_path / "n.db", durability="normal")
    interrupted = when.startswith("a second")

    @loop(budget=Budget(iterations=2), checkpoint=store)
    def child(s: int) -> int:
        loomc.charge(0.1)
        if interrupted and s == 1:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C, in the call, after it charged
        return s + 1

    @loop(budget=Budget(iterations=2), checkpoint=store)
    def parent(s: int) -> int:
        return child.run(0).state + s

    sent: list[int] = []

    def at_the_last_bill(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_bill_parent" and len(frame.f_locals["run"].history) == 2:
            sys.setprofile(None)
            sent.append(1)
            signal.raise_signal(signal.SIGINT)

    sys.setprofile(at_the_last_bill)
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            parent(0, run_id="par")
    finally:
        sys.setprofile(None)
    assert sent == [1]
    # One KeyboardInterrupt comes out, with the runs' notes: a second press is not chained onto it from loomc.
    assert raised.value.__context__ is None and "resume it with parent.resume('par')" in raised.value.__notes__[-1]
    # No note says to resume the child on its own, which is refused while the parent's step is not committed.
    assert not [note for note in raised.value.__notes__ if "par-0-0" in note], raised.value.__notes__
    kid = store.get_run("par-0-0")
    assert kid.total_cost == Decimal("0.2") and kid.steps == 2
    assert kid.status == ("cancelled" if interrupted else "budget_exhausted"), "the child's end was recorded"
    assert store.get_run("par").total_cost == Decimal("0.2"), "the parent counts all its child spent"
    assert store.load_steps("par")[0].error.endswith("after spending $0.2000")


def test_a_stop_asked_for_inside_a_child_run_stops_the_parent_and_its_resume_goes_on_with_the_child(tmp_path):
    """The child's paid steps are kept: the parent's step is not committed (as after a crash), so its
    resume makes that step again, and the step resumes the child where it stopped, paying for nothing twice."""
    db = str(tmp_path / "stop.db")
    calls: list[int] = []
    stop_at = [2]

    @loop(budget=Budget(usd=5, iterations=5), converge_on=predicate(lambda h: h[-1].state >= 4), checkpoint=db)
    def draft(s):
        calls.append(s)
        loomc.charge(0.10)
        if s == stop_at[0]:
            loomc.request_stop()  # a SIGTERM, say: this call finishes and commits, then every run stops
        return s + 1

    @loop(budget=Budget(usd=5, iterations=3), converge_on=predicate(lambda h: True), checkpoint=db)
    def chapter(s):
        return draft(s)

    with pytest.raises(loomc.StopRequested) as e:
        chapter(0, run_id="book")
    assert e.value.run_id == "book" and calls == [0, 1, 2]
    assert e.value.reason == ("loomc.request_stop() was called; stopped during step 0, as the runs it started did: "
                              "a resume makes step 0 again, going on with them")
    store = SQLiteStore(db)
    assert store.get_run("book").status == "cancelled" and store.load_steps("book") == []
    assert store.get_run("book-0-0").status == "cancelled" and len(store.load_steps("book-0-0")) == 3
    stop_at[0] = -1
    assert chapter.resume("book") == 4
    assert calls == [0, 1, 2, 3], "the child went on from its step 3: no call was made twice"
    steps = store.load_steps("book")
    assert [s.n for s in steps] == [0] and steps[0].cost == Decimal("0.40")
    assert store.get_run("book").total_cost == Decimal("0.40")


def test_a_parent_whose_child_was_cut_short_before_anything_was_charged_makes_its_step_again_with_that_child(tmp_path):
    """The parent's step charged nothing and started a child: it is made again on resume, and reuses the child
    (whose own call cut short is its step), rather than start another child beside it."""
    db = str(tmp_path / "nest.db")
    pressed = []

    @loop(budget=Budget(iterations=5), converge_on=lambda h: h[-1].error is None, cost_fn=lambda s: 0.05,
          checkpoint=db)
    def child(s):
        if not pressed:
            pressed.append(s)
            raise KeyboardInterrupt
        return s + 1

    @loop(budget=Budget(iterations=2), checkpoint=db)
    def parent(s):
        return child(s)

    with pytest.raises(KeyboardInterrupt):
        parent(0, run_id="p")
    store = SQLiteStore(db)
    assert store.get_run("p").steps == 0, "the parent's step is made again, not cut short"
    assert [s.events for s in store.load_steps("p-0-0")] == [("interrupted",)]
    done = parent.resume_run("p")
    assert sorted(r.id for r in store.list_runs() if r.parent_run_id == "p") == ["p-0-0", "p-1-0"]
    assert [(s.n, s.events) for s in store.load_steps("p-0-0")] == [(0, ("interrupted",)), (1, ("converged",))]
    assert done.status == "budget_exhausted" and [s.cost for s in done.history] == [Decimal("0.05"), Decimal("0.05")]
    assert done.state == 2
    store.close()


@pytest.mark.parametrize("how", ["sync", "async", "async iter"])
def test_a_child_loop_left_at_the_default_checkpoint_keeps_its_runs_in_its_parents_store(tmp_path, monkeypatch, how):
    """Regression: a child loop with the default checkpoint kept its runs in the default file of the working
    directory, whatever its parent's store. `loomc resume --db /srv/app/.loomc/checkpoints.db ID`, run from
    another directory (a cron job starts in $HOME), resumed the parent there, and each child afresh in a new
    file of that directory: its steps made before the crash were paid for again, and the parent's `loomc show`
    billed the stale child."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOMC_DB", raising=False)
    if how == "sync":
        @loop(budget=Budget(iterations=2))
        def child(s):
            loomc.charge(0.10)
            return s + 1

        def call(s):
            return child.run(s).state  # the child's budget ends it
    else:
        @loop(budget=Budget(iterations=2))
        async def child(s):
            await loomc.acharge(0.10)
            return s + 1

        async def call(s):
            if how == "async":
                return (await child.run(s)).state
            stream = child.iter(s)
            async for _ in stream:
                pass
            return stream.run.state

    parent = loop(budget=Budget(iterations=1))(call)
    parent.store = SQLiteStore(tmp_path / "jobs.db")  # as `loomc resume --db jobs.db` runs it
    run = asyncio.run(parent.run(0, run_id="p")) if how != "sync" else parent.run(0, run_id="p")
    assert run.status == "budget_exhausted" and run.state == 2 and run.total_cost == Decimal("0.2")
    assert [(c.id, c.steps, c.total_cost) for c in parent.store.children("p")] == [("p-0-0", 2, Decimal("0.2"))]
    assert not (tmp_path / ".loomc").exists()  # no file of the working directory's
    # A parent in memory (a notebook trying a policy out) keeps its children there too.
    memo = loop(budget=Budget(iterations=1), checkpoint="memory")(call)
    ran = asyncio.run(memo.run(0, run_id="m")) if how != "sync" else memo.run(0, run_id="m")
    assert ran.total_cost == Decimal("0.2") and memo.store.get_run("m-0-0").steps == 2
    assert not (tmp_path / ".loomc").exists()
    # A child loop that names its own store keeps its runs there.
    child.store = own = SQLiteStore(tmp_path / "own.db")
    again = asyncio.run(parent.run(0, run_id="q")) if how != "sync" else parent.run(0, run_id="q")
    assert again.total_cost == Decimal("0.2") and own.get_run("q-0-0").steps == 2


def test_loomc_resume_from_another_directory_goes_on_with_the_children_in_the_file_it_is_given(tmp_path):
    """The story behind the test above, with a real SIGKILL and the real command: the child's first paid call
    is made once, the one it died in is recorded, and nothing is written in the directory the command ran in."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "job.py").write_text(
        "import os, signal\n"
        "import loomc\n"
        "from loomc import Budget, loop\n"
        "@loop(budget=Budget(iterations=3))\n"
        "def child(s):\n"
        "    loomc.charge(0.10)\n"
        "    print('child call', s, flush=True)\n"
        "    if s == 1 and os.environ.get('CRASH'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return s + 1\n"
        "@loop(budget=Budget(iterations=1, usd=5))\n"
        "def parent(s):\n"
        "    return child.run(s).state\n"
        "if __name__ == '__main__':\n"
        "    parent.run(0, run_id='p')\n")
    env = {k: v for k, v in os.environ.items() if k != "LOOMC_DB"}
    crashed = subprocess.run([sys.executable, "job.py"], cwd=project, env={**env, "CRASH": "1"},
                             capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -9 and crashed.stdout.split("\n")[:2] == ["child call 0", "child call 1"]
    db = project / ".loomc" / "checkpoints.db"
    resumed = subprocess.run(["loomc", "resume", "--db", str(db), "p"], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 2, resumed.stderr  # the parent's one call is made: its budget ends it
    assert resumed.stdout.startswith("child call 1\nRun: p  Loop: parent  Status: budget_exhausted\n"), resumed.stdout
    store = SQLiteStore(db)
    child = store.get_run("p-0-0")  # calls 0 and 1 (the one it died in, $0.10 charged), then 1 again
    assert (child.steps, child.total_cost, store.get_run("p").total_cost) == (3, Decimal("0.3"), Decimal("0.3"))
    assert not (elsewhere / ".loomc").exists()


@pytest.mark.parametrize("cut_by", ["the run's deadline", "fn's own timeout"])
def test_children_gathered_in_a_call_cut_short_are_all_billed_to_that_step(tmp_path, cut_by):
    """Regression: cancelled together, by an async parent's deadline or by a timeout of fn's own around them,
    children gathered with asyncio.gather were billed one: gather passes on the first child's cancellation
    without waiting for the others, and the parent's step was settled before a sibling had billed its call cut
    short. Three children that had spent $0.25 each left $0.25 in the parent's ledger, with OrphanedChildWarnings
    that blamed fn for leaving tasks running."""
    import warnings
    db = str(tmp_path / "dl.db")

    @loop(budget=Budget(iterations=5), checkpoint=db)
    async def child(s):
        await loomc.acharge(0.25)
        await asyncio.sleep(60)
        return s + 1

    # 1.5 s: time for each child to charge before the cut, on a slow host too.
    deadline = cut_by == "the run's deadline"

    @loop(budget=Budget(wall_clock=1.5 if deadline else None, iterations=1, usd=10), checkpoint=db)
    async def parent(s):
        if deadline:
            await asyncio.gather(child.run(s), child.run(s), child.run(s))
            return s + 1
        try:
            async with asyncio.timeout(1.5):
                await asyncio.gather(child.run(s), child.run(s), child.run(s))
        except TimeoutError:
            return s  # gives up on the research and keeps the draft
        return s + 1

    with warnings.catch_warnings():
        warnings.simplefilter("error", loomc.OrphanedChildWarning)
        run = asyncio.run(parent.run(0, run_id="pd"))
    assert run.status == "budget_exhausted" and run.steps == 1
    assert run.history[0].error.startswith("DeadlineExceeded") if deadline else run.history[0].ok
    assert run.total_cost == Decimal("0.75") == SQLiteStore(db).get_run("pd").total_cost
    kids = SQLiteStore(db).children("pd")
    assert [(k.status, k.total_cost) for k in kids] == [("cancelled", Decimal("0.25"))] * 3
    why = ("the wall-clock cap of the run it is nested in ran out, which cancelled step 0 of run pd, and this run "
           "with it" if deadline else "its task was cancelled (a timeout such as asyncio.wait_for's, a TaskGroup, "
           "task.cancel(), Ctrl-C under asyncio.run)")
    assert {k.reason for k in kids} == {f"CancelledError during step 0's call: {why}"}


def test_a_child_taken_over_by_another_process_ends_the_parents_drive_as_a_held_child_does(tmp_path):
    """A child run whose lease another process took (here, a host of its own) raises LeaseLost through the parent's
    step. That is the child's loss, not the parent's: the parent, still this process's, ends failed and says to
    resume it, as for a child another process holds; it is not left running as if it had been taken too."""
    import sqlite3
    import time
    db = str(tmp_path / "kid.db")

    @loop(budget=Budget(iterations=3), lease_seconds=0.2, checkpoint=db)
    def kid(s):
        if s == 1:
            with closing(sqlite3.connect(db)) as other:  # another host takes the child over
                other.execute("UPDATE runs SET owner = 'elsewhere:1:x', lease_expires = ? WHERE id = 'p-0-0'",
                              (time.time() + 600,))
                other.commit()
            time.sleep(0.3)  # past half the child's lease: its commit checks who holds the run
        return s + 1

    @loop(budget=Budget(iterations=2), checkpoint=db)
    def parent(s):
        return s + [kid(0)]

    with pytest.raises(loomc.LeaseLost, match=r"run p-0-0: this process .*\(elsewhere:1:x drives it now") as lost:
        parent([], run_id="p")
    notes = lost.value.__notes__
    assert "loomc: run p-0-0 is not this process's any more: leave it to the process that took it over" in notes[1]
    assert notes[-1] == "loomc: run p failed; resume it with parent.resume('p')"
    store = SQLiteStore(db)
    record = store.get_run("p")
    assert (record.status, record.owner) == ("failed", None) and "LeaseLost: run p-0-0" in record.reason
    assert (store.get_run("p-0-0").status, store.get_run("p-0-0").owner) == ("running", "elsewhere:1:x")


def test_threads_that_start_children_at_once_each_get_an_id_of_their_own():
    """Regression: the k of <parent>-<n>-<k> was read and bumped without a lock, so two threads starting children
    at the same moment could get one id (the second child then found the first's run stored: RunLocked while it ran,
    or its result for another state once it had completed)."""
    import contextvars
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from loomc.runs import LiveRun

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns between any two bytecodes: a race shows
    try:
        run = LiveRun.__new__(LiveRun)  # only what next_child_id reads
        run.id, run.in_flight, run.children = "p", 0, {}
        ids: list[str] = []

        def start_children() -> None:
            for _ in range(2000):
                ids.append(run.next_child_id())
        threads = [threading.Thread(target=start_children) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(ids) == 16000 and len(set(ids)) == 16000

        @loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.01, checkpoint="memory")
        def child(x: int) -> int:
            return x + 1

        @loop(budget=Budget(iterations=1), checkpoint="memory")
        def parent(state: int) -> list[int]:
            child.store = parent.store
            with ThreadPoolExecutor(8) as pool:  # each submit carries the step's context (copied here)
                runs = [f.result() for f in [pool.submit(contextvars.copy_context().run, child.run, x)
                                             for x in range(0, 3200, 100)]]
            return [r.state for r in runs]

        done = parent.run(0, run_id="p")
    finally:
        sys.setswitchinterval(switch)
    assert done.state == [x + 2 for x in range(0, 3200, 100)] and done.total_cost == Decimal("0.64")
    assert sorted(r.id for r in parent.store.list_runs() if r.parent_run_id == "p") == \
        sorted(f"p-0-{k}" for k in range(32))
