"""An in-memory CheckpointStore: nothing survives the process. Handy in notebooks and tests."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

from loomc.errors import RunLocked, RunNotFound, StepConflict
from loomc.stores.base import RunRecord, StoredStep, Totals, lease_lost, locked_message, may_take, no_such_step


class MemoryStore:
    """Keeps runs in a dict; safe to share between threads of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, RunRecord] = {}
        self._steps: dict[str, list[StoredStep]] = {}
        self._charges: dict[str, dict[int, Decimal]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._runs)} runs)"

    def __getstate__(self) -> dict[str, object]:
        """A copy of the runs, for another process (a loop sent to a worker carries its store): no lock."""
        with self._lock:
            return {"_runs": dict(self._runs), "_steps": {run: list(steps) for run, steps in self._steps.items()},
                    "_charges": {run: dict(charged) for run, charged in self._charges.items()}}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _run(self, run_id: str) -> RunRecord:
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunNotFound(f"no run {run_id!r} in this memory store") from None

    def create_run(self, run: RunRecord) -> None:
        with self._lock:
            if run.id in self._runs:
                raise StepConflict(f"run {run.id} already exists")
            self._runs[run.id] = run
            self._steps[run.id] = []

    def claim_run(self, run_id: str, owner: str, lease_seconds: float, *,
                  policy: str | None = None, note: str | None = None, take_over: bool = False) -> RunRecord:
        with self._lock:
            run, now = self._run(run_id), time.time()
            if not may_take(run, owner, now, take_over):
                raise RunLocked(locked_message(run, now, self))
            run = run.replace(owner=owner, lease_expires=now + lease_seconds, status="running",
                              attempts=run.attempts + 1, updated_at=now, seen_at=now, policy=policy or run.policy,
                              notes=run.notes + ((note,) if note else ()))
            self._runs[run_id] = run
            return run

    def commit_step(self, run_id: str, step: StoredStep, totals: Totals, owner: str | None,
                    lease_seconds: float) -> None:
        with self._lock:
            run, now = self._run(run_id), time.time()
            steps = self._steps[run_id]
            if owner is not None and run.owner != owner:
                raise lease_lost(run, owner)
            if step.n < len(steps):  # steps are committed in number order: that number exists
                raise StepConflict(f"run {run_id} already has a step {step.n}")
            steps.append(step)
            self._charges.get(run_id, {}).pop(step.n, None)
            self._runs[run_id] = run.replace(total_cost=totals.cost, steps=totals.steps,
                                             active_seconds=totals.active_seconds, updated_at=now,
                                             lease_expires=now + lease_seconds if owner else run.lease_expires)

    def finish_run(self, run_id: str, status: str, reason: str | None, owner: str | None) -> None:
        with self._lock:
            run = self._run(run_id)
            if owner is not None and run.owner != owner:
                return  # another drive took the run over: it says how the run ends
            self._runs[run_id] = run.replace(status=status, reason=reason, updated_at=time.time(),
                                             owner=None, lease_expires=None)

    def get_run(self, run_id: str) -> RunRecord:
        with self._lock:
            return self._run(run_id)

    def list_runs(self, status: str | None = None, limit: int | None = None) -> list[RunRecord]:
        with self._lock:
            runs = [r for r in self._runs.values() if status is None or r.status == status]
        runs.sort(key=lambda r: r.created_at, reverse=True)
        return runs[:limit] if limit is not None else runs

    def children(self, run_id: str) -> list[RunRecord]:
        with self._lock:
            found = [r for r in self._runs.values() if r.parent_run_id == run_id]
        return sorted(found, key=lambda r: (r.parent_step if r.parent_step is not None else -1, r.created_at))

    def load_steps(self, run_id: str, *, with_states: bool = True) -> list[StoredStep]:
        with self._lock:
            self._run(run_id)
            steps = list(self._steps[run_id])
        if not with_states:
            steps = [s._replace(state_json=None) for s in steps]
        return steps

    def load_step(self, run_id: str, n: int) -> StoredStep:
        """Step ``n`` of a run, with its state; StoreError if there is none."""
        with self._lock:
            self._run(run_id)
            steps = self._steps[run_id]
        if not 0 <= n < len(steps):
            raise no_such_step(run_id, n, len(steps))
        return steps[n]

    def charge(self, run_id: str, step_n: int, usd: Decimal) -> None:
        with self._lock:
            self._run(run_id)
            pending = self._charges.setdefault(run_id, {})
            pending[step_n] = pending.get(step_n, Decimal(0)) + usd

    def pending_charges(self, run_id: str) -> dict[int, Decimal]:
        with self._lock:
            return dict(self._charges.get(run_id, {}))

    def close(self) -> None:
        pass
