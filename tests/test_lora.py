"""LoRA adapters as sources, checked against peft itself: a pico model, random LoRA weights, the
saved adapter; our base + ΔW must equal peft's ``merge_and_unload`` weights for LoRA, rsLoRA (with
rank/alpha patterns), fan-in/fan-out (GPT-2 Conv1D), trained biases, lora_bias, modules_to_save and
embedding LoRA. Other adapter kinds and adapters trained on another base are one-line errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import ModelError
from evomerge.experiment import load_experiment
from evomerge.io import TensorIndex
from evomerge.materialize import export_merge
from evomerge.pool import ModelPool, lora
from evomerge.recipe import load_recipe, recipe_from_dict
from evomerge.spaces.preview import experiment_space

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"


def make_adapter(base: Path, out: Path, seed: int = 0, config_class=None, **config) -> dict[str, torch.Tensor]:
    """Save a peft adapter with random weights for ``base`` to ``out``; return peft's merged state dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config_class = config_class or peft.LoraConfig
    defaults = {"r": 4, "lora_alpha": 8, "init_lora_weights": False} if config_class is peft.LoraConfig else {"r": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, config_class(**{**defaults, **config}))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in peft_model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        peft_model.save_pretrained(out)
        if config_class is not peft.LoraConfig or config.get("use_dora"):
            return {}
        return {name: t.detach().clone() for name, t in peft_model.merge_and_unload().state_dict().items()}


CASES = {
    "lora-embedding-modules-to-save": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                                 "modules_to_save": ["lm_head"]}),
    "rslora-rank-alpha-patterns": ("llama", {"target_modules": ["q_proj", "k_proj", "gate_proj"], "use_rslora": True,
                                             "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"gate_proj": 3}}),
    "gpt2-fan-in-fan-out-lora-only-bias": ("gpt2", {"target_modules": ["c_attn", "c_fc", "c_proj"], "fan_in_fan_out": True,
                                                    "bias": "lora_only", "use_rslora": True}),
    "gpt2-all-biases": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "bias": "all"}),
    "gpt2-lora-bias": ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "lora_bias": True}),
}
CHANGED = {  # tensors each adapter changes (per layer of the 2-layer pico)
    "lora-embedding-modules-to-save": 8,
    "rslora-rank-alpha-patterns": 6,
    "gpt2-fan-in-fan-out-lora-only-bias": 16,
    "gpt2-all-biases": 19,  # + the biases of every norm, MLP and attention layer not targeted
    "gpt2-lora-bias": 4,
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, tuple[Path, Path, dict[str, torch.Tensor]]]:
    """case -> (base folder, adapter folder, peft's merged weights)."""
    from evomerge.zoo.pico import build_pico

    root = tmp_path_factory.mktemp("adapters")
    bases = {arch: build_pico(root / arch, arch) for arch in ("llama", "gpt2")}
    out = {}
    for i, (case, (arch, config)) in enumerate(CASES.items()):
        merged = make_adapter(bases[arch], root / case, seed=i, **config)
        out[case] = (bases[arch], root / case, merged)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_base_plus_delta_equals_peft_merge_and_unload(adapters, case):
    base, adapter, merged = adapters[case]
    with ModelPool.open({"base": base, "lora": f"{base}+{adapter}"}, "base") as pool:
        changed = []
        for name in pool.tensor_names:
            ours = pool.tensor("lora", name)
            assert torch.equal(ours, merged[name]), name
            if not torch.equal(ours, pool.tensor("base", name)):
                changed.append(name)
            flat = torch.empty(min(37, ours.numel()))
            for start in (0, 5, ours.numel() - flat.numel()):
                if 0 <= start and start + flat.numel() <= ours.numel():
                    pool.tensor_range("lora", name, start, flat)
                    assert torch.equal(flat, ours.reshape(-1)[start : start + flat.numel()]), (name, start)
        assert len(changed) == CHANGED[case]


def test_rows_in_blocks_read_the_same_whole_or_in_ranges(adapters, monkeypatch):
    """Large tensors form ΔW block of rows by block of rows; a range read computes the same blocks."""
    monkeypatch.setattr(lora, "DELTA_BLOCK", 48)  # 1-3 rows per block on the pico's 16-64 columns
    base, adapter, merged = adapters["gpt2-fan-in-fan-out-lora-only-bias"]
    with ModelPool.open({"base": base, "lora": f"{base}+{adapter}"}, "base") as pool:
        for name in pool.tensor_names:
            whole = pool.tensor("lora", name)
            torch.testing.assert_close(whole, merged[name], rtol=1e-6, atol=1e-7)
            pieces, start = [], 0
            while start < whole.numel():
                piece = torch.empty(min(29, whole.numel() - start), dtype=torch.float64)  # another dtype: staged
                pool.tensor_range("lora", name, start, piece)
                pieces.append(piece.float())
                start += piece.numel()
            assert torch.equal(torch.cat(pieces), whole.reshape(-1)), name
            into = torch.empty(whole.shape, dtype=torch.bfloat16)
            assert torch.equal(pool.model("lora").read(name, "cpu", None, out=into), whole.to(torch.bfloat16))


