"""``@loop(...)``: sugar that builds one policy and wraps ``fn(state) -> state`` in a resilient loop.

    @loop(budget=Budget(usd=2.00, iterations=15), converge_on=score_plateau(3),
          backtrack=BestScore(), on_stall=Escalate(after=3), scorer=score, cost_fn=cost)
    def refine(state): ...

    final = refine(draft)               # the final state; raises BudgetExhausted, StallError, fn's errors
    run = refine.run(draft)             # the whole Run (id, status, history, cost), never raises for its ending
    final = refine.resume("a1b2c3d4e5f6")   # continue a crashed run from its last committed step
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import inspect
import json
import os
import re
import sys
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any, Never, Self

from loomc import codec, logs
from loomc.backtrack import Backtracker
from loomc.budget import (DEFAULT_BUDGET, Budget, NoCostWarning, ParentCap, ParentClock, budget_from_repr, raised,
                          top_level, with_unreported_spend)
from loomc.errors import (CheckpointDecodeError, ConfigError, LoomcError, PolicyTypeError, RunAlreadyFinished,
                          RunAtImport, RunNotFound, StepConflict, counted, dollars, loomc_command, took,
                          warn_at_caller)
from loomc.context import current_run, forked_from, refuse_when_stopping
from loomc.history import IN_STORE, ZERO, History, Step, detached, stored_state
from loomc.interpreter import ENDING_EVENTS, _abandon, _ended, exhaust, in_no_call, steps, steps_async, stored
from loomc.policy import (AnyOf, Policies, Policy, Role, Signal, _current_step, as_policy, bound_name,
                          check_measures, check_one_argument, either, home_module, loop_name, name_of, never,
                          score_readers, unwrapped)
from loomc.runs import LiveRun, Run
from loomc.stall import Escalate
from loomc.stores import check_store_spec, default_path, open_store, sqlite_at
from loomc.stores.base import (_DRIVING, CheckpointStore, Drive, RunRecord, StoredStep, Totals, new_run_id,
                               offload, open_parent_step, owner_is_dead, process_of)

__version__ = "0.4.0"
SPEC_VERSION = "1"


class SpecChangedWarning(UserWarning):
    """Resume found that ``fn``'s source or the policy changed since the run started."""


class StateMismatchWarning(UserWarning):
    """A run stored under the id was continued (or returned) rather than started from the different state
    passed (``resume=True``, or a child run its parent's step called again)."""


# What `loomc resume` is importing, while it imports it. A script without an
# `if __name__ == "__main__":` guard would start its own run at import, and pay for calls nobody asked for.
_IMPORTING: list[str] = []


@contextlib.contextmanager
def refusing_runs(target: str) -> Iterator[None]:
    """While ``target`` is imported, any loop that starts or resumes a run raises :class:`RunAtImport`."""
    _IMPORTING.append(target)
    try:
        yield
    finally:
        _IMPORTING.pop()


def _refuse_at_import(fn: Callable[..., Any]) -> None:
    if _IMPORTING:
        name = name_of(fn)
        raise RunAtImport(f"importing {_IMPORTING[-1]} runs the loop {name} at import time; loomc refused that "
                          f"run, so {name} was not called. Put the script's top-level code under "
                          "`if __name__ == \"__main__\":`")


def _tell(opened: LiveRun | Run) -> None:
    """Warn what opening the run found, from the thread that drives it, pointing at the caller's line
    (an async run is opened on the store's writer thread)."""
    # A Run: a stored run that had completed, returned as it is; nothing is driven.
    for message, category in opened._notices if isinstance(opened, Run) else opened.notices:
        warn_at_caller(message, category)
    if isinstance(opened, LiveRun):
        opened.notices.clear()
        logs.run_opened(opened)


def _run_for_id(value: Any) -> str | None:
    """What to do instead, when ``value`` given where a run id goes is a History, or a Run (or RunRecord)."""
    if isinstance(value, History):
        return ("a History was given where a run id goes; replay a policy on a History itself, as in "
                "policy.replay(history), or give the id of a stored run")
    if not isinstance(value, str) and isinstance(getattr(value, "id", None), str):
        return (f"a {type(value).__name__} was given where a run id goes; give its id: run_id={value.id!r} "
                "(the .id of the Run)")
    return None


def _check_run_id(run_id: Any) -> None:
    instead = _run_for_id(run_id)
    if instead is not None:
        raise ConfigError(instead)
    if not isinstance(run_id, str) or not run_id.strip():
        raise ConfigError(f"run_id={run_id!r}: a run id is a non-empty string, such as '2026-11-22-nightly'")
    if "\0" in run_id or any("\ud800" <= ch <= "\udfff" for ch in run_id):
        # No database takes a lone surrogate (it is no text: a file name that is not UTF-8, decoded so), and no
        # command line a NUL, so `loomc show` could not be given it.
        raise ConfigError(f"run_id={run_id!r}: a run id cannot hold a NUL or a lone surrogate; "
                          "make it of printable text, such as '2026-11-22-nightly'")


def refuse_completed(record: RunRecord, store: CheckpointStore) -> None:
    """Raise :class:`RunAlreadyFinished` for a run that completed: there is nothing to resume."""
    if record.status == "completed":
        shown = loomc_command("show", record.id, db=store)
        see = f"`{shown}`" if shown is not None else f"{fn_name_of_path(record.fn_path)}.history({record.id!r})"
        raise RunAlreadyFinished(f"run {record.id} already completed ({record.reason}); there is nothing "
                                 f"to resume. See it with {see}")


def _other_state(state: Any, record: RunRecord, parent: LiveRun | None) -> str | None:
    """What to warn when the stored run ``record`` goes on (or is returned) in place of a run from ``state``,
    which differs from the state it started with; ``None`` when they are the same."""
    if record.initial_state is None:
        return None
    difference = codec.stored_difference(state, record.initial_state)
    if difference is None:
        return None
    done = record.status == "completed"
    if parent is None:
        went = "returns it as it completed" if done else "goes on with it"
        return (f"run {record.id} is stored, so resume=True {went} and does not use the state passed now, which "
                f"differs from the one the run started with: {difference}. To start a new run from this state, "
                "pass another run_id")
    again = record.parent_run_id == parent.id and record.parent_step == parent.in_flight
    why = (f"step {parent.in_flight} of run {parent.id} is running again" if again else
           f"started in step {record.parent_step} of run {record.parent_run_id}" if record.parent_run_id else
           "started as a run of its own")
    return (f"child run {record.id} is stored ({why}), so {'its result is reused' if done else 'it goes on'} and "
            f"nothing is paid for twice; but the state passed to it now differs from the one it started with: "
            f"{difference}. To start a new child for a new state, give the child a run_id= derived from its state "
            "(a hash of it)")


def refuse_reached(budget: Budget, record: RunRecord, given: Budget | None = None) -> None:
    """ConfigError for a resume budget with a cap the run has already reached: not one call could be made
    under it, and a raise is kept as the run's budget, so it would also bind every later resume. ``given``:
    the caps the resume was given, where ``budget`` is them with the others kept from the loop's budget."""
    def kept(cap: str) -> str:
        return "" if given is None or getattr(given, cap) is not None else ", a cap kept from the run's budget"

    reached = []
    if budget.usd is not None and budget.usd <= record.total_cost:
        reached.append(f"usd={budget.usd} but it has spent {dollars(record.total_cost)}{kept('usd')}")
    if budget.iterations is not None and budget.iterations <= record.steps:
        reached.append(f"iterations={budget.iterations} but it has made {counted(record.steps, 'call')}"
                       f"{kept('iterations')}")
    if budget.wall_clock is not None and budget.wall_clock <= record.active_seconds:
        reached.append(f"wall_clock={budget.wall_clock_text or budget.wall_clock} but it has been active "
                       f"{record.active_seconds:.1f}s{kept('wall_clock')}")
    if reached:
        raise ConfigError(f"cannot resume run {record.id} under {budget!r}: {'; '.join(reached)}. The caps of a "
                          "resume count what the run did before it, so give caps above those (the run is "
                          "unchanged)")


