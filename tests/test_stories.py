"""Users' stories on the in-memory store: plateaus, regressions, stalls, flaky steps, budgets."""

from __future__ import annotations

import asyncio
import copy
import functools
import re
from decimal import Decimal
from fractions import Fraction

import pytest

import loomc
from loomc import (BestScore, Budget, BudgetExhausted, ConfigError, Escalate, LastGood, NoStateReturned, Outcome,
                   PolicyTypeError, SQLiteStore, StallError, always, judge, loop, never, predicate, score_plateau,
                   semantic_delta)
from conftest import sync_or_async
from loomc.budget import DEFAULT_BUDGET
from loomc.history import History, Step


def scripted(scores, fail_at=()):
    """A fn whose k-th call returns a state carrying the k-th scripted score (or raises)."""
    calls = []

    def fn(state):
        k = len(calls)
        calls.append(state)
        if k in fail_at:
            raise RuntimeError(f"flaky call {k}")
        return {"k": k, "score": scores[k] if k < len(scores) else scores[-1], "from": state.get("k")}

    return fn, calls


def score(state):
    return state["score"]


def test_plateau_at_0_9_converges_and_returns_the_last_state():
    fn, calls = scripted([0.5, 0.7, 0.9, 0.9, 0.9, 0.9, 0.95])
    refine = loop(converge_on=score_plateau(patience=3), scorer=score, checkpoint="memory")(fn)
    run = refine.run({})
    assert run.status == "completed"
    assert len(run.history) == 6
    assert run.state["k"] == 5
    assert run.history[-1].events == ("converged",)
    assert "score_plateau" in run.reason


def test_regression_at_step_3_is_restored_from_step_2():
    fn, calls = scripted([0.3, 0.5, 0.8, 0.6, 0.9, 0.9, 0.9, 0.9])
    refine = loop(converge_on=score_plateau(3), backtrack=BestScore(), scorer=score, checkpoint="memory")(fn)
    run = refine.run({})
    h = run.history
    assert h[3].events == ("backtrack to step 2",)
    assert calls[4]["k"] == 2, "step 4 must start from step 2's state"
    assert run.status == "completed"
    assert run.state["score"] == 0.9


def test_best_score_returns_the_best_state_when_the_budget_stops_the_run():
    fn, _ = scripted([0.3, 0.9, 0.4, 0.5, 0.6])
    refine = loop(budget=Budget(iterations=5), backtrack=BestScore(), scorer=score, checkpoint="memory")(fn)
    with pytest.raises(BudgetExhausted) as e:
        refine({})
    assert e.value.state["k"] == 1 and e.value.state["score"] == 0.9
    assert e.value.run_id and len(e.value.history) == 5


def test_a_flaky_step_under_last_good_carries_on_and_counts_against_the_budget():
    fn, calls = scripted([0.1, 0.2, 0.3, 0.4, 0.5], fail_at={2})
    refine = loop(budget=Budget(iterations=5), backtrack=LastGood(), scorer=score, checkpoint="memory")(fn)
    run = refine.run({})
    assert run.status == "budget_exhausted"
    assert len(run.history) == 5, "the failed call counts as an iteration"
    assert run.history[2].error == "RuntimeError: flaky call 2"
    assert run.history[2].events == ("backtrack to step 1",)
    assert calls[3]["k"] == 1, "the call after the failure starts from the last good state"
    assert run.state["k"] == 4


class RateLimited(Exception):
    """What a flaky API raises: worth going on from."""


@pytest.mark.parametrize("aio", [False, True])
@pytest.mark.parametrize("backtracker", [LastGood, BestScore])
def test_a_backtracker_given_on_goes_on_from_those_failures_only_and_stops_at_a_bug(aio, backtracker, tmp_path):
    """Without on=, a bug after the paid call (a KeyError reading the reply) made every call fail, each
    paid for, until the budget or a stall stopped the run."""
    import loomc
    calls = []

    def fix(s):
        calls.append(s)
        loomc.charge(0.10)  # the paid call
        if len(calls) == 2:
            raise RateLimited("429 Too Many Requests")
        if len(calls) == 4:
            raise KeyError("usage")  # a bug: the next call would meet it again
        return s + 1

    policy = Budget(usd=5, iterations=10) | backtracker(on=(RateLimited, TimeoutError))
    refine = loop(policy=policy, scorer=lambda s: s, checkpoint=str(tmp_path / "on.db"))(sync_or_async(fix, aio))
    run = asyncio.run(refine.run(0)) if aio else refine.run(0)
    assert calls == [0, 1, 1, 2] and run.status == "failed", "it went on from the 429, and stopped at the bug"
    assert run.reason == (f"KeyError: 'usage'; {backtracker.__name__}(on=(RateLimited, TimeoutError)) does not go "
                          "on from a KeyError, so the run stopped")
    assert run.history[1].events == ("backtrack to step 0",) and run.history[3].events == ("failed",)
    assert run.total_cost == Decimal("0.40") and run.state == 2
    assert isinstance(run.error, KeyError) and "loomc: fix it, then resume the run" in run.error.__notes__
    # A subclass counts; KeyboardInterrupt and the like are never gone on from, and cannot be asked for.
    assert LastGood(on=Exception).goes_on_from(RateLimited()) and not LastGood(on=TimeoutError).goes_on_from(
        RateLimited())
    assert repr(LastGood(on=TimeoutError, wait="2s")) == "LastGood(wait='2s', on=(TimeoutError,))"
    for bad in ([RateLimited], (), "RateLimited", KeyboardInterrupt, (TimeoutError, 3)):
        with pytest.raises(ConfigError, match=rf"{backtracker.__name__}: on=.*: give the Exception classes it goes "
                                              r"on from, as in"):
            backtracker(on=bad)


def test_a_stall_escalates_with_the_last_good_state():
    fn, _ = scripted([0.5], fail_at={1, 2, 3, 4})
    refine = loop(backtrack=LastGood(), on_stall=Escalate(after=3), scorer=score, checkpoint="memory")(fn)
    with pytest.raises(StallError) as e:
        refine({})
    assert len(e.value.history) == 4
    assert e.value.state["k"] == 0
    assert e.value.history[-1].events == ("stalled",)
    assert "(4 steps, $0.0000); its last 3 calls failed, the last with RuntimeError: flaky call 3;" in str(e.value)


def test_a_run_whose_calls_kept_failing_says_so_when_its_budget_stops_it():
    fn, _ = scripted([0.5, 0.6], fail_at={2, 3})
    refine = loop(budget=Budget(iterations=4), backtrack=LastGood(), scorer=score, checkpoint="memory")(fn)
    with pytest.raises(BudgetExhausted) as e:
        refine({})
    assert "its last 2 calls failed, the last with RuntimeError: flaky call 3;" in str(e.value)
    fine, _ = scripted([0.5, 0.6], fail_at={0})  # a failure that a later call got past
    ok = loop(budget=Budget(iterations=2), backtrack=LastGood(), scorer=score, checkpoint="memory")(fine)
    with pytest.raises(BudgetExhausted) as e:
        ok({})
    assert "failed" not in str(e.value)


def test_an_error_without_a_backtracker_fails_the_run_and_reaches_the_caller_with_its_run_id():
    fn, _ = scripted([0.1, 0.2], fail_at={1})
    refine = loop(checkpoint="memory")(fn)
    with pytest.raises(RuntimeError, match="flaky call 1") as e:
        refine({})
    assert e.value.run_id
    run = refine.store.get_run(e.value.run_id)
    assert run.status == "failed" and run.steps == 2
    assert e.value.history[-1].error == "RuntimeError: flaky call 1"
    assert e.value.__notes__ == [f"loomc: run {e.value.run_id} failed; resume it with fn.resume({e.value.run_id!r})"]

    def refine_report(state):
        raise ValueError("bad draft")

    with pytest.raises(ValueError) as e:
        loop(checkpoint="memory")(refine_report)({})
    assert e.value.__notes__[-1].endswith(f"resume it with refine_report.resume({e.value.run_id!r})")


def test_the_usd_budget_stops_exactly_at_the_cap():
    refine = loop(budget=Budget(usd=2.00), cost_fn=lambda s: 0.05, checkpoint="memory")(lambda s: s + 1)
    run = refine.run(0)
    assert len(run.history) == 40
    assert run.total_cost == Decimal("2.00")
    assert run.status == "budget_exhausted"


@pytest.mark.parametrize("make, exact", [
    (lambda np: 0.05, "0.05"), (lambda np: Decimal("0.05"), "0.05"), (lambda np: "0.05", "0.05"),
    (lambda np: Fraction(1, 20), "0.05"), (lambda np: 2, "2"),
    (lambda np: np.float64(0.05), "0.05"), (lambda np: np.float32(0.5), "0.5"), (lambda np: np.int64(2), "2"),
])
def test_a_cost_is_any_real_number_of_dollars_kept_exact(make, exact):
    """Regression: a cost_fn returning a numpy number failed its step ("must be a number of dollars"):
    numpy 2 prints np.float64(0.05) as its repr, and numpy floats below 64 bits are no float subclass."""
    import numpy
    cost = make(numpy)
    run = loop(budget=Budget(iterations=2), cost_fn=lambda s: cost, checkpoint="memory")(lambda s: s).run(0)
    assert run.status == "budget_exhausted" and run.history[0].cost == Decimal(exact)
    assert run.total_cost == 2 * Decimal(exact)


def test_a_policy_takes_the_numbers_of_a_parameter_sweep_from_numpy():
    """Regression: a sweep over a pandas DataFrame hands numpy.int64: score_plateau(patience=row.patience) was
    refused, "patience must be a whole number >= 1", and so were Budget(iterations=) and Escalate(after=)."""
    import numpy
    policy = (Budget(iterations=numpy.int64(6)) | score_plateau(patience=numpy.int64(2), min_delta=numpy.float32(0.5))
              | Escalate(after=numpy.int64(4)))
    assert repr(policy) == "Budget(iterations=6) | score_plateau(patience=2, min_delta=0.5) | Escalate(after=4)"
    run = loop(policy=policy, scorer=lambda s: 1.0, checkpoint="memory")(lambda s: s + 1).run(0)
    assert run.status == "completed" and len(run.history) == 3
    assert repr(Budget(wall_clock=numpy.int64(90)) | semantic_delta(numpy.float32(0.25))) == (
        "Budget(wall_clock=90) | semantic_delta(threshold=0.25)")
    # A float of a whole number is that number: a DataFrame column with a gap in it is float64 (6.0), and a config
    # file may say 20.0. Budget(iterations=6.0) used to be refused as "not a whole number".
    assert repr(Budget(iterations=numpy.float64(6.0)) | score_plateau(patience=2.0) | Escalate(after=1e1)) == \
        "Budget(iterations=6) | score_plateau(patience=2, min_delta=0.01) | Escalate(after=10)"
    for wrong in (lambda: Budget(iterations=2.5), lambda: Budget(iterations=float("nan")),
                  lambda: score_plateau(patience=True), lambda: Escalate(after=0), lambda: Escalate(after=0.0)):
        with pytest.raises(ConfigError, match="must be a whole number >= 1"):
            wrong()


@pytest.mark.parametrize("make", [lambda np: True, lambda np: np.bool_(True), lambda np: None, lambda np: "abc",
                                  lambda np: -0.01, lambda np: float("nan"), lambda np: [1]])
def test_a_cost_that_is_not_a_real_non_negative_number_fails_its_step_saying_so(make):
    import numpy
    cost = make(numpy)
    run = loop(budget=Budget(iterations=2), cost_fn=lambda s: cost, checkpoint="memory")(lambda s: s).run(0)
    assert run.status == "failed" and "cost_fn(state) must be a" in run.history[0].error


