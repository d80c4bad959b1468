"""The SQLite store's schema: its tables, its version, and the migrations from older files.

The version lives in ``PRAGMA user_version``. A file of an older schema is migrated under the
write lock (several processes may open it at once); a newer one is refused, naming the loomc
that reads it.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from loomc.errors import SchemaTooNew, StoreError

#: The schema this loomc writes. 1 is the original loomc 0.2 layout.
SCHEMA_VERSION = 4
#: The oldest loomc that reads this schema, written into the file (``loomc_meta``) so that an older
#: loomc refusing it can say which version it needs. Raise it with every new schema version.
READS_WITH = "0.4.0"

_META_TABLE = "CREATE TABLE loomc_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_META = "INSERT OR REPLACE INTO loomc_meta (key, value) VALUES ('reads_with', ?)"

# Schema 2. A new file is made as schema 2 and then migrated like any old one, so that new and
# migrated files are the same.
_V2 = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    spec_hash TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    fn_path TEXT,
    policy TEXT NOT NULL DEFAULT '',
    state_type TEXT,
    initial_state TEXT NOT NULL DEFAULT 'null',
    total_cost TEXT NOT NULL DEFAULT '0',
    steps INTEGER NOT NULL DEFAULT 0,
    active_seconds REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    reason TEXT,
    notes TEXT NOT NULL DEFAULT '[]',
    parent_run_id TEXT,
    parent_step INTEGER,
    owner TEXT,
    lease_expires REAL
);
CREATE INDEX runs_by_created ON runs(created_at);
CREATE INDEX runs_by_parent ON runs(parent_run_id, parent_step);
CREATE TABLE steps (
    run_id TEXT NOT NULL,
    step_n INTEGER NOT NULL,
    state_blob TEXT,
    cost_usd TEXT NOT NULL DEFAULT '0',
    score REAL,
    timestamp REAL NOT NULL,
    error TEXT,
    duration REAL NOT NULL DEFAULT 0,
    metrics TEXT,
    events TEXT,
    cum_cost TEXT,
    active_seconds REAL,
    PRIMARY KEY (run_id, step_n)
);
CREATE TABLE charges (
    run_id TEXT NOT NULL,
    step_n INTEGER NOT NULL,
    usd TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX charges_by_step ON charges(run_id, step_n);
"""

# loomc 0.2 wrote only the documented columns, with ISO text times and float costs.
_V1 = """
CREATE TABLE runs (id TEXT PRIMARY KEY, spec_hash TEXT, status TEXT, created_at TEXT, updated_at TEXT);
CREATE TABLE steps (run_id TEXT, step_n INTEGER, state_blob TEXT, cost_usd REAL, score REAL,
                    timestamp TEXT, error TEXT, PRIMARY KEY (run_id, step_n));
"""

_EPOCH = "((julianday({0}) - 2440587.5) * 86400.0)"

_MIGRATE_1_TO_2 = f"""
ALTER TABLE runs RENAME TO runs_v1;
ALTER TABLE steps RENAME TO steps_v1;
{_V2}
INSERT INTO runs (id, spec_hash, status, created_at, updated_at, total_cost, steps)
    SELECT r.id, coalesce(r.spec_hash, ''), coalesce(r.status, 'failed'),
           coalesce({_EPOCH.format('r.created_at')}, 0), coalesce({_EPOCH.format('r.updated_at')}, 0),
           (SELECT coalesce(CAST(sum(s.cost_usd) AS TEXT), '0') FROM steps_v1 s WHERE s.run_id = r.id),
           (SELECT count(*) FROM steps_v1 s WHERE s.run_id = r.id)
    FROM runs_v1 r;
INSERT INTO steps (run_id, step_n, state_blob, cost_usd, score, timestamp, error)
    SELECT run_id, step_n, state_blob, CAST(coalesce(cost_usd, 0) AS TEXT), score,
           coalesce({_EPOCH.format('timestamp')}, 0), error
    FROM steps_v1;
DROP TABLE runs_v1;
DROP TABLE steps_v1;
"""

# Schema 4 adds runs.seen_at: when the process that drives the run was last seen alive (its claim, then a
# heartbeat every few seconds), so that a resume counts the time of a call that process died in.
_SEEN_AT = "ALTER TABLE runs ADD COLUMN seen_at REAL"

MIGRATIONS = {1: _MIGRATE_1_TO_2, 2: _META_TABLE, 3: _SEEN_AT}


def refuse_newer(conn: sqlite3.Connection, version: int, path: Any) -> None:
    """:class:`SchemaTooNew`, naming the loomc the file needs, if ``version`` is newer than ours."""
    if version <= SCHEMA_VERSION:
        return
    try:
        needs = conn.execute("SELECT value FROM loomc_meta WHERE key = 'reads_with'").fetchone()
    except sqlite3.OperationalError:  # no such table: the file does not say
        needs = None
    wanted = f"'loomc>={needs[0]}'" if needs else "loomc"
    raise SchemaTooNew(
        f"{path} has loomc schema version {version}, newer than this loomc's "
        f"{SCHEMA_VERSION}; upgrade loomc to read it: pip install -U {wanted}")


def upgrade(conn: sqlite3.Connection, path: Any) -> None:
    """Bring the file at ``path`` to this loomc's schema, inside the caller's write transaction."""
    # Read again under the write lock: another process may have migrated the file meanwhile,
    # to our version or, if it runs a newer loomc, past it (never write our version over that).
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    refuse_newer(conn, version, path)
    if version == 0:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "runs" in tables:
            version = 1  # a loomc 0.2 file: it never set user_version
        elif tables:
            raise StoreError(f"{path} is a SQLite database but not a loomc one "
                             f"(tables: {', '.join(sorted(tables))}); pass another path")
        else:
            _run_script(conn, _V2)
            version = 2
    while version < SCHEMA_VERSION:
        _run_script(conn, MIGRATIONS[version])
        version += 1
    conn.execute(_META, (READS_WITH,))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction; run statement by statement instead.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def create_old_database(path: str | os.PathLike[str], version: int) -> sqlite3.Connection:
    """An empty database in an older schema (1: the original loomc 0.2 layout; 2; 3), for migration tests."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript({1: _V1, 2: _V2, 3: f"{_V2};{_META_TABLE}"}[version])
    if version == 3:  # as loomc 0.3.0 made it
        conn.execute(_META, ("0.3.0",))
    if version > 1:  # loomc 0.2 never set user_version
        conn.execute(f"PRAGMA user_version = {version}")
    return conn
