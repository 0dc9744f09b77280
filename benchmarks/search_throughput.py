"""Search throughput of the real loop: candidates per hour, merge + evaluation + bookkeeping.

Builds a family of random-init Llamas shaped like the tiny zoo (hidden 128, 4 layers, vocabulary
``--vocab-size``: about 1 M parameters; two experts perturbed from the base), writes a
generate_until task of ``--examples`` arithmetic prompts, and runs ``evomerge.run.start_run``
on an experiment: per-layer task arithmetic, CMA-ES, the lm-eval fitness, the local executor,
``--budget`` candidates. Everything is read back from the run store afterwards:

* candidates/hour over the search (first candidate started → last result stored), the number
  ``evomerge status`` shows, and its ratio to the 6,000/hour target (> 1 meets it);
* per candidate: the in-place merge, the lm-eval evaluation, and the driver's own share (the
  rest: ask, decode, store writes, cache lookup, tell, checkpoints, progress).

``--overhead`` measures the driver's share where it is largest: a 968-gene space (ties per layer ×
module kind over 4 experts of a 40-layer pico Llama), a callable fitness that returns at once with
200 per-example scores, against the 5 ms per candidate target (the store alone, on a store that
already holds 10,000 candidates, is timed by ``benchmarks/driver_overhead.py``).

    python benchmarks/search_throughput.py [--budget 60] [--examples 200] [--threads 1] [--strategy cmaes]
    python benchmarks/search_throughput.py --overhead [--budget 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import yaml  # noqa: E402

from evomerge.experiment import Experiment, load_experiment  # noqa: E402
from evomerge.run import start_run  # noqa: E402
from evomerge.spaces import PoolInfo, build_space  # noqa: E402
from evomerge.store import RunStore  # noqa: E402
from evomerge.zoo.pico import build_pico  # noqa: E402

TARGET = 6000.0
TARGET_OVERHEAD_MS = 5.0
SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
INSTANT_FITNESS = """
def score(model, tokenizer):
    return {"score": 0.5}, {"score": [1.0, 0.0] * 100}