def refuse_stopping(budget: Budget, record: RunRecord, store: CheckpointStore) -> None:
    """ConfigError for a resume budget under which the run would stop before its first call, as its caps predict
    the next call's cost and time (the USD cap, after a raise of the iterations, say). Budgets that fire go on
    firing as a run grows, so what a crashed step adds on resume could only make it stop the sooner.

    The steps are read only when a cap leaves less room than the run has used so far: no step cost more than all
    of them together, nor took longer (the room must also hold ``step_estimate``)."""
    spent, active = record.total_cost, record.active_seconds
    near = (budget.usd is not None and budget.usd - spent <= max(spent, budget.step_estimate or 0)) or (
        budget.wall_clock is not None and budget.wall_clock - active <= active)
    if not near:
        return
    stops = budget.fire(stored_history(store, record.id, None), active)
    if stops is not None:
        raise ConfigError(f"cannot resume run {record.id} under {budget!r}: it would stop before its first call "
                          f"({stops}); give a larger cap for that (the run is unchanged)")


def refuse_child(store: CheckpointStore, record: RunRecord) -> None:
    """ConfigError for resuming on its own a child whose parent step never committed: it would spend
    where no parent cap sees it."""
    parent = open_parent_step(store, record)
    if parent is None:
        return
    name = fn_name_of_path(parent.fn_path)
    command = loomc_command("resume", parent.id, db=store)
    raise ConfigError(f"run {record.id} is a child run started in step {record.parent_step} of run {parent.id}, "
                      "which never committed that step; resume the parent, which goes on with this run inside "
                      f"that step under its budget: {name}.resume({parent.id!r})" +
                      ("" if command is None else f", or `{command}`"))


def fn_name_of_path(fn_path: str | None) -> str:
    """The name a resume hint gives the loop recorded as ``module:qualname`` (``fn`` when none was)."""
    return (fn_path or "fn").rpartition(":")[2].rpartition(".")[2] or "fn"


def build_policy(policy: Any = None, *, budget: Any = None, converge_on: Any = None,
                 backtrack: Any = None, on_stall: Any = None) -> Policy:
    """The one policy value that ``@loop``'s keyword slots describe.

    A policy with no ``Budget`` at its top gets :data:`~loomc.budget.DEFAULT_BUDGET` (a Budget under ``&``
    or ``~`` is a condition, which caps nothing).
    """
    parts: list[Policy] = []
    if policy is not None:
        parts.append(as_policy(policy, "policy="))
    if budget is not None:
        if not isinstance(budget, Budget):
            raise ConfigError(f"budget={budget!r}: pass a Budget(usd=..., iterations=..., wall_clock=...)")
        parts.append(budget)
    if converge_on is not None:
        signal = as_policy(converge_on, "converge_on=")
        if not isinstance(signal, Signal):
            raise PolicyTypeError(f"converge_on={signal!r} is a {getattr(signal, 'role', 'policy')}, "
                                  "not a detector; pass it as backtrack= or on_stall=")
        parts.append(signal)
    if backtrack is not None:
        if not isinstance(backtrack, Backtracker):
            raise PolicyTypeError(f"backtrack={backtrack!r}: pass BestScore() or LastGood()")
        parts.append(backtrack)
    if on_stall is not None:
        if not isinstance(on_stall, Escalate):
            raise PolicyTypeError(f"on_stall={on_stall!r}: pass Escalate(after=N)")
        parts.append(on_stall)
    combined: Policy = functools.reduce(either, parts) if parts else DEFAULT_BUDGET
    if not any(isinstance(p, Budget) for p in top_level(combined)):
        combined = either(DEFAULT_BUDGET, combined)
    return combined


def without_stall_handler(policy: Policy) -> Policy:
    """``policy`` without its stall handler: what decides before the first call of a resumed stalled run."""
    parts = policy.parts if isinstance(policy, (AnyOf, Policies)) else (policy,)
    kept: Policy = never
    for p in parts:
        if getattr(p, "role", None) != Escalate.role:
            kept = either(kept, p)
    return kept


def with_budget(policy: Policy, budget: Budget) -> tuple[Policy, Budget]:
    """``policy`` under ``budget`` for a resume with a raise, and the budget that then applies:
    ``budget``'s caps, with those it leaves out kept from the top-level budgets of ``policy``."""
    parts = policy.parts if isinstance(policy, (AnyOf, Policies)) else (policy,)
    budgets = [p for p in parts if isinstance(p, Budget)]
    merged = raised(budgets, budget)
    return functools.reduce(either, [merged, *(p for p in parts if not isinstance(p, Budget))]), merged


_RAISE_NOTE = re.compile(r"resumed with (Budget(?:\.unbounded\(\)|\([^()]*\))) \(was ")


def recorded_raise(notes: Sequence[str]) -> Budget | None:
    """The budget the latest resume with a raise recorded in a run's notes, if any."""
    for note in reversed(notes):
        found = _RAISE_NOTE.search(note)
        if found:
            return budget_from_repr(found[1])
    return None


def _module_attribute(module: str, name: str) -> Any:
    """What module ``module`` binds to ``name``, imported: a loop unpickled in a worker process."""
    import importlib
    found = getattr(importlib.import_module(module), name, _MISSING)
    if found is _MISSING:
        raise AttributeError(
            f"loop {name} cannot be found in this process (pid {os.getpid()}): " + (
                "it was defined in __main__ (a notebook, or a script) that this process does not run; define it "
                "in a module both import, or send it with joblib (or cloudpickle), which carries a copy of it"
                if module == "__main__" else f"module {module} binds no {name} here (another version of it?)"))
    return found


_MISSING = object()


def _main_loop(name: str, copied: bytes) -> LoopRunner:
    """A loop of a script's or a notebook's ``__main__``, unpickled in a worker: the worker's own, where its
    ``__main__`` is that script, else one rebuilt from the copy (see ``LoopRunner.__reduce__``)."""
    import pickle
    found = getattr(sys.modules.get("__main__"), name, None)
    if isinstance(found, LoopRunner):
        return found
    cls, fields = pickle.loads(copied)
    runner: LoopRunner = object.__new__(cls)
    runner.__dict__.update(fields, _origin=runner)
    runner._fresh_probes()
    return runner


#: What a copy of a loop of __main__ leaves out: itself, and its measures, which may hold a loaded model (a copy
#: loads its own, once its first run begins).
_NOT_COPIED = frozenset({"_origin", "_probes", "_prepared"})


def _spent_by_children(store: CheckpointStore, run_id: str, step_n: int) -> Decimal:
    """Everything the runs started in step ``step_n`` of ``run_id`` spent: their commits, and what
    their own steps in flight charged or spent in runs of their own, all the way down."""
    total = ZERO
    for child in store.children(run_id):
        if child.parent_step == step_n:
            in_flight = child.steps
            total += (child.total_cost + store.pending_charges(child.id).get(in_flight, ZERO)
                      + _spent_by_children(store, child.id, in_flight))
    return total


