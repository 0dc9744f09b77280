"""The Ray executor on a local Ray instance (CPU): the same run as the local executor, steady-state
dispatch over two workers with every result recorded once, a killed worker replaced and its
candidate re-run, per-worker status, and configuration errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

from evomerge import cli  # noqa: E402
from evomerge.errors import ConfigError  # noqa: E402
from evomerge.run import Driver, resume_run, start_run  # noqa: E402
from evomerge.status import run_status  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"

# A deterministic fitness of the merged pico model. With a kill.json beside it, the worker process
# kills itself on the call it names (calls counted across processes in a file): a lost worker.
# (A file, not an environment variable: Ray's worker processes keep the environment of ray.init.)
FITNESS = """
import json, os, signal
from pathlib import Path

def quality(model, tokenizer):
    plan = Path(__file__).with_name("kill.json")
    if plan.is_file():
        kill = json.loads(plan.read_text())
        with open(kill["counter"], "a") as f:
            f.write("x")
        with open(kill["counter"]) as f:
            calls = len(f.read())
        if calls == kill["at"]:
            os.kill(os.getpid(), signal.SIGKILL)
    x = float(model.model.layers[0].mlp.up_proj.weight.detach().double().sum())
    h = float(model.lm_head.weight.detach().double().sum())
    return {"quality": -((x + 2.45) ** 2) - (h - 0.45) ** 2}


def broken(model, tokenizer):
    raise ValueError(f"diverged in process {os.getpid()}")
