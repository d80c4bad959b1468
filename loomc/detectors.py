"""Convergence detectors: signals that say the loop is done.

    >>> converge = score_plateau(patience=3) | predicate(lambda h: (h[-1].score or 0) >= 1.0)

Detectors are pure: each reads the history (and the metrics the edge recorded
on its steps), never a model or the clock, so a recorded run can be replayed
against any detector.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loomc.errors import (COST_ITEMS_METRIC, TOKENS_METRIC, TRACEBACK_METRIC, ConfigError, counted, short_repr,
                          warn_at_caller)
from loomc.history import History, Step
from loomc.policy import (Outcome, Probe, Signal, builds_policy, check_one_argument, is_true, name_of, predicate,
                          real, whole)

__all__ = ["score_plateau", "ScorePlateau", "predicate", "judge", "Judge", "clear_yes", "HedgedVerdictWarning"]

# Differences this close to min_delta are float noise: 0.8 - 0.7 is not "more than 0.1".
_NOISE = 1e-9


_START: tuple[float | None, int] = (None, 0)
_NO_SCORE = -math.inf


@dataclass(frozen=True, repr=False)
class ScorePlateau(Signal):
    """Fires when the score has not improved by more than ``min_delta`` for ``patience`` scored steps.

    The reference is the last score that counted as an improvement (the first
    scored step is one), so slow but steady progress still resets the count.
    An improvement of exactly ``min_delta`` is not one. A NaN score counts as
    a step without improvement and never becomes the reference. Failed and
    unscored steps are not counted.
    """

    patience: int = 3
    min_delta: float = 0.01
    _key: tuple[str, int, float] = field(init=False, repr=False, compare=False)

    kind = Outcome.CONVERGED
    needs_score = True

    def __post_init__(self) -> None:
        patience = whole(self.patience)
        if patience is None:
            raise ConfigError(f"score_plateau(patience={self.patience!r}): patience must be a whole number >= 1")
        delta = real(self.min_delta)
        if delta is None or not math.isfinite(delta) or delta < 0:
            raise ConfigError(f"score_plateau(min_delta={self.min_delta!r}): min_delta must be a finite number >= 0")
        # Python numbers, numpy's too (a sweep's DataFrame): their repr is the policy's.
        object.__setattr__(self, "patience", patience)
        object.__setattr__(self, "min_delta", delta)
        # The fold's memo key, hashed once: the dataclass hash is Python code, run on every step.
        object.__setattr__(self, "_key", ("loomc.plateau", self.patience, float(self.min_delta)))

    def _count(self, acc: tuple[float | None, int], step: Step) -> tuple[float | None, int]:
        ref, wait = acc
        score = step.score
        if score is None or not step.ok:
            return acc
        if math.isnan(score):
            return ref, wait + 1
        if ref is None or (score - ref) - self.min_delta > _NOISE * max(1.0, abs(ref)) \
                or ref == _NO_SCORE < score:  # -inf's noise margin is infinite: anything above it counts
            return score, 0
        return ref, wait + 1

    def fire(self, history: History, elapsed: float) -> str | None:
        ref, wait = history.fold(self._key, self._count, _START)
        if wait >= self.patience:
            if ref is None:  # only NaN so far: no score to improve on
                return f"score_plateau: the scorer gave NaN for {counted(wait, 'scored step')}, and no valid score"
            return (f"score_plateau: no improvement above {ref:g} by more than {self.min_delta:g} in "
                    f"{counted(wait, 'scored step')}")
        return None

    def __repr__(self) -> str:
        return f"score_plateau(patience={self.patience}, min_delta={self.min_delta:g})"


@builds_policy('score_plateau(patience=3)')
def score_plateau(patience: int = 3, min_delta: float = 0.01) -> ScorePlateau:
    """Converged when ``patience`` scored steps in a row brought no gain above ``min_delta``."""
    return ScorePlateau(patience, min_delta)


_YES = {"yes", "y", "true", "done", "pass", "passed", "converged"}
_AROUND = "*_#>`\"' \t\n"  # markdown's emphasis, headings and quotes, quotes and spaces around a verdict
_SENTENCE_END = re.compile(r"[.!\n]")
_WORD = re.compile(r"[a-z]+")


def clear_yes(verdict: Any) -> bool:
    """True for ``True`` or a clear yes: a yes alone or as the reply's first sentence (``"Yes."``, ``"YES"``,
    ``"**Yes**"``, ``"Yes. The tests pass"``); anything else is no, ``"yes, but..."`` included.

    >>> clear_yes(True), clear_yes("Yes."), clear_yes("**Yes**"), clear_yes("yes, but..."), clear_yes(1)
    (True, True, True, False, False)
    """
    if is_true(verdict):
        return True
    if isinstance(verdict, str):
        return _first_sentence(verdict).strip(_AROUND) in _YES
    return False


def _first_sentence(text: str) -> str:
    """A reply's first sentence (or line), lower-cased, after the markdown and quotes it starts with."""
    return _SENTENCE_END.split(text.lstrip(_AROUND), maxsplit=1)[0].lower()


class HedgedVerdictWarning(UserWarning):
    """A judge answered with a yes that goes on in its sentence ("Yes, but...") or ends it ("Answer: yes"), which
    counts as a no."""


