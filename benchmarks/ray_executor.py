"""The Ray executor on this machine: start-up, dispatch overhead, utilisation, throughput.

1. Start-up: ``ray.init`` of a local instance and the start of worker actors (each loads the pool).
2. Dispatch overhead: a fitness that returns at once, run through the local executor and through
   one Ray worker; the difference per candidate is what Ray adds (serialising the recipe and the
   result, the actor call, ``ray.wait``).
3. Utilisation with 2 workers and evaluation times drawn 1×–4× at random (a sleeping fitness, so the
   two cores are not the bottleneck): steady-state dispatch (evomerge) vs a generation barrier of 4
   candidates (what mergekit-evolve does), same candidates, busy share and wall-time ratio.
4. Throughput with 1 vs 2 Ray workers on real work (merge + lm-eval on the zoo's demo experiment,
   100 validation questions per candidate, 1 torch thread per worker) vs the local executor.
5. What reproducible mode (``executor: {reproducible: true}``) costs: whole runs of each strategy on
   2 workers with the evaluation times of 3., steady-state vs reproducible, busy share of the workers
   (evaluation seconds / (2 × the search's wall time)) and the wall-time ratio.

    EVOMERGE_ZOO=.cache/zoo python benchmarks/ray_executor.py [--jobs 24] [--unit 0.2] [--budget 40]
    python benchmarks/ray_executor.py --only reproducible [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from evomerge.experiment import load_experiment  # noqa: E402
from evomerge.run import start_run  # noqa: E402
from evomerge.runtime import Job, build_executor  # noqa: E402
from evomerge.spaces.preview import experiment_space  # noqa: E402
from evomerge.status import run_status  # noqa: E402
from evomerge.zoo.pico import build_pico_family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FITNESS = """
import hashlib, os, time

def instant(model, tokenizer):
    return {"x": float(model.lm_head.weight.detach()[0, 0])}

def sleepy(model, tokenizer):
    # 1x-4x the unit, drawn from the candidate's own weights: the same candidate always takes the same time
    digest = hashlib.blake2b(model.model.layers[0].mlp.up_proj.weight.detach().numpy().tobytes(), digest_size=8).digest()
    factor = 1.0 + 3.0 * int.from_bytes(digest, "little") / 2**64
    time.sleep(float(os.environ["RAY_BENCH_UNIT"]) * factor)
    solved = [float(b & 1) for b in digest]  # per-example scores for natural niches
    return {"x": factor, "y": sum(solved)}, {"x": solved}
"""
# (label, strategy, objectives, search space); the objectives are what the strategy optimizes
STRATEGIES = [
    ("random", {"name": "random"}, ["x"], None),
    ("cmaes (popsize 9)", {"name": "cmaes"}, ["x"], None),
    ("optuna tpe", {"name": "optuna", "settings": {"sampler": "tpe"}}, ["x"], None),
    ("optuna tpe, lag 1", {"name": "optuna", "settings": {"sampler": "tpe", "lag": 1}}, ["x"], None),
    ("optuna nsga2 (2 objectives)", {"name": "optuna", "settings": {"sampler": "nsga2"}}, ["x", "y"], None),
    ("optuna nsga2, lag 1", {"name": "optuna", "settings": {"sampler": "nsga2", "lag": 1}}, ["x", "y"], None),
    ("natural_niches", {"name": "natural_niches"}, ["x"], {"kind": "split_point"}),
    ("natural_niches, lag 1", {"name": "natural_niches", "settings": {"lag": 1}}, ["x"], {"kind": "split_point"}),
]


def pico_experiment(folder: Path, fitness: str, executor: dict, budget: int, **fields: Any) -> Path:
    pico = folder / "pico"
    family = {n: pico / n for n in ("base", "expert_1", "expert_2")} if pico.is_dir() else build_pico_family(pico, "llama", 2)
    (folder / "bench_fitness.py").write_text(FITNESS)
    data = {
        "name": f"bench-{fitness}",
        "models": {name: str(path) for name, path in family.items()},
        "base": "base",
        "search_space": str(REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"),
        "strategy": {"name": "random"},
        "fitness": {"python": f"bench_fitness.py:{fitness}"},
        "budget": {"evaluations": budget},
        "executor": {"threads": 1, **executor},
        **{key: value for key, value in fields.items() if value is not None},
    }
    path = folder / f"{fitness}-{executor['kind']}-{executor.get('workers', 1)}-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed_run(path: Path, run_dir: Path) -> float:
    """Seconds from the first result's start to the last result (the search, without start-up)."""
    start_run(path, run_dir=run_dir, progress=False)
    from evomerge.store import RunStore

    with RunStore.open_reader(run_dir) as store:
        results = store.results()
    return max(r.finished for r in results) - min(r.started for r in results)


