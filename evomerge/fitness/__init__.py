"""Fitness: score a model already in memory (lm-eval tasks, or any Python callable).

``LmEvalFitness(spec)`` builds its tasks once and then evaluates candidate after candidate;
``CallableFitness(fn)`` wraps a function with the same result shape. Both implement ``Fitness``.

Names are imported on first use, so that light modules of this package (``racing``, ``result``)
can be read without importing lm-eval and torch (``evomerge status`` reads racing estimates).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AGGREGATE": "evomerge.fitness.spec",
    "CallableFitness": "evomerge.fitness.callable_fitness",
    "Direction": "evomerge.fitness.result",
    "ExampleScores": "evomerge.fitness.result",
    "Fitness": "evomerge.fitness.base",
    "FitnessResult": "evomerge.fitness.result",
    "FitnessSpec": "evomerge.fitness.spec",
    "LmEvalFitness": "evomerge.fitness.lm_eval_fitness",
    "TaskSpec": "evomerge.fitness.spec",
    "canonical_hash": "evomerge.fitness.base",
    "parse_fitness_spec": "evomerge.fitness.spec",
    "weighted_fitness": "evomerge.fitness.result",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evomerge.fitness' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
