"""Resolve a recipe to one operator call per tensor.

Settings are looked up from the most specific level to the least: the last matching rule's
per-model parameters, that rule's shared parameters, … , the top level's per-model parameters, the
top level's shared parameters, then the operator's default. A rule that changes the method starts a
fresh chain (settings written for another method do not leak into it). Gradients are evaluated at
the tensor's position within the layers the level covers (all layers at the top level); tensors
outside the blocks (embeddings, final norm, head) sit at position 0, as in mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError
from evomerge.merge import OperatorSpec, Params, get_operator
from evomerge.recipe.schema import Condition, ParamSetting, Recipe, Rule


@dataclass(frozen=True)
class TensorPlan:
    """The operator and resolved parameters for one output tensor."""

    name: str
    layer: int | None
    kind: str
    operator: OperatorSpec
    params: Params


@dataclass(frozen=True)
class _Level:
    where: str
    operator: OperatorSpec
    rule: Rule | None  # None for the top level
    parameters: dict[str, ParamSetting]
    model_parameters: dict[str, dict[str, ParamSetting]]


class RecipePlanner:
    """Validates a recipe once against the operators, then plans tensors on demand."""

    def __init__(self, recipe: Recipe, num_layers: int):
        self.recipe = recipe
        self.num_layers = num_layers
        self.sources = recipe.source_names
        top = get_operator(recipe.method, "method")
        self._top = _Level("recipe", top, None, recipe.parameters, recipe.model_parameters)
        self._check_level(self._top)
        self._rules: list[_Level] = []
        for i, rule in enumerate(recipe.rules):
            where = f"rules[{i}]"
            operator = get_operator(rule.method, f"{where}.method") if rule.method else top
            level = _Level(where, operator, rule, rule.parameters, rule.model_parameters)
            if isinstance(rule.layers, list) and rule.layers[-1] >= num_layers:
                raise ConfigError(
                    f"{where}.layers: layer {rule.layers[-1]} does not exist (the model has {num_layers} layers)"
                )
            self._check_level(level)
            self._rules.append(level)

    def plan(self, name: str, layer: int | None, kind: str) -> TensorPlan:
        """The operator call for tensor ``name`` at block ``layer`` (None outside blocks) of ``kind``."""
        chain = [self._top]
        for level in self._rules:
            if _matches(level.rule, name, layer, kind):
                if level.rule.method is not None:
                    chain = []
                chain.append(level)
        operator = chain[-1].operator
        levels = list(reversed(chain))
        shared = {}
        for key in operator.shared:
            value = self._lookup(levels, key, None, name, layer)
            if value is not None:
                shared[key] = value
        per_source = []
        for model in self.sources:
            values = {}
            for key in operator.per_source:
                value = self._lookup(levels, key, model, name, layer)
                if value is not None:
                    values[key] = value
            per_source.append(values)
        params = operator.resolve(shared, per_source, f"{chain[-1].where} (tensor {name})")
        return TensorPlan(name, layer, kind, operator, params)

    def _lookup(self, levels: Sequence[_Level], key: str, model: str | None, name: str, layer: int | None) -> Any:
        for level in levels:
            t = self._position(level.rule, layer)
            settings = [level.model_parameters.get(model, {})] if model is not None else []
            settings.append(level.parameters)
            for group in settings:
                if key in group:
                    value = evaluate_setting(group[key], name, t)
                    if value is not None:
                        return value
        return None

    def _position(self, rule: Rule | None, layer: int | None) -> float:
        if layer is None:
            return 0.0
        layers = rule.layers if rule is not None and isinstance(rule.layers, list) else None
        count = len(layers) if layers else self.num_layers
        index = layers.index(layer) if layers else layer
        return index / (count - 1) if count > 1 else 1.0

    def _check_level(self, level: _Level) -> None:
        operator = level.operator
        operator.check_arity(len(self.sources), self.recipe.base is not None, level.where)
        operator.check_keys(level.parameters, {**operator.shared, **operator.per_source}, f"{level.where}.parameters")
        for model, values in level.model_parameters.items():
            operator.check_keys(values, operator.per_source, f"{level.where}.model_parameters.{model}")


def _matches(rule: Rule, name: str, layer: int | None, kind: str) -> bool:
    if rule.layers is not None and (layer is None or (rule.layers != "all" and layer not in rule.layers)):
        return False
    if rule.kinds is not None and kind not in rule.kinds:
        return False
    return rule.names is None or rule.names in name


def evaluate_setting(setting: ParamSetting, name: str, t: float) -> Any:
    """A setting's value for tensor ``name`` at gradient position ``t`` ∈ [0, 1] (None: no match)."""
    if isinstance(setting, Condition):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(isinstance(item, Condition) for item in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in name:
                return evaluate_setting(cond.value, name, t)
        return None
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
    if not numeric:
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    low = int(scaled)
    high = min(len(setting) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * setting[low] + frac * setting[high]
