"""The search loop: ``run`` an experiment into a run directory, ``resume`` one after a crash.

One step, always in this order: the strategy proposes → the space decodes the genome into a recipe
→ the candidate is stored → an identical (recipe, fitness) result already in the store is reused,
else the recipe goes to a free executor slot → a completion is stored → only then is the strategy
told. Every store write is committed on its own, so whatever kills the driver, the store holds a
consistent prefix of the run, and ``resume`` continues it exactly: restore the latest checkpoint,
replay the asks and results recorded after it (the strategy re-derives the same proposals, and
checks them bit for bit), re-queue the candidates that were in flight. With a deterministic
strategy and fitness, a resumed run ends with the same candidates and results as an uninterrupted
one. A checkpoint holds the strategy state and the driver's active time (for a minutes budget).

At the end (budget spent, nothing in flight) the best candidate is scored on the held-out split
(recorded in the store as split ``test``) and compared with each source model, the base and the
uniform average of the sources; the comparison is written to ``summary.json``, whose presence marks
the run as done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge import __version__
from evomerge.display import LiveProgress, print_summary
from evomerge.errors import ConfigError
from evomerge.experiment import Experiment, load_experiment
from evomerge.fitness.base import canonical_hash
from evomerge.fitness.racing import Incumbents
from evomerge.fitness.spec import AGGREGATE, RacingSpec
from evomerge.recipe import Blueprint, Recipe, recipe_from_dict
from evomerge.runtime import Executor, Job, Outcome, build_executor, with_ray_address
from evomerge.search import Evaluation, Proposal, Strategy, build_strategy, get_strategy
from evomerge.spaces import SearchSpace
from evomerge.spaces.preview import experiment_space
from evomerge.status import SUMMARY_FILE, WORKERS_FILE, read_summary
from evomerge.store import DB_NAME, CandidateRecord, RunStore, StoreError
from evomerge.store.lock import LOCK_NAME, RunLock

EXPERIMENT_FILE = "experiment.yaml"
METADATA_FORMAT = 1


def recipe_hash(recipe_json: str) -> str:
    """The fitness-cache key of a recipe: a digest of its JSON (what ``add_candidate`` stores)."""
    return hashlib.blake2b(recipe_json.encode(), digest_size=16).hexdigest()


def fitness_hash(description: Mapping[str, Any], objectives: list[str]) -> str:
    """The cache key of a fitness: what it measures and which objectives the strategy is told."""
    return canonical_hash({"fitness": dict(description), "objectives": list(objectives)})


class Objectives:
    """Turns a ``FitnessResult`` into the strategy's objective vector (maximize convention).

    Minimized metrics are negated; a missing or non-finite objective makes the candidate a
    failure with that reason as its error text.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)

    def evaluation(self, ticket: int, outcome: Outcome) -> tuple[Evaluation, str | None]:
        if outcome.result is None:
            return Evaluation.failure(ticket, len(self.names)), outcome.error or "failed"
        result = outcome.result
        values = []
        for name in self.names:
            if name not in result.objectives:
                known = ", ".join(result.objectives)
                return Evaluation.failure(ticket, len(self.names)), f"objective '{name}' not produced by the fitness ({known})"
            value = float(result.objectives[name])
            if not np.isfinite(value):
                return Evaluation.failure(ticket, len(self.names)), f"objective '{name}' is {value}"
            values.append(-value if result.directions.get(name) == "minimize" else value)
        scores, ids = _per_example(result)
        return Evaluation(ticket, np.array(values), per_example=scores, example_ids=ids), None


def _per_example(result: Any) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """Every task's per-example scores concatenated in objective order, with ids ``task:doc_id``."""
    if not result.per_example:
        return None, None
    scores = np.concatenate([np.asarray(s.scores, dtype=np.float64) for s in result.per_example.values()])
    ids = tuple(f"{task}:{doc}" for task, s in result.per_example.items() for doc in s.doc_ids)
    return scores, ids