def test_the_usd_budget_is_predictive_and_the_estimate_can_be_given():
    costs = iter([0.5, 0.9, 0.1, 0.1])
    refine = loop(budget=Budget(usd=1.5), cost_fn=lambda s: next(costs), checkpoint="memory")(lambda s: s)
    run = refine.run(0)
    # after 0.5 + 0.9 = 1.4 the largest step (0.9) would pass 1.5: stop with 0.1 unspent
    assert len(run.history) == 2 and run.total_cost == Decimal("1.4")
    # The check happens before the first call: with the estimate at the cap, one call is made...
    at_cap = loop(budget=Budget(usd=0.5, step_estimate=0.5), cost_fn=lambda s: 0.5, checkpoint="memory")(lambda s: s)
    assert len(at_cap.run(0).history) == 1
    # ...an estimate of $0 (calls said to be free) still stops the run once its spend reaches the cap exactly...
    free = loop(budget=Budget(usd=0.3, step_estimate=0), cost_fn=lambda s: Decimal("0.1"), checkpoint="memory")
    run = free(lambda s: s).run(0)
    assert len(run.history) == 3 and run.reason == "usd: $0.3000 spent of $0.3000"
    # ...and an estimate above the whole cap, under which not one call could be made, is refused when built
    # (such a loop used to run, make no call and end budget_exhausted).
    with pytest.raises(ConfigError, match=re.escape("Budget(usd=0.5, step_estimate=1): every call is counted at "
                                                    "$1.0000 before it is made, more than the whole $0.5000 cap")):
        Budget(usd=0.5, step_estimate=1)


def test_a_budget_in_dollars_alone_stops_a_run_whose_calls_report_no_cost_where_a_loop_with_no_budget_would(tmp_path):
    """`Budget(usd=5)` and a forgotten `charge`: the cap could never stop the run, and nothing else did.
    NoCostWarning said so once, and the loop went on paying for calls without end."""
    from loomc import NoCostWarning, SQLiteStore
    calls = []

    def forgot(state):  # pays for a model call, and tells loomc nothing
        calls.append(state)
        return state + 1

    db = str(tmp_path / "u.db")
    refine = loop(budget=Budget(usd=5), checkpoint=db)(forgot)
    with pytest.warns(NoCostWarning, match="With no cap but the USD one, the run stops after 100 calls that all "
                                           "report no cost"):
        run = refine.run(0, run_id="forgot")
    assert run.status == "budget_exhausted" and len(calls) == 100 == len(run.history)
    assert run.reason == ("unreported_spend: 100 calls made, and not one reported what it cost, so the $5.0000 cap "
                          "could not stop the run; it stops here, at the calls a loop with no budget makes. Report "
                          "what fn spends (loomc.charge, cost_fn=, an adapter), or give Budget(iterations=) for more "
                          "calls")
    assert SQLiteStore(db).load_steps("forgot")[-1].events == ("budget exhausted",)
    assert refine.replay("forgot").stopped_after == 100, "a replay of the loop stops where the loop did"
    assert Budget(usd=5).replay(run.history).stopped_after is None, "the policy itself is unchanged"
    # More calls, asked for by name, go on; a resume that only raises the dollars stops again at once.
    assert refine.resume_run("forgot", budget=Budget(usd=10)).steps == 100
    with pytest.warns(NoCostWarning, match="step 100 reported no cost.*can ignore this.\\)$"):  # capped now
        assert refine.resume_run("forgot", budget=Budget(iterations=120)).steps == 120
    # A run that reports a cost, or whose budget bounds it otherwise, is never stopped so.
    reports = loop(budget=Budget(usd=5), cost_fn=lambda s: 0.001 if s == 1 else 0,
                   converge_on=predicate(lambda h: len(h) == 150), checkpoint="memory")(lambda s: s + 1)
    assert reports.run(0).status == "completed"
    for budget in (Budget(usd=5, wall_clock="1h"), Budget(usd=5) | Budget.unbounded()):
        free = loop(policy=budget | predicate(lambda h: len(h) == 150), checkpoint="memory")(lambda s: s + 1)
        with pytest.warns(NoCostWarning) as caught:
            assert free.run(0).status == "completed"
        assert "the run stops after" not in str(caught[0].message)


def test_a_usd_cap_that_nothing_reports_costs_to_is_pointed_out_once(tmp_path):
    import warnings
    import loomc
    from loomc import NoCostWarning, SQLiteStore

    def unpriced(state):  # pays for a model call, and tells loomc nothing
        return state + 1

    with pytest.warns(NoCostWarning) as caught:
        run = loop(budget=Budget(usd=0.10, iterations=3), checkpoint="memory")(unpriced).run(0, run_id="free?")
    assert len(caught) == 1 and run.steps == 3
    assert caught[0].filename == __file__, "it points at the line that ran the loop"
    assert str(caught[0].message).startswith("loomc: run free? has a USD cap of $0.1000, but step 0 reported no cost")
    assert "loomc.charge(usd)" in str(caught[0].message) and "cost_fn=" in str(caught[0].message)

    def charged(state):
        loomc.charge(0.01)
        return state + 1

    flaky = iter([RuntimeError("free failure"), None, None])

    def fails_first(state):
        error = next(flaky)
        if error:
            raise error
        return state + 1

    with warnings.catch_warnings():
        warnings.simplefilter("error", NoCostWarning)
        loop(budget=Budget(usd=1, iterations=3), checkpoint="memory")(charged).run(0)
        loop(budget=Budget(usd=1, iterations=3), cost_fn=lambda s: 0, checkpoint="memory")(unpriced).run(0)
        loop(budget=Budget(iterations=3), checkpoint="memory")(unpriced).run(0)
    with pytest.warns(NoCostWarning, match="step 1 reported no cost"):  # the first step that succeeded
        loop(budget=Budget(usd=1, iterations=3), backtrack=LastGood(), checkpoint="memory")(fails_first).run(0)
    # Turned into an error, the warning loses nothing: the step it came after is committed.
    db = str(tmp_path / "w.db")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoCostWarning)
        with pytest.raises(NoCostWarning):
            loop(budget=Budget(usd=1, iterations=3), checkpoint=db)(unpriced).run(0, run_id="strict")
    assert SQLiteStore(db).get_run("strict").steps == 1


def test_threads_that_fn_starts_charge_its_step_exactly_when_they_carry_its_context():
    import contextvars
    import loomc
    from concurrent.futures import ThreadPoolExecutor
    from loomc import LoomcError

    def parallel(state):  # eight calls at once, each charged from its own thread
        def call(k):
            for _ in range(50):
                loomc.charge(Decimal("0.001"), item="calls")
        with ThreadPoolExecutor(8) as pool:
            for done in [pool.submit(contextvars.copy_context().run, call, k) for k in range(8)]:
                done.result()
        return state + 1

    run = loop(budget=Budget(usd=10, iterations=4), checkpoint="memory")(parallel).run(0)
    assert [s.cost for s in run.history] == [Decimal("0.4")] * 4 and run.total_cost == Decimal("1.6")
    assert run.history[0].metrics["cost_items"] == {"calls": "0.400"}

    def contextless(state):
        with ThreadPoolExecutor(1) as pool:
            pool.submit(loomc.charge, 0.01).result()
        return state

    with pytest.raises(LoomcError, match=r"does not carry the loop's context: submit its work as "
                                         r"pool.submit\(contextvars.copy_context\(\).run, work, ...\)"):
        loop(budget=Budget(iterations=1), checkpoint="memory")(contextless)(0)
    # Every step would meet it again, and the spend it tried to record is unknown: a backtracker stops at
    # once. (It went on, each call paid for and none recorded, until the iteration cap.)
    calls = []

    def paid_in_a_pool(state):
        calls.append(state)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(loomc.charge, 0.25).result()
        return state + 1

    stopped = loop(budget=Budget(usd=1, iterations=10), backtrack=LastGood(), checkpoint="memory")(
        paid_in_a_pool).run(0)
    assert stopped.status == "failed" and calls == [0]
    assert stopped.reason.endswith("the next call would meet it again, so the run stopped instead of going on "
                                   "from another state")
    late = []

    def leaves_a_thread(state):
        late.append(contextvars.copy_context())
        return state

    loop(budget=Budget(iterations=1), checkpoint="memory")(leaves_a_thread).run(0, run_id="late")
    with pytest.raises(LoomcError, match="for run late after its step ended"):
        late[0].run(loomc.charge, 0.01)


def test_iterations_and_wall_clock_are_checked_before_every_call(clock):
    def slow(state):
        clock.advance(4)
        return state + 1

    run = loop(budget=Budget(wall_clock="10s"), clock=clock, checkpoint="memory")(slow).run(0)
    assert len(run.history) == 2 and run.reason == (  # calls as long as each other: the first is named
        "wall_clock: 8.00s active + 4.00s for the next call (as long as step 0, the longest yet) would pass the 10s cap")
    run = loop(budget=Budget(iterations=7), checkpoint="memory")(lambda s: s + 1).run(0)
    assert len(run.history) == 7 and run.state == 7


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_the_wall_clock_counts_the_next_call_at_the_longest_so_far_so_no_call_ends_past_the_cap(clock, aio):
    """Regression: the wall clock was checked before each call, but not ahead, as the USD cap is. With
    calls of 4 minutes under `wall_clock="10m"`, a sync loop started a third call at 8 minutes and ended
    at 12 (a job given 10 minutes before its CI timeout was killed in that call); an async loop started
    it too, and cancelled it at 10 minutes, paid for and thrown away."""
    made = []

    def call(state):
        made.append(state)
        clock.advance([60, 240, 90, 90, 90][state])  # the second call is the longest: 4 minutes
        loomc.charge(0.10)
        return state + 1

    refine = loop(budget=Budget(wall_clock="10m"), clock=clock, checkpoint="memory")(sync_or_async(call, aio))
    run = asyncio.run(refine.run(0)) if aio else refine.run(0)
    # 1 + 4 + 1.5 minutes = 6m30s; + 4 would be 10m30s: the fourth call is not made.
    assert made == [0, 1, 2] and run.status == "budget_exhausted" and run.total_cost == Decimal("0.3")
    assert run.reason == ("wall_clock: 6m30s active + 4m00s for the next call (as long as step 1, the longest yet) "
                          "would pass the 10m cap")
    assert [s.events for s in run.history] == [(), (), ("budget exhausted",)]
    assert refine.policy.replay(run.history).stopped_after == 3  # replay stops where the live loop did

    # The first call has no time to go by, so only a cap already reached stops it; and a call that ends
    # exactly at the cap may be made.
    made.clear()
    clock.advance(1)
    exact = loop(budget=Budget(wall_clock=120), clock=clock, checkpoint="memory")(
        sync_or_async(lambda s: made.append(s) or clock.advance(60) or s + 1, aio))
    run = asyncio.run(exact.run(0)) if aio else exact.run(0)
    assert made == [0, 1] and run.reason == "wall_clock: 2m00s active of the 120s cap"


def test_no_budget_means_the_documented_default_cap_and_unbounded_must_be_asked_for():
    refine = loop(checkpoint="memory")(lambda s: s + 1)
    assert DEFAULT_BUDGET == Budget(iterations=100)
    run = refine.run(0)
    assert len(run.history) == 100
    # The reason says whose cap it was: "100 of 100 calls made" named a number the user never wrote.
    assert run.reason == ("iterations: 100 of 100 calls made (the default cap, loomc.DEFAULT_BUDGET: the loop was "
                          "given no Budget)")
    assert refine.replay(run.id).decision.reason == run.reason
    chosen = loop(budget=Budget(iterations=100), checkpoint="memory")(lambda s: s + 1)
    assert chosen.run(0).reason == "iterations: 100 of 100 calls made"
    free = loop(budget=Budget.unbounded(), converge_on=predicate(lambda h: h[-1].state >= 250),
                checkpoint="memory")(lambda s: s + 1)
    assert free(0) == 250
    # A Budget under & (or ~) is a condition, not a cap: it used to count as a budget, and the loop ran on without end.
    conditional = loop(converge_on=predicate(lambda h: h[-1].state >= 10**9) & Budget(usd=1),
                       checkpoint="memory")(lambda s: s + 1)
    assert repr(conditional.policy) == "Budget(iterations=100) | (predicate(<lambda>) & Budget(usd=1.0))"
    assert len(conditional.run(0).history) == 100
    assert loop(policy=~Budget(iterations=5), checkpoint="memory")(lambda s: s + 1).policy.parts[0] == DEFAULT_BUDGET


# --- precedence: every pair -----------------------------------------------

def at_step(n):
    return predicate(functools.partial(lambda n, h: len(h) == n, n))


# Scores 0.9 then 0.5: after step 1, all four fire at once (len(h) == 2, a regression,
# one non-improving step, two calls made).
STRONGER_FIRST = [
    ("completed", lambda: at_step(2)),
    ("budget_exhausted", lambda: Budget(iterations=2)),
    ("stalled", lambda: Escalate(after=1)),
    ("backtrack", lambda: BestScore()),
]


