"""The search loop on pico models with a deterministic callable fitness: what a run records,
failures and NaN, the fitness cache, objective directions, budgets, and the property resume rests
on: a run killed (SIGKILL, in forked child processes) at several points and resumed ends with
exactly the candidates and results of an uninterrupted run; a second driver is refused meanwhile.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge import cli
from evomerge.errors import ConfigError
from evomerge.experiment import load_experiment
from evomerge.run import reference_recipes, resume_run, start_run
from evomerge.search import STRATEGIES, Proposal, Strategy, register_strategy
from evomerge.status import SUMMARY_FILE, run_status
from evomerge.store import RunStore, StoreError
from evomerge.store.files import EXPERIMENT_FILE
from evomerge.store.lock import RunLock

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"
BUDGET = 24

# Features of the merged pico model: sums of two MLP weights and of the head (float64, exact).
# Over the space's box, about one candidate in ten raises and one in ten returns NaN.
FITNESS = """
import math
import os
import signal
import time

def _hooks():
    # counted in the environment: the validation and held-out fitness are separate module instances
    calls = int(os.environ.get("DRIVER_TEST_CALLS", "0")) + 1
    os.environ["DRIVER_TEST_CALLS"] = str(calls)
    log = os.environ.get("DRIVER_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write("call\\n")
    if calls == int(os.environ.get("DRIVER_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("DRIVER_TEST_DELAY", "0")))


def features(model):
    layers = model.model.layers
    return (
        float(layers[0].mlp.up_proj.weight.detach().double().sum()),
        float(layers[1].mlp.up_proj.weight.detach().double().sum()),
        float(model.lm_head.weight.detach().double().sum()),
    )


def quality(model, tokenizer):
    _hooks()
    x0, x1, h = features(model)
    if x0 > -2.41:
        raise ValueError("diverged")
    value = math.nan if x1 > 0.09 else -100.0 * ((x0 + 2.47) ** 2 + (x1 - 0.05) ** 2 + (h - 0.47) ** 2)
    return {"quality": value}, {"quality": [x0, x1, h]}


def heldout(model, tokenizer):
    _hooks()
    x0, x1, h = features(model)
    return {"quality": -100.0 * ((x0 + 2.45) ** 2 + (x1 - 0.03) ** 2 + (h - 0.46) ** 2)}


def two(model, tokenizer):
    _hooks()
    x0, x1, h = features(model)
    return {"quality": -abs(x0 + 2.45), "spread": abs(x1 - h)}, {"quality": [x0, x1, h]}
"""


@pytest.fixture
def workspace(tmp_path, pico_family, monkeypatch):
    """A folder with the fitness module; ``make(**changes)`` writes an experiment and returns its path."""
    (tmp_path / "fitness.py").write_text(FITNESS)
    for var in ("DRIVER_TEST_LOG", "DRIVER_TEST_KILL_AT", "DRIVER_TEST_DELAY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DRIVER_TEST_CALLS", "0")  # restored after the test (the fitness counts its calls here)

    def make(name: str = "exp.yaml", **changes) -> Path:
        data = {
            "name": "t",
            "seed": 3,
            "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
            "base": "base",
            "search_space": str(SPACE),
            "strategy": {"name": "cmaes", "settings": {"sigma0": 0.4, "popsize": 6}},
            "fitness": {"python": "fitness.py:quality"},
            "heldout": {"python": "fitness.py:heldout"},
            "budget": {"evaluations": BUDGET},
            "checkpoint_every": 5,
        }
        data.update(changes)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def contents(run: Path) -> tuple[list, list]:
    """Everything a run recorded that must not depend on crashes: candidates and results (no timings)."""
    with RunStore.open_reader(run) as store:
        candidates = [
            (c.seq, c.ticket, c.proposal.genome.tobytes(), c.proposal.info, c.recipe_hash, c.status)
            for c in store.candidates()
        ]
        results = [
            (r.seq, r.ticket, r.split, r.evaluation.objectives.tobytes(), r.ok, r.error, r.cached_from, r.fitness_hash,
             None if r.evaluation.per_example is None else r.evaluation.per_example.tobytes())
            for split in ("validation", "test")
            for r in store.results(split)
        ]
    return candidates, results


def model_features(folder: Path) -> tuple[float, float, float]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    layers = model.model.layers
    return (
        float(layers[0].mlp.up_proj.weight.detach().double().sum()),
        float(layers[1].mlp.up_proj.weight.detach().double().sum()),
        float(model.lm_head.weight.detach().double().sum()),
    )


def test_a_run_records_every_step(workspace, pico_family, tmp_path):
    experiment = workspace()
    run = tmp_path / "run"
    summary = start_run(experiment, run_dir=run, progress=False)

    with RunStore.open_reader(run) as store:
        candidates, results = store.candidates(), store.results()
        assert [c.ticket for c in candidates] == list(range(BUDGET)) and len(results) == BUDGET
        assert [r.ticket for r in results] == list(range(BUDGET))  # one slot: completed in ask order
        errors = {r.error for r in results if not r.ok}
        assert errors == {"ValueError: diverged", "objective 'fitness' is nan"}, errors
        assert sum(r.ok for r in results) >= BUDGET // 2
        for candidate, result in zip(candidates, results):
            assert candidate.status == ("ok" if result.ok else "failed") and candidate.worker == "local/cpu"
            assert candidate.recipe["method"] == "task_arithmetic" and candidate.recipe_hash == result.recipe_hash
            assert candidate.proposal.info["generation"] == candidate.ticket // 6
            if result.ok:  # the stored objective is the fitness of the stored per-example features
                x0, x1, h = result.evaluation.per_example.tolist()
                assert result.evaluation.objectives[0] == -100.0 * ((x0 + 2.47) ** 2 + (x1 - 0.05) ** 2 + (h - 0.47) ** 2)
                assert {"merge", "evaluate", "total"} <= set(result.timings) and result.worker == "local/cpu"
        best = store.best()
        assert best.evaluation.objectives[0] == max(r.evaluation.objectives[0] for r in results if r.ok)
        (heldout,) = store.results("test")
        assert heldout.ticket == best.ticket and heldout.fitness_hash != best.fitness_hash
        checkpoint = store.latest_checkpoint()
        assert checkpoint.seq == 2 * BUDGET and store.last_seq == 2 * BUDGET + 1  # + the held-out result
        assert checkpoint.state["strategy"]["next_ticket"] == BUDGET
        assert checkpoint.state["driver"]["elapsed"] > 0
        metadata = store.metadata
    assert metadata["objectives"] == ["fitness"] and metadata["dimension"] == 6
    assert metadata["gene_names"][0] == "weight[a]/outside"
    assert yaml.safe_load((run / EXPERIMENT_FILE).read_text()) == metadata["experiment"]
    assert metadata["experiment"]["fitness"] == {"python": f"{experiment.parent.resolve()}/fitness.py:quality"}

    assert json.loads((run / SUMMARY_FILE).read_text()) == summary
    assert summary["split"] == "test" and summary["columns"] == ["fitness", "quality"]
    labels = [row["label"] for row in summary["rows"]]
    assert labels == [f"best merge (#{best.ticket})", "a", "b", "base", "uniform average"]
    assert summary["rows"][0]["objectives"]["quality"] == heldout.evaluation.objectives[0]
    for row, name in zip(summary["rows"][1:4], ("expert_1", "expert_2", "base")):  # a source alone is the source
        x0, x1, h = model_features(pico_family[name])
        assert row["objectives"]["quality"] == -100.0 * ((x0 + 2.45) ** 2 + (x1 - 0.03) ** 2 + (h - 0.46) ** 2)

    status = run_status(run)
    assert (status["evaluations"], status["candidates"], status["done"]) == (BUDGET, BUDGET, True)
    assert status["ok"] + status["failed"] == BUDGET and status["failed"] == BUDGET - sum(r.ok for r in results)
    assert status["best"] == {
        "candidate": best.ticket,
        "objectives": {"fitness": best.evaluation.objectives[0]},
        "heldout": {"fitness": heldout.evaluation.objectives[0]},
    }
    assert status["budget"] == {"evaluations": BUDGET, "minutes": None}
    assert status["throughput"]["candidates_per_hour"] > 0 and status["pending"] == status["running"] == 0

    before = contents(run)
    assert resume_run(run, progress=False) == summary  # a finished run only reports
    assert contents(run) == before
    with pytest.raises(StoreError, match="already holds a run; resume it with `evomerge resume"):
        start_run(experiment, run_dir=run, progress=False)

    (run / "notes.txt").write_text("left by an earlier run")
    again = start_run(experiment, run_dir=run, progress=False, overwrite=True)
    assert {**again, "elapsed_seconds": 0} == {**summary, "elapsed_seconds": 0}  # same seed, same run
    assert contents(run) == before and (run / "notes.txt").read_text() == "left by an earlier run"  # not the run's
    lock = RunLock.acquire(run)  # a live driver: its run is never deleted
    try:
        with pytest.raises(StoreError, match="run is in use by another evomerge process"):
            start_run(experiment, run_dir=run, progress=False, overwrite=True)
    finally:
        lock.release()
    assert contents(run) == before


def test_reference_recipes_are_sources_base_and_uniform_average(workspace):
    experiment = load_experiment(workspace())
    recipes = reference_recipes(experiment)
    assert list(recipes) == ["a", "b", "base", "uniform average"]
    assert recipes["a"].source_names == ["a"] and recipes["base"].source_names == ["base"]
    average = recipes["uniform average"]
    assert average.method == "linear" and average.source_names == ["a", "b"]
    assert average.model_parameters == {"a": {"weight": 1.0}, "b": {"weight": 1.0}}


@pytest.fixture
def cycle_strategy():
    """A test strategy proposing three genomes in turn, so the fitness cache must serve repeats."""

    class Cycle(Strategy):
        GENOMES = ([0.5] * 6, [0.2, 0.3, 0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.25, 0.25, 0.25, 0.25])

        def _propose(self, ticket: int) -> Proposal:
            return Proposal(ticket, np.array(self.GENOMES[ticket % 3], dtype=np.float64))

        def _observe(self, proposal, evaluation) -> None:
            """Learns nothing."""

        def _state(self) -> dict:
            return {}

        def _load(self, state: dict) -> None:
            """Nothing to restore."""

    register_strategy("cycle")(Cycle)
    yield
    STRATEGIES.pop("cycle")


def test_identical_candidates_are_served_from_the_fitness_cache(workspace, tmp_path, cycle_strategy, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("DRIVER_TEST_LOG", str(log))
    experiment = workspace(strategy={"name": "cycle"}, heldout=None, budget={"evaluations": 7})
    start_run(experiment, run_dir=tmp_path / "run", progress=False)
    with RunStore.open_reader(tmp_path / "run") as store:
        results = store.results()
    assert [r.cached_from for r in results] == [None, None, None, 0, 1, 2, 0]
    for result in results[3:]:
        source = results[result.cached_from]
        assert result.evaluation.objectives.tobytes() == source.evaluation.objectives.tobytes()
        assert result.evaluation.per_example.tobytes() == source.evaluation.per_example.tobytes()
        assert result.recipe_hash == source.recipe_hash and result.timings == {} and result.worker is None
    assert len(results[0].recipe_hash) == 32 and len({r.recipe_hash for r in results}) == 3
    # 3 evaluations in the search, then the best again and a, b, base, average for the summary
    assert log.read_text().count("call") == 3 + 1 + 4
    assert run_status(tmp_path / "run")["cached"] == 4


def test_minimized_objectives_are_negated_and_multiple_objectives_kept(workspace, tmp_path):
    experiment = workspace(
        strategy={"name": "random"},
        fitness={"python": "fitness.py:two", "directions": {"spread": "minimize"}},
        heldout=True,
        objectives=["quality", "spread"],
        budget={"evaluations": 5},
    )
    summary = start_run(experiment, run_dir=tmp_path / "run", progress=False)
    with RunStore.open_reader(tmp_path / "run") as store:
        results = store.results()
        assert len(store.results("test")) == 1
    for result in results:
        x0, x1, h = result.evaluation.per_example.tolist()
        quality, negated_spread = result.evaluation.objectives.tolist()
        assert quality == -abs(x0 + 2.45) and negated_spread == -abs(x1 - h) < 0
    assert summary["columns"] == ["fitness", "quality", "spread"]
    row = summary["rows"][0]["objectives"]
    assert row["spread"] > 0 and row["fitness"] == pytest.approx((row["quality"] - row["spread"]) / 2)


def test_a_minutes_budget_stops_asking(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("DRIVER_TEST_DELAY", "0.1")
    experiment = workspace(budget={"minutes": 0.005}, heldout=None, strategy={"name": "random"})
    start = time.perf_counter()
    summary = start_run(experiment, run_dir=tmp_path / "run", progress=False)
    assert 1 <= summary["evaluations"] <= 6 and time.perf_counter() - start < 10
    assert run_status(tmp_path / "run")["budget"] == {"evaluations": None, "minutes": 0.005}


def test_resume_refuses_a_changed_fitness_and_a_missing_run(workspace, tmp_path):
    experiment = workspace(budget={"evaluations": 6})
    assert _killed(_session(experiment, tmp_path / "run", resume=False, kill_at=3))
    helper = FITNESS.replace("float(layers[1].mlp.up_proj.weight", "float(layers[1].mlp.down_proj.weight")
    edits = (FITNESS.replace("-100.0 * ((x0 + 2.47)", "-99.0 * ((x0 + 2.47)"), helper)  # the function; a helper it calls
    for edited in edits:
        (tmp_path / "fitness.py").write_text(edited)
        with pytest.raises(ConfigError, match="the fitness now measures something else than when the run started"):
            resume_run(tmp_path / "run", progress=False)
    with pytest.raises(StoreError, match="no run store found"):
        resume_run(tmp_path / "nothing", progress=False)


# -- crash and resume ------------------------------------------------------------------------


def _child(experiment: str, run: str, resume: bool, kill_at: int, delay: float) -> None:
    os.environ["DRIVER_TEST_KILL_AT"] = str(kill_at)
    os.environ["DRIVER_TEST_CALLS"] = "0"
    os.environ["DRIVER_TEST_DELAY"] = str(delay)
    torch.set_num_threads(1)
    if resume:
        resume_run(run, progress=False)
    else:
        start_run(experiment, run_dir=run, progress=False)


def _session(experiment: Path, run: Path, *, resume: bool, kill_at: int = 0, delay: float = 0.0):
    """A driver in a forked child (the imports are inherited, so it starts in milliseconds)."""
    process = multiprocessing.get_context("fork").Process(
        target=_child, args=(str(experiment), str(run), resume, kill_at, delay)
    )
    process.start()
    return process


def _killed(process, timeout: float = 60.0) -> bool:
    process.join(timeout)
    return process.exitcode == -signal.SIGKILL


def test_killed_and_resumed_run_equals_uninterrupted_run(workspace, tmp_path, capsys):
    experiment = workspace()
    start_run(experiment, run_dir=tmp_path / "reference", progress=False)
    reference = contents(tmp_path / "reference")
    reference_summary = json.loads((tmp_path / "reference" / SUMMARY_FILE).read_text())
    run = tmp_path / "killed"

    # 1. during the 3rd evaluation: no checkpoint yet, one candidate running
    assert _killed(_session(experiment, run, resume=False, kill_at=3))
    with RunStore.open_reader(run) as store:
        assert (store.count(), len(store.results()), store.counts()["running"]) == (3, 2, 1)

    # 2. resumed (the running candidate re-queued first), killed during its 8th evaluation
    assert _killed(_session(experiment, run, resume=True, kill_at=8))
    assert len(contents(run)[1]) == 9

    # 3. resumed slowly and killed from outside at an arbitrary moment; meanwhile a second driver is
    #    refused and status reads the live store
    child = _session(experiment, run, resume=True, delay=0.05)
    deadline = time.monotonic() + 60
    with RunStore.open_reader(run) as reader:
        while len(reader.results()) < 12 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert cli.main(["resume", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}: run is in use by another evomerge process (pid {child.pid}); stop it or use another run directory\n"
    )
    status = run_status(run)
    assert 12 <= status["evaluations"] < BUDGET and not status["done"] and status["best"] is not None
    with RunStore.open_reader(run) as reader:
        while len(reader.results()) < 16 and time.monotonic() < deadline:
            time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    assert _killed(child)
    assert len(contents(run)[1]) < BUDGET

    # 4. resumed and killed while scoring the best candidate on the held-out split
    with RunStore.open_reader(run) as reader:
        counts = reader.counts()
        calls_left = counts["pending"] + counts["running"] + BUDGET - reader.count()
    assert _killed(_session(experiment, run, resume=True, kill_at=calls_left + 1))
    assert len(contents(run)[1]) == BUDGET and not (run / SUMMARY_FILE).exists()

    # 5. resumed and killed while scoring the references, after the held-out result was stored
    assert _killed(_session(experiment, run, resume=True, kill_at=2))
    assert len(contents(run)[1]) == BUDGET + 1 and not (run / SUMMARY_FILE).exists()

    summary = resume_run(run, progress=False)
    assert contents(run) == reference
    assert summary["rows"] == reference_summary["rows"] and summary["best"] == reference_summary["best"]


def test_resume_refuses_a_model_rebuilt_in_place(workspace, tmp_path, make_pico_family, pico_builder, capsys):
    """An expert rebuilt in place between a crash and ``resume`` is named and refused (one line,
    exit 2, nothing recorded); restored bit for bit, the run resumes. The fitness-cache key of a run
    on the rebuilt models differs although every path and the fitness are the same."""
    import shutil

    family = make_pico_family("llama", 2)
    models = {"base": str(family["base"]), "a": str(family["expert_1"]), "b": str(family["expert_2"])}
    experiment = workspace(models=models, budget={"evaluations": 6}, heldout=None)
    run = tmp_path / "run"
    assert _killed(_session(experiment, run, resume=False, kill_at=3))
    before = contents(run)
    original = tmp_path / "original_expert_1"
    shutil.copytree(family["expert_1"], original)
    shutil.rmtree(family["expert_1"])
    pico_builder(family["expert_1"], arch="llama", seed=41, perturb_from=family["base"])
    capsys.readouterr()

    assert cli.main(["resume", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}: model 'a' ({family['expert_1']}) changed since the run started "
        "(model.safetensors differ); restore it, or start a new run\n"
    )
    assert contents(run) == before
    start_run(experiment, run_dir=tmp_path / "rebuilt", progress=False)
    with RunStore.open_reader(run) as first, RunStore.open_reader(tmp_path / "rebuilt") as second:
        assert first.metadata["fitness_hash"] != second.metadata["fitness_hash"]
        assert first.metadata["experiment"]["models"] == second.metadata["experiment"]["models"]

    shutil.rmtree(family["expert_1"])
    shutil.copytree(original, family["expert_1"])
    resume_run(run, progress=False)
    with RunStore.open_reader(run) as store:
        assert len(store.results()) == 6
