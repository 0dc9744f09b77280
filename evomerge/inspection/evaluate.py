"""``evomerge evaluate``: score front members (or chosen candidates) on the held-out split, and keep it.

The search never sees these scores: held-out results are stored under split ``test``, which the
strategy's replay ignores. Takes the run's lock, so it waits for no one and is refused while a
driver runs; a candidate already scored on the split is not scored again, while a failed attempt
(an out-of-memory error, a lost worker) stays recorded and is retried by the next ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.inspection.front import pareto_front
from evomerge.inspection.run_view import RunView
from evomerge.recipe import recipe_from_dict
from evomerge.store import RunStore
from evomerge.store.files import EXPERIMENT_FILE

SPLITS = ("test",)


def evaluate_candidates(
    run_dir: str | Path,
    *,
    front: bool = False,
    candidates: list[int] | None = None,
    split: str = "test",
    on_result: Callable[[int, dict[str, float] | None, str | None], None] | None = None,
) -> dict[int, dict[str, float] | None]:
    """Score the front (``front=True``) and/or ``candidates`` on ``split``; returns id → objectives (None if it failed)."""
    from evomerge.experiment import Experiment
    from evomerge.pool.fingerprint import check_unchanged, fingerprint_models
    from evomerge.run.heldout import Heldout, run_job
    from evomerge.run.objectives import Objectives
    from evomerge.runtime import Job, build_executor

    if split not in SPLITS:
        raise ConfigError(f"--split: expected one of {', '.join(SPLITS)}, got '{split}'")
    view = RunView.load(run_dir)
    wanted = list(candidates or [])
    if front:
        wanted += [m.candidate for m in pareto_front(view) if m.candidate not in wanted]
    if not wanted:
        raise ConfigError("evaluate: give --front and/or --candidate ID")
    for ticket in wanted:
        view.recipe(ticket)
    experiment = Experiment.from_snapshot(view.experiment, str(view.run_dir / EXPERIMENT_FILE))
    if experiment.heldout is None:
        raise ConfigError(f"{view.run_dir}: the experiment has no held-out fitness (add 'heldout:' to score a test split)")
    objectives = Objectives(view.objectives)
    scored: dict[int, dict[str, float] | None] = {}
    with RunStore.open(view.run_dir) as store:
        done = {r.ticket: r for r in store.results(split) if r.ok}
        todo = [t for t in wanted if t not in done]
        for ticket in wanted:
            if ticket in done:
                scored[ticket] = dict(zip(view.objectives, done[ticket].evaluation.objectives.tolist()))
        if not todo:
            return scored
        fingerprints = fingerprint_models(experiment.models)
        check_unchanged(store.metadata.get("fingerprints"), fingerprints, experiment.models, str(view.run_dir))
        with build_executor(experiment) as executor:
            heldout = Heldout(store, executor, objectives, fingerprints, split)
            for ticket in todo:
                recipe = recipe_from_dict(view.recipe(ticket), f"{view.run_dir}: candidate {ticket}")
                evaluation, error = heldout.record(ticket, run_job(executor, Job(ticket, recipe, split)))
                scored[ticket] = None if evaluation.failed else dict(zip(view.objectives, evaluation.objectives.tolist()))
                if on_result is not None:
                    on_result(ticket, scored[ticket], error)
    return scored

