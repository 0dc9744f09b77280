"""Recipes: validation messages, parameter resolution (gradients, conditions, rules), mergekit import."""

from __future__ import annotations

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe, RecipePlanner, load_recipe, recipe_from_dict
from evomerge.recipe.resolve import evaluate_setting
from evomerge.recipe.schema import Condition


def _recipe(**overrides) -> Recipe:
    data = {
        "models": {"base": "/m/base", "a": "/m/a", "b": "/m/b"},
        "base": "base",
        "method": "task_arithmetic",
        "model_parameters": {"a": {"weight": 1.0}, "b": {"weight": 0.5}},
    }
    data.update(overrides)
    return recipe_from_dict(data)


class TestEvaluateSetting:
    def test_scalar(self):
        assert evaluate_setting(0.3, "x", 0.7) == 0.3

    def test_gradient_interpolates_like_mergekit(self):
        # anchors [0, 1, 0.5] at t = 0.25 -> scaled 0.5 -> halfway between 0 and 1
        assert evaluate_setting([0.0, 1.0, 0.5], "x", 0.25) == pytest.approx(0.5)
        assert evaluate_setting([0.0, 1.0, 0.5], "x", 0.75) == pytest.approx(0.75)
        assert evaluate_setting([0.0, 1.0, 0.5], "x", 1.0) == pytest.approx(0.5)

    def test_per_layer_list_is_exact(self):
        values = [0.1, 0.7, 0.2, 0.9]
        for layer, expected in enumerate(values):
            assert evaluate_setting(values, "x", layer / 3) == pytest.approx(expected)

    def test_conditions_first_match_wins_and_fallback(self):
        setting = [Condition(filter="self_attn", value=0.2), Condition(filter="mlp", value=[0.0, 1.0]), Condition(value=0.9)]
        assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.2
        assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
        assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.9

    def test_no_matching_condition_is_none(self):
        assert evaluate_setting([Condition(filter="mlp", value=1.0)], "model.norm.weight", 0.0) is None

    def test_non_numeric_list_selects(self):
        assert evaluate_setting([True, False], "x", 0.4) is True
        assert evaluate_setting([True, False], "x", 1.0) is False


