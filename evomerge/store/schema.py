"""The run store's SQLite schema, its version, and opening a connection safely.

Append-only is enforced by the database itself: triggers abort any UPDATE of a candidate, dispatch
or result and any DELETE of a result. Only superseded strategy checkpoints are ever deleted.
A candidate's status is never stored; it is derived (pending → running → ok/failed) from the rows
that exist, so recording progress never rewrites anything.

Versions: 1 → 2 replaces results' ``UNIQUE (ticket, split)`` by partial unique indexes (a failed
held-out result no longer blocks a retry); 2 → 3 adds ``estimates`` (a result that racing stopped
early is an estimate from part of the examples). An older store is upgraded, in one transaction,
when a driver opens it for writing; a reader sees it as if upgraded (the columns of 1 and 2 are the
same; an empty ``estimates`` is made in the connection's temporary schema), so both read it alike.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote

from evomerge.store.errors import StoreError

SCHEMA_VERSION = 3
APPLICATION_ID = 0x45764D67
"""``PRAGMA application_id`` of an evomerge run store ("EvMg"): tells our files from other SQLite files."""

TABLES_DDL = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL                       -- JSON
);
CREATE TABLE candidates (
    ticket      INTEGER PRIMARY KEY,
    seq         INTEGER NOT NULL UNIQUE,      -- position in the run's event order (asks and results)
    genome      BLOB,                         -- little-endian float64; NULL for parent-derived proposals
    parents     TEXT NOT NULL,                -- JSON list of tickets
    info        TEXT NOT NULL,                -- JSON, strategy-specific
    recipe      TEXT,                         -- JSON of the decoded recipe
    recipe_hash TEXT,
    created     REAL NOT NULL
);
CREATE TABLE dispatches (
    id      INTEGER PRIMARY KEY,
    ticket  INTEGER NOT NULL REFERENCES candidates(ticket),
    worker  TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE INDEX dispatches_ticket ON dispatches(ticket);
CREATE TABLE checkpoints (
    id      INTEGER PRIMARY KEY,
    seq     INTEGER NOT NULL,                 -- the last event the strategy state includes
    state   TEXT NOT NULL,                    -- JSON from Strategy.state_dict()
    created REAL NOT NULL
);
CREATE TRIGGER candidates_append_only BEFORE UPDATE ON candidates
    BEGIN SELECT RAISE(ABORT, 'candidates are append-only'); END;
CREATE TRIGGER dispatches_append_only BEFORE UPDATE ON dispatches
    BEGIN SELECT RAISE(ABORT, 'dispatches are append-only'); END;
"""

RESULTS_DDL = """
CREATE TABLE results (
    seq          INTEGER PRIMARY KEY,
    ticket       INTEGER NOT NULL REFERENCES candidates(ticket),
    split        TEXT NOT NULL CHECK (split IN ('validation', 'test')),
    status       TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    objectives   BLOB,                        -- little-endian float64, maximize convention
    per_example  BLOB,                        -- .npy bytes (any dtype and shape)
    fitness_hash TEXT,
    recipe_hash  TEXT,                        -- copied from the candidate: one index serves the cache
    cached_from  INTEGER,                     -- ticket whose result was reused, if any
    worker       TEXT,
    started      REAL,
    finished     REAL NOT NULL,
    timings      TEXT,                        -- JSON {phase: seconds}
    error        TEXT
);
-- one validation result per candidate (what the strategy was told); held-out attempts may fail and
-- be retried, so a candidate has at most one successful result per held-out split
CREATE UNIQUE INDEX results_validation ON results(ticket) WHERE split = 'validation';
CREATE UNIQUE INDEX results_heldout_ok ON results(ticket, split) WHERE split != 'validation' AND status = 'ok';
CREATE INDEX results_cache ON results(recipe_hash, fitness_hash, split) WHERE status = 'ok';
CREATE TRIGGER results_append_only BEFORE UPDATE ON results
    BEGIN SELECT RAISE(ABORT, 'results are append-only'); END;
CREATE TRIGGER results_never_deleted BEFORE DELETE ON results
    BEGIN SELECT RAISE(ABORT, 'results are append-only'); END;
"""
ESTIMATES_TABLE = """
CREATE TABLE estimates (
    seq      INTEGER PRIMARY KEY REFERENCES results(seq),   -- a result racing stopped early
    examples INTEGER NOT NULL,                               -- examples it was scored on ...
    total    INTEGER NOT NULL                                -- ... of this many
);
"""
ESTIMATES_TRIGGERS = """
CREATE TRIGGER estimates_append_only BEFORE UPDATE ON estimates
    BEGIN SELECT RAISE(ABORT, 'estimates are append-only'); END;
CREATE TRIGGER estimates_never_deleted BEFORE DELETE ON estimates
    BEGIN SELECT RAISE(ABORT, 'estimates are append-only'); END;
"""
DDL = TABLES_DDL + RESULTS_DDL + ESTIMATES_TABLE + ESTIMATES_TRIGGERS