@pytest.mark.parametrize("i,j", [(i, j) for i in range(4) for j in range(i + 1, 4)])
def test_when_two_fire_on_the_same_step_the_stronger_wins(i, j):
    (strong, make_strong), (_, make_weak) = STRONGER_FIRST[i], STRONGER_FIRST[j]
    fn, calls = scripted([0.9, 0.5, 0.4, 0.3, 0.2])
    policy = make_strong() | make_weak()
    if not any(isinstance(p, Budget) for p in policy.walk()):
        policy = policy | Budget(iterations=3)
    run = loop(policy=policy, scorer=score, checkpoint="memory")(fn).run({})
    assert run.status == strong
    assert len(run.history) == 2
    assert run.history[1].events == ({"completed": "converged", "budget_exhausted": "budget exhausted",
                                      "stalled": "stalled"}[strong],)


def mutating(scores, fail_at=()):
    """A fn in the README's style: it edits the state it is given in place and returns it."""
    calls = []

    def fn(state):
        k = len(calls)
        calls.append(dict(state))  # what this call was given, as it was given
        if k in fail_at:
            state["half-done"] = True  # an edit made before the failure
            raise RuntimeError(f"flaky call {k}")
        state["draft"] = state.get("draft", "") + f"+{k}"
        state["score"] = scores[k]
        return state

    return fn, calls


def test_a_fn_that_edits_its_state_in_place_still_backtracks_to_the_best_state_and_returns_it():
    """Regression: every step's state was the one dict fn kept editing, so BestScore "went back" to
    the newest edits and returned the worst state as the best."""
    fn, calls = mutating([0.5, 0.9, 0.3, 0.2])
    run = loop(budget=Budget(iterations=4), backtrack=BestScore(), scorer=score, checkpoint="memory")(fn).run({})
    assert [s.state["draft"] for s in run.history] == ["+0", "+0+1", "+0+1+2", "+0+1+3"]
    assert calls[3] == {"draft": "+0+1", "score": 0.9}, "the call after the regression starts from step 1"
    assert run.state == {"draft": "+0+1", "score": 0.9} and run.history.best.n == 1


def test_a_fn_that_edits_its_state_in_place_carries_on_from_the_last_good_state_after_a_failure():
    fn, calls = mutating([0.1, 0.2, 0.3, 0.4], fail_at={1})
    run = loop(budget=Budget(iterations=3), backtrack=LastGood(), checkpoint="memory")(fn).run({"draft": ""})
    assert calls[2] == {"draft": "+0", "score": 0.1}, "the failed call's edits are not carried on"
    assert run.state == {"draft": "+0+2", "score": 0.3}


def test_a_backtrack_to_the_initial_state_gets_it_as_it_was_given():
    fn, calls = mutating([0.1, 0.2], fail_at={0})  # the first call edits the initial state, then fails
    initial = {"draft": "seed"}
    run = loop(budget=Budget(iterations=2), backtrack=LastGood(), checkpoint="memory")(fn).run(initial)
    assert run.history[0].events == ("backtrack to initial state",)
    assert calls[1] == {"draft": "seed"}, "the retry starts from the initial state as it was given"
    assert run.state == {"draft": "seed+1", "score": 0.2}


def test_steps_seen_along_the_way_keep_the_state_they_were_committed_with():
    fn, _ = mutating([0.1, 0.2, 0.3])
    runner = loop(budget=Budget(iterations=3), checkpoint="memory", on_step=lambda s: seen.append(s))(fn)
    seen: list = []
    streamed = list(runner.iter({"draft": ""}))
    assert [s.state["draft"] for s in streamed] == [s.state["draft"] for s in seen] == ["+0", "+0+1", "+0+1+2"]


def test_a_sync_fn_that_forgets_to_await_an_async_call_is_told_to_await_it():
    async def rewrite(text):
        return text.upper()

    @loop(budget=Budget(iterations=3), checkpoint="memory")
    def refine(state):
        return {"draft": rewrite(state["draft"])}  # a coroutine, never awaited

    run = refine.run({"draft": "a"})
    assert run.status == "failed" and run.history[0].error.startswith(
        "StateEncodeError: state['draft'] is a coroutine (<coroutine object")
    assert "that was never awaited, which cannot be stored as JSON; a sync fn cannot await it: " \
           "write fn as `async def` and await the call" in run.history[0].error
    assert asyncio.iscoroutine(run.error.returned["draft"]), "what fn returned, kept on the error"
    with pytest.warns(RuntimeWarning, match="never awaited"):  # Python's own word on it, as the coroutine goes
        del run
        import gc
        gc.collect()


def test_a_fn_that_forgets_to_return_its_state_fails_on_that_step_saying_so():
    """Regression: a forgotten `return state` made step 0 "succeed" with a None state, and the run
    then failed at step 1 with "'NoneType' object does not support item assignment"."""
    def refine(state):
        state["draft"] = state["draft"] + "!"

    with pytest.raises(NoStateReturned, match=r"refine returned None instead of the new state.*return state") as e:
        loop(budget=Budget(iterations=3), checkpoint="memory")(refine)({"draft": "a"})
    assert len(e.value.history) == 1 and e.value.history[0].error.startswith("NoStateReturned")

    # With a backtracker the run stops too. Regression: LastGood went on, and each call that lost its
    # `return` on one branch was paid for, but cost_fn had no state to price, so the USD cap never saw it.
    calls = []

    async def arefine(state):
        calls.append(state)
        if len(calls) == 1:
            return {"draft": "ab"}
        state = {"draft": state["draft"] + "!"}  # this branch forgot its return

    retried = loop(budget=Budget(usd=0.35, iterations=10), backtrack=LastGood(), cost_fn=lambda s: 0.1,
                   checkpoint="memory")(arefine)
    run = asyncio.run(retried.run({"draft": "a"}))
    assert [s.error and s.error.split(":")[0] for s in run.history] == [None, "NoStateReturned"]
    assert run.status == "failed" and len(calls) == 2 and run.state == {"draft": "ab"}
    assert run.reason.endswith("; the next call would meet it again, so the run stopped instead of going on from "
                               "another state")


def test_a_backtrack_alone_continues_from_the_best_state():
    fn, calls = scripted([0.9, 0.5, 0.4])
    run = loop(policy=BestScore() | Budget(iterations=3), scorer=score, checkpoint="memory")(fn).run({})
    assert [s.events for s in run.history] == [(), ("backtrack to step 0",), ("budget exhausted",)]
    assert calls[2]["k"] == 0 and run.state["k"] == 0


def test_precedence_order_is_converged_budget_stalled_backtrack_continue():
    assert Outcome.CONVERGED > Outcome.BUDGET_EXHAUSTED > Outcome.STALLED > Outcome.BACKTRACK > Outcome.CONTINUE


# --- bad input --------------------------------------------------------------

