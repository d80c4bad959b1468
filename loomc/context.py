"""What ``fn`` can ask of the run it is in, and what the process tells its runs.

Inside a step: :func:`charge` and :func:`acharge` record spend the moment it happens,
:func:`usd_left` and :func:`time_left` say what the run's caps leave, :func:`step_number` says
which step is in flight. From anywhere: :func:`request_stop` asks every live run to stop after
the call it has in flight (a container's SIGTERM handler). The run in flight is a context
variable that the interpreter sets around each call of ``fn``, its scorer, cost function and
judges, so a thread that ``fn`` starts sees it only if it carries the context.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import weakref
from collections.abc import Coroutine, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from loomc.errors import ConfigError, LoomcError, StopRequested, dollars
from loomc.history import to_decimal
from loomc.stores.base import offload

if TYPE_CHECKING:
    from loomc.runs import LiveRun

T = TypeVar("T")  # what a coroutine named by ``named`` returns

_SPENDING = threading.Lock()  # charges are rare next to steps: one lock for every run will do
_CURRENT: contextvars.ContextVar[LiveRun | None] = contextvars.ContextVar("loomc_current_run", default=None)
# The runs this process drives right now, by id(): request_stop asks each of them to stop. Held weakly: a run
# whose drive only garbage still holds (a task asyncio.run abandoned) must not be kept, nor its run held, by this.
_LIVE: weakref.WeakValueDictionary[int, LiveRun] = weakref.WeakValueDictionary()
# Why the process is stopping, once a signal asked it to (request_stop as a signal handler): no run starts after it.
_STOPPING: list[tuple[str, int]] = []  # (why, exit status)
if hasattr(os, "register_at_fork"):
    # A forked child (a multiprocessing worker that fn starts) drives none of its parent's runs: with request_stop
    # as the SIGTERM handler it inherits, a SIGTERM (Pool.terminate) exits it, rather than asking them to stop.
    os.register_at_fork(after_in_child=_LIVE.clear)


def request_stop(signum: int | None = None, frame: Any = None) -> int:
    """Stop every run of this process after the call it has in flight; return how many were asked.

    Each run lets its call in flight go on to its end and commits it, then ends ``cancelled``
    before its next call, releasing its lease, and raises :class:`StopRequested`. Its signature is
    a signal handler's, for a container's shutdown (``docker stop``, Kubernetes)::

        signal.signal(signal.SIGTERM, loomc.request_stop)

    Called so, with a signal, the process is stopping: a run that would start or resume after it
    is refused, and a second signal, or one that comes while no run is live, exits at once with
    ``SystemExit(128 + signum)``, as the signal would have (a call in flight is then cut short).
    Called from code, without a signal, it stops the runs live at that moment only.
    """
    if signum is not None and (isinstance(signum, bool) or not isinstance(signum, int)):
        raise ConfigError(f"request_stop(signum={signum!r}): give the signal's number (signal.SIGTERM), as a signal "
                          "handler is given it, or nothing to stop the live runs from code")
    live = list(_LIVE.values())
    if signum is not None:
        if _STOPPING or not live:
            raise SystemExit(128 + signum)
        _STOPPING.append((f"{_signal_name(signum)} received", 128 + signum))
        why, code = _STOPPING[0]
    else:
        why, code = "loomc.request_stop() was called", 1
    for run in live:
        if run.stop is None:
            run.stop, run.stop_code = why, code
    return len(live)


def driven(run: LiveRun) -> None:
    """Count the run among those this process drives, which request_stop asks to stop."""
    _LIVE[id(run)] = run
    if _STOPPING and run.stop is None:  # it started as the process was stopping: it stops before its first call
        run.stop, run.stop_code = _STOPPING[0]


def undriven(run: LiveRun) -> None:
    """The run's drive is over: request_stop no longer asks it."""
    _LIVE.pop(id(run), None)


class ctrl_c_deferred:  # noqa: N801 (used as a function: ``with ctrl_c_deferred():``)
    """``with ctrl_c_deferred():`` holds a Ctrl-C back until the block ends, then raises it.

    For the few lines that must all happen or none: a child step's commit and its bill to the parent,
    and the record of an interrupted run. A Ctrl-C landing between two of them (the first one, or a
    second press while the first is being recorded) left a child's spend out of its parent's ledger.
    Only in the main thread under Python's own SIGINT handler, where a Ctrl-C is a KeyboardInterrupt;
    asyncio's handler, or one of yours, is left alone.
    """

    __slots__ = ("caught", "armed", "raising")

    def __init__(self, stopping: bool = False) -> None:
        # ``stopping``: a KeyboardInterrupt is on its way out already, with the run's notes on it; a second one
        # would only chain a traceback from inside loomc onto it.
        self.raising = not stopping

    def __enter__(self) -> None:
        import signal
        self.caught: list[int] = []
        self.armed = threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if self.armed:
            signal.signal(signal.SIGINT, lambda signum, frame: self.caught.append(signum))

    def __exit__(self, *exc: object) -> None:
        if self.armed:
            import signal
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.caught and self.raising:
                raise KeyboardInterrupt