@dataclass
class Session:
    """Everything a run needs in memory, built (and so validated) before the run directory exists."""

    experiment: Experiment
    space: SearchSpace
    strategy: Strategy
    executor: Executor
    objectives: Objectives
    fitness_hash: str

    def close(self) -> None:
        self.executor.close()


def prepare(experiment: Experiment) -> Session:
    """Open the pool, build space and strategy, start the executor; any mistake is a one-line error."""
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
    )
    executor = build_executor(experiment)
    try:
        description = executor.describe_fitness("validation")
    except BaseException:
        executor.close()
        raise
    objectives = Objectives(experiment.objectives)
    return Session(experiment, space, strategy, executor, objectives, fitness_hash(description, objectives.names))


def racing_of(experiment: Experiment) -> RacingSpec | None:
    """The experiment's racing settings (an lm-eval fitness with ``racing``), None when it is off."""
    return getattr(experiment.fitness, "racing", None)


# -- entry points ----------------------------------------------------------------------------------


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
    """Validate and prepare the experiment, create its run directory, search, summarize.

    Nothing is written before everything is validated and loaded: a refused experiment leaves no
    run directory behind, and ``overwrite`` deletes an earlier run only once the new one is ready
    to start (never one a live driver holds). Returns the summary (also in ``RUN_DIR/summary.json``).
    """
    experiment = with_ray_address(load_experiment(experiment_path, run_dir=run_dir, budget=budget, seed=seed), ray_address)
    folder = Path(experiment.run_dir)
    if (folder / DB_NAME).exists() and not overwrite:
        raise StoreError(
            f"{folder}: already holds a run; resume it with `evomerge resume {folder}`, "
            "pass --overwrite to replace it, or choose a new run directory"
        )
    session = prepare(experiment)
    try:
        if overwrite and folder.is_dir():
            _clear_run(folder)
        store = _create_store(folder, session)
        with store:
            (folder / EXPERIMENT_FILE).write_text(yaml.safe_dump(experiment.snapshot(), sort_keys=False))
            driver = Driver(session, store, progress=progress)
            return driver.run()
    finally:
        session.close()


