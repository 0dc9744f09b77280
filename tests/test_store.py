"""The run store: contents, append-only rules, cache, lock, live readers, crash safety (the
driver killed between any two of its steps and resumed is in ``test_resume_kills.py``).

Some tests run this file as a child process (``python tests/test_store.py MODE ARGS``): a writer
killed from outside, a process holding the lock.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evomerge.fitness.racing import Estimate
from evomerge.search import Evaluation, Proposal
from evomerge.store import DB_NAME, SCHEMA_VERSION, RunStore, StoreError

REPO = Path(__file__).resolve().parents[1]


def _proposal(ticket: int, genome: list[float] | None = None, **kw) -> Proposal:
    return Proposal(ticket, None if genome is None else np.array(genome, dtype=np.float64), **kw)


def _child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args], env=env, stdout=subprocess.PIPE, text=True
    )


# -- contents ------------------------------------------------------------------------------


def test_candidates_results_and_statuses_round_trip(tmp_path):
    with RunStore.create(tmp_path / "run", {"experiment": {"name": "demo", "seed": 1}}) as store:
        assert store.add_candidate(_proposal(0, [0.1, 1 / 3]), recipe={"method": "ties"}, recipe_hash="r0") == 1
        assert store.add_candidate(_proposal(1, None, parents=(0,), info={"split": 17, "ratio": 0.25})) == 2
        store.add_candidate(_proposal(2, [0.5, 0.5]), recipe='{"method": "linear"}', recipe_hash="r2")
        store.add_candidate(_proposal(3, [0.9, 0.9]))
        store.mark_running(0, "gpu0")
        store.mark_running(2, "gpu1")
        per_example = np.array([[1, 0, 1], [0, 0, 1]], dtype=np.int8)
        assert (
            store.add_result(
                Evaluation(0, np.array([0.75, -1.5]), per_example=per_example),
                fitness_hash="f1",
                worker="gpu0",
                started=123.0,
                timings={"merge": 0.5, "eval": 2.0},
            )
            == 5
        )
        store.add_result(Evaluation(1, np.array([np.nan, 1.0])), fitness_hash="f1")
        store.add_result(Evaluation.failure(3, 2), error="CUDA out of memory", fitness_hash="f1")
        store.add_result(Evaluation(0, np.array([0.5, -2.0])), split="test", fitness_hash="f1")

        candidates = {c.ticket: c for c in store.candidates()}
        assert [c.ticket for c in store.candidates()] == [0, 1, 2, 3]
        assert candidates[0].proposal.genome.tobytes() == np.array([0.1, 1 / 3]).tobytes()
        assert candidates[0].recipe == {"method": "ties"} and candidates[0].recipe_hash == "r0"
        assert candidates[1].proposal.genome is None
        assert candidates[1].proposal.parents == (0,) and candidates[1].proposal.info == {"split": 17, "ratio": 0.25}
        assert candidates[2].recipe == {"method": "linear"}
        assert {t: c.status for t, c in candidates.items()} == {0: "ok", 1: "failed", 2: "running", 3: "failed"}
        assert candidates[2].worker == "gpu1"
        assert store.counts() == {"pending": 0, "running": 1, "ok": 1, "failed": 2}
        assert store.count() == 4 and store.count("failed") == 2

        first = store.results()[0]
        assert first.evaluation.objectives.tolist() == [0.75, -1.5]
        assert first.evaluation.per_example.dtype == np.int8
        assert first.evaluation.per_example.tolist() == per_example.tolist()
        assert (first.worker, first.started, first.recipe_hash) == ("gpu0", 123.0, "r0")
        assert first.timings == {"merge": 0.5, "eval": 2.0}
        nan_result = store.results()[1]
        assert nan_result.evaluation.failed and not nan_result.ok  # non-finite objectives are a failure
        assert store.results()[2].error == "CUDA out of memory"
        assert [r.ticket for r in store.results("test")] == [0]
        assert store.metadata == {"experiment": {"name": "demo", "seed": 1}}
        assert store.last_seq == 8


def test_results_are_append_only(tmp_path):
    with RunStore.create(tmp_path / "run") as store:
        store.add_candidate(_proposal(0, [0.5]))
        store.add_result(Evaluation(0, np.array([1.0])))
        with pytest.raises(ValueError, match="ticket 0 already has a validation result"):
            store.add_result(Evaluation(0, np.array([2.0])))
        with pytest.raises(ValueError, match="ticket 0 is already stored"):
            store.add_candidate(_proposal(0, [0.1]))
        with pytest.raises(ValueError, match="unknown ticket 9"):
            store.add_result(Evaluation(9, np.array([1.0])))
        with pytest.raises(ValueError, match="unknown ticket 9"):
            store.mark_running(9, "w")
    raw = sqlite3.connect(tmp_path / "run" / DB_NAME)
    statements = ("UPDATE results SET status = 'failed'", "DELETE FROM results", "UPDATE candidates SET info = '{}'")
    for statement in statements:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute(statement)
    raw.close()


def test_heldout_results_may_be_retried_until_one_succeeds(tmp_path):
    """A failed held-out (test) result does not block a later attempt; a successful one does, and a
    candidate keeps exactly one validation result."""
    with RunStore.create(tmp_path / "run") as store:
        store.add_candidate(_proposal(0, [0.5]))
        store.add_result(Evaluation(0, np.array([1.0])))
        store.add_result(Evaluation.failure(0, 1), split="test", error="OutOfMemoryError: CUDA out of memory")
        store.add_result(Evaluation.failure(0, 1), split="test", error="worker lost")
        store.add_result(Evaluation(0, np.array([0.5])), split="test")
        with pytest.raises(ValueError, match="ticket 0 already has a test result"):
            store.add_result(Evaluation(0, np.array([0.6])), split="test")
        with pytest.raises(ValueError, match="ticket 0 already has a validation result"):
            store.add_result(Evaluation.failure(0, 1))
        assert [(r.ok, r.error) for r in store.results("test")] == [
            (False, "OutOfMemoryError: CUDA out of memory"), (False, "worker lost"), (True, None)
        ]


def _as_schema_1(run: Path) -> None:
    """Rewrite a store as schema 1 had it: results with UNIQUE (ticket, split), no estimates."""
    raw = sqlite3.connect(run / DB_NAME)
    columns = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'results'").fetchone()[0]
    raw.executescript(
        "DROP TABLE estimates;"
        "DROP TRIGGER results_append_only; DROP TRIGGER results_never_deleted; DROP INDEX results_cache;"
        "DROP INDEX results_validation; DROP INDEX results_heldout_ok; ALTER TABLE results RENAME TO old;"
        + columns.replace("error        TEXT\n)", "error        TEXT,\n    UNIQUE (ticket, split)\n)") + ";"
        "INSERT INTO results SELECT * FROM old; DROP TABLE old; PRAGMA user_version = 1;"
        "CREATE INDEX results_cache ON results(recipe_hash, fitness_hash, split) WHERE status = 'ok';"
        "CREATE TRIGGER results_append_only BEFORE UPDATE ON results BEGIN SELECT RAISE(ABORT, 'append-only'); END;"
        "CREATE TRIGGER results_never_deleted BEFORE DELETE ON results BEGIN SELECT RAISE(ABORT, 'append-only'); END;"
    )
    raw.close()


def test_a_schema_1_store_is_read_as_is_and_upgraded_by_a_writer(tmp_path):
    run = tmp_path / "run"
    with RunStore.create(run) as store:
        for ticket in range(2):
            store.add_candidate(_proposal(ticket, [0.5]))
            store.add_result(Evaluation(ticket, np.array([float(ticket)])), fitness_hash="f")
        store.add_result(Evaluation.failure(1, 1), split="test", error="out of memory")
    _as_schema_1(run)
    version = lambda: sqlite3.connect(run / DB_NAME).execute("PRAGMA user_version").fetchone()[0]  # noqa: E731
    with RunStore.open_reader(run) as reader:
        rows = [(r.seq, r.ticket, r.split, r.ok) for split in ("validation", "test") for r in reader.results(split)]
    assert rows == [(2, 0, "validation", True), (4, 1, "validation", True), (5, 1, "test", False)] and version() == 1
    with RunStore.open(run) as store:
        store.add_result(Evaluation(1, np.array([0.5])), split="test")
        assert [r.ok for r in store.results("test")] == [False, True]
        assert store.lookup_cache(store.candidate(1).recipe_hash, "f") is None  # no recipe hash was given
        with pytest.raises(ValueError, match="ticket 0 already has a validation result"):
            store.add_result(Evaluation(0, np.array([1.0])))
    assert version() == SCHEMA_VERSION
    raw = sqlite3.connect(run / DB_NAME)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM results")
    raw.close()


def test_events_pending_and_checkpoints(tmp_path):
    with RunStore.create(tmp_path / "run", keep_checkpoints=2) as store:
        for ticket in range(3):
            store.add_candidate(_proposal(ticket, [ticket / 10]))
        store.add_result(Evaluation(1, np.array([0.5])))  # seq 4
        store.save_checkpoint({"step": 1})
        store.add_candidate(_proposal(3, [0.3]))  # seq 5
        store.add_result(Evaluation(0, np.array([0.1])))  # seq 6
        store.add_result(Evaluation(3, np.array([0.7])), split="test")  # seq 7: not a strategy event
        store.save_checkpoint({"step": 2}, seq=5)
        store.save_checkpoint({"step": 3})

        events = store.events_since(4)
        assert [(type(e).__name__, e.ticket) for e in events] == [("Proposal", 3), ("Evaluation", 0)]
        assert len(store.events_since(0)) == 6
        assert [r.ticket for r in store.results_since(4)] == [0]
        assert [c.ticket for c in store.pending_candidates()] == [2, 3]
        latest = store.latest_checkpoint()
        assert (latest.seq, latest.state) == (7, {"step": 3})
        kept = store._conn.execute("SELECT state FROM checkpoints ORDER BY id").fetchall()
        assert [json.loads(s) for (s,) in kept] == [{"step": 2}, {"step": 3}]


def test_fitness_cache_and_best(tmp_path):
    with RunStore.create(tmp_path / "run") as store:
        for ticket, recipe_hash in enumerate(["a", "b", "a", "c"]):
            store.add_candidate(_proposal(ticket, [0.0]), recipe_hash=recipe_hash)
        store.add_result(Evaluation.failure(0, 1), fitness_hash="F")
        store.add_result(Evaluation(1, np.array([0.4])), fitness_hash="F")
        store.add_result(Evaluation(2, np.array([0.9])), fitness_hash="F")
        store.add_result(Evaluation(3, np.array([0.9])), fitness_hash="G")
        assert store.lookup_cache("a", "F").ticket == 2  # the failure of ticket 0 is not cached
        assert store.lookup_cache("b", "F").evaluation.objectives.tolist() == [0.4]
        assert store.lookup_cache("a", "G") is None and store.lookup_cache("z", "F") is None
        assert store.lookup_cache("a", "F", split="test") is None
        assert store.best().ticket == 2  # the earliest of the two 0.9
        assert store.best(objective=0, split="test") is None


def test_racing_estimates_are_recorded_and_never_best_nor_cached(tmp_path):
    with RunStore.create(tmp_path / "run") as store:
        for ticket, recipe_hash in enumerate(["a", "a", "b"]):
            store.add_candidate(_proposal(ticket, [0.0]), recipe_hash=recipe_hash)
        store.add_result(Evaluation(0, np.array([0.9])), fitness_hash="F", estimate=Estimate(25, 100))
        store.add_result(Evaluation(2, np.array([0.4])), fitness_hash="F")
        assert store.lookup_cache("a", "F") is None  # an estimate is no measurement of the recipe
        assert store.best().ticket == 2  # 0.9 is only an estimate
        stopped, full = store.results()
        assert (stopped.estimate, stopped.ok, stopped.complete) == (Estimate(25, 100), True, False)
        assert (full.estimate, full.complete) == (None, True)
        assert store.counts()["ok"] == 2
    with RunStore.open_reader(tmp_path / "run") as reader:
        assert [r.estimate for r in reader.results()] == [Estimate(25, 100), None]
    raw = sqlite3.connect(tmp_path / "run" / DB_NAME)
    for statement in ("UPDATE estimates SET examples = 100", "DELETE FROM estimates"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute(statement)
    raw.close()


def _downgrade_to_2(path: Path) -> None:
    """What a schema-2 store (before racing estimates) looks like."""
    raw = sqlite3.connect(path)
    raw.executescript("DROP TABLE estimates; PRAGMA user_version = 2;")
    raw.close()


def test_a_schema_2_store_is_read_with_no_estimates_and_upgraded_by_a_writer(tmp_path):
    run = tmp_path / "run"
    with RunStore.create(run) as store:
        store.add_candidate(_proposal(0, [0.0]))
        store.add_result(Evaluation(0, np.array([0.5])))
    _downgrade_to_2(run / DB_NAME)
    with RunStore.open_reader(run) as reader:  # a reader may not write: the file stays at version 2
        assert [(r.ticket, r.estimate) for r in reader.results()] == [(0, None)]
    raw = sqlite3.connect(run / DB_NAME)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 2
    raw.close()
    with RunStore.open(run) as store:  # a driver resuming it upgrades it, keeping every row
        store.add_candidate(_proposal(1, [0.1]))
        store.add_result(Evaluation(1, np.array([0.7])), estimate=Estimate(5, 50))
        assert [(r.ticket, r.estimate) for r in store.results()] == [(0, None), (1, Estimate(5, 50))]
    raw = sqlite3.connect(run / DB_NAME)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()


# -- opening: lock, errors -----------------------------------------------------------------


def test_second_writer_is_refused_and_readers_are_not(tmp_path):
    run = tmp_path / "run"
    with RunStore.create(run) as store:
        store.add_candidate(_proposal(0, [0.5]))
        with pytest.raises(StoreError, match=f"run is in use by another evomerge process \\(pid {os.getpid()}\\)"):
            RunStore.open(run)
        with RunStore.open_reader(run) as reader:
            assert reader.count() == 1 and reader.readonly
            with pytest.raises(StoreError, match="opened read-only"):
                reader.add_candidate(_proposal(1, [0.5]))
    with RunStore.open(run) as store:  # released on close
        assert store.count() == 1


def test_lock_dies_with_its_process(tmp_path):
    run = tmp_path / "run"
    RunStore.create(run).close()
    holder = _child("hold", str(run))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError) as info:
            RunStore.open(run)
        assert str(info.value) == (
            f"{run}: run is in use by another evomerge process (pid {holder.pid}); stop it or use another run directory"
        )
    finally:
        holder.kill()
        holder.wait()
    with RunStore.open(run) as store:
        assert store.count() == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a database, just text" * 40, "not an evomerge run store (file is not a database)"),
        (None, "not an evomerge run store (a different SQLite file)"),
        (b"", "not an evomerge run store (a different SQLite file)"),
    ],
    ids=["garbage", "foreign-sqlite", "empty"],
)
def test_unusable_files_are_one_line_errors(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is None:
        sqlite3.connect(run / DB_NAME).execute("CREATE TABLE t (x)").connection.close()
    else:
        (run / DB_NAME).write_bytes(content)
    for opener in (RunStore.open, RunStore.open_reader):
        with pytest.raises(StoreError) as info:
            opener(run)
        assert str(info.value) == f"{run / DB_NAME}: {message}"
    with pytest.raises(StoreError, match="no run store found"):
        RunStore.open(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="already holds a run"):
        RunStore.create(run)


def test_store_from_a_newer_schema_is_refused(tmp_path):
    run = tmp_path / "run"
    RunStore.create(run).close()
    raw = sqlite3.connect(run / DB_NAME)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError) as info:
        RunStore.open_reader(run)
    assert str(info.value) == (
        f"{run / DB_NAME}: written by a newer evomerge (store schema {SCHEMA_VERSION + 1}, this version reads up to "
        f"{SCHEMA_VERSION}); upgrade evomerge to open it"
    )


# -- live readers and crashes --------------------------------------------------------------


def test_reader_snapshot_does_not_block_the_writer(tmp_path):
    run = tmp_path / "run"
    with RunStore.create(run) as store, RunStore.open_reader(run) as reader:
        store.add_candidate(_proposal(0, [0.5]))
        reader._conn.execute("BEGIN")
        assert reader._conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 1
        start = time.perf_counter()
        for ticket in range(1, 51):
            store.add_candidate(_proposal(ticket, [0.5]))
            store.add_result(Evaluation(ticket, np.array([1.0])))
        store.save_checkpoint({"n": 50})
        assert time.perf_counter() - start < 5.0  # no busy waits
        assert reader._conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 1  # its snapshot
        reader._conn.execute("COMMIT")
        assert reader.counts() == {"pending": 1, "running": 0, "ok": 50, "failed": 0}
        assert reader.last_seq == store.last_seq == 101


def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path):
    """A writer killed at an arbitrary moment (checkpoints of ~1 MB widen the window inside a
    transaction): everything it reported committed is there, nothing is partial, a live reader
    saw a consistent, growing store, and the run can be reopened and continued."""
    run = tmp_path / "run"
    writer = _child("write", str(run))
    committed, seen, reader = [], [], None
    try:
        for line in writer.stdout:
            committed.append(int(line))
            if len(committed) == 5:
                reader = RunStore.open_reader(run)
            if len(committed) > 5 and len(committed) % 20 == 0:
                counts = reader.counts()
                results = reader.results()
                assert all(reader.candidate(r.ticket) is not None for r in results)
                seen.append(counts["ok"])
            if len(committed) == 300:
                os.kill(writer.pid, signal.SIGKILL)
                break
    finally:
        writer.kill()
        writer.wait()
        if reader is not None:
            reader.close()
    assert seen == sorted(seen) and seen[-1] > seen[0]
    raw = sqlite3.connect(run / DB_NAME)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()
    with RunStore.open(run) as store:
        stored = {c.seq for c in store.candidates()} | {r.seq for r in store.results()}
        assert set(committed) <= stored
        assert all(len(r.evaluation.objectives) == 1 and r.ticket < store.count() for r in store.results())
        assert all(c.proposal.genome.shape == (256,) for c in store.candidates())
        checkpoint = store.latest_checkpoint()
        assert checkpoint is not None and len(checkpoint.state["blob"]) == 1_000_000
        last = store.last_seq
        ticket = store.count()
        assert store.add_candidate(_proposal(ticket, [0.5] * 256)) == last + 1


def _hold(run: str) -> None:
    with RunStore.open(run):
        print("locked", flush=True)
        time.sleep(60)


def _write(run: str) -> None:
    rng = np.random.default_rng(0)
    with RunStore.create(run) as store:
        for ticket in range(10**6):
            print(store.add_candidate(_proposal(ticket, rng.random(256).tolist())), flush=True)
            print(store.add_result(Evaluation(ticket, np.array([rng.random()]))), flush=True)
            if ticket % 10 == 0:
                store.save_checkpoint({"ticket": ticket, "blob": "x" * 1_000_000})


if __name__ == "__main__":
    mode, run_dir = sys.argv[1:]
    if mode == "hold":
        _hold(run_dir)
    elif mode == "write":
        _write(run_dir)
