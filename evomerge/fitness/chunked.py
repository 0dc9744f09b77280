"""Racing an lm-eval fitness: a candidate's examples scored chunk by chunk until it cannot win.

``RacePlan`` is built once per evaluator: the examples of every task (a group's members included)
in one seeded order, each example's share of its objective, and a check that every objective is a
mean of per-example scores (what the bounds in ``racing`` are about). ``RacePlan.run`` activates
one chunk of documents at a time on the resident tasks and lets lm-eval evaluate just those, bounds
each objective after each chunk, and either stops (a ``Partial``: estimates, the examples they rest
on) or, once every example is scored, runs lm-eval once more over the whole set with every model
response replayed from memory (``MemoLM``): the final result is lm-eval's own scoring and
aggregation of the complete set, as without racing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lm_eval.api.metrics import mean

from evomerge.errors import ConfigError
from evomerge.fitness.racing import Bar, Estimate, race_order, score_bounds, z_value
from evomerge.fitness.result import ExampleScores
from evomerge.fitness.spec import AGGREGATE, RacingSpec
from evomerge.fitness.tasks import Leaf, PreparedTask

Evaluate = Callable[[Any, Mapping[str, Any]], dict[str, Any]]
"""Runs lm-eval's ``evaluate`` with an LM on a task dict and returns its output."""


