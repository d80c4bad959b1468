"""Hard caps on dollars, calls and active time, checked before every call.

    >>> b = Budget(usd=2.00, iterations=15, wall_clock="10m")
    >>> b
    Budget(usd=2.0, iterations=15, wall_clock='10m')

- ``usd`` is predictive: the loop does not start a call when the dollars
  spent plus the estimate for the next call would pass the cap. The estimate
  is the largest step cost seen so far, or ``step_estimate`` when given (which
  also guards the first call). Dollars are summed as Decimals, exactly.
- ``iterations`` counts calls of ``fn``, failed calls included.
- ``wall_clock`` counts the run's active time, across resumes. It is predictive
  too: the next call is counted at the longest call so far.

A loop given no budget at all runs under :data:`DEFAULT_BUDGET`
(``Budget(iterations=100)``); ``Budget.unbounded()`` asks for no cap by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from collections.abc import Callable, Sequence
from typing import Any

from loomc.errors import COST_UNKNOWN_METRIC, ConfigError, counted, cut_at_deadline, dollars, took
from loomc.history import History, Step, cost_unknown, cut_short, to_decimal
from loomc.policy import AnyOf, Outcome, Policies, Policy, Signal, either, next_call_time, real, whole

_DURATION = re.compile(r"^(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?"
                       r"(?:(?P<s>\d+(?:\.\d+)?)s)?$")
_SECONDS = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")  # a plain number: seconds, as 600 is


def parse_duration(value: Any, what: str = "wall_clock") -> float:
    """Seconds from ``"30s"``, ``"10m"``, ``"1h"``, ``"1h30m"``, ``"7d"``, a number of seconds or a timedelta.

    ``what`` names the setting in error messages.

    >>> parse_duration("1h30m"), parse_duration(90), parse_duration(timedelta(minutes=2)), parse_duration("2d")
    (5400.0, 90.0, 120.0, 172800.0)
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif real(value) is not None:  # numpy's numbers too
        seconds = float(value)
    elif isinstance(value, str) and _SECONDS.match(value.strip()):  # "600" (a command line, a setting): seconds
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value.strip().replace(" ", "").lower())
        if not value.strip() or m is None or not any(m.groupdict().values()):
            raise ConfigError(
                f"{what}={value!r} is not a duration; write it like '30s', '10m', '1h', '1h30m' or '7d', "
                + ("or a number of seconds" if what.startswith("--") else
                   "or pass seconds as a number or a datetime.timedelta"))
        seconds = sum(float(m[unit] or 0) * mult for unit, mult in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)))
    else:
        raise ConfigError(f"{what} must be a string like '10m', seconds or a timedelta, got {value!r}")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{what} must be a positive, finite duration, got {value!r}")
    return seconds


class NoCostWarning(UserWarning):
    """A run under a USD cap whose first successful step reported no cost, so the cap cannot bind."""


