"""The data-flow space (Sakana's DFS): which layers of which models a token goes through, and how scaled.

Akiba et al., "Evolutionary Optimization of Model Merging Recipes" (arXiv 2403.13187), §3.2. The M
layers of all models, laid out model by model, are repeated ``repeats`` = r times: T = M·r *slots*.
An indicator gene per slot says whether the slot is on the path (on when its value is above the
middle of the unit box, the paper's I_t > 0); the path visits the slots that are on, in slot order.
The hidden state entering a layer is multiplied by a scale, which the paper found essential:

- ``scaling: matrix`` — the paper's W ∈ R^{M×M}: the input of layer j is scaled by W[i, j] when it
  follows layer i (the first hop, which follows the embeddings, is not scaled);
- ``scaling: slot`` — one scale per slot (what the released EvoLLM-JP-10B stores: one per hop);
- ``scaling: none`` — no scale genes.

Scale genes map the unit box log-uniformly onto ``scale_range`` (the middle of [0.5, 2] is 1).
Options the paper uses: ``embeddings`` (the model whose embeddings, tokenizer and config the path
uses), ``head`` (final norm and output head; default the embeddings' model), ``fixed_ends`` (that
model's first and last layers always open and close the path) and ``max_layers`` (a longer path is a
failed candidate with that reason). The initial point turns on the first repetition of the
embeddings model: the search starts from that model itself, as in the paper.

Example (``search_space`` of ``experiments/dfs-demo.yaml``)::

    kind: dataflow
    repeats: 2
    scaling: slot
    embeddings: skill
    fixed_ends: true
    max_layers: 12
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import ConfigError
from evomerge.recipe import Hop, LayerPath
from evomerge.search.layout import Gene, GenomeLayout, Reference
from evomerge.spaces.base import PoolInfo, SearchSpace, register_space
from evomerge.validation import validate

ON, OFF = 0.75, 0.25
"""Unit-box values of an indicator that is on / off in the initial point and the references."""


class DataflowSpaceSpec(BaseModel):
    """The YAML form of the data-flow space (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dataflow"] = "dataflow"
    models: list[str] | None = Field(default=None, description="models whose layers form the slots, in order; default all")
    repeats: int = Field(default=3, ge=1, le=1024, description="r: the layers of all models are laid out r times")
    scaling: Literal["matrix", "slot", "none"] = "matrix"
    scale_range: tuple[float, float] = Field(default=(0.5, 2.0), description="(low, high), 0 < low < high")
    embeddings: str | None = Field(default=None, description="model of the embeddings, tokenizer, config; default the first")
    head: str | None = Field(default=None, description="model of the final norm and head; default the embeddings'")
    fixed_ends: bool = Field(default=False, description="the embeddings model's first and last layers open and close every path")
    max_layers: int | None = Field(default=None, ge=1, le=100_000, description="a path with more hops is a failed candidate")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None

    @model_validator(mode="after")
    def _range(self) -> DataflowSpaceSpec:
        low, high = self.scale_range
        if not 0.0 < low < high or not math.isfinite(high):
            raise ValueError(f"scale_range: expected 0 < low < high, got {list(self.scale_range)}")
        return self


class DataflowSpace(SearchSpace):
    """Indicator genes over T = M × r layer slots plus scale genes, decoded into a ``LayerPath``."""

    def __init__(self, spec: DataflowSpaceSpec, pool: PoolInfo, source: str = "search_space") -> None:
        self.spec = spec
        self.pool = pool
        names = list(pool.models)
        self.models = list(spec.models) if spec.models is not None else names
        for field, values in (("models", self.models), ("embeddings", [spec.embeddings]), ("head", [spec.head])):
            for name in values:
                if name is not None and name not in pool.models:
                    raise ConfigError(f"{source}: {field}: '{name}' is not a model of the experiment ({', '.join(names)})")
        if not self.models or len(set(self.models)) != len(self.models):
            raise ConfigError(f"{source}: models: expected distinct model names, got {self.models}")
        self.embeddings = spec.embeddings or self.models[0]
        self.head = spec.head or self.embeddings
        self.num_layers = pool.num_layers
        if spec.fixed_ends and self.num_layers < 2:
            raise ConfigError(f"{source}: fixed_ends: the models have {self.num_layers} layer; expected at least 2")
        self.layers = [(model, layer) for model in self.models for layer in range(self.num_layers)]  # the M layers
        self.slots = [(rep, model, layer) for rep in range(spec.repeats) for model, layer in self.layers]  # T = M·r
        self.depth = min(len(self.slots), spec.max_layers or len(self.slots))  # a longer path fails before it is assembled
        self._index = {layer: k for k, layer in enumerate(self.layers)}
        low, high = (math.log(v) for v in spec.scale_range)
        self._span = high - low
        self._one = -low / self._span  # the gene of scale 1: exp((g - one) · span) is exactly 1 there
        genes = [Gene(f"on[{m}.{i}]/r{rep}", parameter="indicator", model=m, layers=(i,)) for rep, m, i in self.slots]
        if spec.scaling == "slot":
            genes += [Gene(f"scale[{m}.{i}]/r{rep}", parameter="scale", model=m, layers=(i,)) for rep, m, i in self.slots]
        elif spec.scaling == "matrix":
            genes += [
                Gene(f"scale[{a}.{i}>{b}.{j}]", parameter="scale", model=b, layers=(j,))
                for a, i in self.layers
                for b, j in self.layers
            ]
        self._layout = GenomeLayout(tuple(genes), self._own_genome(self.embeddings))
        self._layout = replace(self._layout, references=tuple(self._references()))

    @property
    def layout(self) -> GenomeLayout:
        return self._layout

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def scale_of(self, gene: float) -> float:
        """A scale gene's value: log-uniform over ``scale_range``."""
        return math.exp((float(gene) - self._one) * self._span)

    def decode(self, genome: np.ndarray) -> LayerPath:
        x = self.check_genome(genome)
        on = x[: self.n_slots] > 0.5
        scales = x[self.n_slots :]
        hops: list[Hop] = []
        previous: int | None = None  # index of the previous hop's layer among the M layers
        if self.spec.fixed_ends:
            hops.append(Hop(model=self.embeddings, layer=0))
            previous = self._index[(self.embeddings, 0)]
        for t in np.flatnonzero(on).tolist():
            _, model, layer = self.slots[t]
            current = self._index[(model, layer)]
            hops.append(Hop(model=model, layer=layer, scale=self._scale(scales, t, previous, current)))
            previous = current
        if self.spec.fixed_ends:
            last = self._index[(self.embeddings, self.num_layers - 1)]
            scale = self._scale(scales, None, previous, last) if self.spec.scaling == "matrix" else 1.0
            hops.append(Hop(model=self.embeddings, layer=self.num_layers - 1, scale=scale))
        return self._path(self.embeddings, self.head, hops)

    def _scale(self, scales: np.ndarray, slot: int | None, previous: int | None, current: int) -> float:
        if self.spec.scaling == "slot" and slot is not None:
            return self.scale_of(scales[slot])
        if self.spec.scaling == "matrix" and previous is not None:
            return self.scale_of(scales[previous * len(self.layers) + current])
        return 1.0

    def reference(self, name: str) -> LayerPath:
        """A model alone: its own layers in order, unscaled, with its own embeddings and head."""
        if name not in self.pool.models:
            raise ConfigError(f"reference '{name}' is not a model of the pool ({', '.join(self.pool.models)})")
        hops = [Hop(model=name, layer=i) for i in range(self.num_layers)]
        return self._path(name, name, hops)

    def _references(self) -> list[Reference]:
        """Every model alone; through a genome when the space can reach it (the embeddings model
        with scales of 1 in range), else built directly."""
        references = []
        for name in self.pool.models:
            kind = "base" if name == self.pool.base else "source"
            genome = self._own_genome(name) if name == self.embeddings == self.head else None
            if genome is not None and not self.reference(name) == self.decode(genome):
                genome = None
            references.append(Reference(name, kind, genome))
        return references

    def _own_genome(self, model: str) -> np.ndarray:
        """Indicators: ``model``'s first repetition on (its ends off when fixed); scales at 1 (or mid-range)."""
        indicators = np.full(self.n_slots, OFF)
        ends = {0, self.num_layers - 1} if self.spec.fixed_ends else set()
        if model in self.models:
            for t, (rep, m, i) in enumerate(self.slots):
                if rep == 0 and m == model and i not in ends:
                    indicators[t] = ON
        count = {"slot": self.n_slots, "matrix": len(self.layers) ** 2, "none": 0}[self.spec.scaling]
        return np.concatenate([indicators, np.full(count, self._one if 0.0 <= self._one <= 1.0 else 0.5)])

    def _path(self, embeddings: str, head: str, hops: list[Hop]) -> LayerPath:
        # Names and scales were checked when the space was built: assembled without re-validation,
        # as decoding sits on the driver's per-candidate path.
        return LayerPath.model_construct(
            models=dict(self.pool.models),
            embeddings=embeddings,
            head=head,
            hops=hops,
            max_layers=self.spec.max_layers,
            dtype=self.spec.dtype,
        )


@register_space("dataflow", blueprint="path")
def _dataflow_space(spec: Mapping[str, Any], pool: PoolInfo, source: str) -> SearchSpace:
    return DataflowSpace(validate(DataflowSpaceSpec, dict(spec), source), pool, source)


__all__ = ["DataflowSpace", "DataflowSpaceSpec"]
