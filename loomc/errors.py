"""Every exception loomc raises subclasses :class:`LoomcError`.

Run-level errors carry ``run_id``, the ``state`` the run ends with (chosen by the
backtracker, if any) and the ``history`` of steps, so a caller can always keep
the paid-for work::

    try:
        report = refine_report(draft)
    except BudgetExhausted as e:
        report = e.state          # the best state the budget bought
        print(e.run_id, len(e.history), e.history.total_cost)
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata
import warnings
from decimal import Decimal
from typing import Any

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_ASYNCIO = os.path.join(os.path.dirname(os.__file__), "asyncio") + os.sep


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first frame outside loomc: the user's line that asked for it."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


#: The key of ``Step.metrics`` that holds where a failed step's error was raised (:func:`where_raised`).
TRACEBACK_METRIC = "traceback"
#: The longest traceback a failed step keeps; a longer one keeps its start and its end, where the
#: error was raised.
TRACEBACK_CHARS = 8_000
#: The key of ``Step.metrics`` that holds a step's line items, ``{item: dollars as text}`` (``charge(usd, item)``).
COST_ITEMS_METRIC = "cost_items"
#: The key of ``Step.metrics`` that holds the tokens of a step's line items, ``{item: {"input": n, "output": n}}``
#: (``charge(usd, item, tokens=(n, n))``, an adapter's charge).
TOKENS_METRIC = "tokens"
#: The key of ``Step.metrics`` on a failed step whose call's cost is unknown: ``fn`` raised under a
#: ``cost_fn``, which prices only a state ``fn`` returned, or ``cost_fn`` itself raised. A USD cap counts
#: such a call at its estimate.
COST_UNKNOWN_METRIC = "loomc.cost_unknown"
#: The key of ``Step.metrics`` on a step whose state ``loomc prune --states`` removed: when (Unix time).
PRUNED_METRIC = "loomc.state_pruned_at"


def where_raised(exc: BaseException) -> str | None:
    """Where ``exc`` was raised, as Python prints it, without loomc's own frames; ``None`` when no
    frame of the user's code is in it (an error loomc made, which says all there is to say).

    Chained exceptions (``raise ... from``, an error while handling another) are kept, as Python
    shows them. The text is at most :data:`TRACEBACK_CHARS` long.
    """
    import traceback  # only a failed step pays for it

    top = traceback.TracebackException.from_exception(exc)
    found, seen, todo = False, set(), [top]
    while todo:
        te = todo.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        frames = [f for f in te.stack if not f.filename.startswith(_PACKAGE)]
        while frames and frames[0].filename.startswith(_ASYNCIO):  # how loomc awaited fn, not fn's own
            del frames[0]
        te.stack = traceback.StackSummary.from_list(frames)
        found = found or bool(te.stack)
        todo += [t for t in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())) if t]
    if not found:
        return None
    text = "".join(top.format()).rstrip("\n")
    if len(text) > TRACEBACK_CHARS:
        half = TRACEBACK_CHARS // 2
        head, tail = text[:half], text[-half:]
        head, tail = head[:head.rfind("\n")], tail[tail.find("\n") + 1:]
        text = f"{head}\n  ... ({len(text) - len(head) - len(tail)} characters cut)\n{tail}"
    return text


def iso(ts: float) -> str:
    """Local time, ISO 8601 to the second: ``2026-07-03T12:00:19``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts))


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters with ``...``, for a value shown inside a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def took(seconds: float) -> str:
    """How long a call took, as loomc prints it, in 5 to 7 characters; ``-`` when it is not known (a step
    whose process died, a step from loomc 0.2).

    >>> took(0.4213), took(38.64), took(185.2), took(7800), took(0.0)
    ('0.42s', '38.6s', '3m05s', '2h10m', '-')
    """
    if not seconds > 0:
        return "-"
    if seconds < 10:
        return "%.2fs" % seconds
    if seconds < 60:
        return "%.1fs" % seconds
    minutes = int(seconds // 60)
    return "%dm%02ds" % (minutes, seconds % 60) if minutes < 60 else "%dh%02dm" % divmod(minutes, 60)


def counted(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``: a count for the messages loomc prints."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


_CENT_HUNDREDTH = Decimal("0.0001")


def dollars(amount: Any) -> str:
    """An amount of dollars as loomc prints it: to the hundredth of a cent, and to two significant digits
    below that, so the steps of a cheap model never show as ``$0.0000``.

    >>> dollars(Decimal("0.15")), dollars(Decimal("0.00003")), dollars(Decimal("0.0000123")), dollars(Decimal(0))
    ('$0.1500', '$0.00003', '$0.000012', '$0.0000')
    """
    value = Decimal(amount)
    if not value or abs(value) >= _CENT_HUNDREDTH:
        return f"${value:.4f}"
    return f"${value:.{1 - value.adjusted()}f}".rstrip("0")


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}  # as Python writes them: a multi-line error stays readable
_CONTROL = ("Cc", "Cf", "Zl", "Zp")  # the Unicode categories of control and format characters, escaped when shown


def clean(text: Any) -> str:
    """``text`` with every control or format character escaped, so it cannot drive the terminal.

    >>> clean("ok\\x1b[2Jgone")
    'ok\\\\x1b[2Jgone'
    """
    text = str(text)
    if text.isprintable():  # the usual case, at C speed: nothing to escape (isprintable is False for all of them)
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _CONTROL:
            code = ord(ch)
            out.append(_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)


def shell_word(text: str) -> str:
    """``text`` as one word a POSIX shell reads back as ``text``, for a command to paste: quoted where it must
    be (``'a b'``), and as ``$'a\\nb'`` when it holds a control or format character, shown escaped as ``clean``
    shows it, so that printing the command cannot drive the terminal either."""
    if text.isprintable():
        import shlex
        return shlex.quote(text)
    out = []
    for ch in text:
        if ch in "\\'":
            out.append("\\" + ch)
        elif unicodedata.category(ch) in _CONTROL:  # as clean escapes them, but bash's \\x is a byte, \\u a character
            code = ord(ch)
            out.append(_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000
                                            else f"\\U{code:08x}"))
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def loomc_command(verb: str, run_id: str | None, *options: str, db: Any = None) -> str | None:
    """``loomc show ID --step 3``, as a shell takes it when pasted, for the run ``run_id`` of ``db``.

    ``db``: the database the run is in, as a path or the store that holds it; ``None`` for the default one.
    ``--db PATH`` is given unless it is ``.loomc/checkpoints.db`` under the working directory with ``$LOOMC_DB``
    unset, so that the command reads the run's file wherever it is pasted (a shell without the job's
    ``$LOOMC_DB`` too): a hint for a run of ``checkpoint="jobs.db"`` used to send the command to the default
    file, which has no such run. The id is quoted as the shell needs (``shell_word``), and follows
    ``--`` when it starts with a dash, which the command would take for an option. ``None`` when the run is in
    a store the command cannot read (the memory store's, or one of your own), or for no run id.
    """
    if run_id is None:
        return None
    words = ["loomc", verb]
    if db is not None and not isinstance(db, (str, os.PathLike)):
        from loomc.stores.sqlite import SQLiteStore
        if not isinstance(db, SQLiteStore):
            return None
        db = db.path
    from pathlib import Path
    from loomc.stores import DEFAULT_DB, default_path
    path = Path(default_path() if db is None else db).expanduser().resolve()
    if os.environ.get("LOOMC_DB") or path != Path(DEFAULT_DB).resolve():
        words += ["--db", shell_word(str(path))]
    words += [*options, "--", shell_word(run_id)] if run_id.startswith("-") else [shell_word(run_id), *options]
    return " ".join(words)