class TestPlanner:
    def test_top_level_gradient_spans_all_layers(self):
        recipe = _recipe(model_parameters={"a": {"weight": [0.0, 1.0]}, "b": {"weight": 1.0}})
        planner = RecipePlanner(recipe, num_layers=5)
        weights = [planner.plan(f"model.layers.{i}.mlp.w", i, "mlp").params.per_source[0]["weight"] for i in range(5)]
        assert weights == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
        # tensors outside the blocks sit at position 0
        assert planner.plan("model.embed_tokens.weight", None, "embedding").params.per_source[0]["weight"] == 0.0

    def test_rule_overrides_for_matching_tensors_only(self):
        recipe = _recipe(rules=[{"layers": [1], "kinds": ["mlp"], "model_parameters": {"b": {"weight": 2.0}}}])
        planner = RecipePlanner(recipe, num_layers=2)
        assert planner.plan("model.layers.1.mlp.w", 1, "mlp").params.per_source[1]["weight"] == 2.0
        assert planner.plan("model.layers.1.self_attn.q", 1, "attention").params.per_source[1]["weight"] == 0.5
        assert planner.plan("model.layers.0.mlp.w", 0, "mlp").params.per_source[1]["weight"] == 0.5

    def test_rule_gradient_spans_the_rule_layers(self):
        recipe = _recipe(rules=[{"layers": [2, 3, 4], "parameters": {"lambda": [0.0, 1.0]}}])
        planner = RecipePlanner(recipe, num_layers=6)
        lam = [planner.plan(f"l{i}", i, "mlp").params.shared["lambda"] for i in (2, 3, 4)]
        assert lam == pytest.approx([0.0, 0.5, 1.0])
        assert planner.plan("l0", 0, "mlp").params.shared["lambda"] == 1.0  # task_arithmetic default

    def test_shared_parameter_applies_to_every_source(self):
        recipe = _recipe(parameters={"weight": 0.3}, model_parameters={"a": {"weight": 0.8}})
        params = RecipePlanner(recipe, 2).plan("l", 0, "mlp").params
        assert params.source_values("weight") == [0.8, 0.3]

    def test_method_override_starts_a_fresh_chain(self):
        recipe = _recipe(
            parameters={"lambda": 0.5},
            rules=[{"kinds": ["norm"], "method": "linear", "model_parameters": {"a": {"weight": 1.0}, "b": {"weight": 0.0}}}],
        )
        planner = RecipePlanner(recipe, 2)
        norm = planner.plan("model.norm.weight", None, "norm")
        assert norm.operator.name == "linear"
        assert norm.params.source_values("weight") == [1.0, 0.0]
        mlp = planner.plan("model.layers.0.mlp.w", 0, "mlp")
        assert mlp.operator.name == "task_arithmetic"
        assert mlp.params.shared["lambda"] == 0.5

    def test_unknown_parameter_is_named_with_a_hint(self):
        with pytest.raises(ConfigError, match=r"recipe\.parameters\.lamda: unknown parameter.*did you mean 'lambda'"):
            RecipePlanner(_recipe(parameters={"lamda": 1.0}), 2)

    def test_unknown_method_is_named_with_a_hint(self):
        with pytest.raises(ConfigError, match=r"rules\[0\]\.method: unknown merge method 'tie'.*did you mean 'ties'"):
            RecipePlanner(_recipe(rules=[{"kinds": ["mlp"], "method": "tie"}]), 2)

    def test_rule_layer_out_of_range(self):
        with pytest.raises(ConfigError, match=r"rules\[0\]\.layers: layer 7 does not exist \(the model has 4 layers\)"):
            RecipePlanner(_recipe(rules=[{"layers": [7]}]), 4)

    def test_out_of_range_value_names_tensor_and_field(self):
        recipe = _recipe(method="ties", model_parameters={"a": {"density": 1.5}, "b": {"density": 0.5}})
        with pytest.raises(ConfigError, match=r"density: expected a value <= 1"):
            RecipePlanner(recipe, 2).plan("model.layers.0.mlp.w", 0, "mlp")

    def test_method_needing_a_base(self):
        with pytest.raises(ConfigError, match="needs a base model"):
            RecipePlanner(_recipe(base=None, model_parameters={}), 2)


class TestSchema:
    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"base": "nope"}, r"base: 'nope' is not one of the models"),
            ({"methd": "ties"}, r"methd: unknown key \(did you mean 'method'\?\)"),
            ({"dtype": "float64"}, r"dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
            ({"model_parameters": {"zzz": {"weight": 1}}}, r"model_parameters: 'zzz' is not a source model"),
            ({"rules": [{"layer": [1]}]}, r"rules\[0\]\.layer: unknown key \(did you mean 'layers'\?\)"),
            ({"rules": [{"kinds": ["attn"]}]}, r"rules\[0\]\.kinds\[0\]: Input should be 'attention'"),
            ({"rules": [{"layers": []}]}, r"rules\[0\]\.layers: expected at least one layer index"),
        ],
    )
    def test_errors_are_one_line_and_name_the_field(self, change, message):
        data = {"models": {"base": "/m/base", "a": "/m/a"}, "base": "base", "method": "task_arithmetic"}
        data.update(change)
        with pytest.raises(ConfigError, match=message) as info:
            recipe_from_dict(data, "r.yaml")
        assert "\n" not in str(info.value)
        assert str(info.value).startswith("r.yaml: ")

    def test_yaml_round_trip(self, tmp_path):
        recipe = _recipe(rules=[{"layers": [0], "kinds": ["mlp"], "parameters": {"lambda": [0.5, 1.0]}}], seed=7)
        path = tmp_path / "r.yaml"
        path.write_text(recipe.to_yaml())
        again = load_recipe(path)
        assert again.model_dump() == recipe.model_dump()

    def test_relative_paths_resolve_against_the_recipe_folder(self, tmp_path):
        (tmp_path / "models" / "a").mkdir(parents=True)
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"models": {"a": "models/a"}, "method": "linear"}))
        assert load_recipe(path).models["a"] == str((tmp_path / "models" / "a").resolve())

    def test_invalid_yaml_reports_line(self, tmp_path):
        path = tmp_path / "bad.yaml"
        path.write_text("models: {a: x\nmethod: linear\n")
        with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
            load_recipe(path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError, match=r"missing\.yaml: file not found"):
            load_recipe(tmp_path / "missing.yaml")


