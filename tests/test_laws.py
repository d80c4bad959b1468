"""The policy algebra's laws and the state codec's round trip, stated once and checked over generated values."""

from __future__ import annotations

import datetime as _dt
import enum as _enum
import uuid as _uuid
from decimal import Decimal

import pydantic as _pydantic
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import loomc
from loomc import codec as _codec
from loomc import (BestScore, Budget, Escalate, History, LastGood, SQLiteStore, Step, always, judge, loop, never,
                   predicate, score_plateau)
from loomc.errors import COST_UNKNOWN_METRIC

from conftest import history_of


def last_above_half(h):
    return (h[-1].score or 0) > 0.5


def three_or_more(h):
    return len(h) >= 3


def any_failed(h):
    return any(not s.ok for s in h)


def _budget(u, i):
    try:
        return Budget(usd=u, iterations=i)
    except Exception:
        return Budget(iterations=3)


LEAVES = st.one_of(
    st.builds(score_plateau, st.integers(1, 4), st.sampled_from([0.0, 0.01, 0.1])),
    st.builds(_budget, st.sampled_from([None, "0.05", "0.2", "1"]), st.sampled_from([None, 2, 5])),
    st.builds(lambda w: Budget(wall_clock=w), st.sampled_from([1, 5, 30])),
    st.sampled_from([predicate(last_above_half), predicate(three_or_more), predicate(any_failed), never, always]),
)

SIGNALS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda ab: ab[0] | ab[1]),
        st.tuples(inner, inner).map(lambda ab: ab[0] & ab[1]),
        inner.map(lambda a: ~a),
    ),
    max_leaves=6,
)

# A step as a compact tuple: (score or None or NaN, cost in cents, failed?, seconds the call took), where
# a failure may leave its call's cost unknown ("unknown": fn raised under a cost_fn), which a USD cap
# counts at its estimate; the wall-clock cap counts the next call at the longest so far.
ROWS = st.lists(
    st.tuples(st.one_of(st.none(), st.floats(0, 1), st.just(float("nan"))), st.integers(0, 10),
              st.sampled_from([False, True, "unknown"]), st.sampled_from([0.0, 0.5, 2.0, 12.0])),
    max_size=12,
)


def build(rows) -> History:
    return History([Step(n, None if failed else {"n": n}, cost=Decimal(cents) / 100,
                         score=None if failed else score, error="ValueError: x" if failed else None,
                         metrics={COST_UNKNOWN_METRIC: True} if failed == "unknown" else {}, duration=took)
                    for n, (score, cents, failed, took) in enumerate(rows)])


ELAPSED = st.floats(0, 60)


def fires(policy, h, elapsed) -> bool:
    return policy.decide(h, elapsed).stops


@given(SIGNALS, SIGNALS, SIGNALS, ROWS, ELAPSED)
def test_or_and_are_associative(a, b, c, rows, e):
    h = build(rows)
    assert fires((a | b) | c, h, e) == fires(a | (b | c), h, e)
    assert fires((a & b) & c, h, e) == fires(a & (b & c), h, e)


@given(SIGNALS, SIGNALS, ROWS, ELAPSED)
def test_or_and_are_commutative_and_match_any_all(a, b, rows, e):
    h = build(rows)
    assert fires(a | b, h, e) == fires(b | a, h, e) == (fires(a, h, e) or fires(b, h, e))
    assert fires(a & b, h, e) == fires(b & a, h, e) == (fires(a, h, e) and fires(b, h, e))


@given(SIGNALS, ROWS, ELAPSED)
def test_identities_annihilators_idempotence(a, rows, e):
    h = build(rows)
    assert (a | never) == a and (never | a) == a
    assert (a & always) == a and (always & a) == a
    assert fires(a | always, h, e) and not fires(a & never, h, e)
    assert fires(a | a, h, e) == fires(a, h, e) == fires(a & a, h, e)
    assert fires(~~a, h, e) == fires(a, h, e)


@given(SIGNALS, SIGNALS, ROWS, ELAPSED)
def test_de_morgan(a, b, rows, e):
    h = build(rows)
    assert fires(~(a | b), h, e) == fires(~a & ~b, h, e)
    assert fires(~(a & b), h, e) == fires(~a | ~b, h, e)


