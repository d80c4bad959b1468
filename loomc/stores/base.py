"""The CheckpointStore protocol and the records it keeps.

A store is the only part of loomc that touches a disk or a database. It
keeps runs and their steps; each step is committed in one transaction with
the run's totals, and a step number is committed at most once.

Write a store by implementing :class:`CheckpointStore` and running the
conformance suite in :mod:`loomc.testing` against it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import uuid
import weakref
from dataclasses import dataclass
from decimal import Decimal
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

from loomc.errors import LeaseLost, RunNotFound, StoreError, loomc_command

STATUSES = ("running", "completed", "budget_exhausted", "stalled", "failed", "cancelled")


class StoredStep(NamedTuple):
    """One step as a store keeps it: the state is JSON text (``None`` for a failed call)."""

    n: int
    state_json: str | None
    cost: Decimal
    score: float | None = None
    error: str | None = None
    started_at: float = 0.0
    duration: float = 0.0
    metrics: Mapping[str, Any] = {}
    events: tuple[str, ...] = ()


class Timed(Protocol):
    """A step as far as its timing goes (a :class:`StoredStep`, or a ``Step`` of a history)."""

    @property
    def started_at(self) -> float: ...

    @property
    def duration(self) -> float: ...


@dataclass(frozen=True)
class RunRecord:
    """A run as a store keeps it."""

    id: str
    status: str = "running"
    spec_hash: str = ""
    fn_path: str | None = None
    policy: str = ""
    state_type: str | None = None
    initial_state: str = "null"
    created_at: float = 0.0
    updated_at: float = 0.0
    total_cost: Decimal = Decimal(0)
    steps: int = 0
    active_seconds: float = 0.0
    attempts: int = 1
    reason: str | None = None
    notes: tuple[str, ...] = ()
    parent_run_id: str | None = None
    parent_step: int | None = None
    owner: str | None = None
    lease_expires: float | None = None
    #: When the process driving the run was last seen alive (wall clock): at its claim, then every few
    #: seconds while it runs. A resume after that process died counts the call it died in as active time up
    #: to then. ``None``: the store keeps no such time (the call's time is then not counted).
    seen_at: float | None = None

    def replace(self, **changes: Any) -> RunRecord:
        return dataclasses.replace(self, **changes)

    def seen_in_call(self, last: Timed | None) -> tuple[float, float] | None:
        """For a run whose process died in a call: when that call began, and how long it was seen running (until
        ``seen_at``). ``last`` is the step before it (``None``: there is none); the call began when that step
        ended, or at the drive's claim (``updated_at``) if that came later. ``None`` where the store keeps no
        ``seen_at``."""
        if self.seen_at is None:
            return None
        began = max(self.updated_at, 0.0 if last is None else last.started_at + last.duration)
        return began, max(0.0, self.seen_at - began)


class Totals(NamedTuple):
    """The run's totals after a step, committed with it."""

    cost: Decimal
    steps: int
    active_seconds: float