@pytest.mark.parametrize("make, words", [
    (lambda: score_plateau(patience=-1), "patience"),
    (lambda: score_plateau(patience=0), "patience"),
    (lambda: score_plateau(min_delta=-0.1), "min_delta"),
    (lambda: Budget(iterations=-1), "iterations"),
    (lambda: Budget(usd=-2), "usd"),
    (lambda: Budget(usd=0, iterations=5), "Budget(usd=0): a cap of $0 allows no call that costs anything, yet the "
                                          "first call"),
    (lambda: Budget(wall_clock="10 parsecs"), "'10m'"),
    (lambda: Budget(wall_clock=0), "wall_clock must be a positive, finite duration, got 0"),
    (lambda: Budget(wall_clock="0s"), "wall_clock must be a positive, finite duration, got '0s'"),
    (lambda: Budget(wall_clock=float("inf")), "wall_clock must be a positive, finite duration, got inf"),
    (lambda: Budget(wall_clock=float("nan")), "wall_clock must be a positive, finite duration, got nan"),
    # A judge named as one of loomc's own metrics overwrote them, or they its verdict (which then never said yes).
    (lambda: judge(lambda s: True, name="cost_items"), "judge(name='cost_items'): the verdict is recorded as "
                                                        "step.metrics[name], so name it with a non-empty str"),
    (lambda: judge(lambda s: True, name="semantic_delta"), "none of loomc's own metrics (cost_items, tokens, "
                                                            "traceback, semantic_delta, loomc.*)"),
    (lambda: judge(lambda s: True, name=""), "judge(name='')"),
    (lambda: Budget(), "Budget.unbounded()"),
    # A first wait longer than max_wait (1m by default) was cut to it, every time, saying nothing.
    (lambda: LastGood(wait="2m"), "LastGood(wait='2m'): the waits grow up to max_wait='1m' (its default), which is "
                                  "shorter than the first, so each would be cut to it; give a longer max_wait, as in "
                                  "LastGood(wait='2m', max_wait=960)"),
    (lambda: BestScore(wait=5, max_wait="2s"), "BestScore(wait=5): the waits grow up to max_wait='2s', which"),
    (lambda: Escalate(after=0), "after"),
    (lambda: loop(on_step=5), "on_step=5: pass a function of the Step"),
    (lambda: loop(checkpoint="memory")(lambda s: s).run(0, run_id=5), "run_id=5: a run id is a non-empty string"),
    (lambda: loop(checkpoint="memory")(lambda s: s).run(0, run_id=" "), "run_id=' ': a run id is a non-empty"),
    (lambda: loop(checkpoint="memory")(lambda s: s).resume(7), "run_id=7: a run id"),
    # A Run or a History where the id goes raised TypeError: unhashable type (on the memory store).
    (lambda: (lambda f: f.resume(f.run(0)))(loop(checkpoint="memory")(lambda s: s + 1)),
     "a Run was given where a run id goes; give its id: run_id="),
    (lambda: (lambda f: f.history(f.run(0)))(loop(checkpoint="memory")(lambda s: s + 1)), "(the .id of the Run)"),
    (lambda: (lambda f: f.replay(f.run(0).history))(loop(checkpoint="memory")(lambda s: s + 1)),
     "a History was given where a run id goes; replay a policy on a History itself, as in policy.replay(history)"),
    (lambda: (lambda f: loomc.load_history(f.store, f.run(0)))(loop(checkpoint="memory")(lambda s: s + 1)),
     "a Run was given where a run id goes"),
    (lambda: loomc.load_history(loop(checkpoint="memory")(lambda s: s + 1).run(0)),
     "a Run was given where a run id goes"),
    # SQLite refused the first with a bare UnicodeEncodeError; the second no command line can carry to `loomc show`.
    (lambda: loop(checkpoint="memory")(lambda s: s).run(0, run_id="job-\udc80"), "run_id='job-\\udc80': a run id "
                                                                               "cannot hold a NUL or a lone surrogate"),
    (lambda: loop(checkpoint="memory")(lambda s: s).run(0, run_id="a\0b"), "cannot hold a NUL"),
])
def test_bad_arguments_fail_at_construction_with_a_clear_message(make, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        make()


def test_a_first_wait_as_long_as_max_wait_is_taken_as_given():
    """Only a first wait longer than max_wait is refused: one equal to it is never cut (a surviving mutant)."""
    assert repr(LastGood(wait="1m")) == "LastGood(wait='1m')"
    assert BestScore(wait=2, max_wait=2).max_wait == 2


def test_a_duration_given_as_a_plain_number_in_a_string_is_seconds_as_the_number_is():
    """`loomc resume --wall-clock 600`, `--older-than 86400` and `Budget(wall_clock=os.environ["CAP"])` were
    refused as "not a duration", while the message said to "pass seconds as a number"."""
    from loomc.budget import parse_duration
    assert [parse_duration(v) for v in ("600", " 90 ", "1.5", "1e3")] == [600.0, 90.0, 1.5, 1000.0]
    # and each unit is what it says (a day of 86,401 seconds went unseen by the suite: a surviving mutant)
    assert [parse_duration(v) for v in ("30s", "10m", "1h30m", "2d", "1d2h3m4s")] == [30, 600, 5400, 172800, 93784]
    cap = Budget(wall_clock="600")
    assert cap.wall_clock == 600.0 and repr(cap) == "Budget(wall_clock=600)" and cap.wall_clock_said == "600s"
    assert repr(Budget(wall_clock="10m")) == "Budget(wall_clock='10m')"
    for bad in ("-3", "0", "inf", "nan"):
        with pytest.raises(ConfigError, match="wall_clock"):
            Budget(wall_clock=bad)
    # A command line's option is told in its own terms: no datetime.timedelta to pass there.
    with pytest.raises(ConfigError, match=re.escape("--since='lately' is not a duration; write it like '30s', '10m', "
                                                    "'1h', '1h30m' or '7d', or a number of seconds")):
        parse_duration("lately", "--since")


def test_roles_cannot_be_combined_with_and_or_not():
    with pytest.raises(PolicyTypeError, match=r"\|"):
        BestScore() & score_plateau(3)
    with pytest.raises(PolicyTypeError, match="backtracker"):
        score_plateau(3) & LastGood()
    with pytest.raises(PolicyTypeError):
        ~Escalate(after=2)
    with pytest.raises(PolicyTypeError, match="one backtracker"):
        BestScore() | LastGood()


@pytest.mark.parametrize("junk", [True, 3, "converged", None])
def test_only_policies_and_functions_compose(junk):
    with pytest.raises(PolicyTypeError):
        score_plateau(3) | junk
    with pytest.raises(PolicyTypeError):
        junk & score_plateau(3)


def test_a_number_where_a_policy_goes_is_read_as_a_target_score_in_the_hint():
    with pytest.raises(PolicyTypeError, match=re.escape(
            "; to stop once a step scores 0.95 or more, write predicate(lambda h: (h[-1].score or 0) >= 0.95)")):
        loop(converge_on=0.95, scorer=lambda s: s)
    with pytest.raises(PolicyTypeError) as caught:
        score_plateau(3) | True
    assert "to stop once" not in str(caught.value)


def test_bool_of_a_policy_raises_so_or_cannot_pick_one():
    with pytest.raises(PolicyTypeError, match=r"\|"):
        score_plateau(3) or never


def test_a_plain_callable_becomes_a_predicate_and_repr_shows_the_structure():
    p = score_plateau(patience=3) | (predicate(lambda h: True) & Budget(usd=2.0))
    assert repr(p) == "score_plateau(patience=3, min_delta=0.01) | (predicate(<lambda>) & Budget(usd=2.0))"
    def done(h):
        return True
    q = score_plateau(3) | done
    assert repr(q) == "score_plateau(patience=3, min_delta=0.01) | predicate(done)"
    assert repr(score_plateau(3) | score_plateau(4) | Budget(iterations=3)).count("|") == 2
    assert len((score_plateau(3) | score_plateau(4) | Budget(iterations=3)).parts) == 3
    assert repr(~(score_plateau(3) | always)) == "~(score_plateau(patience=3, min_delta=0.01) | always)"


@pytest.mark.parametrize("wrong, error", [
    (lambda s: s["done"], "TypeError: History indices are step numbers, not 'done'"),
    (lambda s: s.done, "AttributeError: 'History' object has no attribute 'done'"),
    (lambda s: s.get("done"), "AttributeError: 'History' object has no attribute 'get'"),
])
def test_a_predicate_written_as_if_it_were_given_the_state_fails_saying_what_it_is_given(wrong, error):
    """Regression: `converge_on=lambda s: s["done"]` failed after the first call with `the policy raised
    TypeError: '<' not supported between instances of 'str' and 'int'`, which named nothing."""
    run = loop(budget=Budget(iterations=3), converge_on=wrong, cost_fn=lambda s: 0.1, checkpoint="memory")(
        lambda s: {"done": True}).run({"done": False})
    assert run.status == "failed" and run.steps == 1  # the paid step is kept, as for any policy that raises
    assert run.reason == (f"the policy raised {error}: a History is a run's steps (a predicate gets it, not the "
                          "state); the newest state is h[-1].state")
    h = run.history
    assert h[-1].state == {"done": True} and len(h[0:1]) == 1  # what it is for still works
    assert not hasattr(h, "_repr_html_") and copy.deepcopy(h) == h  # probes of private names: plain errors


def test_a_scorer_that_gives_no_score_under_a_policy_that_reads_scores_is_told_once(tmp_path):
    """Regression: a scorer that forgot its `return` gave every step None; score_plateau, BestScore and
    Escalate then never acted, and the run paid for every call its budget allowed, silently."""
    import warnings
    from loomc import NoScoreWarning

    def grade(state):
        state["score"]  # no return

    policy = dict(budget=Budget(iterations=4), converge_on=score_plateau(2), backtrack=BestScore(),
                  on_stall=Escalate(after=3))
    refine = loop(**policy, scorer=grade, checkpoint=str(tmp_path / "s.db"))(lambda s: {"score": 0.5})
    with pytest.warns(NoScoreWarning) as caught:
        run = refine.run({"score": 0}, run_id="s")
    assert len(caught) == 1 and run.steps == 4  # once per run, on its first successful step
    assert str(caught[0].message) == (
        "loomc: run s's policy reads scores (score_plateau(patience=2, min_delta=0.01), BestScore()), but the scorer "
        "returned None for step 0: a step without a score never converges, backtracks or stalls, so only the budget "
        "would stop the run. Return a number from the scorer (higher is better); did it forget `return`? (Checked "
        "once, on the first successful step; a scorer that cannot grade a first draft can ignore this.)")
    # Turned into an error, it stops the run after that step, committed.
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoScoreWarning)
        with pytest.raises(NoScoreWarning):
            refine({"score": 0}, run_id="t")
    assert SQLiteStore(tmp_path / "s.db").get_run("t").steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoScoreWarning)  # none of these is told
        loop(**policy, scorer=lambda s: s["score"], checkpoint="memory")(lambda s: {"score": 0.5}).run({"score": 0})
        unread = loop(budget=Budget(iterations=2), scorer=grade, checkpoint="memory")(lambda s: s).run({"score": 0})
        assert unread.status == "budget_exhausted"  # a policy that reads no score: nothing to tell
        scored_once = iter([0.5, None, None, None])
        run = loop(**policy, scorer=lambda s: next(scored_once), checkpoint=str(tmp_path / "s.db"))(
            lambda s: {"score": 0.5}).run({"score": 0}, run_id="u")
        assert run.steps == 4  # step 0 was scored: a later step without a score is the scorer's choice


def test_a_scorer_that_gives_nan_is_told_and_the_plateau_it_makes_says_so():
    """Regression: a scorer that gave NaN on every step (0/0, the mean of nothing) ended the run `completed`
    after three calls, `score_plateau: no valid score by more than 0.01 in 3 scored steps`, without a word
    that the scores were broken."""
    from loomc import NoScoreWarning
    refine = loop(budget=Budget(iterations=10), converge_on=score_plateau(3), backtrack=BestScore(),
                  scorer=lambda s: float("nan"), checkpoint="memory")(lambda s: s + 1)
    with pytest.warns(NoScoreWarning) as caught:
        run = refine.run(0)
    assert run.status == "completed" and run.steps == 3  # NaN is a scored step that brought no gain
    assert run.reason == "score_plateau: the scorer gave NaN for 3 scored steps, and no valid score"
    assert len(caught) == 1 and str(caught[0].message).startswith(
        f"loomc: run {run.id}'s policy reads scores (score_plateau(patience=3, min_delta=0.01), BestScore()), but the "
        "scorer returned NaN for step 0: NaN is never an improvement nor the best score, so those parts see no valid "
        "score (score_plateau ends such a run completed once its patience is spent).")


def test_a_replay_says_when_a_judge_it_reads_was_never_asked_by_the_recorded_run():
    """Tuning by replay: a judge the recorded run never asked (another policy, or one that asked it only under
    `&`) has no verdict to read; the replay takes that as a no, and says so rather than "never converges"."""
    from loomc import judge
    recorded = loop(budget=Budget(iterations=4), scorer=lambda s: 0.5, checkpoint="memory")(lambda s: s + 1).run(0)
    grader = judge(lambda state: "yes", name="grader")
    said = str((Budget(iterations=10) | grader).replay(recorded.history))
    assert said.endswith("; judge(<lambda>) gave no verdict on any recorded step (the run did not ask it), which the "
                         "replay takes as a no"), said
    from loomc import compare
    (row,) = compare(recorded.history, {"graded": Budget(iterations=10) | grader}).rows()
    assert row == ("graded", "-", "$0.0000", "runs on", "judge(<lambda>): no verdict recorded, taken as no")
    judged = loop(budget=Budget(iterations=4), converge_on=judge(lambda s: s >= 2, name="grader"),
                  checkpoint="memory")(lambda s: s + 1).run(0)
    replayed = (Budget(iterations=10) | grader).replay(judged.history)
    assert replayed.unjudged == () and replayed.stopped_after == 2 and "no verdict" not in str(replayed)


def test_a_replay_does_not_read_another_judges_verdicts_as_its_own():
    """Regression: verdicts are recorded under the judge's name, "judge" unless named. Replaying a cheaper judge
    of the same name on a run the dear one judged read the dear one's verdicts as its own ("judge(haiku) said
    yes"), and so told the cheaper judge would do as well without asking it once."""
    from loomc import compare, judge

    def sonnet(state):
        return state >= 2

    def haiku(state):
        return state >= 1

    run = loop(budget=Budget(iterations=4), converge_on=judge(sonnet), checkpoint="memory")(lambda s: s + 1).run(0)
    assert run.status == "completed" and run.history[0].metrics["loomc.judged_by.judge"] == "judge(sonnet)"
    cheaper = judge(haiku).replay(run.history)
    assert cheaper.stopped_after is None and cheaper.unjudged == ("judge(haiku)",)
    assert judge(sonnet).replay(run.history).stopped_after == 2
    rows = compare(run, {"haiku": judge(haiku), "sonnet": judge(sonnet)}).rows()
    assert rows == [("haiku", "-", "$0.0000", "runs on", "judge(haiku): no verdict recorded, taken as no"),
                    ("sonnet", "2", "$0.0000", "converged", "judge(sonnet) said yes")]
    # A run recorded before loomc said which judge answered is read as before.
    old = History().append(Step(0, 1, metrics={"judge": True}))
    assert judge(haiku).replay(old).stopped_after == 1


def test_a_replay_says_when_a_semantic_delta_it_reads_has_no_distances_in_the_recorded_run():
    """Tuning by replay: semantic_delta reads the distances the live loop embedded. Replayed on a run recorded
    without it, it had none and never fired; the replay said "would not have stopped" and compare() "runs on",
    with nothing to tell that the detector was never measured rather than never close."""
    from loomc import compare, semantic_delta
    flat = semantic_delta(0.05, text_fn=lambda s: "same", embed_fn=lambda texts: [[1.0, 0.0] for _ in texts])
    recorded = loop(budget=Budget(iterations=4), checkpoint="memory")(lambda s: s + 1).run(0)
    replayed = (Budget(iterations=10) | flat).replay(recorded.history)
    assert replayed.unembedded == (repr(flat),) and replayed.unjudged == () and replayed.stopped_after is None
    assert str(replayed).endswith(f"; {flat!r}: no recorded step has a distance (the run did not embed its "
                                  "outputs), so the replay never finds it converged"), str(replayed)
    (row,) = compare(recorded.history, {"flat": flat}).rows()
    assert row == ("flat", "-", "$0.0000", "runs on", f"{flat!r}: no distance recorded, never fires")
    # A run that embedded its outputs has distances: the replay reads them, and says nothing of it.
    embedded = loop(budget=Budget(iterations=4), converge_on=semantic_delta(0.5, text_fn=lambda s: "same",
                                                                            embed_fn=lambda t: [[1.0, 0.0]] * len(t)),
                    checkpoint="memory")(lambda s: s + 1).run(0)
    replayed = (Budget(iterations=10) | flat).replay(embedded.history)
    assert replayed.unembedded == () and replayed.stopped_after == 2 and "no distance" not in str(replayed)


