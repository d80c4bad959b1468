"""Policies: frozen values that look at a History and decide what happens next.

Every budget, convergence detector, backtracker and stall handler is a
:class:`Policy`. ``policy.decide(history, elapsed)`` is pure: the same history
and elapsed active seconds always give the same :class:`Decision`.

Signals (budgets and detectors) fire or not, and compose with ``|`` (either),
``&`` (both, on the same step) and ``~`` (not)::

    >>> from loomc import score_plateau, predicate, never
    >>> p = score_plateau(patience=3) | predicate(lambda h: (h[-1].score or 0) >= 1.0)
    >>> p
    score_plateau(patience=3, min_delta=0.01) | predicate(<lambda>)
    >>> (p | never) == p
    True

Backtrackers and stall handlers join a policy with ``|`` only: ``BestScore() & x``
raises :class:`~loomc.errors.PolicyTypeError`, and ``bool(policy)`` raises so
that ``a or b`` cannot silently pick one operand.
"""

from __future__ import annotations

import enum
import functools
import inspect
import numbers
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from loomc.errors import ConfigError, PolicyTypeError, counted, dollars, short_repr, took
from loomc.history import History


class Outcome(enum.IntEnum):
    """What a decision does, weakest first; the strongest one on a step wins."""

    CONTINUE = 0
    BACKTRACK = 1
    STALLED = 2
    BUDGET_EXHAUSTED = 3
    CONVERGED = 4

    @property
    def stops(self) -> bool:
        return self >= Outcome.STALLED


@dataclass(frozen=True)
class Decision:
    """The answer of a policy: an outcome, why, and (for a backtrack) to which step.

    ``to`` is the step whose state the loop continues from; ``None`` with a
    backtrack means the run's initial state.
    """

    outcome: Outcome
    reason: str = ""
    to: int | None = None
    by: str = ""
    wait: float = 0.0  # seconds to wait before the next call (a backtracker's backoff after failures)

    @property
    def stops(self) -> bool:
        return self.outcome.stops

    def event(self) -> str:
        """The short mark written on the step this decision followed."""
        if self.outcome is Outcome.BACKTRACK:
            return "backtrack to initial state" if self.to is None else f"backtrack to step {self.to}"
        return STOP_EVENTS.get(self.outcome, "")


#: The mark a decision to stop writes on the step it followed.
STOP_EVENTS = {Outcome.CONVERGED: "converged", Outcome.BUDGET_EXHAUSTED: "budget exhausted", Outcome.STALLED: "stalled"}

CONTINUE = Decision(Outcome.CONTINUE)


class Policy:
    """Base of every policy value. Subclasses are frozen dataclasses."""

    __slots__ = ()

    #: The strongest outcome this policy can give; lets ``|`` skip parts that
    #: cannot change the answer.
    max_outcome: Outcome = Outcome.CONVERGED
    #: True when the policy reads ``step.score``, so the loop needs a scorer.
    needs_score: bool = False

    def decide(self, history: History, elapsed: float = 0.0) -> Decision:
        raise NotImplementedError

    def walk(self) -> Iterator[Policy]:
        """This policy and every policy nested in it."""
        yield self

    def probes(self) -> tuple[Probe, ...]:
        """Measurements the edge takes once per step for this policy (a judge's verdict, an embedding)."""
        return ()

    def measured(self) -> tuple[str, str] | None:
        """The step metric this policy reads that the edge measures, and what it holds (``"verdict"``, a judge's;
        ``"distance"``, an embedding's), or None: a replay tells a part whose measure the recorded run never took."""
        return None

    def reads(self, metrics: Mapping[str, Any]) -> bool:
        """Whether a step's ``metrics`` hold the measure this part reads (see :meth:`measured`)."""
        measured = self.measured()
        return measured is not None and measured[0] in metrics

    # The algebra. Each operator is one line; the named functions hold the rules.
    def __or__(self, other: Any) -> Policy:
        return either(self, other)

    def __ror__(self, other: Any) -> Policy:
        return either(other, self)

    def __and__(self, other: Any) -> Policy:
        return both(self, other)

    def __rand__(self, other: Any) -> Policy:
        return both(other, self)

    def __invert__(self) -> Policy:
        return negate(self)

    def __bool__(self) -> bool:
        raise PolicyTypeError(
            f"the truth of a policy is decided per history; {self!r} has no bool(). "
            "Combine policies with | or &, not with `or` / `and`; "
            "ask policy.decide(history) for an answer.")

    def _repr_html_(self) -> str:
        from loomc.notebook import policy_html
        return policy_html(self)

    def replay(self, history: History) -> Replay:
        """What this policy would have done on a recorded history, without calling ``fn``.

        Walks the history step by step, exactly as the live loop does, and
        returns where it would have stopped (and why) and where it would have
        backtracked. Active time is taken as the sum of the step durations.
        """
        return replay(self, history)


