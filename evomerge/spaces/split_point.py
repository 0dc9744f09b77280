"""The split-point space (M2N2): children are crossovers of two parents along the parameter line.

Natural niches breeds merges: a child is ``slerp(A, B, t)`` over the whole flattened parameter
vector, with ``t = w`` before a split point and ``1 − w`` after it (Abrantes et al., "Competition
and Attraction Improve Model Fusion", §3.3 "crossover with a dynamic boundary"). The angle Ω is
the angle between the two parents' full vectors; SLERP falls back to lerp when sin Ω < 1e-6, as
the reference code does. The genome is the crossover itself: ``split`` (the cut as a fraction of
the canonical order) and ``ratio`` (w).

Children stay exact: a parent is a blend (per-position weights of the sources), and for fixed
Ω the crossover is linear in its parents, so the child is a blend whose weights are the parents'
weights combined with the two SLERP coefficients of its side of the cut. Ω itself needs ⟨A, B⟩,
|A| and |B|, which are quadratic forms of the parents' weights in the *Gram matrices* of the
sources over each piece of the line: per-tensor Gram matrices are computed once, and a cut inside
a tensor costs one partial dot product of that tensor (cached). So a child of any depth is one
pass over the sources, and exporting it needs the sources only.

Example (``search_space`` of ``experiments/niches-demo.yaml``)::

    kind: split_point
    interpolation: slerp          # or lerp (no angle; no pass over the weights at start)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.recipe import Blend, Blueprint, Segment, order_digest
from evomerge.search.layout import Gene, GenomeLayout, Reference
from evomerge.spaces.base import PoolInfo, SearchSpace, register_space
from evomerge.validation import validate

SIN_EPS = 1e-6
"""Below this sin Ω the parents are (anti)parallel and SLERP is replaced by lerp (reference code)."""


class SplitPointSpaceSpec(BaseModel):
    """The YAML form of the split-point space."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["split_point"] = "split_point"
    interpolation: Literal["slerp", "lerp"] = Field("slerp", description="SLERP with the parents' angle, or plain lerp")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class SplitPointSpace(SearchSpace):
    """Blends of the pool's models, bred by split-point crossover; see the module docstring."""

    derives = True

    def __init__(self, spec: SplitPointSpaceSpec, pool: PoolInfo, source: str = "search_space") -> None:
        if not pool.tensors:
            raise ConfigError(f"{source}: the pool has no floating tensors to blend")
        self.spec = spec
        self.pool = pool
        self.order = tuple(pool.tensors)
        self.digest = order_digest(self.order)
        self.size = sum(numel for _, numel in self.order)
        self.reference_model = pool.base if pool.base is not None else pool.sources[0]
        self._gram: GramCache | None = None
        genes = (Gene("split", parameter="split"), Gene("ratio", parameter="ratio"))
        self._layout = GenomeLayout(genes, np.array([1.0, 0.5]), tuple(self._references()))

    @property
    def layout(self) -> GenomeLayout:
        return self._layout

    def _references(self) -> list[Reference]:
        """Every source alone, the base, the uniform merge: blends of one segment (which seed a
        population is the strategy's choice)."""
        references = [Reference(name, "source") for name in self.pool.sources]
        if self.pool.base is not None:
            references.append(Reference(self.pool.base, "base"))
        if len(self.pool.sources) > 1:
            references.append(Reference("uniform", "uniform"))
        return references

    def decode(self, genome: np.ndarray) -> Blueprint:
        raise ConfigError(
            "search space split_point: a genome alone is a crossover without parents; "
            "use a strategy that breeds (natural_niches)"
        )

    def reference(self, name: str) -> Blend:
        if name == "uniform":
            weights = {m: 1.0 / len(self.pool.sources) for m in self.pool.sources}
        elif name in self.pool.models:
            weights = {name: 1.0}
        else:
            raise ConfigError(f"reference '{name}' is not a model of the pool ({', '.join(self.pool.models)})")
        return self._blend([Segment(start=0, weights=weights)])

    def derive(self, genome: np.ndarray | None, parents: list[Blueprint]) -> Blend:
        """The child of one parent (a copy: crossover off) or of two (split-point SLERP)."""
        blends = [self._check_parent(p) for p in parents]
        if len(blends) == 1:
            return blends[0]
        if len(blends) != 2 or genome is None:
            raise ConfigError(f"split_point: a crossover needs two parents and a genome, got {len(blends)} parent(s)")
        a, b = blends
        x = self.check_genome(genome)
        split = min(int(math.floor(x[0] * self.size)), self.size)
        w = float(x[1])
        coefficients = self._coefficients(a, b)
        cuts = sorted({s.start for s in a.segments} | {s.start for s in b.segments} | ({split} if 0 < split < self.size else set()))
        segments: list[Segment] = []
        for start in cuts:
            t = w if start < split else 1.0 - w
            ca, cb = coefficients(t)
            wa, wb = _weights_at(a, start), _weights_at(b, start)
            weights = {m: ca * wa.get(m, 0.0) + cb * wb.get(m, 0.0) for m in self.pool.models if m in wa or m in wb}
            if segments and segments[-1].weights == weights:
                continue
            segments.append(Segment(start=start, weights=weights))
        return self._blend(segments)

    def _coefficients(self, a: Blend, b: Blend) -> Any:
        """t ↦ (scale of A, scale of B): SLERP with the parents' angle, or lerp."""
        if self.spec.interpolation == "slerp":
            omega = self._angle(a, b)
            sin_omega = math.sin(omega)
            if sin_omega > SIN_EPS:
                return lambda t: (math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega)
        return lambda t: (1.0 - t, t)

    def _angle(self, a: Blend, b: Blend) -> float:
        """Ω = arccos(⟨A, B⟩ / (|A| |B|)) over the whole parameter vectors."""
        if self._gram is None:
            self._gram = GramCache(self.pool, self.order)
        names = list(self.pool.models)
        ab = aa = bb = 0.0
        cuts = sorted({s.start for s in a.segments} | {s.start for s in b.segments}) + [self.size]
        for lo, hi in zip(cuts, cuts[1:]):
            g = self._gram.between(lo, hi)
            va = np.array([_weights_at(a, lo).get(m, 0.0) for m in names])
            vb = np.array([_weights_at(b, lo).get(m, 0.0) for m in names])
            ab += float(va @ g @ vb)
            aa += float(va @ g @ va)
            bb += float(vb @ g @ vb)
        if aa <= 0.0 or bb <= 0.0:
            return 0.0
        return math.acos(min(1.0, max(-1.0, ab / math.sqrt(aa * bb))))

    def _check_parent(self, parent: Blueprint) -> Blend:
        if not isinstance(parent, Blend):
            raise ConfigError(f"split_point: a parent is a {type(parent).__name__}, expected a blend")
        if parent.order != self.digest or parent.size != self.size:
            raise ConfigError("split_point: a parent blend was made over another parameter order (another pool)")
        return parent

    def _blend(self, segments: list[Segment]) -> Blend:
        return Blend(
            models=dict(self.pool.models),
            reference=self.reference_model,
            order=self.digest,
            size=self.size,
            segments=segments,
            dtype=self.spec.dtype,
        )


