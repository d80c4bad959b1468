"""Every store passes the conformance suite; the SQLite store also keeps its promises on disk."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import re
import selectors
import shutil
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from loomc import (Budget, CorruptStore, Escalate, MemoryStore, RunLocked, SchemaTooNew, SQLiteStore, StoreBusy, StoreError,
                   loop)
from loomc.stores.base import Totals
from loomc.stores.schema import READS_WITH, SCHEMA_VERSION, create_old_database, upgrade
from loomc.stores.sqlite import _transaction
from loomc.testing import OTHER, OWNER, StoreConformance, commit, make_run, make_step

from conftest import wait_for_file

HERE = Path(__file__).parent


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self):
        return MemoryStore()


class TestSQLiteStore(StoreConformance):
    @pytest.fixture(params=["full", "normal"])
    def store(self, tmp_path, request):
        s = SQLiteStore(tmp_path / "checkpoints.db", durability=request.param)
        yield s
        s.close()


def test_the_documented_tables_and_columns_exist(tmp_path):
    SQLiteStore(tmp_path / "c.db").close()
    conn = sqlite3.connect(tmp_path / "c.db")
    cols = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in ("runs", "steps")}
    assert {"id", "spec_hash", "status", "created_at", "updated_at"} <= cols["runs"]
    assert {"run_id", "step_n", "state_blob", "cost_usd", "score", "timestamp", "error"} <= cols["steps"]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_durability_sets_the_synchronous_pragma(tmp_path):
    full = SQLiteStore(tmp_path / "a.db")
    normal = SQLiteStore(tmp_path / "b.db", durability="normal")
    assert full._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert normal._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with pytest.raises(ValueError, match="durability"):
        SQLiteStore(tmp_path / "c.db", durability="fast")


def test_a_loomc_0_2_database_is_migrated_with_its_runs_and_steps(tmp_path):
    path = tmp_path / "old.db"
    conn = create_old_database(path, 1)
    conn.execute("INSERT INTO runs VALUES ('old1', 'abc', 'failed', '2026-07-03T12:00:19', '2026-07-03T12:01:00')")
    conn.executemany("INSERT INTO steps VALUES ('old1', ?, ?, ?, ?, '2026-07-03T12:00:2' || ?, ?)",
                     [(0, '{"v": 1}', 0.05, 0.25, 0, None), (1, '{"v": 2}', 0.05, 0.5, 1, None),
                      (2, None, 0.0, None, 2, "RuntimeError: rate limit")])
    conn.close()
    store = SQLiteStore(path)
    run = store.get_run("old1")
    assert run.status == "failed" and run.steps == 3 and run.total_cost == Decimal("0.1")
    steps = store.load_steps("old1")
    assert [s.n for s in steps] == [0, 1, 2] and steps[2].error == "RuntimeError: rate limit"
    assert steps[0].cost == Decimal("0.05")
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_schema_2_database_is_migrated_with_every_column_of_its_runs_and_steps(tmp_path):
    path = tmp_path / "v2.db"
    conn = create_old_database(path, 2)
    conn.execute("INSERT INTO runs (id, status, created_at, updated_at, owner) VALUES ('r2', 'running', 1, 2, 'me')")
    rows = [("r2", 0, '{"v": 1}', "0.05", 0.25, 10.0, None, 0.5, None, '["converged"]', "0.05", 0.5),
            ("r2", 1, None, "0.01", None, 11.0, "RuntimeError: boom", 0.25, '{"judge": "no"}', None, "0.06", 0.75)]
    conn.executemany("INSERT INTO steps (run_id, step_n, state_blob, cost_usd, score, timestamp, error, duration, "
                     "metrics, events, cum_cost, active_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    store = SQLiteStore(path)
    run = store.get_run("r2")
    assert (run.steps, run.total_cost, run.active_seconds) == (2, Decimal("0.06"), 0.75)
    first, second = store.load_steps("r2")
    assert (first.state_json, first.cost, first.score, first.events) == ('{"v": 1}', Decimal("0.05"), 0.25,
                                                                          ("converged",))
    assert (second.error, second.metrics, second.duration) == ("RuntimeError: boom", {"judge": "no"}, 0.25)
    conn = store._conn()
    assert conn.execute("SELECT value FROM loomc_meta WHERE key = 'reads_with'").fetchone() == (READS_WITH,)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_schema_3_database_gains_the_time_its_runs_were_last_seen(tmp_path):
    path = tmp_path / "v3.db"
    conn = create_old_database(path, 3)
    conn.execute("INSERT INTO runs (id, status, created_at, updated_at, owner) VALUES ('r3', 'running', 1, 2, 'me')")
    conn.close()
    store = SQLiteStore(path)
    run = store.get_run("r3")
    assert (run.status, run.updated_at, run.owner, run.seen_at) == ("running", 2.0, "me", None)
    assert run.seen_in_call(None) is None  # nothing to count a dead call's time by
    conn = store._conn()
    assert conn.execute("SELECT value FROM loomc_meta WHERE key = 'reads_with'").fetchone() == (READS_WITH,)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


@pytest.mark.parametrize("version", [1, 2, 3])
def test_several_processes_migrating_one_old_file_at_once_all_succeed(tmp_path, version):
    path = tmp_path / "old.db"
    conn = create_old_database(path, version)
    conn.execute("INSERT INTO runs (id, spec_hash, status, created_at, updated_at) "
                 "VALUES ('old1', 'abc', 'completed', '2026-07-03T12:00:19', '2026-07-03T12:00:19')")
    conn.close()
    code = f"from loomc import SQLiteStore; print(SQLiteStore({str(path)!r}).get_run('old1').status)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [o[0].strip() for o in outs] == ["completed"] * 4, [o[1] for o in outs]


def test_a_newer_schema_is_refused_with_the_version_it_needs(tmp_path):
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}.*upgrade loomc"):
        SQLiteStore(path)
    # A file written by a newer loomc names the oldest loomc that reads it.
    SQLiteStore(tmp_path / "ours.db").close()
    conn = sqlite3.connect(tmp_path / "ours.db")
    assert conn.execute("SELECT value FROM loomc_meta WHERE key = 'reads_with'").fetchone() == (READS_WITH,)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.execute("UPDATE loomc_meta SET value = '0.9.1' WHERE key = 'reads_with'")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew, match=r"pip install -U 'loomc>=0\.9\.1'"):
        SQLiteStore(tmp_path / "ours.db")


def test_a_migration_that_finds_a_newer_schema_under_the_lock_refuses_and_leaves_the_file_alone(tmp_path):
    # Another process, running a newer loomc, migrated the file between our first look and our lock.
    store = SQLiteStore(tmp_path / "c.db")
    conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}"):
        _transaction(store._conn(), upgrade, store.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    conn.close()
    store.close()


def test_a_corrupt_file_says_it_is_corrupt_and_where(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(CorruptStore, match=str(path.name)):
        SQLiteStore(path)


def test_a_path_that_cannot_hold_a_database_is_one_clear_store_error(tmp_path):
    """Regression: a directory that cannot be made escaped as a bare FileNotFoundError."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"cannot create .*a-file/sub for the checkpoint database "
                                         r"\(Not a directory\).*writable directory"):
        SQLiteStore(blocker / "sub" / "c.db")
    with pytest.raises(StoreError, match=r"is a directory; give the path of a database file in it, "
                                         r"such as .*checkpoints\.db"):
        SQLiteStore(tmp_path)
    (tmp_path / "x.db").mkdir()
    with pytest.raises(StoreError, match="is a directory"):
        loop(budget=Budget(iterations=1), checkpoint=str(tmp_path / "x.db"))(lambda s: s)(0)


