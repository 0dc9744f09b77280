"""The one interface every fitness implements: score a resident model, describe yourself."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

from evomerge.fitness.racing import Bar
from evomerge.fitness.result import FitnessResult


class Fitness(ABC):
    """Scores a model already in memory. ``describe()`` keys the fitness cache, so it must name
    everything that changes the scores and nothing that does not (paths, devices, batch sizes)."""

    @abstractmethod
    def evaluate(self, model: Any, tokenizer: Any, bar: Bar | None = None) -> FitnessResult:
        """Score ``model`` as it is now; weights changed in place since the last call count.

        ``bar`` is what the candidate must be able to reach (the incumbent or the front): a fitness
        that races may stop early once it cannot and return an estimate (``FitnessResult.estimate``);
        one that does not race scores every example whatever the bar.
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-serializable, stable description of what this fitness measures."""

    def spec_hash(self) -> str:
        """SHA-256 of the canonical JSON of ``describe()``."""
        return canonical_hash(self.describe())


def canonical_hash(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
