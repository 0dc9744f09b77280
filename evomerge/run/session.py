"""Starting and resuming a run: everything validated and loaded before the run directory exists.

``start_run`` builds the experiment's zoo if it needs one, loads and validates the experiment,
fingerprints the source models, builds the space, strategy, executor and fitness (``prepare``),
and only then creates the run directory (replacing an earlier run there with ``--overwrite``) and
hands over to the loop (``evomerge.run.loop``). ``resume_run`` reopens the store, checks that the
models and the fitness are those the run started with, rebuilds damaged side files, restores the
strategy and continues.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge import __version__
from evomerge.display import print_summary
from evomerge.errors import ConfigError
from evomerge.experiment import Experiment, load_experiment, prepare_zoo
from evomerge.fitness.spec import RacingSpec
from evomerge.pool.fingerprint import (
    ModelFingerprint,
    check_unchanged,
    fingerprint_models,
)
from evomerge.recipe import recipe_from_dict
from evomerge.run.loop import Driver
from evomerge.run.objectives import Objectives, fitness_hash
from evomerge.plan import check_plan, plan_experiment
from evomerge.runtime import Executor, build_executor, get_executor, with_ray_address
from evomerge.search import Strategy, build_strategy, get_strategy
from evomerge.spaces import SearchSpace
from evomerge.spaces.preview import experiment_space
from evomerge.status import read_summary
from evomerge.store import DB_NAME, RunStore, StoreError
from evomerge.store.files import EXPERIMENT_FILE, repair_run_files, write_atomic
from evomerge.store.lock import LOCK_NAME
from evomerge.store.run_files import check_replaceable, clear_run

METADATA_FORMAT = 2


@dataclass
class Session:
    """Everything a run needs in memory, built (and so validated) before the run directory exists."""

    experiment: Experiment
    space: SearchSpace
    strategy: Strategy
    executor: Executor
    objectives: Objectives
    fingerprints: dict[str, ModelFingerprint]
    fitness_hash: str

    def close(self) -> None:
        self.executor.close()


def prepare(experiment: Experiment, fingerprints: dict[str, ModelFingerprint] | None = None) -> Session:
    """Open the pool, build space and strategy, check the worker's memory plan (``evomerge plan``),
    start the executor; any mistake is a one-line error.

    ``fingerprints``: the models' fingerprints if already taken (else they are taken here)."""
    fingerprints = fingerprint_models(experiment.models) if fingerprints is None else fingerprints
    space = experiment_space(experiment)
    cls = get_strategy(experiment.strategy.name, f"{experiment.source}: strategy.name")
    if cls.breeds and not space.derives:
        raise ConfigError(
            f"{experiment.source}: strategy {cls.name} breeds children from parents; search_space kind "
            f"'{experiment.search_space.get('kind', 'parameter')}' cannot derive them (use kind: split_point)"
        )
    if cls.breeds and racing_of(experiment) is not None:
        raise ConfigError(
            f"{experiment.source}: fitness.racing: strategy {cls.name} compares candidates example by example "
            "and needs every example scored; turn racing off"
        )
    if not space.derives:
        recipe_from_dict(json.loads(space.decode(space.initial_genome()).model_dump_json()), f"{experiment.source}: search_space")
    strategy = build_strategy(
        experiment.strategy.name,
        space.layout,
        n_objectives=len(experiment.objectives),
        seed=experiment.strategy_seed,
        settings=experiment.strategy.settings,
        source=f"{experiment.source}: strategy",
        budget=experiment.budget.evaluations,
    )
    plan, _, workloads = plan_experiment(experiment, here=get_executor(experiment.executor.kind).workers_here(experiment.executor))
    check_plan(plan, experiment.source)
    executor = build_executor(experiment, workloads)
    try:
        description = executor.describe_fitness("validation")
    except BaseException:
        executor.close()
        raise
    objectives = Objectives(experiment.objectives)
    digest = fitness_hash(description, objectives.names, fingerprints)
    return Session(experiment, space, strategy, executor, objectives, fingerprints, digest)



def racing_of(experiment: Experiment) -> RacingSpec | None:
    """The experiment's racing settings (an lm-eval fitness with ``racing``), None when it is off."""
    return getattr(experiment.fitness, "racing", None)


