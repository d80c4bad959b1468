"""Resume: a crash at step 9 of 10 loses nothing that was paid for, and nothing is counted twice."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from contextlib import closing
from decimal import Decimal
from pathlib import Path

import pydantic
import pydantic.v1
import pytest
import typing_extensions

import loomc
from loomc import codec

from conftest import db_flag, start_long_step, sync_or_async, wait_for_file
from loomc import (BestScore, Budget, BudgetExhausted, CheckpointDecodeError, ConfigError, LastGood, RunAlreadyFinished,
                   RunLocked, RunNotFound, SpecChangedWarning, SQLiteStore, StateEncodeError, StateRoundTripWarning,
                   StepConflict, StoreError, MemoryStore, load_history, loop, predicate)

CRASHY = str(Path(__file__).parent / "crashy.py")


def reference_final() -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import hashlib
    state = {"i": 0, "digest": "seed"}
    while state["i"] < 60:
        digest = hashlib.sha256(f"{state['digest']}:{state['i']}".encode()).hexdigest()[:16]
        state = {"i": state["i"] + 1, "digest": digest}
    return state


def run_crashy(db, run_id, mode, kill_after=None):
    proc = subprocess.Popen([sys.executable, CRASHY, str(db), run_id, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return json.loads(out)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return None


def startup_seconds() -> float:
    """How long a process takes here to start Python and import what crashy.py imports."""
    def once() -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import hashlib, json, random, loomc"], check=True)
        return time.perf_counter() - t0
    return min(once(), once())


def _status(db):
    try:
        return SQLiteStore(db).get_run("crashrun").status
    except RunNotFound:
        return None


@pytest.mark.parametrize("mode", ["cost", "charge", "acharge"])
def test_sigkill_at_random_moments_then_resume_until_done(tmp_path, mode):
    db = tmp_path / "crash.db"
    rng = random.Random({"cost": 1234, "charge": 99, "acharge": 7}[mode])
    # Kills from 0.1 s before the process has started up (about 0.2 s here; more where nothing is
    # compiled yet) to 0.2 s after land before the first commit, between steps (60 of 0-40 ms, with
    # an fsync each), inside fn and inside commits.
    start = startup_seconds()
    kills = 0
    while kills < 40:
        run_crashy(db, "crashrun", mode, kill_after=max(0.05, start + rng.uniform(-0.1, 0.2)))
        kills += 1
        if db.exists() and _status(db) == "completed":
            break
    assert kills >= 3, "the run finished before the kills could interrupt it: slow the steps down"
    final = run_crashy(db, "crashrun", mode)
    assert final == reference_final()
    store = SQLiteStore(db)
    run = store.get_run("crashrun")
    steps = store.load_steps("crashrun")
    assert run.status == "completed"
    assert [s.n for s in steps] == list(range(len(steps))), "committed steps are contiguous"
    ok = [s for s in steps if s.error is None]
    assert [json.loads(s.state_json)["i"] for s in ok] == list(range(1, 61))
    assert run.steps == len(steps)
    assert run.total_cost == sum((s.cost for s in steps), Decimal(0))
    if mode == "cost":
        assert run.total_cost == Decimal("0.01") * 60
    else:  # charge, acharge
        # every charge is counted once: the 30 good steps plus each interrupted step that had charged
        # (a process killed before its step's charge, or between steps, left an interrupted step of $0)
        interrupted = [s for s in steps if s.error is not None]
        charged = [s for s in interrupted if "after spending $0.0100" in s.error]
        assert all(s.error.startswith("Interrupted") and s.cost == (Decimal("0.01") if s in charged else 0)
                   for s in interrupted)
        assert run.total_cost == Decimal("0.01") * (60 + len(charged))
        assert store.pending_charges("crashrun") == {}
    assert run.attempts >= 2


def test_a_process_killed_after_the_step_that_ended_its_run_is_not_taken_to_have_died_in_a_call(tmp_path):
    """Regression (the crash test above caught it in CI): a process killed after the commit of the step that
    converged, before the run was marked completed, left a run that a resume took to have died in its next
    call. It recorded an interrupted step that was never made, then paid for one more call past the converged
    state, and ended on another state than a run never killed."""
    from click.testing import CliRunner
    from loomc.cli import main
    db = tmp_path / "end.db"
    script = tmp_path / "ends.py"
    script.write_text(
        "import os, signal, sys\n"
        "import loomc\n"
        "from loomc import Budget, loop, predicate\n"
        "def die_once_ended(step):\n"
        "    if step.events and os.environ.get('KILL'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # after the commit, before the run is marked ended\n"
        "@loop(budget=Budget(iterations=int(sys.argv[2])), converge_on=predicate(lambda h: h[-1].state >= 4),\n"
        f"      on_step=die_once_ended, checkpoint={str(db)!r})\n"
        "def count(s):\n"
        "    loomc.charge(0.01)\n"
        "    print('call', s, flush=True)\n"
        "    return s + 1\n"
        "count(0, run_id=sys.argv[1])\n")
    for run_id, cap, ended in (("conv", 9, "converged"), ("cap", 3, "budget exhausted")):
        died = subprocess.run([sys.executable, str(script), run_id, str(cap)], env={**os.environ, "KILL": "1"},
                              capture_output=True, text=True)
        assert died.returncode == -signal.SIGKILL
        shown = CliRunner().invoke(main, ["show", run_id, "--db", str(db)]).output
        last = len(SQLiteStore(db).load_steps(run_id)) - 1
        assert f"died after step {last} ended the run ({ended}), before the run was marked so" in shown, shown

    calls: list[int] = []

    def counting(cap: int) -> loomc.LoopRunner:
        @loop(budget=Budget(iterations=cap), converge_on=predicate(lambda h: h[-1].state >= 4), checkpoint=str(db))
        def count(s):
            calls.append(s)
            return s + 1
        return count

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecChangedWarning)  # not the script's own function
        done = counting(9).resume_run("conv")
        assert calls == [] and done.status == "completed" and done.state == 4  # as a run never killed
        assert done.history[-1].events == ("converged",) and len(done.history) == 4
        assert done.total_cost == Decimal("0.04")
        capped = counting(3).resume_run("cap")  # the cap that ended it ends it again, with no call made
        assert calls == [] and capped.status == "budget_exhausted" and len(capped.history) == 3
        more = counting(3).resume_run("cap", budget=Budget(iterations=9))  # goes on from step 2, no phantom step
    assert calls == [3] and more.status == "completed" and [s.error for s in more.history] == [None] * 4


@pytest.mark.parametrize("killed_in", ["wait", "call"])
def test_a_process_killed_in_a_backoff_wait_is_not_taken_to_have_died_in_a_call(tmp_path, killed_in):
    """A pod stopped during a backtracker's backoff wait after a rate limit made no call: a resume records no
    interrupted step (which would count against the caps at an unknown cost). Killed in the call after the wait,
    it did make one, and the resume counts it."""
    from click.testing import CliRunner
    from loomc.cli import main
    db = tmp_path / "wait.db"
    script = tmp_path / "waits.py"
    script.write_text(
        "import sys, time\n"
        "import loomc\n"
        "from loomc import Budget, LastGood, loop\n"
        f"@loop(budget=Budget(iterations=6), backtrack=LastGood(wait=float(sys.argv[1])), checkpoint={str(db)!r})\n"
        "def fix(s):\n"
        "    if loomc.step_number() == 1:\n"
        "        raise RuntimeError('429: rate limited')\n"
        "    if loomc.step_number() == 2:\n"
        "        print('calling', flush=True)\n"
        "        time.sleep(600)\n"
        "    return s + 1\n"
        "fix(0, run_id='rated')\n")
    proc = subprocess.Popen([sys.executable, str(script), "60" if killed_in == "wait" else "0.1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        if killed_in == "wait":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if db.exists() and len(SQLiteStore(db).load_steps("rated", with_states=False)) == 2:
                        break  # step 1 failed and is committed: the process waits its 60 s
                except RunNotFound:
                    pass  # the file is made, the run not yet: a race of the poll, which failed this test in CI
                time.sleep(0.05)
        else:
            assert proc.stdout is not None and proc.stdout.readline() == "calling\n"
    finally:
        proc.kill()
        proc.wait()
    shown = CliRunner().invoke(main, ["show", "rated", "--db", str(db)]).output
    if killed_in == "wait":
        assert "died in the backoff wait after step 1 (wait 60s), before step 2's call" in shown, shown
    else:
        assert "died during step 2" in shown and "Uncommitted" not in shown, shown

    @loop(budget=Budget(iterations=6), backtrack=LastGood(), checkpoint=str(db))
    def fix(s):
        return s + 1

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecChangedWarning)  # not the script's own function
        done = fix.resume_run("rated")
    errors = [s.error for s in done.history]
    if killed_in == "wait":  # steps 2 to 5 are all made by the resume
        assert errors == [None, "RuntimeError: 429: rate limited", None, None, None, None] and done.state == 5
    else:
        assert errors[2] == ("Interrupted: the process died during this step, which charged nothing (its cost is "
                             "unknown)")
        assert errors[3:] == [None, None, None] and done.state == 4 and done.history[2].events == ("interrupted",)


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_the_call_after_a_backoff_wait_starts_once_the_wait_is_marked_over_in_the_store(tmp_path, aio):
    """The marker (a $0 write-ahead charge for the next step) is durable before that call starts, in both
    drivers, and the step's commit clears it."""
    store = SQLiteStore(tmp_path / "mark.db")
    seen = []

    def body(s):
        n = loomc.step_number()
        seen.append((n, store.pending_charges("marked")))
        if n == 1:
            raise RuntimeError("429: rate limited")
        return s + 1

    step = loop(budget=Budget(iterations=4), backtrack=LastGood(wait=0.05), checkpoint=store)(sync_or_async(body, aio))
    done = asyncio.run(step.run(0, run_id="marked")) if aio else step.run(0, run_id="marked")
    assert seen == [(0, {}), (1, {}), (2, {2: Decimal(0)}), (3, {})]  # only the call after the wait had it
    assert done.state == 3 and store.pending_charges("marked") == {} and done.total_cost == 0


def test_a_run_killed_before_its_first_commit_resumes_from_its_initial_state(tmp_path):
    db = tmp_path / "early.db"
    code = f"""
import os, signal
from loomc import Budget, loop
@loop(budget=Budget(iterations=3), checkpoint={str(db)!r})
def step(s):
    os.kill(os.getpid(), signal.SIGKILL)
step({{"start": 7}}, run_id="early")
"""
    subprocess.run([sys.executable, "-c", code], timeout=60)
    store = SQLiteStore(db)
    assert store.get_run("early").steps == 0

    @loop(budget=Budget(iterations=3), checkpoint=str(db))
    def step(s):
        return {"start": s["start"] + 1}
    with pytest.warns(SpecChangedWarning, match="early"):  # this step is not the one that started it
        run = step.resume_run("early")
    # The call the process died in was a call of fn: it counts against the cap of 3, as step 0.
    assert [s.error for s in run.history][0].startswith("Interrupted: the process died during this step")
    assert run.state == {"start": 9} and "interrupted" in run.history[0].events


def test_resume_counts_the_spend_against_the_same_caps(tmp_path):
    import loomc
    db = str(tmp_path / "b.db")
    calls = {"n": 0}

    @loop(budget=Budget(usd=2.00), checkpoint=db)
    def step(s):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ConnectionError("network down")  # before the paid call: nothing charged
        loomc.charge(0.05)
        return s + 1

    with pytest.raises(ConnectionError) as e:
        step(0)
    run_id = e.value.run_id
    before = SQLiteStore(db).get_run(run_id)
    assert before.total_cost == Decimal("0.15") and before.status == "failed"
    run = step.resume_run(run_id)
    assert run.status == "budget_exhausted"
    assert run.total_cost == Decimal("2.00"), "$0.15 spent before the crash leaves $1.85: 37 more steps"
    assert len(run.history) == 41 and run.history[3].error == "ConnectionError: network down"
    assert [s.n for s in run.history] == list(range(41))
    assert run.state == 40

    # Priced by cost_fn, the failed call's cost is unknown (fn raised before cost_fn could price it): the
    # cap counts it at the estimate, $0.05, so the same run stops one call earlier.
    calls["n"] = 0

    @loop(budget=Budget(usd=2.00), cost_fn=lambda s: 0.05, checkpoint=db)
    def priced(s):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ConnectionError("network down")
        return s + 1

    with pytest.raises(ConnectionError) as e:
        priced(0)
    run = priced.resume_run(e.value.run_id)
    assert run.status == "budget_exhausted" and run.total_cost == Decimal("1.95") and len(run.history) == 40
    assert run.reason.startswith("usd: $1.9500 spent + $0.0500 for the next step would pass the $2.0000 cap, "
                                 "counting 1 failed call (step 3) that cost_fn could not price at $0.0500")


def test_resume_errors_name_the_run(tmp_path):
    db = str(tmp_path / "e.db")
    step = loop(budget=Budget(iterations=2), converge_on=predicate(lambda h: len(h) == 2),
                checkpoint=db)(lambda s: s + 1)
    with pytest.raises(RunNotFound, match="nosuchrun"):
        step.resume("nosuchrun")
    run = step.run(0)
    assert run.status == "completed"
    with pytest.raises(RunAlreadyFinished, match=f"{run.id} already completed"):
        step.resume(run.id)


def test_resuming_in_a_database_with_no_run_says_the_run_is_stored_elsewhere(tmp_path, monkeypatch):
    # A cron job or a second terminal in another directory: the default database there is not the run's.
    started, elsewhere = tmp_path / "project", tmp_path / "home"
    started.mkdir(), elsewhere.mkdir()
    monkeypatch.delenv("LOOMC_DB", raising=False)
    monkeypatch.chdir(started)
    step = loop(budget=Budget(iterations=2))(lambda s: s + 1)
    run = step.run(0)
    monkeypatch.chdir(elsewhere)
    again = loop(budget=Budget(iterations=2))(lambda s: s + 1)
    with pytest.raises(RunNotFound) as e:
        again.resume(run.id)
    said = str(e.value)
    assert f"no run {run.id!r} in {elsewhere / '.loomc' / 'checkpoints.db'}, which holds no run at all (this " \
           "process created it just now)" in said
    assert f"working directory ({elsewhere} here)" in said and "$LOOMC_DB" in said
    # Where the database holds runs, an unknown id is only that.
    with pytest.raises(RunNotFound) as e:
        step.resume("nosuchrun")
    assert str(e.value) == f"no run 'nosuchrun' in {started / '.loomc' / 'checkpoints.db'}"


def test_a_budget_exhausted_run_resumes_with_a_larger_budget_and_the_raise_is_recorded(tmp_path):
    db = str(tmp_path / "r.db")
    step = loop(budget=Budget(usd=0.5), cost_fn=lambda s: 0.1, checkpoint=db)(lambda s: s + 1)
    first = step.run(0)
    assert first.status == "budget_exhausted" and first.state == 5
    again = step.resume_run(first.id)
    assert again.status == "budget_exhausted" and len(again.history) == 5, "the same cap buys nothing more"
    more = step.resume_run(first.id, budget=Budget(usd=1.0))
    assert more.state == 10 and more.total_cost == Decimal("1.0")
    record = SQLiteStore(db).get_run(first.id)
    assert any("Budget(usd=1.0)" in note for note in record.notes)
    assert record.policy.startswith("Budget(usd=1.0)")


