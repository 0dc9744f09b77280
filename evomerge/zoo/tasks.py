"""The zoo's skills: question/answer generators with disjoint train, validation and test items.

Every task draws *items* (e.g. the operand pair of an addition) from a seeded generator and renders
them as a prompt and an answer in one language. Which split an item belongs to is a fixed function
of the item alone (a stable hash), so the training data of every model and the held-out evaluation
sets can never share an item, whatever the seeds or sizes. The same generators feed training and
evaluation, so the lm-eval task files and the zoo's own scores measure exactly what was trained.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from evomerge.errors import ConfigError
from evomerge.zoo.languages import ANS, Lang, number, to_lang

Split = Literal["train", "validation", "test"]
Item = tuple[int, ...]

TEST_SHARE = 0.08
VALIDATION_SHARE = 0.05


def split_of(family: str, item: Item) -> Split:
    """The split an item belongs to, from a stable hash of (task family, item)."""
    digest = hashlib.blake2b(f"{family}:{item}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < TEST_SHARE:
        return "test"
    if u < TEST_SHARE + VALIDATION_SHARE:
        return "validation"
    return "train"


@dataclass(frozen=True)
class Example:
    """One rendered question: prompt and answer as token lists (the answer excludes EOS)."""

    prompt: list[str]
    answer: list[str]
    item: Item


def _add(rng: random.Random, max_operand: int) -> Item:
    return (rng.randint(0, max_operand), rng.randint(0, max_operand))


def _add_render(item: Item) -> tuple[list[str], list[str]]:
    a, b = item
    return ["what", "is", *number(a), "plus", *number(b), "?"], number(a + b)


def _qa(rng: random.Random, max_operand: int) -> Item:
    kind = rng.randrange(3)
    top = 10 * max_operand + 9
    if kind == 2:
        x = rng.randint(0, top)
        y = rng.randint(0, top)
        while y == x:
            y = rng.randint(0, top)
        return (kind, x, y)
    return (kind, rng.randint(1, top - 1), 0)


def _qa_render(item: Item) -> tuple[list[str], list[str]]:
    kind, x, y = item
    if kind == 0:
        return ["what", "is", "the", "number", "after", *number(x), "?"], number(x + 1)
    if kind == 1:
        return ["what", "is", "the", "number", "before", *number(x), "?"], number(x - 1)
    return ["what", "is", "the", "bigger", "of", *number(x), "and", *number(y), "?"], number(max(x, y))


def _add1(rng: random.Random, max_operand: int) -> Item:
    del max_operand
    return (rng.randint(0, 9), rng.randint(0, 9))


def _digits(rng: random.Random, max_operand: int) -> Item:
    del max_operand
    return tuple(rng.randrange(10) for _ in range(rng.randint(3, 6)))


def _digits3(rng: random.Random, max_operand: int) -> Item:
    del max_operand
    return tuple(rng.randrange(10) for _ in range(3))


def _digit_tokens(ds: Item) -> list[str]:
    return [str(d) for d in ds]


def _rev_render(item: Item) -> tuple[list[str], list[str]]:
    return ["reverse", *_digit_tokens(item), "?"], _digit_tokens(item[::-1])


def _sort_render(item: Item) -> tuple[list[str], list[str]]:
    return ["sort", *_digit_tokens(item), "?"], _digit_tokens(tuple(sorted(item)))


@dataclass(frozen=True)
class Family:
    """A skill independent of language: how to draw an item and render it in A tokens.

    ``part_of`` names the family whose items this one draws a subset of (``add1``: the one-digit
    additions of ``add``); it shares that family's splits, so a held-out ``add`` question is never a
    training ``add1`` question.
    """

    name: str
    draw: Callable[[random.Random, int], Item]
    render: Callable[[Item], tuple[list[str], list[str]]]
    description: str
    part_of: str | None = None

    @property
    def split_name(self) -> str:
        """The family whose item hash decides this family's splits."""
        return self.part_of or self.name


FAMILIES: dict[str, Family] = {
    "add": Family("add", _add, _add_render, "addition of two numbers"),
    "qa": Family("qa", _qa, _qa_render, "the number after / before a number, the bigger of two numbers"),
    "rev": Family("rev", _digits, _rev_render, "reverse a list of 3-6 digits"),
    "sort": Family("sort", _digits, _sort_render, "sort a list of 3-6 digits"),
    "add1": Family("add1", _add1, _add_render, "addition of two one-digit numbers", part_of="add"),
    "sort3": Family("sort3", _digits3, _sort_render, "sort a list of 3 digits", part_of="sort"),
}
PRIMARY_FAMILIES: tuple[str, ...] = tuple(name for name, f in FAMILIES.items() if f.part_of is None)
"""The families that are not easy subsets of another: the questions of the base's plain text."""


@dataclass(frozen=True)
class Task:
    """A skill asked and answered in one language, e.g. ``add_b`` = addition asked and answered in B."""

    name: str
    family: Family
    lang: Lang

    @property
    def description(self) -> str:
        return f"{self.family.description}, asked and answered in language {self.lang}"

    def render(self, item: Item) -> Example:
        prompt, answer = self.family.render(item)
        return Example(to_lang(prompt, self.lang), to_lang(answer, self.lang), item)

    def draw(self, rng: random.Random, max_operand: int, split: Split) -> Example:
        """One example whose item lies in ``split`` (rejection sampling from the family's generator)."""
        while True:
            item = self.family.draw(rng, max_operand)
            if split_of(self.family.split_name, item) == split:
                return self.render(item)

    def eval_set(self, split: Split, n: int, max_operand: int, seed: int) -> list[Example]:
        """``n`` distinct held-out examples of ``split``, the same for every call with these arguments."""
        if split == "train":
            raise ValueError("eval_set: held-out splits are 'validation' and 'test'")
        rng = random.Random(f"eval:{self.family.name}:{split}:{seed}")
        seen: set[Item] = set()
        out: list[Example] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 10_000:
                raise ConfigError(
                    f"eval: task {self.name} has fewer than {n} distinct {split} items with max_operand={max_operand}; "
                    f"lower eval.n_{split} or raise max_operand"
                )
            item = self.family.draw(rng, max_operand)
            if item in seen or split_of(self.family.split_name, item) != split:
                continue
            seen.add(item)
            out.append(self.render(item))
        return out


def task(name: str) -> Task:
    """The task called ``<family>_<a|b>``, e.g. ``add_b``."""
    family, _, lang = name.rpartition("_")
    if family not in FAMILIES or lang not in ("a", "b"):
        raise KeyError(name)
    return Task(name, FAMILIES[family], "A" if lang == "a" else "B")


TASK_NAMES: tuple[str, ...] = tuple(f"{f}_{lang}" for f in FAMILIES for lang in ("a", "b"))


def prompt_text(example: Example) -> str:
    """The prompt as the text a model is given, ending in the neutral answer marker."""
    return " ".join([*example.prompt, ANS])


def answer_text(example: Example) -> str:
    """The answer as text; a word-level tokenizer decodes a correct generation to exactly this."""
    return " ".join(example.answer)