@given(st.sampled_from(["0.05", "0.2", "1"]), st.sampled_from([None, 2, 5]), st.sampled_from([None, 5, 30]),
       ROWS, st.lists(st.floats(0, 10), min_size=13, max_size=13))
def test_a_budget_that_fired_stays_fired(usd, iterations, wall, rows, gaps):
    budget = Budget(usd=usd, iterations=iterations, wall_clock=wall)
    h = build(rows)
    elapsed, fired = 0.0, False
    for k in range(len(h) + 1):
        elapsed += gaps[k]
        now = fires(budget, h[:k], elapsed)
        assert now or not fired, f"budget fired at a shorter prefix, not at {k}"
        fired = now


@settings(max_examples=60)
@given(SIGNALS, ROWS, ROWS, ELAPSED)
def test_a_decision_at_step_k_depends_only_on_the_first_k_steps(a, rows, more, e):
    whole = build(rows + more)
    alone = build(rows)
    for k in range(len(rows) + 1):
        assert a.decide(whole[:k], e) == a.decide(alone[:k], e)
        assert a.decide(whole[:k], e) == a.decide(build(rows[:k]), e)


VERDICT = judge(lambda state: True, name="verdict")  # never asked here: its verdict is set on the step
WITH_JUDGE = [lambda a, b: a | VERDICT, lambda a, b: a | VERDICT | b, lambda a, b: a & VERDICT,
              lambda a, b: (a & VERDICT) | b, lambda a, b: a | (b & VERDICT), lambda a, b: ~(a | VERDICT),
              lambda a, b: a & ~(b | VERDICT), lambda a, b: VERDICT | a]


@settings(max_examples=300)
@given(SIGNALS, SIGNALS, st.sampled_from(WITH_JUDGE), ROWS.filter(bool), ELAPSED)
def test_a_judge_the_policy_would_not_consult_cannot_change_its_decision(a, b, shape, rows, e):
    """The edge asks a paid judge only where consulted() says the policy reads its verdict: wherever it says no,
    a yes and a no give the same decision. Asking it leaves the history as it was."""
    from loomc.policy import consulted
    policy = shape(a, b)
    before, step = build(rows[:-1]), build(rows)[-1]
    guard = consulted(policy, VERDICT)
    asked = True if guard is None else before._asked_with(step, lambda h: guard(h, e))
    assert len(before) == len(rows) - 1 and before.append(step)._spine is before._spine, "the history is as it was"
    if not asked:
        said = [policy.decide(build(rows[:-1]).append(step.replace(metrics={**step.metrics, "verdict": verdict})), e)
                for verdict in (True, False)]
        assert said[0] == said[1]


@given(SIGNALS, ROWS)
def test_replay_stops_where_the_policy_first_fires(a, rows):
    h = build(rows)
    r = a.replay(h)
    first = next((k for k in range(len(h) + 1)
                  if fires(a, h[:k], sum(s.duration for s in h[:k]))), None)
    assert r.stopped_after == first


def scripted(outcomes: list, given_states: list):
    """``fn`` of a scripted run: call ``k`` keeps the state it was given, then fails (``outcomes[k]`` is None)
    or returns a state that scores ``outcomes[k]`` and says which call made it from which."""
    def fn(state):
        k = len(given_states)
        given_states.append(state)
        if outcomes[k] is None:
            raise RuntimeError(f"call {k} failed")
        return {"k": k, "from": state.get("k"), "score": outcomes[k], "pad": "x" * k}
    return fn


@settings(max_examples=60, deadline=None)
@given(outcomes=st.lists(st.one_of(st.none(), st.floats(0, 1, allow_nan=False)), min_size=1, max_size=12),
       backtracker=st.sampled_from(["best", "last_good"]))
