"""A run as plain JSON, and back: ``loomc export <id> --json`` writes it, :func:`history_from_export` reads it.

Fields are named as in the ``steps`` table (``step_n``, ``cost_usd``, ...);
dollar amounts are decimal strings, so nothing is lost to float rounding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager, nullcontext
from decimal import Decimal
from typing import Any

from loomc.codec import decoder
from loomc.history import History, Step, stored_state
from loomc.stores.base import CheckpointStore, RunRecord, StoredStep

FORMAT = "loomc.export/1"


def run_fields(run: RunRecord, pending: Mapping[int, Decimal]) -> dict[str, Any]:
    """A run's record as JSON fields, with ``pending``: what its steps in flight charged, not committed yet."""
    return {"id": run.id, "status": run.status, "reason": run.reason, "spec_hash": run.spec_hash,
            "fn_path": run.fn_path, "policy": run.policy, "state_type": run.state_type,
            "created_at": run.created_at, "updated_at": run.updated_at, "total_cost_usd": str(run.total_cost),
            "steps": run.steps, "active_seconds": run.active_seconds, "attempts": run.attempts,
            "notes": list(run.notes), "parent_run_id": run.parent_run_id, "parent_step": run.parent_step,
            "uncommitted_charges_usd": {str(n): str(usd) for n, usd in pending.items()}}


def export_run(store: CheckpointStore, run_id: str) -> dict[str, Any]:
    """The whole run: its record, initial state and every step with its state; and, for a run whose process
    died mid-step, what that step charged without committing (by step number). One snapshot of a run that is
    still going on, on a store that can read one (``reading()``, as the SQLite store has)."""
    with _snapshot(store):
        head, stored, step_fields = _parts(store, run_id)
        return {**head, "steps": [step_fields(s) for s in stored]}


def export_text(store: CheckpointStore, run_id: str) -> Iterator[str]:
    """``export_run`` as indented JSON text, in pieces: one step's state at a time is read and held, so a
    run of a gigabyte of states exports in the memory of its largest one. One snapshot, as ``export_run``."""
    with _snapshot(store):
        head, stored, step_fields = _parts(store, run_id)
        if not stored:
            yield json.dumps({**head, "steps": []}, indent=2, ensure_ascii=False)
            return
        # The head with one marker step, split around it; each step is indented as the list's item.
        start, _, end = json.dumps({**head, "steps": [_MARK]}, indent=2,
                                   ensure_ascii=False).rpartition(json.dumps(_MARK))
        yield start
        for k, s in enumerate(stored):
            text = json.dumps(step_fields(s), indent=2, ensure_ascii=False).replace("\n", "\n    ")
            yield text if k == 0 else ",\n    " + text
        yield end


def _snapshot(store: CheckpointStore) -> ContextManager[None]:
    """The store's ``reading()`` (every read in it sees one moment), where it has one."""
    reading = getattr(store, "reading", None)
    return reading() if callable(reading) else nullcontext()


_MARK = "loomc.export: a step goes here"


def _parts(store: CheckpointStore, run_id: str) -> tuple[dict[str, Any], list[StoredStep],
                                                         Callable[[StoredStep], dict[str, Any]]]:
    """The run's fields, its steps (without their states, where the store can read one alone), and the
    export's fields of a step, which reads its state from the store then."""
    run = store.get_run(run_id)
    load_step = getattr(store, "load_step", None)
    alone = callable(load_step)
    stored = store.load_steps(run_id, with_states=not alone)
    head = {"format": FORMAT, "run": {**run_fields(run, store.pending_charges(run_id)),
                                      "initial_state": json.loads(run.initial_state)}}

    def step_fields(s: StoredStep) -> dict[str, Any]:
        text = load_step(run_id, s.n).state_json if alone else s.state_json  # type: ignore[misc]
        score, metrics = s.score, s.metrics
        if score is not None and not math.isfinite(score):  # JSON has no NaN or Infinity: strict readers refuse them
            score, metrics = None, {**metrics, SCORE_KEPT: str(score)}
        return {"step_n": s.n, "state": None if text is None else json.loads(text), "cost_usd": str(s.cost),
                "score": score, "error": s.error, "timestamp": s.started_at, "duration": s.duration,
                "metrics": metrics, "events": list(s.events)}
    return head, stored, step_fields


#: Where an export keeps a score that JSON cannot hold (``"nan"``, ``"inf"``, ``"-inf"``); its ``score`` is null.
SCORE_KEPT = "loomc.score"


def history_from_export(data: dict[str, Any] | str) -> History:
    """Rebuild a History from ``export_run``'s output (a dict, or its JSON text)."""
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a loomc export (expected format {FORMAT!r}); make one with `loomc export <id> --json`")
    decode = decoder(None, data["run"]["id"])  # reads only the states `loomc prune --states` removed: it raises
    return History([_step(s, decode) for s in data["steps"]])


def _step(s: dict[str, Any], decode: Any) -> Step:
    """A Step from an exported one; a score JSON could not hold is put back from its metrics."""
    score, metrics = (None if s["score"] is None else float(s["score"])), s["metrics"]
    if SCORE_KEPT in metrics:
        metrics = dict(metrics)
        score = float(metrics.pop(SCORE_KEPT))
    return Step(s["step_n"], s["state"], cost=Decimal(s["cost_usd"]), score=score, error=s["error"],
                started_at=s["timestamp"], duration=s["duration"], metrics=metrics, events=s["events"],
                state_json=stored_state(metrics, None), decode=decode)
