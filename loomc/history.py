"""Steps and the immutable, append-only History that policies read.

A :class:`History` behaves like a tuple of :class:`Step` (``h[-1].score``,
``len(h)``, ``h[:3]``, iteration) but appending is O(1): histories that extend
one another share one spine, and ``h[:k]`` is a view, not a copy::

    >>> h0 = History()
    >>> h1 = h0.append(Step(n=0, state="a", score=0.5))
    >>> h2 = h1.append(Step(n=1, state="b", score=0.7))
    >>> len(h0), len(h1), len(h2), h2[-1].score, h2[:1] == h1
    (0, 1, 2, 0.7, True)

Derived values that policies need on every step (the best score so far, the
total cost, the patience counter of a plateau detector) are folds over the
steps. :meth:`History.fold` memoises them on the shared spine, so each step
costs O(1) however long the run is, and the answer still depends on the
steps alone.
"""

from __future__ import annotations

import math
import numbers
import operator
from operator import itemgetter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, overload

import toolz

from loomc.errors import (COST_ITEMS_METRIC, COST_UNKNOWN_METRIC, PRUNED_METRIC, TOKENS_METRIC, TRACEBACK_METRIC,
                          counted, dollars)

T = TypeVar("T")

ZERO = Decimal(0)


def to_decimal(amount: Any, what: str = "cost") -> Decimal:
    """Turn a user-supplied amount of dollars into an exact Decimal.

    Floats go through their shortest repr, so ``0.05`` is exactly ``Decimal("0.05")``.
    """
    if type(amount) is float:  # the usual case first: a cost function's float
        value = Decimal(repr(amount))
    elif isinstance(amount, Decimal):
        value = amount
    elif isinstance(amount, bool) or not isinstance(amount, (numbers.Real, str)):
        raise TypeError(f"{what} must be a number of dollars, got {type(amount).__name__}: {amount!r}")
    elif isinstance(amount, numbers.Integral):  # int, numpy integers
        value = Decimal(int(amount))
    elif isinstance(amount, numbers.Real):  # float subclasses, numpy floats, Fraction: by their float's repr
        value = Decimal(repr(float(amount)))
    else:
        try:
            value = Decimal(amount)
        except ArithmeticError:
            raise TypeError(f"{what} must be a number of dollars, got {amount!r}") from None
    if not value.is_finite() or value < ZERO:
        raise ValueError(f"{what} must be a finite, non-negative number of dollars, got {amount!r}")
    return value


_new_tuple, _new_object = tuple.__new__, object.__new__
_UNREAD = object()  # the state of a stored step that has not been decoded yet
#: A cell's JSON when only the store holds it: the run's decoder fetches it by step number.
IN_STORE: Any = object()
Decoder = Callable[[Any, Any], Any]  # (state_json or IN_STORE, step number) -> the state


def stored_state(metrics: Mapping[str, Any], state_json: Any) -> Any:
    """What a stored step's state cell holds: ``state_json``, or a ``PrunedState`` if its state was pruned."""
    at = metrics.get(PRUNED_METRIC) if metrics else None
    return state_json if at is None else PrunedState(at)


class PrunedState(NamedTuple):
    """A cell's JSON once ``loomc prune --states`` removed the step's state (``at``, Unix time): the run's
    decoder raises :class:`~loomc.errors.StatePruned` when something reads it."""

    at: float


