"""Async loops: the same core as the sync driver, deadlines, sharing one store, cancellation."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from decimal import Decimal

import pytest

import loomc
from loomc import (AsyncLoopRunner, BestScore, Budget, BudgetExhausted, ConfigError, Escalate, LastGood, SQLiteStore,
                   SpecChangedWarning, StallError, judge, loop, predicate, score_plateau)

from conftest import sync_or_async


def run(coro):
    return asyncio.run(coro)


def scripted(scores, fail_at=()):
    calls = []

    async def fn(state):
        k = len(calls)
        calls.append(state)
        await asyncio.sleep(0)
        if k in fail_at:
            raise RuntimeError(f"flaky call {k}")
        return {"k": k, "score": scores[min(k, len(scores) - 1)]}

    return fn, calls


def score(state):
    return state["score"]


def test_decorating_a_coroutine_gives_an_async_runner_that_converges():
    fn, _ = scripted([0.5, 0.7, 0.9, 0.9, 0.9, 0.9])
    refine = loop(converge_on=score_plateau(3), scorer=score, checkpoint="memory")(fn)
    assert isinstance(refine, AsyncLoopRunner)
    result = run(refine.run({}))
    assert result.status == "completed" and len(result.history) == 6 and result.state["k"] == 5


def test_async_budget_backtrack_and_stall_follow_the_same_rules():
    fn, calls = scripted([0.3, 0.5, 0.8, 0.6, 0.7, 0.7])
    refine = loop(budget=Budget(usd=0.5), backtrack=BestScore(), scorer=score, cost_fn=lambda s: 0.1,
                  checkpoint="memory")(fn)
    with pytest.raises(BudgetExhausted) as e:
        run(refine({}))
    assert len(e.value.history) == 5 and e.value.state["k"] == 2
    assert e.value.history[3].events == ("backtrack to step 2",) and calls[4]["k"] == 2
    assert str(e.value).endswith(f"give a larger budget: await fn.resume({e.value.run_id!r}, budget=Budget(...))")
    fn, _ = scripted([0.5], fail_at={1, 2, 3})
    stalling = loop(backtrack=LastGood(), on_stall=Escalate(after=3), scorer=score, checkpoint="memory")(fn)
    with pytest.raises(StallError, match=r"await fn\.resume\('[0-9a-f]+'\) gives it more calls"):
        run(stalling({}))


def test_async_resume_after_a_failure(tmp_path):
    db = str(tmp_path / "a.db")
    fn, _ = scripted([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], fail_at={2})
    refine = loop(budget=Budget(iterations=5), cost_fn=lambda s: 0.05, scorer=score, checkpoint=db)(fn)

    async def story():
        with pytest.raises(RuntimeError) as e:
            await refine({})
        again = await refine.resume_run(e.value.run_id)
        return e.value.run_id, again

    run_id, again = run(story())
    assert again.status == "budget_exhausted" and len(again.history) == 5
    assert again.history[2].error == "RuntimeError: flaky call 2"
    assert SQLiteStore(db).get_run(run_id).total_cost == Decimal("0.20")


def test_a_hung_iteration_is_cancelled_at_a_one_second_wall_clock(tmp_path):
    db = str(tmp_path / "h.db")
    started = []

    @loop(budget=Budget(wall_clock="1s"), checkpoint=db)
    async def hangs(state):
        started.append(time.monotonic())
        if len(started) == 2:
            await asyncio.sleep(3600)
        return state + 1

    t0 = time.monotonic()
    with pytest.raises(BudgetExhausted) as e:
        run(hangs(0))
    assert time.monotonic() - t0 < 5, "the call was cancelled at the deadline, not awaited"
    history = e.value.history
    assert len(history) == 2 and history[1].error.startswith("DeadlineExceeded")
    assert history[1].events == ("budget exhausted",)
    # The call did not go on past the cap: the stop does not say it did (nor ask for loomc.time_left()).
    assert re.fullmatch(r"wall_clock: 1\.\d\ds active of the 1s cap", e.value.reason)
    assert SQLiteStore(db).get_run(e.value.run_id).status == "budget_exhausted"
    assert e.value.state == 1


def test_a_hung_judge_is_cancelled_at_the_wall_clock_deadline_and_the_paid_step_is_kept(tmp_path):
    """Regression: only fn was cut short at the deadline; a judge that hung held a 1 s run for as
    long as it hung. Now the judge is cancelled too, and the step keeps fn's state and its price."""
    db = str(tmp_path / "j.db")

    async def hung_judge(state):
        await asyncio.sleep(30)  # without the deadline the run takes this long, and fails the check below

    @loop(budget=Budget(wall_clock="1s"), converge_on=judge(hung_judge), cost_fn=lambda s: 0.1, checkpoint=db)
    async def draft(state):
        return state + 1

    t0 = time.monotonic()
    with pytest.raises(BudgetExhausted) as e:
        run(draft(0))
    assert time.monotonic() - t0 < 5, "the judge was cancelled at the deadline, not awaited"
    (step,) = e.value.history
    assert step.error.startswith("DeadlineExceeded: the wall-clock budget (1s) ran out while the call's result "
                                 "was being measured (a judge or the scorer)")
    assert step.state == 1 and step.cost == Decimal("0.1") and step.events == ("budget exhausted",)
    assert SQLiteStore(db).get_run(e.value.run_id).total_cost == Decimal("0.1")


