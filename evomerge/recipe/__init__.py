"""Recipes: what a merged model is made of, and how each tensor is resolved to an operator call.

A recipe has a ``kind``: a parameter recipe (``Recipe``: a merge method, its parameters, rules per
layer and module kind), a blend (``Blend``: whole models weighted position by position, what
natural-niches crossovers make) or a layer path (``LayerPath``: hops through the layers of several
models, what data-flow merging searches). ``Blueprint`` is any of them; the run store keeps each
candidate's blueprint as JSON with its kind.
"""

from evomerge.recipe.blend import Blend, Segment, order_digest
from evomerge.recipe.path import Hop, LayerPath
from evomerge.recipe.resolve import RecipePlanner, TensorPlan
from evomerge.recipe.schema import (
    RECIPE_KINDS,
    Blueprint,
    Recipe,
    Rule,
    blueprint_kind,
    load_recipe,
    recipe_from_dict,
    recipe_hash,
)

__all__ = [
    "RECIPE_KINDS",
    "Blend",
    "Blueprint",
    "Hop",
    "LayerPath",
    "Recipe",
    "RecipePlanner",
    "Rule",
    "Segment",
    "TensorPlan",
    "blueprint_kind",
    "load_recipe",
    "order_digest",
    "recipe_from_dict",
    "recipe_hash",
]