def test_a_raise_changes_only_the_caps_it_names(tmp_path):
    """Regression: resume(budget=Budget(usd=5)) (and `loomc resume --budget-usd 5`) replaced the whole
    budget, so a run capped at 8 calls went on to 50 and spent $5.00 where $0.80 was the most it could."""
    from loomc.budget import raised
    db = str(tmp_path / "raise.db")
    step = loop(budget=Budget(usd=0.3, iterations=8, wall_clock="10m"), cost_fn=lambda s: 0.1,
                checkpoint=db)(lambda s: s + 1)
    first = step.run(0)
    assert first.status == "budget_exhausted" and first.steps == 3 and first.reason.startswith("usd:")
    assert str(first.error).endswith(f"give a larger budget: fn.resume({first.id!r}, budget=Budget(...))")
    more = step.resume_run(first.id, budget=Budget(usd=5))
    assert more.steps == 8 and more.total_cost == Decimal("0.8") and more.reason == "iterations: 8 of 8 calls made"
    record = SQLiteStore(db).get_run(first.id)
    assert record.notes[-1] == ("resumed with Budget(usd=5.0, iterations=8, wall_clock='10m') "
                                "(was Budget(usd=0.3, iterations=8, wall_clock='10m'))")
    lifted = loop(budget=Budget(iterations=8), converge_on=predicate(lambda h: h[-1].state >= 12),
                  cost_fn=lambda s: 0.1, checkpoint=db)(lambda s: s + 1)
    with pytest.warns(SpecChangedWarning):
        assert lifted.resume_run(first.id, budget=Budget.unbounded()).state == 12, "unbounded() lifts every cap"
    old = [Budget(usd=1, wall_clock=60, step_estimate=0.2), Budget(iterations=9, wall_clock="2m")]
    assert raised(old, Budget(iterations=20)) == Budget(usd=1, iterations=20, wall_clock=60, step_estimate=0.2)
    assert repr(raised(old, Budget(wall_clock="1h"))) == \
        "Budget(usd=1.0, iterations=9, wall_clock='1h', step_estimate=0.2)"


