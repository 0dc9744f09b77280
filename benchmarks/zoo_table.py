"""Does merging matter on the zoo? The README's zoo table, measured.

For every merge setting of a built zoo: the base, each expert, their uniform average, task
arithmetic and TIES at a few global settings, and the best per-layer merge of a quick evomerge
search (CMA-ES over ``search_spaces/task-arithmetic-per-layer.yaml``, selected on validation),
all scored on every task's held-out *test* split with the zoo's exact-match scorer. "Best global"
is the global merge with the best validation objective, so no row is chosen by its test score.

    EVOMERGE_ZOO=.cache/zoo python benchmarks/zoo_table.py [--budget 150] [--json out/zoo_table.json]

Checks the zoo's acceptance criteria and prints them: cross-lingual — a merge beats both experts
on the target by ≥ 20 points and the best per-layer merge beats the best global merge;
multi-skill — some merge keeps ≥ 50 % of each of two experts' own accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import zoo_fitness  # noqa: E402  (needs the path above)

from evomerge.materialize import ResidentMerger  # noqa: E402
from evomerge.pool import ModelPool  # noqa: E402
from evomerge.recipe import Recipe, recipe_from_dict  # noqa: E402
from evomerge.run import start_run  # noqa: E402
from evomerge.store import RunStore  # noqa: E402
from evomerge.zoo.index import SettingEntry, ZooIndex  # noqa: E402

SPACE = HERE.parent / "search_spaces" / "task-arithmetic-per-layer.yaml"
TA_LAMBDAS = (0.5, 0.75, 1.0, 1.25)
TIES_GRID = tuple(itertools.product((0.3, 0.5, 0.7), (1.0, 1.5)))


def global_recipes(setting: SettingEntry, models: dict[str, str]) -> dict[str, dict]:
    """Uniform average, task arithmetic (per-expert λ grid for two experts, equal λ for more), TIES."""
    experts = setting.experts
    recipes = {"uniform average": {"method": "linear", "model_parameters": {e: {"weight": 1.0} for e in experts}}}
    grids = itertools.product(TA_LAMBDAS, repeat=2) if len(experts) == 2 else ((lam,) * len(experts) for lam in TA_LAMBDAS)
    for lams in grids:
        recipes[f"TA λ={'/'.join(f'{x:g}' for x in lams)}"] = {
            "method": "task_arithmetic", "model_parameters": {e: {"weight": x} for e, x in zip(experts, lams)}
        }
    for density, lam in TIES_GRID:
        recipes[f"TIES d={density:g} λ={lam:g}"] = {
            "method": "ties", "parameters": {"lambda": lam},
            "model_parameters": {e: {"weight": 1.0, "density": density} for e in experts},
        }
    return {label: {"models": models, "base": "base", "seed": 0, **body} for label, body in recipes.items()}


def score_recipe(merger: ResidentMerger, recipe: Recipe, setting: SettingEntry) -> dict:
    merger.apply(recipe)
    val = zoo_fitness.scores(merger.model, "validation", setting.tasks)
    test = zoo_fitness.scores(merger.model, "test", setting.tasks)
    return {"validation": zoo_fitness.objective(val, "validation"), "test": test}


def per_layer_search(zoo: Path, index: ZooIndex, setting: SettingEntry, budget: int, seed: int, space: Path,
                     progress: bool = True) -> Recipe:
    """A quick evomerge run (CMA-ES, per-layer task arithmetic); returns its best recipe."""
    with tempfile.TemporaryDirectory(prefix="zoo-table-") as tmp:
        experiment = {
            "name": re.sub(r"[^A-Za-z0-9._-]+", "-", f"zoo-table-{setting.name}"),
            "seed": seed,
            "models": {"base": str(zoo / "base"), **{e: str(zoo / index.model(e).folder) for e in setting.experts}},
            "base": "base",
            "search_space": str(space),
            "strategy": {"name": "cmaes", "settings": {"sigma0": 0.25}},
            "fitness": {"python": f"{HERE / 'zoo_fitness.py'}:validation"},
            "budget": {"evaluations": budget},
            "executor": {"kind": "local", "device": "cpu", "dtype": "float32", "threads": 1},
        }
        path = Path(tmp) / "experiment.yaml"
        path.write_text(yaml.safe_dump(experiment, sort_keys=False))
        run = Path(tmp) / "run"
        start_run(path, run_dir=run, progress=progress)
        with RunStore.open_reader(run) as store:
            best = store.best()
            recipe = store.candidate(best.ticket).recipe
    return recipe_from_dict(recipe, "best per-layer recipe")


def use_setting(zoo: Path, setting: SettingEntry) -> None:
    """Point ``zoo_fitness`` (the per-layer searches' fitness, read from the environment) at a zoo and setting."""
    os.environ["ZOO_TABLE_ZOO"] = str(zoo)
    os.environ["ZOO_TABLE_SETTING"] = setting.model_dump_json()
    zoo_fitness._zoo.cache_clear()
    zoo_fitness.eval_set.cache_clear()


def source_and_global_rows(zoo: Path, index: ZooIndex, setting: SettingEntry, merger: ResidentMerger,
                           folders: dict[str, str], quiet: bool = False) -> list[dict]:
    """The base and experts as they are, then every global merge, then the one with the best validation score."""
    rows = []
    for name in ("base", *setting.experts):
        scores = index.model(name).scores
        val = zoo_fitness.objective({t: scores[t]["validation"] for t in setting.tasks}, "validation")
        rows.append({"label": name, "kind": "source", "validation": val, "test": {t: scores[t]["test"] for t in setting.tasks}})
    globals_ = []
    for label, body in global_recipes(setting, folders).items():
        row = {"label": label, "kind": "global", **score_recipe(merger, recipe_from_dict(body, label), setting)}
        rows.append(row)
        globals_.append(row)
        if not quiet:
            print(f"  {setting.name:14s} {label:22s} val {_first(row['validation']):5.1f}  test {row['test']}", flush=True)
    best_global = max(globals_, key=lambda r: _first(r["validation"]))
    rows.append({**best_global, "label": f"best global ({best_global['label']})", "kind": "best global"})
    return rows


def setting_folders(zoo: Path, index: ZooIndex, setting: SettingEntry) -> dict[str, str]:
    return {"base": str(zoo / "base"), **{e: str(zoo / index.model(e).folder) for e in setting.experts}}


def setting_table(zoo: Path, index: ZooIndex, setting: SettingEntry, budget: int, seed: int, space: Path) -> list[dict]:
    use_setting(zoo, setting)
    folders = setting_folders(zoo, index, setting)
    with ModelPool.open(folders, "base") as pool:
        merger = ResidentMerger.load(pool, device="cpu")
        rows = source_and_global_rows(zoo, index, setting, merger, folders)
        started = time.perf_counter()
        recipe = per_layer_search(zoo, index, setting, budget, seed, space)
        row = score_recipe(merger, recipe, setting)
        rows.append({"label": f"best per-layer (CMA-ES, {budget} evals, {space.stem})", "kind": "per-layer", **row,
                     "search_seconds": round(time.perf_counter() - started, 1)})
    return rows


def expert_pairs(setting: SettingEntry) -> list[SettingEntry]:
    """Every pair of a multi-skill setting's experts, as settings of their own (scored on their two tasks)."""
    return [
        SettingEntry(name=f"{setting.name}: {a}+{b}", description=f"{a} and {b} only", experts=[a, b], tasks=[ta, tb], target=None)
        for (a, ta), (b, tb) in itertools.combinations(zip(setting.experts, setting.tasks, strict=True), 2)
    ]


def _first(values: dict[str, float]) -> float:
    return next(iter(values.values()))


def shown(row: dict) -> bool:
    """The README keeps the global merges with one shared λ (and TIES at λ = 1); the full grid is in the JSON."""
    if row["kind"] != "global" or row["label"] == "uniform average":
        return True
    if row["label"].startswith("TA"):
        return len(set(row["label"].split("=")[1].split("/"))) == 1
    return row["label"].endswith("λ=1")


def markdown(setting: SettingEntry, rows: list[dict]) -> str:
    lines = [f"| {setting.name} (test) | " + " | ".join(setting.tasks) + " |", "|---" * (len(setting.tasks) + 1) + "|"]
    for row in filter(shown, rows):
        cells = " | ".join(f"{row['test'][t]:.1f}" for t in setting.tasks)
        lines.append(f"| {row['label']} | {cells} |")
    return "\n".join(lines)


def acceptance(index: ZooIndex, settings: list[SettingEntry], tables: dict[str, list[dict]]) -> list[str]:
    lines = []
    for setting in settings:
        rows = tables[setting.name]
        experts = [r for r in rows if r["kind"] == "source" and r["label"] != "base"]
        merges = [r for r in rows if r["kind"] in ("global", "per-layer")]
        best_global = next(r for r in rows if r["kind"] == "best global")
        per_layer = next(r for r in rows if r["kind"] == "per-layer")
        if setting.target is not None:
            t = setting.target
            expert_best = max(r["test"][t] for r in experts)
            merge_best = max(r["test"][t] for r in merges)
            lines.append(f"{setting.name}: best merge {merge_best:.1f} vs best expert {expert_best:.1f} on {t} "
                         f"(+{merge_best - expert_best:.1f} points; need ≥ 20) → {'PASS' if merge_best - expert_best >= 20 else 'MISS'}")
            lines.append(f"{setting.name}: per-layer {per_layer['test'][t]:.1f} vs best global {best_global['test'][t]:.1f} "
                         f"→ {'PASS' if per_layer['test'][t] > best_global['test'][t] else 'MISS'}")
        else:
            own = {e: index.model(e).scores[t]["test"] for e, t in zip(setting.experts, setting.tasks, strict=True)}
            best_pair, best_row = 0.0, None
            for row in merges:
                kept = sorted((100 * row["test"][t] / max(own[e], 1e-9) for e, t in zip(setting.experts, setting.tasks)), reverse=True)
                if kept[1] > best_pair:
                    best_pair, best_row = kept[1], row["label"]
            lines.append(f"{setting.name}: best pair-kept share {best_pair:.0f} % ({best_row}); need ≥ 50 % "
                         f"→ {'PASS' if best_pair >= 50 else 'MISS'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=os.environ.get("EVOMERGE_ZOO", ".cache/zoo"), help="built zoo folder")
    parser.add_argument("--budget", type=int, default=150, help="evaluations of each per-layer search")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default=None, help="comma-separated setting names, pairs included (default: all)")
    parser.add_argument("--space", default=str(SPACE), help="search space of the per-layer searches")
    parser.add_argument("--pairs", action="store_true", help="also merge every pair of a multi-skill setting's experts")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    zoo = Path(args.zoo).resolve()
    if not (zoo / "zoo.json").is_file():
        sys.exit(f"error: {zoo}: no zoo.json — build the zoo first with `evomerge zoo build --out {args.zoo}`")
    index = ZooIndex.load(zoo / "zoo.json")
    wanted = None if args.settings is None else set(args.settings.split(","))
    settings = list(index.settings)
    if args.pairs:
        settings += [pair for s in index.settings if s.target is None for pair in expert_pairs(s)]
    settings = [s for s in settings if wanted is None or s.name in wanted]
    tables = {setting.name: setting_table(zoo, index, setting, args.budget, args.seed, Path(args.space)) for setting in settings}
    print()
    for setting in settings:
        print(markdown(setting, tables[setting.name]), end="\n\n")
    print("\n".join(acceptance(index, settings, tables)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
