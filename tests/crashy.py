"""A loop run in a subprocess by the crash and concurrency tests.

usage: python crashy.py DB RUN_ID MODE
  MODE "cost":   cost_fn pays $0.01 per step
  MODE "charge": fn calls loomc.charge($0.01) before its slow part (write-ahead spend)
  MODE "slow":   every step sleeps 0.2 s (holds the lease for a while)
It resumes RUN_ID if it exists, else starts it; prints the final state as JSON.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time

import loomc
from loomc import Budget, RunAlreadyFinished, RunNotFound, load_history, loop, predicate

DB, RUN_ID, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
TARGET = 60


def advance(state: dict) -> dict:
    digest = hashlib.sha256(f"{state['digest']}:{state['i']}".encode()).hexdigest()[:16]
    return {"i": state["i"] + 1, "digest": digest}


@loop(budget=Budget(iterations=1000), converge_on=predicate(lambda h: h[-1].state["i"] >= TARGET),
      cost_fn=(lambda s: 0.01) if MODE != "charge" else None, checkpoint=DB)
def step(state: dict) -> dict:
    if MODE == "charge":
        loomc.charge(0.01)
    time.sleep(0.2 if MODE == "slow" else random.random() * 0.04)
    return advance(state)


if __name__ == "__main__":
    try:
        final = step.resume(RUN_ID)
    except RunNotFound:
        final = step({"i": 0, "digest": "seed"}, run_id=RUN_ID)
    except RunAlreadyFinished:  # a kill that came too late: report what the run ended with
        final = load_history(step.store, RUN_ID)[-1].state
    print(json.dumps(final))