def test_a_resume_budget_the_run_already_reached_is_refused_and_changes_nothing(tmp_path):
    """Regression: resume(budget=Budget(iterations=2)) on a run of 3 calls stopped at once, and the
    raise was kept as the run's budget, so every later resume with a larger USD cap stopped at once too."""
    from loomc.budget import raised
    db = str(tmp_path / "reached.db")
    step = loop(budget=Budget(usd=1.0), cost_fn=lambda s: 0.3, checkpoint=db)(lambda s: s + 1)
    first = step.run(0, run_id="reached")
    before = SQLiteStore(db).get_run("reached")
    for budget, words in ((Budget(usd=0.5), "usd=0.5 but it has spent $0.9000"),
                          (Budget(usd="0.9", iterations=9), "usd=0.9 but it has spent $0.9000"),
                          (Budget(iterations=3), "iterations=3 but it has made 3 calls"),
                          (Budget(usd=5, wall_clock="1s"), None)):
        if words is None:  # active time: make the run look as if it had been busy for a minute
            with closing(sqlite3.connect(db)) as conn, conn:
                conn.execute("UPDATE runs SET active_seconds = 60 WHERE id = 'reached'")
            before = SQLiteStore(db).get_run("reached")
            words = "wall_clock=1s but it has been active 60.0s"
        applies = raised([Budget(usd=1.0)], budget)  # the caps given, and the loop's it leaves out
        with pytest.raises(ConfigError, match=re.escape(f"cannot resume run reached under {applies!r}: {words}")):
            step.resume_run("reached", budget=budget)
        assert SQLiteStore(db).get_run("reached") == before, "nothing recorded: no raise, no note, no claim"
    proc = subprocess.run(["loomc", "resume", "reached", "--iterations", "2", "--db", db], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "iterations=2 but it has made 3 calls" in proc.stderr
    more = step.resume_run("reached", budget=Budget(usd=1.5))
    assert more.steps == 5 and more.total_cost == Decimal("1.5") and first.steps == 3


def test_a_resume_whose_kept_cap_the_run_already_reached_is_refused_and_changes_nothing(tmp_path):
    """Regression: `loomc resume --budget-usd 0.5` on a run that had made all 3 calls of its iteration cap raised the
    dollars and kept that cap (as it should): the resume made no call, ended budget_exhausted at once, and kept the
    raise as the run's budget. It is refused like a cap given too low, naming the cap that was kept."""
    db = str(tmp_path / "kept.db")
    step = loop(budget=Budget(iterations=3), cost_fn=lambda s: 0.1, checkpoint=db)(lambda s: s + 1)
    step.run(0, run_id="kept")
    before = SQLiteStore(db).get_run("kept")
    words = ("cannot resume run kept under Budget(usd=0.5, iterations=3): iterations=3 but it has made 3 calls, a cap "
             "kept from the run's budget")
    with pytest.raises(ConfigError, match=re.escape(words)):
        step.resume_run("kept", budget=Budget(usd=0.5))
    assert SQLiteStore(db).get_run("kept") == before, "nothing recorded: no raise, no note, no claim"
    more = step.resume_run("kept", budget=Budget(usd=0.5, iterations=5))
    assert more.steps == 5 and more.total_cost == Decimal("0.5")
    # The command, which imports the loop from its script.
    (tmp_path / "keptjob.py").write_text(
        "import sys\n"
        "from loomc import Budget, loop\n"
        "@loop(budget=Budget(iterations=3), cost_fn=lambda s: 0.1,\n"
        "      checkpoint=sys.argv[1] if __name__ == '__main__' else 'memory')\n"
        "def count(s):\n"
        "    return s + 1\n"
        "if __name__ == '__main__':\n"
        "    count.run(0, run_id='kept')\n")
    db = str(tmp_path / "kept-cli.db")
    subprocess.run([sys.executable, str(tmp_path / "keptjob.py"), db], check=True)
    before = SQLiteStore(db).get_run("kept")
    proc = subprocess.run(["loomc", "resume", "kept", "--budget-usd", "0.5", "--db", db], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    assert SQLiteStore(db).get_run("kept") == before


def test_a_resume_under_which_the_run_would_stop_before_its_first_call_is_refused(tmp_path):
    """Regression: a run that the USD cap stopped predictively ($0.90 spent, $0.30 calls, a $1.00 cap), resumed with
    more iterations, made no call, stopped at once on the same USD reason, and kept the raise."""
    db = str(tmp_path / "predict.db")
    step = loop(budget=Budget(usd=1.0), cost_fn=lambda s: 0.3, checkpoint=db)(lambda s: s + 1)
    assert step.run(0, run_id="p").reason == "usd: $0.9000 spent + $0.3000 for the next step would pass the $1.0000 cap"
    before = SQLiteStore(db).get_run("p")
    with pytest.raises(ConfigError, match=re.escape(
            "cannot resume run p under Budget(usd=1.0, iterations=20): it would stop before its first call (usd: "
            "$0.9000 spent + $0.3000 for the next step would pass the $1.0000 cap); give a larger cap for that (the "
            "run is unchanged)")):
        step.resume_run("p", budget=Budget(iterations=20))
    assert SQLiteStore(db).get_run("p") == before, "nothing recorded: no raise, no note, no claim"
    more = step.resume_run("p", budget=Budget(usd=1.2))  # exactly room for one more call
    assert more.steps == 4 and more.total_cost == Decimal("1.2")


def test_a_raise_stays_the_runs_budget_for_later_resumes(tmp_path):
    """Regression: a raise held for one resume only. A run raised to $5 that crashed, or stopped on
    another cap, went back to the loop's $0.30 on its next resume and stopped at once."""
    from loomc.budget import budget_from_repr
    db = str(tmp_path / "kept.db")
    step = loop(budget=Budget(usd=0.3, iterations=8), cost_fn=lambda s: 0.1, checkpoint=db)(lambda s: s + 1)
    first = step.run(0)
    raised_once = step.resume_run(first.id, budget=Budget(usd=5))
    assert raised_once.reason == "iterations: 8 of 8 calls made"
    again = step.resume_run(first.id, budget=Budget(iterations=10))  # the $5 stands; 2 more calls
    assert again.steps == 10 and again.total_cost == Decimal("1.0") and again.reason == "iterations: 10 of 10 calls made"
    assert SQLiteStore(db).get_run(first.id).notes[-1].startswith("resumed with Budget(usd=5.0, iterations=10) ")
    assert step.resume_run(first.id).reason == "iterations: 10 of 10 calls made", "no call: 10 stands too"
    assert SQLiteStore(db).get_run(first.id).policy == "Budget(usd=5.0, iterations=10)"
    for budget in (Budget.unbounded(), Budget(usd=0.25, wall_clock="1h30m", step_estimate=0.05),
                   Budget(iterations=3, wall_clock=90)):
        assert budget_from_repr(repr(budget)) == budget
    assert budget_from_repr("Budget(usd=__import__('os'))") is None and budget_from_repr("print(1)") is None


def test_resuming_a_stalled_run_gives_it_more_calls_from_its_best_state(tmp_path):
    """Regression: the resume stalled again at once, without a call: Escalate counts the whole
    history. Resuming is the answer to the escalation, so the stall handler waits for a new call."""
    from loomc import BestScore, Escalate
    db = str(tmp_path / "stall.db")
    scores = iter([0.5, 0.4, 0.4, 0.4, 0.6, 0.7, 0.3, 0.3, 0.3])

    @loop(budget=Budget(iterations=20), backtrack=BestScore(), on_stall=Escalate(after=3), scorer=lambda s: s["q"],
          checkpoint=db)
    def step(state):
        return {"q": next(scores), "from": state["q"]}

    first = step.run({"q": 0.0})
    assert first.status == "stalled" and first.steps == 4
    assert str(first.error).endswith(f"inspect it with `loomc show --db {step.store.path} {first.id}`; "
                                     f"step.resume({first.id!r}) gives it more calls")
    again = step.resume_run(first.id)
    assert again.status == "stalled" and again.steps == 9, "three more steps without a gain stall it again"
    assert again.history[4].state["from"] == 0.5, "the first new call starts from the best state"
    assert again.state == {"q": 0.7, "from": 0.6}
    assert SQLiteStore(db).get_run(first.id).notes[-1].startswith("resumed after it stalled")
    nowhere = loop(budget=Budget(iterations=20), on_stall=Escalate(after=3), scorer=lambda s: s["q"],
                   checkpoint=db)(lambda s: {"q": 0.1})
    with pytest.warns(SpecChangedWarning):
        assert nowhere.resume_run(first.id).steps == 10, "one more call without a gain is enough"


class Draft(pydantic.BaseModel):
    text: str
    version: int
    tags: list[str] = []


class DraftV2(pydantic.BaseModel):
    text: str
    version: int
    tags: list[str] = []
    reviewer: str = "nobody"


class DraftStrict(pydantic.BaseModel):
    text: str
    version: int
    approved_by: str


CALLS = {"n": 0}


def refine_draft(d: Draft) -> Draft:
    CALLS["n"] += 1
    if CALLS["n"] == 3:
        raise TimeoutError("model timed out")
    assert isinstance(d, Draft), f"got {type(d).__name__}"
    return Draft(text=d.text + "!", version=d.version + 1, tags=d.tags)


def refine_draft_v2(d: DraftV2) -> DraftV2:
    assert isinstance(d, DraftV2), f"got {type(d).__name__}"
    return DraftV2(text=d.text + "!", version=d.version + 1, tags=d.tags)


def test_a_pydantic_state_comes_back_as_its_model_on_resume(tmp_path):
    db = str(tmp_path / "t.db")
    CALLS["n"] = 0
    with pytest.raises(TimeoutError) as e:
        loop(budget=Budget(iterations=4), checkpoint=db)(refine_draft)(Draft(text="hi", version=0, tags=["ü"]))
    run_id = e.value.run_id
    run = loop(budget=Budget(iterations=4), checkpoint=db)(refine_draft).resume_run(run_id)
    assert isinstance(run.state, Draft) and run.state.version == 3 and run.state.tags == ["ü"]
    assert all(isinstance(s.state, Draft) for s in run.history if s.ok)


def test_a_changed_model_that_still_validates_resumes_with_a_warning(tmp_path):
    db = str(tmp_path / "t2.db")
    CALLS["n"] = 0
    with pytest.raises(TimeoutError) as e:
        loop(budget=Budget(iterations=4), checkpoint=db)(refine_draft)(Draft(text="hi", version=0))
    with pytest.warns(SpecChangedWarning, match=e.value.run_id):
        run = loop(budget=Budget(iterations=4), checkpoint=db)(refine_draft_v2).resume_run(e.value.run_id)
    assert isinstance(run.state, DraftV2) and run.state.version == 3 and run.state.reviewer == "nobody"


def test_resume_with_unchanged_code_does_not_warn(tmp_path):
    import warnings
    db = str(tmp_path / "same.db")

    def inc(s):
        return s + 1

    run = loop(budget=Budget(iterations=2), checkpoint=db)(inc).run(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = loop(budget=Budget(iterations=2), checkpoint=db)(inc)  # a fresh process would do the same
        with pytest.raises(BudgetExhausted):
            again.resume(run.id)


_PARTIAL_AND_OBJECT = """
import functools, sys, warnings
from loomc import Budget, loop
def step(state, k):
    return state + k
class Stepper:
    def __init__(self, k):
        self.k = k
    def __call__(self, state):
        return state + self.k
loops = {"partial": loop(budget=Budget(iterations=2), checkpoint=sys.argv[1])(functools.partial(step, k=2)),
         "object": loop(budget=Budget(iterations=2), checkpoint=sys.argv[1])(Stepper(5))}
which, run_id = sys.argv[2], sys.argv[3]
if run_id == "new":
    print(loops[which].run(0).id)
else:
    warnings.simplefilter("error")  # a SpecChangedWarning fails the resume
    print(loops[which].resume_run(run_id, budget=Budget(iterations=4)).state)
"""


@pytest.mark.parametrize("which, final", [("partial", 8), ("object", 20)])
def test_a_partial_or_a_callable_object_resumes_in_another_process_without_a_changed_spec_warning(
        tmp_path, which, final):
    """Regression: their spec hash read their repr, which holds a memory address, so every resume in a
    new process warned that fn's source had changed. Their `loomc resume` hint named nobody (`.resume`)."""
    from click.testing import CliRunner
    from loomc.cli import main
    db, script = tmp_path / "p.db", tmp_path / "jobs.py"
    script.write_text(_PARTIAL_AND_OBJECT)

    def go(run_id):
        done = subprocess.run([sys.executable, str(script), str(db), which, run_id], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    run_id = go("new")
    assert go(run_id) == str(final)
    if which == "partial":  # its function's path: `loomc resume` finds a loop of the module that wraps it (below)
        assert SQLiteStore(db).get_run(run_id).fn_path == f"{script}:step"
        return
    assert SQLiteStore(db).get_run(run_id).fn_path is None  # nothing `loomc resume` could import
    out = CliRunner().invoke(main, ["resume", "--db", str(db), run_id, "--iterations", "6"])
    assert out.exit_code == 1
    assert "did not record an importable function (a lambda, a callable object" in out.output
    assert f"    fn.resume('{run_id}', budget=Budget(iterations=6))" in out.output


_PARTIAL_JOB = """
import functools, os
from loomc import Budget, loop

def step(state, k):
    if state == k and not os.path.exists("crashed"):
        open("crashed", "w").close()
        os._exit(9)  # the process dies in its second call
    return state + k

plus_two = loop(budget=Budget(iterations=3))(functools.partial(step, k=2))  # the default store: $LOOMC_DB

if __name__ == "__main__":
    plus_two.run(0, run_id="job")
"""


def test_a_loop_of_a_partial_resumes_from_the_command_line(tmp_path, monkeypatch):
    """A loop made of functools.partial(step, client=...) at module level recorded no function, so `loomc resume`
    could not import it ("did not record an importable function"); it records step's path, and finds the loop that
    wraps the partial."""
    from click.testing import CliRunner
    from loomc.cli import main
    db, script = tmp_path / "p.db", tmp_path / "partial_job.py"
    script.write_text(_PARTIAL_JOB)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOOMC_DB", str(db))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    assert SQLiteStore(db).get_run("job").fn_path == f"{script}:step"
    out = CliRunner().invoke(main, ["resume", "job"])
    assert out.exit_code == 2, out.output  # it ran on to its iteration cap
    steps = SQLiteStore(db).load_steps("job")
    assert [(s.n, s.state_json, s.error is not None) for s in steps] == [(0, "2", False), (1, None, True),
                                                                       (2, "4", False)]


def test_a_state_that_no_longer_validates_fails_the_resume_naming_run_step_and_field(tmp_path):
    db = str(tmp_path / "v.db")

    @loop(budget=Budget(iterations=2), checkpoint=db)
    def refine(d: Draft) -> Draft:
        return Draft(text=d.text, version=d.version + 1)

    run = refine.run(Draft(text="a", version=0))

    @loop(budget=Budget(iterations=5), checkpoint=db)
    def refine_strict(d: DraftStrict) -> DraftStrict:
        return d

    with pytest.raises(CheckpointDecodeError, match=rf"run {run.id} step 1.*approved_by"), \
            pytest.warns(SpecChangedWarning, match=run.id):  # the state type changed: warned, then refused
        refine_strict.resume(run.id)
    assert SQLiteStore(db).get_run(run.id).status == "budget_exhausted", "a failed resume changes nothing"


class Line(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    text: str

    @pydantic.computed_field(alias="Length")
    @property
    def length(self) -> int:
        return len(self.text)


class Tally(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    n: int
    lines: list[Line] = []

    @pydantic.computed_field
    @property
    def double(self) -> int:
        return 2 * self.n


class TallyNoLines(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    n: int


def test_a_model_with_computed_fields_that_forbids_extra_fields_resumes_and_backtracks(tmp_path):
    """Regression: a model's computed fields were stored with it, and a model with extra="forbid" refused
    them as input, so such a run could not be resumed ("Extra inputs are not permitted", with the advice to
    make the field optional), nor backtracked to in the live run; the first step warned, advising to
    declare the field's type."""
    import warnings
    db = str(tmp_path / "t.db")

    calls = []

    @loop(budget=Budget(iterations=5), backtrack=BestScore(), scorer=lambda t: [1, 3, 2][t.n - 1], checkpoint=db)
    def tally(t: Tally) -> Tally:
        calls.append(t.n)
        if len(calls) == 4:
            loomc.request_stop()
        return Tally(n=t.n + 1, lines=[*t.lines, Line(text="x" * t.n)])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no StateRoundTripWarning
        first = tally.run(Tally(n=0))
        assert first.status == "cancelled" and [s.state.n for s in first.history] == [1, 2, 3, 3]  # backtracked
        done = tally.resume_run(first.id)
    assert done.status == "budget_exhausted" and done.state == Tally(n=2, lines=[Line(text=""), Line(text="x")])
    stored = json.loads(SQLiteStore(db).load_steps(first.id)[1].state_json)
    assert stored == {"n": 2, "lines": [{"text": ""}, {"text": "x"}]}  # computed fields are not stored: no input
    # As an earlier loomc stored them, under their names or aliases, they read back too.
    earlier = '{"n": 2, "lines": [{"text": "", "Length": 0}, {"text": "x", "length": 1}], "double": 4}'
    assert codec.decode(earlier, Tally, run_id=first.id, step=1) == done.state
    # A field the model no longer declares is still refused, with what to do.
    @loop(budget=Budget(iterations=9), checkpoint=db)
    def later(t: TallyNoLines) -> TallyNoLines:
        return t

    with pytest.raises(CheckpointDecodeError, match=r"at field 'lines': Extra inputs are not permitted\. The stored "
                                                    r"state has a field the model no longer declares"), \
            pytest.warns(SpecChangedWarning):
        later.resume(first.id)


class Aliased(pydantic.BaseModel):
    count: int = pydantic.Field(serialization_alias="Count")
    label: str = pydantic.Field(validation_alias="Label")
    both: str = pydantic.Field(alias="Both")
    seen: dict = pydantic.Field(default_factory=dict, exclude=True)


class NeedsExcluded(pydantic.BaseModel):
    n: int
    client: str = pydantic.Field(exclude=True)


def test_a_model_with_aliases_reads_back_and_a_field_pydantic_does_not_store_is_pointed_out(tmp_path):
    """Regression: a state was stored under its fields' serialization aliases, which a model with
    serialization_alias= or validation_alias= does not read back, so such a run could not be resumed
    ("Field required", with the advice to make the field optional). A field left out with exclude=True
    was told as "state.seen key 'a' is a str, and comes back as a str"."""
    db = str(tmp_path / "a.db")

    @loop(budget=Budget(iterations=3), checkpoint=db)
    def count(a: Aliased) -> Aliased:
        if a.count == 1:
            loomc.request_stop()
        return Aliased(count=a.count + 1, Label=a.label + "!", Both=a.both, seen={"at": a.count})

    with pytest.warns(StateRoundTripWarning) as caught:
        first = count.run(Aliased(count=0, Label="go", Both="b"))
    assert {str(w.message) for w in caught} == {
        "loomc: state.seen is left out of what pydantic stores (Field(exclude=True)), and comes back as its default "
        "{} when read back from the store (by a resume, or a backtrack to it). Keep what fn needs after a resume or "
        "a backtrack in fields pydantic stores; exclude=True suits what fn can make again (a client, a cache)"}
    assert json.loads(SQLiteStore(db).load_steps(first.id)[1].state_json) == {"count": 2, "label": "go!!", "both": "b"}
    with pytest.warns(StateRoundTripWarning, match="state.seen is left out"):  # this process commits one again
        done = count.resume_run(first.id)
    assert done.status == "budget_exhausted" and (done.state.count, done.state.label) == (3, "go!!!")
    # A state stored under its aliases, as before, still reads back.
    assert codec.decode('{"count": 1, "Label": "x", "Both": "y"}', Aliased, run_id="r", step=0).both == "y"
    # A required field pydantic does not store cannot be read back: told on the first try, and on a resume.
    with pytest.warns(StateRoundTripWarning, match=re.escape(
            "the stored state does not decode again at field 'client': Field required, so a resume would fail when "
            "read back from the store (by a resume, or a backtrack to it). Make the field optional or give it a "
            "default (a field pydantic leaves out of what it stores, Field(exclude=True), needs one)")):
        loop(budget=Budget(iterations=1), checkpoint="memory")(needs_excluded).run(NeedsExcluded(n=0, client="c"))


class Scored(pydantic.BaseModel):
    best: float = -float("inf")


class ScoredKept(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(ser_json_inf_nan="constants")
    best: float = -float("inf")
    last: float = float("nan")
    payload: pydantic.Json[dict] = "{}"


@dataclasses.dataclass
class Marks:
    last: float = float("nan")


class Stamped(pydantic.BaseModel):
    when: datetime.datetime

    @pydantic.field_serializer("when")
    def day(self, when: datetime.datetime) -> str:
        return when.strftime("%Y-%m-%d")


class Noted(typing_extensions.TypedDict):
    n: int


class Tracked(pydantic.BaseModel):
    n: int
    _calls: int = pydantic.PrivateAttr(default=0)


class Probe(pydantic.BaseModel):
    n: int = 0
    loss: float | None = None
    best: float = float("inf")
    history: list[Scored] = []


@pydantic.dataclasses.dataclass
class ProbeData:
    n: int = 0
    loss: float = 0.0


def test_a_float_that_is_not_finite_on_a_later_step_is_stored_as_it_is_and_read_back(tmp_path):
    """Regression: pydantic writes a model's nan or inf as null, which it does not read back. Only the first
    state was checked; a NaN a later step computed was committed as null, and LastGood's backtrack to that
    step read it back and failed the live run, raising a CheckpointDecodeError that carried no run_id (reading
    the state again for the error failed too); a resume from it failed the same way."""
    db = str(tmp_path / "nan.db")

    def nan_on_step_1(state: Probe) -> Probe:
        if state.n == 2:
            raise TimeoutError("429")  # LastGood goes back to step 1, and reads its state from the store
        return Probe(n=state.n + 1, loss=float("nan") if state.n == 1 else 0.5, best=-float("inf"),
                     history=[*state.history, Scored(best=float("nan"))])

    flaky = loop(budget=Budget(iterations=4), backtrack=LastGood(), checkpoint=db)(nan_on_step_1)
    run = flaky.run(Probe())
    assert run.status == "budget_exhausted" and [s.error for s in run.history] == [None, None, "TimeoutError: 429",
                                                                                   "TimeoutError: 429"]
    back = flaky.history(run.id)[1].state
    assert isinstance(back, Probe) and back.n == 2 and back.loss != back.loss and back.best == -float("inf")
    assert [m.best != m.best for m in back.history] == [True, True]
    assert '"loss":NaN' in SQLiteStore(db).load_step(run.id, 1).state_json
    resumed = flaky.resume_run(run.id, budget=Budget(iterations=5))  # from step 1's state, as stored
    assert resumed.history[-1].error == "TimeoutError: 429" and resumed.state.loss != resumed.state.loss

    def pydantic_dataclass(state: ProbeData) -> ProbeData:
        return ProbeData(n=state.n + 1, loss=float("inf") if state.n else 0.0)

    run = loop(budget=Budget(iterations=3), checkpoint=db)(pydantic_dataclass).run(ProbeData())
    losses = [s.state.loss for s in loomc.load_history(db, run.id, state_type=ProbeData)]
    assert losses == [0.0, float("inf"), float("inf")]
    # A RootModel is stored as its root alone, in a state or as one.
    rooted = pydantic.RootModel[list[float]]([1.0, float("nan")])
    assert codec.encode(rooted) == "[1.0,NaN]" and codec.encode(Probe(history=[], best=float("inf"))).count("null") == 1
    held = pydantic.create_model("Held", losses=(pydantic.RootModel[dict[str, float]], ...))
    assert codec.encode(held(losses={"a": -float("inf")})) == '{"losses":{"a":-Infinity}}'


def test_a_backtrack_to_a_state_that_cannot_be_read_back_fails_the_run_with_its_history():
    """A state that does not read back (here a field_serializer that writes an int for a str field) meets its
    reader when the run goes back to it; the error now carries run_id and history, as any other."""
    class Tagged(pydantic.BaseModel):
        n: int = 0
        tag: str = "ok"

        @pydantic.field_serializer("tag")
        def _written(self, tag: str) -> object:
            return 123 if tag == "bad" else tag

    def bad_on_step_1(state: Tagged) -> Tagged:
        if state.n == 2:
            raise TimeoutError("429")
        return Tagged(n=state.n + 1, tag="bad" if state.n == 1 else "ok")

    with pytest.raises(CheckpointDecodeError, match="step 1: the stored state no longer decodes as Tagged at field "
                                                    "'tag'") as caught:
        loop(budget=Budget(iterations=4), backtrack=LastGood(), checkpoint="memory")(bad_on_step_1).run(Tagged())
    e = caught.value
    assert e.run_id and len(e.history) == 3 and e.history[-1].error == "TimeoutError: 429" and e.state is None


def test_what_pydantic_itself_stores_differently_is_told_with_the_fix(tmp_path):
    """Regression: a model's float that is not finite (a best score starting at -inf) was stored as null, pydantic's
    default for a model, and such a run could not be resumed, with the advice to declare the field's type; it is
    now stored as it is, and a run an earlier loomc stored so gets the fix with its error. A
    Json[...] field was stored parsed, which it does not read back; a NaN in a dataclass or a model that keeps
    it was told as "differs outside its fields"; a lossy field_serializer, and a private attribute, got the same
    advice to declare types."""
    import warnings

    def run(state):
        def step(s):
            return s
        step.__annotations__ = {"s": type(state), "return": type(state)}
        return loop(budget=Budget(iterations=2), checkpoint=str(tmp_path / "p.db"))(step).run(state)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stored as -Infinity, which reads back
        assert run(Scored()).state.best == -float("inf")
    with pytest.raises(CheckpointDecodeError, match=re.escape(
            "at field 'best': Input should be a valid number. pydantic stores a float that is not finite (nan, inf) "
            "as null, its default for a model, which it does not read back: give the model model_config = "
            "ConfigDict(ser_json_inf_nan='constants'), and it stores them as they are; to read this run's states, "
            "where that value is gone, declare the field float | None")):
        codec.decode('{"best": null}', Scored, run_id="r", step=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each of these reads back as it was
        kept = run(ScoredKept(payload='{"a": [1, 2]}'))
        assert (kept.state.best, kept.state.payload) == (-float("inf"), {"a": [1, 2]}) and kept.state.last != 0
        run(Marks())
    with pytest.warns(StateRoundTripWarning, match=re.escape(
            "state.when is datetime.datetime(2026, 1, 1, 12, 30), and comes back as "
            "datetime.datetime(2026, 1, 1, 0, 0) when read back from the store (by a resume, or a backtrack to it). Its field_serializer writes what the "
            "field does not read back the same")):
        run(Stamped(when=datetime.datetime(2026, 1, 1, 12, 30)))
    counted = Tracked(n=1)
    counted._calls = 5
    with pytest.warns(StateRoundTripWarning, match=re.escape(
            "state._calls is 5, a private attribute, which pydantic does not store: it comes back as 0 when read back "
            "from the store (by a resume, or a backtrack to it). Keep what fn needs after a resume or a backtrack in "
            "fields")):
        run(counted)
    with pytest.warns(StateRoundTripWarning, match=re.escape(  # it said "state is {...}, and comes back as {...}"
            "state['note'] ('extra') is a key the state's type does not declare, and is left out when read back")):
        loop(budget=Budget(iterations=1), checkpoint="memory")(noted).run({"n": 0})


def noted(s: Noted) -> Noted:
    return {"n": s["n"] + 1, "note": "extra"}  # type: ignore[typeddict-unknown-key]


def needs_excluded(s: NeedsExcluded) -> NeedsExcluded:
    return s


def test_a_changed_spec_is_warned_at_the_line_that_resumed_sync_or_async(tmp_path):
    """Regression: the warning pointed into loomc (for .resume()) or at concurrent/futures/thread.py
    (for an async resume, which opens the run on the store's writer thread)."""
    import asyncio
    import inspect
    db = str(tmp_path / "w.db")
    first = loop(budget=Budget(iterations=1), checkpoint=db)(lambda s: s + 1)
    ids = [first.run(0).id, first.run(0).id]
    again = loop(budget=Budget(iterations=2), checkpoint=db)(lambda s: s + 2)

    @loop(budget=Budget(iterations=2), checkpoint=db)
    async def again_async(s):
        return s + 3

    async def resume_async():
        line = inspect.currentframe().f_lineno + 1
        await again_async.resume_run(ids[1])
        return line

    with pytest.warns(SpecChangedWarning) as sync_caught:
        line = inspect.currentframe().f_lineno + 1
        again.resume_run(ids[0])
    with pytest.warns(SpecChangedWarning) as async_caught:
        async_line = asyncio.run(resume_async())
    # Only the SpecChangedWarnings: a ResourceWarning for some other test's collected connection may come too.
    (sync_warning,) = [w for w in sync_caught if w.category is SpecChangedWarning]
    (async_warning,) = [w for w in async_caught if w.category is SpecChangedWarning]
    assert (sync_warning.filename, sync_warning.lineno) == (__file__, line)
    assert (async_warning.filename, async_warning.lineno) == (__file__, async_line)


def bump_v1(s):
    return s + 1


def bump_v2(s):
    return s + 2


def test_a_changed_spec_warning_names_what_changed_where_the_record_tells(tmp_path):
    db = str(tmp_path / "what.db")
    first = loop(budget=Budget(iterations=2), checkpoint=db)(bump_v1).run(0)
    with pytest.warns(SpecChangedWarning) as caught:
        loop(budget=Budget(iterations=3), checkpoint=db)(bump_v2).resume_run(first.id)
    assert str(caught[0].message).startswith(
        f"run {first.id}: the function is {__name__}:bump_v2 (it was {__name__}:bump_v1 when the run started) and "
        "the policy is Budget(iterations=3) (it was Budget(iterations=2) when the run last ran); resuming with the "
        "current code")
    second = loop(budget=Budget(iterations=2), checkpoint=db)(bump_v1).run(0)
    with pytest.warns(SpecChangedWarning, match=r"the function is .*:bump_v2 \(it was .*:bump_v1 when the run "
                                                 r"started\); resuming"):
        loop(budget=Budget(iterations=5), checkpoint=db)(bump_v2).resume_run(second.id, budget=Budget(iterations=5))
    third = loop(budget=Budget(iterations=2), checkpoint=db)(lambda s: s + 1).run(0)
    with pytest.warns(SpecChangedWarning, match="fn's source or the state type changed since the run started"):
        loop(budget=Budget(iterations=2), checkpoint=db)(lambda s: s + 2).resume_run(third.id)
    with pytest.warns(SpecChangedWarning, match="fn's source, the loop's policy or the state type changed since"):
        loop(budget=Budget(iterations=4), checkpoint=db)(lambda s: s + 2).resume_run(third.id, budget=Budget(iterations=4))


def test_the_state_type_is_recorded_when_fn_has_no_annotation(tmp_path):
    db = str(tmp_path / "u.db")
    step = loop(budget=Budget(iterations=2), checkpoint=db)(lambda d: Draft(text=d.text, version=d.version + 1))
    run = step.run(Draft(text="a", version=0))
    assert SQLiteStore(db).get_run(run.id).state_type == "test_resume:Draft"
    more = step.resume_run(run.id, budget=Budget(iterations=3))
    assert isinstance(more.state, Draft) and more.state.version == 3


def test_an_unencodable_state_fails_its_step_with_the_field_and_keeps_the_cost(tmp_path):
    db = str(tmp_path / "x.db")

    conn = object()

    @loop(budget=Budget(iterations=5), cost_fn=lambda s: 0.25, checkpoint=db)
    def step(s):
        return {"ok": 1, "inner": {"conn": conn}}

    with pytest.raises(StateEncodeError, match=r"state\['inner'\]\['conn'\] is an object") as e:
        step({"ok": 0})
    # The call was paid for: what it returned is not lost with the store's refusal (it used to be).
    assert e.value.returned == {"ok": 1, "inner": {"conn": conn}} and e.value.returned["inner"]["conn"] is conn
    assert str(e.value).endswith("What fn returned, paid for and not stored, is on this error's .returned")
    assert e.value.state == {"ok": 0}, "the state the run would go on from"
    record = SQLiteStore(db).get_run(e.value.run_id)
    assert record.status == "failed" and record.total_cost == Decimal("0.25")
    (only,) = SQLiteStore(db).load_steps(e.value.run_id)
    assert only.state_json is None and only.error.startswith("StateEncodeError")


def test_numpy_values_in_a_state_are_stored_as_the_values_they_hold_and_pointed_out(tmp_path):
    """Regression: a step that returned a numpy number (an argmax, a mean) after its paid call failed with
    StateEncodeError, and the run with it. It is stored as the Python value it holds, as a tuple is stored as a
    list, and the warning says so on the first try."""
    numpy = pytest.importorskip("numpy")
    db = str(tmp_path / "np.db")

    @loop(budget=Budget(iterations=3), cost_fn=lambda s: 0.25, checkpoint=db)
    def pick(s):
        scores = numpy.array([0.2, 0.9, 0.4]) * (s["n"] + 1)
        return {"n": s["n"] + 1, "best": scores.argmax(), "mean": scores.mean(), "scores": scores,
                "ok": scores.max() > 1}

    with pytest.warns(StateRoundTripWarning, match=re.escape(
            "state['best'] is a numpy.int64, and comes back as an int when read back from the store (by a resume, or "
            "a backtrack to it). It is stored as the Python value it holds: convert it before returning it (x.item() "
            "for a scalar, x.tolist() for an array), or read it back as that")):
        run = pick.run({"n": 0})
    assert run.status == "budget_exhausted" and run.total_cost == Decimal("0.75")
    assert json.loads(SQLiteStore(db).load_steps(run.id)[1].state_json) == {
        "n": 2, "best": 1, "mean": 1.0, "scores": [0.4, 1.8, 0.8], "ok": True}


def cyclic() -> dict:
    node: dict = {"name": "root"}
    node["children"] = [{"name": "leaf", "parent": node}]
    return node


def nested(depth: int) -> list:
    top: list = []
    inner = top
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return top


@pytest.mark.parametrize("make, words", [
    (cyclic, r"state\['tree'\]\['children'\]\[0\]\['parent'\] refers back to a value that contains it"),
    (lambda: nested(400), r"state\['tree'\] nests lists or dicts too deeply"),
    (lambda: nested(5000), r"state\['tree'\] nests lists or dicts too deeply"),  # deeper than Python's stack
    # A file name from os.listdir that is not UTF-8: its str holds a lone surrogate (surrogateescape).
    (lambda: ["ok.py", os.fsdecode(b"bad\xff.py")], r"state\['tree'\]\[1\] is a str \('bad\\udcff.py'\) "
                                                     r"holding a lone surrogate, invalid in UTF-8, .* decode them with "
                                                     r"errors='replace'"),
    (lambda: {os.fsdecode(b"\xff"): 1}, r"state\['tree'\] key '\\udcff' is a str .* holding a lone surrogate"),
    # An image's bytes: pydantic stores bytes as UTF-8 text unless told otherwise.
    (lambda: b"\x89PNG\xff", r"state\['tree'\] is a bytes \(b'\\x89PNG\\xff'\) that is not UTF-8 text \(.*\), which "
                              r"cannot be stored as JSON; keep binary data \(an image, a file\) out of the state, .*"
                              r"ser_json_bytes='base64', val_json_bytes='base64'"),
])
def test_a_cyclic_or_too_deep_state_fails_its_step_with_the_path_and_keeps_the_cost(tmp_path, make, words):
    """Regression: looking for the bad field followed the cycle (or the depth) into a RecursionError,
    which escaped the loop: the run ended without its step, and the step's cost was not recorded."""
    db = str(tmp_path / "deep.db")
    tree = make()

    @loop(budget=Budget(iterations=3), cost_fn=lambda s: 0.25, checkpoint=db)
    def grow(s):
        return {"tree": tree} if s["n"] == 1 else {"n": s["n"] + 1}

    run = grow.run({"n": 0})
    assert run.status == "failed" and isinstance(run.error, StateEncodeError)
    assert re.search(words, str(run.error))
    assert SQLiteStore(db).get_run(run.id).total_cost == Decimal("0.50")
    kept, failed = SQLiteStore(db).load_steps(run.id)
    assert json.loads(kept.state_json) == {"n": 1} and failed.state_json is None


def test_a_state_that_would_come_back_changed_is_pointed_out_on_the_first_step_and_kept(tmp_path):
    db = str(tmp_path / "rt.db")

    @loop(budget=Budget(iterations=3), checkpoint=db)
    def stamp(s):
        return {**s, "n": s["n"] + 1, "seen": datetime.datetime(2026, 11, 22, 9, 30)}

    with pytest.warns(StateRoundTripWarning) as caught:
        run = stamp.run({"n": 0, "pair": [1, 2]})
    (only,) = caught.list  # once per run, not once per step
    assert str(only.message).startswith(
        "loomc: state['seen'] is a datetime, and comes back as a str when read back from the store")
    assert only.filename == __file__  # the line that ran the loop, not inside loomc
    assert run.status == "budget_exhausted" and len(SQLiteStore(db).load_steps(run.id)) == 3
    # What the warning said is what a resume gets.
    with pytest.warns(StateRoundTripWarning):  # told again: this process commits a state of it once more
        more = stamp.resume_run(run.id, budget=Budget(iterations=4))
    assert more.history[2].state["seen"] == "2026-11-22T09:30:00"


@pytest.mark.parametrize("initial, words", [
    ({"pair": (1, 2)}, "state['pair'] is a tuple, and comes back as a list"),
    ({"ids": {3}}, "state['ids'] is a set, and comes back as a list"),
    ({7: "seven"}, "state key 7 is an int, and comes back as a str"),
    ({"draft": Draft(text="a", version=0)}, "state['draft'] is a Draft, and comes back as a dict"),
    ({"price": Decimal("0.10")}, "state['price'] is a Decimal, and comes back as a str"),
])
def test_the_initial_state_is_checked_before_anything_is_written(tmp_path, initial, words):
    import warnings
    db = str(tmp_path / "init.db")
    calls = []

    @loop(budget=Budget(iterations=1), checkpoint=db)
    def step(s):
        calls.append(s)
        return s

    with warnings.catch_warnings():
        warnings.simplefilter("error", StateRoundTripWarning)
        with pytest.raises(StateRoundTripWarning, match=re.escape(words)):
            step.run(initial)
    assert calls == [] and SQLiteStore(db).list_runs() == []


class Creds(pydantic.BaseModel):
    n: int
    key: pydantic.SecretStr


def test_a_pydantic_secret_in_the_state_is_pointed_out_with_what_to_do_instead(tmp_path):
    """pydantic stores a SecretStr masked, so a backtrack (or a resume) handed fn '**********' for its API key.
    The warning said so, but told the user to declare the field's type, which they had."""
    seen = []

    @loop(budget=Budget(iterations=4), backtrack=BestScore(), scorer=lambda s: [1, 3, 2, 1][s.n - 1],
          checkpoint=str(tmp_path / "s.db"))
    def step(s: Creds) -> Creds:
        seen.append(s.key.get_secret_value())
        return Creds(n=s.n + 1, key=s.key)

    with pytest.warns(StateRoundTripWarning) as caught:
        step.run(Creds(n=0, key="sk-live"))
    assert seen == ["sk-live"] * 3 + ["**********"]  # the backtrack to step 1 read its state from the store
    advice = ("when read back from the store (by a resume, or a backtrack to it). pydantic stores a secret masked, "
              "so fn would be handed the mask, not the secret: keep secrets out of the state, and read them inside "
              "fn (from the environment, or a client made once), where the store never holds them")
    assert {str(w.message) for w in caught} == {
        f"loomc: state.key is a pydantic SecretStr, and comes back as its mask SecretStr('**********') {advice}"}
    with pytest.warns(StateRoundTripWarning, match=re.escape(
            f"state['key'] is a pydantic SecretStr, and comes back as its mask '**********' {advice}")):
        loop(budget=Budget(iterations=1), checkpoint="memory")(lambda s: s).run({"key": pydantic.SecretStr("sk")})


def test_states_that_round_trip_are_not_warned_about(tmp_path):
    import warnings

    @dataclasses.dataclass
    class Notes:
        lines: tuple[str, ...]
        seen: datetime.datetime
        tags: set[str]

    @loop(budget=Budget(iterations=2), checkpoint=str(tmp_path / "ok.db"))
    def plain(s):
        return {**s, "n": s["n"] + 1}

    @loop(budget=Budget(iterations=2), checkpoint=str(tmp_path / "ok.db"))
    def typed(s: Notes) -> Notes:
        return Notes(lines=(*s.lines, "more"), seen=s.seen, tags=s.tags | {"x"})

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.run({"n": 0, "nan": float("nan"), "text": "ü" * 3, "nested": [{"a": None, "b": [True, 1.5]}]})
        typed.run(Notes(lines=("a",), seen=datetime.datetime(2026, 1, 1), tags={"t"}))
        typed.run(Notes(lines=(), seen=datetime.datetime(2026, 1, 1), tags=set()))


def test_the_warning_turned_error_stops_the_run_after_the_step_is_committed(tmp_path):
    import warnings
    db = str(tmp_path / "err.db")

    @loop(budget=Budget(iterations=5), cost_fn=lambda s: 0.5, checkpoint=db)
    def step(s):
        return {"n": s["n"] + 1, "at": (s["n"], "later")}

    with warnings.catch_warnings():
        warnings.simplefilter("error", StateRoundTripWarning)
        with pytest.raises(StateRoundTripWarning, match=r"state\['at'\] is a tuple"):
            step.run({"n": 0})
    (record,) = SQLiteStore(db).list_runs()
    (committed,) = SQLiteStore(db).load_steps(record.id)
    assert json.loads(committed.state_json) == {"n": 1, "at": [0, "later"]} and record.total_cost == Decimal("0.5")
    assert record.status == "failed"


def test_a_state_annotation_pydantic_cannot_decode_is_refused_at_decoration(tmp_path):
    import typing

    class Loose(typing.TypedDict):  # pydantic needs typing_extensions.TypedDict before Python 3.12
        n: int

    class Opaque:
        pass

    refused = [(Opaque, "Unable to generate")]
    if sys.version_info < (3, 12):
        refused.append((Loose, "typing_extensions.TypedDict"))
    for annotation, words in refused:
        def step(s):
            return s
        step.__annotations__ = {"s": annotation}
        with pytest.raises(ConfigError, match=rf"annotated {annotation.__name__}, which pydantic cannot decode.*{words}"):
            loop(budget=Budget(iterations=1), checkpoint="memory")(step)


class Old(pydantic.v1.BaseModel):
    n: int


def test_a_pydantic_v1_model_is_refused_at_decoration_or_before_the_first_call_saying_what_to_use(tmp_path):
    """pydantic 2 stores no pydantic.v1 model. An annotation of one passed decoration, and the error named it as a
    type that cannot be stored, advising "pydantic models", which it was."""
    def step(s: Old) -> Old:
        return s

    words = ("a model of pydantic's v1 API (pydantic.v1.BaseModel): pydantic 2 stores no v1 model: make it a "
             "pydantic 2 model")
    with pytest.raises(ConfigError, match=re.escape(f"fn's state parameter is annotated Old, {words}")):
        loop(budget=Budget(iterations=1), checkpoint="memory")(step)
    calls = []
    untyped = loop(budget=Budget(iterations=1), checkpoint=str(tmp_path / "v1.db"))(lambda s: calls.append(s) or s)
    with pytest.raises(StateEncodeError, match=re.escape(
            "state['old'] is an Old (Old(n=1)) of pydantic's v1 API (pydantic.v1.BaseModel), which cannot be stored as "
            "JSON; pydantic 2 stores no v1 model: make it a pydantic 2 model (from pydantic import BaseModel)")):
        untyped.run({"old": Old(n=1)})
    assert calls == []


def test_starting_a_run_under_an_id_already_taken_points_to_resume_and_changes_nothing(tmp_path):
    db = str(tmp_path / "dup.db")
    calls = []

    @loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.1, checkpoint=db)
    def nightly(s):
        calls.append(s)
        return s + 1

    first = nightly.run(0, run_id="2026-11-22")
    with pytest.raises(StepConflict, match=r"run 2026-11-22 already exists in .*dup\.db: continue it with "
                                           r"nightly\.resume\('2026-11-22'\)"):
        nightly.run(100, run_id="2026-11-22")
    assert calls == [0, 1], "the second start called nothing"
    record = SQLiteStore(db).get_run("2026-11-22")
    assert record.status == first.status and record.total_cost == Decimal("0.2")
    assert len(SQLiteStore(db).load_steps("2026-11-22")) == 2

    # A completed run: its result is there for the asking, with no call made.
    @loop(budget=Budget(iterations=5), converge_on=lambda h: h[-1].state >= 1, checkpoint=db)
    def weekly(s):
        calls.append(s)
        return s + 1

    assert weekly.run(0, run_id="w1").status == "completed"
    with pytest.raises(StepConflict, match=r"run w1 already exists in .*: it completed \(predicate\(<lambda>\) is "
                                           r"true\)\. Its result, with no call made: weekly\(state, run_id='w1', "
                                           r"resume=True\); or start a new run under another run_id"):
        weekly.run(5, run_id="w1")
    calls.clear()
    assert weekly(0, run_id="w1", resume=True) == 1 and calls == []
    # Another loop's run: resuming it would be wrong, so the message does not offer it.
    with pytest.raises(StepConflict, match=r"run w1 already exists in .*: it is a run of loop weekly "
                                           r"\(test_resume:.*\.weekly\); give nightly's runs ids of their own "
                                           r"\(run_id=f\"nightly-\.\.\.\"\)$"):
        nightly.run(0, run_id="w1")
    assert calls == []


def test_two_processes_cannot_resume_one_run_and_a_dead_owner_is_taken_over(tmp_path):
    db = tmp_path / "lease.db"
    run_crashy(db, "leased", "cost")  # a finished run to prime the file
    proc = subprocess.Popen([sys.executable, CRASHY, str(db), "slowrun", "slow"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        store = SQLiteStore(db)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if store.get_run("slowrun").steps >= 1:
                    break
            except RunNotFound:
                pass
            time.sleep(0.05)
        sys.path.insert(0, str(Path(__file__).parent))
        step = loop(budget=Budget(iterations=1000), cost_fn=lambda s: 0.01,
                    converge_on=predicate(lambda h: h[-1].state["i"] >= 60), checkpoint=str(db))(
            lambda s: {"i": s["i"] + 1, "digest": s["digest"]})
        with pytest.raises(RunLocked, match="slowrun"):
            step.resume("slowrun")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    final = run_crashy(db, "slowrun", "cost")  # the dead owner's lease is taken over at once
    assert final == reference_final()


def test_two_threads_of_one_process_cannot_resume_one_run(tmp_path):
    """Regression: both took the run (they shared one owner name); the second settled the first's
    paid step as "interrupted", the first then hit StepConflict, and the run ended failed."""
    import threading
    db = str(tmp_path / "threads.db")
    in_step, tried = threading.Event(), threading.Event()

    @loop(budget=Budget(usd=5, iterations=4), checkpoint=db)
    def slow(state):
        loomc.charge(0.1)
        if state == 2:
            in_step.set()
            tried.wait(30)  # hold step 2 open while the other thread tries
        return state + 1

    loop(budget=Budget(iterations=2), checkpoint=db)(slow.fn).run(0, run_id="shared")
    results = {}

    def first():
        results["first"] = slow.resume_run("shared")

    def second():
        in_step.wait(30)
        try:
            slow.resume_run("shared")
        except RunLocked as e:
            results["second"] = e
        finally:
            tried.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    with pytest.warns(SpecChangedWarning):
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert "is already being run in this process" in str(results["second"])
    run = results["first"]
    assert run.status == "budget_exhausted" and run.state == 4
    steps = SQLiteStore(db).load_steps("shared")
    assert [s.n for s in steps] == [0, 1, 2, 3] and all(s.error is None for s in steps)
    assert SQLiteStore(db).get_run("shared").total_cost == Decimal("0.4")


def test_an_unfinished_iter_holds_its_run_and_a_drive_that_is_over_holds_nothing(tmp_path):
    import gc
    db = str(tmp_path / "iter.db")
    count = loop(budget=Budget(iterations=5), checkpoint=db)(lambda s: s + 1)
    stream = count.iter(0, run_id="held")
    next(stream)
    with pytest.raises(RunLocked, match="an iter\\(\\) not yet finished"):
        count.resume("held")
    stream.close()  # the run is cancelled, and released
    assert count.resume_run("held").state == 5 and SQLiteStore(db).get_run("held").status == "budget_exhausted"

    class KeepsRuns(SQLiteStore):  # a store that fails to release a run: its owner stays recorded
        def finish_run(self, run_id, status, reason, owner):
            raise StoreError("disk went away")

    stuck = loop(budget=Budget(iterations=5), checkpoint=KeepsRuns(db))(count.fn)
    stream = stuck.iter(0, run_id="stuck")
    next(stream)
    del stream
    gc.collect()
    assert SQLiteStore(db).get_run("stuck").owner is not None
    assert count.resume_run("stuck").state == 5, "the drive that held it is over, in this process: taken over at once"


def test_a_drive_that_only_garbage_holds_lets_go_of_its_run_when_the_run_is_resumed(tmp_path):
    """An iter() stream dropped in a reference cycle, or the task of an async loop that a second Ctrl-C made
    asyncio.run abandon, held its run until the garbage collector happened to run: a resume in that process
    meanwhile was refused with RunLocked ("already being run in this process"), which the user could not
    act on. (The collector is off here, so that only the resume can collect them.)"""
    import asyncio
    import gc
    db = str(tmp_path / "garbage.db")
    count = loop(budget=Budget(iterations=5), checkpoint=db)(lambda s: s + 1)

    holding = [True]

    async def slowly(s):
        await asyncio.sleep(3600 if holding[0] and s == 2 else 0)
        return s + 1

    acount = loop(budget=Budget(iterations=5), checkpoint=db)(slowly)

    watch = SQLiteStore(db)

    async def left_behind():
        asyncio.get_running_loop().create_task(acount.run(0, run_id="task"))
        while not any(r.id == "task" and r.steps == 2 for r in watch.list_runs()):
            await asyncio.sleep(0.01)

    unraisable, hook = [], sys.unraisablehook
    sys.unraisablehook = unraisable.append
    gc.disable()
    try:
        stream = count.iter(0, run_id="cycle")
        next(stream)
        next(stream)
        keep = {"stream": stream}
        keep["itself"] = keep
        del stream, keep
        resumed = count.resume_run("cycle")
        abandoned = asyncio.new_event_loop()
        abandoned.run_until_complete(left_behind())  # its task is pending in its call when the loop stops
        abandoned.close()
        del abandoned
        holding[0] = False
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            again = asyncio.run(acount.resume_run("task"))
    finally:
        gc.enable()
        sys.unraisablehook = hook
    # Python 3.13 closes the collected task's coroutine down into the run's step stream, with no event loop
    # running: its cleanup tried to await the record there, and printed "Exception ignored in: <coroutine ...>
    # RuntimeError: There is no current event loop" and "coroutine 'offload' was never awaited".
    assert [(u.exc_type, str(u.exc_value)) for u in unraisable] == []
    assert [str(w.message) for w in warned if "never awaited" in str(w.message)] == []
    assert resumed.state == 5 and [s.n for s in resumed.history] == [0, 1, 2, 3, 4]
    assert again.state == 5 and [s.n for s in again.history] == [0, 1, 2, 3, 4]
    watch.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")
def test_an_owner_whose_pid_another_process_now_has_is_dead(tmp_path):
    """A restarted container keeps its host name and often its pid: the pid alone would keep the
    crashed run locked until its lease expired. The owner name carries the start time too."""
    import socket
    from loomc.stores.base import owner_is_dead, process_owner
    mine = process_owner()
    host, pid, nonce = mine.split(":")
    assert host == socket.gethostname() and pid == str(os.getpid()) and nonce.startswith("t")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = open(f"/proc/{other.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        assert not owner_is_dead(f"{host}:{other.pid}:t{started}.abc123"), "that very process"
        assert not owner_is_dead(f"{host}:{other.pid}:abc123"), "an owner named without a start time"
        assert owner_is_dead(f"{host}:{other.pid}:t{int(started) - 1}.abc123"), "its pid, another process"
    finally:
        other.kill()
        other.wait()
    assert owner_is_dead(f"{host}:{other.pid}:t{started}.abc123")


def test_on_windows_no_signal_is_sent_to_probe_an_owner(monkeypatch):
    """os.kill(pid, 0) is CTRL_C_EVENT on Windows: it would interrupt the owner, not probe it."""
    import socket
    import types
    from loomc.stores import base

    def kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) was called")

    monkeypatch.setattr(base, "os", types.SimpleNamespace(name="nt", getpid=os.getpid, kill=kill))
    assert not base.owner_is_dead(f"{socket.gethostname()}:{os.getpid() + 1}:abc123"), "alive until its lease ends"


def test_wall_clock_counts_active_time_across_resumes(tmp_path, clock):
    db = str(tmp_path / "w.db")
    calls = {"n": 0}

    @loop(budget=Budget(wall_clock="10s"), clock=clock, checkpoint=db)
    def step(s):
        calls["n"] += 1
        clock.advance(3)
        if calls["n"] == 2:
            raise OSError("disk full")
        return s + 1

    with pytest.raises(OSError) as e:
        step(0)
    clock.advance(10_000)  # time while the process was down does not count
    run = step.resume_run(e.value.run_id)
    # 6 s active before the crash: one more call of 3 s fits under 10 s, a second would end past it.
    assert run.status == "budget_exhausted" and len(run.history) == 3
    assert run.reason.startswith("wall_clock: 9.00s active + 3.00s for the next call")


def test_resume_does_not_decode_every_stored_state(tmp_path):
    db = str(tmp_path / "lazy.db")
    decoded = []

    class Counted(pydantic.BaseModel):
        i: int

        @pydantic.field_validator("i")
        @classmethod
        def count(cls, v):
            decoded.append(v)
            return v

    @loop(budget=Budget(iterations=300), checkpoint=db)
    def step(s: Counted) -> Counted:
        return Counted(i=s.i + 1)

    run = step.run(Counted(i=0))
    decoded.clear()
    more = step.resume_run(run.id, budget=Budget(iterations=302))
    assert more.state.i == 302
    assert len(decoded) <= 5, f"resume decoded {len(decoded)} states"


def test_the_default_store_is_sqlite_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOMC_DB", raising=False)
    step = loop(budget=Budget(iterations=2))(lambda s: s + 1)
    run = step.run(0)
    assert (tmp_path / ".loomc" / "checkpoints.db").exists()
    assert SQLiteStore(tmp_path / ".loomc" / "checkpoints.db").get_run(run.id).steps == 2
    assert os.getcwd() == str(tmp_path)


def test_a_runner_replays_another_policy_on_one_of_its_recorded_runs(tmp_path):
    from loomc import score_plateau
    scores = iter([0.5, 0.6, 0.6, 0.6, 0.6, 0.6])
    runner = loop(budget=Budget(iterations=6), scorer=lambda s: s, checkpoint=str(tmp_path / "p.db"))(
        lambda s: next(scores))
    run = runner.run(0.0)
    assert runner.replay(run.id).stopped_after == 6
    tighter = runner.replay(run.id, score_plateau(2))
    assert tighter.stopped_after == 4 and "score_plateau" in tighter.decision.reason


def test_a_runner_replays_and_reads_its_runs_with_their_states_as_fn_returned_them(tmp_path):
    """Regression: fn.replay(run_id) read a pydantic state back as a dict, so a predicate that read it as fn
    returned it (h[-1].state.version) raised AttributeError in the replay, though not in the live loop."""
    long_enough = predicate(lambda h: h[-1].state.version >= 3)

    @loop(budget=Budget(iterations=6), converge_on=long_enough, checkpoint=str(tmp_path / "typed.db"))
    def grow(draft: Draft) -> Draft:
        return Draft(text=draft.text + "x", version=draft.version + 1)

    run = grow.run(Draft(text="", version=0))
    assert run.status == "completed" and run.steps == 3
    assert grow.replay(run.id).stopped_after == 3
    assert grow.replay(run.id, Budget(iterations=6) | predicate(lambda h: h[-1].state.text == "xx")).stopped_after == 2
    history = grow.history(run.id)
    assert history[1].state == Draft(text="xx", version=2) and history.total_cost == run.total_cost
    again = grow.run(history[0].state)  # a new run from step 0's state, with a budget of its own
    assert again.id != run.id and again.steps == 2 and again.state == Draft(text="xxx", version=3)
    with pytest.raises(RunNotFound, match="no run 'nope'"):
        grow.history("nope")


def test_load_history_reads_a_run_from_a_path_or_the_default_database(tmp_path, monkeypatch):
    from loomc import load_history, score_plateau
    db = tmp_path / "runs.db"
    scores = iter([0.5, 0.5, 0.9])
    run = loop(budget=Budget(iterations=3), scorer=lambda s: s, cost_fn=lambda s: 0.25,
               checkpoint=str(db))(lambda s: next(scores)).run(0.0)
    by_path = load_history(db, run.id)
    assert [s.score for s in by_path] == [0.5, 0.5, 0.9] and by_path.total_cost == Decimal("0.75")
    monkeypatch.setenv("LOOMC_DB", str(db))
    assert [s.state for s in load_history("sqlite", run.id)] == [0.5, 0.5, 0.9]
    assert [s.state for s in load_history(run.id)] == [0.5, 0.5, 0.9]  # one argument: the default database
    with pytest.raises(TypeError, match=r"needs the run id too: load_history\(store, run_id\)"):
        load_history(SQLiteStore(db))
    # A count of one reads as one: "after 1 step", "in 1 scored step".
    replayed = score_plateau(1, min_delta=0).replay(by_path)
    assert str(replayed).startswith("score_plateau(patience=1, min_delta=0): would have stopped after 2 steps")
    assert "in 1 scored step" in replayed.decision.reason and "steps" not in replayed.decision.reason
    once = str(Budget(iterations=1).replay(by_path))
    assert once.split(": ")[1] == "would have stopped after 1 step ($0.2500), budget_exhausted"
    # A wrong path is an error that names it, and creates nothing; a fresh memory store has no runs.
    with pytest.raises(StoreError, match=re.escape(f"no loomc database at {tmp_path / 'typo.db'}")):
        load_history(tmp_path / "typo.db", run.id)
    assert not (tmp_path / "typo.db").exists()
    with pytest.raises(ConfigError, match=r"pass the loop's store itself \(fn.store\)"):
        load_history("memory", run.id)


def test_a_live_run_keeps_its_lease_through_a_step_longer_than_the_lease(tmp_path):
    """Regression: the lease was renewed only by commits, so another process could take over a run
    whose live process was in a step longer than the lease (a long test suite, a slow model); the
    first then lost that paid step to RunLocked on its commit."""
    db = tmp_path / "long.db"
    proc = start_long_step(tmp_path, db, "long", 4, cost=0.25)  # four leases long
    try:
        time.sleep(2.0)  # the lease the run took at its last commit has run out twice over
        assert SQLiteStore(db).get_run("long").lease_expires > time.time(), "renewed while the step runs"
        other = loop(budget=Budget(iterations=3), checkpoint=str(db))(lambda s: s + 1)
        with pytest.raises(RunLocked, match="run long is being run by"):
            other.resume("long")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == "budget_exhausted", err
    steps = SQLiteStore(db).load_steps("long")
    assert [s.n for s in steps] == [0, 1, 2] and all(s.error is None for s in steps)
    assert SQLiteStore(db).get_run("long").total_cost == Decimal("0.75")


_DIES_IN_A_LONG_CALL = """\
import pathlib, sys, time
import loomc, loomc.stores.sqlite
from loomc import Budget, LastGood, loop

loomc.stores.sqlite.HEARTBEAT_SECONDS = 0.2  # seen alive every 0.2 s (5 s by default)
db, killed_in = sys.argv[1], sys.argv[2]


@loop(budget=Budget(wall_clock=2 if killed_in == "call" else 10, iterations=5), backtrack=LastGood(wait=8),
      checkpoint=db)
def slow(s):
    if s == 1 and not pathlib.Path(db + ".resumed").exists():
        pathlib.Path(db + ".in-step").touch()
        if killed_in == "wait":
            raise RuntimeError("429: rate limited")  # then it waits 8 s, and is killed in the wait
        time.sleep(60)  # killed in here
    return s + 1


if sys.argv[3] == "run":
    slow.run(0, run_id="dies")
else:
    try:
        slow.resume("dies")
    except loomc.BudgetExhausted as e:
        print(e)
"""


@pytest.mark.parametrize("killed_in", ["call", "wait"])
def test_the_time_a_dead_process_was_seen_in_its_call_counts_against_the_wall_clock_on_resume(tmp_path, killed_in):
    """Regression: the time of a call whose process died was not counted on resume, so under wall_clock='1h' a
    step killed 50 minutes in (out of memory, a spot machine taken back) gave the resumed run the whole hour
    again. The lease keeper now writes every few seconds that its process is alive, and a resume counts the call
    until then: here 2.8 s seen under a 2-second cap, so the resume makes no further call. So for a process
    killed in a backoff wait, whose wait is active time: no step is recorded for it, but its time counts, and is
    stored with the next step."""
    from click.testing import CliRunner
    from loomc.cli import main
    db = tmp_path / "c.db"
    script = tmp_path / "dies.py"
    script.write_text(_DIES_IN_A_LONG_CALL)
    proc = subprocess.Popen([sys.executable, str(script), str(db), killed_in, "run"])
    try:
        wait_for_file(f"{db}.in-step")
        time.sleep(3.0)
    finally:
        proc.kill()
        proc.wait()
    shown = CliRunner().invoke(main, ["show", "dies", "--db", str(db)]).output
    if killed_in == "call":
        into = re.search(r"died during step 1, (\d+\.\d+)s into its call \(last seen 20\d\d-", shown)
        assert into and 2.0 < float(into[1]) <= 3.5, shown
        assert re.search(r"Active: [\d.]+s of the 2s cap, [\d.]+s of it in the call its process died in", shown), shown
    else:
        assert "died in the backoff wait after step 1 (wait 8s), before step 2's call" in shown, shown
    (tmp_path / "c.db.resumed").touch()
    out = subprocess.run([sys.executable, str(script), str(db), killed_in, "resume"], capture_output=True,
                         text=True, timeout=60)
    steps = SQLiteStore(db).load_steps("dies", with_states=False)
    if killed_in == "wait":  # no step for the wait; the resume's calls go on under the 10-second cap
        assert out.stdout.startswith("run dies stopped, budget exhausted: iterations: 5 of 5 calls made"), out
        assert [s.n for s in steps] == [0, 1, 2, 3, 4] and steps[1].events[-1] == "wait 8s"
        assert [s.error for s in steps[2:]] == [None] * 3  # no interrupted step
        assert 2.0 < SQLiteStore(db).get_run("dies").active_seconds < 3.5 + sum(s.duration for s in steps)
        return
    assert out.stdout.startswith("run dies stopped, budget exhausted: wall_clock: "), out
    assert [(s.n, s.events) for s in steps] == [(0, ()), (1, ("interrupted",))]
    dead = steps[1]
    assert 2.0 < dead.duration <= 3.5 and f"it was seen running for {dead.duration:.2f}s" in dead.error, dead
    assert steps[0].started_at + steps[0].duration <= dead.started_at < dead.started_at + dead.duration < time.time()
    run = SQLiteStore(db).get_run("dies")
    assert run.active_seconds >= steps[0].duration + dead.duration


_SUSPENDED_JOB = """\
import asyncio, os, pathlib, sys, time
import loomc
from loomc import Budget, loop

asleep, awake = pathlib.Path("lid.db.asleep"), pathlib.Path("lid.db.awake")
real, lost = time.monotonic, [0.0]
sleeps = os.environ.get("LID_SLEEPS") == "1"  # else it waits, awake, while another process takes the run over
driver = []  # this process, not the one that takes the run over (loomc resume imports this file)
late = []  # the paid calls made after it woke


def monotonic():
    return real() - lost[0]


def sleep_through():
    # The machine sleeps (a laptop's lid is closed): no thread of this process runs, the lease keeper's
    # included, and the monotonic clock leaves the time out; the wall clock, the lease's, goes on.
    if sleeps:
        time.monotonic = monotonic
    with work.store._guard:
        fell_asleep = real()
        asleep.touch()
        while not awake.exists():
            time.sleep(0.05)
        if sleeps:
            lost[0] = real() - fell_asleep


if os.environ.get("LID_ASYNC") == "1":
    @loop(budget=Budget(iterations=3), lease_seconds=1.0 if sleeps else 600.0, checkpoint="lid.db")
    async def work(s):
        await loomc.acharge(0.25)
        if s == 1 and driver:
            sleep_through()
            for _ in range(40 if sleeps else 0):  # awake, an agent goes on with its step's paid calls
                late.append(0.25)
                await loomc.acharge(0.25)
                await asyncio.sleep(0.1)
        return s + 1
else:
    @loop(budget=Budget(iterations=3), lease_seconds=1.0 if sleeps else 600.0, checkpoint="lid.db")
    def work(s):
        loomc.charge(0.25)
        if s == 1 and driver:
            sleep_through()
            for _ in range(40 if sleeps else 0):  # awake, an agent goes on with its step's paid calls
                late.append(0.25)
                loomc.charge(0.25)
                time.sleep(0.1)
        return s + 1


if __name__ == "__main__":
    driver.append(True)
    try:
        run = work.run(0, run_id="lid")
        print((asyncio.run(run) if asyncio.iscoroutine(run) else run).status)
    except loomc.RunLocked as e:
        print("lost:", type(e).__name__, str(e).splitlines()[0])
        print("notes:", " | ".join(getattr(e, "__notes__", [])))
        print("late calls:", len(late))
"""


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("how", ["slept past its lease", "taken over while alive"])
def test_a_process_that_lost_its_run_cannot_commit_into_it_nor_say_how_it_ended(tmp_path, how, aio):
    """Regression: the lease's half life was timed on the monotonic clock, which leaves out the time a machine
    sleeps. A laptop that woke from an hour's sleep in the middle of a step committed it unfenced, into a run that
    `loomc resume` had meanwhile taken (its lease having run out by the wall clock), and then wrote its own
    "failed" over the status of the run the other process had finished. A process whose run was taken over while
    its lease was fresh (`--take-over` of a process that was in fact alive) was told only of a StepConflict."""
    sleeps = how == "slept past its lease"
    db = tmp_path / "lid.db"
    (tmp_path / "lidjob.py").write_text(_SUSPENDED_JOB)
    env = {**os.environ, "LID_SLEEPS": "1" if sleeps else "0", "LID_ASYNC": "1" if aio else "0"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "lidjob.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        wait_for_file(tmp_path / "lid.db.asleep")
        if sleeps:
            time.sleep(1.5)  # past the lease, by the wall clock
        taken = subprocess.run(["loomc", "resume", "--db", str(db), "lid", *([] if sleeps else ["--take-over"])],
                               capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
        assert taken.returncode == 2 and "Status: budget_exhausted" in taken.stdout, taken.stdout + taken.stderr
        (tmp_path / "lid.db.awake").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "lost: LeaseLost run lid: this process" in out and "(it has ended since; status budget_exhausted)" in out, \
        out + err
    assert "took the run over" in out and "resume it with" not in out and "A resume goes on" not in out, out
    assert ("was stopped in its call, at a loomc.charge; what it charged ($" if sleeps else
            "step 1 of run lid ($0.2500) was not committed; it is on this error's .history[-1], with what fn "
            "returned. The run goes on in the process that took it over") in out, out
    record = SQLiteStore(db).get_run("lid")
    assert record.status == "budget_exhausted" and record.reason.startswith("iterations: 3 of 3"), record
    assert len(record.notes) == 1 and record.notes[0].startswith(
        "taken from " if sleeps else "taken over from ") and f":{proc.pid}:" in record.notes[0], record.notes
    if sleeps:
        assert record.notes[0].endswith("once its lease had run out (that process, if it goes on, stops at its next "
                                        "charge or commit)")
    steps = SQLiteStore(db).load_steps("lid")
    assert [s.n for s in steps] == [0, 1, 2] and "interrupted" in steps[1].events
    assert record.total_cost == Decimal("0.75") == sum(s.cost for s in steps)  # the first process's charge, once
    if sleeps:
        # Awake, its lease keeper found the run taken within moments, and the next charge stopped the step's paid
        # calls (it used to make all 40 before its commit was refused). What they cost is kept, and shown as such.
        late = int(re.search(r"late calls: (\d+)", out)[1])
        assert 1 <= late <= 10, out
        assert SQLiteStore(db).pending_charges("lid") == {1: Decimal("0.25") * late}  # the one that raised too
        shown = subprocess.run(["loomc", "show", "--db", str(db), "lid"], capture_output=True, text=True)
        assert (f"Late: ${Decimal('0.25') * late:.4f} charged during step 1 by a process that had lost the run, "
                "after the process that took it over had recorded that step; it is not in the steps' costs") \
            in shown.stdout, shown.stdout


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_another_thread_cannot_take_a_run_whose_step_outlasts_its_lease(tmp_path, store):
    import threading
    checkpoint = MemoryStore() if store == "memory" else str(tmp_path / "thread-lease.db")
    in_step, release = threading.Event(), threading.Event()

    @loop(budget=Budget(iterations=3), lease_seconds=0.2, checkpoint=checkpoint)
    def slow(s):
        if s == 1:
            in_step.set()
            release.wait(30)  # held until the other thread has tried: nothing renews a memory store's lease
        return s + 1

    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("run", slow.run(0, run_id="slow")))
    worker.start()
    try:
        assert in_step.wait(30)
        time.sleep(0.4)  # two leases long: the step has outlasted its lease
        with pytest.raises(RunLocked, match="already being run in this process"):
            slow.resume("slow")
    finally:
        release.set()
    worker.join(30)
    assert results["run"].status == "budget_exhausted" and results["run"].state == 3


def test_take_over_resumes_a_run_whose_owner_on_another_host_is_known_to_be_gone(tmp_path):
    """A restarted pod comes back under a new host name: the old one's lease would keep the run
    locked for ten minutes. take_over=True takes it at once, and the note records from whom."""
    import sqlite3
    db = str(tmp_path / "pod.db")

    def bump(s):
        if s == 3:
            loomc.request_stop()  # the run ends after this step, with no event that says it ended it
        return s + 1

    count = loop(budget=Budget(iterations=9), cost_fn=lambda s: 0.1, checkpoint=db)(bump)
    first = count.run(0, run_id="job")
    with closing(sqlite3.connect(db)) as conn, conn:  # as the dead pod left it: running, its lease fresh
        conn.execute("UPDATE runs SET status = 'running', owner = 'pod-7f9c:1:t1.ab', lease_expires = ? "
                     "WHERE id = 'job'", (time.time() + 600,))
    more = loop(budget=Budget(iterations=6), cost_fn=lambda s: 0.1, checkpoint=db)(count.fn)
    with pytest.raises(RunLocked, match=r"pod-7f9c:1:t1.ab \(lease for \d+s more\).*resume with take_over=True "
                                        r"\(`loomc resume --db \S+ job --take-over`\)"):
        more.resume("job")
    with pytest.warns(SpecChangedWarning):
        run = more.resume_run("job", take_over=True)
    # The pod died making step 4: that call counts against the cap of 6, as an interrupted step of $0.
    assert first.state == 4 and run.state == 5 and run.total_cost == Decimal("0.5")
    assert run.history[4].events == ("interrupted",) and run.history[4].cost == 0
    assert "taken over from pod-7f9c:1:t1.ab" in SQLiteStore(db).get_run("job").notes[0]


def test_run_with_resume_goes_on_where_a_killed_script_stopped_and_never_pays_twice(tmp_path):
    """The cron-job story: the same script, run again after SIGKILL, continues the run under its
    id; run again once it completed, it calls nothing and returns the same state."""
    db = tmp_path / "cron.db"
    script = tmp_path / "nightly.py"
    script.write_text(
        "import os, signal, sys\n"
        "import loomc\n"
        "from loomc import Budget, loop, predicate\n"
        "@loop(budget=Budget(usd=1, iterations=20), converge_on=predicate(lambda h: h[-1].state >= 5),\n"
        "      checkpoint=sys.argv[1])\n"
        "def nightly(s):\n"
        "    loomc.charge(0.1)\n"
        "    print('call', s, flush=True)\n"
        "    if s == 3 and not os.path.exists(sys.argv[1] + '.crashed'):\n"
        "        open(sys.argv[1] + '.crashed', 'w').close()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return s + 1\n"
        "print('final', nightly(0, run_id='2026-12-02', resume=True))\n")
    runs = [subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=120)
            for _ in range(3)]
    assert runs[0].returncode == -9 and runs[0].stdout.split() == ["call", "0", "call", "1", "call", "2", "call", "3"]
    assert runs[1].returncode == 0, runs[1].stderr
    assert runs[1].stdout.split() == ["call", "3", "call", "4", "final", "5"]  # from the last committed step
    assert runs[2].stdout.split() == ["final", "5"], "a completed run is returned, not run again"
    record = SQLiteStore(db).get_run("2026-12-02")
    assert record.status == "completed" and record.attempts == 2
    assert record.total_cost == Decimal("0.6"), "five calls and the killed one, each $0.10, counted once"
    with pytest.raises(ConfigError, match="resume=True needs run_id="):
        loop(budget=Budget(iterations=1), checkpoint=str(db))(lambda s: s).run(0, resume=True)


@pytest.mark.parametrize("budget", ["Budget(iterations=5)", "Budget(usd=5), cost_fn=lambda s: 0.25",
                                    "Budget(usd=5, wall_clock='1h'), cost_fn=lambda s: 0.25"])
def test_a_step_that_kills_its_process_every_time_is_bounded_by_its_budget(tmp_path, budget):
    """A crash loop: a container restarted after each OOM at step 2 resumed the run, which made the same
    call again and died again. The calls it died in were never counted, so neither Budget(iterations=5)
    nor caps in dollars and time stopped it: each restart paid for one more call, without end."""
    db, calls = tmp_path / "oom.db", tmp_path / "calls"
    script = tmp_path / "job.py"
    script.write_text(
        "import os, signal, sys\n"
        "from loomc import Budget, loop\n"
        f"@loop(budget={budget}, checkpoint=sys.argv[1])\n"
        "def job(s):\n"
        "    with open(sys.argv[2], 'a') as f:\n"
        "        f.write(f'{s}\\n')\n"
        "    if s == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # out of memory, every time\n"
        "    return s + 1\n"
        "job(0, run_id='oom', resume=True)\n")
    codes = [subprocess.run([sys.executable, str(script), str(db), str(calls)], capture_output=True, text=True,
                            timeout=120).returncode for _ in range(6)]
    assert codes[:3] == [-9, -9, -9] and codes[3:] == [1, 1, 1], "then BudgetExhausted, with no call made"
    assert calls.read_text().split() == ["0", "1", "2", "2", "2"], "two good calls and three it died in"
    store = SQLiteStore(db)
    record = store.get_run("oom")
    assert record.status == "budget_exhausted"
    steps = store.load_steps("oom")
    assert [s.error for s in steps[2:]] == [
        "Interrupted: the process died during this step, which charged nothing (its cost is unknown)"] * 3
    assert all(s.events[0] == "interrupted" and s.cost == 0 for s in steps[2:])
    from click.testing import CliRunner
    from loomc.cli import main
    shown = CliRunner().invoke(main, ["show", "oom", "--db", str(db)]).output
    assert f"; `loomc resume {db_flag(db)} oom --iterations N` continues it under a larger cap\n" in shown
    if "usd" in budget:  # caps in dollars and time cannot see those calls: the run stops after three in a row
        assert record.reason.startswith("unreported_spend: the last 3 calls (steps 2 to 4) were cut short before "
                                        "they reported what they cost (their process died), so the budget cannot "
                                        "tell what they spent, nor how long they ran")
        return

    # A run that nobody owns was left by a resume that never began: no call was made, none is counted.
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE runs SET status = 'running', owner = NULL, lease_expires = NULL WHERE id = 'oom'")
    again = loop(budget=Budget(iterations=5), checkpoint=str(db))(lambda s: s + 1)
    with pytest.warns(SpecChangedWarning):
        assert len(again.resume_run("oom").history) == 5


def test_a_budget_without_an_iteration_cap_stops_after_three_calls_in_a_row_cut_short_at_no_cost():
    from loomc.budget import UnreportedSpend
    from loomc.history import History, Step
    stop = UnreportedSpend()  # as a budget with no iteration cap gets it

    def history(*kinds):
        return History([Step(n, n, cost=0.1) if k == "ok" else
                        Step(n, cost=0.1 if k == "paid" else 0, error="Interrupted", events=("interrupted",))
                        for n, k in enumerate(kinds)])

    assert stop.fire(history("ok", "cut", "cut", "cut"), 0).startswith(
        "unreported_spend: the last 3 calls (steps 1 to 3)")
    assert stop.fire(history("cut", "cut", "ok", "cut", "cut"), 0) is None, "not in a row"
    assert stop.fire(history("cut", "cut", "paid"), 0) is None, "a call that charged before it died counts"
    assert stop.fire(history("cut", "cut"), 0) is None


def test_calls_cut_short_by_hand_do_not_count_as_calls_that_kill_their_process(tmp_path):
    """A Ctrl-C in three calls in a row (a notebook's user stopping slow calls) recorded three interrupted steps
    at $0, and a budget in dollars alone then stopped the run on its next resume as if a step killed its process
    every time. Those calls' running time is known (the wall-clock cap counts it), and a person stopped them."""
    presses = []

    def slow(s):
        if len(presses) < 3:
            presses.append(s)
            raise KeyboardInterrupt
        return s + 1

    paid = loop(budget=Budget(usd=1), cost_fn=lambda s: 0.1, checkpoint=str(tmp_path / "h.db"))(slow)
    with pytest.raises(KeyboardInterrupt):
        paid.run(0, run_id="h")
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            paid.resume_run("h")
    done = paid.resume_run("h")
    assert [s.events for s in done.history][:3] == [("interrupted",)] * 3 and all(
        s.duration > 0 for s in done.history[:3])
    # The USD cap counts them at the estimate instead, $0.10 each.
    assert done.status == "budget_exhausted" and done.reason.startswith(
        "usd: $0.7000 spent + $0.1000 for the next step would pass the $1.0000 cap, counting 3 failed calls (steps 0 "
        "to 2) cut short before charging at $0.1000 each"), done.reason
    assert done.total_cost == Decimal("0.70") and done.state == 7


def test_one_job_launched_six_times_at_once_runs_once_and_the_others_are_told_it_is_being_run(tmp_path):
    """resume=True from six processes released together: each either starts the run or finds it; one that
    lost the race to create it joins it like the rest (RunLocked, naming the owner), not StepConflict."""
    db, go = tmp_path / "cron.db", tmp_path / "go"
    SQLiteStore(db).close()
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from loomc import Budget, LoomcError, loop\n"
        "@loop(budget=Budget(iterations=3), checkpoint=sys.argv[1])\n"
        "def nightly(s):\n"
        "    time.sleep(0.3)\n"
        "    return s + 1\n"
        "Path(sys.argv[2] + '.' + sys.argv[3]).touch()  # ready\n"
        "while not Path(sys.argv[2]).exists():\n"
        "    time.sleep(0.0005)\n"
        "try:\n"
        "    print('ran', nightly.run(0, run_id='nightly', resume=True).status)\n"
        "except LoomcError as e:\n"
        "    print(type(e).__name__, e)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db), str(go), str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(6)]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.{k}").exists() for k in range(6)):  # every process imported loomc and waits
        assert time.monotonic() < deadline, [p.poll() for p in procs]
        time.sleep(0.01)
    go.touch()
    outs = sorted(p.communicate(timeout=120)[0] for p in procs)
    assert outs[-1] == "ran budget_exhausted\n", outs
    assert all(out.startswith("RunLocked run nightly is being run by ") for out in outs[:-1]), outs
    assert [s.n for s in SQLiteStore(db).load_steps("nightly")] == [0, 1, 2]


def test_a_container_shutdown_with_a_sigterm_handler_frees_the_run_for_the_next_pod_at_once(tmp_path):
    """Python dies on SIGTERM without unwinding, so a pod stopped by Kubernetes left its run `running`
    under a lease that a new pod (another host name) must wait out. With the handler README gives,
    the run ends `cancelled` with no owner, and the next start goes on with it."""
    db, script = tmp_path / "pod.db", tmp_path / "job.py"
    script.write_text(
        "import signal, sys, time\n"
        "from loomc import Budget, loop\n"
        "signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))\n"
        "@loop(budget=Budget(iterations=6), checkpoint=sys.argv[1])\n"
        "def slow(s):\n"
        "    print('step', s, flush=True)\n"
        "    time.sleep(0.3)\n"
        "    return s + 1\n"
        "if __name__ == '__main__':\n"
        "    print('final', slow.run(0, run_id='job', resume=True).state, flush=True)\n")
    pod = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True)
    assert pod.stdout is not None and pod.stdout.readline() == "step 0\n" and pod.stdout.readline() == "step 1\n"
    pod.send_signal(signal.SIGTERM)  # during step 1
    pod.communicate(timeout=60)
    assert pod.returncode == 128 + signal.SIGTERM
    record = SQLiteStore(db).get_run("job")
    done = record.steps - 1  # 1: the signal lands during step 1's sleep (2 only on a badly stalled host)
    assert record.status == "cancelled" and record.owner is None and done in (1, 2)
    assert record.reason == (f"SystemExit: 143 during step {done}'s call: sys.exit(143) was called (128 + SIGTERM, "
                             "as a handler of that signal exits)")
    cut = SQLiteStore(db).load_steps("job")[-1]  # the call in flight: a step, its cost unknown
    assert cut.n == done and cut.events == ("interrupted",) and cut.error == (
        f"Interrupted: SystemExit: {128 + signal.SIGTERM}, during this step, which charged nothing (its cost is unknown)")
    with closing(sqlite3.connect(db)) as conn, conn:  # whatever host the next pod runs on, nobody holds the run
        assert conn.execute("SELECT lease_expires FROM runs WHERE id = 'job'").fetchone() == (None,)
    again = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    # Made again from the last good state, under the iteration cap that counted the call cut short.
    assert again.stdout.split() == [w for k in range(done, 5) for w in ("step", str(k))] + ["final", "5"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # a container's shutdown; Ctrl-C in a terminal
def test_request_stop_as_the_sigterm_handler_lets_the_call_in_flight_finish_and_commits_it(tmp_path, sig):
    """With sys.exit as the handler, the call in flight was cut short: paid for, and its work lost on
    every deploy. loomc.request_stop lets it finish, commits it, then ends the run `cancelled`."""
    db, script = tmp_path / "pod.db", tmp_path / "job.py"
    script.write_text(
        "import signal, sys, time, loomc\n"
        "from loomc import Budget, loop\n"
        f"signal.signal(signal.{sig.name}, loomc.request_stop)\n"
        "@loop(budget=Budget(iterations=5, usd=5), converge_on=lambda h: h[-1].state == 4, checkpoint=sys.argv[1])\n"
        "def slow(s):\n"
        "    print('step', s, flush=True)\n"
        "    time.sleep(0.5)\n"
        "    loomc.charge(0.25)  # the paid answer, once the call is done\n"
        "    print('paid', s, flush=True)\n"
        "    return s + 1\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        "        print('final', slow(0, run_id='job', resume=True), flush=True)\n"
        "    except loomc.StopRequested as stop:  # exit as the signal would have\n"
        "        sys.exit(stop.code)\n")
    pod = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    assert pod.stdout is not None and pod.stdout.readline() == "step 0\n" and pod.stdout.readline() == "paid 0\n"
    assert pod.stdout.readline() == "step 1\n"
    pod.send_signal(sig)  # during step 1's call
    out, err = pod.communicate(timeout=60)
    assert out == "paid 1\n", "the call in flight went on to its end, and no other started"
    assert pod.returncode == 128 + sig and err == "", err  # a quiet exit, as the signal's own
    record = SQLiteStore(db).get_run("job")
    assert record.status == "cancelled" and record.owner is None and record.steps == 2
    assert record.total_cost == Decimal("0.50")
    assert record.reason == f"{sig.name} received; stopped before step 2, with every call made let finish and committed"
    again = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["step", "2", "paid", "2", "step", "3", "paid", "3", "final", "4"], \
        "step 1 was not paid for twice"
    assert SQLiteStore(db).get_run("job").total_cost == Decimal("1.00")


@pytest.mark.parametrize("aio", [False, True])
def test_request_stop_stops_every_live_run_after_its_step_and_raises_stop_requested(tmp_path, aio, monkeypatch):
    from loomc import context
    monkeypatch.setattr(context, "_STOPPING", [])  # what a signal leaves set, for this test only
    db = str(tmp_path / "stop.db")

    def body(s):
        if s == 2:
            assert loomc.request_stop() == 1  # the one run live
        return s + 1

    step = loop(budget=Budget(iterations=10), checkpoint=db)(sync_or_async(body, aio))

    def drive(call):
        return asyncio.run(call) if aio else call

    with pytest.raises(loomc.StopRequested) as e:
        drive(step(0, run_id="a"))
    stop = e.value
    assert isinstance(stop, loomc.RunError) and stop.reason == ("loomc.request_stop() was called; stopped before step "
                                                                "3, with every call made let finish and committed")
    assert stop.code == 1 and stop.run_id == "a" and stop.state == 3 and [s.n for s in stop.history] == [0, 1, 2]
    assert str(stop) == ("run a stopped: loomc.request_stop() was called; stopped before step 3, with every call "
                         f"made let finish and committed; resume it with {'await ' if aio else ''}step.resume('a')")
    assert SQLiteStore(db).get_run("a").status == "cancelled"
    # Called from code, it stopped the runs live then; the next run goes on, and so does a resume.
    assert drive(step.run(5)).status == "budget_exhausted"
    resumed = drive(step.run(0, run_id="a", resume=True))
    assert resumed.status == "budget_exhausted" and resumed.state == 10 and len(resumed.history) == 10
    assert context.request_stop() == 0 and not context._LIVE, "nothing live, nothing asked"


def test_request_stop_from_a_signal_stops_the_process_runs_and_refuses_new_ones(tmp_path, monkeypatch):
    from loomc import context
    monkeypatch.setattr(context, "_STOPPING", [])
    db = str(tmp_path / "sig.db")
    seen = []

    def fixer(s):
        seen.append(s)
        if s == 1:
            loomc.request_stop(signal.SIGTERM, None)  # as the handler would, while the call is in flight
        return s + 1

    step = loop(budget=Budget(iterations=10), checkpoint=db)(fixer)
    run = step.run(0, run_id="s")
    assert seen == [0, 1] and run.status == "cancelled" and run.state == 2
    assert run.reason == "SIGTERM received; stopped before step 2, with every call made let finish and committed"
    assert isinstance(run.error, loomc.StopRequested) and run.error.code == 128 + signal.SIGTERM
    # The process is stopping: no run starts or resumes, and nothing is recorded for one.
    for start in (lambda: step.run(0, run_id="later"), lambda: step.resume_run("s")):
        with pytest.raises(loomc.StopRequested, match="SIGTERM received: this process is stopping, so no run "
                                                      "starts or resumes in it") as e:
            start()
        assert e.value.code == 128 + signal.SIGTERM
    assert [r.id for r in SQLiteStore(db).list_runs()] == ["s"] and seen == [0, 1]
    # A second signal, or one while no run is live, exits at once, as the signal itself would have.
    with pytest.raises(SystemExit) as e:
        loomc.request_stop(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM and not isinstance(e.value, loomc.StopRequested)
    monkeypatch.setattr(context, "_STOPPING", [])
    with pytest.raises(SystemExit) as e:
        loomc.request_stop(signal.SIGINT, None)
    assert e.value.code == 128 + signal.SIGINT
    for bad in ("SIGTERM", True, 15.0):
        with pytest.raises(ConfigError, match=r"request_stop\(signum=.*\): give the signal's number"):
            loomc.request_stop(bad)
    assert not context._STOPPING


def test_a_worker_process_forked_by_fn_still_exits_on_sigterm_with_request_stop_as_the_handler(tmp_path, monkeypatch):
    """A forked worker inherits the handler and, before, the parent's live runs: request_stop asked
    those to stop and returned, so Pool.terminate()'s SIGTERM left the worker running."""
    import multiprocessing
    from loomc import context
    monkeypatch.setattr(context, "_STOPPING", [])

    def fixer(s):  # an agentic fixer running the tests in a worker process
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        time.sleep(0.2)
        worker.terminate()  # SIGTERM
        worker.join(20)
        return worker.exitcode

    previous = signal.signal(signal.SIGTERM, loomc.request_stop)
    try:
        run = loop(budget=Budget(iterations=1), checkpoint=str(tmp_path / "f.db"))(fixer).run(0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert run.state == 128 + signal.SIGTERM, "the worker exited, as the signal asked, instead of running on"
    assert run.status == "budget_exhausted" and not context._STOPPING, "the parent was not asked to stop"


def test_large_states_the_run_no_longer_needs_are_read_back_from_the_store_not_kept_in_memory(tmp_path, monkeypatch):
    """A code fixer carrying a 100 KB repository snapshot kept every step's JSON in memory (about
    1 MB per step at 1 MB states); a resume loaded every stored state before reading one."""
    from loomc.history import IN_STORE
    db = tmp_path / "big.db"
    fetched: list[int] = []
    real_load_step = SQLiteStore.load_step

    def counting(self, run_id, n):
        fetched.append(n)
        return real_load_step(self, run_id, n)

    monkeypatch.setattr(SQLiteStore, "load_step", counting)
    scores = [0.1, 0.5, 0.3, 0.2, 0.4, 0.6, 0.1, 0.2]

    @loop(budget=Budget(iterations=8), backtrack=BestScore(), scorer=lambda s: scores[s["i"] - 1],
          converge_on=predicate(lambda h: h[-1].state["i"] > 99), checkpoint=str(db))
    def fixer(state: dict) -> dict:
        return {"repo": f"{state['i']}:" + "x" * 100_000, "i": state["i"] + 1}

    run = fixer.run({"repo": "", "i": 0}, run_id="big")
    assert fetched == [], "reading the newest state (the predicate) or the best (a backtrack) costs no read"
    held = [s.n for s in run.history if s[8][1] is not IN_STORE]
    assert len(held) <= 4 and run.history.best.n in held and len(run.history) - 1 in held
    for step in run.history:  # every state reads back as committed, from memory or from the store
        assert step.state["repo"].startswith(f"{step.state['i'] - 1}:")
    assert sorted(fetched) == sorted(s.n for s in run.history if s.n not in held)
    # A resume reads the state it goes on from, not all of them.
    fetched.clear()
    loaded_with_states: list[bool] = []
    real_load_steps = SQLiteStore.load_steps

    def watching(self, run_id, *, with_states=True):
        loaded_with_states.append(with_states)
        return real_load_steps(self, run_id, with_states=with_states)

    monkeypatch.setattr(SQLiteStore, "load_steps", watching)
    more = fixer.resume_run("big", budget=Budget(iterations=10))
    assert loaded_with_states == [False]
    assert set(fetched) <= {run.history[-1].n, run.history.best.n}  # where it stopped, where it goes back to
    assert len(more.history) == 10 and more.state == more.history.best.state
    assert load_history(str(db), "big")[3].state == more.history[3].state


def test_a_step_whose_scorer_failed_keeps_its_state_when_read_back_lazily(tmp_path):
    """The call returned a state and the scorer failed on it: the step failed, but its state is
    stored, and a resumed run's history still reads it (each state is fetched when read)."""
    from loomc import LastGood
    db = str(tmp_path / "scored.db")

    scored: list[int] = []

    def score(state):
        scored.append(state["i"])
        if len(scored) == 2:
            raise ValueError("cannot score this one")
        return state["i"] / 10

    @loop(budget=Budget(iterations=3), backtrack=LastGood(), scorer=score, checkpoint=db)
    def count(state: dict) -> dict:
        return {"i": state["i"] + 1}

    first = count.run({"i": 0}, run_id="scored")
    assert [s.ok for s in first.history] == [True, False, True]
    more = count.resume_run("scored", budget=Budget(iterations=4))
    assert more.history[1].error.startswith("ValueError: cannot score this one")
    assert more.history[1].state == {"i": 2} and more.history[0].state == {"i": 1}
    assert load_history(db, "scored")[1].state == {"i": 2}


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("raised", [ValueError("the judge broke"), KeyboardInterrupt()], ids=["bug", "ctrl-c"])
def test_a_policy_that_raises_after_a_paid_step_keeps_the_step_and_resume_asks_it_again(tmp_path, aio, raised):
    store = SQLiteStore(tmp_path / "p.db")
    broken, calls = [True], []

    def done(h):
        if len(h) == 2 and broken[0]:
            raise raised
        return len(h) == 4

    def body(state):
        calls.append(state)
        return state + 1

    refine = loop(policy=Budget(usd=1, iterations=10) | predicate(done), cost_fn=lambda s: 0.1,
                  checkpoint=store)(sync_or_async(body, aio))

    def go(call):
        return asyncio.run(call) if aio else call

    with pytest.raises(type(raised)):
        go(refine(0, run_id="p"))
    record = store.get_run("p")
    assert calls == [0, 1] and record.steps == 2 and record.total_cost == Decimal("0.2")  # both paid calls kept
    steps = store.load_steps("p")
    assert [s.error for s in steps] == [None, None] and steps[1].events == ("policy raised",)
    if isinstance(raised, KeyboardInterrupt):
        assert record.status == "cancelled"
    else:
        assert record.status == "failed" and record.reason == "the policy raised ValueError: the judge broke"
    broken[0] = False
    run = go(refine.resume_run("p"))
    assert calls == [0, 1, 2, 3] and run.status == "completed" and run.state == 4  # step 1 is not paid for twice
    assert store.get_run("p").total_cost == Decimal("0.4")


def test_resume_true_refuses_a_run_another_loop_started_under_the_same_id(tmp_path):
    """Two jobs that both named their runs f"nightly-{date}": the second one's `run(..., resume=True)`
    went on with the first one's run, or returned its result as its own, with a SpecChangedWarning only."""
    from loomc import StepConflict
    db = str(tmp_path / "two.db")
    calls = []

    def refine(s):
        calls.append("refine")
        if s == 1:
            raise RuntimeError("the model is down")
        return s + 1

    def summarize(s):
        calls.append("summarize")
        return s + 100

    refining = loop(budget=Budget(iterations=3), checkpoint=db)(refine)
    summarizing = loop(budget=Budget(iterations=3), checkpoint=db)(summarize)
    assert refining.run(0, run_id="nightly-1", resume=True).status == "failed"  # at its second call
    assert refining.run(10, run_id="nightly-2", resume=True).status == "budget_exhausted"
    calls.clear()
    for run_id, would in (("nightly-1", "go on with it"), ("nightly-2", "go on with it")):
        with pytest.raises(StepConflict) as refused:
            summarizing.run(0, run_id=run_id, resume=True)
        assert str(refused.value) == (
            f"run {run_id} is stored as a run of loop refine ({__name__}:test_resume_true_refuses_a_run_another_"
            f"loop_started_under_the_same_id.<locals>.refine), not of summarize: two loops share the run id, and "
            f"summarize would {would}. Give each loop's runs ids of their own (run_id=f\"summarize-...\"); if "
            f"refine was renamed summarize, go on with it by summarize.resume('{run_id}')")
    completed = loop(budget=Budget(iterations=3), converge_on=predicate(lambda h: True), checkpoint=db)(refine)
    completed.run(5, run_id="nightly-3")
    with pytest.raises(StepConflict, match="summarize would get its result"):
        loop(budget=Budget(iterations=3), converge_on=predicate(lambda h: True),
             checkpoint=db)(summarize).run(5, run_id="nightly-3", resume=True)
    assert calls == ["refine"], "nothing was called by the loop refused"
    assert SQLiteStore(db).get_run("nightly-1").status == "failed", "the other loop's run is as it was"
    with pytest.warns(SpecChangedWarning, match="the function is .*summarize \\(it was .*refine when"):
        assert summarizing.resume_run("nightly-1").status == "budget_exhausted"  # named: a renamed loop goes on
    assert calls == ["refine", "summarize"]  # the one call its cap of 3 left
    assert refining.run(10, run_id="nightly-4", resume=True).status == "budget_exhausted"  # its own ids: as before


@pytest.mark.parametrize("aio", [False, True])
def test_resume_true_with_another_state_says_the_stored_run_is_used_and_where_the_states_differ(tmp_path, aio):
    """A notebook cell (or a job) run again under the same run_id with an edited state: resume=True
    returned the stored run's result, computed from the old state, without a word."""
    import warnings
    from loomc import StateMismatchWarning
    seen = []

    def body(state):
        seen.append(state["task"])
        if state["task"] == "fail once" and len(seen) == 1:
            raise RuntimeError("the model is down")
        return {**state, "i": state["i"] + 1}

    runner = loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: h[-1].state["i"] >= 2),
                  checkpoint=str(tmp_path / "cells.db"))(sync_or_async(body, aio))

    async def in_a_coroutine(state, run_id):
        return await runner.run(state, run_id=run_id, resume=True)

    def call(state, run_id):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = asyncio.run(in_a_coroutine(state, run_id)) if aio else runner.run(state, run_id=run_id, resume=True)
        return run, [w for w in caught if w.category is StateMismatchWarning]

    run, told = call({"task": "fix bug 42", "i": 0}, "cell")
    assert run.state == {"task": "fix bug 42", "i": 2} and not told
    run, told = call({"i": 0, "task": "fix bug 42"}, "cell")  # the same state, keys in another order
    assert run.state["task"] == "fix bug 42" and not told and seen == ["fix bug 42"] * 2
    run, told = call({"task": "fix bug 43", "i": 0}, "cell")
    assert run.state == {"task": "fix bug 42", "i": 2} and seen == ["fix bug 42"] * 2, "the completed run, as before"
    assert [str(w.message) for w in told] == [
        "run cell is stored, so resume=True returns it as it completed and does not use the state passed now, "
        "which differs from the one the run started with: state['task'] is 'fix bug 43' in the state passed, "
        "'fix bug 42' in the stored one. To start a new run from this state, pass another run_id"]
    assert told[0].filename == __file__, "the warning points at the line that ran the loop"

    async def steps_of(stream):
        return [step async for step in stream]

    with pytest.warns(StateMismatchWarning, match="state passed, 'fix bug 42' in the stored one"):  # the cell's iter()
        stream = runner.iter({"task": "fix bug 44", "i": 0}, run_id="cell", resume=True)
        assert (asyncio.run(steps_of(stream)) if aio else list(stream)) == [] and stream.run.state["i"] == 2

    seen.clear()
    assert call({"task": "fail once", "i": 0}, "job")[0].status == "failed"
    run, told = call({"task": "fail once", "i": 0, "extra": [1, 2]}, "job")
    assert run.status == "completed" and run.state == {"task": "fail once", "i": 2}, "the stored run went on"
    assert len(told) == 1 and "resume=True goes on with it and does not use the state passed now" in str(told[0].message)
    assert "state['extra'] is [1, 2] in the state passed, absent in the stored one" in str(told[0].message)


def test_a_set_of_tuples_is_warned_with_the_annotation_that_keeps_it_and_a_resume_so_annotated_reads_it(tmp_path):
    """A bare set's tuples are stored as JSON lists, which a set cannot hold: the warning said to make a field
    optional or give it a default, advice that does not apply; it now names the annotation that reads them back."""
    db = str(tmp_path / "sets.db")
    seen = {(1, 2), (3, 4)}

    def grow(s):
        return s | {(len(s) + 1, 0)}

    with pytest.warns(StateRoundTripWarning, match=re.escape(
            "at field '0': Set items should be hashable, so a resume would fail when read back from the store (by a "
            "resume, or a backtrack to it). A set's tuples are stored as JSON lists, which a set cannot hold: give the "
            "set its item type, on fn's state parameter (set[tuple[int, int]]) or on the model's field")):
        first = loop(budget=Budget(iterations=2), checkpoint=db)(grow).run(seen, run_id="s1")
    with pytest.raises(CheckpointDecodeError, match=re.escape(
            "a resume with that annotation reads this run's stored states")):
        loop(budget=Budget(iterations=2), checkpoint=db)(grow).resume_run("s1", budget=Budget(iterations=3))

    def typed(s: set[tuple[int, int]]) -> set[tuple[int, int]]:
        return grow(s)

    with pytest.warns(SpecChangedWarning):  # another function: the resume says so, and goes on
        run = loop(budget=Budget(iterations=2), checkpoint=db)(typed).resume_run("s1", budget=Budget(iterations=3))
    assert run.state == first.state | {(5, 0)} and all(isinstance(t, tuple) for t in run.state)


@dataclasses.dataclass
class Grid:
    cells: dict[tuple[int, int], str]


@dataclasses.dataclass
class GridByText:
    cells: dict[str, str]


def fill(g: Grid) -> Grid:
    return Grid({**g.cells, (len(g.cells), 0): "x"})


def fill_by_text(g: GridByText) -> GridByText:
    return GridByText({**g.cells, f"{len(g.cells)},0": "x"})


def test_a_dict_keyed_by_tuples_is_warned_with_what_reads_it_back_and_its_stored_states_read_with_str_keys(tmp_path):
    """pydantic writes a tuple key (0, 1) as "0,1" and does not read it back: a correctly annotated state could not
    be resumed, and the advice (make the field optional) did not apply."""
    db = str(tmp_path / "grid.db")
    with pytest.warns(StateRoundTripWarning, match=re.escape(
            "at field 'cells.0,1.[key]': Input should be a valid array, so a resume would fail when read back from "
            "the store (by a resume, or a backtrack to it). A dict's keys are stored as JSON text, and this key type "
            "does not read back from it (pydantic writes a tuple key (0, 1) as '0,1'): key the dict by a str or an "
            "int, or keep the pairs as a list")):
        loop(budget=Budget(iterations=2), checkpoint=db)(fill).run(Grid({(0, 1): "a"}), run_id="g1")
    with pytest.raises(CheckpointDecodeError, match=re.escape(
            "this run's stored states read back with the keys typed str (dict[str, str])")):
        loop(budget=Budget(iterations=2), checkpoint=db)(fill).resume_run("g1", budget=Budget(iterations=3))
    with pytest.warns(SpecChangedWarning):
        run = loop(budget=Budget(iterations=2), checkpoint=db)(fill_by_text).resume_run("g1",
                                                                                        budget=Budget(iterations=3))
    assert run.state == GridByText({"0,1": "a", "1,0": "x", "2,0": "x", "3,0": "x"})