def test_a_replay_says_when_a_part_that_reads_scores_has_none_in_the_recorded_run():
    """The same for scores: score_plateau replayed on a run recorded without a scorer said "would not have
    stopped", as if the scores never plateaued. (The live loop refuses such a policy without a scorer.)"""
    from loomc import compare
    recorded = loop(budget=Budget(iterations=4), checkpoint="memory")(lambda s: s + 1).run(0)
    replayed = (Budget(iterations=10) | score_plateau(2) | BestScore()).replay(recorded.history)
    assert replayed.unscored == ("score_plateau(patience=2, min_delta=0.01)", "BestScore()")
    assert str(replayed).endswith("; score_plateau(patience=2, min_delta=0.01) and BestScore(): no recorded step has a "
                                  "score (the run had no scorer, or it gave None), so the replay finds none to read"), \
        str(replayed)
    rows = compare(recorded.history, {"plateau": score_plateau(2), "stall": Escalate(after=2)}).rows()
    assert rows == [("plateau", "-", "$0.0000", "runs on",
                     "score_plateau(patience=2, min_delta=0.01): no score recorded"),
                    ("stall", "-", "$0.0000", "runs on", "")]  # Escalate counts failures without scores
    scored = loop(budget=Budget(iterations=4), scorer=lambda s: 0.5, checkpoint="memory")(lambda s: s + 1).run(0)
    replayed = score_plateau(2).replay(scored.history)
    assert replayed.unscored == () and replayed.stopped_after == 3 and "no score" not in str(replayed)


def test_two_judges_of_one_name_are_refused_since_each_would_read_the_others_verdict():
    """Regression: a judge records its verdict as step.metrics[name], "judge" unless named. Two judges left
    unnamed wrote to the same place: `judge(is_complete) & ~judge(has_bugs)` read has_bugs's "no" as
    is_complete's verdict too, and never converged, paying for every call its budget allowed; and
    `judge(a) | judge(b)` said "judge(a) said yes" when b had."""
    from loomc import judge, semantic_delta

    def is_complete(state):
        return True

    def has_bugs(state):
        return False

    with pytest.raises(ConfigError, match=re.escape(
            "judge(is_complete) and judge(has_bugs) both record their verdict as step.metrics['judge'], so each would "
            "read the other's: name them apart, as in judge(fn, name='complete')")):
        loop(converge_on=judge(is_complete) & ~judge(has_bugs), checkpoint="memory")
    with pytest.raises(ConfigError, match="both record their verdict"):
        (judge(is_complete) | judge(has_bugs)).replay(History())
    named = loop(budget=Budget(iterations=3), converge_on=judge(is_complete, name="complete")
                 & ~judge(has_bugs, name="bugs"), checkpoint="memory")(lambda s: s + 1).run(0)
    assert named.status == "completed" and named.steps == 1
    assert named.history[0].metrics["complete"] is True and named.history[0].metrics["bugs"] is False
    # One judge twice, or one embedding under two thresholds, measures one thing: allowed, and measured once a
    # step (the band below embedded each output twice, and the judge was asked twice on a step both read).
    asked, embedded = [], []

    def grader(state):
        asked.append(state)
        return state >= 3

    run = loop(budget=Budget(iterations=5), converge_on=judge(grader) | (judge(grader) & Budget(usd=1)),
               checkpoint="memory")(lambda s: s + 1).run(0)
    assert run.status == "completed" and asked == [1, 2, 3]
    band = semantic_delta(0.5, text_fn=str, embed_fn=lambda t: embedded.extend(t) or [[1.0, len(x)] for x in t])
    run = loop(budget=Budget(iterations=3), converge_on=band & ~semantic_delta(0.0001, text_fn=str,
                                                                              embed_fn=band.embed_fn),
               checkpoint="memory")(lambda s: s + 1).run(0)
    assert len(embedded) == 3 and run.status == "budget_exhausted"
    with pytest.raises(ConfigError, match=r"both record their distance as step.metrics\['semantic_delta'\], so each "
                                          "would read the other's: give them one text_fn and model"):
        loop(converge_on=band | semantic_delta(0.1, text_fn=repr, embed_fn=band.embed_fn), checkpoint="memory")


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_a_judge_that_gives_no_verdict_is_told_once(tmp_path, aio):
    """Regression: a judge that forgot its `return`, or passed on a chat reply whose content is None, was a no on
    every step, and the run paid for every call its budget allowed, with nothing saying why it never converged."""
    import asyncio
    import warnings
    from loomc import NoVerdictWarning, judge

    def forgot(state):
        state["draft"] == "final"  # no return

    async def forgot_async(state):
        forgot(state)

    calls = iter([RuntimeError("rate limit"), None, None, None])

    def body(state):
        failure = next(calls)
        if failure is not None:
            raise failure
        return {"draft": "final"}

    def run_of(runner, state, **kwargs):
        return asyncio.run(runner.run(state, **kwargs)) if aio else runner.run(state, **kwargs)

    refine = loop(budget=Budget(iterations=4), converge_on=judge(forgot_async if aio else forgot), backtrack=LastGood(),
                  checkpoint=str(tmp_path / "j.db"))(sync_or_async(body, aio))
    with pytest.warns(NoVerdictWarning) as caught:
        run = run_of(refine, {"draft": ""}, run_id="j")
    assert len(caught) == 1 and run.steps == 4 and run.status == "budget_exhausted"
    name = "forgot_async" if aio else "forgot"
    # Step 0 failed, so no judge asked it: the first successful step is the one checked.
    assert str(caught[0].message) == (
        f"loomc: run j's judge({name}) returned None for step 1: only True or a clear yes ('yes') converges, so a "
        "judge that gives no verdict never stops the run, and only the budget would. Return its verdict; did it "
        "forget `return`, or pass on a model reply with no text (a chat message's content is None when the model "
        "refused or called a tool)? (Checked once, on the first successful step it judged.)")
    assert run.history[1].metrics["judge"] is None and "judge" not in run.history[0].metrics
    # A judge the policy reads only once the score plateaus is checked on the first step it is asked about
    plateau = loop(budget=Budget(iterations=4), converge_on=score_plateau(1) & judge(forgot_async if aio else forgot),
                   scorer=lambda s: 0.5, checkpoint="memory")(sync_or_async(lambda s: {"draft": "final"}, aio))
    with pytest.warns(NoVerdictWarning, match="returned None for step 1"):
        late = run_of(plateau, {"draft": ""})
    assert [s.metrics.get("judge", "not asked") for s in late.history] == ["not asked", None, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoVerdictWarning)  # none of these is told
        said_no = loop(budget=Budget(iterations=2), converge_on=judge(lambda s: False), checkpoint="memory")(
            sync_or_async(lambda s: s, aio))
        assert run_of(said_no, {"draft": ""}).history[-1].metrics == {"judge": False,
                                                                      "loomc.judged_by.judge": "judge(<lambda>)"}
        said_yes_later = iter(["no", None, "yes"])
        later = loop(budget=Budget(iterations=5), converge_on=judge(lambda s: next(said_yes_later)),
                     checkpoint="memory")(sync_or_async(lambda s: s, aio))
        assert run_of(later, {"draft": ""}).steps == 3  # step 0 gave a verdict: a later None is the judge's choice
        calls = iter([None, None])
        more = refine.resume_run("j", budget=Budget(iterations=6))
        resumed = asyncio.run(more) if aio else more
        assert resumed.steps == 6  # it was checked in the run's first successful step, before this resume


def test_a_predicate_that_returns_a_truthy_non_boolean_fails_the_run_after_one_call_rather_than_never_firing():
    """Regression: only True converges, so `lambda h: h[-1].state["tests"] == 6 and h[-1].state["lint"]`,
    which returns "clean" when done, never fired, and the loop paid for calls up to its budget without a
    word about why it did not stop."""
    import numpy

    def ran(verdict):
        return loop(budget=Budget(iterations=3), converge_on=predicate(lambda h: verdict), cost_fn=lambda s: 0.1,
                    checkpoint="memory")(lambda s: s + 1).run(0)

    run = ran("clean")
    assert run.status == "failed" and run.steps == 1 and run.total_cost == Decimal("0.1")  # the paid step is kept
    assert run.reason == ("the policy raised PolicyTypeError: predicate(<lambda>) returned 'clean' (str), which is "
                          "neither True nor False; only True converges, so return a bool (a comparison, or "
                          "bool(...) if any truthy value means done)")
    assert ran(1).reason.startswith("the policy raised PolicyTypeError: predicate(<lambda>) returned 1 (int)")
    assert "returned {'done': True, 'notes': 'xxxxxxxxxxxx... (dict)" in ran({"done": True, "notes": "x" * 99}).reason
    # True and numpy's True converge; a falsy value of any type is a no, as before.
    assert ran(True).status == ran(numpy.bool_(True)).status == "completed"
    for no in (False, None, 0, "", [], numpy.bool_(False)):
        assert ran(no).status == "budget_exhausted", no


def test_a_policy_that_needs_scores_is_refused_at_decoration_time():
    with pytest.raises(ConfigError, match="scorer="):
        loop(converge_on=score_plateau(3))
    with pytest.raises(ConfigError, match="BestScore"):
        loop(backtrack=BestScore())


def test_decoration_time_errors_for_wrong_slots():
    with pytest.raises(PolicyTypeError, match="backtrack="):
        loop(converge_on=BestScore(), scorer=score)
    with pytest.raises(ConfigError, match="Budget"):
        loop(budget=5)
    with pytest.raises(ConfigError, match="checkpoint"):
        loop(checkpoint=42)
    # A fixed price or a field's name where a function goes: the error writes the function meant.
    with pytest.raises(ConfigError, match=re.escape("cost_fn=0.05 must be a function of the state fn returned; for "
                                                    "the same cost every call, write cost_fn=lambda state: 0.05")):
        loop(budget=Budget(usd=1), cost_fn=0.05)
    with pytest.raises(ConfigError, match=re.escape("to read a field of it, write scorer=lambda state: "
                                                    "state['score']")):
        loop(scorer="score")
    with pytest.raises(ConfigError, match=r"^clock=5 must be a function that returns seconds, such as "
                                          r"time.monotonic \(the function, not a reading of it\)$"):
        loop(clock=5)


@pytest.mark.parametrize("make, said", [
    (lambda: loop(Budget(usd=1), score_plateau(3), scorer=score),
     "loop() takes one policy, and got 2: combine them with |, as in loop(Budget(usd=2) | score_plateau(patience=3) "
     "| BestScore()), or name each (budget=, converge_on=, backtrack=, on_stall=)"),
    (lambda: loop(iterations=5, usd=2),
     "loop() got settings it does not take: iterations=5, usd=2: caps are a Budget's: "
     "budget=Budget(iterations=5, usd=2)"),
    (lambda: loop(durability="normal"),
     "loop() got a setting it does not take: durability='normal': durability belongs to the store: "
     "checkpoint=loomc.SQLiteStore('.loomc/checkpoints.db', durability='normal')"),
    (lambda: loop(scorrer=score), f"loop() got a setting it does not take: scorrer={score!r}: did you mean scorer=?"),
    (lambda: loop(store="runs.db", wall_clock="1m"),
     "loop() got settings it does not take: wall_clock='1m': caps are a Budget's: budget=Budget(wall_clock='1m'); "
     "store='runs.db': the store is checkpoint=: checkpoint='runs.db'"),
    (lambda: loop(retries=3), "loop() got a setting it does not take: retries=3: a backtracker goes on after a failed "
                              "call: backtrack=LastGood(wait='2s'), with budget=Budget(iterations=) for how many calls "
                              "in all"),
    (lambda: loop(xyzzy=1), "loop() got a setting it does not take: xyzzy=1: it takes policy=, budget=, converge_on=, "
                            "backtrack=, on_stall=, scorer=, cost_fn=, checkpoint=, on_step=, clock=, lease_seconds=, "
                            "progress="),
], ids=["two policies", "caps", "durability", "misspelt", "two", "retries", "unknown"])
def test_a_setting_loop_does_not_take_is_told_where_it_goes(make, said):
    """Python's own TypeError ("loop() got an unexpected keyword argument 'durability'") named what was wrong and
    not what to write; a type checker still flags these calls (the extra arguments are typed Never)."""
    with pytest.raises(ConfigError) as caught:
        make()
    assert str(caught.value) == said


@pytest.mark.parametrize("make", [
    lambda: loop(converge_on=score_plateau, scorer=score),
    lambda: loop(score_plateau),
    lambda: loop(converge_on=judge),
    lambda: loop(converge_on=semantic_delta),
    lambda: score_plateau(3) | predicate,
    lambda: predicate(score_plateau),
], ids=["converge_on", "alone", "judge", "semantic_delta", "operand", "inside predicate"])
def test_a_policy_factory_passed_without_calling_it_is_refused_at_decoration_time(make):
    """Regression: converge_on=score_plateau became predicate(score_plateau); the loop paid for its first
    step, then asked score_plateau(history) and failed."""
    with pytest.raises(PolicyTypeError, match=r"^\w+ builds a policy, it is not one: call it, as in \w+\("):
        make()


