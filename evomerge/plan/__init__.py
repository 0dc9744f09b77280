"""Memory plans: does one worker of an experiment fit its device and host, and with which placement?

``plan_experiment(experiment)`` is what ``evomerge plan`` prints and what ``evomerge run`` checks
before it creates anything; ``plan_for_spec(spec, pool)`` is the same plan made by a worker at
start-up on its own device (a cluster node may differ from the driver's). Both read shapes only —
safetensors headers, or a config.json — never a weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.merge import OperatorSpec
from evomerge.plan.capacity import Capacity, query_capacity
from evomerge.plan.memory import WorkerPlan, evaluation_bytes, plan_worker
from evomerge.plan.shapes import PoolShape, pool_shape, read_pool_shape
from evomerge.fitness.workload import Workload

if TYPE_CHECKING:
    from pathlib import Path

    from evomerge.experiment import Experiment, ExperimentFile
    from evomerge.pool import ModelPool
    from evomerge.runtime.worker import WorkerSpec

__all__ = [
    "Capacity",
    "PoolShape",
    "Workload",
    "WorkerPlan",
    "check_plan",
    "evaluation_bytes",
    "operators_of",
    "plan_experiment",
    "plan_for_spec",
    "plan_stages",
    "plan_worker",
    "pool_shape",
    "query_capacity",
    "read_pool_shape",
    "workloads_of",
]


def operators_of(recipe: Mapping[str, Any] | None, shape: PoolShape) -> tuple[dict[str, OperatorSpec] | None, int]:
    """(the operator merging each tensor, the number of source models) of a recipe given as data;
    (None, all models) for blends (``recipe`` None)."""
    if recipe is None:
        return None, len(shape.names)
    from evomerge.recipe import RecipePlanner, recipe_from_dict

    parsed = recipe_from_dict(dict(recipe), "recipe")
    planner = RecipePlanner(parsed, shape.num_layers)
    return {t.name: planner.plan(t.name, t.layer, t.kind).operator for t in shape.tensors}, len(parsed.source_names)


def space_recipe(experiment: Experiment, shape: PoolShape) -> tuple[dict[str, Any] | None, str, int | None]:
    """(the recipe the experiment's space starts from, as data — None for spaces of blends or layer
    paths; the kind of blueprint it proposes; the most layers a candidate runs, None: the models'
    own). The space is built from the shapes, so models described by a config alone do."""
    from evomerge.runtime import initial_recipe
    from evomerge.spaces.base import PoolInfo, build_space, space_blueprint

    order = tuple((t.name, t.numel) for t in shape.tensors)
    space = build_space(experiment.search_space, PoolInfo(experiment.models, experiment.base, shape.num_layers, order),
                        f"{experiment.source}: search_space")
    return initial_recipe(space), space_blueprint(experiment.search_space), space.depth


def workloads_of(fitness: Any, shape: PoolShape) -> list[Workload]:
    """What the fitness's evaluation asks of memory, measured with the reference model's tokenizer
    when it has one (else token counts are bounded by the prompts' UTF-8 bytes)."""
    from evomerge.fitness.kinds import fitness_kind

    tokenizer = None
    if shape.tokenizer_folder is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(shape.tokenizer_folder)
        except (OSError, ValueError):
            tokenizer = None
    return fitness_kind(fitness).workloads(fitness, tokenizer)


def plan_experiment(
    experiment: Experiment,
    *,
    device_memory: int | None = None,
    host_memory: int | None = None,
    recipe: Mapping[str, Any] | None = None,
    workloads: list[Workload] | None = None,
    here: bool = True,
) -> tuple[WorkerPlan, PoolShape, list[Workload]]:
    """The plan of one worker of ``experiment`` on this machine (or on the memory given).

    ``here`` False: the workers run elsewhere (a cluster); this machine's memory is not theirs, so
    only memory given explicitly is checked (each worker checks its own at start-up)."""
    settings = experiment.executor
    shape = read_pool_shape(experiment.models, experiment.base)
    initial, blueprint, depth = space_recipe(experiment, shape)
    operators, sources = operators_of(initial if recipe is None else recipe, shape)
    if workloads is None:
        workloads = workloads_of(experiment.fitness, shape)
    if here:
        capacity = query_capacity(settings.device, device_memory=device_memory, host_memory=host_memory)
    else:
        capacity = Capacity(device_memory, host_memory, "--device-memory" if device_memory else "each worker at start-up",
                            "--host-memory" if host_memory else "each worker at start-up")
    plan = plan_worker(
        shape,
        device=settings.device,
        dtype=settings.dtype,
        placement=settings.placement,
        cache_memory=settings.cache_bytes,
        operators=operators,
        sources=sources,
        workloads=workloads,
        capacity=capacity,
        blueprint=blueprint,
        depth=depth,
    )
    return plan, shape, workloads


def plan_stages(
    spec: ExperimentFile,
    here: Path,
    source: str,
    models: Mapping[str, str],
    *,
    device_memory: int | None = None,
    host_memory: int | None = None,
) -> list[tuple[str, Experiment, WorkerPlan, PoolShape, list[Workload]]]:
    """(stage name, its experiment, plan, shapes, workloads) of every stage of a staged experiment
    over the pool ``models`` (name → resolved reference). A model an earlier stage promotes does not
    exist yet: it stands in with the layout of the base (or the first model), which a merge keeps."""
    from evomerge.experiment import resolve_experiment
    from evomerge.runtime import get_executor

    pool = dict(models)
    stand_in = spec.base or next(iter(spec.models))
    plans = []
    for i, stage in enumerate(spec.stages or []):
        where = f"{source} (stage {stage.name})"
        experiment = resolve_experiment(spec.stage_file(i, pool), here, where, run_dir=here / "runs" / spec.name / "stages" / stage.name)
        workers_here = get_executor(experiment.executor.kind).workers_here(experiment.executor)
        plan, shape, workloads = plan_experiment(experiment, device_memory=device_memory, host_memory=host_memory, here=workers_here)
        promoted = [name for name in experiment.models if name != stand_in and pool[name] == pool[stand_in]]
        if promoted:
            plan.notes.append(f"{', '.join(promoted)}: promoted by an earlier stage, planned with the layout of '{stand_in}'")
        plans.append((stage.name, experiment, plan, shape, workloads))
        pool.update({promotion.name: pool[stand_in] for promotion in stage.promote})
    return plans


def plan_for_spec(spec: WorkerSpec, pool: ModelPool) -> WorkerPlan:
    """A worker's own plan at start-up: its pool's shapes, its device's memory."""
    shape = pool_shape(pool)
    operators, sources = operators_of(spec.recipe, shape)
    return plan_worker(
        shape,
        device=spec.device,
        dtype=spec.dtype,
        placement=spec.placement,
        cache_memory=spec.cache_memory,
        operators=operators,
        sources=sources,
        workloads=list(spec.workloads),
        capacity=query_capacity(spec.device),
        blueprint=spec.blueprint,
        depth=spec.depth,
    )


def check_plan(plan: WorkerPlan, source: str) -> None:
    """A one-line ``ConfigError`` (exit 2) when the plan does not fit."""
    if plan.problem is not None:
        raise ConfigError(f"{source}: executor: {plan.problem}")
