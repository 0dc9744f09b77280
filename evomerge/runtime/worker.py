"""A worker: the model pool resident next to one live model, and the fitness built once.

``Worker.start(spec)`` pays every set-up cost once (open the pool, build the materializer of the
blueprint kind the run produces, read the tokenizer, build the fitness, i.e. load lm-eval's tasks);
``run(job)`` then costs only materializing the blueprint (a merge in place, a path assembled from
resident layers: whichever materializer its kind has, see ``evomerge.materialize.registry``) and
the evaluation. A failure inside a job (an exception while merging or scoring) becomes a
failed ``Outcome`` with the error text, so one bad candidate never stops a search. The spec is
plain data so that a remote executor can ship it to each of its workers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError
from evomerge.fitness.kinds import FitnessConfig, build_fitness
from evomerge.fitness.workload import Workload
from evomerge.runtime.base import Job, Outcome, Split


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as plain picklable data.

    ``blueprint``: the kind the run's space produces (its materializer is built at start).
    ``placement`` (or 'auto') and ``cache_memory`` (bytes, None: what the device has left) are
    settled by the worker's own memory plan at start-up; ``recipe`` (a recipe of the search space,
    as data; None for blends and paths) and ``workloads`` (what its fitness asks of memory,
    measured by the driver) are what that plan needs to know about the search.
    """

    models: Mapping[str, str]
    base: str | None
    fitness: FitnessConfig
    heldout: FitnessConfig | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    source: str = "experiment"
    blueprint: str = "recipe"
    placement: str = "auto"
    cache_memory: int | None = None
    recipe: Mapping[str, Any] | None = None
    workloads: tuple[Workload, ...] = ()


class Worker:
    """One resident model pool + live model + fitness; runs jobs one after another."""

    def __init__(self, name: str, spec: WorkerSpec, materializers: Any, fitness: Any, plan: Any = None) -> None:
        self.name = name
        self.spec = spec
        self.materializers = materializers
        self._tokenizers: dict[str, Any] = {}
        self._fitness: dict[str, Any] = {"validation": fitness}
        self.plan = plan
        """The worker's memory plan (``evomerge.plan.WorkerPlan``), when it made one."""

    @classmethod
    def start(cls, spec: WorkerSpec, name: str = "local") -> Worker:
        """Open the pool, plan its memory on this worker's device (refusing, in one line, a pool
        that does not fit), build the materializer of ``spec.blueprint`` with the plan's placement,
        the tokenizer and the validation fitness."""
        import torch
        from transformers.utils import logging as hf_logging

        from evomerge.devices import usable_device
        from evomerge.materialize import Materializers
        from evomerge.plan import check_plan, plan_for_spec
        from evomerge.pool import ModelPool

        usable_device(spec.device, f"{spec.source}: executor.device")
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        hf_logging.disable_progress_bar()  # a worker loads its model once; the bar is noise in a run's output
        pool = ModelPool.open(dict(spec.models), spec.base)
        try:
            plan = plan_for_spec(spec, pool)
            check_plan(plan, spec.source)
            materializers = Materializers(
                pool, device=spec.device, dtype=getattr(torch, spec.dtype),
                placement=plan.placement, cache_bytes=plan.cache_budget,
            )
            materializers.prepare(spec.blueprint)
            fitness = build_fitness(spec.fitness, f"{spec.source}: fitness")
            worker = cls(name, spec, materializers, fitness, plan)
            worker.tokenizer(pool.reference)
        except BaseException:
            pool.close()
            raise
        return worker

    def tokenizer(self, model: str) -> Any:
        """The tokenizer of pool model ``model`` (read on first use)."""
        if model not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[model] = AutoTokenizer.from_pretrained(self.materializers.pool.path(model))
        return self._tokenizers[model]

    def fitness(self, split: Split) -> Any:
        """The fitness of ``split``; the held-out one is built on first use (it is needed at the end)."""
        if split not in self._fitness:
            if self.spec.heldout is None:
                raise ConfigError("heldout: the experiment has no held-out fitness")
            self._fitness[split] = build_fitness(self.spec.heldout, f"{self.spec.source}: heldout")
        return self._fitness[split]

    def run(self, job: Job) -> Outcome:
        """Materialize ``job.recipe`` (any blueprint kind) and score it; exceptions become a failed outcome."""
        started = time.time()
        start = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            model = self.materializers.apply(job.recipe)
            if self.materializers.device.type == "cuda":
                import torch

                torch.cuda.synchronize(self.materializers.device)  # the merge's time is its kernels', not their launch
            merged = time.perf_counter()
            timings["merge"] = merged - start
            result = self.fitness(job.split).evaluate(model, self.tokenizer(job.recipe.tokenizer_source), bar=job.bar)
            timings["evaluate"] = time.perf_counter() - merged
        except Exception as err:  # a candidate's failure, recorded with its error text
            timings["total"] = time.perf_counter() - start
            return Outcome(job.key, job.split, self.name, started, None, _one_line(err), timings)
        timings.update({key: value for key, value in result.timings.items() if key != "total"})
        timings["total"] = time.perf_counter() - start
        return Outcome(job.key, job.split, self.name, started, result, None, timings)

    def close(self) -> None:
        self.materializers.close()
        self.materializers.pool.close()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