def _fn_path(fn: Callable[..., Any]) -> str | None:
    fn = unwrapped(fn)  # a functools.partial: its function's (loomc resume finds the loop that wraps the partial)
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not qualname or qualname.endswith("<lambda>"):
        return None  # a lambda, a callable object (a function inside another is recorded)
    if module == "__main__":  # a script run as __main__, else a notebook or the REPL (kept as `__main__:`)
        main = sys.modules.get("__main__")
        spec: Any = getattr(main, "__spec__", None)
        if spec is not None and spec.parent:  # `python -m pkg.job`: by its name, so its relative imports resolve
            return f"{spec.name}:{qualname}"
        path = getattr(main, "__file__", None)  # "<stdin>" for `python -`: no file to import, as in the REPL
        return f"{os.path.abspath(path) if path and os.path.isfile(path) else module}:{qualname}"
    return f"{module}:{qualname}"


def _spec_hash(fn: Callable[..., Any], policy: Policy, state_type: Any) -> str:
    """A fingerprint of fn's source, the policy and the state type's schema."""
    code: Any = unwrapped(fn)
    if not inspect.isroutine(code) and not isinstance(code, type):
        code = type(code)  # a callable object: its class's source (its repr holds an address, new in each process)
    try:
        source = inspect.getsource(code)
    except (OSError, TypeError):
        source = str(getattr(code, "__qualname__", None) or type(code).__qualname__)
    schema = ""
    if codec.is_typed(state_type):
        try:
            schema = json.dumps(codec.adapter(state_type).json_schema(), sort_keys=True)
        except Exception:  # a type pydantic cannot describe: its name will do
            schema = repr(state_type)
    return hashlib.sha256(f"{SPEC_VERSION}\0{source}\0{policy!r}\0{schema}".encode()).hexdigest()[:16]


