"""The model pool: lazy reads, reference layout, and every compatibility error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.errors import ConfigError, ModelError
from evomerge.io import ShardedSafetensorsWriter, TensorIndex
from evomerge.pool import ModelPool, SourceModel

# Untied llama pico (vocab 64, hidden 32, 2 layers, 1 KV head of 16, MLP 64):
# embed 64*32 + head 64*32 + 2 * (q 1024 + k 512 + v 512 + o 1024 + 3 * 2048 mlp + 2 * 32 norms) + 32 final norm.
LLAMA_PICO_PARAMS = 2048 + 2048 + 2 * (1024 + 512 + 512 + 1024 + 3 * 2048 + 64) + 32


def test_pool_with_base(pico_family):
    with ModelPool.open(pico_family, base="base") as pool:
        assert pool.names == ("base", "expert_1", "expert_2")
        assert pool.base == "base"
        assert pool.sources == ("expert_1", "expert_2")
        assert pool.reference == "base"
        assert pool.reference_path == pico_family["base"]
        assert pool.tensor_names == pool.layer_map.names
        assert len(pool.tensor_names) == 21
        assert pool.tensor_names[0] == "model.embed_tokens.weight"
        assert pool.layer_map.num_layers == 2
        assert pool.num_parameters == LLAMA_PICO_PARAMS == 22688
        model = AutoModelForCausalLM.from_pretrained(pico_family["base"])
        assert pool.num_parameters == sum(p.numel() for p in model.parameters())
        assert pool.shape("expert_2", "model.layers.1.mlp.down_proj.weight") == (32, 64)
        assert pool.dtype("base", "model.norm.weight") == torch.float32
        assert pool.model("expert_1").path == pool.path("expert_1") == pico_family["expert_1"]
        with pytest.raises(KeyError, match="no model 'nope'"):
            pool.model("nope")


def test_pool_without_base_follows_the_first_source(pico_family):
    models = {"b": pico_family["expert_2"], "a": pico_family["expert_1"]}
    with ModelPool.open(models) as pool:
        assert pool.base is None
        assert pool.sources == ("b", "a")
        assert pool.reference == "b"
        assert pool.reference_path == pico_family["expert_2"]


def test_tensor_reads_lazily_and_upcasts(make_pico_family):
    family = make_pico_family("qwen2", 1, dtype=torch.bfloat16)
    name = "model.layers.1.self_attn.q_proj.bias"
    with ModelPool.open(family, base="base") as pool:
        base = pool.tensor("base", name)
        assert base.dtype == torch.float32
        with TensorIndex.open(family["base"]) as index:
            assert torch.equal(base, index.get(name).float())
        assert pool.tensor("base", name, dtype=None).dtype == torch.bfloat16
        assert pool.dtype("expert_1", name) == torch.bfloat16
        expert = pool.tensor("expert_1", name)
        assert not torch.equal(base, expert)
        base.add_(1)
        assert torch.equal(pool.tensor("base", name), base - 1)
        with pytest.raises(KeyError, match="'model.layers.2.mlp.up_proj.weight' is not in the pool's qwen2 layout"):
            pool.tensor("base", "model.layers.2.mlp.up_proj.weight")


def test_config_is_a_copy(pico_family):
    with ModelPool.open(pico_family, base="base") as pool:
        config = pool.config
        assert config["model_type"] == "llama" and config["vocab_size"] == 64
        config["vocab_size"] = 1
        assert pool.config["vocab_size"] == 64


def test_tied_head_counts_once_and_a_stored_copy_is_compatible(make_pico, tmp_path):
    plain = make_pico(arch="llama", tied=True, seed=1)
    with_copy = tmp_path / "with_copy"
    with TensorIndex.open(plain) as index:
        stored = {n: n for n in index.names} | {"lm_head.weight": "model.embed_tokens.weight"}
        specs = [(n, index.shape(s), torch.float32) for n, s in stored.items()]
        with ShardedSafetensorsWriter(with_copy, specs) as writer:
            for n, s in stored.items():
                writer.write(n, index.get(s))
    shutil.copy(plain / "config.json", with_copy / "config.json")
    with ModelPool.open({"copy": with_copy, "plain": plain}, base="copy") as pool:
        assert pool.layer_map.tied
        assert "lm_head.weight" in pool.tensor_names
        assert pool.num_parameters == LLAMA_PICO_PARAMS - 2048
        assert torch.equal(pool.tensor("plain", "lm_head.weight"), pool.tensor("plain", "model.embed_tokens.weight"))
        assert pool.shape("plain", "lm_head.weight") == (64, 32)
        assert pool.dtype("plain", "lm_head.weight") == torch.float32
    with ModelPool.open({"plain": plain, "copy": with_copy}, base="plain") as pool:
        assert "lm_head.weight" not in pool.tensor_names
        assert pool.num_parameters == LLAMA_PICO_PARAMS - 2048


def _error(models, base=None, **kw) -> str:
    with pytest.raises(ModelError) as err:
        ModelPool.open(models, base, **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_different_architecture_family(make_pico, pico_family):
    qwen = make_pico(arch="qwen2")
    assert _error({"base": pico_family["base"], "q": qwen}, "base") == (
        "models 'base' and 'q' are not one architecture family: model_type 'llama' vs 'qwen2'"
    )


def test_vocab_mismatch_is_explicit(make_pico, pico_family):
    bigger = make_pico(vocab_size=80)
    assert _error({"base": pico_family["base"], "big": bigger}, "base") == (
        "models 'base' and 'big' have different vocabulary sizes (64 vs 80): merging needs one tokenizer, "
        "and evomerge does not slice or pad embeddings"
    )


def test_shape_mismatch_names_both_models_and_the_tensor(make_pico, pico_family):
    wide = make_pico(hidden=48)
    assert _error({"base": pico_family["base"], "wide": wide}, "base") == (
        "models 'base' and 'wide' differ: tensor 'model.embed_tokens.weight' has shape [64, 32] in 'base' "
        "but [64, 48] in 'wide'"
    )


def test_missing_and_extra_tensors(make_pico, pico_family):
    deep = make_pico(layers=3)
    assert _error({"base": pico_family["base"], "deep": deep}, "base") == (
        "models 'base' and 'deep' differ: tensor 'model.layers.2.input_layernorm.weight' is in 'deep' but not in 'base'"
    )
    assert _error({"deep": deep, "base": pico_family["base"]}) == (
        "models 'deep' and 'base' differ: tensor 'model.layers.2.input_layernorm.weight' is in 'deep' but not in 'base'"
    )


def test_tied_and_untied_do_not_mix(make_pico, pico_family):
    tied = make_pico(tied=True)
    assert _error({"base": pico_family["base"], "tied": tied}, "base") == (
        "models 'base' and 'tied' differ in the output head: 'tied' ties it to the embeddings, 'base' does not"
    )


def test_remote_code_needs_consent(make_pico):
    folder = make_pico()
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    assert _error({"custom": folder}) == (
        f"model 'custom' ({folder}): config.json auto_map needs custom code from the model folder; "
        "set trust_remote_code: true only if you trust that code"
    )
    model = SourceModel.load("custom", folder, trust_remote_code=True)
    assert model.layer_map.num_layers == 2 and not model.tied


def test_missing_folder_and_pickle_only_models(pico_family, tmp_path):
    missing = tmp_path / "missing"
    assert _error({"base": pico_family["base"], "gone": missing}, "base") == (
        f"model 'gone' ({missing}): folder not found (expected a local Hugging Face model folder)"
    )
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(pico_family["base"] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert _error({"p": pickled}).startswith(f"{pickled}: only pickle weights (pytorch_model.bin)")
    no_config = tmp_path / "no_config"
    shutil.copytree(pico_family["base"], no_config)
    (no_config / "config.json").unlink()
    assert _error({"n": no_config}) == (
        f"{no_config / 'config.json'}: file not found (a model folder needs its config.json)"
    )


def test_bad_pool_arguments_are_config_errors(pico_family):
    with pytest.raises(ConfigError, match=r"^models: expected at least one model$"):
        ModelPool.open({})
    with pytest.raises(ConfigError, match=r"^base: 'other' is not one of the models \(base, expert_1, expert_2\)$"):
        ModelPool.open(pico_family, base="other")
    with pytest.raises(ConfigError, match=r"^models: expected at least one model besides the base 'base'$"):
        ModelPool.open({"base": pico_family["base"]}, base="base")
    with pytest.raises(ConfigError, match="non-empty string names"):
        ModelPool.open({"": pico_family["base"]})


# -- fingerprints ------------------------------------------------------------------------------


def _flip(path, offset: int) -> None:
    """Change one byte in place, keeping the file's size and modification time."""
    import os

    stat = path.stat()
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_fingerprint_follows_the_content_not_the_path_or_the_dates(make_pico, tmp_path):
    import os

    from evomerge.io.safetensors_reader import read_safetensors_header
    from evomerge.pool.fingerprint import ModelFingerprint, fingerprint_model

    folder = make_pico(sharded=True, seed=5)
    fingerprint = fingerprint_model(folder)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and set(shards) | {"config.json", "model.safetensors.index.json"} <= set(fingerprint.files)
    assert ModelFingerprint.from_json(json.loads(json.dumps(fingerprint.to_json()))) == fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for path in copy.iterdir():
        os.utime(path, (0, 0))
    (copy / "README.md").write_text("my notes")
    (copy / "runs").mkdir()
    assert fingerprint_model(copy) == fingerprint  # another path, other dates, a model card: the same model

    shard = copy / shards[-1]
    entry = max(read_safetensors_header(shard).values(), key=lambda e: e.end - e.start)
    _flip(shard, 8 + int.from_bytes(shard.read_bytes()[:8], "little") + entry.end - 1)  # the last byte of a tensor
    changed = fingerprint_model(copy)
    assert changed.digest != fingerprint.digest and fingerprint.difference(changed) == f"{shards[-1]} differ"
    shutil.copy(folder / shards[-1], shard)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 5.0}))
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"<unk>"', '"<UNK>"', 1))
    assert fingerprint.difference(fingerprint_model(copy)) == "config.json, tokenizer.json differ"

    pinned = fingerprint_model(folder, revision="0123abc")
    assert pinned.digest != fingerprint.digest and fingerprint.difference(pinned) == "revision None is now 0123abc"
    with pytest.raises(ModelError, match=f"{tmp_path / 'nothing'}: cannot list the model folder"):
        fingerprint_model(tmp_path / "nothing")


def test_fingerprint_samples_every_window_of_a_large_tensor(tmp_path):
    """A tensor larger than the sampled windows is read at fixed windows, first and last included."""
    from safetensors.torch import save_file

    from evomerge.io.safetensors_reader import read_safetensors_header
    from evomerge.pool.fingerprint import (
        SAMPLE_BYTES,
        SAMPLES_PER_TENSOR,
        fingerprint_model,
    )

    folder = tmp_path / "big"
    folder.mkdir()
    save_file({"w": torch.arange(1 << 18, dtype=torch.float32), "b": torch.zeros(7)}, folder / "model.safetensors")
    path = folder / "model.safetensors"
    reference = fingerprint_model(folder).digest
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    length = (1 << 18) * 4
    step = (length - SAMPLE_BYTES) // (SAMPLES_PER_TENSOR - 1)
    w_start = data_start + read_safetensors_header(path)["w"].start
    for k in range(SAMPLES_PER_TENSOR):
        for offset in (k * step, k * step + SAMPLE_BYTES - 1):
            _flip(path, w_start + offset)
            assert fingerprint_model(folder).digest != reference, (k, offset)
            _flip(path, w_start + offset)
    assert fingerprint_model(folder).digest == reference
