"""The ``loomc`` command: runs, show, resume, export and demo, on the SQLite store.

Every command reads ``--db PATH`` (given after the command, or before it: ``loomc --db PATH runs``), else
``$LOOMC_DB``, else ``./.loomc/checkpoints.db``.
Bad input (an unknown run, a missing or corrupt database, one from a newer loomc)
prints one line on stderr and exits 1; text that came from the outside world
(errors, states) is escaped before it reaches the terminal.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
from decimal import Decimal
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn

import click

from loomc.budget import Budget, budget_from_repr
from loomc.errors import (COST_UNKNOWN_METRIC, PRUNED_METRIC, TRACEBACK_METRIC, LoomcError, RunAtImport,
                          StopRequested, clean, counted, dollars, iso, loomc_command, shorten, took)
from loomc.history import NOT_STORED, running_costs, spend_by_item
from loomc.interpreter import ENDING_EVENTS, in_no_call
from loomc.policy import unwrapped
from loomc.loop import fn_name_of_path
from loomc.stores.base import RunRecord, StoredStep, living_here, open_parent_step, owner_is_dead, unheld

DB_HELP = "SQLite file to read (default: $LOOMC_DB, else ./.loomc/checkpoints.db)"
STATUS_COLORS = {"completed": "green", "failed": "red", "budget_exhausted": "yellow", "stalled": "magenta",
                 "cancelled": "yellow", "running": "cyan", "crashed": "red"}


def color_on() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def paint(text: str, color: str | None) -> str:
    return click.style(text, fg=color) if color and color_on() else text


def fail(message: str) -> NoReturn:
    click.echo(f"loomc: {clean(message)}", err=True)
    sys.exit(1)


def db_path(db: str | None) -> str:
    """The database a command reads: its own ``--db``, else the one given before it (``loomc --db F runs``),
    else ``$LOOMC_DB``, else the default file."""
    from loomc.stores import default_path
    if db is None:
        ctx = click.get_current_context(silent=True)
        db = None if ctx is None else ctx.find_root().params.get("db")
    return db or default_path()


def open_db(db: str | None) -> Any:
    from loomc.stores.sqlite import SQLiteStore
    try:
        return SQLiteStore(db_path(db), create=False)
    except LoomcError as e:
        fail(str(e))


# --- the two tables ----------------------------------------------------------

def shown_status(status: str, owner: str | None, lease_expires: float | None) -> str:
    """The status to print: a run still marked running that no process drives has ``crashed`` (its process on
    this host is gone, or its lease ran out, which a live process renews wherever it runs)."""
    return "crashed" if status == "running" and unheld(owner, lease_expires, time.time()) else status


def _gone(run: RunRecord, n: int, last: StoredStep | None = None, began: bool = True) -> str:
    """Why no process drives a crashed run, which stopped during step ``n``: its process died here, its
    lease ran out, or nobody owns it. ``last`` is step ``n - 1``: one that ended the run means the
    process died after it, in no call, and so does a backoff wait, unless step ``n``'s call ``began`` (a
    write-ahead charge for it says so). A call it died in says how long it was seen running."""
    if run.owner is None:
        return f"no process drives it: it stopped during step {n}"
    seen = run.seen_in_call(last)
    when = f", {took(seen[1])} into its call (last seen {iso(run.seen_at or 0)})" if seen and seen[1] > 0 else ""
    if owner_is_dead(run.owner):
        idle = in_no_call(last.events if last is not None else (), began)
        if idle is not None and idle in ENDING_EVENTS:
            return (f"its process ({clean(run.owner)}) died after step {n - 1} ended the run ({idle}), before the "
                    "run was marked so")
        if idle is not None:
            return (f"its process ({clean(run.owner)}) died in the backoff wait after step {n - 1} ({idle}), "
                    f"before step {n}'s call")
        return f"its process ({clean(run.owner)}) died during step {n}{when}"
    here = _still_here(run.owner)
    if here is None:
        return (f"its process ({clean(run.owner)}) stopped renewing its lease during step {n}{when} (it ran out at "
                f"{iso(run.lease_expires or 0)}): it died, on another host or in a container, or it hangs")
    pid, state, how, _ = here
    go_on = f"`kill -CONT {pid}` (or `fg` in its shell) lets it go on; " if state == "T" else ""
    return (f"its process ({clean(run.owner)}, pid {pid} on this machine) {how}, in step {n} (its lease ran out at "
            f"{iso(run.lease_expires or 0)}); {go_on}a resume takes the run from it, which then stops at its next "
            "charge or commit")


def _in_step(run: RunRecord, n: int, last: StoredStep | None) -> str:
    """What a live run is doing: how long it has been in step ``n`` (its call, or a backoff wait before it), and
    when its process last said it was alive (the lease keeper's heartbeat), for a run that looks stuck."""
    seen = run.seen_in_call(last)
    if seen is None:
        return "still running"
    now = time.time()
    return (f"still running, in step {n} for {took(max(now - seen[0], 0.01))}; its process was last seen alive "
            f"{took(max(now - max(run.seen_at or 0.0, seen[0]), 0.01))} ago")  # a claim or a commit is a sign too


# What a process of this machine that let its lease run out is doing, by its /proc state: said whole (loomc show)
# and briefly (loomc runs --why).
_DOING = {"T": ("is stopped (Ctrl-Z, or SIGSTOP)", "its process is stopped (Ctrl-Z, SIGSTOP)"),
          "t": ("is held by a debugger", "its process here hangs (no lease renewed)")}
_HANGS = ("is alive but has stopped renewing its lease: it hangs, or is too busy to renew it",
          "its process here hangs (no lease renewed)")


def _still_here(owner: str | None) -> tuple[int, str, str, str] | None:
    """For a crashed run's owner that is a live process of this machine: its pid, its state, and what it is doing,
    said whole and briefly; else None."""
    here = living_here(owner)
    if here is None:
        return None
    pid, state = here
    return (pid, state, *_DOING.get(state, _HANGS))


#: How much of a run's stop reason ``loomc runs --why`` shows; ``loomc show`` shows it whole.
BRIEF_CHARS = 50


#: The widest loop name ``loomc runs`` shows; a longer one is cut (``loomc show`` has it whole).
LOOP_CHARS = 24


def runs_table(rows: list[tuple[Any, ...]], why: bool = False,
               pending: Mapping[str, Decimal] | None = None) -> str:
    """The ``loomc runs`` table from ``(id, status, steps, total_cost, created_at, parent_run_id, owner, reason,
    lease_expires, fn_path)`` rows; with ``why``, a last column says briefly why each run stopped. ``pending``
    is what each run's step in flight charged, not committed yet: it is counted in the run's cost, marked ``*``.

    Built with %-formatting from widths worked out once: it prints every run, and there may be tens of
    thousands of them.
    """
    ids = [(run_id if run_id.isalnum() else clean(run_id)) + ("  (child)" if parent else "")
           for run_id, _, _, _, _, parent, _, _, _, _ in rows]
    statuses = [shown_status(row[1], row[6], row[8]) for row in rows]
    labels = {fn_path: loop_label(fn_path) for fn_path in {row[9] for row in rows}}  # once per loop, not per row
    loops = [labels[row[9]] for row in rows]
    id_w = max(15, max(map(len, ids), default=0) + 3)
    loop_w = max(6, max(map(len, loops), default=0) + 2)
    st_w = max(10, max(map(len, statuses), default=0) + 1)
    head = f"{'ID':<{id_w}}{'LOOP':<{loop_w}}{'STATUS':<{st_w}}{'STEPS':>5}{'COST':>10}  " + (
        f"{'CREATED':<21}STOPPED" if why else "CREATED")
    lines = [head, "-" * max(len(head), id_w + loop_w + st_w + 36)]  # as wide as a row's CREATED column
    colour, add, line = color_on(), lines.append, f"%-{id_w}s%-{loop_w}s%s%5s%10s  %s"
    minutes: dict[int, str] = {}
    pending = {run_id: usd for run_id, usd in (pending or {}).items() if usd}
    for rid, name, status, (run_id, _, steps, cost, created, _, owner, reason, _, _) in zip(ids, loops, statuses, rows):
        shown = status.ljust(st_w)
        if colour:
            shown = click.style(shown, fg=STATUS_COLORS.get(status))
        spent = f"{dollars(Decimal(cost) + pending[run_id])}*" if run_id in pending else \
            dollars(cost) + (" " if pending else "")  # amounts aligned beside a starred one
        row = line % (rid, name, shown, steps, spent, local_time(created, minutes))
        add(f"{row}  {_brief(status, reason, owner)}".rstrip() if why else row)
    if len(rows) > 1:
        add(_total(rows, pending))
    if any(row[0] in pending for row in rows):
        add("* with what a step in flight charged, not yet committed (a resume of a crashed run records it)")
    return "\n".join(lines)


def _total(rows: list[tuple[Any, ...]], pending: Mapping[str, Decimal]) -> str:
    """What the runs listed spent in all, with what their steps in flight charged: a child run's spend is in its
    parent's already, so a child is added only when its parent is not listed."""
    listed = {row[0] for row in rows}
    total = sum((Decimal(row[3]) + pending.get(row[0], Decimal(0)) for row in rows if row[5] not in listed),
                Decimal(0))
    inside = any(row[5] in listed for row in rows)
    return (f"{counted(len(rows), 'run')}, {dollars(total)} in all"
            + (" (a child run's spend counted once, in its parent's)" if inside else ""))


def loop_label(fn_path: str | None) -> str:
    """The name a run's loop is listed by: its function's (``-`` for a lambda, a partial or a callable
    object, which record none), cut to :data:`LOOP_CHARS`."""
    if not fn_path:
        return "-"
    name = clean(fn_name_of_path(fn_path))
    return name if len(name) <= LOOP_CHARS else name[:LOOP_CHARS - 3] + "..."


def local_time(at: float, minutes: dict[int, str]) -> str:
    """``at`` (Unix time) as local time, ``2026-12-03T01:53:15``, as ``time.strftime`` writes it.

    ``minutes`` keeps the text of each minute already seen: many runs start in the same minute,
    and formatting a time costs more than the rest of its row. Within one minute the offset from
    UTC cannot change where it is a whole number of minutes, as every zone's is today.
    """
    minute, second = divmod(int(at), 60)
    head = minutes.get(minute)
    if head is None:
        local = time.localtime(minute * 60)
        head = minutes[minute] = time.strftime("%Y-%m-%dT%H:%M:", local) if local.tm_gmtoff % 60 == 0 else ""
    return head + "%02d" % second if head else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at))