class Probe:
    """A measurement the interpreter takes at the edge, once per successful step.

    ``measure(state, history)`` returns metrics to record on the step (JSON-friendly),
    or an awaitable of them in an async loop. ``history`` is the history before the
    step. Detectors then read ``step.metrics``, so they stay pure: a replay or a
    resume never measures again.
    """

    __slots__ = ()

    def measure(self, state: Any, history: History) -> Any:
        raise NotImplementedError

    def needs_async(self) -> str | None:
        """What in this probe only an async loop can await (an ``async def`` judge), or ``None``."""
        return None

    def check_installed(self) -> None:
        """Raise now if what this probe needs is not installed here (an extra). ``@loop`` asks at
        decoration, before any paid call; a policy built only to replay recorded runs is never asked."""

    def prepare(self) -> None:
        """Load what measuring needs (a model), or raise: asked before a run's first call, so that what
        cannot be loaded fails before any call is paid for. A replay never asks."""


class Signal(Policy):
    """A policy that fires or not: budgets and convergence detectors."""

    __slots__ = ()
    #: The outcome when this signal fires (a leaf's ``max_outcome`` is the same).
    kind: Outcome = Outcome.CONVERGED

    def fire(self, history: History, elapsed: float) -> str | None:
        """The reason this signal fires on ``history``, or ``None``."""
        raise NotImplementedError

    def decide(self, history: History, elapsed: float = 0.0) -> Decision:
        reason = self.fire(history, elapsed)
        return CONTINUE if reason is None else self.fired(reason)

    def fired(self, reason: str) -> Decision:
        """The decision this signal gives when it fires for ``reason``."""
        return Decision(self.kind, reason, by=repr(self))


class Role(Policy):
    """A backtracker or stall handler: joins a policy with ``|`` only."""

    __slots__ = ()
    role = "role"

    def choose_state_step(self, history: History) -> Any:
        """The step whose state a stopped run returns (``None``: the initial state)."""
        return _current_step(history)


def _current_step(history: History) -> Any:
    """The step the loop carries on from: where the last backtrack pointed, else the last good step."""
    if not history:
        return None
    last = history[-1]
    for event in last.events:
        if event.startswith("backtrack to "):
            target = event.rsplit(" ", 1)[-1]
            return None if target == "state" else history[int(target)]
    return last if last.ok else history.last_good


def steps_to_keep(history: History) -> set[int]:
    """The steps whose states a stopped run may still go back to, or return: its newest step, its last good
    and best steps, and the one its last backtrack pointed to. The other states serve only to look back."""
    if not history:
        return set()
    summary, current = history._summary(), _current_step(history)
    return {len(history) - 1, summary[2], summary[4], -1 if current is None else current[0]} - {-1}


def score_readers(policy: Policy) -> list[str]:
    """The parts of ``policy`` that read step scores, as written (``score_plateau(...)``, ``BestScore()``)."""
    return [repr(p) for p in policy.walk() if p.needs_score and not hasattr(p, "parts")]


def check_one_argument(fn: Callable[..., Any] | None, call: str) -> None:
    """:class:`ConfigError` now if loomc could not make ``call`` (``"fn(state)"``) with ``fn``.

    Functions without a readable signature (some builtins) pass; their first call will tell.
    """
    if fn is None:
        return
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None)
    except TypeError:
        name = name_of(fn)
        hint = ""
        if next(iter(signature.parameters), None) in ("self", "cls"):
            hint = (" It looks like a method; a loop is a function of the state. Define it at module level "
                    "and carry what it needs in the state, or define it inside the method.")
        raise ConfigError(f"loomc calls {call} with one argument, but {name}{signature} cannot be called "
                          f"that way.{hint}") from None


