"""The run store: one SQLite file per run, written by one driver, readable by anyone meanwhile.

Every write is its own committed transaction, so a result is durable before the strategy is told
(the driver calls ``add_result`` then ``Strategy.tell``). Asks and results share one monotonically
increasing sequence number (``seq``), which is the exact order a resumed strategy replays them in.
"""

from __future__ import annotations

import heapq
import io
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.fitness.racing import Estimate
from evomerge.search.types import Evaluation, Proposal
from evomerge.store.durability import WalSyncer
from evomerge.store.errors import StoreError
from evomerge.store.files import fsync_directory
from evomerge.store.lock import RunLock
from evomerge.store.schema import connect

DB_NAME = "run.sqlite"
SPLITS = ("validation", "test")
STATUSES = ("pending", "running", "ok", "failed")


@dataclass(frozen=True)
class CandidateRecord:
    """A stored proposal, its decoded recipe and its current status (derived, never stored)."""

    proposal: Proposal
    seq: int
    recipe: dict[str, Any] | None
    recipe_hash: str | None
    created: float
    status: str
    worker: str | None

    @property
    def ticket(self) -> int:
        return self.proposal.ticket


@dataclass(frozen=True)
class ResultRecord:
    """A stored evaluation with its provenance (split, fitness spec, worker, timings, error).

    ``estimate`` is set for a result racing stopped early (how many of how many examples it rests
    on): its objectives are estimates, so it is never the best, never on a front, never a cache hit.
    """

    evaluation: Evaluation
    seq: int
    split: str
    fitness_hash: str | None
    recipe_hash: str | None
    cached_from: int | None
    worker: str | None
    started: float | None
    finished: float
    timings: dict[str, float]
    error: str | None
    estimate: Estimate | None = None

    @property
    def ticket(self) -> int:
        return self.evaluation.ticket

    @property
    def ok(self) -> bool:
        return not self.evaluation.failed

    @property
    def complete(self) -> bool:
        """Successful and scored on every example (not a racing estimate)."""
        return self.ok and self.estimate is None


@dataclass(frozen=True)
class Checkpoint:
    """A strategy state that includes every event up to and including ``seq``."""

    id: int
    seq: int
    state: dict[str, Any]
    created: float


_CANDIDATE_COLUMNS = """
    c.ticket, c.seq, c.genome, c.parents, c.info, c.recipe, c.recipe_hash, c.created,
    r.status,
    (SELECT d.worker FROM dispatches d WHERE d.ticket = c.ticket ORDER BY d.id DESC LIMIT 1) AS worker
"""
_CANDIDATE_FROM = "candidates c LEFT JOIN results r ON r.ticket = c.ticket AND r.split = 'validation'"
_RESULT_COLUMNS = """
    seq, ticket, split, status, objectives, per_example, fitness_hash, recipe_hash, cached_from,
    worker, started, finished, timings, error
"""
_RESULT_SELECT = _RESULT_COLUMNS + """,
    (SELECT e.examples FROM estimates e WHERE e.seq = results.seq),
    (SELECT e.total FROM estimates e WHERE e.seq = results.seq)
"""