@runtime_checkable
class CheckpointStore(Protocol):
    """Where runs and steps live. Every method is one transaction."""

    def create_run(self, run: RunRecord) -> None:
        """Insert a new run, owned by ``run.owner`` until ``run.lease_expires``."""

    def claim_run(self, run_id: str, owner: str, lease_seconds: float, *,
                  policy: str | None = None, note: str | None = None, take_over: bool = False) -> RunRecord:
        """Take the lease on a run to resume it; count the attempt; status becomes running; ``updated_at`` and
        ``seen_at`` become now (see :meth:`RunRecord.seen_in_call`).

        Raises RunNotFound, or RunLocked while another live owner holds it. ``take_over=True``
        takes it from an owner in another process whatever its lease (the caller knows it is gone).
        """

    def commit_step(self, run_id: str, step: StoredStep, totals: Totals, owner: str | None,
                    lease_seconds: float) -> None:
        """Commit one step and the run's totals together; drop the step's write-ahead charges.

        Raises StepConflict if the step number exists, LeaseLost (see :func:`lease_lost`) if ``owner`` lost the
        lease.
        """

    def finish_run(self, run_id: str, status: str, reason: str | None, owner: str | None) -> None:
        """Record how the run ended and release its lease; nothing if ``owner`` (when given) no longer holds the
        run: the process that took it over (or has since ended it) says how it ends."""

    def get_run(self, run_id: str) -> RunRecord:
        """The run, or RunNotFound."""

    def list_runs(self, status: str | None = None, limit: int | None = None) -> list[RunRecord]:
        """Runs, newest first."""

    def children(self, run_id: str) -> list[RunRecord]:
        """The runs started inside this run's steps (nested loops), by parent step, then creation."""

    def load_steps(self, run_id: str, *, with_states: bool = True) -> list[StoredStep]:
        """The run's steps in step order; ``state_json`` is None when not asked for."""

    def charge(self, run_id: str, step_n: int, usd: Decimal) -> None:
        """Record spend for a step in flight, durably, before the step commits. Keep a charge of $0 too: it
        says that the step's call began (the interpreter writes one after a backoff wait)."""

    def pending_charges(self, run_id: str) -> dict[int, Decimal]:
        """Spend recorded for steps that never committed, by step number."""

    def close(self) -> None:
        """Release connections."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


#: The owners driving a run in this process, each held only as long as its driver object lives.
_DRIVING: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def process_owner() -> str:
    """An owner name for leases: ``host:pid:nonce``, where the nonce starts with the process's start
    time when the system tells it (``t<start>.<hex>``), so a reused pid is not taken for the owner."""
    started = _start_time(os.getpid())
    nonce = uuid.uuid4().hex[:6] if started is None else f"t{started}.{uuid.uuid4().hex[:6]}"
    return f"{socket.gethostname()}:{os.getpid()}:{nonce}"


def _owner_parts(owner: str) -> tuple[str, str, str | None]:
    """The host, the pid and (where the owner carries it) the process's start time of an owner name."""
    host, pid, nonce = (owner.split(":", 2) + ["", ""])[:3]
    return host, pid, nonce[1:].partition(".")[0] if nonce.startswith("t") and "." in nonce else None


def process_of(owner: str) -> str:
    """The process part of an owner name, shared by all its drives: ``host:pid:t<start>``, else ``host:pid``."""
    host, pid, started = _owner_parts(owner)
    return f"{host}:{pid}" if started is None else f"{host}:{pid}:t{started}"


class Drive:
    """One drive of a run (a start or a resume) and its owner name, alive here as long as this object is.

    Each drive has its own owner, so two threads or tasks of one process cannot both hold a
    run, while a drive that ended without releasing its run (its process lives on) holds nothing.
    """

    __slots__ = ("owner", "__weakref__")

    def __init__(self) -> None:
        self.owner = process_owner()
        _DRIVING[self.owner] = self


