"""``evomerge export``: one candidate of a run as a Hugging Face folder, with where it came from.

The folder is the streamed export of the candidate's stored recipe (``export_merge``), its model
card extended with the candidate's scores and run, plus ``mergekit.yaml`` whenever mergekit would
compute the same tensors (``recipe_to_mergekit``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from evomerge.errors import ConfigError
from evomerge.inspection.front import pareto_front
from evomerge.inspection.run_view import RunView
from evomerge.recipe import recipe_from_dict
from evomerge.recipe.mergekit_export import recipe_to_mergekit

MERGEKIT_FILE = "mergekit.yaml"


def parse_preferences(text: str, objectives: list[str]) -> dict[str, float]:
    """'a=0.7,b=0.3' → {'a': 0.7, 'b': 0.3}; every name must be an objective of the run."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not np.isfinite(weight) or weight < 0:
            raise ConfigError(f"--pick: expected objective=weight pairs like 'a=0.7,b=0.3' (weights ≥ 0), got '{part}'")
        if name.strip() not in objectives:
            raise ConfigError(f"--pick: '{name.strip()}' is not an objective of this run ({', '.join(objectives)})")
        weights[name.strip()] = weight
    if not weights or sum(weights.values()) == 0:
        raise ConfigError("--pick: expected at least one positive weight")
    return weights


def pick_candidate(view: RunView, preferences: dict[str, float]) -> int:
    """The front member maximizing Σ wᵢ·fᵢ, each objective min–max scaled over the front (as MAP picks)."""
    names = list(preferences)
    front = pareto_front(view, names)
    if not front:
        raise ConfigError(f"{view.run_dir}: no successful candidate to pick from")
    values = np.array([[m.objectives[n] for n in names] for m in front])
    low, high = values.min(axis=0), values.max(axis=0)
    scaled = (values - low) / np.where(high > low, high - low, 1.0)
    scores = scaled @ np.array([preferences[n] for n in names])
    return front[int(np.argmax(scores))].candidate


def choose_candidate(view: RunView, *, candidate: int | None = None, best: bool = False, pick: str | None = None) -> int:
    """Exactly one of: a candidate id, the best on the first objective, or a preference pick."""
    if sum(x is not None and x is not False for x in (candidate, best or None, pick)) != 1:
        raise ConfigError("export: give exactly one of --candidate ID, --best or --pick 'a=0.7,b=0.3'")
    if candidate is not None:
        view.recipe(candidate)
        if not any(r.ticket == candidate for r in view.ok_results()):
            stopped = next((r for r in view.estimates() if r.ticket == candidate), None)
            if stopped is not None:
                raise ConfigError(
                    f"--candidate: candidate {candidate} was stopped early by racing ({stopped.estimate.examples} of "
                    f"{stopped.estimate.total} examples scored); its scores are estimates, so it is not exported"
                )
            raise ConfigError(f"--candidate: candidate {candidate} has no successful validation result")
        return candidate
    if best:
        records = view.ok_results()
        if not records:
            raise ConfigError(f"{view.run_dir}: no successful candidate yet")
        return max(records, key=lambda r: (r.evaluation.objectives[0], -r.seq)).ticket
    return pick_candidate(view, parse_preferences(pick or "", view.objectives))


def export_candidate(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    candidate: int | None = None,
    best: bool = False,
    pick: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Path, int, str | None]:
    """Export the chosen candidate; returns (folder, candidate id, why no mergekit.yaml or None)."""
    from evomerge.materialize import export_merge

    view = RunView.load(run_dir)
    ticket = choose_candidate(view, candidate=candidate, best=best, pick=pick)
    recipe = recipe_from_dict(view.recipe(ticket), f"{view.run_dir}: candidate {ticket}")
    scores = next(r for r in view.ok_results() if r.ticket == ticket).evaluation.objectives.tolist()
    validation = dict(zip(view.objectives, scores))
    heldout = view.heldout(ticket)
    card = _card(view, ticket, validation, heldout)
    try:
        extra, why_not = {MERGEKIT_FILE: yaml.safe_dump(recipe_to_mergekit(recipe), sort_keys=False)}, None
    except ConfigError as err:
        extra, why_not = {}, str(err)
    folder = export_merge(
        recipe, out_dir, device=device, overwrite=overwrite, card_extra=card, extra_files=extra, progress=progress
    )
    return folder, ticket, why_not


def _card(view: RunView, ticket: int, validation: dict[str, float], heldout: dict[str, float] | None) -> str:
    rows = "\n".join(
        f"| {name} | {validation[name]:.4g} | {'' if heldout is None else f'{heldout[name]:.4g}'} |" for name in view.objectives
    )
    return (
        f"## Found by evomerge\n\nCandidate {ticket} of run `{view.name}` ({view.run_dir}), strategy "
        f"`{view.strategy}`, {len(view.results['validation'])} evaluations, run {view.state}. Objective values "
        f"(a minimized metric appears negated):\n\n| objective | validation | held-out (test) |\n|---|---|---|\n{rows}\n"
        + _origins(view.experiment.get("origins") or {})
    )


def _origins(origins: dict[str, dict]) -> str:
    """Hub models as the experiment named them (a branch, a tag) and the commits the run pinned."""
    lines = [
        f"- `{name}`: `{origin['written']}` → `{origin['ref']}`"
        for name, origin in origins.items()
        if "written" in origin and ("commit" in origin or "commit" in origin.get("adapter", {}))
    ]
    return "\nModels as the experiment named them, and what they resolved to when the run started:\n\n" + "\n".join(lines) + "\n" if lines else ""
