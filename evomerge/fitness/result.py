"""What one evaluation of one candidate produced; the run store keeps it as is.

Per-example scores are kept next to the aggregates because natural niches (M2N2) share fitness per
example and Pareto analysis compares candidates example by example.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from evomerge.errors import ConfigError
from evomerge.fitness.racing import Estimate
from evomerge.fitness.spec import AGGREGATE

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class ExampleScores:
    """One task's per-example scores, in ascending doc-id order (doc ids index the task's split)."""

    doc_ids: tuple[int, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.doc_ids) != len(self.scores):
            raise ValueError(f"{len(self.doc_ids)} doc ids but {len(self.scores)} scores")
        if any(b <= a for a, b in zip(self.doc_ids, self.doc_ids[1:])):
            raise ValueError("doc ids must be strictly increasing")

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.doc_ids, self.scores))


@dataclass(frozen=True)
class FitnessResult:
    """Objectives (one per task plus the weighted aggregate ``fitness``) and how they were obtained.

    ``timings`` holds seconds: ``total`` for the whole evaluation, ``forward`` inside the model's
    forward passes, ``overhead`` the rest (total - forward: prompts, scoring, and the generation loop
    around the forward passes) and, for lm-eval, ``generate`` inside Hugging Face's ``generate``
    (its forward passes included), which separates that loop from lm-eval's own work.

    ``estimate`` is set when racing stopped the evaluation early: the objectives are then means of
    the examples scored (``n_examples`` counts them), and per-example scores are NaN where unscored.
    """

    objectives: dict[str, float]
    directions: dict[str, Direction]
    per_example: dict[str, ExampleScores] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    n_examples: dict[str, int] = field(default_factory=dict)
    estimate: Estimate | None = None

    @property
    def fitness(self) -> float:
        return self.objectives[AGGREGATE]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict`` inverts it exactly."""
        return {
            "objectives": dict(self.objectives),
            "directions": dict(self.directions),
            "per_example": {
                name: {"doc_ids": list(ex.doc_ids), "scores": list(ex.scores)} for name, ex in self.per_example.items()
            },
            "timings": dict(self.timings),
            "n_examples": dict(self.n_examples),
            "estimate": None if self.estimate is None else {"examples": self.estimate.examples, "total": self.estimate.total},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FitnessResult:
        return cls(
            objectives={k: float(v) for k, v in data["objectives"].items()},
            directions=dict(data["directions"]),
            per_example={
                name: ExampleScores(tuple(int(i) for i in ex["doc_ids"]), tuple(float(s) for s in ex["scores"]))
                for name, ex in data.get("per_example", {}).items()
            },
            timings={k: float(v) for k, v in data.get("timings", {}).items()},
            n_examples={k: int(v) for k, v in data.get("n_examples", {}).items()},
            estimate=None if data.get("estimate") is None else Estimate(**data["estimate"]),
        )


def weighted_fitness(
    objectives: Mapping[str, float], directions: Mapping[str, Direction], weights: Mapping[str, float]
) -> float:
    """The aggregate to maximize: sum_i w_i * s_i * v_i / sum_i w_i, with s_i = -1 for minimized objectives.

    A weighted mean keeps the aggregate on the metrics' own scale (two accuracies with equal weights
    give their mean); flipping the sign of minimized objectives makes higher always better.
    """
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(f"fitness weights: expected at least one weight > 0, got {dict(weights)}")
    acc = 0.0
    for name, weight in weights.items():
        if name not in objectives:
            raise ConfigError(f"fitness weights: '{name}' is not an objective; objectives: {sorted(objectives)}")
        sign = -1.0 if directions[name] == "minimize" else 1.0
        acc += weight * sign * objectives[name]
    return acc / total


def finalize(
    objectives: Mapping[str, float],
    directions: Mapping[str, Direction],
    weights: Mapping[str, float],
    per_example: Mapping[str, ExampleScores],
    timings: Mapping[str, float],
    n_examples: Mapping[str, int],
    estimate: Estimate | None = None,
) -> FitnessResult:
    """Assemble a result, adding the weighted aggregate ``fitness`` (always maximized)."""
    values = {name: float(v) for name, v in objectives.items()}
    if AGGREGATE in values:
        raise ConfigError(f"fitness: the objective name '{AGGREGATE}' is reserved for the weighted aggregate")
    values[AGGREGATE] = weighted_fitness(values, directions, weights)
    return FitnessResult(
        objectives=values,
        directions={**directions, AGGREGATE: "maximize"},
        per_example=dict(per_example),
        timings=dict(timings),
        n_examples=dict(n_examples),
        estimate=estimate,
    )
