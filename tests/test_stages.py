"""Staged experiments on pico models: a parameter-space stage whose best joins the pool of a
data-flow stage (PS → DFS); every stage is a run of its own; killed inside a stage and resumed, a
staged run ends with exactly the candidates, results and promoted model of an uninterrupted one."""

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
from evomerge.inspection import RunView
from evomerge.run import resume_run, start_run
from evomerge.status import run_status
from evomerge.store import RunStore, StoreError

REPO = Path(__file__).resolve().parents[1]

FITNESS = """
import os
import signal

import torch

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12]])


def fit(model, tokenizer):
    calls = int(os.environ.get("STAGES_TEST_CALLS", "0")) + 1
    os.environ["STAGES_TEST_CALLS"] = str(calls)
    if calls == int(os.environ.get("STAGES_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    with torch.no_grad():
        logits = model(IDS).logits[0, :-1].double()
    return {"fit": float(torch.log_softmax(logits, -1).gather(-1, IDS[0, 1:, None]).mean())}
"""

PS_BUDGET, DFS_BUDGET = 6, 8
PS_CALLS = PS_BUDGET + 5  # the stage's evaluations, then its best and 4 references on the held-out split


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from evomerge.zoo.pico import build_pico_family

    return build_pico_family(tmp_path_factory.mktemp("staged"), "llama", 2, layers=3)