def _weights_at(blend: Blend, position: int) -> Mapping[str, float]:
    """The weights of the segment that holds ``position``."""
    starts = [s.start for s in blend.segments]
    return blend.segments[int(np.searchsorted(starts, position, side="right")) - 1].weights


class GramCache:
    """Gram matrices ⟨θ_i, θ_j⟩ of the pool's models over any range of the canonical order.

    Per-tensor matrices are computed on first use in one pass over the models; a range that starts
    or ends inside a tensor adds the partial matrix of that tensor's prefix (cached per cut).
    """

    def __init__(self, pool: PoolInfo, order: Sequence[tuple[str, int]]) -> None:
        self.pool = pool
        self.order = list(order)
        self.offsets = np.cumsum([0] + [numel for _, numel in self.order])
        self._prefix: np.ndarray | None = None  # cumulative per-tensor Gram, shape (T + 1, n, n)
        self._partial: dict[tuple[int, int], np.ndarray] = {}
        self._models: Any = None

    def between(self, lo: int, hi: int) -> np.ndarray:
        """⟨θ_i, θ_j⟩ over positions [lo, hi)."""
        return self._upto(hi) - self._upto(lo)

    def _upto(self, position: int) -> np.ndarray:
        prefix = self._tensor_prefix()
        index = int(np.searchsorted(self.offsets, position, side="right")) - 1
        inside = position - int(self.offsets[index])
        if inside == 0:
            return prefix[index]
        key = (index, inside)
        if key not in self._partial:
            self._partial[key] = self._gram(index, inside)
        return prefix[index] + self._partial[key]

    def _tensor_prefix(self) -> np.ndarray:
        if self._prefix is None:
            grams = [self._gram(i, numel) for i, (_, numel) in enumerate(self.order)]
            self._prefix = np.concatenate([np.zeros((1, *grams[0].shape)), np.cumsum(grams, axis=0)])
        return self._prefix

    def _gram(self, index: int, count: int) -> np.ndarray:
        """The Gram matrix of the first ``count`` entries of tensor ``index``."""
        import torch

        from evomerge.merge.interpolation import dot_products
        from evomerge.pool import ModelPool

        if self._models is None:
            self._models = ModelPool.open(dict(self.pool.models), self.pool.base)
        name = self.order[index][0]
        flats = [self._models.tensor_range(model, name, 0, torch.empty(count, dtype=torch.float32)) for model in self.pool.models]
        return dot_products(flats).numpy()


@register_space("split_point", blueprint="blend")
def _split_point_space(spec: Mapping[str, Any], pool: PoolInfo, source: str) -> SearchSpace:
    return SplitPointSpace(validate(SplitPointSpaceSpec, dict(spec), source), pool, source)


__all__ = ["GramCache", "SplitPointSpace", "SplitPointSpaceSpec"]
