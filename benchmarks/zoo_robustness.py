"""Does "merging matters" survive other CPUs and other zoo seeds? The README's robustness table.

One *build* = one zoo seed × one ATen kernel tier (``ATEN_CPU_CAPABILITY``: ``default``, ``avx2``,
``avx512`` — the float kernels of other CPUs, reproduced on this one). For each build, in a process
running on that tier:

- the zoo of the spec with that seed is built (``--build-kernels portable``, the shipped behaviour:
  pinned kernels, so the three tiers of a seed share one zoo; ``native``: trained on the tier
  itself, so every build has its own experts — the harder test);
- the demo runs as ``bash .ci/demo`` runs it (``experiments/demo.yaml``: CMA-ES per-layer search on
  100 validation questions, best merge scored on the whole test split) against that zoo;
- cross-lingual: the best *global* merge (``zoo_table.py``'s task-arithmetic/TIES grid, selected on
  the 300 validation questions, scored on test);
- multi-skill (``skill_add_a`` + ``lang_qa_b`` + ``sort_a``): the same global grid and a per-layer
  CMA-ES search that maximizes the share of its own accuracy the second-best-kept expert keeps; the
  three-expert trade-off front is the set of non-dominated merges among them (kept shares on test).

Prints, per criterion, min / median / max over the builds and whether every build passes:
the demo's best merge beats the better expert on ``zoo_add_b`` by ≥ 20 points; it beats the best
global merge; some multi-skill merge keeps ≥ 50 % of two experts at once.

    python benchmarks/zoo_robustness.py [--seeds 0,1,2] [--kernels default,avx2,avx512] [--jobs 2]
        [--build-kernels portable|native] [--out .cache/robustness] [--table]

Builds and runs go under ``--out`` (never a user's zoo). Every finished build's raw results are kept
in ``OUT/results.json``, so an interrupted benchmark resumes where it stopped and ``--table`` re-prints
the table without running anything.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

DEMO = REPO / "experiments" / "demo.yaml"
DEFAULT_SPEC = REPO / "evomerge" / "zoo" / "default.yaml"
TIERS = ("default", "avx2", "avx512")


def available_tiers() -> list[str]:
    """The ATen kernel tiers this CPU can run (``default`` always)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    top = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    return list(TIERS[: TIERS.index(top) + 1]) if top in TIERS else ["default"]


def seeded_spec(spec_path: Path, seed: int, build_kernels: str, out: Path) -> Path:
    """The spec with its seed (and kernel mode) replaced, written under ``out``; returns its path."""
    data = yaml.safe_load(spec_path.read_text())
    data["seed"] = seed
    data["kernels"] = build_kernels
    path = out / "specs" / f"{spec_path.stem}-s{seed}-{build_kernels}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def zoo_dir(out: Path, spec: Path, tier: str, build_kernels: str) -> Path:
    return out / "zoos" / (spec.stem if build_kernels == "portable" else f"{spec.stem}-{tier}")


# -- one build: runs in a child process whose ATen kernel tier is the build's --------------------


