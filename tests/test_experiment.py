"""Experiment files: every mistake is one line naming the field (exit code 2, no run directory
left behind); valid files resolve paths, zoo references, the held-out fitness and overrides."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from evomerge import cli
from evomerge.errors import ConfigError, ModelError
from evomerge.experiment import CallableFitnessConfig, Experiment, load_experiment
from evomerge.fitness import FitnessSpec

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"


@pytest.fixture
def folder(tmp_path, pico_family) -> Path:
    """A folder with links to the pico family, a fitness module and a valid experiment."""
    for name, path in pico_family.items():
        (tmp_path / name).symlink_to(path)
    (tmp_path / "fitness.py").write_text("def score(model, tokenizer):\n    return {'x': 1.0}\n")
    (tmp_path / "tasks").mkdir()
    return tmp_path


def valid() -> dict:
    return {
        "name": "t",
        "models": {"base": "base", "a": "expert_1", "b": "expert_2"},
        "base": "base",
        "search_space": str(SPACE),
        "strategy": {"name": "cmaes", "settings": {"sigma0": 0.3}},
        "fitness": {"python": "fitness.py:score"},
        "budget": {"evaluations": 5},
    }


LM_FITNESS = {"include_path": "tasks", "limit": 10, "tasks": [{"task": "zoo_add_b"}, {"task": "zoo_qa_b", "weight": 0.5}]}

# (id, change to the valid experiment (None removes a key), the expected message after "<file>: ")
MALFORMED = [
    ("unknown-key", {"checkpoint_evry": 5}, "checkpoint_evry: unknown key (did you mean 'checkpoint_every'?); "
     "expected one of: name, seed, zoo, models, base, search_space, strategy, objectives, fitness, heldout, budget, "
     "executor, checkpoint_every, run_dir"),
    ("budget-typo", {"budget": {"evaluation": 5}},
     "budget.evaluation: unknown key (did you mean 'evaluations'?); expected one of: evaluations, minutes"),
    ("strategy-typo", {"strategy": {"name": "cmaes", "setting": {}}},
     "strategy.setting: unknown key (did you mean 'settings'?); expected one of: name, seed, settings"),
    ("executor-typo", {"executor": {"devise": "cpu"}},
     "executor.devise: unknown key (did you mean 'device'?); expected one of: kind, device, dtype, threads, reproducible, placement, cache_memory"),
    ("zoo-typo", {"zoo": {"specs": "default"}}, "zoo.specs: unknown key (did you mean 'spec'?); expected one of: spec, dir"),
    ("missing-strategy", {"strategy": None}, "strategy: required field is missing"),
    ("one-model", {"models": {"base": "base"}},
     "models: expected at least 2 models (a base and a source, or two sources), got 1"),
    ("models-list", {"models": ["base", "expert_1"]}, "models: Input should be a valid dictionary"),
    ("base-not-a-model", {"base": "nope"}, "base: 'nope' is not one of the models (base, a, b)"),
    ("name-not-a-folder", {"name": "a/b"},
     "name: expected letters, digits, '.', '_' or '-' (a folder name), got 'a/b'"),
    ("seed-not-int", {"seed": "x"}, "seed: Input should be a valid integer, unable to parse string as an integer"),
    ("budget-empty", {"budget": {}}, "budget: expected evaluations and/or minutes"),
    ("budget-zero", {"budget": {"evaluations": 0}}, "budget.evaluations: Input should be greater than or equal to 1"),
    ("budget-negative-minutes", {"budget": {"minutes": -1}}, "budget.minutes: Input should be greater than 0"),
    ("executor-kind", {"executor": {"kind": "slurm"}}, "executor.kind: unknown executor 'slurm'; known: local, ray"),
    ("executor-ray-field", {"executor": {"address": "auto"}}, "executor.address: a setting of executor 'ray', not of 'local' (the executor's kind)"),
    ("executor-placement", {"executor": {"placement": "gpu"}},
     "executor.placement: Input should be 'auto', 'resident', 'compact' or 'streamed'"),
    ("executor-cache", {"executor": {"cache_memory": "lots"}}, "executor.cache_memory: expected 'auto' or a size like 80GB or 512MB, got 'lots'"),
    ("executor-workers", {"executor": {"kind": "ray", "workers": 0}}, "executor.workers: Input should be greater than or equal to 1"),
    ("executor-device", {"executor": {"device": "tpu9"}},
     "executor.device: expected a torch device such as cpu, cuda or cuda:1, got 'tpu9'"),
    ("executor-dtype", {"executor": {"dtype": "float64"}},
     "executor.dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
    ("checkpoint-zero", {"checkpoint_every": 0}, "checkpoint_every: Input should be greater than or equal to 1"),
    ("objectives-twice", {"objectives": ["fitness", "fitness"]}, "objectives: 'fitness' appears twice"),
    ("objective-unknown", {"objectives": ["acc"], "fitness": LM_FITNESS},
     "objectives[0]: 'acc' is not an objective of the fitness; known: zoo_add_b, zoo_qa_b, fitness"),
    ("python-reference", {"fitness": {"python": "nofunction"}},
     "fitness.python: expected 'module:function' or 'file.py:function', got 'nofunction'"),
    ("callable-typo", {"fitness": {"python": "fitness.py:score", "weight": {"x": 1}}},
     "fitness.weight: unknown key (did you mean 'weights'?); expected one of: python, weights, directions, version, workload"),
    ("fitness-kind", {"fitness": {"kind": "lm_evl"}}, "fitness.kind: unknown fitness kind 'lm_evl' (did you mean 'lm_eval'?); known: lm_eval, python"),
    ("lm-eval-typo", {"fitness": {**LM_FITNESS, "limt": 3}},
     "fitness.limt: unknown key (did you mean 'limit'?); expected one of: tasks, include_path, split, limit, seed, "
     "batch_size, num_fewshot, apply_chat_template, fewshot_as_multiturn, system_instruction, gen_kwargs, racing, "
     "device, dtype"),
    ("lm-eval-weight", {"fitness": {**LM_FITNESS, "tasks": [{"task": "zoo_add_b", "weight": -1}]}},
     "fitness.tasks[0].weight: Input should be greater than or equal to 0"),
    ("heldout-typo", {"fitness": LM_FITNESS, "heldout": {"splitt": "test"}},
     "heldout.splitt: unknown key (did you mean 'split'?); expected one of: tasks, include_path, split, limit, seed, "
     "batch_size, num_fewshot, apply_chat_template, fewshot_as_multiturn, system_instruction, gen_kwargs, racing, "
     "device, dtype"),
    ("racing-reproducible", {"fitness": {**LM_FITNESS, "racing": {}}, "executor": {"reproducible": True}},
     "fitness.racing: not available with executor.reproducible: true (the bar a candidate races against depends on "
     "which results have arrived); drop one of them"),
    ("heldout-number", {"heldout": 3}, "heldout: expected true, false or a mapping of fitness overrides, got 3"),
    ("space-number", {"search_space": 3}, "search_space: expected a search-space file path or an inline mapping, got int"),
    ("space-missing-file", {"search_space": "nope.yaml"}, "search_space: file not found: {folder}/nope.yaml"),
]
# Mistakes found after the schema: a model folder, the zoo, the space, the strategy, the fitness code.
MALFORMED_LATER = [
    ("model-folder-missing", {"models": {"base": "base", "a": "nowhere"}}, "models.a: folder not found: {folder}/nowhere"),
    ("zoo-model-missing", {"models": {"base": "base", "a": "zoo:skill"}},
     "models.a: zoo model 'skill' not found in {folder}/zoo (run `evomerge zoo build` or add a zoo: section)"),
    ("space-unknown-method", {"search_space": {"method": "tiess", "model_genes": {"weight": {}}}},
     "search_space.method: unknown merge method 'tiess' (did you mean 'ties'?); known: "),
    ("strategy-unknown", {"strategy": {"name": "cma"}},
     "strategy.name: unknown strategy 'cma' (did you mean 'cmaes'?); known: cmaes, map, natural_niches, optuna, random"),
    ("strategy-setting", {"strategy": {"name": "cmaes", "settings": {"sigma0": 5}}},
     "strategy.settings: sigma0: Input should be less than or equal to 1"),
    ("python-file-missing", {"fitness": {"python": "other.py:score"}}, "fitness.python: file not found: {folder}/other.py"),
    ("python-not-a-function", {"fitness": {"python": "fitness.py:nothing"}},
     "fitness.python: 'nothing' is not a function of {folder}/fitness.py"),
]


def write(folder: Path, change: dict, name: str = "exp.yaml") -> Path:
    data = copy.deepcopy(valid())
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in MALFORMED + MALFORMED_LATER],
                         ids=[c[0] for c in MALFORMED + MALFORMED_LATER])
def test_malformed_experiment_is_one_line_and_leaves_no_run_dir(folder, change, message, capsys, monkeypatch):
    monkeypatch.setenv("EVOMERGE_ZOO", str(folder / "zoo"))
    path = write(folder, change)
    assert cli.main(["run", str(path), "--run-dir", str(folder / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    expected = message.format(folder=folder)
    prefix = f"error: {path}: "
    assert err.startswith(prefix) and err.endswith("\n") and err.count("\n") == 1, err
    assert err[len(prefix):].rstrip("\n").startswith(expected), err
    assert not (folder / "run").exists()


def test_count_of_malformed_files():
    assert len(MALFORMED) + len(MALFORMED_LATER) >= 20


def test_yaml_errors_are_one_line(folder, capsys):
    cases = {"syntax.yaml": "name: [unclosed\n", "list.yaml": "- a\n- b\n", "empty.yaml": ""}
    messages = {
        "syntax.yaml": "invalid YAML: ",
        "list.yaml": "expected a mapping at the top level",
        "empty.yaml": "expected a mapping at the top level",
    }
    for name, text in cases.items():
        (folder / name).write_text(text)
        assert cli.main(["run", str(folder / name), "--run-dir", str(folder / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {folder / name}") and messages[name] in err and err.count("\n") == 1
    assert not (folder / "run").exists()


def test_debug_shows_the_traceback(folder):
    path = write(folder, {"budget": {}})
    with pytest.raises(ConfigError, match="budget: expected evaluations and/or minutes"):
        cli.main(["--debug", "run", str(path)])
    with pytest.raises(ConfigError, match="budget: expected evaluations and/or minutes"):
        cli.main(["run", str(path), "--debug"])


def test_bad_budget_override(folder, capsys):
    path = write(folder, {})
    assert cli.main(["run", str(path), "--budget", "0", "--run-dir", str(folder / "run")]) == 2
    assert capsys.readouterr().err == f"error: {path}: --budget: expected at least 1 evaluation, got 0\n"


# -- resolution ------------------------------------------------------------------------------


def test_paths_are_resolved_relative_to_the_file_and_the_space_is_inlined(folder, monkeypatch):
    sub = folder / "experiments"
    sub.mkdir()
    data = valid()
    data["models"] = {"base": "../base", "a": "../expert_1", "b": "../expert_2"}
    data["fitness"] = {"python": "../fitness.py:score"}
    data["run_dir"] = "../runs/x"
    (sub / "e.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(folder / "tasks")
    experiment = load_experiment(sub / "e.yaml")
    assert experiment.models == {name: str((folder / p).resolve()) for name, p in
                                 {"base": "base", "a": "expert_1", "b": "expert_2"}.items()}
    assert experiment.fitness == CallableFitnessConfig(python=f"{folder.resolve()}/fitness.py:score")
    assert experiment.search_space == yaml.safe_load(SPACE.read_text())
    assert experiment.run_dir == str((folder / "runs" / "x").resolve())
    assert experiment.strategy_seed == 0 and experiment.checkpoint_every == 10 and experiment.heldout is None
    data.pop("run_dir")
    (sub / "e.yaml").write_text(yaml.safe_dump(data))
    assert load_experiment(sub / "e.yaml").run_dir == str((folder / "tasks" / "runs" / "t").resolve())
    assert load_experiment(sub / "e.yaml", run_dir="elsewhere").run_dir == str((folder / "tasks" / "elsewhere").resolve())


def test_overrides_seed_budget(folder):
    data = valid()
    data["seed"] = 4
    data["strategy"]["seed"] = 9
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    experiment = load_experiment(folder / "e.yaml")
    assert (experiment.seed, experiment.strategy_seed, experiment.budget.evaluations) == (4, 9, 5)
    overridden = load_experiment(folder / "e.yaml", seed=11, budget=40)
    assert (overridden.seed, overridden.strategy_seed, overridden.budget.evaluations) == (11, 11, 40)


def test_heldout_is_the_fitness_on_the_test_split_with_overrides(folder):
    data = valid()
    data["fitness"] = LM_FITNESS
    data["heldout"] = True
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    experiment = load_experiment(folder / "e.yaml")
    assert isinstance(experiment.fitness, FitnessSpec)
    assert experiment.fitness.include_path == [str((folder / "tasks").resolve())]
    assert experiment.fitness.split == "validation"
    assert experiment.heldout == experiment.fitness.model_copy(update={"split": "test"})
    data["heldout"] = {"limit": None, "tasks": [{"task": "zoo_add_b"}]}
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    heldout = load_experiment(folder / "e.yaml").heldout
    assert (heldout.split, heldout.limit, [t.task for t in heldout.tasks]) == ("test", None, ["zoo_add_b"])
    data["heldout"] = False
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    assert load_experiment(folder / "e.yaml").heldout is None


def test_snapshot_round_trips(folder):
    data = valid()
    data["heldout"] = {"python": "fitness.py:score", "directions": {"x": "minimize"}}
    data["objectives"] = ["x"]
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    experiment = load_experiment(folder / "e.yaml")
    snapshot = json.loads(json.dumps(experiment.snapshot()))
    assert Experiment.from_snapshot(snapshot, "snap") == experiment
    data["fitness"] = LM_FITNESS
    data["heldout"] = True
    data["objectives"] = ["zoo_add_b", "fitness"]
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    experiment = load_experiment(folder / "e.yaml")
    assert Experiment.from_snapshot(json.loads(json.dumps(experiment.snapshot())), "snap") == experiment


def _fake_zoo(root: Path, pico_family: dict[str, Path], names: dict[str, str], spec_hash: str = "x") -> None:
    """A zoo folder whose models are links to pico models, with a zoo.json naming their folders."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for model, pico in names.items():
        (root / f"folder_{model}").symlink_to(pico_family[pico])
        entries.append({"name": model, "folder": f"folder_{model}", "role": "expert", "trained_on": "-", "parent": None,
                        "params": 1, "train_steps": 1, "train_seconds": 0.0, "final_loss": 0.0, "scores": {}})
    index = {"spec_hash": spec_hash, "build_seconds": 0.0, "threads": 1, "tasks": [], "lm_eval_tasks": [], "settings": [],
             "models": entries}
    (root / "zoo.json").write_text(json.dumps(index))


