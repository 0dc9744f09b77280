"""The recipe: a plain, serializable description of one merged model.

A recipe names its models (local folders, Hugging Face ids ``org/name@revision``, LoRA sources
``model+adapter`` or ``{model: ..., lora: ...}``: see ``evomerge.pool.sources``), the base, a merge
method with its parameters, and *rules* that override the method or parameters for some layers, module kinds or
tensor names. A parameter value is

- a scalar (``0.5``),
- a gradient (``[0.0, 1.0]``): anchors interpolated linearly across the layers a rule covers
  (a list with one value per layer is therefore an exact per-layer schedule), or
- a list of conditions (``[{filter: self_attn, value: 0.3}, {value: 0.7}]``): the first whose
  ``filter`` is a substring of the tensor name wins (mergekit's conditional parameters).

Example::

    models: {base: zoo/base, skill: zoo/skill, lang: zoo/lang}
    base: base
    method: task_arithmetic
    model_parameters:
      skill: {weight: [1.0, 1.0, 0.5]}
      lang: {weight: 1.0}
    rules:
      - kinds: [norm, head]
        model_parameters: {lang: {weight: 1.2}}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.pool.sources import Reference, resolve_models
from evomerge.recipe.blend import Blend
from evomerge.recipe.path import LayerPath
from evomerge.validation import read_yaml, validate

Scalar = Union[bool, int, float, str]


class Condition(BaseModel):
    """One branch of a conditional parameter: applies when ``filter`` is in the tensor name."""

    model_config = ConfigDict(extra="forbid")

    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


ParamSetting = Union[Scalar, list[Scalar], list[Condition], Condition]

KINDS = ("attention", "mlp", "norm", "embedding", "head", "other")
DTYPES = ("float32", "float16", "bfloat16")


class Rule(BaseModel):
    """Override the method or parameters for the tensors that match every given selector."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | Literal["all"] | None = Field(
        default=None, description="block indices, or 'all' blocks (not embeddings/final norm/head); gradients span them"
    )
    kinds: list[Literal["attention", "mlp", "norm", "embedding", "head", "other"]] | None = None
    names: str | None = Field(default=None, description="substring of the tensor name")
    method: str | None = None
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)
    model_parameters: dict[str, dict[str, ParamSetting]] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _sorted_unique(cls, layers: list[int] | str | None) -> list[int] | str | None:
        if layers is None or layers == "all":
            return layers
        if not layers:
            raise ValueError("expected at least one layer index")
        if any(i < 0 for i in layers):
            raise ValueError("layer indices must be >= 0")
        return sorted(set(layers))


class Recipe(BaseModel):
    """One merged model, fully described. See the module docstring for the format."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, Reference] = Field(description="model name -> folder, org/name@revision or model+adapter")
    base: str | None = None
    sources: list[str] | None = Field(default=None, description="models merged; default: all but the base")
    method: str
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)
    model_parameters: dict[str, dict[str, ParamSetting]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None, description="output dtype; default: the reference model's"
    )
    seed: int = 0
    tokenizer: str | None = Field(default=None, description="model whose tokenizer is copied; default: base")

    @model_validator(mode="after")
    def _names_exist(self) -> Recipe:
        if not self.models:
            raise ValueError("models: expected at least one model")
        known = set(self.models)
        if self.base is not None and self.base not in known:
            raise ValueError(f"base: '{self.base}' is not one of the models ({', '.join(self.models)})")
        if self.tokenizer is not None and self.tokenizer not in known:
            raise ValueError(f"tokenizer: '{self.tokenizer}' is not one of the models ({', '.join(self.models)})")
        for name in self.sources or []:
            if name not in known:
                raise ValueError(f"sources: '{name}' is not one of the models ({', '.join(self.models)})")
        if self.sources is not None and not self.sources:
            raise ValueError("sources: expected at least one model")
        groups = [("model_parameters", self.model_parameters)] + [
            (f"rules[{i}].model_parameters", rule.model_parameters) for i, rule in enumerate(self.rules)
        ]
        for where, group in groups:
            for name in group:
                if name not in self.source_names:
                    raise ValueError(f"{where}: '{name}' is not a source model ({', '.join(self.source_names)})")
        return self

    @property
    def source_names(self) -> list[str]:
        """The merged models in order (the base is one only when listed in ``sources``)."""
        if self.sources is not None:
            return list(self.sources)
        return [name for name in self.models if name != self.base]

    @property
    def reference(self) -> str:
        """The model whose layout, config and tokenizer the output follows."""
        return self.base if self.base is not None else self.source_names[0]

    @property
    def tokenizer_source(self) -> str:
        """The model whose tokenizer the merged model uses."""
        return self.tokenizer or self.reference

    def resolve_models(self, root: Path, source: str = "recipe") -> Recipe:
        """A copy whose model references are pinned (``evomerge.pool.sources``): relative paths made
        absolute against ``root`` (the recipe's folder) when that folder exists there, else against the
        current directory (as mergekit does); hub ids fetched or found in the cache, at their commit."""
        resolved = resolve_models(self.models, roots=[root, Path.cwd()], where=f"{source}: models", require_folder=False)
        return self.model_copy(update={"models": {name: src.ref for name, src in resolved.items()}})

    def to_yaml(self) -> str:
        """The recipe as YAML, without defaulted fields."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


Blueprint = Union[Recipe, Blend, LayerPath]
"""Any kind of recipe: a parameter recipe (method + rules), a blend of whole models, a layer path."""

RECIPE_KINDS: dict[str, type[BaseModel]] = {"recipe": Recipe, "blend": Blend, "path": LayerPath}


def blueprint_kind(blueprint: Blueprint) -> str:
    """The ``kind`` a blueprint is stored and materialized under."""
    for kind, cls in RECIPE_KINDS.items():
        if isinstance(blueprint, cls):
            return kind
    raise TypeError(f"not a blueprint: {type(blueprint).__name__}")


def load_recipe(path: str | Path) -> Blueprint:
    """Load a recipe YAML (any ``kind``, or a mergekit config); relative paths are relative to the file."""
    from evomerge.recipe.mergekit_config import is_mergekit_config, recipe_from_mergekit

    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if is_mergekit_config(data):
        recipe: Blueprint = recipe_from_mergekit(data, str(path))
    else:
        recipe = recipe_from_dict(data, str(path))
    return recipe.resolve_models(path.parent, str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Blueprint:
    """Validate a recipe of any kind given as a plain dict (``kind`` picks it; default: a parameter recipe)."""
    kind = data.get("kind", "recipe")
    if kind not in RECIPE_KINDS:
        raise ConfigError(f"{source}: kind: unknown recipe kind {kind!r}; known: {', '.join(RECIPE_KINDS)}")
    body = {k: v for k, v in data.items() if k != "kind"} if kind == "recipe" else data
    return validate(RECIPE_KINDS[kind], body, source)  # type: ignore[return-value]


def recipe_hash(recipe_json: str) -> str:
    """The fitness-cache key of a recipe of any kind: a digest of its JSON (what the run store keeps)."""
    return hashlib.blake2b(recipe_json.encode(), digest_size=16).hexdigest()
