"""Jupyter: rich display of runs and policies, "what if" replays side by side, and progress bars.

Every piece of text that came from a state, an error or a policy is HTML-escaped:
an LLM's output can never inject markup into the notebook.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loomc.budget import iteration_cap, usd_cap, wall_clock_budget
from loomc.errors import COST_UNKNOWN_METRIC, counted, dollars, short_repr, took
from loomc.history import History, Step, running_costs, spend_by_item
from loomc.policy import AllOf, AnyOf, Not, Policies, Policy, Replay, as_policy

if TYPE_CHECKING:
    from loomc.runs import Run

MAX_ROWS = 40  # longer runs show their first and last 20 steps


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def steps_table(history: History) -> str:
    """An HTML table of the steps: cost, cumulative cost, score, how long the call took, error (where it was
    raised on hovering) and events."""
    rows = []
    shown = range(len(history)) if len(history) <= MAX_ROWS else \
        [*range(MAX_ROWS // 2), -1, *range(len(history) - MAX_ROWS // 2, len(history))]
    cumulative = list(running_costs(history))
    for i in shown:
        if i == -1:
            rows.append(f'<tr><td colspan="7">... {len(history) - MAX_ROWS} more steps ...</td></tr>')
            continue
        s = history[i]
        score = "-" if s.score is None else f"{s.score:.4f}"
        where = s.traceback  # shown on hovering over the error
        error = f'<td title="{esc(where)}">' if where else "<td>"
        rows.append(f"<tr><td>{s.n}</td><td>{dollars(s.cost)}</td><td>{dollars(cumulative[i])}</td><td>{score}</td>"
                    f"<td>{took(s.duration)}</td>{error}{esc(s.error or '')}</td>"
                    f"<td>{esc(', '.join(_marks(s)))}</td></tr>")
    return ("<table><thead><tr><th>step</th><th>cost</th><th>cumulative</th><th>score</th><th>time</th>"
            f"<th>error</th><th>events</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _marks(step: Step) -> tuple[str, ...]:
    """A step's events, and ``cost unknown`` where its $0 is not what its call cost (cost_fn could not price it)."""
    return (*step.events, "cost unknown") if COST_UNKNOWN_METRIC in step.metrics else step.events


def run_html(run: Run) -> str:
    cap = usd_cap(run.policy)
    spent = dollars(run.total_cost) + (f" of {dollars(cap)}" if cap is not None else "")
    wall = wall_clock_budget(run.policy)  # under a wall-clock cap, the time the run has had against it
    active = "" if wall is None else f"<p>{esc(wall.active_against(run.active_seconds))}</p>"
    return (f'<div class="loomc-run"><p><b>Run</b> <code>{esc(run.id)}</code> &middot; <b>{esc(run.status)}</b>'
            f" &middot; {counted(len(run.history), 'step')} &middot; {spent}</p>"
            f"<p>Stopped: {esc(run.reason)}</p>{active}{_items(run.history)}"
            f"<p>Policy: <code>{esc(repr(run.policy))}</code></p>"
            f"<p>State: <code>{esc(short_repr(run.state, 300))}</code></p>"
            f"{steps_table(run.history)}</div>")


def _items(history: History) -> str:
    items = spend_by_item(history)
    return f"<p>By item: {esc(items)}</p>" if items else ""


def policy_html(policy: Policy) -> str:
    """The structure of a policy as nested lists: either (|), both (&), not (~), and the leaves."""
    def node(p: Policy) -> str:
        if isinstance(p, (AnyOf, Policies)):
            return f"<li>either (|)<ul>{''.join(node(c) for c in p.parts)}</ul></li>"
        if isinstance(p, AllOf):
            return f"<li>both (&amp;)<ul>{''.join(node(c) for c in p.parts)}</ul></li>"
        if isinstance(p, Not):
            return f"<li>not (~)<ul>{node(p.inner)}</ul></li>"
        return f"<li><code>{esc(repr(p))}</code></li>"
    return f'<ul class="loomc-policy">{node(policy)}</ul>'