def _brief(status: str, reason: str | None, owner: str | None = None) -> str:
    """Why a run stopped, cut to :data:`BRIEF_CHARS`, for ``loomc runs --why``; ``owner``: a crashed run's."""
    if status == "crashed":
        if owner is None or owner_is_dead(owner):
            return "its process died"
        here = _still_here(owner)
        return "its lease ran out (its process is elsewhere)" if here is None else here[3]
    if not reason or status == "running":
        return ""
    return clean(reason) if len(reason) <= BRIEF_CHARS else clean(reason[:BRIEF_CHARS]) + "..."


_BUDGET = re.compile(r"Budget\([^()]*\)")


def _recorded_budget(policy: str, cap: str) -> Budget | None:
    """The first Budget in a policy's repr with a ``cap`` (``usd``, ``wall_clock``), read the way a resume
    reads a recorded raise (budget_from_repr)."""
    for text in _BUDGET.findall(policy):
        budget = budget_from_repr(text)
        if budget is not None and getattr(budget, cap) is not None:
            return budget
    return None

_RAISE = {"usd": "--budget-usd X", "iterations": "--iterations N", "wall_clock": "--wall-clock 30m",
          "unreported_spend": "--iterations N"}  # caps that do not count calls could not see their spend


def what_next(run: RunRecord, through_parent: bool = False, db: Any = None) -> str:
    """How to go on with a run that stopped short of completing, as ``loomc show`` says it.

    ``through_parent``: the run is a child whose parent step never committed (see ``open_parent_step``).
    ``db``: the file (or store) the run is in, which the command names unless it is the default one.
    """
    if through_parent:
        return f"resume its parent run {clean(run.parent_run_id)}, which goes on with it"
    if run.status == "budget_exhausted":
        cap, _, why = (run.reason or "").partition(":")
        if cap in _RAISE and run.parent_run_id is not None and why.startswith(f" the parent run {run.parent_run_id}'s"):
            # Stopped by its parent's cap (parent_cap, parent_clock): a cap of its own would not help.
            return (f"its parent's cap stopped it: `{command('resume', run.parent_run_id, _RAISE[cap], db=db)}` "
                    "gives the parent more")
        if cap in _RAISE:
            return f"`{command('resume', run.id, _RAISE[cap], db=db)}` continues it under a larger cap"
    resume = command("resume", run.id, db=db)
    if run.status == "stalled":
        return f"`{resume}` gives it more calls"
    return f"`{resume}` continues it"