def test_dropping_states_from_memory_changes_nothing_a_run_reads_or_returns(outcomes, backtracker):
    """Every state counts as large here, so each is dropped from memory as soon as the run no longer
    needs it, and read back from the store when read. The run must go exactly as it goes when
    every state is kept: the same calls with the same states, the same result, every state
    reading back as committed. (None in ``outcomes`` is a call that fails.)"""
    import loomc.interpreter as interpreter
    from loomc import BestScore, LastGood, MemoryStore, loop

    def drive(heavy: int):
        given_states: list[dict] = []
        fn = scripted(outcomes, given_states)
        policy = Budget(iterations=len(outcomes)) | (BestScore() if backtracker == "best" else LastGood())
        normal, interpreter.HEAVY_STATE = interpreter.HEAVY_STATE, heavy
        try:
            run = loop(policy=policy, scorer=lambda s: s["score"], checkpoint=MemoryStore())(fn).run({"k": None})
            states = [step.state for step in run.history]
        finally:
            interpreter.HEAVY_STATE = normal
        return given_states, run.state, states, run.status

    kept = drive(heavy=10**9)
    dropped = drive(heavy=1)
    assert dropped == kept


@settings(max_examples=40, deadline=None)
@given(outcomes=st.lists(st.one_of(st.none(), st.floats(0, 1, allow_nan=False)), min_size=2, max_size=12),
       split=st.integers(1, 11), backtracker=st.sampled_from(["best", "last_good", None]))
@example(outcomes=[0.9, 0.1, 0.5], split=2, backtracker="best")  # the resume starts from step 0, the best
def test_pruning_states_changes_nothing_a_resume_reads_or_returns(outcomes, split, backtracker):
    """`loomc prune --states` keeps only the states of steps_to_keep. A run stopped after ``split``
    calls, pruned, then resumed to the end must go exactly as the same run resumed unpruned: the
    same calls with the same states, the same result. A state the resume needed and the prune took
    would raise StatePruned. (None in ``outcomes`` is a call that fails.)"""
    import tempfile
    import time
    from loomc import BestScore, LastGood, SQLiteStore, loop

    def drive(db: str, prune: bool):
        given_states: list[dict] = []
        fn = scripted(outcomes, given_states)
        role = {"best": BestScore(), "last_good": LastGood(), None: never}[backtracker]
        store = SQLiteStore(db, durability="normal")
        runner = loop(policy=Budget(iterations=min(split, len(outcomes) - 1)) | role, scorer=lambda s: s["score"],
                      checkpoint=store)(fn)
        try:
            runner.run({"k": None}, run_id="r")
        except RuntimeError:
            pass  # without a backtracker a failed call fails the run; the resume goes on from it
        if prune:
            store.prune_states(("budget_exhausted", "failed"), time.time() + 60, apply=True)
        try:
            run = runner.resume_run("r", budget=Budget(iterations=len(outcomes)))
        except RuntimeError as e:
            return given_states, "failed", str(e), [(s.score, s.error) for s in e.history]
        return given_states, run.status, run.state, [(s.score, s.error) for s in run.history]

    with tempfile.TemporaryDirectory() as tmp:
        pruned = drive(f"{tmp}/pruned.db", prune=True)
        kept = drive(f"{tmp}/kept.db", prune=False)
    assert pruned == kept


# A judge of the state alone (so the same in every run of the same calls), which says yes to a 0.9.
GRADER = judge(lambda state: "yes" if state["score"] == 0.9 else "no", name="grader")


# A whole loop policy, as @loop composes one: a budget, then any of a plateau, a threshold, a judge, a
# backtracker and a stall handler.
@st.composite
def loop_policies(draw):
    policy = Budget(iterations=draw(st.integers(1, 16)), usd=draw(st.sampled_from([None, "0.2", "0.5"])))
    if draw(st.booleans()):
        policy = policy | score_plateau(draw(st.integers(1, 4)), draw(st.sampled_from([0.0, 0.01, 0.1])))
    judged = draw(st.sampled_from([None, "before", "after", "and"]))  # a judge, asked where the policy reads it
    if judged == "before":
        policy = policy | GRADER
    if draw(st.booleans()):
        policy = policy | predicate(last_above_half)
    if judged == "after":
        policy = policy | GRADER
    elif judged == "and":
        policy = policy | (score_plateau(draw(st.integers(1, 3))) & GRADER)
    role = draw(st.sampled_from([None, BestScore(), LastGood()]))
    if role is not None:
        policy = policy | role
    if draw(st.booleans()):
        policy = policy | Escalate(after=draw(st.integers(1, 4)))
    return policy


