"""Uniform random search: the baseline every other strategy is compared with."""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.search.base import ReferenceKind, Strategy, StrategySettings, references_field
from evomerge.search.layout import GenomeLayout
from evomerge.search.registry import register_strategy
from evomerge.search.types import Evaluation, Proposal


@register_strategy("random")
class RandomSearch(Strategy):
    """Genomes drawn uniformly from the box by a PCG64 generator seeded with the run seed, after the
    references (every one with several objectives, see ``Strategy.start_references``).

    Results are ignored, so the sequence of genomes is a function of the seed and the layout alone.
    """

    class Settings(StrategySettings):
        references: list[ReferenceKind] | None = references_field()

    def __init__(self, layout: GenomeLayout | int, **kwargs: Any) -> None:
        super().__init__(layout, **kwargs)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._references = self.start_references(self.settings.references)

    def determined(self) -> bool:
        """Always: no proposal depends on a result."""
        return True

    def _propose(self, ticket: int) -> Proposal:
        if ticket < len(self._references):
            reference = self._references[ticket]
            return Proposal(ticket, reference.genome.copy(), info={"reference": reference.name})
        low, high = self.bounds[:, 0], self.bounds[:, 1]
        return Proposal(ticket, low + (high - low) * self._rng.random(self.dimension))

    def _observe(self, proposal: Proposal, evaluation: Evaluation) -> None:
        """Random search learns nothing."""

    def _state(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def _load(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