class LoopRunner:
    """What ``@loop`` returns for a plain function. Call it like ``fn``: ``runner(state)``."""

    def __init__(self, fn: Callable[..., Any], policy: Policy, *, scorer: Callable[[Any], Any] | None,
                 cost_fn: Callable[[Any], Any] | None, checkpoint: Any, on_step: Iterable[Callable[[Step], Any]],
                 clock: Callable[[], float], lease_seconds: float, progress: bool | str = False) -> None:
        functools.update_wrapper(self, fn)
        self.progress = progress
        self.fn = fn
        self.policy = policy
        self.scorer = scorer
        self.cost_fn = cost_fn
        self.checkpoint = checkpoint
        self.on_step = tuple(on_step)
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.state_type = codec.annotated_state_type(fn)
        codec.check_state_type(self.state_type)
        self.fn_path = _fn_path(fn)
        self.spec_hash = _spec_hash(fn, policy, self.state_type)
        self._store: CheckpointStore | None = None
        # A loop left at the default checkpoint runs its child runs in its parent's store (see _under).
        self._own_store = not (isinstance(checkpoint, str) and checkpoint == "sqlite")
        self._origin = self
        self._types: dict[str, Any] = {}  # state types seen by this runner, by recorded path
        self._home = getattr(fn, "__module__", None)  # where a type recorded by fn's script as __main__ is
        self._fresh_probes()

    def _fresh_probes(self) -> None:
        """The policy's measures (judges, embeddings), none of them loaded yet."""
        self._probes = tuple(probe for part in self.policy.walk() for probe in part.probes())
        self._prepared = not self._probes

    def _ready(self) -> None:
        """Load what the policy's measures need (semantic_delta's model) before a run's first call: one that
        cannot be loaded raises here, with nothing recorded and nothing paid for, not after the first call."""
        if not self._prepared:
            for probe in self._probes:
                probe.prepare()
            self._prepared = True

    def __repr__(self) -> str:
        return f"<loop {getattr(self.fn, '__qualname__', self.fn)} policy={self.policy!r}>"

    def __copy__(self) -> Self:
        """A shallow copy (``_under``'s view of this loop); pickling, below, goes by reference instead."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        return view

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled by reference, as a function is: by the name its module binds it to. So a process pool runs the
        loop (``pool.map(refine, states)``, ``pool.submit(refine.run, state)``): the worker imports the module and
        runs its own copy of the loop, on its own connection to the same store. (It raised ``PicklingError: it's
        not the same object as jobs.refine``, since the decorated object stands where the function was.)"""
        module = home_module(self.fn)
        name = bound_name(self._origin, self.fn)
        if module is None or name is None:
            import pickle
            raise pickle.PicklingError(
                f"loop {name_of(self.fn)} cannot be pickled: another process finds a loop by the name its module "
                f"gives it, and module {module!r} binds this loop to no name. Define it at module level "
                "(@loop on a def, or refine = loop(...)(refine_step)), so that a process pool's worker can "
                "import it")
        if module == "__main__" and "cloudpickle" in sys.modules:
            # A script's or a notebook's loop, where cloudpickle is in use (joblib's workers, dask, ray). A worker of
            # multiprocessing runs the script as its __main__ and finds the loop there; one of joblib's does not,
            # and rebuilds it from a copy, as cloudpickle sends a function of __main__ by value.
            import cloudpickle
            copied = {key: value for key, value in self.__dict__.items() if key not in _NOT_COPIED}
            return _main_loop, (name, cloudpickle.dumps((type(self), copied)))
        return _module_attribute, (module, name)

    @property
    def store(self) -> CheckpointStore:
        """The checkpoint store, opened on first use; assign another to run this loop against it."""
        if self._store is None:
            self._store = open_store(self.checkpoint)
        return self._store

    @store.setter
    def store(self, store: CheckpointStore) -> None:
        self._store, self._own_store = store, True

    def _under(self, parent: LiveRun) -> Self:
        """This loop as it runs a child of ``parent``. Left at the default checkpoint, it keeps the child run in
        the parent's store, where the parent's record, ``loomc show`` and ``prune`` look for its children, and
        where a resume of the parent finds them: ``loomc resume --db F`` run from another directory used to
        start each child afresh in that directory's default file, paying again for its steps."""
        if self._own_store or self._store is parent.store:
            return self
        view = copy.copy(self)
        view._store, view._own_store = parent.store, True
        return view

    # --- starting and resuming -------------------------------------------

    def _live(self, run_id: str, policy: Policy, history: History, initial: Any, initial_json: str | None,
              source: Step | None, state_type: Any, drive: Drive, prior_active: float = 0.0,
              parent: LiveRun | None = None) -> LiveRun:
        policy = with_unreported_spend(policy)  # caps that do not count calls cannot see spend that goes unreported
        if parent is not None:  # the parent's USD and wall-clock caps bind the child
            room, step = parent.usd_room(), parent.in_flight
            if room is not None:  # siblings started in this step share the parent's room while it runs
                policy = either(policy, ParentCap(parent.id, room + history.total_cost,
                                                  lambda: parent.usd_room() if parent.in_flight == step else None))
            if parent.time_left() is not None:
                policy = either(policy, ParentClock(
                    parent.id, lambda: parent.time_left() if parent.in_flight == step else None))
        return LiveRun(id=run_id, fn=self.fn, policy=policy, store=self.store, owner=drive.owner, history=history,
                       initial_state=initial, source=source, clock=self.clock, prior_active=prior_active,
                       scorer=self.scorer, cost_fn=self.cost_fn, on_step=self.on_step,
                       lease_seconds=self.lease_seconds, parent=parent, state_type=state_type,
                       parent_step=-1 if parent is None else parent.in_flight,
                       initial_json=initial_json, drive=drive, fetch=_fetcher(self.store, run_id), runner=self._origin)

    def _plan(self, run_id: str | None, resume: bool = False) -> tuple[Self, LiveRun | None, str | None]:
        """Inside another loop's iteration this run is its child, with a stable id per parent step: the loop
        that runs it (see ``_under``), its parent, and its id.

        Called at the call site, before any await, so children started in one step get the same
        ids in the same order when the parent resumes that step.
        """
        if run_id is not None:
            _check_run_id(run_id)
        parent = current_run()
        if parent is None and (away := forked_from()) is not None:
            warn_at_caller(f"loop {name_of(self.fn)} starts a run of its own in process {os.getpid()}, forked from the "
                           f"process driving run {away.id} (a process pool's worker, started inside fn): it is no "
                           f"child of step {away.in_flight}, which lives in that process, so what it spends is not "
                           f"billed to run {away.id}, and that run's USD cap does not see it. Have the worker return "
                           "run.total_cost and charge it in fn", NoCostWarning)
        if resume and run_id is None and parent is None:
            raise ConfigError("resume=True needs run_id=: the id of the run to continue if it is stored, "
                              "or to start under if not")
        if parent is None:
            return self, None, run_id
        return self._under(parent), parent, run_id or parent.next_child_id()

    def _open(self, state: Any, run_id: str | None, parent: LiveRun | None, resume: bool = False) -> LiveRun | Run:
        """A LiveRun to drive, or (for a child, or with ``resume``, that already completed) its finished Run.

        A child, and a run started with ``resume=True``, continues the run stored under its id if
        there is one: a parent re-running a step, or a script run again after a crash, pays for
        nothing twice.
        """
        _refuse_at_import(self.fn)
        refuse_when_stopping()
        if run_id is None or (parent is None and not resume):
            return self._start(state, run_id)
        try:
            record = self.store.get_run(run_id)
        except RunNotFound:
            try:
                return self._start(state, run_id, parent)
            except StepConflict:  # another process started it meanwhile (one job launched twice): join it
                record = self.store.get_run(run_id)
        self._refuse_other_loops(record, parent)
        completed = record.status == "completed"
        if completed:
            live = self._restore(record, self.policy, Drive(), parent=None)
            if parent is not None:
                parent.spend(live.history.total_cost)
        else:
            live = self._reopen(run_id, None, parent)
        mismatch = _other_state(state, record, parent)
        if mismatch is not None:
            live.notices.append((mismatch, StateMismatchWarning))
        return _ended(live, "completed", record.reason or "completed", None) if completed else live

    def _refuse_other_loops(self, record: RunRecord, parent: LiveRun | None) -> None:
        """StepConflict if the run stored under the id was started by another loop (another function's name):
        two loops share a run id, and going on, or returning its result, would hand this loop the other's.
        An explicit ``resume(run_id)`` only warns (SpecChangedWarning): a renamed function goes on so."""
        theirs = self._other_loop(record)
        if theirs is None:
            return
        mine = fn_name_of_path(self.fn_path)
        what = "child run" if parent is not None else "run"
        would = "get its result" if record.status == "completed" else "go on with it"
        raise StepConflict(
            f"{what} {record.id} is stored as a run of loop {theirs} ({record.fn_path}), not of {mine}: two loops "
            f"share the run id, and {mine} would {would}. Give each loop's runs ids of their own "
            f"(run_id=f\"{mine}-...\"); if {theirs} was renamed {mine}, go on with it by {mine}.resume({record.id!r})")

    def _other_loop(self, record: RunRecord) -> str | None:
        """The name of the loop that started ``record`` if it is another loop than this one (another function
        name), else ``None``. A lambda, a partial or a callable object records no name: never another."""
        if not record.fn_path or not self.fn_path:
            return None
        theirs = fn_name_of_path(record.fn_path)
        return None if theirs == fn_name_of_path(self.fn_path) else theirs

    def _taken(self, run_id: str) -> str:
        """What to do about starting a run under ``run_id``, which a stored run has: by what that run is."""
        name, elsewhere = loop_name(self.fn, self), "or start a new run under another run_id"
        try:
            record = self.store.get_run(run_id)
        except LoomcError:
            record = None
        theirs = None if record is None else self._other_loop(record)
        if record is not None and theirs is not None:
            mine = fn_name_of_path(self.fn_path)
            return (f"it is a run of loop {theirs} ({record.fn_path}); give {mine}'s runs ids of their own "
                    f"(run_id=f\"{mine}-...\")")
        if record is not None and record.status == "completed":
            return (f"it completed ({record.reason}). Its result, with no call made: "
                    f"{name}(state, run_id={run_id!r}, resume=True); {elsewhere}")
        return f"continue it with {name}.resume({run_id!r}), {elsewhere}"

    def _start(self, state: Any, run_id: str | None, parent: LiveRun | None = None) -> LiveRun:
        try:
            initial_json = codec.encode(state)
        except LoomcError as e:
            raise type(e)(f"the initial state cannot be stored: {e}") from None
        now, run_id = time.time(), run_id or new_run_id()
        state_type = codec.type_path(self.state_type) or codec.type_path(type(state))
        if state_type is not None and not codec.is_typed(self.state_type):
            self._types[state_type] = type(state)
        decode_as = codec.resolve_state_type(self.state_type, state_type, self._types, self._home)
        codec.warn_if_changed(state, initial_json, decode_as)
        drive = Drive()
        try:
            self.store.create_run(RunRecord(
                id=run_id, status="running", spec_hash=self.spec_hash, fn_path=self.fn_path,
                policy=repr(self.policy), state_type=state_type, initial_state=initial_json, created_at=now,
                updated_at=now, owner=drive.owner, lease_expires=now + self.lease_seconds, seen_at=now,
                parent_run_id=None if parent is None else parent.id,
                parent_step=None if parent is None else parent.in_flight))
        except StepConflict as e:
            raise StepConflict(f"{e}: {self._taken(run_id)}") from None
        # fn may change its state in place: the first call gets a copy, so the caller's object stays as it was
        # (a notebook that runs the loop again on its `draft` would otherwise start from the last state).
        try:
            first = copy.deepcopy(state)
        except Exception:  # it holds what cannot be copied (a client in a private attribute, say): as before
            first = state
        return self._live(run_id, self.policy, History(), first, initial_json, None, decode_as, drive, parent=parent)

    def _reopen(self, run_id: str, budget: Budget | None, parent: LiveRun | None = None,
                take_over: bool = False) -> LiveRun:
        _check_run_id(run_id)
        _refuse_at_import(self.fn)
        refuse_when_stopping()
        store = self.store
        record = before = store.get_run(run_id)
        if record.status == "running" and record.owner in _DRIVING:
            # A drive that only garbage still holds lets go of its run first: a task that a second Ctrl-C made
            # asyncio.run abandon, or an iter() stream in a reference cycle. Such a run used to be refused with
            # RunLocked ("already being run in this process") until the garbage collector happened to run.
            gc.collect()
            record = before = store.get_run(run_id)
        refuse_completed(record, store)
        if parent is None:
            refuse_child(store, record)
        policy, note = self.policy, None
        before_raise = recorded_raise(record.notes)  # an earlier resume's raise is the run's budget now
        if budget is not None:
            if not isinstance(budget, Budget):
                raise ConfigError(f"budget={budget!r}: pass a Budget(...)")
            asked = budget
            if before_raise is not None:
                budget = raised([before_raise], budget)
            policy, budget = with_budget(self.policy, budget)
            refuse_reached(budget, record, asked)  # those given, and those kept (raising the dollars keeps the rest)
            refuse_stopping(budget, record, store)
            note = f"resumed with {budget!r} (was {record.policy})"
        elif before_raise is not None:
            policy = with_budget(self.policy, before_raise)[0]
        if record.status == "stalled":
            note = "; ".join(filter(None, ["resumed after it stalled: the stall handler is asked again after "
                                           "the next call", note]))
        drive = Drive()
        took = parent is not None and parent.took_over_from is not None and record.owner is not None \
            and process_of(record.owner) == process_of(parent.took_over_from)
        take_over = take_over or took  # a child its parent's gone process left running goes with the parent
        if take_over and record.owner and record.status == "running":
            note = "; ".join(filter(None, [f"taken over from {record.owner}", note]))
        elif record.owner and record.status == "running" and not owner_is_dead(record.owner):
            # Its lease ran out, but its process may be there still (stopped, asleep, hung, on another host): if it
            # goes on, it stops at its next charge or commit, and this note says why.
            note = "; ".join(filter(None, [f"taken from {record.owner} once its lease had run out (that process, if "
                                           "it goes on, stops at its next charge or commit)", note]))
        extra = {"take_over": True} if take_over else {}  # a store that predates take_over still resumes
        record = store.claim_run(run_id, drive.owner, self.lease_seconds, policy=repr(policy), note=note, **extra)
        raising = budget is not None or before_raise is not None
        changed = (f"run {run_id}: {self._changes(before, repr(policy), raising)}"
                   if record.spec_hash and record.spec_hash != self.spec_hash else None)
        try:
            try:
                live = self._restore(record, policy, drive, parent)
            except CheckpointDecodeError:
                if changed:  # the likely reason, said before the error
                    warn_at_caller(f"{changed}, and a stored state no longer validates", SpecChangedWarning)
                raise
            if changed:  # told by the driver, in the caller's thread (_tell)
                live.notices.append((f"{changed}; resuming with the current code, as the stored state still "
                                     "validates", SpecChangedWarning))
            live.resumed = True
            if before.status == "stalled":  # resuming is the answer to the escalation: ask it again from here
                live.first_policy = without_stall_handler(policy)
            if take_over and before.owner is not None:
                live.took_over_from = before.owner
            # A run left running by another process (none: a resume that never began; this one: a drive that
            # ended here, its step recorded, but could not release the run) died in the step it was making.
            died = before.status == "running" and before.owner is not None \
                and process_of(before.owner) != process_of(drive.owner)
            live.history, lost = self._settle_interrupted(before, live.history, drive.owner, died)
            live.prior_active += lost
            if parent is not None:
                parent.spend(live.history.total_cost)  # what the child spent before the crash
        except BaseException:  # a resume that cannot start leaves the run as it was
            store.finish_run(run_id, before.status, before.reason, drive.owner)
            raise
        return live

    def _changes(self, before: RunRecord, policy: str, raising: bool) -> str:
        """What differs from the run's record, as far as it tells: the function, else the policy (unless
        a raise is in play, which hides the loop's own), else fn's source or the state type."""
        changes = []
        if before.fn_path and self.fn_path and before.fn_path != self.fn_path:
            changes.append(f"the function is {self.fn_path} (it was {before.fn_path} when the run started)")
        if not raising and before.policy and before.policy != policy:
            changes.append(f"the policy is {policy} (it was {before.policy} when the run last ran)")
        if changes:
            return " and ".join(changes)
        return ("fn's source, the loop's policy or the state type changed" if raising else
                "fn's source or the state type changed") + " since the run started"

    def _restore(self, record: RunRecord, policy: Policy, drive: Drive, parent: LiveRun | None = None) -> LiveRun:
        """A LiveRun over the committed history of ``record``; reads only."""
        state_type, history = self._history(record)
        run_id = record.id
        source = _current_step(history)
        if source is not None:
            _ = source.state  # decode now: a state that no longer validates fails the resume, here
        initial = codec.decode(record.initial_state, state_type, run_id=run_id, step="initial")
        return self._live(run_id, policy, history, initial, record.initial_state, source, state_type, drive,
                          record.active_seconds, parent)

    def _settle_interrupted(self, record: RunRecord, history: History, owner: str,
                            died: bool) -> tuple[History, float]:
        """The step a process died in (``died``), or that charged before a failed commit, becomes a failed
        step, ``interrupted``: a call of fn, counted against the iteration cap, with what it charged and the
        time it was seen running (``RunRecord.seen_in_call``). Also that time, which counts against the
        wall-clock cap: ``record`` is the run as the dead process left it.

        Charges are recorded under the number of the step in flight, and a commit removes its step's
        charges, so only the next step number can have any. The child runs that step started are
        counted in it too: the next call is a new step, which starts children of its own. A step that
        charged nothing but started children is left to be made again instead, so that it reuses them
        and no child is paid for twice (its time still counts). A process that died after the step that ended
        its run (see ``in_no_call``) was in no call, and nothing is recorded or counted; nor is a step for one
        that died in the backoff wait before its next call (and no marker that the wait ended), whose time in
        the wait counts.
        """
        n = len(history)
        seen = record.seen_in_call(history[-1] if history else None) if died else None
        lost = seen[1] if seen is not None else 0.0
        charged = self.store.pending_charges(record.id).get(n)  # $0: the marker that a backoff wait ended
        if not charged:
            if not died or any(c.parent_step == n for c in self.store.children(record.id)):
                return history, lost  # the call is made again as step n, and reuses the children it started
            idle = in_no_call(history[-1].events, began=charged is not None) if history else None
            if idle is not None:  # it died after the step that ended the run, or in the wait after it: in no call
                return history, 0.0 if idle in ENDING_EVENTS else lost
            cost, error = ZERO, ("Interrupted: the process died during this step, which charged nothing "
                                 "(its cost is unknown)")
        else:
            children = _spent_by_children(self.store, record.id, n)
            cost = charged + children
            spent = dollars(cost) if not children else \
                f"{dollars(cost)} ({dollars(charged)} charged, {dollars(children)} in child runs)"
            error = f"Interrupted: the process died during this step after spending {spent}"
        if lost > 0:
            error += f"; it was seen running for {took(lost)}, which counts as active time"
        step = Step(n, None, cost=cost, error=error, started_at=seen[0] if seen else time.time(), duration=lost,
                    events=("interrupted",))
        history = history.append(step)
        self.store.commit_step(record.id, stored(step), Totals(history.total_cost, len(history),
                                                               record.active_seconds + lost),
                               owner, self.lease_seconds)
        return history, lost

    @contextlib.contextmanager
    def _watched(self, live: LiveRun) -> Iterator[LiveRun]:
        """Attach the progress bar (if asked for) for the life of one drive."""
        if not self.progress:
            yield live
            return
        from loomc.notebook import Progress
        bar = Progress(live.policy, always=self.progress == "always", history=live.history)
        live.on_step = (*live.on_step, bar)
        try:
            yield live
        finally:
            bar.close()

    def _steps(self, opened: LiveRun | Run) -> Generator[Step, None, Run]:
        """The committed Steps of an opened run, then its Run (a finished child's Run at once)."""
        _tell(opened)
        if isinstance(opened, Run):
            return _no_steps(opened)
        if not self.progress:
            return steps(opened)  # no wrapping generator: one resume less per step
        return self._watched_steps(opened)

    def _watched_steps(self, opened: LiveRun) -> Generator[Step, None, Run]:
        with self._watched(opened) as live:
            return (yield from steps(live))

    # --- the public face --------------------------------------------------

    def run(self, state: Any, *, run_id: str | None = None, resume: bool = False) -> Run:
        """Run the loop and return the whole :class:`Run`; its ending (budget, stall, error) is on it.

        ``resume=True`` (with ``run_id=``) continues the run stored under that id if there is one,
        or returns it if it completed, so a script run again after a crash goes on where it stopped.
        ``state`` is then not used: :class:`StateMismatchWarning` says so when it differs from the
        state the stored run started with.
        """
        runner, parent, run_id = self._plan(run_id, resume)
        self._ready()
        return exhaust(runner._steps(runner._open(state, run_id, parent, resume)))

    def iter(self, state: Any, *, run_id: str | None = None, resume: bool = False) -> StepStream:
        """Run the loop, yielding each Step as soon as it is committed; ``.run`` holds the Run after.

            >>> for step in refine.iter(draft):        # doctest: +SKIP
            ...     print(step.n, step.score)

        ``resume=True`` (with ``run_id=``) goes on with the run stored under that id, as ``run`` does:
        only the Steps committed from now on are yielded.
        """
        runner, parent, run_id = self._plan(run_id, resume)
        self._ready()
        opened = runner._open(state, run_id, parent, resume)
        return StepStream(runner._steps(opened), opened)

    def __call__(self, state: Any, *, run_id: str | None = None, resume: bool = False) -> Any:
        """Run the loop and return the final state; raise what ended it otherwise."""
        return self.run(state, run_id=run_id, resume=resume).result()

    def resume_run(self, run_id: str, *, budget: Budget | None = None, take_over: bool = False) -> Run:
        """Continue a run from its last committed step and return the whole :class:`Run`."""
        self._ready()
        return exhaust(self._steps(self._reopen(run_id, budget, None, take_over)))

    def resume(self, run_id: str, *, budget: Budget | None = None, take_over: bool = False) -> Any:
        """Continue a run from its last committed step, with its spend counted; return the final state.

        ``budget=`` raises the caps it names (for a run that exhausted its budget); the raise is
        recorded on the run. ``take_over=True`` takes the run from an owner in another process
        whose lease has not run out, for when you know that process is gone.
        """
        return self.resume_run(run_id, budget=budget, take_over=take_over).result()

    def history(self, run_id: str) -> History:
        """The History of one of this loop's runs, read from its store, each state decoded as a resume decodes
        it (a pydantic state comes back as that model), when it is first read.

        >>> retry = refine.run(refine.history(run_id)[3].state)   # a new run from step 3's state
        """
        _check_run_id(run_id)
        return self._history(self.store.get_run(run_id))[1]

    def _history(self, record: RunRecord) -> tuple[Any, History]:
        """The type a run's states decode as, and its History over the store."""
        state_type = codec.resolve_state_type(self.state_type, record.state_type, self._types, self._home)
        return state_type, stored_history(self.store, record.id, state_type)

    def replay(self, run_id: str, policy: Policy | None = None) -> Any:
        """What ``policy`` (default: this loop's) would have done on a recorded run, as this loop runs it (a
        budget with no iteration cap comes with the stop for spend that goes unreported). Its predicates read
        the states as this loop's ``fn`` returned them."""
        policy = with_unreported_spend(self.policy if policy is None else as_policy(policy))
        return policy.replay(self.history(run_id))


