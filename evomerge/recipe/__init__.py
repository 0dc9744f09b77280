"""Recipes: what a merged model is made of, and how each tensor is resolved to an operator call."""

from evomerge.recipe.resolve import RecipePlanner, TensorPlan
from evomerge.recipe.schema import Recipe, Rule, load_recipe, recipe_from_dict

__all__ = ["Recipe", "RecipePlanner", "Rule", "TensorPlan", "load_recipe", "recipe_from_dict"]
