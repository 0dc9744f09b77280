"""Materializers: how a worker turns a blueprint of each kind into the live model it scores.

A materializer is registered for one or more blueprint kinds (``@register_materializer("path")``):
the resident merger writes a parameter recipe or a blend into one model skeleton in place; the
path assembler links resident source layers into a model by reference. A factory gets the
worker's open ``ModelPool``, the device, the dtype and the worker's memory plan (``placement``,
``cache_bytes``: the resident merger's; a factory ignores what it has no use for), and returns an
object with ``apply(blueprint)``, ``model`` (the live model after the last apply) and ``close()``.

``Materializers`` is what a worker holds: it builds the materializer a blueprint's kind needs on
first use and keeps **one at a time** — a run scores one kind, and the references at its end may
need another (a data-flow run compares its best path with parameter-merge baselines): building the
next frees the previous, so a worker's memory is that of the larger of the two, never their sum.

Example::

    materializers = Materializers(pool, device="cpu", dtype=torch.float32)
    model = materializers.apply(blueprint)     # the live model for any kind of blueprint
"""

from __future__ import annotations

import difflib
import gc
from collections.abc import Callable
from typing import Any, Protocol

import torch

from evomerge.errors import ConfigError
from evomerge.pool import ModelPool
from evomerge.recipe import Blueprint, blueprint_kind


class Materializer(Protocol):
    """Turns blueprints of its kinds into one live model (``model``), candidate after candidate."""

    @property
    def model(self) -> torch.nn.Module: ...

    def apply(self, blueprint: Any) -> None: ...

    def close(self) -> None: ...


MaterializerFactory = Callable[..., Materializer]
"""``factory(pool, device, dtype, *, placement, cache_bytes) -> Materializer``."""
MATERIALIZERS: dict[str, MaterializerFactory] = {}
_HOMES = {"recipe": "evomerge.materialize.resident", "blend": "evomerge.materialize.resident", "path": "evomerge.materialize.path"}
"""Where the built-in materializers register themselves (imported on first use: each pulls in model code)."""


def register_materializer(*kinds: str) -> Callable[[MaterializerFactory], MaterializerFactory]:
    """Register ``factory(pool, device, dtype, *, placement, cache_bytes) -> Materializer`` for the blueprint ``kinds``."""

    def wrap(factory: MaterializerFactory) -> MaterializerFactory:
        for kind in kinds:
            if kind in MATERIALIZERS:
                raise ValueError(f"materializer for blueprint kind '{kind}' is registered twice")
            MATERIALIZERS[kind] = factory
        return factory

    return wrap


def materializer_factory(kind: str) -> MaterializerFactory:
    """The factory registered for ``kind`` (importing a built-in one's module first)."""
    if kind not in MATERIALIZERS and kind in _HOMES:
        import importlib

        importlib.import_module(_HOMES[kind])
    if kind not in MATERIALIZERS:
        hint = difflib.get_close_matches(kind, list(MATERIALIZERS) + list(_HOMES), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"no materializer for blueprint kind '{kind}'{suggestion}")
    return MATERIALIZERS[kind]


class Materializers:
    """The materializer of the current blueprint kind, over one pool; see the module docstring."""

    def __init__(
        self,
        pool: ModelPool,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        placement: str = "resident",
        cache_bytes: int | None = None,
    ) -> None:
        self.pool = pool
        self.device = torch.device(device)
        self.dtype = dtype
        self.placement = placement
        self.cache_bytes = cache_bytes
        self._factory: MaterializerFactory | None = None
        self._current: Materializer | None = None

    def prepare(self, kind: str) -> Materializer:
        """The materializer of ``kind``, built now if it is not the current one (set-up errors surface here)."""
        factory = materializer_factory(kind)
        if self._current is not None and self._factory is factory:
            return self._current
        self.close()
        self._current = factory(self.pool, self.device, self.dtype, placement=self.placement, cache_bytes=self.cache_bytes)
        self._factory = factory
        return self._current

    def apply(self, blueprint: Blueprint) -> torch.nn.Module:
        """Materialize ``blueprint`` and return the live model that now *is* it."""
        materializer = self.prepare(blueprint_kind(blueprint))
        materializer.apply(blueprint)
        return materializer.model

    def close(self) -> None:
        """Release the current materializer (the pool stays open: it belongs to the caller)."""
        if self._current is not None:
            self._current.close()
            self._current = self._factory = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
