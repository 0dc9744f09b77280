"""Search spaces: a genome layout and the blueprints a strategy's proposals stand for, registered by kind.

A space knows the pool it searches over (model names and paths, the base, the layers and tensors)
and turns a proposal into a *blueprint* (a parameter recipe, a blend of the sources, a layer path):
a genome — a vector in the unit box [0, 1]^d, which every strategy samples — is decoded; a
proposal derived from parents (natural niches) is combined from the parents' stored blueprints; a
reference (a source alone, the base, the uniform merge) is built directly. Keeping the unit box as
the strategies' only numeric contract means bounds and transforms live in one place (the space);
what a strategy may know about the genes (their models and layers, the references) comes with the
``GenomeLayout``.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.recipe import Blueprint
from evomerge.search.layout import GenomeLayout
from evomerge.search.types import Proposal


@dataclass(frozen=True)
class PoolInfo:
    """What a space needs to know about the models it merges (read from headers, no weights).

    ``tensors`` lists the mergeable (floating) tensors of the reference model with their sizes in
    the pool's canonical order, which split-point crossovers cut.
    """

    models: Mapping[str, str]
    base: str | None
    num_layers: int
    tensors: tuple[tuple[str, int], ...] = ()

    @property
    def sources(self) -> list[str]:
        return [name for name in self.models if name != self.base]


class SearchSpace(ABC):
    """A genome layout over the unit box and the blueprints proposals stand for."""

    derives: bool = False
    """Whether the space combines parents' blueprints (``derive``); strategies that breed need it."""

    @property
    @abstractmethod
    def layout(self) -> GenomeLayout:
        """The genes, the initial point and the references, as the strategy is told."""

    @property
    def gene_names(self) -> list[str]:
        """One readable name per gene, in genome order."""
        return self.layout.names

    @property
    def dimension(self) -> int:
        return self.layout.dimension

    def initial_genome(self) -> np.ndarray:
        return self.layout.initial.copy()

    @abstractmethod
    def decode(self, genome: np.ndarray) -> Blueprint:
        """The blueprint a genome in [0, 1]^d stands for (values outside the box are clipped)."""

    def derive(self, genome: np.ndarray | None, parents: list[Blueprint]) -> Blueprint:
        """The child of ``parents`` (in the proposal's order) that ``genome`` describes."""
        raise ConfigError(f"search space {type(self).__name__} cannot derive a child from parents")

    def reference(self, name: str) -> Blueprint:
        """The blueprint of the reference ``name`` (by default: decoded from its genome)."""
        try:
            genome = self.layout.reference(name).genome
        except KeyError:
            known = ", ".join(r.name for r in self.layout.references) or "none"
            raise ConfigError(f"reference '{name}' is not expressible in this search space (references: {known})") from None
        if genome is None:
            raise ConfigError(f"reference '{name}' has no genome and the space does not build it")
        return self.decode(genome)

    def blueprint(self, proposal: Proposal, parents: Mapping[int, Blueprint]) -> Blueprint:
        """What ``proposal`` stands for: a reference, a child of its parents, or a decoded genome.

        ``parents`` maps each parent ticket to its stored blueprint (the run store keeps every
        candidate's blueprint, so a parent evicted from a population stays usable).
        """
        reference = proposal.info.get("reference")
        if reference is not None:
            return self.reference(str(reference))
        if proposal.parents:
            return self.derive(proposal.genome, [parents[ticket] for ticket in proposal.parents])
        if proposal.genome is None:
            raise ConfigError(f"proposal {proposal.ticket} has no genome, no parents and no reference")
        return self.decode(proposal.genome)

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
SPACE_BLUEPRINTS: dict[str, str] = {}
"""Space kind -> the kind of blueprint its proposals stand for (what a worker prepares to materialize)."""


def register_space(kind: str, blueprint: str = "recipe") -> Callable[[SpaceFactory], SpaceFactory]:
    """Register a space factory ``(spec dict, pool info, source name) -> SearchSpace`` under ``kind``,
    whose proposals are blueprints of kind ``blueprint``."""

    def wrap(factory: SpaceFactory) -> SpaceFactory:
        if kind in SPACES:
            raise ValueError(f"search space kind '{kind}' is registered twice")
        SPACES[kind] = factory
        SPACE_BLUEPRINTS[kind] = blueprint
        return factory

    return wrap


def space_blueprint(spec: Mapping[str, Any]) -> str:
    """The blueprint kind of the space ``spec`` describes (``recipe`` for an unknown kind: building it reports that)."""
    return SPACE_BLUEPRINTS.get(str(spec.get("kind", "parameter")), "recipe")


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
