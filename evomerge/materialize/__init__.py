"""Turning a recipe into weights: streamed to disk (export) or in place into a live model (search)."""

from evomerge.materialize.export import export_merge
from evomerge.materialize.resident import ResidentMerger

__all__ = ["ResidentMerger", "export_merge"]
