"""Pico test models: real HF folders, deterministic, with experts that share a base."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError
from evomerge.io import TensorIndex
from evomerge.zoo.pico import (
    ARCHITECTURES,
    build_pico,
    build_pico_family,
    pico_vocabulary,
)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_every_architecture_loads_and_runs_with_transformers(make_pico, arch, tied):
    folder = make_pico(arch=arch, tied=tied, seed=2)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] is tied
    assert config["vocab_size"] == 64
    assert len(AutoTokenizer.from_pretrained(folder)) == 64
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert (head.data_ptr() == embedding.data_ptr()) is tied
    with TensorIndex.open(folder) as index:
        assert ("lm_head.weight" in index) is not tied
        assert index.shape(next(n for n in index.names if "wte" in n or "embed_tokens" in n)) == (64, 32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 14, 6, 16, 7]])).logits
    assert logits.shape == (1, 6, 64)
    assert torch.isfinite(logits).all()


def test_tokenizer_is_a_real_word_level_tokenizer(make_pico):
    folder = make_pico(vocab_size=70)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 70
    special = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special == (0, 1, 2, 3)
    assert tokenizer("1 + 2 = 3").input_ids == [5, 14, 6, 16, 7]
    assert tokenizer("what is zebra ?").input_ids == [26, 21, 3, 19]
    assert tokenizer("a z").input_ids == [31, 56]
    assert tokenizer.decode([5, 14, 6]) == "1 + 2"
    vocab = pico_vocabulary(70)
    assert sorted(vocab.values()) == list(range(70))
    assert vocab["w12"] == 69 and "w13" not in vocab


def test_same_seed_same_weights_other_seed_other_weights(make_pico):
    a, b, c = make_pico(seed=4), make_pico(seed=4), make_pico(seed=5)
    with TensorIndex.open(a) as ia, TensorIndex.open(b) as ib, TensorIndex.open(c) as ic:
        for name in ia.names:
            assert torch.equal(ia.get(name), ib.get(name)), name
        assert not torch.equal(ia.get("model.layers.0.mlp.up_proj.weight"), ic.get("model.layers.0.mlp.up_proj.weight"))


def test_build_does_not_touch_the_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_pico(tmp_path / "m", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_dtype_and_sharding(make_pico):
    folder = make_pico(arch="gpt2", dtype=torch.bfloat16, sharded=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not (folder / "model.safetensors").exists()
    with TensorIndex.open(folder) as tensors:
        assert {tensors.dtype(n) for n in tensors.names} == {torch.bfloat16}


def test_experts_share_the_base_with_small_relative_noise(tmp_path):
    family = build_pico_family(tmp_path, "llama", 2, perturb_scale=0.05)
    assert list(family) == ["base", "expert_1", "expert_2"]
    with TensorIndex.open(family["base"]) as base, TensorIndex.open(family["expert_1"]) as e1, TensorIndex.open(
        family["expert_2"]
    ) as e2:
        assert base.names == e1.names == e2.names
        w = base.get("model.layers.0.mlp.down_proj.weight")
        d1 = e1.get("model.layers.0.mlp.down_proj.weight") - w
        d2 = e2.get("model.layers.0.mlp.down_proj.weight") - w
        rel = (d1.pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
        assert 0.045 < rel < 0.055
        assert abs(torch.nn.functional.cosine_similarity(d1.flatten(), d2.flatten(), dim=0).item()) < 0.1
        norm_delta = e1.get("model.norm.weight") - base.get("model.norm.weight")
        assert torch.equal(base.get("model.norm.weight"), torch.ones(32))
        assert 0.02 < norm_delta.abs().mean().item() < 0.06
    again = build_pico_family(tmp_path / "again", "llama", 1, perturb_scale=0.05)
    with TensorIndex.open(family["expert_1"]) as a, TensorIndex.open(again["expert_1"]) as b:
        assert all(torch.equal(a.get(n), b.get(n)) for n in a.names)


def test_perturb_from_must_match_shape(make_pico, tmp_path):
    base = make_pico(hidden=32)
    with pytest.raises(ConfigError, match=r"perturb_from: tensor '.*' of .* does not match this pico"):
        build_pico(tmp_path / "a", hidden=48, perturb_from=base)
    with pytest.raises(ConfigError, match=r"perturb_from: tensor 'lm_head.weight' .* does not match"):
        build_pico(tmp_path / "b", tied=True, perturb_from=base)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"arch": "bert"},
            "arch: expected one of llama, mistral, qwen2, qwen3, gemma, gemma2, phi, phi3, gpt2, got 'bert'",
        ),
        ({"hidden": 20}, "hidden: expected a positive multiple of 16, got 20"),
        ({"layers": 0}, "layers: expected a positive integer, got 0"),
        ({"vocab_size": 4}, "vocab_size: expected at least 5, got 4"),
    ],
)
def test_bad_arguments(tmp_path, kw, message):
    with pytest.raises(ConfigError) as err:
        build_pico(tmp_path / "x", **kw)
    assert str(err.value) == message


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        build_pico(tmp_path)