def _no_steps(run: Run) -> Generator[Step, None, Run]:
    """The step stream of a run that had already finished: no steps, then the Run."""
    return run
    yield  # a generator, all the same


def _let_go(opened: LiveRun | Run) -> None:
    """End the run an open claimed for a task cancelled meanwhile (an ``asyncio.wait_for`` timeout while other
    runs keep the writer busy), as if the cancellation had landed a moment later. It used to stay claimed by a
    drive nobody drove, its lease kept renewed, so a resume in this process was refused (``RunLocked``,
    "already being run in this process") until that drive was garbage-collected."""
    if isinstance(opened, LiveRun):
        import asyncio
        _abandon(opened, asyncio.CancelledError())


class AsyncLoopRunner(LoopRunner):
    """What ``@loop`` returns for an ``async def``: ``await runner(state)``."""

    async def _aready(self) -> None:
        """``_ready`` off the event loop: loading a model takes seconds. Before it, before anything is stored:
        ConfigError unless an asyncio event loop runs this (trio's does not)."""
        import asyncio
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError(
                f"{name_of(self.fn)} is an async loop, which runs on asyncio (asyncio.run, Jupyter, an asyncio "
                "server), and no asyncio event loop runs here: under trio, run it on asyncio in a worker thread, "
                f"await trio.to_thread.run_sync(asyncio.run, {name_of(self.fn)}.run(state)), where fn's awaits must "
                "be asyncio's (the anthropic and openai async clients work on both)") from None
        if not self._prepared:
            await asyncio.to_thread(self._ready)

    async def _go(self, opened: LiveRun | Run) -> Run:
        """Drive an opened run to its end."""
        ended: list[Run] = []
        async for _ in self._steps_of(opened, ended):
            pass
        return ended[0]

    async def _steps_of(self, opened: LiveRun | Run, ended: list[Run]) -> AsyncGenerator[Step, None]:
        """The committed Steps of an opened run, each once it is asked for; the Run goes in ``ended``."""
        _tell(opened)
        if isinstance(opened, Run):
            ended.append(opened)
            return
        with self._watched(opened) as live:
            stream = steps_async(live, ended)
            try:
                async for step in stream:
                    yield step
            finally:
                await stream.aclose()  # left early: the run ends cancelled now, not when collected

    async def run(self, state: Any, *, run_id: str | None = None,  # type: ignore[override]
                  resume: bool = False) -> Run:
        runner, parent, run_id = self._plan(run_id, resume)
        await self._aready()
        return await runner._go(await offload(runner.store, runner._open, state, run_id, parent, resume,
                                              abandoned=_let_go))

    def iter(self, state: Any, *, run_id: str | None = None,  # type: ignore[override]
             resume: bool = False) -> AsyncStepStream:
        """``async for step in refine.iter(draft)``: each Step as soon as it is committed."""
        return AsyncStepStream(self, state, run_id, resume)

    async def __call__(self, state: Any, *, run_id: str | None = None,  # type: ignore[override]
                       resume: bool = False) -> Any:
        return (await self.run(state, run_id=run_id, resume=resume)).result()

    async def resume_run(self, run_id: str, *, budget: Budget | None = None,  # type: ignore[override]
                         take_over: bool = False) -> Run:
        await self._aready()
        opened = await offload(self.store, self._reopen, run_id, budget, None, take_over, abandoned=_let_go)
        return await self._go(opened)

    async def resume(self, run_id: str, *, budget: Budget | None = None,  # type: ignore[override]
                     take_over: bool = False) -> Any:
        return (await self.resume_run(run_id, budget=budget, take_over=take_over)).result()