def build_job(spec: Path, zoo: Path) -> dict:
    """Build (or reuse) one zoo; returns the wall and CPU seconds it took here."""
    from evomerge.zoo.build import build_zoo

    started, cpu = time.perf_counter(), _cpu_seconds()
    index = build_zoo(spec, zoo)
    return {"zoo": str(zoo), "spec_hash": index.spec_hash, "build_seconds": index.build_seconds,
            "wall_seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(_cpu_seconds() - cpu, 1)}


def _cpu_seconds() -> float:
    usage = [os.times()]
    return usage[0].user + usage[0].children_user + usage[0].system + usage[0].children_system


def demo_run(spec: Path, zoo: Path, run_dir: Path, budget: int | None) -> dict:
    """The demo experiment, unchanged but for where its zoo is; returns its summary and timings."""
    from evomerge.driver import start_run

    data = yaml.safe_load(DEMO.read_text())
    data["zoo"] = {"spec": str(spec), "dir": str(zoo)}
    data["search_space"] = str((DEMO.parent / data["search_space"]).resolve())
    data["fitness"]["include_path"] = str((DEMO.parent / data["fitness"]["include_path"]).resolve())
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.experiment.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    started = time.perf_counter()
    summary = start_run(path, run_dir=run_dir, budget=budget, progress=False, overwrite=True)
    rows = {r["label"].split(" (#")[0]: r["objectives"] for r in summary["rows"]}
    return {"rows": rows, "best_candidate": summary["best"]["candidate"], "best_validation": summary["best"]["objectives"],
            "seconds": round(time.perf_counter() - started, 1)}


def global_rows(zoo: Path, setting_name: str) -> list[dict]:
    """``zoo_table``'s sources, global grid and best global merge (selected on validation) of a setting."""
    import zoo_table
    from evomerge.materialize import ResidentMerger
    from evomerge.pool import ModelPool
    from evomerge.zoo.index import ZooIndex

    index = ZooIndex.load(zoo / "zoo.json")
    setting = next(s for s in index.settings if s.name == setting_name)
    zoo_table.use_setting(zoo, setting)
    folders = zoo_table.setting_folders(zoo, index, setting)
    with ModelPool.open(folders, "base") as pool:
        return zoo_table.source_and_global_rows(zoo, index, setting, ResidentMerger.load(pool, device="cpu"), folders, quiet=True)


def multi_skill(zoo: Path, budget: int, seed: int) -> dict:
    """Multi-skill: the global grid plus a per-layer search on the second-best kept share (``kept2``)."""
    import zoo_table
    from evomerge.materialize import ResidentMerger
    from evomerge.pool import ModelPool
    from evomerge.zoo.index import ZooIndex

    index = ZooIndex.load(zoo / "zoo.json")
    setting = next(s for s in index.settings if s.target is None)
    zoo_table.use_setting(zoo, setting)
    folders = zoo_table.setting_folders(zoo, index, setting)
    started = time.perf_counter()
    with ModelPool.open(folders, "base") as pool:
        merger = ResidentMerger.load(pool, device="cpu")
        rows = zoo_table.source_and_global_rows(zoo, index, setting, merger, folders, quiet=True)
        recipe = zoo_table.per_layer_search(zoo, index, setting, budget, seed, zoo_table.SPACE, progress=False)
        rows.append({"label": "best per-layer", "kind": "per-layer", **zoo_table.score_recipe(merger, recipe, setting)})
    own = {t: index.model(e).scores[t]["test"] for e, t in zip(setting.experts, setting.tasks, strict=True)}
    return {"rows": rows, "own": own, "seconds": round(time.perf_counter() - started, 1)}


def evaluate_job(spec: Path, zoo: Path, run_dir: Path, budget: int | None, multi_budget: int) -> dict:
    """Everything measured on one build (in this process's kernel tier)."""
    import torch

    torch.set_num_threads(1)
    demo = demo_run(spec, zoo, run_dir, budget)
    cross = global_rows(zoo, "cross_lingual")
    multi = multi_skill(zoo, multi_budget, seed=0)
    return {"demo": demo, "cross_lingual": cross, "multi_skill": multi}


# -- criteria ---------------------------------------------------------------------------------------


def kept_shares(test: dict[str, float], own: dict[str, float]) -> list[float]:
    """Each expert's share of its own test accuracy that a merge keeps, in %."""
    return [100.0 * test[t] / max(own[t], 1e-9) for t in own]


def front(points: list[list[float]]) -> list[int]:
    """Indices of the non-dominated points (maximizing every coordinate)."""
    def dominated(i: int) -> bool:
        return any(all(q >= p for q, p in zip(points[j], points[i])) and points[j] != points[i] for j in range(len(points)))
    return [i for i in range(len(points)) if not dominated(i)]


def criteria(result: dict) -> dict[str, float]:
    """The numbers the robustness table reports for one build."""
    rows = result["demo"]["rows"]
    target = "zoo_add_b"
    best = rows["best merge"][target] * 100
    experts = max(rows["skill"][target], rows["lang"][target]) * 100
    best_global = next(r for r in result["cross_lingual"] if r["kind"] == "best global")
    multi = result["multi_skill"]
    merges = [r for r in multi["rows"] if r["kind"] in ("global", "per-layer")]
    shares = [kept_shares(r["test"], multi["own"]) for r in merges]
    second = [sorted(s, reverse=True)[1] for s in shares]
    pareto = front(shares)
    return {
        "demo best merge, zoo_add_b": best,
        "better expert, zoo_add_b": experts,
        "margin over better expert": best - experts,
        "best global merge, zoo_add_b": best_global["test"]["add_b"],
        "demo best − best global": best - best_global["test"]["add_b"],
        "demo best merge, zoo_add_a": rows["best merge"]["zoo_add_a"] * 100,
        "demo best merge, zoo_qa_b": rows["best merge"]["zoo_qa_b"] * 100,
        "skill_add_a, zoo_add_a": rows["skill"]["zoo_add_a"] * 100,
        "lang_qa_b, zoo_qa_b": rows["lang"]["zoo_qa_b"] * 100,
        "multi: best pair kept (2nd-best share)": max(second),
        "multi: best three-way kept (min share)": max(min(s) for s in shares),
        "multi: front points keeping ≥ 50 % of two": sum(1 for i in pareto if second[i] >= 50),
        "demo search seconds": result["demo"]["seconds"],
    }


PASS = {
    "margin over better expert": lambda v: v >= 20,
    "demo best − best global": lambda v: v > 0,
    "multi: best pair kept (2nd-best share)": lambda v: v >= 50,
    "multi: front points keeping ≥ 50 % of two": lambda v: v >= 1,
}


def table(results: dict[str, dict]) -> str:
    """Min / median / max over builds of every criterion, and whether all builds pass."""
    per_build = {key: criteria(r) for key, r in sorted(results.items())}
    names = list(next(iter(per_build.values())))
    lines = [f"| over {len(per_build)} builds | min | median | max | every build |", "|---|---|---|---|---|"]
    for name in names:
        values = [c[name] for c in per_build.values()]
        check = PASS.get(name)
        verdict = "" if check is None else ("PASS" if all(check(v) for v in values) else
                                            f"MISS ({sum(not check(v) for v in values)} builds)")
        lines.append(f"| {name} | {min(values):.1f} | {statistics.median(values):.1f} | {max(values):.1f} | {verdict} |")
    lines.append("")
    lines.append("| build | " + " | ".join(names[:5]) + " |")
    lines.append("|---" * 6 + "|")
    for key, c in per_build.items():
        lines.append(f"| {key} | " + " | ".join(f"{c[n]:.1f}" for n in names[:5]) + " |")
    return "\n".join(lines)


# -- orchestration ------------------------------------------------------------------------------------


def _child(args: list[str], tier: str, log: Path) -> dict:
    """Run this script's ``--job`` in a process on ATen kernel tier ``tier``; returns its JSON answer."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": tier}
    answer = log.with_suffix(".json")
    answer.unlink(missing_ok=True)
    with log.open("w") as f:
        done = subprocess.run([sys.executable, __file__, "--job", *args, "--answer", str(answer)],
                              env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed on {tier} (exit {done.returncode}); log: {log}")
    return json.loads(answer.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="zoo seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--kernels", default=None, help="ATen kernel tiers (default: every tier this CPU runs)")
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="zoo spec whose seed is varied")
    parser.add_argument("--build-kernels", choices=("portable", "native"), default="portable",
                        help="portable: pinned builds, one zoo per seed (as shipped); native: each tier trains its own zoo")
    parser.add_argument("--out", default=str(REPO / ".cache" / "robustness"), help="scratch folder for zoos, runs and results")
    parser.add_argument("--budget", type=int, default=None, help="demo evaluations (default: the demo's own)")
    parser.add_argument("--multi-budget", type=int, default=150, help="evaluations of the multi-skill per-layer search")
    parser.add_argument("--jobs", type=int, default=1, help="builds/evaluations at once (1-thread processes)")
    parser.add_argument("--table", action="store_true", help="only print the table of the results recorded so far")
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        kind, *rest = args.job
        answer = build_job(Path(rest[0]), Path(rest[1])) if kind == "build" else evaluate_job(
            Path(rest[0]), Path(rest[1]), Path(rest[2]), None if rest[3] == "-" else int(rest[3]), int(rest[4]))
        Path(args.answer).write_text(json.dumps(answer))
        return

    out = Path(args.out).resolve()
    results_file = out / f"results-{args.build_kernels}.json"
    results: dict[str, dict] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.table:
        print(table(results) if results else f"no results in {results_file}")
        return
    tiers = args.kernels.split(",") if args.kernels else available_tiers()
    seeds = [int(s) for s in args.seeds.split(",")]
    spec_path = Path(args.spec).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cells = [(seed, tier) for seed in seeds for tier in tiers]
    todo = [(s, t) for s, t in cells if f"seed {s} / {t}" not in results]
    print(f"{len(cells)} builds ({len(cells) - len(todo)} done), {args.build_kernels} zoo builds, results in {results_file}", flush=True)

    specs = {s: seeded_spec(spec_path, s, args.build_kernels, out) for s in seeds}
    builds = {}
    for s, t in todo:
        zoo = zoo_dir(out, specs[s], t, args.build_kernels)
        builds.setdefault(zoo, (s, t))
    started = time.perf_counter()
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = {pool.submit(_child, ["build", str(specs[s]), str(zoo)], t, logs / f"build-{zoo.name}.log"): zoo
                   for zoo, (s, t) in builds.items()}
        build_info = {}
        for done in futures.as_completed(pending):
            info = done.result()
            build_info[pending[done]] = info
            print(f"  built {pending[done].name}: {info['build_seconds']:.0f} s "
                  f"({time.perf_counter() - started:.0f} s elapsed)", flush=True)
        jobs = {}
        for s, t in todo:
            zoo = zoo_dir(out, specs[s], t, args.build_kernels)
            run_dir = out / "runs" / f"{zoo.name}-{t}"
            job = ["evaluate", str(specs[s]), str(zoo), str(run_dir), "-" if args.budget is None else str(args.budget), str(args.multi_budget)]
            jobs[pool.submit(_child, job, t, logs / f"evaluate-{zoo.name}-{t}.log")] = (s, t, zoo)
        for done in futures.as_completed(jobs):
            s, t, zoo = jobs[done]
            result = {**done.result(), "seed": s, "kernel": t, "build": build_info.get(zoo)}
            results[f"seed {s} / {t}"] = result
            results_file.write_text(json.dumps(results, indent=1))
            c = criteria(result)
            print(f"  seed {s} / {t}: demo best {c['demo best merge, zoo_add_b']:.1f} vs experts "
                  f"{c['better expert, zoo_add_b']:.1f} vs best global {c['best global merge, zoo_add_b']:.1f}; "
                  f"multi pair kept {c['multi: best pair kept (2nd-best share)']:.0f} % "
                  f"({time.perf_counter() - started:.0f} s elapsed)", flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
