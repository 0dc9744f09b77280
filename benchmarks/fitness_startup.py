"""What a worker's start-up costs, and what looking up lm-eval's built-in tasks adds to it.

Each measurement runs in a fresh Python process (imports and per-process caches count, as in a new
worker), ``--repeats`` times, interleaved between checkouts so load from other processes hits
them alike; the median is printed. Phases:

* ``fitness (zoo)``: ``LmEvalFitness`` for the demo's fitness (zoo tasks from ``fitness/``, found in
  ``include_path``): the path every zoo experiment takes.
* ``worker (demo)``: ``Worker.start`` for ``experiments/demo.yaml`` (pool, resident model, tokenizer,
  fitness); needs the zoo (``$EVOMERGE_ZOO`` or ``.cache/zoo``), skipped without it.
* ``fitness (gsm8k)``: a built-in task by name (lm-eval's index is built, then the task), with
  ``datasets.load_dataset`` answered by a small local dataset (nothing can be downloaded here).

``--before DIR`` also times another checkout of evomerge (e.g. ``git archive main | tar -x -C DIR``)
with the same interpreter, and prints the ratio of the totals (import + build: where lm-eval gets
imported may move between the two).

    python benchmarks/fitness_startup.py [--repeats 5] [--before DIR] [--phases zoo,gsm8k,worker]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRELUDE = """
import os, sys, time, json
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
start = time.perf_counter()
"""

ZOO_FITNESS = PRELUDE + """
from evomerge.fitness import LmEvalFitness
imported = time.perf_counter()
LmEvalFitness({"include_path": "fitness", "limit": 100, "batch_size": 100,
               "tasks": [{"task": "zoo_add_b", "metric": "exact_match"}]})
done = time.perf_counter()
print(json.dumps({"import": imported - start, "build": done - imported}))
"""

WORKER = PRELUDE + """
from evomerge.experiment import load_experiment
from evomerge.runtime import build_executor
imported = time.perf_counter()
executor = build_executor(load_experiment("experiments/demo.yaml"))
done = time.perf_counter()
executor.close()
print(json.dumps({"import": imported - start, "build": done - imported}))
"""

BUILTIN = PRELUDE + """
import datasets
from evomerge.fitness import LmEvalFitness
imported = time.perf_counter()
docs = [{"question": f"{i} plus {i} ?", "answer": f"#### {2 * i}"} for i in range(20)]
datasets.load_dataset = lambda path, name=None, **kw: datasets.DatasetDict(
    {s: datasets.Dataset.from_list(docs) for s in ("train", "test")})
LmEvalFitness({"split": "test", "tasks": [{"task": "gsm8k"}]})
done = time.perf_counter()
print(json.dumps({"import": imported - start, "build": done - imported}))
"""


def measure(code: str, repo: Path) -> dict[str, float] | None:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def zoo_available() -> bool:
    folder = Path(os.environ.get("EVOMERGE_ZOO", REPO / ".cache" / "zoo"))
    return (folder / "zoo.json").is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", type=Path, help="another evomerge checkout to compare with")
    parser.add_argument("--phases", default="zoo,gsm8k,worker")
    args = parser.parse_args()
    chosen = set(args.phases.split(","))
    phases = {"fitness (zoo)": ZOO_FITNESS, "fitness (gsm8k)": BUILTIN, "worker (demo)": WORKER}
    keys = {"fitness (zoo)": "zoo", "fitness (gsm8k)": "gsm8k", "worker (demo)": "worker"}
    phases = {name: code for name, code in phases.items() if keys[name] in chosen}
    if not zoo_available():
        phases.pop("worker (demo)", None)
    checkouts = {"this": REPO, **({"before": args.before.resolve()} if args.before else {})}
    times: dict[tuple[str, str], list[dict[str, float]]] = {}
    for i in range(args.repeats):
        order = list(checkouts.items()) if i % 2 == 0 else list(reversed(checkouts.items()))
        for phase, code in phases.items():
            for label, repo in order:
                result = measure(code, repo)
                if result is not None:
                    times.setdefault((phase, label), []).append(result)
    print(f"median of {args.repeats} fresh processes (seconds): import / build / total")
    for phase in phases:
        cells = []
        for label in checkouts:
            runs = times.get((phase, label))
            if not runs:
                cells.append(f"{label}: n/a")
                continue
            imp = statistics.median(r["import"] for r in runs)
            build = statistics.median(r["build"] for r in runs)
            total = statistics.median(r["import"] + r["build"] for r in runs)
            cells.append(f"{label}: {imp:6.2f} / {build:6.2f} / {total:6.2f}")
        ratio = ""
        if args.before and times.get((phase, "this")) and times.get((phase, "before")):
            this = statistics.median(r["import"] + r["build"] for r in times[(phase, "this")])
            before = statistics.median(r["import"] + r["build"] for r in times[(phase, "before")])
            ratio = f"   total this/before = {this / before:.2f}"
        print(f"{phase:16s} " + "   ".join(cells) + ratio)


if __name__ == "__main__":
    main()