"""


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (start-up costs seconds); workers see the test's env."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def experiment(tmp_path, pico_family):
    (tmp_path / "fitness.py").write_text(FITNESS)

    def make(name: str, executor: dict, budget: int = 12, strategy: dict | None = None) -> Path:
        data = {
            "name": name,
            "seed": 5,
            "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
            "base": "base",
            "search_space": str(SPACE),
            "strategy": strategy or {"name": "cmaes", "settings": {"sigma0": 0.3, "popsize": 4}},
            "fitness": {"python": "fitness.py:quality"},
            "budget": {"evaluations": budget},
            "executor": {"threads": 1, **executor},
            "checkpoint_every": 4,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def results(run: Path) -> list[tuple[int, list[float]]]:
    with RunStore.open_reader(run) as store:
        return sorted((r.ticket, r.evaluation.objectives.tolist()) for r in store.results())


def test_one_ray_worker_gives_the_local_run(ray_instance, experiment, tmp_path):
    local = start_run(experiment("local", {"kind": "local"}), run_dir=tmp_path / "local", progress=False)
    remote = start_run(experiment("remote", {"kind": "ray", "workers": 1}), run_dir=tmp_path / "remote", progress=False)
    assert results(tmp_path / "remote") == results(tmp_path / "local")
    assert remote["best"] == local["best"] and remote["rows"] == local["rows"]
    with RunStore.open_reader(tmp_path / "remote") as store:
        assert {r.worker for r in store.results()} == {"ray/0"}
    status = run_status(tmp_path / "remote")
    (worker,) = status["workers"]
    assert (status["executor"], worker["name"], worker["evaluations"], worker["failures"]) == ("ray", "ray/0", 12 + 5, 0)
    assert worker["pid"] != os.getpid()  # the merge and evaluation ran in the actor's process


def test_two_workers_record_every_candidate_once(ray_instance, experiment, tmp_path, capsys):
    path = experiment("two", {"kind": "ray", "workers": 2}, budget=16, strategy={"name": "random"})
    start_run(path, run_dir=tmp_path / "two", progress=False)
    recorded = results(tmp_path / "two")
    assert [ticket for ticket, _ in recorded] == list(range(16))
    with RunStore.open_reader(tmp_path / "two") as store:
        workers = [r.worker for r in store.results()]
    assert set(workers) == {"ray/0", "ray/1"} and min(workers.count("ray/0"), workers.count("ray/1")) >= 4
    assert cli.main(["status", str(tmp_path / "two")]) == 0
    out = capsys.readouterr().out
    assert "worker ray/0: stopped on" in out and "worker ray/1: stopped on" in out


def kill_on_call(folder: Path, call: int) -> None:
    (folder / "calls.txt").write_text("")
    (folder / "kill.json").write_text(json.dumps({"counter": str(folder / "calls.txt"), "at": call}))


def test_a_killed_worker_is_replaced_and_its_candidate_rerun(ray_instance, experiment, tmp_path):
    kill_on_call(tmp_path, 5)
    path = experiment("killed", {"kind": "ray", "workers": 1}, budget=8)
    start_run(path, run_dir=tmp_path / "killed", progress=False)
    (tmp_path / "kill.json").unlink()
    killed = results(tmp_path / "killed")
    start_run(experiment("clean", {"kind": "local"}, budget=8), run_dir=tmp_path / "clean", progress=False)
    assert killed == results(tmp_path / "clean")  # nothing lost, nothing counted twice, same search
    (worker,) = json.loads((tmp_path / "killed" / "workers.json").read_text())["workers"]
    assert (worker["restarts"], worker["failures"]) == (1, 1)


def test_a_worker_dying_on_every_retry_fails_the_candidate(ray_instance, experiment, tmp_path):
    kill_on_call(tmp_path, 1)
    path = experiment("doomed", {"kind": "ray", "workers": 1, "max_retries": 0}, budget=2, strategy={"name": "random"})
    start_run(path, run_dir=tmp_path / "doomed", progress=False)
    with RunStore.open_reader(tmp_path / "doomed") as store:
        first, second = store.results()
    assert not first.ok and first.error.startswith("worker ray/0 died 1 times running this candidate: ")
    assert second.ok


def test_ray_configuration_errors(ray_instance, experiment, tmp_path):
    with pytest.raises(ConfigError, match=r"executor.worker_gpus: 1 GPU per worker, but the Ray cluster has 0"):
        start_run(experiment("gpu", {"kind": "ray", "worker_gpus": 1}), run_dir=tmp_path / "gpu", progress=False)
    assert not (tmp_path / "gpu").exists()


def test_ray_address_on_the_command_line_moves_a_local_experiment_onto_ray(ray_instance, experiment, tmp_path):
    path = experiment("cli", {"kind": "local"}, budget=4, strategy={"name": "random"})
    assert cli.main(["run", str(path), "--run-dir", str(tmp_path / "cli"), "--ray-address", "auto", "--quiet"]) == 0
    status = run_status(tmp_path / "cli")
    assert status["executor"] == "ray" and status["evaluations"] == 4
    assert [w["name"] for w in status["workers"]] == ["ray/0", "ray/1"]  # one per CPU slot of the instance


def test_a_candidate_that_raises_in_the_worker_is_recorded_as_failed(ray_instance, experiment, tmp_path):
    path = experiment("raises", {"kind": "ray", "workers": 1}, budget=2, strategy={"name": "random"})
    data = yaml.safe_load(path.read_text())
    data["fitness"] = {"python": "fitness.py:broken"}
    path.write_text(yaml.safe_dump(data))
    start_run(path, run_dir=tmp_path / "raises", progress=False)
    with RunStore.open_reader(tmp_path / "raises") as store:
        records = store.results()
    assert [r.ok for r in records] == [False, False]
    pids = {r.error for r in records}
    assert all(e.startswith("ValueError: diverged in process ") and e != f"ValueError: diverged in process {os.getpid()}" for e in pids)


def test_a_driver_stopped_mid_run_resumes_on_ray_with_in_flight_candidates_requeued(ray_instance, experiment, tmp_path, monkeypatch):
    start_run(experiment("whole", {"kind": "local"}, budget=10), run_dir=tmp_path / "whole", progress=False)
    path = experiment("halves", {"kind": "ray", "workers": 1}, budget=10)
    complete = Driver._complete
    seen = []

    def stop_after_four(self, outcome):
        if len(seen) == 4:
            raise KeyboardInterrupt  # the driver dies with a candidate in flight
        seen.append(outcome.key)
        complete(self, outcome)

    monkeypatch.setattr(Driver, "_complete", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        start_run(path, run_dir=tmp_path / "halves", progress=False)
    monkeypatch.undo()
    with RunStore.open_reader(tmp_path / "halves") as store:
        assert (len(store.results()), store.counts()["running"]) == (4, 1)  # the 5th: scored, never recorded
    resume_run(tmp_path / "halves", progress=False, ray_address="auto")
    assert results(tmp_path / "halves") == results(tmp_path / "whole")
