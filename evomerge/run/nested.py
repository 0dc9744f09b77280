"""Nested MAP: many experts merged pair by pair, each pair by a MAP run whose pick joins the pool.

MAP's surrogates need few genes, so N experts are not searched at once (N genes, N objectives):
as MAP's ``run_MAP_nested`` does (Li et al., arXiv 2406.07529, §3.4), the two pool models with the
closest single-task scores are merged by a 2-gene MAP run (one weight per model, over the base),
the front member the preferences pick is exported into the pool as ``merge<k>``, and the merge
stands for the union of its pair's tasks from then on. N experts take N − 1 merges; the cost grows
with N, not with the N-dimensional front.

A ``nested_map`` experiment is a staged experiment that plans its own stages (``evomerge.run.stages``
asks ``next_stage`` whenever the planned ones are done):

* ``sources`` — each expert alone on every task (a ``random`` run that evaluates only the
  ``source`` references), the single-task scores of the first pairing;
* ``merge1`` … ``merge<N-1>`` — one per pair: models ``[base, a, b]``, objectives the tasks of
  ``a`` then ``b``, the fitness (and held-out fitness) limited to those tasks, and ``promote`` of
  the front member picked by the preferences of those tasks.

The last merge (``RUN_DIR/pool/merge<N-1>``) is the nested merge of every expert; its stage is the
run that ``front``, ``report`` and ``export RUN_DIR`` read. Everything the plan depends on is on disk (the planned stages in ``stages.yaml``, the pool, each
stage's store), so a resumed run plans exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.experiment import (
    BudgetConfig,
    ExperimentFile,
    NestedMapConfig,
    PromoteConfig,
    StageConfig,
    StrategyConfig,
)
from evomerge.store import RunStore, StoreError
from evomerge.store.stages import stage_dir

SOURCES = "sources"
MERGE = "merge"


def closest_pair(scores: Mapping[str, float]) -> tuple[str, str]:
    """The two models whose single-task scores are closest (a tie: the pair that comes first in
    ``scores``' order), so that neither side of a merge drowns the other (MAP's nested pairing).

    >>> closest_pair({"skill": 0.62, "lang": 0.31, "sort": 0.58})
    ('skill', 'sort')
    """
    names = list(scores)
    if len(names) < 2:
        raise ValueError(f"closest_pair: expected at least 2 models, got {len(names)}")
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    return min(pairs, key=lambda pair: abs(scores[pair[0]] - scores[pair[1]]))


def sources_stage(spec: ExperimentFile) -> StageConfig:
    """Each expert alone on every task: a ``random`` run whose budget is the experts' ``source`` references."""
    nested = _nested(spec)
    return StageConfig(
        name=SOURCES,
        models=[spec.base, *nested.experts],  # type: ignore[list-item]
        strategy=StrategyConfig(name="random", settings={"references": ["source"]}),
        objectives=nested.tasks,
        budget=BudgetConfig(evaluations=len(nested.experts)),
        heldout=False,
    )


def pair_stage(spec: ExperimentFile, index: int, a: str, b: str, tasks: Mapping[str, list[str]]) -> StageConfig:
    """The MAP run merging pool models ``a`` and ``b`` into ``merge<index>`` over their tasks."""
    nested = _nested(spec)
    objectives = [*tasks[a], *tasks[b]]
    name = f"{MERGE}{index}"
    fields: dict[str, Any] = {}
    if isinstance(spec.fitness.get("tasks"), list):
        fields["fitness"] = {"tasks": _tasks_of(spec.fitness["tasks"], objectives)}
    if isinstance(spec.heldout, dict) and isinstance(spec.heldout.get("tasks"), list):
        fields["heldout"] = {**spec.heldout, "tasks": _tasks_of(spec.heldout["tasks"], objectives)}
    pick = ",".join(f"{task}={nested.preference(task):g}" for task in objectives)
    return StageConfig(
        name=name, models=[spec.base, a, b], objectives=objectives, promote=[PromoteConfig(name=name, pick=pick)], **fields  # type: ignore[list-item]
    )


def preview_stages(spec: ExperimentFile) -> list[StageConfig]:
    """The stages validated before a nested run starts: ``sources`` and a pair stage of the first two experts."""
    experts = list(_nested(spec).experts)
    return [sources_stage(spec), pair_stage(spec, 1, experts[0], experts[1], _nested(spec).experts)]


def members(spec: ExperimentFile) -> dict[str, list[str]]:
    """The pool models still to merge after the planned stages, each with the tasks it stands for."""
    remaining = {name: list(tasks) for name, tasks in _nested(spec).experts.items()}
    for stage in spec.stages or []:
        if stage.name == SOURCES:
            continue
        _, a, b = stage.models or []
        remaining[stage.name] = remaining.pop(a) + remaining.pop(b)
    return remaining


def next_stage(spec: ExperimentFile, root: Path, pool: Mapping[str, Any]) -> StageConfig | None:
    """The stage after the planned ones (all done): ``sources`` first, then the closest pair, then
    nothing once a single model stands for every task."""
    planned = spec.stages or []
    if not planned:
        return sources_stage(spec)
    remaining = members(spec)
    if len(remaining) == 1:
        return None
    scores = {name: single_task_score(spec, root, pool, name, tasks) for name, tasks in remaining.items()}
    a, b = closest_pair(scores)
    return pair_stage(spec, len(planned), a, b, remaining)


def single_task_score(spec: ExperimentFile, root: Path, pool: Mapping[str, Any], name: str, tasks: Sequence[str]) -> float:
    """The mean validation score of model ``name`` on its own tasks: an expert's from the ``sources``
    stage, a merge's from the result of the candidate its stage promoted."""
    if name in _nested(spec).experts:
        folder = stage_dir(root, SOURCES)
        with RunStore.open_reader(folder) as store:
            objectives = list(store.metadata["objectives"])
            tickets = [c.ticket for c in store.candidates() if c.proposal.info.get("reference") == name]
            results = {r.ticket: r for r in store.results() if r.ok}
        found = [results[t] for t in tickets if t in results]
        if not found:
            raise StoreError(f"{folder}: no successful evaluation of '{name}' alone; nested MAP needs each expert's own score")
    else:
        folder = stage_dir(root, name)
        with RunStore.open_reader(folder) as store:
            objectives = list(store.metadata["objectives"])
            results = {r.ticket: r for r in store.results() if r.ok}
        found = [results[pool[name].candidate]] if pool[name].candidate in results else []
        if not found:
            raise StoreError(f"{folder}: the promoted candidate of '{name}' has no successful result")
    values = found[0].evaluation.objectives
    return float(np.mean([values[objectives.index(task)] for task in tasks]))


def _tasks_of(tasks: list[Any], objectives: Sequence[str]) -> list[Any]:
    """The task entries whose objective (``name``, else ``task``) is one of ``objectives``."""
    return [t for t in tasks if isinstance(t, dict) and (t.get("name") or t.get("task")) in objectives]


def _nested(spec: ExperimentFile) -> NestedMapConfig:
    if spec.nested_map is None:
        raise ValueError("not a nested_map experiment")
    return spec.nested_map
