"""A worker's measured peak memory beside its memory plan, in a fresh process (``python tests/plan_probe.py``).

Reads a JSON job on stdin: ``models`` (name → folder), ``base``, ``recipes`` (recipe dicts to run,
the first one also telling the plan the operators), ``fitness`` (a fitness block), ``executor``
settings (device, dtype, placement, cache_memory); starts a ``Worker`` as an executor would, runs
every recipe as a job, and prints JSON: the peak resident set size of the process (``ru_maxrss``),
its resident size after the imports, and the worker's plan.
"""

from __future__ import annotations

import json
import os
import resource
import sys

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    job = json.loads(sys.stdin.read())
    import torch  # noqa: F401

    from evomerge.fitness.kinds import parse_fitness
    from evomerge.plan import read_pool_shape, workloads_of
    from evomerge.recipe import recipe_from_dict
    from evomerge.runtime import Job, Worker, WorkerSpec, parse_executor

    settings = parse_executor(job["executor"], "probe")
    fitness = parse_fitness(job["fitness"], "probe")
    workloads = workloads_of(fitness, read_pool_shape(job["models"], job["base"]))
    imported = rss()
    spec = WorkerSpec(
        models=job["models"], base=job["base"], fitness=fitness, device=settings.device, dtype=settings.dtype,
        threads=settings.threads, placement=settings.placement, cache_memory=settings.cache_bytes,
        recipe=job["recipes"][0], workloads=tuple(workloads),
    )
    worker = Worker.start(spec)
    started = rss()
    outcomes = [worker.run(Job(i, recipe_from_dict(dict(r), "probe"))) for i, r in enumerate(job["recipes"])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "peak": peak,
        "imported": imported,
        "started": started,
        "errors": [o.error for o in outcomes if o.failed],
        "timings": [o.timings for o in outcomes],
        "cache_nbytes": worker.materializers.prepare("recipe").cache_nbytes,
        "plan": worker.plan.to_json(),
    }))


if __name__ == "__main__":
    main()