@dataclass(frozen=True, repr=False, init=False)
class Budget(Signal):
    """Caps on USD, calls of ``fn`` and active wall-clock time. Fires when any cap is reached."""

    usd: Decimal | None
    iterations: int | None
    wall_clock: float | None
    step_estimate: Decimal | None
    unbounded_: bool
    wall_clock_text: str | None

    kind = max_outcome = Outcome.BUDGET_EXHAUSTED

    def __init__(self, usd: float | Decimal | str | None = None, iterations: int | None = None,
                 wall_clock: str | float | timedelta | None = None, *,
                 step_estimate: float | Decimal | str | None = None, _unbounded: bool = False) -> None:
        s = object.__setattr__
        try:
            s(self, "usd", None if usd is None else to_decimal(usd, "Budget(usd=...)"))
            s(self, "step_estimate", None if step_estimate is None
              else to_decimal(step_estimate, "Budget(step_estimate=...)"))
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if self.usd is not None and not self.usd:  # the first call has no estimate, so it would still be made
            raise ConfigError(f"Budget(usd={usd!r}): a cap of $0 allows no call that costs anything, yet the first "
                              "call, whose price is not known before it, would still be made; give the dollars the "
                              "run may spend, or leave usd= out for no dollar cap")
        if self.usd is not None and self.step_estimate is not None and self.step_estimate > self.usd:
            raise ConfigError(f"Budget(usd={usd!r}, step_estimate={step_estimate!r}): every call is counted at "
                              f"{dollars(self.step_estimate)} before it is made, more than the whole "
                              f"{dollars(self.usd)} cap, so not one call could be made; give a step_estimate of "
                              "at most the cap (what one call may cost)")
        calls = None if iterations is None else whole(iterations)
        if iterations is not None and calls is None:
            raise ConfigError(f"Budget(iterations={iterations!r}): iterations must be a whole number >= 1")
        s(self, "iterations", calls)
        s(self, "wall_clock", None if wall_clock is None else parse_duration(wall_clock))
        s(self, "wall_clock_text", wall_clock if isinstance(wall_clock, str) and not _SECONDS.match(wall_clock.strip())
          else None)  # as it was given ('10m'), where it names its unit
        s(self, "unbounded_", _unbounded)
        if not _unbounded and usd is None and iterations is None and wall_clock is None:
            raise ConfigError("Budget() needs at least one cap: usd=, iterations= or wall_clock=; "
                              "write Budget.unbounded() to run with no cap at all")

    @classmethod
    def unbounded(cls) -> Budget:
        """No cap at all: the loop runs until a detector, a stall or an error stops it."""
        return cls(_unbounded=True)

    def fire(self, history: History, elapsed: float) -> str | None:
        if self.iterations is not None and len(history) >= self.iterations:
            return f"iterations: {len(history)} of {self.iterations} calls made" + (
                " (the default cap, loomc.DEFAULT_BUDGET: the loop was given no Budget)" if self is DEFAULT_BUDGET
                else "")
        if self.usd is not None:
            spent, largest, _, _, _, unknown, _ = history._summary()
            estimate = self.step_estimate if self.step_estimate is not None else largest
            # A failed call whose cost is unknown may have cost as much as any: it is counted at the estimate.
            if spent + (estimate * (unknown + 1) if unknown else estimate) > self.usd:
                if spent > self.usd:
                    return _past_cap(history, spent, self.usd)
                if unknown and estimate:
                    return _unknown_costs(history, spent, estimate, unknown, self.usd)
                return (f"usd: {dollars(spent)} spent + {dollars(estimate)} for the next step "
                        f"would pass the {dollars(self.usd)} cap")
            if spent >= self.usd and spent > 0:
                return f"usd: {dollars(spent)} spent of {dollars(self.usd)}"
        if self.wall_clock is not None:
            # Predictive like the USD cap: the next call is counted at the longest call so far.
            cap = self.wall_clock  # how it is said (wall_clock_said) is worked out only for a reason
            if elapsed >= cap:
                return _past_clock(history, elapsed, cap, self.wall_clock_said) or \
                    f"wall_clock: {took(elapsed)} active of the {self.wall_clock_said} cap"
            if elapsed + history.longest > cap:
                return (f"wall_clock: {took(elapsed)} active + {next_call_time(history)} would pass the "
                        f"{self.wall_clock_said} cap")
        return None

    @property
    def wall_clock_said(self) -> str:
        """The wall-clock cap as messages say it: as it was given (``10m``), else in seconds (``90s``)."""
        return self.wall_clock_text or f"{self.wall_clock:g}s"

    def active_against(self, seconds: float) -> str:
        """``Active: 8m00s of the 10m cap``: a run's active time against this wall-clock cap (loomc show, notebooks)."""
        return f"Active: {took(seconds)} of the {self.wall_clock_said} cap"

    def __repr__(self) -> str:
        if self.unbounded_:
            return "Budget.unbounded()"
        args = []
        if self.usd is not None:
            args.append(f"usd={float(self.usd)!r}")
        if self.iterations is not None:
            args.append(f"iterations={self.iterations}")
        if self.wall_clock is not None:
            args.append(f"wall_clock={self.wall_clock_text!r}" if self.wall_clock_text
                        else f"wall_clock={self.wall_clock:g}")
        if self.step_estimate is not None:
            args.append(f"step_estimate={float(self.step_estimate)!r}")
        return f"Budget({', '.join(args)})"


