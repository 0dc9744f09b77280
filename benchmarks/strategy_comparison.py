"""CMA-ES vs random search on the demo experiment, at equal budget, over several seeds.

Runs ``experiments/demo.yaml`` once per (strategy, seed) with only the strategy and the seed
changed, then reads every run store back: the best validation score after 25, 50, 100 … evaluations
(best-so-far curves), and the held-out test score of each run's best candidate (from the run's
summary). Prints per-seed rows and the mean per strategy.

    EVOMERGE_ZOO=.cache/zoo python benchmarks/strategy_comparison.py [--seeds 0,1,2] [--budget 150]
                                                                      [--strategies cmaes,random]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.run import start_run  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"
STRATEGIES = {"cmaes": {"name": "cmaes", "settings": {"sigma0": 0.25}}, "random": {"name": "random"}}


def experiment_file(folder: Path, strategy: str) -> Path:
    """The demo with another strategy, its relative paths made absolute so it can live elsewhere."""
    data = yaml.safe_load(DEMO.read_text())
    data["search_space"] = str((DEMO.parent / data["search_space"]).resolve())
    data["fitness"]["include_path"] = str((DEMO.parent / data["fitness"]["include_path"]).resolve())
    data["strategy"] = STRATEGIES[strategy]
    path = folder / f"demo-{strategy}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def best_so_far(run: Path, marks: list[int]) -> list[float]:
    with RunStore.open_reader(run) as store:
        results = sorted(store.results(), key=lambda r: r.seq)
    best, curve, values = float("-inf"), {}, []
    for n, result in enumerate(results, start=1):
        if result.ok:
            best = max(best, float(result.evaluation.objectives[0]))
        curve[n] = best
    for mark in marks:
        values.append(curve.get(mark, curve[len(results)]))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--strategies", default="cmaes,random")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")
    marks = sorted({m for m in (25, 50, 100, args.budget) if m <= args.budget})
    rows: dict[str, list[tuple[list[float], float]]] = {s: [] for s in strategies}
    with tempfile.TemporaryDirectory(prefix="strategy-comparison-") as tmp:
        for strategy in strategies:
            path = experiment_file(Path(tmp), strategy)
            for seed in seeds:
                run = Path(tmp) / f"{strategy}-{seed}"
                summary = start_run(path, run_dir=run, budget=args.budget, seed=seed, progress=False)
                heldout = summary["rows"][0]["objectives"]["fitness"]
                rows[strategy].append((best_so_far(run, marks), heldout))
                print(f"{strategy:7s} seed {seed}: best-so-far " + " ".join(f"@{m}={v:.3f}" for m, v in zip(marks, rows[strategy][-1][0]))
                      + f"  held-out {heldout:.3f}", flush=True)
    print(f"\nmean over seeds {seeds} (validation best-so-far at {marks}; held-out test of the best):")
    for strategy, runs in rows.items():
        curve = [statistics.mean(r[0][i] for r in runs) for i in range(len(marks))]
        print(f"  {strategy:7s} " + " ".join(f"{v:.3f}" for v in curve) + f"   held-out {statistics.mean(r[1] for r in runs):.3f}")


if __name__ == "__main__":
    main()
