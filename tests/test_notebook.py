"""Jupyter: HTML that escapes hostile text, plots, progress, live steps, and "what if" replays."""

from __future__ import annotations

import asyncio
import dataclasses
import html
import re
import io
from decimal import Decimal

import matplotlib
import pytest

from loomc import (BestScore, Budget, BudgetExhausted, LastGood, SQLiteStore, compare, load_history, loop, predicate,
                   score_plateau)
from loomc.notebook import Progress
from loomc.export import history_from_export

matplotlib.use("Agg")

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def climb(scores):
    it = iter(scores)
    return lambda state: {"score": next(it), "note": HOSTILE}


def test_run_html_escapes_states_errors_and_policy_text():
    calls = {"n": 0}

    def fn(state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError(HOSTILE)
        return {"note": HOSTILE}

    run = loop(budget=Budget(usd=1, iterations=3), backtrack=LastGood(), cost_fn=lambda s: 0.1,
               checkpoint="memory")(fn).run({})
    page = run._repr_html_()
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "$0.2000 of $1.0000" in page
    assert page.count("&lt;script&gt;") == 3, "in the error, in where it was raised, and in the state"
    where = html.escape(run.history[1].traceback, quote=True)
    assert f'<td title="{where}">ValueError: &lt;script&gt;' in page and "raise ValueError(HOSTILE)" in where
    assert "ValueError" in page and "backtrack to step 0" in page and run.reason in page
    policy_page = (Budget(usd=1) | score_plateau(3) | (predicate(lambda h: True) & ~score_plateau(5)))._repr_html_()
    assert "either (|)" in policy_page and "both (&amp;)" in policy_page and "not (~)" in policy_page
    assert "&lt;lambda&gt;" in policy_page and "<lambda>" not in policy_page


def test_run_html_says_what_the_run_spent_on_each_line_item():
    import loomc

    def fn(state):
        loomc.charge(0.03, HOSTILE)
        loomc.charge(0.01, "judge")
        return state + 1

    run = loop(budget=Budget(usd=1, iterations=2), cost_fn=lambda s: 0.005, checkpoint="memory")(fn).run(0)
    page = run._repr_html_()
    assert f"<p>By item: {html.escape(HOSTILE)} $0.0600 in 2 steps; judge $0.0200 in 2 steps; the rest $0.0100</p>" \
        in page and "<script>" not in page
    plain = loop(budget=Budget(iterations=1), cost_fn=lambda s: 0.005, checkpoint="memory")(lambda s: s + 1).run(0)
    assert "By item" not in plain._repr_html_()


def test_a_run_under_a_wall_clock_cap_shows_its_active_time_against_the_cap_as_loomc_show_does(tmp_path):
    from conftest import FakeClock
    clock = FakeClock()
    slow = loop(policy=Budget(wall_clock="1h") | Budget(wall_clock="10m", iterations=2), clock=clock,
                checkpoint=str(tmp_path / "w.db"))(lambda s: clock.advance(150) or s + 1)
    run = slow.run(0, run_id="w")
    assert run.active_seconds == 300 and "<p>Active: 5m00s of the 10m cap</p>" in run._repr_html_()
    clock.advance(3600)  # down time: not active
    more = slow.resume_run("w", budget=Budget(wall_clock="10m", iterations=3))
    assert more.active_seconds == 450 and "<p>Active: 7m30s of the 10m cap</p>" in more._repr_html_()
    done = loop(budget=Budget(iterations=1), checkpoint="memory")(lambda s: s + 1).run(0)
    assert done.active_seconds >= 0 and "Active:" not in done._repr_html_()  # no wall-clock cap: no line


def test_the_steps_table_says_how_long_each_call_took():
    import time

    def fn(state):
        time.sleep(0.2 if state == 1 else 0)
        return state + 1

    page = loop(budget=Budget(iterations=3), checkpoint="memory")(fn).run(0)._repr_html_()
    assert "<th>score</th><th>time</th><th>error</th>" in page
    took = re.findall(r"<tr><td>(\d+)</td>(?:<td>[^<]*</td>){3}<td>([^<]*)</td>", page)
    assert [n for n, _ in took] == ["0", "1", "2"]
    assert 0.2 <= float(took[1][1].rstrip("s")) < 5 and all(float(t.rstrip("s")) < 0.2 for _, t in took[::2])


def test_loomc_prints_dollars_and_times_as_its_docstrings_say():
    import doctest
    from loomc import errors
    result = doctest.testmod(errors)
    assert result.attempted >= 2 and result.failed == 0


def test_long_runs_show_their_first_and_last_steps():
    run = loop(budget=Budget(iterations=100), checkpoint="memory")(lambda s: s + 1).run(0)
    page = run._repr_html_()
    assert "... 60 more steps ..." in page and "<td>99</td>" in page and "<td>50</td>" not in page


def test_plot_returns_a_figure_with_score_cost_budget_and_event_marks():
    fn = climb([0.2, 0.5, 0.3, 0.6, 0.6, 0.6, 0.6])
    run = loop(budget=Budget(usd=2), converge_on=score_plateau(3), backtrack=BestScore(),
               scorer=lambda s: s["score"], cost_fn=lambda s: 0.25, checkpoint="memory")(fn).run({})
    fig = run.plot()
    score_ax, cost_ax = fig.axes
    assert [line.get_label() for line in score_ax.lines] == ["score"]
    assert list(score_ax.lines[0].get_ydata()) == [0.2, 0.5, 0.3, 0.6, 0.6, 0.6, 0.6]
    cost_labels = [line.get_label() for line in cost_ax.lines]
    assert cost_labels == ["cumulative cost", "budget $2"]
    assert list(cost_ax.lines[0].get_ydata())[-1] == pytest.approx(1.75)
    marks = {c.get_label() for c in score_ax.collections}
    assert {"backtrack", "converged"} <= marks


def test_two_runs_on_one_axes_in_one_call():
    a = loop(budget=Budget(iterations=3), scorer=lambda s: s, checkpoint="memory")(lambda s: s + 0.1).run(0.0)
    b = loop(budget=Budget(iterations=5), scorer=lambda s: s, checkpoint="memory")(lambda s: s + 0.2).run(0.0)
    fig = a.plot(b, labels=["slow", "fast"])
    assert [line.get_label() for line in fig.axes[0].lines] == ["slow score", "fast score"]
    assert len(fig.axes[0].lines[1].get_xdata()) == 5


def test_progress_is_silent_when_output_is_not_a_terminal(capsys):
    runner = loop(budget=Budget(iterations=5), progress=True, checkpoint="memory")(lambda s: s + 1)
    assert runner.run(0).state == 5
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_shows_steps_spend_best_score_and_last_event_when_asked():
    stream = io.StringIO()
    bar = Progress(Budget(usd=1, iterations=4) | BestScore(), always=True, file=stream)
    run = loop(budget=Budget(usd=1, iterations=4), backtrack=BestScore(), scorer=lambda s: s["score"],
               cost_fn=lambda s: 0.1, on_step=bar, checkpoint="memory")(climb([0.2, 0.5, 0.3, 0.4])).run({})
    bar.close()
    text = stream.getvalue()
    assert "4/4" in text and "$0.4000/$1.0000" in text and "best 0.500" in text
    assert run.status == "budget_exhausted"


def test_a_resumed_runs_progress_bar_starts_from_its_steps_and_spend_so_far(capsys):
    """Regression: the bar of a resumed run counted only this session's steps and dollars."""
    flaky = [True]

    def step(s):
        if s == 4 and flaky:
            flaky.pop()
            raise RuntimeError("boom")
        return s + 1

    runner = loop(budget=Budget(usd=1, iterations=10), cost_fn=lambda s: 0.1, scorer=lambda s: s,
                  progress="always", checkpoint="memory")(step)
    first = runner.run(0)
    capsys.readouterr()
    assert runner.resume_run(first.id).status == "budget_exhausted"
    shown = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert "5/10" in shown[0], "it starts where the run stood"
    assert "10/10" in shown[-1] and "$0.9000/$1.0000 best 9.000 budget exhausted" in shown[-1]


def test_iter_yields_each_committed_step_in_order_once_and_then_the_run(tmp_path):
    db = str(tmp_path / "i.db")
    runner = loop(budget=Budget(iterations=4), cost_fn=lambda s: 0.1, checkpoint=db)(lambda s: s + 1)
    stream = runner.iter(0, run_id="watched")
    seen = []
    for step in stream:
        seen.append(step.n)
        assert runner.store.get_run("watched").steps == step.n + 1, "yielded only once committed"
    assert seen == [0, 1, 2, 3]
    assert stream.run.status == "budget_exhausted" and stream.run.total_cost == Decimal("0.4")


def test_async_iter_yields_steps_as_they_happen():
    @loop(budget=Budget(iterations=3), checkpoint="memory")
    async def fn(state):
        await asyncio.sleep(0)
        return state + 1

    async def watch():
        stream = fn.iter(0)
        got = [step.state async for step in stream]
        return got, stream.run

    got, run = asyncio.run(watch())
    assert got == [1, 2, 3] and run.status == "budget_exhausted"


@pytest.mark.parametrize("how", ["on_step", "iter", "async iter"])
def test_a_step_handed_out_while_the_run_goes_on_is_the_readers_to_change(tmp_path, how):
    """A notebook callback that dropped a field of step.state before printing it (or a stream's reader that did)
    changed the object the loop handed to its next call, and the state the run returned: the model's paid-for
    output was gone from both, though the checkpoint had it."""
    given = []

    def write(state):
        given.append(sorted(state))
        return {"n": state["n"] + 1, "draft": f"draft {state['n'] + 1}"}

    def trim(step):
        step.state.pop("draft")  # for a short printout

    start = {"n": 0, "draft": "draft 0"}
    on_step = trim if how == "on_step" else ()
    if how == "async iter":
        async def awrite(state):
            return write(state)

        runner = loop(budget=Budget(iterations=3), checkpoint=str(tmp_path / "d.db"))(awrite)

        async def read_all():
            stream = runner.iter(start)
            async for step in stream:
                trim(step)
            return stream.run
        run = asyncio.run(read_all())
    else:
        runner = loop(budget=Budget(iterations=3), checkpoint=str(tmp_path / "d.db"), on_step=on_step)(write)
        if how == "on_step":
            run = runner.run(start)
        else:
            stream = runner.iter(start)
            for step in stream:
                trim(step)
            run = stream.run
    assert given == [["draft", "n"]] * 3
    assert run.state == {"n": 3, "draft": "draft 3"}
    assert [s.state for s in run.history] == [{"n": n, "draft": f"draft {n}"} for n in (1, 2, 3)]


def test_leaving_an_async_iter_early_stops_calling_fn(tmp_path):
    """Regression: after `break` the run went on in the background, calling (and paying for) fn
    until its budget or the event loop ended, because nothing waited for the next step to be asked for."""
    db = str(tmp_path / "a.db")
    calls = []

    @loop(budget=Budget(iterations=50), checkpoint=db)
    async def fn(state):
        calls.append(state)
        await asyncio.sleep(0.001)
        return state + 1

    async def leave():
        stream = fn.iter(0, run_id="left")
        async for step in stream:
            if step.n == 2:
                break
        await asyncio.sleep(0.2)  # time enough for dozens of calls, were any made
        made = len(calls)
        await stream.aclose()
        return made

    assert asyncio.run(leave()) == 3 and len(calls) == 3
    record = SQLiteStore(db).get_run("left")
    assert record.status == "cancelled" and record.steps == 3
    assert asyncio.run(fn.resume_run("left")).state == 50


def test_replay_comparison_matches_what_the_live_loops_did(tmp_path):
    scores = [0.2, 0.4, 0.5, 0.5, 0.52, 0.5, 0.5, 0.5, 0.5, 0.5]
    db = str(tmp_path / "r.db")
    recorded = loop(budget=Budget(usd=5, iterations=10), scorer=lambda s: s["score"], cost_fn=lambda s: 0.1,
                    checkpoint=db)(climb(scores)).run({})
    policies = {"plateau 2": Budget(usd=5) | score_plateau(2), "plateau 4": Budget(usd=5) | score_plateau(4),
                "$0.55 cap": Budget(usd=0.55)}
    from loomc import SQLiteStore
    table = compare(load_history(SQLiteStore(db), recorded.id), policies)
    for name, policy in policies.items():
        live = loop(policy=policy, scorer=lambda s: s["score"], cost_fn=lambda s: 0.1, checkpoint="memory")(
            climb(scores)).run({})
        replay = dict(table.replays)[name]
        assert replay.stopped_after == len(live.history) and replay.cost == live.total_cost, name
        assert replay.decision.reason == live.reason
    text = str(table)
    assert "plateau 2" in text and "converged" in text and "budget_exhausted" in text
    assert "<td>plateau 4</td>" in table._repr_html_()
    fig = table.plot()
    assert len(fig.axes[0].lines) == 1 + 3


def test_an_export_can_be_replayed_in_the_notebook(tmp_path):
    from loomc.export import export_run
    db = str(tmp_path / "e.db")
    runner = loop(budget=Budget(iterations=6), scorer=lambda s: s["score"], checkpoint=db)(
        climb([0.1, 0.3, 0.3, 0.3, 0.3, 0.3]))
    run = runner.run({})
    history = history_from_export(export_run(runner.store, run.id))
    assert compare(history, [score_plateau(2)]).replays[0][1].stopped_after == 4


def test_breaking_out_of_iter_marks_the_run_cancelled_and_keeps_its_steps(tmp_path):
    import gc
    db = str(tmp_path / "b.db")
    runner = loop(budget=Budget(iterations=10), checkpoint=db)(lambda s: s + 1)
    stream = runner.iter(0, run_id="left-early")
    for step in stream:
        if step.n == 2:
            break
    del stream
    gc.collect()
    record = runner.store.get_run("left-early")
    assert record.status == "cancelled" and record.steps == 3
    assert record.reason == "left early: the stream of its steps (iter()) was closed before the run ended"
    assert runner.resume_run("left-early").state == 10


def test_breaking_out_of_iter_at_the_step_that_ended_the_run_leaves_it_ended_so(tmp_path):
    """A cell's own "done" test that agrees with the policy: the run converged or ran out of budget, and says so."""
    db = str(tmp_path / "end.db")
    runner = loop(budget=Budget(usd=0.3, iterations=10), converge_on=predicate(lambda h: h[-1].state >= 3),
                  cost_fn=lambda s: 0.1, checkpoint=db)(lambda s: s + 1)
    stream = runner.iter(0, run_id="done")
    for step in stream:
        if step.state >= 3:
            break
    stream.close()
    record = runner.store.get_run("done")
    assert (record.status, record.reason, record.steps) == ("completed", "predicate(<lambda>) is true", 3)
    assert stream.run is not None and stream.run.status == "completed" and stream.run.result() == 3
    broke = runner.iter(-10, run_id="broke")
    for step in broke:
        if step.n == 2:  # the third $0.10 call was the last the $0.30 cap allowed
            break
    broke.close()
    assert runner.store.get_run("broke").status == "budget_exhausted"
    assert broke.run is not None and broke.run.status == "budget_exhausted"
    with pytest.raises(BudgetExhausted, match="Budget"):
        broke.run.result()

    async def cell():  # the same in an async loop's `async for`, closed with aclose()
        @loop(budget=Budget(iterations=10), converge_on=predicate(lambda h: h[-1].state >= 3), checkpoint=db)
        async def count(s):
            return s + 1

        stream = count.iter(0, run_id="adone")
        async for step in stream:
            if step.state >= 3:
                break
        await stream.aclose()
        return stream.run

    ended = asyncio.run(cell())
    assert ended is not None and ended.status == "completed" and runner.store.get_run("adone").status == "completed"


def test_iter_with_resume_goes_on_with_the_stored_run_and_yields_only_new_steps(tmp_path):
    """A notebook cell run again after the kernel was interrupted: the same cell, resume=True."""
    db = str(tmp_path / "r.db")
    runner = loop(budget=Budget(iterations=6), checkpoint=db)(lambda s: s + 1)
    stream = runner.iter(0, run_id="cell", resume=True)  # nothing stored yet: it starts the run
    assert [next(stream).n for _ in range(2)] == [0, 1]
    stream.close()  # the interrupted cell
    assert stream.run is not None and stream.run.status == "cancelled" and stream.run.state == 2
    assert stream.run.reason.startswith("left early") and len(stream.run.history) == 2
    again = runner.iter(0, run_id="cell", resume=True)
    assert [s.n for s in again] == [2, 3, 4, 5] and again.run is not None and again.run.state == 6
    done = runner.iter(0, run_id="cell", resume=True)
    assert list(done) == [] and done.run is not None and done.run.state == 6  # completed: fn is not called
    untouched = runner.iter(1, run_id="never-asked")
    untouched.close()  # opened, so the run is claimed, but no step was asked for: it is let go
    record = runner.store.get_run("never-asked")
    assert record.status == "cancelled" and record.owner is None and record.steps == 0
    assert untouched.run is not None and untouched.run.state == 1
    assert runner.resume_run("never-asked").state == 7

    async def main():
        @loop(budget=Budget(iterations=4), checkpoint=db)
        async def count(s):
            return s + 1

        first = count.iter(0, run_id="acell", resume=True)
        assert (await first.__anext__()).n == 0
        await first.aclose()
        assert first.run is not None and first.run.status == "cancelled" and first.run.state == 1
        rest = count.iter(0, run_id="acell", resume=True)
        assert [s.n async for s in rest] == [1, 2, 3]
        return rest.run

    run = asyncio.run(main())
    assert run.state == 4 and run.status == "budget_exhausted"


@dataclasses.dataclass
class Uncopyable:
    text: str

    def __deepcopy__(self, memo):
        raise TypeError("holds a handle that cannot be copied")


def test_a_fn_that_edits_its_state_in_place_leaves_the_callers_object_as_it_was():
    """Regression: the quick start's fn edits its state in place, and the first call got the caller's own
    object, so `draft` ended as the last state: a notebook that ran the loop again on `draft` (to try
    another policy) started from where the first run stopped, without a word."""
    def refine(state):
        state["report"] += "!"
        state["history"].append(len(state["report"]))
        return state

    draft = {"report": "draft", "history": []}
    first = loop(budget=Budget(iterations=3), checkpoint="memory")(refine).run(draft)
    assert draft == {"report": "draft", "history": []}, "the caller's object is untouched"
    assert first.state == {"report": "draft!!!", "history": [6, 7, 8]}
    again = loop(budget=Budget(iterations=2), checkpoint="memory")(refine).run(draft)
    assert again.state == {"report": "draft!!", "history": [6, 7]}, "another policy, from the same draft"

    seen = []

    def child_fn(state):
        state["notes"].append("child")
        return state

    child = loop(budget=Budget(iterations=1), checkpoint="memory")(child_fn)

    def parent_fn(state):
        child.run(state)  # the child edits the state it is given: the parent's own stays as it was
        seen.append(list(state["notes"]))
        return state

    loop(budget=Budget(iterations=1), checkpoint="memory")(parent_fn).run({"notes": []})
    assert seen == [[]]

    # A state that cannot be deep-copied (a client kept in a private attribute, say) is handed over as it
    # is, as before: the stored JSON would lose what the copy could not take.
    blob = Uncopyable("draft")
    got = []
    loop(budget=Budget(iterations=1), checkpoint="memory")(lambda s: got.append(s) or s).run(blob)
    assert got == [blob] and got[0] is blob


def test_progress_without_tqdm_is_refused_at_decoration(monkeypatch):
    """It was refused when a run started: before its first call, but after the loop was built and shared."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))
    with pytest.raises(ImportError, match=re.escape('progress=True needs tqdm: pip install "loomc[notebook]"')):
        loop(budget=Budget(iterations=2), progress=True, checkpoint="memory")
    loop(budget=Budget(iterations=2), checkpoint="memory")  # no bar asked for: nothing needed
