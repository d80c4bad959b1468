"""The interpreter: one pure transition, and two thin drivers that perform its effects.

:func:`_machine` is the whole loop logic. It is a generator that never touches
the disk, the clock or user code; it *yields* effects (read the clock, call
``fn``, commit a step, finish the run) and receives their results. The sync
driver performs them directly, the async driver awaits them: the loop is
written once.
"""

from __future__ import annotations

import inspect
import sys
import time
from operator import itemgetter
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from loomc import codec, logs
from loomc.backtrack import Backtracker
from loomc.budget import NoCostWarning, UnreportedSpend, usd_cap
from loomc.context import _CURRENT, _SPENDING, _signal_name, ctrl_c_deferred, driven, undriven
from loomc.errors import (COST_ITEMS_METRIC, COST_UNKNOWN_METRIC, TOKENS_METRIC, TRACEBACK_METRIC, BudgetExhausted,
                          CheckpointDecodeError, ConfigError, CostUnknown, DeadlineExceeded, EmbeddingsUnavailable,
                          LeaseLost, LoomcError, NoStateReturned, RunError, RunLocked, StallError, StateEncodeError,
                          StepConflict, StopRequested, StoreBusy, attach_run, counted, dollars, go_on, warn_at_caller,
                          where_raised)
# The NamedTuples made on every step (StoredStep, Totals) are built with tuple.__new__ directly
# (_new_tuple), skipping their Python-level constructors.
from loomc.history import (_UNREAD, IN_STORE, NOT_STORED, ZERO, History, Step, _new_tuple, detached, fresh_step,
                           hand_out, outside_call, to_decimal, with_events)
from loomc.policy import (CONTINUE, STOP_EVENTS, Decision, Guard, Outcome, name_of, score_readers,
                          steps_to_keep, waited)
from loomc.runs import LiveRun, Run
from loomc.stores.base import StoredStep, Totals, drive_over, offload

_STATUS = {Outcome.CONVERGED: "completed", Outcome.BUDGET_EXHAUSTED: "budget_exhausted",
           Outcome.STALLED: "stalled"}


class NoScoreWarning(UserWarning):
    """A run whose policy reads scores, but whose scorer gave its first successful step no score."""


class NoVerdictWarning(UserWarning):
    """A run whose judge returned ``None`` for its first successful step, so it could never say yes."""


class CallbackWarning(UserWarning):
    """An ``on_step`` callback raised; the run went on."""


class OrphanedChildWarning(UserWarning):
    """A child run spent after its parent's step had ended, so the parent's ledger could not bill that step."""


# --- effects ---------------------------------------------------------------

class _Now:
    def sync(self, run: LiveRun) -> float:
        return run.clock()

    async def async_(self, run: LiveRun) -> float:
        return run.clock()


NOW = _Now()


class _Call(tuple):  # type: ignore[type-arg]
    """``_Call((state, n))``: call ``fn`` on ``state`` as step ``n``, then measure the result at the edge.

    Everything here runs "in flight": ``loomc.charge`` and child loops called from
    ``fn``, the cost function, the scorer or a probe are billed to step ``n``.
    The result is a Step (failed if ``fn``, the cost function, the scorer or a probe
    raised), the exception, if any, and the clock when the measuring ended.

    Effects are tuples: one is made on every step, and a tuple is the cheapest object to make.
    """

    __slots__ = ()

    def _begin(self, run: LiveRun) -> tuple[Any, int, float, float]:
        """Put step ``n`` in flight; its state, number, and when it starts (wall clock, run clock)."""
        state, n = self
        run.in_flight, run.pending = n, ZERO
        if run.items:  # tokens are told only with a line item: none without them
            run.items, run.tokens = {}, {}
        if run.parent is not None:  # children side by side: each holds its estimate of the parent's room
            run.hold(max(run.history._summary()[1], run.estimate))
        return state, n, time.time(), run.clock()

    def sync(self, run: LiveRun) -> tuple[Step, BaseException | None, float]:
        state, n, wall, t0 = self._begin(run)
        token = _CURRENT.set(run)
        metrics: dict[str, Any] = {}
        exc: BaseException | None
        raw = _UNSET  # the score, when it is asked before the probes
        try:
            try:
                new_state, exc = run.fn(state), None
                if new_state is None:
                    raise _returned_none(run)
            except RunLocked:
                raise  # a child run that another process holds: no failure of this step, the run waits
            except Exception as e:  # KeyboardInterrupt and friends are never swallowed
                new_state, exc = None, e
            if exc is None:
                try:
                    # What the call cost comes first: whatever fails after it, the step counts it.
                    if run.cost_fn is not None:
                        try:
                            run.pending += to_decimal(run.cost_fn(new_state), "cost_fn(state)")
                        except Exception as e:
                            run.blind = e  # the call's cost is unknown
                            raise
                    if run.probes:
                        what: Any = "the scorer"
                        raw = _UNSET if run.scorer is None else run.scorer(new_state)
                        for probe, guard in zip(run.probes, run.guards):
                            what = probe  # named only if it raises
                            if guard is not None and not _asked(run, guard, n, new_state, raw, wall, t0, metrics):
                                continue
                            found = probe.measure(new_state, run.history)
                            if inspect.isawaitable(found):
                                _close(found)
                                raise ConfigError(f"{probe!r} is async: use it in an async loop (async def fn)")
                            metrics.update(found)
                except BaseException as e:  # Ctrl-C while a judge ran: fn's state is kept, then it stops
                    exc = e
                    if isinstance(e, Exception):
                        _blame(e, "cost_fn" if run.blind is e else what if isinstance(what, str) else repr(what))
            return _settle(run, n, new_state, exc, wall, t0, metrics, raw)
        except BaseException:
            run.began = wall, t0  # a call cut short (Ctrl-C): committed with its spend and how long it ran
            raise
        finally:
            _CURRENT.reset(token)

    async def async_(self, run: LiveRun) -> tuple[Step, BaseException | None, float]:
        import asyncio  # only async loops pay for importing it
        state, n, wall, t0 = self._begin(run)
        token = _CURRENT.set(run)
        metrics: dict[str, Any] = {}
        exc: BaseException | None
        try:
            try:
                result = run.fn(state)
                if inspect.isawaitable(result):
                    result = await _by_deadline(run, result, t0)
                if result is None:
                    raise _returned_none(run)
                new_state, exc = result, None
            except asyncio.TimeoutError as e:
                new_state, exc = None, _past_deadline(run, e, "during this call, which was cancelled")
            except RunLocked:
                raise  # a child run that another process holds: no failure of this step, the run waits
            except Exception as e:
                new_state, exc = None, e
            if run.winding:
                await _wound_down(run)
            score = _UNSET  # an async def scorer is awaited here, then settled as given
            if exc is None:
                try:
                    # What the call cost comes first: whatever fails after it, the step counts it.
                    if run.cost_fn is not None:
                        try:
                            cost = run.cost_fn(new_state)
                            run.pending += to_decimal(await cost if run.awaits_cost else cost, "cost_fn(state)")
                        except Exception as e:
                            run.blind = e  # the call's cost is unknown
                            raise
                    if run.probes or run.awaits_score:
                        # Judges and the scorer are cut short at the wall-clock deadline, as fn is; the
                        # price above never is, so that what the call cost is always counted.
                        score = await _by_deadline(run, _judged(run, new_state, metrics, n, wall, t0), run.clock())
                except asyncio.TimeoutError as e:
                    exc = _past_deadline(run, e, "while the call's result was being measured (a judge or the "
                                         "scorer), which was cancelled; the state fn returned is kept on this step")
                except BaseException as e:  # cancelled while measuring: fn's state is kept, then it stops
                    exc = e
                    if run.blind is e:  # a probe or the scorer that raised said so in _judged
                        _blame(e, "cost_fn")
            return _settle(run, n, new_state, exc, wall, t0, metrics, score)
        except BaseException:
            run.began = wall, t0  # a call cut short (a cancelled task): committed with its spend and time
            raise
        finally:
            _reset(token)


