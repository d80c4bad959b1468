"""loomc: turn one iteration of an agent loop, ``fn(state) -> state``, into a resilient loop.

Hard budget caps, a durable SQLite checkpoint after every step, resume with the
budget intact, convergence detection, backtracking and stall detection, all as
one composable policy value::

    from loomc import loop, Budget, BestScore, Escalate, score_plateau, predicate

    @loop(budget=Budget(usd=2.00, iterations=15, wall_clock="10m"),
          converge_on=score_plateau(patience=3) | predicate(lambda h: (h[-1].score or 0) >= 1.0),
          backtrack=BestScore(), on_stall=Escalate(after=3),
          scorer=score, cost_fn=lambda s: 0.08)
    def refine_report(state): ...

Importing loomc is light: no torch, no model, no SDK is imported until used.
"""

from loomc.backtrack import Backtracker, BestScore, LastGood
from loomc.budget import DEFAULT_BUDGET, Budget, NoCostWarning, parse_duration
from loomc.codec import StateRoundTripWarning
from loomc.detectors import HedgedVerdictWarning, Judge, ScorePlateau, judge, score_plateau
from loomc.errors import (BudgetExhausted, CheckpointDecodeError, ConfigError, CorruptStore, CostUnknown,
                          DeadlineExceeded, EmbeddingsUnavailable, LeaseLost, LoomcError,
                          NoStateReturned, PolicyTypeError, RunAlreadyFinished, RunAtImport, RunError, RunLocked,
                          RunNotFound, SchemaTooNew, StallError, StateEncodeError, StatePruned, StepConflict,
                          StopRequested, StoreBusy, StoreError)
from loomc.history import History, Step
from loomc.context import acharge, charge, request_stop, step_number, time_left, usd_left
from loomc.interpreter import CallbackWarning, NoScoreWarning, NoVerdictWarning, OrphanedChildWarning
from loomc.runs import Run
from loomc.loop import (AsyncLoopRunner, LoopRunner, SpecChangedWarning, StateMismatchWarning, __version__,
                        build_policy, load_history, loop)
from loomc.notebook import Comparison, compare
from loomc.policy import Decision, Outcome, Policy, Replay, Signal, always, never, predicate, replay
from loomc.semantic import SemanticDelta, semantic_delta
from loomc.stall import Escalate
from loomc.stores import (CheckpointMovedWarning, CheckpointStore, ContainerFilesystemWarning, MemoryStore,
                          NetworkFilesystemWarning, SQLiteStore, open_store)

__all__ = [
    "acharge", "always", "AsyncLoopRunner", "Backtracker", "BestScore", "Budget", "BudgetExhausted",
    "build_policy", "CallbackWarning", "charge", "CheckpointDecodeError", "CheckpointMovedWarning", "CheckpointStore",
    "compare", "Comparison", "ConfigError", "ContainerFilesystemWarning", "CorruptStore", "CostUnknown",
    "DeadlineExceeded", "Decision", "DEFAULT_BUDGET",
    "EmbeddingsUnavailable", "Escalate", "HedgedVerdictWarning", "History", "judge", "Judge", "LastGood", "LeaseLost",
    "load_history", "LoomcError", "loop",
    "LoopRunner", "MemoryStore", "NetworkFilesystemWarning", "never", "NoCostWarning", "NoScoreWarning", "NoStateReturned",
    "NoVerdictWarning",
    "open_store",
    "OrphanedChildWarning", "Outcome", "parse_duration", "Policy", "PolicyTypeError", "predicate", "replay", "Replay",
    "request_stop", "Run",
    "RunAlreadyFinished", "RunAtImport", "RunError", "RunLocked", "RunNotFound", "SchemaTooNew",
    "score_plateau", "ScorePlateau", "semantic_delta", "SemanticDelta", "Signal", "SpecChangedWarning",
    "SQLiteStore", "StallError", "StateEncodeError", "StateMismatchWarning", "StatePruned", "StateRoundTripWarning",
    "Step",
    "step_number", "StepConflict", "StopRequested", "StoreBusy", "StoreError", "time_left", "usd_left", "__version__",
]
