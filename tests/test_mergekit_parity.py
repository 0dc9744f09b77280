"""A mergekit config merged by evomerge gives mergekit's own tensors (deterministic methods).

mergekit is a test-only dependency (LGPL; never imported by the package): this module skips cleanly
where it is not installed, and CI installs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from evomerge.materialize import export_merge
from evomerge.recipe import load_recipe

mergekit_merge = pytest.importorskip("mergekit.merge")
mergekit_config = pytest.importorskip("mergekit.config")
mergekit_options = pytest.importorskip("mergekit.options")


def _tensors(folder: Path) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory, pico_builder):
    root = tmp_path_factory.mktemp("parity")
    base = pico_builder(root / "base", arch="llama", seed=0, layers=3)
    one = pico_builder(root / "one", arch="llama", seed=1, layers=3, perturb_from=base, perturb_scale=0.05)
    two = pico_builder(root / "two", arch="llama", seed=2, layers=3, perturb_from=base, perturb_scale=0.05)
    three = pico_builder(root / "three", arch="llama", seed=3, layers=3, perturb_from=base, perturb_scale=0.05)
    return {"base": base, "one": one, "two": two, "three": three}


def _configs(f):
    models3 = lambda params: [{"model": str(f[k]), "parameters": p} for k, p in params.items()]  # noqa: E731
    return {
        "linear": {
            "merge_method": "linear",
            "models": models3({"one": {"weight": 0.7}, "two": {"weight": [0.1, 0.9]}, "three": {"weight": 0.4}}),
            "dtype": "float32",
        },
        "linear_unnormalized": {
            "merge_method": "linear",
            "models": models3({"one": {"weight": 0.7}, "two": {"weight": 0.2}}),
            "parameters": {"normalize": False},
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "slices": [
                {"sources": [{"model": str(f["base"]), "layer_range": [0, 3]}, {"model": str(f["one"]), "layer_range": [0, 3]}]}
            ],
            "base_model": str(f["base"]),
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.3]}, {"value": 0.6}]},
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": str(f["base"]),
            "models": models3({"one": {"weight": 0.8}, "two": {"weight": [0.3, 1.2]}}),
            "parameters": {"lambda": 0.9},
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": str(f["base"]),
            "models": models3({"one": {"weight": 1.0, "density": 0.5}, "two": {"weight": 0.6, "density": 0.3}, "three": {"weight": 0.4, "density": 0.8}}),
            "dtype": "float32",
        },
        "ties_sum": {
            "merge_method": "ties",
            "base_model": str(f["base"]),
            "models": models3({"one": {"weight": 1.0, "density": 0.4}, "two": {"weight": 0.6, "density": 0.6}}),
            "parameters": {"normalize": False, "int8_mask": True},
            "dtype": "float32",
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": str(f["base"]),
            "models": models3({"one": {"weight": 1.0, "density": 0.6, "gamma": 0.05}, "two": {"weight": 0.5, "density": 0.5, "gamma": 0.1}}),
            "dtype": "float32",
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": str(f["base"]),
            "models": models3({"one": {"weight": 1.0, "density": 0.6, "gamma": 0.05}, "two": {"weight": 0.5, "density": 0.5, "gamma": 0.1}}),
            "dtype": "float32",
        },
        "passthrough": {  # a layer path (frankenmerge): layers stacked from two models
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(f["one"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(f["two"]), "layer_range": [1, 3]}]},
                {"sources": [{"model": str(f["one"]), "layer_range": [2, 3]}]},
            ],
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": str(f["base"]),
            "models": models3({"one": {}, "two": {}, "three": {}}),
            "dtype": "float32",
        },
    }


@pytest.mark.parametrize(
    "method",
    ["linear", "linear_unnormalized", "slerp", "task_arithmetic", "ties", "ties_sum", "breadcrumbs", "breadcrumbs_ties", "model_stock", "passthrough"],
)
def test_same_tensors_as_mergekit(family, tmp_path, method):
    config = _configs(family)[method]
    config_path = tmp_path / f"{method}.yaml"
    config_path.write_text(yaml.safe_dump(config))

    theirs = tmp_path / "mergekit"
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(config),
        out_path=str(theirs),
        options=mergekit_options.MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False),
    )
    ours = export_merge(load_recipe(config_path), tmp_path / "evomerge", progress=False)

    expected, got = _tensors(theirs), _tensors(ours)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        scale = float(tensor.abs().max()) + 1e-12
        diff = float((got[name] - tensor).abs().max())
        assert diff <= 2e-6 * scale, f"{method}: {name} differs by {diff:.3g} (scale {scale:.3g})"