def test_opening_reads_no_tensor_and_untouched_tensors_are_the_bases(adapters, monkeypatch):
    base, adapter, _ = adapters["lora-embedding-modules-to-save"]
    reads = []
    original = TensorIndex.get
    monkeypatch.setattr(TensorIndex, "get", lambda self, name, *a, **k: reads.append(name) or original(self, name, *a, **k))
    with ModelPool.open({"base": base, "lora": f"{base}+{adapter}"}, "base") as pool:
        assert reads == []
        source = pool.model("lora")
        assert source.source.adapter.path == adapter.resolve()
        assert set(source.files) >= {adapter / "adapter_config.json", adapter / "adapter_model.safetensors", base / "config.json"}
        norm = "model.layers.0.input_layernorm.weight"
        assert torch.equal(pool.tensor("lora", norm), pool.tensor("base", norm))
        assert reads == [norm, norm]  # an untouched tensor is one base read, no adapter factor


def refuse_config(adapter: Path, **change) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("dora", r"DoRA \(use_dora\) adapters are not supported yet; evomerge merges plain LoRA and rsLoRA adapters"),
        ("loha", r"the adapter is a LOHA adapter \(peft_type\); evomerge merges LoRA adapters only"),
        ("pissa", r"the adapter was initialised with 'pissa_niter_4', which rewrites the base weights"),
        ("pickle", r"has no adapter_model.safetensors \(only adapter_model.bin: evomerge reads safetensors only"),
        ("rank-mismatch", r"module 'model.layers.0.self_attn.q_proj': adapter_config.json gives rank 8 but the factors are \[4, 32\]"),
    ],
)
def test_other_adapter_kinds_are_refused_in_one_line(kind, message, tmp_path, pico_family):
    base = pico_family["base"]
    adapter = tmp_path / kind
    if kind == "dora":
        make_adapter(base, adapter, target_modules=["q_proj"], use_dora=True)
    elif kind == "loha":
        make_adapter(base, adapter, config_class=peft.LoHaConfig, target_modules=["q_proj"])
    else:
        make_adapter(base, adapter, target_modules=["q_proj"])
        if kind == "pissa":
            refuse_config(adapter, init_lora_weights="pissa_niter_4")
        elif kind == "pickle":
            (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
        else:
            refuse_config(adapter, r=8)
    with pytest.raises(ModelError, match=message) as info:
        ModelPool.open({"base": base, "x": f"{base}+{adapter}"}, "base")
    assert "\n" not in str(info.value) and str(info.value).startswith(f"model 'x' ({base}+{adapter}): ")


def test_an_adapter_trained_on_another_base_names_both(tmp_path, pico_family, make_pico, hf_cache):
    other = make_pico(hidden=48, seed=9)
    adapter = tmp_path / "adapter"
    make_adapter(other, adapter, target_modules=["q_proj"])
    base = pico_family["base"]
    with pytest.raises(ModelError) as info:
        ModelPool.open({"base": base, "x": f"{base}+{adapter}"}, "base")
    assert str(info.value) == (
        f"model 'x' ({base}+{adapter}): the adapter (trained on '{other}') does not fit this base: tensor "
        "'model.layers.0.self_attn.q_proj.weight' is [32, 32] in the base but the adapter's update is [48, 48]"
    )
    fitting = tmp_path / "fitting"
    make_adapter(base, fitting, target_modules=["q_proj"])
    refuse_config(fitting, base_model_name_or_path="org/other-model")
    commit = hf_cache.publish("org/pico", base)
    with pytest.raises(ModelError) as info:
        ModelPool.open({"base": "org/pico", "x": f"org/pico+{fitting}"}, "base")
    assert str(info.value) == (
        f"model 'x' (org/pico@{commit}+{fitting}): the adapter was trained on 'org/other-model', "
        "not on 'org/pico' (the model it is applied to here)"
    )


@pytest.fixture
def hub_lora(tmp_path, pico_family, hf_cache) -> dict:
    """``org/pico`` (the base) and ``org/pico-math`` (a LoRA adapter for it) in the cache, and peft's merge saved densely."""
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    merged = make_adapter(pico_family["base"], adapter, target_modules=["q_proj", "down_proj"], use_rslora=True)
    refuse_config(adapter, base_model_name_or_path="org/pico")
    dense = tmp_path / "dense"
    model = AutoModelForCausalLM.from_pretrained(pico_family["base"])
    model.load_state_dict(merged)
    model.save_pretrained(dense)
    return {
        "base": hf_cache.publish("org/pico", pico_family["base"]),
        "adapter": hf_cache.publish("org/pico-math", adapter),
        "dense": dense,
    }


def test_experiment_with_a_hub_base_and_a_hub_adapter_merges_like_the_dense_model(hub_lora, tmp_path, pico_family):
    (tmp_path / "fitness.py").write_text("def score(model, tokenizer):\n    return {'x': 1.0}\n")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "lora",
        "models": {"base": "org/pico", "math": {"model": "org/pico", "lora": "org/pico-math"},
                   "other": str(pico_family["expert_2"])},
        "base": "base",
        "search_space": str(SPACE),
        "strategy": {"name": "random"},
        "fitness": {"python": "fitness.py:score"},
        "budget": {"evaluations": 2},
    }))
    experiment = load_experiment(path)
    assert experiment.models["math"] == f"org/pico@{hub_lora['base']}+org/pico-math@{hub_lora['adapter']}"
    assert experiment.origins["math"]["adapter"]["commit"] == hub_lora["adapter"]
    assert experiment_space(experiment).dimension > 0  # the pool opens: layer map and checks hold for the LoRA source
    recipe = {"base": "base", "method": "task_arithmetic",
              "model_parameters": {"math": {"weight": 0.7}, "other": {"weight": 0.4}}}
    export_merge(recipe_from_dict({**recipe, "models": experiment.models}), tmp_path / "ours", progress=False)
    dense_models = {**experiment.models, "math": str(hub_lora["dense"])}
    export_merge(recipe_from_dict({**recipe, "models": dense_models}), tmp_path / "theirs", progress=False)
    with TensorIndex.open(tmp_path / "ours") as ours, TensorIndex.open(tmp_path / "theirs") as dense:
        assert ours.names == dense.names
        for name in ours.names:
            assert torch.equal(ours.get(name), dense.get(name)), name
    card = (tmp_path / "ours" / "README.md").read_text()
    assert (f"- `math`: LoRA adapter [`org/pico-math`](https://huggingface.co/org/pico-math) at commit `{hub_lora['adapter']}`"
            f" applied to [`org/pico`](https://huggingface.co/org/pico) at commit `{hub_lora['base']}`") in card
    written = yaml.safe_load((tmp_path / "ours" / "recipe.yaml").read_text())
    assert written["models"]["math"] == experiment.models["math"]


