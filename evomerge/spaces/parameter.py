"""The parameter space: per layer group × module filter × source model, the operator's parameters.

This is Sakana's parameter-space (PS) search and everything mergekit-evolve's genome expresses.
Layers are cut into groups of ``layer_granularity`` blocks; each group and each *filter* (a set of
module kinds or a tensor-name substring) gets its own genes: ``model_genes`` once per source model
(weight, density, …) and ``shared_genes`` once (λ, t, …). Tensors outside the blocks (embeddings,
final norm, head) get their own "outside" set of genes, which also covers block tensors that no
filter selects. With ``filters: []`` there is no per-layer rule at all: one set of genes for every
tensor, i.e. global coefficients (``search_spaces/task-arithmetic-global.yaml``, the few-gene space
MAP's quadratics need). With ``smooth: true`` a gene is instead ``anchors`` values per filter, interpolated
across all layers (a gradient), so the dimension no longer grows with depth.

Example (``search_spaces/ties-per-layer.yaml``)::

    kind: parameter
    method: ties
    layer_granularity: 1
    filters: [attention, mlp, rest]
    model_genes:
      weight: {low: 0.0, high: 1.5}
      density: {low: 0.1, high: 1.0}
    fixed: {normalize: true}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.merge import get_operator
from evomerge.recipe import Recipe, Rule
from evomerge.recipe.schema import Scalar
from evomerge.search.layout import Gene, GenomeLayout
from evomerge.spaces.base import PoolInfo, SearchSpace, register_space
from evomerge.spaces.references import find_references
from evomerge.validation import validate

Kind = Literal["attention", "mlp", "norm", "embedding", "head", "other"]
BUILTIN_FILTERS: dict[str, list[str] | None] = {
    "all": None,
    "attention": ["attention"],
    "mlp": ["mlp"],
    "norm": ["norm"],
    "rest": ["norm", "other"],
}


class GeneSpec(BaseModel):
    """Bounds and transform of one searched parameter."""

    model_config = ConfigDict(extra="forbid")

    low: float = Field(default=0.0, allow_inf_nan=False)
    high: float = Field(default=1.0, allow_inf_nan=False)
    transform: Literal["none", "abs", "simplex"] = Field(
        default="none", description="simplex: normalise across source models to sum 1"
    )
    init: float | None = Field(
        default=None, allow_inf_nan=False, description="starting value; default the middle of [low, high]"
    )

    @model_validator(mode="after")
    def _bounds(self) -> GeneSpec:
        if not self.low < self.high:
            raise ValueError(f"expected low < high, got low={self.low}, high={self.high}")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init: expected a value in [{self.low}, {self.high}], got {self.init}")
        return self


class FilterSpec(BaseModel):
    """A user-defined module filter: by kinds, by a tensor-name substring, or both."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kinds: list[Kind] | None = None
    names: str | None = None


