"""What evomerge writes into a run directory: the one list ``run --overwrite`` may delete.

A run directory may also hold the user's own files (notes, scripts, a thesis): they are never
touched. ``--overwrite`` replaces only a folder that is recognisably a run (its ``run.sqlite`` opens
as an evomerge store) or that is empty, and deletes only the entries listed in ``RUN_FILES``, under
the run's lock, so a run a live driver holds is refused rather than deleted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from evomerge.store.errors import StoreError
from evomerge.store.files import (
    EXPERIMENT_FILE,
    SUMMARY_FILE,
    TEMPORARY_SUFFIX,
    WORKERS_FILE,
)
from evomerge.store.lock import LOCK_NAME, RunLock
from evomerge.store.run_store import DB_NAME, RunStore

REPORT_DIR = "report"
TRACKER_DIR = "tracker"

RUN_FILES: tuple[str, ...] = (
    DB_NAME,
    f"{DB_NAME}-wal",
    f"{DB_NAME}-shm",
    f"{DB_NAME}-journal",
    EXPERIMENT_FILE,
    Path(EXPERIMENT_FILE).with_suffix(TEMPORARY_SUFFIX).name,
    SUMMARY_FILE,
    Path(SUMMARY_FILE).with_suffix(TEMPORARY_SUFFIX).name,
    WORKERS_FILE,
    Path(WORKERS_FILE).with_suffix(TEMPORARY_SUFFIX).name,
    f"{REPORT_DIR}/index.html",
    f"{REPORT_DIR}/*.png",
    f"{TRACKER_DIR}/tensorboard/events.out.tfevents.*",
    f"{TRACKER_DIR}/wandb/wandb",
)
"""Glob patterns (relative to the run directory) of everything a run and its inspection commands
write there: the store and SQLite's side files, the experiment snapshot, the summary and worker
state (and their temporary files), ``evomerge report``'s page and figures, ``--log-to``'s tracker
logs (wandb's own ``wandb`` folder is deleted whole). Folders left empty afterwards are removed."""

_FOLDERS = (f"{REPORT_DIR}", f"{TRACKER_DIR}/tensorboard", f"{TRACKER_DIR}/wandb", TRACKER_DIR)


def check_replaceable(folder: Path) -> None:
    """Raise a one-line ``StoreError`` unless ``folder`` is absent, empty or holds an evomerge run."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise StoreError(f"{folder}: exists and is not a folder; choose a new run directory")
    if (folder / DB_NAME).exists():
        try:
            RunStore.open_reader(folder).close()
        except StoreError as err:
            raise StoreError(f"{err}; --overwrite only replaces an evomerge run, so nothing was deleted") from None
        return
    if any(entry.name != LOCK_NAME for entry in folder.iterdir()):
        raise StoreError(
            f"{folder}: not an evomerge run (no {DB_NAME}) and not empty; --overwrite only replaces a run, "
            "so nothing was deleted: choose a new run directory"
        )


def clear_run(folder: Path) -> None:
    """Delete what a run wrote into ``folder`` (``RUN_FILES``), under its lock; anything else stays."""
    lock = RunLock.acquire(folder)
    try:
        check_replaceable(folder)
        for pattern in RUN_FILES:
            for path in sorted(folder.glob(pattern)):
                if not _beside_no_link(folder, path):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        for name in _FOLDERS:
            path = folder / name
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
    finally:
        lock.release()


def _beside_no_link(folder: Path, path: Path) -> bool:
    """Whether ``path`` is reached from ``folder`` without a symlinked folder (never delete through a link)."""
    parts = path.relative_to(folder).parts
    return not any((folder.joinpath(*parts[:i])).is_symlink() for i in range(1, len(parts)))