def resume_run(run_dir: str | Path, *, progress: bool = True, ray_address: str | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its store (a second driver on it is refused);
    ``ray_address`` moves the rest of the run onto a Ray cluster."""
    folder = Path(run_dir).resolve()
    with RunStore.open(folder) as store:
        metadata = store.metadata
        if metadata.get("format") != METADATA_FORMAT:
            raise StoreError(f"{folder}: run metadata format {metadata.get('format')!r} is not supported")
        experiment = with_ray_address(Experiment.from_snapshot(metadata["experiment"], str(folder / EXPERIMENT_FILE)), ray_address)
        summary = read_summary(folder)
        if summary is not None:
            if progress:
                print_summary(summary)
            return summary
        session = prepare(experiment)
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


def _clear_run(folder: Path) -> None:
    """Empty ``folder`` under its run lock, so a run still being driven is refused, not deleted."""
    lock = RunLock.acquire(folder)
    try:
        for path in folder.iterdir():
            if path.name == LOCK_NAME:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    finally:
        lock.release()


def _create_store(folder: Path, session: Session) -> RunStore:
    experiment = session.experiment
    metadata = {
        "format": METADATA_FORMAT,
        "evomerge": __version__,
        "created": time.time(),
        "experiment": experiment.snapshot(),
        "objectives": session.objectives.names,
        "fitness_hash": session.fitness_hash,
        "dimension": session.space.dimension,
        "gene_names": session.space.gene_names,
        "layout": session.space.layout.describe(),
    }
    existed = folder.exists()
    try:
        return RunStore.create(folder, metadata)
    except BaseException:
        if not existed and folder.is_dir() and not any(p.name != ".lock" for p in folder.iterdir()):
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
        raise


# -- the loop --------------------------------------------------------------------------------------


class Driver:
    """Runs one session of the loop on an open (locked) store; see the module docstring."""

    def __init__(self, session: Session, store: RunStore, *, progress: bool = True) -> None:
        self.session = session
        self.store = store
        self.experiment = session.experiment
        self.strategy = session.strategy
        self.executor = session.executor
        self._requeue: deque[CandidateRecord] = deque()
        self._blueprints: dict[int, Blueprint] = {}
        results = store.results()
        self._n_candidates = store.count()
        self._n_results = len(results)
        self._failed = sum(1 for r in results if not r.ok)
        self._cached = sum(1 for r in results if r.cached_from is not None)
        self._session_results = 0
        self._unsaved = 0
        self._elapsed_before = 0.0
        self._clock = time.perf_counter()
        best = store.best()
        self._best = (None, None) if best is None else (float(best.evaluation.objectives[0]), best.ticket)
        self._incumbents = None if racing_of(self.experiment) is None else Incumbents(session.objectives.names)
        if self._incumbents is not None:
            for record in results:
                if record.complete:
                    self._incumbents.add(record.evaluation.objectives)
        budget = self.experiment.budget
        self._display = LiveProgress(self.experiment.name, budget.evaluations, enabled=progress)

    def restore(self) -> None:
        """Bring the strategy to where the store says the run stopped, and re-queue in-flight candidates."""
        store = self.store
        checkpoint = store.latest_checkpoint()
        since, anchor = 0, float(store.metadata["created"])
        if checkpoint is not None:
            self.strategy.load_state_dict(checkpoint.state["strategy"])
            self._elapsed_before = float(checkpoint.state["driver"]["elapsed"])
            since, anchor = checkpoint.seq, checkpoint.created
        self.strategy.replay(store.events_since(since))
        tail = store.results_since(since)
        if tail:
            self._elapsed_before += max(0.0, tail[-1].finished - anchor)
        pending = store.pending_candidates()
        outstanding = [p.ticket for p in self.strategy.outstanding]
        if [c.ticket for c in pending] != outstanding:
            raise StoreError(
                f"{store.path}: the store's pending candidates {[c.ticket for c in pending]} differ from the "
                f"strategy's outstanding proposals {outstanding}; the run cannot be resumed exactly"
            )
        self._requeue.extend(pending)

    @property
    def elapsed(self) -> float:
        """Seconds of driver time spent on this run, over all sessions."""
        return self._elapsed_before + (time.perf_counter() - self._clock)

    def run(self) -> dict[str, Any]:
        """Search until the budget is spent and nothing is in flight, then summarize."""
        self._clock = time.perf_counter()
        try:
            with self._display:
                self._refresh()
                while True:
                    self._fill()
                    if self.executor.in_flight == 0:
                        break
                    for outcome in self.executor.poll(timeout=1.0):
                        self._complete(outcome)
        except KeyboardInterrupt:
            folder = Path(self.store.path).parent
            print(f"stopped after {self._n_results} results; continue with `evomerge resume {folder}`", file=sys.stderr)
            raise
        if self._unsaved:
            self._checkpoint()
        summary = self._summarize()
        self._write_workers()
        if self._display.enabled:
            print_summary(summary)
        return summary

    # -- asking ----------------------------------------------------------------------------------

    def _may_ask(self) -> bool:
        budget = self.experiment.budget
        if budget.evaluations is not None and self._n_candidates >= budget.evaluations:
            return False
        return budget.minutes is None or self.elapsed < budget.minutes * 60.0

    def _fill(self) -> None:
        """Keep every executor slot busy: re-queued candidates first, then new proposals.

        A strategy that cannot propose yet (its next proposal needs results still out) is asked
        once those arrive; with nothing in flight it is asked anyway and says why it cannot go on.
        """
        while self.executor.free_slots > 0:
            if self._requeue:
                record = self._requeue.popleft()
                ticket, recipe, digest = record.ticket, self._stored_recipe(record), record.recipe_hash
            elif self._may_ask() and (self.strategy.can_ask() or self.executor.in_flight == 0):
                proposal = self.strategy.ask()
                recipe = self._decode(proposal)
                recipe_json = recipe.model_dump_json()
                digest = recipe_hash(recipe_json)
                self.store.add_candidate(proposal, recipe=recipe_json, recipe_hash=digest)
                self._n_candidates += 1
                ticket = proposal.ticket
            else:
                return
            if digest is not None and self._reuse(ticket, digest):
                continue
            bar = None if self._incumbents is None else self._incumbents.bar()
            worker = self.executor.submit(Job(ticket, recipe, bar=bar))
            self.store.mark_running(ticket, worker)

    def _decode(self, proposal: Proposal) -> Blueprint:
        """The proposal's blueprint; parents' blueprints come from the store (evicted members included)."""
        parents = {ticket: self._blueprint(ticket) for ticket in proposal.parents}
        return self.session.space.blueprint(proposal, parents)

    def _blueprint(self, ticket: int) -> Blueprint:
        if ticket not in self._blueprints:
            record = self.store.candidate(ticket)
            if record is None:
                raise StoreError(f"{self.store.path}: a proposal names parent {ticket}, which is not a stored candidate")
            self._blueprints[ticket] = self._stored_recipe(record)
        return self._blueprints[ticket]

    def _stored_recipe(self, record: CandidateRecord) -> Blueprint:
        if record.recipe is not None:
            return recipe_from_dict(record.recipe, f"{self.store.path}: candidate {record.ticket}")
        return self._decode(record.proposal)

    def _reuse(self, ticket: int, digest: str) -> bool:
        """Record a cached result for an identical recipe under the same fitness, if there is one."""
        hit = self.store.lookup_cache(digest, self.session.fitness_hash)
        if hit is None:
            return False
        evaluation = Evaluation(
            ticket, hit.evaluation.objectives, per_example=hit.evaluation.per_example, example_ids=hit.evaluation.example_ids
        )
        self.store.add_result(evaluation, fitness_hash=self.session.fitness_hash, cached_from=hit.ticket)
        self._cached += 1
        self._told(evaluation, complete=True)
        return True

    # -- completing ------------------------------------------------------------------------------

    def _complete(self, outcome: Outcome) -> None:
        """Store an outcome, then tell the strategy; a racing estimate is told like any result
        (its objectives are the estimate) but is never the best nor an incumbent."""
        ticket = int(outcome.key)
        evaluation, error = self.session.objectives.evaluation(ticket, outcome)
        estimate = None if evaluation.failed else getattr(outcome.result, "estimate", None)
        self.store.add_result(
            evaluation,
            fitness_hash=self.session.fitness_hash,
            worker=outcome.worker,
            started=outcome.started,
            timings=outcome.timings,
            error=error,
            estimate=estimate,
        )
        if evaluation.failed:
            self._failed += 1
        self._told(evaluation, complete=estimate is None)
        self._write_workers()

    def _write_workers(self) -> None:
        """Per-worker state for ``status`` (a small file rewritten atomically; the store stays append-only)."""
        states = self.executor.worker_states()
        if states:
            _write_json_atomic(Path(self.store.path).parent / WORKERS_FILE, {"updated": time.time(), "workers": states})

    def _told(self, evaluation: Evaluation, *, complete: bool) -> None:
        """Tell the strategy a result already in the store; checkpoint every ``checkpoint_every`` results."""
        self.strategy.tell(evaluation)
        self._n_results += 1
        self._session_results += 1
        self._unsaved += 1
        if not evaluation.failed and complete:
            value = float(evaluation.objectives[0])
            if self._best[0] is None or value > self._best[0]:
                self._best = (value, evaluation.ticket)
            if self._incumbents is not None:
                self._incumbents.add(evaluation.objectives)
        if self._n_results % self.experiment.checkpoint_every == 0:
            self._checkpoint()
        self._refresh()

    def _checkpoint(self) -> None:
        self.store.save_checkpoint({"strategy": self.strategy.state_dict(), "driver": {"elapsed": self.elapsed}})
        self._unsaved = 0

    def _refresh(self) -> None:
        session_seconds = time.perf_counter() - self._clock
        rate = self._session_results / session_seconds * 3600.0 if self._session_results and session_seconds > 0 else None
        self._display.update(
            evaluations=self._n_results,
            failed=self._failed,
            cached=self._cached,
            best=self._best[0],
            best_ticket=self._best[1],
            rate=rate,
        )

    # -- the end ---------------------------------------------------------------------------------

    def _summarize(self) -> dict[str, Any]:
        """Score the best candidate and the references on the held-out split; write summary.json."""
        experiment = self.experiment
        split = "test" if experiment.heldout is not None else "validation"
        best = self.store.best()
        rows: list[dict[str, Any]] = []
        if best is not None:
            label = f"best merge (#{best.ticket})"
            record = self.store.candidate(best.ticket)
            outcome = self._evaluate(Job(best.ticket, self._stored_recipe(record), split))
            if split == "test" and not any(r.ticket == best.ticket for r in self.store.results("test")):
                self._record_heldout(best.ticket, outcome)
            rows.append(_row(label, "best", outcome))
            for key, recipe in reference_recipes(experiment).items():
                rows.append(_row(key, "reference", self._evaluate(Job(key, recipe, split))))
        columns = _columns(rows)
        summary = {
            "name": experiment.name,
            "split": split,
            "best": None if best is None else {"candidate": best.ticket, "objectives": self._named(best.evaluation)},
            "columns": columns,
            "rows": rows,
            "evaluations": self._n_results,
            "elapsed_seconds": round(self.elapsed, 3),
        }
        _write_json_atomic(Path(self.store.path).parent / SUMMARY_FILE, summary)
        return summary

    def _evaluate(self, job: Job) -> Outcome:
        self.executor.submit(job)
        while True:
            for outcome in self.executor.poll(timeout=1.0):
                if outcome.key == job.key and outcome.split == job.split:
                    return outcome

    def _named(self, evaluation: Evaluation) -> dict[str, float]:
        return dict(zip(self.session.objectives.names, evaluation.objectives.tolist()))

    def _record_heldout(self, ticket: int, outcome: Outcome) -> None:
        description = self.executor.describe_fitness("test")
        evaluation, error = self.session.objectives.evaluation(ticket, outcome)
        self.store.add_result(
            evaluation,
            split="test",
            fitness_hash=fitness_hash(description, self.session.objectives.names),
            worker=outcome.worker,
            started=outcome.started,
            timings=outcome.timings,
            error=error,
        )


def reference_recipes(experiment: Experiment) -> dict[str, Recipe]:
    """What the best merge is compared with: each source alone, the base, the uniform average of the sources."""
    models = dict(experiment.models)
    base = experiment.base
    sources = [name for name in models if name != base]
    recipes = {}
    for name in sources + ([base] if base is not None else []):
        recipes[name] = Recipe(
            models=models, base=base, method="linear", sources=[name], model_parameters={name: {"weight": 1.0}}
        )
    recipes["uniform average"] = Recipe(
        models=models,
        base=base,
        method="linear",
        sources=sources,
        model_parameters={name: {"weight": 1.0} for name in sources},
    )
    return recipes


def _row(label: str, kind: str, outcome: Outcome) -> dict[str, Any]:
    """One line of the summary; a non-finite metric becomes null (JSON has no NaN)."""
    values = {} if outcome.result is None else outcome.result.objectives
    objectives = {k: float(v) if np.isfinite(v) else None for k, v in values.items()}
    return {"label": label, "kind": kind, "objectives": objectives, "error": outcome.error}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Objective names in first-seen order, the weighted aggregate first."""
    columns: list[str] = []
    for row in rows:
        for name in row["objectives"]:
            if name not in columns:
                columns.append(name)
    if AGGREGATE in columns:
        columns.remove(AGGREGATE)
        columns.insert(0, AGGREGATE)
    return columns


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)