def test_forty_concurrent_loops_share_one_store_without_mixing_histories(tmp_path):
    db = str(tmp_path / "many.db")

    @loop(budget=Budget(iterations=8), cost_fn=lambda s: 0.01, checkpoint=db)
    async def work(state):
        await asyncio.sleep(0.001 * (state["who"] % 5))
        return {"who": state["who"], "n": state["n"] + 1}

    async def everyone():
        return await asyncio.gather(*(work.run({"who": i, "n": 0}) for i in range(40)))

    runs = run(everyone())
    assert len({r.id for r in runs}) == 40
    store = SQLiteStore(db)
    for i, r in enumerate(runs):
        assert r.state == {"who": i, "n": 8}
        steps = store.load_steps(r.id)
        assert [s.n for s in steps] == list(range(8))
        assert all(f'"who":{i},' in s.state_json for s in steps)
        assert store.get_run(r.id).total_cost == Decimal("0.08")


def test_cancelling_the_task_marks_the_run_cancelled_and_keeps_its_steps(tmp_path):
    db = str(tmp_path / "c.db")

    @loop(budget=Budget(iterations=100), checkpoint=db)
    async def slow(state):
        await asyncio.sleep(0.05 if state < 3 else 3600)
        return state + 1

    async def story():
        task = asyncio.create_task(slow.run(0, run_id="to-cancel"))
        while True:
            await asyncio.sleep(0.02)
            try:
                if SQLiteStore(db).get_run("to-cancel").steps >= 3:
                    break
            except Exception:
                pass
        # Step 2 is committed; let the run go on into step 3's call (an hour long) before cutting it short. Cancelled
        # at once, the task could still be waiting to hear of step 2's commit: then no call was cut short.
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(story())
    record = SQLiteStore(db).get_run("to-cancel")
    assert record.status == "cancelled" and record.steps == 4
    # The call cut short is a step, whose cost nobody knows: the caps count it, as when the process dies in it.
    cut = SQLiteStore(db).load_steps("to-cancel")[-1]
    assert (cut.n, cut.cost, cut.events) == (3, Decimal(0), ("interrupted",)) and cut.duration > 0
    assert cut.error == "Interrupted: CancelledError, during this step, which charged nothing (its cost is unknown)"
    # Why the run stopped says what a CancelledError means there, for `loomc show` and `loomc runs --why`.
    assert record.reason == ("CancelledError during step 3's call: its task was cancelled (a timeout such as "
                             "asyncio.wait_for's, a TaskGroup, task.cancel(), Ctrl-C under asyncio.run)")


def test_a_task_cancelled_while_its_run_is_being_opened_lets_the_run_go(tmp_path, monkeypatch):
    """The open runs on the store's writer thread. A cancellation that lands meanwhile (a wait_for
    timeout while other runs keep the writer busy) used to leave the run claimed by a drive nobody
    drove, its lease renewed, so the retry was refused: RunLocked, "already being run in this process"."""
    store = SQLiteStore(tmp_path / "o.db")

    @loop(budget=Budget(iterations=4), checkpoint=store)
    async def count(state):
        return state + 1

    async def story():
        busy = threading.Event()
        store.writer.submit(busy.wait, 10)  # the writer is busy with another run's work
        waiting = asyncio.create_task(count.run(0, run_id="queued"))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting  # an open still waiting its turn is dropped: it creates nothing
        busy.set()
        assert await asyncio.wrap_future(store.writer.submit(store.list_runs)) == []

        opening, go_on = threading.Event(), threading.Event()
        create = SQLiteStore.create_run

        def create_slowly(self, *args, **kwargs):
            opening.set()
            go_on.wait(10)
            return create(self, *args, **kwargs)

        monkeypatch.setattr(SQLiteStore, "create_run", create_slowly)
        task = asyncio.create_task(count.run(0, run_id="retry"))
        await asyncio.to_thread(opening.wait, 10)
        task.cancel()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        record = await asyncio.wrap_future(store.writer.submit(store.get_run, "retry"))
        assert (record.status, record.owner, record.steps) == ("cancelled", None, 0)
        return await count.run(0, run_id="retry", resume=True)

    again = run(story())
    assert again.status == "budget_exhausted" and again.state == 4 and [s.n for s in again.history] == [0, 1, 2, 3]
    store.close()


