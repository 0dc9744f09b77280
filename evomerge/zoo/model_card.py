"""The README.md model card of a zoo model: what it is, what it was trained on, its scores."""

from __future__ import annotations

from evomerge.zoo.index import ModelEntry
from evomerge.zoo.spec import ZooSpec
from evomerge.zoo.tasks import task


def model_card(entry: ModelEntry, spec: ZooSpec) -> str:
    """Markdown card for ``entry`` (scores are greedy exact match in %, from the zoo's quick scorer)."""
    m = spec.model
    rows = "\n".join(
        f"| `{name}` | {task(name).description} | {s['validation']:.1f} | {s['test']:.1f} |"
        for name, s in entry.scores.items()
    )
    parent = "" if entry.parent is None else f" Fine-tuned from `{entry.parent}`."
    return f"""# evomerge zoo: `{entry.name}` ({entry.role})

A tiny Llama causal LM ({entry.params:,} parameters; {m.layers} layers, hidden {m.hidden}, {m.heads} heads,
FFN {m.ffn}) trained on CPU by `evomerge zoo build` from synthetic data in two invented languages
A and B that map word for word. Embeddings are tied, frozen, and every B token's embedding is its
A counterpart's plus one shared offset, identical in every zoo model.{parent}

**Trained on:** {entry.trained_on}; {entry.train_steps} steps, final loss {entry.final_loss:.3f},
{entry.train_seconds:.0f} s on {spec.threads} CPU threads.

## Scores (greedy exact match, %)

| task | what | validation | test |
|---|---|---|---|
{rows}

Load with `AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`;
score with lm-eval: `lm_eval --model hf --model_args pretrained=<folder> --include_path <zoo>/fitness --tasks zoo_add_b`.
"""