@pytest.mark.parametrize("spec, says", [
    ("postgres://db.example/loomc", "looks like a URL, but loomc opens no database servers"),
    ("sqlite:///runs.db", "looks like a URL"),
    ("", "is empty"),
    ("SQLite", "would be a file of that name in the working directory; write checkpoint='sqlite'"),
    (":memory:", "write checkpoint='memory'"),
])
def test_a_checkpoint_string_that_cannot_mean_a_file_is_refused_at_decoration_time(tmp_path, monkeypatch, spec, says):
    """Each of these used to become a SQLite file (or a directory, for the URL) in the working directory."""
    from loomc import ConfigError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(says)):
        loop(checkpoint=spec)(lambda s: s)
    assert list(tmp_path.iterdir()) == []


def test_a_store_written_against_an_older_protocol_is_told_what_it_lacks():
    from loomc import ConfigError
    from loomc.stores.base import CheckpointStore
    methods = {name: getattr(MemoryStore, name) for name in dir(CheckpointStore)
               if not name.startswith("_") and name != "children"}
    OldStore = type("OldStore", (), {"__init__": MemoryStore.__init__, **methods})
    with pytest.raises(ConfigError, match=r"lacks children\(\), which every CheckpointStore has .*StoreConformance"):
        loop(checkpoint=OldStore())
    with pytest.raises(ConfigError, match="use 'sqlite', 'memory', a path to a SQLite file"):
        loop(checkpoint=object())


def test_another_programs_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="not a loomc one"):
        SQLiteStore(path)