def test_keyboard_interrupt_is_never_swallowed_and_marks_the_run_cancelled(tmp_path):
    db = str(tmp_path / "k.db")

    @loop(budget=Budget(iterations=10), checkpoint=db)
    def interrupted(state):
        if state == 2:
            raise KeyboardInterrupt
        return state + 1

    with pytest.raises(KeyboardInterrupt) as caught:
        interrupted(0, run_id="ctrl-c")
    record = SQLiteStore(db).get_run("ctrl-c")
    assert record.status == "cancelled" and record.steps == 3  # steps 0 and 1, and the call cut short
    # A notebook's interrupted cell says which run to resume, and keeps what it bought on the exception.
    assert caught.value.__notes__ == ["loomc: run ctrl-c was interrupted, with every committed step kept; resume it "
                                      "with interrupted.resume('ctrl-c')"]
    assert caught.value.run_id == "ctrl-c" and caught.value.state == 2 and len(caught.value.history) == 3
    assert caught.value.history[-1].events == ("interrupted",) and caught.value.history[-1].error == (
        "Interrupted: KeyboardInterrupt, during this step, which charged nothing (its cost is unknown)")
    calm = loop(budget=Budget(iterations=4), checkpoint=db)(lambda s: s + 1)
    with pytest.warns(SpecChangedWarning, match="ctrl-c"):  # a different fn takes the run over
        again = calm.resume_run("ctrl-c")
    assert again.state == 3 and [s.n for s in again.history] == [0, 1, 2, 3]  # the cut-short call counts


def test_ctrl_c_after_the_step_that_exhausted_the_budget_leaves_the_run_budget_exhausted(tmp_path):
    db = str(tmp_path / "k.db")

    pressed = []

    def interrupt_at_the_end(step):
        if step.events and not pressed:
            pressed.append(step.n)
            raise KeyboardInterrupt  # Ctrl-C once the step is committed, before the run is marked

    @loop(budget=Budget(usd=0.25), cost_fn=lambda s: 0.1, on_step=interrupt_at_the_end, checkpoint=db)
    def spend(state):
        return state + 1

    with pytest.raises(KeyboardInterrupt) as caught:
        spend(0, run_id="late-ctrl-c")
    record = SQLiteStore(db).get_run("late-ctrl-c")
    assert (record.status, record.steps, record.total_cost) == ("budget_exhausted", 2, Decimal("0.2"))
    reason = "usd: $0.2000 spent + $0.1000 for the next step would pass the $0.2500 cap"
    assert record.reason == reason
    assert caught.value.__notes__ == [f"loomc: run late-ctrl-c had already ended, budget exhausted: {reason}; give a "
                                      "larger budget: spend.resume('late-ctrl-c', budget=Budget(...))"]
    assert caught.value.state == 2
    # A larger budget goes on from it, as from any exhausted run (with no Ctrl-C this time).
    assert spend.resume_run("late-ctrl-c", budget=Budget(usd=0.45)).state == 4


def test_a_task_cancelled_while_its_commit_waits_for_the_busy_writer_still_commits_the_paid_step(tmp_path):
    store = SQLiteStore(tmp_path / "busy.db")
    gate = threading.Event()

    @loop(policy=Budget(iterations=5), cost_fn=lambda s: 0.1, checkpoint=store)
    async def step(s: int) -> int:
        if s == 1:
            store.writer.submit(gate.wait)  # another run's work holds the writer thread
            asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)  # lands on the commit's await
            threading.Timer(0.3, gate.set).start()
        return s + 1

    with pytest.raises(asyncio.CancelledError):
        run(step(0, run_id="busy"))
    record = store.get_run("busy")
    assert record.status == "cancelled" and record.steps == 2 and record.total_cost == Decimal("0.2")
    assert [s.n for s in store.load_steps("busy")] == [0, 1]
    resumed = run(step.resume_run("busy"))  # goes on from step 2: step 1 is not paid for twice
    assert resumed.state == 5 and resumed.steps == 5 and store.get_run("busy").total_cost == Decimal("0.5")