"""


def build_family(root: Path, vocab_size: int) -> dict[str, str]:
    shape = dict(arch="llama", hidden=128, layers=4, vocab_size=vocab_size)
    base = build_pico(root / "base", seed=0, **shape)
    models = {"base": str(base)}
    for k in (1, 2):
        models[f"expert_{k}"] = str(build_pico(root / f"expert_{k}", seed=k, perturb_from=base, perturb_scale=0.1, **shape))
    return models


def write_task(folder: Path, examples: int, max_gen_toks: int) -> None:
    rng = random.Random(0)
    with open(folder / "bench.jsonl", "w") as f:
        for _ in range(examples):
            a, b = rng.randrange(10), rng.randrange(10)
            f.write(json.dumps({"question": f"what is {a} plus {b} ? the answer is", "answer": str(a + b)}) + "\n")
    task = {
        "task": "bench_add",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(folder / "bench.jsonl")}},
        "validation_split": "validation",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["?"], "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / "bench.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=60, help="candidates to evaluate")
    parser.add_argument("--examples", type=int, default=200, help="generate_until examples in the fitness")
    parser.add_argument("--max-gen-toks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads of the worker (default 1: with 2 on this 2-core machine and another job "
        "running, evaluation measured 15x slower)",
    )
    parser.add_argument("--strategy", default="cmaes")
    parser.add_argument("--overhead", action="store_true", help="the driver's share on a 968-gene space")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        experiment = overhead_experiment(root) if args.overhead else throughput_experiment(root, args)
        experiment.update(
            name="throughput",
            strategy={"name": args.strategy},
            budget={"evaluations": args.budget},
            executor={"kind": "local", "device": "cpu", "threads": args.threads},
            checkpoint_every=10,
        )
        path = root / "experiment.yaml"
        path.write_text(yaml.safe_dump(experiment, sort_keys=False))
        start = time.perf_counter()
        start_run(path, run_dir=root / "run", progress=False)
        wall = time.perf_counter() - start
        with RunStore.open_reader(root / "run") as store:
            results = store.results()
            genes = store.metadata["dimension"]
            genomes = [c.proposal.genome for c in store.candidates()]
        decode = decode_seconds(load_experiment(path, run_dir=root / "run"), genomes)

    n = len(results)
    search = results[-1].finished - min(r.started for r in results if r.started is not None)
    per_candidate = search / n
    merge = statistics.mean(r.timings["merge"] for r in results)
    evaluate = statistics.mean(r.timings["evaluate"] for r in results)
    worker = statistics.mean(r.timings["total"] for r in results)
    driver = per_candidate - worker
    rate = n / search * 3600.0
    if args.overhead:
        print(f"space: {genes} genes (ties per layer x module kind, 4 experts, 40 layers); instant callable fitness "
              f"with 200 per-example scores; strategy {args.strategy}")
    else:
        print(f"models: Llama, hidden 128, 4 layers, vocab {args.vocab_size} (~1 M params); space: {genes} genes; "
              f"fitness: {args.examples} generate_until examples (<= {args.max_gen_toks} new tokens), "
              f"batch {args.batch_size}; strategy {args.strategy}")
    print(f"{n} candidates ({sum(not r.ok for r in results)} failed); whole command {wall:.1f} s "
          f"(set-up {wall - search:.1f} s)")
    print(f"per candidate:          {per_candidate * 1000:8.1f} ms")
    print(f"  in-place merge:       {merge * 1000:8.1f} ms")
    print(f"  evaluation:           {evaluate * 1000:8.1f} ms")
    print(f"  driver (the rest):    {driver * 1000:8.1f} ms   (target <= {TARGET_OVERHEAD_MS:.0f} ms: "
          f"ratio {driver * 1000 / TARGET_OVERHEAD_MS:.2f})")
    print(f"    of it, the space's decode: {decode * 1000:5.1f} ms; the rest (ask, store, cache, tell, checkpoints): "
          f"{(driver - decode) * 1000:.1f} ms (ratio {(driver - decode) * 1000 / TARGET_OVERHEAD_MS:.2f})")
    if not args.overhead:
        print(f"throughput: {rate:,.0f} candidates/hour; target {TARGET:,.0f}: ratio {rate / TARGET:.2f} "
              f"({'met' if rate >= TARGET else 'missed'})")


def decode_seconds(experiment: Experiment, genomes: list) -> float:
    """Mean seconds to decode a genome and serialize its recipe (the space's share of the driver's time)."""
    from evomerge.pool import ModelPool

    with ModelPool.open(experiment.models, experiment.base) as pool:
        info = PoolInfo(experiment.models, experiment.base, pool.layer_map.num_layers)
    space = build_space(experiment.search_space, info)
    start = time.perf_counter()
    for genome in genomes:
        space.decode(genome).model_dump_json()
    return (time.perf_counter() - start) / len(genomes)


def throughput_experiment(root: Path, args: argparse.Namespace) -> dict:
    models = build_family(root / "models", args.vocab_size)
    (root / "task").mkdir()
    write_task(root / "task", args.examples, args.max_gen_toks)
    return {
        "models": {"base": models["base"], "a": models["expert_1"], "b": models["expert_2"]},
        "base": "base",
        "search_space": str(SPACES / "task-arithmetic-per-layer.yaml"),
        "fitness": {"include_path": str(root / "task"), "tasks": [{"task": "bench_add"}], "batch_size": args.batch_size},
    }


def overhead_experiment(root: Path) -> dict:
    shape = dict(arch="llama", hidden=16, layers=40, vocab_size=64)
    base = build_pico(root / "models" / "base", seed=0, **shape)
    models = {"base": str(base)}
    for k in range(1, 5):
        models[f"expert_{k}"] = str(build_pico(root / "models" / f"expert_{k}", seed=k, perturb_from=base, **shape))
    (root / "fitness.py").write_text(INSTANT_FITNESS)
    return {
        "models": models,
        "base": "base",
        "search_space": str(SPACES / "ties-per-layer.yaml"),
        "fitness": {"python": str(root / "fitness.py") + ":score"},
    }


if __name__ == "__main__":
    main()