@pytest.fixture
def experiment(tmp_path, family, monkeypatch):
    monkeypatch.setenv("STAGES_TEST_CALLS", "0")
    monkeypatch.delenv("STAGES_TEST_KILL_AT", raising=False)
    (tmp_path / "fitness.py").write_text(FITNESS)

    def make(**changes) -> Path:
        data = {
            "name": "staged",
            "seed": 2,
            "models": {"base": str(family["base"]), "a": str(family["expert_1"]), "b": str(family["expert_2"])},
            "base": "base",
            "strategy": {"name": "cmaes", "settings": {"sigma0": 0.3, "popsize": 4}},
            "fitness": {"python": "fitness.py:fit"},
            "heldout": {"python": "fitness.py:fit"},
            "stages": [
                {
                    "name": "ps",
                    "search_space": str(REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"),
                    "budget": {"evaluations": PS_BUDGET},
                    "promote": [{"name": "ps"}],
                },
                {
                    "name": "dfs",
                    "models": ["ps", "b"],
                    "search_space": {"kind": "dataflow", "repeats": 2, "scaling": "slot", "max_layers": 6},
                    "budget": {"evaluations": DFS_BUDGET},
                },
            ],
        }
        data.update(changes)
        path = tmp_path / "staged.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def test_ps_then_dfs_promotes_the_best_into_the_pool_and_compares_everything(experiment, tmp_path):
    run = tmp_path / "run"
    summary = start_run(experiment(), run_dir=run, progress=False)
    ps_summary = json.loads((run / "stages" / "ps" / "summary.json").read_text())
    pool = json.loads((run / "pool.json").read_text())["models"]
    assert list(pool) == ["base", "a", "b", "ps"]
    assert pool["ps"]["stage"] == "ps" and pool["ps"]["candidate"] == ps_summary["best"]["candidate"]
    assert pool["ps"]["ref"] == str(run / "pool" / "ps") and (run / "pool" / "ps" / "config.json").is_file()
    with RunStore.open_reader(run / "stages" / "dfs") as store:
        dfs_experiment = store.metadata["experiment"]
        kinds = {c.recipe["kind"] for c in store.candidates()}
    assert dfs_experiment["models"] == {"ps": str(run / "pool" / "ps"), "b": pool["b"]["ref"]} and kinds == {"path"}
    labels = [row["label"] for row in summary["final"]["rows"]]
    assert labels[:2] == [f"ps: best merge (#{ps_summary['best']['candidate']})", f"dfs: best merge (#{summary['final']['best']['candidate']})"]
    assert {"a", "b", "base", "uniform average", "ps", "uniform average (dfs pool)"} <= set(labels[2:])
    rows = {row["label"]: row["objectives"]["fit"] for row in summary["final"]["rows"]}
    assert rows["ps"] == pytest.approx(rows[labels[0]], abs=1e-9)  # the promoted model scores as its candidate did
    status = run_status(run)
    assert status["done"] and status["staged"]["stage"] is None and [s["state"] for s in status["staged"]["stages"]] == ["done", "done"]
    assert RunView.load(run).run_dir == run / "stages" / "dfs"  # inspection of the staged folder reads its last stage
    assert cli.main(["export", str(run), "--best", "--out", str(tmp_path / "best"), "--quiet"]) == 0
    assert json.loads((tmp_path / "best" / "config.json").read_text())["model_type"] == "llama"


def test_a_staged_run_killed_inside_a_stage_resumes_exactly(experiment, tmp_path):
    path = experiment()
    start_run(path, run_dir=tmp_path / "reference", progress=False)
    run = tmp_path / "killed"
    assert killed(path, run, prefix="STAGES_TEST_", resume=False, kill_at=3)  # inside the first stage
    assert run_status(run)["staged"]["stage"] == "ps" and not (run / "pool.json").read_text().count('"ps"')
    assert killed(path, run, prefix="STAGES_TEST_", resume=True, kill_at=PS_CALLS - 3 + 3)  # the first stage ends, the second starts
    status = run_status(run)
    assert status["staged"]["stage"] == "dfs" and status["staged"]["stage_index"] == 1 and not status["done"]
    assert [s["state"] for s in status["staged"]["stages"]] == ["done", "started"]
    summary = resume_run(run, progress=False)
    for stage in ("ps", "dfs"):
        assert records(run / "stages" / stage) == records(tmp_path / "reference" / "stages" / stage)
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["final"]["rows"] == reference["final"]["rows"]
    ours, theirs = (load_file(r / "pool" / "ps" / "model.safetensors") for r in (run, tmp_path / "reference"))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_a_promotion_cut_short_is_redone_on_resume(experiment, tmp_path):
    run = tmp_path / "run"
    start_run(experiment(), run_dir=run, progress=False)
    before = load_file(run / "pool" / "ps" / "model.safetensors")
    pool_file = run / "pool.json"
    data = json.loads(pool_file.read_text())
    promoted = data["models"].pop("ps")
    pool_file.write_text(json.dumps(data))  # as if killed after the export was renamed into place
    resume_run(run, progress=False)
    assert json.loads(pool_file.read_text())["models"]["ps"] == promoted
    after = load_file(run / "pool" / "ps" / "model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_staged_files_are_checked_before_anything_is_written(experiment, tmp_path, capsys):
    bad = experiment()
    data = yaml.safe_load(bad.read_text())
    data["stages"][1]["models"] = ["ps", "c"]
    bad.write_text(yaml.safe_dump(data))
    run = tmp_path / "never"
    assert cli.main(["run", str(bad), "--run-dir", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {bad}: stages[1].models: 'c' is not in the pool at this stage (a, b, base, ps)\n"
    assert not run.exists()
    data["stages"][1]["models"] = ["ps", "b"]
    data["stages"][1]["search_space"] = {"kind": "dataflow", "repeat": 2}
    bad.write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(bad), "--run-dir", str(run), "--quiet"]) == 2
    assert "repeat" in capsys.readouterr().err and not run.exists()
    data["stages"][1]["search_space"] = {"kind": "dataflow", "repeats": 2}
    data["fitness"] = {"python": "fitness.py:nothing"}  # found only when the first stage's worker starts
    bad.write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(bad), "--run-dir", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err.endswith("'nothing' is not a function of " + str(tmp_path / "fitness.py") + "\n")
    assert not run.exists()
    run.mkdir()  # an empty folder of the user's: kept, and left empty
    assert cli.main(["run", str(bad), "--run-dir", str(run), "--quiet"]) == 2
    assert run.is_dir() and list(run.iterdir()) == []
    with pytest.raises(ConfigError, match="has stages; run it with `evomerge run`"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match=r"search_space: required field is missing \(or give stages:\)"):
        load_experiment(experiment(stages=None))


def test_a_staged_run_directory_is_not_overwritten_by_accident(experiment, tmp_path):
    run = tmp_path / "run"
    path = experiment(stages=[
        {"name": "ps", "search_space": str(REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"), "budget": {"evaluations": 2}},
    ])
    start_run(path, run_dir=run, progress=False)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="resume it with"):
        start_run(path, run_dir=run, progress=False)
    start_run(path, run_dir=run, progress=False, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine" and (run / "stages" / "ps" / "summary.json").is_file()


def test_plan_of_a_staged_experiment_plans_every_stage_over_its_pool(experiment, tmp_path, capsys, monkeypatch):
    path = experiment()
    monkeypatch.chdir(tmp_path)  # where runs/<name> would go
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["plan", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "staged" and report["fits"] is True
    ps, dfs = report["stages"]
    assert (ps["stage"], ps["name"], sorted(ps["models"])) == ("ps", "staged-ps", ["a", "b", "base"])
    assert (dfs["stage"], dfs["name"], sorted(dfs["models"])) == ("dfs", "staged-dfs", ["b", "ps"])
    # the promoted model does not exist yet: planned with the base's shapes, which a merge keeps
    assert dfs["models"]["ps"] == ps["models"]["base"]
    assert "ps: promoted by an earlier stage, planned with the layout of 'base'" in dfs["notes"]
    # the data-flow stage merges nothing: no operator caches, unlike the per-layer task arithmetic
    caches = {s["stage"]: next(p["bytes"] for p in s["parts"] if p["label"] == "operator caches") for s in (ps, dfs)}
    assert caches["ps"] > 0 and caches["dfs"] == 0
    assert cli.main(["plan", str(path)]) == 0
    table = capsys.readouterr().out
    assert "stage ps" in table and "stage dfs" in table and table.count("fits") >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # planning writes nothing
    data = yaml.safe_load(path.read_text())
    data["stages"][1]["models"] = ["ps", "c"]
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["plan", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: stages[1].models: 'c' is not in the pool at this stage (a, b, base, ps)\n"
