"""A layer path: the data-flow merge of Sakana's DFS — which layers a token goes through, in order.

No weight is merged. The model is a sequence of *hops*, each one block (a decoder layer) of one of
the models, with a scale applied to the hidden state entering it; the embeddings (with the
tokenizer and the config) come from one model, the final norm and the output head from one model.
A layer may appear several times. Scales are positive: the export folds them into the weights,
which a sign flip would break (``evomerge.materialize.path_export``).

A path is stored whatever its length: a path with no hop, or longer than ``max_layers``, is a
candidate that fails with that reason when materialized (``problem``), not a malformed blueprint.

Example::

    kind: path
    models: {skill: zoo/skill_add_a, lang: zoo/lang_qa_b}
    embeddings: skill                 # embeddings, tokenizer and config
    head: skill                       # final norm and output head (default: the embeddings' model)
    hops:
      - {model: skill, layer: 0}
      - {model: lang, layer: 1, scale: 1.2}
      - {model: skill, layer: 1, scale: 0.9}
    max_layers: 24
"""

from __future__ import annotations

from itertools import accumulate
from operator import mul
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import ConfigError
from evomerge.pool.sources import Reference, resolve_models


class Hop(BaseModel):
    """One block of the path: layer ``layer`` of ``model``, its input multiplied by ``scale``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    layer: int = Field(ge=0)
    scale: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)


class LayerPath(BaseModel):
    """Hops through the layers of the pool's models; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["path"] = "path"
    models: dict[str, Reference] = Field(description="model name -> folder, org/name@revision or model+adapter")
    embeddings: str = Field(description="the model whose embeddings, tokenizer and config the path uses")
    head: str | None = Field(default=None, description="the model whose final norm and head the path uses; default: embeddings")
    hops: list[Hop] = Field(default_factory=list)
    max_layers: int | None = Field(default=None, ge=1, description="a longer path fails when materialized")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(default=None, description="output dtype")

    @model_validator(mode="after")
    def _names_exist(self) -> LayerPath:
        known = ", ".join(self.models)
        for field, name in (("embeddings", self.embeddings), ("head", self.head)):
            if name is not None and name not in self.models:
                raise ValueError(f"{field}: '{name}' is not one of the models ({known})")
        for i, hop in enumerate(self.hops):
            if hop.model not in self.models:
                raise ValueError(f"hops[{i}].model: '{hop.model}' is not one of the models ({known})")
        return self

    @property
    def reference(self) -> str:
        """The model whose config, tokenizer and embeddings the path follows."""
        return self.embeddings

    @property
    def head_model(self) -> str:
        return self.head if self.head is not None else self.embeddings

    @property
    def tokenizer_source(self) -> str:
        return self.embeddings

    @property
    def source_names(self) -> list[str]:
        """Models the path reads anything from, in ``models`` order."""
        used = {self.embeddings, self.head_model} | {hop.model for hop in self.hops}
        return [name for name in self.models if name in used]

    @property
    def scaled(self) -> bool:
        return any(hop.scale != 1.0 for hop in self.hops)

    def cumulative_scales(self) -> list[float]:
        """C_j = s_1 · … · s_j for every hop j: the factor by which the scaled stream after hop j
        exceeds the stream of the same path without scales (what the export divides out)."""
        return list(accumulate((hop.scale for hop in self.hops), mul))

    def problem(self) -> str | None:
        """Why this path cannot be materialized (no hop, too many hops), or None."""
        if not self.hops:
            return "path: no layer selected (0 hops)"
        if self.max_layers is not None and len(self.hops) > self.max_layers:
            return f"path: {len(self.hops)} hops exceed max_layers {self.max_layers}"
        return None

    def check(self, num_layers: dict[str, int] | None = None) -> None:
        """Raise a one-line ``ConfigError`` if the path cannot be materialized (``num_layers``: per model)."""
        problem = self.problem()
        if problem is not None:
            raise ConfigError(problem)
        for i, hop in enumerate(self.hops):
            count = (num_layers or {}).get(hop.model)
            if count is not None and hop.layer >= count:
                raise ConfigError(f"path: hops[{i}]: model '{hop.model}' has {count} layers, there is no layer {hop.layer}")

    def resolve_models(self, root: Path, source: str = "recipe") -> LayerPath:
        """A copy whose model references are pinned, as ``Recipe.resolve_models`` pins them."""
        resolved = resolve_models(self.models, roots=[root, Path.cwd()], where=f"{source}: models", require_folder=False)
        return self.model_copy(update={"models": {name: src.ref for name, src in resolved.items()}})

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data = {"kind": "path", **data}
        data["hops"] = [{k: v for k, v in hop.items() if not (k == "scale" and v == 1.0)} for hop in data.get("hops", [])]
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def spans(self) -> list[tuple[str, int, int]]:
        """The path as runs of consecutive layers of one model: (model, first, last), in order."""
        runs: list[tuple[str, int, int]] = []
        for hop in self.hops:
            if runs and runs[-1][0] == hop.model and runs[-1][2] + 1 == hop.layer:
                runs[-1] = (hop.model, runs[-1][1], hop.layer)
            else:
                runs.append((hop.model, hop.layer, hop.layer))
        return runs
