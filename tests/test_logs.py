"""The ``loomc`` logger: a run's start or resume, each step, and why it stopped, for programs that log."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys

import pytest

from conftest import sync_or_async
from loomc import BestScore, Budget, SQLiteStore, loop, predicate, score_plateau


def lines(caplog, level=None):
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "loomc" and (level is None or r.levelname == level)]


def flaky_loop(store, aio=False):
    def body(s):
        if s == 1:
            raise ValueError("boom\n" + "x" * 300)
        return s + 1

    return loop(policy=Budget(usd=1, iterations=4) | score_plateau(patience=5) | BestScore(),
                scorer=lambda s: s / 10, cost_fn=lambda s: 0.05, checkpoint=store)(sync_or_async(body, aio))


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_info_logs_the_start_every_step_and_a_warning_says_why_the_run_stopped(tmp_path, caplog, aio):
    caplog.set_level(logging.INFO, logger="loomc")
    refine = flaky_loop(SQLiteStore(tmp_path / "l.db"), aio)
    run = asyncio.run(refine.run(0, run_id="lg")) if aio else refine.run(0, run_id="lg")
    assert run.status == "budget_exhausted"
    got = lines(caplog)
    assert got[0] == ("INFO", "run lg started: step, policy Budget(usd=1.0, iterations=4) | "
                              "score_plateau(patience=5, min_delta=0.01) | BestScore()")
    took = re.compile(r" in \d\.\d\ds;")  # how long the call took: a trivial one, well under 10 s
    assert got[1][0] == "INFO" and took.sub(" in T;", got[1][1]) == (
        "run lg step 0: $0.0500 (total $0.0500 of $1.0000) in T; score 0.1")
    level, text = got[2]
    assert level == "INFO" and took.sub(" in T;", text).startswith(
        "run lg step 1: $0.0000 (total $0.0500 of $1.0000) in T; error ValueError: boom\\nxxx")  # escaped: one line
    assert text.endswith(f"... (317 characters; `loomc show --db {tmp_path / 'l.db'} lg --step 1` shows it whole); "
                         "backtrack to step 0")  # a command to paste: of the run's file, not the default one
    assert len(got) == 6 and got[-1] == ("WARNING", "run lg stopped, budget exhausted: iterations: 4 of 4 calls "
                                                    "made (4 steps, $0.0500)")


def test_a_run_under_a_wall_clock_cap_logs_its_active_time_against_it(caplog):
    from conftest import FakeClock
    caplog.set_level(logging.INFO, logger="loomc")
    clock = FakeClock()
    slow = loop(budget=Budget(wall_clock="10m"), clock=clock, checkpoint="memory")(
        lambda s: clock.advance(150) or s + 1)
    run = slow.run(0, run_id="wc")
    got = lines(caplog)
    assert got[1] == ("INFO", "run wc step 0: $0.0000 (total $0.0000) in 2m30s (2m30s active of the 10m cap)")
    assert got[4] == ("INFO", "run wc step 3: $0.0000 (total $0.0000) in 2m30s (10m00s active of the 10m cap); budget exhausted")
    assert run.steps == 4 and got[-1][0] == "WARNING"


def test_a_resume_says_where_it_goes_on_and_a_completed_run_ends_at_info(tmp_path, caplog):
    def reached_three(h):
        return h[-1].state == 3

    refine = loop(policy=Budget(iterations=2) | predicate(reached_three), cost_fn=lambda s: 0.25,
                  checkpoint=SQLiteStore(tmp_path / "r.db"))(lambda s: s + 1)
    refine.run(0, run_id="r")
    caplog.clear()
    caplog.set_level(logging.INFO, logger="loomc")
    run = refine.resume_run("r", budget=Budget(iterations=5))
    assert run.status == "completed"
    got = lines(caplog)
    assert got[0] == ("INFO", "run r resumed at step 2 (2 steps, $0.5000 spent before), policy Budget(iterations=5) | "
                              "predicate(reached_three)")
    assert got[-1] == ("INFO", "run r stopped, completed: predicate(reached_three) is true (3 steps, $0.7500)")


def test_at_warning_only_the_runs_that_did_not_complete_are_logged_and_steps_are_not_listened_to(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="loomc")
    refine = flaky_loop(SQLiteStore(tmp_path / "w.db"))
    calls = []
    refine.on_step = (calls.append,)
    run = refine.run(0, run_id="w")
    assert lines(caplog) == [("WARNING", "run w stopped, budget exhausted: iterations: 4 of 4 calls made "
                                         "(4 steps, $0.0500)")]
    assert len(calls) == 4 and run.status == "budget_exhausted"  # the user's callback alone saw the steps


def test_an_interrupted_run_logs_that_it_was_cancelled(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="loomc")

    def step(s):
        if s == 2:
            raise KeyboardInterrupt
        return s + 1

    with pytest.raises(KeyboardInterrupt):
        loop(policy=Budget(iterations=5), checkpoint=SQLiteStore(tmp_path / "c.db"))(step)(0, run_id="c")
    assert lines(caplog)[-1] == ("WARNING", "run c stopped, cancelled: KeyboardInterrupt during step 2's call: a "
                                            "Ctrl-C, or a notebook's interrupt (3 steps, $0.0000)")


def test_nothing_is_printed_unless_logging_is_configured_and_import_loomc_does_not_import_logging(tmp_path):
    code = ("import sys, warnings, loomc\nassert 'logging' not in sys.modules\nimport logging\n"
            "warnings.simplefilter('ignore')  # only what logging would print is looked for\n"
            f"refine = loomc.loop(policy=loomc.Budget(iterations=2), checkpoint={str(tmp_path / 'n.db')!r})"
            "(lambda s: 1 / 0)\n"
            "try:\n    refine(0)\nexcept ZeroDivisionError:\n    print('raised')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout == "raised\n" and "loomc" not in out.stderr.replace("loomc.loop", "")  # no last-resort output
