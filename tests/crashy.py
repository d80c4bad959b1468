"""A loop run in a subprocess by the crash and concurrency tests.

usage: python crashy.py DB RUN_ID MODE
  MODE "cost":   cost_fn pays $0.01 per step
  MODE "charge": fn calls loomc.charge($0.01) before its slow part (write-ahead spend)
  MODE "slow":   every step sleeps 0.2 s (holds the lease for a while)
  MODE "acharge": "charge" as an async loop (await loomc.acharge; commits on the store's writer thread)
It resumes RUN_ID if it exists, else starts it; prints the final state as JSON.
"""

from __future__ import annotations

import asyncio
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


policy = dict(budget=Budget(iterations=1000), converge_on=predicate(lambda h: h[-1].state["i"] >= TARGET),
              cost_fn=(lambda s: 0.01) if MODE not in ("charge", "acharge") else None, checkpoint=DB)

if MODE == "acharge":
    @loop(**policy)
    async def step(state: dict) -> dict:
        await loomc.acharge(0.01)
        await asyncio.sleep(random.random() * 0.04)
        return advance(state)
else:
    @loop(**policy)
    def step(state: dict) -> dict:
        if MODE == "charge":
            loomc.charge(0.01)
        time.sleep(0.2 if MODE == "slow" else random.random() * 0.04)
        return advance(state)


def finish() -> dict:
    try:
        return step.resume(RUN_ID)
    except RunNotFound:
        return step({"i": 0, "digest": "seed"}, run_id=RUN_ID)
    except RunAlreadyFinished:  # a kill that came too late: report what the run ended with
        return load_history(step.store, RUN_ID)[-1].state


async def afinish() -> dict:
    try:
        return await step.resume(RUN_ID)
    except RunNotFound:
        return await step({"i": 0, "digest": "seed"}, run_id=RUN_ID)
    except RunAlreadyFinished:
        return load_history(step.store, RUN_ID)[-1].state


if __name__ == "__main__":
    print(json.dumps(asyncio.run(afinish()) if MODE == "acharge" else finish()))
