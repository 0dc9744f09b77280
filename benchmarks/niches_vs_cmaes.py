"""Natural niches vs CMA-ES vs a GA vs the ablations on the zoo's multi-skill setting.

Every method gets the same evaluations on the same fitness: the validation examples of the three
skills of ``experiments/niches-demo.yaml`` (addition in A, questions in B, sorting in A). CMA-ES
tunes per-layer task-arithmetic weights of the three experts for the weighted mean; the others
breed blends of the experts (``kind: split_point``):

- ``niches``: M2N2 (competition α = 1, attraction, split point, crossover);
- ``ga``: α = 0 and no attraction (both parents ∝ raw accuracy), as the paper's GA baseline;
- ``no-attraction``, ``no-competition`` (α = 0), ``no-split``: one mechanism off at a time.

Per run: the best candidate's held-out accuracy on each skill (from the run's summary: the best
on the validation mean, scored on the whole test split), the mean *retention* (its accuracy on each
skill ÷ that skill's expert's, averaged), and the *coverage*: the share of validation examples
solved by at least one member of the run's population: the archive for the breeding methods, the
``--top`` best candidates for CMA-ES. The paper claims M2N2 preserves skills CMA-ES loses; the table says whether it does here.

    EVOMERGE_ZOO=.cache/zoo python benchmarks/niches_vs_cmaes.py [--seeds 0,1,2] [--budget 150]
                               [--methods niches,cmaes,ga,no-attraction,no-competition,no-split] [--out runs/niches-bench]

Runs are kept under ``--out`` (a finished run is reused, so the table can be re-made).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.run import start_run  # noqa: E402
from evomerge.status import read_summary, run_status  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "niches-demo.yaml"
SKILLS = {"zoo_add_a": "skill", "zoo_qa_b": "lang", "zoo_sort_a": "sort"}
NICHES = {"archive_size": 12, "alpha": 1.0}
METHODS = {
    "niches": {"name": "natural_niches", "settings": NICHES},
    "cmaes": {"name": "cmaes", "settings": {"sigma0": 0.25}},
    "ga": {"name": "natural_niches", "settings": {**NICHES, "alpha": 0.0, "attraction": False}},
    "no-attraction": {"name": "natural_niches", "settings": {**NICHES, "attraction": False}},
    "no-competition": {"name": "natural_niches", "settings": {**NICHES, "alpha": 0.0}},
    "no-split": {"name": "natural_niches", "settings": {**NICHES, "split_point": False}},
}


def experiment_file(folder: Path, method: str) -> Path:
    """The niches demo with another strategy (CMA-ES: per-layer task arithmetic over a base)."""
    data = yaml.safe_load(DEMO.read_text())
    data["fitness"]["include_path"] = str((DEMO.parent / data["fitness"]["include_path"]).resolve())
    data["strategy"] = METHODS[method]
    if method == "cmaes":
        data["models"] = {"base": "zoo:base", **data["models"]}
        data["base"] = "base"
        data["search_space"] = str(REPO / "search_spaces" / "task-arithmetic-per-layer.yaml")
    path = folder / f"niches-{method}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def measure(run: Path, top: int) -> dict[str, float]:
    summary = read_summary(run)
    rows = {row["label"]: row["objectives"] for row in summary["rows"]}
    best = summary["rows"][0]["objectives"]
    out = {task: best[task] for task in SKILLS}
    out["retention"] = statistics.mean(best[task] / max(rows[expert][task], 1e-9) for task, expert in SKILLS.items())
    archive = run_status(run).get("archive")
    with RunStore.open_reader(run) as store:
        results = [r for r in store.results() if r.ok and r.evaluation.per_example is not None]
    if archive is not None:  # a breeding method's population: its archive
        members = {m["candidate"] for m in archive["members"]}
        kept = [r for r in results if r.ticket in members]
    else:  # CMA-ES keeps no population: its ``top`` best candidates
        kept = sorted(results, key=lambda r: -float(r.evaluation.objectives[0]))[:top]
    out["coverage"] = float(np.stack([r.evaluation.per_example for r in kept]).max(axis=0).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--top", type=int, default=NICHES["archive_size"], help="candidates counted for coverage")
    parser.add_argument("--out", default="runs/niches-bench")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, list[dict[str, float]]] = {}
    for method in args.methods.split(","):
        path = experiment_file(out, method)
        for seed in seeds:
            run = out / f"{method}-{seed}"
            if read_summary(run) is None:
                if (run / "run.sqlite").exists():
                    from evomerge.run import resume_run

                    resume_run(run, progress=False)
                else:
                    start_run(path, run_dir=run, budget=args.budget, seed=seed, progress=False)
            row = measure(run, args.top)
            table.setdefault(method, []).append(row)
            print(f"{method:15s} seed {seed}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    columns = [*SKILLS, "retention", "coverage"]
    print(f"\nmean (min–max) over seeds {seeds}, {args.budget} evaluations each; held-out test of the best candidate:")
    print("| method | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for method, rows in table.items():
        cells = [f"{statistics.mean(r[c] for r in rows):.3f} ({min(r[c] for r in rows):.2f}–{max(r[c] for r in rows):.2f})" for c in columns]
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
