"""The models being merged: references resolved to weights, a lazily read pool, and the map from
tensor names to layers and kinds."""

from evomerge.pool.layer_map import LayerMap, ModuleKind, TensorInfo
from evomerge.pool.lora import AdaptedTensors, LoraAdapter
from evomerge.pool.model_pool import ModelPool, SourceModel
from evomerge.pool.sources import (
    ResolvedSource,
    SourceSpec,
    Weights,
    resolve_models,
    resolve_source,
)

__all__ = [
    "AdaptedTensors",
    "LayerMap",
    "LoraAdapter",
    "ModelPool",
    "ModuleKind",
    "ResolvedSource",
    "SourceModel",
    "SourceSpec",
    "TensorInfo",
    "Weights",
    "resolve_models",
    "resolve_source",
]