RESULTS_REBUILD = f"""
DROP TRIGGER results_append_only; DROP TRIGGER results_never_deleted; DROP INDEX results_cache;
ALTER TABLE results RENAME TO results_1;
{RESULTS_DDL}
INSERT INTO results SELECT * FROM results_1;
DROP TABLE results_1;
"""

UPGRADES = {1: ("", RESULTS_REBUILD), 2: (ESTIMATES_TABLE, ESTIMATES_TRIGGERS)}
"""What takes a store from schema version ``key`` to ``key + 1``: its new tables, then the rest
(a reader, which may not write, makes only the new tables, as temporary ones)."""


def connect(path: Path, *, mode: str) -> sqlite3.Connection:
    """Open ``path`` (``mode``: 'rwc' create, 'rw' write, 'ro' read) and check it is our store.

    A non-SQLite or corrupt file, a foreign SQLite file and a store written by a newer schema are
    one-line ``StoreError``s; a schema-1 store is upgraded when opened for writing. Writers get WAL
    (set once at creation, persistent), NORMAL sync (the store's ``WalSyncer`` flushes the WAL after
    the commits that must survive) and foreign keys; readers are query-only and never block the
    writer (WAL snapshots).
    """
    uri = f"file:{quote(str(path))}?mode={mode}"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10.0)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: cannot open the run store ({err})") from None
    try:
        if mode == "rwc":
            _initialize(conn)
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as err:
        conn.close()
        raise StoreError(f"{path}: not an evomerge run store ({err})") from None
    if app_id != APPLICATION_ID:
        conn.close()
        raise StoreError(f"{path}: not an evomerge run store (a different SQLite file)")
    if version > SCHEMA_VERSION:
        conn.close()
        raise StoreError(
            f"{path}: written by a newer evomerge (store schema {version}, this version reads up to "
            f"{SCHEMA_VERSION}); upgrade evomerge to open it"
        )
    if version < SCHEMA_VERSION:
        if not all(v in UPGRADES for v in range(version, SCHEMA_VERSION)):
            conn.close()
            raise StoreError(f"{path}: store schema {version} is not supported (expected {SCHEMA_VERSION})")
        _upgrade(conn, version, temporary=mode == "ro")
    if mode == "ro":
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _initialize(conn: sqlite3.Connection) -> None:
    """Create the schema atomically (WAL must be switched on outside a transaction)."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(
        f"BEGIN IMMEDIATE;\n{DDL}\nPRAGMA application_id = {APPLICATION_ID};\n"
        f"PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
    )


def _upgrade(conn: sqlite3.Connection, version: int, *, temporary: bool) -> None:
    """Bring a store from ``version`` to ``SCHEMA_VERSION`` in one transaction, every row kept; a
    reader (which may not write) gets the new tables as temporary ones in its own connection."""
    steps = [UPGRADES[v] for v in range(version, SCHEMA_VERSION)]
    if temporary:
        conn.executescript("".join(tables.replace("CREATE TABLE ", "CREATE TEMP TABLE ") for tables, _ in steps))
        return
    ddl = "".join(tables + rest for tables, rest in steps)
    try:
        conn.executescript(f"BEGIN IMMEDIATE;\n{ddl}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        raise