def command(verb: str, run_id: str, *options: str, db: Any = None) -> str:
    """``loomc_command`` for a run the command line has read, so of a file it can name."""
    said = loomc_command(verb, run_id, *options, db=db)
    assert said is not None
    return said


def show_table(run: RunRecord, steps: list[StoredStep], children: Sequence[RunRecord] = (),
               pending: Mapping[int, Decimal] | None = None, through_parent: bool = False, db: Any = None) -> str:
    usd, wall = _recorded_budget(run.policy or "", "usd"), _recorded_budget(run.policy or "", "wall_clock")
    spent = dollars(run.total_cost) + (" (no USD cap)" if usd is None else f" of {dollars(usd.usd)} budget")
    status = shown_status(run.status, run.owner, run.lease_expires)
    last_failed = bool(steps) and steps[-1].error == run.reason
    where = f"`{command('show', run.id, '--step', str(len(steps) - 1), db=db)}` shows it whole" if last_failed \
        else f"`{command('export', run.id, '--json', db=db)}` has it"
    stopped = shorten(run.reason or ("still running" if run.status == "running" else "-"), where)
    if status == "crashed":
        gone = _gone(run, len(steps), steps[-1] if steps else None, began=len(steps) in (pending or {}))
        stopped = f"{gone}; {what_next(run, through_parent, db)}"
    elif status == "running":
        stopped = _in_step(run, len(steps), steps[-1] if steps else None)
    elif status in ("failed", "cancelled", "stalled", "budget_exhausted"):
        stopped = f"{stopped}; {what_next(run, through_parent, db)}"
    head = [f"Run: {clean(run.id)}  Loop: {loop_label(run.fn_path)}  "
            f"Status: {paint(status, STATUS_COLORS.get(status))}",
            f"Stopped: {stopped}",
            f"Policy: {clean(run.policy)}",
            f"Spent: {spent} in {counted(len(steps), 'step')}, {counted(run.attempts, 'attempt')}"]
    if wall is not None:  # the time it has had against that cap, as the dollars against theirs
        dead = run.seen_in_call(steps[-1] if steps else None) if status == "crashed" else None
        if dead is not None and dead[1] > 0:  # a resume counts the call its process died in
            head.append(f"{wall.active_against(run.active_seconds + dead[1])}, {took(dead[1])} of it in the call "
                        "its process died in")
        else:
            head.append(wall.active_against(run.active_seconds))
    items = spend_by_item(steps, clean)
    if items:
        head.append(f"By item: {items}")
    head += [(f"Late: {dollars(usd)} charged during step {n} by a process that had lost the run, after the "
              "process that took it over had recorded that step; it is not in the steps' costs") if n < len(steps)
             else (f"In flight: {dollars(usd)} charged so far during step {n}, which commits with it (should its "
                   "process die first, a resume records it as an interrupted step)") if status == "running" else
             (f"Uncommitted: {dollars(usd)} charged during step {n}, which never committed; "
              "a resume records it as an interrupted step") for n, usd in (pending or {}).items() if usd]
    head += [f"Note: {clean(n)}" for n in run.notes]
    failed = [s for s in steps if s.error]
    if failed:
        which = "the first" if len(failed) > 1 else "it"
        shows = f"where {which} was raised" if TRACEBACK_METRIC in failed[0].metrics else f"{which} whole"
        first = command("show", run.id, "--step", str(failed[0].n), db=db)
        head.append(f"Failed: {counted(len(failed), 'step')}; `{first}` shows {shows}")
    pruned = [s.metrics[PRUNED_METRIC] for s in steps if PRUNED_METRIC in s.metrics]
    if pruned:
        head.append(f"Pruned: the states of {counted(len(pruned), 'step')} were removed by `loomc prune --states` at "
                    f"{iso(max(pruned))}; every step's record is kept")
    return "\n".join([*head, STEP_HEADER, "-" * 65, *step_rows(steps, children)])