# --- the combinators -------------------------------------------------------

def as_policy(value: Any, side: str = "operand") -> Policy:
    """A policy as it is, a plain ``fn(history) -> bool`` as ``predicate(fn)``, else TypeError."""
    if isinstance(value, Policy):
        return value
    if callable(value) and not isinstance(value, type):
        return Predicate(value)
    hint = ""
    if isinstance(value, type) and issubclass(value, Policy):  # policy=Budget: the class, never called
        made = {"Budget": "Budget(usd=2.00)", "Escalate": "Escalate(after=3)"}.get(value.__name__,
                                                                                 f"{value.__name__}()")
        raise PolicyTypeError(f"cannot combine a policy with the class {value.__name__} ({side}): call it to make "
                              f"the policy, as in {made}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # converge_on=0.95: a target score
        hint = (f"; to stop once a step scores {value!r} or more, write "
                f"predicate(lambda h: (h[-1].score or 0) >= {value!r})")
    raise PolicyTypeError(
        f"cannot combine a policy with {type(value).__name__} {value!r} ({side}): "
        "use a policy (score_plateau(...), Budget(...), never, always) "
        f"or a function fn(history) -> bool, which becomes predicate(fn){hint}")


def either(a: Any, b: Any) -> Policy:
    """``a | b``: the strongest decision of either. Flat: ``a | b | c`` is one node."""
    pa, pb = as_policy(a, "left of |"), as_policy(b, "right of |")
    parts = tuple(p for p in (*_or_parts(pa), *_or_parts(pb)) if p is not never)
    roles = [type(p).role for p in parts if isinstance(p, Role)]
    for role in set(roles):
        if roles.count(role) > 1:
            raise PolicyTypeError(f"a policy takes one {role}; {pa!r} | {pb!r} has {roles.count(role)}")
    if not parts:
        return never
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Signal) for p in parts):
        return AnyOf(parts)  # type: ignore[arg-type]
    return Policies(parts)


def _or_parts(p: Policy) -> tuple[Policy, ...]:
    return p.parts if isinstance(p, (AnyOf, Policies)) else (p,)


def _signal(value: Any, op: str) -> Signal:
    p = as_policy(value, f"operand of {op}")
    if not isinstance(p, Signal):
        raise PolicyTypeError(
            f"{p!r} is a {getattr(p, 'role', 'policy')}, which cannot be combined with {op}: "
            f"only budgets and detectors fire or not. Write `signals | {p!r}` to add it to a "
            "policy, e.g. Budget(usd=2) | score_plateau(3) | BestScore() | Escalate(after=3)")
    return p


def both(a: Any, b: Any) -> Signal:
    """``a & b``: fires when both fire on the same history."""
    sa, sb = _signal(a, "&"), _signal(b, "&")
    parts = tuple(p for p in (*_and_parts(sa), *_and_parts(sb)) if p is not always)
    if not parts:
        return always
    if len(parts) == 1:
        return parts[0]
    return AllOf(parts)


def _and_parts(p: Signal) -> tuple[Signal, ...]:
    return p.parts if isinstance(p, AllOf) else (p,)  # type: ignore[return-value]


def negate(a: Any) -> Signal:
    """``~a``: fires when ``a`` does not."""
    s = _signal(a, "~")
    if isinstance(s, Not):
        return s.inner
    return Not(s)


def _wrap(p: Policy) -> str:
    return f"({p!r})" if isinstance(p, (AnyOf, AllOf, Policies)) else repr(p)


