"""Layer and module-kind assignment for every supported architecture, and its error paths."""

from __future__ import annotations

import pytest

from evomerge.errors import ModelError
from evomerge.io import TensorIndex, read_config
from evomerge.pool import LayerMap, ModuleKind
from evomerge.zoo.pico import ARCHITECTURES

A, M, N, E, H, O = (
    ModuleKind.ATTENTION,
    ModuleKind.MLP,
    ModuleKind.NORM,
    ModuleKind.EMBEDDING,
    ModuleKind.HEAD,
    ModuleKind.OTHER,
)

# (tensor name, layer, kind) that each architecture's pico must map exactly so.
EXPECTED = {
    "llama": [
        ("model.embed_tokens.weight", None, E),
        ("model.layers.0.self_attn.q_proj.weight", 0, A),
        ("model.layers.1.self_attn.o_proj.weight", 1, A),
        ("model.layers.1.mlp.down_proj.weight", 1, M),
        ("model.layers.0.mlp.gate_proj.weight", 0, M),
        ("model.layers.1.input_layernorm.weight", 1, N),
        ("model.layers.0.post_attention_layernorm.weight", 0, N),
        ("model.norm.weight", None, N),
        ("lm_head.weight", None, H),
    ],
    "mistral": [
        ("model.layers.1.self_attn.k_proj.weight", 1, A),
        ("model.layers.0.mlp.up_proj.weight", 0, M),
        ("model.norm.weight", None, N),
    ],
    "qwen2": [
        ("model.layers.0.self_attn.q_proj.bias", 0, A),
        ("model.layers.1.self_attn.v_proj.bias", 1, A),
        ("model.layers.1.mlp.down_proj.weight", 1, M),
        ("lm_head.weight", None, H),
    ],
    "qwen3": [
        ("model.layers.1.self_attn.q_norm.weight", 1, N),
        ("model.layers.0.self_attn.k_norm.weight", 0, N),
        ("model.layers.0.self_attn.k_proj.weight", 0, A),
    ],
    "gemma": [
        ("model.layers.1.mlp.gate_proj.weight", 1, M),
        ("model.layers.0.input_layernorm.weight", 0, N),
    ],
    "gemma2": [
        ("model.layers.0.pre_feedforward_layernorm.weight", 0, N),
        ("model.layers.1.post_feedforward_layernorm.weight", 1, N),
        ("model.layers.1.mlp.down_proj.weight", 1, M),
    ],
    "phi": [
        ("model.layers.0.self_attn.dense.weight", 0, A),
        ("model.layers.1.self_attn.q_proj.bias", 1, A),
        ("model.layers.1.mlp.fc1.weight", 1, M),
        ("model.layers.0.mlp.fc2.bias", 0, M),
        ("model.layers.0.input_layernorm.bias", 0, N),
        ("model.final_layernorm.weight", None, N),
        ("model.final_layernorm.bias", None, N),
        ("lm_head.bias", None, H),
    ],
    "phi3": [
        ("model.layers.0.self_attn.qkv_proj.weight", 0, A),
        ("model.layers.1.mlp.gate_up_proj.weight", 1, M),
        ("model.layers.1.mlp.down_proj.weight", 1, M),
    ],
    "gpt2": [
        ("transformer.wte.weight", None, E),
        ("transformer.wpe.weight", None, E),
        ("transformer.h.0.attn.c_attn.weight", 0, A),
        ("transformer.h.1.attn.c_proj.bias", 1, A),
        ("transformer.h.1.mlp.c_fc.weight", 1, M),
        ("transformer.h.0.mlp.c_proj.weight", 0, M),
        ("transformer.h.0.ln_1.weight", 0, N),
        ("transformer.h.1.ln_2.bias", 1, N),
        ("transformer.ln_f.weight", None, N),
        ("lm_head.weight", None, H),
    ],
}

# Tensors per layer and kind counts of one block, from the architectures' module lists.
BLOCK_KINDS = {
    "llama": {A: 4, M: 3, N: 2},
    "mistral": {A: 4, M: 3, N: 2},
    "qwen2": {A: 7, M: 3, N: 2},
    "qwen3": {A: 4, M: 3, N: 4},
    "gemma": {A: 4, M: 3, N: 2},
    "gemma2": {A: 4, M: 3, N: 4},
    "phi": {A: 8, M: 4, N: 2},
    "phi3": {A: 2, M: 2, N: 2},
    "gpt2": {A: 4, M: 4, N: 4},
}