def test_six_processes_write_many_runs_into_one_file_without_database_is_locked(tmp_path):
    db = tmp_path / "shared.db"
    code = """
import sys
from loomc import Budget, loop
@loop(budget=Budget(iterations=15), cost_fn=lambda s: 0.01, checkpoint=sys.argv[1])
def step(s):
    return s + 1
for k in range(8):
    step.run(0, run_id=f"{sys.argv[2]}-{k}")
print("ok")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db), f"p{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    results = [p.communicate(timeout=240) for p in procs]
    for out, err in results:
        assert out.strip() == "ok", err
        assert "locked" not in err
    store = SQLiteStore(db)
    runs = store.list_runs()
    assert len(runs) == 48
    assert all(r.steps == 15 and r.total_cost == Decimal("0.15") and r.status == "budget_exhausted" for r in runs)
    (count,) = store._conn().execute("SELECT count(*) FROM steps").fetchone()
    assert count == 48 * 15


def test_a_step_goes_in_unfenced_while_the_lease_is_fresh_and_fenced_past_half_its_life(tmp_path):
    store = SQLiteStore(tmp_path / "fence.db", durability="normal")
    seen: list[str] = []
    store._conn().set_trace_callback(seen.append)
    store.create_run(make_run("r1"))  # a 600 s lease
    commit(store, "r1", [make_step(0)])
    inserts = [s for s in seen if s.startswith("INSERT INTO steps")]
    assert len(inserts) == 1 and "WHERE EXISTS" not in inserts[0]

    seen.clear()
    store.create_run(make_run("r2").replace(lease_expires=time.time() + 0.2))
    time.sleep(0.15)  # past half the lease's life: the INSERT checks ownership and renews the lease
    store.commit_step("r2", make_step(0), Totals(Decimal("0.05"), 1, 0.0), OWNER, 600)
    inserts = [s for s in seen if s.startswith("INSERT INTO steps")]
    assert len(inserts) == 1 and "WHERE EXISTS" in inserts[0]
    assert store.get_run("r2").lease_expires > time.time() + 500
    store.close()


def test_an_owner_whose_lease_ran_out_cannot_commit_after_another_process_took_the_run(tmp_path):
    db = tmp_path / "takeover.db"
    first, second = SQLiteStore(db), SQLiteStore(db)  # one per process, as in real use
    first.create_run(make_run("r1").replace(lease_expires=time.time() + 0.3))
    first.commit_step("r1", make_step(0), Totals(Decimal("0.05"), 1, 0.0), OWNER, 0.3)
    time.sleep(0.4)  # the first owner stalls past its lease
    second.claim_run("r1", OTHER, 600, note="took over")
    with pytest.raises(RunLocked, match="no longer holds its lease"):
        first.commit_step("r1", make_step(1), Totals(Decimal("0.10"), 2, 1.0), OWNER, 0.3)
    second.commit_step("r1", make_step(1), Totals(Decimal("0.10"), 2, 1.0), OTHER, 600)
    assert [s.n for s in second.load_steps("r1")] == [0, 1]
    first.close()
    second.close()


def test_a_live_drive_keeps_its_lease_renewed_and_one_that_is_over_is_let_go(tmp_path):
    import gc
    from loomc.stores.base import Drive
    store = SQLiteStore(tmp_path / "keep.db", durability="normal")
    live, over = Drive(), Drive()
    for name, drive in (("live", live), ("over", over)):
        store.create_run(make_run(name).replace(owner=drive.owner, lease_expires=time.time() + 0.3))
    del over, drive  # its drive ended without releasing the run (its store failed, say)
    gc.collect()
    time.sleep(1.0)  # three leases: only a renewal keeps one
    assert store.get_run("live").lease_expires > time.time()
    assert store.get_run("over").lease_expires < time.time()
    assert store._leases.keys() == {"live"}
    store.commit_step("live", make_step(0), Totals(Decimal("0.05"), 1, 0.0), live.owner, 0.3)
    keeper = store._keeper
    # this thread's, the keeper's, and the spare one a deleted file is written back from
    assert keeper is not None and keeper.is_alive() and len(store._all) == 3
    store.finish_run("live", "completed", "done", live.owner)
    keeper.join(5)  # no lease left: the keeper ends, closing its connection
    assert not keeper.is_alive() and store._keeper is None and len(store._all) == 2
    store.create_run(make_run("again").replace(owner=live.owner, lease_expires=time.time() + 0.3))
    assert store._keeper is not None and store._keeper.is_alive(), "the next lease starts another"
    store.close()


def test_the_lease_keeper_renews_within_seconds_of_a_machine_waking(tmp_path, monkeypatch):
    """Its waits are timed on the monotonic clock, which stops while the machine sleeps: a keeper that waited for
    the lease's half life would renew it up to half a lease after the machine woke, the run meanwhile shown as
    crashed and open to a take-over. It looks again every few seconds (here a tenth of one)."""
    import loomc.stores.sqlite as sqlite_module
    from loomc.stores.base import Drive
    monkeypatch.setattr(sqlite_module, "KEEPER_LOOKS_SECONDS", 0.1)
    store = SQLiteStore(tmp_path / "wake.db", durability="normal")
    drive = Drive()
    store.create_run(make_run("lid").replace(owner=drive.owner, lease_expires=time.time() + 600))
    time.sleep(0.3)  # the keeper is waiting for the half life, five minutes away
    # The machine slept and woke: by the wall clock the half life has passed, and the lease is nearly out.
    with store._guard:
        store._leases["lid"] = (drive.owner, time.time() - 1, 600.0)
    store._conn().execute("UPDATE runs SET lease_expires = ? WHERE id = 'lid'", (time.time() + 1,))
    deadline = time.time() + 10
    while store.get_run("lid").lease_expires < time.time() + 500 and time.time() < deadline:
        time.sleep(0.05)
    assert store.get_run("lid").lease_expires > time.time() + 500, "renewed without waiting for a wake-up call"
    store.close()


def _use_store_in_forked_child(store: SQLiteStore, result: Any, parents: sqlite3.Connection) -> None:
    result.put(hasattr(store._local, "conn"))  # the parent's connection must not come along
    gc.collect()
    result.put(_is_open(parents))  # nor be closed here: that could checkpoint and remove the parent's WAL
    store.create_run(make_run("child"))
    commit(store, "child", [make_step(0), make_step(1)])
    result.put("ok")


def _is_open(conn: sqlite3.Connection) -> bool:
    try:
        conn.in_transaction
    except sqlite3.ProgrammingError:  # Cannot operate on a closed database
        return False
    return True


def test_a_threads_connection_is_closed_in_that_thread_when_it_ends(tmp_path):
    """Connections of threads that had ended (a pool running loops, an async loop's writer thread) were
    left open until the collector found them: Python 3.13 then warns "unclosed database" at exit."""
    import threading
    store = SQLiteStore(tmp_path / "threads.db")
    used = []

    def work(run_id: str) -> None:
        store.create_run(make_run(run_id))
        used.append(store._local.conn)

    for run_id in ("a", "b"):
        worker = threading.Thread(target=work, args=(run_id,))
        worker.start()
        worker.join()
    gc.collect()
    assert [_is_open(conn) for conn in used] == [False, False]
    assert _is_open(store._conn()) and {r.id for r in store.list_runs()} == {"a", "b"}  # the store goes on
    store.close()


def test_a_forked_child_opens_its_own_connection_and_the_parent_keeps_working(tmp_path):
    store = SQLiteStore(tmp_path / "fork.db")
    store.create_run(make_run("parent"))
    commit(store, "parent", [make_step(0)])
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    child = ctx.Process(target=_use_store_in_forked_child, args=(store, result, store._local.conn))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert result.get(timeout=5) is False and result.get(timeout=5) is True and result.get(timeout=5) == "ok"
    store.commit_step("parent", make_step(1), Totals(Decimal("0.10"), 2, 1.0), OWNER, 600)
    assert [s.n for s in store.load_steps("parent")] == [0, 1]
    assert [s.n for s in store.load_steps("child")] == [0, 1]
    store.close()


_POOLED = """
from loomc import Budget, loop, predicate

@loop(budget=Budget(iterations=3), checkpoint={path!r}, cost_fn=lambda s: 0.25)
def refine(state):
    return {{"n": state["n"] + 1}}

@loop(budget=Budget(usd=1.0), converge_on=predicate(lambda h: h[-1].state["n"] >= 2), checkpoint={path!r},
      cost_fn=lambda s: 0.25)
def until_two(state):
    return {{"n": state["n"] + 1}}

async def _step(state):
    return {{"n": state["n"] + 10}}

arefine = loop(budget=Budget(iterations=2), checkpoint={path!r})(_step)  # bound to a name other than fn's

@loop(budget=Budget(iterations=3), checkpoint={path!r})
def overloaded(state):
    import httpx2, openai
    request = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    raise openai.RateLimitError("Rate limit reached", response=httpx2.Response(429, request=request), body=None)

def _plus(state, k):
    return state + k

import functools
plus_five = loop(budget=Budget(iterations=2), checkpoint={path!r})(functools.partial(_plus, k=5))

@loop(budget=Budget(iterations=3), checkpoint={path!r})
def stopped(state):
    import loomc
    loomc.request_stop()  # as a SIGTERM handler in the worker would
    return state + 1
"""


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_loop_runs_in_a_process_pool_as_a_function_would(tmp_path, monkeypatch, method):
    """A loop is pickled by the name its module binds it to: `pool.map(refine, states)` raised PicklingError
    ("it's not the same object as jobs.refine"), as the decorated object stands where the function was."""
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    import loomc
    import loomc.budget
    from loomc import BudgetExhausted, ConfigError
    path = tmp_path / "pooled.db"
    (tmp_path / f"pooled_{method}.py").write_text(_POOLED.format(path=str(path)))
    monkeypatch.syspath_prepend(str(tmp_path))
    jobs = __import__(f"pooled_{method}")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as pool:
        runs = list(pool.map(jobs.refine.run, [{"n": 0}, {"n": 10}, {"n": 20}]))
        failed = pool.submit(jobs.refine, {"n": 0}).exception(timeout=120)
        pooled_async = list(pool.map(_run_async_loop, [jobs.arefine]))  # an async loop, given to a worker
        # A Run whose policy holds a lambda comes back too (it failed to pickle), with the policy's text and caps
        (converged,) = pool.map(jobs.until_two.run, [{"n": 0}])
        # A Run failed with an error that does not unpickle (openai's) comes back with it told as a RunError; it
        # broke the pool. A stop asked for in the worker comes back as StopRequested, which did not unpickle either.
        (overloaded,) = pool.map(jobs.overloaded.run, [0])
        stop = pool.submit(jobs.stopped, 0).exception(timeout=120)
        after = pool.submit(jobs.refine, {"n": 5}).exception(timeout=120)  # the pool still works (its workers may
        assert isinstance(after, (BudgetExhausted, loomc.StopRequested))  # be stopping: refine does not start there)
    assert [(r.status, r.state, r.history.total_cost) for r in runs] == \
        [("budget_exhausted", {"n": n + 3}, Decimal("0.75")) for n in (0, 10, 20)]
    assert isinstance(failed, BudgetExhausted) and failed.state == {"n": 3} and len(failed.history) == 3
    assert pooled_async == [{"n": 20}]
    assert (converged.status, converged.state, len(converged.history)) == ("completed", {"n": 2}, 2)
    assert repr(converged.policy) == "Budget(usd=1.0) | predicate(<lambda>) | unreported_spend(calls=100)"
    assert loomc.budget.usd_cap(converged.policy) == Decimal("1.0")
    assert "predicate(&lt;lambda&gt;)" in converged._repr_html_()  # the notebook view, with the cap's line
    with pytest.raises(ConfigError, match=r"this policy came with a Run from another process, as its text and its "
                                          r"caps only .*replay the loop's own policy instead"):
        converged.policy.replay(converged.history)
    assert jobs.until_two.policy.replay(converged.history).stopped_after == 2
    assert overloaded.status == "failed" and type(overloaded.error) is loomc.RunError
    assert str(overloaded.error).startswith("openai.RateLimitError: Rate limit reached (told as a RunError: the error "
                                            "does not unpickle, TypeError: ")
    assert overloaded.error.run_id == overloaded.id and overloaded.error.__notes__ == [
        f"loomc: run {overloaded.id} failed; resume it with overloaded.resume('{overloaded.id}')"]
    assert isinstance(stop, loomc.StopRequested) and stop.code == 1 and stop.state == 1
    store = SQLiteStore(path)
    assert sorted(r.steps for r in store.list_runs()) == [1, 1, 2, 2, 3, 3, 3, 3, 3]  # the workers wrote to one file
    store.close()
    assert pickle.loads(pickle.dumps(jobs.refine)) is jobs.refine
    # A loop of a functools.partial is found in its function's module (a partial names functools as its own): it
    # pickles, and its hints name it (they said partial.resume(...))
    assert pickle.loads(pickle.dumps(jobs.plus_five)) is jobs.plus_five
    with pytest.raises(BudgetExhausted) as capped:
        jobs.plus_five(0)
    assert capped.value.state == 10 and f"plus_five.resume('{capped.value.run_id}', budget=Budget(...))" in \
        str(capped.value)

    def local():
        @loop(checkpoint="memory")
        def inner(state: dict) -> dict:
            return state
        return inner
    with pytest.raises(pickle.PicklingError, match=r"loop inner cannot be pickled: another process finds a loop by "
                                                   r"the name its module gives it, and module '[\w.]+' binds this "
                                                   r"loop to no name. Define it at module level"):
        pickle.dumps(local())


_MAIN_POOLED = """
import json, sys
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from joblib import Parallel, delayed  # loads cloudpickle, which sends a function of __main__ by value
from loomc import Budget, MemoryStore, SQLiteStore, loop, semantic_delta

@loop(budget=Budget(iterations=2), checkpoint=sys.argv[1], cost_fn=lambda s: 0.5)
def work(state):
    return state + 1

def embed(texts):  # a measure the loop takes at the edge: its copy in a worker takes it there
    return [[1.0, float(len(t))] for t in texts]

@loop(budget=Budget(iterations=2), checkpoint="memory", converge_on=semantic_delta(0.5, embed_fn=embed))
def scratch(state):
    return state + 1

if __name__ == "__main__":
    first = work.run(0)  # the store is open in this process now
    scratch.run(0)  # and the measure is ready here
    joblib_runs = Parallel(n_jobs=2)(delayed(work.run)(s) for s in (10, 20))
    joblib_scratch = Parallel(n_jobs=2)(delayed(scratch.run)(s) for s in (30,))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pooled = list(pool.map(work.run, (40,)))
    print(json.dumps([[r.status, r.state, str(r.total_cost)] for r in [first, *joblib_runs, *joblib_scratch, *pooled]]))
"""


def test_a_loop_of_a_script_runs_in_joblib_and_in_a_process_pool(tmp_path):
    """A loop of ``__main__`` (a script, a notebook) goes by name to a multiprocessing worker, which runs the script
    as its own __main__, and as a copy to one of joblib's, which does not: it used to fail to pickle once its store
    was open ("Could not pickle the task"), and a by-name reference alone left joblib's workers without it."""
    script, db = tmp_path / "sweep.py", tmp_path / "sweep.db"
    script.write_text(_MAIN_POOLED)
    done = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [
        ["budget_exhausted", 2, "1.0"], ["budget_exhausted", 12, "1.0"], ["budget_exhausted", 22, "1.0"],
        ["completed", 32, "0"], ["budget_exhausted", 42, "1.0"]]
    store = SQLiteStore(db)
    assert sorted(r.steps for r in store.list_runs()) == [2, 2, 2, 2]  # the workers wrote to the script's file
    store.close()


_MAIN_BY_NAME = """
import pickle, subprocess, sys
from loomc import loop

@loop(checkpoint="memory")
def work(state):
    return state

if __name__ == "__main__":
    read = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"  # a process whose __main__ is another
    done = subprocess.run([sys.executable, "-c", read], input=pickle.dumps(work), capture_output=True)
    print(done.stderr.decode().strip().splitlines()[-1])
"""


def test_a_loop_of_main_read_where_main_is_another_says_how_to_send_it(tmp_path):
    """Without cloudpickle a loop of __main__ goes by name; a process that does not run that script (a notebook's
    loop, a worker started by hand) said only "module '__main__' has no attribute 'work'"."""
    script = tmp_path / "by_name.py"
    script.write_text(_MAIN_BY_NAME)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert re.fullmatch(r"AttributeError: loop work cannot be found in this process \(pid \d+\): it was defined in "
                        r"__main__ \(a notebook, or a script\) that this process does not run; define it in a module "
                        r"both import, or send it with joblib \(or cloudpickle\), which carries a copy of it",
                        done.stdout.strip()), done.stdout + done.stderr


def test_stores_pickle_as_their_file_or_a_copy_of_their_runs(tmp_path):
    import pickle
    store = SQLiteStore(tmp_path / "p.db", durability="normal")
    store.create_run(make_run("r"))
    again = pickle.loads(pickle.dumps(store))
    assert (again.path, again.durability, again.get_run("r").id) == (store.path, "normal", "r")
    memory = MemoryStore()
    memory.create_run(make_run("m"))
    commit(memory, "m", [make_step(0)])
    copied = pickle.loads(pickle.dumps(memory))
    commit(copied, "m", [make_step(1)], OWNER)  # its own lock, its own runs
    assert [s.n for s in copied.load_steps("m")] == [0, 1] and [s.n for s in memory.load_steps("m")] == [0]
    store.close()
    again.close()


def _charge_in_worker(x: int) -> int:
    import loomc
    loomc.charge(0.25)  # a paid call made in a worker that fn forked
    return x


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_charge_in_a_process_forked_inside_fn_is_refused_not_lost(tmp_path, method):
    """A worker forked inside fn inherits the loop's context but not its run: its charge went to a copy of the step
    in the worker's memory, and the run recorded $0 for $1.50 spent under a $1.00 cap, its show calling them late
    charges of a process that had lost the run. It is a ConfigError now, which stops the run after that step."""
    import loomc
    from concurrent.futures import ProcessPoolExecutor

    @loop(budget=Budget(usd=1.0, iterations=3), checkpoint=tmp_path / "f.db", backtrack=loomc.LastGood())
    def fan_out(state: dict) -> dict:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as pool:
            list(pool.map(_charge_in_worker, [1, 2]))
        return {"n": state["n"] + 1}

    run = fan_out.run({"n": 0})
    assert run.status == "failed" and len(run.history) == 1  # a ConfigError: no backtracker goes on from it
    if method == "spawn":  # a worker that does not inherit the context: told that it is one, not of threads
        assert run.history[0].error.startswith(
            "ConfigError: loomc.charge() was called outside a loop iteration; call it inside the function decorated "
            "with @loop. This is a worker process (pid ")
        assert ("if fn started it, it cannot charge fn's step, which lives in fn's process; have the worker return "
                "what its calls cost and charge that in fn (loomc.charge(sum(costs))) (the $0.2500 charged here is "
                "not counted)") in run.history[0].error
        return
    assert re.fullmatch(
        r"ConfigError: loomc\.charge\(\) was called in process \d+, forked from the process driving run \w+ \(a "
        r"process pool's worker, started inside fn\): the step in flight lives in that process, so what is charged "
        r"here cannot join it \(the \$0\.2500 charged here is not counted\)\. Have the worker return what its "
        r"calls cost and charge that in fn \(loomc\.charge\(sum\(costs\)\)\), or make the paid calls in threads .*",
        run.history[0].error)
    assert fan_out.store.pending_charges(run.id) == {}  # nothing written under the run from the workers


_FORKED_CHILDREN = """
import sys, warnings
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import loomc
from loomc import Budget, loop

@loop(budget=Budget(iterations=2), checkpoint=sys.argv[1], cost_fn=lambda s: 0.25)
def child(x):
    return x + 1

def work(x):
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        run = child.run(x)
    return run.id, run.state, str(run.total_cost), [str(w.message) for w in told]

@loop(budget=Budget(usd=5.0, iterations=1), checkpoint=sys.argv[1])
def parent(state):
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        out = list(pool.map(work, [10, 20]))
    loomc.charge(sum(float(cost) for _, _, cost, _ in out))
    return out

if __name__ == "__main__":
    import json
    run = parent.run(0, run_id="p")
    print(json.dumps([run.status, str(run.total_cost), run.state]))
"""


def test_a_loop_run_in_a_process_forked_inside_fn_is_a_run_of_its_own_and_says_so(tmp_path):
    """Such a loop took itself for a child of the step it was forked from, whose copy gave every worker the same
    child id: the second worker found the first's run stored and got its result (12 for 20, not 22), and its spend
    was said to be counted in the parent's, which never saw it."""
    script, db = tmp_path / "forked.py", tmp_path / "forked.db"
    script.write_text(_FORKED_CHILDREN)
    done = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status, cost, out = json.loads(done.stdout.splitlines()[-1])
    assert (status, cost) == ("budget_exhausted", "1.0")
    assert [(state, Decimal(spent)) for _, state, spent, _ in out] == [(12, Decimal("0.5")), (22, Decimal("0.5"))]
    ids = [run_id for run_id, _, _, _ in out]
    assert len(set(ids)) == 2 and not any(run_id.startswith("p-") for run_id in ids)
    for *_, told in out:
        assert len(told) == 1 and re.fullmatch(
            r"loop child starts a run of its own in process \d+, forked from the process driving run p \(a process "
            r"pool's worker, started inside fn\): it is no child of step 0, which lives in that process, so what it "
            r"spends is not billed to run p, and that run's USD cap does not see it\. Have the worker return "
            r"run\.total_cost and charge it in fn", told[0])
    store = SQLiteStore(db)
    assert {r.id: r.parent_run_id for r in store.list_runs()} == {"p": None, ids[0]: None, ids[1]: None}
    store.close()


def _run_async_loop(runner) -> dict:
    import asyncio
    return asyncio.run(runner.run({"n": 0})).state


@pytest.mark.parametrize("due", [300, -1])
def test_the_lease_keeper_survives_leases_coming_and_going_around_it(tmp_path, due):
    """Regression: the keeper died on 'dictionary changed size during iteration' when a run started
    or ended while it looked for the next lease due, and no lease of that store was renewed after. Leases
    that are due (-1) are let go by it, while their drives' ends drop them too: that raised KeyError."""
    import threading
    from loomc.stores.base import Drive
    store = SQLiteStore(tmp_path / "churn.db", durability="normal")
    drive = Drive()
    store.create_run(make_run("kept").replace(owner=drive.owner, lease_expires=time.time() + 600))
    stop, failures = threading.Event(), []

    def churn() -> None:  # leases taken and dropped as fast as runs could start and end
        while not stop.is_set():
            for i in range(20):
                store._leases[f"r{i}"] = (OWNER, time.time() + due, 600.0)
            for i in range(20):
                store._leases.pop(f"r{i}", None)

    def renew() -> None:  # what the keeper does each time it wakes
        try:
            while not stop.is_set():
                store._renew_leases()
        except Exception as e:
            failures.append(e)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns between any two bytecodes: races show
    try:
        threads = [threading.Thread(target=churn), threading.Thread(target=renew)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(switch)
    assert failures == []
    store.close()


def test_a_store_dropped_without_close_closes_its_connections(tmp_path):
    """Python 3.13 warns of every sqlite3 connection collected unclosed (a ResourceWarning each, which
    pytest shows): a dropped store closes the ones it can."""
    import gc
    store = SQLiteStore(tmp_path / "dropped.db")
    store.list_runs()
    conn = store._conn()
    del store
    gc.collect()
    with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
        conn.execute("SELECT 1")


# --- a store that fails under a running loop ----------------------------------

def _growing_loop(store: SQLiteStore, calls: list[int], kind: str = "sync"):
    def grown(state: dict) -> dict:
        calls.append(state["i"])
        return {"i": state["i"] + 1, "text": "x" * 3000 * (state["i"] + 1)}
    if kind == "sync":
        return loop(budget=Budget(iterations=12), checkpoint=store, cost_fn=lambda s: 0.5)(grown)

    async def grow(state: dict) -> dict:
        return grown(state)
    return loop(budget=Budget(iterations=12), checkpoint=store, cost_fn=lambda s: 0.5)(grow)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_full_disk_is_a_store_error_that_keeps_the_paid_state_and_the_run_resumes_once_there_is_room(tmp_path,
                                                                                                       kind):
    import asyncio
    store = SQLiteStore(tmp_path / "checkpoints.db", durability="normal")
    calls: list[int] = []
    grow = _growing_loop(store, calls, kind)
    go = (lambda f, *a: f(*a)) if kind == "sync" else (lambda f, *a: asyncio.run(f(*a)))

    def writing(sql: str):  # on the connection that commits: an async loop's is the store's writer thread's
        return (store._conn().execute(sql) if kind == "sync" else
                store.writer.submit(lambda: store._conn().execute(sql).fetchall()).result())
    pages = store._conn().execute("PRAGMA page_count").fetchone()[0]
    writing(f"PRAGMA max_page_count = {pages + 12}")  # SQLite's own "database or disk is full"
    with pytest.raises(StoreError, match=r"checkpoints\.db: OperationalError: database or disk is full; the disk, "
                                         r"or the database's size limit, is full: free some space") as caught:
        go(grow, {"i": 0, "text": ""})
    e = caught.value
    lost = e.history[-1].n  # the step whose commit failed
    assert 0 < lost < 12 and len(e.history) == lost + 1
    assert e.state["i"] == lost + 1 == e.history[-1].state["i"]  # what that paid call returned, not the one before
    assert any(f"step {lost} of run {e.run_id} ($0.5000) was not committed; it is on this error's .history[-1], "
               "with what fn returned. It is recorded as failed, without its state, so that its cost and its call "
               "count on resume" in note for note in e.__notes__)
    record = store.get_run(e.run_id)
    assert record.status == "failed" and record.reason.startswith("StoreError: ")
    assert record.reason.endswith(f"while step {lost} was being committed")  # not "after step {lost}"
    # The paid call is in the ledger: a failed step without its state, as for a process that died in it
    assert record.steps == lost + 1 and record.total_cost == Decimal("0.5") * (lost + 1)
    failed = store.load_steps(e.run_id)[-1]
    assert failed.n == lost and failed.state_json is None and failed.cost == Decimal("0.5")
    assert failed.error.startswith("Not stored: its commit failed (StoreError: ")
    assert failed.events == ("failed", "not stored")
    from click.testing import CliRunner

    from loomc.cli import main
    shown = CliRunner().invoke(main, ["show", "--db", str(store.path), e.run_id]).output.splitlines()
    assert re.match(rf" +{lost} +\$0\.5000 .* Not stored: its commit failed \(StoreError: .*  <- not stored$",
                    shown[-1])
    one = CliRunner().invoke(main, ["show", "--db", str(store.path), e.run_id, "--step", str(lost)]).output
    assert "State: none (its commit failed: what fn returned was on the error raised, and is not in the store)" in one
    # A result the store refused says nothing of whether the loop is going anywhere: no stall is counted for it
    assert Escalate(after=1).replay(grow.history(e.run_id)).stopped_after is None
    assert Escalate(after=1).replay(grow.history(e.run_id)[:-1].append(
        grow.history(e.run_id)[-1].replace(events=("failed",)))).stopped_after == lost + 1
    writing("PRAGMA max_page_count = 1000000")
    run = go(grow.resume_run, e.run_id)
    assert run.status == "budget_exhausted" and [s.n for s in run.history] == list(range(12))
    # The resume goes on from the step before the lost one: 12 paid calls in all under iterations=12 (it used to
    # make the lost call again as step {lost}, uncounted: 13 calls, $6.50 spent and $6.00 recorded)
    assert calls == [*range(lost + 1), *range(lost, 11)]
    assert run.history.total_cost == Decimal("6.0") and not run.history[lost].ok
    store.close()


_HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_file_locked_past_the_busy_timeout_is_a_store_error_and_the_run_resumes(tmp_path, monkeypatch, kind):
    import asyncio

    import loomc.stores.sqlite as sqlite_store
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 300)
    path = tmp_path / "checkpoints.db"
    store = SQLiteStore(path, durability="normal")
    holder: list[subprocess.Popen[str]] = []

    def lock_the_file_at(state: dict) -> dict:
        if state["i"] == 2 and not holder:  # another process takes the write lock and keeps it
            holder.append(subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True))
            assert holder[0].stdout is not None and holder[0].stdout.readline() == "locked\n"
        return {"i": state["i"] + 1}

    if kind == "sync":
        @loop(budget=Budget(iterations=5), checkpoint=store)
        def count(state: dict) -> dict:
            return lock_the_file_at(state)
        go = lambda: count({"i": 0})  # noqa: E731
        resume = count.resume_run
    else:
        @loop(budget=Budget(iterations=5), checkpoint=store)
        async def count(state: dict) -> dict:
            return lock_the_file_at(state)
        go = lambda: asyncio.run(count({"i": 0}))  # noqa: E731
        resume = lambda run_id: asyncio.run(count.resume_run(run_id))  # noqa: E731
    try:
        with pytest.raises(StoreError, match=r"database is locked; another connection kept it locked for longer "
                                             r"than loomc waits \(0.3s\)") as caught:
            go()
    finally:
        if holder:
            holder[0].communicate("go\n", timeout=30)
    e = caught.value
    # StoreBusy: loomc does not try that commit again (as failed, without its state): it would wait as long again
    assert isinstance(e, StoreBusy) and e.state == {"i": 3} and len(store.load_steps(e.run_id)) == 2
    assert any("step 2 of run" in note and "was not committed" in note
               for note in e.__notes__)
    run = resume(e.run_id)
    assert run.status == "budget_exhausted" and run.state == {"i": 5} and len(run.history) == 5
    store.close()