class _Composite:
    """What every node holding ``parts`` shares: walking, score needs, its printed form, and
    ``_strongest``, the decision of ``|``."""

    __slots__ = ()
    parts: tuple[Policy, ...]
    _op = " | "
    # Per part, worked out once (policies are frozen): its strongest outcome, and how to ask it.
    # A plain signal is asked fire() directly, one call fewer than decide(): this runs on every step.
    _plan: tuple[tuple[Outcome, Callable[[History, float], Any], Signal | None], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_plan", tuple(
            (p.max_outcome, p.fire, p) if type(p).decide is Signal.decide  # type: ignore[attr-defined]
            else (p.max_outcome, p.decide, None) for p in self.parts))

    def _strongest(self, history: History, elapsed: float = 0.0) -> Decision:
        """The strongest decision of the parts; parts that cannot beat it are not asked."""
        best, strongest = CONTINUE, _CONTINUE
        for most, ask, signal in self._plan:
            if most <= strongest:
                continue  # cannot change the answer: skip (a predicate is not asked, a verdict not read)
            if signal is None:
                d = ask(history, elapsed)
            else:
                reason = ask(history, elapsed)
                if reason is None:
                    continue
                d = signal.fired(reason)
            if d.outcome > strongest:
                best, strongest = d, d.outcome
                if strongest is _CONVERGED:
                    break
        return best

    def walk(self) -> Iterator[Policy]:
        yield self  # type: ignore[misc]
        for p in self.parts:
            yield from p.walk()

    @property
    def needs_score(self) -> bool:
        return any(p.needs_score for p in self.parts)

    @property
    def kind(self) -> Outcome:
        return max(p.kind for p in self.parts)  # type: ignore[attr-defined]

    @property
    def max_outcome(self) -> Outcome:
        return self.kind

    def __repr__(self) -> str:
        return self._op.join(_wrap(p) for p in self.parts)


@dataclass(frozen=True, repr=False)
class AnyOf(_Composite, Signal):  # type: ignore[misc, override]
    """Fires when any part fires (``a | b``); the strongest firing part decides."""

    parts: tuple[Signal, ...]

    def fire(self, history: History, elapsed: float) -> str | None:
        d = self.decide(history, elapsed)
        return d.reason if d.stops else None

    decide = _Composite._strongest


@dataclass(frozen=True, repr=False)
class AllOf(_Composite, Signal):  # type: ignore[misc, override]
    """Fires when every part fires on the same history (``a & b``)."""

    parts: tuple[Signal, ...]
    _op = " & "

    def fire(self, history: History, elapsed: float) -> str | None:
        reasons = []
        for p in self.parts:
            r = p.fire(history, elapsed)
            if r is None:
                return None
            reasons.append(r)
        return " and ".join(reasons)


@dataclass(frozen=True, repr=False)
class Not(Signal):
    """Fires when ``inner`` does not (``~a``)."""

    inner: Signal

    def walk(self) -> Iterator[Policy]:
        yield self
        yield from self.inner.walk()

    @property
    def needs_score(self) -> bool:  # type: ignore[override]
        return self.inner.needs_score

    def fire(self, history: History, elapsed: float) -> str | None:
        return None if self.inner.fire(history, elapsed) is not None else f"not {self.inner!r}"

    def __repr__(self) -> str:
        return f"~{_wrap(self.inner)}"


@dataclass(frozen=True, repr=False)
class Policies(_Composite, Policy):  # type: ignore[misc, override]
    """A whole loop policy: signals plus at most one backtracker and one stall handler."""

    parts: tuple[Policy, ...]

    @property
    def max_outcome(self) -> Outcome:  # type: ignore[override]
        return Outcome.CONVERGED

    decide = _Composite._strongest


_CONTINUE, _CONVERGED = Outcome.CONTINUE, Outcome.CONVERGED

#: A test of a history whose newest step is being measured (and the active seconds): see :func:`consulted`.
Guard = Callable[[History, float], bool]


def consulted(policy: Policy, part: Policy) -> Guard | None:
    """Whether deciding ``policy`` would ask ``part`` on a history, as a test of the history; ``None`` when it always
    would (or ``part`` is not in ``policy``). Parts are asked as the combinators ask them: ``|`` skips a part once an
    earlier one gave an outcome at least as strong as the part's strongest (an earlier detector that converged),
    and ``&`` stops at its first part that does not fire. The edge asks a paid judge only when this says yes."""
    tests = _consulted(policy, part)
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]
    return lambda h, elapsed: all(test(h, elapsed) for test in tests)


