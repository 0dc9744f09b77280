"""Scoring on the held-out split, shared by the end of a run and ``evomerge evaluate``.

The search never sees these scores: they are stored under split ``test``, which the strategy's
replay ignores. A failed attempt stays recorded and a later one may succeed (a transient
out-of-memory error is retried). The end of a run also scores the references the best merge is
compared with: each source alone, the base, and the uniform average of the sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from evomerge.experiment import Experiment
from evomerge.fitness.spec import AGGREGATE
from evomerge.pool.fingerprint import ModelFingerprint
from evomerge.recipe import Recipe
from evomerge.run.objectives import Objectives, fitness_hash
from evomerge.runtime import Executor, Job, Outcome
from evomerge.search import Evaluation
from evomerge.store import RunStore


def run_job(executor: Executor, job: Job) -> Outcome:
    """Submit ``job`` and wait for its outcome (the executor's other jobs must be done)."""
    executor.submit(job)
    while True:
        for outcome in executor.poll(timeout=1.0):
            if outcome.key == job.key and outcome.split == job.split:
                return outcome


class Heldout:
    """Records held-out outcomes of one run's candidates under the held-out fitness's cache key."""

    def __init__(
        self,
        store: RunStore,
        executor: Executor,
        objectives: Objectives,
        fingerprints: Mapping[str, ModelFingerprint],
        split: str = "test",
    ) -> None:
        self.store = store
        self.objectives = objectives
        self.split = split
        self.fitness_hash = fitness_hash(executor.describe_fitness(split), objectives.names, fingerprints)

    def scored(self) -> dict[int, Evaluation]:
        """Candidates with a successful held-out result, and that result."""
        return {r.ticket: r.evaluation for r in self.store.results(self.split) if r.ok}

    def record(self, ticket: int, outcome: Outcome) -> tuple[Evaluation, str | None]:
        """Store ``outcome`` as ``ticket``'s held-out result (a failure too: it may be retried)."""
        evaluation, error = self.objectives.evaluation(ticket, outcome)
        self.store.add_result(
            evaluation,
            split=self.split,
            fitness_hash=self.fitness_hash,
            worker=outcome.worker,
            started=outcome.started,
            timings=outcome.timings,
            error=error,
        )
        return evaluation, error


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


def summary_row(label: str, kind: str, outcome: Outcome) -> dict[str, Any]:
    """One line of the summary; a non-finite metric becomes null (JSON has no NaN)."""
    values = {} if outcome.result is None else outcome.result.objectives
    objectives = {k: float(v) if np.isfinite(v) else None for k, v in values.items()}
    return {"label": label, "kind": kind, "objectives": objectives, "error": outcome.error}


def summary_columns(rows: list[dict[str, Any]]) -> list[str]:
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