def test_a_charge_whose_write_ahead_failed_still_counts_in_its_step(tmp_path, monkeypatch):
    """The money was spent whatever the store said: the step that charged it carries it."""
    import loomc
    import loomc.stores.sqlite as sqlite_store
    from loomc import LastGood
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 300)
    path = tmp_path / "checkpoints.db"
    store = SQLiteStore(path, durability="normal")

    calls: list[int] = []

    @loop(budget=Budget(usd=10, iterations=3), backtrack=LastGood(), checkpoint=store)
    def paid(state: dict) -> dict:
        calls.append(state["i"])
        if len(calls) == 2:  # another process holds the write lock while this step charges
            holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
                loomc.charge(0.5)  # the write-ahead times out: StoreError, and the step fails
            finally:
                holder.communicate("go\n", timeout=30)
        else:
            loomc.charge(0.25)
        return {"i": state["i"] + 1}

    run = paid.run({"i": 0})
    assert [s.ok for s in run.history] == [True, False, True], [s.error for s in run.history]
    assert run.history[1].error.startswith("StoreBusy: ") and "database is locked" in run.history[1].error
    assert [s.cost for s in run.history] == [Decimal("0.25"), Decimal("0.5"), Decimal("0.25")]
    assert store.get_run(run.id).total_cost == Decimal("1.0")
    store.close()