STEP_HEADER = "STEP      COST     CUMUL    SCORE     TIME  ERROR"


def step_rows(steps: Sequence[StoredStep], children: Sequence[RunRecord] = (), before: Decimal = Decimal(0)
              ) -> Iterator[str]:
    """The table's row of each step, its cumulative cost counted from ``before`` (what earlier steps cost),
    each child run marked on the step that started it."""
    by_step: dict[int, list[RunRecord]] = {}
    for child in children:
        by_step.setdefault(child.parent_step if child.parent_step is not None else -1, []).append(child)
    costs = running_costs(steps)
    if before:
        costs = (before + total for total in costs)
    # %-formatting and no per-row lists: a run may have tens of thousands of steps.
    for s, total in zip(steps, costs):
        n, score, error, events = s.n, s.score, s.error, s.events
        row = "%4d%10s%10s%s%9s" % (n, dollars(s.cost), dollars(total),
                                    "      -  " if score is None else "%9.4f" % score, took(s.duration))
        if error:
            row += "  " + paint(shorten(error, f"--step {n} shows it whole"), "red")
            if COST_UNKNOWN_METRIC in s.metrics:  # the $0 above is not what the call cost
                row += "  <- cost unknown"
        if events:
            marks = [e for e in events if e != "failed"]
            if marks:
                row += "  " + "  ".join(f"<- {clean(e)}" for e in marks)
        if n in by_step:
            for child in by_step[n]:
                row += f"  [child {clean(child.id)}: {dollars(child.total_cost)}]"
        yield row.rstrip()


# --- commands ----------------------------------------------------------------

@click.group()
@click.version_option(package_name="loomc")
@click.option("--db", type=click.Path(dir_okay=False),
              help="SQLite file every command reads, as each command's own --db does (which wins)")
def main(db: str | None) -> None:
    """loomc: resilient agent loops. Inspect, resume and export runs kept in the checkpoint database."""


@main.command()
@click.option("--db", type=click.Path(dir_okay=False), help=DB_HELP)
@click.option("--status", type=click.Choice(list(STATUS_COLORS)), help="only runs with this status")
@click.option("--limit", type=click.IntRange(min=1), help="at most this many runs")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
@click.option("--why", is_flag=True, help="add a column saying briefly why each run stopped")
@click.option("--loop", "loop_name", metavar="NAME",
              help="only runs of this loop: its function's name, or its module:qualname")
