"""``evomerge plan FILE``: the memory plan of one worker, as a table or as JSON.

FILE is an experiment (planned as its search runs: the space's operators, the fitness's largest
evaluation batch), a staged experiment (each stage planned as such an experiment, over the pool at its
turn) or a recipe (planned as a worker merging it in memory, with no evaluation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from evomerge.errors import ConfigError
from evomerge.plan import PoolShape, Workload, WorkerPlan, plan_experiment, plan_worker, query_capacity
from evomerge.plan.shapes import read_pool_shape
from evomerge.sizes import format_size
from evomerge.validation import read_yaml

FORMAT = 1


def plan_file(path: str | Path, *, device_memory: int | None = None, host_memory: int | None = None) -> dict[str, Any]:
    """The plan of ``path`` (an experiment or a recipe) as JSON-ready data (the README lists its fields)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if data.get("stages") is not None:
        return _plan_stages(Path(path), device_memory, host_memory)
    if "strategy" in data or "search_space" in data:
        from evomerge.experiment import load_experiment
        from evomerge.runtime import get_executor

        experiment = load_experiment(path)
        here = get_executor(experiment.executor.kind).workers_here(experiment.executor)
        plan, shape, workloads = plan_experiment(experiment, device_memory=device_memory, host_memory=host_memory, here=here)
        return _report(str(path), "experiment", experiment.name, plan, shape, workloads)
    return _plan_recipe(Path(path), device_memory, host_memory)


def _plan_stages(path: Path, device_memory: int | None, host_memory: int | None) -> dict[str, Any]:
    """Each stage's plan. A model promoted by an earlier stage does not exist before it runs: it is
    planned with the shapes of the experiment's base (else its first model), as the stages are
    checked before a staged run starts — a merge keeps its sources' shapes."""
    from evomerge.experiment import check_experiment_file, resolve_experiment, resolve_sources, run_dir_of
    from evomerge.runtime import get_executor

    spec, here, source = check_experiment_file(path)
    pool = {name: resolved.ref for name, resolved in resolve_sources(spec, here, source).items()}
    stand_in = spec.base or next(iter(spec.models))
    promoted: dict[str, str] = {}
    stages = []
    for i, stage in enumerate(spec.stages or []):
        where = f"{source} (stage {stage.name})"
        experiment = resolve_experiment(spec.stage_file(i, pool), here, where, run_dir=run_dir_of(None, spec, here) / "stages" / stage.name)
        here_ = get_executor(experiment.executor.kind).workers_here(experiment.executor)
        plan, shape, workloads = plan_experiment(experiment, device_memory=device_memory, host_memory=host_memory, here=here_)
        plan.notes.extend(f"'{name}' (promoted by stage {by}) planned with the shapes of '{stand_in}'"
                          for name, by in promoted.items() if name in experiment.models)
        stages.append({"stage": stage.name, **_report(where, "experiment", experiment.name, plan, shape, workloads)})
        for target in stage.promote:
            pool[target.name] = pool[stand_in]
            promoted[target.name] = stage.name
    return {"format": FORMAT, "file": str(path), "kind": "staged", "name": spec.name, "stages": stages,
            "fits": all(s["fits"] for s in stages)}


def _plan_recipe(path: Path, device_memory: int | None, host_memory: int | None) -> dict[str, Any]:
    from evomerge.plan import operators_of
    from evomerge.recipe import Blend, load_recipe

    recipe = load_recipe(path)
    base = recipe.reference if isinstance(recipe, Blend) else recipe.base
    shape = read_pool_shape(recipe.models, base)
    operators, sources = operators_of(None if isinstance(recipe, Blend) else recipe.model_dump(mode="json"), shape)
    dtype = recipe.dtype or "float32"
    plan = plan_worker(
        shape, device="cpu", dtype=dtype, placement="auto", cache_memory=None, operators=operators, sources=sources,
        workloads=[], capacity=query_capacity("cpu", device_memory=device_memory, host_memory=host_memory),
    )
    plan.notes.append("a recipe: planned as one worker merging it in memory on the CPU, without evaluation "
                      "(`evomerge merge` streams it to disk and needs far less)")
    return _report(str(path), "recipe", path.stem, plan, shape, [])


def _report(source: str, kind: str, name: str, plan: WorkerPlan, shape: PoolShape, workloads: list[Workload]) -> dict[str, Any]:
    models = {
        model: {
            "parameters": shape.parameters(),
            "stored_bytes": shape.stored_bytes(model),
            "stored_dtypes": sorted({str(t.stored[model]).removeprefix("torch.") for t in shape.tensors}),
        }
        for model in shape.names
    }
    return {
        "format": FORMAT,
        "file": source,
        "kind": kind,
        "name": name,
        "models": models,
        "base": shape.base,
        "config_only": list(shape.config_only),
        "tensors": len(shape.tensors),
        "largest_tensor": shape.largest,
        "layers": shape.dims.layers,
        "workloads": [w.model_dump() for w in workloads],
        **plan.to_json(),
    }


def count(n: int) -> str:
    """A parameter count for people: 7.24 B, 113 M, 98 K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def print_plan(report: dict[str, Any], console: Console | None = None) -> None:
    """The plan as a table: each part, where it lives, its size; totals against what is available
    (a staged experiment's: one such table per stage)."""
    console = console or Console(highlight=False, width=max(Console().width, 132))
    if report["kind"] == "staged":
        for stage in report["stages"]:
            console.rule(f"stage {stage['stage']}")
            print_plan(stage, console)
        return
    on_cpu = report["device_bytes"] is None
    params = next(iter(report["models"].values()))["parameters"]
    console.print(f"[bold]{report['name']}[/bold] ({report['kind']} {report['file']}): one worker on "
                  f"{report['device']} ({report['dtype']}), {len(report['models'])} models × {count(params)} parameters")
    where = "host" if on_cpu else "device"
    known = report[f"{where}_available"] is not None
    options = "; ".join(
        f"{name} {format_size(alt[f'{where}_bytes'])}" + ("" if on_cpu else f" + host {format_size(alt['host_bytes'])}")
        + ("" if not known else " (fits)" if alt["fits"] else " (does not fit)")
        for name, alt in report["placements"].items()
    )
    chosen = f"chosen by the {report['chosen_by']}" if known or report["chosen_by"] == "experiment" else \
        "if every placement fitted: each worker picks at start-up from its own memory"
    console.print(f"placement: [bold]{report['placement']}[/bold] ({chosen}) — {options}")
    table = Table(show_edge=False, pad_edge=False)
    for column, justify in (("part", "left"), ("where", "left"), ("size", "right"), ("", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for part in report["parts"]:
        where = "host" if on_cpu else part["where"]
        table.add_row(part["label"], where, format_size(part["bytes"]), part["detail"])
    console.print(table)
    for where in ("device", "host"):
        if where == "device" and on_cpu:
            continue
        used, available = report[f"{where}_bytes"], report[f"{where}_available"]
        label = "host (= device)" if on_cpu else where
        if available is None:
            console.print(f"{label}: {format_size(used)} (available memory unknown here: {report[f'{where}_available_from']})")
        else:
            console.print(f"{label}: {format_size(used)} of {format_size(available)} available "
                          f"({report[f'{where}_available_from']}; {report['reserve']:.0%} kept free)")
    for note in report["notes"]:
        console.print(f"note: {note}")
    if report["problem"]:
        console.print(f"[bold red]does not fit[/bold red]: {report['problem']}")
    else:
        console.print("[bold green]fits[/bold green]")