@pytest.mark.parametrize("make, said", [
    (lambda: loop(policy=Budget), "the class Budget (policy=): call it to make the policy, as in Budget(usd=2.00)"),
    (lambda: score_plateau(3) | Escalate, "the class Escalate (right of |): call it to make the policy, as in "
                                          "Escalate(after=3)"),
    (lambda: BestScore | score_plateau(3), "the class BestScore (left of |): call it to make the policy, as in "
                                           "BestScore()"),
], ids=["policy=", "right", "left"])
def test_a_policy_class_used_without_calling_it_says_to_call_it(make, said):
    """The message read "cannot combine a policy with type <class 'loomc.budget.Budget'>", naming no remedy."""
    with pytest.raises(PolicyTypeError) as caught:
        make()
    assert str(caught.value) == f"cannot combine a policy with {said}"


def test_functions_the_loop_cannot_call_with_the_state_alone_are_refused_at_decoration_time():
    """Regression: @loop on a method failed only at the first call, inside the run, with
    "missing 1 required positional argument"."""
    with pytest.raises(ConfigError, match=r"calls fn\(state\) with one argument, but step\(self, state\).*"
                                          "looks like a method"):
        class Agent:
            @loop(budget=Budget(iterations=3), checkpoint="memory")
            def step(self, state):
                return state
    with pytest.raises(ConfigError, match=r"calls fn\(state\).*merge\(a, b\)"):
        loop(checkpoint="memory")(merge)
    with pytest.raises(ConfigError, match=r"calls scorer\(state\).*<lambda>\(\)"):
        loop(scorer=lambda: 1.0, checkpoint="memory")
    with pytest.raises(ConfigError, match=r"calls cost_fn\(state\).*<lambda>\(state, model\)"):
        loop(cost_fn=lambda state, model: 0.1, checkpoint="memory")
    with pytest.raises(ConfigError, match=r"calls on_step\(step\).*<lambda>\(\)"):
        loop(on_step=[print, lambda: None], checkpoint="memory")
    with pytest.raises(ConfigError, match=r"calls predicate's fn\(history\).*<lambda>\(\)"):
        predicate(lambda: True)
    with pytest.raises(ConfigError, match=r"calls judge_fn\(state\).*<lambda>\(state, client\)"):
        judge(lambda state, client: True)
    with pytest.raises(ConfigError, match=r"calls text_fn\(state\).*<lambda>\(state, lang\)"):
        semantic_delta(0.05, text_fn=lambda state, lang: state)
    # A generator "worked": its state was the generator, stored as the list it yielded.
    def drafts(state):
        yield state

    async def adrafts(state):
        yield state

    for gen in (drafts, adrafts):
        with pytest.raises(ConfigError, match="drafts is a generator function .* `return state` instead of `yield`"):
            loop(checkpoint="memory")(gen)
    # An async judge in a sync loop failed only after the first paid call, as that step's error.
    async def reviewer(state):
        return "yes"

    with pytest.raises(ConfigError, match=r"judge\(reviewer\) is an async def, which a sync loop cannot await; "
                                          r"write sync_fn as `async def`"):
        @loop(converge_on=judge(reviewer), checkpoint="memory")
        def sync_fn(state):
            return state

    @loop(converge_on=judge(reviewer), checkpoint="memory")
    async def async_fn(state):
        return state

    assert asyncio.run(async_fn.run(0)).status == "completed"
    with pytest.raises(ConfigError, match="twice_looped is already a loop"):
        @loop(checkpoint="memory")
        @loop(checkpoint="memory")
        def twice_looped(state):
            return state
    # Anything that takes the state alone is fine: defaults, *args, bound methods, partials, builtins.
    for ok in (lambda s, k=1: s, lambda *a: a[0], Agentless().step, functools.partial(merge, b=2), len):
        loop(budget=Budget(iterations=1), scorer=len, checkpoint="memory")(ok)


def merge(a, b):
    return a


class Agentless:
    def step(self, state):
        return state


def test_the_keyword_slots_build_the_same_value_as_policy():
    kw = loop(budget=Budget(usd=2), converge_on=score_plateau(3), backtrack=BestScore(), on_stall=Escalate(after=3),
              scorer=score, checkpoint="memory")(lambda s: s)
    one = loop(policy=Budget(usd=2) | score_plateau(3) | BestScore() | Escalate(after=3), scorer=score,
               checkpoint="memory")(lambda s: s)
    assert kw.policy == one.policy


def test_the_decorated_object_keeps_the_function_face():
    def refine_report(state: int) -> int:
        """Make the report better."""
        return state + 1

    runner = loop(budget=Budget(iterations=3), checkpoint="memory")(refine_report)
    assert runner.__name__ == "refine_report" and runner.__doc__ == "Make the report better."
    assert runner.fn is refine_report
    assert runner.run(0).state == 3
    with pytest.raises(BudgetExhausted):
        runner(0)
    done = loop(converge_on=predicate(lambda h: h[-1].state >= 3), checkpoint="memory")(refine_report)
    assert done(0) == 3


FAILED = "failed"


@pytest.mark.parametrize("scores, patience, min_delta, stops_after", [
    ([0.5] * 5, 2, 0.01, 3),                          # flat: the first step is the reference
    ([0.5, 0.75, 1.0], 1, 0.25, 2),                    # a gain of exactly min_delta is not one
    ([0.5, 0.6, 0.7, 0.8], 2, 0.1, None),              # 0.6 - 0.5 < 0.1; 0.7 counts; 0.8 - 0.7 is float noise
    ([0.5, 0.6, 0.7, 0.8], 1, 0.1, 2),
    ([0.1, 0.12, 0.14, 0.16, 0.18], 2, 0.01, None),    # slow but steady progress resets the count
    ([0.5, float("nan"), float("nan")], 2, 0.01, 3),   # NaN is a step without improvement
    ([0.5, None, FAILED, 0.5, 0.5], 2, 0.01, 5),       # unscored and failed steps are not counted
    ([float("-inf"), 0.5, 0.5, 0.5], 2, 0.01, 4),      # anything beats -inf (regression: nothing did)
    ([float("-inf"), float("-inf"), float("-inf")], 2, 0.01, 3),
    ([float("inf"), 1e308], 1, 0.01, 2),
    ([0.2, float("inf"), 5.0, 6.0], 2, 0.01, 4),
])
def test_score_plateau_counts_as_the_docs_say(scores, patience, min_delta, stops_after):
    h = History([Step(i, None if s is FAILED else {"i": i}, score=None if s is FAILED else s,
                      error="RuntimeError: boom" if s is FAILED else None) for i, s in enumerate(scores)])
    assert score_plateau(patience, min_delta).replay(h).stopped_after == stops_after


def test_a_scorer_that_returns_no_number_fails_its_step_saying_so_and_numeric_text_counts():
    verdicts = iter(["0.8", "good", {"score": 1}, 10 ** 400])
    run = loop(budget=Budget(iterations=4), backtrack=LastGood(), scorer=lambda s: next(verdicts),
               checkpoint="memory")(lambda s: s + 1).run(0)
    assert run.history[0].score == 0.8
    assert run.history[1].error == ("TypeError: scorer(state) must return a number (higher is better) or None, "
                                    "got str: 'good'")
    assert run.history[2].error.endswith("got dict: {'score': 1}")
    assert run.history[1].state == 2, "a step whose scorer failed keeps its state"
    # float() overflows on it: a failed step like the others, not an error out of the loop that loses the state
    assert run.history[3].error.endswith("got int: 100000000000000000...0000000000000000000 (OverflowError: int too "
                                         "large to convert to float)") and run.history[3].state == 2


def test_nan_never_becomes_the_best_score():
    from loomc import NoScoreWarning
    fn, _ = scripted([float("nan"), 0.2, float("nan"), 0.1])
    with pytest.warns(NoScoreWarning, match="returned NaN for step 0"):  # the first draft's grade: told once
        run = loop(budget=Budget(iterations=4), backtrack=BestScore(), scorer=score, checkpoint="memory")(fn).run({})
    assert run.history.best.n == 1
    assert run.state["k"] == 1


def test_replay_matches_what_the_live_loop_did():
    fn, _ = scripted([0.3, 0.5, 0.8, 0.6, 0.8, 0.8, 0.8, 0.8])
    policy = Budget(iterations=20) | score_plateau(3) | BestScore()
    run = loop(policy=policy, scorer=score, checkpoint="memory")(fn).run({})
    r = policy.replay(run.history)
    assert r.stopped_after == len(run.history)
    assert r.decision.outcome is Outcome.CONVERGED
    assert r.backtracks == ((3, 2),)
    other = (Budget(iterations=20) | score_plateau(1)).replay(run.history)
    assert other.stopped_after == 4 and "score_plateau" in str(other)


def test_on_step_callbacks_see_every_committed_step_once_and_a_failing_one_does_not_harm_the_run():
    seen = []

    def broken(step):
        raise ValueError("callback bug")

    runner = loop(budget=Budget(iterations=4), on_step=[seen.append, broken], checkpoint="memory")(lambda s: s + 1)
    with pytest.warns(UserWarning, match="callback bug"):
        run = runner.run(0)
    assert [s.n for s in seen] == [0, 1, 2, 3]
    assert run.status == "budget_exhausted" and run.state == 4


def test_an_expensive_detector_right_of_a_fired_one_is_not_consulted():
    asked = []

    def expensive(h):
        asked.append(len(h))
        return False

    policy = predicate(lambda h: len(h) >= 2) | predicate(expensive) | Budget(iterations=10)
    run = loop(policy=policy, checkpoint="memory")(lambda s: s + 1).run(0)
    assert run.status == "completed" and len(run.history) == 2
    assert asked == [1], "asked after step 0 only; after step 1 the left side had already fired"


def test_a_step_that_makes_several_paid_calls_stops_before_the_cap_by_asking_usd_left(tmp_path):
    import loomc
    from loomc import LoomcError
    seen: list[Decimal | None] = []

    def agent(state):  # an agentic step: paid calls until done or the budget runs short
        while state["todo"]:
            left = loomc.usd_left()
            seen.append(left)
            if left is not None and left < Decimal("0.30"):
                break
            loomc.charge(Decimal("0.30"))  # the call, priced
            state = {"todo": state["todo"] - 1}
        return state

    db = str(tmp_path / "agent.db")
    capped = loop(budget=Budget(usd=1.00, iterations=5), checkpoint=db)(agent)
    run = capped.run({"todo": 10}, run_id="agent")
    assert seen == [Decimal("1.00"), Decimal("0.70"), Decimal("0.40"), Decimal("0.10")]
    assert run.total_cost == Decimal("0.90") and run.status == "budget_exhausted" and len(run.history) == 1
    assert run.state == {"todo": 7}
    # The room counts what the run spent before a resume, and a raise.
    seen.clear()
    capped.resume_run("agent", budget=Budget(usd=2))
    assert seen[0] == Decimal("1.10")
    seen.clear()
    loop(budget=Budget(iterations=1), checkpoint="memory")(agent).run({"todo": 1})
    assert seen == [None]  # no USD cap: nothing to keep under

    def parent(state):  # a child run's room is its parent's
        loomc.charge(Decimal("0.25"))
        return loop(budget=Budget(usd=5, iterations=1), checkpoint="memory")(agent).run(state).state

    seen.clear()
    loop(budget=Budget(usd=1, iterations=1), checkpoint="memory")(parent).run({"todo": 1})
    assert seen == [Decimal("0.75")]

    def holding_parent(state):  # a child that holds its step_estimate still has that room itself
        return loop(budget=Budget(usd=5, iterations=1, step_estimate=0.2), checkpoint="memory")(agent).run(state).state

    seen.clear()
    loop(budget=Budget(usd=1, iterations=1), checkpoint="memory")(holding_parent).run({"todo": 1})
    assert seen == [Decimal("1")]
    with pytest.raises(LoomcError, match=r"loomc.usd_left\(\) was called outside a loop iteration") as caught:
        loomc.usd_left()
    assert "cannot charge" not in str(caught.value)  # the charge() hint is for charge()


