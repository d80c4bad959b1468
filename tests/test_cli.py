"""The loomc command, on real databases made by real loops: click's runner and real subprocesses."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from click.testing import CliRunner

from conftest import db_flag, start_long_step
from loomc import BestScore, Budget, SQLiteStore, load_history, loop, predicate, score_plateau
from loomc.cli import main
from loomc.errors import RunAtImport
from loomc.export import history_from_export
from loomc.loop import refusing_runs

README = Path(__file__).parent.parent / "README.md"


def readme_block(marker: str) -> str:
    """The fenced text block in README.md that contains ``marker``."""
    text = README.read_text()
    at = text.index(marker)
    start = text.rindex("```text\n", 0, at) + len("```text\n")
    return text[start: text.index("```", at)]


def make_failed_run(db: str) -> str:
    calls = {"n": 0}

    @loop(budget=Budget(usd=2.00, iterations=15), cost_fn=lambda s: 0.05, scorer=lambda s: s["score"],
          checkpoint=db)
    def refine_report(state):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("rate limit")
        return {"score": state["score"] + 0.25}

    with pytest.raises(RuntimeError):
        refine_report({"score": 0.0}, run_id="a1b2c3d4e5f6")
    return "a1b2c3d4e5f6"


def invoke(*args, env=None):
    result = CliRunner().invoke(main, list(args), env=env)
    return result


def test_runs_and_show_print_the_readme_layouts_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default file, as in the README: its hints need no --db
    monkeypatch.delenv("LOOMC_DB", raising=False)
    db = str(tmp_path / ".loomc" / "checkpoints.db")
    run_id = make_failed_run(db)
    created = SQLiteStore(db).get_run(run_id).created_at
    from loomc.cli import iso
    runs = invoke("runs", "--db", db)
    assert runs.exit_code == 0, runs.output
    expected_runs = readme_block("$ loomc runs").split("\n\n", 1)[1]
    assert runs.output == expected_runs.replace("2026-07-03T12:00:19", iso(created))
    # The calls took no time here; the README shows the times of real model calls.
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany("UPDATE steps SET duration = ? WHERE step_n = ?", [(4.21, 0), (38.6, 1), (185.2, 2), (0.4, 3)])
    show = invoke("show", run_id)
    assert show.exit_code == 0
    assert show.output == readme_block("$ loomc show a1b2c3d4e5f6").split("\n\n", 1)[1]


def test_show_marks_backtracks_and_convergence(tmp_path):
    db = str(tmp_path / "m.db")
    scores = iter([0.3, 0.5, 0.8, 0.6, 0.8, 0.8, 0.8])

    @loop(converge_on=score_plateau(3), backtrack=BestScore(), scorer=lambda s: s, checkpoint=db)
    def climb(state):
        return next(scores)

    run = climb.run(0.0)
    out = invoke("show", run.id, "--db", db).output
    rows = out.splitlines()
    assert re.search(r"^   3 .*0\.6000 +[0-9.]+s  <- backtrack to step 2$", out, re.M)
    assert rows[-1].endswith("<- converged")
    assert "Stopped: score_plateau" in out and "Status: completed" in out


def test_runs_names_each_runs_loop_and_lists_one_loop_on_request(tmp_path):
    """A file that several loops share listed hex ids and statuses: nothing said which loop a run was, so
    the failed `refine_report` runs could not be told from the `summarize` ones."""
    db = str(tmp_path / "loops.db")

    @loop(budget=Budget(iterations=1), checkpoint=db)
    def refine_report(state):
        return state + 1

    @loop(budget=Budget(iterations=1), checkpoint=db)
    def summarize_each_chapter_of_the_book_twice(state):
        return state + 1

    refine_report.run(0, run_id="r1")
    summarize_each_chapter_of_the_book_twice.run(0, run_id="s1")
    refine_report.run(0, run_id="r2")
    loop(budget=Budget(iterations=1), checkpoint=db)(lambda s: s + 1).run(0, run_id="anon")
    listed = invoke("runs", "--db", db).output.splitlines()
    assert listed[0].split() == ["ID", "LOOP", "STATUS", "STEPS", "COST", "CREATED"]
    assert listed[-1] == "4 runs, $0.0000 in all"
    assert {line.split()[0]: line.split()[1] for line in listed[2:-1]} == {
        "r1": "refine_report", "r2": "refine_report", "s1": "summarize_each_chapte...", "anon": "-"}
    assert len(listed[1]) == len(listed[2].rstrip()), "the rule is as wide as a row"
    only = invoke("runs", "--db", db, "--loop", "refine_report").output.splitlines()
    assert [line.split()[0] for line in only[2:-1]] == ["r2", "r1"]
    path = SQLiteStore(db).get_run("s1").fn_path
    assert path.endswith(":test_runs_names_each_runs_loop_and_lists_one_loop_on_request.<locals>."
                         "summarize_each_chapter_of_the_book_twice")
    for name in (path, "summarize_each_chapter_of_the_book_twice"):
        assert [line.split()[0] for line in invoke("runs", "--db", db, "--loop", name).output.splitlines()[2:]] \
            == ["s1"]
        assert [r["id"] for r in json.loads(invoke("runs", "--db", db, "--loop", name, "--json").output)] == ["s1"]
    assert [line.split()[0] for line in invoke("runs", "--db", db, "--loop", "refine_report", "--limit", "1",
                                               "--why").output.splitlines()[2:]] == ["r2"]
    missed = CliRunner().invoke(main, ["runs", "--db", db, "--loop", "refine"])
    assert missed.exit_code == 0 and len(missed.stdout.splitlines()) == 2  # the header alone
    assert missed.stderr.strip() == ("No run of a loop named 'refine' here; the loops with runs: refine_report, "
                                     "summarize_each_chapter_of_the_book_twice")
    assert invoke("show", "r1", "--db", db).output.startswith("Run: r1  Loop: refine_report  Status: ")
    # A filter that matches nothing: the empty table read like a broken command; stderr now says so.
    none = CliRunner().invoke(main, ["runs", "--db", db, "--status", "crashed", "--since", "1h"])
    assert none.exit_code == 0 and len(none.stdout.splitlines()) == 2
    assert none.stderr.strip() == f"No run matches --status crashed, --since 1h in {Path(db).resolve()}"
    empty = SQLiteStore(tmp_path / "empty.db").path
    assert CliRunner().invoke(main, ["runs", "--db", str(empty)]).stderr.strip() == f"No run in {empty} yet"


def test_show_says_what_the_run_spent_on_each_line_item(tmp_path):
    """A run that cost $3 where $1 was expected: which calls took the money? Each step's line items
    (`loomc.charge(usd, item)`, an adapter's model, the judge) are summed over the run."""
    import loomc
    db = str(tmp_path / "items.db")

    @loop(budget=Budget(usd=1, iterations=4), checkpoint=db)
    def write(state):
        loomc.charge(0.02, "claude-sonnet-4-5")
        if state % 2:
            loomc.charge(0.005, "judge")
        loomc.charge(0.001)
        return state + 1

    write.run(0, run_id="items")
    shown = invoke("show", "items", "--db", db).output.splitlines()
    assert shown[3:5] == ["Spent: $0.0940 of $1.0000 budget in 4 steps, 1 attempt",
                          "By item: claude-sonnet-4-5 $0.0800 in 4 steps; judge $0.0100 in 2 steps; the rest $0.0040"]
    make_failed_run(db)
    plain = invoke("show", "a1b2c3d4e5f6", "--db", db).output.splitlines()
    assert not any(line.startswith("By item:") for line in plain), "no line items, no line"


def test_runs_says_what_the_runs_listed_spent_in_all_and_lists_recent_ones(tmp_path):
    """"How much did the nightly jobs spend today?" needed the JSON and a sum by hand, which counted a child
    run's spend twice: it is in its parent's step already."""
    db = str(tmp_path / "spend.db")

    @loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.25, checkpoint=db)
    def research(state):
        return state + 1

    @loop(budget=Budget(iterations=1), cost_fn=lambda s: 0.05, checkpoint=db)
    def write_report(state):
        return research.run(state).state  # a child run that spends $0.50, billed to this step

    write_report.run(0, run_id="report")
    research.run(0, run_id="alone")
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE runs SET created_at = created_at - 2 * 86400 WHERE id = 'alone'")
    conn.close()
    listed = invoke("runs", "--db", db).output.splitlines()
    assert listed[-1] == "3 runs, $1.0500 in all (a child run's spend counted once, in its parent's)"
    assert invoke("runs", "--db", db, "--loop", "research").output.splitlines()[-1] == "2 runs, $1.0000 in all"
    recent = invoke("runs", "--db", db, "--since", "1d").output.splitlines()
    assert [line.split()[0] for line in recent[2:-1]] == ["report-0-0", "report"] and recent[-1].startswith("2 runs")
    assert [r["id"] for r in json.loads(invoke("runs", "--db", db, "--since", "1d", "--json").output)] == [
        "report-0-0", "report"]
    one = invoke("runs", "--db", db, "--since", "1d", "--loop", "write_report").output.splitlines()
    assert len(one) == 3 and one[-1].startswith("report "), "one run: no line of totals"
    bad = invoke("runs", "--db", db, "--since", "lately")
    assert bad.exit_code == 1 and "--since='lately' is not a duration" in bad.output
    assert invoke("runs", "--db", db, "--since", "86400", "--json").output == \
        invoke("runs", "--db", db, "--since", "1d", "--json").output  # seconds, as a plain number


def test_show_gives_a_run_under_a_wall_clock_cap_its_active_time_against_the_cap(tmp_path):
    from conftest import FakeClock
    db, clock = str(tmp_path / "w.db"), FakeClock()
    slow = loop(budget=Budget(wall_clock="10m", usd=1), cost_fn=lambda s: 0.01, clock=clock, checkpoint=db)(
        lambda s: clock.advance(150) or s + 1)
    slow.run(0, run_id="w")
    shown = invoke("show", "w", "--db", db).output.splitlines()
    assert shown[3:5] == ["Spent: $0.0400 of $1.0000 budget in 4 steps, 1 attempt", "Active: 10m00s of the 10m cap"]
    # The file is not the default one, so the command names it.
    assert f"`loomc resume --db {SQLiteStore(db).path} w --wall-clock 30m` continues it" in shown[1]
    loop(budget=Budget(wall_clock=90, iterations=1), checkpoint=db)(lambda s: s + 1).run(0, run_id="secs")
    assert re.search(r"^Active: \S+ of the 90s cap$", invoke("show", "secs", "--db", db).output, re.M)
    loop(budget=Budget(iterations=1), checkpoint=db)(lambda s: s + 1).run(0, run_id="none")
    assert "Active:" not in invoke("show", "none", env={"LOOMC_DB": db}).output  # no wall-clock cap: no line


def test_a_cheap_models_cents_show_in_every_table_instead_of_zeros(tmp_path):
    """Regression: steps of a cheap model ($0.00003 each) showed as $0.0000 in `loomc show`, the run's
    spend as $0.0001, and the notebook's table likewise: as if nothing had been recorded."""
    db = str(tmp_path / "cheap.db")

    @loop(budget=Budget(usd=0.01, iterations=3), cost_fn=lambda s: 0.00003, checkpoint=db)
    def classify(state):
        return state + 1

    run = classify.run(0, run_id="cheap")
    shown = invoke("show", "cheap", "--db", db).output
    assert "Spent: $0.00009 of $0.0100 budget in 3 steps" in shown
    assert "   1  $0.00003  $0.00006      -" in shown
    assert re.search(r"cheap +classify +budget_exhausted +3 +\$0\.00009 ", invoke("runs", "--db", db).output)
    assert "$0.00009" in repr(run) and "<td>$0.00003</td><td>$0.00006</td>" in run._repr_html_()
    assert invoke("show", "cheap", "--step", "2", "--db", db).output.count("$0.00009") == 1
    tiny = loop(budget=Budget(usd=0.00005), cost_fn=lambda s: 0.00003, checkpoint=db)(lambda s: s + 1)
    tiny.run(0, run_id="tiny")  # its policy reads Budget(usd=5e-05)
    assert "Spent: $0.00003 of $0.00005 budget in 1 step" in invoke("show", "tiny", "--db", db).output


