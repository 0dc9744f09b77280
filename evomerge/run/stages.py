"""Staged experiments: runs in order over a growing pool of models (Sakana's PS → DFS).

A staged experiment (``stages:`` in the experiment file, see ``evomerge.experiment``) runs each
stage as a run of its own; a stage's ``promote`` entries export picks of its candidates into the
run directory, where they join the pool as new models for the stages after it. EvoLLM-JP-10B was
made this way: a parameter-space merge, then a data-flow search over it and one of its sources.

A staged run directory holds::

    stages.yaml              the experiment as it started: models pinned, search spaces inlined
    pool.json                the pool: the experiment's models, then every promoted model
    pool/<model>/            a promoted model (an export of its stage's pick, loadable anywhere)
    stages/<stage>/          each stage's own run directory (store, summary, report...)
    summary.json             at the end: each stage's best and the last stage's comparison

The layout is read by ``evomerge.store.stages`` (without the heavy imports, for ``status``).
``evomerge run`` runs every stage; ``evomerge resume RUN_DIR`` continues inside the current stage
(or starts the next one, or redoes a promotion a crash cut short); ``evomerge status RUN_DIR`` shows
the stage; ``front``, ``report``, ``export`` and ``evaluate`` take a stage's folder (given the staged
folder itself, they read its latest stage).

**The growing pool** (``GrowingPool``) is the seam for any search that feeds its results back as
models (nested MAP merges pairs and merges the results again): ``models`` is the pool, name →
pinned reference; ``promote(name, run_dir, pick)`` exports a finished run's pick into the pool;
``add(name, folder, record)`` registers a model made otherwise. Every change is written to
``pool.json`` atomically after the model's folder is complete, so a crash leaves the pool as it
was before the change or after it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.display import print_summary
from evomerge.errors import ConfigError, EvomergeError
from evomerge.experiment import (
    Experiment,
    ExperimentFile,
    check_experiment_file,
    prepare_zoo,
    resolve_experiment,
    run_dir_of,
)
from evomerge.store import DB_NAME, StoreError
from evomerge.store.files import (
    SUMMARY_FILE,
    read_json_object,
    write_atomic,
    write_json,
)
from evomerge.store.lock import LOCK_NAME, RunLock
from evomerge.store.stages import (
    POOL_DIR,
    POOL_FILE,
    STAGES_DIR,
    STAGES_FILE,
    read_staged,
    stage_dir,
    stage_state,
)
from evomerge.validation import read_yaml

FORMAT = 1


def is_staged(experiment_path: str | Path) -> bool:
    """Whether an experiment file has ``stages:`` (read without validating the rest; a file that
    cannot be read is not, and the experiment loader then reports why in one line)."""
    try:
        data = read_yaml(experiment_path)
    except ConfigError:
        return False
    return isinstance(data, dict) and "stages" in data


@dataclass(frozen=True)
class PoolEntry:
    """A model of the pool: its pinned reference and, for a promoted one, where it came from."""

    ref: str
    stage: str | None = None
    run_dir: str | None = None
    candidate: int | None = None
    pick: str | None = None
    origin: dict[str, Any] = field(default_factory=dict)


class GrowingPool:
    """The models a staged run draws from: the experiment's own, then each promoted one (``pool.json``)."""

    def __init__(self, root: Path, entries: Mapping[str, PoolEntry]) -> None:
        self.root = Path(root)
        self._entries = dict(entries)

    @classmethod
    def create(cls, root: Path, models: Mapping[str, str], origins: Mapping[str, dict[str, Any]] | None = None) -> GrowingPool:
        """A pool of ``models`` (name → pinned reference), written to ``root/pool.json``."""
        pool = cls(root, {name: PoolEntry(ref, origin=dict((origins or {}).get(name, {}))) for name, ref in models.items()})
        pool._save()
        return pool

    @classmethod
    def load(cls, root: Path) -> GrowingPool:
        data = read_json_object(Path(root) / POOL_FILE)
        if data is None or not isinstance(data.get("models"), dict):
            raise StoreError(f"{root}: {POOL_FILE} is missing or damaged; the staged run cannot continue")
        return cls(root, {name: PoolEntry(**entry) for name, entry in data["models"].items()})

    @property
    def models(self) -> dict[str, str]:
        """Every model of the pool, name → pinned reference, in the order they joined."""
        return {name: entry.ref for name, entry in self._entries.items()}

    @property
    def entries(self) -> dict[str, PoolEntry]:
        return dict(self._entries)

    def folder(self, name: str) -> Path:
        """Where a promoted model ``name`` is written: ``RUN_DIR/pool/<name>``."""
        return self.root / POOL_DIR / name

    def add(self, name: str, folder: Path, record: Mapping[str, Any] | None = None) -> PoolEntry:
        """Register the model in ``folder`` as ``name`` (``record``: its stage, run_dir, candidate, pick)."""
        if name in self._entries:
            raise ConfigError(f"pool: a model named '{name}' is already in the pool")
        entry = PoolEntry(str(Path(folder).resolve()), **dict(record or {}))
        self._entries[name] = entry
        self._save()
        return entry

    def promote(self, name: str, run_dir: Path, *, stage: str | None = None, pick: str = "best", progress: bool = True) -> PoolEntry:
        """Export ``pick`` ('best' or front preferences 'a=0.7,b=0.3') of the run in ``run_dir``
        into ``RUN_DIR/pool/<name>`` and add it to the pool (done already: returned as it is)."""
        from evomerge.inspection.export_candidate import export_candidate

        if name in self._entries:
            return self._entries[name]
        best = pick == "best"
        folder, ticket, _ = export_candidate(
            run_dir, self.folder(name), best=best, pick=None if best else pick, overwrite=self.folder(name).exists(), progress=progress
        )
        return self.add(name, folder, {"stage": stage, "run_dir": str(Path(run_dir).resolve()), "candidate": ticket, "pick": pick})

    def _save(self) -> None:
        write_json(self.root / POOL_FILE, {"format": FORMAT, "models": {n: asdict(e) for n, e in self._entries.items()}})


