"""The base model's pretraining mixture: bilingual text, translation, code-switching, answered A questions.

The base must read and write both languages equally well (so a skill learned in A can be carried
to B), yet never see an *answered* question in B: answering in B is what the language expert adds.
Questions of every kind appear as plain text in both languages, without answers, as a pretrained
LLM sees questions in text. Answered questions come from the task sources of the mixture (any task
name, e.g. ``qa_a``; trained on every token). The default zoo's base answers its own skill
(``qa_a``) and the *easy* versions of the experts' skills — one-digit additions (``add1_a``), sorts
of three digits (``sort3_a``) — as a pretrained LLM knows a little of every skill a fine-tune
sharpens. Experts that only sharpen a skill the base has stay compatible: replaying the base mixture
keeps each expert's hold on the other skills, so their task vectors merge (issue 13's measurements).
Only training-split items are used, so held-out questions never appear, even unanswered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from evomerge.zoo.languages import (
    ADJECTIVES_A,
    ANS,
    NOUNS_A,
    PLACES_A,
    SUBJECTS_A,
    TR,
    VERBS_A,
    Lang,
    number,
    to_lang,
)
from evomerge.zoo.tasks import FAMILIES, PRIMARY_FAMILIES, TASK_NAMES, task


@dataclass(frozen=True)
class Sequence:
    """A training sequence (without BOS/EOS) and whether each token is trained on."""

    tokens: list[str]
    loss: list[bool]


def _statement(rng: random.Random, max_operand: int) -> list[str]:
    kind = rng.randrange(3)
    if kind == 0:
        n1, n2 = rng.sample(NOUNS_A, 2)
        return [
            "there", "are", *number(rng.randint(0, 10 * max_operand + 9)), n1,
            "and", *number(rng.randint(0, max_operand)), n2, ".",
        ]
    if kind == 1:
        words = [rng.choice(SUBJECTS_A), rng.choice(VERBS_A), "the"]
        if rng.random() < 0.6:
            words.append(rng.choice(ADJECTIVES_A))
        words.append(rng.choice(NOUNS_A))
        if rng.random() < 0.4:
            words.append(rng.choice(PLACES_A))
        return [*words, "."]
    start = rng.randint(0, 10 * max_operand + 9)
    out = ["count", ":"]
    for k in range(rng.randint(3, 5)):
        if k:
            out.append(",")
        out.extend(number(start + k))
    return [*out, "."]


def _question(rng: random.Random, max_operand: int) -> list[str]:
    family = FAMILIES[rng.choice(PRIMARY_FAMILIES)]
    return task(f"{family.name}_a").draw(rng, max_operand, "train").prompt


def sentence(rng: random.Random, max_operand: int) -> list[str]:
    """An A sentence: a statement, a counting sequence or an unanswered question."""
    if rng.random() < 0.35:
        return _question(rng, max_operand)
    return _statement(rng, max_operand)


def _lang(rng: random.Random) -> Lang:
    return "A" if rng.random() < 0.5 else "B"


def translation(rng: random.Random, max_operand: int) -> Sequence:
    src_lang = _lang(rng)
    dst_lang: Lang = "B" if src_lang == "A" else "A"
    s = sentence(rng, max_operand)
    toks = [*to_lang(s, src_lang), TR, *to_lang(s, dst_lang)]
    return Sequence(toks, [True] * len(toks))


def monolingual(rng: random.Random, max_operand: int) -> Sequence:
    lang = _lang(rng)
    toks: list[str] = []
    for _ in range(rng.randint(1, 2)):
        toks.extend(to_lang(sentence(rng, max_operand), lang))
    return Sequence(toks, [True] * len(toks))


def codeswitch(rng: random.Random, max_operand: int, prob: float) -> Sequence:
    s = sentence(rng, max_operand)
    base = _lang(rng)
    other: Lang = "B" if base == "A" else "A"
    toks = [to_lang([t], other if rng.random() < prob else base)[0] for t in s]
    return Sequence(toks, [True] * len(toks))


def answered(rng: random.Random, task_name: str, max_operand: int) -> Sequence:
    """An answered training question of a task, trained on all tokens (a base mixture source)."""
    ex = task(task_name).draw(rng, max_operand, "train")
    toks = [*ex.prompt, ANS, *ex.answer]
    return Sequence(toks, [True] * len(toks))


def base_sequence(
    rng: random.Random, max_operand: int, mixture: dict[str, float], codeswitch_prob: float
) -> Sequence:
    """One sequence of the base mixture; ``mixture`` maps a source name to its sampling weight."""
    kinds = list(mixture)
    kind = rng.choices(kinds, weights=[mixture[k] for k in kinds])[0]
    if kind == "translation":
        return translation(rng, max_operand)
    if kind == "monolingual":
        return monolingual(rng, max_operand)
    if kind == "codeswitch":
        return codeswitch(rng, max_operand, codeswitch_prob)
    if kind in TASK_NAMES:
        return answered(rng, kind, max_operand)
    raise ValueError(f"unknown base mixture source {kind!r}")


TEXT_SOURCES: tuple[str, ...] = ("translation", "monolingual", "codeswitch")
MIXTURE_SOURCES: tuple[str, ...] = (*TEXT_SOURCES, *TASK_NAMES)


def task_sequence(rng: random.Random, task_name: str, max_operand: int) -> Sequence:
    """An answered training example of a zoo task, trained on the answer and EOS only."""
    ex = task(task_name).draw(rng, max_operand, "train")
    prompt = [*ex.prompt, ANS]
    return Sequence([*prompt, *ex.answer], [False] * len(prompt) + [True] * len(ex.answer))
