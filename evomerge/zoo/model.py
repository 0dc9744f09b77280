"""The zoo's Llama architecture and its language-aligned, frozen embeddings.

Every B token's embedding is its A counterpart's plus one shared offset vector, and embeddings are
frozen (tied with the output layer) in every model of the zoo. Two consequences make merging
matter: the transformer sees a B sentence as the A sentence shifted along one direction, so a skill
learned in A is readable in B; and with tied embeddings the logit gap between a B digit and the
same A digit is one scalar, h·offset, so "which script to answer in" is a single feature that a
language expert can supply. Embedding task vectors are zero, so merges act on the layers only.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.zoo.languages import a_tokens, b_tokens, vocabulary


def llama_config(
    *, layers: int, hidden: int, heads: int, ffn: int, max_positions: int, tokenizer_vocab: int
) -> LlamaConfig:
    """A small Llama config with tied embeddings over the zoo vocabulary."""
    vocab = vocabulary()
    return LlamaConfig(
        vocab_size=tokenizer_vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=vocab.index("<pad>"),
        bos_token_id=vocab.index("<bos>"),
        eos_token_id=vocab.index("<eos>"),
        rms_norm_eps=1e-5,
        attention_bias=False,
        mlp_bias=False,
    )


def aligned_embeddings(
    vocab_size: int, hidden: int, *, std: float, offset_norm: float, generator: torch.Generator
) -> torch.Tensor:
    """Random embeddings where each B token = its A counterpart + one shared offset of the given norm."""
    vocab = vocabulary()
    emb = torch.randn(vocab_size, hidden, generator=generator) * std
    offset = torch.randn(hidden, generator=generator)
    offset = offset * (offset_norm / offset.norm())
    a_ids = torch.tensor([vocab.index(t) for t in a_tokens()])
    b_ids = torch.tensor([vocab.index(t) for t in b_tokens()])
    emb[b_ids] = emb[a_ids] + offset
    return emb


def build_base_model(
    config: LlamaConfig, *, seed: int, embed_std: float, offset_norm: float
) -> LlamaForCausalLM:
    """A freshly initialised base model with aligned, frozen embeddings (seeded)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    emb = aligned_embeddings(
        config.vocab_size, config.hidden_size, std=embed_std, offset_norm=offset_norm, generator=gen
    )
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(emb)
    freeze_embeddings(model)
    return model


def freeze_embeddings(model: LlamaForCausalLM) -> None:
    """Stop gradients to the (tied) embedding matrix."""
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
