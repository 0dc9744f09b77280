"""Fitness: score a model already in memory (lm-eval tasks, or any Python callable).

``LmEvalFitness(spec)`` builds its tasks once and then evaluates candidate after candidate;
``CallableFitness(fn)`` wraps a function with the same result shape. Both implement ``Fitness``.
"""

from evomerge.fitness.base import Fitness, canonical_hash
from evomerge.fitness.callable_fitness import CallableFitness
from evomerge.fitness.lm_eval_fitness import LmEvalFitness
from evomerge.fitness.result import (
    Direction,
    ExampleScores,
    FitnessResult,
    weighted_fitness,
)
from evomerge.fitness.spec import AGGREGATE, FitnessSpec, TaskSpec, parse_fitness_spec

__all__ = [
    "AGGREGATE",
    "CallableFitness",
    "Direction",
    "ExampleScores",
    "Fitness",
    "FitnessResult",
    "FitnessSpec",
    "LmEvalFitness",
    "TaskSpec",
    "canonical_hash",
    "parse_fitness_spec",
    "weighted_fitness",
]
