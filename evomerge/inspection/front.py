"""``evomerge front``: the non-dominated candidates of a run, with a one-line recipe summary each."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.inspection.pareto import nondominated_ranks
from evomerge.inspection.run_view import RunView


@dataclass(frozen=True)
class FrontMember:
    """A candidate on the front: validation objectives, held-out ones where evaluated, its recipe in a line."""

    candidate: int
    rank: int
    objectives: dict[str, float]
    heldout: dict[str, float] | None
    summary: str

    def to_json(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "rank": self.rank, "objectives": self.objectives,
                "heldout": self.heldout, "recipe": self.summary}


@dataclass(frozen=True)
class ReferencePoint:
    """A reference model evaluated by the search, and where it stands against the front: on it, or
    dominated by the front member ``dominated_by`` (a front must include or dominate every source)."""

    name: str
    kind: str | None
    candidate: int
    objectives: dict[str, float]
    dominated_by: int | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "candidate": self.candidate, "objectives": self.objectives,
                "on_front": self.dominated_by is None, "dominated_by": self.dominated_by}


def reference_points(view: RunView, objectives: list[str] | None = None, front: list[FrontMember] | None = None) -> list[ReferencePoint]:
    """The references the run evaluated (``RunView.references``), each checked against ``front``
    (default: the run's front on ``objectives``)."""
    names = objectives or view.objectives
    front = pareto_front(view, names) if front is None else front
    results = {r.ticket: r for r in view.ok_results()}
    points = []
    for name, ticket in view.references().items():
        values = dict(zip(view.objectives, results[ticket].evaluation.objectives.tolist()))
        own = np.array([values[n] for n in names])
        dominated_by = None
        if ticket not in {m.candidate for m in front}:
            for member in front:
                other = np.array([member.objectives[n] for n in names])
                if np.all(other >= own) and (np.any(other > own) or member.candidate < ticket):
                    dominated_by = member.candidate
                    break
        points.append(ReferencePoint(name, view.reference_kinds.get(name), ticket, values, dominated_by))
    return points


def pareto_front(run: RunView | str | Path, objectives: list[str] | None = None, *, max_rank: int = 0) -> list[FrontMember]:
    """Candidates of Pareto rank ≤ ``max_rank`` on the chosen validation objectives (all by default),
    best first on the first objective. With one objective the front is the best candidate (and ties).
    A repeat of an earlier recipe (a fitness-cache hit) is left out: the earlier candidate stands for it."""
    view = run if isinstance(run, RunView) else RunView.load(run)
    names = objectives or view.objectives
    records = view.ok_results(distinct=True)
    if not records:
        return []
    values = view.values(records, names)
    ranks = nondominated_ranks(values)
    members = [
        FrontMember(
            candidate=record.ticket,
            rank=int(rank),
            objectives=dict(zip(view.objectives, record.evaluation.objectives.tolist())),
            heldout=view.heldout(record.ticket),
            summary=recipe_summary(view.recipe(record.ticket)),
        )
        for record, rank in zip(records, ranks)
        if rank <= max_rank
    ]
    first = names[0]
    return sorted(members, key=lambda m: (m.rank, -m.objectives[first], m.candidate))


def recipe_summary(recipe: dict[str, Any]) -> str:
    """'task_arithmetic, 7 rules; weight: skill 0.08–1.27, lang 0.03–1.9' — each parameter's range
    per source over the recipe and its rules (a single value when it never varies); for a blend,
    'blend, 3 segments; weight: a 0.2–0.7, …' over its segments; for a layer path,
    'path, 9 hops: a 0-3 → b 2-4 → a 5; scale 0.81–1.3'."""
    if recipe.get("kind") == "path":
        return path_summary(recipe)
    if recipe.get("kind") == "blend":
        segments = recipe["segments"]
        weights: dict[str, list[float]] = defaultdict(list)
        for segment in segments:
            for model, value in segment["weights"].items():
                weights[model].append(float(value))
        items = [f"{m} {min(v):.3g}" if min(v) == max(v) else f"{m} {min(v):.3g}–{max(v):.3g}" for m, v in weights.items()]
        return f"blend, {len(segments)} segment{'s' if len(segments) > 1 else ''}; weight: {', '.join(items)}"
    ranges: dict[tuple[str, str], list[float]] = defaultdict(list)
    blocks = [recipe, *recipe.get("rules", [])]
    for block in blocks:
        for model, params in (block.get("model_parameters") or {}).items():
            for key, value in params.items():
                ranges[(key, model)].extend(_numbers(value))
    methods = sorted({b["method"] for b in blocks if b.get("method")})
    head = "/".join(methods) or "?"
    if recipe.get("rules"):
        head += f", {len(recipe['rules'])} rules"
    by_param: dict[str, list[str]] = defaultdict(list)
    for (key, model), values in ranges.items():
        low, high = min(values), max(values)
        by_param[key].append(f"{model} {low:.3g}" if low == high else f"{model} {low:.3g}–{high:.3g}")
    parts = [f"{key}: {', '.join(items)}" for key, items in by_param.items()]
    return "; ".join([head, *parts])


def path_summary(recipe: dict[str, Any]) -> str:
    """A layer path in a line: runs of consecutive layers per model, and the range of its scales."""
    from evomerge.recipe import LayerPath

    path = LayerPath.model_validate(recipe)
    runs = " → ".join(f"{m} {a}" if a == b else f"{m} {a}-{b}" for m, a, b in path.spans())
    scales = [hop.scale for hop in path.hops]
    scale = "" if not path.scaled else f"; scale {min(scales):.3g}" + ("" if min(scales) == max(scales) else f"–{max(scales):.3g}")
    return f"path, {len(path.hops)} hop{'s' if len(path.hops) != 1 else ''}: {runs or 'none'}{scale}"


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, list):
        out: list[float] = []
        for item in value:
            out.extend(_numbers(item["value"] if isinstance(item, dict) and "value" in item else item))
        return out
    return []
