"""Search spaces: a genome layout and its decoding into a recipe, registered by kind.

A space knows the pool it searches over (model names and paths, the base, the layer count) and
maps a genome — a vector in the unit box [0, 1]^d, which every strategy samples — to a ``Recipe``.
Keeping the unit box as the strategies' only contract means bounds and transforms live in one
place (the space), and a strategy never needs to know what a gene means.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe


@dataclass(frozen=True)
class PoolInfo:
    """What a space needs to know about the models it merges."""

    models: Mapping[str, str]
    base: str | None
    num_layers: int

    @property
    def sources(self) -> list[str]:
        return [name for name in self.models if name != self.base]


class SearchSpace(ABC):
    """A genome layout over the unit box and its decoding into recipes."""

    @property
    @abstractmethod
    def gene_names(self) -> list[str]:
        """One readable name per gene, in genome order."""

    @property
    def dimension(self) -> int:
        return len(self.gene_names)

    @abstractmethod
    def decode(self, genome: np.ndarray) -> Recipe:
        """The recipe a genome in [0, 1]^d stands for (values outside the box are clipped)."""

    def initial_genome(self) -> np.ndarray:
        """A sensible starting point (the centre of the box unless the space says otherwise)."""
        return np.full(self.dimension, 0.5)

    def check_genome(self, genome: np.ndarray) -> np.ndarray:
        """The genome as a clipped float vector of the right length, or a one-line error."""
        genome = np.asarray(genome, dtype=float)
        if genome.shape != (self.dimension,):
            raise ConfigError(f"genome: expected {self.dimension} genes, got shape {genome.shape}")
        if not np.all(np.isfinite(genome)):
            raise ConfigError("genome: contains NaN or inf")
        return np.clip(genome, 0.0, 1.0)


SpaceFactory = Callable[[Mapping[str, Any], PoolInfo, str], SearchSpace]
SPACES: dict[str, SpaceFactory] = {}


def register_space(kind: str) -> Callable[[SpaceFactory], SpaceFactory]:
    """Register a space factory ``(spec dict, pool info, source name) -> SearchSpace`` under ``kind``."""

    def wrap(factory: SpaceFactory) -> SpaceFactory:
        if kind in SPACES:
            raise ValueError(f"search space kind '{kind}' is registered twice")
        SPACES[kind] = factory
        return factory

    return wrap


def build_space(spec: Mapping[str, Any], pool: PoolInfo, source: str = "search_space") -> SearchSpace:
    """Build the space a spec describes (its ``kind`` picks the registered factory)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{source}: expected a mapping")
    kind = spec.get("kind", "parameter")
    if not isinstance(kind, str):
        raise ConfigError(f"{source}: kind: expected a search space name ({', '.join(sorted(SPACES))}), got {kind!r}")
    if kind not in SPACES:
        hint = difflib.get_close_matches(str(kind), list(SPACES), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{source}: kind: unknown search space '{kind}'{suggestion}; known: {', '.join(sorted(SPACES))}")
    return SPACES[kind](spec, pool, source)
