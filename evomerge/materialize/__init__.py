"""Turning a blueprint into a model: streamed to disk (export) or into a live model (search).

A worker picks the materializer by the blueprint's kind (``registry``): the resident merger writes
a parameter recipe or a blend in place, the path assembler links resident layers by reference.

Names are resolved on first use: ``evomerge merge`` needs only the export path, and importing the
resident merger pulls in transformers' model classes (several seconds of start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.materialize.export import export_merge
    from evomerge.materialize.path import PathAssembler
    from evomerge.materialize.registry import Materializers, register_materializer
    from evomerge.materialize.resident import ResidentMerger

__all__ = ["Materializers", "PathAssembler", "ResidentMerger", "export_merge", "register_materializer"]

_HOMES = {
    "export_merge": "evomerge.materialize.export",
    "ResidentMerger": "evomerge.materialize.resident",
    "PathAssembler": "evomerge.materialize.path",
    "Materializers": "evomerge.materialize.registry",
    "register_materializer": "evomerge.materialize.registry",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'evomerge.materialize' has no attribute '{name}'")
    return getattr(importlib.import_module(_HOMES[name]), name)