class Step(tuple):  # type: ignore[type-arg]
    """A frozen record of one call of ``fn``.

    ``state`` is what ``fn`` returned (``None`` when the call failed), ``error``
    is ``"TypeName: message"`` for a failed call, ``metrics`` holds values the
    edge computed for the step (an embedding distance, a judge verdict) and
    ``events`` the decisions taken after it (``"backtrack to step 2"``).
    Steps loaded from a store decode their state only when it is read.

    A step's ``state`` is what was committed for it. The loop hands the object
    ``fn`` returned to the next call, which may change it in place; from then on
    the step reads its state again from the committed JSON, so an earlier step
    (the one ``BestScore`` goes back to) never shows a later step's edits.

    A Step is built on a tuple, so it is immutable and cheap to make; use
    ``step.replace(field=...)`` for a changed copy.
    """

    __slots__ = ()

    def __new__(cls, n: int, state: Any = None, *, cost: Decimal | float | int = ZERO,
                score: float | None = None, error: str | None = None,
                started_at: float = 0.0, duration: float = 0.0,
                metrics: Mapping[str, Any] | None = None, events: Sequence[str] = (),
                state_json: str | None = None, decode: Decoder | None = None) -> Step:
        fields = (n, cost if type(cost) is Decimal else to_decimal(cost),
                  None if score is None else float(score), error, started_at, duration,
                  dict(metrics) if metrics else {}, tuple(events))
        if state_json is not None and decode is not None:  # a stored step: decoded when first read
            return _new_tuple(_SnapshotStep, (*fields, state_cell(_UNREAD, state_json, n, decode), error is None))
        return _new_tuple(Step, (*fields, state, error is None))

    # Every field reads straight from the tuple (itemgetter runs in C): policies read them on every step.
    n = property(itemgetter(0), doc="The step number, from 0.")  # type: ignore[assignment]
    cost = property(itemgetter(1), doc="What the call cost, in dollars (a Decimal).")
    score = property(itemgetter(2), doc="The scorer's verdict on the state, or None.")
    error = property(itemgetter(3), doc="'TypeName: message' when the call failed, else None.")
    started_at = property(itemgetter(4), doc="When the call started (Unix time).")
    duration = property(itemgetter(5), doc="How long the call took, in seconds.")
    metrics = property(itemgetter(6), doc="Values the edge computed for this step.")
    events = property(itemgetter(7), doc="Decisions taken after this step.")
    state = property(itemgetter(8), doc="What fn returned (None when the call failed).")
    ok = property(itemgetter(9), doc="True when the call returned a state (did not raise).")

    def _state_source(self) -> dict[str, Any]:
        return {"state": self[8]}

    @property
    def traceback(self) -> str | None:
        """Where a failed call's error was raised, as Python prints it but without loomc's own frames;
        None for a step that did not fail in the user's code. The store keeps it in ``metrics``, so
        ``loomc show RUN --step N`` shows it too."""
        return self[6].get(TRACEBACK_METRIC)  # type: ignore[no-any-return]

    @property
    def scored(self) -> bool:
        """True when the step has a usable (non-NaN) score."""
        return self[2] is not None and not math.isnan(self[2])

    def replace(self, **changes: Any) -> Step:
        fields: dict[str, Any] = dict(n=self[0], cost=self[1], score=self[2], error=self[3], started_at=self[4],
                                      duration=self[5], metrics=self[6], events=self[7])
        if "state" not in changes:
            fields.update(self._state_source())
        fields.update(changes)
        cell = fields.pop("_cell", None)
        step = Step(**fields)
        return step if cell is None else _new_tuple(_SnapshotStep, (*step[:8], cell, step[9]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Step):
            return NotImplemented
        return (self[0], self[1], self[3], self[7]) == (other[0], other[1], other[3], other[7]) \
            and _same_score(self[2], other[2]) and self[6] == other[6] and self.state == other.state

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = [f"n={self.n}", f"cost={self.cost}"]
        if self.score is not None:
            parts.append(f"score={self.score:g}")
        if self.error is not None:
            parts.append(f"error={self.error!r}")
        if self.events:
            parts.append(f"events={list(self.events)!r}")
        return f"Step({', '.join(parts)})"

    def __reduce__(self) -> Any:
        return (_rebuild_step, (self.n, self.state, self.cost, self.score, self.error, self.started_at,
                                self.duration, self.metrics, self.events))


class _SnapshotStep(Step):
    """A Step whose state can always be read again as it was committed.

    Its state lives in a cell, ``[state or _UNREAD, state_json, n, decode]``. A step loaded
    from a store starts unread. A fresh step starts with the object ``fn`` returned, and
    gets its JSON once that is encoded; when :func:`hand_out` gives the object to the next
    call, the step lets go of it and reads its state from the JSON again. The JSON may be
    ``IN_STORE``: the store holds it, and the decoder fetches it when the state is read.
    Copies made with ``replace`` share the cell.
    """

    __slots__ = ()

    @property  # type: ignore[misc]
    def state(self) -> Any:
        return read(self[8])

    def _state_source(self) -> dict[str, Any]:
        return {"_cell": self[8]}


def detached(step: Step) -> Step:
    """``step`` for code outside the loop while the run goes on (an ``on_step`` callback, a stream's reader): its
    state is read from the committed JSON on its own, when it is first read, so a change made to it in place
    (a callback that drops a field before printing it) reaches neither the next call nor the run's result.
    A step with no JSON (a state that could not be stored) is handed as it is."""
    cell = step[8]
    if type(step) is not _SnapshotStep or cell[1] is None:
        return step
    return _new_tuple(_SnapshotStep, step[:8] + ([_UNREAD, *cell[1:]], step[9]))


def read(cell: list[Any]) -> Any:
    """The state in a cell, decoded from its JSON if it is not held."""
    if cell[0] is _UNREAD:
        cell[0] = cell[3](cell[1], cell[2])
    return cell[0]


def hand_out(step: Step | None, initial: list[Any]) -> Any:
    """The state of ``step`` (``None``: the ``initial`` cell's), to call ``fn`` with.

    ``fn`` may change the object in place, so the step lets go of it and reads its state from
    the committed JSON from now on: an earlier step's state is always what was committed for
    it, never a later call's edits.
    """
    if type(step) is _SnapshotStep:  # every step of a live run, the usual case first
        cell = step[8]
    elif step is None:
        cell = initial
    else:
        return step[8]
    state = read(cell)
    if cell[1] is not None:  # without JSON nothing was committed that could be read again
        cell[0] = _UNREAD
    return state


def state_cell(state: Any, state_json: str | None, n: int | str, decode: Decoder) -> list[Any]:
    """A cell for a state that is not a step's (a run's initial state): see :class:`_SnapshotStep`."""
    return [state, state_json, n, decode]


def fresh_step(n: int, state: Any, cost: Decimal, score: float | None, error: str | None,
               started_at: float, duration: float, metrics: dict[str, Any], decode: Decoder) -> Step:
    """A new Step from values the interpreter has already checked (an exact cost, a float score).

    The same record as ``Step(...)``, without its checks and keyword parsing: it runs on every
    step. The interpreter puts the state's JSON in its cell (``step[8][1]``) once it is encoded.
    """
    return _new_tuple(_SnapshotStep, (n, cost, score, error, started_at, duration, metrics, (),
                                      [state, None, n, decode], error is None))


def with_events(step: Step, events: tuple[str, ...]) -> Step:
    """``step.replace(events=events)``, sharing its state: the loop marks decisions on every stop."""
    return _new_tuple(type(step), (*step[:7], events, *step[8:]))


def _rebuild_step(n: int, state: Any, cost: Decimal, score: float | None, error: str | None, started_at: float,
                  duration: float, metrics: dict[str, Any], events: tuple[str, ...]) -> Step:
    return Step(n, state, cost=cost, score=score, error=error, started_at=started_at, duration=duration,
                metrics=metrics, events=events)


def running_costs(steps: Iterable[Any]) -> Iterator[Decimal]:
    """The cumulative cost after each step (anything with a ``cost``), exactly.

    >>> list(running_costs([Step(0, cost="0.1"), Step(1, cost="0.25")]))
    [Decimal('0.1'), Decimal('0.35')]
    """
    return toolz.accumulate(operator.add, (s.cost for s in steps))  # type: ignore[no-any-return]


def spend_by_item(steps: Sequence[Any], name: Callable[[str], str] = str) -> str:
    """What the steps (anything with ``cost`` and ``metrics``) spent on each line item, dearest first, then
    the rest: ``claude-sonnet-4-5 $0.0800 in 4 steps, 12,400 tokens in and 900 out; judge $0.0100 in 2 steps;
    the rest $0.0040`` (an item's tokens where they were told).
    Empty if no step has line items (``loomc.charge(usd, item)``, an adapter's model, the judge).
    ``name`` shows an item's name (the CLI escapes it)."""
    totals: dict[str, Decimal] = {}
    calls: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    for s in steps:
        metrics = s.metrics
        for item, usd in (metrics.get(COST_ITEMS_METRIC) or {}).items():
            totals[item] = totals.get(item, ZERO) + Decimal(usd)
            calls[item] = calls.get(item, 0) + 1
        for item, told in (metrics.get(TOKENS_METRIC) or {}).items():
            sums = tokens.setdefault(item, [0, 0])
            sums[0] += told.get("input", 0)
            sums[1] += told.get("output", 0)
    if not totals:
        return ""
    rest = sum((s.cost for s in steps), ZERO) - sum(totals.values(), ZERO)
    parts = [f"{name(item)} {dollars(usd)} in {counted(calls[item], 'step')}" + (
                 f", {tokens[item][0]:,} tokens in and {tokens[item][1]:,} out" if item in tokens else "")
             for item, usd in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "; ".join(parts + ([f"the rest {dollars(rest)}"] if rest else []))


def _same_score(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


class _Spine:
    """The shared, growing list behind every History of one run."""

    __slots__ = ("steps", "memo", "sums")

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.memo: dict[Hashable, list[Any]] = {}
        # The summary fold, kept apart and up to date (one entry per prefix): every step reads it.
        self.sums: list[_Summary] = list(toolz.accumulate(_summarise, steps, _EMPTY))


_NOT_THE_STATE = "a History is a run's steps (a predicate gets it, not the state); the newest state is h[-1].state"


class History(Sequence[Step]):
    """An immutable sequence of Steps, oldest first, with O(1) append."""

    __slots__ = ("_spine", "_n")

    def __init__(self, steps: Sequence[Step] = ()) -> None:
        listed = list(steps)
        for i, step in enumerate(listed):
            if step.n != i:
                raise ValueError(f"step numbers must run 0, 1, 2, ...; position {i} holds step {step.n}")
        self._spine = _Spine(listed)
        self._n = len(listed)

    @classmethod
    def _view(cls, spine: _Spine, n: int) -> History:
        h = cls.__new__(cls)
        h._spine = spine
        h._n = n
        return h

    def append(self, step: Step) -> History:
        """A new History with ``step`` at the end; this one is unchanged."""
        if step.n != self._n:
            raise ValueError(f"the next step must be number {self._n}, got {step.n}")
        spine = self._spine
        if len(spine.steps) != self._n:
            # Someone already extended this prefix differently: branch off a copy.
            old = spine
            spine = _Spine(old.steps[: self._n])
            spine.memo = {k: v[: self._n + 1] for k, v in old.memo.items()}
        spine.steps.append(step)
        sums = spine.sums
        sums.append(_summarise(sums[-1], step))
        h = _new_object(History)  # History._view, written out: the loop appends on every step
        h._spine, h._n = spine, self._n + 1
        return h

    def _asked_with(self, step: Step, ask: Callable[[History], T]) -> T:
        """``ask(h)`` of this history with ``step`` after it, which then goes again: a judge's guard asks the policy
        about a step not measured whole yet. The newest history of its spine only; in O(1), as an append is: what
        ``ask`` memoised about ``step`` goes with it."""
        spine, n = self._spine, self._n
        if len(spine.steps) != n:
            raise ValueError("only the newest history of a run can be asked about a step to come")
        spine.steps.append(step)
        spine.sums.append(_summarise(spine.sums[n], step))
        try:
            return ask(History._view(spine, n + 1))
        finally:
            del spine.steps[n:], spine.sums[n + 1:]
            for values in spine.memo.values():
                del values[n + 1:]

    def prefix(self, k: int) -> History:
        """The first ``k`` steps, as a History sharing this one's spine (O(1))."""
        return History._view(self._spine, max(0, min(k, self._n)))

    def _replace_tip(self, step: Step) -> History:
        """This history with its last step swapped for ``step`` (same number).

        Only for recording events on the newest step: folds read costs, scores
        and errors, never events, so memoised values stay valid.
        """
        spine, n = self._spine, self._n
        if n == 0 or len(spine.steps) != n or step.n != n - 1:
            raise ValueError("only the newest step of the newest history can be replaced")
        spine.steps[n - 1] = step
        return self

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Step: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Step]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            start, stop, stride = i.indices(self._n)
            if start == 0 and stride == 1:
                return History._view(self._spine, max(stop, 0))
            return tuple(self._spine.steps[start:stop:stride])
        try:
            if i < 0:
                i += self._n
        except TypeError:  # h["done"]: a predicate read as if it were given the state
            raise TypeError(f"History indices are step numbers, not {i!r}: {_NOT_THE_STATE}") from None
        if not 0 <= i < self._n:
            raise IndexError(f"step {i} is not in a history of {self._n} steps")
        return self._spine.steps[i]

    if not TYPE_CHECKING:  # a type checker still reports a name the History lacks
        def __getattr__(self, name: str) -> Any:
            """Only for a name the History lacks: h.done, h.get(...), as if a predicate were given the state."""
            if name.startswith("_"):  # copy, pickle and IPython probe such names: the plain error
                raise AttributeError(name)
            raise AttributeError(f"'History' object has no attribute {name!r}: {_NOT_THE_STATE}")

    def __iter__(self) -> Iterator[Step]:
        steps = self._spine.steps
        for i in range(self._n):
            yield steps[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, History):
            if other._n != self._n:
                return False
            if other._spine is self._spine:
                return True
            return all(a == b for a, b in zip(self, other))
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"History({counted(self._n, 'step')}, cost={self.total_cost})"

    def fold(self, key: Hashable, fn: Callable[[T, Step], T], init: T) -> T:
        """``functools.reduce(fn, self, init)``, memoised per prefix under ``key``.

        ``key`` must identify ``fn`` and ``init`` (a frozen policy value works).
        """
        memo = self._spine.memo.get(key)
        if memo is not None and len(memo) == self._n:  # the usual case in a live loop: one new step
            value = fn(memo[-1], self._spine.steps[self._n - 1])
            memo.append(value)
            return value
        if memo is None:
            memo = self._spine.memo[key] = [init]
        steps, value = self._spine.steps, memo[-1]
        for i in range(len(memo) - 1, self._n):
            value = fn(value, steps[i])
            memo.append(value)
        return memo[self._n]  # type: ignore[no-any-return]

    # Derivations every policy and the CLI need.

    def _summary(self) -> _Summary:
        """``fold(_summarise)``, kept up to date by ``append``: budgets, backtrackers and commits read it on
        every step."""
        return self._spine.sums[self._n]

    @property
    def total_cost(self) -> Decimal:
        """Exact sum of every step's cost, failed steps included."""
        return self._summary()[0]

    @property
    def max_cost(self) -> Decimal:
        """The largest single step cost so far (the USD budget's estimate)."""
        return self._summary()[1]

    @property
    def longest(self) -> float:
        """The longest call so far, in seconds (the wall-clock budget's estimate of the next)."""
        return self._summary()[6]

    @property
    def best(self) -> Step | None:
        """The step with the highest score (earliest on ties); NaN never wins."""
        i = self._summary()[2]
        return None if i < 0 else self._spine.steps[i]

    @property
    def last_good(self) -> Step | None:
        """The last step that did not fail."""
        i = self._summary()[4]
        return None if i < 0 else self._spine.steps[i]


# (total cost, largest cost, best step, best score, last good step, calls of unknown cost, longest call
# in seconds): one fold serves every derivation the budgets and backtrackers read on each step.
_Summary = tuple[Decimal, Decimal, int, float, int, int, float]
_EMPTY: _Summary = (ZERO, ZERO, -1, 0.0, -1, 0, 0.0)


def _summarise(acc: _Summary, step: Step) -> _Summary:
    total, largest, best, best_score, last_good, unknown, longest = acc
    cost, score, took = step[1], step[2], step[5]
    if step[3] is None:
        last_good = step[0]
        if score is not None and score == score and (best < 0 or score > best_score):  # NaN != NaN
            best, best_score = step[0], score
    elif cost_unknown(step):
        unknown += 1
    return (total + cost, cost if cost > largest else largest, best, best_score, last_good, unknown,
            took if took > longest else longest)


def cost_unknown(step: Step) -> bool:
    """Whether a failed step's call may have cost more than it recorded, by how much nobody knows: ``fn``
    raised under a ``cost_fn`` (which prices only a returned state), ``cost_fn`` raised, or the call was
    cut short at $0."""
    return COST_UNKNOWN_METRIC in step.metrics or cut_short(step)


#: The event of a paid step whose commit the store refused, recorded in its place as failed, without its state.
NOT_STORED = "not stored"


def outside_call(step: Step) -> bool:
    """Whether a failed step failed from outside its call, which says nothing of whether the loop is going
    anywhere: a call cut short (its process died, a Ctrl-C, a cancelled task), or one the store refused."""
    return "interrupted" in step.events or NOT_STORED in step.events


def cut_short(step: Any) -> bool:
    """An ``interrupted`` step that carries no cost: its call died before it charged anything."""
    return not step.cost and "interrupted" in step.events
