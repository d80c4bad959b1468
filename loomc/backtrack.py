"""Backtrackers: where the loop carries on from after a regression or a failure,
and which state a stopped run returns.

    >>> policy = Budget(usd=2) | score_plateau(3) | BestScore()

- ``BestScore()``: when a step scores below the best so far (or fails), carry
  on from the best-scoring step's state; a stopped run returns the best state.
- ``LastGood()``: when a step fails, carry on from the last state that did not
  fail; a stopped run returns the last good state.

Both take ``wait=``: after a failed step, wait before the next call, twice as
long after each further failure in a row, up to ``max_wait`` (a rate-limited
API is not called again at once)::

    >>> LastGood(wait="2s", max_wait="5m")   # 2 s, 4 s, 8 s ... 256 s, then 300 s
    LastGood(wait='2s', max_wait='5m')

Both take ``on=``, the exceptions they go on from (an API's rate limit, a timeout); any
other exception fails the run at once, as without a backtracker, rather than spending one
call after another on a bug::

    >>> LastGood(on=(TimeoutError, ConnectionError))
    LastGood(on=(TimeoutError, ConnectionError))

Without a backtracker an exception in ``fn`` fails the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from loomc.budget import parse_duration
from loomc.errors import ConfigError
from loomc.history import History, Step
from loomc.policy import CONTINUE, Decision, Outcome, Role

Duration = str | float | timedelta | None
Failures = type[Exception] | tuple[type[Exception], ...] | None


class Backtracker(Role):
    """Base of the policies that choose where to carry on from."""

    __slots__ = ()
    role = "backtracker"
    max_outcome = Outcome.BACKTRACK
    wait: Duration
    max_wait: Duration
    on: Failures

    def __post_init__(self) -> None:
        name = type(self).__name__
        first = None if self.wait is None else parse_duration(self.wait, f"{name}: wait")
        most = parse_duration(self.max_wait, f"{name}: max_wait")
        if first is not None and first > most:  # every wait would be cut to max_wait, the first included
            default = " (its default)" if self.max_wait == "1m" else ""
            raise ConfigError(f"{name}(wait={self.wait!r}): the waits grow up to max_wait={self.max_wait!r}{default}, "
                              f"which is shorter than the first, so each would be cut to it; give a longer "
                              f"max_wait, as in {name}(wait={self.wait!r}, max_wait={first * 8:g}) for waits "
                              "that grow three times")
        object.__setattr__(self, "_first_wait", first)
        object.__setattr__(self, "_most_wait", most)
        kinds = None if self.on is None else self.on if isinstance(self.on, tuple) else (self.on,)
        if kinds is not None and (not kinds or not all(isinstance(k, type) and issubclass(k, Exception)
                                                        for k in kinds)):
            raise ConfigError(f"{name}: on={self.on!r}: give the Exception classes it goes on from, as in "
                              f"{name}(on=(TimeoutError, ConnectionError)), or leave on= out to go on from every "
                              "failure (a KeyboardInterrupt or a cancellation always stops the run)")
        object.__setattr__(self, "_on", kinds)

    def goes_on_from(self, exc: BaseException) -> bool:
        """Whether a failure with ``exc`` is one this backtracker carries on from (``on=``)."""
        kinds: tuple[type[Exception], ...] | None = self._on  # type: ignore[attr-defined]
        return kinds is None or isinstance(exc, kinds)

    def _back(self, to: Step | None, why: str, history: History | None = None) -> Decision:
        """Back to ``to``; after a failure (``history`` given) with the backoff's wait, if there is one."""
        first: float | None = self._first_wait  # type: ignore[attr-defined]
        wait = 0.0
        if first is not None and history is not None:
            failed = 0  # failed steps in a row at the end of the history
            for step in reversed(history):
                if step.ok:
                    break
                failed += 1
            wait = min(self._most_wait, first * 2.0 ** min(failed - 1, 64))  # type: ignore[attr-defined]
        return Decision(Outcome.BACKTRACK, why, None if to is None else to.n, by=repr(self), wait=wait)

    def _args(self) -> str:
        args = []
        if self.wait is not None:
            args.append(f"wait={self.wait!r}" + ("" if self.max_wait == "1m" else f", max_wait={self.max_wait!r}"))
        if self._on is not None:  # type: ignore[attr-defined]
            names = ", ".join(k.__qualname__ for k in self._on)  # type: ignore[attr-defined]
            args.append(f"on=({names}{',' if len(self._on) == 1 else ''})")  # type: ignore[attr-defined]
        return ", ".join(args)


@dataclass(frozen=True, repr=False)
class BestScore(Backtracker):
    """Carry on from the best-scoring step after a regression; return the best state on a stop.

    Ties keep the earliest step; NaN never counts as best.
    """

    wait: Duration = None
    max_wait: Duration = "1m"
    on: Failures = None
    needs_score = True

    def decide(self, history: History, elapsed: float = 0.0) -> Decision:
        try:
            last = history[-1]
        except IndexError:  # an empty history
            return CONTINUE
        best = history.best
        if not last.ok:
            to = best if best is not None else history.last_good
            return self._back(to, f"step {last.n} failed ({last.error})", history)
        if last.score is None or best is None or best is last:
            return CONTINUE
        if not last.scored or last.score < best.score:  # type: ignore[operator]
            return self._back(best, f"step {last.n} scored {last.score:g}, below step {best.n}'s {best.score:g}")
        return CONTINUE

    def choose_state_step(self, history: History) -> Step | None:
        return history.best or history.last_good

    def __repr__(self) -> str:
        return f"BestScore({self._args()})"


@dataclass(frozen=True, repr=False)
class LastGood(Backtracker):
    """Carry on from the last state that did not fail; the failure still counts against the budget."""

    wait: Duration = None
    max_wait: Duration = "1m"
    on: Failures = None

    def decide(self, history: History, elapsed: float = 0.0) -> Decision:
        if not history or history[-1].ok:
            return CONTINUE
        last = history[-1]
        return self._back(history.last_good, f"step {last.n} failed ({last.error})", history)

    def choose_state_step(self, history: History) -> Step | None:
        return history.last_good

    def __repr__(self) -> str:
        return f"LastGood({self._args()})"
