"""Pico models: random-init causal LMs of a few thousand parameters, built in milliseconds for tests.

A pico folder is a real Hugging Face model folder (config.json, safetensors weights, optionally
sharded with an index, a ``PreTrainedTokenizerFast``), so it exercises exactly the code paths of a
downloaded model. ``perturb_from`` makes a "fine-tuned expert": the weights of another pico plus
seeded noise, so experts share a base the way real fine-tunes do and task vectors are meaningful.
Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from evomerge.errors import ConfigError
from evomerge.io.safetensors_reader import TensorIndex
from evomerge.merge.registry import seed_for

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
HEAD_DIM = 16
MAX_POSITIONS = 128
BASE_WORDS = (
    *"0123456789",
    *"+-=.,?",
    "the", "is", "of", "and", "to", "in", "what", "plus", "minus", "equals", "answer",
    *"abcdefghijklmnopqrstuvwxyz",
)


def pico_vocabulary(vocab_size: int) -> dict[str, int]:
    """The word-level vocabulary of a pico tokenizer: specials, digits, symbols, words, then fillers."""
    words = list(dict.fromkeys((*SPECIAL_TOKENS, *BASE_WORDS)))
    words += [f"w{i}" for i in range(max(0, vocab_size - len(words)))]
    return {word: i for i, word in enumerate(words[:vocab_size])}


def pico_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``vocab_size`` tokens (unknown words map to ``<unk>``)."""
    tokenizer = Tokenizer(models.WordLevel(pico_vocabulary(vocab_size), unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def pico_config(arch: str, *, vocab_size: int, hidden: int, layers: int, tied: bool) -> PretrainedConfig:
    """A transformers config for a pico ``arch`` model (heads of 16 dims, MLP width 2 x hidden)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"arch: expected one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    if hidden <= 0 or hidden % HEAD_DIM:
        raise ConfigError(f"hidden: expected a positive multiple of {HEAD_DIM}, got {hidden}")
    if layers <= 0:
        raise ConfigError(f"layers: expected a positive integer, got {layers}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"vocab_size: expected at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    heads = hidden // HEAD_DIM
    common = dict(
        vocab_size=vocab_size,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=tied,
    )
    if arch == "gpt2":
        return AutoConfig.for_model(
            arch, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=2 * hidden, n_positions=MAX_POSITIONS, **common
        )
    return AutoConfig.for_model(
        arch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=HEAD_DIM,
        intermediate_size=2 * hidden,
        max_position_embeddings=MAX_POSITIONS,
        **common,
    )


def _perturb(model: torch.nn.Module, base_dir: Path, seed: int, scale: float) -> None:
    """Load ``base_dir``'s weights into ``model`` plus noise of relative size ``scale``.

    The noise on each tensor is ``scale * rms(w) * N(0, 1)`` (``rms`` 1 for an all-zero tensor)
    drawn from a generator seeded by (seed, "perturb", tensor name), so each tensor moves by about
    ``scale`` of its own magnitude, norms included.
    """
    params = model.state_dict()
    with TensorIndex.open(base_dir) as base:
        expected = set(params) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
        differ = sorted(expected.symmetric_difference(base.names))
        differ += [n for n in base.names if n in params and tuple(params[n].shape) != base.shape(n)]
        if differ:
            raise ConfigError(
                f"perturb_from: tensor {differ[0]!r} of {base_dir} does not match this pico "
                "(build the expert with the base's arch, tied, vocab_size, hidden and layers)"
            )
        for name in base.names:
            weight = base.get(name, dtype=torch.float32)
            gen = torch.Generator().manual_seed(seed_for(seed, "perturb", name))
            rms = weight.pow(2).mean().sqrt().item() if weight.numel() else 0.0
            noise = torch.randn(weight.shape, generator=gen) * (scale * (rms or 1.0))
            with torch.no_grad():
                params[name].copy_(weight + noise)


def build_pico(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    tied: bool = False,
    sharded: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    perturb_from: str | Path | None = None,
    perturb_scale: float = 0.05,
) -> Path:
    """Write a pico ``arch`` causal LM with its tokenizer to the new or empty folder ``out_dir``.

    ``sharded`` writes the weights as several shards plus model.safetensors.index.json.
    With ``perturb_from`` (another pico folder of the same shape) the weights are that model's plus
    seeded noise.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out_dir: {out} is not empty")
    config = pico_config(arch, vocab_size=vocab_size, hidden=hidden, layers=layers, tied=tied)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if perturb_from is not None:
        _perturb(model, Path(perturb_from), seed, perturb_scale)
    model = model.to(dtype)
    max_shard = "50GB"
    if sharded:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard = max(1, math.ceil(total / 4))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard)
    pico_tokenizer(vocab_size).save_pretrained(out)
    return out


def build_pico_family(
    root: str | Path, arch: str = "llama", n_experts: int = 2, *, seed: int = 0, **kw: Any
) -> dict[str, Path]:
    """A base pico under ``root/base`` and ``n_experts`` perturbed copies ``root/expert_<k>`` (k from 1).

    Expert k uses seed ``seed + k``; ``kw`` goes to every ``build_pico`` call (same shape for all).
    """
    root = Path(root)
    family = {"base": build_pico(root / "base", arch, seed=seed, **kw)}
    for k in range(1, n_experts + 1):
        family[f"expert_{k}"] = build_pico(
            root / f"expert_{k}", arch, seed=seed + k, perturb_from=family["base"], **kw
        )
    return family