def any_asks(guards: list[Guard | None]) -> Guard | None:
    """One guard for a measure several parts read: it asks where any of ``guards`` would (None: always)."""
    asked = [guard for guard in guards if guard is not None]
    if len(asked) < len(guards):
        return None
    return asked[0] if len(asked) == 1 else lambda h, elapsed: any(guard(h, elapsed) for guard in asked)


def _consulted(policy: Policy, part: Policy) -> list[Guard] | None:
    """The tests, outermost first, under which ``policy`` asks ``part``; ``None`` if ``part`` is not in it."""
    if policy is part:
        return []
    if isinstance(policy, Not):
        return _consulted(policy.inner, part)
    parts: tuple[Policy, ...] = getattr(policy, "parts", ())
    for i, inner in enumerate(parts):
        rest = _consulted(inner, part)
        if rest is None:
            continue
        if isinstance(policy, AllOf):
            before: tuple[Signal, ...] = policy.parts[:i]
            return ([lambda h, elapsed: all(p.fire(h, elapsed) is not None for p in before)] if before else []) + rest
        # | asks ``inner`` unless the parts before it reached its strongest outcome; weaker parts cannot.
        most = inner.max_outcome
        stronger = tuple(p for p in parts[:i] if p.max_outcome >= most)
        if not stronger:
            return rest
        prefix = Policies(stronger)
        return [lambda h, elapsed: prefix.decide(h, elapsed).outcome < most] + rest
    return None



# --- leaves ----------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Predicate(Signal):
    """``predicate(fn)``: converged when ``fn(history)`` is True.

    ``fn`` is not asked on an empty history, nor right after a failed step
    (which has no state and cannot have converged), so ``h[-1].state`` is safe.
    A falsy answer is a no; a truthy one that is no boolean raises PolicyTypeError.

    >>> done = predicate(lambda h: h[-1].state == "done")
    """

    fn: Callable[[History], Any]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise PolicyTypeError(f"predicate() takes a function fn(history) -> bool, got {self.fn!r}")
        example = getattr(self.fn, "builds_policy", None)
        if example is not None:  # converge_on=score_plateau: it would be asked about the history, and fail then
            raise PolicyTypeError(f"{self.fn.__name__} builds a policy, it is not one: call it, as in {example}")
        check_one_argument(self.fn, "predicate's fn(history)")

    def fire(self, history: History, elapsed: float) -> str | None:
        if not history or not history[-1].ok:
            return None
        verdict = self.fn(history)
        if is_true(verdict):
            return f"predicate({name_of(self.fn)}) is true"
        if not verdict:
            return None  # a falsy value (None from `h[-1].score and ...`) is a no, whatever its type
        # A truthy value that is no boolean ("clean", 1, the state): a yes to Python, none to loomc, which
        # would go on to the budget without a word. Said now, after one call, with the step kept.
        raise PolicyTypeError(f"predicate({name_of(self.fn)}) returned {short_repr(verdict, 40)} ({type(verdict).__name__}), "
                              "which is neither True nor False; only True converges, so return a bool (a comparison, "
                              "or bool(...) if any truthy value means done)")

    def __repr__(self) -> str:
        return f"predicate({name_of(self.fn)})"


_BOOLS = ("bool", "bool_")  # numpy's booleans count as booleans (numpy.bool, numpy.bool_ before numpy 2)


def whole(value: Any) -> int | None:
    """``value`` as an int when it is a whole number >= 1, numpy's too (a parameter sweep's DataFrame gives
    numpy.int64), or a float of one (``20.0`` from a config file, ``1e3``, a DataFrame column with a gap in it);
    else ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        count = int(value)
    elif float(value).is_integer():  # not 2.5, inf or nan
        count = int(float(value))
    else:
        return None
    return count if count >= 1 else None


def real(value: Any) -> int | float | None:
    """``value`` as a Python int or float when it is a real number that is no bool, numpy's too; else ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return value if isinstance(value, int) else float(value)


def is_true(verdict: Any) -> bool:
    """``True``, or numpy's: a verdict that says yes (a classifier's ``probability > 0.5``, say)."""
    return verdict is True or (type(verdict).__name__ in _BOOLS and bool(verdict))