def _past_cap(history: History, spent: Decimal, cap: Decimal) -> str:
    """Why the spend went past the cap: the last step cost more than the room left before it.

    The cap is checked before each call, so the step that passed it is the last one; it either
    made several paid calls (checked by nobody inside the step) or cost more than the estimate.
    """
    said = f"usd: {dollars(spent)} spent, past the {dollars(cap)} cap"
    last = history[-1]
    room = cap - (spent - last.cost)
    if room < 0:  # already past it before (a replay of a smaller cap): nothing more to tell
        return said
    return (f"{said}: step {last.n} alone cost {dollars(last.cost)} with {dollars(room)} left. The cap is checked "
            "before each call of fn: inside one, check loomc.usd_left() before each paid call; "
            "Budget(step_estimate=) covers steps that grow")


def _past_clock(history: History, elapsed: float, cap: float, said: str) -> str | None:
    """Why the active time went past the cap (``said`` as given), when the last call took longer than any
    before it (the time the cap counted it at), so that it started with room for those and not for itself."""
    if not history or elapsed <= cap:
        return None
    last, before = history[-1], history.prefix(len(history) - 1).longest
    if last.duration <= before:
        return None  # the call took no longer than counted: the time past the cap is loomc's own
    if cut_at_deadline(last.error):
        return None  # an async call cancelled at the deadline: its error says so, and it did not go on past it
    return (f"wall_clock: {took(elapsed)} active, past the {said} cap: step {last.n} took "
            f"{took(last.duration)}{f' (calls before it took up to {took(before)})' if before else ''}; the cap is "
            "checked between calls of fn: inside one, ask loomc.time_left() before each slow call")


def _unknown_costs(history: History, spent: Decimal, estimate: Decimal, unknown: int, cap: Decimal) -> str:
    """Why the cap stops a run whose failed calls left their cost unknown, counted at the estimate (in
    under 200 characters for the usual amounts: ``loomc show`` cuts a reason there)."""
    unknown_steps = [s for s in history if s.error is not None and cost_unknown(s)]
    steps = [s.n for s in unknown_steps]
    died = sum(cut_short(s) and COST_UNKNOWN_METRIC not in s.metrics for s in unknown_steps)
    that = " or ".join(part for part in ("that cost_fn could not price" if died < len(steps) else "",
                                         "cut short before charging" if died else "") if part)
    where = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]} to {steps[-1]}" if len(steps) == (
        steps[-1] - steps[0] + 1) else f"the last, step {steps[-1]}"
    return (f"usd: {dollars(spent)} spent + {dollars(estimate)} for the next step would pass the {dollars(cap)} cap, "
            f"counting {counted(unknown, 'failed call')} ({where}) {that} at {dollars(estimate)}"
            f"{' each' if unknown > 1 else ''}; charge each paid call inside fn (loomc.charge)")


#: The cap a loop gets when it is given no budget: 100 calls of ``fn``.
DEFAULT_BUDGET = Budget(iterations=100)


#: Calls in a row cut short before they could report a cost (their process died, say), after which a
#: budget with no iteration cap stops the run: neither dollars nor active time can see them.
CUT_SHORT_IN_A_ROW = 3


@dataclass(frozen=True, repr=False)
class UnreportedSpend(Signal):
    """Caps that do not count calls hold only while the calls report what they spend.

    - After :data:`CUT_SHORT_IN_A_ROW` calls in a row cut short at $0 (a step that kills its process
      every time: neither its cost nor the time it ran is known), the run stops.
    - With ``calls`` (a cap in dollars alone), after that many calls that all reported $0 (a
      forgotten ``charge``), the run stops too, as a loop with no budget would. ``usd`` is that cap.

    Added to a run's policy when its budget has no ``iterations`` cap (and is no
    ``Budget.unbounded()``); a run whose calls report their cost is never stopped by it.
    """

    calls: int | None = None
    usd: Decimal | None = None

    kind = max_outcome = Outcome.BUDGET_EXHAUSTED

    def fire(self, history: History, elapsed: float) -> str | None:
        n = len(history)
        if n >= CUT_SHORT_IN_A_ROW and _died(history[-1]) \
                and all(_died(history[i]) for i in range(n - CUT_SHORT_IN_A_ROW, n - 1)):
            return (f"unreported_spend: the last {CUT_SHORT_IN_A_ROW} calls (steps {n - CUT_SHORT_IN_A_ROW} to "
                    f"{n - 1}) were cut short before they reported what they cost (their process died), so the "
                    "budget cannot tell what they spent, nor how long they ran; a step that kills its process "
                    "every time would be paid for once per restart. Give Budget(iterations=) to go on, and charge "
                    "right after each paid call (loomc.charge) so that such calls count")
        if self.calls is None or n < self.calls or history._summary()[0]:
            return None
        return (f"unreported_spend: {n} calls made, and not one reported what it cost, so the "
                f"{dollars(self.usd)} cap could not stop the run; it stops here, at the calls a loop with no "
                "budget makes. Report what fn spends (loomc.charge, cost_fn=, an adapter), or give "
                "Budget(iterations=) for more calls")

    def __repr__(self) -> str:
        return f"unreported_spend(calls={self.calls})" if self.calls is not None else "unreported_spend()"


