"""A recipe's coefficients laid out per layer: which source dominates which layer (for the heat map)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.pool.sources import resolve_source
from evomerge.recipe import Recipe
from evomerge.recipe.resolve import RecipePlanner

KINDS = ("attention", "mlp")
PREFERRED = ("weight", "t", "density")


def num_layers_of(recipe: Recipe) -> int:
    """The reference model's block count, from its config.json if on disk (or one past the highest rule layer)."""
    try:
        config = resolve_source(recipe.models[recipe.reference], require_folder=False, download=False).path / "config.json"
    except EvomergeError:  # a hub model no longer in the cache: fall back to the rules
        config = None
    if config is not None and config.is_file():
        data = json.loads(config.read_text())
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in data:
                return int(data[key])
    layers = [layer for rule in recipe.rules if isinstance(rule.layers, list) for layer in rule.layers]
    return max(layers, default=0) + 1


def coefficient_grid(recipe: Recipe, num_layers: int | None = None) -> tuple[np.ndarray, list[str], list[str], str]:
    """(matrix, row labels 'source · kind', column labels 'L0'…, parameter) for the first per-source
    parameter the recipe sets (weight, t or density); rows whose kinds agree everywhere are merged."""
    layers = num_layers_of(recipe) if num_layers is None else num_layers
    planner = RecipePlanner(recipe, layers)
    plans = {(kind, layer): planner.plan(f"model.layers.{layer}.{kind}", layer, kind) for kind in KINDS for layer in range(layers)}
    parameter = _parameter(plans.values())
    sources = recipe.source_names
    per_kind = {
        kind: np.array([[_value(plans[(kind, layer)], parameter, s) for layer in range(layers)] for s in range(len(sources))])
        for kind in KINDS
    }
    if np.allclose(per_kind["attention"], per_kind["mlp"], equal_nan=True):
        matrix, rows = per_kind["attention"], list(sources)
    else:
        matrix = np.vstack([per_kind[k] for k in KINDS])
        rows = [f"{s} · {k}" for k in KINDS for s in sources]
    return matrix, rows, [f"L{layer}" for layer in range(layers)], parameter


def _parameter(plans: Any) -> str:
    keys: set[str] = set()
    for plan in plans:
        for values in plan.params.per_source:
            keys.update(k for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool))
    for key in PREFERRED:
        if key in keys:
            return key
    return sorted(keys)[0] if keys else "weight"


def _value(plan: Any, parameter: str, source: int) -> float:
    per_source = plan.params.per_source
    if source >= len(per_source):
        return float("nan")
    value = per_source[source].get(parameter)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else float("nan")