def test_a_hub_adapter_named_as_a_model_or_a_model_as_an_adapter(hub_lora):
    with pytest.raises(ModelError, match=rf"is a LoRA adapter, not a model; name the model it applies to: "
                       rf"'org/pico\+org/pico-math@{hub_lora['adapter']}'"):
        ModelPool.open({"base": "org/pico", "x": "org/pico-math"}, "base")
    with pytest.raises(ModelError, match=r"/snapshots/[0-9a-f]{40} is not a LoRA adapter \(no adapter_config.json\)$"):
        ModelPool.open({"base": "org/pico", "x": "org/pico+org/pico"}, "base")


def test_mergekit_config_with_a_lora_source(hub_lora, tmp_path):
    mk = tmp_path / "mk.yaml"
    mk.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": "org/pico", "parameters": {"weight": 0.5}},
                   {"model": "org/pico+org/pico-math", "parameters": {"weight": 0.5}}],
    }))
    recipe = load_recipe(mk)
    assert recipe.models == {"pico": f"org/pico@{hub_lora['base']}",
                             "pico-math": f"org/pico@{hub_lora['base']}+org/pico-math@{hub_lora['adapter']}"}
    export_merge(recipe, tmp_path / "ours", progress=False)
    dense = recipe.model_copy(update={"models": {**recipe.models, "pico-math": str(hub_lora["dense"])}})
    export_merge(dense, tmp_path / "theirs", progress=False)
    with TensorIndex.open(tmp_path / "ours") as ours, TensorIndex.open(tmp_path / "theirs") as theirs:
        assert all(torch.equal(ours.get(n), theirs.get(n)) for n in ours.names)