def test_a_ctrl_c_that_lands_inside_a_commit_still_commits_the_paid_step_then_stops(tmp_path, monkeypatch):
    """Python raises KeyboardInterrupt at the next bytecode after SQLite returns, so a Ctrl-C during
    a commit can land between the INSERT and the COMMIT, and the rollback dropped the paid step."""
    store = SQLiteStore(tmp_path / "checkpoints.db", durability="normal")
    real = SQLiteStore._insert_step
    landed: list[int] = []

    def interrupted_after_insert(self, cur, run_id, step, *args):
        real(self, cur, run_id, step, *args)
        if step.n == 2 and not landed:  # the signal arrives right after the INSERT returned
            landed.append(step.n)
            raise KeyboardInterrupt

    monkeypatch.setattr(SQLiteStore, "_insert_step", interrupted_after_insert)

    @loop(budget=Budget(iterations=5), cost_fn=lambda s: 0.25, checkpoint=store)
    def paid(state: dict) -> dict:
        return {"i": state["i"] + 1}

    with pytest.raises(KeyboardInterrupt):
        paid({"i": 0}, run_id="ctrl-c")
    record = store.get_run("ctrl-c")
    assert landed == [2] and record.status == "cancelled"
    assert [s.n for s in store.load_steps("ctrl-c")] == [0, 1, 2], "the interrupted commit went in"
    assert record.total_cost == Decimal("0.75")
    assert paid.resume_run("ctrl-c").state == {"i": 5}
    store.close()


