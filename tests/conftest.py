from __future__ import annotations

import math
from decimal import Decimal

import pytest

from loomc import History, Step
from loomc.testing import FakeClock  # the tests import it from here too


@pytest.fixture(autouse=True)
def on_a_local_disk(tmp_path_factory, monkeypatch):
    """Every test's files are on a local disk, whatever machine runs them (a CI container's overlay, say):
    the tests of the filesystem warnings give their own mount tables."""
    from loomc.stores import sqlite as sqlite_store
    mounts = tmp_path_factory.getbasetemp() / "mounts"
    if not mounts.exists():
        mounts.write_text("/dev/vda / ext4 rw,relatime 0 0\n")
    monkeypatch.setattr(sqlite_store, "MOUNTS", str(mounts))




def history_of(*rows) -> History:
    """A History from compact rows: a score, None (no score), "fail", or (score, cost)."""
    steps = []
    for n, row in enumerate(rows):
        cost = Decimal(0)
        if isinstance(row, tuple):
            row, cost = row[0], Decimal(str(row[1]))
        if row == "fail":
            steps.append(Step(n, None, cost=cost, error="RuntimeError: boom"))
        else:
            steps.append(Step(n, {"n": n}, cost=cost, score=row))
    return History(steps)


def sync_or_async(body, aio: bool):
    """``body`` as a loop's fn, ``async def`` when ``aio``: one test for both drivers."""
    if aio:
        async def step(state):
            return body(state)
    else:
        def step(state):
            return body(state)
    return step


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def nan_safe_equal(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def db_flag(db) -> str:
    """The ``--db PATH`` that a command in a hint gives for a run of the file ``db`` (any but the default one)."""
    from pathlib import Path
    from loomc.errors import shell_word
    return f"--db {shell_word(str(Path(db).resolve()))}"


def wait_for_file(path, seconds: float = 60, poll: float = 0.02) -> None:
    """Wait until ``path`` exists (a subprocess's marker that it reached a point), ``seconds`` at most."""
    import time
    from pathlib import Path
    deadline = time.time() + seconds
    while not Path(path).exists() and time.time() < deadline:
        time.sleep(poll)


def start_long_step(tmp_path, db, run_id: str, seconds: float, cost: float | None = None):
    """A loop of 3 calls with a 1-second lease, run in a subprocess on the SQLite file ``db``, whose step 1 takes
    ``seconds`` (each call costing ``cost``, through cost_fn); returned once the process is in that step."""
    import subprocess
    import sys
    script = tmp_path / f"{run_id}_long_step.py"
    script.write_text(
        "import pathlib, sys, time\n"
        "from loomc import Budget, loop\n"
        f"@loop(budget=Budget(iterations=3), cost_fn={None if cost is None else f'lambda s: {cost}'}, "
        "lease_seconds=1.0, checkpoint=sys.argv[1])\n"
        "def work(s):\n"
        "    if s == 1:\n"
        "        pathlib.Path(sys.argv[1] + '.in-step').touch()\n"
        f"        time.sleep({seconds})\n"
        "    return s + 1\n"
        f"print(work.run(0, run_id={run_id!r}).status)\n")
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_file(f"{db}.in-step")
    return proc