# What call k gives: a score (None, NaN, or a number), "raise" for a call that fails; and what it costs.
# Scores from a few values, so that gains, ties and regressions (which backtrack) are all common.
CALLS = st.lists(st.tuples(st.one_of(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), st.none(), st.just(float("nan")),
                                     st.just("raise")),
                           st.sampled_from([0, 1, 5, 10])), min_size=1, max_size=16)


def by_step(calls):
    """A fn whose step n gives calls[n]: the same in a straight run and across a stop and a resume."""
    def fn(state):
        n = loomc.step_number()
        score, cents = calls[n % len(calls)]
        if score == "raise":
            raise RuntimeError(f"call {n} failed")
        return {"n": n, "from": state["n"], "score": score, "cents": cents}
    return fn


def loop_kwargs(policy, checkpoint):
    return dict(policy=policy, scorer=lambda s: s["score"], cost_fn=lambda s: Decimal(s["cents"]) / 100,
                checkpoint=checkpoint)


def _steps(history):
    """What a run's steps hold, NaN scores made comparable (by repr: NaN is no NaN's equal)."""
    return [(s.n, repr(s.state), s.cost, repr(s.score), s.error, s.events) for s in history]


# Told by design: a first score of None or NaN; the resume runs another fn than the one that stopped.
QUIET = pytest.mark.filterwarnings("ignore::loomc.NoScoreWarning", "ignore::loomc.SpecChangedWarning")


@QUIET
@settings(max_examples=60, deadline=None)
@given(loop_policies(), CALLS)
def test_a_policy_replayed_on_its_own_run_stops_and_backtracks_where_the_live_loop_did(policy, calls):
    """The README's promise for tuning by replay: a replay walks the recorded history as the live loop
    did. Replaying a run's own policy on it must stop after the same step, for the same reason, at the
    same cost, having backtracked at the same steps, whatever the policy, scores (NaN, none), costs and
    failed calls."""
    run = loop(**loop_kwargs(policy, "memory"))(by_step(calls)).run({"n": None})
    if run.status == "failed":
        return  # a failure the policy could not go on from: fn's doing, which a replay does not see
    replayed = policy.replay(run.history)
    assert replayed.stopped_after == len(run.history)
    assert replayed.decision.reason == run.reason
    assert replayed.cost == run.total_cost
    assert [at for at, _ in replayed.backtracks] == [s.n for s in run.history
                                                     if any(e.startswith("backtrack") for e in s.events)]


@QUIET
@settings(max_examples=80, deadline=None)
@given(loop_policies(), CALLS, st.integers(0, 6))
# A regression that backtracks, then the stop: the resume must go on from the step the backtrack chose.
@example(Budget(iterations=4) | BestScore(), [(0.5, 0), (0.2, 0), (0.3, 0), (0.1, 0)], 1)
def test_a_run_stopped_at_any_step_and_resumed_goes_exactly_as_a_straight_run(policy, calls, stop_at):
    """A run that request_stop ends after any step (a SIGTERM in production), then resumed to its end,
    must make the same steps with the same states, costs, scores, errors and events as a run that was
    never stopped, and end the same way: the folds of the plateau, the backtracker and the stall
    handler carry across the resume."""
    import tempfile

    straight = by_step(calls)

    def stopping(state):
        if loomc.step_number() == stop_at:
            loomc.request_stop()  # the call is let finish and committed; the run stops before the next
        return straight(state)

    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(f"{tmp}/r.db", durability="normal")
        whole = loop(**loop_kwargs(policy, store))(straight).run({"n": None})
        run = loop(**loop_kwargs(policy, store))(stopping).run({"n": None})
        if run.status == "cancelled":
            run = loop(**loop_kwargs(policy, store))(straight).resume_run(run.id)
        assert (run.status, run.reason, run.total_cost) == (whole.status, whole.reason, whole.total_cost)
        assert _steps(run.history) == _steps(whole.history)  # states are read from the store: before it goes
        store.close()