def test_usd_left_counts_an_earlier_call_of_unknown_cost_as_the_cap_does():
    """A failed call that cost_fn could not price counts at the estimate before each call; usd_left() inside a
    later step counted it at $0, so an agentic step that spent by it could take the run past the cap."""
    import loomc
    seen: list[Decimal | None] = []

    def fix(state):
        seen.append(loomc.usd_left())
        if len(seen) == 2:
            raise RuntimeError("the reply did not parse")  # paid for, price unknown
        return {"i": state["i"] + 1}

    run = loop(policy=Budget(usd=2.00) | LastGood(), cost_fn=lambda s: 0.40, checkpoint="memory")(fix).run({"i": 0})
    # Step 1's call counts at $0.40 from step 2 on, as the cap's reason says.
    assert seen == [Decimal("2.00"), Decimal("1.60"), Decimal("1.20"), Decimal("0.80"), Decimal("0.40")]
    assert "counting 1 failed call (step 1)" in run.reason
    seen.clear()
    # Each cap counts it at its own estimate: step_estimate= where given.
    capped = Budget(usd=2.00, step_estimate=0.50) | Budget(usd=3.00) | LastGood()
    loop(policy=capped, cost_fn=lambda s: 0.40, checkpoint="memory")(fix).run({"i": 0})
    assert seen[:3] == [Decimal("2.00"), Decimal("1.60"), Decimal("1.10")]


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_a_step_that_makes_several_slow_calls_keeps_under_the_wall_clock_by_asking_time_left(clock, aio):
    """An agentic step (calls until done) runs inside one check of the wall clock, as it does inside one
    check of the USD cap: loomc.time_left() is the time counterpart of usd_left()."""
    seen: list[float | None] = []

    def agent(state):
        while state["todo"]:
            left = loomc.time_left()
            seen.append(left)
            if left is not None and left < 60:  # a call takes a minute
                break
            clock.advance(60)
            state = {"todo": state["todo"] - 1}
        return state

    def run(runner, state):
        return asyncio.run(runner.run(state)) if aio else runner.run(state)

    capped = loop(budget=Budget(wall_clock="5m", iterations=3), clock=clock, checkpoint="memory")
    done = run(capped(sync_or_async(agent, aio)), {"todo": 10})
    assert seen == [300, 240, 180, 120, 60, 0] and done.state == {"todo": 5} and len(done.history) == 1
    assert done.reason == "wall_clock: 5m00s active of the 5m cap"
    seen.clear()
    run(loop(budget=Budget(iterations=1), clock=clock, checkpoint="memory")(sync_or_async(agent, aio)), {"todo": 1})
    assert seen == [None]  # no wall-clock cap: nothing to keep under

    def parent(state):  # a child run's time is its parent's
        clock.advance(100)
        return loop(budget=Budget(iterations=1), clock=clock, checkpoint="memory")(agent).run(state).state

    seen.clear()
    loop(budget=Budget(wall_clock=150, iterations=1), clock=clock, checkpoint="memory")(parent).run({"todo": 1})
    assert seen == [50]
    with pytest.raises(loomc.LoomcError, match=r"loomc.time_left\(\) was called outside a loop iteration"):
        loomc.time_left()


def test_a_run_past_its_wall_clock_cap_says_which_call_took_longer_than_counted(clock):
    def agent(calls):  # a step of `calls` slow calls, never asking time_left()
        def fn(state):
            for seconds in calls[state]:
                clock.advance(seconds)
            return state + 1
        return fn

    run = loop(budget=Budget(wall_clock="2m"), clock=clock, checkpoint="memory")(agent([[60, 60, 60]])).run(0)
    assert run.reason == ("wall_clock: 3m00s active, past the 2m cap: step 0 took 3m00s; the cap is checked between "
                          "calls of fn: inside one, ask loomc.time_left() before each slow call")
    # Calls of 30 s, then one of 2 minutes, started with room for one of 30 s.
    run = loop(budget=Budget(wall_clock=120), clock=clock, checkpoint="memory")(agent([[30], [30], [120]])).run(0)
    assert run.reason.startswith("wall_clock: 3m00s active, past the 120s cap: step 2 took 2m00s (calls before "
                                 "it took up to 30.0s); the cap is checked")
    assert len(run.reason) < 200  # all of it on loomc show's line
    # Time past the cap that no call took longer than counted (loomc's own, here an on_step callback's)
    # reads as before.
    run = loop(budget=Budget(wall_clock=110), clock=clock, checkpoint="memory",
               on_step=lambda step: clock.advance(15))(agent([[50], [50], [50]])).run(0)
    assert len(run.history) == 2 and run.reason == "wall_clock: 1m55s active of the 110s cap"


def test_a_run_past_its_usd_cap_says_which_step_passed_it_and_how_to_keep_under(tmp_path):
    import loomc

    def agent(state):  # an agentic step that never asks usd_left(): ten paid calls under a $0.10 cap
        for _ in range(10):
            loomc.charge(0.05)
        return state + 1

    db = str(tmp_path / "over.db")
    run = loop(budget=Budget(usd=0.10), checkpoint=db)(agent).run(0)
    assert run.status == "budget_exhausted" and run.total_cost == Decimal("0.50")
    assert run.reason.startswith("usd: $0.5000 spent, past the $0.1000 cap: step 0 alone cost $0.5000 with "
                                 "$0.1000 left. The cap is checked before each call of fn")
    assert "loomc.usd_left()" in run.reason and "step_estimate=" in run.reason
    assert run.reason in str(run.error)
    # A step that cost more than the estimate (a conversation that grew): it is named with the room it had.
    costs = iter([0.1, 0.1, 0.9])
    grew = loop(budget=Budget(usd=1), cost_fn=lambda s: next(costs), checkpoint="memory")(lambda s: s + 1).run(0)
    assert grew.reason.startswith("usd: $1.1000 spent, past the $1.0000 cap: step 2 alone cost $0.9000 with "
                                  "$0.8000 left")
    # Reaching the cap exactly, or a step that would pass it, reads as before.
    assert loop(budget=Budget(usd=0.10), cost_fn=lambda s: 0.05, checkpoint="memory")(
        lambda s: s + 1).run(0).reason == "usd: $0.1000 spent + $0.0500 for the next step would pass the $0.1000 cap"
    assert loomc.load_history(db, run.id)[-1].events == ("budget exhausted",)


def test_loop_without_parentheses_decorates_with_the_defaults(tmp_path, monkeypatch):
    """`@loop` above a def made the function the loop's *policy* (a predicate) and returned the
    decorator, so `refine(state)` later failed with a message about @loop and a dict."""
    import asyncio
    from loomc import DEFAULT_BUDGET, LoopRunner, predicate
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOMC_DB", raising=False)

    @loop
    def refine(state):
        return state + 1

    assert isinstance(refine, LoopRunner) and refine.policy == DEFAULT_BUDGET
    run = refine.run(0)
    assert run.state == 100 and run.status == "budget_exhausted"
    assert (tmp_path / ".loomc" / "checkpoints.db").exists()

    @loop
    async def arefine(state):
        return state + 2

    assert asyncio.run(arefine.run(0)).state == 200
    # With any setting given, a function in the policy slot is still a predicate; so is one alone that
    # cannot be a decorated def (a lambda) or takes a history.
    capped = loop(lambda h: h[-1].state >= 3, budget=Budget(iterations=10), checkpoint="memory")
    assert capped(lambda s: s + 1)(0) == 3

    def done(history):
        return history[-1].state >= 4

    for alone in (loop(policy=done), loop(lambda h: h[-1].state >= 4)):
        assert not isinstance(alone, LoopRunner) and alone(lambda s: s + 1).run(0).state == 4
    assert loop(predicate(lambda h: h[-1].state >= 2))(lambda s: s + 1).run(0).state == 2


def test_a_scorer_and_a_judge_may_charge_their_own_calls_and_a_predicate_is_told_to_be_a_judge():
    import loomc
    from loomc import LoomcError

    def scorer(s):
        loomc.charge("0.01", "scorer")
        return s / 10

    def verdict(s):
        loomc.charge("0.02", "judge")
        return s >= 2

    @loop(policy=Budget(usd=1, iterations=5) | judge(verdict), scorer=scorer, checkpoint="memory")
    def step(s):
        loomc.charge("0.10", "model")
        return s + 1

    run = step.run(0)
    assert run.status == "completed" and run.total_cost == Decimal("0.26")
    assert run.history[0].metrics["cost_items"] == {"model": "0.10", "judge": "0.02", "scorer": "0.01"}

    def paid_predicate(h):
        loomc.charge("0.05")
        return False

    @loop(policy=Budget(usd=1, iterations=3) | predicate(paid_predicate), checkpoint="memory")
    def other(s):
        loomc.charge("0.10")
        return s + 1

    with pytest.raises(LoomcError, match=r"A predicate in the policy cannot charge: for a verdict that costs money "
                                         r"use judge\(fn\), whose charges join the step") as caught:
        other(0)
    assert caught.value.history.total_cost == Decimal("0.10") and caught.value.state == 1  # the paid step is kept


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_a_judge_that_raises_does_not_hide_what_the_call_cost_from_the_usd_cap(aio):
    """Regression: a judge ran before cost_fn, so a judge that raised (its own API down) left the paid
    step at $0. With LastGood the loop went on, and the USD cap never saw the spend."""
    calls = []

    def broken_judge(state):
        raise ConnectionError("the grading model is down")

    async def async_cost(state):
        return 0.1

    runner = loop(budget=Budget(usd=0.35, iterations=20), converge_on=judge(broken_judge), backtrack=LastGood(),
                  cost_fn=async_cost if aio else (lambda state: 0.1), checkpoint="memory")(
        sync_or_async(lambda state: calls.append(state) or state + 1, aio))
    run = asyncio.run(runner.run(0)) if aio else runner.run(0)
    assert run.status == "budget_exhausted" and len(calls) == 3 and run.total_cost == Decimal("0.3")
    assert [s.cost for s in run.history] == [Decimal("0.1")] * 3
    assert run.history[0].error == ("ConnectionError: the grading model is down (raised by judge(broken_judge), "
                                    "after fn returned: step 0 keeps the state fn returned)")
    assert run.history[0].state == 1


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_failed_calls_a_cost_fn_cannot_price_count_at_the_estimate_so_the_usd_cap_holds(aio):
    """Regression: `cost_fn` prices the state fn returns, so a call that fails after the model answered
    (its reply did not parse) counted $0. Under `Budget(usd=1.0)` alone with `LastGood()`, a fn that kept
    failing after its paid call ran without end: the cap saw $0.40 spent, whatever was paid."""
    paid = []

    def refine(state):
        paid.append(Decimal("0.40"))  # the model call, paid whatever happens next
        if len(paid) > 20:
            raise RuntimeError("gone on without end")  # not one LastGood goes on from: the run fails
        if len(paid) > 1:
            raise ValueError("the reply did not parse")
        return {"draft": "v1", "cost": 0.40}

    runner = loop(budget=Budget(usd=1.0), backtrack=LastGood(on=(ValueError,)), cost_fn=lambda s: s["cost"],
                  checkpoint="memory")(sync_or_async(refine, aio))
    run = asyncio.run(runner.run({"draft": "", "cost": 0})) if aio else runner.run({"draft": "", "cost": 0})
    assert run.status == "budget_exhausted" and len(paid) == 2 and sum(paid) <= Decimal("1.0")
    assert run.reason == (
        "usd: $0.4000 spent + $0.4000 for the next step would pass the $1.0000 cap, counting 1 failed call (step 1) "
        "that cost_fn could not price at $0.4000; charge each paid call inside fn (loomc.charge)")
    assert len(run.reason) < 200, "loomc show cuts a reason at 200 characters"
    assert run.history[1].metrics["loomc.cost_unknown"] is True and run.total_cost == Decimal("0.4")
    from loomc.cli import step_rows  # loomc show and the notebook say the $0 is not what the call cost
    assert list(step_rows(run.history))[1].endswith("ValueError: the reply did not parse  <- cost unknown  "
                                                    "<- budget exhausted")
    assert "<td>budget exhausted, cost unknown</td>" in run._repr_html_()
    assert Budget(usd=1.0).replay(run.history).stopped_after == 2, "a replay stops where the run did"

    # Charged inside fn, a failed call counts what it cost: nothing is left to guess.
    del paid[:]

    def charged(state):
        paid.append(Decimal("0.10"))
        loomc.charge(Decimal("0.10"))
        if len(paid) > 1:
            raise ValueError("the reply did not parse")
        return {"draft": "v1"}

    runner = loop(budget=Budget(usd=1.0), backtrack=LastGood(on=(ValueError,)), checkpoint="memory")(
        sync_or_async(charged, aio))
    run = asyncio.run(runner.run({"draft": ""})) if aio else runner.run({"draft": ""})
    assert run.status == "budget_exhausted" and len(paid) == 10 and run.total_cost == sum(paid) == Decimal("1.0")
    assert not any("loomc.cost_unknown" in s.metrics for s in run.history)