def _died(step: Step) -> bool:
    """A call cut short at $0 whose running time is not known either: its process died in it. (One that a
    Ctrl-C or a cancellation cut short ran for a time the wall-clock cap counts, and was stopped by hand.)"""
    return cut_short(step) and not step.duration > 0


def with_unreported_spend(policy: Policy) -> Policy:
    """``policy`` as a run drives it: when no cap counts its calls, with the stop for calls whose spend goes
    unreported (see UnreportedSpend); else ``policy`` itself."""
    if _cap(policy, "iterations") is not None or any(
            isinstance(p, Budget) and p.unbounded_ for p in top_level(policy)):
        return policy
    usd = _cap(policy, "usd")
    if usd is not None and _cap(policy, "wall_clock") is None:
        return either(policy, UnreportedSpend(DEFAULT_BUDGET.iterations, usd))  # type: ignore[arg-type]
    return either(policy, UnreportedSpend())


@dataclass(frozen=True, repr=False)
class ParentCap(Signal):
    """The dollars a parent run's budget leaves for one child run (nested loops).

    Added to a child's policy when it starts inside a parent with a USD cap;
    predictive like ``Budget(usd=...)``, and its reason names the parent.

    ``usd`` is what the parent's budget left when the child started, plus what the child had
    spent before. While the parent's step runs, ``room_now()`` gives the parent's room at this
    moment, every sibling's committed spend counted, so children run side by side share one
    cap instead of each taking all of it. Once that step is over it gives ``None``, and ``usd``
    alone decides (as in a replay of the child's history).
    """

    parent: str
    usd: Decimal
    room_now: Callable[[], Decimal | None] | None = field(default=None, compare=False)

    kind = max_outcome = Outcome.BUDGET_EXHAUSTED

    def fire(self, history: History, elapsed: float) -> str | None:
        spent, largest, _, _, _, unknown, _ = history._summary()
        usd, room = self.usd, None if self.room_now is None else self.room_now()
        if room is not None:
            if room <= 0:
                return f"usd: the parent run {self.parent}'s budget has nothing left for this child"
            usd = min(usd, spent + room)  # the child's committed spend is in the parent's already
        if spent + largest * (unknown + 1) > usd or (spent >= usd and spent > 0):
            return (f"usd: the parent run {self.parent}'s budget leaves {dollars(usd)} for this child; "
                    f"{dollars(spent)} spent + {dollars(largest)} for the next step would pass it" +
                    (f", with {counted(unknown, 'failed call')} of unknown cost counted at {dollars(largest)}"
                     f"{' each' if unknown > 1 else ''}" if unknown and largest else ""))
        return None

    def __repr__(self) -> str:
        return f"parent_cap(run={self.parent!r}, usd={float(self.usd)!r})"


@dataclass(frozen=True, repr=False)
class ParentClock(Signal):
    """The wall-clock time a parent run's budget leaves for one child run (nested loops).

    Added to a child's policy when it starts inside a run with a wall-clock cap (or inside one
    nested in such a run). Before each of the child's calls, ``time_left()`` gives the active
    seconds left to the parent's step; the child stops when there are none. Once that step is
    over it gives ``None`` and never fires (a replay of the child's history has no parent clock).
    """

    parent: str
    time_left: Callable[[], float | None] = field(compare=False)

    kind = max_outcome = Outcome.BUDGET_EXHAUSTED

    def fire(self, history: History, elapsed: float) -> str | None:
        left = self.time_left()
        if left is None:
            return None
        if left <= 0:
            return f"wall_clock: the parent run {self.parent}'s wall-clock budget has no time left for this child"
        if history.longest > left:  # predictive, as Budget(wall_clock=) is
            return (f"wall_clock: the parent run {self.parent}'s wall-clock budget leaves {took(left)} for this "
                    f"child; {next_call_time(history)} would pass it")
        return None

    def __repr__(self) -> str:
        return f"parent_clock(run={self.parent!r})"


