"""What survives a crash of the machine, not only of the process: results reach the disk on their own
soon after they are recorded, the files beside the store are replaced atomically and durably, and
``resume`` (and ``status``) rebuild or ignore a side file that is missing or damaged."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.run import resume_run, start_run
from evomerge.search import Evaluation, Proposal
from evomerge.status import run_status
from evomerge.store import DB_NAME, RunStore
from evomerge.store.files import EXPERIMENT_FILE, SUMMARY_FILE, WORKERS_FILE

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"
FITNESS = """
def score(model, tokenizer):
    layers = model.model.layers
    x0 = float(layers[0].mlp.up_proj.weight.detach().double().sum())
    h = float(model.lm_head.weight.detach().double().sum())
    return {"quality": -abs(x0 + 2.45) - abs(h - 0.46)}, {"quality": [x0, h]}
"""


@pytest.fixture
def experiment(tmp_path, pico_family) -> Path:
    (tmp_path / "fitness.py").write_text(FITNESS)
    data = {
        "name": "durable",
        "seed": 1,
        "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
        "base": "base",
        "search_space": str(SPACE),
        "strategy": {"name": "random"},
        "fitness": {"python": "fitness.py:score"},
        "heldout": True,
        "budget": {"evaluations": 6},
        "checkpoint_every": 2,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def disk(monkeypatch):
    """Records every ``os.fsync`` and ``os.replace`` in order: ("fsync", inode, size) / ("replace", src, dst)."""
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        fsync(fd)
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, info.st_size))

    def recording_replace(src, dst, **kw) -> None:
        replace(src, dst, **kw)
        events.append(("replace", Path(src).name, Path(dst).name))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_a_recorded_result_reaches_the_disk_soon_after(tmp_path, disk):
    """Each result's WAL frames get fsynced without anyone asking (a power loss cannot take it back
    once that happened); before, they stayed in the page cache until SQLite's next checkpoint."""
    wal = tmp_path / "run" / f"{DB_NAME}-wal"
    with RunStore.create(tmp_path / "run") as store:
        for ticket in range(4):
            store.add_candidate(Proposal(ticket, np.full(3, ticket / 4)))
            store.add_result(Evaluation(ticket, np.array([float(ticket)]), per_example=np.ones(50)))
            committed = wal.stat()
            deadline = time.monotonic() + 10
            while not any(e[:2] == ("fsync", committed.st_ino) and e[2] >= committed.st_size for e in disk):
                assert time.monotonic() < deadline, f"result {ticket} was never flushed to disk"
                time.sleep(0.001)


def test_side_files_are_replaced_atomically_and_durably(experiment, tmp_path, disk):
    """experiment.yaml, summary.json and workers.json: written to NAME.tmp, fsynced, renamed over
    NAME, then the folder fsynced (before, experiment.yaml was written in place and the JSON files
    renamed without any fsync: a power loss could leave them empty or half-written)."""
    run = tmp_path / "run"
    start_run(experiment, run_dir=run, progress=False)
    folder = run.stat().st_ino
    for name in (EXPERIMENT_FILE, SUMMARY_FILE, WORKERS_FILE):
        (last,) = [i for i, e in enumerate(disk) if e[0] == "replace" and e[2] == name][-1:]
        assert disk[last][1] == Path(name).with_suffix(".tmp").name
        written = [e for e in disk[:last] if e[0] == "fsync" and e[1] == (run / name).stat().st_ino]
        assert written and written[-1][2] == (run / name).stat().st_size, f"{name}: not fsynced before the rename"
        assert ("fsync", folder) in [e[:2] for e in disk[last + 1 :]], f"{name}: the folder was not fsynced after the rename"
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".tmp") == []


def test_resume_and_status_rebuild_damaged_side_files_from_the_store(experiment, tmp_path):
    run = tmp_path / "run"
    summary = start_run(experiment, run_dir=run, progress=False)
    with RunStore.open_reader(run) as store:
        snapshot = store.metadata["experiment"]
        results = store.results()
    text = (run / SUMMARY_FILE).read_text()
    (run / SUMMARY_FILE).write_text(text[: len(text) // 2])  # what a crash mid-write of an older evomerge left
    (run / WORKERS_FILE).write_bytes(b'{"updated": 17\x00\x00')
    (run / EXPERIMENT_FILE).unlink()

    status = run_status(run)  # status reads the store's summary and ignores the damaged workers file
    assert status["done"] and status["summary"] == summary and status["workers"] == []

    assert resume_run(run, progress=False) == summary  # before: json.JSONDecodeError out of resume
    assert json.loads((run / SUMMARY_FILE).read_text()) == summary
    assert yaml.safe_load((run / EXPERIMENT_FILE).read_text()) == snapshot
    (worker,) = json.loads((run / WORKERS_FILE).read_text())["workers"]
    evaluated = [r for r in results if r.worker is not None]
    assert (worker["name"], worker["state"]) == ("local/cpu", "stopped")
    assert (worker["evaluations"], worker["failures"]) == (len(evaluated), sum(not r.ok for r in evaluated))
    assert run_status(run)["workers"] == [worker]


def test_a_half_written_summary_of_an_unfinished_run_is_redone(experiment, tmp_path):
    """The store holds every result but no summary (the driver died while summarizing) and
    summary.json is half written: resume scores the best and the references again and completes it."""
    run = tmp_path / "run"
    summary = start_run(experiment, run_dir=run, progress=False)
    with sqlite3.connect(run / DB_NAME) as raw:
        raw.execute("DELETE FROM meta WHERE key = 'summary'")
    text = (run / SUMMARY_FILE).read_text()
    (run / SUMMARY_FILE).write_text(text[: len(text) // 3])
    assert not run_status(run)["done"]
    again = resume_run(run, progress=False)
    assert {**again, "elapsed_seconds": 0} == {**summary, "elapsed_seconds": 0}
    assert json.loads((run / SUMMARY_FILE).read_text()) == again
    with RunStore.open_reader(run) as store:
        assert store.summary == again and len(store.results("test")) == 1