def name_of(fn: Any) -> str:
    """A function's name for messages: its ``__name__``, else its type's."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def loop_name(fn: Any, runner: Any = None) -> str:
    """How a hint such as ``refine.resume('...')`` writes the loop: the name ``fn``'s module binds ``runner``
    to (``refine`` for ``refine = loop(...)(refine_step)``, where ``refine_step`` is the plain function and
    has no ``resume``), else its function's name, ``fn`` for a lambda; ``await refine`` for an
    ``async def`` one, whose resume is awaited."""
    name = None if runner is None else bound_name(runner, fn)
    if name is None:
        name = name_of(fn)
        name = "fn" if name == "<lambda>" else name
    return f"await {name}" if inspect.iscoroutinefunction(fn) else name


def unwrapped(fn: Any) -> Any:
    """The function a ``functools.partial`` (of a partial ...) calls; anything else as it is."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def home_module(fn: Any) -> str | None:
    """The name of the module ``fn`` was written in; a ``functools.partial``'s is its function's."""
    return getattr(unwrapped(fn), "__module__", None)


def bound_name(obj: Any, fn: Any) -> str | None:
    """The name ``fn``'s module binds ``obj`` to: fn's own name first (a decorated function), else the first
    public one (a notebook also keeps displayed values under ``_``, ``_3``)."""
    module = sys.modules.get(home_module(fn) or "")
    if module is None:
        return None
    names = vars(module)
    own = getattr(fn, "__name__", None)
    if isinstance(own, str) and names.get(own) is obj:
        return own
    return next((name for name, value in list(names.items()) if value is obj and not name.startswith("_")), None)


