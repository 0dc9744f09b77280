"""Executors: where candidates are materialized and scored (``local`` in-process, ``ray`` on a cluster).

Executors are registered by name (``register_executor``, see ``evomerge.runtime.registry``);
``build_executor(experiment)`` starts the one the experiment's ``executor.kind`` names. The driver
only uses the ``Executor`` interface (``submit`` to a free slot, ``poll`` for completions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from evomerge.fitness.callable_fitness import load_callable
from evomerge.fitness.kinds import build_fitness
from evomerge.fitness.workload import Workload
from evomerge.runtime import local as _local  # noqa: F401  (registers "local")
from evomerge.runtime import ray_executor as _ray_executor  # noqa: F401  (registers "ray")
from evomerge.runtime.base import Executor, Job, Outcome, Split
from evomerge.runtime.local import LocalExecutor
from evomerge.runtime.registry import (
    EXECUTORS,
    ExecutorSettings,
    get_executor,
    parse_executor,
    register_executor,
    with_kind,
)
from evomerge.runtime.worker import Worker, WorkerSpec

if TYPE_CHECKING:
    from evomerge.experiment import Experiment


def worker_spec(experiment: Experiment, workloads: Sequence[Workload] | None = None) -> WorkerSpec:
    """The worker spec of an experiment (models, fitness, device, dtype, threads, blueprint kind,
    placement); ``workloads``: what its fitness asks of memory if already measured (else measured here)."""
    from evomerge.spaces import space_blueprint

    settings = experiment.executor
    recipe = experiment_recipe(experiment)
    if workloads is None:
        from evomerge.plan import read_pool_shape, workloads_of

        workloads = workloads_of(experiment.fitness, read_pool_shape(experiment.models, experiment.base))
    return WorkerSpec(
        models=dict(experiment.models),
        base=experiment.base,
        fitness=experiment.fitness,
        heldout=experiment.heldout,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.threads,
        source=experiment.source,
        blueprint=space_blueprint(experiment.search_space),
        placement=settings.placement,
        cache_memory=settings.cache_bytes,
        recipe=recipe,
        workloads=tuple(workloads),
    )


def experiment_recipe(experiment: Experiment) -> dict | None:
    """A recipe the experiment's space decodes to (its initial genome) as plain data, which tells a
    worker's memory plan the operators of the search; None when the space derives children or
    its blueprints are not parameter recipes (layer paths)."""
    from evomerge.recipe import Recipe
    from evomerge.spaces.preview import experiment_space

    space = experiment_space(experiment)
    if space.derives:
        return None
    blueprint = space.decode(space.initial_genome())
    return blueprint.model_dump(mode="json") if isinstance(blueprint, Recipe) else None


def build_executor(experiment: Experiment, workloads: Sequence[Workload] | None = None) -> Executor:
    """Start the executor ``experiment.executor.kind`` names, its workers built from the experiment."""
    cls = get_executor(experiment.executor.kind, f"{experiment.source}: executor.kind")
    return cls.start(worker_spec(experiment, workloads), experiment.executor)


def with_ray_address(experiment: Experiment, address: str | None) -> Experiment:
    """``experiment`` run on the Ray cluster at ``address`` (``--ray-address``); unchanged for None."""
    if address is None:
        return experiment
    return experiment.model_copy(update={"executor": with_kind(experiment.executor, "ray", address=address)})


__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorSettings",
    "Job",
    "LocalExecutor",
    "Outcome",
    "Split",
    "Worker",
    "WorkerSpec",
    "build_executor",
    "build_fitness",
    "get_executor",
    "load_callable",
    "parse_executor",
    "register_executor",
    "with_ray_address",
    "worker_spec",
]
