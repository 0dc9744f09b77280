"""The strategy registry: a new strategy is one module and one decorator.

    @register_strategy("my_search")
    class MySearch(Strategy):
        class Settings(StrategySettings):
            step: float = 0.1
        ...

``build_strategy`` validates the ``settings`` mapping against the class's ``Settings`` model, so a
typo or a bad value is a one-line ``ConfigError`` naming the field.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from evomerge.errors import ConfigError
from evomerge.search.base import Strategy
from evomerge.search.layout import GenomeLayout
from evomerge.validation import validate

S = TypeVar("S", bound=type[Strategy])

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[S], S]:
    """Register a ``Strategy`` subclass under ``name`` (sets its ``name`` attribute)."""

    def wrap(cls: S) -> S:
        if name in STRATEGIES:
            raise ValueError(f"strategy '{name}' is registered twice")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return wrap


def get_strategy(name: str, where: str = "strategy.name") -> type[Strategy]:
    """The strategy class registered as ``name``, or a one-line error with a did-you-mean."""
    if name not in STRATEGIES:
        hint = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{where}: unknown strategy '{name}'{suggestion}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def build_strategy(
    name: str,
    layout: GenomeLayout | int,
    *,
    n_objectives: int = 1,
    seed: int = 0,
    bounds: np.ndarray | None = None,
    settings: Mapping[str, Any] | None = None,
    source: str = "strategy",
    budget: int | None = None,
) -> Strategy:
    """Build the strategy ``name`` for a genome ``layout`` (or a plain box of that many genes);
    ``budget``: the run's evaluations, when set; ``source`` prefixes error messages."""
    cls = get_strategy(name, f"{source}.name")
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(f"{source}.settings: expected a mapping, got {type(settings).__name__}")
    checked = validate(cls.Settings, dict(settings or {}), f"{source}.settings")
    return cls(layout, n_objectives=n_objectives, seed=seed, bounds=bounds, settings=checked, budget=budget)