class TestMergekitImport:
    def _load(self, tmp_path, config):
        path = tmp_path / "mk.yaml"
        path.write_text(yaml.safe_dump(config))
        return load_recipe(path)

    def test_ties_config(self, tmp_path):
        recipe = self._load(
            tmp_path,
            {
                "models": [
                    {"model": "/z/base"},
                    {"model": "/z/math", "parameters": {"density": 0.5, "weight": [0.2, 0.8]}},
                    {"model": "/z/code", "parameters": {"density": 0.7, "weight": 0.5}},
                ],
                "merge_method": "ties",
                "base_model": "/z/base",
                "parameters": {"normalize": True, "int8_mask": True},
                "dtype": "float32",
            },
        )
        assert recipe.method == "ties"
        assert recipe.base == "base"
        assert recipe.source_names == ["math", "code"]
        assert recipe.model_parameters["math"]["weight"] == [0.2, 0.8]
        assert recipe.parameters == {"normalize": True}
        assert recipe.dtype == "float32"

    def test_linear_keeps_the_base_as_an_input(self, tmp_path):
        recipe = self._load(
            tmp_path,
            {
                "models": [{"model": "/z/a", "parameters": {"weight": 1}}, {"model": "/z/b", "parameters": {"weight": 3}}],
                "merge_method": "linear",
                "base_model": "/z/a",
            },
        )
        assert recipe.source_names == ["a", "b"]

    def test_single_slice_slerp(self, tmp_path):
        recipe = self._load(
            tmp_path,
            {
                "slices": [{"sources": [{"model": "/z/a", "layer_range": [0, 2]}, {"model": "/z/b", "layer_range": [0, 2]}]}],
                "merge_method": "slerp",
                "base_model": "/z/a",
                "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
            },
        )
        assert recipe.base == "a" and recipe.source_names == ["b"]
        assert RecipePlanner(recipe, 2).plan("model.layers.1.self_attn.q_proj.weight", 1, "attention").params.shared["t"] == 1.0

    @pytest.mark.parametrize(
        ("config", "message"),
        [
            ({"merge_method": "nuslerp", "models": [{"model": "/a"}]}, r"merge_method: 'nuslerp' cannot be read"),
            ({"merge_method": "linear", "models": [{"model": "/a"}], "tokenizer_source": "union"}, r"tokenizer_source: 'union'"),
            ({"merge_method": "linear", "modules": {}}, r"modules: mergekit's 'modules' option is not supported"),
            (
                {
                    "merge_method": "passthrough",
                    "slices": [{"sources": [{"model": "/a", "layer_range": [0, 2], "parameters": {"scale": 0.5}}]}],
                },
                r"slices\[0\]: a passthrough slice takes exactly one source without parameters",
            ),
            (
                {
                    "merge_method": "linear",
                    "slices": [
                        {"sources": [{"model": "/a", "layer_range": [0, 2]}]},
                        {"sources": [{"model": "/a", "layer_range": [0, 2]}]},
                    ],
                },
                r"2 slices stack or reorder layers",
            ),
            ({"merge_method": "linear", "models": [{"model": "/a", "paramters": {}}]}, r"models\[0\]\.paramters: unknown key"),
        ],
    )
    def test_refused_configs(self, tmp_path, config, message):
        with pytest.raises(ConfigError, match=message):
            self._load(tmp_path, config)
