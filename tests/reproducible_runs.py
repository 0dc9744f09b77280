"""Whole runs for the reproducible-mode tests (tests/test_reproducible.py, tests/test_ray_reproducible.py):
one experiment per strategy on the pico family, the fitness they share, and what two runs must share.

``write_runs(folder, family)`` writes ``fitness.py`` and ``NAME.yaml`` for every ``RUNS`` entry (a
reproducible local executor); ``experiment_file`` derives one with other executor settings;
``contents`` is what must not depend on the executor; ``delays``/``kill_worker_on_call`` drive the
fitness's side files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from evomerge.pool import ModelPool
from evomerge.run import start_run
from evomerge.store import RunStore

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"
BUDGET = 14
# The fitness of a merged pico model: features of its weights; some candidates raise, some give NaN.
# ``niches`` scores 8 examples (head rows above the family's midpoint). With a delay.json beside it
# each call sleeps 1x-4x a unit drawn from the weights (a fixed, content-dependent arrival order on
# several workers); with a kill.json, the worker process kills itself on the call it names (calls
# counted across processes in a file). Files, not environment variables: Ray's workers keep the
# environment of ray.init.
FITNESS = """
import hashlib, json, math, os, signal, time
from pathlib import Path

HERE = Path(__file__).parent


def _pace(model):
    kill = HERE / "kill.json"
    if kill.is_file():
        plan = json.loads(kill.read_text())
        with open(plan["counter"], "a") as f:
            f.write("x")
        if len(Path(plan["counter"]).read_text()) == plan["at"]:
            os.kill(os.getpid(), signal.SIGKILL)
    delay = HERE / "delay.json"
    if delay.is_file():
        weights = model.model.layers[0].mlp.up_proj.weight.detach().numpy().tobytes()
        draw = int.from_bytes(hashlib.blake2b(weights, digest_size=8).digest(), "little") / 2**64
        time.sleep(json.loads(delay.read_text())["unit"] * (1.0 + 3.0 * draw))


def quality(model, tokenizer):
    _pace(model)
    layers = model.model.layers
    x0 = float(layers[0].mlp.up_proj.weight.detach().double().sum())
    x1 = float(layers[1].mlp.up_proj.weight.detach().double().sum())
    h = float(model.lm_head.weight.detach().double().sum())
    if x0 > -2.41:
        raise ValueError("diverged")
    value = math.nan if x1 > 0.09 else -100.0 * ((x0 + 2.47) ** 2 + (x1 - 0.05) ** 2 + (h - 0.47) ** 2)
    return {"quality": value, "size": -abs(h - 0.4)}, {"quality": [x0, x1, h]}


def niches(model, tokenizer):
    _pace(model)
    rows = model.lm_head.weight.detach().double()[:8].sum(dim=1)
    scores = [float(v > t) for v, t in zip(rows.tolist(), THRESHOLDS)]
    return {"solved": sum(scores) / len(scores)}, {"solved": scores}


def heldout(model, tokenizer):
    return {"quality": float(model.model.layers[1].mlp.up_proj.weight.detach().double().sum()),
            "size": 0.0, "solved": float(model.lm_head.weight.detach().double().sum())}