@dataclass(frozen=True)
class StagedRun:
    """A staged run directory: the experiment it started with (``stages.yaml``) and its pool."""

    root: Path
    spec: ExperimentFile
    here: Path
    source: str
    budget: int | None
    seed: int | None

    @classmethod
    def load(cls, root: Path) -> StagedRun:
        data = read_staged(root)
        if data.get("format") != FORMAT:
            raise StoreError(f"{root}: {STAGES_FILE} format {data.get('format')!r} is not supported (expected {FORMAT})")
        spec = ExperimentFile.model_validate(data["experiment"])
        return cls(root, spec, Path(data["here"]), data["source"], data.get("budget"), data.get("seed"))

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.spec.stages or []]

    def stage_dir(self, name: str) -> Path:
        return stage_dir(self.root, name)

    def state(self, name: str) -> str:
        return stage_state(self.root, name)

    def experiment(self, index: int, pool: GrowingPool) -> Experiment:
        """Stage ``index`` as an experiment over the pool at its turn."""
        stage = self.spec.stages[index]  # type: ignore[index]
        missing = [name for name in stage.models or [] if name not in pool.models]
        if missing:
            raise StoreError(f"{self.root}: stage {stage.name} needs model '{missing[0]}', which is not in the pool yet")
        spec = self.spec.stage_file(index, pool.models, self.source)
        experiment = resolve_experiment(
            spec, self.here, f"{self.source} (stage {stage.name})", run_dir=self.stage_dir(stage.name), budget=self.budget, seed=self.seed
        )
        origins = {name: {**experiment.origins.get(name, {}), **pool.entries[name].origin} for name in experiment.models}
        return experiment.model_copy(update={"origins": origins})


