"""A blend: whole models weighted position by position over the pool's canonical parameter order.

What natural-niches crossovers make. Every floating parameter of the reference model, in stored
order, is laid end to end (the *canonical order*); a blend cuts that line into segments and gives
each segment one weight per model: the merged value at position p is Σ_m w_m(p) · θ_m(p). A split
point is a cut anywhere on the line, inside a tensor if it falls there, so a tensor may be made of
several pieces. Children of blends are blends again (crossover is linear in the parents once its
coefficients are known), so a member a hundred generations deep is still one pass over the sources.

Example::

    kind: blend
    models: {skill: zoo/skill_add_a, lang: zoo/lang_qa_b}
    reference: skill
    order: 3f1c…          # digest of the canonical order; a pool with another layout is refused
    size: 1293568
    segments:
      - {start: 0, weights: {skill: 0.7, lang: 0.3}}
      - {start: 402113, weights: {skill: 0.45, lang: 0.55}}
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.pool.sources import Reference, resolve_models


def order_digest(order: Sequence[tuple[str, int]]) -> str:
    """A short digest of a canonical order (tensor names and sizes, in order)."""
    text = "\n".join(f"{name}:{numel}" for name, numel in order)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class Segment(BaseModel):
    """Positions from ``start`` to the next segment's start, merged with ``weights``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=0)
    weights: dict[str, float]


class Blend(BaseModel):
    """Per-position weights of whole models; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["blend"] = "blend"
    models: dict[str, Reference] = Field(description="model name -> folder, org/name@revision or model+adapter")
    reference: str = Field(description="the model whose layout, config, tokenizer and non-float tensors are used")
    order: str = Field(description="digest of the canonical order the positions refer to")
    size: int = Field(gt=0, description="number of positions (floating parameters)")
    segments: list[Segment] = Field(min_length=1)
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(default=None, description="output dtype")

    @model_validator(mode="after")
    def _consistent(self) -> Blend:
        if self.reference not in self.models:
            raise ValueError(f"reference: '{self.reference}' is not one of the models ({', '.join(self.models)})")
        if self.segments[0].start != 0:
            raise ValueError(f"segments[0].start: expected 0, got {self.segments[0].start}")
        for i, (a, b) in enumerate(zip(self.segments, self.segments[1:]), start=1):
            if b.start <= a.start:
                raise ValueError(f"segments[{i}].start: expected > {a.start}, got {b.start}")
        if self.segments[-1].start >= self.size:
            raise ValueError(f"segments[-1].start: expected < size {self.size}, got {self.segments[-1].start}")
        for i, segment in enumerate(self.segments):
            for name in segment.weights:
                if name not in self.models:
                    raise ValueError(f"segments[{i}].weights: '{name}' is not one of the models ({', '.join(self.models)})")
        return self

    @property
    def tokenizer_source(self) -> str:
        return self.reference

    @property
    def source_names(self) -> list[str]:
        """Models with a non-zero weight somewhere, in ``models`` order."""
        used = {name for s in self.segments for name, w in s.weights.items() if w != 0.0}
        return [name for name in self.models if name in used]

    def pieces(self, offset: int, numel: int) -> Iterator[tuple[int, int, dict[str, float]]]:
        """The (start, end, weights) pieces of the tensor at ``[offset, offset + numel)``, tensor-relative."""
        end = offset + numel
        starts = [s.start for s in self.segments] + [self.size]
        for segment, stop in zip(self.segments, starts[1:]):
            lo, hi = max(segment.start, offset), min(stop, end)
            if lo < hi:
                yield lo - offset, hi - offset, segment.weights
            if stop >= end:
                break

    def resolve_models(self, root: Path, source: str = "recipe") -> Blend:
        """A copy whose model references are pinned, as ``Recipe.resolve_models`` pins them."""
        resolved = resolve_models(self.models, roots=[root, Path.cwd()], where=f"{source}: models", require_folder=False)
        return self.model_copy(update={"models": {name: src.ref for name, src in resolved.items()}})

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data = {"kind": "blend", **data}
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
