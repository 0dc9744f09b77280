"""Turning a recipe into weights: streamed to disk (export) or in place into a live model (search).

Names are resolved on first use: ``evomerge merge`` needs only the export path, and importing the
resident merger pulls in transformers' model classes (several seconds of start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.materialize.export import export_merge
    from evomerge.materialize.resident import ResidentMerger

__all__ = ["ResidentMerger", "export_merge"]

_HOMES = {"export_merge": "evomerge.materialize.export", "ResidentMerger": "evomerge.materialize.resident"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'evomerge.materialize' has no attribute '{name}'")
    return getattr(importlib.import_module(_HOMES[name]), name)