def test_runs_filters_and_json(tmp_path):
    db = str(tmp_path / "f.db")
    make_failed_run(db)
    ok = loop(budget=Budget(iterations=2), converge_on=predicate(lambda h: len(h) == 2), checkpoint=db)(
        lambda s: s + 1)
    done = ok.run(0)
    out = invoke("runs", "--db", db, "--status", "completed").output
    assert done.id in out and "a1b2c3d4e5f6" not in out
    typo = invoke("runs", "--db", db, "--status", "budget-exhausted")  # an empty table would say "no such runs"
    assert typo.exit_code == 2 and "'budget-exhausted' is not one of 'completed', 'failed'" in typo.output
    assert len(invoke("runs", "--db", db, "--limit", "1").output.splitlines()) == 3
    rows = json.loads(invoke("runs", "--db", db, "--json").output)
    assert [r["id"] for r in rows] == [done.id, "a1b2c3d4e5f6"]
    assert rows[1]["status"] == "failed" and rows[1]["total_cost_usd"] == "0.15" and rows[1]["steps"] == 4


def test_show_of_a_live_run_calls_its_charges_in_flight_not_uncommitted(tmp_path):
    """A run still driven: what its step in flight charged will commit with it; "never committed" was wrong."""
    import threading
    import loomc
    db = str(tmp_path / "live.db")
    charged, go_on = threading.Event(), threading.Event()

    @loop(budget=Budget(iterations=1), checkpoint=db)
    def slow(state):
        loomc.charge(0.25)
        charged.set()
        go_on.wait(30)
        return state + 1

    worker = threading.Thread(target=lambda: slow.run(0, run_id="live"))
    worker.start()
    try:
        assert charged.wait(30)
        shown = invoke("show", "live", "--db", db).output
        assert "Status: running" in shown and "Uncommitted" not in shown, shown
        assert "In flight: $0.2500 charged so far during step 0, which commits with it" in shown, shown
    finally:
        go_on.set()
        worker.join(30)
    assert "In flight" not in invoke("show", "live", "--db", db).output


def test_loomc_db_environment_variable_points_at_the_database(tmp_path):
    db = str(tmp_path / "env.db")
    make_failed_run(db)
    assert "a1b2c3d4e5f6" in invoke("runs", env={"LOOMC_DB": db}).output


def test_db_given_before_the_command_is_read_by_it_and_the_commands_own_wins(tmp_path):
    """`loomc --db F runs`, as git -C and most tools take a global option, was "No such option '--db'"."""
    db, other = str(tmp_path / "before.db"), str(tmp_path / "other.db")
    make_failed_run(db)
    assert "a1b2c3d4e5f6" in invoke("--db", db, "runs").output
    assert "Run: a1b2c3d4e5f6" in invoke("--db", db, "show", "a1b2c3d4e5f6").output
    loop(budget=Budget(iterations=1), checkpoint=other)(lambda s: s + 1).run(0, run_id="elsewhere")
    out = invoke("--db", db, "runs", "--db", other).output
    assert "elsewhere" in out and "a1b2c3d4e5f6" not in out
    assert "elsewhere" in invoke("--db", other, "runs", env={"LOOMC_DB": db}).output  # and wins over $LOOMC_DB


def test_export_round_trips_the_whole_run(tmp_path):
    db = str(tmp_path / "x.db")
    run_id = make_failed_run(db)
    result = invoke("export", run_id, "--json", "--db", db)
    data = json.loads(result.output)
    assert data["run"]["id"] == run_id and data["run"]["initial_state"] == {"score": 0.0}
    assert [s["step_n"] for s in data["steps"]] == [0, 1, 2, 3]
    assert data["steps"][0] == {**data["steps"][0], "cost_usd": "0.05", "score": 0.25, "error": None,
                                "state": {"score": 0.25}}
    assert data["steps"][3]["error"] == "RuntimeError: rate limit"
    rebuilt = history_from_export(result.output)
    original = load_history(SQLiteStore(db), run_id)
    assert rebuilt == original and rebuilt.total_cost == Decimal("0.15")
    assert score_plateau(2).replay(rebuilt).stopped_after == score_plateau(2).replay(original).stopped_after


def test_export_is_strict_json_when_a_score_is_nan_or_infinite_and_reads_back_the_same(tmp_path):
    """JSON has no NaN or Infinity; the export wrote them bare, which jq, JavaScript and most parsers
    outside Python refuse. Such a score is now null, its value kept in the step's metrics."""
    db = str(tmp_path / "x.db")
    odd = [0.5, math.nan, math.inf, -math.inf]

    @loop(budget=Budget(iterations=4), scorer=lambda s: odd[s - 1], checkpoint=db)
    def count(state):
        return state + 1

    count.run(0, run_id="odd")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    data = json.loads(invoke("export", "odd", "--json", "--db", db).output, parse_constant=refuse)
    assert [s["score"] for s in data["steps"]] == [0.5, None, None, None]
    assert [s["metrics"] for s in data["steps"]] == [{}, {"loomc.score": "nan"}, {"loomc.score": "inf"},
                                                     {"loomc.score": "-inf"}]
    rebuilt = history_from_export(data)
    assert rebuilt == load_history(SQLiteStore(db), "odd")
    assert rebuilt[0].score == 0.5 and math.isnan(rebuilt[1].score) and rebuilt[2].score == math.inf
    assert rebuilt[3].score == -math.inf and all(not s.metrics for s in rebuilt)


@pytest.mark.parametrize("text", [False, True], ids=["export_run", "export_text"])
def test_an_export_of_a_run_that_goes_on_meanwhile_is_one_snapshot(tmp_path, monkeypatch, text):
    """Regression: an export read the run's record, then its steps, then each state, one query each, while the
    run went on: a step committed in between gave a record of 2 steps and $0.02 with 3 steps listed (4 exports
    in 100 of a live run, measured). On the SQLite store they are now read as one snapshot."""
    from loomc.export import export_run, export_text
    db = str(tmp_path / "x.db")
    loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.01, checkpoint=db)(lambda s: s + 1).run(0, run_id="live")
    store = SQLiteStore(db)
    load_steps = store.load_steps

    def a_step_commits_first(run_id, **kwargs):  # another process commits step 2, with the run's totals
        with closing(sqlite3.connect(db)) as other, other:
            other.execute("INSERT INTO steps (run_id, step_n, state_blob, cost_usd, timestamp) "
                          "VALUES ('live', 2, '3', '0.01', 0)")
            other.execute("UPDATE runs SET steps = 3, total_cost = '0.03' WHERE id = 'live'")
        return load_steps(run_id, **kwargs)

    monkeypatch.setattr(store, "load_steps", a_step_commits_first)
    exported = json.loads("".join(export_text(store, "live"))) if text else export_run(store, "live")
    assert (exported["run"]["steps"], exported["run"]["total_cost_usd"]) == (2, "0.02")
    assert [s["step_n"] for s in exported["steps"]] == [0, 1], "the steps as of the record"
    monkeypatch.undo()
    assert len(export_run(store, "live")["steps"]) == 3  # and the next export sees the new step


def test_show_of_a_run_that_goes_on_meanwhile_is_one_snapshot(tmp_path, monkeypatch):
    """`loomc show` reads the run's record and its steps as one snapshot too: its Spent line and its table agree."""
    db = str(tmp_path / "s.db")
    loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.01, checkpoint=db)(lambda s: s + 1).run(0, run_id="live")
    load_steps = SQLiteStore.load_steps

    def a_step_commits_first(self, run_id, **kwargs):
        with closing(sqlite3.connect(db)) as other, other:
            other.execute("INSERT OR IGNORE INTO steps (run_id, step_n, state_blob, cost_usd, timestamp) "
                          "VALUES ('live', 2, '3', '0.01', 0)")
            other.execute("UPDATE runs SET steps = 3, total_cost = '0.03' WHERE id = 'live'")
        return load_steps(self, run_id, **kwargs)

    monkeypatch.setattr(SQLiteStore, "load_steps", a_step_commits_first)
    shown = invoke("show", "live", "--db", db).output.splitlines()
    assert shown[3].startswith("Spent: $0.0200 ") and "in 2 steps" in shown[3]
    assert shown[-1].split()[:2] == ["1", "$0.0100"], "the last row is step 1, as of the record"


def test_runs_lists_what_steps_in_flight_charged_as_of_the_same_moment_as_the_runs(tmp_path, monkeypatch):
    """`loomc runs` adds what a step in flight has charged to its run's cost. Read one after the other, a step
    that committed in between (its charges cleared, the run's total not yet read with them) went missing from
    the listed cost; they are read as one snapshot."""
    db = str(tmp_path / "r.db")
    loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.01, checkpoint=db)(lambda s: s + 1).run(0, run_id="live")
    SQLiteStore(db).charge("live", 2, Decimal("0.5"))  # step 2 in flight has charged $0.50
    pending_by_run = SQLiteStore.pending_by_run

    def step_2_commits_first(self):
        with closing(sqlite3.connect(db)) as other, other:
            other.execute("INSERT OR IGNORE INTO steps (run_id, step_n, state_blob, cost_usd, timestamp) "
                          "VALUES ('live', 2, '3', '0.5', 0)")
            other.execute("UPDATE runs SET steps = 3, total_cost = '0.52' WHERE id = 'live'")
            other.execute("DELETE FROM charges WHERE run_id = 'live'")
        return pending_by_run(self)

    monkeypatch.setattr(SQLiteStore, "pending_by_run", step_2_commits_first)
    row = invoke("runs", "--db", db).output.splitlines()[2].split()
    assert row[3:5] == ["2", "$0.5200*"], "2 steps committed and $0.50 in flight, or 3 and $0.52: never $0.02"


def test_export_writes_one_state_at_a_time_the_same_json_as_export_run(tmp_path, monkeypatch):
    """`loomc export` of a run of 100 MB of states used to hold them all, and their JSON, at once (333 MB
    of memory); it now reads and writes one state at a time, and prints the same bytes."""
    from loomc import MemoryStore
    from loomc.export import export_run, export_text
    db = str(tmp_path / "x.db")

    @loop(budget=Budget(iterations=3), checkpoint=db)
    def notes(state):
        return {"text": state["text"] + "é\u202e\n", "list": [1, {"a": None}]}

    notes.run({"text": "ü"}, run_id="n")
    store = SQLiteStore(db)
    whole = json.dumps(export_run(store, "n"), indent=2, ensure_ascii=False)
    assert invoke("export", "n", "--json", "--db", db).output == whole + "\n"
    read = []
    load_step = store.load_step
    monkeypatch.setattr(store, "load_step", lambda run_id, n: read.append(n) or load_step(run_id, n))
    pieces = export_text(store, "n")
    assert next(pieces).endswith('"steps": [\n    ') and read == []
    assert json.loads(next(pieces))["step_n"] == 0 and read == [0], "one state read per step written"
    assert "".join(pieces) and read == [0, 1, 2]

    memory = MemoryStore()  # a store without states in a file: the same text
    loop(budget=Budget(iterations=2), checkpoint=memory)(notes.fn).run({"text": "ü"}, run_id="m")
    assert "".join(export_text(memory, "m")) == json.dumps(export_run(memory, "m"), indent=2, ensure_ascii=False)
    with closing(sqlite3.connect(db)) as conn, conn:  # a run killed before its first commit: no steps
        conn.execute("INSERT INTO runs (id, status, created_at, updated_at, initial_state) "
                     "VALUES ('empty', 'running', 0, 0, '{}')")
    conn.close()
    assert "".join(export_text(store, "empty")) == json.dumps(export_run(store, "empty"), indent=2,
                                                               ensure_ascii=False)
    assert json.loads(invoke("export", "empty", "--json", "--db", db).output)["steps"] == []


