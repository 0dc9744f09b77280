"""A worker's measured peak memory beside its memory plan, in a fresh process (``python tests/plan_probe.py``).

Reads a JSON job on stdin: ``models`` (name → folder), ``base``, ``recipes`` (blueprint dicts to
run, the first one also telling the plan the operators), ``fitness`` (a fitness block),
``executor`` settings (device, dtype, placement, cache_memory) and, for a layer-path search,
``blueprint: path`` with ``depth`` (its longest path); starts a ``Worker`` as an executor would,
runs every blueprint as a job, and prints JSON: the peak resident set size of the process
(``VmHWM``, this process image's own high-water mark: ``ru_maxrss`` would report the pytest
parent's, which Linux carries across fork and exec), its resident size after the imports, and the
worker's plan.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"


def high_water() -> int:
    """Peak resident bytes of this process image (``VmHWM`` in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


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
        recipe=None if job.get("blueprint") == "path" else job["recipes"][0], workloads=tuple(workloads),
        blueprint=job.get("blueprint", "recipe"), depth=job.get("depth"),
    )
    worker = Worker.start(spec)
    started = rss()
    outcomes = [worker.run(Job(i, recipe_from_dict(dict(r), "probe"))) for i, r in enumerate(job["recipes"])]
    peak = high_water()
    print(json.dumps({
        "peak": peak,
        "imported": imported,
        "started": started,
        "errors": [o.error for o in outcomes if o.failed],
        "timings": [o.timings for o in outcomes],
        "cache_nbytes": getattr(worker.materializers.prepare(job["recipes"][-1].get("kind", "recipe")), "cache_nbytes", 0),
        "plan": worker.plan.to_json(),
    }))


if __name__ == "__main__":
    main()
