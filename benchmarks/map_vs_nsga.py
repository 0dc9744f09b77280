"""MAP vs NSGA-II, TPE and random search on the cross-lingual pair, at equal evaluations.

Runs ``experiments/map-demo.yaml`` (global task arithmetic, 2 genes; objectives zoo_add_b and
zoo_qa_b on 100 validation questions each) once per (strategy, seed) with only the strategy and
the seed changed, for the largest budget; smaller budgets are prefixes of those runs (no strategy's
proposals depend on the budget). Every strategy starts from the corners (each expert alone, the
base, the uniform merge: the default for several objectives). Then, per budget:

* **held-out HV**: the run's real front (validation) scored on the whole test split (500 questions
  per task), its hypervolume above (0, 0) — higher is better;
* **R²** of MAP's surrogates fitted on the run's first N results, on the finest grid's validation
  scores (points the search never chose) — per objective;
* **gap** between MAP's predicted front and the real one: 8 points spread along the front the
  surrogates predict, evaluated for real; the mean |predicted − real| per objective and both
  hypervolumes (validation);
* **grid**: the fewest evaluations of nested k×k grids (k = 2, 3, 5, 9, 17) whose real front's
  held-out hypervolume reaches MAP's (mean over seeds).

Run folders and every score are kept in ``--out`` (scores by recipe hash in ``scores.json``), so a
second invocation reuses them.

    EVOMERGE_ZOO=.cache/zoo nice -n 10 python benchmarks/map_vs_nsga.py [--seeds 0,1,2] [--marks 30,60,120]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.experiment import load_experiment, prepare_zoo  # noqa: E402
from evomerge.inspection.pareto import hypervolume, nondominated_ranks  # noqa: E402
from evomerge.recipe import recipe_from_dict, recipe_hash  # noqa: E402
from evomerge.run import start_run  # noqa: E402
from evomerge.run.heldout import run_job  # noqa: E402
from evomerge.run.objectives import Objectives  # noqa: E402
from evomerge.runtime import Job, build_executor  # noqa: E402
from evomerge.search.map_surrogate import fit_surrogates, predict, thin  # noqa: E402
from evomerge.search.nsga import nsga3  # noqa: E402
from evomerge.search.surrogate import r_squared  # noqa: E402
from evomerge.spaces.preview import experiment_space  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "map-demo.yaml"
STRATEGIES: dict[str, dict[str, Any]] = {
    "map": {"name": "map", "settings": {"batch_size": 6}},
    "nsga2": {"name": "optuna", "settings": {"sampler": "nsga2", "sampler_settings": {"population_size": 12}}},
    "tpe": {"name": "optuna", "settings": {"sampler": "tpe", "sampler_settings": {"n_startup_trials": 12}}},
    "random": {"name": "random"},
}
ORIGIN = np.zeros(2)
VERIFIED = 8


def experiment_file(folder: Path, strategy: str | None) -> Path:
    """The demo with another strategy (None: as it is), its relative paths made absolute."""
    data = yaml.safe_load(DEMO.read_text())
    data["search_space"] = str((DEMO.parent / data["search_space"]).resolve())
    data["fitness"]["include_path"] = str((DEMO.parent / data["fitness"]["include_path"]).resolve())
    if strategy is not None:
        data["strategy"] = STRATEGIES[strategy]
        data.pop("heldout")  # the runs' own summaries stay on validation: this script scores fronts itself
    path = folder / f"map-demo-{strategy or 'scorer'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Scorer:
    """Validation and held-out scores of recipes, cached by recipe hash in a JSON file."""

    def __init__(self, folder: Path) -> None:
        self.experiment = load_experiment(experiment_file(folder, None))
        self.space = experiment_space(self.experiment)
        self.objectives = Objectives(self.experiment.objectives)
        self.executor = build_executor(self.experiment)
        self.path = folder / "scores.json"
        self.cache: dict[str, list[float] | None] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def score(self, recipe: dict[str, Any], split: str) -> np.ndarray | None:
        digest = f"{split}:{recipe_hash(json.dumps(recipe, sort_keys=True))}"
        if digest not in self.cache:
            outcome = run_job(self.executor, Job(digest, recipe_from_dict(recipe), split))
            evaluation, _ = self.objectives.evaluation(0, outcome)
            self.cache[digest] = None if evaluation.failed else evaluation.objectives.tolist()
            self.path.write_text(json.dumps(self.cache))
        value = self.cache[digest]
        return None if value is None else np.array(value)

    def genome(self, genome: np.ndarray, split: str) -> np.ndarray | None:
        return self.score(json.loads(self.space.decode(genome).model_dump_json()), split)

    def heldout_hv(self, recipes: list[dict[str, Any]], values: np.ndarray) -> float:
        """Hypervolume on the test split of the validation front among ``recipes``."""
        front = [r for r, rank in zip(recipes, nondominated_ranks(values)) if rank == 0]
        scores = [s for s in (self.score(r, "test") for r in front) if s is not None]
        return hypervolume(np.array(scores), ORIGIN) if scores else 0.0


def run_records(run: Path) -> list[tuple[np.ndarray, dict[str, Any], np.ndarray]]:
    """(genome, recipe, validation objectives) of the run's successful results, in result order."""
    with RunStore.open_reader(run) as store:
        candidates = {c.ticket: c for c in store.candidates()}
        results = sorted(store.results(), key=lambda r: r.seq)
    return [(candidates[r.ticket].proposal.genome, candidates[r.ticket].recipe, r.evaluation.objectives)
            for r in results if r.ok]