@pytest.fixture(scope="module")
def pico_maps(make_pico):
    maps = {}
    for arch in ARCHITECTURES:
        folder = make_pico(arch=arch, layers=2)
        with TensorIndex.open(folder) as index:
            maps[arch] = LayerMap.build(read_config(folder), index.names, arch)
    return maps


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pico_tensors_map_to_their_layer_and_kind(pico_maps, arch):
    layer_map = pico_maps[arch]
    assert layer_map.model_type == arch
    assert layer_map.num_layers == 2
    assert not layer_map.tied
    for name, layer, kind in EXPECTED[arch]:
        info = layer_map.info(name)
        assert (info.name, info.layer, info.kind) == (name, layer, kind)
    for layer in (0, 1):
        kinds = [layer_map.info(n).kind for n in layer_map.names_in_layer(layer)]
        assert {k: kinds.count(k) for k in set(kinds)} == BLOCK_KINDS[arch]
        assert all(layer_map.info(n).layer == layer for n in layer_map.names_in_layer(layer))
    assert sum(len(layer_map.names_in_layer(i)) for i in (0, 1)) == len(
        [i for i in layer_map if i.layer is not None]
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_canonical_order_is_embeddings_blocks_final_norm_head(pico_maps, arch):
    infos = list(pico_maps[arch])
    assert infos[0].kind is E
    assert infos[-1].kind is H
    ranks = [0 if i.kind is E else 1 if i.layer is not None else 3 if i.kind is H else 2 for i in infos]
    assert ranks == sorted(ranks)
    layers = [i.layer for i in infos if i.layer is not None]
    assert layers == sorted(layers)


def test_llama_canonical_names_exactly(pico_maps):
    layer_map = pico_maps["llama"]
    assert layer_map.names_in_layer(1) == (
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    )
    assert layer_map.names[0] == "model.embed_tokens.weight"
    assert layer_map.names[-2:] == ("model.norm.weight", "lm_head.weight")
    assert layer_map.embedding_name == "model.embed_tokens.weight"
    assert layer_map.head_name == "lm_head.weight"


def test_tied_picos_have_no_head_tensor(make_pico):
    for arch in ("llama", "gpt2"):
        folder = make_pico(arch=arch, tied=True)
        with TensorIndex.open(folder) as index:
            layer_map = LayerMap.build(read_config(folder), index.names, arch)
        assert layer_map.tied
        assert "lm_head.weight" not in layer_map
        assert [i.kind for i in layer_map].count(H) == 0


def _llama_names(layers: int, extra: tuple[str, ...] = ()) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", *extra]
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"]
    return names


def test_block_index_is_parsed_only_after_the_container():
    names = _llama_names(12, ("model.layers.3.block_sparse_moe.experts.1.w1.weight",
                              "model.layers.3.block_sparse_moe.gate.weight"))
    layer_map = LayerMap.build({"model_type": "mixtral", "num_hidden_layers": 12}, names, "moe")
    assert layer_map.info("model.layers.3.block_sparse_moe.experts.1.w1.weight").layer == 3
    assert layer_map.info("model.layers.3.block_sparse_moe.experts.1.w1.weight").kind is M
    assert layer_map.info("model.layers.11.mlp.down_proj.weight").layer == 11
    assert layer_map.names_in_layer(1) == (
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    )
    assert len(layer_map.names_in_layer(3)) == 4
    assert [i.layer for i in layer_map if i.layer is not None][-2:] == [11, 11]


def test_in_block_tensor_of_unknown_module_is_other():
    names = _llama_names(1, ("model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.0.adapter.scale"))
    layer_map = LayerMap.build({"model_type": "llama", "num_hidden_layers": 1}, names, "m")
    assert layer_map.info("model.layers.0.self_attn.rotary_emb.inv_freq").kind is A
    assert layer_map.info("model.layers.0.adapter.scale").kind is O


def test_gpt2_without_prefix_and_gpt_neox():
    bare = ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.0.attn.bias", "h.0.mlp.c_fc.weight",
            "h.0.ln_1.weight", "ln_f.weight"]
    layer_map = LayerMap.build({"model_type": "gpt2", "n_layer": 1}, bare, "openai gpt2")
    assert layer_map.tied
    assert layer_map.embedding_name == "wte.weight"
    assert [(i.name, i.layer, i.kind) for i in layer_map] == [
        ("wte.weight", None, E),
        ("wpe.weight", None, E),
        ("h.0.attn.bias", 0, A),
        ("h.0.attn.c_attn.weight", 0, A),
        ("h.0.ln_1.weight", 0, N),
        ("h.0.mlp.c_fc.weight", 0, M),
        ("ln_f.weight", None, N),
    ]
    neox = ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.query_key_value.weight",
            "gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "gpt_neox.layers.0.post_attention_layernorm.weight",
            "gpt_neox.final_layer_norm.weight", "embed_out.weight"]
    config = {"model_type": "gpt_neox", "num_hidden_layers": 1, "tie_word_embeddings": False}
    layer_map = LayerMap.build(config, neox, "pythia")
    assert layer_map.head_name == "embed_out.weight"
    assert [i.kind for i in layer_map] == [E, A, M, N, N, H]