def _reset(token: Any) -> None:
    """Put the run in flight back as it was before an async call. A task's coroutine that the garbage collector
    closes (a task asyncio.run abandoned) runs this in whatever context the collector runs in, where the token
    means nothing and there is nothing to put back; its ValueError would stop the coroutine's cleanup."""
    try:
        _CURRENT.reset(token)
    except ValueError:
        pass


_UNSET: Any = object()  # a score not yet measured


async def _by_deadline(run: LiveRun, awaitable: Any, now: float) -> Any:
    """``await awaitable``, cancelled once the run's wall-clock cap is reached (``now`` on the run's clock)."""
    if run.wall_cap is None:
        return await awaitable
    import asyncio
    return await asyncio.wait_for(awaitable, max(run.wall_cap - run.elapsed(now), 0.0))


#: How long an async call waits, once it has returned or raised, for the child runs it started that were cancelled
#: to finish recording their calls cut short.
WIND_DOWN_SECONDS = 2.0


async def _wound_down(run: LiveRun) -> None:
    """Wait, up to WIND_DOWN_SECONDS, for the child runs of the call just ended that were cancelled (at the run's
    deadline, or by a timeout of ``fn``'s own around them) and are recording their calls cut short: each bills its
    call to this step, which is settled next. ``asyncio.gather`` passes on the first child's cancellation without
    waiting for the others, so a sibling's bill used to come once the step was settled: its spend went missing
    from the parent's ledger (an OrphanedChildWarning said so). Children that were not cancelled are not waited
    for: one still running (a task ``fn`` left behind, a sync one in a thread) is told as before."""
    import asyncio
    end = time.monotonic() + WIND_DOWN_SECONDS
    while run.winding and time.monotonic() < end:
        await asyncio.sleep(0.005)


def _past_deadline(run: LiveRun, e: BaseException, what: str) -> BaseException:
    """What a TimeoutError ``e`` means: DeadlineExceeded (the budget ran out ``what``) if the run's wall-clock
    cap is reached, else ``e`` itself (a timeout of fn's own)."""
    if run.wall_cap is not None and run.elapsed(run.clock()) >= run.wall_cap:
        return DeadlineExceeded.at(run.wall_cap, what)
    return e


async def _judged(run: LiveRun, state: Any, metrics: dict[str, Any], n: int, wall: float, t0: float) -> Any:
    """An async loop's measurements of ``state`` after its price: the score, then each probe's metrics (into
    ``metrics``) that the policy would read; the score is returned (``_UNSET`` with no scorer)."""
    raw = _UNSET
    if run.scorer is not None:
        try:
            raw = run.scorer(state)
            if run.awaits_score:
                raw = await raw
        except Exception as e:
            _blame(e, "the scorer")
            raise
    for probe, guard in zip(run.probes, run.guards):
        try:
            if guard is not None and not _asked(run, guard, n, state, raw, wall, t0, metrics):
                continue
            found = probe.measure(state, run.history)
            metrics.update(await found if inspect.isawaitable(found) else found)
        except Exception as e:
            _blame(e, repr(probe))
            raise
    return raw


def _asked(run: LiveRun, guard: Guard, n: int, state: Any, raw: Any, wall: float, t0: float,
           metrics: dict[str, Any]) -> bool:
    """Whether deciding the run's policy on this step would read a judge's verdict (``guard``): asked of the history
    with this step as measured so far (its score, the verdicts before it; its cost before the judge's). A guard
    that raises says yes: the policy's own decision then meets what raised."""
    score, wrong = _as_score(raw)
    if wrong is not None:
        return True  # the step fails on its score: the judge would not be read, and _settle says why
    step = fresh_step(n, state, run.pending, score, None, wall, run.clock() - t0, metrics, run.decode)
    try:
        elapsed = run.elapsed(run.clock())
        return run.history._asked_with(step, lambda h: guard(h, elapsed))
    except Exception:
        return True


def _blame(e: BaseException, what: str) -> None:
    """Mark ``e`` as raised by ``what`` (cost_fn, a probe, the scorer), measuring what fn returned."""
    try:
        setattr(e, _RAISED_BY, what)
    except (AttributeError, TypeError):  # an exception type that takes no attributes: it says less, that is all
        pass


_RAISED_BY = "loomc_raised_by"


