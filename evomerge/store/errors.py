"""The run store's user-facing error."""

from __future__ import annotations

from evomerge.errors import EvomergeError


class StoreError(EvomergeError):
    """A run directory or store file cannot be used (locked, missing, foreign, corrupt, too new)."""