class StepStream:
    """The Steps of a run as they are committed; after the last one, ``.run`` is the whole Run.

    The next call of ``fn`` starts only when the next Step is asked for. Leaving early ends the
    run as cancelled, with every committed step kept: at once with ``stream.close()``, else when
    the stream is collected.
    """

    def __init__(self, stream: Generator[Step, None, Run], opened: LiveRun | Run | None = None) -> None:
        self.run: Run | None = None
        self._stream, self._opened = stream, opened

    def __iter__(self) -> StepStream:
        return self

    def __next__(self) -> Step:
        try:
            return detached(next(self._stream))  # changed in place by the reader, it changes only its own copy
        except StopIteration as stop:
            self.run = stop.value
            raise StopIteration from None

    def close(self) -> None:
        """End the run now, as cancelled (if it has not ended), keeping every committed step;
        ``.run`` is then the Run as it stopped."""
        if isinstance(self._opened, LiveRun) and inspect.getgeneratorstate(self._stream) == inspect.GEN_CREATED:
            _abandon(self._opened, GeneratorExit())  # opened (the run claimed) but never started: let it go
        self._stream.close()
        if self.run is None and isinstance(self._opened, LiveRun):
            self.run = self._opened.ended


class AsyncStepStream:
    """``async for step in ...``: Steps of an async run as they are committed; then ``.run``.

    Like the sync stream, the next call of ``fn`` starts only when the next Step is asked for.
    Leaving early ends the run as cancelled, with every committed step kept: at once with
    ``await stream.aclose()``, else when the stream is collected.
    """

    def __init__(self, runner: AsyncLoopRunner, state: Any, run_id: str | None, resume: bool = False) -> None:
        self.run: Run | None = None
        self._runner, self._state, self._run_id, self._resume = runner, state, run_id, resume
        self._ended: list[Run] = []
        self._steps: AsyncGenerator[Step, None] | None = None
        self._opened: LiveRun | Run | None = None

    def __aiter__(self) -> AsyncStepStream:
        return self

    async def __anext__(self) -> Step:
        if self._steps is None:
            # At the call site, before any await.
            runner, parent, run_id = self._runner._plan(self._run_id, self._resume)
            self._steps = self._produce(runner, parent, run_id)
        try:
            return detached(await self._steps.__anext__())  # as the sync stream's
        except StopAsyncIteration:
            self.run = self._ended[0]
            raise

    async def aclose(self) -> None:
        """End the run now, as cancelled (if it has not ended), keeping every committed step;
        ``.run`` is then the Run as it stopped."""
        if self._steps is not None:
            await self._steps.aclose()
        if self.run is None and isinstance(self._opened, LiveRun):
            self.run = self._opened.ended

    async def _produce(self, runner: AsyncLoopRunner, parent: LiveRun | None,
                       run_id: str | None) -> AsyncGenerator[Step, None]:
        await self._runner._aready()
        opened = self._opened = await offload(runner.store, runner._open, self._state, run_id, parent, self._resume,
                                              abandoned=_let_go)
        stream = runner._steps_of(opened, self._ended)
        try:
            async for step in stream:
                yield step
        finally:
            await stream.aclose()