@pytest.mark.parametrize("ends", ["converged", "failed"])
def test_a_task_cancelled_while_the_commit_of_the_step_that_ended_its_run_waits_leaves_the_run_ended_so(tmp_path,
                                                                                                      ends):
    """A timeout that races the run's end: the run is marked as it ended, not cancelled, and the cancellation
    still reaches the caller."""
    store = SQLiteStore(tmp_path / "end.db")
    gate = threading.Event()

    @loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: h[-1].state >= 2), cost_fn=lambda s: 0.1,
          checkpoint=store)
    async def step(s: int) -> int:
        if s == 1:
            store.writer.submit(gate.wait)  # another run's work holds the writer thread
            asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)  # lands on the commit's await
            threading.Timer(0.3, gate.set).start()
            if ends == "failed":
                raise ValueError("the tests could not be collected")
        return s + 1

    with pytest.raises(asyncio.CancelledError):
        run(step(0, run_id="racing"))
    record = store.get_run("racing")
    assert record.steps == 2 and record.owner is None
    if ends == "converged":
        assert (record.status, record.reason) == ("completed", "predicate(<lambda>) is true")
        with pytest.raises(loomc.RunAlreadyFinished, match="already completed"):
            run(step.resume_run("racing"))
    else:
        assert (record.status, record.reason) == ("failed", "ValueError: the tests could not be collected")
    assert store.get_run("racing").total_cost == Decimal("0.2" if ends == "converged" else "0.1")  # cost_fn: ok steps


def test_a_call_interrupted_after_it_charged_is_committed_with_its_spend(tmp_path, clock):
    db = str(tmp_path / "k.db")

    ctrl_c = [True]

    @loop(budget=Budget(usd=1, iterations=4), checkpoint=db, clock=clock)
    def paid(state):
        loomc.charge(0.05)
        clock.advance(1 if state < 2 else 95)
        if state == 2 and ctrl_c:
            ctrl_c.pop()
            raise KeyboardInterrupt  # Ctrl-C after the call was paid for, 95 s into it
        return state + 1

    with pytest.raises(KeyboardInterrupt):
        paid(0, run_id="paid")
    store = SQLiteStore(db)
    record, steps = store.get_run("paid"), store.load_steps("paid")
    assert record.status == "cancelled" and record.total_cost == Decimal("0.15")
    assert steps[2].events == ("interrupted",) and steps[2].cost == Decimal("0.05")
    assert steps[2].error == "Interrupted: KeyboardInterrupt, during this step after spending $0.0500"
    # How long it ran, as for any call: loomc show's TIME, and the longest call the wall-clock cap counts on.
    assert steps[2].duration == 95 and steps[1].started_at <= steps[2].started_at <= time.time()
    from click.testing import CliRunner
    from loomc.cli import main
    assert " 1m35s  Interrupted: KeyboardInterrupt" in CliRunner().invoke(main, ["show", "paid", "--db", db]).output
    assert store.pending_charges("paid") == {}
    again = paid.resume_run("paid")  # counted once: the retry is step 3
    assert again.state == 3 and again.total_cost == Decimal("0.20") and len(again.history) == 4


