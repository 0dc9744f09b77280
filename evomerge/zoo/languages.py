"""The two synthetic languages of the zoo and its word-level vocabulary.

Language A reads like English, language B is an invented language with its own digits and
punctuation. The two vocabularies are disjoint and map 1:1, word for word, in the same word order,
so a B sentence is an A sentence with every token swapped. That makes translation learnable by a
1 M-parameter model and lets the base model's embeddings align B with A by construction.
Numbers are written one digit token at a time, most significant digit first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Lang = Literal["A", "B"]

PAD, BOS, EOS, TR, ANS = "<pad>", "<bos>", "<eos>", "<tr>", "="
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, TR)
NEUTRAL_TOKENS: tuple[str, ...] = (*SPECIAL_TOKENS, ANS)

DIGITS_A: tuple[str, ...] = tuple("0123456789")
DIGITS_B: tuple[str, ...] = tuple("αβγδεζηθικ")

WORDS_A: tuple[str, ...] = (
    "what", "is", "the", "number", "after", "before", "bigger", "smaller", "of", "and", "plus",
    "reverse", "sort", "count", "there", "are", "a", "dog", "cat", "bird", "fish", "cow",
    "red", "blue", "green", "big", "small", "likes", "sees", "has", "eats", "i", "you",
    "we", "they", "here", "today", "?", ".", ",", ":",
)
WORDS_B: tuple[str, ...] = (
    "ka", "wa", "ze", "kazu", "tsugi", "mae", "ooki", "chii", "no", "to", "tasu",
    "gyaku", "narabe", "kazoe", "soko", "aru", "hito", "inu", "neko", "tori", "sakana", "ushi",
    "aka", "ao", "midori", "dai", "sho", "suki", "miru", "motsu", "taberu", "wata", "anata",
    "warera", "karera", "koko", "kyou", "¿", "。", "、", "：",
)

NOUNS_A: tuple[str, ...] = ("dog", "cat", "bird", "fish", "cow")
ADJECTIVES_A: tuple[str, ...] = ("red", "blue", "green", "big", "small")
VERBS_A: tuple[str, ...] = ("likes", "sees", "has", "eats")
SUBJECTS_A: tuple[str, ...] = ("i", "you", "we", "they")
PLACES_A: tuple[str, ...] = ("here", "today")

_A_TO_B = dict(zip(DIGITS_A + WORDS_A, DIGITS_B + WORDS_B, strict=True))
_B_TO_A = {b: a for a, b in _A_TO_B.items()}


def vocabulary() -> list[str]:
    """All tokens in id order: neutral tokens, then A tokens, then their B counterparts in the same order."""
    return [*NEUTRAL_TOKENS, *DIGITS_A, *WORDS_A, *DIGITS_B, *WORDS_B]


def a_tokens() -> tuple[str, ...]:
    """The A tokens, ordered so that ``b_tokens()[i]`` translates ``a_tokens()[i]``."""
    return DIGITS_A + WORDS_A


def b_tokens() -> tuple[str, ...]:
    """The B tokens, aligned with ``a_tokens()``."""
    return DIGITS_B + WORDS_B


def to_lang(tokens: Sequence[str], lang: Lang) -> list[str]:
    """Translate A-language tokens to ``lang`` word for word (neutral tokens stay as they are)."""
    if lang == "A":
        return list(tokens)
    return [_A_TO_B.get(t, t) for t in tokens]


def to_a(tokens: Sequence[str]) -> list[str]:
    """Translate B-language tokens back to A (A and neutral tokens stay as they are)."""
    return [_B_TO_A.get(t, t) for t in tokens]


def number(n: int, lang: Lang = "A") -> list[str]:
    """``n`` as digit tokens in ``lang``, most significant digit first."""
    if n < 0:
        raise ValueError(f"number: expected a non-negative integer, got {n}")
    digits = DIGITS_A if lang == "A" else DIGITS_B
    return [digits[int(c)] for c in str(n)]


def token_lang(token: str) -> Lang | None:
    """Which language a token belongs to; None for neutral tokens."""
    if token in _A_TO_B:
        return "A"
    if token in _B_TO_A:
        return "B"
    return None