class RunStore:
    """The single source of truth of one run (``RUN_DIR/run.sqlite``).

    Open it with ``create`` (new run), ``open`` (resume: the driver) or ``open_reader`` (``status``,
    ``front``, reports: no lock, read-only, safe while a driver writes). A writer holds the run
    directory's lock until ``close``. Not thread-safe: one store object per thread.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, lock: RunLock | None, keep_checkpoints: int) -> None:
        self.path = path
        self._conn = conn
        self._lock = lock
        self._keep = keep_checkpoints
        self._seq = self._max_seq()
        self._ids: dict[str | None, tuple[str, ...]] = {}
        self._syncer: WalSyncer | None = None if lock is None else WalSyncer(path.with_name(path.name + "-wal"))

    @classmethod
    def create(
        cls, run_dir: str | Path, metadata: Mapping[str, Any] | None = None, *, keep_checkpoints: int = 3
    ) -> RunStore:
        """Start a new run in ``run_dir`` (created if needed) with ``metadata`` (the experiment snapshot)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(run_dir)
        path = run_dir / DB_NAME
        if path.exists():
            lock.release()
            raise StoreError(f"{run_dir}: already holds a run; resume it or choose a new run directory")
        try:
            conn = connect(path, mode="rwc")
            created = json.dumps(time.time())
            conn.execute("INSERT INTO meta VALUES ('metadata', ?), ('created', ?)", (_dumps(metadata or {}), created))
            fsync_directory(run_dir)  # SQLite syncs its file, not the folder entry naming it
        except BaseException:
            lock.release()
            raise
        return cls(path, conn, lock, keep_checkpoints)

    @classmethod
    def open(cls, run_dir: str | Path, *, keep_checkpoints: int = 3) -> RunStore:
        """Reopen an existing run for writing (resume); refused while another driver holds it."""
        run_dir = Path(run_dir)
        path = _existing(run_dir)
        lock = RunLock.acquire(run_dir)
        try:
            conn = connect(path, mode="rw")
        except BaseException:
            lock.release()
            raise
        return cls(path, conn, lock, keep_checkpoints)

    @classmethod
    def open_reader(cls, run_dir: str | Path) -> RunStore:
        """Open a run read-only, without the lock (a live driver keeps writing undisturbed)."""
        path = _existing(Path(run_dir))
        return cls(path, connect(path, mode="ro"), None, 0)

    def close(self) -> None:
        try:
            if self._syncer is not None:
                self._syncer.close()
        finally:
            self._conn.close()
            if self._lock is not None:
                self._lock.release()

    def sync(self) -> None:
        """Wait until every write so far is on disk (results are flushed in the background anyway)."""
        if self._syncer is not None:
            self._syncer.sync()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def readonly(self) -> bool:
        return self._lock is None

    @property
    def last_seq(self) -> int:
        """The sequence number of the last recorded event (0 for an empty run)."""
        return self._seq if not self.readonly else self._max_seq()

    @property
    def metadata(self) -> dict[str, Any]:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'metadata'").fetchone()
        return json.loads(row[0])

    @property
    def summary(self) -> dict[str, Any] | None:
        """The run's closing summary (``save_summary``), or None while the run is not done."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'summary'").fetchone()
        return None if row is None else json.loads(row[0])

    # -- writes (each one a committed transaction) ------------------------------------------

    def add_candidate(
        self, proposal: Proposal, *, recipe: Mapping[str, Any] | str | None = None, recipe_hash: str | None = None
    ) -> int:
        """Record an asked proposal (status pending); returns its sequence number.

        ``recipe`` is the decoded recipe as a mapping or as JSON text already serialized (e.g.
        ``Recipe.model_dump_json()``, several times faster than ``json.dumps`` of its dict).
        """
        self._writable()
        seq = self._seq + 1
        try:
            self._conn.execute(
                "INSERT INTO candidates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    proposal.ticket,
                    seq,
                    None if proposal.genome is None else _f64_bytes(proposal.genome),
                    json.dumps(list(proposal.parents)),
                    _dumps(proposal.info),
                    recipe if recipe is None or isinstance(recipe, str) else _dumps(recipe),
                    recipe_hash,
                    time.time(),
                ),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"add_candidate: ticket {proposal.ticket} is already stored") from None
        self._seq = seq
        return seq

    def mark_running(self, ticket: int, worker: str) -> None:
        """Record that ``worker`` started evaluating ``ticket`` (status running until a result)."""
        self._writable()
        try:
            self._conn.execute(
                "INSERT INTO dispatches (ticket, worker, started) VALUES (?, ?, ?)", (ticket, worker, time.time())
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"mark_running: unknown ticket {ticket}") from None

    def add_result(
        self,
        evaluation: Evaluation,
        *,
        split: str = "validation",
        fitness_hash: str | None = None,
        worker: str | None = None,
        started: float | None = None,
        timings: Mapping[str, float] | None = None,
        error: str | None = None,
        cached_from: int | None = None,
        estimate: Estimate | None = None,
    ) -> int:
        """Record an evaluation durably (before the strategy is told); returns its sequence number.

        Non-finite objectives are recorded as a failure, as the strategy will treat them.
        ``estimate``: racing stopped this evaluation early (recorded with it, in one transaction).
        """
        syncer = self._writable()
        if split not in SPLITS:
            raise ValueError(f"add_result: split must be one of {SPLITS}, got {split!r}")
        evaluation = evaluation.sanitized()
        if evaluation.example_ids is not None:
            self._record_example_ids(fitness_hash, evaluation.example_ids)
        seq = self._seq + 1
        if estimate is not None and not evaluation.failed:
            self._conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = self._conn.execute(
                f"INSERT INTO results ({_RESULT_COLUMNS}) "
                "SELECT ?, ticket, ?, ?, ?, ?, ?, recipe_hash, ?, ?, ?, ?, ?, ? FROM candidates WHERE ticket = ?",
                (
                    seq,
                    split,
                    "failed" if evaluation.failed else "ok",
                    _f64_bytes(evaluation.objectives) if evaluation.objectives.size else None,
                    None if evaluation.per_example is None else _npy_bytes(evaluation.per_example),
                    fitness_hash,
                    cached_from,
                    worker,
                    started,
                    time.time(),
                    None if timings is None else json.dumps(dict(timings)),
                    error,
                    evaluation.ticket,
                ),
            )
            if cursor.rowcount == 1 and self._conn.in_transaction:
                self._conn.execute(
                    "INSERT INTO estimates (seq, examples, total) VALUES (?, ?, ?)", (seq, estimate.examples, estimate.total)
                )
                self._conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            self._rollback()
            raise ValueError(
                f"add_result: ticket {evaluation.ticket} already has a {split} result (results are append-only)"
            ) from None
        except BaseException:
            self._rollback()
            raise
        if cursor.rowcount != 1:
            self._rollback()
            raise ValueError(f"add_result: unknown ticket {evaluation.ticket}")
        self._seq = seq
        syncer.request()
        return seq

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _record_example_ids(self, fitness_hash: str | None, ids: tuple[str, ...]) -> None:
        """Store a fitness's example ids once (in ``meta``); every result of that fitness shares them."""
        known = self.example_ids(fitness_hash)
        if known is None:
            self._conn.execute("INSERT INTO meta VALUES (?, ?)", (_ids_key(fitness_hash), json.dumps(list(ids))))
            self._ids[fitness_hash] = tuple(ids)
        elif known != tuple(ids):
            raise ValueError(f"add_result: the example ids differ from those recorded for fitness {fitness_hash}")

    def example_ids(self, fitness_hash: str | None) -> tuple[str, ...] | None:
        """The ids of the per-example scores of results under ``fitness_hash`` (None if never recorded)."""
        if fitness_hash not in self._ids:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (_ids_key(fitness_hash),)).fetchone()
            if row is None:
                return None
            self._ids[fitness_hash] = tuple(json.loads(row[0]))
        return self._ids[fitness_hash]

    def save_checkpoint(self, state: Mapping[str, Any], seq: int | None = None) -> int:
        """Record a strategy state that includes every event up to ``seq`` (default: the last one).

        Older checkpoints beyond ``keep_checkpoints`` are deleted in the same transaction: they are
        superseded snapshots, and a full-covariance state can weigh megabytes.
        """
        syncer = self._writable()
        seq = self._seq if seq is None else seq
        text = json.dumps(state, allow_nan=False, separators=(",", ":"))
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = self._conn.execute(
                "INSERT INTO checkpoints (seq, state, created) VALUES (?, ?, ?)", (seq, text, time.time())
            )
            self._conn.execute(
                "DELETE FROM checkpoints WHERE id NOT IN (SELECT id FROM checkpoints ORDER BY id DESC LIMIT ?)",
                (self._keep,),
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        syncer.request()
        return int(cursor.lastrowid)

    def save_summary(self, summary: Mapping[str, Any]) -> None:
        """Record the run's closing summary once: from then on the run is done (``summary.json``
        is its copy for people and tools, rebuilt from here if it is lost or damaged)."""
        syncer = self._writable()
        try:
            self._conn.execute("INSERT INTO meta VALUES ('summary', ?)", (_dumps(summary),))
        except sqlite3.IntegrityError:
            raise ValueError(f"save_summary: {self.path} already holds a summary") from None
        syncer.sync()

    # -- reads -------------------------------------------------------------------------------

    def candidate(self, ticket: int) -> CandidateRecord | None:
        row = self._conn.execute(
            f"SELECT {_CANDIDATE_COLUMNS} FROM {_CANDIDATE_FROM} WHERE c.ticket = ?", (ticket,)
        ).fetchone()
        return None if row is None else _candidate(row)

    def candidates(self) -> list[CandidateRecord]:
        """Every candidate in ask order."""
        rows = self._conn.execute(f"SELECT {_CANDIDATE_COLUMNS} FROM {_CANDIDATE_FROM} ORDER BY c.seq")
        return [_candidate(row) for row in rows]

    def pending_candidates(self) -> list[CandidateRecord]:
        """Candidates asked but without a validation result, in ask order: what resume re-queues."""
        rows = self._conn.execute(
            f"SELECT {_CANDIDATE_COLUMNS} FROM {_CANDIDATE_FROM} WHERE r.seq IS NULL ORDER BY c.seq"
        )
        return [_candidate(row) for row in rows]

    def results(self, split: str = "validation") -> list[ResultRecord]:
        """Every result of ``split`` in the order it was recorded."""
        return self.results_since(0, split)

    def results_since(self, seq: int, split: str = "validation") -> list[ResultRecord]:
        """Results of ``split`` recorded after event ``seq``, in order."""
        rows = self._conn.execute(
            f"SELECT {_RESULT_SELECT} FROM results WHERE seq > ? AND split = ? ORDER BY seq", (seq, split)
        )
        return [self._result(row) for row in rows]

    def events_since(self, seq: int) -> list[Proposal | Evaluation]:
        """Asks and validation results after event ``seq``, interleaved in their original order.

        This is what ``Strategy.replay`` takes after ``load_state_dict`` of a checkpoint made at
        ``seq`` (use 0 when there is no checkpoint yet).
        """
        with _snapshot(self._conn):
            asks = self._conn.execute(
                "SELECT seq, ticket, genome, parents, info FROM candidates WHERE seq > ? ORDER BY seq", (seq,)
            ).fetchall()
            tells = self._conn.execute(
                "SELECT seq, ticket, status, objectives, per_example, fitness_hash FROM results "
                "WHERE seq > ? AND split = 'validation' ORDER BY seq",
                (seq,),
            ).fetchall()
        merged = heapq.merge(
            ((row[0], _proposal(row[1], row[2], row[3], row[4])) for row in asks),
            ((row[0], _evaluation(row[1], row[2], row[3], row[4], self._ids_for(row[4], row[5]))) for row in tells),
            key=lambda item: item[0],
        )
        return [event for _, event in merged]

    def latest_checkpoint(self) -> Checkpoint | None:
        row = self._conn.execute("SELECT id, seq, state, created FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else Checkpoint(row[0], row[1], json.loads(row[2]), row[3])

    def best(self, objective: int = 0, split: str = "validation") -> ResultRecord | None:
        """The complete result with the highest value of objective ``objective`` (the lowest ticket on
        ties, whatever order the results arrived in); a racing estimate never is."""
        ranked = [(r.evaluation.objectives[objective], -r.ticket, r) for r in self.results(split) if r.ok and r.complete]
        return max(ranked, key=lambda item: item[:2])[2] if ranked else None

    def count(self, status: str | None = None) -> int:
        """How many candidates there are (with ``status``: pending, running, ok or failed)."""
        if status is None:
            return int(self._conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0])
        return self.counts()[status]

    def counts(self) -> dict[str, int]:
        """Candidates per status, from one consistent snapshot."""
        with _snapshot(self._conn):
            total = self._conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
            done = dict(
                self._conn.execute(
                    "SELECT status, COUNT(*) FROM results WHERE split = 'validation' GROUP BY status"
                ).fetchall()
            )
            running = self._conn.execute(
                "SELECT COUNT(DISTINCT d.ticket) FROM dispatches d WHERE NOT EXISTS "
                "(SELECT 1 FROM results r WHERE r.ticket = d.ticket AND r.split = 'validation')"
            ).fetchone()[0]
        ok, failed = done.get("ok", 0), done.get("failed", 0)
        return {"pending": total - ok - failed - running, "running": running, "ok": ok, "failed": failed}

    def worker_totals(self) -> dict[str, tuple[int, int]]:
        """Per worker that evaluated candidates: (validation results, failures), by first result."""
        rows = self._conn.execute(
            "SELECT worker, COUNT(*), SUM(status = 'failed') FROM results WHERE worker IS NOT NULL "
            "AND split = 'validation' GROUP BY worker ORDER BY MIN(seq)"
        )
        return {worker: (int(n), int(failed)) for worker, n, failed in rows}

    def lookup_cache(self, recipe_hash: str, fitness_hash: str, split: str = "validation") -> ResultRecord | None:
        """The first complete result for this (recipe, fitness spec), if any; failures (they may be
        transient) and racing estimates (they depend on the incumbent of their time) are not cached."""
        row = self._conn.execute(
            f"SELECT {_RESULT_SELECT} FROM results WHERE recipe_hash = ? AND fitness_hash = ? AND split = ? "
            "AND status = 'ok' AND seq NOT IN (SELECT seq FROM estimates) ORDER BY seq LIMIT 1",
            (recipe_hash, fitness_hash, split),
        ).fetchone()
        return None if row is None else self._result(row)

    # -- internals

    def _ids_for(self, per_example: bytes | None, fitness_hash: str | None) -> tuple[str, ...] | None:
        return None if per_example is None else self.example_ids(fitness_hash)

    def _result(self, row: tuple[Any, ...]) -> ResultRecord:
        return _result(row, self._ids_for(row[5], row[6]))

    def _writable(self) -> WalSyncer:
        """The writer's syncer; a read-only store refuses writes."""
        if self._syncer is None:
            raise StoreError(f"{self.path}: opened read-only")
        return self._syncer

    def _max_seq(self) -> int:
        row = self._conn.execute(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM candidates), 0), COALESCE((SELECT MAX(seq) FROM results), 0))"
        ).fetchone()
        return int(row[0])


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: several SELECTs see one consistent state of a store being written."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _existing(run_dir: Path) -> Path:
    path = run_dir / DB_NAME
    if not path.is_file():
        raise StoreError(f"{run_dir}: no run store found (expected {DB_NAME})")
    return path


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"run store: value is not JSON-serializable ({err})") from None


