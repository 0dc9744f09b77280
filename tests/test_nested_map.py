"""Nested MAP on pico models: three experts merged pair by pair (closest single-task scores first),
each pair by a MAP run whose pick joins the pool; killed inside a merge and resumed, the run plans
and ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from staged_runs import killed, records

from evomerge import cli
from evomerge.errors import ConfigError
from evomerge.experiment import load_experiment
from evomerge.run import resume_run, start_run
from evomerge.run.nested import closest_pair
from evomerge.status import run_status
from evomerge.store import RunStore

REPO = Path(__file__).resolve().parents[1]

# Three tasks, each the mean log-probability of its own token sequence; t2 is shifted by +10 so
# that expert b (its expert) is far from a and c and the first pair is (a, c), not the first two.
FITNESS = """
import os
import signal

import torch

SEQUENCES = {"t1": [1, 5, 6, 7, 8, 9], "t2": [2, 9, 3, 4, 10, 11], "t3": [3, 12, 13, 5, 6, 2]}
SHIFT = {"t1": 0.0, "t2": 10.0, "t3": 0.0}


def fit(model, tokenizer):
    calls = int(os.environ.get("NESTED_TEST_CALLS", "0")) + 1
    os.environ["NESTED_TEST_CALLS"] = str(calls)
    if calls == int(os.environ.get("NESTED_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    scores = {}
    with torch.no_grad():
        for name, ids in SEQUENCES.items():
            ids = torch.tensor([ids])
            logits = model(ids).logits[0, :-1].double()
            scores[name] = float(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).mean()) + SHIFT[name]
    return scores
"""

PAIR_BUDGET = 8
SOURCES_CALLS = 3 + 6  # each expert alone, then (no held-out split) its best and 5 references on validation
MERGE_CALLS = PAIR_BUDGET + 5  # the merge's evaluations, then its best and 4 references on the held-out split


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from evomerge.zoo.pico import build_pico_family

    return build_pico_family(tmp_path_factory.mktemp("nested"), "llama", 3, layers=2)


@pytest.fixture
def experiment(tmp_path, family, monkeypatch):
    monkeypatch.setenv("NESTED_TEST_CALLS", "0")
    monkeypatch.delenv("NESTED_TEST_KILL_AT", raising=False)
    (tmp_path / "fitness.py").write_text(FITNESS)

    def make(**changes) -> Path:
        data = {
            "name": "nested",
            "seed": 1,
            "models": {
                "base": str(family["base"]),
                "a": str(family["expert_1"]),
                "b": str(family["expert_2"]),
                "c": str(family["expert_3"]),
            },
            "base": "base",
            "search_space": str(REPO / "search_spaces" / "task-arithmetic-global.yaml"),
            "strategy": {"name": "map", "settings": {"design_points": 6, "batch_size": 2, "generations": 10, "population": 20}},
            "objectives": ["t1", "t2", "t3"],
            "fitness": {"python": "fitness.py:fit"},
            "heldout": {"python": "fitness.py:fit"},
            "budget": {"evaluations": PAIR_BUDGET},
            "executor": {"kind": "local", "threads": 1},
            "nested_map": {"experts": {"a": "t1", "b": ["t2"], "c": "t3"}, "preferences": {"t1": 2}},
        }
        data.update(changes)
        path = tmp_path / "nested.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def test_closest_pair_takes_the_nearest_scores_and_breaks_ties_by_order():
    assert closest_pair({"a": 0.9, "b": 0.1, "c": 0.8}) == ("a", "c")
    assert closest_pair({"x": 0.5, "y": 0.25, "z": 0.75}) == ("x", "y")  # two gaps of 0.25: the first pair
    assert closest_pair({"m": -3.0, "n": 2.0}) == ("m", "n")
    with pytest.raises(ValueError, match="at least 2"):
        closest_pair({"m": 1.0})


def own_scores(stage: Path, tasks: dict[str, list[str]]) -> dict[str, float]:
    """Each expert's mean score on its own tasks, read from the sources stage's store."""
    with RunStore.open_reader(stage) as store:
        names = list(store.metadata["objectives"])
        results = {r.ticket: r.evaluation.objectives for r in store.results() if r.ok}
        alone = {c.proposal.info["reference"]: results[c.ticket] for c in store.candidates()}
    return {m: sum(alone[m][names.index(t)] for t in ts) / len(ts) for m, ts in tasks.items()}


def test_nested_map_merges_the_closest_pair_first_and_grows_the_pool(experiment, tmp_path):
    run = tmp_path / "run"
    summary = start_run(experiment(), run_dir=run, progress=False)
    stages = yaml.safe_load((run / "stages.yaml").read_text())["experiment"]["stages"]
    assert [s["name"] for s in stages] == ["sources", "merge1", "merge2"]
    scores = own_scores(run / "stages" / "sources", {"a": ["t1"], "b": ["t2"], "c": ["t3"]})
    assert abs(scores["a"] - scores["c"]) < abs(scores["a"] - scores["b"]) and closest_pair(scores) == ("a", "c")
    assert stages[1]["models"] == ["base", "a", "c"] and stages[1]["objectives"] == ["t1", "t3"]
    assert stages[1]["promote"] == [{"name": "merge1", "pick": "t1=2,t3=1"}]
    assert stages[2]["models"] == ["base", "b", "merge1"] and stages[2]["objectives"] == ["t2", "t1", "t3"]
    assert stages[2]["promote"] == [{"name": "merge2", "pick": "t2=1,t1=2,t3=1"}]
    pool = json.loads((run / "pool.json").read_text())["models"]
    assert list(pool) == ["base", "a", "b", "c", "merge1", "merge2"]
    assert pool["merge1"]["ref"] == str(run / "pool" / "merge1") and pool["merge2"]["stage"] == "merge2"
    with RunStore.open_reader(run / "stages" / "sources") as store:
        assert store.count() == 3 and {c.proposal.info["reference"] for c in store.candidates()} == {"a", "b", "c"}
    with RunStore.open_reader(run / "stages" / "merge2") as store:
        experiment_record = store.metadata["experiment"]
        assert store.count() == PAIR_BUDGET
    assert experiment_record["models"] == {"base": pool["base"]["ref"], "b": pool["b"]["ref"], "merge1": str(run / "pool" / "merge1")}
    assert experiment_record["strategy"]["name"] == "map" and experiment_record["objectives"] == ["t2", "t1", "t3"]
    assert summary["final"]["best"]["candidate"] is not None and [s["name"] for s in summary["stages"]] == ["sources", "merge1", "merge2"]
    status = run_status(run)
    assert status["done"] and [s["state"] for s in status["staged"]["stages"]] == ["done", "done", "done"]
    assert cli.main(["export", str(run), "--pick", "t1=1,t2=1,t3=1", "--out", str(tmp_path / "pick"), "--quiet"]) == 0
    assert json.loads((tmp_path / "pick" / "config.json").read_text())["model_type"] == "llama"


def test_a_nested_run_killed_inside_a_merge_resumes_exactly(experiment, tmp_path):
    path = experiment()
    start_run(path, run_dir=tmp_path / "reference", progress=False)
    run = tmp_path / "killed"
    assert killed(path, run, prefix="NESTED_TEST_", resume=False, kill_at=SOURCES_CALLS + 4)  # inside merge1
    status = run_status(run)
    assert status["staged"]["stage"] == "merge1" and not status["done"]
    assert [s["name"] for s in status["staged"]["stages"]] == ["sources", "merge1"]  # merge2 is not planned yet
    assert killed(path, run, prefix="NESTED_TEST_", resume=True, kill_at=MERGE_CALLS - 4 + 3)  # merge1 ends, merge2 is planned and cut
    status = run_status(run)
    assert status["staged"]["stage"] == "merge2" and [s["state"] for s in status["staged"]["stages"]] == ["done", "done", "started"]
    summary = resume_run(run, progress=False)
    for stage in ("sources", "merge1", "merge2"):
        assert records(run / "stages" / stage) == records(tmp_path / "reference" / "stages" / stage)
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["final"]["rows"] == reference["final"]["rows"]
    assert (run / "stages.yaml").read_text().split("experiment:")[1] == (tmp_path / "reference" / "stages.yaml").read_text().split("experiment:")[1]
    ours, theirs = (load_file(r / "pool" / "merge2" / "model.safetensors") for r in (run, tmp_path / "reference"))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experts": {"a": "t1", "z": "t2"}}, "nested_map.experts: 'z' is not a model other than the base"),
        ({"experts": {"a": "t1", "base": "t2"}}, "nested_map.experts: 'base' is not a model other than the base"),
        ({"experts": {"a": "t1", "b": "t9"}}, "nested_map.experts.b: 't9' is not one of the objectives (t1, t2, t3)"),
        ({"experts": {"a": "t1", "b": ["t2", "t1"]}}, "nested_map.experts.b: 't1' is already the objective of 'a'"),
        ({"experts": {"a": "t1"}}, "nested_map.experts"),
        ({"experts": {"a": "t1", "b": "t2"}, "preferences": {"t3": 1}}, "nested_map.preferences: 't3' is not an objective of an expert"),
        ({"experts": {"a": "t1", "b": "t2"}, "preferences": {"t1": 0}}, "nested_map.preferences: t1: expected a positive weight, got 0.0"),
    ],
)
def test_nested_map_mistakes_are_one_line_errors(experiment, tmp_path, capsys, change, message):
    path = experiment(nested_map=change)
    run = tmp_path / "never"
    assert cli.main(["run", str(path), "--run-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1
    assert not run.exists()


def test_nested_map_refuses_stages_a_base_less_pool_and_plain_loading(experiment, tmp_path, capsys):
    path = experiment(stages=[{"name": "x", "promote": []}])
    assert cli.main(["run", str(path), "--run-dir", str(tmp_path / "never"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {path}: stages: nested_map plans its own stages; drop one of them\n"
    path = experiment(base=None)
    assert cli.main(["run", str(path), "--run-dir", str(tmp_path / "never"), "--quiet"]) == 2
    assert "base: nested_map merges task vectors over a base" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="has stages; run it with `evomerge run`"):
        load_experiment(experiment())
    path = experiment(budget={"evaluations": 4})  # a pair's MAP cannot fit its 6 coefficients: said before anything runs
    assert cli.main(["run", str(path), "--run-dir", str(tmp_path / "never"), "--quiet"]) == 2
    assert "(stage merge1)" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_a_value_nested_deeper_than_any_config_is_one_line(experiment, tmp_path, capsys):
    deep: object = 6
    for _ in range(150):  # the parser reads it; a stage made of it could not be serialized
        deep = [deep]
    path = experiment(strategy={"name": "map", "settings": {"batch_size": deep}})
    assert cli.main(["run", str(path), "--run-dir", str(tmp_path / "never"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {path}: invalid YAML: nested more than 100 levels deep\n"
    assert not (tmp_path / "never").exists()


def test_evomerge_plan_plans_the_sources_stage_and_the_first_merge(experiment):
    from evomerge.plan.report import plan_file

    plan = plan_file(experiment())
    assert plan["kind"] == "staged" and [s["stage"] for s in plan["stages"]] == ["sources", "merge1"]
    assert plan["fits"] is True
