"""Read mergekit merge configs as recipes, with mergekit's semantics.

Users bring the configs they already have (``models``/``base_model``/``merge_method``/
``parameters``, or a single ``slices`` entry spanning every layer; ``passthrough`` slices that
stack layers of several models are read as a layer path). Operator names and parameter
names are mergekit's, and each operator's defaults are mergekit's, so a config means the same here
as there. Models are named as mergekit names them: folders, hub ids ``org/name@revision`` and
LoRA sources ``model+adapter``. What evomerge cannot express (layer stacking or reordering,
tokenizer unions, per-module configs) is refused with a one-line error rather than approximated.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError, EvomergeError, ModelError
from evomerge.pool.sources import Reference, resolve_source, short_name
from evomerge.recipe.path import Hop, LayerPath
from evomerge.recipe.schema import ParamSetting, Recipe
from evomerge.validation import PathText, validate

SUPPORTED_METHODS = (
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
)
# Parameters that only change how mergekit stores intermediates, not the merged values.
_STORAGE_ONLY = {"int8_mask"}
# Methods for which mergekit merges the base model's weights like any other input.
_BASE_IS_INPUT = {"linear"}


class _ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Reference
    parameters: dict[str, ParamSetting] | None = None


class _SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Reference
    layer_range: tuple[int, int]
    parameters: dict[str, ParamSetting] | None = None


class _Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[_SliceSource]
    base_model: PathText | None = None
    parameters: dict[str, ParamSetting] | None = None


class MergekitConfig(BaseModel):
    """The subset of mergekit's ``MergeConfiguration`` that evomerge expresses exactly."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[_ModelEntry] | None = None
    slices: list[_Slice] | None = None
    base_model: Reference | None = None
    parameters: dict[str, ParamSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: PathText | None = None
    name: str | None = Field(default=None, description="ignored label")


def is_mergekit_config(data: dict[str, Any]) -> bool:
    """A mapping is a mergekit config when it names a ``merge_method``."""
    return "merge_method" in data


def recipe_from_mergekit(data: dict[str, Any], source: str) -> Recipe | LayerPath:
    """Translate a mergekit config into an equivalent recipe (a layer path for passthrough slices)."""
    for key in ("modules", "tokenizer", "chat_template"):
        if key in data:
            raise ConfigError(f"{source}: {key}: mergekit's '{key}' option is not supported by evomerge")
    config = validate(MergekitConfig, data, source)
    if config.merge_method == "passthrough":
        return _path_from_mergekit(config, source)
    if config.merge_method not in SUPPORTED_METHODS:
        raise ConfigError(
            f"{source}: merge_method: '{config.merge_method}' cannot be read from a mergekit config; "
            f"supported: {', '.join(SUPPORTED_METHODS)}, passthrough"
        )
    entries = _entries(config, source)
    if not entries:
        raise ConfigError(f"{source}: models: expected at least one model")
    refs = [ref for ref, _ in entries]
    if config.base_model is not None and config.base_model not in refs:
        refs.append(config.base_model)
    names = _short_names(refs)
    base = names[config.base_model] if config.base_model else None
    if config.merge_method in _BASE_IS_INPUT:
        sources = [names[ref] for ref in refs]
    else:
        sources = [names[ref] for ref in refs if names[ref] != base]
    model_parameters = {
        names[ref]: _strip(params)
        for ref, params in entries
        if params and names[ref] in sources
    }
    parameters = _strip(config.parameters or {})
    if config.slices:
        parameters = {**parameters, **_strip(config.slices[0].parameters or {})}
    dtype = config.out_dtype or config.dtype
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"{source}: dtype: expected float32, float16 or bfloat16, got '{dtype}'")
    tokenizer = _tokenizer(config.tokenizer_source, names, base, source)
    recipe = {
        "models": {names[ref]: ref for ref in refs},
        "base": base,
        "method": config.merge_method,
        "parameters": parameters,
        "model_parameters": model_parameters,
        "dtype": dtype,
        "tokenizer": tokenizer,
    }
    if config.merge_method in _BASE_IS_INPUT:
        recipe["sources"] = sources
    return validate(Recipe, recipe, source)