def budget_from_repr(text: str) -> Budget | None:
    """The Budget whose ``repr`` is ``text`` (as a run's notes record a raise), or None if it is not one."""
    import ast
    if text == "Budget.unbounded()":
        return Budget.unbounded()
    try:
        call = ast.parse(text, mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Budget"
                and not call.args):
            return None
        return Budget(**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg})
    except (SyntaxError, ValueError, TypeError):
        return None


def raised(budgets: Sequence[Budget], new: Budget) -> Budget:
    """The budget a resume runs under when given ``new``: its caps, and every cap it leaves out
    kept from ``budgets`` (the loop's own), so raising the dollars never lifts the iteration or
    time cap. ``Budget.unbounded()`` lifts them all."""
    if new.unbounded_:
        return new

    def kept(field: str, tightest: Any = min) -> Any:
        mine = getattr(new, field)
        if mine is not None:
            return mine
        found = [getattr(b, field) for b in budgets if getattr(b, field) is not None]
        return tightest(found) if found else None

    wall = kept("wall_clock")
    text = new.wall_clock_text if new.wall_clock is not None else \
        next((b.wall_clock_text for b in budgets if b.wall_clock == wall and b.wall_clock_text), None)
    return Budget(usd=kept("usd"), iterations=kept("iterations"), wall_clock=text or wall,
                  step_estimate=kept("step_estimate", max))


def _cap(policy: Any, field: str) -> Any:
    """The tightest top-level cap named ``field`` (``usd``, ``iterations``, ``wall_clock``), or ``None``.

    Only the parts of a ``|`` count: a cap inside ``&`` or ``~`` is a condition, not a cap.
    """
    caps = [getattr(p, field, None) for p in top_level(policy) if isinstance(p, (Budget, ParentCap))]
    found = [c for c in caps if c is not None]
    return min(found) if found else None


def top_level(policy: Any) -> tuple[Any, ...]:
    """The parts of ``policy``'s top ``|``: where a Budget is a cap (under ``&`` or ``~`` it is a condition)."""
    return policy.parts if isinstance(policy, (AnyOf, Policies)) else (policy,)


def wall_clock_budget(policy: Any) -> Budget | None:
    """The top-level Budget with the tightest wall-clock cap of ``policy`` (how that cap is said comes with it)."""
    budgets = [(p.wall_clock, i, p) for i, p in enumerate(top_level(policy))
               if isinstance(p, Budget) and p.wall_clock is not None]
    return min(budgets)[2] if budgets else None


def usd_cap(policy: Any) -> Decimal | None:
    """The tightest top-level USD cap of ``policy`` (a parent's cap on a child included)."""
    return _cap(policy, "usd")  # type: ignore[no-any-return]


def iteration_cap(policy: Any) -> int | None:
    return _cap(policy, "iterations")  # type: ignore[no-any-return]


def usd_room(policy: Any, history: History, pending: Decimal, held: Decimal = Decimal(0)) -> Decimal | None:
    """Dollars left under the tightest top-level USD cap of ``policy``, or ``None`` without one.

    ``pending`` is what the step in flight has spent so far. Each earlier call whose cost is unknown
    is counted at the estimate the cap counts it at, as it is before each call. A child run's room is
    also at most its parent's room at this moment, less that, plus ``held``: what the child itself
    holds of the parent's room for this step.
    """
    spent, largest, _, _, _, unknown, _ = history._summary()
    room: Decimal | None = None
    for part in top_level(policy):
        if isinstance(part, Budget) and part.usd is not None:
            estimate = largest if part.step_estimate is None else part.step_estimate
            limits: tuple[Decimal, ...] = (part.usd - spent,)
        elif isinstance(part, ParentCap):
            estimate, live = largest, None if part.room_now is None else part.room_now()
            limits = (part.usd - spent,) if live is None else (part.usd - spent, live + held)
        else:
            continue
        for limit in limits:
            left = limit - pending - estimate * unknown
            room = left if room is None or left < room else room
    return None if room is None else max(Decimal(0), room)