@QUIET
@settings(max_examples=60, deadline=None)
@given(loop_policies(), CALLS)
def test_an_async_loop_makes_the_same_steps_and_ends_the_same_way_as_a_sync_one(policy, calls):
    """The sync and async drivers are two pieces of code over one transition: for any policy, scores, costs
    and failed calls they must commit the same steps and end with the same status, reason and cost."""
    import asyncio

    made = by_step(calls)

    async def afn(state):
        await asyncio.sleep(0)  # a real suspension, as an awaited model call makes
        return made(state)

    sync = loop(**loop_kwargs(policy, "memory"))(made).run({"n": None})
    run = asyncio.run(loop(**loop_kwargs(policy, "memory"))(afn).run({"n": None}))
    assert (run.status, run.reason, run.total_cost) == (sync.status, sync.reason, sync.total_cost)
    assert _steps(run.history) == _steps(sync.history)


# --- what a policy asks, and Step and History as values ------------------------------------------------------

def test_a_part_right_of_one_that_reached_its_strongest_outcome_is_not_asked():
    """"Once a detector on the left of a `|` has fired, nothing to its right is consulted" (README); a part that
    could still give a stronger outcome (a detector right of a budget that fired) is."""
    asked = []

    def counting(h):
        asked.append(len(h))
        return True

    h = History([Step(0, {"n": 0}, score=0.5), Step(1, {"n": 1}, score=0.5)])
    decision = (predicate(lambda h: True) | predicate(counting)).decide(h)
    assert asked == [] and decision.by == "predicate(<lambda>)"
    stopped = (Budget(iterations=1) | predicate(counting)).decide(h)  # converging is stronger than running out
    assert asked == [2] and stopped.reason.startswith("predicate(counting)")
    both = (predicate(lambda h: True) | predicate(three_or_more) | score_plateau(1)).decide(h)
    assert both.reason.startswith("predicate(<lambda>)")  # of two that converge, the left one is said


def test_steps_are_values_equal_by_every_field_and_replace_keeps_what_it_is_not_given():
    step = Step(2, {"n": 2}, cost="0.05", score=0.5, events=("converged",), metrics={"judge": True})
    assert step == Step(2, {"n": 2}, cost=Decimal("0.05"), score=0.5, events=("converged",), metrics={"judge": True})
    for other in (step.replace(n=3), step.replace(cost=1), step.replace(score=0.6), step.replace(score=None),
                  step.replace(error="E: x"), step.replace(events=()), step.replace(metrics={}),
                  step.replace(state={"n": 3})):
        assert other != step and not other == step
    assert step != "a step" and not step == (2, {"n": 2})
    same = step.replace(events=("converged",))
    assert same == step and not same != step and same.state == {"n": 2} and same.cost == Decimal("0.05")
    assert Step(0, score=float("nan")) == Step(0, score=float("nan"))  # NaN scores are the same score
    assert Step(0, score=float("nan")) != Step(0, score=0.5) and Step(0, score=0.5) != Step(0, score=float("nan"))
    timed = Step(0, {"n": 0}, started_at=1000.0, duration=2.5)
    assert (timed.replace(score=1.0).started_at, timed.replace(score=1.0).duration) == (1000.0, 2.5)
    assert Step(0, score=0.0) != Step(0, score=None) and Step(0, score=None) != Step(0, score=0.0)
    assert [Step(0, score=s).scored for s in (None, float("nan"), 0.0, -1.0)] == [False, False, True, True]
    assert repr(Step(0, cost=0)) == "Step(n=0, cost=0)"
    assert repr(Step(1, cost="0.1", score=0.25, error="E: x", events=("failed",))) == \
        "Step(n=1, cost=0.1, score=0.25, error='E: x', events=['failed'])"