def _path_from_mergekit(config: MergekitConfig, source: str) -> LayerPath:
    """Passthrough slices as a layer path: every slice one model's layer range, stacked in order;
    embeddings from the first slice's model, final norm and head from the last's (as mergekit does)."""
    if config.models or not config.slices:
        raise ConfigError(f"{source}: passthrough: expected 'slices' (each one model's layer_range)")
    if config.base_model is not None or config.parameters:
        raise ConfigError(f"{source}: passthrough: base_model and parameters (scale) are not supported")
    refs: list[str] = []
    for i, piece in enumerate(config.slices):
        if len(piece.sources) != 1 or piece.parameters or piece.sources[0].parameters or piece.base_model:
            raise ConfigError(f"{source}: slices[{i}]: a passthrough slice takes exactly one source without parameters")
        if piece.sources[0].model not in refs:
            refs.append(piece.sources[0].model)
    names = _short_names(refs)
    hops = []
    for i, piece in enumerate(config.slices):
        src = piece.sources[0]
        start, stop = src.layer_range
        if not 0 <= start < stop:
            raise ConfigError(f"{source}: slices[{i}].sources[0].layer_range: expected [start, stop) with 0 <= start < stop")
        hops += [Hop(model=names[src.model], layer=layer) for layer in range(start, stop)]
    embeddings, head = names[config.slices[0].sources[0].model], names[config.slices[-1].sources[0].model]
    if config.tokenizer_source not in (None, "base") and names.get(config.tokenizer_source) != embeddings:
        raise ConfigError(f"{source}: tokenizer_source: a path uses the tokenizer of its first slice's model")
    dtype = config.out_dtype or config.dtype
    path = {"kind": "path", "models": {names[r]: r for r in refs}, "embeddings": embeddings, "head": head, "hops": hops, "dtype": dtype}
    return validate(LayerPath, path, source)


def _entries(config: MergekitConfig, source: str) -> list[tuple[str, dict[str, ParamSetting] | None]]:
    if config.models and config.slices:
        raise ConfigError(f"{source}: give either 'models' or 'slices', not both")
    if config.models:
        return [(entry.model, entry.parameters) for entry in config.models]
    if not config.slices:
        return []
    if len(config.slices) != 1:
        raise ConfigError(
            f"{source}: slices: {len(config.slices)} slices stack or reorder layers, which is a data-flow merge; "
            "evomerge reads one slice spanning every layer"
        )
    only = config.slices[0]
    if only.base_model is not None and only.base_model != config.base_model:
        raise ConfigError(f"{source}: slices[0].base_model: a per-slice base model is not supported")
    ranges = {tuple(src.layer_range) for src in only.sources}
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        raise ConfigError(
            f"{source}: slices[0].sources: every source must use the same layer_range starting at 0, got {sorted(ranges)}"
        )
    end = next(iter(ranges))[1]
    for src in only.sources:
        layers = _num_layers(src.model)
        if layers is not None and layers != end:
            raise ConfigError(
                f"{source}: slices[0].sources: layer_range [0, {end}] must span all {layers} layers of '{src.model}'"
            )
    return [(src.model, src.parameters) for src in only.sources]


def _num_layers(ref: str) -> int | None:
    """The layer count in the config.json of a model already on disk (a folder, a cached hub id), if any."""
    try:
        path = resolve_source(ref, require_folder=False, download=False).path / "config.json"
    except EvomergeError:
        return None
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_bytes())
        value = config.get("num_hidden_layers", config.get("n_layer"))
        return int(value) if value is not None else None
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise ModelError(f"{path}: not a model config (expected a JSON object with num_hidden_layers)") from None


def _strip(params: dict[str, ParamSetting]) -> dict[str, ParamSetting]:
    return {key: value for key, value in params.items() if key not in _STORAGE_ONLY}


def _short_names(refs: list[str]) -> dict[str, str]:
    """Readable unique model names: the references' last path component (an adapter's, for a LoRA source)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for ref in refs:
        stem = short_name(ref)
        name, n = stem, 2
        while name in taken:
            name, n = f"{stem}_{n}", n + 1
        taken.add(name)
        names[ref] = name
    return names


def _tokenizer(tokenizer_source: str | None, names: dict[str, str], base: str | None, source: str) -> str | None:
    if tokenizer_source is None or tokenizer_source == "base":
        return base
    if tokenizer_source == "union":
        raise ConfigError(f"{source}: tokenizer_source: 'union' is not supported; use 'base' or a model")
    if tokenizer_source not in names:
        raise ConfigError(f"{source}: tokenizer_source: '{tokenizer_source}' is not one of the config's models")
    return names[tokenizer_source]
