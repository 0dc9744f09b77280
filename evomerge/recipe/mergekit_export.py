"""Write a recipe as a mergekit config, when mergekit would compute the same tensors from it.

That holds for a recipe without rules (mergekit has no per-layer-group overrides outside slices),
a deterministic method both tools share (DARE and DELLA draw their random masks differently), and
parameters mergekit knows. Anything else raises a one-line ``ConfigError`` saying why.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe.blend import Blend
from evomerge.recipe.path import LayerPath
from evomerge.recipe.schema import Blueprint

EXACT_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "model_stock")
MERGEKIT_PARAMETERS = {"weight", "density", "lambda", "normalize", "t", "gamma", "epsilon", "filter_wise"}


def recipe_to_mergekit(recipe: Blueprint) -> dict[str, Any]:
    """The mergekit config of ``recipe`` (models by path), or a ``ConfigError`` naming what mergekit lacks."""
    if isinstance(recipe, Blend):
        return _blend_to_mergekit(recipe)
    if isinstance(recipe, LayerPath):
        return _path_to_mergekit(recipe)
    if recipe.rules:
        raise ConfigError(f"mergekit cannot express the recipe's {len(recipe.rules)} per-layer/per-module rules")
    if recipe.method not in EXACT_METHODS:
        raise ConfigError(f"mergekit's '{recipe.method}' would not reproduce these tensors (supported: {', '.join(EXACT_METHODS)})")
    used = set(recipe.parameters) | {key for params in recipe.model_parameters.values() for key in params}
    unknown = sorted(used - MERGEKIT_PARAMETERS)
    if unknown:
        raise ConfigError(f"mergekit has no parameter {', '.join(repr(k) for k in unknown)}")
    models = []
    for name in recipe.source_names:
        entry: dict[str, Any] = {"model": recipe.models[name]}
        if recipe.model_parameters.get(name):
            entry["parameters"] = dict(recipe.model_parameters[name])
        models.append(entry)
    config: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base is not None and recipe.method != "linear":  # mergekit's linear merges exactly the listed models
        config["base_model"] = recipe.models[recipe.base]
    config["models"] = models
    if recipe.parameters:
        config["parameters"] = dict(recipe.parameters)
    if recipe.dtype is not None:
        config["dtype"] = recipe.dtype
    if recipe.tokenizer is not None:
        in_config = recipe.tokenizer == recipe.base and "base_model" in config
        config["tokenizer_source"] = "base" if in_config else recipe.models[recipe.tokenizer]
    return config


def _blend_to_mergekit(blend: Blend) -> dict[str, Any]:
    """A one-segment blend is mergekit's unnormalized linear merge; a split blend has no mergekit form."""
    if len(blend.segments) > 1:
        raise ConfigError(f"mergekit cannot express a blend split into {len(blend.segments)} segments of the parameter order")
    weights = blend.segments[0].weights
    models = [{"model": blend.models[name], "parameters": {"weight": weights[name]}} for name in blend.source_names]
    config: dict[str, Any] = {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}
    if blend.dtype is not None:
        config["dtype"] = blend.dtype
    return config


def _path_to_mergekit(path: LayerPath) -> dict[str, Any]:
    """An unscaled path is mergekit's passthrough over slices (runs of consecutive layers of one model).

    mergekit takes the embeddings from the first slice's model and the final norm and head from the
    last slice's, so the path must start in its embeddings model and end in its head model.
    """
    if path.scaled:
        raise ConfigError("mergekit's passthrough cannot scale the hidden state between layers (this path is scaled)")
    problem = path.problem()
    if problem is not None:
        raise ConfigError(problem)
    first, last = path.hops[0].model, path.hops[-1].model
    if first != path.embeddings or last != path.head_model:
        raise ConfigError(
            f"mergekit takes the embeddings from the first slice's model ('{first}') and the head from the last "
            f"slice's ('{last}'); this path uses '{path.embeddings}' and '{path.head_model}'"
        )
    slices = [
        {"sources": [{"model": path.models[model], "layer_range": [start, stop + 1]}]} for model, start, stop in path.spans()
    ]
    config: dict[str, Any] = {"slices": slices, "merge_method": "passthrough"}
    if path.dtype is not None:
        config["dtype"] = path.dtype
    return config