def _signal_name(signum: int) -> str:
    import signal
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def refuse_when_stopping() -> None:
    """Refuse to start or resume a run once a signal has asked the process to stop (request_stop)."""
    if _STOPPING:
        why, code = _STOPPING[0]
        raise StopRequested(f"{why}: this process is stopping, so no run starts or resumes in it", code)


def _elsewhere(run: LiveRun) -> bool:
    """Whether ``run`` is driven by another process: this one was forked inside its ``fn`` (a process pool's
    worker), and inherited the context, but not the run, which lives in the forking process."""
    return run.pid != os.getpid()


def current_run() -> LiveRun | None:
    """The run whose iteration is executing in this context, in this process, if any (see ``_elsewhere``)."""
    run = _CURRENT.get()
    return None if run is None or _elsewhere(run) else run


def forked_from() -> LiveRun | None:
    """The run whose step this process was forked from (see ``_elsewhere``), if any: its copy, as it was at the
    fork."""
    run = _CURRENT.get()
    return run if run is not None and _elsewhere(run) else None


def step_number() -> int | None:
    """The number of the step whose iteration is running in this context, or ``None`` outside one."""
    run = current_run()
    return None if run is None else run.in_flight


def usd_left() -> Decimal | None:
    """Dollars the run may still spend in the step in flight before it passes its USD cap, or ``None``
    when no USD cap applies (a parent's cap on a child run counts).

    That is the cap, less what the run spent before this step and what this step has charged so
    far (``loomc.charge``, an adapter's ``charge``, child runs), and an earlier call of unknown cost
    at the estimate the cap counts it at. A cost that ``cost_fn`` adds once ``fn`` returns is not
    known yet. The budget is checked before each call of ``fn``; a step that
    makes several paid calls checks this before each of them::

        def fix(state):
            while not state["tests_pass"]:
                left = loomc.usd_left()
                if left is not None and left < 0.05:   # the next call could pass the cap
                    break
                reply = client.messages.create(...)
                adapter.charge(reply)
                ...
            return state
    """
    return _in_step("usd_left").usd_room()


def time_left() -> float | None:
    """Active seconds the run may still take in the step in flight before it passes its wall-clock cap,
    or ``None`` when no wall-clock cap applies (a parent's cap on a child run counts, the least of them).

    The cap is checked before each call of ``fn``, counting it at the longest call so far; a step that
    makes several slow calls (an agent that calls the model until the tests pass) checks this before
    each of them, as it checks :func:`usd_left` for dollars::

        def fix(state):
            while not state["tests_pass"]:
                left = loomc.time_left()
                if left is not None and left < 120:   # the next call could take two minutes
                    break
                ...
    """
    return _in_step("time_left").time_left()


#: What a worker process that fn started does instead of charging fn's step.
_WORKER_PAYS = "have the worker return what its calls cost and charge that in fn (loomc.charge(sum(costs)))"


def _in_step(name: str, lost: str = "") -> LiveRun:
    """The run whose step is in flight in this context, else a LoomcError that says why there is none.

    Called where no run is (a thread started without the loop's context, a process forked inside ``fn``), it is
    a ConfigError: the code is built that way, so every step would meet it again, and a backtracker stops rather
    than paying for calls whose spend cannot be recorded. ``lost``: what is not counted for it, to tell.
    """
    run = _CURRENT.get()
    if run is not None and _elsewhere(run):
        raise ConfigError(f"loomc.{name}() was called in process {os.getpid()}, forked from the process driving run "
                          f"{run.id} (a process pool's worker, started inside fn): the step in flight lives in that "
                          f"process, so what is charged here cannot join it{lost}. {_WORKER_PAYS.capitalize()}, or "
                          "make the paid calls in threads (pool.submit(contextvars.copy_context().run, work, ...))")
    if run is None:
        mp = sys.modules.get("multiprocessing")
        worker = mp is not None and mp.parent_process() is not None
        raise ConfigError(f"loomc.{name}() was called outside a loop iteration; call it inside the function "
                          "decorated with @loop. " + (
                              f"This is a worker process (pid {os.getpid()}): if fn started it, it cannot charge "
                              f"fn's step, which lives in fn's process; {_WORKER_PAYS}{lost}." if worker else
                              "A thread that fn starts does not carry the loop's context: submit its work as "
                              "pool.submit(contextvars.copy_context().run, work, ...) (asyncio.to_thread does this "
                              "for you).") + (
                             " A predicate in the policy cannot charge: for a verdict that costs money use "
                             "judge(fn), whose charges join the step" if "charge" in name else ""))
    if run.in_flight < 0:
        raise LoomcError(f"loomc.{name}() was called for run {run.id} after its step ended (from a thread fn "
                         "left running?); charge before fn returns, so the spend joins its step")
    return run