"""
# name: (strategy, fitness function, objectives, search space)
RUNS = {
    "random": ({"name": "random"}, "quality", ["quality"], str(SPACE)),
    "cmaes": ({"name": "cmaes", "settings": {"sigma0": 0.5, "popsize": 4}}, "quality", ["quality"], str(SPACE)),
    "optuna-tpe": (
        {"name": "optuna", "settings": {"sampler": "tpe", "sampler_settings": {"n_startup_trials": 4}}},
        "quality", ["quality"], str(SPACE),
    ),
    "optuna-nsga2": (
        {"name": "optuna", "settings": {"sampler": "nsga2", "sampler_settings": {"population_size": 4}, "lag": 2}},
        "quality", ["quality", "size"], str(SPACE),
    ),
    "map": (
        {"name": "map", "settings": {"design_points": 8, "batch_size": 3}},
        "quality", ["quality", "size"], str(REPO / "search_spaces" / "task-arithmetic-global.yaml"),
    ),
    "natural-niches": (
        {"name": "natural_niches", "settings": {"archive_size": 4, "lag": 1}}, "niches", ["solved"], {"kind": "split_point"},
    ),
}


def write_runs(folder: Path, family: dict[str, Path]) -> None:
    """The fitness module (thresholds from the family's heads) and one experiment per strategy."""
    models = {name: str(path) for name, path in family.items()}
    with ModelPool.open(models, "base") as pool:
        heads = [pool.tensor(m, "lm_head.weight").double()[:8].sum(dim=1) for m in ("expert_1", "expert_2")]
    thresholds = ((heads[0] + heads[1]) / 2).tolist()
    (folder / "fitness.py").write_text(f"THRESHOLDS = {thresholds!r}\n" + FITNESS)
    for name, (strategy, function, objectives, space) in RUNS.items():
        data = {
            "name": name,
            "seed": 4,
            "models": {"base": models["base"], "a": models["expert_1"], "b": models["expert_2"]},
            "base": "base",
            "search_space": space,
            "strategy": strategy,
            "fitness": {"python": f"fitness.py:{function}"},
            "heldout": {"python": "fitness.py:heldout"},
            "objectives": objectives,
            "budget": {"evaluations": BUDGET},
            "checkpoint_every": 3,
            "executor": {"threads": 1, "reproducible": True},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def local_runs(folder: Path) -> dict[str, tuple[list, list, dict | None]]:
    """Each strategy's run on the local executor: the reference every other run must equal."""
    references = {}
    for name in RUNS:
        start_run(folder / f"{name}.yaml", run_dir=folder / "local" / name, progress=False)
        references[name] = contents(folder / "local" / name)
        candidates, results, summary = references[name]
        assert len(candidates) == BUDGET and summary is not None
        assert len({r[3] for r in results}) == 2 or name == "natural-niches", "the fitness should fail on some candidates"
    return references


def experiment_file(folder: Path, name: str, **executor: Any) -> Path:
    """The strategy's experiment with other executor settings."""
    data = yaml.safe_load((folder / f"{name}.yaml").read_text())
    data["executor"].update(executor)
    path = folder / f"{name}-{'-'.join(f'{k}{v}' for k, v in executor.items()) or 'local'}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def contents(run: Path) -> tuple[list, list, dict | None]:
    """What must not depend on the executor, by ticket (the order results were recorded may differ)."""
    with RunStore.open_reader(run) as store:
        candidates = sorted(
            (c.ticket, None if c.proposal.genome is None else c.proposal.genome.tobytes(), c.proposal.parents,
             c.proposal.info, c.recipe, c.recipe_hash, c.status)
            for c in store.candidates()
        )
        results = sorted(
            (r.ticket, r.split, r.evaluation.objectives.tobytes(), r.ok, r.error, r.cached_from, r.fitness_hash,
             None if r.evaluation.per_example is None else r.evaluation.per_example.tobytes())
            for split in ("validation", "test")
            for r in store.results(split)
        )
        summary = store.summary
    return candidates, results, None if summary is None else {k: v for k, v in summary.items() if k != "elapsed_seconds"}


def arrival(run: Path) -> list[int]:
    with RunStore.open_reader(run) as store:
        return [r.ticket for r in store.results()]


def held_back(run: Path) -> bool:
    """Whether the store holds a result recorded while an earlier candidate was still out."""
    with RunStore.open_reader(run) as store:
        pending = [c.ticket for c in store.pending_candidates()]
        return bool(pending) and any(r.ticket > min(pending) for r in store.results())




def delays(folder: Path, unit: float | None) -> None:
    """Make every evaluation sleep 1x-4x ``unit`` seconds, drawn from the candidate (None: no delay)."""
    path = folder / "delay.json"
    if unit is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps({"unit": unit}))


def kill_worker_on_call(folder: Path, call: int | None) -> None:
    """The worker process running the ``call``-th evaluation (counted from now) kills itself (None: never)."""
    plan = folder / "kill.json"
    if call is None:
        plan.unlink(missing_ok=True)
        return
    (folder / "calls.txt").write_text("")
    plan.write_text(json.dumps({"counter": str(folder / "calls.txt"), "at": call}))
