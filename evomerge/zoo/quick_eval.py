"""A fast batched greedy exact-match scorer with the semantics of the zoo's lm-eval tasks.

lm-eval generates one prompt at a time; this scorer batches prompts of equal token length (so no
padding, no position shifts) and decodes greedily with a KV cache, which is what makes scoring
every zoo model on every task, validation and test, take seconds. It applies lm-eval's rules:
at most ``max_gen_tokens(task)`` new tokens, stop at EOS, drop special tokens, then compare the
remaining token sequence with the answer (equal token sequences ⇔ equal decoded strings for the
word-level tokenizer).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from evomerge.fitness.lm import cache_keyword
from evomerge.zoo.languages import ANS, BOS, EOS, PAD, vocabulary
from evomerge.zoo.tasks import Example, Task

EVAL_BATCH = 256


def max_gen_tokens(task: Task) -> int:
    """The generation budget of a task: its longest possible answer plus EOS plus one spare token."""
    longest = {"add": 3, "qa": 4, "rev": 6, "sort": 6}[task.family.name]
    return longest + 2


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel, prompts: Sequence[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations (EOS excluded, special tokens dropped) for token-id prompts."""
    vocab = vocabulary()
    eos, specials = vocab.index(EOS), {vocab.index(PAD), vocab.index(BOS)}
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    model.eval()
    cache = cache_keyword(inspect.signature(model.forward).parameters)
    for _, idx_all in sorted(by_len.items()):
        for s in range(0, len(idx_all), EVAL_BATCH):
            idx = idx_all[s : s + EVAL_BATCH]
            ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
            res = model(input_ids=ids, use_cache=True)
            past = getattr(res, cache)
            nxt = res.logits[:, -1].argmax(-1)
            done = torch.zeros(len(idx), dtype=torch.bool)
            gen: list[list[int]] = [[] for _ in idx]
            for step in range(max_new_tokens):
                for r, tok in enumerate(nxt.tolist()):
                    if done[r]:
                        continue
                    if tok == eos:
                        done[r] = True
                    elif tok not in specials:
                        gen[r].append(tok)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                res = model(input_ids=nxt[:, None], use_cache=True, **{cache: past})
                past = getattr(res, cache)
                nxt = res.logits[:, -1].argmax(-1)
            for r, i in enumerate(idx):
                out[i] = gen[r]
    return out


def exact_match(model: PreTrainedModel, task: Task, examples: Sequence[Example]) -> list[bool]:
    """Per-example exact match of greedy generation against the answer, as lm-eval scores it."""
    index = {t: i for i, t in enumerate(vocabulary())}
    bos = index[BOS]
    prompts = [[bos, *(index[t] for t in ex.prompt), index[ANS]] for ex in examples]
    gens = generate_greedy(model, prompts, max_gen_tokens(task))
    return [g == [index[t] for t in ex.answer] for g, ex in zip(gens, examples, strict=True)]


def accuracy(model: PreTrainedModel, task: Task, examples: Sequence[Example]) -> float:
    """Exact-match accuracy in percent."""
    hits = exact_match(model, task, examples)
    return 100.0 * sum(hits) / len(hits)
