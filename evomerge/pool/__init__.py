"""The models being merged: a lazily read pool and the map from tensor names to layers and kinds."""

from evomerge.pool.layer_map import LayerMap, ModuleKind, TensorInfo
from evomerge.pool.model_pool import ModelPool, SourceModel

__all__ = ["LayerMap", "ModelPool", "ModuleKind", "SourceModel", "TensorInfo"]