def test_a_stored_step_replaced_keeps_its_state_read_from_the_store(tmp_path):
    @loop(budget=Budget(iterations=2), checkpoint=str(tmp_path / "v.db"))
    def grow(s):
        return {"n": s["n"] + 1}

    run = grow.run({"n": 0})
    stored = grow.history(run.id)[1]
    assert stored.replace(score=0.9).state == {"n": 2} and stored.replace(score=0.9).score == 0.9
    assert stored.replace(events=("x",)) != stored and stored.replace(events=stored.events) == stored


def test_histories_are_sequences_equal_step_by_step_and_a_view_ends_where_it_ends():
    h = history_of(0.5, 0.9, 0.9, 0.1)
    assert h == history_of(0.5, 0.9, 0.9, 0.1) and h != history_of(0.5, 0.9, 0.9)
    assert h[:2] != h and h[:2] == h.prefix(2) and h[:2] == tuple(h)[:2] and h != tuple(h)[:3]
    with pytest.raises(IndexError):
        h.prefix(2)[2]  # the steps after a view are not in it, though its run has them
    with pytest.raises(IndexError):
        h[-5]
    assert h.best.n == 1, "ties keep the earliest step"
    costly = History([Step(0, cost="0.1"), Step(1, cost="0.3", error="E: x"), Step(2, cost="0.2")])
    assert (costly.max_cost, costly.total_cost, costly.last_good.n) == (Decimal("0.3"), Decimal("0.6"), 2)
    assert h.prefix(2).append(Step(2, {"n": 2}, score=0.1)) != h[:3]  # another third step: a branch of its own
    assert h[2].score == 0.9, "a branch leaves the run it branched from as it was"


def test_best_score_returns_the_earliest_of_tied_best_states():
    scores = iter([0.5, 0.9, 0.9, 0.2])

    @loop(budget=Budget(iterations=4), backtrack=BestScore(), scorer=lambda s: next(scores), checkpoint="memory")
    def step(s):
        return s + 1

    run = step.run(0)
    assert run.state == 2 and run.history.best.n == 1


def test_a_fold_over_a_branch_reads_the_branch_not_the_history_it_branched_from():
    """A backtrack branches a run's history off an earlier step: what a fold memoised over the steps after
    that one belongs to the other branch."""
    def total(acc, step):
        return acc + step.score

    h = history_of(1.0, 2.0, 4.0, 8.0)
    assert h.fold("total", total, 0.0) == 15.0 and h.prefix(3).fold("total", total, 0.0) == 7.0
    branch = h.prefix(2).append(Step(2, {"n": 2}, score=16.0)).append(Step(3, {"n": 3}, score=32.0))
    assert branch.fold("total", total, 0.0) == 51.0 and branch.prefix(3).fold("total", total, 0.0) == 19.0
    assert h.fold("total", total, 0.0) == 15.0, "the history branched from folds as before"


def test_a_replay_says_where_it_backtracked():
    h = history_of(0.5, 0.9, 0.2, 0.95, 0.1)
    replay = (Budget(iterations=10) | BestScore()).replay(h)
    assert replay.backtracks == ((2, 1), (4, 3))
    assert str(replay) == ("Budget(iterations=10) | BestScore(): would not have stopped within the 5 recorded steps; "
                           "backtracks: step 2 -> 1, step 4 -> 3")
    failed_first = History([Step(0, None, error="RuntimeError: boom")])
    assert str((Budget(iterations=10) | LastGood()).replay(failed_first)).endswith("backtracks: step 0 -> initial")


def test_escalate_counts_the_steps_in_a_row_that_failed_or_did_not_beat_the_best_score():
    """A tie does not beat the best; a NaN score and a failure count; a successful unscored step (a loop with no
    scorer) starts the count again. Each of these was a surviving mutant of Escalate's count."""
    def count(*rows):
        return history_of(*rows).fold("test.escalate", Escalate._count, (None, 0))[1]

    assert count(0.5, 0.5, 0.5) == 2, "ties do not beat the best"
    assert count(0.5, 0.7) == 0 and count(0.5, 0.4, 0.3) == 2
    assert count(0.5, float("nan"), "fail") == 2
    assert count(0.5, "fail", None) == 0, "an unscored successful step starts the count again"
    assert Escalate().decide(history_of(0.5, 0.5, 0.5, 0.5)).stops
    assert not Escalate().decide(history_of(0.5, 0.5, 0.5)).stops
    assert Escalate() == Escalate(after=3) and score_plateau() == score_plateau(patience=3, min_delta=0.01), \
        "the defaults the README gives"


