"""The files a run directory holds beside its store, and writing them so that no crash damages them.

``experiment.yaml`` (the experiment as the store snapshotted it), ``summary.json`` (the closing
summary, stored first in the store's ``meta``) and ``workers.json`` (the executor's per-worker
state) are copies for people and tools: the store is the source of truth. Each is replaced
atomically and durably — written to ``NAME.tmp``, fsynced, renamed over ``NAME``, and the folder
fsynced — so after a crash or a power loss a reader finds the old file or the new one, whole.
``repair_run_files`` rewrites, from the store, any copy a crash of an older evomerge or a foreign
hand left missing or damaged; ``resume`` calls it first, and readers treat a damaged copy as absent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from evomerge.store.run_store import RunStore

EXPERIMENT_FILE = "experiment.yaml"
SUMMARY_FILE = "summary.json"
WORKERS_FILE = "workers.json"
TEMPORARY_SUFFIX = ".tmp"
WORKER_KEYS = {"name", "state", "node", "device", "evaluations", "failures"}


def fsync_directory(folder: Path) -> None:
    """Make the entries of ``folder`` (a file created, renamed or removed in it) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: temporary file, fsync, rename, fsync of the folder."""
    path = Path(path)
    temporary = path.with_suffix(TEMPORARY_SUFFIX)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """``write_atomic`` of ``data`` as indented JSON (no NaN: JSON has none)."""
    write_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing or is not a whole JSON object."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def workers_in(data: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The worker rows of ``workers.json``'s content, or None when it is not that file's shape."""
    workers = None if data is None else data.get("workers")
    if not isinstance(workers, list) or not all(isinstance(w, dict) and WORKER_KEYS <= w.keys() for w in workers):
        return None
    return workers


def stored_workers(store: RunStore) -> list[dict[str, Any]]:
    """``workers.json``'s rows as far as the store knows them: names and counts, the rest unknown."""
    return [
        {"name": name, "state": "stopped", "node": None, "pid": None, "device": None, "evaluations": evaluations,
         "failures": failures, "restarts": None}
        for name, (evaluations, failures) in store.worker_totals().items()
    ]


def repair_run_files(run_dir: str | Path, store: RunStore) -> list[str]:
    """Rewrite from ``store`` each copy in ``run_dir`` that is missing or damaged; returns their names.

    ``experiment.yaml`` must load as the stored snapshot; ``summary.json`` must equal the stored
    summary (when the run is done); a ``workers.json`` without its worker rows is rebuilt from the
    workers the results name.
    """
    folder = Path(run_dir)
    repaired = []
    experiment = store.metadata["experiment"]
    if _read_yaml(folder / EXPERIMENT_FILE) != experiment:
        write_atomic(folder / EXPERIMENT_FILE, yaml.safe_dump(experiment, sort_keys=False))
        repaired.append(EXPERIMENT_FILE)
    summary = store.summary
    if summary is not None and read_json_object(folder / SUMMARY_FILE) != summary:
        write_json(folder / SUMMARY_FILE, summary)
        repaired.append(SUMMARY_FILE)
    workers = folder / WORKERS_FILE
    if workers.exists() and workers_in(read_json_object(workers)) is None:
        write_json(workers, {"updated": time.time(), "workers": stored_workers(store)})
        repaired.append(WORKERS_FILE)
    return repaired


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_bytes())
    except (OSError, yaml.YAMLError, RecursionError):
        return None