def _recorded(verdict: Any, probe: JudgeProbe) -> bool | None:
    """A verdict as the step records it: yes or no, or ``None`` for a judge that gave none (a no, told once).
    A hedged yes (a no) is told once per drive of the run."""
    if verdict is None:
        return None
    yes = clear_yes(verdict)
    if not yes and isinstance(verdict, str):
        # A yes that goes on in its sentence ("Yes, but ..."), or ends one ("Answer: yes"): a no, and told.
        words = _WORD.findall(_first_sentence(verdict))
        if words and (words[0] in _YES or words[-1] == "yes"):
            _tell_hedged(probe, verdict)
    return yes


def _tell_hedged(probe: JudgeProbe, verdict: str) -> None:
    """Tell of a hedged yes once per drive of the run, once its step is committed (a warning turned into an error
    then stops the run and loses nothing)."""
    from loomc.context import current_run
    run, key = current_run(), f"hedged {probe.name}"
    if run is not None:
        if key in run.told:
            return
        run.told.add(key)
    where = "" if run is None else f" of run {run.id} for step {run.in_flight}"
    told = (f"loomc: {probe!r}{where} answered {short_repr(verdict)}, which counts as a no: a yes counts only alone "
            "or as the reply's first sentence ('Yes.', '**Yes**', 'Yes. The tests pass'), so that a 'yes, but ...' is "
            "never taken for one. Ask for one word ('Answer with one word: yes or no'), or return True from the "
            "judge. (Told once per run.)")
    if run is None:
        warn_at_caller(told, HedgedVerdictWarning)
    else:
        run.tell_after_commit(told, HedgedVerdictWarning)


#: A step records which judge gave the verdict under a name (``loomc.judged_by.judge: judge(grader)``), so that
#: a replay of another judge of that name does not take it for its own.
JUDGED_BY = "loomc.judged_by."


def judged_by(judge_fn: Callable[[Any], Any]) -> str:
    """Which judge a verdict came from: the judge as written, and what an adapter's judge asks (its prompt, as a
    digest), since two prompts to one model are two judges."""
    return f"judge({name_of(judge_fn)}){getattr(judge_fn, 'loomc_asks', '')}"


@dataclass(frozen=True, repr=False)
class JudgeProbe(Probe):
    name: str
    judge_fn: Callable[[Any], Any]

    def measure(self, state: Any, history: History) -> Any:
        verdict = self.judge_fn(state)
        if inspect.isawaitable(verdict):
            return self._later(verdict)
        return {self.name: _recorded(verdict, self), JUDGED_BY + self.name: judged_by(self.judge_fn)}

    async def _later(self, verdict: Awaitable[Any]) -> dict[str, Any]:
        return {self.name: _recorded(await verdict, self), JUDGED_BY + self.name: judged_by(self.judge_fn)}

    def __repr__(self) -> str:  # what a failure names: "raised by judge(is_done), after fn returned"
        return f"judge({name_of(self.judge_fn)})"

    def needs_async(self) -> str | None:
        return f"{self!r} is an async def" if inspect.iscoroutinefunction(self.judge_fn) else None


@dataclass(frozen=True, repr=False)
class Judge(Signal):
    """Converged when the judge said yes about the last step's state.

    The verdict is taken at the edge, once per step where the policy would read it
    (see :func:`loomc.policy.consulted`), and recorded in the step's metrics under
    ``name``; the detector only reads it, so a resume or a replay never asks the
    judge again. A judge that raises fails that step (its state is
    kept), visibly.
    """

    judge_fn: Callable[[Any], Any]
    name: str = "judge"

    kind = Outcome.CONVERGED

    def probes(self) -> tuple[Probe, ...]:
        return (JudgeProbe(self.name, self.judge_fn),)

    def measured(self) -> tuple[str, str]:
        return self.name, "verdict"

    def reads(self, metrics: Mapping[str, Any]) -> bool:
        """Whether ``metrics`` hold this judge's verdict: one under its name, given by it. A replay of another judge
        of the same name (a cheaper model's, say) read the recorded judge's verdicts as its own."""
        by = metrics.get(JUDGED_BY + self.name)  # None: recorded by a loomc that did not say
        return self.name in metrics and (by is None or by == judged_by(self.judge_fn))

    def fire(self, history: History, elapsed: float) -> str | None:
        if history and history[-1].metrics.get(self.name) is True and self.reads(history[-1].metrics):
            return f"{self!r} said yes"
        return None

    __repr__ = JudgeProbe.__repr__  # the judge and the probe that asks it are written alike


# loomc's own step metrics, which a judge's name must not be: its verdict would overwrite one, or it the verdict.
_OWN_METRICS = frozenset({COST_ITEMS_METRIC, TOKENS_METRIC, TRACEBACK_METRIC})


@builds_policy('judge(lambda state: ask_grader(state))')
def judge(judge_fn: Callable[[Any], Any], *, name: str = "judge") -> Judge:
    """Converged when ``judge_fn(state)`` returns True or a clear yes (sync or async).

    >>> done = judge(lambda state: "yes" if state["tests_pass"] else "no")
    """
    if not callable(judge_fn):
        raise ConfigError(f"judge() takes a function judge_fn(state) -> bool, got {judge_fn!r}")
    check_one_argument(judge_fn, "judge_fn(state)")
    if not isinstance(name, str) or not name or name in _OWN_METRICS or name.startswith(("loomc.", "semantic_delta")):
        # The verdict is step.metrics[name]: one of loomc's own metrics there would be overwritten, or overwrite it.
        raise ConfigError(f"judge(name={name!r}): the verdict is recorded as step.metrics[name], so name it with a "
                          f"non-empty str that is none of loomc's own metrics ({', '.join(sorted(_OWN_METRICS))}, "
                          "semantic_delta, loomc.*), as in name='complete'")
    return Judge(judge_fn, name)