def read_whole(run_id: str, store: Any, step: int | None = None) -> str:
    """Where a text cut short for run ``run_id`` is read whole: ``loomc show`` for a run in a SQLite file (the
    step's error with ``step``, else the run's reason), else the ``Run`` that the loop returned or raised."""
    said = loomc_command("show", run_id, *(() if step is None else ("--step", str(step))), db=store)
    if said is not None:
        return f"`{said}` shows it whole"
    return "the Run's " + ("reason" if step is None else f"history[{step}].error") + " has it whole"


#: The longest error (or stop reason) the run table and the log lines show whole;
#: `loomc show ID --step N` shows any.
SHOWN_CHARS = 200


def shorten(text: str, where: str) -> str:
    """``text``, escaped, cut to :data:`SHOWN_CHARS` with how long it is and ``where`` to read it whole."""
    if len(text) <= SHOWN_CHARS:
        return clean(text)
    return f"{clean(text[:SHOWN_CHARS])}... ({len(text):,} characters; {where})"


class LoomcError(Exception):
    """Base of every error loomc raises."""


class ConfigError(LoomcError, ValueError):
    """A policy, budget or decorator argument is wrong. Raised at construction."""


class PolicyTypeError(LoomcError, TypeError):
    """Policies were combined in a way that has no meaning (``BestScore() & x``)."""


class RunError(LoomcError):
    """A run ended without converging. Carries ``run_id``, ``state`` and ``history``."""

    def __init__(self, message: str, *, run_id: str | None = None, state: Any = None,
                 history: Any = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.state = state
        self.history = history
        self.reason = reason


class BudgetExhausted(RunError):
    """A budget cap (USD, iterations or wall clock) stopped the run."""


class StallError(RunError):
    """A stall handler (``Escalate``) gave up on the run."""


class StopRequested(RunError):
    """A run stopped because :func:`loomc.request_stop` asked it to (a SIGTERM handler, say).

    It stopped between two steps: the call in flight when the stop was asked for went on to its end
    and was committed. ``run_id`` is None for a run refused before it started, as the process was
    stopping. ``code`` is the exit status the stop asks for: 128 + the signal's number, as the signal
    would have given (143 for SIGTERM), else 1.
    """

    def __init__(self, message: str, code: int = 1, **run: Any) -> None:
        # code has a default so that the error unpickles (from its message, then its attributes): one sent back from
        # a process pool's worker (a SIGTERM there) failed to, and broke the pool
        super().__init__(message, **run)
        self.code = code


class StoreError(LoomcError):
    """The checkpoint store refused an operation or is unusable."""


class StoreBusy(StoreError):
    """Another connection kept the store locked for longer than loomc waits: trying again at once would wait as
    long again."""


class RunNotFound(StoreError, KeyError):
    """No run with that id is in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "run not found"


class RunAlreadyFinished(StoreError):
    """Resume was asked of a run that already completed."""


class RunLocked(StoreError):
    """Another live process holds the lease on this run."""


class LeaseLost(RunLocked):
    """Another process took this drive's run over (its lease ran out while its process was paused, asleep or hung,
    or ``take_over=True``): the run goes on there, and this drive's step in flight is not committed."""

    #: The run that was lost ("" where a store did not say): a child's, when it reaches the parent's step.
    lost_run = ""

    def lost(self, run_id: str | None) -> bool:
        """Whether this is the loss of ``run_id`` itself (not of a child run inside its step)."""
        return self.lost_run in ("", run_id)