def test_a_ctrl_c_just_after_begin_leaves_no_transaction_open_to_lock_the_file(tmp_path):
    """The signal lands at the bytecode after ``BEGIN IMMEDIATE`` returned (raised here from a profile
    hook, where Python would raise it). That transaction used to stay open: it held the file's write
    lock against every other process, and every later write on the connection failed with "cannot
    start a transaction within a transaction", so the run could not be resumed in that process."""
    path = tmp_path / "checkpoints.db"
    store = SQLiteStore(path, durability="normal")
    landed: list[int] = []

    def after_begin_of_step_2(frame, event, arg):
        if event == "c_return" and frame.f_code is _transaction.__code__ and arg.__name__ == "execute":
            fn, args = frame.f_locals["fn"], frame.f_locals["args"]
            if fn.__name__ == "_insert_step" and args[1].n == 2:
                sys.setprofile(None)
                landed.append(args[1].n)
                raise KeyboardInterrupt

    @loop(budget=Budget(iterations=5), cost_fn=lambda s: 0.25, checkpoint=store)
    def paid(state: dict) -> dict:
        return {"i": state["i"] + 1}

    sys.setprofile(after_begin_of_step_2)
    try:
        with pytest.raises(KeyboardInterrupt):
            paid({"i": 0}, run_id="ctrl-c")
    finally:
        sys.setprofile(None)
    assert landed == [2]
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # "database is locked" while the interrupted transaction stayed open
    other.execute("ROLLBACK")
    other.close()
    record = store.get_run("ctrl-c")
    assert record.status == "cancelled"
    assert [s.n for s in store.load_steps("ctrl-c")] == [0, 1, 2], "the paid step still went in"
    assert record.total_cost == Decimal("0.75")
    resumed = paid.resume_run("ctrl-c")  # in the same process, on the same connection
    assert resumed.state == {"i": 5} and [s.n for s in resumed.history] == [0, 1, 2, 3, 4]
    store.close()