def test_a_call_cut_short_from_outside_neither_adds_to_escalates_count_nor_resets_it(tmp_path):
    """A crash, a Ctrl-C or a cancelled task says nothing of whether the loop is going anywhere. Counted as a
    failure, it made a run under Escalate(after=1) stop as stalled on its resume, with no call made."""
    def with_cut(*rows):
        steps = list(history_of(*rows))
        cut = Step(len(steps), None, error="Interrupted: KeyboardInterrupt, during this step, which charged nothing "
                   "(its cost is unknown)", events=("interrupted",))
        return History([*steps, cut])

    assert with_cut(0.5, 0.4).fold("test.escalate", Escalate._count, (None, 0)) == (0.5, 1)
    assert not Escalate(after=2).decide(with_cut(0.5, 0.4)).stops
    assert Escalate(after=2).decide(History([*with_cut(0.5, 0.4), Step(3, {"n": 3}, score=0.3)])).stops
    pressed = []

    def step(s):
        if s == 2 and not pressed:
            pressed.append(s)
            raise KeyboardInterrupt
        return s + 1

    climbing = loop(budget=Budget(iterations=5), scorer=lambda s: s, on_stall=Escalate(after=1),
                    checkpoint=str(tmp_path / "e.db"))(step)
    with pytest.raises(KeyboardInterrupt):
        climbing.run(0, run_id="e")
    again = climbing.resume_run("e")
    assert again.status == "budget_exhausted" and again.state == 4
    assert [s.events for s in again.history][2:] == [("interrupted",), (), ("budget exhausted",)]


# --- the state codec: what is stored reads back as itself ---------------------------------------------------
# (The failure shapes of other checkpointers: a set of tuples, or a value of an unknown type, read back as None or
# as a plain dict, silently.)


class _Color(_enum.Enum):
    RED = "red"
    BLUE = 2


class _Part(_pydantic.BaseModel):
    name: str
    tags: tuple[str, ...] = ()


class _Typed(_pydantic.BaseModel):
    when: _dt.datetime
    day: _dt.date
    amount: Decimal
    seen: set[tuple[int, int]]
    by_id: dict[int, str]
    pair: tuple[int, str]
    maybe: float | None
    part: _Part
    parts: list[_Part]
    color: _Color
    uid: _uuid.UUID
    span: _dt.timedelta
    big: int


_ZONES = st.sampled_from([None, _dt.timezone.utc, _dt.timezone(_dt.timedelta(hours=5, minutes=30))])
_TYPED = st.builds(
    _Typed, when=st.datetimes(timezones=_ZONES), day=st.dates(),
    amount=st.decimals(allow_nan=False, allow_infinity=False),
    seen=st.sets(st.tuples(st.integers(), st.integers()), max_size=4),
    by_id=st.dictionaries(st.integers(), st.text(), max_size=4), pair=st.tuples(st.integers(), st.text()),
    maybe=st.none() | st.floats(allow_nan=False), part=st.builds(_Part, name=st.text(), tags=st.tuples(st.text())),
    parts=st.lists(st.builds(_Part, name=st.text()), max_size=3), color=st.sampled_from(_Color), uid=st.uuids(),
    span=st.timedeltas(), big=st.integers(min_value=-2 ** 80, max_value=2 ** 80))
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                     max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(_TYPED)
def test_a_typed_state_reads_back_as_itself(state):
    assert _codec.decode(_codec.encode(state), _Typed, run_id="r", step=0) == state


@settings(max_examples=200, deadline=None)
@given(_JSON)
def test_a_state_of_json_values_reads_back_as_itself_under_the_type_recorded_for_it(state):
    recorded = _codec.resolve_state_type(None, _codec.type_path(type(state)))
    back = _codec.decode(_codec.encode(state), recorded, run_id="r", step=0)
    assert back == state and type(back) is type(state)