def test_unknown_model_type_with_known_naming_is_accepted():
    layer_map = LayerMap.build({"model_type": "my_llama", "num_hidden_layers": 2}, _llama_names(2), "custom")
    assert layer_map.info("model.layers.1.mlp.down_proj.weight").layer == 1
    assert not layer_map.tied


def test_tied_is_taken_from_config_or_inferred():
    no_head = [n for n in _llama_names(1) if n != "lm_head.weight"]
    assert LayerMap.build({"model_type": "llama", "num_hidden_layers": 1}, no_head, "m").tied
    assert not LayerMap.build({"model_type": "llama", "num_hidden_layers": 1}, _llama_names(1), "m").tied
    config = {"model_type": "llama", "num_hidden_layers": 1, "tie_word_embeddings": True}
    both = LayerMap.build(config, _llama_names(1), "m")
    assert both.tied and "lm_head.weight" in both
    with pytest.raises(ModelError) as err:
        LayerMap.build({"model_type": "llama", "num_hidden_layers": 1, "tie_word_embeddings": False}, no_head, "m")
    assert str(err.value) == "m: config.json sets tie_word_embeddings false but there is no lm_head.weight tensor"


@pytest.mark.parametrize(
    ("config", "names", "message"),
    [
        (
            {"model_type": "llama", "num_hidden_layers": 1},
            _llama_names(1, ("model.vision_tower.proj.weight",)),
            "model 'x': tensor 'model.vision_tower.proj.weight' does not fit the llama-style layout of model_type "
            "'llama' (expected model.layers.<i>.*, embeddings, final norm or lm_head)",
        ),
        (
            {"model_type": "llama", "num_hidden_layers": 1},
            _llama_names(1, ("model.layers.one.mlp.weight",)),
            "model 'x': tensor 'model.layers.one.mlp.weight' does not fit the llama-style layout of model_type "
            "'llama' (expected model.layers.<i>.*, embeddings, final norm or lm_head)",
        ),
        (
            {"model_type": "mamba", "num_hidden_layers": 1},
            ["backbone.embeddings.weight", "backbone.layers.0.mixer.A_log"],
            "model 'x': model_type 'mamba' has no known tensor naming (tensor 'backbone.embeddings.weight' fits none "
            "of: llama-style, gpt2-style, gpt2-style (no prefix), gpt-neox-style)",
        ),
        ({"num_hidden_layers": 1}, _llama_names(1), "model 'x': config.json has no model_type"),
        (
            {"model_type": "llama"},
            _llama_names(1),
            "model 'x': config.json has no positive num_hidden_layers / n_layer / num_layers",
        ),
        (
            {"model_type": "llama", "num_hidden_layers": 2},
            _llama_names(3),
            "model 'x': tensor 'model.layers.2.self_attn.q_proj.weight' lies beyond the 2 layers in config.json",
        ),
        (
            {"model_type": "llama", "num_hidden_layers": 3},
            _llama_names(2),
            "model 'x': config.json says 3 layers but no tensor belongs to layer 2",
        ),
        (
            {"model_type": "llama", "num_hidden_layers": 1},
            [n for n in _llama_names(1) if n != "model.embed_tokens.weight"],
            "model 'x': no token embedding tensor 'model.embed_tokens.weight'",
        ),
    ],
)
def test_unmappable_layouts_raise_one_line_model_errors(config, names, message):
    with pytest.raises(ModelError) as err:
        LayerMap.build(config, names, "model 'x'")
    assert str(err.value) == message


def test_lookup_errors_and_relocate(pico_maps):
    layer_map = pico_maps["llama"]
    assert layer_map.relocate("model.layers.1.mlp.down_proj.weight", 5) == "model.layers.5.mlp.down_proj.weight"
    assert pico_maps["gpt2"].relocate("transformer.h.0.ln_1.weight", 1) == "transformer.h.1.ln_1.weight"
    with pytest.raises(KeyError, match="not inside a layer block"):
        layer_map.relocate("model.norm.weight", 0)
    with pytest.raises(KeyError, match="not in this llama layout"):
        layer_map.info("model.layers.9.mlp.down_proj.weight")
    with pytest.raises(IndexError, match=r"layer 2 out of range 0..1"):
        layer_map.names_in_layer(2)
