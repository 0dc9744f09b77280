"""The two messages between a strategy and the rest of the system: a proposal and its evaluation.

They are plain data so that the run store can persist them and hand them back unchanged on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class Proposal:
    """One candidate a strategy asks to be evaluated.

    ``ticket`` is unique within a strategy (and so within a run) and is the candidate's id
    everywhere. ``genome`` lies in the strategy's box (the space's unit box unless other bounds were
    declared); it is ``None`` for strategies that derive a child from archive members instead of
    sampling a vector: then ``parents`` holds the members' tickets and ``info`` how to combine them.
    ``info`` is JSON-serializable strategy data (generation, restart, split point, ...).
    """

    ticket: int
    genome: np.ndarray | None
    parents: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def same_as(self, other: Proposal) -> bool:
        """Bitwise equality (genome bytes, parents, info): how a replayed ask is verified."""
        if self.ticket != other.ticket or tuple(self.parents) != tuple(other.parents) or self.info != other.info:
            return False
        if self.genome is None or other.genome is None:
            return self.genome is None and other.genome is None
        return self.genome.shape == other.genome.shape and self.genome.tobytes() == other.genome.tobytes()


@dataclass(frozen=True, eq=False)
class Evaluation:
    """The outcome of evaluating one proposal.

    ``objectives`` follow the maximize convention (the driver flips minimized metrics).
    ``per_example`` is one score per example (every task's examples concatenated, in objective
    order) and ``example_ids`` names them (``task:doc_id``), the same ids for every candidate of a
    run: natural niches shares fitness example by example. NaN or ±inf objectives count as a
    failure (``sanitized``).
    """

    ticket: int
    objectives: np.ndarray
    failed: bool = False
    per_example: np.ndarray | None = None
    example_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.example_ids is not None and (self.per_example is None or len(self.example_ids) != np.size(self.per_example)):
            raise ValueError(f"evaluation {self.ticket}: {len(self.example_ids)} example ids for {np.size(self.per_example)} scores")

    @classmethod
    def failure(cls, ticket: int, n_objectives: int) -> Evaluation:
        """A failed evaluation with NaN objectives (the candidate raised, timed out or was lost)."""
        return cls(ticket, np.full(n_objectives, np.nan), failed=True)

    def sanitized(self) -> Evaluation:
        """This evaluation as float64 objectives, marked failed if any objective is not finite."""
        objectives = np.asarray(self.objectives, dtype=np.float64).reshape(-1)
        failed = bool(self.failed or not np.all(np.isfinite(objectives)))
        return replace(self, objectives=objectives, failed=failed)