def test_a_call_cut_short_before_it_charged_counts_at_the_estimate_too():
    """A call whose process died before it charged is recorded at $0 by the resume: its cost is as
    unknown as that of a call cost_fn could not price, and the cap counts both alike."""
    def failed(n, unknown=False, died=False):
        return Step(n, None, cost=Decimal(0), error="Interrupted: the process died" if died else "ValueError: x",
                    events=("interrupted",) if died else ("failed",),
                    metrics={"loomc.cost_unknown": True} if unknown else {})

    paid = Step(0, {"n": 0}, cost=Decimal("0.30"))
    died = History([paid, failed(1, died=True)])
    assert Budget(usd=0.8).decide(died, 0).reason == (
        "usd: $0.3000 spent + $0.3000 for the next step would pass the $0.8000 cap, counting 1 failed call (step 1) "
        "cut short before charging at $0.3000; charge each paid call inside fn (loomc.charge)")
    known = History([paid, failed(1), failed(2)])  # failures that charged nothing, under no cost_fn: $0, known
    assert not Budget(usd=0.8).decide(known, 0).stops
    both = History([paid, failed(1, unknown=True), Step(2, {"n": 2}, cost=Decimal("0.05")), failed(3, died=True)])
    assert Budget(usd=1.0).decide(both, 0).reason == (
        "usd: $0.3500 spent + $0.3000 for the next step would pass the $1.0000 cap, counting 2 failed calls (the "
        "last, step 3) that cost_fn could not price or cut short before charging at $0.3000 each; charge each paid "
        "call inside fn (loomc.charge)")
    pair = History([paid, failed(1, unknown=True), failed(2, died=True)])
    assert Budget(usd=1.0).decide(pair, 0).reason == (
        "usd: $0.3000 spent + $0.3000 for the next step would pass the $1.0000 cap, counting 2 failed calls (steps "
        "1 to 2) that cost_fn could not price or cut short before charging at $0.3000 each; charge each paid call "
        "inside fn (loomc.charge)")
    mixed = History([paid, failed(1), failed(2, died=True)])  # step 1 failed at a known $0: it is not named
    assert Budget(usd=0.8).decide(mixed, 0).reason == (
        "usd: $0.3000 spent + $0.3000 for the next step would pass the $0.8000 cap, counting 1 failed call (step 2) "
        "cut short before charging at $0.3000; charge each paid call inside fn (loomc.charge)")
    # A child's share of its parent's cap counts them alike.
    from loomc.budget import ParentCap
    assert ParentCap("p", Decimal("0.8")).fire(died, 0) == (
        "usd: the parent run p's budget leaves $0.8000 for this child; $0.3000 spent + $0.3000 for the next step "
        "would pass it, with 1 failed call of unknown cost counted at $0.3000")
    assert ParentCap("p", Decimal("0.8")).fire(known, 0) is None


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_an_error_raised_after_fn_returned_names_what_raised_it_not_fn(aio):
    """`KeyError: 'score'` from a scorer read as an error of fn: the user looked for it in fn, which had
    returned, and its state was kept. The step's error, the run's reason and the exception now say which
    of cost_fn, a probe or the scorer raised it; an error of fn's own reads as before."""
    def attempt(**measures):
        runner = loop(budget=Budget(iterations=2), checkpoint="memory", **measures)(
            sync_or_async(lambda state: {"draft": state["draft"] + "!"}, aio))
        with pytest.raises(Exception) as caught:
            asyncio.run(runner({"draft": "a"})) if aio else runner({"draft": "a"})
        assert caught.value.history[0].state == {"draft": "a!"}, "the state fn returned is kept on the step"
        last_metrics[:] = [caught.value.history[0].metrics]
        return caught.value.history[0].error, caught.value.__notes__[0]

    last_metrics: list = []

    def grade(state):
        return state["score"]

    def is_done(state):
        raise ConnectionError("the grading model is down")

    assert attempt(scorer=grade) == (
        "KeyError: 'score' (raised by the scorer, after fn returned: step 0 keeps the state fn returned)",
        "loomc: raised by the scorer, after fn returned: step 0 keeps the state fn returned")
    assert "loomc.cost_unknown" not in last_metrics[0], "no cost_fn here: the call's cost is what it charged"
    error, note = attempt(cost_fn=lambda state: state["usage"]["cost"])
    assert error == ("KeyError: 'usage' (raised by cost_fn, after fn returned: step 0 keeps the state fn returned; "
                     "the call's price from cost_fn is not in its cost)") and note == f"loomc: {error[19:-1]}"
    assert last_metrics[0]["loomc.cost_unknown"] is True, "what the call cost is unknown, as for a failed fn"
    error, note = attempt(converge_on=judge(is_done), cost_fn=lambda state: 0.1)
    assert error == ("ConnectionError: the grading model is down (raised by judge(is_done), after fn returned: step 0 "
                     "keeps the state fn returned)")
    # fn's own error: no word of the others.
    runner = loop(budget=Budget(iterations=2), scorer=grade, checkpoint="memory")(
        sync_or_async(lambda state: state["missing"], aio))
    with pytest.raises(KeyError) as caught:
        asyncio.run(runner({"draft": "a"})) if aio else runner({"draft": "a"})
    assert caught.value.history[0].error == "KeyError: 'missing'" and not any(
        "raised by" in note for note in caught.value.__notes__)


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_a_backtracker_waits_longer_after_each_failure_in_a_row_before_calling_again(aio):
    """A rate-limited API is not called again at once: 2x the wait after each further failure, up to max_wait."""
    import asyncio
    from conftest import sync_or_async
    outcomes = iter(["ok", "429", "429", "429", "429", "ok", "429", "ok"])

    def body(s):
        if next(outcomes) == "429":
            raise RuntimeError("429 Too Many Requests")
        return s + 1

    refine = loop(budget=Budget(iterations=8), backtrack=LastGood(wait=0.05, max_wait=0.15),
                  checkpoint="memory")(sync_or_async(body, aio))
    run = asyncio.run(refine.run(0)) if aio else refine.run(0)
    h = run.history
    assert run.state == 3 and [s.ok for s in h] == [True, False, False, False, False, True, False, True]
    waits = [next((e for e in s.events if e.startswith("wait ")), None) for s in h]
    assert waits == [None, "wait 0.05s", "wait 0.1s", "wait 0.15s", "wait 0.15s", None, "wait 0.05s", None]
    for before, after, wait in zip(h, h[1:], waits):
        if wait is not None:  # the next call started no sooner than the wait after the failed one ended
            assert after.started_at - (before.started_at + before.duration) >= float(wait[5:-1]) - 0.005
    assert repr(refine.policy) == "Budget(iterations=8) | LastGood(wait=0.05, max_wait=0.15)"


@pytest.mark.parametrize("wait, why", [
    ("8m", "the 480s wait before the next call would reach the cap"),  # 2 + 8 minutes: no time left at all
    (450, "the 450s wait + 1m00s for the next call (as long as step 0, the longest yet) would pass the cap"),
])
def test_a_wait_that_would_reach_the_wall_clock_cap_stops_the_run_instead(clock, wait, why):
    def slow(s):
        clock.advance(60)  # calls of 1 minute; the second fails
        if s == 1:
            raise RuntimeError("503 Service Unavailable")
        return s + 1

    refine = loop(budget=Budget(wall_clock="10m"), backtrack=BestScore(wait=wait, max_wait="1h"),
                  scorer=lambda s: 1.0, checkpoint="memory", clock=clock)(slow)
    run = refine.run(0)  # 2 minutes spent, then the wait, then a call of a minute: past the cap, so no wait
    assert run.status == "budget_exhausted" and run.steps == 2 and run.state == 1
    assert run.history[1].events == ("budget exhausted",)
    assert run.reason == f"wall_clock: 2m00s active of the 10m cap, and {why}"
    again = refine.policy.replay(run.history)  # replay stops where the live loop did, for the same reason
    assert again.stopped_after == 2 and again.decision.outcome is Outcome.BUDGET_EXHAUSTED
    assert again.decision.reason == run.reason
    with pytest.raises(ConfigError, match=r"LastGood: wait='soon' is not a duration"):
        LastGood(wait="soon")


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_a_wait_after_which_the_next_call_would_end_exactly_at_the_cap_is_waited_and_the_call_made(clock, aio):
    """As a call that ends exactly at the wall-clock cap may be made, so may one after a wait: 2 minutes of calls,
    a 7-minute wait and a call of a minute end at the 10-minute cap. The wait is slept on the loop's clock, which
    can sleep (FakeClock.sleep): the test does not wait 7 minutes (a backoff wait used to be a real sleep whatever
    the clock, and not counted as active time by a clock that did not move with it)."""
    def slow(s):
        clock.advance(60)
        if s == 1:
            raise RuntimeError("503 Service Unavailable")
        return s + 1

    refine = loop(budget=Budget(wall_clock="10m"), backtrack=LastGood(wait="7m", max_wait="1h"), checkpoint="memory",
                  clock=clock)(sync_or_async(slow, aio))
    run = asyncio.run(refine.run(0)) if aio else refine.run(0)
    assert run.steps == 3 and run.active_seconds == 600.0
    assert [s.events for s in run.history] == [(), ("backtrack to step 0", "wait 420s"), ("budget exhausted",)]
    assert run.reason.startswith("wall_clock: 10m00s active of the 10m cap")


def test_a_ctrl_c_during_the_wait_stops_the_run_as_cancelled_with_the_failed_step_kept(tmp_path):
    import signal
    from loomc import SQLiteStore
    store = SQLiteStore(tmp_path / "w.db")

    def flaky(s):
        if s == 1:
            raise RuntimeError("429 Too Many Requests")
        return s + 1

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    refine = loop(budget=Budget(iterations=5), backtrack=LastGood(wait="30s"), checkpoint=store)(flaky)
    previous = signal.signal(signal.SIGALRM, ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 0.3)  # lands while the loop waits 30 s after step 1 failed
    try:
        with pytest.raises(KeyboardInterrupt):
            refine(0, run_id="waiting")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    record, steps = store.get_run("waiting"), store.load_steps("waiting")
    assert record.status == "cancelled" and [s.error is None for s in steps] == [True, False]
    assert steps[1].events == ("backtrack to step 0", "wait 30s")
    # The reason says where the Ctrl-C landed: in no call (one that does is recorded as a step of its own).
    assert record.reason == ("KeyboardInterrupt in the backoff wait after step 1 (wait 30s): a Ctrl-C, or a "
                             "notebook's interrupt")


@pytest.mark.parametrize("aio", [False, True])
def test_a_stop_asked_for_during_a_backoff_wait_ends_the_wait_and_the_run(tmp_path, aio, monkeypatch):
    """A container's SIGTERM came during a 30 s backoff: the wait went on past the grace period."""
    import signal
    import time
    import loomc
    from loomc import SQLiteStore, context
    monkeypatch.setattr(context, "_STOPPING", [])
    store = SQLiteStore(tmp_path / "w.db")

    def flaky(s):
        if s == 1:
            raise RuntimeError("429 Too Many Requests")
        return s + 1

    refine = loop(budget=Budget(iterations=5), backtrack=LastGood(wait="30s"), checkpoint=store)(
        sync_or_async(flaky, aio))
    previous = signal.signal(signal.SIGALRM, loomc.request_stop)
    signal.setitimer(signal.ITIMER_REAL, 0.3)  # lands while the loop waits 30 s after step 1 failed
    t0 = time.monotonic()
    try:
        run = asyncio.run(refine.run(0, run_id="waiting")) if aio else refine.run(0, run_id="waiting")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - t0 < 20, "the wait ended at the stop, not after 30 s"
    assert run.status == "cancelled" and run.reason.startswith("SIGALRM received; stopped before step 2")
    assert isinstance(run.error, loomc.StopRequested) and run.error.code == 128 + signal.SIGALRM
    steps = store.load_steps("waiting")
    assert [s.error is None for s in steps] == [True, False] and steps[1].events == ("backtrack to step 0", "wait 30s")