def history_from_stored(steps: Iterable[StoredStep], state_type: Any, run_id: str,
                        fetch: Callable[[int], str | None] | None = None) -> History:
    """A History over stored steps whose states decode (as ``state_type``) only when read.

    With ``fetch``, the steps came without their states: each reads its JSON through ``fetch(n)``
    when its state is first read.
    """
    decode = codec.decoder(state_type, run_id, fetch)
    return History([Step(s.n, cost=s.cost, score=s.score, error=s.error, started_at=s.started_at,
                         duration=s.duration, metrics=s.metrics, events=s.events,
                         state_json=stored_state(s.metrics, IN_STORE if fetch is not None else s.state_json),
                         decode=decode)
                    for s in steps])


def stored_history(store: CheckpointStore, run_id: str, state_type: Any) -> History:
    """A run's History as its store holds it.

    A store with ``load_step(run_id, n)`` (the SQLite store) hands over the steps without their
    states, and each state is read when it is needed: resuming a run of 1,000 one-megabyte
    states reads one of them, not a gigabyte.
    """
    fetch = _fetcher(store, run_id)
    return history_from_stored(store.load_steps(run_id, with_states=fetch is None), state_type, run_id, fetch)


def _fetcher(store: Any, run_id: str) -> Callable[[int], str | None] | None:
    load_step = getattr(store, "load_step", None)
    if not callable(load_step):
        return None

    def fetch(n: int) -> str | None:
        return load_step(run_id, n).state_json  # type: ignore[no-any-return]
    return fetch


def load_history(store: CheckpointStore | str | os.PathLike[str], run_id: str | None = None,
                 state_type: Any = None) -> History:
    """A recorded run's History; states decode as ``state_type`` (plain JSON by default) when read.

    ``store`` is a CheckpointStore (a loop's ``.store``), the path of a SQLite file, or
    ``"sqlite"`` for the default one ($LOOMC_DB, else ``.loomc/checkpoints.db``). A path with
    no database behind it raises StoreError; nothing is created. With one argument,
    ``load_history(run_id)``, the run is read from the default database.
    """
    if run_id is None:
        instead = _run_for_id(store)  # a History, or a Run given for its id
        if instead is not None:
            raise ConfigError(instead)
        if not isinstance(store, str):
            raise TypeError(f"load_history({store!r}) needs the run id too: load_history(store, run_id)")
        store, run_id = "sqlite", store
    _check_run_id(run_id)
    if isinstance(store, (str, os.PathLike)):
        if store == "memory":
            raise ConfigError("load_history(store='memory'): a new memory store holds no runs; "
                              "pass the loop's store itself (fn.store)")
        store = sqlite_at(default_path() if store == "sqlite" else store, create=False)
    return stored_history(store, run_id, state_type)


