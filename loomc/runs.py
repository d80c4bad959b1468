"""A run as the loop hands it back (:class:`Run`), and as the drivers see it while it runs (:class:`LiveRun`)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from loomc import codec
from loomc.backtrack import Backtracker
from loomc.budget import Budget, top_level, usd_cap, usd_room, wall_clock_budget
from loomc.context import _SPENDING
from loomc.detectors import JudgeProbe
from loomc.errors import ConfigError, LoomcError, RunError, dollars
from loomc.history import ZERO, History, Step, read, state_cell
from loomc.policy import Guard, Policies, Policy, Probe, any_asks, consulted, loop_name
from loomc.stores.base import CheckpointStore, Drive


@dataclass(frozen=True)
class Run:
    """A finished (or stopped) run: everything the loop knows, without reading the store.

    ``status`` is one of completed, budget_exhausted, stalled, failed, cancelled;
    ``reason`` says why it stopped; ``state`` is the state it returns (chosen by
    the backtracker, if any); ``error`` is what ``fn(state)`` raises for it;
    ``active_seconds`` is the run's active time, across resumes, as its wall-clock cap counts it.
    """

    id: str
    status: str
    reason: str
    state: Any
    history: History
    policy: Policy
    error: BaseException | None = None
    # Warnings that opening the run found, told where the run is driven from (see LiveRun.notices).
    _notices: tuple[tuple[str, type[Warning]], ...] = field(default=(), repr=False, compare=False)
    active_seconds: float = field(default=0.0, compare=False)

    @property
    def total_cost(self) -> Decimal:
        return self.history.total_cost

    @property
    def steps(self) -> int:
        return len(self.history)

    def result(self) -> Any:
        """The final state, or raise the error that ended the run."""
        if self.error is not None:
            raise self.error
        return self.state

    def __repr__(self) -> str:
        return (f"Run(id={self.id!r}, status={self.status!r}, steps={len(self.history)}, "
                f"cost={dollars(self.total_cost)}, reason={self.reason!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        """A Run sent to another process (a process pool's worker returns one): its policy goes as it is if it
        pickles, else as :class:`PolicyText` (a lambda predicate does not pickle, and made the whole Run fail to
        come back)."""
        return Run, (self.id, self.status, self.reason, self.state, self.history, portable_policy(self.policy),
                     portable_error(self.error), self._notices, self.active_seconds)

    def _repr_html_(self) -> str:
        from loomc.notebook import run_html
        return run_html(self)

    def plot(self, *others: Run, labels: list[str] | None = None, ax: Any = None) -> Any:
        """Score and cumulative cost per step against the budget line, with this run's events
        marked; pass other runs to draw them on the same axes. Returns the matplotlib Figure."""
        from loomc.plots import plot_runs
        return plot_runs(self, *others, labels=labels, ax=ax)


@dataclass(frozen=True, repr=False)
class PolicyText(Policies):
    """A Run's policy as it comes back from another process when the policy holds what does not pickle (a
    ``predicate(lambda h: ...)``, a scorer's judge): its text, and its top-level budgets, whose caps the
    notebook view and ``Run.plot`` draw. It decides nothing."""

    text: str = ""

    def decide(self, history: History, elapsed: float = 0.0) -> Any:
        raise ConfigError(f"this policy came with a Run from another process, as its text and its caps only "
                          f"({self.text} holds functions that do not pickle); replay the loop's own policy instead: "
                          "refine.policy.replay(run.history), with refine your loop")

    def __repr__(self) -> str:
        return self.text


def portable_policy(policy: Policy) -> Policy:
    """``policy`` if it pickles, else its :class:`PolicyText`."""
    import pickle
    try:
        pickle.dumps(policy)
    except Exception:
        return PolicyText(tuple(p for p in top_level(policy) if isinstance(p, Budget)), repr(policy))
    return policy


def portable_error(error: BaseException | None) -> BaseException | None:
    """``error`` if it unpickles, else a :class:`RunError` that tells it (type, message, notes, run). openai's
    ``APIStatusError`` needs keyword arguments its pickle does not carry: a Run failed with one, sent back from a
    process pool's worker, failed to unpickle there and broke the pool, ending every run in it."""
    if error is None or isinstance(error, LoomcError):
        return error
    import pickle
    try:
        pickle.loads(pickle.dumps(error))
    except Exception as e:
        kind = type(error)
        told = RunError(f"{kind.__module__}.{kind.__qualname__}: {error} (told as a RunError: the error does not "
                        f"unpickle, {type(e).__name__}: {e})", run_id=getattr(error, "run_id", None),
                        state=getattr(error, "state", None), history=getattr(error, "history", None))
        for note in getattr(error, "__notes__", ()):
            told.add_note(note)
        return told
    return error


def _cover(run: LiveRun) -> None:
    """Hold at least what a child run's step in flight has spent, and what its own children hold, of its parent's
    room, and so on up (under _SPENDING). Siblings side by side see it before their next call and in
    ``usd_left()``: a step's charges used to count for them only once the step was billed, and a first step,
    with no largest step to hold, held nothing, so two children could each spend the parent's whole room."""
    while run.parent is not None:
        need = run.pending + run.reserved
        if need <= run.holds:
            return
        run.parent.reserved += need - run.holds
        run.holds = need
        run = run.parent


@dataclass
class LiveRun:
    """The driver's view of one run in progress. Only drivers and effects mutate it."""

    id: str
    fn: Callable[..., Any]
    policy: Policy
    store: CheckpointStore
    owner: str
    history: History
    initial_state: Any
    source: Step | None
    clock: Callable[[], float]
    prior_active: float = 0.0
    scorer: Callable[[Any], Any] | None = None
    cost_fn: Callable[[Any], Any] | None = None
    on_step: tuple[Callable[[Step], Any], ...] = ()
    lease_seconds: float = 600.0
    backtracker: Backtracker | None = None
    session_start: float = 0.0
    in_flight: int = -1
    pending: Decimal = ZERO
    began: tuple[float, float] = (0.0, 0.0)  # when a call cut short began: wall clock, run clock
    parent: LiveRun | None = None
    children: dict[int, int] = field(default_factory=dict)  # parent step -> children started in it
    wall_cap: float | None = None
    wall: Budget | None = None  # the top-level Budget with the tightest wall-clock cap (wall_cap is its cap)
    probes: tuple[Probe, ...] = ()
    guards: tuple[Guard | None, ...] = ()  # per probe: when its signal is read (None: always)
    items: dict[str, Decimal] = field(default_factory=dict)  # named line items of the step in flight
    tokens: dict[str, list[int]] = field(default_factory=dict)  # their input and output tokens, where told
    state_type: Any = None  # what a resume decodes the stored states as
    unverified: bool = True  # while a check of the first commits (below) is still to come
    round_trip_unchecked: bool = True  # until this process has committed a state of the run and checked it
    cost_unchecked: bool = False  # under a USD cap without a cost_fn: until a successful step was checked
    score_unchecked: bool = False  # a policy that reads scores, none scored yet: until a successful step was checked
    judges_unchecked: tuple[JudgeProbe, ...] = ()  # the judges not yet asked about a successful step of the run
    initial_json: str | None = None  # the initial state as stored, to read it again once fn has had it
    drive: Drive | None = None  # holds ``owner`` alive in this process for as long as the run is driven
    parent_step: int = -1  # the parent's step this child run belongs to
    orphan_told: bool = False  # whether it was told that it outlived that step
    notices: list[tuple[str, type[Warning]]] = field(default_factory=list)  # told where the run is driven from
    first_policy: Policy | None = None  # decides before the first call instead of ``policy`` (a stalled run resumed)
    took_over_from: str | None = None  # the owner a take_over resume took the run from: its children go too
    reserved: Decimal = ZERO  # children's estimates for their steps in flight (they share this run's room)
    holds: Decimal = ZERO  # what this child run holds of its parent's room for its step in flight
    winding: int = 0  # child runs of this run's call that were cancelled and are recording it (see _wound_down)
    measured_when_cut: int = -1  # the step whose measuring (scorer, judge) an interrupt cut short, committed so
    uncommitted: int = -1  # the step whose commit the store refused (for the run's reason)
    waiting: float = 0.0  # the backoff wait going on before the next call, in seconds (0: none)
    fetch: Callable[[int], str | None] | None = None  # reads a committed step's JSON back from the store, if it can
    heavy: list[list[Any]] = field(default_factory=list)  # cells still holding a state of HEAVY_STATE or more
    ended: Run | None = None  # the Run, once a stream of this run's steps was closed early
    ending: tuple[str, str] | None = None  # the status and reason the run ends with, once a step ends it
    resumed: bool = False  # a resume of a stored run, not a new one
    priced: set[str] = field(default_factory=set)  # ids of the responses an adapter priced for this run
    pid: int = field(default_factory=os.getpid)  # the process driving it (a process forked in fn inherits the context)
    stop: str | None = None  # why request_stop asked the run to stop before its next call
    stop_code: int = 1  # the exit status StopRequested then carries
    told: set[str] = field(default_factory=set)  # which of the warnings told once per drive were told
    later: list[tuple[str, type[Warning]]] = field(default_factory=list)  # to tell once the step in flight commits
    runner: Any = None  # the loop driving it: hints name it as the user's code does (policy.loop_name)

    def __post_init__(self) -> None:
        self.decode = codec.decoder(self.state_type, self.id, self.fetch)
        self.initial = state_cell(self.initial_state, self.initial_json, "initial", self.decode)
        self.session_start = self.clock()
        self.backtracker = next((p for p in self.policy.walk() if isinstance(p, Backtracker)), None)
        self.wall = wall_clock_budget(self.policy)
        self.wall_cap = None if self.wall is None else self.wall.wall_clock
        # What a child holds of its parent's room for a step at least: its budget's step_estimate.
        self.estimate = max((p.step_estimate for p in self.policy.walk()
                             if isinstance(p, Budget) and p.step_estimate is not None), default=ZERO)
        # A judge is asked only where deciding the policy would read its verdict (see consulted). Parts that
        # measure alike (one judge twice, one embedding under two thresholds) share one measure a step, taken
        # where any of them would read it.
        probes: list[Probe] = []
        guards: list[list[Guard | None]] = []
        for p in self.policy.walk():
            for probe in p.probes():
                guard = consulted(self.policy, p) if isinstance(probe, JudgeProbe) else None
                if probe in probes:
                    guards[probes.index(probe)].append(guard)
                else:
                    probes.append(probe)
                    guards.append([guard])
        self.probes = tuple(probes)
        self.guards = tuple(any_asks(alike) for alike in guards)
        self.usd_capped = usd_cap(self.policy) is not None
        self.cost_unchecked = self.cost_fn is None and self.usd_capped
        self.score_unchecked = self.scorer is not None and self.policy.needs_score and self.history.best is None
        if self.history.last_good is None:
            self.judges_unchecked = tuple(p for p in self.probes if isinstance(p, JudgeProbe))
        self.blind: BaseException | None = None  # what cost_fn raised on the last call, if it did
        self.awaits_cost = inspect.iscoroutinefunction(self.cost_fn)
        self.awaits_score = inspect.iscoroutinefunction(self.scorer)

    def tell_after_commit(self, message: str, category: type[Warning]) -> None:
        """Warn of the step in flight once it is committed (see ``_first_commit_checks``)."""
        self.later.append((message, category))
        self.unverified = True

    def loop_name(self) -> str:
        """How a hint writes the loop that drives this run (``refine.resume(...)``): see policy.loop_name."""
        return loop_name(self.fn, self.runner)

    def usd_room(self) -> Decimal | None:
        """Dollars this run can still spend in the step in flight (a child's cap comes from it), less
        what its children hold for their own steps in flight."""
        return usd_room(self.policy, self.history, self.pending + self.reserved, self.holds)

    def time_left(self) -> float | None:
        """Active seconds this run's wall-clock cap still allows, and those of every run it is nested in
        (the least of them); ``None`` when none of them has a wall-clock cap."""
        left = None if self.wall_cap is None else self.wall_cap - self.elapsed(self.clock())
        above = None if self.parent is None else self.parent.time_left()
        return above if left is None else left if above is None else min(left, above)

    def hold(self, usd: Decimal) -> None:
        """A child run's step starts: hold its estimate of the parent's room until the step is billed."""
        parent = self.parent
        if parent is not None and usd:
            with _SPENDING:
                parent.reserved += usd - self.holds
                self.holds = usd
                _cover(parent)

    def release(self) -> None:
        """The child's step is billed to its parent (or will never be): its hold goes."""
        parent = self.parent
        if parent is not None and self.holds:
            with _SPENDING:
                parent.reserved -= self.holds
                self.holds = ZERO

    def next_child_id(self) -> str:
        """A stable id for the next child run started in the step in flight. Under the lock: threads that start
        children at once each get their own (two could get one id, and one child found the other's run stored)."""
        with _SPENDING:
            k = self.children.get(self.in_flight, 0)
            self.children[self.in_flight] = k + 1
        return f"{self.id}-{self.in_flight}-{k}"

    def spend(self, usd: Decimal, item: str | None = None, tokens: Sequence[int] | None = None) -> None:
        """Spend inside the step in flight (a charge, or a child's step): it joins the step's cost, and
        the line item ``item`` with its ``tokens`` (input, output), if given.

        Threads that ``fn`` starts may charge at once (with the loop's context), hence the lock.
        """
        with _SPENDING:
            self.pending += usd
            if item is not None:
                self._itemise(usd, item, tokens)
            _cover(self)

    def itemise(self, usd: Decimal, item: str, tokens: Sequence[int] | None = None) -> None:
        """Name ``usd`` of the step's cost, counted elsewhere (an adapter's ``cost_fn`` returns it), as the line
        item ``item``, with its ``tokens``: the step's cost is unchanged."""
        with _SPENDING:
            self._itemise(usd, item, tokens)

    def _itemise(self, usd: Decimal, item: str, tokens: Sequence[int] | None) -> None:
        self.items[item] = self.items.get(item, ZERO) + usd
        if tokens is not None:
            counts = self.tokens.setdefault(item, [0, 0])
            counts[0] += tokens[0]
            counts[1] += tokens[1]

    def elapsed(self, now: float) -> float:
        return self.prior_active + (now - self.session_start)

    def returned_state(self) -> Any:
        """The state a stopped run returns: its backtracker's choice, else where it would go on from."""
        return self.state_of(self.backtracker.choose_state_step(self.history) if self.backtracker is not None
                             else self.source)

    def state_of(self, step: Step | None) -> Any:
        """The state of ``step`` (``None``: the initial state), as committed."""
        return read(self.initial) if step is None else step.state
