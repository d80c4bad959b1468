"""A parent loop whose every step runs a child loop; used by the nested crash test.

usage: python nested_crashy.py DB MARKER [WHEN]
The first time (while MARKER does not exist) it kills itself with SIGKILL, the way a real
crash would: during child step 2 of parent step 1 (WHEN "inside", the default), or right
after the child of parent step 1 completed, before the parent step commits (WHEN "after").
WHEN "charged" crashes where "inside" does, with write-ahead charges in both loops: $0.02 per
parent step before its child starts, $0.001 per child step. WHEN "changed" crashes where "after"
does, and the child's state says whether the crash is still to come, so the re-run step passes its
child another state than the first time.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import loomc
from loomc import Budget, RunNotFound, loop, predicate

DB, MARKER = sys.argv[1], sys.argv[2]
WHEN = sys.argv[3] if len(sys.argv) > 3 else "inside"


def crash_once() -> None:
    if not os.path.exists(MARKER):
        open(MARKER, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


@loop(budget=Budget(iterations=10), converge_on=predicate(lambda h: h[-1].state["n"] >= 4),
      cost_fn=lambda s: 0.01, checkpoint=DB)
def child(state: dict) -> dict:
    if WHEN == "charged":
        loomc.charge(0.001)
    if WHEN in ("inside", "charged") and state["parent_step"] == 1 and loomc.step_number() == 2:
        crash_once()
    return {**state, "n": state["n"] + 1}


@loop(budget=Budget(usd=1.00, iterations=10), converge_on=predicate(lambda h: h[-1].state["done"] >= 3),
      checkpoint=DB)
def parent(state: dict) -> dict:
    if WHEN == "charged":
        loomc.charge(0.02)
    extra = {"first_try": not os.path.exists(MARKER)} if WHEN == "changed" else {}
    result = child({"n": 0, "parent_step": loomc.step_number(), **extra})
    if WHEN in ("after", "changed") and loomc.step_number() == 1:
        crash_once()
    return {"done": state["done"] + 1, "child_n": state["child_n"] + result["n"]}


if __name__ == "__main__":
    try:
        final = parent.resume("nested")
    except RunNotFound:
        final = parent({"done": 0, "child_n": 0}, run_id="nested")
    print(json.dumps(final))
