"""Plots of runs with matplotlib (``pip install "loomc[notebook]"``), imported only when called.

``run.plot()`` draws the score and the cumulative cost per step against the budget line,
and marks backtracks, convergence, failures and stalls; ``plot_runs(a, b)`` puts several
runs on the same axes. Every function returns the matplotlib Figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loomc.errors import dollars
from loomc.history import History, running_costs

if TYPE_CHECKING:
    from loomc.runs import Run
    from loomc.notebook import Comparison

MARKS = {"backtrack": ("v", "tab:orange"), "converged": ("*", "tab:green"), "failed": ("x", "tab:red"),
         "stalled": ("s", "tab:purple"), "budget exhausted": ("D", "tab:brown")}


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "loomc[notebook]"') from None
    return plt


def _cumulative(history: History) -> list[float]:
    return [float(total) for total in running_costs(history)]


def _kind(step: Any) -> str | None:
    if not step.ok:
        return "failed"
    for event in step.events:
        for kind in MARKS:
            if event.startswith(kind):
                return kind
    return None


def plot_runs(*runs: Run, labels: list[str] | None = None, ax: Any = None) -> Any:
    """Score (left axis) and cumulative cost (right axis) per step, for one or more runs."""
    from loomc.budget import usd_cap
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4))
    else:
        fig = ax.figure
    cost_ax = ax.twinx()
    labels = labels or ([f"run {r.id}" for r in runs] if len(runs) > 1 else [""])
    for run, label in zip(runs, labels):
        h = run.history
        name = f"{label} " if label else ""
        scored = [(s.n, s.score) for s in h if s.scored]
        line, = ax.plot([n for n, _ in scored], [v for _, v in scored], marker=".", label=f"{name}score")
        cost_ax.plot([s.n for s in h], _cumulative(h), linestyle="--", color=line.get_color(),
                     label=f"{name}cumulative cost")
        cap = usd_cap(run.policy)
        if cap is not None:
            cost_ax.axhline(float(cap), color=line.get_color(), linestyle=":", label=f"{name}budget ${cap}")
        seen = set()
        for step in h:
            kind = _kind(step)
            if kind is None:
                continue
            marker, color = MARKS[kind]
            y = step.score if step.scored else 0.0
            ax.scatter([step.n], [y], marker=marker, color=color, s=80, zorder=3,
                       label=None if kind in seen else kind)
            seen.add(kind)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    cost_ax.set_ylabel("cumulative cost ($)")
    handles, names = ax.get_legend_handles_labels()
    more, more_names = cost_ax.get_legend_handles_labels()
    ax.legend(handles + more, names + more_names, loc="best", fontsize="small")
    return fig


def plot_comparison(comparison: Comparison, ax: Any = None) -> Any:
    """The recorded run's cumulative cost, with a vertical line where each policy would have stopped."""
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4))
    else:
        fig = ax.figure
    h = comparison.history
    ax.plot([s.n for s in h], _cumulative(h), color="black", label="recorded cumulative cost")
    for name, replay in comparison.replays:
        if replay.stopped_after is not None:
            ax.axvline(replay.stopped_after - 0.5, linestyle="--",
                       label=f"{name}: stop after {replay.stopped_after} ({dollars(replay.cost)})")
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative cost ($)")
    ax.legend(loc="best", fontsize="small")
    return fig