class ParameterSpaceSpec(BaseModel):
    """The YAML form of a parameter space (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["parameter"] = "parameter"
    method: str
    layer_granularity: int = Field(default=1, ge=0, description="blocks per group; 0 = one group for all blocks")
    filters: list[Union[str, FilterSpec]] = Field(
        default_factory=lambda: ["all"], description="[] = no per-layer rules: global genes for every tensor"
    )
    smooth: bool = False
    anchors: int = Field(default=3, ge=2, le=1024, description="smooth mode: anchor values per gene")
    model_genes: dict[str, GeneSpec] = Field(default_factory=dict)
    shared_genes: dict[str, GeneSpec] = Field(default_factory=dict)
    fixed: dict[str, Scalar] = Field(default_factory=dict)
    fixed_model: dict[str, Scalar] = Field(default_factory=dict, description="per-source values shared by all sources")
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] | None = None

    @model_validator(mode="after")
    def _filters(self) -> ParameterSpaceSpec:
        seen = set()
        for item in self.filters:
            name = item if isinstance(item, str) else item.name
            if isinstance(item, str) and item not in BUILTIN_FILTERS:
                raise ValueError(
                    f"filters: unknown filter '{item}'; built-in: {', '.join(BUILTIN_FILTERS)} "
                    "(or {name, kinds, names})"
                )
            if name in seen:
                raise ValueError(f"filters: '{name}' appears twice")
            seen.add(name)
        if not self.model_genes and not self.shared_genes:
            raise ValueError("expected at least one gene in model_genes or shared_genes")
        return self


class _Block:
    """Where a run of genes goes in the recipe: a rule selector (None: the top level)."""

    def __init__(self, label: str, selector: dict[str, Any] | None, filter: str | None = None):
        self.label = label
        self.selector = selector
        self.filter = filter


class ParameterSpace(SearchSpace):
    """Per group × filter × model genes decoded into recipe rules."""

    def __init__(self, spec: ParameterSpaceSpec, pool: PoolInfo, source: str = "search_space"):
        self.spec = spec
        self.pool = pool
        operator = get_operator(spec.method, f"{source}.method")
        operator.check_keys(spec.model_genes, operator.per_source, f"{source}.model_genes")
        operator.check_keys(spec.shared_genes, operator.shared, f"{source}.shared_genes")
        operator.check_keys(spec.fixed, operator.shared, f"{source}.fixed")
        operator.check_keys(spec.fixed_model, operator.per_source, f"{source}.fixed_model")
        operator.check_arity(len(pool.sources), pool.base is not None, source)
        self.sources = pool.sources
        self._blocks = self._layout_blocks()
        self._names: list[str] = []
        self._low: list[float] = []
        self._high: list[float] = []
        self._init: list[float] = []
        self._abs: list[int] = []
        self._simplex: list[list[int]] = []
        self._slots: list[tuple[int, str, str | None, int | None]] = []  # (block, gene, model, anchor)
        self._genes: list[Gene] = []
        self._build_layout()
        self._low_arr, self._span = np.array(self._low), np.array(self._high) - np.array(self._low)
        self._layout = GenomeLayout(tuple(self._genes), np.array(self._init))
        self._layout = replace(self._layout, references=tuple(find_references(self, self._genes)))

    @property
    def layout(self) -> GenomeLayout:
        return self._layout

    def gene_values(self, genome: np.ndarray) -> np.ndarray:
        """The parameter values a unit-box genome stands for (after bounds and transforms)."""
        values = self._low_arr + self.check_genome(genome) * self._span
        values[self._abs] = np.abs(values[self._abs])
        for group in self._simplex:
            total = values[group].sum()
            values[group] = values[group] / total if total > 0 else 1.0 / len(group)
        return values

    def value_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Each gene's (low, high) in parameter units."""
        return self._low_arr.copy(), self._low_arr + self._span

    def unit_genome(self, values: np.ndarray) -> np.ndarray | None:
        """The unit-box genome of raw gene values (before transforms), or None outside the bounds."""
        genome = (np.asarray(values, dtype=np.float64) - self._low_arr) / self._span
        return genome if np.all((genome >= 0.0) & (genome <= 1.0)) else None

    def decode(self, genome: np.ndarray) -> Recipe:
        values = self.gene_values(genome)
        shared: list[dict[str, Any]] = [dict() for _ in self._blocks]
        per_model: list[dict[str, dict[str, Any]]] = [{m: {} for m in self.sources} for _ in self._blocks]
        for value, (block, gene, model, anchor) in zip(values.tolist(), self._slots):
            target = shared[block] if model is None else per_model[block][model]
            if anchor is None:
                target[gene] = value
            else:
                target.setdefault(gene, []).append(value)
        fixed_model = {m: dict(self.spec.fixed_model) for m in self.sources}
        top_models = {m: {**fixed_model[m], **per_model[0][m]} for m in self.sources}
        rules = [
            Rule.model_construct(
                **sel.selector,
                parameters=shared[block],
                model_parameters={m: v for m, v in per_model[block].items() if v},
            )
            for block, sel in enumerate(self._blocks)
            if sel.selector is not None
        ]
        # The layout was validated when the space was built, so the recipe is assembled without
        # re-validating it: decoding sits on the driver's per-candidate path.
        return Recipe.model_construct(
            models=dict(self.pool.models),
            base=self.pool.base,
            method=self.spec.method,
            parameters={**self.spec.fixed, **shared[0]},
            model_parameters={m: v for m, v in top_models.items() if v},
            rules=rules,
            seed=self.spec.seed,
            dtype=self.spec.dtype,
        )

    def _layout_blocks(self) -> list[_Block]:
        blocks = [_Block("outside" if self.spec.filters else "global", None)]
        filters = [(f, BUILTIN_FILTERS[f], None) if isinstance(f, str) else (f.name, f.kinds, f.names) for f in self.spec.filters]
        if self.spec.smooth:
            groups = [("all", "all")]
        else:
            size = self.spec.layer_granularity or self.pool.num_layers
            groups = []
            for start in range(0, self.pool.num_layers, size):
                layers = list(range(start, min(start + size, self.pool.num_layers)))
                label = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
                groups.append((label, layers))
        for label, layers in groups:
            for name, kinds, names in filters:
                selector: dict[str, Any] = {"layers": layers}
                if kinds is not None:
                    selector["kinds"] = kinds
                if names is not None:
                    selector["names"] = names
                blocks.append(_Block(f"{label}/{name}" if label != "all" else name, selector, name))
        return blocks

    def _build_layout(self) -> None:
        for index, block in enumerate(self._blocks):
            anchors = [None] if (block.selector is None or not self.spec.smooth) else list(range(self.spec.anchors))
            for anchor in anchors:
                suffix = f"/{block.label}" + (f"/a{anchor}" if anchor is not None else "")
                for gene, g in self.spec.shared_genes.items():
                    self._add(f"{gene}{suffix}", g, (index, gene, None, anchor))
                for gene, g in self.spec.model_genes.items():
                    members = []
                    for model in self.sources:
                        members.append(len(self._names))
                        self._add(f"{gene}[{model}]{suffix}", g, (index, gene, model, anchor))
                    if g.transform == "simplex":
                        self._simplex.append(members)

    def _add(self, name: str, gene: GeneSpec, slot: tuple[int, str, str | None, int | None]) -> None:
        self._names.append(name)
        self._low.append(gene.low)
        self._high.append(gene.high)
        init = gene.init if gene.init is not None else (gene.low + gene.high) / 2
        self._init.append((init - gene.low) / (gene.high - gene.low))
        if gene.transform == "abs":
            self._abs.append(len(self._names) - 1)
        self._slots.append(slot)
        block = self._blocks[slot[0]]
        layers = None if block.selector is None else tuple(block.selector["layers"])
        self._genes.append(Gene(name, parameter=slot[1], model=slot[2], layers=layers, filter=block.filter))


@register_space("parameter")
def _parameter_space(spec: Mapping[str, Any], pool: PoolInfo, source: str) -> SearchSpace:
    return ParameterSpace(validate(ParameterSpaceSpec, dict(spec), source), pool, source)


__all__ = ["FilterSpec", "GeneSpec", "ParameterSpace", "ParameterSpaceSpec"]
