"""Backtrackers: where the loop carries on from after a regression or a failure,
and which state a stopped run returns.

    >>> policy = Budget(usd=2) | score_plateau(3) | BestScore()

- ``BestScore()``: when a step scores below the best so far (or fails), carry
  on from the best-scoring step's state; a stopped run returns the best state.
- ``LastGood()``: when a step fails, carry on from the last state that did not
  fail; a stopped run returns the last good state.

Without a backtracker an exception in ``fn`` fails the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from loomc.history import History, Step
from loomc.policy import CONTINUE, Decision, Outcome, Role


class Backtracker(Role):
    """Base of the policies that choose where to carry on from."""

    __slots__ = ()
    role = "backtracker"
    max_outcome = Outcome.BACKTRACK

    def _back(self, to: Step | None, why: str) -> Decision:
        return Decision(Outcome.BACKTRACK, why, None if to is None else to.n, by=repr(self))


@dataclass(frozen=True, repr=False)
class BestScore(Backtracker):
    """Carry on from the best-scoring step after a regression; return the best state on a stop.

    Ties keep the earliest step; NaN never counts as best.
    """

    needs_score = True

    def decide(self, history: History, elapsed: float = 0.0) -> Decision:
        try:
            last = history[-1]
        except IndexError:  # an empty history
            return CONTINUE
        best = history.best
        if not last.ok:
            to = best if best is not None else history.last_good
            return self._back(to, f"step {last.n} failed ({last.error})")
        if last.score is None or best is None or best is last:
            return CONTINUE
        if not last.scored or last.score < best.score:  # type: ignore[operator]
            return self._back(best, f"step {last.n} scored {last.score:g}, below step {best.n}'s {best.score:g}")
        return CONTINUE

    def choose_state_step(self, history: History) -> Step | None:
        return history.best or history.last_good

    def __repr__(self) -> str:
        return "BestScore()"


@dataclass(frozen=True, repr=False)
class LastGood(Backtracker):
    """Carry on from the last state that did not fail; the failure still counts against the budget."""

    def decide(self, history: History, elapsed: float = 0.0) -> Decision:
        if not history or history[-1].ok:
            return CONTINUE
        last = history[-1]
        return self._back(history.last_good, f"step {last.n} failed ({last.error})")

    def choose_state_step(self, history: History) -> Step | None:
        return history.last_good

    def __repr__(self) -> str:
        return "LastGood()"