@pytest.mark.parametrize("args, words", [
    (["show", "nosuchrun"], "no run 'nosuchrun'"),
    (["export", "nosuchrun", "--json"], "no run 'nosuchrun'"),
    (["resume", "nosuchrun"], "no run 'nosuchrun'"),
])
def test_an_unknown_run_is_one_line_on_stderr(tmp_path, args, words):
    db = str(tmp_path / "u.db")
    make_failed_run(db)
    proc = subprocess.run(["loomc", *args, "--db", db], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and words in proc.stderr and "Traceback" not in proc.stderr


def test_an_id_given_cut_short_is_told_the_whole_ids_that_begin_so_and_never_taken_for_one(tmp_path):
    """`loomc show a1b2` (the first characters of an id, as git takes them) said only "no run 'a1b2'"."""
    db = str(tmp_path / "p.db")
    make_failed_run(db)
    for command in ("show", "resume"):
        proc = subprocess.run(["loomc", command, "a1b2", "--db", db], capture_output=True, text=True)
        assert proc.returncode == 1
        assert proc.stderr == f"loomc: no run 'a1b2' in {db}; the ids that begin so: a1b2c3d4e5f6; give the whole id\n"
    assert invoke("show", "zz", "--db", db).output == f"loomc: no run 'zz' in {db}\n"


def test_bad_databases_are_one_clear_line(tmp_path):
    missing = subprocess.run(["loomc", "runs", "--db", str(tmp_path / "none.db")], capture_output=True, text=True)
    assert missing.returncode == 1 and "no loomc database at" in missing.stderr
    assert not (tmp_path / "none.db").exists(), "reading must not create a database"
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    proc = subprocess.run(["loomc", "runs", "--db", str(newer)], capture_output=True, text=True)
    assert proc.returncode == 1 and "upgrade loomc" in proc.stderr and proc.stderr.count("\n") == 1
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"\x00garbage" * 500)
    proc = subprocess.run(["loomc", "show", "x", "--db", str(corrupt)], capture_output=True, text=True)
    assert proc.returncode == 1 and "corrupt" in proc.stderr and str(corrupt) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hostile_text_is_escaped_before_it_reaches_the_terminal(tmp_path):
    db = str(tmp_path / "h.db")

    @loop(budget=Budget(iterations=3), checkpoint=db)
    def evil(state):
        raise ValueError("\x1b]0;pwned\x07\x1b[2J\u202egnp.exe\r\nfake row")

    with pytest.raises(ValueError):
        evil({}, run_id="evil\x1b[31m")
    for args in (["show", "evil\x1b[31m"], ["runs"]):
        out = invoke(*args, "--db", db).output
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    out = invoke("show", "evil\x1b[31m", "--db", db).output
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\u202egnp.exe\\r\\nfake row" in out


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    from loomc import cli
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli.paint("failed", "red") != "failed"
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli.paint("failed", "red") == "failed"


FOLLOWED = """
import os, signal, sys, time
import loomc
from loomc import Budget, loop
@loop(budget=Budget(iterations=15), checkpoint=sys.argv[1])
def slow(state):
    time.sleep(0.1)
    loomc.charge(0.01)
    if state == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # dies during this step
    return state + 1
slow.run(0, run_id="watched")
"""


@pytest.mark.parametrize("die_at", [None, 5])
def test_show_follow_prints_each_step_as_it_commits_until_the_run_stops(tmp_path, die_at):
    """Watching a loop that runs in a pod from another shell meant running `loomc show` again and again."""
    db = str(tmp_path / "watch.db")
    script = tmp_path / "slow.py"
    script.write_text(FOLLOWED)
    looping = subprocess.Popen([sys.executable, str(script), db, str(-1 if die_at is None else die_at)])
    for _ in range(200):  # until the run is stored
        if os.path.exists(db) and SQLiteStore(db).list_runs():
            break
        time.sleep(0.05)
    watched = subprocess.run(["loomc", "show", "watched", "--db", db, "--follow"], capture_output=True, text=True,
                             timeout=60)
    looping.wait(timeout=60)
    lines = watched.stdout.splitlines()
    at = lines.index("STEP      COST     CUMUL    SCORE     TIME  ERROR")
    rows, last = lines[at + 2:-1], lines[-1]
    made = 15 if die_at is None else die_at
    assert [int(row.split()[0]) for row in rows] == list(range(made)), watched.stdout  # each step once, in order
    assert rows[-1].split()[1:3] == ["$0.0100", f"${made / 100:.4f}"]  # the cumulative cost runs on
    assert all(0.1 <= float(row.split()[4].rstrip("s")) < 10 for row in rows)  # each step sleeps 0.1 s or more
    assert watched.returncode == 2
    if die_at is None:
        assert last == "Stopped: budget_exhausted: iterations: 15 of 15 calls made; spent $0.1500 in 15 steps"
    else:
        assert re.fullmatch(r"Stopped: crashed: its process \(.+\) died during step 5; spent \$0\.0500 in 5 steps",
                            last), last



def test_show_follow_reads_on_in_the_file_written_back_after_it_was_deleted(tmp_path):
    """The follower's connection read the deleted file, which took no more commits: it said the run's process
    died during step 5 while the run went on, and completed, in the file written back at the path."""
    import shutil
    folder = tmp_path / ".loomc"
    db = str(folder / "watch.db")
    script = tmp_path / "slow.py"
    script.write_text(FOLLOWED)
    looping = subprocess.Popen([sys.executable, str(script), db, "-1"], stderr=subprocess.PIPE, text=True)
    for _ in range(200):  # until the run is stored
        if os.path.exists(db) and SQLiteStore(db).list_runs():
            break
        time.sleep(0.05)
    watched = subprocess.Popen(["loomc", "show", "watched", "--db", db, "--follow"], stdout=subprocess.PIPE,
                               text=True)
    for _ in range(400):  # until the follower has seen a few steps
        probe = sqlite3.connect(db)
        done = probe.execute("SELECT count(*) FROM steps").fetchone()[0]
        probe.close()
        if done >= 4:
            break
        time.sleep(0.02)
    shutil.rmtree(folder)  # `rm -r .loomc` while the run goes on and somebody watches it
    out, _ = watched.communicate(timeout=60)
    _, err = looping.communicate(timeout=60)
    assert "CheckpointMovedWarning" in err
    lines = out.splitlines()
    at = lines.index("STEP      COST     CUMUL    SCORE     TIME  ERROR")
    assert [int(row.split()[0]) for row in lines[at + 2:-1]] == list(range(15)), out
    assert lines[-1] == "Stopped: budget_exhausted: iterations: 15 of 15 calls made; spent $0.1500 in 15 steps"


BUSY = """
import sys
from loomc import Budget, SQLiteStore, loop
@loop(budget=Budget(iterations=400), cost_fn=lambda s: 0.01, checkpoint=SQLiteStore(sys.argv[1], durability="normal"))
def busy(state):
    return {"i": state["i"] + 1, "pad": "z" * 500}
for k in range(1000):
    busy.run({"i": 0, "pad": ""}, run_id=f"busy-{k}")
"""


def test_backup_copies_a_consistent_database_while_loops_write_to_it(tmp_path):
    """`cp checkpoints.db backup.db` while a loop runs copied a file whose last commits (here, all of them)
    were still in the write-ahead log: the copy missed them. `loomc backup` copies through SQLite."""
    db = str(tmp_path / "live.db")
    script = tmp_path / "busy.py"
    script.write_text(BUSY)
    writer = subprocess.Popen([sys.executable, str(script), db])
    try:
        for _ in range(400):  # until some steps are committed
            if os.path.exists(db) and len(SQLiteStore(db).list_runs()) >= 2:
                break
            time.sleep(0.05)
        done = invoke("backup", str(tmp_path / "copy.db"), "--db", db)
        assert writer.poll() is None, "the loops were still writing during the backup"
    finally:
        writer.kill()
        writer.wait()
    assert done.exit_code == 0 and done.output.startswith("Copied "), done.output
    copy = SQLiteStore(tmp_path / "copy.db")
    runs = copy.list_runs()
    assert len(runs) >= 2
    for run in runs:  # every run whole as of one moment: its steps 0..n-1, each cost counted once
        steps = copy.load_steps(run.id)
        assert [s.n for s in steps] == list(range(len(steps)))
        assert [json.loads(s.state_json)["i"] for s in steps] == list(range(1, len(steps) + 1))
    finished = [r for r in runs if r.status == "budget_exhausted"]
    assert finished and all(r.steps == 400 and r.total_cost == Decimal("4.00") for r in finished)
    again = invoke("backup", str(tmp_path / "copy.db"), "--db", db)
    assert again.exit_code == 1 and "exists already: loomc backup writes a new file, and never overwrites" \
        in again.output

    # A store still open: every commit is in the write-ahead log, which a copy of the file alone misses.
    import shutil
    store = SQLiteStore(tmp_path / "open.db")
    loop(budget=Budget(iterations=50), checkpoint=store)(lambda s: s + 1).run(0, run_id="w")
    shutil.copy(tmp_path / "open.db", tmp_path / "cp.db")
    with closing(sqlite3.connect(tmp_path / "cp.db")) as plain, plain:
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            plain.execute("SELECT count(*) FROM steps")
    plain.close()
    assert store.backup(tmp_path / "snap.db") == {"runs": 1, "steps": 50,
                                                  "bytes": os.path.getsize(tmp_path / "snap.db")}
    assert [s.n for s in SQLiteStore(tmp_path / "snap.db").load_steps("w")] == list(range(50))
    assert store.backup(tmp_path / "new" / "folder" / "snap.db")["steps"] == 50, "its folder is made"