def start_run(
    experiment_path: str | Path,
    *,
    run_dir: str | Path | None = None,
    budget: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Build the experiment's zoo if it has one and it is not ready, validate and prepare the
    experiment, create its run directory, search, summarize.

    Nothing is written before everything is validated and loaded: a refused experiment leaves no
    run directory behind, and ``overwrite`` deletes an earlier run only once the new one is ready
    to start, and only what a run wrote (``RUN_FILES``) in a folder that holds an evomerge run or
    nothing (never one a live driver holds). Returns the summary (also in ``RUN_DIR/summary.json``).
    An experiment with ``stages:`` runs each stage in turn (``evomerge.run.stages``).
    """
    from evomerge.run.stages import is_staged, run_stages

    if is_staged(experiment_path):
        return run_stages(
            experiment_path, run_dir=run_dir, budget=budget, seed=seed, progress=progress, overwrite=overwrite, ray_address=ray_address
        )
    prepare_zoo(experiment_path)
    experiment = with_ray_address(load_experiment(experiment_path, run_dir=run_dir, budget=budget, seed=seed), ray_address)
    return start_experiment(experiment, progress=progress, overwrite=overwrite)


def start_experiment(experiment: Experiment, *, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Prepare a loaded experiment, create its run directory and search (what ``start_run`` does after loading)."""
    folder = Path(experiment.run_dir)
    if overwrite:
        check_replaceable(folder)
    elif (folder / DB_NAME).exists():
        raise StoreError(
            f"{folder}: already holds a run; resume it with `evomerge resume {folder}`, "
            "pass --overwrite to replace it, or choose a new run directory"
        )
    session = prepare(experiment)
    try:
        if overwrite and folder.is_dir():
            clear_run(folder)
        store = _create_store(folder, session)
        with store:
            write_atomic(folder / EXPERIMENT_FILE, yaml.safe_dump(experiment.snapshot(), sort_keys=False))
            driver = Driver(session, store, progress=progress)
            return driver.run()
    finally:
        session.close()


def resume_run(run_dir: str | Path, *, progress: bool = True, ray_address: str | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its store (a second driver on it is refused);
    ``ray_address`` moves the rest of the run onto a Ray cluster. A staged run continues inside
    its current stage, then runs the stages after it."""
    from evomerge.run.stages import resume_stages
    from evomerge.store.stages import is_staged_run

    folder = Path(run_dir).resolve()
    if is_staged_run(folder):
        return resume_stages(folder, progress=progress, ray_address=ray_address)
    with RunStore.open(folder) as store:
        metadata = store.metadata
        if metadata.get("format") != METADATA_FORMAT:
            raise StoreError(
                f"{folder}: run metadata format {metadata.get('format')!r} is not supported (this evomerge writes "
                f"{METADATA_FORMAT}: runs record their models' fingerprints); finish it with the evomerge that started it"
            )
        experiment = with_ray_address(Experiment.from_snapshot(metadata["experiment"], str(folder / EXPERIMENT_FILE)), ray_address)
        repair_run_files(folder, store)
        summary = read_summary(folder, store)
        if summary is not None:
            if progress:
                print_summary(summary)
            return summary
        fingerprints = fingerprint_models(experiment.models)
        check_unchanged(metadata["fingerprints"], fingerprints, experiment.models, str(folder))
        session = prepare(experiment, fingerprints)
        try:
            if session.fitness_hash != metadata["fitness_hash"]:
                raise ConfigError(
                    f"{folder}: the fitness now measures something else than when the run started "
                    "(task files, data or lm-eval version changed); restore them to resume"
                )
            driver = Driver(session, store, progress=progress)
            driver.restore()
            return driver.run()
        finally:
            session.close()


def _create_store(folder: Path, session: Session) -> RunStore:
    experiment = session.experiment
    metadata = {
        "format": METADATA_FORMAT,
        "evomerge": __version__,
        "created": time.time(),
        "experiment": experiment.snapshot(),
        "objectives": session.objectives.names,
        "fitness_hash": session.fitness_hash,
        "fingerprints": {name: fingerprint.to_json() for name, fingerprint in session.fingerprints.items()},
        "dimension": session.space.dimension,
        "gene_names": session.space.gene_names,
        "layout": session.space.layout.describe(),
    }
    existed = folder.exists()
    try:
        return RunStore.create(folder, metadata)
    except BaseException:
        if not existed and folder.is_dir() and not any(p.name != LOCK_NAME for p in folder.iterdir()):
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
        raise