def test_a_cancelled_task_commits_what_its_call_in_flight_spent_in_child_runs_too(tmp_path):
    db = str(tmp_path / "c.db")

    @loop(budget=Budget(iterations=3), cost_fn=lambda s: 0.01, checkpoint=db)
    async def child(state):
        await loomc.acharge(0.001)
        await asyncio.sleep(3600 if state == 1 else 0)  # cancelled here, in child step 1
        return state + 1

    @loop(budget=Budget(usd=1), checkpoint=db)
    async def parent(state):
        await loomc.acharge(0.02)
        return state + await child(0)

    async def story():
        task = asyncio.create_task(parent.run(0, run_id="p"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(story())
    store = SQLiteStore(db)
    kid = store.load_steps("p-0-0")
    assert [(s.cost, s.events) for s in kid] == [(Decimal("0.011"), ()), (Decimal("0.001"), ("interrupted",))]
    (step,) = store.load_steps("p")
    assert step.events == ("interrupted",) and step.cost == Decimal("0.032"), "its own $0.02 and the child's"
    assert store.get_run("p").status == store.get_run("p-0-0").status == "cancelled"
    from click.testing import CliRunner
    from loomc.cli import main
    shown = CliRunner().invoke(main, ["show", "p", "--db", db]).output
    assert "Spent: $0.0320 of $1.0000 budget in 1 step, 1 attempt" in shown
    assert "Interrupted: CancelledError, during this step after spending $0.0320  <- interrupted" in shown


def test_an_async_loop_awaits_an_async_scorer_and_cost_fn():
    """An LLM grading each draft is an async call: an async def scorer (and cost_fn) is awaited at the
    edge. Before, it returned a coroutine that failed every step."""
    async def grade(state):
        await asyncio.sleep(0)
        return state / 10

    async def price(state):
        await asyncio.sleep(0)
        return "0.02"

    @loop(budget=Budget(usd=1, iterations=20), converge_on=score_plateau(2), backtrack=BestScore(), scorer=grade,
          cost_fn=price, checkpoint="memory")
    async def draft(state):
        return min(state + 1, 4)

    run = asyncio.run(draft.run(0))
    assert [s.score for s in run.history] == [0.1, 0.2, 0.3, 0.4, 0.4, 0.4]
    assert run.status == "completed" and run.total_cost == Decimal("0.12")

    async def broken(state):
        raise ValueError("grader down")

    flaky = loop(budget=Budget(iterations=2), backtrack=LastGood(), scorer=broken, checkpoint="memory")(draft.fn)
    failed = asyncio.run(flaky.run(0))
    assert failed.history[0].error == ("ValueError: grader down (raised by the scorer, after fn returned: step 0 "
                                       "keeps the state fn returned)") and failed.history[0].state == 1
    with pytest.raises(ConfigError, match=r"scorer=grade is an async def, which a sync loop cannot await"):
        loop(scorer=grade, checkpoint="memory")(lambda s: s)
    with pytest.raises(ConfigError, match=r"cost_fn=price is an async def"):
        loop(cost_fn=price, checkpoint="memory")(lambda s: s)


def test_an_async_predicate_reads_only_committed_history():
    fn, _ = scripted([0.2, 0.4, 1.0])
    refine = loop(converge_on=predicate(lambda h: h[-1].score >= 1.0), scorer=score, checkpoint="memory")(fn)
    assert run(refine({}))["k"] == 2


def test_async_run_with_resume_continues_a_stored_run_or_starts_one(tmp_path):
    db = str(tmp_path / "ares.db")
    calls = []

    @loop(budget=Budget(iterations=3), checkpoint=db)
    async def work(s):
        calls.append(s)
        return s + 1

    first = run(work.run(0, run_id="a", resume=True))  # nothing stored: starts
    assert first.status == "budget_exhausted" and calls == [0, 1, 2]
    raised = loop(budget=Budget(iterations=5), checkpoint=db)(work.fn)
    with pytest.warns(SpecChangedWarning):
        assert run(raised.run(0, run_id="a", resume=True)).state == 5  # stored, not completed: resumed from 3
    assert calls == [0, 1, 2, 3, 4]


def test_an_interrupt_while_the_result_is_measured_keeps_the_state_fn_returned(tmp_path):
    """Regression: Ctrl-C in a slow scorer, or a task cancelled while an async judge ran, dropped the
    state that fn had returned and been paid for; only what had been charged was recorded."""
    db = str(tmp_path / "m.db")

    def slow_scorer(s):
        if s == 2:
            raise KeyboardInterrupt  # the grader model is slow; the user gives up waiting
        return s / 10

    sync = loop(budget=Budget(iterations=5), scorer=slow_scorer, cost_fn=lambda s: 0.1, checkpoint=db)(
        lambda s: s + 1)
    with pytest.raises(KeyboardInterrupt):
        sync(0, run_id="scored")

    async def grader(s):
        if s == 2:
            asyncio.current_task().cancel()
            await asyncio.sleep(1)
        return False

    @loop(budget=Budget(iterations=5), converge_on=loomc.judge(grader), cost_fn=lambda s: 0.1, checkpoint=db)
    async def aio(s: int) -> int:
        return s + 1

    with pytest.raises(asyncio.CancelledError):
        run(aio(0, run_id="judged"))
    store = SQLiteStore(db)
    for run_id, interrupt in (("scored", "KeyboardInterrupt"), ("judged", "CancelledError")):
        record, steps = store.get_run(run_id), store.load_steps(run_id)
        assert record.status == "cancelled" and record.steps == 2 and record.total_cost == Decimal("0.2")
        assert json.loads(steps[1].state_json) == 2 and steps[1].events == ("interrupted",)
        assert steps[1].error == (f"Interrupted: {interrupt} while the call's result was being measured (cost_fn, "
                                  "scorer or judge); the state fn returned is kept on this step")
        assert record.reason.startswith(f"{interrupt} while step 1's result was being measured: ")  # not "after"


def test_a_store_error_after_the_task_was_cancelled_is_collected_not_reported_as_never_retrieved(tmp_path):
    import gc
    from loomc import StoreError
    store = SQLiteStore(tmp_path / "late.db")
    gate, reported = threading.Event(), []
    real = store.commit_step

    def refusing(run_id, step, *args):
        if step.n == 1:
            raise StoreError("late.db: OperationalError: database or disk is full")
        return real(run_id, step, *args)

    store.commit_step = refusing  # type: ignore[method-assign]

    @loop(policy=Budget(iterations=5), cost_fn=lambda s: 0.1, checkpoint=store)
    async def step(s: int) -> int:
        if s == 1:
            store.writer.submit(gate.wait)
            asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)
            threading.Timer(0.2, gate.set).start()
        return s + 1

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        with pytest.raises(asyncio.CancelledError):
            await step(0, run_id="late")
        await asyncio.sleep(0.5)  # the refused commit ends meanwhile
        gc.collect()

    run(main())
    assert reported == [] and store.get_run("late").status == "cancelled"


@pytest.mark.parametrize("aio", [False, True])
def test_a_call_cut_short_before_it_charged_counts_against_the_caps_on_resume(tmp_path, aio):
    """A Ctrl-C (or a cancelled task) in the middle of a paid call: the provider may bill a reply that never came.
    That call left no trace, so the resume went on as if it had never been made and could pass the USD cap by
    its cost; a process that died in the same call counts it at the estimate, and now so does an interrupt."""
    db = str(tmp_path / "cut.db")
    pressed = []

    def cut(s):
        if s == 2 and not pressed:
            pressed.append(s)
            raise asyncio.CancelledError() if aio else KeyboardInterrupt()
        return s + 1

    paid = loop(budget=Budget(usd=0.35), cost_fn=lambda s: 0.10, checkpoint=db)(sync_or_async(cut, aio))
    with pytest.raises(asyncio.CancelledError if aio else KeyboardInterrupt):
        run(paid.run(0, run_id="cut")) if aio else paid.run(0, run_id="cut")
    stopped = run(paid.resume_run("cut")) if aio else paid.resume_run("cut")
    assert [(s.n, s.cost, s.events) for s in stopped.history] == [
        (0, Decimal("0.10"), ()), (1, Decimal("0.10"), ()), (2, Decimal(0), ("interrupted",))]
    assert stopped.status == "budget_exhausted" and stopped.reason == (
        "usd: $0.2000 spent + $0.1000 for the next step would pass the $0.3500 cap, counting 1 failed call (step 2) "
        "cut short before charging at $0.1000; charge each paid call inside fn (loomc.charge)")



async def _counts_on(s: int) -> int:
    await asyncio.sleep(0)
    return s + 1


def test_an_async_loop_under_trio_is_refused_before_anything_is_stored_and_the_advice_works(tmp_path):
    """Under trio an async run failed inside its first store call, with trio's words, and left a run behind that
    `loomc runs` showed as crashed."""
    import trio
    db = tmp_path / "trio.db"
    counts_on = loop(budget=Budget(iterations=3), checkpoint=str(db))(_counts_on)

    async def under_trio():
        return await counts_on.run(0)

    with pytest.raises(ConfigError, match=re.escape(
            "_counts_on is an async loop, which runs on asyncio (asyncio.run, Jupyter, an asyncio server), and no "
            "asyncio event loop runs here: under trio, run it on asyncio in a worker thread, await "
            "trio.to_thread.run_sync(asyncio.run, _counts_on.run(state))")):
        trio.run(under_trio)
    assert not db.exists() or SQLiteStore(db).list_runs() == []

    async def as_advised():
        return await trio.to_thread.run_sync(asyncio.run, counts_on.run(0))

    run = trio.run(as_advised)
    assert run.status == "budget_exhausted" and run.state == 3
