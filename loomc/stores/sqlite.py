"""The default store: one SQLite file, by default ``.loomc/checkpoints.db`` under the working directory.

- WAL journal; ``durability="full"`` (the default) adds ``synchronous=FULL``, so a
  committed step survives a power loss. ``durability="normal"`` uses
  ``synchronous=NORMAL``: it survives any crash of the process, and may lose
  the last steps if the machine itself goes down; it is faster.
- Every write is one ``BEGIN IMMEDIATE`` transaction with a generous
  ``busy_timeout``, so several processes can share one file.
- One connection per thread (and per process after a fork), never one per step.
- The schema (its version in ``PRAGMA user_version``) is in ``loomc.stores.schema``: older files are migrated
  under a write lock, newer ones refused with the loomc version they need.
- Every write checks, under the write lock, that the path still names the file its connection has open:
  a file deleted while in use is written back from the open connection (``_relocate``).
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import threading
import time
import weakref
from decimal import Decimal
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loomc.errors import (PRUNED_METRIC, ConfigError, CorruptStore, RunLocked, RunNotFound, StepConflict,
                          StoreBusy, StoreError, counted, iso, warn_at_caller)
from loomc.history import History, Step, _new_tuple
from loomc.policy import steps_to_keep
from loomc.stores.base import (_DRIVING, RunRecord, StoredStep, Totals, lease_lost, locked_message, may_take,
                               no_such_step, unheld)
from loomc.stores.schema import SCHEMA_VERSION, refuse_newer, upgrade

BUSY_TIMEOUT_MS = 60_000
#: The longest the lease keeper waits before it looks at the leases again (see _keep_leases).
KEEPER_LOOKS_SECONDS = 5.0
#: How often the lease keeper writes that this process is alive into the runs it drives (``seen_at``).
HEARTBEAT_SECONDS = 5.0
#: Where Linux lists the mounted filesystems, with their types.
MOUNTS = "/proc/self/mounts"
#: Filesystem types that reach the file over a network: SQLite's WAL index is shared memory, which
#: processes on different hosts cannot share, and their locks are not to be trusted.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs", "fuse.glusterfs", "fuse.cephfs",
})


#: Filesystem types of a container's own root (its image under a writable layer). A new container starts
#: with a fresh one, and Kubernetes restarts a container that died as a new container.
CONTAINER_FILESYSTEMS = frozenset({"overlay", "aufs", "fuse.fuse-overlayfs"})


class ContainerFilesystemWarning(UserWarning):
    """The checkpoint database was created on a container's own filesystem (overlay), which a new
    container, as Kubernetes makes to restart one that died, does not have."""


class NetworkFilesystemWarning(UserWarning):
    """The checkpoint database is on a network filesystem (NFS, SMB, EFS...), where SQLite's WAL mode
    is not safe for processes on more than one host."""


class CheckpointMovedWarning(UserWarning):
    """The checkpoint database was deleted while this process was writing to it, and loomc wrote it back
    from its open connection: the runs in it go on, and nothing committed is lost."""


class _FileMoved(StoreError):
    """Raised by a write that found, under the file's write lock, that the store's path no longer names
    the file its thread's connection has open. The store answers it (``_relocate``) and writes again."""