def _f64_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f8").tobytes()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def _f64(blob: bytes | None) -> np.ndarray:
    return np.empty(0) if blob is None else np.frombuffer(blob, dtype="<f8").astype(np.float64)


def _npy(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.lib.format.read_array(io.BytesIO(blob), allow_pickle=False)


def _proposal(ticket: int, genome: bytes | None, parents: str, info: str) -> Proposal:
    return Proposal(ticket, None if genome is None else _f64(genome), tuple(json.loads(parents)), json.loads(info))


def _evaluation(
    ticket: int, status: str, objectives: bytes | None, per_example: bytes | None, ids: tuple[str, ...] | None = None
) -> Evaluation:
    return Evaluation(ticket, _f64(objectives), failed=status == "failed", per_example=_npy(per_example), example_ids=ids)


def _ids_key(fitness_hash: str | None) -> str:
    return f"example_ids:{fitness_hash}"


def _candidate(row: tuple[Any, ...]) -> CandidateRecord:
    ticket, seq, genome, parents, info, recipe, recipe_hash, created, result_status, worker = row
    status = result_status or ("running" if worker is not None else "pending")
    return CandidateRecord(
        _proposal(ticket, genome, parents, info),
        seq,
        None if recipe is None else json.loads(recipe),
        recipe_hash,
        created,
        status,
        worker,
    )


def _result(row: tuple[Any, ...], ids: tuple[str, ...] | None) -> ResultRecord:
    (seq, ticket, split, status, objectives, per_example, fitness_hash, recipe_hash, cached_from,
     worker, started, finished, timings, error, examples, total) = row  # fmt: skip
    return ResultRecord(
        _evaluation(ticket, status, objectives, per_example, ids),
        seq,
        split,
        fitness_hash,
        recipe_hash,
        cached_from,
        worker,
        started,
        finished,
        {} if timings is None else json.loads(timings),
        error,
        None if examples is None else Estimate(examples, total),
    )
