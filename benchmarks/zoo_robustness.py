"""Does the demo's "merging matters" survive other zoo seeds and other CPUs? The README's robustness table.

One *build* = one zoo seed × one search-time ATen kernel tier (``ATEN_CPU_CAPABILITY``: ``default``,
``avx2``, ``avx512`` — other CPUs' float kernels, reproduced on this one). Zoo weights do not depend
on the tier (portable builds train on pinned kernels, ``tests/test_zoo.py``), so a seed's zoo is
built once; what the tier changes is the search: every candidate's forward pass, hence the scores
CMA-ES sees and the merge it keeps. For each build, in a process on that tier, the demo runs as
``bash .ci/demo`` runs it (``experiments/demo.yaml`` unchanged — CMA-ES, per-layer task arithmetic,
100 validation questions, 150 evaluations — but for its zoo), and so does the same search over
global weights (``search_spaces/task-arithmetic-global.yaml``: one weight per expert), the best
global merge the per-layer search has to beat; both held-out tables are recorded.

Per seed (``--multi``, on the CPU's own tier): the multi-skill setting (``skill_add_a`` + ``lang_qa_b``
+ ``sort_a``) — ``zoo_table.py``'s global grid, a per-layer CMA-ES search on ``kept2`` (the share of
its own accuracy the second-best-kept expert keeps) over the three experts and one over each pair,
selected on 100 validation questions per task (``--multi-limit``), scored on test — whether some
merge keeps ≥ 50 % of two experts at once, and the three-expert front of all those merges (a point
is useful if it keeps ≥ 50 % of two experts or ≥ 25 % of all three). ``--skip-demo --multi`` runs
only that, e.g. in a second process with its own ``--out`` beside a demo run.

    EVOMERGE_ZOO=.cache/zoo python benchmarks/zoo_robustness.py [--seeds 0,1,2] [--kernels avx512,default,avx2]
        [--zoo 1=/work/zoo/seed1 ...] [--multi [--skip-demo]] [--out .cache/robustness] [--table]

Seed 0's zoo is ``$EVOMERGE_ZOO`` (else ``.cache/zoo``); seed N's is ``OUT/zoos/seedN`` unless
``--zoo N=DIR`` names it. A missing zoo is built (portable, ``--spec`` with that seed); an
existing zoo of another spec is an error — this script never rebuilds a zoo. Builds run in the
order given: every seed on the first tier, then the other tiers. Each finished build is kept in
``OUT/robustness.json``, so an interrupted benchmark resumes where it stopped, and ``--table``
re-prints the table without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
GLOBAL_SPACE = REPO / "search_spaces" / "task-arithmetic-global.yaml"
DEFAULT_SPEC = REPO / "evomerge" / "zoo" / "default.yaml"
TIERS = ("default", "avx2", "avx512")
TASKS = ("zoo_add_b", "zoo_add_a", "zoo_qa_b")
MODELS = {"best merge": "best merge", "skill": "skill_add_a", "lang": "lang_qa_b"}
MARGIN = 20.0


def top_tier() -> str:
    """The fastest ATen kernel tier of this CPU (what torch picks when nothing is pinned)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def seeded_spec(spec: Path, seed: int, out: Path) -> Path:
    """``spec`` with its seed replaced, written under ``out`` (its own seed: ``spec`` itself)."""
    data = yaml.safe_load(spec.read_text())
    if data.get("seed", 0) == seed:
        return spec
    data["seed"] = seed
    path = out / "specs" / f"{spec.stem}-seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ready_zoo(spec: Path, zoo: Path, log: Path) -> dict | None:
    """Use ``zoo`` if it holds ``spec``'s zoo; build it into a missing or empty folder (returns the
    build's wall and CPU seconds); refuse a zoo of another spec or a folder with a build under way."""
    from evomerge.zoo.folder import BUILD_MARKER
    from evomerge.zoo.index import ZooIndex
    from evomerge.zoo.spec import load_spec, spec_hash

    key = spec_hash(load_spec(spec))
    if (zoo / BUILD_MARKER).exists():
        sys.exit(f"error: {zoo}: a zoo build is under way or was interrupted ({BUILD_MARKER}); "
                 f"finish it with `evomerge zoo build --spec {spec} --out {zoo}`")
    if (zoo / "zoo.json").is_file():
        found = ZooIndex.load(zoo / "zoo.json").spec_hash
        if found != key:
            sys.exit(f"error: {zoo}: a zoo of another spec ({found}, want {key} of {spec}); "
                     "point --zoo at the right folder (this script never rebuilds a zoo)")
        return None
    if zoo.exists() and any(zoo.iterdir()):
        sys.exit(f"error: {zoo}: no zoo.json but not empty (a build under way or interrupted?); "
                 f"finish it with `evomerge zoo build --spec {spec} --out {zoo}`")
    print(f"  building {zoo} from {spec} (log: {log})", flush=True)
    started, cpu = time.perf_counter(), _children_cpu()
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", "--spec", str(spec), "--out", str(zoo)],
                              stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"error: zoo build of {spec} into {zoo} failed (exit {done.returncode}); log: {log}")
    return {"wall_seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(_children_cpu() - cpu, 1)}


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (and theirs: the portable build's pinned process)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- jobs: each runs in a child process whose ATen kernel tier is the build's -------------------------


def demo_job(spec: Path, zoo: Path, run_dir: Path, space: Path | None = None) -> dict:
    """The demo experiment, unchanged but for its zoo (and, for the global baseline, its search space);
    its held-out rows (in %) and timings."""
    from evomerge.run import start_run

    data = yaml.safe_load(DEMO.read_text())
    data["zoo"] = {"spec": str(spec), "dir": str(zoo)}
    data["search_space"] = str(space or (DEMO.parent / data["search_space"]).resolve())
    data["fitness"]["include_path"] = str((DEMO.parent / data["fitness"]["include_path"]).resolve())
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    experiment = run_dir.parent / f"{run_dir.name}.yaml"
    experiment.write_text(yaml.safe_dump(data, sort_keys=False))
    started = time.perf_counter()
    summary = start_run(experiment, run_dir=run_dir, progress=False, overwrite=True)
    rows = {r["label"].split(" (#")[0]: {t: 100 * r["objectives"][t] for t in TASKS} for r in summary["rows"]}
    return {"rows": rows, "best_candidate": summary["best"]["candidate"],
            "best_validation": 100 * summary["best"]["objectives"]["fitness"], "seconds": round(time.perf_counter() - started, 1)}


def multi_job(zoo: Path, budget: int, limit: int) -> dict:
    """Multi-skill, scored on test: ``zoo_table``'s global grid of the three experts, a per-layer CMA-ES
    search on ``kept2`` over all three, and one on each pair of experts (its ``kept2`` is the pair's
    weaker share), each best merge scored on all three tasks."""
    import zoo_table

    from evomerge.materialize import ResidentMerger
    from evomerge.pool import ModelPool
    from evomerge.zoo.index import ZooIndex

    index = ZooIndex.load(zoo / "zoo.json")
    setting = next(s for s in index.settings if s.target is None)
    os.environ["ZOO_TABLE_VALIDATION_LIMIT"] = str(limit)
    zoo_table.use_setting(zoo, setting)
    folders = zoo_table.setting_folders(zoo, index, setting)
    started = time.perf_counter()
    with ModelPool.open(folders, "base") as pool:
        merger = ResidentMerger.load(pool, device="cpu")
        rows = zoo_table.source_and_global_rows(zoo, index, setting, merger, folders, quiet=True)
        recipe = zoo_table.per_layer_search(zoo, index, setting, budget, 0, zoo_table.SPACE, progress=False)
        rows.append({"label": "best per-layer", "kind": "per-layer", **zoo_table.score_recipe(merger, recipe, setting)})
        for pair in zoo_table.expert_pairs(setting):
            zoo_table.use_setting(zoo, pair)
            recipe = zoo_table.per_layer_search(zoo, index, pair, budget, 0, zoo_table.SPACE, progress=False)
            merger.apply(recipe)
            rows.append({"label": f"best per-layer {'+'.join(pair.experts)}", "kind": "pair per-layer",
                         "test": zoo_table.zoo_fitness.scores(merger.model, "test", setting.tasks)})
    own = {t: index.model(e).scores[t]["test"] for e, t in zip(setting.experts, setting.tasks, strict=True)}
    return {"rows": rows, "own": own, "seconds": round(time.perf_counter() - started, 1)}


def _child(job: list[str], tier: str, log: Path) -> dict:
    """Run this script's ``--job`` in a fresh process on ATen kernel tier ``tier``; its JSON answer."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": tier}
    answer = log.with_suffix(".json")
    answer.unlink(missing_ok=True)
    with log.open("w") as f:
        done = subprocess.run([sys.executable, __file__, "--job", *job, "--answer", str(answer)], env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"error: {job[0]} job failed on {tier} (exit {done.returncode}); log: {log}")
    return json.loads(answer.read_text())


# -- the table ---------------------------------------------------------------------------------------


def demo_numbers(demo: dict) -> dict[str, float]:
    rows = demo["rows"]
    numbers = {f"{short} {t.removeprefix('zoo_')}": rows[label][t] for label, short in
               (("best merge", "merge"), ("skill", "skill"), ("lang", "lang")) for t in TASKS}
    numbers["margin add_b"] = rows["best merge"]["zoo_add_b"] - max(rows["skill"]["zoo_add_b"], rows["lang"]["zoo_add_b"])
    numbers["search s"] = demo["seconds"]
    return numbers


USEFUL_PAIR, USEFUL_THREE = 50.0, 25.0


def multi_numbers(multi: dict) -> dict[str, float]:
    """Shares (in % of each expert's own test accuracy) the multi-skill merges keep, and their front.

    The front is the Pareto front of every merge's three shares; a *useful* point on it keeps ≥ 50 %
    of two experts or ≥ 25 % of all three."""
    own = multi["own"]
    merges = [r for r in multi["rows"] if r["kind"] in ("global", "per-layer", "pair per-layer")]
    shares = [[100 * r["test"][t] / max(own[t], 1e-9) for t in own] for r in merges]
    ranked = [sorted(s, reverse=True) for s in shares]
    front = [s for s in shares if not any(all(o >= x for o, x in zip(other, s)) and other != s for other in shares)]
    useful = [s for s in front if sorted(s)[1] >= USEFUL_PAIR or min(s) >= USEFUL_THREE]
    numbers = {"pair kept": max(r[1] for r in ranked), "three kept": max(r[2] for r in ranked),
               "front points": len(front), "useful front points": len(useful)}
    for kind in ("global", "per-layer", "pair per-layer"):
        kept = [r[1] for r, m in zip(ranked, merges, strict=True) if m["kind"] == kind]
        if kept:
            numbers[f"{kind} pair kept"] = max(kept)
    return numbers


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def table(results: dict) -> str:
    demos = {k: demo_numbers(v) for k, v in sorted(results.get("demo", {}).items())}
    globals_ = results.get("global", {})
    for k, n in demos.items():
        if k in globals_:
            n["global add_b"] = globals_[k]["rows"]["best merge"]["zoo_add_b"]
            n["per-layer − global"] = n["merge add_b"] - n["global add_b"]
    lines: list[str] = []
    if demos:
        cols = ["merge add_b", "skill add_b", "lang add_b", "margin add_b", "global add_b", "per-layer − global",
                "merge add_a", "merge qa_b", "skill add_a", "lang qa_b", "search s"]
        cols = [c for c in cols if all(c in n for n in demos.values())]
        lines += ["| build (zoo seed / search kernels) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{n[c]:.1f}" for c in cols) + " |" for k, n in demos.items()]
        lines.append(f"| median (min–max) over {len(demos)} | " + " | ".join(_stats([n[c] for n in demos.values()]) for c in cols) + " |")
        margins = [n["margin add_b"] for n in demos.values()]
        lines += ["", f"best merge beats the better expert on zoo_add_b in {sum(m > 0 for m in margins)}/{len(margins)} builds, "
                      f"by ≥ {MARGIN:g} points in {sum(m >= MARGIN for m in margins)}/{len(margins)}"]
        if "per-layer − global" in cols:
            wins = sum(n["per-layer − global"] > 0 for n in demos.values())
            lines.append(f"the per-layer search beats the best global merge (same search, global space) in {wins}/{len(demos)} builds")
        median = sorted(demos.values(), key=lambda n: n["merge add_b"])[(len(demos) - 1) // 2]
        lines += ["", "README demo table (median build by best merge's zoo_add_b; min–max over builds beside):",
                  "| model | zoo_add_b (test) | zoo_add_a | zoo_qa_b |", "|---|---|---|---|"]
        for short, name in (("merge", "best merge"), ("skill", "skill_add_a"), ("lang", "lang_qa_b")):
            cells = [f"{median[f'{short} {t}']:.1f} ({min(n[f'{short} {t}'] for n in demos.values()):.1f}–"
                     f"{max(n[f'{short} {t}'] for n in demos.values()):.1f})" for t in ("add_b", "add_a", "qa_b")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    multis = {k: multi_numbers(v) for k, v in sorted(results.get("multi", {}).items())}
    if multis:
        cols = [c for c in next(iter(multis.values())) if all(c in n for n in multis.values())]
        lines += ["", "| multi-skill (kept share of own test accuracy, %) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{n[c]:.0f}" for c in cols) + " |" for k, n in multis.items()]
        passed = sum(n["pair kept"] >= USEFUL_PAIR for n in multis.values())
        fronts = sum(n["useful front points"] > 0 for n in multis.values())
        lines += ["", f"some merge keeps ≥ 50 % of two experts at once in {passed}/{len(multis)} zoo seeds; "
                      f"the three-expert front has useful points (≥ 50 % of two or ≥ 25 % of three) in {fronts}/{len(multis)}"]
    for key, cost in sorted(results.get("builds", {}).items()):
        lines.append(f"zoo build, {key}: {cost['cpu_seconds']:.0f} CPU s ({cost['wall_seconds']:.0f} s wall)")
    return "\n".join(lines) if lines else "no results yet"


# -- orchestration ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="zoo seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--kernels", default=None, help="search-time ATen tiers in run order (default: this CPU's top tier first, then the others)")
    parser.add_argument("--zoo", action="append", default=[], metavar="SEED=DIR", help="the zoo folder of a seed (repeatable)")
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="zoo spec whose seed is varied (default: the bundled one)")
    parser.add_argument("--multi", action="store_true", help="also the multi-skill check, once per seed, after the demo builds")
    parser.add_argument("--multi-budget", type=int, default=150, help="evaluations of each multi-skill per-layer search")
    parser.add_argument("--multi-limit", type=int, default=100, help="validation questions per task the multi-skill merges are selected on")
    parser.add_argument("--skip-demo", action="store_true", help="run only the multi-skill check (with --multi), e.g. beside a demo-only run")
    parser.add_argument("--out", default=str(REPO / ".cache" / "robustness"), help="folder for seeded specs, zoos, runs and results")
    parser.add_argument("--table", action="store_true", help="only print the table of the results recorded so far")
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        kind, *rest = args.job
        answer = demo_job(*map(Path, rest)) if kind in ("demo", "global") else multi_job(Path(rest[0]), int(rest[1]), int(rest[2]))
        Path(args.answer).write_text(json.dumps(answer))
        return

    out = Path(args.out).resolve()
    results_file = out / "robustness.json"
    results: dict = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.table:
        print(table(results))
        return
    top = top_tier()
    tiers = args.kernels.split(",") if args.kernels else [top, *(t for t in TIERS if t != top)]
    seeds = [int(s) for s in args.seeds.split(",")]
    zoos = {0: Path(os.environ.get("EVOMERGE_ZOO") or REPO / ".cache" / "zoo"), **{s: out / "zoos" / f"seed{s}" for s in seeds if s}}
    zoos.update({int(k): Path(v) for k, v in (z.split("=", 1) for z in args.zoo)})
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    specs = {s: seeded_spec(Path(args.spec).resolve(), s, out) for s in seeds}
    for s in seeds:
        cost = ready_zoo(specs[s], zoos[s].resolve(), logs / f"build-seed{s}.log")
        if cost is not None:
            results.setdefault("builds", {})[f"seed {s}"] = cost
            results_file.write_text(json.dumps(results, indent=1))
            print(f"  built seed {s}: {cost['cpu_seconds']:.0f} CPU s, {cost['wall_seconds']:.0f} s wall", flush=True)

    started = time.perf_counter()
    cells = [(s, t) for t in tiers for s in seeds]
    print(f"{len(cells)} builds, results in {results_file}", flush=True)
    for s, t in [] if args.skip_demo else cells:
        key = f"seed {s} / {t}"
        for kind, space in (("demo", []), ("global", [str(GLOBAL_SPACE)])):
            if key in results.get(kind, {}):
                continue
            name = f"{kind}-seed{s}-{t}"
            run = _child([kind, str(specs[s]), str(zoos[s].resolve()), str(out / "runs" / name), *space], t, logs / f"{name}.log")
            results.setdefault(kind, {})[key] = {**run, "zoo": str(zoos[s]), "seed": s, "kernels": t}
            results_file.write_text(json.dumps(results, indent=1))
            n = demo_numbers(run)
            print(f"  {key}, {'per-layer' if kind == 'demo' else 'global'} search: best merge {n['merge add_b']:.1f} on zoo_add_b, "
                  f"experts {n['skill add_b']:.1f} / {n['lang add_b']:.1f} ({n['search s']:.0f} s; "
                  f"{time.perf_counter() - started:.0f} s elapsed)", flush=True)
    for s in seeds if args.multi else ():
        key = f"seed {s} / {top}"
        if key in results.get("multi", {}):
            continue
        multi = _child(["multi", str(zoos[s].resolve()), str(args.multi_budget), str(args.multi_limit)], top, logs / f"multi-seed{s}.log")
        results.setdefault("multi", {})[key] = multi
        results_file.write_text(json.dumps(results, indent=1))
        print(f"  multi-skill {key}: {multi_numbers(multi)} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