def prefix(records: list, n: int, total: list) -> list:
    """The successful records among the first ``n`` results (failures count against the budget)."""
    return records[: sum(1 for ok in total[:n] if ok)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--marks", default="30,60,120")
    parser.add_argument("--grid", default="2,3,5,9,17", help="grid sizes k (k×k evaluations), nested when k = 2^j + 1")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", default="runs/map-bench")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    marks = [int(m) for m in args.marks.split(",")]
    strategies = args.strategies.split(",")
    grid_sizes = [int(k) for k in args.grid.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare_zoo(DEMO)

    runs: dict[tuple[str, int], Path] = {}
    for strategy in strategies:
        path = experiment_file(out, strategy)
        for seed in seeds:
            run = out / f"{strategy}-{seed}"
            if not (run / "summary.json").exists():
                start_run(path, run_dir=run, budget=max(marks), seed=seed, progress=False, overwrite=True)
            done = json.loads((run / "summary.json").read_text())["evaluations"]
            if done < max(marks):  # a shorter earlier run would repeat its last front at the larger marks
                sys.exit(f"error: {run}: an earlier run of {done} evaluations, fewer than the largest mark "
                         f"{max(marks)}; choose another --out")
            runs[strategy, seed] = run
            print(f"ran {strategy} seed {seed}", flush=True)

    scorer = Scorer(out)
    try:
        names = scorer.objectives.names
        grid: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        for k in grid_sizes:
            axis = np.linspace(0.0, 1.0, k)
            genomes = np.array([[a, b] for a in axis for b in axis])
            recipes = [json.loads(scorer.space.decode(g).model_dump_json()) for g in genomes]
            values = np.array([scorer.score(r, "validation") for r in recipes])
            grid[k] = (genomes, values, scorer.heldout_hv(recipes, values))
            print(f"grid {k}x{k}: held-out HV {grid[k][2]:.4f}", flush=True)
        truth_x, truth_y, _ = grid[max(grid_sizes)]

        table: dict[tuple[str, int], list[float]] = {}
        surrogate: dict[int, list[dict[str, Any]]] = {m: [] for m in marks}
        for (strategy, seed), run in runs.items():
            records = run_records(run)
            with RunStore.open_reader(run) as store:
                oks = [r.ok for r in sorted(store.results(), key=lambda r: r.seq)]
            for mark in marks:
                part = prefix(records, mark, oks)
                values = np.array([v for _, _, v in part])
                table.setdefault((strategy, mark), []).append(scorer.heldout_hv([r for _, r, _ in part], values))
                if strategy == "map":
                    surrogate[mark].append(surrogate_quality(scorer, part, truth_x, truth_y, seed))
        report(table, surrogate, grid, strategies, marks, seeds, names)
    finally:
        scorer.executor.close()


def surrogate_quality(scorer: Scorer, part: list, truth_x: np.ndarray, truth_y: np.ndarray, seed: int) -> dict[str, Any]:
    """R² on the grid and the predicted-vs-real gap of MAP's surrogates fitted on ``part``."""
    x = np.array([g for g, _, _ in part])
    y = np.array([v for _, _, v in part])
    models = fit_surrogates(x, y)
    r2 = [r_squared(truth_y[:, k], predict(models, truth_x)[:, k]) for k in range(y.shape[1])]
    front_x, front_y = nsga3(lambda p: predict(models, p), x.shape[1], y.shape[1], np.random.default_rng(seed))
    chosen = thin(np.arange(len(front_x)), VERIFIED)
    real = np.array([scorer.genome(front_x[i], "validation") for i in chosen])
    error = np.abs(real - front_y[chosen]).mean(axis=0)
    return {"r2": r2, "error": error.tolist(), "hv_predicted": hypervolume(front_y[chosen], ORIGIN),
            "hv_real": hypervolume(real, ORIGIN)}


def _stat(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def report(table, surrogate, grid, strategies, marks, seeds, names) -> None:
    print(f"\nheld-out hypervolume of the real front (test split, above (0, 0)), mean ± std over seeds {seeds}:")
    print("| strategy | " + " | ".join(f"{m} evals" for m in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for strategy in strategies:
        print(f"| {strategy} | " + " | ".join(_stat(table[strategy, m]) for m in marks) + " |")
    if "map" in strategies:
        print("\nMAP's surrogates (fitted on the run's first N results):")
        print(f"| evals | R² {names[0]} | R² {names[1]} | |pred − real| {names[0]} | |pred − real| {names[1]} "
              "| HV predicted | HV real | grid evals to match MAP's held-out HV |")
        print("|---|---|---|---|---|---|---|---|")
        for m in marks:
            rows = surrogate[m]
            target = statistics.mean(table["map", m])
            enough = [k * k for k, (_, _, hv) in sorted(grid.items()) if hv >= target]
            needed = str(enough[0]) if enough else f"> {max(grid) ** 2}"
            print(f"| {m} | " + " | ".join(_stat([r["r2"][k] for r in rows]) for k in range(2)) + " | "
                  + " | ".join(_stat([r["error"][k] for r in rows]) for k in range(2)) + " | "
                  + f"{_stat([r['hv_predicted'] for r in rows])} | {_stat([r['hv_real'] for r in rows])} | {needed} |")
    print("\ngrid (k×k evaluations): held-out HV " + ", ".join(f"{k * k}: {hv:.4f}" for k, (_, _, hv) in sorted(grid.items())))


if __name__ == "__main__":
    main()