def test_demo_crash_then_resume_from_the_cli(tmp_path):
    env = {**os.environ, "LOOMC_DB": str(tmp_path / "demo.db")}
    crashed = subprocess.run(["loomc", "demo", "--crash-at", "2"], capture_output=True, text=True, env=env,
                             cwd=tmp_path)
    assert crashed.returncode != 0 and "dies here" in crashed.stdout
    (row,) = json.loads(subprocess.run(["loomc", "runs", "--json"], capture_output=True, text=True, env=env).stdout)
    assert row["status"] == "running" and row["steps"] == 2  # as stored; the tables say what happened
    listed = subprocess.run(["loomc", "runs"], capture_output=True, text=True, env=env).stdout
    assert listed.splitlines()[2].split()[:4] == [row["id"], "fix_code", "crashed", "2"]
    # What to type, in any shell: the file is named, since $LOOMC_DB may not be set there.
    assert crashed.stdout.splitlines()[-1].endswith(f"`loomc resume {db_flag(env['LOOMC_DB'])} {row['id']}` finishes "
                                                    "the run")
    # Its cost counts what the crashed step charged, marked: it was the committed steps' alone
    in_flight = SQLiteStore(tmp_path / "demo.db").pending_charges(row["id"])[2]
    assert listed.splitlines()[2].split()[4] == f"${Decimal(row['total_cost_usd']) + in_flight:.4f}*", listed
    assert listed.splitlines()[3] == ("* with what a step in flight charged, not yet committed (a resume of a crashed "
                                      "run records it)")
    for flag in ([], ["--json"]):
        only = subprocess.run(["loomc", "runs", "--status", "crashed", *flag], capture_output=True, text=True, env=env)
        assert row["id"] in only.stdout
        assert row["id"] not in subprocess.run(["loomc", "runs", "--status", "completed", *flag],
                                               capture_output=True, text=True, env=env).stdout
    shown = subprocess.run(["loomc", "show", row["id"]], capture_output=True, text=True, env=env).stdout
    assert "Status: crashed" in shown
    assert f"died during step 2; `loomc resume {db_flag(env['LOOMC_DB'])} {row['id']}` continues it" in shown
    charged = SQLiteStore(tmp_path / "demo.db").pending_charges(row["id"])[2]
    assert f"Uncommitted: ${charged:.4f} charged during step 2, which never committed" in shown
    exported = json.loads(subprocess.run(["loomc", "export", row["id"], "--json"], capture_output=True, text=True,
                                         env=env).stdout)
    assert exported["run"]["uncommitted_charges_usd"] == {"2": str(charged)}
    (listed_json,) = json.loads(subprocess.run(["loomc", "runs", "--json"], capture_output=True, text=True,
                                               env=env).stdout)
    assert listed_json["uncommitted_charges_usd"] == {"2": str(charged)}
    resumed = subprocess.run(["loomc", "resume", row["id"]], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Status: completed" in resumed.stdout and "<- interrupted" in resumed.stdout
    assert "<- converged" in resumed.stdout
    store = SQLiteStore(tmp_path / "demo.db")
    run = store.get_run(row["id"])
    assert run.total_cost == sum((s.cost for s in store.load_steps(row["id"])), Decimal(0))
    assert run.total_cost < Decimal("1.00")


def test_only_runs_whose_process_is_gone_are_crashed(tmp_path):
    import socket
    from loomc.stores.base import Drive
    from loomc.testing import make_run
    db = str(tmp_path / "c.db")
    store, alive = SQLiteStore(db), Drive()  # alive: a drive of this process, still held
    store.create_run(make_run("live").replace(owner=alive.owner))
    store.create_run(make_run("gone").replace(owner=f"{socket.gethostname()}:999999999:t1.abcdef"))
    store.create_run(make_run("elsewhere").replace(owner="another-host:1:abcdef"))
    listed = {line.split()[0]: line.split()[2] for line in invoke("runs", "--db", db).output.splitlines()[2:-1]}
    assert listed == {"live": "running", "gone": "crashed", "elsewhere": "running"}
    assert invoke("runs", "--status", "crashed", "--db", db).output.splitlines()[2].split()[0] == "gone"
    assert [r["id"] for r in json.loads(invoke("runs", "--status", "crashed", "--json", "--db", db).output)] == ["gone"]


def test_runs_why_says_briefly_why_each_run_stopped(tmp_path):
    from loomc.testing import make_run
    db = str(tmp_path / "why.db")
    store = SQLiteStore(db)
    long = "ValueError: " + "the model returned\x1b[2J an error page " * 10
    for run_id, status, reason in (("short", "completed", "predicate(done) is true"), ("long", "failed", long),
                                   ("going", "running", None)):
        store.create_run(make_run(run_id))
        if status != "running":
            store.finish_run(run_id, status, reason, None)
    assert "STOPPED" not in invoke("runs", "--db", db).output  # the default layout is the documented one
    out = invoke("runs", "--why", "--db", db).output
    assert out.splitlines()[0].endswith("CREATED              STOPPED")
    stopped = {line.split()[0]: line.split("  ")[-1] for line in out.splitlines()[2:]}
    assert stopped["short"] == "predicate(done) is true"
    assert stopped["long"] == "ValueError: the model returned\\x1b[2J an error page t..."  # 50 cut, then escaped
    assert not out.splitlines()[2 + list(stopped).index("going")].endswith(" ")
    import socket
    store.create_run(make_run("dead").replace(owner=f"{socket.gethostname()}:999999999:t1.abcdef"))
    assert invoke("runs", "--why", "--status", "crashed", "--db", db).output.splitlines()[2].endswith(
        "  its process died")


def test_a_run_whose_process_is_stopped_says_so_rather_than_that_it_died(tmp_path):
    """A loop stopped with Ctrl-Z (SIGSTOP) past its lease was listed as `its process died`, and `loomc show` said
    it died or hangs; the process is there, and `kill -CONT` (or `fg`) lets it go on."""
    db = tmp_path / "z.db"
    proc = start_long_step(tmp_path, db, "z", 3.0)  # long enough to be stopped in, however slow the machine
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(1.5)  # past its lease, which nothing renews while the process is stopped
        listed = invoke("runs", "--why", "--db", str(db)).output
        shown = invoke("show", "z", "--db", str(db)).output
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert listed.splitlines()[2].split()[2] == "crashed" and listed.splitlines()[2].endswith(
        "  its process is stopped (Ctrl-Z, SIGSTOP)"), listed
    assert (f"pid {proc.pid} on this machine) is stopped (Ctrl-Z, or SIGSTOP), in step 1 (its lease ran out at "
            in shown), shown
    assert f"`kill -CONT {proc.pid}` (or `fg` in its shell) lets it go on; a resume takes the run from it" in shown
    assert proc.returncode == 0 and out.strip() == "budget_exhausted", err  # let go on, it finished the run


def test_show_tells_how_long_a_live_run_has_been_in_its_step_and_when_its_process_was_last_seen(tmp_path):
    """A run that looks stuck: `loomc show` used to say only "still running". It now says how long the step in
    flight has taken so far, and when the process last said it was alive."""
    db = tmp_path / "live.db"
    proc = start_long_step(tmp_path, db, "live", 4.0)  # its 1-second lease is renewed every half second
    try:
        time.sleep(1.6)
        shown = invoke("show", "live", "--db", str(db)).output.splitlines()[1]
    finally:
        out, err = proc.communicate(timeout=60)
    took = re.fullmatch(r"Stopped: still running, in step 1 for (\d\.\d\d)s; its process was last seen alive "
                        r"(\d\.\d\d)s ago", shown)
    assert took and 1.5 <= float(took[1]) < 4.0 and float(took[2]) <= 1.0, shown
    assert out.strip() == "budget_exhausted", err


@pytest.mark.parametrize("zone", ["UTC0", "CET-1CEST,M3.5.0,M10.5.0/3", "IST-5:30", "LMT+0:44:30"])
def test_the_runs_listing_writes_each_time_as_strftime_does(monkeypatch, zone):
    """The listing formats each minute once; a zone whose offset has seconds (Monrovia's until 1972) and a
    change of daylight saving time inside the times listed still print what strftime prints."""
    import time
    from loomc.cli import local_time
    monkeypatch.setenv("TZ", zone)  # POSIX TZ strings: no tz database needed
    time.tzset()
    try:
        switch = 1774746000.0  # 2026-03-29 01:00 UTC: central Europe moves its clocks forward
        times = [switch + k * 7.3 for k in range(-600, 600)] + [switch - 0.5, switch + 0.25, 1e9 + 59.999]
        minutes: dict[int, str] = {}
        assert [local_time(t, minutes) for t in times] == [
            time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) for t in times]
        assert len(minutes) < len(times) / 4 or zone.startswith("LMT")
    finally:
        monkeypatch.undo()
        time.tzset()