def _raised_after(n: int, exc: Exception, error: str, by: str | None) -> str:
    """The step's error for ``exc``, raised by ``by`` after fn returned, saying so; the exception says it too."""
    if by is None:
        return error
    said = (f"raised by {by}, after fn returned: step {n} keeps the state fn returned"
            + ("; the call's price from cost_fn is not in its cost" if by == "cost_fn" else ""))
    exc.add_note(f"loomc: {said}")
    return f"{error} ({said})"


def _returned_none(run: LiveRun) -> NoStateReturned:
    name = name_of(run.fn)
    return NoStateReturned(f"{name} returned None instead of the new state; return it (a function that "
                           "changes its state in place still ends with `return state`)")


def _close(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # no "coroutine was never awaited" warning on top of the real error


def _as_score(raw: Any) -> tuple[float | None, TypeError | None]:
    """The score a scorer returned, as a float, or the error that says it is no number."""
    try:
        return (None if raw is None or raw is _UNSET else float(raw)), None
    except Exception as e:  # TypeError, ValueError; an int past a float's range; what a __float__ raises
        import reprlib
        return None, TypeError(f"scorer(state) must return a number (higher is better) or None, got "
                               f"{type(raw).__name__}: {reprlib.repr(raw)}" +
                               ("" if isinstance(e, (TypeError, ValueError)) else f" ({type(e).__name__}: {e})"))


def _settle(run: LiveRun, n: int, state: Any, exc: BaseException | None, wall: float, t0: float,
            metrics: dict[str, Any], raw: Any = _UNSET) -> tuple[Step, BaseException | None, float]:
    """Measure a finished call at the edge: its score and error, with the cost the driver added, as one
    Step; and the clock after. ``raw`` is the score the scorer gave already (before the probes), if it was asked."""
    score, error = None, None
    if exc is None and run.scorer is not None:
        if raw is _UNSET:
            try:
                raw = run.scorer(state)
            except BaseException as e:
                exc = e
                if isinstance(e, Exception):
                    _blame(e, "the scorer")
        if exc is None:
            try:
                score = None if raw is None else float(raw)
            except Exception:  # no number: the error says what it was
                score, exc = _as_score(raw)
    if exc is not None:
        if not isinstance(exc, Exception):
            error = (f"Interrupted: {type(exc).__name__} while the call's result was being measured (cost_fn, "
                     "scorer or judge); the state fn returned is kept on this step")
        elif state is None:  # fn raised
            error = f"{type(exc).__name__}: {exc}"
            if run.cost_fn is not None:  # which prices only a returned state: what the call cost is unknown
                metrics[COST_UNKNOWN_METRIC] = True
        else:  # fn returned; what measured its result raised
            error = _raised_after(n, exc, f"{type(exc).__name__}: {exc}", getattr(exc, _RAISED_BY, None))
            if exc is run.blind:  # cost_fn itself
                metrics[COST_UNKNOWN_METRIC] = True
    if run.items:
        metrics[COST_ITEMS_METRIC] = {name: str(usd) for name, usd in run.items.items()}
        if run.tokens:
            metrics[TOKENS_METRIC] = {name: {"input": n_in, "output": n_out}
                                      for name, (n_in, n_out) in run.tokens.items()}
    cost = run.pending
    run.in_flight, run.pending = -1, ZERO
    end = run.clock()
    if error is not None and isinstance(exc, Exception):  # read after the clock: it is no part of the call
        where = where_raised(exc)
        if where is not None:
            metrics[TRACEBACK_METRIC] = where
    return fresh_step(n, state, cost, score, error, wall, end - t0, metrics, run.decode), exc, end


class _Commit(tuple):  # type: ignore[type-arg]
    """``_Commit((step, stored, totals))``: commit the step, with the run's totals, then tell who listens."""

    __slots__ = ()
    step = property(itemgetter(0))

    def sync(self, run: LiveRun) -> None:
        step, record, totals = self
        if run.parent is not None:
            with ctrl_c_deferred():  # the step and its bill to the parent both go in, or neither
                self._sync(run, step, record, totals)
                _bill_parent(run, step.cost)
        else:
            self._sync(run, step, record, totals)
        if run.on_step or run.unverified:
            _committed(run, step, record)

    def _sync(self, run: LiveRun, step: Step, record: StoredStep, totals: Totals) -> None:
        try:
            run.store.commit_step(run.id, record, totals, run.owner, run.lease_seconds)
        except KeyboardInterrupt:
            _commit_anyway(run, record, totals)  # Ctrl-C during the commit: the paid step goes in, then the stop
            _spent_anyway(run, step)
            raise
        except Exception as e:
            _spent_anyway(run, step)
            instead = _in_its_place(run, step, record, e)
            _not_committed(run, step, e, instead is not None and _commit_anyway(run, instead, totals))
            raise

    async def async_(self, run: LiveRun) -> None:
        step, record, totals = self
        try:
            # Shielded: a task cancelled (a wait_for timeout) while the commit waits its turn on the
            # writer thread still commits the step it paid for, before the cancellation is recorded.
            await _shielded(offload(run.store, run.store.commit_step, run.id, record, totals, run.owner,
                                    run.lease_seconds))
        except BaseException as e:  # cancelled (the commit goes on), or the store refused it
            _spent_anyway(run, step)
            if isinstance(e, Exception):
                instead = _in_its_place(run, step, record, e)
                _not_committed(run, step, e, instead is not None
                               and await offload(run.store, _commit_anyway, run, instead, totals))
            raise
        if run.parent is not None:
            _bill_parent(run, step.cost)
        if run.on_step or run.unverified:
            _committed(run, step, record)


def _spent_anyway(run: LiveRun, step: Step) -> None:
    """A child's step whose commit was interrupted or refused was still paid for: its parent's step counts it."""
    if run.parent is not None:
        _bill_parent(run, step.cost)


def _commit_anyway(run: LiveRun, record: StoredStep, totals: Totals) -> bool:
    """Commit a step whose commit an interrupt cut short or the store refused, once more: the call is paid for.
    Whether it went in.

    The first try may have gone in before the interrupt landed (StepConflict then says so); if
    the store fails now, the interrupt (or the store's first error) is what goes on out.
    """
    try:
        run.store.commit_step(run.id, record, totals, run.owner, run.lease_seconds)
    except Exception:
        return False
    return True


def _in_its_place(run: LiveRun, step: Step, record: StoredStep, exc: Exception) -> StoredStep | None:
    """What to commit in place of a paid step whose commit the store refused with ``exc`` (the disk is full or
    failed): the step as failed, without its state, so that its cost and its call count against the caps on
    resume, as for a step the process died in. (A resume used to make the call again, uncounted: a run under
    ``iterations=12`` made 13 paid calls.) ``None`` where another process has the run, which records it, and for
    a store that stayed locked, where a second try would wait as long again. The run keeps ``step`` (and what fn
    returned) in memory: the error hands it over."""
    if isinstance(exc, (StepConflict, RunLocked, StoreBusy)):
        return None
    if not step.ok:
        return record  # no state to leave out: the same record, once more
    error = f"Not stored: its commit failed ({type(exc).__name__}: {exc}); what fn returned is not in the store"
    return stored(step.replace(state=None, error=error, events=("failed", NOT_STORED)))


def _taken(run: LiveRun, exc: BaseException) -> bool:
    """Whether ``exc`` says another process took ``run`` itself over (not a child run inside its step)."""
    return isinstance(exc, LeaseLost) and exc.lost(run.id)


def _not_committed(run: LiveRun, step: Step, exc: Exception, failed_instead: bool = False) -> None:
    """Tell, on the store's error, that a paid step is not in the store, and where what it bought is
    (``failed_instead``: it was recorded as failed in its place, see ``_in_its_place``); and mark it, for the run's
    reason."""
    run.uncommitted = step.n
    taken = _taken(run, exc)
    exc.add_note(f"loomc: step {step.n} of run {run.id} ({dollars(step.cost)}) was not committed; it is on this "
                 "error's .history[-1]" + (", with what fn returned" if step.ok else "") + (
                     ". The run goes on in the process that took it over, from its last committed step" if taken
                     else (". It is recorded as failed, without its state, so that its cost and its call count on "
                           "resume; a resume goes on from the last step stored with a state") if failed_instead and
                     step.ok else ". A resume goes on from the last committed step"))


def _committed(run: LiveRun, step: Step, record: StoredStep) -> None:
    """Tell who listens that the step (billed to the parent, if any) is committed; check the first commits."""
    _notify(run, step)
    if run.unverified:
        _first_commit_checks(run, step, record)


def _first_commit_checks(run: LiveRun, step: Step, record: StoredStep) -> None:
    """Checks made once per process and run, after the commit (a warning turned into an error loses nothing)."""
    text = record.state_json
    round_trip = run.round_trip_unchecked and text is not None
    cost = run.cost_unchecked and step.ok
    score = run.score_unchecked and step.ok
    run.round_trip_unchecked &= not round_trip
    run.cost_unchecked &= not cost
    run.score_unchecked &= not score
    # The judges asked on this step: one the policy did not read yet (see consulted) is checked when it is asked.
    judges = tuple(j for j in run.judges_unchecked if j.name in step.metrics) if step.ok else ()
    if judges:
        run.judges_unchecked = tuple(j for j in run.judges_unchecked if j not in judges)
    run.unverified = (run.round_trip_unchecked or run.cost_unchecked or run.score_unchecked
                      or bool(run.judges_unchecked))
    if round_trip and text is not None:
        codec.warn_if_changed(step.state, text, run.state_type)
    if score and (step.score is None or step.score != step.score):  # None, or NaN
        said, why, hint = (
            ("None", "a step without a score never converges, backtracks or stalls, so only the budget would stop "
                     "the run", "did it forget `return`?") if step.score is None else
            ("NaN", "NaN is never an improvement nor the best score, so those parts see no valid score (score_plateau "
                    "ends such a run completed once its patience is spent)",
             "NaN comes from 0/0 or the mean of nothing."))
        warn_at_caller(f"loomc: run {run.id}'s policy reads scores ({', '.join(score_readers(run.policy))}), but the "
                       f"scorer returned {said} for step {step.n}: {why}. Return a number from the scorer (higher is "
                       f"better); {hint} (Checked once, on the first successful step; a scorer that cannot grade a "
                       "first draft can ignore this.)", NoScoreWarning)
    for judge in judges:
        if step.metrics.get(judge.name, False) is None:
            warn_at_caller(f"loomc: run {run.id}'s {judge!r} returned None for step {step.n}: only True or a clear "
                           "yes ('yes') converges, so a judge that gives no verdict never stops the run, and only "
                           "the budget would. Return its verdict; did it forget `return`, or pass on a model reply "
                           "with no text (a chat message's content is None when the model refused or called a "
                           "tool)? (Checked once, on the first successful step it judged.)", NoVerdictWarning)
    if cost and not step.cost:
        unreported = next((p for p in run.policy.walk() if isinstance(p, UnreportedSpend) and p.calls), None)
        warn_at_caller(f"loomc: run {run.id} has a USD cap of {dollars(usd_cap(run.policy))}, but step {step.n} "
                       "reported no cost: nothing tells loomc what fn spends, so the cap cannot stop it. Call "
                       "loomc.charge(usd) (or adapter.charge(reply)) inside fn after each paid call, or pass "
                       "cost_fn=. (Checked once, on the first successful step; a step that truly cost nothing "
                       "can ignore this." + (" With no cap but the USD one, the run stops after "
                                             f"{unreported.calls} calls that all report no cost.)"
                                             if unreported is not None else ")"), NoCostWarning)
    later, run.later = run.later, []
    for message, category in later:  # what measuring the step found to tell (a hedged verdict)
        warn_at_caller(message, category)


def _notify(run: LiveRun, step: Step) -> None:
    if run.on_step:
        step = detached(step)  # a callback that changes the state in place changes only its own copy
    for callback in run.on_step:
        try:
            callback(step)
        except Exception as e:
            warn_at_caller(f"loomc: on_step callback {getattr(callback, '__name__', callback)!r} raised "
                           f"{type(e).__name__}: {e} on run {run.id} step {step.n}; the run goes on",
                           CallbackWarning)


@dataclass
class _Finish:
    status: str
    reason: str

    def sync(self, run: LiveRun) -> None:
        run.store.finish_run(run.id, self.status, self.reason, run.owner)

    async def async_(self, run: LiveRun) -> None:
        await offload(run.store, run.store.finish_run, run.id, self.status, self.reason, run.owner)


# --- the transition --------------------------------------------------------

def stored(step: Step) -> StoredStep:
    """The store's form of a step; :class:`StateEncodeError` if its state is not JSON-friendly."""
    state = step.state
    # StoredStep is (n, state_json, then the Step's own fields 1 to 7: cost ... events).
    return _new_tuple(StoredStep, (step[0], None if state is None else codec.encode(state), *step[1:8]))


_BACKTRACK, _CONTINUE, _STALLED = Outcome.BACKTRACK, Outcome.CONTINUE, Outcome.STALLED


def _machine(run: LiveRun) -> Generator[Any, Any, Run]:
    h, policy = run.history, run.policy
    decision = (policy if run.first_policy is None else run.first_policy).decide(h, run.elapsed((yield NOW)))
    if decision.outcome is _BACKTRACK:  # e.g. a resumed run whose last step regressed
        run.source = None if decision.to is None else h[decision.to]
    n = len(h)  # the number of the next call; it starts from run.source's state
    while decision.outcome < _STALLED:
        if run.stop is not None:  # request_stop: the call before this one was let finish and is committed
            return (yield from _stop_asked(run))
        # fn may change its state in place: the step it came from reads its own from the JSON from now on.
        step, exc, end = yield _Call((hand_out(run.source, run.initial), n))
        elapsed = run.elapsed(end)
        if exc is None:
            fatal = False
        elif isinstance(exc, StopRequested):  # a run fn started stopped as asked: so does this one, at once
            return (yield from _stop_asked(run, exc))
        else:
            fatal = _fatal(run, exc)
        try:
            record = stored(step)
        except StateEncodeError as e:
            if exc is None or isinstance(exc, Exception):  # an interrupt stays the one to tell
                exc = StateEncodeError(f"run {run.id} step {n}: {e}. What fn returned, paid for and not stored, "
                                       "is on this error's .returned")
                exc.returned = step.state
            fatal = True
            step = step.replace(state=None, error=f"StateEncodeError: {e}")
            record = stored(step)
        text = record[1]
        if text is not None:
            step[8][1] = text  # the step can read its state again once fn has had the object
            if len(text) >= HEAVY_STATE and run.fetch is not None:
                run.heavy.append(step[8])  # let go of once committed and no longer needed
        h = run.history = h.append(step)
        n += 1
        events: tuple[str, ...]
        if fatal:
            decision, events = CONTINUE, ("failed",) if isinstance(exc, Exception) else ("interrupted",)
        else:
            try:
                decision = policy.decide(h, elapsed)
            except BaseException as e:  # a bug in a predicate, or Ctrl-C while it ran: the step is paid for
                exc, fatal, decision, events = e, True, CONTINUE, ("policy raised",)
            else:
                if decision.outcome is _CONTINUE:
                    events = ()
                else:
                    events = (decision.event(),)
                    if decision.wait:
                        decision, events = _waiting(run, decision, elapsed, events)
        if events:
            # Events record the decision; they never change a decision, so the folds stay valid.
            step = with_events(step, events)
            record = record._replace(events=events)
            h = run.history = h._replace_tip(step)
        # Where the next call starts, chosen before the commit: a commit that fails then hands the
        # caller the state this step paid for (on the exception's .state), not the one before it.
        if decision.outcome is _BACKTRACK:
            run.source = None if decision.to is None else h[decision.to]
        elif step.ok:
            run.source = step
        # How the run ends, when this step ends it, known before the commit: an interrupt that lands once the
        # step is committed (a task cancelled while the commit is written, a step stream closed at this step)
        # leaves the run ended so, not cancelled.
        if fatal:
            if isinstance(exc, Exception):
                run.ending = ending = "failed", _failure(run, exc, step, events)
        elif decision.outcome >= _STALLED:
            run.ending = _STATUS[decision.outcome], decision.reason
        yield _Commit((step, record, _new_tuple(Totals, (h._summary()[0], n, elapsed))))
        if run.heavy:
            _let_go(run, h)
        if events and decision.wait:
            yield _Wait(decision.wait)
        if fatal:
            if not isinstance(exc, Exception):
                run.measured_when_cut = step.n  # for the run's reason: the step is committed, cut while measured
                raise exc  # the driver records the run as cancelled
            yield _Finish(*ending)
            return _ended(run, *ending, exc)
    status = _STATUS[decision.outcome]
    yield _Finish(status, decision.reason)
    return _ended(run, status, decision.reason, None, decision)


#: The events of a step that ended its run: the machine makes no call after it, and finishes the run.
ENDING_EVENTS = (*STOP_EVENTS.values(), "failed", "policy raised")


def ending_event(events: Sequence[str]) -> str | None:
    """The event among a committed step's ``events`` that ended its run, if any: a process that died after
    that commit died before its run was marked ended, not in a call."""
    return next((e for e in events if e in ENDING_EVENTS), None)


def in_no_call(events: Sequence[str], began: bool) -> str | None:
    """The event of a run's last committed step that says a process which died after its commit was in no call:
    one that ended the run (see ``ending_event``), or a backoff wait (``wait 4s``) unless the next call ``began``
    (the marker that the wait ended, a $0 write-ahead charge for the next step, see ``_Wait``, was written).
    ``None``: it may have died in its next call."""
    return ending_event(events) or (None if began else next((e for e in events if e.startswith(_WAIT_EVENT)), None))


def _failure(run: LiveRun, exc: Exception, step: Step, events: tuple[str, ...]) -> str:
    """Why a run that ``exc`` failed at ``step`` ended."""
    if "policy raised" in events:
        return f"the policy raised {type(exc).__name__}: {exc}".rstrip(": ")
    reason = step.error or "failed"
    if run.backtracker is None:
        return reason
    # It could have gone on, but the next call could not do better.
    if _set_up_wrongly(exc):
        return _setup(exc, reason)
    if not run.backtracker.goes_on_from(exc):
        return _not_on(run.backtracker, exc, reason)
    return _blind(run, exc, reason)


def _fatal(run: LiveRun, exc: BaseException) -> bool:
    """Whether the step's failure stops the run (the step is committed first). An interrupt (Ctrl-C, a
    cancelled task) that came after fn returned always does; an error does, unless a backtracker can go on
    from it."""
    return not isinstance(exc, Exception) or (not isinstance(exc, DeadlineExceeded) and (
        run.backtracker is None or _set_up_wrongly(exc) or not run.backtracker.goes_on_from(exc)
        or (run.usd_capped and (exc is run.blind or isinstance(exc, CostUnknown)))))


def _stop_asked(run: LiveRun, inner: StopRequested | None = None) -> Generator[Any, Any, Run]:
    """End the run ``cancelled`` before its next call, as request_stop asked, with StopRequested to raise.

    With ``inner``, a run that fn started in step n stopped so, and the step is not committed: as after a
    crash, a resume makes step n again, and that goes on with the runs it started, whose paid steps are kept.
    """
    n = len(run.history)
    if inner is None:
        reason = (f"{run.stop}; stopped before step {n}" +
                  (", with every call made let finish and committed" if n else ", before any call was made"))
    else:
        if run.stop is None:
            run.stop, run.stop_code = f"a run in its step stopped ({inner.reason})", inner.code
        reason = (f"{run.stop}; stopped during step {n}, as the runs it started did: a resume makes step {n} "
                  "again, going on with them")
    yield _Finish("cancelled", reason)
    name = run.loop_name()
    exc = StopRequested(f"run {run.id} stopped: {reason}; resume it with {name}.resume({run.id!r})", run.stop_code,
                        reason=reason)
    return _ended(run, "cancelled", reason, exc)


def _waiting(run: LiveRun, decision: Decision, elapsed: float,
             events: tuple[str, ...]) -> tuple[Decision, tuple[str, ...]]:
    """A backtrack that waits before the next call, with its events; or the stop it becomes (see ``waited``)."""
    stop = waited(decision, run.history, elapsed, run.wall)
    if stop is not decision:
        return stop, (stop.event(),)
    return decision, (*events, f"{_WAIT_EVENT}{decision.wait:g}s")


_WAIT_EVENT = "wait "


_WAIT_SLICE = 0.1  # how soon a backoff wait sees a stop asked for


@dataclass
class _Wait:
    """Wait before the next call: a backtracker's backoff after a failed step. A stop asked for
    (request_stop: a container's shutdown has a grace period) ends it early, in slices of 0.1 s.

    A wait that ends writes a $0 write-ahead charge for the next step: the call is about to start. A process
    that dies after the step is then known to have died in that call (paid for, perhaps, and counted so on
    resume), and one that dies without it, in the wait, before any call (nothing to count).
    """
    seconds: float

    def sync(self, run: LiveRun) -> None:
        run.waiting = self.seconds  # for the reason of a run that an interrupt stops in the wait (kept then)
        if not self._on_the_clock(run):
            for nap in self._naps(run):
                time.sleep(nap)
        run.waiting = 0.0
        if run.stop is None:
            run.store.charge(run.id, len(run.history), ZERO)

    async def async_(self, run: LiveRun) -> None:
        import asyncio
        run.waiting = self.seconds
        if not self._on_the_clock(run):
            for nap in self._naps(run):
                await asyncio.sleep(nap)
        run.waiting = 0.0
        if run.stop is None:
            await offload(run.store, run.store.charge, run.id, len(run.history), ZERO)

    def _on_the_clock(self, run: LiveRun) -> bool:
        """Wait on the loop's clock if it can sleep (``clock.sleep(seconds)``: a test's fake clock moves on, and
        nobody waits); a clock that cannot is read, not slept on, so the wait is a real sleep."""
        sleep = getattr(run.clock, "sleep", None)
        if not callable(sleep):
            return False
        sleep(self.seconds)
        return True

    def _naps(self, run: LiveRun) -> Iterator[float]:
        """The sleeps the wait is made of, each at most a slice, until its end or a stop asked for."""
        end = time.monotonic() + self.seconds
        while run.stop is None and (left := end - time.monotonic()) > 0:
            yield min(left, _WAIT_SLICE)


#: Errors that say the loop is set up wrongly (a missing extra, a bad setting, an fn that forgot to return
#: its state): the next call would meet them again, so a backtracker does not go on from them, paying for
#: calls whose result cannot be measured or priced.
_SETUP_ERRORS = (ConfigError, EmbeddingsUnavailable, NoStateReturned)
#: HTTP statuses with which an API (a model SDK's error carries ``status_code``) refuses who or what was asked for
#: rather than what was said: a bad key (401), no permission (403), no such model (404). The same request from
#: another state meets them again.
_REFUSED = (401, 403, 404)


def _set_up_wrongly(exc: BaseException) -> bool:
    """Whether ``exc`` says the loop is set up wrongly (see ``_SETUP_ERRORS`` and ``_REFUSED``)."""
    return isinstance(exc, _SETUP_ERRORS) or getattr(exc, "status_code", None) in _REFUSED


def _setup(exc: BaseException | None, error: str) -> str:
    """Why a run with a backtracker stopped on a setup error, as its reason and a note."""
    reason = f"{error}; the next call would meet it again, so the run stopped instead of going on from another state"
    if exc is not None:
        exc.add_note("loomc: fix it, then resume the run")
    return reason


def _not_on(backtracker: Backtracker, exc: BaseException | None, error: str) -> str:
    """Why a run stopped on a failure its backtracker's ``on=`` does not cover, as its reason and a note."""
    reason = f"{error}; {backtracker!r} does not go on from a {type(exc).__name__}, so the run stopped"
    if exc is not None:
        exc.add_note("loomc: fix it, then resume the run")
    return reason


def _blind(run: LiveRun, exc: BaseException | None, error: str) -> str:
    """Why a run with a backtracker stopped on a call whose cost is unknown, as its reason and a note."""
    reason = (f"{error}; without what the call cost, the USD cap cannot hold, so the run stopped "
              f"instead of going on from another state")
    if exc is not None:
        exc.add_note(f"loomc: {reason}. Fix the pricing, then resume the run")
    return reason


#: A committed state at least this long (in characters of JSON) is not kept in memory once the run
#: no longer needs it: it is read back from the store if something reads it.
HEAVY_STATE = 32_768


def _let_go(run: LiveRun, h: History) -> None:
    """Drop the large states the run no longer needs from memory; the store keeps them.

    Kept: those of ``steps_to_keep`` (where a backtrack or a stop can go) and the one the next call
    starts from. Every other step reads its state back from the store.
    """
    keep = steps_to_keep(h)
    if run.source is not None:
        keep.add(run.source[0])
    held = []
    for cell in run.heavy:
        if cell[2] in keep:
            held.append(cell)
        else:
            cell[0], cell[1] = _UNREAD, IN_STORE
    run.heavy = held


def _ended(run: LiveRun, status: str, reason: str, exc: BaseException | None,
           decision: Decision = CONTINUE) -> Run:
    h = run.history
    state = run.returned_state()
    if exc is not None:
        if not isinstance(exc, LoomcError):
            attach_run(exc, run.id, state, h, run.loop_name(), store=run.store)
        else:
            for name, value in (("run_id", run.id), ("state", state), ("history", h)):
                setattr(exc, name, value)
    elif status != "completed":
        cls = BudgetExhausted if status == "budget_exhausted" else StallError
        exc = cls(f"run {run.id} stopped, {status.replace('_', ' ')}: {reason} "
                  f"({counted(len(h), 'step')}, {dollars(h.total_cost)}){_failing(h)}; the state it reached is on "
                  f".state; {go_on(status, run.loop_name(), run.id, run.store)}",
                  run_id=run.id, state=state, history=h, reason=reason)
    return Run(run.id, status, reason, state, h, run.policy, exc, tuple(run.notices),
               active_seconds=run.elapsed(run.clock()))


def _failing(h: History) -> str:
    """``; its last 3 calls failed, the last with ValueError: ...``: why a run that kept failing stopped."""
    failed = 0
    for step in reversed(h):
        if step.ok or outside_call(step):
            break
        failed += 1
    if not failed:
        return ""
    calls = "its last call" if failed == 1 else f"its last {failed} calls"
    return f"; {calls} failed, the last with {h[-1].error}"


# --- the drivers -----------------------------------------------------------

def steps(run: LiveRun) -> Generator[Step, None, Run]:
    """Run the machine, performing each effect directly; yield each Step once it is committed."""
    gen, value = _machine(run), None
    driven(run)
    try:
        while True:
            effect = gen.send(value)
            value = effect.sync(run)
            if type(effect) is _Commit:
                yield effect.step
    except StopIteration as stop:
        drive_over(run.owner)
        _log_end(stop.value, run.store)
        return stop.value  # type: ignore[no-any-return]
    except BaseException as e:
        _abandon(run, e)
        raise
    finally:
        undriven(run)


def _log_end(run: Run, store: Any) -> None:
    logs.run_stopped(run.id, run.status, run.reason, run.history, store)


def exhaust(stream: Generator[Any, None, Run]) -> Run:
    """Run a step stream to its end and return what it returns: the Run."""
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


async def steps_async(run: LiveRun, ended: list[Run]) -> AsyncGenerator[Step, None]:
    """Run the same machine, awaiting each effect; yield each Step once it is committed.

    The next call starts only when the next Step is asked for, as in the sync driver; closing
    the generator early ends the run as cancelled. The Run is appended to ``ended``.
    """
    gen, value = _machine(run), None
    driven(run)
    try:
        while True:
            effect = gen.send(value)
            value = await effect.async_(run)
            if type(effect) is _Commit:
                yield effect.step
    except StopIteration as stop:
        drive_over(run.owner)
        _log_end(stop.value, run.store)
        ended.append(stop.value)
    except BaseException as e:
        if type(e) is GeneratorExit and not _in_event_loop():
            # Closed as garbage: the task of a loop that was abandoned (asyncio.run at a second Ctrl-C), collected
            # with no event loop running (Python 3.13 closes it so). Nothing can be awaited here, and a collector
            # must not write to the store: the drive lets go of its run, and a resume settles the step in flight.
            drive_over(run.owner)
            raise
        if run.parent is not None:  # its parent's call waits for this record before its step is settled
            with _SPENDING:
                run.parent.winding += 1
        await _shielded(offload(run.store, _abandon_winding, run, e))
        raise
    finally:
        undriven(run)


def _abandon_winding(run: LiveRun, exc: BaseException) -> None:
    """``_abandon``, then the parent (whose call counted this run as winding down) need wait for it no more."""
    try:
        _abandon(run, exc)
    finally:
        if run.parent is not None:
            with _SPENDING:
                run.parent.winding -= 1


def _in_event_loop() -> bool:
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _shielded(awaitable: Any) -> Any:
    """``await awaitable``, which goes on to its end if the awaiting task is cancelled; what it then raises
    (a store error) is collected, rather than logged by asyncio as an exception never retrieved."""
    import asyncio
    inner = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        inner.add_done_callback(_collect)
        raise


def _collect(future: Any) -> None:
    if not future.cancelled():
        future.exception()


def _abandon(run: LiveRun, exc: BaseException) -> None:
    """The run was interrupted from outside (Ctrl-C, cancellation, a store error): record it, and end the drive.
    A second Ctrl-C meanwhile waits for the record (a child's interrupted step, and its bill to the parent), and
    is dropped if ``exc`` is the first: that one goes on out."""
    with ctrl_c_deferred(stopping=isinstance(exc, KeyboardInterrupt)):
        try:
            _record_abandon(run, exc)
        finally:
            run.release()  # a child's hold on its parent's room, if its step never got billed
            drive_over(run.owner)  # a later resume in this process may take the run, even while exc is kept


def _record_abandon(run: LiveRun, exc: BaseException) -> None:
    aio = sys.modules.get("asyncio")  # a CancelledError can only exist once asyncio is imported
    stopped = (KeyboardInterrupt, SystemExit, GeneratorExit) + ((aio.CancelledError,) if aio is not None else ())
    status = "cancelled" if isinstance(exc, stopped) else "failed"
    what = f"{type(exc).__name__}: {exc}".rstrip(": ")
    why = (_interrupted_where(run, what, exc) if not isinstance(exc, GeneratorExit)
           else "left early: the stream of its steps (iter()) was closed before the run ended")
    # The run is another process's now: that one records how it goes on. (A child's loss is no loss of this run:
    # it ends as for a child that another process holds.)
    taken = _taken(run, exc)
    if taken and run.in_flight >= 0:  # raised by a charge in the call, which found the run taken
        exc.add_note(f"loomc: step {run.in_flight} of run {run.id} was stopped in its call, at a loomc.charge; what "
                     f"it charged ({dollars(run.pending)}) is kept in the store: in the step the other process "
                     "recorded, or as charged late")
    try:
        if not taken:
            _commit_interrupted(run, what)
    except LoomcError:
        pass  # e.g. the store is what failed: the charges stay pending, and a resume counts them
    ended = run.ending if _ended_already(run) else None
    if ended is not None:
        status, why = ended
    try:
        if not taken:
            run.store.finish_run(run.id, status, why, run.owner)
    except LoomcError:
        pass
    logs.run_stopped(run.id, *(("taken_over", what) if taken else (status, why)), run.history, run.store)
    if isinstance(exc, GeneratorExit):  # a step stream closed early: its .run is this
        run.ended = (_ended(run, status, why, None) if status in _STATUS.values() else
                     Run(run.id, status, why, run.returned_state(), run.history, run.policy,
                         active_seconds=run.elapsed(run.clock())))
    if isinstance(exc, RunError) or not isinstance(exc, (Exception, KeyboardInterrupt)):
        return
    if run.parent is not None and isinstance(exc, KeyboardInterrupt):
        # It goes on out through the parent run, whose note says to resume the parent; this run's would say to
        # resume the child on its own, which is refused while the parent's step is not committed.
        return
    try:
        state = run.state_of(run.source) if ended is None else run.returned_state()
    except CheckpointDecodeError:  # reading that state back is what failed (exc says so): the history is kept
        state = None
    attach_run(exc, run.id, state, run.history, run.loop_name(), ended, run.store)


def _interrupted_where(run: LiveRun, what: str, exc: BaseException) -> str:
    """Why a run that ``exc`` cut short stopped: what ``exc`` is, where it landed, and what raises it, so that
    ``CancelledError`` in ``loomc show`` tells of the timeout that cancelled the task running the loop."""
    done = len(run.history)
    where = (f"during step {run.in_flight}'s call" if run.in_flight >= 0 else
             f"while step {run.measured_when_cut}'s result was being measured"
             if run.measured_when_cut >= 0 else
             f"in the backoff wait after step {done - 1} ({_WAIT_EVENT}{run.waiting:g}s)"
             if run.waiting else
             f"while step {run.uncommitted} was being committed" if run.uncommitted >= 0 else
             f"after step {done - 1}, before the next call" if done else "before the first call")
    name = type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return f"{what} {where}: a Ctrl-C, or a notebook's interrupt"
    if name == "CancelledError":
        parent, left = run.parent, None if run.parent is None else run.parent.time_left()
        if parent is not None and left is not None and left <= 0:
            return (f"{what} {where}: the wall-clock cap of the run it is nested in ran out, which cancelled "
                    f"step {run.parent_step} of run {parent.id}, and this run with it")
        return (f"{what} {where}: its task was cancelled (a timeout such as asyncio.wait_for's, a TaskGroup, "
                "task.cancel(), Ctrl-C under asyncio.run)")
    if isinstance(exc, SystemExit):
        called = "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"
        return f"{what} {where}: {called} was called{_signal_exit(exc.code)}"
    return f"{what} {where}"


def _signal_exit(code: object) -> str:
    """`` (128 + SIGTERM, as a handler of that signal exits)``, when ``code`` is such a status."""
    name = _signal_name(code - 128) if isinstance(code, int) and code > 128 else ""
    return f" (128 + {name}, as a handler of that signal exits)" if name.startswith("SIG") else ""


def _ended_already(run: LiveRun) -> bool:
    """Whether the step that ended the run is committed: the interrupt came after the run's end, before it was
    marked, and the run is marked as it ended (``run.ending``), not as interrupted. (Not if that step's commit
    failed: a failed step without its state may be recorded in its place.)"""
    if run.ending is None or run.in_flight >= 0 or run.uncommitted >= 0:
        return False
    try:
        return run.store.get_run(run.id).steps == len(run.history)
    except Exception:
        return False  # the store is what failed: the step may not be in


def _commit_interrupted(run: LiveRun, why: str) -> None:
    """A call cut short becomes a failed step, ``interrupted``, carrying what it spent (charges, child runs).

    Its charges would be counted by a resume anyway; committing them now makes the run's totals,
    ``loomc show`` and a parent's ledger right even if the run is never resumed. One that charged nothing
    is a call all the same, whose cost nobody knows (a reply the provider bills though it never came), as when
    the process dies in it: it counts against the iteration cap, and the USD cap counts it at the estimate.
    Except a step that started child runs and charged nothing: it is made again, reusing them.
    """
    n, cost = run.in_flight, run.pending
    if n < 0 or (not cost and run.children.get(n)):
        return
    run.in_flight, run.pending = -1, ZERO
    wall, t0 = run.began
    error = (f"Interrupted: {why}, during this step after spending {dollars(cost)}" if cost else
             f"Interrupted: {why}, during this step, which charged nothing (its cost is unknown)")
    step = Step(n, None, cost=cost, error=error, started_at=wall, duration=run.clock() - t0, events=("interrupted",))
    h = run.history = run.history.append(step)
    run.store.commit_step(run.id, stored(step), _new_tuple(Totals, (h.total_cost, len(h), run.elapsed(run.clock()))),
                          run.owner, run.lease_seconds)
    if run.parent is not None:
        _bill_parent(run, cost)


def _bill_parent(run: LiveRun, cost: Decimal) -> None:
    """A child's spend joins its parent's step in flight, once.

    A child still running after that step ended (a task or thread ``fn`` left behind) is
    billed to the parent's step in flight now, if there is one; either way it is told.
    """
    parent = run.parent
    assert parent is not None
    run.release()
    if parent.in_flight == run.parent_step:
        parent.spend(cost)
        return
    counted = parent.in_flight >= 0
    if counted:
        parent.spend(cost)
    if not run.orphan_told:
        run.orphan_told = True
        where = (f"counts it in its step {parent.in_flight} instead" if counted
                 else "cannot count it: that run is between steps or over")
        warn_at_caller(f"loomc: child run {run.id} spent {dollars(cost)} after its parent run {parent.id}'s step "
                       f"{run.parent_step} had ended, so {parent.id}'s ledger {where}. fn left a task or thread "
                       "running: wait for every child run before fn returns (asyncio.TaskGroup cancels the "
                       "others when one fails; asyncio.gather does not)", OrphanedChildWarning)
