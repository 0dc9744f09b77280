"""Which reference models a parameter space can express, and the genomes that do.

A front that a source model alone dominates is not a front a user can trust, so multi-objective
and surrogate searches evaluate the references first and natural niches seeds its archive with
them. A reference is expressible when some genome decodes to a recipe that reproduces it: each
source alone (its weight 1, the others 0), the base (every weight 0), the uniform merge (every
weight 1/n). Other parameters take their neutral values (density 1, λ 1, ε 0, γ 0), or else
either end of their bounds. Whether a candidate genome really reproduces the reference is not
assumed from the operator's name: its recipe is run on small random tensors of every module kind
and compared with the reference, so transforms (a simplex over weights), sign elections and
sparsifiers are accounted for by the operators' own code.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.search.layout import Gene, Reference

if TYPE_CHECKING:
    from evomerge.spaces.parameter import ParameterSpace

NEUTRAL: dict[str, tuple[float, ...]] = {"density": (1.0,), "lambda": (1.0,), "epsilon": (0.0,), "gamma": (0.0,)}
_PROBES = [  # (tensor name, layer, kind): one tensor of each kind a recipe rule can select
    ("model.embed_tokens.weight", None, "embedding"),
    ("model.layers.{last}.self_attn.q_proj.weight", "last", "attention"),
    ("model.layers.0.mlp.up_proj.weight", 0, "mlp"),
    ("model.layers.0.input_layernorm.weight", 0, "norm"),
    ("model.norm.weight", None, "norm"),
    ("lm_head.weight", None, "head"),
]


def find_references(space: ParameterSpace, genes: Sequence[Gene]) -> list[Reference]:
    """The references ``space`` can express, each with the first candidate genome that reproduces it."""
    sources = list(space.sources)
    targets: list[tuple[str, str, dict[str, float]]] = [
        (name, "source", {m: float(m == name) for m in sources}) for name in sources
    ]
    if space.pool.base is not None:
        targets.append((space.pool.base, "base", {m: 0.0 for m in sources}))
    if len(sources) > 1:
        targets.append(("uniform", "uniform", {m: 1.0 / len(sources) for m in sources}))
    probe = _Probe(space, sources)
    references = []
    for name, kind, weights in targets:
        for genome in _candidates(space, genes, weights):
            if probe.reproduces(genome, kind, name):
                references.append(Reference(name, kind, genome))
                break
    return references


def _candidates(space: ParameterSpace, genes: Sequence[Gene], weights: dict[str, float]) -> list[np.ndarray]:
    """Unit genomes setting every weight as ``weights`` says and the other parameters to neutral values."""
    low, high = space.value_bounds()
    options: dict[str, list[float] | None] = {}
    for index, gene in enumerate(genes):
        if gene.parameter == "weight" and gene.model is not None:
            continue
        if gene.parameter not in options:
            options[gene.parameter or ""] = list(NEUTRAL.get(gene.parameter or "", ())) or [low[index], high[index]]
    names = list(options)
    genomes = []
    for choice in itertools.product(*(options[n] for n in names)):
        value_of = dict(zip(names, choice))
        values = np.array(
            [
                weights[g.model] if g.parameter == "weight" and g.model is not None else value_of[g.parameter or ""]
                for g in genes
            ]
        )
        genome = space.unit_genome(values)
        if genome is not None:
            genomes.append(genome)
    return genomes


class _Probe:
    """Small random tensors per model, to check that a recipe reproduces a reference."""

    def __init__(self, space: ParameterSpace, sources: list[str]) -> None:
        import torch

        self.space = space
        self.sources = sources
        generator = torch.Generator().manual_seed(0)
        base = torch.randn(4, 8, generator=generator)
        self.tensors = {m: base + 0.1 * torch.randn(4, 8, generator=generator) for m in sources}
        if space.pool.base is not None:
            self.tensors[space.pool.base] = base

    def reproduces(self, genome: np.ndarray, kind: str, name: str) -> bool:
        import torch

        from evomerge.materialize.tensors import merge_tensor
        from evomerge.recipe import RecipePlanner
        from evomerge.recipe.resolve import TensorPlan

        if kind == "uniform":
            expected = torch.stack([self.tensors[m] for m in self.sources]).mean(0)
        else:
            expected = self.tensors[name]
        recipe = self.space.decode(genome)
        layers = self.space.pool.num_layers
        try:
            planner = RecipePlanner(recipe, layers)
            for template, layer, module in _PROBES:
                index = layers - 1 if layer == "last" else layer
                tensor = template.format(last=layers - 1)
                plan: TensorPlan = planner.plan(tensor, index, module)
                merged = merge_tensor(
                    plan,
                    base=self.tensors[recipe.base] if recipe.base else None,
                    sources=[self.tensors[m] for m in recipe.source_names],
                    source_names=recipe.source_names,
                    num_layers=layers,
                    seed=recipe.seed,
                )
                if not torch.allclose(merged, expected, rtol=1e-5, atol=1e-6):
                    return False
        except EvomergeError:
            return False
        return True