def test_demo_runs_to_completion_and_prints_how_to_inspect(tmp_path):
    proc = subprocess.run(["loomc", "demo"], capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "LOOMC_DB"})
    assert proc.returncode == 0, proc.stderr
    assert "Status: completed" in proc.stdout and "Inspect it: loomc show " in proc.stdout
    # Its calls are priced from their (simulated) tokens, which the ledger keeps with them.
    assert "\nBy item: simulated-model $0.2143 in 5 steps, 37,037 tokens in and 6,877 out\n" in proc.stdout
    assert (tmp_path / ".loomc" / "checkpoints.db").exists() and "No crash" not in proc.stdout
    late = subprocess.run(["loomc", "demo", "--crash-at", "99", "--db", str(tmp_path / "late.db")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert late.returncode == 0 and "No crash: the run ended after 5 steps, before step 99; --crash-at 4 or less " \
                                    "crashes it" in late.stdout


def test_resume_of_a_run_whose_function_cannot_be_imported_prints_the_snippet(tmp_path):
    db = str(tmp_path / "s.db")
    run_id = make_failed_run(db)  # refine_report is defined inside a test function
    proc = subprocess.run(["loomc", "resume", run_id, "--db", db], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "defined inside another function" in proc.stderr
    assert proc.stderr.splitlines()[-1].strip() == "refine_report.resume('a1b2c3d4e5f6')"


@pytest.mark.parametrize("how", ["-c", "-"])
def test_resume_of_a_loop_defined_in_a_notebook_or_repl_says_so(tmp_path, how):
    """`python -c` runs as a __main__ without a file, as a notebook's kernel and the REPL do. `python -`
    (a script on stdin) has the file "<stdin>", which was recorded as a path in the working directory,
    so the command tried to import that and said to run it in the directory ".../<stdin>" is imported from."""
    db = str(tmp_path / "nb.db")
    source = ("from loomc import Budget, loop\n"
              "@loop(budget=Budget(iterations=3), checkpoint=" + repr(db) + ")\n"
              "def tidy(s):\n    raise RuntimeError('bad cell')\n"
              "try:\n    tidy(0, run_id='cell7')\nexcept RuntimeError:\n    pass\n")
    start = subprocess.run([sys.executable, "-c", source] if how == "-c" else [sys.executable, "-"],
                           input=None if how == "-c" else source, capture_output=True, text=True, cwd=tmp_path)
    assert start.returncode == 0, start.stderr
    assert SQLiteStore(db).get_run("cell7").fn_path == "__main__:tidy"
    proc = subprocess.run(["loomc", "resume", "cell7", "--db", db], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert "tidy was defined in a notebook or an interactive session" in proc.stderr
    assert proc.stderr.splitlines()[-1].strip() == "tidy.resume('cell7')"


def start_in_module(tmp_path, name, source, code):
    """Write module ``name`` in tmp_path and run ``code`` (which imports it) in a fresh process, on a
    database of its own; the environment in which `loomc` commands see both, and what ``code`` printed."""
    (tmp_path / f"{name}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LOOMC_DB": str(tmp_path / f"{name}.db")}
    start = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert start.returncode == 0, start.stderr
    return env, start.stdout


def test_resume_imports_a_module_level_loop(tmp_path):
    env, _ = start_in_module(tmp_path, "jobs", (
        "import os\n"
        "from loomc import Budget, loop, predicate\n"
        "@loop(budget=Budget(iterations=10), converge_on=predicate(lambda h: h[-1].state >= 5))\n"
        "def count(s):\n"
        "    if s == 1 and not os.path.exists('flaked'):\n"
        "        open('flaked', 'w').close()\n"
        "        raise RuntimeError('flaky once')\n"
        "    return s + 1\n"), "import jobs\ntry:\n    jobs.count(0, run_id='job1')\nexcept RuntimeError:\n    pass")
    proc = subprocess.run(["loomc", "resume", "job1"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Status: completed" in proc.stdout and "RuntimeError: flaky once" in proc.stdout


def test_resume_finds_the_loop_that_wraps_a_plain_function_or_a_bound_method_and_hints_name_it(tmp_path):
    """`refine = loop(...)(refine_step)` records refine_step's path, which imports the plain function:
    `loomc resume` said "is not a @loop function", and every hint said `refine_step.resume(...)`, which
    has no resume. The command now takes the loop of that module that wraps the function (a bound
    method's too; of several, the one with the run's code and policy), and the hints say `refine`."""
    env, printed = start_in_module(tmp_path, "wjobs", (
        "from loomc import Budget, loop\n"
        "def refine_step(s):\n"
        "    return s + 1\n"
        "class Agent:\n"
        "    def __init__(self, k):\n"
        "        self.k = k\n"
        "    def step(self, s):\n"
        "        return s + self.k\n"
        "refine = loop(budget=Budget(iterations=3))(refine_step)\n"
        "tens = loop(budget=Budget(iterations=3))(Agent(10).step)\n"
        "ones = loop(budget=Budget(iterations=2))(Agent(1).step)\n"
        "class Twin:\n"
        "    def __init__(self, k):\n"
        "        self.k = k\n"
        "    def step(self, s):\n"
        "        return s + self.k\n"
        "left = loop(budget=Budget(iterations=2))(Twin(1).step)\n"
        "right = loop(budget=Budget(iterations=2))(Twin(2).step)\n"
        "def lonely(s):\n"
        "    return s + 1\n"
        "def made_inside():\n"
        "    return loop(budget=Budget(iterations=1))(lonely)\n"),
        "import wjobs\n"
        "for runner, run_id in [(wjobs.refine, 'r'), (wjobs.tens, 't'), (wjobs.ones, 'o'), (wjobs.made_inside(), 'm')]:\n"
        "    try:\n"
        "        runner(0, run_id=run_id)\n"
        "    except Exception as e:\n"
        "        print(str(e).rpartition('; ')[2])\n")
    assert printed.splitlines() == ["give a larger budget: refine.resume('r', budget=Budget(...))",
                                    "give a larger budget: tens.resume('t', budget=Budget(...))",
                                    "give a larger budget: ones.resume('o', budget=Budget(...))",
                                    "give a larger budget: lonely.resume('m', budget=Budget(...))"]
    store = SQLiteStore(env["LOOMC_DB"])
    assert store.get_run("t").fn_path == store.get_run("o").fn_path == "wjobs:Agent.step"
    for run_id, iterations, state in [("r", "5", 5), ("t", "5", 50), ("o", "4", 4)]:
        proc = subprocess.run(["loomc", "resume", run_id, "--iterations", iterations], env=env, capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"Stopped: iterations: {iterations} of {iterations} calls made" in proc.stdout
        assert json.loads(store.load_steps(run_id)[-1].state_json) == state
    subprocess.run([sys.executable, "-c", "import wjobs\nwjobs.right.run(0, run_id='w')"], env=env, check=True)
    proc = subprocess.run(["loomc", "resume", "w", "--iterations", "4"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 1
    assert ("the loops left, right of wjobs all wrap Twin.step, and the run's recorded code and policy do not tell "
            "which one started it") in proc.stderr
    proc = subprocess.run(["loomc", "resume", "m", "--iterations", "2"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 1
    assert ("wjobs:lonely is not a @loop function, and no loop at the top level of wjobs wraps it (one made "
            "inside a function cannot be imported)") in proc.stderr
    store.close()


def test_resume_imports_a_module_of_the_working_directory_without_pythonpath(tmp_path):
    """A loop in the project's own module (`python -c 'import jobs; ...'` in its directory) could not be resumed
    by `loomc resume` run in that same directory: a console script's sys.path lacks the working directory, so
    the import failed and the command printed the Python to paste instead."""
    env, _ = start_in_module(tmp_path, "jobs2", (
        "from loomc import Budget, loop\n"
        "@loop(budget=Budget(iterations=3))\n"
        "def count(s):\n"
        "    return s + 1\n"), "import jobs2\njobs2.count.run(0, run_id='w1')")
    del env["PYTHONPATH"]
    proc = subprocess.run(["loomc", "resume", "w1", "--iterations", "5"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr  # it ran its two more calls, and stopped at the new cap
    assert "Stopped: iterations: 5 of 5 calls made" in proc.stdout
    elsewhere = subprocess.run(["loomc", "resume", "w1", "--iterations", "7"], env=env, capture_output=True,
                               text=True, cwd=tmp_path.parent)
    assert elsewhere.returncode == 1
    assert ("importing jobs2:count failed (ModuleNotFoundError: No module named 'jobs2'); run `loomc resume` in the "
            "directory jobs2 is imported from (the project the run was started in), or set PYTHONPATH to it") \
        in elsewhere.stderr
    # The loop renamed since: the message named the import machinery's module, not the file's loop.
    (tmp_path / "jobs2.py").write_text((tmp_path / "jobs2.py").read_text().replace("def count", "def tally"))
    renamed = subprocess.run(["loomc", "resume", "w1", "--iterations", "7"], env=env, capture_output=True,
                             text=True, cwd=tmp_path)
    assert renamed.returncode == 1
    assert ("cannot resume w1 from here: jobs2 has no count any more (renamed or removed since the run started?); "
            "give the loop its old name back, or resume the run from Python") in renamed.stderr


@pytest.mark.parametrize("how", ["script", "python -m"])
def test_resume_imports_a_loop_started_as_a_script_or_with_python_m_and_what_it_imports(tmp_path, how):
    """Python runs `python job.py` with job.py's directory first on sys.path, and `python -m pkg.job` as a module
    of its package. `loomc resume` loaded job.py by its path without that directory, so its `import helpers`
    failed; and it loaded pkg/job.py by its path too, outside its package, so its `from .helpers import inc`
    failed. Either way the command printed the Python to paste instead of resuming."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def inc(s):\n    return s + 1\n")
    (pkg / "job.py").write_text(
        "import os\n"
        "from loomc import Budget, loop\n"
        f"{'from helpers import inc' if how == 'script' else 'from .helpers import inc'}\n"
        "@loop(budget=Budget(iterations=4))\n"
        "def count(s):\n"
        "    if s == 2 and not os.path.exists('flaked'):\n"
        "        open('flaked', 'w').close()\n"
        "        raise RuntimeError('flaky once')\n"
        "    return inc(s)\n"
        "if __name__ == '__main__':\n"
        "    count.run(0, run_id='j1')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LOOMC_DB"] = str(tmp_path / "j.db")
    start = [sys.executable, str(pkg / "job.py")] if how == "script" else [sys.executable, "-m", "pkg.job"]
    subprocess.run(start, env=env, check=True, cwd=tmp_path)
    recorded = {"script": f"{pkg / 'job.py'}:count", "python -m": "pkg.job:count"}[how]
    assert SQLiteStore(env["LOOMC_DB"]).get_run("j1").fn_path == recorded
    proc = subprocess.run(["loomc", "resume", "j1"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Stopped: iterations: 4 of 4 calls made" in proc.stdout and "RuntimeError: flaky once" in proc.stdout


def test_resume_runs_an_async_loop_to_its_end(tmp_path):
    """Regression: the command read .status off the coroutine of an async loop's resume_run, and
    crashed with a traceback, leaving the run as it was."""
    env, _ = start_in_module(tmp_path, "ajobs", (
        "import asyncio, os\n"
        "from loomc import Budget, loop\n"
        "@loop(budget=Budget(iterations=5), cost_fn=lambda s: 0.01)\n"
        "async def work(s):\n"
        "    await asyncio.sleep(0)\n"
        "    if s == 2 and not os.path.exists('once'):\n"
        "        open('once', 'w').close()\n"
        "        raise RuntimeError('flaky once')\n"
        "    return s + 1\n"),
        "import asyncio, ajobs\ntry:\n    asyncio.run(ajobs.work(0, run_id='a1'))\nexcept RuntimeError:\n    pass")
    proc = subprocess.run(["loomc", "resume", "a1"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "", proc.stderr  # 2: it ended budget_exhausted
    assert "Status: budget_exhausted" in proc.stdout and "in 5 steps, 2 attempts" in proc.stdout


def test_resume_with_a_new_usd_cap_keeps_the_other_caps(tmp_path):
    env, printed = start_in_module(tmp_path, "capped", (
        "from loomc import Budget, loop\n"
        "@loop(budget=Budget(usd=0.3, iterations=8), cost_fn=lambda s: 0.1)\n"
        "def job(s):\n    return s + 1\n"), "import capped; print(capped.job.run(0, run_id='c1').status)")
    assert printed.strip() == "budget_exhausted"
    proc = subprocess.run(["loomc", "resume", "c1", "--budget-usd", "5"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr  # stopped again, by the iteration cap this time
    assert (f"Stopped: iterations: 8 of 8 calls made; `loomc resume {db_flag(env['LOOMC_DB'])} c1 --iterations N` "
            "continues it under a larger cap") in proc.stdout
    assert "Spent: $0.8000 of $5.0000 budget in 8 steps" in proc.stdout
    bad = subprocess.run(["loomc", "resume", "c1", "--wall-clock", "ten minutes"], env=env, capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("loomc: wall_clock='ten minutes' is not a duration")
    more = subprocess.run(["loomc", "resume", "c1", "--iterations", "10", "--wall-clock", "10m"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert more.returncode == 2, more.stderr  # the USD cap is $5.00 now, so the calls run out first
    assert "Stopped: iterations: 10 of 10 calls made" in more.stdout and "$1.0000 of $5.0000" in more.stdout
    assert "Note: resumed with Budget(usd=5.0, iterations=10, wall_clock='10m')" in more.stdout


@pytest.mark.parametrize("status, reason, parent, hint", [
    ("budget_exhausted", "usd: $0.9000 spent + $0.1000 for the next step would pass the $1.0000 cap", None,
     "`loomc resume r --budget-usd X` continues it under a larger cap"),
    ("budget_exhausted", "wall_clock: 601.0s active of 10m", None,
     "`loomc resume r --wall-clock 30m` continues it under a larger cap"),
    ("stalled", "Escalate: 3 steps in a row failed or did not beat the best score", None,
     "`loomc resume r` gives it more calls"),
    ("cancelled", "KeyboardInterrupt", None, "`loomc resume r` continues it"),
    ("failed", "RuntimeError: boom", "p", "resume its parent run p, which goes on with it"),
    ("failed", "RuntimeError: boom", "q", "`loomc resume r` continues it"),  # the parent committed that step
    ("budget_exhausted", "wall_clock: the parent run q's wall-clock budget has no time left for this child", "q",
     "its parent's cap stopped it: `loomc resume q --wall-clock 30m` gives the parent more"),
    ("budget_exhausted", "usd: the parent run q's budget leaves $0.3000 for this child; $0.3000 spent + $0.1000 "
     "for the next step would pass it", "q",
     "its parent's cap stopped it: `loomc resume q --budget-usd X` gives the parent more"),
])
def test_show_says_how_to_go_on_with_a_run_that_stopped_short(status, reason, parent, hint):
    from loomc.cli import show_table
    from loomc.testing import make_run
    run = make_run("r").replace(status=status, reason=reason, parent_run_id=parent, owner=None)
    assert f"Stopped: {reason}; {hint}\n" in show_table(run, [], through_parent=parent == "p")


def test_resume_loads_a_loop_defined_in_a_script_run_as_main(tmp_path):
    script = tmp_path / "fixer.py"
    script.write_text(
        "import os, sys\n"
        "from loomc import Budget, loop, predicate\n"
        "@loop(budget=Budget(iterations=10), converge_on=predicate(lambda h: h[-1].state >= 4))\n"
        "def bump(s):\n"
        "    if s == 2 and os.environ.get('CRASH') == '1':\n"
        "        raise SystemExit('power cut')\n"
        "    return s + 1\n"
        "if __name__ == '__main__':\n"
        "    bump(0, run_id='script-run')\n")
    env = {**os.environ, "LOOMC_DB": str(tmp_path / "s.db")}
    first = subprocess.run([sys.executable, str(script)], env={**env, "CRASH": "1"}, capture_output=True,
                           text=True, cwd=tmp_path)
    assert first.returncode != 0 and SQLiteStore(tmp_path / "s.db").get_run("script-run").status == "cancelled"
    proc = subprocess.run(["loomc", "resume", "script-run"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Status: completed" in proc.stdout
    assert SQLiteStore(tmp_path / "s.db").get_run("script-run").fn_path == f"{script}:bump"


def test_a_typed_state_recorded_by_a_script_run_as_main_resumes_from_loomc_resume_and_from_an_import(tmp_path):
    """The run recorded its state type as __main__:Draft. `loomc resume` imports the script under
    another name, so the type was not found there, and the resume failed, telling the user to define
    at module level a type that already was."""
    script = tmp_path / "drafts.py"
    script.write_text(
        "import os\n"
        "from pydantic import BaseModel\n"
        "from loomc import Budget, loop\n"
        "class Draft(BaseModel):\n"
        "    text: str\n"
        "    n: int = 0\n"
        "@loop(budget=Budget(iterations=5), converge_on=lambda h: h[-1].state.n >= 3)\n"
        "def polish(state):  # no annotation: the type is the one recorded with the run\n"
        "    assert isinstance(state, Draft), type(state)\n"
        "    if state.n == 1 and os.environ.get('CRASH'):\n"
        "        raise SystemExit('power cut')\n"
        "    return Draft(text=state.text + '!', n=state.n + 1)\n"
        "if __name__ == '__main__':\n"
        "    polish(Draft(text='hi'), run_id=os.environ['RUN'])\n")
    env = {**os.environ, "LOOMC_DB": str(tmp_path / "d.db"), "CRASH": "1"}
    for run_id in ("cli", "import"):
        subprocess.run([sys.executable, str(script)], env={**env, "RUN": run_id}, capture_output=True, cwd=tmp_path)
        assert SQLiteStore(tmp_path / "d.db").get_run(run_id).state_type == "__main__:Draft"
    env.pop("CRASH")
    proc = subprocess.run(["loomc", "resume", "cli"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Status: completed" in proc.stdout
    other = subprocess.run([sys.executable, "-c", "import drafts; print(drafts.polish.resume('import'))"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "text='hi!!!' n=3"


def test_loomc_resume_stopped_by_sigterm_finishes_the_call_in_flight_and_exits_143(tmp_path):
    """A worker pod running `loomc resume` gets SIGTERM on a deploy: the call in flight is let finish."""
    import signal
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        "from loomc import Budget, loop, predicate\n"
        "@loop(budget=Budget(iterations=10), converge_on=predicate(lambda h: h[-1].state >= 6))\n"
        "def bump(s):\n"
        "    if s == 1 and os.environ.get('CRASH') == '1':\n"
        "        raise SystemExit('power cut')\n"
        "    print('step', s, flush=True)\n"
        "    time.sleep(0.5)\n"
        "    print('done', s, flush=True)\n"
        "    return s + 1\n"
        "if __name__ == '__main__':\n"
        "    bump(0, run_id='w')\n")
    env = {**os.environ, "LOOMC_DB": str(tmp_path / "w.db")}
    subprocess.run([sys.executable, str(script)], env={**env, "CRASH": "1"}, capture_output=True, cwd=tmp_path)
    worker = subprocess.Popen(["loomc", "resume", "w"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path)
    assert worker.stdout is not None and worker.stdout.readline() == "step 1\n"
    worker.send_signal(signal.SIGTERM)  # during step 1's call
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 128 + signal.SIGTERM, err
    assert out.startswith("done 1\nRun: w  Loop: bump  Status: cancelled\n"), "no call started after the signal"
    # Steps 0, 1 (the first process's call, cut short by its SystemExit) and 2 (the call the signal let finish)
    assert "Status: cancelled" in out and "Stopped: SIGTERM received; stopped before step 3" in out
    record = SQLiteStore(tmp_path / "w.db").get_run("w")
    assert record.status == "cancelled" and record.steps == 3 and record.owner is None
    assert [s.events for s in SQLiteStore(tmp_path / "w.db").load_steps("w")] == [(), ("interrupted",), ()]


def test_loomc_resume_stopped_by_ctrl_c_shows_the_run_and_how_to_go_on_and_exits_130(tmp_path):
    """Regression: Ctrl-C during `loomc resume` printed click's "Aborted!" and exited 1: the run was stored as
    cancelled, but nothing said so, nor how to go on."""
    import signal
    script = tmp_path / "slow.py"
    script.write_text(
        "import time\n"
        "from loomc import Budget, loop\n"
        "@loop(budget=Budget(iterations=10))\n"
        "def crawl(s):\n"
        "    print('step', s, flush=True)\n"
        "    time.sleep(0.5 if s else 30)\n"
        "    return s + 1\n"
        "if __name__ == '__main__':\n"
        "    crawl(0, run_id='c')\n")
    env = {**os.environ, "LOOMC_DB": str(tmp_path / "c.db")}
    first = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert first.stdout is not None and first.stdout.readline() == "step 0\n"
    first.kill()  # dies during its first call
    first.communicate()

    def default_sigint() -> None:  # a shell starts a job in the background with Ctrl-C ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    worker = subprocess.Popen(["loomc", "resume", "c"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path, preexec_fn=default_sigint)
    assert worker.stdout is not None and worker.stdout.readline() == "step 0\n"
    worker.send_signal(signal.SIGINT)  # during the call
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 130 and "Aborted" not in err, err
    assert out.startswith("Run: c  Loop: crawl  Status: cancelled\nStopped: KeyboardInterrupt during step 1's call: a "
                          f"Ctrl-C, or a notebook's interrupt; `loomc resume {db_flag(env['LOOMC_DB'])} c` continues "
                          "it\n"), out
    assert SQLiteStore(tmp_path / "c.db").get_run("c").status == "cancelled"


def test_resume_refuses_a_script_that_starts_a_run_when_imported(tmp_path):
    """Regression: `loomc resume` imported a script without a __main__ guard, and its top-level
    code started (and paid for) a whole new run before the resume."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import os\n"
        "from loomc import Budget, loop, predicate\n"
        "@loop(budget=Budget(iterations=10), cost_fn=lambda s: 0.25, converge_on=predicate(lambda h: h[-1].state >= 4))\n"
        "def bump(s):\n"
        "    open('calls.log', 'a').write(f'{s}\\n')\n"
        "    if s == 2 and os.environ.get('CRASH') == '1':\n"
        "        raise SystemExit('power cut')\n"
        "    return s + 1\n"
        "bump(0, run_id=os.environ.get('RUN_ID'))\n")
    db = tmp_path / "s.db"
    env = {**os.environ, "LOOMC_DB": str(db)}
    first = subprocess.run([sys.executable, str(script)], env={**env, "CRASH": "1", "RUN_ID": "crashed"},
                           capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode != 0
    calls_before = (tmp_path / "calls.log").read_text()
    proc = subprocess.run(["loomc", "resume", "crashed"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"importing {script} runs the loop bump at import time" in proc.stderr
    assert "if __name__ == \"__main__\":" in proc.stderr
    assert proc.stderr.splitlines()[-1].strip() == "bump.resume('crashed')"
    store = SQLiteStore(db)
    assert [r.id for r in store.list_runs()] == ["crashed"], "no new run was started"
    assert (tmp_path / "calls.log").read_text() == calls_before, "bump was not called"
    assert store.get_run("crashed").status == "cancelled" and store.get_run("crashed").total_cost == Decimal("0.5")


def test_resume_of_a_completed_run_says_so_without_importing_its_module(tmp_path):
    env, _ = start_in_module(tmp_path, "noisy", (
        "open('imported', 'w').close()\n"
        "from loomc import Budget, loop, predicate\n"
        "@loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: h[-1].state >= 2))\n"
        "def tick(s):\n"
        "    return s + 1\n"), "import noisy, os\nnoisy.tick(0, run_id='done')\nos.remove('imported')")
    proc = subprocess.run(["loomc", "resume", "done"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "run done already completed (predicate(<lambda>) is true)" in proc.stderr
    assert not (tmp_path / "imported").exists()


def test_while_loomc_resume_imports_no_loop_starts_or_resumes_a_run(tmp_path):
    db = str(tmp_path / "g.db")

    @loop(budget=Budget(iterations=3), checkpoint=db)
    def tick(s):
        return s + 1

    @loop(budget=Budget(iterations=3), checkpoint=db)
    async def atick(s):
        return s + 1

    stopped = tick.run(0)
    assert stopped.status == "budget_exhausted"
    with refusing_runs("jobs.py"):
        for attempt in (lambda: tick.run(0), lambda: tick.iter(0), lambda: asyncio.run(atick.run(0)),
                        lambda: tick.resume(stopped.id, budget=Budget(iterations=5))):
            with pytest.raises(RunAtImport, match="importing jobs.py runs the loop (tick|atick) at import time"):
                attempt()
    store = SQLiteStore(db)
    assert [r.id for r in store.list_runs()] == [stopped.id]
    assert store.get_run(stopped.id).status == "budget_exhausted"
    resumed = tick.resume_run(stopped.id, budget=Budget(iterations=5))  # refused only during the import
    assert resumed.state == 5 and len(resumed.history) == 5


def test_resume_take_over_takes_a_run_from_an_owner_known_to_be_gone(tmp_path):
    import sqlite3
    import time
    env, _ = start_in_module(tmp_path, "podjobs", (
        "from loomc import Budget, loop, predicate\n"
        "@loop(budget=Budget(iterations=9), converge_on=predicate(lambda h: h[-1].state >= 3))\n"
        "def count(s):\n"
        "    return s + 1\n"),
        "import podjobs\nstream = podjobs.count.iter(0, run_id='p1')\nnext(stream)\nstream.close()")
    with closing(sqlite3.connect(env["LOOMC_DB"])) as conn, conn:
        conn.execute("UPDATE runs SET status = 'running', owner = 'old-pod:1:t1.ab', lease_expires = ?",
                     (time.time() + 600,))
    locked = subprocess.run(["loomc", "resume", "p1"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert locked.returncode == 1 and f"(`loomc resume {db_flag(env['LOOMC_DB'])} p1 --take-over`)" in locked.stderr
    proc = subprocess.run(["loomc", "resume", "p1", "--take-over"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Status: completed" in proc.stdout and "   2   $0.0000" in proc.stdout
    assert "taken over from old-pod:1:t1.ab" in proc.stdout


def test_a_long_error_is_cut_in_the_table_and_show_step_prints_one_step_whole(tmp_path):
    """An HTTP error carrying a 50 KB page made every row of `loomc show` 50 KB long."""
    from loomc import LastGood
    db = str(tmp_path / "long.db")
    page = "<html>\n" + "x" * 50_000 + "\n</html>\x1b[2J"

    @loop(budget=Budget(iterations=3), backtrack=LastGood(), scorer=lambda s: s["n"] / 10, checkpoint=db)
    def fetch(state):
        if state["n"] == 1:
            raise RuntimeError(f"HTTP 500: {page}")
        return {"n": state["n"] + 1, "note": "line one\nline two"}

    run = fetch.run({"n": 0}, run_id="longerr")
    assert [s.ok for s in run.history] == [True, False, False]
    shown = invoke("show", "longerr", "--db", db)
    assert shown.exit_code == 0
    rows = shown.output.splitlines()
    assert max(len(row) for row in rows) < 400
    assert "RuntimeError: HTTP 500: <html>\\nxxx" in shown.output
    assert "... (50,043 characters; --step 1 shows it whole)" in shown.output
    one = invoke("show", "longerr", "--db", db, "--step", "1")
    assert one.exit_code == 0
    lines = one.output.splitlines()
    assert lines[0] == "Run: longerr  Step: 1 of 3 steps (0 to 2)"
    assert "  RuntimeError: HTTP 500: <html>" in lines and "  " + "x" * 50_000 in lines
    assert "  </html>\\x1b[2J" in lines  # every line whole, and escaped
    assert "State: none (the call failed)" in lines
    good = invoke("show", "longerr", "--db", db, "--step", "0")
    assert good.exit_code == 0
    assert "Score: 0.1" in good.output and "Cost: $0.0000 (the run had spent $0.0000 after it)" in good.output
    assert good.output.endswith('State:\n  {\n    "n": 1,\n    "note": "line one\\nline two"\n  }\n')
    missing = invoke("show", "longerr", "--db", db, "--step", "7")
    assert missing.exit_code == 1 and "run longerr has no step 7: it has steps 0 to 2" in missing.output
    @loop(budget=Budget(iterations=3), checkpoint=db)
    def fails(state):
        raise RuntimeError(f"HTTP 500: {page}")

    with pytest.raises(RuntimeError):
        fails({"n": 0}, run_id="stopped-long")
    stopped = invoke("show", "stopped-long", "--db", db).output.splitlines()[1]
    flag = db_flag(db)  # in each of the two commands
    assert stopped.startswith("Stopped: RuntimeError: HTTP 500: <html>\\nxxx") and len(stopped) < 400 + 2 * len(flag)
    assert stopped.endswith(f"... (50,043 characters; `loomc show {flag} stopped-long --step 0` shows it whole); "
                            f"`loomc resume {flag} stopped-long` continues it")


def test_runs_no_process_drives_are_crashed_wherever_they_died_and_prune_can_delete_old_ones(tmp_path):
    """A pod that died on another host left its run `running` in `loomc runs` for good: only a dead
    process on this host was seen. Nor could `loomc prune` delete old crashed runs and their states."""
    db = str(tmp_path / "crashes.db")
    script = tmp_path / "dies.py"
    script.write_text(
        "import os, signal, sys\n"
        "from loomc import Budget, loop\n"
        "@loop(budget=Budget(iterations=5), checkpoint=sys.argv[1])\n"
        "def job(s):\n"
        "    if s == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return s + 1\n"
        "if __name__ == '__main__':\n"
        "    job(0, run_id=sys.argv[2])\n")
    for run_id in ("here", "elsewhere", "ownerless", "held", "recent"):
        died = subprocess.run([sys.executable, str(script), db, run_id], capture_output=True)
        assert died.returncode == -9
    now = time.time()
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE runs SET updated_at = updated_at - 40 * 86400 WHERE id != 'recent'")
        # Another host's process: this one cannot probe it, but its lease ran out long ago.
        conn.execute("UPDATE runs SET owner = 'pod-7f9c:1:t1', lease_expires = ? WHERE id = 'elsewhere'", (now - 60,))
        conn.execute("UPDATE runs SET owner = NULL, lease_expires = NULL WHERE id = 'ownerless'")
        # Another host's live process: its lease is renewed, so it is running, however old its last step.
        conn.execute("UPDATE runs SET owner = 'pod-1a2b:1:t1', lease_expires = ? WHERE id = 'held'", (now + 300,))
    listed = {line.split()[0]: line.split()[2] for line in invoke("runs", "--db", db).output.splitlines()[2:-1]}
    assert listed == {"here": "crashed", "elsewhere": "crashed", "ownerless": "crashed", "held": "running",
                      "recent": "crashed"}
    crashed = invoke("runs", "--db", db, "--status", "crashed", "--json").output
    assert sorted(r["id"] for r in json.loads(crashed)) == ["elsewhere", "here", "ownerless", "recent"]
    for flag in ([], ["--json"]):  # running means driven: the crashed ones, stored as running too, are left out
        running = invoke("runs", "--db", db, "--status", "running", *flag).output
        assert "held" in running and not any(run_id in running for run_id in ("elsewhere", "here", "ownerless"))
    stopped = {run_id: invoke("show", run_id, "--db", db).output.splitlines()[1] for run_id in listed}
    assert re.match(r"Stopped: its process \(.+\) died during step 2; `loomc resume " + re.escape(db_flag(db)) +
                    " here` continues it$", stopped["here"]), stopped["here"]
    assert stopped["elsewhere"].startswith("Stopped: its process (pod-7f9c:1:t1) stopped renewing its lease during "
                                           "step 2 (it ran out at ")
    assert stopped["elsewhere"].endswith("): it died, on another host or in a container, or it hangs; "
                                         f"`loomc resume {db_flag(db)} elsewhere` continues it")
    assert stopped["ownerless"] == ("Stopped: no process drives it: it stopped during step 2; `loomc resume "
                                    f"{db_flag(db)} ownerless` continues it")
    assert re.fullmatch(r"Stopped: still running, in step 2 for \S+; its process was last seen alive \S+ ago",
                        stopped["held"]), stopped["held"]
    dry = invoke("prune", "--db", db, "--older-than", "30d", "--status", "crashed")
    assert dry.exit_code == 0 and dry.output.startswith("Would delete 3 runs, 6 steps and "), dry.output
    done = invoke("prune", "--db", db, "--older-than", "30d", "--status", "crashed", "--yes")
    assert done.exit_code == 0 and done.output.startswith("Deleted 3 runs, 6 steps"), done.output
    assert sorted(r.id for r in SQLiteStore(db).list_runs()) == ["held", "recent"]
    refused = invoke("prune", "--db", db, "--older-than", "30d", "--status", "running")
    assert refused.exit_code == 2 and "'crashed'" in refused.output


def test_prune_says_what_it_would_delete_then_deletes_old_finished_runs_with_their_children(tmp_path):
    """A full state per step makes the file grow without end; deleting rows alone gives no disk back."""
    db = str(tmp_path / "big.db")

    @loop(budget=Budget(iterations=40), checkpoint=db)
    def bulky(state):
        return {"text": "x" * 20_000, "i": state["i"] + 1}

    @loop(budget=Budget(iterations=2), converge_on=predicate(lambda h: True), checkpoint=db)
    def parent(state):
        return bulky.run(state).state

    for k in range(3):
        bulky.run({"text": "", "i": 0}, run_id=f"old-{k}")
    parent.run({"text": "", "i": 0}, run_id="family")  # completed, with a child run that exhausted its budget
    bulky.run({"text": "", "i": 0}, run_id="recent")
    with closing(sqlite3.connect(db)) as conn, conn:  # all but `recent` were last updated 40 days ago
        conn.execute("UPDATE runs SET updated_at = updated_at - 40 * 86400 WHERE id != 'recent'")
        conn.execute("INSERT INTO runs (id, status, created_at, updated_at) VALUES ('live', 'running', 0, 0)")
    size = os.path.getsize(db) + os.path.getsize(db + "-wal")
    dry = invoke("prune", "--db", db, "--older-than", "30d", "--status", "completed", "--status", "budget_exhausted")
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("Would delete 5 runs (1 child run among them), 161 steps and 3.2 MB of states: "
                                 "the runs completed or budget_exhausted and last updated before ")
    assert "Run again with --yes" in dry.output
    assert len(SQLiteStore(db).list_runs()) == 7, "a dry run deletes nothing"
    done = invoke("prune", "--db", db, "--older-than", "30d", "--status", "completed", "--status",
                  "budget_exhausted", "--yes")
    assert done.exit_code == 0, done.output
    assert done.output.startswith("Deleted 5 runs (1 child run among them), 161 steps")
    assert sorted(r.id for r in SQLiteStore(db).list_runs()) == ["live", "recent"]
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute("SELECT count(*) FROM steps WHERE run_id != 'recent'").fetchone() == (0,)
    after = os.path.getsize(db) + (os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0)
    assert after < size / 3, (size, after)  # the disk space came back
    assert invoke("prune", "--db", db, "--older-than", "30d").output.startswith("Nothing to delete: no run is "
                                                                                 "completed and last updated")
    bad = invoke("prune", "--db", db, "--older-than", "a month")
    assert bad.exit_code == 1 and "--older-than='a month' is not a duration" in bad.output
    assert invoke("prune", "--db", db, "--older-than", "1d", "--status", "running").exit_code == 2


def test_prune_does_not_compact_the_file_while_a_run_is_live_and_compacts_it_later(tmp_path):
    """Compacting rewrites the whole file in one write transaction (about 7 s per GB here): a live run's
    commits waited for it, and past the 60 s busy timeout they failed. Prune now leaves the file as it is
    while a run is live (new steps reuse the space), and a later prune with no run live compacts it."""
    db = str(tmp_path / "busy.db")

    @loop(budget=Budget(iterations=20), checkpoint=db)
    def bulky(state):
        return {"text": "x" * 20_000, "i": state["i"] + 1}

    bulky.run({"text": "", "i": 0}, run_id="old")
    bulky.run({"text": "", "i": 0}, run_id="older")
    with closing(sqlite3.connect(db)) as conn, conn:  # both 40 days old; a run another host drives now, its lease live
        conn.execute("UPDATE runs SET updated_at = updated_at - 40 * 86400")
        conn.execute("INSERT INTO runs (id, status, created_at, updated_at, owner, lease_expires) "
                     "VALUES ('elsewhere', 'running', 0, 0, 'pod-7f9c:1:t1', ?)", (time.time() + 600,))
    conn.close()

    def size():
        return os.path.getsize(db) + (os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0)

    before = size()
    kept = invoke("prune", "--db", db, "--older-than", "30d", "--status", "budget_exhausted", "--states", "--yes")
    assert kept.output.splitlines()[1] == (
        "The file was not compacted: 1 run is live, and compacting rewrites the whole file while its commits "
        "wait. New steps reuse the space freed; run this again when no run is live to give it back to the disk.")
    assert size() >= before * 0.9, "not compacted"
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] > 0, "the space is free for new steps"
        conn.execute("UPDATE runs SET status = 'completed', owner = NULL, lease_expires = NULL "
                     "WHERE id = 'elsewhere'")
    conn.close()
    # Nothing left to remove, but the space an earlier prune freed: given back now that no run is live.
    later = invoke("prune", "--db", db, "--older-than", "30d", "--status", "budget_exhausted", "--states", "--yes")
    assert later.output.startswith("Nothing to remove") and "\nThe file went from " in later.output
    assert size() < before / 4
    again = invoke("prune", "--db", db, "--older-than", "30d", "--status", "budget_exhausted", "--states", "--yes")
    assert again.output.startswith("Nothing to remove") and "The file" not in again.output, "nothing to give back"


SCORES = [0.1, 0.5, 0.3, 0.9, 0.2, 0.6, None, 0.7, 0.8, 0.85, 0.1, 0.2]  # None: the call fails


def test_prune_states_keeps_every_run_and_step_record_and_the_states_a_resume_needs(tmp_path):
    """An agent whose state carries its whole transcript stores it again at every step: the file grows as
    the square of the steps. `prune --states` keeps the runs, every step's record and the states a
    resume goes on from or a run returns; it gives the rest of the disk back."""
    from loomc import BestScore, StatePruned
    db = str(tmp_path / "grow.db")
    given = []

    @loop(budget=Budget(iterations=12), backtrack=BestScore(), scorer=lambda s: s["score"], checkpoint=db)
    def agent(state):
        given.append(state)
        score = SCORES[len(given) - 1] if len(given) <= len(SCORES) else 0.95
        if score is None:
            raise RuntimeError("the model timed out")
        return {"transcript": state["transcript"] + ["turn %d " % len(given) + "x" * 20_000], "score": score}

    @loop(budget=Budget(iterations=3), checkpoint=db)
    def child(state):
        return {"text": state["text"] + "y" * 10_000}

    @loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: len(h) >= 2), checkpoint=db)
    def parent(state):
        return {"text": child.run(state).state["text"][:50]}

    agent.run({"transcript": [], "score": 0}, run_id="agent")  # budget_exhausted after 12 calls
    parent.run({"text": ""}, run_id="family")  # completed, with two child runs that exhausted their budgets
    child.run({"text": ""}, run_id="recent")
    with closing(sqlite3.connect(db)) as conn, conn:  # all but `recent` were last updated 40 days ago
        conn.execute("UPDATE runs SET updated_at = updated_at - 40 * 86400 WHERE id != 'recent'")
        conn.execute("INSERT INTO runs (id, status, created_at, updated_at) VALUES ('live', 'running', 0, 0)")
    before = load_history(db, "agent")
    records = [(s.n, s.cost, s.score, s.error, s.events) for s in before]
    assert [s.n for s in before if s.events] == [2, 4, 5, 6, 7, 8, 9, 10, 11]  # after step 3, back to it each time
    best = before[3].state
    size = os.path.getsize(db) + os.path.getsize(db + "-wal")
    args = ["prune", "--db", db, "--older-than", "30d", "--status", "completed", "--status", "budget_exhausted",
            "--states"]

    # Kept: the agent's steps 3 (its best, where the last backtrack pointed) and 11 (its last, and last good),
    # each child's last step, the parent's last step. Step 6 failed and has no state.
    dry = invoke(*args)
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("Would remove 14 states (") and (
        " from 4 runs (2 child runs among them): the runs completed or budget_exhausted and last updated before "
        in dry.output), dry.output
    assert "Each run keeps its initial state, the states of its last, last good and best steps" in dry.output
    assert load_history(db, "agent")[0].state == before[0].state, "a dry run removes nothing"
    done = invoke(*args, "--yes")
    assert done.exit_code == 0, done.output
    assert done.output.startswith("Removed 14 states (") and "The file went from " in done.output
    after = os.path.getsize(db) + (os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0)
    assert after < size / 3, (size, after)  # the disk space came back
    assert invoke(*args).output.startswith("Nothing to remove: the runs completed or budget_exhausted")

    thinned = load_history(db, "agent")
    assert [(s.n, s.cost, s.score, s.error, s.events) for s in thinned] == records
    assert thinned[3].state == best and thinned[11].state == before[11].state and thinned[6].state is None
    with pytest.raises(StatePruned, match=r"run agent step 5: its state was removed by `loomc prune --states` at "):
        thinned[5].state
    assert sorted(r.id for r in SQLiteStore(db).list_runs()) == sorted(
        ["agent", "family", "recent", "live", *(c.id for c in SQLiteStore(db).children("family"))])
    assert all(s.state is not None for s in load_history(db, "recent")), "a recent run keeps every state"
    kids = SQLiteStore(db).children("family")
    assert [[s.n for s in SQLiteStore(db).load_steps(k.id) if s.state_json] for k in kids] == [[2], [2]]

    shown = invoke("show", "agent", "--db", db).output
    assert "Pruned: the states of 9 steps were removed by `loomc prune --states` at " in shown
    assert "State: removed by `loomc prune --states` at " in invoke("show", "agent", "--db", db, "--step", "5").output
    exported = json.loads(invoke("export", "agent", "--db", db, "--json").output)
    assert exported["steps"][5]["state"] is None and "loomc.state_pruned_at" in exported["steps"][5]["metrics"]
    again = history_from_export(exported)
    assert again[3].state == best
    with pytest.raises(StatePruned, match="run agent step 5"):
        again[5].state

    # A resume goes on from where it would have: BestScore's best, step 3.
    given.clear()
    run = agent.resume_run("agent", budget=Budget(iterations=13))
    assert given == [best] and run.steps == 13 and run.status == "budget_exhausted"


def test_prune_states_leaves_a_run_that_changed_after_it_was_chosen(tmp_path, monkeypatch):
    """Each run is thinned in a write transaction of its own, only if it has not changed since it was
    chosen: a resume in another process that ran in between keeps every state it may need."""
    db = str(tmp_path / "race.db")

    @loop(budget=Budget(iterations=4), checkpoint=db)
    def bulky(state):
        return {"i": state["i"] + 1}

    for run_id in ("a", "b"):
        bulky.run({"i": 0}, run_id=run_id)
    store = SQLiteStore(db)
    write = store._write

    def resumed_meanwhile(fn, run_id, *args):
        if run_id == "a":  # another process touched run a (a resume, then its finish) after prune chose it
            with closing(sqlite3.connect(db)) as other, other:
                other.execute("UPDATE runs SET updated_at = updated_at + 1 WHERE id = 'a'")
            other.close()
        return write(fn, run_id, *args)

    monkeypatch.setattr(store, "_write", resumed_meanwhile)
    found = store.prune_states(("budget_exhausted",), time.time() + 60, apply=True)
    assert found["runs"] == 1 and found["states"] == 3
    assert [s.state["i"] for s in load_history(db, "a")] == [1, 2, 3, 4]
    assert [s.n for s in SQLiteStore(db).load_steps("b") if s.state_json] == [3]


def _parse(reply):
    try:
        return reply["usage"]["tokens"]
    except KeyError as e:
        raise ValueError("the reply has no usage") from e


def test_a_failed_step_keeps_where_it_was_raised_for_loomc_show_and_step_traceback(tmp_path):
    """A backtracker went on from a `KeyError: 'usage'` three times, and nothing said where it came
    from: the step kept only the error's one line, and the traceback was gone with the exception."""
    from loomc import LastGood, MemoryStore
    import loomc
    db = str(tmp_path / "tb.db")
    package = os.path.dirname(loomc.__file__)

    for store in (db, MemoryStore()):
        @loop(budget=Budget(iterations=3), backtrack=LastGood(), checkpoint=store)
        def fix(state):
            reply = {"text": "x"} if state >= 1 else {"usage": {"tokens": 3}}
            return state + _parse(reply)

        run = fix.run(0, run_id="tb")
        assert [s.ok for s in run.history] == [True, False, False] and run.history[0].traceback is None
        where = run.history[1].traceback
        assert where.startswith("Traceback (most recent call last):") and package not in where
        assert "in fix\n    return state + _parse(reply)" in where and 'return reply["usage"]["tokens"]' in where
        assert "KeyError: 'usage'\n\nThe above exception was the direct cause" in where
        assert where.endswith("ValueError: the reply has no usage") and run.history[1].metrics == {"traceback": where}
        assert load_history(fix.store, "tb")[1].traceback == where  # the store keeps it
    assert json.loads(invoke("export", "tb", "--db", db, "--json").output)["steps"][2]["metrics"]["traceback"] == where

    shown = invoke("show", "tb", "--db", db).output.splitlines()
    assert shown[4] == (f"Failed: 2 steps; `loomc show --db {SQLiteStore(db).path} tb --step 1` shows where the first "
                        "was raised")
    one = invoke("show", "tb", "--db", db, "--step", "1").output
    assert "Error:\n  ValueError: the reply has no usage\nRaised at:\n  Traceback (most recent call last):\n" in one
    assert '\n      return reply["usage"]["tokens"]\n' in one and "Metrics:" not in one

    # An error loomc raised itself says all there is in its message: no traceback, of loomc's insides.
    @loop(budget=Budget(iterations=2), backtrack=LastGood(), checkpoint=db)
    def forgets(state):
        state["n"] = 1

    assert [s.traceback for s in forgets.run({}, run_id="none").history] == [None]
    shown = invoke("show", "none", "--db", db).output
    assert f"\nFailed: 1 step; `loomc show {db_flag(db)} none --step 0` shows it whole\n" in shown

    # An async fn awaited under a deadline starts at its own frame, not at asyncio's wait_for.
    @loop(budget=Budget(iterations=1, wall_clock="1m"), checkpoint="memory")
    async def fetch(state):
        await asyncio.sleep(0)
        raise ConnectionError("reset " + "x" * 20_000)

    failed = asyncio.run(fetch.run(0)).history[0]
    assert failed.traceback.startswith('Traceback (most recent call last):\n  File "' + __file__)
    assert len(failed.traceback) <= 8_100 and " characters cut)\n" in failed.traceback
    assert failed.traceback.endswith("x" * 100) and failed.error == "ConnectionError: reset " + "x" * 20_000


@pytest.mark.parametrize("run_id", ["-x9Qw", "nightly 2026-12-05", "it's\nhere"])
def test_every_command_a_hint_gives_runs_as_pasted_into_a_shell(tmp_path, monkeypatch, run_id):
    """Regression: the commands in hints named neither the run's file nor a run id a shell could take back. A
    run of checkpoint="jobs.db" was told `loomc show ID`, which reads the default file and has no such run; an id
    that begins with a dash (secrets.token_urlsafe gives one in 64) was read as an option; one with a space
    as two arguments."""
    from loomc import Escalate, LastGood, RunAlreadyFinished
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOMC_DB", raising=False)
    db = tmp_path / "jobs.db"

    def fail(state):
        raise RuntimeError("HTTP 500: " + "x" * 300)

    assert loop(budget=Budget(iterations=3), checkpoint=str(db))(fail).run(0, run_id=run_id).status == "failed"

    def paste(hint: str):
        """Run the command between the backquotes of ``hint`` as bash would take it."""
        command = hint.split("`")[1]
        words = subprocess.run(["bash", "-c", "printf '%s\\0' " + command], capture_output=True, text=True,
                               check=True).stdout.split("\0")[:-1]
        assert words[0] == "loomc", command
        return CliRunner().invoke(main, words[1:])

    table = CliRunner().invoke(main, ["show", "--db", str(db), "--", run_id]).output.splitlines()
    stopped, failed = table[1], table[4]
    assert f"--db {db}" in stopped  # the run's file, which is not the default one here
    for hint in (stopped.split("characters; ")[1], failed):
        ran = paste(hint)
        shown = run_id.replace("\n", "\\n")  # as the table prints it, escaped
        assert ran.exit_code == 0 and ran.output.startswith(f"Run: {shown}  "), (hint, ran.output)
    resumed = paste(stopped.rpartition("; ")[2])  # found the run, whose loop (made in this test) it cannot import
    assert resumed.exit_code == 1 and f"fail.resume({run_id!r})" in resumed.output, resumed.output
    # Under $LOOMC_DB the file is named all the same: the command is pasted where it may not be set.
    monkeypatch.setenv("LOOMC_DB", str(db))
    assert f"`loomc resume {db_flag(db)} " in CliRunner().invoke(main, ["show", "--", run_id]).output.splitlines()[1]
    # The default file, .loomc/checkpoints.db under the working directory with $LOOMC_DB unset, goes unnamed.
    monkeypatch.delenv("LOOMC_DB")
    assert loop(budget=Budget(iterations=1))(fail).run(0, run_id=run_id).status == "failed"
    assert "--db" not in CliRunner().invoke(main, ["show", "--", run_id]).output.splitlines()[1]

    # A run in a store no command reads is told where to look instead.
    stalled = loop(budget=Budget(iterations=3), backtrack=LastGood(), on_stall=Escalate(after=2),
                   checkpoint="memory")(fail).run(0)
    assert stalled.status == "stalled" and str(stalled.error).endswith(
        f"inspect its .history; fail.resume({stalled.id!r}) gives it more calls")
    def tidy(state):
        return state

    done = loop(converge_on=predicate(lambda h: True), checkpoint="memory")(tidy)
    done.run(0, run_id="fin")
    with pytest.raises(RunAlreadyFinished, match=r"See it with tidy\.history\('fin'\)$"):
        done.resume("fin")


@settings(max_examples=20, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1),
                min_size=1, max_size=40))
def test_a_shell_reads_back_every_id_as_a_hint_quotes_it(ids):
    """Whatever a run id holds (quotes, spaces, newlines, escapes, right-to-left marks), bash reads the word a hint
    gives for it back as the id; and the word shows no control character raw, so printing it is safe too."""
    from loomc.errors import clean, shell_word
    words = [shell_word(i) for i in ids]
    assert all(clean(w) == w for w in words)
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + " ".join(words)], capture_output=True, check=True,
                         env={**os.environ, "LC_ALL": "C.UTF-8"}).stdout  # bytes: text mode would turn \r into \n
    assert out.decode().split("\0")[:-1] == ids