@dataclass(frozen=True)
class Comparison:
    """Several policies replayed on one recorded history: where each would have stopped, at what cost."""

    history: History
    replays: tuple[tuple[str, Replay], ...]

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        out = []
        for name, r in self.replays:
            stop = "-" if r.stopped_after is None else str(r.stopped_after)
            outcome = "runs on" if r.stopped_after is None else r.decision.outcome.name.lower()
            # Its "runs on" may be no answer of a judge, semantic_delta or plateau: the run never measured them.
            untaken = (f"{names}: {short}" for names, _, short in r.untaken())
            why = "; ".join(filter(None, [r.decision.reason, *untaken]))
            out.append((name, stop, dollars(r.cost), outcome, why))
        return out

    def __str__(self) -> str:
        head = ("POLICY", "STEPS", "COST", "OUTCOME", "WHY")
        rows = [head, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows).rstrip()

    def _repr_html_(self) -> str:
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in self.rows())
        return (f"<p>{len(self.history)} recorded steps, {dollars(self.history.total_cost)}</p><table><thead><tr>"
                "<th>policy</th><th>steps</th><th>cost</th><th>outcome</th><th>why</th></tr></thead>"
                f"<tbody>{body}</tbody></table>")

    def plot(self, ax: Any = None) -> Any:
        from loomc.plots import plot_comparison
        return plot_comparison(self, ax=ax)


def compare(history: History | Run, policies: Mapping[str, Any] | Iterable[Any]) -> Comparison:
    """Replay each policy on a recorded history (or Run) and line up the answers.

    >>> compare(run, {"plateau 3": score_plateau(3), "plateau 5": score_plateau(5)})  # doctest: +SKIP
    """
    h = history if isinstance(history, History) else history.history
    named = policies.items() if isinstance(policies, Mapping) else ((repr(as_policy(p)), p) for p in policies)
    return Comparison(h, tuple((name, as_policy(p).replay(h)) for name, p in named))


def in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


_NEEDS_TQDM = 'progress=True needs tqdm: pip install "loomc[notebook]"'


def check_tqdm() -> None:
    """ImportError now, when a loop asks for a progress bar, if tqdm is not installed (found, not imported)."""
    import importlib.util
    if importlib.util.find_spec("tqdm") is None:
        raise ImportError(_NEEDS_TQDM)


class Progress:
    """A tqdm bar for one run: steps against the iteration cap, spend against the USD cap,
    the best score so far and the last event. Shown on a terminal or in a notebook only,
    unless ``always`` is set."""

    def __init__(self, policy: Policy, always: bool = False, file: Any = None, history: History | None = None) -> None:
        """``history`` holds the steps already taken (a resumed run): the bar starts from them."""
        self.cap = usd_cap(policy)
        total = iteration_cap(policy)
        stream = file if file is not None else sys.stderr
        show = always or in_notebook() or bool(getattr(stream, "isatty", lambda: False)())
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError(_NEEDS_TQDM) from None
        done = history if history is not None else History()
        self.bar = tqdm(total=total, initial=len(done), disable=not show, file=stream, unit="step",
                        desc="loomc", leave=True)
        best = done.best
        self.spent, self.best = done.total_cost, None if best is None else best.score
        self.event = ""

    def __call__(self, step: Step) -> None:
        self.spent += step.cost
        if step.scored and (self.best is None or step.score > self.best):  # type: ignore[operator]
            self.best = step.score
        if step.events:
            self.event = step.events[-1]
        spent = dollars(self.spent) + (f"/{dollars(self.cap)}" if self.cap is not None else "")
        best = "-" if self.best is None else f"{self.best:.3f}"
        self.bar.set_postfix_str(f"{spent} best {best}" + (f" {self.event}" if self.event else ""), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
