"""The run store: one SQLite file per run (``RUN_DIR/run.sqlite``), the single source of truth.

Decision: a plain SQLite schema of our own, not Optuna's RDB storage.
  * Speed. Optuna's SQLite storage writes one row per parameter per trial through SQLAlchemy:
    measured here 0.1-0.25 s per trial (ask + tell) at 10 genes and 5-13 s at 968 genes. Our
    store keeps a genome as one float64 blob and writes one row per event: with a real 968-gene
    space (46 kB of recipe JSON and 200 per-example scores per candidate) it costs 1.0-1.9 ms per
    candidate, the same on an empty store and on one holding 10,000 candidates (415 MB), since
    every hot-path statement is an indexed insert. The whole driver overhead (ask + store + tell)
    is 1.4-2.3 ms for cmaes (separable) and 1.3-2.1 ms for random, under the 5 ms target
    (benchmarks/driver_overhead.py; ranges span idle to busy runs on 2 shared cores).
  * Fit. Optuna's schema has no place for recipes, recipe hashes, per-example scores, workers,
    timings, errors, validation/test splits, a fitness cache, or strategies that are not Optuna
    samplers (CMA-ES on the cmaes library, natural niches, MAP); the Optuna strategy keeps its
    study in memory and checkpoints it here like any other strategy.

Properties:
  * One writer, many readers. The driver holds an exclusive ``flock`` on ``RUN_DIR/.lock`` (a
    second driver gets a one-line error naming the holder's pid; the kernel frees the lock when the
    holder dies). WAL mode lets readers (``status``, ``front``, reports) read a live store from
    other processes, each query seeing a committed snapshot, without ever blocking the writer.
  * Committed before told, on disk one fsync later. Every write is its own committed transaction;
    the driver records a result and only then tells the strategy. A commit is in the WAL file
    before the call returns, so it survives the process being killed (tested with SIGKILL); a
    background thread then fsyncs the WAL (``durability.WalSyncer``), so a result also survives an
    OS crash or power loss a few milliseconds after it is recorded — without the driver waiting
    ~4 ms per fsync as ``synchronous=FULL`` would. WAL keeps commit order, so whatever a crash
    leaves is a consistent prefix of the run (results and checkpoints live in the same file) that
    resume continues from. The files beside the store are replaced atomically and durably
    (``files``).
  * Append-only. Triggers abort any UPDATE of candidates, dispatches or results and any DELETE of a
    result; a candidate's status (pending → running → ok/failed) is derived from which rows exist.
    Only superseded strategy checkpoints are deleted (the newest ``keep_checkpoints`` stay). A
    candidate has one validation result (what its strategy was told) but may have several held-out
    attempts: a failed one (out of memory, a lost worker) stays recorded and does not block a
    retry; at most one succeeds (partial unique indexes, schema 2; a schema-1 store is upgraded by
    its next writer).
  * Exact replay order. Asks and results share one increasing sequence number ``seq``. A checkpoint
    records the last ``seq`` its strategy state includes. Resume = ``latest_checkpoint()`` →
    ``Strategy.load_state_dict`` → ``Strategy.replay(events_since(checkpoint.seq))`` (re-asks are
    verified bit for bit against the stored genomes) → re-queue ``pending_candidates()``. Asks must be
    replayed, not only results: every ask advances the strategy's RNG.
  * Fitness cache: ``lookup_cache(recipe_hash, fitness_hash)`` returns the first successful result
    of an identical recipe under an identical fitness spec (failures are not cached: they may be
    transient); the driver records it for the new ticket with ``cached_from``.
  * Versioned and recognisable: ``PRAGMA application_id`` marks our files, ``PRAGMA user_version``
    the schema; a foreign, corrupt or newer-schema file is a one-line ``StoreError``.
"""

from evomerge.store.errors import StoreError
from evomerge.store.lock import LOCK_NAME, RunLock
from evomerge.store.run_store import (
    DB_NAME,
    CandidateRecord,
    Checkpoint,
    ResultRecord,
    RunStore,
)
from evomerge.store.schema import SCHEMA_VERSION

__all__ = [
    "DB_NAME",
    "LOCK_NAME",
    "SCHEMA_VERSION",
    "CandidateRecord",
    "Checkpoint",
    "ResultRecord",
    "RunLock",
    "RunStore",
    "StoreError",
]
