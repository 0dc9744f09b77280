"""Executors: where candidates are materialized and scored (``local`` in-process, ``ray`` on a cluster).

``build_executor(experiment)`` starts the executor an experiment names; the driver only uses the
``Executor`` interface (``submit`` to a free slot, ``poll`` for completions).
"""

from evomerge.experiment import Experiment
from evomerge.runtime.base import Executor, Job, Outcome, Split
from evomerge.runtime.local import LocalExecutor
from evomerge.runtime.worker import Worker, WorkerSpec, build_fitness, load_callable


def worker_spec(experiment: Experiment) -> WorkerSpec:
    """The worker spec of an experiment (models, fitness, device, dtype, threads, blueprint kind)."""
    from evomerge.spaces import space_blueprint

    return WorkerSpec(
        models=dict(experiment.models),
        base=experiment.base,
        fitness=experiment.fitness,
        heldout=experiment.heldout,
        device=experiment.executor.device,
        dtype=experiment.executor.dtype,
        threads=experiment.executor.threads,
        source=experiment.source,
        blueprint=space_blueprint(experiment.search_space),
    )


def build_executor(experiment: Experiment) -> Executor:
    """Start the executor of ``experiment.executor.kind``."""
    if experiment.executor.kind == "ray":
        from evomerge.runtime.ray_executor import RayExecutor

        return RayExecutor.start(worker_spec(experiment), experiment.executor)
    return LocalExecutor.start(worker_spec(experiment))


def with_ray_address(experiment: Experiment, address: str | None) -> Experiment:
    """``experiment`` run on the Ray cluster at ``address`` (``--ray-address``); unchanged for None."""
    if address is None:
        return experiment
    executor = experiment.executor.model_copy(update={"kind": "ray", "address": address})
    return experiment.model_copy(update={"executor": executor})


__all__ = [
    "Executor",
    "Job",
    "LocalExecutor",
    "Outcome",
    "Split",
    "Worker",
    "WorkerSpec",
    "build_executor",
    "build_fitness",
    "load_callable",
    "with_ray_address",
    "worker_spec",
]