def drive_over(owner: str) -> None:
    """The drive of ``owner`` has ended, however it ended: from now on it holds nothing in this process,
    even while something (an exception's traceback, a kept Run) still references it."""
    _DRIVING.pop(owner, None)


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` names a process on this host that no longer runs, or a drive in this
    process that is over."""
    if not owner:
        return True
    host, pid_text, started = _owner_parts(owner)
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _DRIVING
    if os.name == "nt":  # os.kill(pid, 0) sends CTRL_C_EVENT there, it probes nothing: wait for the lease
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process holds the pid: alive, unless it is not the owner (below)
    stat = _stat(pid)
    if stat is None:
        return False
    # A zombie is dead; so is the owner when another process has its pid now (a restarted container).
    return stat[0] == "Z" or (started is not None and started != stat[19])


def living_here(owner: str | None) -> tuple[int, str] | None:
    """For an owner that is a live process on this host: its pid, and its state as /proc tells it (``T`` stopped by
    Ctrl-Z or SIGSTOP, ``t`` held by a debugger; ``?`` where there is no /proc); else None (dead, or elsewhere)."""
    if not owner or owner_is_dead(owner):
        return None
    host, pid_text, _ = _owner_parts(owner)
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return None
    stat = _stat(int(pid_text))
    return int(pid_text), "?" if stat is None else stat[0]


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), where there is a /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks after boot (Linux), else None."""
    stat = _stat(pid)
    return None if stat is None else stat[19]


def may_take(run: RunRecord, owner: str, now: float, take_over: bool = False) -> bool:
    """Whether ``owner`` may take the lease on ``run`` at time ``now`` (``take_over``: whatever the lease).

    Never from a drive of this process that still runs, however long its step: its lease is
    known to be live even where nothing renews it.
    """
    if run.owner == owner or unheld(run.owner, run.lease_expires, now):
        return True
    return take_over and run.owner not in _DRIVING


def unheld(owner: str | None, lease_expires: float | None, now: float) -> bool:
    """Whether no live drive holds a run stored as running: nobody owns it, or its owner is no live
    drive of this process and its lease ran out (nothing renews it) or its process here died.
    ``loomc runs`` calls such a run ``crashed``."""
    return owner is None or (owner not in _DRIVING and ((lease_expires or 0) < now or owner_is_dead(owner)))


def locked_message(run: RunRecord, now: float, store: Any = None) -> str:
    """Why ``run`` cannot be taken now; ``store`` (the one that holds it) names the command that takes it over."""
    if run.owner in _DRIVING:
        return (f"run {run.id} is already being run in this process (by another thread or task, or an "
                "iter() not yet finished); wait for it to finish, or close that iter()")
    left = max(0.0, (run.lease_expires or now) - now)
    command = loomc_command("resume", run.id, "--take-over", db=store)
    return (f"run {run.id} is being run by {run.owner} (lease for {left:.0f}s more); wait for it to finish, "
            "or for its lease to expire; if you know that process is gone (a restarted container with a new "
            "host name), resume with take_over=True" + ("" if command is None else f" (`{command}`)"))


def lease_lost(run: RunRecord, owner: str | None) -> LeaseLost:
    """The error for a commit of ``owner``, who held ``run`` until another process took it over."""
    now = (f"{run.owner} drives it now" if run.owner is not None else
           "it has ended since" if run.status != "running" else "it stopped since")
    lost = LeaseLost(f"run {run.id}: this process ({owner}) no longer holds its lease: another process took the run "
                     f"over ({now}; status {run.status}), once the lease ran out while this process was paused, asleep "
                     "or too busy to renew it, or with take_over=True")
    lost.lost_run = run.id
    return lost


def open_parent_step(store: Any, record: RunRecord) -> RunRecord | None:
    """The parent run of a child run whose parent step never committed, else None.

    That step is its parent's to settle: resumed, the parent makes the call again (and the child
    goes on inside it, under the parent's budget) or records it as interrupted, counting what the
    child spent. Once the parent committed that step, however it ended, the child stands alone.
    """
    if not record.parent_run_id or record.parent_step is None:
        return None
    try:
        parent = store.get_run(record.parent_run_id)
    except RunNotFound:
        return None  # the parent is gone: nobody else can account for it
    return parent if parent.steps <= record.parent_step else None


def no_such_step(run_id: str, n: int, count: int) -> StoreError:
    """The error for step ``n`` of a run that has ``count`` committed steps, and not that one."""
    have = "no committed step" if not count else f"steps 0 to {count - 1}"
    return StoreError(f"run {run_id} has no step {n}: it has {have}")


async def offload(store: Any, fn: Callable[..., Any], *args: Any,
                  abandoned: Callable[[Any], None] | None = None) -> Any:
    """Run a store call off the event loop, on the store's own writer thread if it has one.

    With ``abandoned``: if the awaiting task is cancelled while the call is under way there, what the call
    returns goes to ``abandoned`` once it is done (from the writer thread); a call still waiting its turn is
    dropped. Opening a run claims it, and a claim nobody will drive must be let go.
    """
    writer = getattr(store, "writer", None)
    if writer is None:
        return fn(*args)  # an in-memory store does no I/O
    import asyncio
    if abandoned is None:
        return await asyncio.get_running_loop().run_in_executor(writer, functools.partial(fn, *args))
    job = writer.submit(fn, *args)
    try:
        return await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        if not job.cancel():  # under way or done
            job.add_done_callback(lambda done: None if done.cancelled() or done.exception() is not None
                                  else abandoned(done.result()))
        raise