@click.option("--since", metavar="D", help="only runs started within this long: '24h', '7d', '90m'")
def runs(db: str | None, status: str | None, limit: int | None, as_json: bool, why: bool,
         loop_name: str | None, since: str | None) -> None:
    """List runs, newest first: each with its loop, status, steps, cost and start."""
    from loomc.budget import parse_duration
    try:
        started = None if since is None else time.time() - parse_duration(since, "--since")
    except LoomcError as e:
        fail(str(e))
    store = open_db(db)
    with store.reading():  # the runs, and what their steps in flight charged, as of one moment
        _list_runs(store, status, limit, as_json, why, loop_name, since, started)


def _list_runs(store: Any, status: str | None, limit: int | None, as_json: bool, why: bool, loop_name: str | None,
               since: str | None, started: float | None) -> None:
    """What ``loomc runs`` prints, read from ``store`` (``since`` as given, ``started`` the time it means)."""
    # "crashed" is not stored: it is a run stored as running that no process drives. Both are stored as running,
    # so either is chosen among those by the status it is shown with.
    split = status in ("crashed", "running")
    stored, fetch = ("running", None) if split else (status, limit)
    if as_json:
        from loomc.export import run_fields
        records = store.list_runs(status=stored, limit=fetch, loop=loop_name, since=started)
        if split:
            records = [r for r in records if shown_status(r.status, r.owner, r.lease_expires) == status][:limit]
        pending = store.pending_by_run()
        click.echo(json.dumps([run_fields(r, pending.get(r.id, {})) for r in records], indent=2))
    else:
        rows = store.run_rows(status=stored, limit=fetch, loop=loop_name, since=started)
        if split:
            rows = [r for r in rows if shown_status(r[1], r[6], r[8]) == status][:limit]
        in_flight = {run_id: sum(steps.values(), Decimal(0)) for run_id, steps in store.pending_by_run().items()}
        click.echo(runs_table(rows, why, in_flight))
        if loop_name is not None and not rows and not store.run_rows(loop=loop_name, limit=1):
            names = sorted({clean(fn_name_of_path(r[9])) for r in store.run_rows() if r[9]})
            click.echo(f"No run of a loop named {clean(loop_name)!r} here; "
                       + (f"the loops with runs: {', '.join(names)}" if names else "no run has a named loop"),
                       err=True)
        elif not rows:  # an empty table alone reads like a broken command
            asked = [f"{flag} {clean(str(value))}" for flag, value in
                     (("--status", status), ("--loop", loop_name), ("--since", since)) if value is not None]
            click.echo(f"No run matches {', '.join(asked)} in {store.path}" if asked else
                       f"No run in {store.path} yet", err=True)


@main.command()
@click.argument("run_id")
@click.option("--db", type=click.Path(dir_okay=False), help=DB_HELP)
@click.option("--step", "step_n", type=click.IntRange(min=0),
              help="show this one step whole: its error, metrics and state")
@click.option("--follow", is_flag=True,
              help="then print each step as it commits, until the run stops (exit 0 if it completed, else 2)")
def show(run_id: str, db: str | None, step_n: int | None, follow: bool) -> None:
    """Every step of a run: cost, cumulative cost, score, time, error and events; or one step whole (--step)."""
    store = open_db(db)
    with store.reading():  # the run's record and its steps as of one moment, though it goes on meanwhile
        try:
            run = store.get_run(run_id)
            steps = store.load_steps(run_id, with_states=False)
            if step_n is not None:
                click.echo(show_step(run, steps, store.load_step(run_id, step_n)))
                return
        except LoomcError as e:
            fail(str(e))
        table = show_table(run, steps, store.children(run_id), store.pending_charges(run_id),
                           open_parent_step(store, run) is not None, db=store)
    click.echo(table)
    if follow:
        try:
            sys.exit(_follow(store, run, steps))
        except KeyboardInterrupt:  # stop watching; the run goes on
            sys.exit(130)
        except LoomcError as e:
            fail(str(e))


#: How often ``loomc show --follow`` looks for new steps, in seconds.
FOLLOW_EVERY = 0.5


def _follow(store: Any, run: RunRecord, steps: list[StoredStep]) -> int:
    """Print each step of ``run`` as it commits (``steps``: those printed already) until no process drives it,
    then how it stopped; the exit status, as ``loomc resume`` gives it (0 completed, 2 otherwise)."""
    spent, seen = sum((s.cost for s in steps), Decimal(0)), len(steps)
    last = steps[-1] if steps else None
    while True:
        status = shown_status(run.status, run.owner, run.lease_expires)
        new = store.load_steps(run.id, with_states=False, start=seen)  # after the status: none is missed
        if new:
            for row in step_rows(new, store.children(run.id), spent):
                click.echo(row)
            spent += sum((s.cost for s in new), Decimal(0))
            last = new[-1]
            seen += len(new)
        if status != "running":
            break
        time.sleep(FOLLOW_EVERY)
        store.reread()  # a file deleted while the run goes on is written back: read on there
        run = store.get_run(run.id)
    stopped = _gone(run, seen, last) if status == "crashed" else run.reason or status
    click.echo(f"Stopped: {paint(status, STATUS_COLORS.get(status))}: {clean(stopped)}; spent {dollars(spent)} "
               f"in {counted(seen, 'step')}")
    return 0 if status == "completed" else 2