def test_zoo_references_use_the_index_and_the_environment(folder, pico_family, monkeypatch):
    _fake_zoo(folder / "myzoo", pico_family, {"base": "base", "skill": "expert_1"})
    monkeypatch.setenv("EVOMERGE_ZOO", str(folder / "myzoo"))
    data = valid()
    data["models"] = {"base": "zoo:base", "a": "zoo:skill", "b": "expert_2"}
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    experiment = load_experiment(folder / "e.yaml")
    assert experiment.models["a"] == str(folder / "myzoo" / "folder_skill")
    assert experiment.models["b"] == str((folder / "expert_2").resolve())
    data["models"]["b"] = "zoo:lang"
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError, match="models.b: zoo: no model 'lang'; models: base, skill"):
        load_experiment(folder / "e.yaml")


def _zoo_experiment(folder: Path, zoo: dict) -> Path:
    data = valid()
    data["zoo"] = zoo
    data["models"] = {"base": "zoo:base", "a": "zoo:skill", "b": "zoo:lang"}
    (folder / "e.yaml").write_text(yaml.safe_dump(data))
    return folder / "e.yaml"


def test_loading_never_builds_the_zoo_and_run_set_up_does(folder, pico_family, monkeypatch, capsys):
    """``load_experiment`` and ``evomerge space`` (a preview) never build a zoo: a missing or outdated
    one is a one-line error saying how to build it. ``prepare_zoo`` (what ``run`` calls) builds it."""
    import evomerge.zoo.build as zoo_build
    from evomerge.zoo.spec import load_spec, spec_hash

    default = Path(zoo_build.__file__).parent / "default.yaml"
    key = spec_hash(load_spec(default))
    calls = []

    def fake_build(spec, out, force=False):
        calls.append((Path(spec), Path(out)))
        _fake_zoo(Path(out), pico_family, {"base": "base", "skill": "expert_1", "lang": "expert_2"}, key)

    monkeypatch.setattr(zoo_build, "build_zoo", fake_build)
    monkeypatch.delenv("EVOMERGE_ZOO", raising=False)
    path, built = _zoo_experiment(folder, {"dir": "built"}), (folder / "built").resolve()
    assert cli.main(["space", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: zoo: {built} is missing; build it with `evomerge zoo build --out {built}` "
        "(`evomerge run` builds it too)\n"
    )
    assert calls == [] and not built.exists()

    from evomerge.experiment import prepare_zoo

    prepare_zoo(path)
    assert calls == [(default, built)]
    experiment = load_experiment(path)
    assert experiment.models["b"] == str(built / "folder_lang")
    assert cli.main(["space", str(path), "--recipe-only"]) == 0 and calls == [(default, built)]

    (built / "zoo.json").write_text((built / "zoo.json").read_text().replace(key, "another"))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(info.value) == (
        f"{path}: zoo: {built} is built from another spec or incomplete; build it with "
        f"`evomerge zoo build --out {built}` (`evomerge run` builds it too)"
    )
    (folder / "custom.yaml").write_text(default.read_text())
    path = _zoo_experiment(folder, {"spec": "custom.yaml", "dir": "built"})
    with pytest.raises(ConfigError, match=f"--out {built} --spec {folder}/custom.yaml`"):
        load_experiment(path)
    path = _zoo_experiment(folder, {"spec": "missing.yaml", "dir": "built"})
    for load in (load_experiment, prepare_zoo):
        with pytest.raises(ConfigError, match=f"zoo.spec: file not found: {folder}/missing.yaml"):
            load(path)
    assert len(calls) == 1


def test_run_refuses_to_build_a_zoo_over_a_folder_that_is_not_one(folder, monkeypatch, capsys):
    """``zoo.dir`` (or $EVOMERGE_ZOO) naming the user's own folder: one line, exit 2, nothing
    trained, written or deleted — not even its ``fitness/`` or a folder named like a zoo model."""
    import evomerge.zoo.build as zoo_build

    monkeypatch.setattr(zoo_build, "_build", lambda *a, **k: pytest.fail("trained a zoo into the user's folder"))
    mine = folder / "mine"
    for name, text in {"thesis.tex": "text", "fitness/my_task.yaml": "task: mine", "base/weights.txt": "1 2 3"}.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = sorted((str(p.relative_to(mine)), p.read_bytes()) for p in mine.rglob("*") if p.is_file())
    refusal = (
        f"{mine}: not a zoo folder (no zoo.json) and not empty; a zoo is built only into a new, empty or zoo "
        "folder, so nothing was written: choose another folder (--out, $EVOMERGE_ZOO or zoo.dir)"
    )
    path = _zoo_experiment(folder, {"dir": "mine"})
    assert cli.main(["run", str(path), "--run-dir", str(folder / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {refusal}\n"
    monkeypatch.setenv("EVOMERGE_ZOO", str(mine))
    assert cli.main(["zoo", "build", "--out", str(mine)]) == 2
    assert capsys.readouterr().err == f"error: {refusal}\n"
    assert sorted((str(p.relative_to(mine)), p.read_bytes()) for p in mine.rglob("*") if p.is_file()) == before
    assert not (folder / "run").exists()
