"""Racing on the demo: examples scored to reach the unraced run's quality, on validation and held out.

Runs ``experiments/demo.yaml`` (CMA-ES, 100 validation questions) per seed twice: as it is for
``--budget`` candidates (150: 15,000 examples scored), and with ``fitness.racing`` on (``--chunk``,
``--confidence``) for twice as many candidates. Each run's store is read back: every result's
examples scored (a stopped candidate's ``estimate.examples``, else all 100; a cache hit none), its
finish time, and the best complete validation score so far. Per seed it prints

* the held-out (test split) score of the best candidate each run had found after E/2 and E examples
  scored (E: the unraced run's total): the criterion is racing at E/2 vs the unraced run at E;
* examples scored and wall time to first reach the unraced run's final best validation score (the
  unraced run itself: when it first got there);
* how many candidates racing stopped early.

Held-out scores of intermediate bests are computed (and stored) with ``evomerge evaluate``'s code.

    EVOMERGE_ZOO=.cache/zoo python benchmarks/racing.py [--seeds 0,1,2] [--budget 150] [--chunk 25]
                                                        [--confidence 0.95] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.inspection.evaluate import evaluate_candidates  # noqa: E402
from evomerge.run import start_run  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"


@dataclass
class Run:
    """What one run cost and reached, result by result."""

    folder: Path
    tickets: list[int]
    examples: list[int]  # examples scored per result
    finished: list[float]  # seconds since the run started
    best: list[tuple[float, int]]  # best complete validation score so far and its candidate
    stopped: int

    def to_reach(self, target: float) -> tuple[int, float] | None:
        """(examples scored, seconds) when the best complete score first reached ``target``."""
        for i, (value, _) in enumerate(self.best):
            if value >= target - 1e-12:
                return sum(self.examples[: i + 1]), self.finished[i]
        return None

    def best_within(self, examples: int) -> int:
        """The best complete candidate found within the first ``examples`` examples scored."""
        spent, ticket = 0, self.best[0][1]
        for scored, (_, best) in zip(self.examples, self.best):
            spent += scored
            if spent > examples:
                break
            ticket = best
        return ticket

    @property
    def final_best(self) -> float:
        return self.best[-1][0]


def experiment_file(folder: Path, racing: dict | None) -> Path:
    """The demo, its relative paths made absolute, with ``racing`` set."""
    data = yaml.safe_load(DEMO.read_text())
    data["search_space"] = str((DEMO.parent / data["search_space"]).resolve())
    data["fitness"]["include_path"] = str((DEMO.parent / data["fitness"]["include_path"]).resolve())
    if racing is not None:
        data["fitness"]["racing"] = racing
    path = folder / f"demo-{'raced' if racing else 'full'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_run(folder: Path, started: float) -> Run:
    with RunStore.open_reader(folder) as store:
        results = sorted(store.results(), key=lambda r: r.seq)
    full = next(len(r.evaluation.per_example) for r in results if r.complete and r.evaluation.per_example is not None)
    run = Run(folder, [], [], [], [], sum(r.estimate is not None for r in results))
    current = (float("-inf"), -1)
    for record in results:
        run.tickets.append(record.ticket)
        run.examples.append(0 if record.cached_from is not None else record.estimate.examples if record.estimate else full)
        run.finished.append(record.finished - started)
        if record.complete and float(record.evaluation.objectives[0]) > current[0]:
            current = (float(record.evaluation.objectives[0]), record.ticket)
        run.best.append(current)
    return run


def heldout(run: Run, ticket: int) -> float:
    return evaluate_candidates(run.folder, candidates=[ticket])[ticket]["fitness"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=150, help="candidates of the unraced run (racing gets twice as many)")
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    racing = {"chunk": args.chunk, "confidence": args.confidence}
    out = args.out or Path(tempfile.mkdtemp(prefix="racing-"))
    out.mkdir(parents=True, exist_ok=True)
    files = {"full": experiment_file(out, None), "raced": experiment_file(out, racing)}
    budgets = {"full": args.budget, "raced": 2 * args.budget}
    print(HEADER, flush=True)
    rows = []
    for seed in seeds:
        runs: dict[str, Run] = {}
        for kind in ("full", "raced") if seed % 2 == 0 else ("raced", "full"):  # alternate who runs first
            folder = out / f"{kind}-{seed}"
            started = time.time()
            start_run(files[kind], run_dir=folder, budget=budgets[kind], seed=seed, progress=False, overwrite=True)
            runs[kind] = read_run(folder, started)
        full, raced = runs["full"], runs["raced"]
        total = sum(full.examples)
        row = {
            "seed": seed,
            "E": total,
            "full@E/2": heldout(full, full.best_within(total // 2)),
            "full@E": heldout(full, full.best_within(total)),
            "raced@E/2": heldout(raced, raced.best_within(total // 2)),
            "raced@E": heldout(raced, raced.best_within(total)),
            "full_to_best": full.to_reach(full.final_best),
            "raced_to_best": raced.to_reach(full.final_best),
            "stopped": f"{raced.stopped}/{len(raced.examples)}",
            "raced_examples": sum(raced.examples),
        }
        rows.append(row)
        print(format_row(row), flush=True)
    print(f"\nracing {racing}, {len(seeds)} seeds; unraced {args.budget} candidates, raced {2 * args.budget}; runs in {out}")
    for key in ("full@E/2", "full@E", "raced@E/2", "raced@E"):
        print(f"median held-out of the best, {key:9s}: {statistics.median(r[key] for r in rows):.3f}")
    reach = [r["full_to_best"][0] / r["raced_to_best"][0] for r in rows if r["raced_to_best"]]
    if reach:
        print(f"median examples ratio (unraced / raced) to reach the unraced run's final best: "
              f"{statistics.median(reach):.2f}x ({len(reach)} of {len(rows)} raced runs reached it)")
    else:
        print("no raced run reached the unraced run's final best validation score")


HEADER = (
    "| seed | held-out of the best at E/2 / E examples: unraced | raced | to reach the unraced best: unraced | raced "
    "| raced: stopped | raced: examples |\n|---|---|---|---|---|---|---|"
)


def format_row(row: dict) -> str:
    def reach(value: tuple[int, float] | None) -> str:
        return "not reached" if value is None else f"{value[0]:,} ex, {value[1]:.0f} s"

    return (
        f"| {row['seed']} | {row['full@E/2']:.3f} / {row['full@E']:.3f} | {row['raced@E/2']:.3f} / {row['raced@E']:.3f} "
        f"| {reach(row['full_to_best'])} | {reach(row['raced_to_best'])} | {row['stopped']} | {row['raced_examples']:,} |"
    )


if __name__ == "__main__":
    main()
