"""Does data-flow merging improve on a parameter-space merge on the zoo? The README's DFS table.

Runs ``experiments/dfs-demo.yaml`` (DFS alone over skill_add_a and lang_qa_b) and
``experiments/ps-dfs.yaml`` (the per-layer PS search, then DFS over its best and lang_qa_b) as they
are, once per seed, with ``evomerge run --seed S --run-dir OUT/<name>-s<S>``, and times each run's
wall time (the issue's bound: 10 minutes each on this machine). A finished run under ``--out`` is
reused (its wall time as measured when it ran); a stopped one is resumed. It then prints the
held-out table every run already computed on the test split (500 questions per task): the base, both
experts, PS best, DFS best and PS→DFS best per task, median and min–max over seeds, each run's best
path (as ``evomerge front`` prints it) and, per seed, whether the DFS stage improved on its PS input.

    EVOMERGE_ZOO=/path/to/zoo nice -n 10 python benchmarks/dfs_table.py [--seeds 0,1,2] \\
        [--out runs/dfs-table] [--json out/dfs_table.json] [--markdown]

The runs must come from the zoo ``$EVOMERGE_ZOO`` names: a run directory built on another zoo is
refused (choose another ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.experiment import zoo_folder  # noqa: E402
from evomerge.inspection.front import path_summary, recipe_summary  # noqa: E402
from evomerge.inspection.run_view import RunView  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = {"dfs-demo": ROOT / "experiments" / "dfs-demo.yaml", "ps-dfs": ROOT / "experiments" / "ps-dfs.yaml"}
TASKS = ("zoo_add_b", "zoo_add_a", "zoo_qa_b")
WALL_FILE = "dfs_table.wall.json"  # written by this script beside each run directory it ran
LIMIT_SECONDS = 600.0


def run_dir_of(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}-s{seed}"


def finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and bool(json.loads(summary.read_text()))


def model_folders(run_dir: Path) -> list[Path]:
    """The folders of the run's source models (a staged run's: its pool's non-promoted models)."""
    if (run_dir / "pool.json").is_file():
        pool = json.loads((run_dir / "pool.json").read_text())["models"]
        return [Path(m["ref"]) for m in pool.values() if m.get("stage") is None]
    experiment = yaml.safe_load((run_dir / "experiment.yaml").read_text())
    return [Path(ref) for ref in experiment["models"].values()]


def check_zoo(run_dir: Path, zoo: Path) -> None:
    foreign = [str(f) for f in model_folders(run_dir) if f.resolve().parent != zoo]
    if foreign:
        raise SystemExit(f"{run_dir}: built on another zoo ({foreign[0]}), not {zoo}; choose another --out")


def check_built(zoo: Path) -> None:
    """Refuses a zoo that is not built from the bundled spec: ``evomerge run`` would build it, and
    a benchmark must not train a zoo as a side effect."""
    from evomerge.zoo.folder import cached_index
    from evomerge.zoo.spec import load_spec, spec_hash

    spec = ROOT / "evomerge" / "zoo" / "default.yaml"
    if cached_index(zoo, spec_hash(load_spec(spec))) is None:
        raise SystemExit(f"{zoo}: no zoo built from {spec}; build it first with `evomerge zoo build --out {zoo}`")


def recorded_seconds(run_dir: Path) -> float:
    """A finished run's own elapsed time (its stages' for a staged run), for runs this script did not time."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("staged"):
        return sum(stage["summary"]["elapsed_seconds"] for stage in summary["stages"])
    return float(summary["elapsed_seconds"])


def run_one(name: str, seed: int, out: Path, zoo: Path) -> float:
    """Runs (or resumes, or reuses) one experiment at one seed; its wall time in seconds."""
    folder = run_dir_of(out, name, seed)
    wall_file = out / f"{folder.name}.{WALL_FILE}"
    if (folder / "experiment.yaml").is_file() or (folder / "pool.json").is_file():
        check_zoo(folder, zoo)
    if finished(folder):
        if wall_file.is_file():
            return float(json.loads(wall_file.read_text())["seconds"])
        return recorded_seconds(folder)
    resume = folder.exists() and any(folder.iterdir())
    command = [sys.executable, "-m", "evomerge.cli"]
    command += ["resume", str(folder)] if resume else ["run", str(EXPERIMENTS[name]), "--seed", str(seed), "--run-dir", str(folder)]
    print(f"{'resuming' if resume else 'running'} {name} seed {seed} → {folder}", flush=True)
    start = time.perf_counter()
    subprocess.run([*command, "--quiet"], check=True, env={**os.environ, "EVOMERGE_ZOO": str(zoo)})
    seconds = time.perf_counter() - start
    previous = json.loads(wall_file.read_text())["seconds"] if wall_file.is_file() else 0.0
    seconds += previous  # a resumed run's earlier part counts too
    wall_file.write_text(json.dumps({"seconds": seconds, "resumed": resume or previous > 0}) + "\n")
    return seconds


def best_of(summary: dict[str, Any]) -> dict[str, float]:
    return next(r["objectives"] for r in summary["rows"] if r["kind"] == "best")


def reference(summary: dict[str, Any], label: str) -> dict[str, float]:
    return next(r["objectives"] for r in summary["rows"] if r["kind"] == "reference" and r["label"] == label)


def best_line(run_dir: Path) -> str:
    """The run's best candidate as ``evomerge front`` writes it, with its validation fitness."""
    view = RunView.load(run_dir)
    ticket = view.summary["best"]["candidate"]
    recipe = view.recipe(ticket)
    line = path_summary(recipe) if recipe.get("kind") == "path" else recipe_summary(recipe)
    return f"#{ticket} (validation {view.summary['best']['objectives']['fitness']:.2f}): {line}"