def utilisation(path: Path, jobs: int, barrier: int | None) -> tuple[float, float]:
    """(busy share, wall seconds) of ``jobs`` random candidates on the experiment's executor."""
    experiment = load_experiment(path)
    space = experiment_space(experiment)
    rng = random.Random(0)
    import numpy as np

    recipes = [space.decode(np.array([rng.random() for _ in range(space.dimension)])) for _ in range(jobs)]
    with build_executor(experiment) as executor:
        busy, pending, done = 0.0, list(enumerate(recipes)), 0
        start = time.perf_counter()
        while done < jobs:
            generation_end = jobs if barrier is None else min(jobs, (done // barrier + 1) * barrier)
            while pending and executor.free_slots > 0 and pending[0][0] < generation_end:
                key, recipe = pending.pop(0)
                executor.submit(Job(key, recipe))
            for outcome in executor.poll(timeout=1.0):
                busy += outcome.timings["total"]
                done += 1
        wall = time.perf_counter() - start
        return busy / (executor.capacity * wall), wall


def busy_share(path: Path, run_dir: Path) -> tuple[float, float]:
    """(busy share of 2 workers, wall seconds) of a whole run: evaluation seconds over 2 × the time
    from the first evaluation's start to the last result."""
    start_run(path, run_dir=run_dir, progress=False)
    from evomerge.store import RunStore

    with RunStore.open_reader(run_dir) as store:
        results = store.results()
    wall = max(r.finished for r in results) - min(r.started for r in results)
    return sum(r.timings["total"] for r in results) / (2 * wall), wall


def reproducible_cost(folder: Path, jobs: int, repeat: int) -> None:
    """Section 5: each strategy steady-state vs reproducible, ``repeat`` times (ranges printed)."""
    print(f"5. reproducible mode, 2 workers, {jobs} candidates, evaluations 1x-4x: busy share steady-state -> "
          "reproducible (wall-time ratio)")
    for label, strategy, objectives, space in STRATEGIES:
        shares: dict[bool, list[float]] = {False: [], True: []}
        walls: dict[bool, list[float]] = {False: [], True: []}
        for i in range(repeat):
            for reproducible in (False, True):
                executor = {"kind": "ray", "workers": 2, "reproducible": reproducible}
                path = pico_experiment(folder, "sleepy", executor, jobs, strategy=strategy, objectives=objectives,
                                       search_space=space)
                share, wall = busy_share(path, folder / f"r-{path.stem}")
                shares[reproducible].append(share)
                walls[reproducible].append(wall)
        ratios = [r / s for r, s in zip(walls[True], walls[False])]
        print(f"   {label:28s} {_span(shares[False], 100, '%')} -> {_span(shares[True], 100, '%')} "
              f"(wall {_span(ratios, 1, 'x', 2)})")


def _span(values: list[float], scale: float, unit: str, digits: int = 0) -> str:
    low, high = min(values) * scale, max(values) * scale
    text = f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}-{high:.{digits}f}"
    return text + unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24, help="candidates of the utilisation test")
    parser.add_argument("--unit", type=float, default=0.2, help="seconds of the shortest evaluation (1x)")
    parser.add_argument("--budget", type=int, default=40, help="candidates of each throughput run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per strategy and mode in section 5")
    parser.add_argument("--only", choices=["reproducible"], help="run only this section")
    args = parser.parse_args()
    os.environ["RAY_BENCH_UNIT"] = str(args.unit)
    print(f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        print(f"1. ray.init (local instance, 2 CPUs): {time.perf_counter() - start:.1f} s")
        if args.only == "reproducible":
            reproducible_cost(folder, args.jobs, args.repeat)
            print(f"   load average {os.getloadavg()[0]:.2f}")
            return

        local = timed_run(pico_experiment(folder, "instant", {"kind": "local"}, 60), folder / "i-local")
        remote = timed_run(pico_experiment(folder, "instant", {"kind": "ray", "workers": 1}, 60), folder / "i-ray")
        print(f"2. dispatch: {1000 * local / 60:.1f} ms per candidate locally, {1000 * remote / 60:.1f} ms through one Ray "
              f"worker: Ray adds {1000 * (remote - local) / 60:.1f} ms per candidate (recipe out, result back, ray.wait)")

        path = pico_experiment(folder, "sleepy", {"kind": "ray", "workers": 2}, args.jobs)
        t0 = time.perf_counter()
        steady, steady_wall = utilisation(path, args.jobs, None)
        barrier, barrier_wall = utilisation(path, args.jobs, 4)
        print(f"   (2 worker actors started and used twice in {time.perf_counter() - t0 - steady_wall - barrier_wall:.1f} s of start-up)")
        print(f"3. utilisation, 2 workers, evaluations {args.unit:g}-{4 * args.unit:g} s: steady-state {100 * steady:.0f} % busy "
              f"({steady_wall:.1f} s), generation barrier of 4 {100 * barrier:.0f} % busy ({barrier_wall:.1f} s): "
              f"wall-time ratio {barrier_wall / steady_wall:.2f}x in favour of steady-state (target ≥ 90 % busy)")
        reproducible_cost(folder, args.jobs, args.repeat)
        ray.shutdown()

        zoo = Path(os.environ.get("EVOMERGE_ZOO", ".cache/zoo"))
        if not (zoo / "zoo.json").is_file():
            print(f"4. skipped: no built zoo at {zoo} (evomerge zoo build, or set EVOMERGE_ZOO)")
            return
        demo = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
        demo["search_space"] = str(REPO / "search_spaces" / "task-arithmetic-per-layer.yaml")
        demo["fitness"]["include_path"] = str(REPO / "fitness")
        demo["heldout"] = None
        demo["budget"] = {"evaluations": args.budget}
        rates = {}
        for label, executor in (("local", {"kind": "local"}), ("ray x1", {"kind": "ray", "workers": 1, "num_cpus": 2}),
                                ("ray x2", {"kind": "ray", "workers": 2, "num_cpus": 2})):
            demo["executor"] = {"device": "cpu", "dtype": "float32", "threads": 1, **executor}
            path = folder / f"demo-{label.replace(' ', '')}.yaml"
            path.write_text(yaml.safe_dump(demo, sort_keys=False))
            run = folder / f"demo-{label.replace(' ', '')}"
            seconds = timed_run(path, run)
            rates[label] = args.budget / seconds * 3600
            print(f"4. {label}: {rates[label]:,.0f} candidates/hour (status says "
                  f"{run_status(run)['throughput']['candidates_per_hour']:,.0f})")
        print(f"   2 vs 1 Ray workers: {rates['ray x2'] / rates['ray x1']:.2f}x; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