def show_step(run: RunRecord, steps: list[StoredStep], step: StoredStep) -> str:
    """One step, nothing cut: cost, score, timing, events, the whole error, metrics and state."""
    spent = sum((s.cost for s in steps[: step.n + 1]), Decimal(0))
    lines = [f"Run: {clean(run.id)}  Step: {step.n} of {counted(len(steps), 'step')} (0 to {len(steps) - 1})",
             f"Cost: {dollars(step.cost)} (the run had spent {dollars(spent)} after it)",
             f"Score: {'-' if step.score is None else format(step.score, 'g')}",
             f"Started: {iso(step.started_at)}  Took: {step.duration:.3f}s"]
    if step.events:
        lines.append("Events: " + ", ".join(clean(e) for e in step.events))
    if step.error:
        lines += ["Error:", *(f"  {clean(line)}" for line in step.error.split("\n"))]
    metrics = dict(step.metrics)
    where = metrics.pop(TRACEBACK_METRIC, None)
    if where:
        lines += ["Raised at:", *(f"  {clean(line)}" for line in str(where).split("\n"))]
    pruned = metrics.pop(PRUNED_METRIC, None)
    if metrics:
        lines += ["Metrics:", *(f"  {clean(line)}" for line in
                                json.dumps(metrics, indent=2, ensure_ascii=False).split("\n"))]
    if pruned is not None:
        lines.append(f"State: removed by `loomc prune --states` at {iso(pruned)}, which keeps the states of each "
                     "run's last, last good and best steps")
    elif step.state_json is None:
        lines.append("State: none (its commit failed: what fn returned was on the error raised, and is not in the "
                     "store)" if NOT_STORED in step.events else "State: none (the call failed)")
    else:
        shown = json.dumps(json.loads(step.state_json), indent=2, ensure_ascii=False)
        lines += ["State:", *(f"  {clean(line)}" for line in shown.split("\n"))]
    return "\n".join(lines)


@main.command()
@click.argument("run_id")
@click.option("--db", type=click.Path(dir_okay=False), help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, required=True, help="print the whole run as JSON")
def export(run_id: str, db: str | None, as_json: bool) -> None:
    """Print a whole run, with every step's state, as JSON."""
    from loomc.export import export_text
    store = open_db(db)
    try:
        for piece in export_text(store, run_id):
            click.echo(piece, nl=False)
        click.echo()
    except LoomcError as e:
        fail(str(e))


@main.command()
@click.argument("run_id")
@click.option("--db", type=click.Path(dir_okay=False), help=DB_HELP)
@click.option("--budget-usd", type=float,
              help="resume under a new USD cap, the other caps kept (for a budget_exhausted run)")
@click.option("--iterations", type=int, help="resume under a new cap on calls of fn, the other caps kept")
@click.option("--wall-clock", help="resume under a new active-time cap ('30s', '10m', '1h30m'), the other caps kept")
@click.option("--take-over", is_flag=True,
              help="take the run from an owner in another process whose lease has not run out "
                   "(only when you know that process is gone)")
def resume(run_id: str, db: str | None, budget_usd: float | None, iterations: int | None,
           wall_clock: str | None, take_over: bool) -> None:
    """Resume a run, if its function can be imported from the recorded module:qualname."""
    from loomc.loop import refuse_child, refuse_completed, refuse_reached
    store = open_db(db)
    try:  # a bad cap is refused before anything is imported
        budget = Budget(usd=budget_usd, iterations=iterations, wall_clock=wall_clock) \
            if (budget_usd, iterations, wall_clock) != (None, None, None) else None
        run = store.get_run(run_id)
        refuse_completed(run, store)
        refuse_child(store, run)
        if budget is not None:
            refuse_reached(budget, run)
    except LoomcError as e:
        fail(str(e))
    name = fn_name_of_path(run.fn_path)
    given = [repr(run_id)] + ([] if budget is None else [f"budget={budget!r}"]) + \
        (["take_over=True"] if take_over else [])
    snippet = f"{name}.resume({', '.join(given)})"
    runner, why = _import_runner(run.fn_path, run.spec_hash)
    if runner is None:
        click.echo(f"loomc: cannot resume {clean(run_id)} from here: {clean(why)}", err=True)
        click.echo("Resume it from Python, where the loop is defined:", err=True)
        click.echo(f"    {snippet}", err=True)
        sys.exit(1)
    runner.store = store
    _stop_on_sigterm()
    try:
        ended = runner.resume_run(run_id, budget=budget, take_over=take_over)
        if inspect.iscoroutine(ended):  # an async def loop: run it to its end on an event loop of its own
            import asyncio
            ended = asyncio.run(ended)
    except LoomcError as e:
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C: the run is stored as cancelled; say so, and how to go on, as for a SIGTERM
        code = 130
    else:
        code = ended.error.code if isinstance(ended.error, StopRequested) else 0 if ended.status == "completed" else 2
    click.echo(show_table(store.get_run(run_id), store.load_steps(run_id, with_states=False),
                          store.children(run_id), db=store))
    if code:
        sys.exit(code)