def collect(out: Path, seed: int, walls: dict[str, float]) -> dict[str, Any]:
    """One seed's held-out rows, wall times and best paths, read from the finished runs."""
    demo = json.loads((run_dir_of(out, "dfs-demo", seed) / "summary.json").read_text())
    staged_dir = run_dir_of(out, "ps-dfs", seed)
    staged = json.loads((staged_dir / "summary.json").read_text())
    stages = {s["name"]: s for s in staged["stages"]}
    ps, dfs = stages["ps"]["summary"], stages["dfs"]["summary"]
    rows = {
        "base": reference(ps, "base"),
        "skill_add_a (expert)": reference(ps, "skill"),
        "lang_qa_b (expert)": reference(ps, "lang"),
        "PS best": best_of(ps),
        "DFS best": best_of(demo),
        "PS→DFS best": best_of(dfs),
    }
    return {
        "seed": seed,
        "rows": {label: {t: values[t] for t in TASKS} for label, values in rows.items()},
        "wall_seconds": walls,
        "stage_seconds": {"ps": ps["elapsed_seconds"], "dfs": dfs["elapsed_seconds"]},
        "best": {
            "DFS best": best_line(run_dir_of(out, "dfs-demo", seed)),
            "PS best": best_line(Path(stages["ps"]["run_dir"])),
            "PS→DFS best": best_line(Path(stages["dfs"]["run_dir"])),
        },
    }


def cell(values: list[float]) -> str:
    values = [100 * v for v in values]
    middle = statistics.median(values)
    return f"{middle:.1f}" if min(values) == max(values) else f"{middle:.1f} ({min(values):.1f}–{max(values):.1f})"


def table(per_seed: list[dict[str, Any]]) -> str:
    labels = list(per_seed[0]["rows"])
    lines = ["| model | " + " | ".join(f"{t}{' (target)' if t == 'zoo_add_b' else ''}" for t in TASKS) + " |",
             "|---|" + "---:|" * len(TASKS)]
    for label in labels:
        cells = [cell([s["rows"][label][t] for s in per_seed]) for t in TASKS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", default="runs/dfs-table", help="folder of the run directories (reused)")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    zoo = zoo_folder(None, ROOT)
    check_built(zoo)
    per_seed = []
    for seed in seeds:
        walls = {name: run_one(name, seed, out, zoo) for name in EXPERIMENTS}
        per_seed.append(collect(out, seed, walls))

    print(f"\nHeld-out exact match % (test split), median (min–max) over seeds {args.seeds}; zoo {zoo}\n")
    print(table(per_seed))
    print("\nWall time per run (s): " + "; ".join(
        f"{name} " + ", ".join(f"{s['wall_seconds'][name]:.0f}" for s in per_seed) for name in EXPERIMENTS
    ) + f" (bound {LIMIT_SECONDS:.0f} s each)")
    slow = [(s["seed"], n) for s in per_seed for n in EXPERIMENTS if s["wall_seconds"][n] > LIMIT_SECONDS]
    print("every run within the bound" if not slow else f"over the bound: {slow}")
    print("\nDoes the DFS stage improve on its PS input (target, held out)?")
    for s in per_seed:
        ps, staged = s["rows"]["PS best"]["zoo_add_b"], s["rows"]["PS→DFS best"]["zoo_add_b"]
        print(f"  seed {s['seed']}: PS {100 * ps:.1f} → PS→DFS {100 * staged:.1f} ({100 * (staged - ps):+.1f})")
    print("\nBest candidates (evomerge front):")
    for s in per_seed:
        for label, line in s["best"].items():
            print(f"  seed {s['seed']} {label}: {line}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"zoo": str(zoo), "seeds": per_seed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
