"""Parameter search spaces: layout, decoding into recipes, transforms, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.recipe import RecipePlanner, recipe_from_dict
from evomerge.spaces import PoolInfo, build_space, load_space

POOL = PoolInfo(models={"base": "/m/base", "skill": "/m/skill", "lang": "/m/lang"}, base="base", num_layers=4)
REPO = Path(__file__).resolve().parents[1]


def _space(**spec):
    data = {"kind": "parameter", "method": "task_arithmetic", "model_genes": {"weight": {"low": 0.0, "high": 2.0}}}
    data.update(spec)
    return build_space(data, POOL)


def test_layout_per_layer_and_model():
    space = _space(layer_granularity=1, filters=["all"])
    # outside + 4 layer groups, 2 sources each
    assert space.dimension == 10
    assert space.gene_names[:4] == ["weight[skill]/outside", "weight[lang]/outside", "weight[skill]/L0/all", "weight[lang]/L0/all"]
    assert space.gene_names[-1] == "weight[lang]/L3/all"


def test_granularity_and_filters():
    space = _space(layer_granularity=2, filters=["attention", "mlp", {"name": "qk", "names": "q_proj"}])
    assert space.dimension == 2 + 2 * 3 * 2
    assert "weight[skill]/L2-3/qk" in space.gene_names


def test_decode_maps_unit_box_to_bounds_per_tensor():
    space = _space(layer_granularity=1, filters=["all"])
    genome = np.linspace(0.0, 1.0, space.dimension)
    recipe = space.decode(genome)
    planner = RecipePlanner(recipe, POOL.num_layers)
    expected = 2.0 * genome  # low 0, high 2
    layer2 = planner.plan("model.layers.2.mlp.down_proj.weight", 2, "mlp").params.source_values("weight")
    assert layer2 == pytest.approx(expected[6:8].tolist())
    outside = planner.plan("model.embed_tokens.weight", None, "embedding").params.source_values("weight")
    assert outside == pytest.approx(expected[0:2].tolist())


def test_unfiltered_block_tensors_fall_back_to_outside_genes():
    space = _space(filters=["attention"])
    genome = np.zeros(space.dimension)
    genome[:2] = [0.25, 0.75]
    recipe = space.decode(genome)
    planner = RecipePlanner(recipe, POOL.num_layers)
    assert planner.plan("model.layers.1.mlp.up_proj.weight", 1, "mlp").params.source_values("weight") == pytest.approx([0.5, 1.5])
    assert planner.plan("model.layers.1.self_attn.q_proj.weight", 1, "attention").params.source_values("weight") == [0.0, 0.0]


def test_simplex_transform_normalises_across_models():
    space = _space(method="linear", model_genes={"weight": {"transform": "simplex"}}, layer_granularity=0)
    recipe = space.decode(np.array([0.2, 0.6, 0.0, 0.0]))
    planner = RecipePlanner(recipe, POOL.num_layers)
    assert planner.plan("model.norm.weight", None, "norm").params.source_values("weight") == pytest.approx([0.25, 0.75])
    # all-zero group -> uniform, never a division by zero
    assert planner.plan("model.layers.0.mlp.w", 0, "mlp").params.source_values("weight") == pytest.approx([0.5, 0.5])


def test_abs_transform():
    space = _space(model_genes={"weight": {"low": -1.0, "high": 1.0, "transform": "abs"}}, layer_granularity=0)
    recipe = space.decode(np.array([0.0, 0.25, 1.0, 0.5]))
    assert recipe.model_parameters["skill"]["weight"] == 1.0
    assert recipe.model_parameters["lang"]["weight"] == 0.5


def test_smooth_mode_genes_are_gradients_over_layers():
    space = _space(smooth=True, anchors=2, filters=["mlp"])
    assert space.dimension == 2 + 2 * 2
    genome = np.array([0.5, 0.5, 0.0, 0.0, 1.0, 0.5])  # skill anchors 0 then... see names
    names = space.gene_names
    assert names[2:] == ["weight[skill]/mlp/a0", "weight[lang]/mlp/a0", "weight[skill]/mlp/a1", "weight[lang]/mlp/a1"]
    recipe = space.decode(genome)
    planner = RecipePlanner(recipe, POOL.num_layers)
    skill = [planner.plan(f"model.layers.{i}.mlp.w", i, "mlp").params.source_values("weight")[0] for i in range(4)]
    assert skill == pytest.approx([0.0, 2 / 3, 4 / 3, 2.0])
    # the final norm is outside the blocks: not touched by the smooth mlp rule
    assert planner.plan("model.norm.weight", None, "norm").params.source_values("weight") == pytest.approx([1.0, 1.0])


def test_shared_and_fixed_parameters():
    space = _space(method="ties", model_genes={"density": {"low": 0.2, "high": 1.0}}, shared_genes={"lambda": {"low": 0.5, "high": 1.5}},
                   fixed={"normalize": False}, fixed_model={"weight": 0.7}, layer_granularity=0)
    recipe = space.decode(np.array([0.5, 0.0, 1.0, 1.0, 0.0, 0.5]))
    params = RecipePlanner(recipe, POOL.num_layers).plan("model.layers.3.mlp.w", 3, "mlp").params
    assert params.shared["lambda"] == pytest.approx(1.5)
    assert params.shared["normalize"] is False
    assert params.source_values("density") == pytest.approx([0.2, 0.6])
    assert params.source_values("weight") == [0.7, 0.7]


def test_initial_genome_uses_init_values():
    space = _space(model_genes={"weight": {"low": 0.0, "high": 2.0, "init": 1.5}}, layer_granularity=0)
    assert space.initial_genome().tolist() == [0.75] * 4


def test_genome_is_clipped_and_checked():
    space = _space(layer_granularity=0)
    recipe = space.decode(np.array([-1.0, 2.0, 0.5, 0.5]))
    assert recipe.model_parameters["skill"]["weight"] == 0.0
    assert recipe.model_parameters["lang"]["weight"] == 2.0
    with pytest.raises(ConfigError, match=r"genome: expected 4 genes"):
        space.decode(np.zeros(3))
    with pytest.raises(ConfigError, match=r"genome: contains NaN"):
        space.decode(np.array([np.nan, 0, 0, 0]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "paramter"}, r"kind: unknown search space 'paramter' \(did you mean 'parameter'\?\)"),
        ({"method": "tie"}, r"method: unknown merge method 'tie'"),
        ({"model_genes": {"wieght": {}}}, r"model_genes\.wieght: unknown parameter.*did you mean 'weight'"),
        ({"model_genes": {"weight": {"low": 1, "high": 0}}}, r"model_genes\.weight: .*expected low < high"),
        ({"filters": ["attn"]}, r"filters: unknown filter 'attn'"),
        ({"granularity": 2}, r"granularity: unknown key \(did you mean 'layer_granularity'\?\)"),
        ({"model_genes": {}, "shared_genes": {}}, r"expected at least one gene"),
        ({"shared_genes": {"weight": {}}}, r"shared_genes\.weight: unknown parameter"),
    ],
)
def test_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        _space(**spec)


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")))
def test_bundled_spaces_load_and_decode(path):
    space = load_space(path, POOL)
    recipe = space.decode(space.initial_genome())
    planner = RecipePlanner(recipe, POOL.num_layers)
    plan = planner.plan("model.layers.0.self_attn.q_proj.weight", 0, "attention")
    assert plan.operator.name == recipe.method
    assert len(plan.params.per_source) == 2


@pytest.mark.parametrize("smooth", [False, True])
def test_decoded_recipe_passes_full_validation_unchanged(smooth):
    space = _space(method="ties", model_genes={"density": {"low": 0.2, "high": 1.0}}, shared_genes={"lambda": {}},
                   filters=["attention", "mlp"], smooth=smooth, fixed={"normalize": True})
    recipe = space.decode(np.random.default_rng(0).random(space.dimension))
    assert recipe_from_dict(recipe.model_dump()).model_dump() == recipe.model_dump()
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())).model_dump() == recipe.model_dump()