def filesystem_type(path: str | os.PathLike[str]) -> str | None:
    """The type of the filesystem that holds ``path`` (``ext4``, ``nfs4``...), from :data:`MOUNTS`; ``None``
    where that cannot be read (not Linux)."""
    try:
        with open(MOUNTS, encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    target, found, depth = os.path.realpath(path), None, -1
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # the file escapes spaces
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > depth:  # the deepest mount point holding the path wins
            found, depth = fields[2], len(point)
    return found

# Schema 3 adds loomc_meta, where a file names the oldest loomc that reads it.
# A run's totals are those of its latest step (committed with it, in the same row), else the
# run row's own (a run with no steps, or one migrated from loomc 0.2).
_LATEST = "(SELECT max(step_n) FROM steps WHERE run_id = r.id)"
_RUN_COLUMNS = ("r.id, r.status, r.spec_hash, r.fn_path, r.policy, r.state_type, r.created_at, r.updated_at, "
                "coalesce(s.cum_cost, r.total_cost), coalesce(s.step_n + 1, r.steps), "
                "coalesce(s.active_seconds, r.active_seconds), r.attempts, r.reason, r.notes, r.parent_run_id, "
                "r.parent_step, r.owner, r.lease_expires, r.seen_at")
# A finished run's row already holds its totals (finishing copies them): only live or killed
# runs (status 'running') look up their latest step.
_RUNS_FROM = f"FROM runs r LEFT JOIN steps s ON r.status = 'running' AND s.run_id = r.id AND s.step_n = {_LATEST}"

# A step row carries the run's totals, so one INSERT commits "the step and the run's totals".
# Values that may be missing are bound as '' and turned into NULL here: binding None costs
# CPython's sqlite3 module a raised-and-cleared AttributeError per value (3.11), on every step.
_STEP_COLUMNS = ("run_id, step_n, state_blob, cost_usd, score, timestamp, cum_cost, active_seconds, duration, "
                 "error, metrics, events")
_STEP_VALUES = "?, ?, nullif(?, ''), ?, nullif(?, ''), ?, ?, ?, ?, nullif(?, ''), nullif(?, ''), nullif(?, '')"
_INSERT_STEP = f"INSERT INTO steps ({_STEP_COLUMNS}) VALUES ({_STEP_VALUES})"
# The usual step (no error, metrics or events) leaves those columns to their default, NULL:
# three values fewer to bind on every step.
_INSERT_PLAIN_STEP = ("INSERT INTO steps (run_id, step_n, state_blob, cost_usd, score, timestamp, cum_cost, "
                      "active_seconds, duration) VALUES (?, ?, nullif(?, ''), ?, nullif(?, ''), ?, ?, ?, ?)")
# The same, fenced: it goes in only while ``owner`` (or anybody, for owner '') holds the run.
_INSERT_STEP_FENCED = (f"INSERT INTO steps ({_STEP_COLUMNS}) SELECT {_STEP_VALUES} "
                       "WHERE EXISTS (SELECT 1 FROM runs WHERE id = ? AND (? = '' OR owner = ?))")


# Finishing copies the latest step's totals into the run row and releases the lease.
_FINISH = ("UPDATE runs SET status = :status, reason = :reason, updated_at = :now, owner = NULL, lease_expires = NULL, "
           "total_cost = coalesce((SELECT cum_cost FROM steps WHERE run_id = :run ORDER BY step_n DESC LIMIT 1), "
           "total_cost), steps = max(steps, (SELECT count(*) FROM steps WHERE run_id = :run)), "
           "active_seconds = coalesce((SELECT active_seconds FROM steps WHERE run_id = :run "
           "ORDER BY step_n DESC LIMIT 1), active_seconds) "
           "WHERE id = :run AND (:owner IS NULL OR owner = :owner)")


def _close_quietly(conns: list[sqlite3.Connection]) -> None:
    """Close the connections, quietly: one already closed, or anything at interpreter shutdown."""
    for conn in conns:
        try:
            conn.close()
        except Exception:  # anything, at interpreter shutdown
            pass


class _ClosedWithThread:
    """Held in a thread's local storage next to its connection: when the thread ends (or the store's
    locals go), this closes the connection, rather than leave it to the collector (an unclosed-database
    ResourceWarning on Python 3.13). Never in a forked child, where the connection is the parent's:
    closing it there could checkpoint and remove the parent's WAL."""

    __slots__ = ("conn", "pid")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.pid = conn, os.getpid()

    # What it calls is bound here, at definition: at interpreter shutdown the module's globals may be gone.
    def __del__(self, _getpid: Any = os.getpid, _close: Any = _close_quietly) -> None:
        if _getpid() == self.pid:
            _close([self.conn])


class SQLiteStore:
    """A CheckpointStore in one SQLite file, shared safely by threads and processes.

    >>> store = SQLiteStore(".loomc/checkpoints.db", durability="full")   # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] = ".loomc/checkpoints.db", *,
                 durability: str = "full", create: bool = True) -> None:
        if durability not in ("full", "normal"):
            raise ConfigError(f"durability={durability!r}: use 'full' (survives power loss) "
                              "or 'normal' (survives a process crash, faster)")
        self.path = Path(path).expanduser().resolve()
        self._fspath = str(self.path)  # for the check on every write: os.stat takes a str fastest
        self.durability = durability
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory; give the path of a database file in it, "
                             f"such as {self.path / 'checkpoints.db'}")
        self._created = not self.path.exists()  # by this object: a run looked up in it is elsewhere
        if self._created:
            if not create:
                raise StoreError(f"no loomc database at {self.path}; run a loop first, or give the path of "
                                 "an existing one (--db, $LOOMC_DB)")
            self._make_own_folder()
        kind = filesystem_type(self.path.parent)
        if kind in NETWORK_FILESYSTEMS:
            warn_at_caller(f"{self.path} is on a network filesystem ({kind}). SQLite's WAL mode, which loomc "
                           "uses, keeps its index in shared memory that processes on different hosts cannot "
                           "share: loops on more than one host writing this file can corrupt it, and a commit "
                           "is only as durable as the server makes it. Keep the checkpoint on a local disk "
                           "(checkpoint=, --db, $LOOMC_DB), one file per host", NetworkFilesystemWarning)
        elif self._created and kind in CONTAINER_FILESYSTEMS:
            warn_at_caller(f"{self.path} is on the container's own filesystem ({kind}), which a new container does "
                           "not have: Kubernetes restarts a container that died as a new one, so after a crash "
                           "this file, with every checkpoint in it, is gone, and a resume finds nothing to go on "
                           "from. Keep the checkpoint on a volume (checkpoint=, --db, $LOOMC_DB)",
                           ContainerFilesystemWarning)
        self._forget_connections()
        self._charged: set[tuple[str, int]] = set()  # (run, step) with write-ahead charges to clear
        _OPEN.add(self)
        self._conn()  # open, check and migrate the schema now: errors surface at construction

    def _forget_connections(self) -> None:
        """Start with no connection, lock, thread or lease: at construction, and in a forked child."""
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._writer: Any = None
        # run id -> (owner, time, lease length): until that time this process's lease on the run has more
        # than half its life left, and steps go in unfenced (see commit_step). The time is the wall clock's,
        # which the lease is written in: the monotonic clock leaves out the time a machine sleeps.
        self._leases: dict[str, tuple[str, float, float]] = {}
        # run id -> owner: a live drive of this process whose renewal another process's take-over refused. Its
        # charges still go in (the money is spent), then raise LeaseLost: the drive stops making paid calls.
        self._lost: dict[str, str] = {}
        self._keeper: threading.Thread | None = None  # renews the leases of live runs (_keep_leases)
        self._beat_due = 0.0  # when the keeper next writes seen_at into the runs this process drives (_beat)
        self._wake = threading.Event()
        # A connection no thread uses, to the file the path named when it was opened (_spare_file, as device and
        # inode): a deleted file is written back from it, whichever thread finds it gone (see _relocate).
        self._spare: sqlite3.Connection | None = None
        self._spare_file: tuple[int, int] | None = None
        self._moving = threading.Lock()  # one relocation at a time, and one spare
        # (device, inode) of a file replaced while open -> the copy of it saved beside the new one (_relocate)
        self._rescued: dict[tuple[int, int], Path] = {}

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, durability={self.durability!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its file and durability: another process (a worker a loop is sent to) opens its own."""
        return _reopened, (str(self.path), self.durability)

    # --- connections and schema ---------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        try:
            return self._local.conn  # type: ignore[no-any-return]
        except AttributeError:
            pass  # this thread's first use (or the first in a forked child): connect
        return self._connect()

    def _cursor(self) -> sqlite3.Cursor:
        """This thread's cursor for step commits: one per connection, not one per statement."""
        try:
            return self._local.cursor  # type: ignore[no-any-return]
        except AttributeError:
            self._conn()
            return self._local.cursor  # type: ignore[no-any-return]

    def _connect(self) -> sqlite3.Connection:
        if self._spare is not None and _file_id(self._fspath) != self._spare_file:
            self._relocate()  # the file was deleted (or replaced) since: never open an empty one in its place
        conn = self._open()
        self._local.conn, self._local.cursor, self._local.closer = conn, conn.cursor(), _ClosedWithThread(conn)
        self._local.file = _file_id(self._fspath)  # the file this connection writes: see _in_place
        with self._guard:
            self._all.append(conn)
        if self._spare is None:
            with self._moving:
                if self._spare is None:
                    self._keep_spare()
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            # Each thread uses only its own connection (self._local); check_same_thread=False lets a store that is
            # closed or dropped close them all, whichever thread does it (SQLite itself is serialized here).
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = _wal_mode(conn)
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode ({mode}); use a local disk")
            conn.execute(f"PRAGMA synchronous = {self.durability.upper()}")
            self._migrate(conn)
        except sqlite3.DatabaseError as e:
            raise _store_error(str(self.path), e) from None
        return conn

    def _keep_spare(self) -> None:
        """Open the spare connection on the file the path names, in place of the one before (under _moving)."""
        spare = self._open()
        with self._guard:
            before, self._spare, self._spare_file = self._spare, spare, _file_id(self._fspath)
            self._all.append(spare)
            if before is not None and before in self._all:
                self._all.remove(before)
        if before is not None:
            _close_quietly([before])

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        refuse_newer(conn, version, self.path)
        _transaction(conn, upgrade, self.path)

    @property
    def writer(self) -> Any:
        """The one thread that performs this store's work for async loops (created on first use).

        Async drivers send every store call here, so hundreds of loops in one event loop share
        one connection for writes and never block the event loop on a commit.
        """
        with self._guard:
            if self._writer is None:
                from concurrent.futures import ThreadPoolExecutor
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loomc-writer")
            return self._writer

    def _close_thread_connection(self) -> None:
        """Close this thread's connection, if it has one (a thread of the store's own, as it ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        with self._guard:
            if conn in self._all:
                self._all.remove(conn)
        del self._local.conn, self._local.cursor, self._local.closer
        conn.close()

    def __del__(self, _close: Any = _close_quietly) -> None:  # bound at definition, as in _ClosedWithThread
        """A store dropped without close() closes its connections, every thread's, rather than leave them
        to the collector (unclosed-database ResourceWarnings on Python 3.13). A forked child lists only
        its own connections."""
        try:
            conns, wake = self._all, self._wake
        except AttributeError:  # __init__ failed before they existed
            return
        wake.set()  # a keeper thread, if any, ends now
        _close(conns)

    def close(self) -> None:
        with self._guard:
            self._keeper = None
            self._wake.set()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            conns, self._all = self._all, []
            self._spare = self._spare_file = None
        _close_quietly(conns)
        self._local = threading.local()

    # --- writes -------------------------------------------------------------

    def _write(self, fn: Any, *args: Any) -> Any:
        try:
            return _transaction(self._conn(), self._placed, fn, *args)
        except _FileMoved:
            self._follow()
            return _transaction(self._conn(), self._placed, fn, *args)

    def _placed(self, conn: sqlite3.Connection, fn: Any, *args: Any) -> Any:
        self._in_place()
        return fn(conn, *args)

    def _in_place(self) -> None:
        """Under a write's lock: refuse to write into a file that the store's path no longer names.

        A file deleted while in use (``rm -r .loomc``, ``git clean -x``, a cleaner of old files) goes on
        taking commits through the connections that have it open, and is gone with the last of them:
        a run would go on paying for steps that no resume could find. Checked on every write, it is
        one ``stat`` of the path.
        """
        if _file_id(self._fspath) != self._local.file:
            raise _FileMoved(f"{self.path} was deleted or replaced while this process was writing to it")

    def _follow(self) -> None:
        """This thread's write found that the path no longer names its file: move the store on (unless another
        thread has), then this thread's connection. StoreError if the file was replaced by another."""
        old = self._local.file
        self._relocate()
        self._close_thread_connection()
        saved = self._rescued.get(old) if old is not None else None
        if saved is not None:
            raise StoreError(
                f"{self.path} was replaced by another file while this process was writing runs to it (a database "
                f"made anew at that path after it was deleted, or a file moved over it); that file is left as it "
                f"is, and the one this process was writing, with every step it committed, is saved as {saved}: "
                f"go on from there (checkpoint={str(saved)!r}, or loomc --db {saved} resume RUN_ID once this "
                "process has ended)")

    def _relocate(self) -> None:
        """Move the store on to the file its path names now, if it no longer names the spare's, and no other
        thread has. A file deleted while runs of this process were live in it is written back whole from the
        spare connection, which still reads it, and CheckpointMovedWarning says so (one deleted while none was
        is let go: a new file is made); a file that another process wrote back from the same file is followed.
        Any other file at the path (a database made anew there, or one moved over it) is left as it is: the old
        file is saved beside it (``_rescued``), and the threads that wrote to it are told so (``_follow``).
        """
        written = None
        with self._moving:
            spare, old = self._spare, self._spare_file
            if spare is None or old is None or _file_id(self._fspath) == old:
                return
            if not self._leases:  # no run of this process is live in it: deleted (or replaced) on purpose
                self._make_own_folder()
                self._keep_spare()  # the file at the path, or a new one
                return
            # A barrier: a write that found the path in place before it changed ends first, and no write after it
            # finds it so (the check is under this lock): from here on the old file holds all it will ever hold.
            _transaction(spare, _nothing)
            if _file_id(self._fspath) is None:
                with self._guard:
                    live = {run_id: held[0] for run_id, held in self._leases.items()}
                written = self._write_back(spare, [*_lineage(spare), _file_name(old)], live)
            if written is None and _file_name(old) not in _lineage_at(self._fspath):
                saved = self.path.with_name(f"{self.path.stem}.recovered-{time.strftime('%Y%m%dT%H%M%S')}-"
                                            f"{os.getpid()}{self.path.suffix}")
                _copy(spare, saved)
                self._rescued[old] = saved
                with self._guard:  # this process's runs are not in the file at the path: fence every commit
                    self._leases.clear()
            self._keep_spare()
        if written is not None:
            runs, steps = written
            warn_at_caller(f"{self.path} was deleted (or moved away) while this process was writing runs to it; "
                           f"loomc wrote it back from its open connection ({counted(runs, 'run')}, "
                           f"{counted(steps, 'step')}), and the runs go on in it. Delete it again once no loop uses "
                           "it, if you meant to", CheckpointMovedWarning)

    def reread(self) -> None:
        """For a reader that watches the file (``loomc show --follow``): if the path names another file than
        this thread reads (the file was deleted and written back, or replaced), read that one from now on. The
        file it read takes no more commits, and its run would seem to stop there."""
        if getattr(self._local, "conn", None) is not None:
            now = _file_id(self._fspath)
            if now is not None and now != self._local.file:
                self._close_thread_connection()

    def _watch_file(self) -> None:
        """From the lease keeper, every few seconds while runs are live: write a deleted file back at once, so
        that a process killed later in a long step loses nothing. A replaced one is for the writes to tell."""
        if self._spare_file is not None and _file_id(self._fspath) != self._spare_file:
            try:
                self._relocate()
            except StoreError:
                pass  # the next write finds it again, and says so

    def _make_own_folder(self) -> Path:
        """Make the folder of the store's file, if it is not there (StoreError if it cannot be made)."""
        _make_folder(self.path.parent, "the checkpoint database",
                     "pass checkpoint= (or --db, or $LOOMC_DB) a path in a writable directory")
        return self.path.parent

    def _write_back(self, conn: sqlite3.Connection, lineage: list[str],
                    live: dict[str, str]) -> tuple[int, int] | None:
        """Write the file ``conn`` reads back at the store's path, with ``lineage`` (the files it comes from) in
        its ``loomc_meta`` and a note on each run ``live`` in this process (run id -> owner), which ``loomc show``
        prints: its runs and steps, or None if another thread or process put a file there first."""
        folder = self._make_own_folder()
        draft = folder / f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.restoring"
        draft.unlink(missing_ok=True)
        when = iso(time.time())
        notes = {run_id: f"its checkpoint file was deleted (or moved away) at {when} while it ran; its process "
                         f"({owner}) wrote the file back from its open connection, and the run went on in it"
                 for run_id, owner in live.items()}
        try:
            counts = _copy(conn, draft, lineage, notes)
            try:
                os.link(draft, self.path)  # never over a file put there meanwhile
            except FileExistsError:
                return None
            except OSError as e:
                raise StoreError(f"cannot write {self.path} back ({e.strerror or e}): the runs in it are only "
                                 "in this process now; loomc backup writes them elsewhere") from None
        finally:
            draft.unlink(missing_ok=True)
        _sync_folder(folder)
        return counts

    def create_run(self, run: RunRecord) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO runs (id, status, spec_hash, fn_path, policy, state_type, initial_state, "
                    "created_at, updated_at, total_cost, steps, active_seconds, attempts, reason, notes, "
                    "parent_run_id, parent_step, owner, lease_expires, seen_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run.id, run.status, run.spec_hash, run.fn_path, run.policy, run.state_type,
                     run.initial_state, run.created_at, run.updated_at, str(run.total_cost), run.steps,
                     run.active_seconds, run.attempts, run.reason, json.dumps(list(run.notes)),
                     run.parent_run_id, run.parent_step, run.owner, run.lease_expires, run.seen_at))
            except sqlite3.IntegrityError:
                raise StepConflict(f"run {run.id} already exists in {self.path}") from None
        self._write(insert)
        if run.owner is not None and run.lease_expires is not None:
            self._hold(run.id, run.owner, run.lease_expires)

    def claim_run(self, run_id: str, owner: str, lease_seconds: float, *,
                  policy: str | None = None, note: str | None = None, take_over: bool = False) -> RunRecord:
        def claim(conn: sqlite3.Connection) -> RunRecord:
            run, now = self._get(conn, run_id), time.time()
            if not may_take(run, owner, now, take_over):
                raise RunLocked(locked_message(run, now, self))
            notes = run.notes + ((note,) if note else ())
            conn.execute("UPDATE runs SET owner = ?, lease_expires = ?, status = 'running', attempts = attempts + 1, "
                         "updated_at = ?, seen_at = ?, policy = ?, notes = ? WHERE id = ?",
                         (owner, now + lease_seconds, now, now, policy or run.policy, json.dumps(list(notes)), run_id))
            return run.replace(owner=owner, lease_expires=now + lease_seconds, status="running",
                               attempts=run.attempts + 1, policy=policy or run.policy, notes=notes, updated_at=now,
                               seen_at=now)
        claimed: RunRecord = self._write(claim)
        self._hold(run_id, owner, claimed.lease_expires or 0.0)
        return claimed

    def _hold(self, run_id: str, owner: str, expires: float) -> None:
        """Remember that ``owner`` holds ``run_id`` until ``expires`` (wall clock), as just committed.

        The lease is renewed at half its life for as long as the drive that holds it runs, by a
        thread of this store, so a step longer than the lease keeps its run.
        """
        seconds = max(expires - time.time(), 0.01)  # an expired lease is renewed soon, never in a busy loop
        with self._guard:
            self._leases[run_id] = _held(owner, seconds)
            self._lost.pop(run_id, None)
            if self._keeper is None:
                self._beat_due = time.time() + HEARTBEAT_SECONDS  # the claim or commit was a sign of life
                self._keeper = threading.Thread(target=_keep_leases, args=(weakref.ref(self), self._wake),
                                                name="loomc-leases", daemon=True)
                self._keeper.start()
        self._wake.set()

    def _renew_leases(self) -> float:
        """Renew the leases that are due and whose drives still run; the seconds until the next is due."""
        now = time.time()
        for run_id, held in list(self._leases.items()):
            owner, due, seconds = held
            if due > now:
                continue
            kept: bool | None = False
            if owner in _DRIVING:  # a drive that is over (or another process's owner) is not kept
                try:
                    kept = self._write(lambda conn: conn.execute(
                        "UPDATE runs SET lease_expires = ?, seen_at = ? WHERE id = ? AND owner = ?",
                        ((at := time.time()) + seconds, at, run_id, owner)).rowcount == 1)  # timed under the lock
                except (sqlite3.Error, StoreError):  # the file is busy or gone: try again shortly
                    kept = None
            with self._guard:
                if self._leases.get(run_id) != held:
                    continue  # finished, or held anew, meanwhile
                if kept is None:
                    self._leases[run_id] = (owner, now + min(1.0, seconds / 4), seconds)
                elif kept:
                    self._leases[run_id] = _held(owner, seconds)
                else:
                    self._leases.pop(run_id, None)  # finish_run may drop it too, without the guard
                    if owner in _DRIVING:  # refused: another process took the run over
                        self._lost[run_id] = owner
        dues = [held[1] for held in list(self._leases.values())]  # a snapshot: other threads add and drop leases
        return min(dues, default=now + 3600.0) - time.time()

    def _beat(self) -> float:
        """Every HEARTBEAT_SECONDS, write into the runs this process drives that it is alive (``seen_at``), all in
        one transaction: a resume after it dies counts the call it died in as active time up to then (a step of
        ten minutes killed at minute nine used to count nothing against wall_clock). The seconds until the next."""
        now = time.time()
        if now < self._beat_due:
            return self._beat_due - now
        with self._guard:
            driven = [(now, run_id, held[0]) for run_id, held in list(self._leases.items())
                      if held[0] in _DRIVING]
        if driven:
            try:
                self._write(lambda conn: conn.executemany("UPDATE runs SET seen_at = ? WHERE id = ? AND owner = ?",
                                                          driven))
            except (sqlite3.Error, StoreError):  # the file is busy or gone: try again shortly
                return 1.0
        self._beat_due = now + HEARTBEAT_SECONDS
        return HEARTBEAT_SECONDS

    def commit_step(self, run_id: str, step: StoredStep, totals: Totals, owner: str | None,
                    lease_seconds: float) -> None:
        """Insert the step with the run's totals; fenced on ownership once the lease is past half its life.

        A lease is taken over only once it has expired or its owner is dead, so while this
        process's lease has more than half its life left nobody else can hold the run, and a
        plain INSERT is safe. Past that point the INSERT checks ownership and the lease is
        renewed, in the same transaction.
        """
        held = self._leases.get(run_id)
        fenced = held is None or held[0] != owner or time.time() >= held[1]
        try:
            _transaction(self._cursor(), self._insert_step, run_id, step, totals, owner, fenced, lease_seconds)
        except _FileMoved:
            self._follow()
            _transaction(self._cursor(), self._insert_step, run_id, step, totals, owner, fenced, lease_seconds)
        if fenced and owner is not None:
            self._hold(run_id, owner, time.time() + lease_seconds)
        if self._charged:
            self._charged.discard((run_id, step.n))

    def _insert_step(self, cur: sqlite3.Cursor, run_id: str, step: StoredStep, totals: Totals,
                     owner: str | None, fenced: bool, lease_seconds: float) -> None:
        self._in_place()
        score, metrics = step.score, step.metrics
        if score is not None and math.isnan(score):  # SQLite stores NaN as NULL; keep the fact
            score, metrics = None, {**metrics, "loomc.score": "nan"}
        error, events = step.error, step.events
        # The columns every step has; the plain INSERT stops here, the others add error, metrics, events.
        values: tuple[Any, ...] = (
            run_id, step.n, "" if step.state_json is None else step.state_json, str(step.cost),
            "" if score is None else score, step.started_at or time.time(), str(totals.cost),
            totals.active_seconds, step.duration)
        try:
            if not fenced and error is None and not metrics and not events:
                cur.execute(_INSERT_PLAIN_STEP, values)
            else:
                values += (error or "", json.dumps(metrics) if metrics else "",
                           json.dumps(events) if events else "")
                if not fenced:
                    cur.execute(_INSERT_STEP, values)
                elif cur.execute(_INSERT_STEP_FENCED, (*values, run_id, owner or "", owner or "")).rowcount != 1:
                    raise lease_lost(self._get(cur, run_id), owner)  # or RunNotFound if it is gone
        except sqlite3.IntegrityError:
            if owner is not None and (run := self._get(cur, run_id)).owner != owner:
                raise lease_lost(run, owner) from None  # taken over while this process's lease was fresh
            raise StepConflict(f"run {run_id} already has a committed step {step.n}; "
                               "a step number is committed at most once") from None
        if fenced and owner is not None:
            now = time.time()
            cur.execute("UPDATE runs SET lease_expires = ?, updated_at = ? WHERE id = ?",
                        (now + lease_seconds, now, run_id))
        if self._charged and (run_id, step.n) in self._charged:
            cur.execute("DELETE FROM charges WHERE run_id = ? AND step_n = ?", (run_id, step.n))

    def finish_run(self, run_id: str, status: str, reason: str | None, owner: str | None) -> None:
        def finish(conn: sqlite3.Connection) -> None:
            conn.execute(_FINISH, {"status": status, "reason": reason, "now": time.time(), "run": run_id,
                                   "owner": owner})
        self._write(finish)
        if self._leases.pop(run_id, None) is not None:
            self._wake.set()  # the keeper ends if that was the last lease

    def charge(self, run_id: str, step_n: int, usd: Decimal) -> None:
        self._write(lambda conn: conn.execute(
            "INSERT INTO charges (run_id, step_n, usd, at) VALUES (?, ?, ?, ?)",
            (run_id, step_n, str(usd), time.time())))
        self._charged.add((run_id, step_n))
        if self._lost and (lost := self._lost.get(run_id)) is not None:
            raise lease_lost(self.get_run(run_id), lost)

    # --- reads --------------------------------------------------------------

    def _get(self, conn: sqlite3.Connection | sqlite3.Cursor, run_id: str) -> RunRecord:
        row = conn.execute(f"SELECT {_RUN_COLUMNS}, r.initial_state {_RUNS_FROM} WHERE r.id = ?",
                           (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.path}{self._elsewhere(conn, run_id)}")
        return _run_record(row, row[-1])

    @staticmethod
    def _starting(conn: sqlite3.Connection | sqlite3.Cursor, prefix: str) -> str:
        """The ids that begin with ``prefix``, for an id given cut short (``loomc show b00e``): a hint, never a
        match, since a resume with the wrong id would pay for the wrong run."""
        if not prefix:
            return ""
        ids = [row[0] for row in conn.execute("SELECT id FROM runs WHERE substr(id, 1, length(?)) = ? ORDER BY "
                                              "created_at DESC LIMIT 4", (prefix, prefix))]
        if not ids:
            return ""
        more = " (and more)" if len(ids) > 3 else ""
        return f"; the ids that begin so: {', '.join(ids[:3])}{more}; give the whole id"

    def _elsewhere(self, conn: sqlite3.Connection | sqlite3.Cursor, run_id: str) -> str:
        """Where to look instead for a run not found: the ids that begin so, in a database that holds runs; another
        database, for one that holds no run at all."""
        if conn.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is not None:
            return self._starting(conn, run_id)
        said = ", which holds no run at all" + (" (this process created it just now)" if self._created else "")
        if self.path.is_relative_to(Path.cwd()):  # a relative path, perhaps from another working directory
            said += (f". A relative path, the default .loomc/checkpoints.db included, is read from the working "
                     f"directory ({Path.cwd()} here): run from the directory the run started in, or")
        else:
            said += ":"
        return said + " pass checkpoint= (or set $LOOMC_DB to) the path of the database the run was stored in"

    def get_run(self, run_id: str) -> RunRecord:
        return self._get(self._conn(), run_id)

    def _listing(self, columns: str, status: str | None, limit: int | None, loop: str | None,
                 since: float | None) -> sqlite3.Cursor:
        sql = f"SELECT {columns} {_RUNS_FROM}"
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append("r.status = ?")
            args.append(status)
        if loop is not None:  # the loop's name alone (its function's), or its whole "module:qualname"
            where.append("(r.fn_path = ? OR substr(r.fn_path, -length(?) - 1) IN (':' || ?, '.' || ?))")
            args += [loop] * 4
        if since is not None:
            where.append("r.created_at >= ?")
            args.append(since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.created_at DESC, r.id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return self._conn().execute(sql, args)

    def list_runs(self, status: str | None = None, limit: int | None = None, *,
                  loop: str | None = None, since: float | None = None) -> list[RunRecord]:
        """The runs, newest first; ``loop`` keeps those of one loop, named as ``fn_name`` or ``module:qualname``,
        ``since`` those started at that Unix time or later."""
        return [_run_record(row) for row in self._listing(_RUN_COLUMNS, status, limit, loop, since)]

    def run_rows(self, status: str | None = None, limit: int | None = None, *,
                 loop: str | None = None, since: float | None = None) -> list[tuple[Any, ...]]:
        """``(id, status, steps, total_cost, created_at, parent_run_id, owner, reason, lease_expires, fn_path)`` per
        run, newest first: the listing."""
        return self._listing("r.id, r.status, coalesce(s.step_n + 1, r.steps), coalesce(s.cum_cost, r.total_cost), "
                             "r.created_at, r.parent_run_id, r.owner, r.reason, r.lease_expires, r.fn_path", status,
                             limit, loop, since).fetchall()

    def children(self, run_id: str) -> list[RunRecord]:
        rows = self._conn().execute(f"SELECT {_RUN_COLUMNS} {_RUNS_FROM} WHERE r.parent_run_id = ? "
                                    "ORDER BY r.parent_step, r.created_at", (run_id,))
        return [_run_record(row) for row in rows]

    def load_steps(self, run_id: str, *, with_states: bool = True, start: int = 0) -> list[StoredStep]:
        """The run's steps in order, from step ``start`` on (``loomc show --follow`` reads only the new ones)."""
        conn = self._conn()
        self._get(conn, run_id)
        rows = conn.execute(_step_select("state_blob" if with_states else "NULL") + "AND step_n >= ? ORDER BY step_n",
                            (run_id, start))
        return [_stored_step(row) for row in rows]

    def prune(self, statuses: tuple[str, ...], before: float, *, apply: bool) -> dict[str, int]:
        """Runs that ended with one of ``statuses`` and were last updated before ``before`` (Unix time),
        with every child run under them; what they hold, and with ``apply``, delete them and compact
        the file (VACUUM, then a WAL checkpoint: deleted rows alone give no disk space back).

        Only top-level runs are chosen; a child goes with its parent, never alone, so no ledger
        is left counting a run that is gone. A run still ``running`` is never chosen, unless
        ``"crashed"`` is asked for: then those that no process drives (see ``unheld``) are, as
        decided again inside the deleting transaction, so a run resumed meanwhile stays.
        """
        chosen, args = _chosen_runs(statuses, before)
        conn = self._conn()
        chosen_now = args(conn)
        runs, children = conn.execute(chosen + "SELECT count(*), count(parent_run_id) FROM runs "
                                      "WHERE id IN (SELECT id FROM chosen)", chosen_now).fetchone()
        steps, state_bytes = conn.execute(chosen + "SELECT count(*), coalesce(sum(length(state_blob)), 0) "
                                          "FROM steps WHERE run_id IN (SELECT id FROM chosen)", chosen_now).fetchone()
        found = {"runs": runs, "children": children, "steps": steps, "state_bytes": state_bytes}
        if not apply:
            return found

        def delete(conn: sqlite3.Connection) -> None:
            chosen_then = args(conn)  # in the write transaction: no resume can claim a run while it deletes
            for table, column in (("charges", "run_id"), ("steps", "run_id"), ("runs", "id")):  # runs last
                conn.execute(chosen + f"DELETE FROM {table} WHERE {column} IN (SELECT id FROM chosen)", chosen_then)

        if runs:
            self._write(delete)
        found["live"] = self._compact(conn, bool(runs))
        return found

    def prune_states(self, statuses: tuple[str, ...], before: float, *, apply: bool) -> dict[str, int]:
        """The runs ``prune`` would choose, kept, without the states no resume or result needs; with ``apply``,
        remove those states and compact the file.

        Each run keeps its initial state, every step's record (cost, score, error, events, metrics),
        and the states of ``steps_to_keep``: its last, last good and best steps and where its last
        backtrack pointed, which are those a resume goes on from and a stopped run returns. Every
        other state becomes NULL, with ``metrics["loomc.state_pruned_at"]`` saying when; reading it
        raises StatePruned. Each run is thinned in a transaction of its own, and only if it has not
        changed since it was chosen (a run resumed meanwhile keeps its states).
        """
        chosen, args = _chosen_runs(statuses, before)
        conn = self._conn()
        runs = conn.execute(chosen + "SELECT id, updated_at FROM runs WHERE id IN (SELECT id FROM chosen)",
                            args(conn)).fetchall()
        found = {"runs": 0, "children": 0, "states": 0, "state_bytes": 0}
        now = time.time()
        for run_id, updated_at in runs:
            if apply:
                thinned = self._write(_thin, run_id, updated_at, statuses, now)
            else:
                thinned = _thin(conn, run_id, updated_at, statuses, None)
            if thinned is not None and thinned[0]:
                found["runs"] += 1
                found["children"] += thinned[2]
                found["states"] += thinned[0]
                found["state_bytes"] += thinned[1]
        if apply:
            found["live"] = self._compact(conn, bool(found["states"]))
        return found

    def backup(self, dest: str | os.PathLike[str]) -> dict[str, int]:
        """Copy the whole database to the new file ``dest``, as one consistent snapshot, while loops may go on
        writing: SQLite's online backup, which reads through this connection, the write-ahead log included
        (a file copy of the database alone misses the steps the log still holds). What it holds: runs, steps
        and bytes. StoreError if ``dest`` exists already."""
        target = Path(dest).expanduser().resolve()
        if target.exists() or target == self.path:
            raise StoreError(f"{target} exists already: loomc backup writes a new file, and never overwrites one; "
                             "give another path, or move that file aside")
        conn = self._conn()
        _make_folder(target.parent, "the backup", "give a path in a writable directory")
        runs, steps = _copy(conn, target)
        return {"runs": runs, "steps": steps, "bytes": target.stat().st_size}

    def _compact(self, conn: sqlite3.Connection, changed: bool) -> int:
        """Give the space that deleted rows left free back to the disk (VACUUM, then a WAL checkpoint), unless
        runs are live: the number of live runs that kept it from compacting (-1: there was nothing to give
        back, neither ``changed`` rows now nor free pages left by an earlier prune; 0: it compacted).

        VACUUM rewrites the whole file in one write transaction (seconds per GB), and a live run's
        commits would wait for it, or fail past the busy timeout. Left uncompacted, the free pages
        are reused by new steps, and a later prune with no run live compacts the file.
        """
        try:
            if not changed and not conn.execute("PRAGMA freelist_count").fetchone()[0]:
                return -1
            now = time.time()
            live = sum(not unheld(owner, lease, now) for owner, lease in conn.execute(
                "SELECT owner, lease_expires FROM runs WHERE status = 'running'"))
            if live:
                return live
            conn.execute("VACUUM")  # in WAL mode it writes the compacted file through the log...
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # ...which this empties into the file
        except sqlite3.Error as e:
            raise _store_error(conn, e) from e
        return 0

    def load_step(self, run_id: str, n: int) -> StoredStep:
        """Step ``n`` of a run, with its state (the CLI's ``show --step``); StoreError if there is none."""
        conn = self._conn()
        self._get(conn, run_id)
        row = conn.execute(_step_select("state_blob") + "AND step_n = ?", (run_id, n)).fetchone()
        if row is None:
            (count,) = conn.execute("SELECT count(*) FROM steps WHERE run_id = ?", (run_id,)).fetchone()
            raise no_such_step(run_id, n, count)
        return _stored_step(row)

    def pending_by_run(self) -> dict[str, dict[int, Decimal]]:
        """Every run's write-ahead charges for steps that never committed, by run and step (one query: the
        charges of committed steps are gone, so only those of steps in flight, or their processes', are left)."""
        out: dict[str, dict[int, Decimal]] = {}
        for run_id, step_n, usd in self._conn().execute("SELECT run_id, step_n, usd FROM charges"):
            steps = out.setdefault(run_id, {})
            steps[step_n] = steps.get(step_n, Decimal(0)) + Decimal(usd)
        return out

    @contextmanager
    def reading(self) -> Iterator[None]:
        """``with store.reading():`` every read of this thread in the block sees the file as of one moment (one
        read transaction), whatever loops commit meanwhile: a run's record, its steps and their states agree.
        (Read one by one, a live run's record could count fewer steps, and less money, than the steps read next.)
        Writers are not held up; the block should be short, as a WAL checkpoint waits for it."""
        conn = self._conn()
        if conn.in_transaction:  # inside a transaction already: one snapshot as it is
            yield
            return
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as e:
            raise _store_error(str(self.path), e) from e
        try:
            yield
        finally:
            _roll_back(conn)  # it wrote nothing: ending it so is ending it

    def pending_charges(self, run_id: str) -> dict[int, Decimal]:
        out: dict[int, Decimal] = {}
        for step_n, usd in self._conn().execute(
                "SELECT step_n, usd FROM charges WHERE run_id = ? ORDER BY step_n", (run_id,)):
            out[step_n] = out.get(step_n, Decimal(0)) + Decimal(usd)
            self._charged.add((run_id, step_n))  # a commit of that step must clear them
        return out


def _copy(conn: sqlite3.Connection, target: Path, lineage: list[str] | None = None,
          notes: dict[str, str] | None = None) -> tuple[int, int]:
    """Copy the database ``conn`` reads to the new file ``target``, as one consistent snapshot (SQLite's
    online backup, which reads through ``conn``, its write-ahead log included): its runs and steps.
    ``lineage``, if given, is recorded in the copy's ``loomc_meta`` (see ``_lineage``), and ``notes`` (run id ->
    note) added to those runs' notes."""
    try:
        copy = sqlite3.connect(target, isolation_level=None)
        try:
            conn.backup(copy)
            if lineage is not None:
                copy.execute("INSERT OR REPLACE INTO loomc_meta (key, value) VALUES ('written_back_from', ?)",
                             (json.dumps(lineage),))
            for run_id, note in (notes or {}).items():
                row = copy.execute("SELECT notes FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is not None:
                    copy.execute("UPDATE runs SET notes = ? WHERE id = ?",
                                 (json.dumps([*json.loads(row[0] or "[]"), note]), run_id))
            runs, steps = copy.execute("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM steps)"
                                       ).fetchone()
            _wal_mode(copy)  # as loomc opens every file
        finally:
            copy.close()
    except sqlite3.Error as e:
        raise _store_error(str(target), e) from e
    return runs, steps


def _wal_mode(conn: sqlite3.Connection) -> str:
    """Put the file ``conn`` opened in WAL mode; the mode it is in then.

    Processes that make a new file at once each read it and then ask for it whole to make the
    change: SQLite answers all but one "database is locked" at once, without waiting, as waiting
    could never end. Each of those asks again, after a short pause, for as long as the busy
    timeout. (Two processes released together made a new file in 1 try out of 2, and one of them
    stopped with StoreBusy before its first step.)
    """
    deadline, pause = time.monotonic() + BUSY_TIMEOUT_MS / 1000, 0.002
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
        time.sleep(pause * (0.5 + random.random()))  # apart, so that the next tries do not meet again
        pause = min(pause * 2, 0.05)


def _file_id(path: str) -> tuple[int, int] | None:
    """The file ``path`` names, as (device, inode); None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_name(file: tuple[int, int] | None) -> str:
    return "" if file is None else f"{file[0]}:{file[1]}"


def _lineage(conn: sqlite3.Connection) -> list[str]:
    """The files (``device:inode``) that loomc wrote the file ``conn`` reads back from, oldest first, each
    deleted while in use: a process still writing one of them follows its runs into this file."""
    row = conn.execute("SELECT value FROM loomc_meta WHERE key = 'written_back_from'").fetchone()
    return [] if row is None else list(json.loads(row[0]))


def _lineage_at(path: str) -> list[str]:
    """The lineage of the file at ``path`` (see ``_lineage``); none for a file that SQLite or loomc cannot read,
    or none there (it is never created)."""
    try:
        conn = sqlite3.connect(f"{Path(path).as_uri()}?mode=rw", uri=True, isolation_level=None)
        try:
            return _lineage(conn)
        finally:
            conn.close()
    except (sqlite3.Error, ValueError):  # not a loomc database, or not one at all
        return []


def _sync_folder(folder: Path) -> None:
    """Make a new entry of ``folder`` durable (POSIX: fsync the directory); nothing where that cannot be done."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _nothing(conn: sqlite3.Connection) -> None:
    """A write that writes nothing: it waits for the write lock, and lets it go."""


def _make_folder(folder: Path, what: str, advice: str) -> None:
    """Make ``folder`` (and its parents) for ``what``; StoreError with ``advice`` if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create {folder} for {what} ({e.strerror or e}); {advice}") from None


def _chosen_runs(statuses: tuple[str, ...], before: float) -> tuple[str, Any]:
    """What ``prune`` chooses: a ``WITH`` clause naming the ``chosen`` run ids, and ``args(conn)``, its arguments
    as they are now (which runs no process drives is read from the file)."""
    if "running" in statuses:
        raise ConfigError("prune never deletes a running run (it may be live, or resumable after a crash); "
                          "--status crashed chooses those that no process drives")
    ended = tuple(s for s in statuses if s != "crashed")
    marks = ", ".join("?" * len(ended))
    chosen = ("WITH RECURSIVE chosen(id) AS (SELECT id FROM runs WHERE parent_run_id IS NULL AND updated_at < ? "
              f"AND (status IN ({marks}) OR id IN (SELECT value FROM json_each(?))) "
              "UNION SELECT r.id FROM runs r JOIN chosen c ON r.parent_run_id = c.id) ")

    def args(conn: sqlite3.Connection) -> tuple[Any, ...]:
        crashed = []
        if "crashed" in statuses:
            now = time.time()
            crashed = [run_id for run_id, owner, lease in conn.execute(
                "SELECT id, owner, lease_expires FROM runs WHERE parent_run_id IS NULL AND status = 'running' "
                "AND updated_at < ?", (before,)) if unheld(owner, lease, now)]
        return (before, *ended, json.dumps(crashed))
    return chosen, args


def _thin(conn: sqlite3.Connection, run_id: str, updated_at: float, statuses: tuple[str, ...],
          at: float | None) -> tuple[int, int, int] | None:
    """The states of one run that no resume or result needs: how many, their size, and 1 for a child run
    (``None``: the run changed since it was chosen). With ``at``, remove them, marking each step."""
    row = conn.execute("SELECT status, owner, lease_expires, updated_at, parent_run_id FROM runs WHERE id = ?",
                       (run_id,)).fetchone()
    if row is None or row[3] != updated_at:
        return None  # deleted, resumed or finished again since it was chosen: leave it
    if row[0] == "running" and not ("crashed" in statuses and unheld(row[1], row[2], time.time())):
        return None
    steps = [(n, has_state, size, Step(n, score=score, error=error, events=json.loads(events) if events else ()))
             for n, has_state, size, score, error, events in conn.execute(
                 "SELECT step_n, state_blob IS NOT NULL, coalesce(length(state_blob), 0), score, error, events "
                 "FROM steps WHERE run_id = ? ORDER BY step_n", (run_id,))]
    keep = steps_to_keep(History([step for *_, step in steps]))
    going = [(n, size) for n, has_state, size, _ in steps if has_state and n not in keep]
    if at is not None and going:
        conn.execute("UPDATE steps SET state_blob = NULL, metrics = json_set(coalesce(metrics, '{}'), ?, ?) "
                     "WHERE run_id = ? AND step_n IN (SELECT value FROM json_each(?))",
                     (f'$."{PRUNED_METRIC}"', at, run_id, json.dumps([n for n, _ in going])))
    return len(going), sum(size for _, size in going), int(row[4] is not None)


def _transaction(conn: sqlite3.Connection | sqlite3.Cursor, fn: Any, *args: Any) -> Any:
    """``fn(conn, *args)`` inside one ``BEGIN IMMEDIATE`` transaction: committed, or rolled back whole.

    SQLite's own errors (the file locked past the busy timeout, a full disk, a read-only file)
    come out as :class:`StoreError` naming the file and what to do.

    A KeyboardInterrupt can land between any two bytecodes, the one just after ``BEGIN IMMEDIATE``
    returned included, so that statement is inside the block that rolls back: a transaction left
    open would hold the file's write lock (other processes wait on it) and refuse every later write
    on this thread's connection. One left open all the same (a second Ctrl-C during the rollback) is
    rolled back when the next write finds it: nothing in it was committed.
    """
    try:
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                if not _connection_of(conn).in_transaction:
                    raise
                _roll_back(conn)  # left open by an interrupted write: begin again
                conn.execute("BEGIN IMMEDIATE")
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            _roll_back(conn)
            raise
    except sqlite3.Error as e:
        raise _store_error(conn, e) from e  # what was committed before stays committed
    return result


def _connection_of(conn: sqlite3.Connection | sqlite3.Cursor) -> sqlite3.Connection:
    return conn if isinstance(conn, sqlite3.Connection) else conn.connection


def _roll_back(conn: sqlite3.Connection | sqlite3.Cursor) -> None:
    """End a transaction that failed, if SQLite has not ended it already; the connection stays usable."""
    connection = _connection_of(conn)
    try:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # the original error is the one to tell


def _reopened(path: str, durability: str) -> SQLiteStore:
    return SQLiteStore(path, durability=durability)


def _store_error(where: Any, e: sqlite3.Error) -> StoreError:
    """A StoreError for SQLite's ``e`` on the file ``where`` (or a connection to it), saying what to do."""
    if not isinstance(where, str):
        try:
            where = _connection_of(where).execute("PRAGMA database_list").fetchone()[2] or "the checkpoint database"
        except (sqlite3.Error, TypeError):
            where = "the checkpoint database"
    text = str(e)
    if "not a database" in text or "malformed" in text:
        return CorruptStore(f"{where} is corrupt or not a SQLite database ({text}); move it aside to start a new one")
    if "locked" in text or "busy" in text:
        return StoreBusy(f"{where}: {type(e).__name__}: {text}; another connection kept it locked for longer than "
                         f"loomc waits ({BUSY_TIMEOUT_MS / 1000:g}s): a long transaction in another process, or a "
                         "tool holding the file open")
    if "full" in text:
        advice = "the disk, or the database's size limit, is full: free some space"
    elif "readonly" in text or "read-only" in text:
        advice = "this process cannot write the file or its directory"
    else:
        advice = "the file or its disk failed"
    return StoreError(f"{where}: {type(e).__name__}: {text}; {advice}")


def _held(owner: str, seconds: float) -> tuple[str, float, float]:
    """A lease just taken or renewed for ``seconds``: its owner, when half its life is gone (wall clock), its length."""
    return owner, time.time() + seconds / 2, seconds


def _keep_leases(ref: weakref.ref[SQLiteStore], wake: threading.Event) -> None:
    """The body of a store's lease keeper. It holds the store only while renewing, and ends when the
    store is gone or closed or holds no lease (the next lease starts another), closing its connection."""
    me = threading.current_thread()
    try:
        while True:
            store = ref()
            if store is None:
                return
            with store._guard:
                if store._keeper is not me:
                    return
                if not store._leases:
                    store._keeper = None
                    return
            wait = min(store._renew_leases(), store._beat())
            store._watch_file()
            del store
            # A wait is timed on the monotonic clock, which stops while the machine sleeps: look again at
            # least every few seconds, so that a lease is renewed soon after the machine wakes.
            wake.wait(min(max(0.0, wait), KEEPER_LOOKS_SECONDS))
            wake.clear()
    finally:
        store = ref()
        if store is not None:
            with store._guard:
                if store._keeper is me:  # ended by surprise: the next lease starts another keeper
                    store._keeper = None
            store._close_thread_connection()


def _after_fork_in_child() -> None:
    """A forked child drops the parent's connections (never closing them); each store reconnects on use."""
    for store in list(_OPEN):
        store._forget_connections()


_OPEN: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _run_record(row: Any, initial_state: str = "null") -> RunRecord:
    (id_, status, spec_hash, fn_path, policy, state_type, created, updated, total, steps, active,
     attempts, reason, notes, parent, parent_step, owner, lease, seen) = row[:19]
    return RunRecord(id=id_, status=status, spec_hash=spec_hash, fn_path=fn_path, policy=policy,
                     state_type=state_type, initial_state=initial_state, created_at=created, updated_at=updated,
                     total_cost=Decimal(total), steps=steps, active_seconds=active, attempts=attempts,
                     reason=reason, notes=tuple(json.loads(notes or "[]")), parent_run_id=parent,
                     parent_step=parent_step, owner=owner, lease_expires=lease, seen_at=seen)


def _step_select(blob: str) -> str:
    """The query of one run's steps, as :func:`_stored_step` reads them; ``blob`` is the state column (or NULL)."""
    return (f"SELECT step_n, {blob}, cost_usd, score, timestamp, error, duration, metrics, events "
            "FROM steps WHERE run_id = ? ")


def _stored_step(row: Any) -> StoredStep:
    """A StoredStep from a row of :func:`_step_select` (built positionally: ``loomc show`` reads 10,000 of them)."""
    n, blob, cost, score, ts, error, duration, metrics, events = row
    metrics_d = {}
    if metrics:
        metrics_d = json.loads(metrics)
        if metrics_d.pop("loomc.score", None) == "nan":
            score = math.nan
    return _new_tuple(StoredStep, (n, blob, Decimal(cost), score, error, ts, duration, metrics_d,
                                   tuple(json.loads(events)) if events else ()))