def _stop_on_sigterm() -> None:
    """A SIGTERM (a container's shutdown) lets the resumed run's call in flight finish and commit, then
    stops it (loomc.request_stop), unless the loop's own module installed a handler of its own."""
    import signal
    from loomc.context import request_stop
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, request_stop)


def _import_runner(fn_path: str | None, spec_hash: str = "") -> tuple[Any, str]:
    """The loop recorded as ``fn_path``, imported; else None and why. A function that a loop wraps without
    decorating it (``refine = loop(...)(refine_step)``, a bound method, a ``functools.partial`` of it) is recorded
    by the function's path: the loop is the one its module holds that wraps it (the one with the run's
    ``spec_hash``, if several)."""
    import importlib

    from loomc.codec import attribute
    from loomc.loop import LoopRunner, refusing_runs
    if not fn_path:
        return None, ("the run did not record an importable function (a lambda, a callable object, or a function "
                      "defined inside another)")
    target, _, qualname = fn_path.rpartition(":")
    if "<locals>" in qualname:
        return None, f"{qualname.replace('.<locals>.', ' > ')} is defined inside another function"
    if target == "__main__":
        return None, f"{qualname} was defined in a notebook or an interactive session, which cannot be imported"
    try:
        with refusing_runs(target):
            if target.endswith(".py"):  # a loop defined in a script run as __main__
                import importlib.util
                # As Python ran it: with the script's directory first on sys.path, so its own imports resolve.
                if os.path.dirname(target) not in sys.path:
                    sys.path.insert(0, os.path.dirname(target))
                spec = importlib.util.spec_from_file_location("loomc_resume_target", target)
                if spec is None or spec.loader is None:
                    return None, f"cannot load {target}"
                module = importlib.util.module_from_spec(spec)
                sys.modules["loomc_resume_target"] = module
                spec.loader.exec_module(module)
            else:
                # As `python -m` and `python -c` see it: a module in the working directory (the project the
                # run was started in) imports without PYTHONPATH. A console script's own sys.path lacks it.
                if os.getcwd() not in sys.path and "" not in sys.path:
                    sys.path.insert(0, os.getcwd())
                module = importlib.import_module(target)
            try:
                obj = attribute(module, qualname)
            except AttributeError:
                return None, (f"{target} has no {qualname} any more (renamed or removed since the run started?); "
                              "give the loop its old name back, or resume the run from Python with the loop as it "
                              "is now")
    except RunAtImport as e:
        return None, str(e)
    except Exception as e:
        missing = (getattr(e, "name", None) or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else ""
        hint = (f"; run `loomc resume` in the directory {missing} is imported from (the project the run was started "
                "in), or set PYTHONPATH to it") if missing and missing == target.split(".")[0] else ""
        return None, f"importing {fn_path} failed ({type(e).__name__}: {e}){hint}"
    if isinstance(obj, LoopRunner):
        return obj, ""
    wrapping = {name: value for name, value in list(vars(module).items()) if isinstance(value, LoopRunner)
                and obj in (value.fn, getattr(value.fn, "__func__", None), unwrapped(value.fn))}
    if not wrapping:
        return None, (f"{fn_path} is not a @loop function, and no loop at the top level of {target} wraps it (one "
                      "made inside a function cannot be imported)")
    same = [value for value in wrapping.values() if value.spec_hash == spec_hash]
    if len(wrapping) == 1 or len(same) == 1:  # the one loop (its code or policy may have changed since)
        return (same or list(wrapping.values()))[0], ""
    return None, (f"the loops {', '.join(sorted(wrapping))} of {target} all wrap {qualname}, and the run's recorded "
                  "code and policy do not tell which one started it")


PRUNABLE = [status for status in STATUS_COLORS if status != "running"]  # what prune may choose


@main.command()
@click.option("--db", type=click.Path(dir_okay=False), help=DB_HELP)
@click.option("--older-than", required=True, help="choose runs last updated longer ago than this: '30d', '12h', '90m'")
@click.option("--status", "statuses", multiple=True, type=click.Choice(PRUNABLE),
              help="choose runs that ended so, or crashed ones that no process drives (default: completed); "
                   "repeat it for several")
@click.option("--states", is_flag=True,
              help="keep the runs and every step's record; remove only the states no resume or result needs")
@click.option("--yes", is_flag=True, help="delete them and compact the file; without it, only say what would go")
def prune(db: str | None, older_than: str, statuses: tuple[str, ...], states: bool, yes: bool) -> None:
    """Delete old finished (or crashed) runs, with their steps and child runs, and give the disk space back.

    With --states the runs stay, and only the states of steps that no resume or result needs go.
    """
    from loomc.budget import parse_duration
    try:
        before = time.time() - parse_duration(older_than, "--older-than")
    except LoomcError as e:
        fail(str(e))
    store = open_db(db)
    chosen = statuses or ("completed",)
    path = store.path
    size = _file_size(path)
    which = f"the runs {' or '.join(chosen)} and last updated before {iso(before)}"
    try:
        if states:
            _prune_states(store.prune_states(chosen, before, apply=yes), which, yes, size, path)
            return
        found = store.prune(chosen, before, apply=yes)
    except LoomcError as e:
        fail(str(e))
    children = f" ({counted(found['children'], 'child run')} among them)" if found["children"] else ""
    what = (f"{counted(found['runs'], 'run')}{children}, {counted(found['steps'], 'step')} and "
            f"{_size(found['state_bytes'])} of states: {which}, with their child runs")
    nothing = f"Nothing to delete: no run is {' or '.join(chosen)} and last updated before {iso(before)}."
    _tell(found["runs"], nothing, "delete", what, found, yes, size, path)


def _tell(chosen: int, nothing: str, verb: str, what: str, found: dict[str, int], yes: bool, size: int,
          path: Any) -> None:
    """What a prune found (``chosen`` things to ``verb``, described by ``what``) and did, then what compacting did
    (``found["live"]``, from the store: -1 nothing to do, 0 done, else the live runs that kept it from it)."""
    if not chosen:
        click.echo(nothing)
    elif not yes:
        click.echo(f"Would {verb} {what}.\nRun again with --yes to {verb} them; the file is then compacted.")
    else:
        click.echo(f"{verb.capitalize()}d {what}.")
    if not yes:
        return
    live = found["live"]
    if live == 0:
        click.echo(f"The file went from {_size(size)} to {_size(_file_size(path))}.")
    elif live > 0:
        one = live == 1
        click.echo(f"The file was not compacted: {counted(live, 'run')} {'is' if one else 'are'} live, and "
                   f"compacting rewrites the whole file while {'its' if one else 'their'} commits wait. New steps "
                   "reuse the space freed; run this again when no run is live to give it back to the disk.")


def _prune_states(found: dict[str, int], which: str, yes: bool, size: int, path: Any) -> None:
    children = f" ({counted(found['children'], 'child run')} among them)" if found["children"] else ""
    what = (f"{counted(found['states'], 'state')} ({_size(found['state_bytes'])}) from "
            f"{counted(found['runs'], 'run')}{children}: {which}, with their child runs. Each run keeps its "
            "initial state, the states of its last, last good and best steps, and every step's record "
            "(cost, score, error, events)")
    nothing = f"Nothing to remove: {which} hold no state that a resume or their result does not need."
    _tell(found["states"], nothing, "remove", what, found, yes, size, path)


def _file_size(path: Any) -> int:
    """The bytes a SQLite file takes with its write-ahead log."""
    return sum(os.path.getsize(f"{path}{end}") for end in ("", "-wal") if os.path.exists(f"{path}{end}"))


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


@main.command()
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--db", type=click.Path(dir_okay=False), help=DB_HELP)
def backup(dest: str, db: str | None) -> None:
    """Copy the database to the new file DEST, consistently, while loops go on writing to it."""
    store = open_db(db)
    started = time.time()
    try:
        copied = store.backup(dest)
    except LoomcError as e:
        fail(str(e))
    click.echo(f"Copied {counted(copied['runs'], 'run')} and {counted(copied['steps'], 'step')} "
               f"({_size(copied['bytes'])}) to {clean(os.path.abspath(dest))}, as they stood at {iso(started)}. "
               f"Read it with --db {clean(dest)}; resume from it by pointing $LOOMC_DB or checkpoint= at it.")


@main.command()
@click.option("--db", type=click.Path(dir_okay=False),
              help="SQLite file to write to (default: $LOOMC_DB, else ./.loomc/checkpoints.db)")
@click.option("--crash-at", type=click.IntRange(min=0), help="die like a real crash (SIGKILL) during this step")
def demo(db: str | None, crash_at: int | None) -> None:
    """Run the iterative code fixer on a simulated model: no API key needed."""
    from loomc.demo import run_demo
    sys.exit(run_demo(db_path(db), crash_at))


if __name__ == "__main__":
    main()
