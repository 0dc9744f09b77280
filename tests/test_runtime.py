"""The worker and the local executor: in-place merge + fitness per job, failures as outcomes,
asynchronous submit/poll with one slot, the held-out fitness built on demand, callable loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from evomerge.errors import ConfigError
from evomerge.experiment import CallableFitnessConfig
from evomerge.recipe import Recipe
from evomerge.run.objectives import Objectives
from evomerge.runtime import (
    Job,
    LocalExecutor,
    Outcome,
    Worker,
    WorkerSpec,
    load_callable,
)

FITNESS = """
import math
import torch

def head(model, tokenizer):
    w = model.lm_head.weight.detach().double()
    return {"mean": float(w.mean()), "norm": float(w.norm())}, {"mean": [float(v) for v in w.mean(dim=1)[:5]]}

def fails(model, tokenizer):
    raise ValueError("diverged\\nsecond line")

def nan(model, tokenizer):
    return {"loss": math.nan}
"""


@pytest.fixture(scope="module")
def module_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fitness") / "scores.py"
    path.write_text(FITNESS)
    return path


@pytest.fixture(scope="module")
def worker(pico_family, module_file):
    models = {name: str(path) for name, path in pico_family.items()}
    spec = WorkerSpec(
        models=models,
        base="base",
        fitness=CallableFitnessConfig(python=f"{module_file}:head"),
        heldout=CallableFitnessConfig(python=f"{module_file}:fails"),
        source="exp.yaml",
    )
    started = Worker.start(spec, name="w0")
    yield started
    started.close()


def only(models: dict, name: str, base: str | None = "base") -> Recipe:
    return Recipe(models=models, base=base, method="linear", sources=[name], model_parameters={name: {"weight": 1.0}})


def expected_head(folder) -> dict[str, float]:
    w = AutoModelForCausalLM.from_pretrained(folder).lm_head.weight.detach().double()
    return {"mean": float(w.mean()), "norm": float(w.norm())}


def test_job_materializes_the_recipe_in_place_and_scores_it(worker, pico_family):
    models = dict(worker.spec.models)
    for name in ("expert_1", "base", "expert_2"):
        outcome = worker.run(Job(name, only(models, name)))
        assert outcome.error is None and not outcome.failed
        assert (outcome.key, outcome.split, outcome.worker) == (name, "validation", "w0")
        want = expected_head(pico_family[name])
        assert outcome.result.objectives["mean"] == want["mean"]
        assert outcome.result.objectives["norm"] == want["norm"]
        assert outcome.result.objectives["fitness"] == (want["mean"] + want["norm"]) / 2
        assert len(outcome.result.per_example["mean"].scores) == 5
        assert {"merge", "evaluate", "total"} <= set(outcome.timings)
        assert outcome.timings["total"] >= outcome.timings["merge"] + outcome.timings["evaluate"]


def test_merge_and_fitness_exceptions_become_failed_outcomes(worker):
    models = dict(worker.spec.models)
    zero = Recipe(
        models=models, base="base", method="linear",
        model_parameters={"expert_1": {"weight": 0.0}, "expert_2": {"weight": 0.0}},
    )
    outcome = worker.run(Job(7, zero))
    assert outcome.failed and outcome.result is None and "merge" not in outcome.timings
    assert outcome.error.startswith("ConfigError: tensor ") and "sum to 0 with normalize: true" in outcome.error
    held = worker.run(Job(8, only(models, "expert_1"), "test"))
    assert held.failed and held.error == "ValueError: diverged" and held.split == "test"
    assert "merge" in held.timings  # the merge succeeded; the held-out fitness raised
    again = worker.run(Job(9, only(models, "expert_1")))  # the live model is fully rewritten after a failure
    assert again.result.objectives["norm"] == worker.run(Job(10, only(models, "expert_1"))).result.objectives["norm"]


def test_local_executor_is_asynchronous_with_one_slot(worker):
    executor = LocalExecutor(worker)
    models = dict(worker.spec.models)
    assert (executor.capacity, executor.in_flight, executor.free_slots) == (1, 0, 1)
    assert executor.poll(timeout=0.1) == []
    assert executor.submit(Job(1, only(models, "expert_2"))) == "w0"
    assert (executor.in_flight, executor.free_slots) == (1, 0)
    with pytest.raises(RuntimeError, match="no free slot"):
        executor.submit(Job(2, only(models, "expert_1")))
    (outcome,) = executor.poll()
    assert outcome.key == 1 and executor.in_flight == 0
    assert executor.describe_fitness("validation")["name"] == "scores.py:head"
    assert executor.describe_fitness("test")["name"] == "scores.py:fails"


def test_heldout_fitness_is_optional(pico_family, module_file):
    spec = WorkerSpec(
        models={n: str(p) for n, p in pico_family.items()}, base="base",
        fitness=CallableFitnessConfig(python=f"{module_file}:head"),
    )
    worker = Worker.start(spec)
    try:
        with pytest.raises(ConfigError, match="heldout: the experiment has no held-out fitness"):
            worker.fitness("test")
    finally:
        worker.close()


def test_load_callable(module_file, tmp_path):
    fn, name = load_callable(f"{module_file}:head")
    assert name == "scores.py:head" and fn.__name__ == "head"
    fn, name = load_callable("math:sqrt")
    assert fn is math.sqrt and name == "math:sqrt"
    (tmp_path / "broken.py").write_text("import nothing_such\n")
    cases = {
        f"{tmp_path}/none.py:f": f"x.python: file not found: {tmp_path}/none.py",
        f"{tmp_path}/broken.py:f": f"x.python: importing {tmp_path}/broken.py failed: ModuleNotFoundError: No module named 'nothing_such'",
        "no_such_module_here:f": "x.python: cannot import module 'no_such_module_here' (No module named 'no_such_module_here')",
        "math:pi": "x.python: 'pi' is not a function of math",
    }
    for reference, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_callable(reference, "x.python")
        assert str(info.value) == message


def test_objectives_follow_the_maximize_convention(worker):
    models = dict(worker.spec.models)
    outcome = worker.run(Job(3, only(models, "expert_1")))
    objectives = outcome.result.objectives
    result = outcome.result
    flipped = type(result)(
        objectives=result.objectives, directions={**result.directions, "norm": "minimize"},
        per_example=result.per_example, timings=result.timings,
    )
    evaluation, error = Objectives(["mean", "norm"]).evaluation(3, Outcome(3, "validation", "w", 0.0, flipped))
    assert error is None and not evaluation.failed
    assert evaluation.objectives.tolist() == [objectives["mean"], -objectives["norm"]]
    assert evaluation.per_example.dtype == np.float64 and evaluation.per_example.shape == (5,)
    missing, error = Objectives(["loss"]).evaluation(3, outcome)
    assert missing.failed and error == "objective 'loss' not produced by the fitness (mean, norm, fitness)"
    failed, error = Objectives(["mean"]).evaluation(4, Outcome(4, "validation", "w", 0.0, None, "ValueError: x"))
    assert failed.failed and failed.objectives.shape == (1,) and error == "ValueError: x"


def test_nan_objective_is_a_failure(pico_family, module_file):
    spec = WorkerSpec(
        models={n: str(p) for n, p in pico_family.items()}, base="base",
        fitness=CallableFitnessConfig(python=f"{module_file}:nan"),
    )
    worker = Worker.start(spec)
    try:
        outcome = worker.run(Job(0, only(dict(spec.models), "expert_1")))
    finally:
        worker.close()
    assert outcome.error is None and math.isnan(outcome.result.objectives["loss"])
    evaluation, error = Objectives(["fitness"]).evaluation(0, outcome)
    assert evaluation.failed and error == "objective 'fitness' is nan"