def test_a_transaction_left_open_by_an_interrupted_rollback_is_rolled_back_before_the_next_write(tmp_path):
    """A second Ctrl-C during the rollback can still leave one open: the next write ends it first,
    and what it held was never committed."""
    store = SQLiteStore(tmp_path / "checkpoints.db", durability="normal")
    store.create_run(make_run("left-open"))
    conn = store._conn()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE runs SET reason = 'never committed' WHERE id = 'left-open'")
    commit(store, "left-open", [make_step(0)])
    assert not conn.in_transaction
    assert store.get_run("left-open").reason is None
    assert [s.n for s in store.load_steps("left-open")] == [0]
    store.close()


def test_a_checkpoint_created_on_a_containers_own_filesystem_is_pointed_out(tmp_path, monkeypatch):
    """In a Kubernetes pod the working directory is on the container's overlay root, which the container
    restarted after a crash does not have: the default checkpoint went with it, silently, and
    `run(..., resume=True)` started over, paying again for every step."""
    import warnings
    from loomc import ContainerFilesystemWarning
    from loomc.stores import sqlite as sqlite_store
    volume = tmp_path / "data"
    mounts = tmp_path / "mounts"
    mounts.write_text("overlay / overlay rw,relatime,lowerdir=/var/lib/a:/var/lib/b,upperdir=/u,workdir=/w 0 0\n"
                      f"/dev/sdb {volume} ext4 rw,relatime 0 0\n")
    monkeypatch.setattr(sqlite_store, "MOUNTS", str(mounts))
    with pytest.warns(ContainerFilesystemWarning, match=r"is on the container's own filesystem \(overlay\)") as caught:
        store = SQLiteStore(tmp_path / "app" / ".loomc" / "checkpoints.db")
    assert caught[0].filename == __file__ and "Keep the checkpoint on a volume" in str(caught[0].message)
    store.create_run(make_run("r"))  # it works: the warning is about what a crash leaves
    store.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SQLiteStore(tmp_path / "app" / ".loomc" / "checkpoints.db")  # said when it was created, not on every open
        SQLiteStore(volume / "checkpoints.db")  # a volume mounted into the container keeps it


def test_a_checkpoint_on_a_network_filesystem_is_pointed_out_once_opened(tmp_path, monkeypatch):
    """WAL keeps its index in shared memory, which hosts cannot share over NFS, SMB or EFS."""
    import warnings
    from loomc import NetworkFilesystemWarning
    from loomc.stores import sqlite as sqlite_store
    shared, spaced, local = tmp_path / "efs", tmp_path / "team share", tmp_path / "efs-not"
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw,relatime 0 0\n"
                      f"fs-1234.efs.amazonaws.com:/ {shared} nfs4 rw,vers=4.1 0 0\n"
                      f"//nas/share {str(spaced).replace(' ', chr(92) + '040')} cifs rw 0 0\n"
                      f"tmpfs {shared}/scratch tmpfs rw 0 0\n")
    monkeypatch.setattr(sqlite_store, "MOUNTS", str(mounts))
    for where, kind in ((shared, "nfs4"), (spaced, "cifs")):
        with pytest.warns(NetworkFilesystemWarning, match=rf"is on a network filesystem \({kind}\)") as caught:
            store = SQLiteStore(where / "checkpoints.db")
        assert caught[0].filename == __file__ and "Keep the checkpoint on a local disk" in str(caught[0].message)
        store.create_run(make_run("r"))  # it still works: the warning is about hosts sharing it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SQLiteStore(local / "c.db")  # a sibling whose name starts the same is not inside the mount
        SQLiteStore(shared / "scratch" / "c.db")  # the deepest mount point holding the file decides
    monkeypatch.setattr(sqlite_store, "MOUNTS", str(tmp_path / "no-such-file"))  # not Linux: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SQLiteStore(shared / "again.db")


# --- a file deleted while in use ---------------------------------------------------------------------------

def _steps_in(db: Path, run_id: str) -> list[int]:
    """The step numbers of ``run_id`` in the file at ``db``, read by a connection of its own."""
    conn = sqlite3.connect(db)
    try:
        return [n for (n,) in conn.execute("SELECT step_n FROM steps WHERE run_id = ? ORDER BY step_n", (run_id,))]
    finally:
        conn.close()


def _removing_at_2(folder: Path, after: Any = lambda: None, each: Any = lambda: None) -> Any:
    """fn(state) counting on by one, which removes ``folder`` when the state is 2 (`rm -r .loomc` while its run is
    live) and then calls ``after()``; ``each()`` on every call."""
    def body(s):
        if s == 2:
            shutil.rmtree(folder)
            after()
        each()
        return s + 1
    return body


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_a_file_deleted_during_a_run_is_written_back_and_the_run_goes_on_in_it(tmp_path, aio):
    import asyncio
    from loomc import CheckpointMovedWarning, charge
    from conftest import sync_or_async
    folder = tmp_path / ".loomc"
    db = folder / "checkpoints.db"
    # the write-ahead charge is the first write to find the file gone
    body = _removing_at_2(folder, after=lambda: charge(0.10, "model"))
    work = loop(budget=Budget(iterations=6), cost_fn=lambda s: 0.25, checkpoint=str(db))(sync_or_async(body, aio))
    with pytest.warns(CheckpointMovedWarning, match=r"was deleted \(or moved away\) while this process was writing "
                                                    r"runs to it; loomc wrote it back .*\(1 run, 2 steps\)"):
        run = asyncio.run(work.run(0, run_id="r1")) if aio else work.run(0, run_id="r1")
    assert run.status == "budget_exhausted" and run.state == 6
    assert db.exists() and _steps_in(db, "r1") == list(range(6))
    fresh = SQLiteStore(db)  # as another process, or `loomc show`, reads it
    record = fresh.get_run("r1")
    assert record.status == "budget_exhausted" and record.steps == 6
    assert record.total_cost == Decimal("1.60")  # 6 x $0.25, and the $0.10 charged after the deletion
    (note,) = record.notes  # as `loomc show` prints it
    assert re.fullmatch(r"its checkpoint file was deleted \(or moved away\) at \S+ while it ran; its process "
                        r"\(\S+\) wrote the file back from its open connection, and the run went on in it", note)
    fresh.close()


def test_processes_writing_a_deleted_file_all_go_on_in_the_one_written_back(tmp_path):
    folder = tmp_path / ".loomc"
    db = folder / "checkpoints.db"
    code = """
import pathlib, sys, time, warnings
from loomc import Budget, loop
warnings.simplefilter("always")
marks = pathlib.Path(sys.argv[3])
@loop(budget=Budget(iterations=12), cost_fn=lambda s: 0.01, checkpoint=sys.argv[1])
def step(s):
    if s == 4:
        (marks / sys.argv[2]).touch()  # steps 0-3 committed
        deadline = time.time() + 120
        while not (marks / "deleted").exists() and time.time() < deadline:
            time.sleep(0.01)
    return s + 1
run = step.run(0, run_id=sys.argv[2])
print(run.status, run.state)
"""
    marks = tmp_path / "marks"
    marks.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db), f"p{i}", str(marks)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for i in range(3)]
    for i in range(3):
        wait_for_file(marks / f"p{i}")
    shutil.rmtree(folder)
    (marks / "deleted").touch()
    results = [p.communicate(timeout=240) for p in procs]
    for out, err in results:
        assert out.strip() == "budget_exhausted 12", err
    warned = sum(err.count("CheckpointMovedWarning") for _, err in results)
    assert warned == 1  # one process wrote it back; the others followed it there
    for i in range(3):
        assert _steps_in(db, f"p{i}") == list(range(12))
    store = SQLiteStore(db)
    assert {r.id: r.total_cost for r in store.list_runs()} == {f"p{i}": Decimal("0.12") for i in range(3)}
    store.close()