def run_stages(
    experiment_path: str | Path,
    *,
    run_dir: str | Path | None = None,
    budget: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Validate every stage, pin the models, create the staged run directory and run the stages.

    ``budget`` and ``seed`` apply to every stage. ``overwrite`` replaces an earlier staged run
    (only what it wrote). Returns the staged summary (also in ``RUN_DIR/summary.json``).
    """
    from evomerge.experiment import inline_space, resolve_sources

    prepare_zoo(experiment_path)
    spec, here, source = check_experiment_file(experiment_path)
    root = run_dir_of(run_dir, spec, here)
    if overwrite:
        clear_staged(root)
    elif root.exists() and any(p.name != LOCK_NAME for p in root.iterdir()):
        hint = f"resume it with `evomerge resume {root}`, " if (root / STAGES_FILE).is_file() else ""
        raise StoreError(f"{root}: not empty; {hint}pass --overwrite to replace a staged run, or choose a new run directory")
    sources = resolve_sources(spec, here, source)
    check_stages(spec, here, source, {name: resolved.ref for name, resolved in sources.items()})
    data = spec.model_dump(mode="json", exclude_unset=True, exclude={"zoo", "run_dir"})
    data["models"] = {name: resolved.ref for name, resolved in sources.items()}
    if spec.search_space is not None:
        data["search_space"] = inline_space(spec.search_space, here, source)
    for i, stage in enumerate(spec.stages or []):
        if stage.search_space is not None:
            data["stages"][i]["search_space"] = inline_space(stage.search_space, here, source)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    locked_before = (root / LOCK_NAME).exists()
    lock = RunLock.acquire(root)
    try:
        GrowingPool.create(root, data["models"], {n: {"written": spec.models[n], **r.record()} for n, r in sources.items()})
        record = {"format": FORMAT, "source": source, "here": str(here), "budget": budget, "seed": seed, "experiment": data}
        write_atomic(root / STAGES_FILE, yaml.safe_dump(record, sort_keys=False))
        staged = StagedRun.load(root)
        try:
            return _continue(staged, progress=progress, ray_address=ray_address)
        except EvomergeError:
            if staged.state(staged.names[0]) == "pending":  # refused before its first stage began: leave nothing behind
                for name in (STAGES_FILE, POOL_FILE):
                    (root / name).unlink(missing_ok=True)
                _remove_if_empty(staged.stage_dir(staged.names[0]))
                for name in (STAGES_DIR, POOL_DIR):
                    _remove_if_empty(root / name)
                if created:
                    _remove_if_empty(root)
                elif not locked_before:
                    (root / LOCK_NAME).unlink(missing_ok=True)
            raise
    finally:
        lock.release()


def check_stages(spec: ExperimentFile, here: Path, source: str, models: Mapping[str, str]) -> None:
    """Build every stage's search space and strategy before anything runs, so that a mistake in the
    last stage is reported before the first one spends its budget. Models promoted by earlier stages
    do not exist yet: they stand in with the layout of the experiment's own models (a merge keeps it)."""
    from evomerge.experiment import PROMOTED, inline_space
    from evomerge.pool import ModelPool
    from evomerge.search import build_strategy
    from evomerge.spaces import PoolInfo, build_space

    with ModelPool.open(dict(models), spec.base) as opened:
        num_layers, tensors = opened.layer_map.num_layers, opened.parameter_order()
    pool: dict[str, str] = dict(models)
    for i, stage in enumerate(spec.stages or []):
        part = spec.stage_file(i, pool, source)
        where = f"{source} (stage {stage.name})"
        space = build_space(inline_space(part.search_space, here, where), PoolInfo(part.models, part.base, num_layers, tensors), f"{where}: search_space")
        build_strategy(
            part.strategy.name, space.layout, n_objectives=len(part.objectives), settings=part.strategy.settings, source=f"{where}: strategy"
        )
        pool.update({p.name: f"{PROMOTED}{p.name}" for p in stage.promote})


def resume_stages(root: str | Path, *, progress: bool = True, ray_address: str | None = None) -> dict[str, Any]:
    """Continue a staged run: inside its current stage, then the stages after it."""
    root = Path(root).resolve()
    lock = RunLock.acquire(root)
    try:
        return _continue(StagedRun.load(root), progress=progress, ray_address=ray_address)
    finally:
        lock.release()


def _continue(staged: StagedRun, *, progress: bool, ray_address: str | None) -> dict[str, Any]:
    """Finish, start or resume each stage in order, promoting its picks into the pool."""
    from evomerge.run.session import resume_run, start_experiment
    from evomerge.runtime import with_ray_address

    pool = GrowingPool.load(staged.root)
    summaries: dict[str, dict[str, Any]] = {}
    for index, stage in enumerate(staged.spec.stages or []):
        state = staged.state(stage.name)
        folder = staged.stage_dir(stage.name)
        if state == "pending":
            if progress:
                print(f"stage {index + 1}/{len(staged.names)}: {stage.name}", flush=True)
            experiment = with_ray_address(staged.experiment(index, pool), ray_address)
            summaries[stage.name] = start_experiment(experiment, progress=progress)
        else:
            if state == "started" and progress:
                print(f"stage {index + 1}/{len(staged.names)}: {stage.name} (resumed)", flush=True)
            summaries[stage.name] = resume_run(folder, progress=progress and state == "started", ray_address=ray_address)
        for promotion in stage.promote:
            pool.promote(promotion.name, folder, stage=stage.name, pick=promotion.pick, progress=progress)
    summary = staged_summary(staged, summaries, pool)
    write_json(staged.root / SUMMARY_FILE, summary)
    if progress:
        print_summary(summary["final"])
    return summary


def staged_summary(staged: StagedRun, summaries: Mapping[str, dict[str, Any]], pool: GrowingPool) -> dict[str, Any]:
    """Each stage's summary, the promotions, and one table: every stage's best merge, then each
    stage's references (a label seen in an earlier stage gets the stage's name)."""
    from evomerge.run.heldout import summary_columns

    rows: list[dict[str, Any]] = []
    for name in staged.names:
        rows += [{**row, "label": f"{name}: {row['label']}"} for row in summaries[name]["rows"] if row["kind"] == "best"]
    labels: set[str] = set()
    for name in staged.names:
        for row in summaries[name]["rows"]:
            if row["kind"] != "best":
                label = row["label"] if row["label"] not in labels else f"{row['label']} ({name} pool)"
                labels.add(row["label"])
                rows.append({**row, "label": label})
    last = summaries[staged.names[-1]]
    final = {"name": staged.spec.name, "split": last["split"], "best": last["best"], "columns": summary_columns(rows), "rows": rows}
    return {
        "name": staged.spec.name,
        "staged": True,
        "stages": [{"name": name, "run_dir": str(staged.stage_dir(name)), "summary": summaries[name]} for name in staged.names],
        "pool": {name: asdict(entry) for name, entry in pool.entries.items()},
        "final": final,
    }


def clear_staged(root: Path) -> None:
    """Delete what a staged run wrote into ``root`` (its files, stage runs and promoted exports), under its lock.

    A folder that is neither empty nor a staged run is refused untouched."""
    from evomerge.materialize.export import MANIFEST
    from evomerge.store.run_files import clear_run

    if not root.exists():
        return
    if not (root / STAGES_FILE).is_file():
        if any(p.name != LOCK_NAME for p in root.iterdir()):
            raise StoreError(f"{root}: not a staged evomerge run and not empty; --overwrite only replaces a run, so nothing was deleted")
        return
    lock = RunLock.acquire(root)
    try:
        for folder in sorted((root / STAGES_DIR).glob("*")) if (root / STAGES_DIR).is_dir() else []:
            if folder.is_dir() and not folder.is_symlink() and (folder / DB_NAME).exists():
                clear_run(folder)
                _remove_if_empty(folder)
        for folder in sorted((root / POOL_DIR).glob("*")) if (root / POOL_DIR).is_dir() else []:
            written = read_json_list(folder / MANIFEST)
            if folder.is_dir() and not folder.is_symlink() and written is not None and {p.name for p in folder.iterdir()} <= set(written):
                shutil.rmtree(folder)
        for name in (STAGES_FILE, POOL_FILE, SUMMARY_FILE):
            (root / name).unlink(missing_ok=True)
        for name in (STAGES_DIR, POOL_DIR):
            _remove_if_empty(root / name)
    finally:
        lock.release()


def read_json_list(path: Path) -> list[str] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, list) else None


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink() and not any(p.name != LOCK_NAME for p in folder.iterdir()):
        (folder / LOCK_NAME).unlink(missing_ok=True)
        folder.rmdir()