def builds_policy(example: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark one of loomc's policy factories, so that passing it uncalled is refused with ``example``."""
    def mark(factory: Callable[..., Any]) -> Callable[..., Any]:
        factory.builds_policy = example  # type: ignore[attr-defined]
        return factory
    return mark


@builds_policy("predicate(lambda h: h[-1].state['done'])")
def predicate(fn: Callable[[History], Any]) -> Signal:
    """A detector from a function of the history; fires when it returns True."""
    return Predicate(fn)


@dataclass(frozen=True, repr=False)
class _Constant(Signal):
    value: bool

    def fire(self, history: History, elapsed: float) -> str | None:
        return "always" if self.value else None

    def __repr__(self) -> str:
        return "always" if self.value else "never"


#: A signal that never fires: the identity of ``|``.
never: Signal = _Constant(False)
#: A signal that always fires: the identity of ``&``.
always: Signal = _Constant(True)


# --- replay ----------------------------------------------------------------

@dataclass(frozen=True)
class Replay:
    """What a policy would have done on a recorded history.

    ``stopped_after`` is the number of calls made before the stop (``None`` if
    the policy would have let the recorded run go on past its end), and
    ``cost`` what those calls cost.
    """

    policy: str
    decision: Decision
    stopped_after: int | None
    cost: Decimal
    backtracks: tuple[tuple[int, int | None], ...]
    steps_recorded: int
    unjudged: tuple[str, ...] = ()  # the judges of the policy that the recorded run never asked
    unembedded: tuple[str, ...] = ()  # its semantic_delta detectors, where the run embedded no output
    unscored: tuple[str, ...] = ()  # the parts that read scores, where the run scored no step (it had no scorer)

    def untaken(self) -> Iterator[tuple[str, str, str]]:
        """The parts of the policy that read what the recorded run never measured, as one text, with what the
        replay says of them at length and in short (a verdict, a distance or a score it has none of)."""
        for names, said, short in (
                (self.unjudged, " gave no verdict on any recorded step (the run did not ask it), which the replay "
                 "takes as a no", "no verdict recorded, taken as no"),
                (self.unembedded, ": no recorded step has a distance (the run did not embed its outputs), so the "
                 "replay never finds it converged", "no distance recorded, never fires"),
                (self.unscored, ": no recorded step has a score (the run had no scorer, or it gave None), so the "
                 "replay finds none to read", "no score recorded")):
            if names:
                yield " and ".join(names), said, short

    def __str__(self) -> str:
        if self.stopped_after is None:
            head = f"{self.policy}: would not have stopped within the {self.steps_recorded} recorded steps"
        else:
            head = (f"{self.policy}: would have stopped after {counted(self.stopped_after, 'step')} "
                    f"({dollars(self.cost)}), {self.decision.outcome.name.lower()}: {self.decision.reason}")
        if self.backtracks:
            marks = ", ".join(f"step {n} -> {'initial' if to is None else to}" for n, to in self.backtracks)
            head += f"; backtracks: {marks}"
        return head + "".join(f"; {names}{said}" for names, said, _ in self.untaken())


def waited(decision: Decision, history: History, elapsed: float, wall: Any) -> Decision:
    """A decision to wait before the next call, or the stop it becomes when the wall-clock cap would stop
    the call after it: the wait reaches the cap, or leaves less than the longest call so far (the time
    ``Budget(wall_clock=)`` counts the next call at). ``wall`` is the Budget with the tightest wall-clock
    cap, or None. The live loop and replay both ask."""
    if wall is None:
        return decision
    wall_cap, wait, then = wall.wall_clock, decision.wait, elapsed + decision.wait
    if then >= wall_cap:
        why = f"the {wait:g}s wait before the next call would reach the cap"
    elif then + history.longest > wall_cap:
        why = f"the {wait:g}s wait + {next_call_time(history)} would pass the cap"
    else:
        return decision
    return Decision(Outcome.BUDGET_EXHAUSTED,
                    f"wall_clock: {took(elapsed)} active of the {wall.wall_clock_said} cap, and {why}",
                    by=decision.by)


def next_call_time(history: History) -> str:
    """The time the wall clock counts the next call at, said as the reason of a stop by it: the longest
    call so far (as the USD cap counts the next call at the dearest), naming the step that took it."""
    longest = history.longest
    n = next(step.n for step in history if step.duration == longest)
    return f"{took(longest)} for the next call (as long as step {n}, the longest yet)"


def check_measures(policy: Policy) -> None:
    """A :class:`ConfigError` if two parts of ``policy`` measure different things into one step metric: two judges
    of one name (each would read the verdict the other recorded), or semantic_delta detectors of different texts
    or models (each would read the other's distance). Parts that measure alike (one judge twice, one embedding
    under two thresholds) share it."""
    seen: dict[str, tuple[Policy, tuple[Probe, ...]]] = {}
    for part in policy.walk():
        measured = part.measured()
        if measured is None:
            continue
        key, what = measured
        first, probes = seen.setdefault(key, (part, part.probes()))
        if probes != part.probes():
            fix = ("name them apart, as in judge(fn, name='complete') or an adapter's judge(client, prompt, "
                   "name='complete')" if what == "verdict" else
                   "give them one text_fn and model (a step has one embedding), or keep one of them")
            raise ConfigError(f"{first!r} and {part!r} both record their {what} as step.metrics[{key!r}], so each "
                              f"would read the other's: {fix}")


def replay(policy: Policy, history: History) -> Replay:
    from loomc.budget import wall_clock_budget
    policy = as_policy(policy)
    check_measures(policy)
    wall = wall_clock_budget(policy)
    measures = {repr(p): (p, m[1]) for p in policy.walk() if (m := p.measured()) is not None}
    ok = any(s.ok for s in history)  # a history of failures measured nothing
    unmeasured = [(name, what) for name, (part, what) in measures.items()
                  if ok and not any(part.reads(s.metrics) for s in history)]
    untaken = (tuple(name for name, what in unmeasured if what == "verdict"),
               tuple(name for name, what in unmeasured if what == "distance"),
               tuple(score_readers(policy)) if ok and all(s.score is None for s in history) else ())
    backtracks: list[tuple[int, int | None]] = []
    elapsed = 0.0
    for k in range(len(history) + 1):
        prefix = history.prefix(k)
        if k:
            elapsed += history[k - 1].duration
        d = policy.decide(prefix, elapsed)
        if d.wait:
            d = waited(d, prefix, elapsed, wall)
            elapsed += 0.0 if d.stops else d.wait  # the next call starts after the wait
        if d.stops:
            return Replay(repr(policy), d, k, prefix.total_cost, tuple(backtracks), len(history), *untaken)
        if d.outcome is Outcome.BACKTRACK:
            backtracks.append((k - 1, d.to))
    return Replay(repr(policy), CONTINUE, None, history.total_cost, tuple(backtracks), len(history), *untaken)
