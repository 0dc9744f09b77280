"""A worker: the model pool resident next to one live model, and the fitness built once.

``Worker.start(spec)`` pays every set-up cost once (open the pool, load the skeleton, read the
tokenizer, build the fitness, i.e. load lm-eval's tasks); ``run(job)`` then costs only the in-place
merge and the evaluation. A failure inside a job (an exception while merging or scoring) becomes a
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

    ``placement`` (or 'auto') and ``cache_memory`` (bytes, None: what the device has left) are
    settled by the worker's own memory plan at start-up; ``recipe`` (a recipe of the search space,
    as data; None for blends) and ``workloads`` (what its fitness asks of memory, measured by the
    driver) are what that plan needs to know about the search.
    """

    models: Mapping[str, str]
    base: str | None
    fitness: FitnessConfig
    heldout: FitnessConfig | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    source: str = "experiment"
    placement: str = "auto"
    cache_memory: int | None = None
    recipe: Mapping[str, Any] | None = None
    workloads: tuple[Workload, ...] = ()


class Worker:
    """One resident model pool + live model + fitness; runs jobs one after another."""

    def __init__(self, name: str, spec: WorkerSpec, merger: Any, tokenizer: Any, fitness: Any, plan: Any = None) -> None:
        self.name = name
        self.spec = spec
        self.merger = merger
        self.tokenizer = tokenizer
        self._fitness: dict[str, Any] = {"validation": fitness}
        self.plan = plan
        """The worker's memory plan (``evomerge.plan.WorkerPlan``), when it made one."""

    @classmethod
    def start(cls, spec: WorkerSpec, name: str = "local") -> Worker:
        """Open the pool, plan its memory on this worker's device (refusing, in one line, a pool
        that does not fit), load the models per the plan's placement, the live model and tokenizer,
        and build the validation fitness."""
        import torch
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from evomerge.materialize import ResidentMerger
        from evomerge.plan import check_plan, plan_for_spec
        from evomerge.pool import ModelPool

        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        hf_logging.disable_progress_bar()  # a worker loads its model once; the bar is noise in a run's output
        pool = ModelPool.open(dict(spec.models), spec.base)
        try:
            plan = plan_for_spec(spec, pool)
            check_plan(plan, spec.source)
            merger = ResidentMerger.load(
                pool, device=spec.device, dtype=getattr(torch, spec.dtype),
                placement=plan.placement, cache_bytes=plan.cache_budget,
            )
            tokenizer = AutoTokenizer.from_pretrained(pool.path(pool.reference))
            fitness = build_fitness(spec.fitness, f"{spec.source}: fitness")
        except BaseException:
            pool.close()
            raise
        return cls(name, spec, merger, tokenizer, fitness, plan)

    def fitness(self, split: Split) -> Any:
        """The fitness of ``split``; the held-out one is built on first use (it is needed at the end)."""
        if split not in self._fitness:
            if self.spec.heldout is None:
                raise ConfigError("heldout: the experiment has no held-out fitness")
            self._fitness[split] = build_fitness(self.spec.heldout, f"{self.spec.source}: heldout")
        return self._fitness[split]

    def run(self, job: Job) -> Outcome:
        """Merge ``job.recipe`` into the live model and score it; exceptions become a failed outcome."""
        started = time.time()
        start = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            self.merger.apply(job.recipe)
            if self.merger.device.type == "cuda":
                import torch

                torch.cuda.synchronize(self.merger.device)  # the merge's time is its kernels', not their launch
            merged = time.perf_counter()
            timings["merge"] = merged - start
            result = self.fitness(job.split).evaluate(self.merger.model, self.tokenizer)
            timings["evaluate"] = time.perf_counter() - merged
        except Exception as err:  # a candidate's failure, recorded with its error text
            timings["total"] = time.perf_counter() - start
            return Outcome(job.key, job.split, self.name, started, None, _one_line(err), timings)
        timings.update({key: value for key, value in result.timings.items() if key != "total"})
        timings["total"] = time.perf_counter() - start
        return Outcome(job.key, job.split, self.name, started, result, None, timings)

    def close(self) -> None:
        self.merger.pool.close()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
