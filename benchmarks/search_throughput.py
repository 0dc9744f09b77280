"""Search throughput of the real loop: candidates per hour, merge + evaluation + bookkeeping.

Builds a family of random-init Llamas shaped like the tiny zoo (hidden 128, 4 layers, vocabulary
``--vocab-size``: about 1 M parameters; two experts perturbed from the base), writes a
generate_until task of ``--examples`` arithmetic prompts, and runs ``evomerge.driver.start_run``
on an experiment: per-layer task arithmetic, CMA-ES, the lm-eval fitness, the local executor,
``--budget`` candidates. Everything is read back from the run store afterwards:

* candidates/hour over the search (first candidate started → last result stored), the number
  ``evomerge status`` shows, and its ratio to the 6,000/hour target (> 1 meets it);
* per candidate: the in-place merge, the lm-eval evaluation, and the driver's own share (the
  rest: ask, decode, store writes, cache lookup, tell, checkpoints, progress).

    python benchmarks/search_throughput.py [--budget 60] [--examples 200] [--threads N] [--strategy cmaes]
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

from evomerge.driver import start_run  # noqa: E402
from evomerge.store import RunStore  # noqa: E402
from evomerge.zoo.pico import build_pico  # noqa: E402

TARGET = 6000.0
SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "task-arithmetic-per-layer.yaml"


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
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the worker")
    parser.add_argument("--strategy", default="cmaes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_family(root / "models", args.vocab_size)
        (root / "task").mkdir()
        write_task(root / "task", args.examples, args.max_gen_toks)
        experiment = {
            "name": "throughput",
            "models": {"base": models["base"], "a": models["expert_1"], "b": models["expert_2"]},
            "base": "base",
            "search_space": str(SPACE),
            "strategy": {"name": args.strategy},
            "fitness": {"include_path": str(root / "task"), "tasks": [{"task": "bench_add"}], "batch_size": args.batch_size},
            "budget": {"evaluations": args.budget},
            "executor": {"kind": "local", "device": "cpu", "threads": args.threads},
            "checkpoint_every": 10,
        }
        path = root / "experiment.yaml"
        path.write_text(yaml.safe_dump(experiment, sort_keys=False))
        start = time.perf_counter()
        start_run(path, run_dir=root / "run", progress=False)
        wall = time.perf_counter() - start
        with RunStore.open_reader(root / "run") as store:
            results = store.results()
            params = store.metadata["dimension"]
        first = store_first_started(root / "run")

    search = results[-1].finished - first
    n = len(results)
    per_candidate = search / n
    merge = statistics.mean(r.timings["merge"] for r in results if "merge" in r.timings)
    evaluate = statistics.mean(r.timings["evaluate"] for r in results if "evaluate" in r.timings)
    rate = n / search * 3600.0
    print(f"models: Llama, hidden 128, 4 layers, vocab {args.vocab_size} (~1 M params); space: {params} genes; "
          f"fitness: {args.examples} generate_until examples (≤ {args.max_gen_toks} new tokens), batch {args.batch_size}")
    print(f"strategy {args.strategy}, {n} candidates ({sum(not r.ok for r in results)} failed); whole command {wall:.1f} s")
    print(f"per candidate:          {per_candidate * 1000:8.1f} ms")
    print(f"  in-place merge:       {merge * 1000:8.1f} ms")
    print(f"  lm-eval evaluation:   {evaluate * 1000:8.1f} ms")
    print(f"  driver (the rest):    {(per_candidate - merge - evaluate) * 1000:8.1f} ms")
    print(f"throughput: {rate:,.0f} candidates/hour; target {TARGET:,.0f}: ratio {rate / TARGET:.2f} "
          f"({'met' if rate >= TARGET else 'missed'})")


def store_first_started(run: Path) -> float:
    """When the first candidate started (its dispatch), i.e. the end of the one-time set-up."""
    with RunStore.open_reader(run) as store:
        return min(r.started for r in store.results() if r.started is not None)


if __name__ == "__main__":
    main()