class StepConflict(StoreError):
    """A step number was committed twice for one run."""


class SchemaTooNew(StoreError):
    """The database was written by a newer loomc."""


class CorruptStore(StoreError):
    """The database file is not a readable SQLite database."""


class EmbeddingsUnavailable(LoomcError, ImportError):
    """sentence-transformers, or the model's weights, cannot be loaded here."""


class DeadlineExceeded(LoomcError):
    """An async iteration was cancelled because the wall-clock budget ran out during it."""

    @classmethod
    def at(cls, cap: float, what: str) -> DeadlineExceeded:
        return cls(f"{_RAN_OUT} ({cap:g}s) ran out {what}")


_RAN_OUT = "the wall-clock budget"


def cut_at_deadline(error: str | None) -> bool:
    """Whether a step's error says its call (or what measured it) was cancelled at the wall-clock deadline."""
    return error is not None and error.startswith(f"{DeadlineExceeded.__name__}: {_RAN_OUT} (")


class CostUnknown(LoomcError):
    """What a call cost cannot be known (a priced response without usage). Under a USD cap it ends
    the run, backtracker or not: without the cost the cap cannot hold."""


class StateEncodeError(LoomcError, TypeError):
    """``fn`` returned a state that cannot be stored as JSON. ``returned`` holds that state, as ``fn``
    returned it: the call was paid for, and the store could not keep it."""

    returned: Any = None


class NoStateReturned(LoomcError, TypeError):
    """``fn`` returned ``None`` instead of the new state (a forgotten ``return state``)."""


class CheckpointDecodeError(LoomcError):
    """A stored state no longer decodes into the state type."""


class StatePruned(CheckpointDecodeError):
    """A step's state was read after ``loomc prune --states`` removed it (the step's record is kept)."""


class RunAtImport(LoomcError):
    """A loop was started or resumed while ``loomc resume`` imported the module that defines it."""


def attach_run(exc: BaseException, run_id: str | None, state: Any, history: Any, fn_name: str = "fn",
               ended: tuple[str, str] | None = None, store: Any = None) -> BaseException:
    """Mark an exception raised by user code with the run it ended.

    The user's exception type is kept (callers catch their own errors); loomc
    adds ``run_id``, ``state`` and ``history`` attributes and a note. So does a
    ``KeyboardInterrupt``: a notebook's interrupted cell says which run to resume, or, when the run had
    ``ended`` (its status and reason) before the interrupt came, how it ended. ``store``: where the run is.
    """
    try:
        exc.run_id = run_id  # type: ignore[attr-defined]
        exc.state = state  # type: ignore[attr-defined]
        exc.history = history  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # exceptions with __slots__
        pass
    if ended is not None:
        status, reason = ended
        exc.add_note(f"loomc: run {run_id} had already ended, {status.replace('_', ' ')}: {reason}; " + (
            "the state it reached is on .state" if status == "completed" else go_on(status, fn_name, run_id, store)))
        return exc
    if isinstance(exc, LeaseLost) and exc.lost(run_id):
        shown = loomc_command("show", run_id, db=store)
        exc.add_note(f"loomc: run {run_id} is not this process's any more: leave it to the process that took it "
                     "over" + ("" if shown is None else f"; `{shown}` shows how it goes on"))
        return exc
    how = "was interrupted, with every committed step kept" if isinstance(exc, KeyboardInterrupt) else "failed"
    exc.add_note(f"loomc: run {run_id} {how}; {go_on('failed', fn_name, run_id)}")
    return exc


def go_on(status: str, fn_name: str, run_id: str | None, store: Any = None) -> str:
    """How to go on with a run that stopped ``status`` (not completed), as Python to paste; ``store``: where the
    run is (``None``: the default file)."""
    if status == "budget_exhausted":
        return f"give a larger budget: {fn_name}.resume({run_id!r}, budget=Budget(...))"
    if status == "stalled":
        shown = loomc_command("show", run_id, db=store)
        where = "its .history" if shown is None else f"it with `{shown}`"
        return f"inspect {where}; {fn_name}.resume({run_id!r}) gives it more calls"
    return f"resume it with {fn_name}.resume({run_id!r})"
