"""Recipes: what a merged model is made of, and how each tensor is resolved to an operator call.

A recipe has a ``kind``: a parameter recipe (``Recipe``: a merge method, its parameters, rules per
layer and module kind) or a blend (``Blend``: whole models weighted position by position, what
natural-niches crossovers make). ``Blueprint`` is any of them; the run store keeps each
candidate's blueprint as JSON with its kind.
"""

from evomerge.recipe.blend import Blend, Segment, order_digest
from evomerge.recipe.resolve import RecipePlanner, TensorPlan
from evomerge.recipe.schema import RECIPE_KINDS, Blueprint, Recipe, Rule, load_recipe, recipe_from_dict

__all__ = [
    "RECIPE_KINDS",
    "Blend",
    "Blueprint",
    "Recipe",
    "RecipePlanner",
    "Rule",
    "Segment",
    "TensorPlan",
    "load_recipe",
    "order_digest",
    "recipe_from_dict",
]
