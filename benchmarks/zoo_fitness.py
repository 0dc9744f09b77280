"""Python fitness for ``zoo_table.py``'s per-layer searches: the zoo's batched exact-match scorer.

The zoo folder and the merge setting (a ``SettingEntry`` as JSON) come from ``ZOO_TABLE_ZOO`` /
``ZOO_TABLE_SETTING`` (set by ``zoo_table.py``), because an experiment names a fitness function, not
its arguments; ``ZOO_TABLE_VALIDATION_LIMIT`` scores merges on the first N validation questions only. The objective
of a setting with a target task is the target's accuracy; of a setting without one, ``kept2``: the
share of its own accuracy that the second-best-kept expert keeps (≥ 50 ⇔ some pair keeps half each).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from evomerge.zoo.index import SettingEntry, ZooIndex
from evomerge.zoo.quick_eval import accuracy
from evomerge.zoo.spec import load_spec
from evomerge.zoo.tasks import Example, task


@cache
def _zoo() -> tuple[Path, ZooIndex, SettingEntry]:
    folder = Path(os.environ["ZOO_TABLE_ZOO"])
    index = ZooIndex.load(folder / "zoo.json")
    return folder, index, SettingEntry.model_validate_json(os.environ["ZOO_TABLE_SETTING"])


@cache
def eval_set(name: str, split: str) -> list[Example]:
    """The zoo's own evaluation examples of a task (the ones ``zoo.json`` scores were measured on)."""
    folder, _, _ = _zoo()
    spec = load_spec(folder / "zoo.yaml")
    n = spec.eval.n_validation if split == "validation" else spec.eval.n_test
    if split == "validation" and os.environ.get("ZOO_TABLE_VALIDATION_LIMIT"):
        n = min(n, int(os.environ["ZOO_TABLE_VALIDATION_LIMIT"]))
    return task(name).eval_set(split, n, spec.max_operand, spec.eval.seed)


def scores(model, split: str, tasks: list[str]) -> dict[str, float]:
    return {name: accuracy(model, task(name), eval_set(name, split)) for name in tasks}


def objective(accuracies: dict[str, float], split: str) -> dict[str, float]:
    """The setting's objective from per-task accuracies (see the module docstring)."""
    _, index, setting = _zoo()
    if setting.target is not None:
        return {"target": accuracies[setting.target]}
    kept = sorted(
        (100.0 * accuracies[name] / max(index.model(expert).scores[name][split], 1e-9)
         for expert, name in zip(setting.experts, setting.tasks, strict=True)),
        reverse=True,
    )
    return {"kept2": kept[1]}


def _needed() -> list[str]:
    _, _, setting = _zoo()
    return [setting.target] if setting.target is not None else list(setting.tasks)


def validation(model, tokenizer) -> dict[str, float]:
    return objective(scores(model, "validation", _needed()), "validation")


def test(model, tokenizer) -> dict[str, float]:
    return objective(scores(model, "test", _needed()), "test")