def charge(usd: float | Decimal | str, item: str | None = None, *, tokens: Sequence[int] | None = None) -> None:
    """Record spend the moment it happens, inside an iteration.

    The amount is written to the store at once (write-ahead), added to the
    step's cost when the step commits, and counted on resume if the process
    dies before that, never twice. ``item`` names a line item (``"judge"``),
    recorded in the step's ``metrics["cost_items"]``; ``tokens``, the call's
    input and output token counts, are added up by line item in
    ``metrics["tokens"]`` (an adapter's charge tells them)::

        def step(state):
            reply = client.messages.create(...)
            loomc.charge(price(reply))      # durable now, even if we crash next line
            ...
    """
    run, step, amount, wrong = spent("charge", usd, item, tokens)
    run.store.charge(run.id, step, amount)
    if wrong:  # the money is spent and written all the same: the step counts it, then fails
        raise ConfigError(wrong)


def acharge(usd: float | Decimal | str, item: str | None = None, *,
            tokens: Sequence[int] | None = None) -> Coroutine[Any, Any, None]:
    """:func:`charge` for async iterations: ``await loomc.acharge(usd)``; the write goes to the store's
    writer thread.

    The spend joins the step the moment ``acharge`` is called, before the ``await``: an ``await``
    forgotten (Python warns of it) loses the write-ahead to the store, never the money from the
    step's cost and the USD cap.
    """
    return named(write_ahead(*spent("acharge", usd, item, tokens)), "loomc.acharge")


def spent(name: str, usd: float | Decimal | str, item: str | None,
          tokens: Sequence[int] | None = None) -> tuple[LiveRun, int, Decimal, str]:
    """Add ``usd`` to the step in flight (for ``name``, charge or acharge): the run, the step and the amount,
    for the write-ahead, and what is wrong with ``tokens`` (``""``: nothing), to raise after it. Spent
    whatever the store then says: a write that fails still counts in the step."""
    amount = to_decimal(usd, f"{name}(usd)")
    run = _in_step(name, f" (the {dollars(amount)} charged here is not counted)")
    wrong = "" if tokens is None else _wrong_tokens(name, item, tokens, amount)
    run.spend(amount, item, None if wrong else tokens)
    return run, run.in_flight, amount, wrong


def _wrong_tokens(name: str, item: str | None, tokens: Any, amount: Decimal) -> str:
    """What is wrong with ``tokens``: they must be (input, output), two counts, told with their line item."""
    if not (isinstance(tokens, (tuple, list)) and len(tokens) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in tokens)):
        wrong = (f"{name}(tokens={tokens!r}): give the call's (input, output) token counts, two whole numbers >= 0, "
                 "as in tokens=(1200, 350)")
    elif item is None:
        wrong = (f"{name}(usd, tokens={tokens!r}) names no line item: tokens are counted by line item, so name the "
                 f"one they belong to, as in {name}(usd, item='gpt-4o', tokens={tokens!r})")
    else:
        return ""
    return f"{wrong} (the {dollars(amount)} charged is counted in the step)"


async def write_ahead(run: LiveRun, step: int, amount: Decimal, wrong: str = "") -> None:
    """An async loop's write-ahead of a charge, on the store's writer thread; then ``wrong``, if told, raised."""
    await offload(run.store, run.store.charge, run.id, step, amount)
    if wrong:
        raise ConfigError(wrong)


def named(coroutine: Coroutine[Any, Any, T], name: str) -> Coroutine[Any, Any, T]:
    """``coroutine``, named ``name`` in Python's warning if it is never awaited."""
    coroutine.__qualname__ = name  # type: ignore[attr-defined]
    return coroutine

