"""What a strategy is told about a genome: its genes, their meaning, and the reference points.

A strategy samples the unit box; the space maps it to a blueprint. Beyond the dimension, some
strategies need to know more: CMA-ES starts from the space's initial point, multi-objective and
surrogate searches evaluate the *references* first (each source alone, the base, the uniform
merge: the corners a front must include or dominate), natural niches seeds its archive with them,
and reports group genes by model and layer. ``GenomeLayout`` carries all of it as plain data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

REFERENCE_KINDS = ("source", "base", "uniform")


@dataclass(frozen=True)
class Gene:
    """One gene: its name, the parameter it sets, and (when it has one) its model and layers."""

    name: str
    parameter: str | None = None
    model: str | None = None
    layers: tuple[int, ...] | None = None
    filter: str | None = None


@dataclass(frozen=True)
class Reference:
    """A named reference model the space can express: a source alone, the base, or the uniform merge.

    ``genome`` is its point in the unit box when the space reaches it through a genome; ``None``
    when the space builds it directly (ask with ``Proposal(genome=None, info={"reference": name})``).
    """

    name: str
    kind: str
    genome: np.ndarray | None = None


@dataclass(frozen=True)
class GenomeLayout:
    """Genes in genome order, the initial point and the references, all in the unit box."""

    genes: tuple[Gene, ...]
    initial: np.ndarray
    references: tuple[Reference, ...] = field(default=())

    def __post_init__(self) -> None:
        initial = np.asarray(self.initial, dtype=np.float64)
        if initial.shape != (len(self.genes),):
            raise ValueError(f"initial point has shape {initial.shape}, expected ({len(self.genes)},)")
        object.__setattr__(self, "initial", initial)
        for reference in self.references:
            if reference.kind not in REFERENCE_KINDS:
                raise ValueError(f"reference {reference.name}: kind {reference.kind!r} is not one of {REFERENCE_KINDS}")
            if reference.genome is not None and np.shape(reference.genome) != (len(self.genes),):
                raise ValueError(f"reference {reference.name}: genome has shape {np.shape(reference.genome)}")

    @classmethod
    def box(cls, dimension: int, names: Sequence[str] | None = None, references: Sequence[Reference] = ()) -> GenomeLayout:
        """A plain layout: ``dimension`` anonymous genes starting at the centre of the box."""
        names = list(names) if names is not None else [f"x{i}" for i in range(dimension)]
        return cls(tuple(Gene(name) for name in names), np.full(dimension, 0.5), tuple(references))

    @property
    def dimension(self) -> int:
        return len(self.genes)

    @property
    def names(self) -> list[str]:
        return [gene.name for gene in self.genes]

    def reference(self, name: str) -> Reference:
        for reference in self.references:
            if reference.name == name:
                return reference
        raise KeyError(name)

    def references_of(self, kinds: Sequence[str] = REFERENCE_KINDS) -> list[Reference]:
        """The references whose kind is in ``kinds``, in layout order."""
        return [r for r in self.references if r.kind in kinds]

    def describe(self) -> Mapping[str, object]:
        """A JSON-ready summary (stored with the run: which gene is which)."""
        return {
            "genes": [
                {k: v for k, v in vars(g).items() if v is not None} | ({"layers": list(g.layers)} if g.layers else {})
                for g in self.genes
            ],
            "references": [{"name": r.name, "kind": r.kind, "genome": r.genome is not None} for r in self.references],
        }
