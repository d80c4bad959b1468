"""Stall handlers: give up on a loop that keeps failing or going nowhere.

``Escalate(after=3)`` ends the run as ``stalled`` and raises
:class:`~loomc.errors.StallError` once ``after`` steps in a row each failed or
scored no better than the best score before them. A step that succeeded with
no score resets the count (there is nothing to compare), so without a scorer
``Escalate`` counts consecutive failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loomc.errors import ConfigError, counted
from loomc.history import History, Step, outside_call
from loomc.policy import CONTINUE, Decision, Outcome, Role, whole


_START: tuple[float | None, int] = (None, 0)


@dataclass(frozen=True, repr=False)
class Escalate(Role):
    """Stop as ``stalled`` after ``after`` consecutive failed or non-improving steps."""

    after: int = 3

    role = "stall handler"
    max_outcome = Outcome.STALLED

    def __post_init__(self) -> None:
        after = whole(self.after)
        if after is None:
            raise ConfigError(f"Escalate(after={self.after!r}): after must be a whole number >= 1")
        object.__setattr__(self, "after", after)  # an int, numpy's too: its repr is the policy's

    @staticmethod
    def _count(acc: tuple[float | None, int], step: Step) -> tuple[float | None, int]:
        best, run = acc
        if not step.ok:
            # A call cut short from outside (its process died, a Ctrl-C, a cancelled task), or whose result the
            # store refused, says nothing of whether the loop is going anywhere: it leaves the count as it was.
            return (best, run) if outside_call(step) else (best, run + 1)
        if step.score is None:
            return best, 0
        if math.isnan(step.score):
            return best, run + 1
        if best is None or step.score > best:
            return step.score, 0
        return best, run + 1

    def decide(self, history: History, elapsed: float = 0.0) -> Decision:
        _, run = history.fold("loomc.escalate", self._count, _START)
        if run >= self.after:
            return Decision(Outcome.STALLED,
                            f"Escalate: {counted(run, 'step')} in a row failed or did not beat the best score",
                            by=repr(self))
        return CONTINUE

    def __repr__(self) -> str:
        return f"Escalate(after={self.after})"
