"""Executors and fitness kinds are plug-ins: one class and one decorator each, their own settings
validated from the experiment's block, a misplaced key a one-line error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from evomerge import cli
from evomerge.errors import ConfigError
from evomerge.experiment import Experiment, load_experiment
from evomerge.fitness.kinds import FITNESS_KINDS, FitnessKind, dump_fitness, parse_fitness, register_fitness
from evomerge.runtime import EXECUTORS, ExecutorSettings, LocalExecutor, parse_executor, register_executor, with_ray_address
from evomerge.runtime.ray_executor import RaySettings
from evomerge.store import RunStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def inline_executor():
    """An executor registered by a test, as a user's module would register one (removed afterwards)."""

    @register_executor("inline")
    class InlineExecutor(LocalExecutor):
        class Settings(ExecutorSettings):
            kind: str = "inline"
            label: str = "inline"

        @classmethod
        def start(cls, spec, settings):
            executor = super().start(spec, settings)
            executor.worker.name = settings.label
            return executor

    yield InlineExecutor
    del EXECUTORS["inline"]


@pytest.fixture
def constant_fitness(tmp_path):
    """A fitness kind registered by a test: every model scores ``constant``."""
    from evomerge.fitness import CallableFitness

    class ConstantSettings(BaseModel, extra="forbid"):
        constant: float

    @register_fitness("constant", marker="constant")
    class Constant(FitnessKind):
        Settings = ConstantSettings

        @classmethod
        def build(cls, settings, where):
            return CallableFitness(lambda model, tokenizer: {"score": settings.constant}, name=f"constant {settings.constant}")

    yield Constant
    del FITNESS_KINDS["constant"]


def experiment_file(folder: Path, family: dict[str, Path], **change) -> Path:
    data = {
        "name": "plugins", "models": {k: str(v) for k, v in family.items()}, "base": "base",
        "search_space": str(REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"),
        "strategy": {"name": "random"}, "fitness": {"python": "fitness.py:score"}, "budget": {"evaluations": 3},
        **change,
    }
    (folder / "fitness.py").write_text("def score(model, tokenizer):\n    return {'x': 1.0}\n")
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_registered_executor_runs_an_experiment_with_its_own_settings(inline_executor, constant_fitness, pico_family, tmp_path):
    path = experiment_file(tmp_path, pico_family, executor={"kind": "inline", "label": "mine", "threads": 1},
                           fitness={"constant": 0.25})
    assert cli.main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    with RunStore.open_reader(tmp_path / "run") as store:
        results = store.results()
        assert [r.worker for r in results] == ["mine"] * 3
        assert [r.evaluation.objectives.tolist() for r in results] == [[0.25]] * 3
        experiment = store.metadata["experiment"]
    assert experiment["executor"]["label"] == "mine" and experiment["fitness"] == {"constant": 0.25}
    restored = Experiment.from_snapshot(experiment, "snapshot")
    assert isinstance(restored.executor, inline_executor.Settings) and restored.executor.label == "mine"
    assert isinstance(restored.fitness, constant_fitness.Settings)


def test_a_key_of_another_executor_or_of_none_is_one_line(inline_executor):
    with pytest.raises(ConfigError, match=r"^exp: executor.label: a setting of executor 'inline', not of 'ray' \(the executor's kind\)$"):
        parse_executor({"kind": "ray", "label": "x"}, "exp")
    with pytest.raises(ConfigError, match=r"^exp: executor.workers: a setting of executor 'ray', not of 'inline'"):
        parse_executor({"kind": "inline", "workers": 2}, "exp")
    with pytest.raises(ConfigError, match=r"^exp: executor.lable: unknown key \(did you mean 'label'\?\); expected one of: kind, .*, label$"):
        parse_executor({"kind": "inline", "lable": "x"}, "exp")
    with pytest.raises(ConfigError, match=r"^exp: executor.kind: unknown executor 'inlin' \(did you mean 'inline'\?\); known: inline, local, ray$"):
        parse_executor({"kind": "inlin"}, "exp")


def test_fitness_kinds_are_implied_by_their_marker_or_named(constant_fitness):
    assert isinstance(parse_fitness({"constant": 1}, "exp"), constant_fitness.Settings)
    assert isinstance(parse_fitness({"kind": "constant", "constant": 1}, "exp"), constant_fitness.Settings)
    with pytest.raises(ConfigError, match=r"^exp: fitness.constant: Input should be a valid number"):
        parse_fitness({"kind": "constant", "constant": "x"}, "exp")
    with pytest.raises(ConfigError, match=r"^exp: heldout.kind: unknown fitness kind 'constnt' \(did you mean 'constant'\?\)"):
        parse_fitness({"kind": "constnt"}, "exp", "heldout")
    settings = parse_fitness({"constant": 2}, "exp")
    assert dump_fitness(settings) == {"constant": 2.0} and parse_fitness(dump_fitness(settings), "exp") == settings


def test_ray_settings_extend_the_shared_ones_and_ray_address_keeps_them(pico_family, tmp_path):
    path = experiment_file(tmp_path, pico_family, executor={"kind": "ray", "workers": 2, "placement": "compact", "threads": 1})
    experiment = load_experiment(path)
    assert isinstance(experiment.executor, RaySettings) and experiment.executor.workers == 2
    moved = with_ray_address(experiment, "ray://head:10001")
    assert (moved.executor.address, moved.executor.workers, moved.executor.placement) == ("ray://head:10001", 2, "compact")
    local = load_experiment(experiment_file(tmp_path, pico_family, executor={"device": "cpu", "dtype": "bfloat16", "threads": 1}))
    moved = with_ray_address(local, "auto")
    assert isinstance(moved.executor, RaySettings) and (moved.executor.kind, moved.executor.dtype, moved.executor.threads) == ("ray", "bfloat16", 1)


def test_snapshots_of_earlier_runs_still_load(pico_family):
    """Runs started before executors and fitness kinds were registries wrote their flat blocks without kinds."""
    old = {
        "name": "old", "seed": 0, "models": {k: str(v) for k, v in pico_family.items()}, "origins": {}, "base": "base",
        "search_space": {"method": "linear", "model_genes": {"weight": {}}}, "strategy": {"name": "random", "seed": None, "settings": {}},
        "objectives": ["fitness"], "fitness": {"python": "/x/fitness.py:score"}, "heldout": None,
        "budget": {"evaluations": 3, "minutes": None},
        "executor": {"kind": "ray", "device": "cpu", "dtype": "float32", "threads": 1, "address": None, "workers": 2,
                     "num_cpus": 2, "num_gpus": None, "worker_cpus": 1.0, "worker_gpus": None, "max_retries": 2},
        "checkpoint_every": 10, "run_dir": "/x/run", "source": "/x/exp.yaml",
    }
    experiment = Experiment.from_snapshot(old, "run/experiment.yaml")
    assert isinstance(experiment.executor, RaySettings) and experiment.executor.placement == "auto"
    assert experiment.snapshot()["fitness"] == {"python": "/x/fitness.py:score"}
