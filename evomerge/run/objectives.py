"""From a fitness result to what the strategy and the store see: the objective vector, the
per-example scores with their ids, and the key under which results are cached."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from evomerge.fitness.base import canonical_hash
from evomerge.pool.fingerprint import ModelFingerprint
from evomerge.runtime import Outcome
from evomerge.search.types import Evaluation


def fitness_hash(
    description: Mapping[str, Any], objectives: list[str], fingerprints: Mapping[str, ModelFingerprint]
) -> str:
    """The cache key of a fitness: what it measures, which objectives the strategy is told, and the
    content of the models it scores merges of (a recipe names models by path only)."""
    models = {name: fingerprint.digest for name, fingerprint in fingerprints.items()}
    return canonical_hash({"fitness": dict(description), "objectives": list(objectives), "models": models})


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