class MemoLM:
    """An LM proxy that answers each request instance once and replays the answer after that."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self._answers: dict[int, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lm, name)

    def loglikelihood(self, requests: list, disable_tqdm: bool = True) -> list:
        return self._answer("loglikelihood", requests)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = True) -> list:
        return self._answer("loglikelihood_rolling", requests)

    def generate_until(self, requests: list, disable_tqdm: bool = True) -> list:
        return self._answer("generate_until", requests)

    def _answer(self, method: str, requests: list) -> list:
        new = [r for r in requests if id(r) not in self._answers]
        if new:
            for request, answer in zip(new, getattr(self.lm, method)(new), strict=True):
                self._answers[id(request)] = answer
        return [self._answers[id(r)] for r in requests]


@dataclass(frozen=True)
class Partial:
    """A race stopped early: per objective the mean of its scored examples, their scores (NaN where
    unscored) and how many there were."""

    objectives: dict[str, float]
    per_example: dict[str, ExampleScores]
    n_examples: dict[str, int]
    estimate: Estimate


class RacePlan:
    """How the examples of ``tasks`` are raced (see the module docstring)."""

    def __init__(self, tasks: Sequence[PreparedTask], racing: RacingSpec, seed: int | None) -> None:
        self.tasks = tuple(tasks)
        self.racing = racing
        self._leaves: dict[str, Leaf] = {}
        for task in self.tasks:
            _check_raceable(task)
            for leaf in task.leaves:
                self._leaves.setdefault(leaf.name, leaf)
        examples = [(name, position) for name, leaf in self._leaves.items() for position in range(len(leaf.doc_ids))]
        self.order = [examples[i] for i in race_order(len(examples), seed)]
        self._shares = [_shares(task) for task in self.tasks]
        weights = {t.spec.objective: t.spec.weight for t in self.tasks}
        self._total_weight = sum(weights.values())

    @property
    def n_examples(self) -> int:
        return len(self.order)

    def run(self, lm: Any, evaluate: Evaluate, full: Mapping[str, Any], bar: Bar) -> dict[str, Any] | Partial:
        """Score chunk after chunk; a ``Partial`` if the candidate cannot reach ``bar``, else lm-eval's
        output on the whole set (``full``: the evaluator's task dict)."""
        memo = MemoLM(lm)
        seen: list[dict[int, float]] = [{} for _ in self.tasks]
        chunk = self.racing.chunk
        try:
            for start in range(0, len(self.order), chunk):
                positions: dict[str, list[int]] = defaultdict(list)
                for name, position in self.order[start : start + chunk]:
                    positions[name].append(position)
                for name, leaf in self._leaves.items():
                    leaf.task.activate(positions.get(name, ()))
                active = {"tasks": {name: self._leaves[name].task for name in positions}, "groups": {}, "group_map": {}}
                output = evaluate(memo, active)
                for scores, task in zip(seen, self.tasks):
                    found = task.example_scores(output["samples"])
                    scores.update({} if found is None else found.as_dict())
                done = min(start + chunk, len(self.order))
                if done < len(self.order) and self._hopeless(seen, bar):
                    return self._partial(seen, done)
        finally:
            for leaf in self._leaves.values():
                leaf.task.activate(None)
        return evaluate(memo, full)

    def _hopeless(self, seen: list[dict[int, float]], bar: Bar) -> bool:
        """Whether the candidate's optimistic objectives cannot reach ``bar`` (every objective the
        bar names must have at least one example scored first)."""
        indices = {i for i, t in enumerate(self.tasks) if t.spec.weight > 0} if AGGREGATE in bar.objectives else set()
        by_name = {t.spec.objective: i for i, t in enumerate(self.tasks)}
        indices |= {by_name[name] for name in bar.objectives if name in by_name}
        if any(not seen[i] for i in indices):
            return False
        z = z_value(self.racing.confidence, len(indices))
        upper = {i: self._upper(i, seen[i], z) for i in indices}
        optimistic = []
        for name in bar.objectives:
            if name == AGGREGATE:
                optimistic.append(sum(self.tasks[i].spec.weight * upper[i] for i in indices) / self._total_weight)
            else:
                optimistic.append(upper[by_name[name]])
        return bar.out_of_reach(optimistic)

    def _upper(self, index: int, seen: dict[int, float], z: float) -> float:
        """The optimistic end of objective ``index``'s bounds, in the maximize convention."""
        shares = self._shares[index]
        ids = sorted(seen)
        low, high = score_bounds([seen[i] for i in ids], len(shares), z, [shares[i] for i in ids])
        return high if self.tasks[index].direction == "maximize" else -low

    def _partial(self, seen: list[dict[int, float]], done: int) -> Partial:
        objectives, per_example, counts = {}, {}, {}
        for scores, shares, task in zip(seen, self._shares, self.tasks):
            ids = task.example_ids
            weight = sum(shares[i] for i in scores)
            objectives[task.spec.objective] = sum(shares[i] * v for i, v in scores.items()) / weight
            per_example[task.spec.objective] = ExampleScores(ids, tuple(scores.get(i, float("nan")) for i in ids))
            counts[task.spec.objective] = len(scores)
        return Partial(objectives, per_example, counts, Estimate(done, len(self.order)))


def _check_raceable(task: PreparedTask) -> None:
    """Racing bounds means of per-example scores: every member task must aggregate the metric by ``mean``."""
    for leaf in task.leaves:
        aggregation = leaf.task.aggregation().get(task.metric)
        if aggregation is not mean:
            how = getattr(aggregation, "__name__", repr(aggregation))
            raise ConfigError(
                f"fitness.racing: task '{leaf.name}' aggregates '{task.metric}' by {how}, not a mean of per-example "
                "scores; racing needs mean metrics (acc, exact_match, ...): turn racing off or choose another metric"
            )


def _shares(task: PreparedTask) -> dict[int, float]:
    """Each example's share of the objective: 1/N, or for a group that averages its tasks without
    regard to size (``weight_by_size: false``), 1/(tasks × the example's task size)."""
    by_size = True
    if task.is_group:
        aggregate = next(a for a in task.groups[0].aggregate_metric_list if a.metric == task.metric)
        by_size = aggregate.weight_by_size
    total = task.n_examples
    shares: dict[int, float] = {}
    for leaf in task.leaves:
        share = 1.0 / total if by_size else 1.0 / (len(task.leaves) * len(leaf.doc_ids))
        shares.update({leaf.offset + i: share for i in leaf.doc_ids})
    return shares
