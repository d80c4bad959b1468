"""Log lines on the standard ``logging`` logger named ``"loomc"``: a run starting or resuming, each
committed step, and why the run stopped.

Nothing is printed unless the program configures logging (``logging.basicConfig(level="INFO")``,
say): the logger has a ``NullHandler``. ``import loomc`` does not import ``logging``; a run looks at
the logger only if ``logging`` was imported by the time it starts, which any program that
configures logging has done. Whether INFO is on is read once, when a run starts: a run that does
not log its steps pays nothing per step for the feature.

Levels: the start, each step and a completed run at INFO; a run that stopped any other way
(budget exhausted, stalled, failed, cancelled) at WARNING.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any

from loomc.budget import usd_cap
from loomc.errors import counted, dollars, read_whole, shorten, took
from loomc.policy import name_of

if TYPE_CHECKING:
    from loomc.history import History, Step
    from loomc.runs import LiveRun

INFO, WARNING = 20, 30  # logging's levels, without importing logging
_logger: Any = None


def logger() -> Any:
    """The ``loomc`` logger, or ``None`` while ``logging`` has not been imported (then nobody set it up)."""
    global _logger
    if _logger is None:
        logging = sys.modules.get("logging")
        if logging is None:
            return None
        log = logging.getLogger("loomc")
        if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
            log.addHandler(logging.NullHandler())  # unconfigured: silent, not logging's last-resort stderr
        _logger = log
    return _logger


def run_opened(live: LiveRun) -> None:
    """Log that ``live`` starts (or resumes), and log its steps from now on if INFO is on."""
    log = logger()
    if log is None or not log.isEnabledFor(INFO):
        return
    h = live.history
    child = "" if live.parent is None else f", a child run of {live.parent.id} step {live.parent_step}"
    if live.resumed:
        log.info("run %s resumed at step %d (%s, %s spent before), policy %s%s",
                 live.id, len(h), counted(len(h), "step"), dollars(h.total_cost), live.policy, child)
    else:
        log.info("run %s started: %s, policy %s%s", live.id, name_of(live.fn), live.policy, child)
    live.on_step = (*live.on_step, partial(_step_line, log, live, usd_cap(live.policy)))


def _step_line(log: Any, live: LiveRun, cap: Decimal | None, step: Step) -> None:
    total = dollars(live.history.total_cost) + ("" if cap is None else f" of {dollars(cap)}")
    parts = [f"{dollars(step.cost)} (total {total}) in {took(step.duration)}"]
    if live.wall is not None:  # the time the run has had against its wall-clock cap, as the dollars
        parts[0] += f" ({took(live.elapsed(live.clock()))} active of the {live.wall.wall_clock_said} cap)"
    if step.score is not None:
        parts.append(f"score {step.score:.4g}")
    if step.error is not None:
        parts.append("error " + shorten(step.error, read_whole(live.id, live.store, step.n)))
    if step.events:
        parts.append(", ".join(step.events))
    log.info("run %s step %d: %s", live.id, step.n, "; ".join(parts))


def run_stopped(run_id: str, status: str, reason: str, history: History, store: Any) -> None:
    """Log why a run stopped: INFO if it completed, WARNING otherwise. ``store``: where the run is."""
    log = logger()
    level = INFO if status == "completed" else WARNING
    if log is None or not log.isEnabledFor(level):
        return
    log.log(level, "run %s stopped, %s: %s (%s, %s)", run_id, status.replace("_", " "),
            shorten(reason, read_whole(run_id, store)), counted(len(history), "step"),
            dollars(history.total_cost))