def loop(policy: Any = None, *more: Never, budget: Budget | None = None, converge_on: Any = None,
         backtrack: Role | None = None, on_stall: Role | None = None,
         scorer: Callable[[Any], Any] | None = None, cost_fn: Callable[[Any], Any] | None = None,
         checkpoint: Any = "sqlite", on_step: Callable[[Step], Any] | Iterable[Callable[[Step], Any]] = (),
         clock: Callable[[], float] = time.monotonic, lease_seconds: float = 600.0,
         progress: bool | str = False, **unknown: Never) -> Callable[[Callable[..., Any]], LoopRunner]:
    """Turn ``fn(state) -> state`` into a resilient loop.

    ``policy=`` takes one composed policy; ``budget=``, ``converge_on=``,
    ``backtrack=`` and ``on_stall=`` build the same value. Errors in the
    arguments are raised here, at decoration time.

    ``progress=True`` shows a tqdm bar on a terminal or in a notebook (never
    elsewhere; ``progress="always"`` forces it).
    """
    if more or unknown:
        _refuse_extra(more, unknown)
    settings = (budget, converge_on, backtrack, on_stall, scorer, cost_fn, checkpoint, on_step, clock,
                lease_seconds, progress)
    if _bare(policy) and all(given is default for given, default in zip(settings, _LOOP_DEFAULTS)):
        # `@loop` written without parentheses: the function is fn, and every setting its default.
        # (With any setting given, a function in the policy slot is a predicate, as before.)
        return loop()(policy)  # type: ignore[return-value]
    built = build_policy(policy, budget=budget, converge_on=converge_on, backtrack=backtrack, on_stall=on_stall)
    check_measures(built)
    for part in built.walk():
        for probe in part.probes():
            probe.check_installed()  # semantic_delta without sentence-transformers: now, not after a paid call
    for name, value in (("scorer", scorer), ("cost_fn", cost_fn), ("clock", clock)):
        if value is not None and not callable(value):
            hint = ""
            if name == "cost_fn" and callable(getattr(value, "cost_fn", None)):
                hint = f": to price with it, pass cost_fn={value!r}.cost_fn"
            elif name in ("cost_fn", "scorer") and isinstance(value, str):
                hint = f" of the state fn returned; to read a field of it, write {name}=lambda state: state[{value!r}]"
            elif name == "cost_fn" and isinstance(value, (int, float)) and not isinstance(value, bool):
                hint = f" of the state fn returned; for the same cost every call, write cost_fn=lambda state: {value!r}"
            elif name == "clock":
                hint = " that returns seconds, such as time.monotonic (the function, not a reading of it)"
            raise ConfigError(f"{name}={value!r} must be a function{hint}")
    adapter, method = getattr(cost_fn, "__self__", None), getattr(cost_fn, "__name__", "")
    if method in ("charge", "acharge") and callable(getattr(adapter, "cost_fn", None)):
        raise ConfigError(f"cost_fn={adapter!r}.{method} prices a response you hand it inside fn ({method}(reply)); "
                          f"as cost_fn= pass {adapter!r}.cost_fn, which prices the response kept at "
                          "state['_response']")
    check_one_argument(scorer, "scorer(state)")
    check_one_argument(cost_fn, "cost_fn(state)")
    if built.needs_score and scorer is None:
        raise ConfigError(f"{', '.join(score_readers(built))} reads step scores, but no scorer= was given; "
                          "pass scorer=lambda state: <a float, higher is better>")
    try:
        callbacks = (on_step,) if callable(on_step) else tuple(on_step)
    except TypeError:
        raise ConfigError(f"on_step={on_step!r}: pass a function of the Step, or a list of them") from None
    for cb in callbacks:
        if not callable(cb):
            raise ConfigError(f"on_step={cb!r} must be a function of the Step")
        check_one_argument(cb, "on_step(step)")
    if not (isinstance(lease_seconds, (int, float)) and lease_seconds > 0):
        raise ConfigError(f"lease_seconds={lease_seconds!r} must be a positive number of seconds")
    check_store_spec(checkpoint)
    if progress not in (False, True, "always"):
        raise ConfigError(f"progress={progress!r}: use False, True (terminal or notebook only) or 'always'")
    if progress:
        from loomc.notebook import check_tqdm
        check_tqdm()

    def decorate(fn: Callable[..., Any]) -> LoopRunner:
        if not callable(fn):
            raise ConfigError(f"@loop decorates a function fn(state) -> state, got {fn!r}")
        if isinstance(fn, LoopRunner):
            raise ConfigError(f"{name_of(fn)} is already a loop (@loop was applied twice?); to run a whole loop "
                              "in each step of another, call it inside the outer loop's fn")
        check_one_argument(fn, "fn(state)")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise ConfigError(f"{name_of(fn)} is a generator function (it yields), but a loop's fn returns the "
                              "new state: end it with `return state` instead of `yield`")
        cls = AsyncLoopRunner if inspect.iscoroutinefunction(fn) else LoopRunner
        if cls is LoopRunner:
            measures = [f"{slot}={name_of(f)} is an async def" for slot, f in (("scorer", scorer), ("cost_fn", cost_fn))
                        if inspect.iscoroutinefunction(f)]
            measures += filter(None, (probe.needs_async() for p in built.walk() for probe in p.probes()))
            if measures:
                raise ConfigError(f"{measures[0]}, which a sync loop cannot await; write {name_of(fn)} as "
                                  "`async def` (an async loop awaits it), or make it a plain def")
        return cls(fn, built, scorer=scorer, cost_fn=cost_fn, checkpoint=checkpoint, on_step=callbacks,
                   clock=clock, lease_seconds=lease_seconds, progress=progress)

    return decorate


#: Budget's caps: ``loop(iterations=5)`` is told to write ``budget=Budget(iterations=5)``.
_CAPS = ("usd", "iterations", "wall_clock", "step_estimate")
#: Other settings users write to ``loop()`` that belong elsewhere, and where: the fix the error gives.
_ELSEWHERE = {
    "durability": "durability belongs to the store: checkpoint=loomc.SQLiteStore('.loomc/checkpoints.db', "
                  "durability={value!r})",
    **dict.fromkeys(("max_iterations", "max_steps", "max_cost", "max_usd", "timeout"),
                    "a cap is a Budget: budget=Budget(usd=2, iterations=20, wall_clock='10m')"),
    **dict.fromkeys(("store", "db", "database", "path", "checkpoint_path", "checkpointer"),
                    "the store is checkpoint=: checkpoint={value!r}"),
    **dict.fromkeys(("judge", "stop_when", "until", "converge", "convergence", "patience"),
                    "a stop is converge_on=: converge_on=score_plateau(patience=3) | judge(fn) | predicate(fn)"),
    **dict.fromkeys(("stall", "escalate"), "a stall handler is on_stall=: on_stall=Escalate(after=3)"),
    **dict.fromkeys(("backtracker", "best_score", "last_good"), "a backtracker is backtrack=: backtrack=BestScore()"),
    **dict.fromkeys(("retry", "retries", "max_retries", "on_error", "wait"),
                    "a backtracker goes on after a failed call: backtrack=LastGood(wait='2s'), with "
                    "budget=Budget(iterations=) for how many calls in all"),
    **dict.fromkeys(("score", "score_fn", "scoring"), "the scorer is scorer=: scorer=lambda state: <a float>"),
    **dict.fromkeys(("cost", "price", "pricing"), "the price of a call is cost_fn=: cost_fn=lambda state: <its USD>"),
}


def _refuse_extra(more: tuple[Any, ...], unknown: dict[str, Any]) -> None:
    """``loop()`` given what it does not take: say what was wrong and where each such setting goes."""
    if more:
        raise ConfigError(f"loop() takes one policy, and got {1 + len(more)}: combine them with |, as in "
                          "loop(Budget(usd=2) | score_plateau(patience=3) | BestScore()), or name each "
                          "(budget=, converge_on=, backtrack=, on_stall=)")
    caps = ", ".join(f"{key}={value!r}" for key, value in unknown.items() if key in _CAPS)
    fixes = [f"{caps}: caps are a Budget's: budget=Budget({caps})"] if caps else []
    for key, value in unknown.items():
        if key in _CAPS:
            continue
        fix = _ELSEWHERE.get(key)
        if fix is None:
            import difflib
            near = difflib.get_close_matches(key, _LOOP_SETTINGS, n=1)
            fix = f"did you mean {near[0]}=?" if near else f"it takes {', '.join(f'{k}=' for k in _LOOP_SETTINGS)}"
        fixes.append(f"{key}={value!r}: " + fix.format(value=value))
    raise ConfigError(f"loop() got {'settings' if len(unknown) > 1 else 'a setting'} it does not take: "
                      + "; ".join(fixes))


def _bare(policy: Any) -> bool:
    """Whether ``loop(policy)`` is ``@loop`` above a def rather than a predicate in the policy slot: a
    def (a lambda cannot be decorated) whose argument is not named like a history."""
    if not callable(policy) or isinstance(policy, (Policy, type)) or name_of(policy) == "<lambda>" \
            or hasattr(policy, "builds_policy"):  # loop(score_plateau): a policy not called, refused as such
        return False
    try:
        first = next(iter(inspect.signature(policy).parameters), "")
    except (TypeError, ValueError):
        return False
    return first not in ("h", "hist", "history")


#: ``loop``'s settings as it defaults them, in its order: ``@loop`` without parentheses leaves them so.
_LOOP_DEFAULTS = tuple(p.default for p in inspect.signature(loop).parameters.values()
                       if p.name != "policy" and p.kind is p.KEYWORD_ONLY)
#: The names ``loop()`` takes, for the error that meets a misspelt one.
_LOOP_SETTINGS = tuple(name for name, p in inspect.signature(loop).parameters.items()
                       if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
