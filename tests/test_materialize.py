"""Materialization: streamed export to a Hugging Face folder, resident in-place merges, the CLI."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.materialize import ResidentMerger, export_merge
from evomerge.pool import ModelPool
from evomerge.recipe import load_recipe, recipe_from_dict


def _ties(family, **extra):
    data = {
        "models": {k: str(v) for k, v in family.items()},
        "base": "base",
        "method": "ties",
        "model_parameters": {"expert_1": {"weight": [1.0, 0.4], "density": 0.5}, "expert_2": {"weight": 0.7, "density": 0.8}},
        "rules": [{"kinds": ["norm"], "method": "linear", "model_parameters": {"expert_1": {"weight": 1.0}, "expert_2": {"weight": 0.0}}}],
    }
    data.update(extra)
    return recipe_from_dict(data)


def _state(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_export_writes_a_loadable_folder(pico_family, tmp_path):
    out = export_merge(_ties(pico_family), tmp_path / "merged", progress=False)
    merged, base = _state(out), _state(pico_family["base"])
    assert set(merged) == set(base)
    assert all(merged[k].shape == base[k].shape and merged[k].dtype == base[k].dtype for k in base)
    assert all(torch.isfinite(t).all() for t in merged.values())
    # the norm rule: linear with weights (1, 0) gives expert_1's tensor exactly
    expert = _state(pico_family["expert_1"])
    assert torch.equal(merged["model.norm.weight"], expert["model.norm.weight"])
    assert torch.equal(merged["model.layers.1.input_layernorm.weight"], expert["model.layers.1.input_layernorm.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], merged["model.layers.0.mlp.up_proj.weight"])
    card = (out / "README.md").read_text()
    assert "method `ties`" in card and "density: 0.5" in card
    assert yaml.safe_load((out / "recipe.yaml").read_text())["method"] == "ties"
    assert (out / "tokenizer.json").is_file()
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary folder left behind


def test_export_casts_once_to_the_recipe_dtype_and_shards(pico_family, tmp_path):
    recipe = _ties(pico_family, dtype="bfloat16")
    out = export_merge(recipe, tmp_path / "bf16", progress=False, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    merged = _state(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    reference = _state(export_merge(_ties(pico_family), tmp_path / "fp32", progress=False))
    for name, tensor in reference.items():
        assert torch.equal(merged[name], tensor.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_export_of_a_tied_model_writes_no_head(make_pico_family, tmp_path):
    family = make_pico_family("llama", 2, tied=True)
    recipe = recipe_from_dict({"models": {k: str(v) for k, v in family.items()}, "base": "base", "method": "task_arithmetic"})
    merged = _state(export_merge(recipe, tmp_path / "tied", progress=False))
    assert "lm_head.weight" not in merged
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_existing_output_is_refused_and_failures_leave_nothing(pico_family, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match=r"taken: output folder already exists \(pass --overwrite"):
        export_merge(_ties(pico_family), tmp_path / "taken", progress=False)
    bad = _ties(pico_family, model_parameters={"expert_1": {"density": 2.0}})
    with pytest.raises(ConfigError, match="density: expected a value <= 1"):
        export_merge(bad, tmp_path / "bad", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_overwrite_replaces_only_an_export_holding_only_what_it_wrote(pico_family, tmp_path):
    out = tmp_path / "m"
    export_merge(_ties(pico_family), out, progress=False)
    first = _state(out)
    (out / "notes.txt").write_text("mine")  # a user's file inside an export: refused, nothing touched
    with pytest.raises(ConfigError, match="would delete 'notes.txt', which evomerge did not write"):
        export_merge(_ties(pico_family, seed=3), out, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and _state(out).keys() == first.keys()
    (out / "notes.txt").unlink()
    export_merge(_ties(pico_family, parameters={"lambda": 0.5}), out, progress=False, overwrite=True)
    assert any(not torch.equal(first[k], v) for k, v in _state(out).items())
    thesis = tmp_path / "thesis"  # any other folder: refused
    (thesis / "src").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("chapter 1")
    with pytest.raises(ConfigError, match="replaces only a folder evomerge exported"):
        export_merge(_ties(pico_family), thesis, progress=False, overwrite=True)
    assert sorted(p.name for p in thesis.iterdir()) == ["src", "thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_merge(_ties(pico_family), empty, progress=False, overwrite=True)
    assert (empty / "recipe.yaml").is_file()


def test_nan_result_is_a_one_line_error(pico_family, make_pico, tmp_path):
    broken = make_pico(seed=5, perturb_from=pico_family["base"])
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = recipe_from_dict({"models": {"base": str(pico_family["base"]), "broken": str(broken)}, "base": "base", "method": "task_arithmetic"})
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight: merge method 'task_arithmetic' produced NaN or inf"):
        export_merge(recipe, tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan").exists()


class TestResident:
    def test_apply_equals_export_and_later_recipes_overwrite_earlier_ones(self, pico_family, tmp_path):
        first = _ties(pico_family)
        second = recipe_from_dict(
            {
                "models": {k: str(v) for k, v in pico_family.items()},
                "base": "base",
                "method": "dare_ties",
                "model_parameters": {"expert_1": {"weight": 0.9, "density": 0.6}, "expert_2": {"weight": 0.5, "density": 0.4}},
                "seed": 11,
            }
        )
        exported = _state(export_merge(second, tmp_path / "second", progress=False))
        with ModelPool.open(second.models, second.base) as pool:
            merger = ResidentMerger.load(pool)
            merger.apply(first)
            merger.apply(second)
            live = merger.model.state_dict()
            for name, tensor in exported.items():
                assert torch.equal(live[name], tensor), name
            merger.apply(second)  # cached order statistics and task vectors give the same tensors again
            assert all(torch.equal(merger.model.state_dict()[n], t) for n, t in exported.items())

    def test_apply_changes_the_model_output(self, pico_family):
        recipe = _ties(pico_family)
        ids = torch.tensor([[1, 5, 9, 3]])
        with ModelPool.open(recipe.models, recipe.base) as pool:
            merger = ResidentMerger.load(pool)
            merger.apply(recipe)
            before = merger.model(ids).logits
            zero = {"expert_1": {"weight": 0.0}, "expert_2": {"weight": 0.0}}
            merger.apply(_ties(pico_family, model_parameters=zero, rules=[]))
            base = AutoModelForCausalLM.from_pretrained(pico_family["base"])
            assert torch.allclose(merger.model(ids).logits, base(ids).logits, atol=1e-6)
            assert not torch.allclose(before, base(ids).logits, atol=1e-4)

    def test_bf16_skeleton_gets_cast_results(self, pico_family, tmp_path):
        recipe = _ties(pico_family)
        exported = _state(export_merge(recipe, tmp_path / "m", progress=False))
        with ModelPool.open(recipe.models, recipe.base) as pool:
            merger = ResidentMerger.load(pool, dtype=torch.bfloat16)
            merger.apply(recipe)
            live = merger.model.state_dict()
            assert all(torch.equal(live[n], t.to(torch.bfloat16)) for n, t in exported.items())

    def test_recipe_with_other_models_is_refused(self, pico_family, tmp_path):
        recipe = _ties(pico_family)
        with ModelPool.open(recipe.models, recipe.base) as pool:
            merger = ResidentMerger.load(pool)
            other = recipe.model_copy(update={"models": {**recipe.models, "expert_2": str(tmp_path)}})
            with pytest.raises(ConfigError, match=r"recipe\.models\.expert_2: .* differs from the pool"):
                merger.apply(other)


class TestCli:
    def test_merge_command(self, pico_family, tmp_path, capsys):
        path = tmp_path / "r.yaml"
        path.write_text(_ties(pico_family).to_yaml())
        assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--shard-size", "10KB"]) == 0
        assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
        assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out

    def test_errors_are_one_line_with_exit_code_2(self, tmp_path, capsys):
        path = tmp_path / "r.yaml"
        path.write_text("models: {a: /nowhere}\nmethod: linear\n")
        assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "/nowhere" in err and "\n" not in err
        assert not (tmp_path / "out").exists()

    def test_debug_shows_the_traceback(self, tmp_path):
        with pytest.raises(ConfigError):
            main(["--debug", "merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])

    def test_mergekit_config_through_the_cli(self, pico_family, tmp_path):
        config = {
            "merge_method": "task_arithmetic",
            "base_model": str(pico_family["base"]),
            "models": [{"model": str(pico_family["expert_1"]), "parameters": {"weight": 1.0}}],
            "parameters": {"lambda": 1.0},
            "dtype": "float32",
        }
        path = tmp_path / "mk.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
        recipe = load_recipe(path)
        assert recipe.source_names == ["expert_1"]
        merged, expert = _state(tmp_path / "out"), _state(pico_family["expert_1"])
        for name, tensor in expert.items():  # θ0 + 1·(θ1 − θ0) = θ1 up to float32 round-off
            assert torch.allclose(merged[name], tensor, atol=1e-6), name