def test_a_database_made_anew_over_a_deleted_one_is_left_alone_and_the_runs_are_saved_beside_it(tmp_path):
    folder = tmp_path / ".loomc"
    db = folder / "checkpoints.db"

    def made_anew():  # as another process's loop makes the default file anew
        theirs = SQLiteStore(db)
        theirs.create_run(make_run("theirs"))
        theirs.close()

    body = _removing_at_2(folder, after=made_anew)
    work = loop(budget=Budget(iterations=6), checkpoint=str(db))(body)
    with pytest.raises(StoreError, match=r"was replaced by another file while this process was writing runs to it"
                                         r".* is saved as (\S+)\.recovered-\S+\.db: go on from there") as caught:
        work.run(0, run_id="r1")
    (saved,) = folder.glob("checkpoints.recovered-*.db")
    assert str(saved) in str(caught.value)
    assert _steps_in(saved, "r1") == [0, 1]  # every step it had committed
    other = SQLiteStore(db)
    assert [r.id for r in other.list_runs()] == ["theirs"]  # nothing of r1 went into the new file
    assert other._conn().execute("SELECT count(*) FROM steps").fetchone() == (0,)
    other.close()
    again = loop(budget=Budget(iterations=6), checkpoint=str(saved))(body)
    with pytest.warns(Warning):  # the loop's function is another object: its source is said to have changed
        run = again.resume_run("r1")
    assert run.status == "budget_exhausted" and run.state == 6 and _steps_in(saved, "r1") == list(range(6))


def test_a_thread_first_writing_after_the_deletion_writes_the_file_back_rather_than_make_an_empty_one(tmp_path):
    import contextvars
    from concurrent.futures import ThreadPoolExecutor
    from loomc import CheckpointMovedWarning, charge
    folder = tmp_path / ".loomc"
    db = folder / "checkpoints.db"

    def charge_in_a_thread():
        with ThreadPoolExecutor(1) as pool:  # a new thread: its first write opens a connection of its own
            pool.submit(contextvars.copy_context().run, charge, 0.50, "model").result()

    body = _removing_at_2(folder, each=charge_in_a_thread)
    work = loop(budget=Budget(iterations=5), checkpoint=str(db))(body)
    with pytest.warns(CheckpointMovedWarning, match=r"\(1 run, 2 steps\)"):
        run = work.run(0, run_id="t1")
    assert run.status == "budget_exhausted" and run.total_cost == Decimal("2.50")
    assert _steps_in(db, "t1") == list(range(5))
    fresh = SQLiteStore(db)
    assert fresh.get_run("t1").total_cost == Decimal("2.50")
    fresh.close()


def test_a_file_deleted_during_a_long_step_is_written_back_within_seconds_so_a_kill_then_loses_nothing(tmp_path):
    import signal
    folder = tmp_path / ".loomc"
    db = folder / "checkpoints.db"
    code = """
import pathlib, sys, time
from loomc import Budget, loop
@loop(budget=Budget(iterations=5), cost_fn=lambda s: 0.25, checkpoint=sys.argv[1])
def step(s):
    if s == 3:
        pathlib.Path(sys.argv[2]).touch()
        time.sleep(300)  # a long call: no write until it ends
    return s + 1
step.run(0, run_id="k1")
"""
    marker = tmp_path / "in-step"
    proc = subprocess.Popen([sys.executable, "-c", code, str(db), str(marker)], stderr=subprocess.PIPE)
    said = b""
    try:
        wait_for_file(marker)
        shutil.rmtree(folder)
        # The store's lease keeper looks every few seconds, and warns once the file is back: wait for its words.
        watch = selectors.DefaultSelector()
        watch.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.time() + 60
        while b"CheckpointMovedWarning" not in said and time.time() < deadline:
            if watch.select(timeout=1):
                said += os.read(proc.stderr.fileno(), 4096)
        watch.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert b"CheckpointMovedWarning" in said and db.exists()
    assert _steps_in(db, "k1") == [0, 1, 2]
    store = SQLiteStore(db)
    record = store.get_run("k1")
    assert record.status == "running" and record.total_cost == Decimal("0.75")  # crashed in step 3: resumable
    store.close()


def test_a_file_deleted_while_no_run_of_the_process_is_live_is_let_go_and_a_new_run_makes_a_fresh_one(tmp_path):
    """Deleting .loomc to start afresh, from a notebook whose runs had ended: the next run wrote the old file back."""
    import warnings
    folder = tmp_path / ".loomc"
    db = folder / "checkpoints.db"
    work = loop(budget=Budget(iterations=2), checkpoint=str(db))(lambda s: s + 1)
    work.run(0, run_id="old")
    shutil.rmtree(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CheckpointMovedWarning
        assert work.run(0, run_id="new").state == 2
    fresh = SQLiteStore(db)
    assert [r.id for r in fresh.list_runs()] == ["new"]
    fresh.close()


def test_threads_writing_a_deleted_file_go_on_in_the_one_written_back_once(tmp_path):
    import threading
    import warnings
    from loomc import CheckpointMovedWarning
    folder = tmp_path / ".loomc"
    db = folder / "checkpoints.db"
    started = threading.Barrier(9)

    def step(s):
        if s == 3:
            started.wait(timeout=60)  # every thread's run has committed steps 0-2
            started.wait(timeout=60)  # and the folder is gone
        return s + 1

    work = loop(budget=Budget(iterations=10), cost_fn=lambda s: 0.01, checkpoint=str(db))(step)
    runs = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=lambda i=i: runs.update({i: work.run(0, run_id=f"t{i}")}))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        started.wait(timeout=60)
        shutil.rmtree(folder)
        started.wait(timeout=60)
        for thread in threads:
            thread.join(60)
    assert sum(w.category is CheckpointMovedWarning for w in caught) == 1  # one thread wrote it back
    assert {i: (r.status, r.state) for i, r in runs.items()} == {i: ("budget_exhausted", 10) for i in range(8)}
    for i in range(8):
        assert _steps_in(db, f"t{i}") == list(range(10))


_RELEASED: Any = None  # in a pool's worker: the barrier the workers pass together


def _hold_at(barrier: Any) -> None:
    global _RELEASED
    _RELEASED = barrier


def _open_and_run_when_released(path: str) -> str:
    """In a pool's worker: wait for the others, then open a new checkpoint file and run a loop in it."""
    work = loop(budget=Budget(iterations=2), checkpoint=path)(_next)
    _RELEASED.wait(timeout=60)
    try:
        return f"state {work.run(0).state}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _next(s: int) -> int:
    return s + 1


def test_processes_released_together_all_make_one_new_file_and_run_in_it(tmp_path):
    """Each read the new file and then asked for it whole to put it in WAL mode: SQLite answered all but one
    "database is locked" at once, without waiting, and such a process stopped with StoreBusy before its first step
    (two processes released together: 1 try in 2)."""
    from concurrent.futures import ProcessPoolExecutor
    spawn = multiprocessing.get_context("spawn")
    released = spawn.Barrier(4)
    with ProcessPoolExecutor(4, mp_context=spawn, initializer=_hold_at, initargs=(released,)) as pool:
        for trial in range(40):
            path = str(tmp_path / f"new-{trial}.db")
            assert list(pool.map(_open_and_run_when_released, [path] * 4)) == ["state 2"] * 4
            assert len(SQLiteStore(path).list_runs()) == 4
