"""The layout of a staged run directory, read without the heavy parts (``status`` stays instant).

``evomerge.run.stages`` runs staged experiments; this module only knows where things are::

    stages.yaml           the experiment as it started (models pinned, search spaces inlined)
    pool.json             the pool: the experiment's models, then every promoted model
    pool/<model>/         a promoted model
    stages/<stage>/       each stage's own run directory
    summary.json          at the end: the stages' bests and comparisons
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.store.errors import StoreError
from evomerge.store.files import SUMMARY_FILE, read_json_object
from evomerge.store.run_store import DB_NAME, RunStore

STAGES_FILE = "stages.yaml"
POOL_FILE = "pool.json"
POOL_DIR = "pool"
STAGES_DIR = "stages"


def is_staged_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a staged run (its ``stages.yaml``) rather than a single run's store."""
    folder = Path(run_dir)
    return (folder / STAGES_FILE).is_file() and not (folder / DB_NAME).exists()


def read_staged(root: Path) -> dict[str, Any]:
    """The content of ``stages.yaml`` (a one-line ``StoreError`` when it is unreadable)."""
    try:
        data = yaml.safe_load((root / STAGES_FILE).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StoreError(f"{root / STAGES_FILE}: cannot read the staged run ({type(err).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("experiment"), dict):
        raise StoreError(f"{root / STAGES_FILE}: not a staged run record")
    return data


def stage_names(root: Path) -> list[str]:
    return [stage["name"] for stage in read_staged(root)["experiment"].get("stages", [])]


def stage_dir(root: Path, name: str) -> Path:
    return Path(root) / STAGES_DIR / name


def stage_state(root: Path, name: str) -> str:
    """'done' (its run has a summary), 'started' (a store exists) or 'pending'."""
    folder = stage_dir(root, name)
    if not (folder / DB_NAME).exists():
        return "pending"
    with RunStore.open_reader(folder) as store:
        done = store.summary is not None or read_json_object(folder / SUMMARY_FILE) is not None
    return "done" if done else "started"


def latest_stage_dir(root: str | Path) -> Path | None:
    """The run directory of the last stage that has started (what inspection reads for a staged folder)."""
    root = Path(root).resolve()
    started = [name for name in stage_names(root) if (stage_dir(root, name) / DB_NAME).exists()]
    return stage_dir(root, started[-1]) if started else None


def stage_status(root: str | Path) -> dict[str, Any]:
    """Where a staged run stands: each stage's state, the current stage and the pool (no lock taken)."""
    root = Path(root).resolve()
    names = stage_names(root)
    states = {name: stage_state(root, name) for name in names}
    current = next((name for name in names if states[name] != "done"), None)
    pool = (read_json_object(root / POOL_FILE) or {}).get("models") or {}
    return {
        "name": read_staged(root)["experiment"]["name"],
        "stages": [{"name": n, "state": states[n], "run_dir": str(stage_dir(root, n))} for n in names],
        "stage": current,
        "stage_index": None if current is None else names.index(current),
        "pool": pool,
    }
