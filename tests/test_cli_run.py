"""``evomerge run / resume / status`` as a user runs them: an lm-eval fitness on a pico family, the
summary table, ``status --json`` (in its own process) on the finished run, the command-line overrides."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge import cli
from evomerge.recipe import recipe_from_dict
from evomerge.store import RunStore

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"


def write_task(folder: Path) -> None:
    """A multiple-choice task over the pico vocabulary, with validation and test splits."""
    rng = random.Random(0)
    for split, n in (("validation", 16), ("test", 12)):
        rows = [{"a": rng.randrange(10), "b": rng.randrange(10), "gold": rng.randrange(4)} for _ in range(n)]
        (folder / f"mc_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "pico_mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "pico_mc",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {s: str(folder / f"mc_{s}.jsonl") for s in ("validation", "test")}},
                "validation_split": "validation",
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{a}} plus {{b}} is",
                "doc_to_choice": ["1", "2", "3", "4"],
                "doc_to_target": "{{gold}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            },
            sort_keys=False,
        )
    )


@pytest.fixture
def experiment(tmp_path, pico_family) -> Path:
    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks")
    data = {
        "name": "cli",
        "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
        "base": "base",
        "search_space": str(SPACE),
        "strategy": {"name": "random"},
        "fitness": {"include_path": "tasks", "tasks": [{"task": "pico_mc", "metric": "acc"}], "batch_size": 8},
        "heldout": True,
        "budget": {"evaluations": 50},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def evomerge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_run_then_status_json_with_lm_eval(experiment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "160")
    assert cli.main(["run", str(experiment), "--budget", "4", "--seed", "5"]) == 0
    done = capsys.readouterr()
    run = tmp_path / "runs" / "cli"  # the default run directory: runs/<name> under the current directory
    assert "cli: best merge vs sources on the test split" in done.out
    for label in ("best merge (#", "│ a ", "│ b ", "│ base ", "│ uniform average "):
        assert label in done.out, done.out
    assert "4/4 evaluations" in done.err  # the progress line's final state

    status = evomerge("status", str(run), "--json", cwd=tmp_path)  # a separate process, as a user runs it
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    with RunStore.open_reader(run) as store:
        results = store.results()
        (heldout,) = store.results("test")
        metadata = store.metadata
    best = max((r for r in results if r.ok), key=lambda r: (r.evaluation.objectives[0], -r.ticket))
    assert data["evaluations"] == 4 and data["failed"] == 0 and data["done"] is True
    assert data["budget"] == {"evaluations": 4, "minutes": None}
    assert data["best"] == {
        "candidate": best.ticket,
        "objectives": {"fitness": best.evaluation.objectives[0]},
        "heldout": {"fitness": heldout.evaluation.objectives[0]},
    }
    assert heldout.ticket == best.ticket
    assert data["throughput"]["candidates_per_hour"] > 0
    assert metadata["experiment"]["seed"] == 5 and metadata["experiment"]["strategy"]["seed"] is None
    for result in results:  # accuracy on 16 validation examples, with per-example correctness kept
        scores = result.evaluation.per_example
        assert scores.shape == (16,) and set(scores.tolist()) <= {0.0, 1.0}
        assert result.evaluation.objectives[0] == pytest.approx(scores.mean())
    assert heldout.evaluation.per_example.shape == (12,)
    summary = data["summary"]
    assert summary["columns"] == ["fitness", "pico_mc"] and len(summary["rows"]) == 5
    assert summary["rows"][0]["objectives"]["pico_mc"] == heldout.evaluation.objectives[0]

    text = evomerge("status", str(run), cwd=tmp_path)
    assert text.returncode == 0 and "cli (random) — done" in text.stdout and f"best: candidate #{best.ticket}" in text.stdout


def test_overrides_and_quiet_in_process(experiment, tmp_path, capsys, monkeypatch):
    data = yaml.safe_load(experiment.read_text())
    data["fitness"] = {"python": "fitness.py:score"}
    data["heldout"] = None
    (tmp_path / "fitness.py").write_text(
        "def score(model, tokenizer):\n    return {'x': float(model.lm_head.weight.detach().double().sum())}\n"
    )
    experiment.write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(experiment), "--run-dir", str(tmp_path / "r"), "--budget", "3", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    with RunStore.open_reader(tmp_path / "r") as store:
        assert store.count() == 3 and store.metadata["experiment"]["budget"]["evaluations"] == 3
    assert cli.main(["status", str(tmp_path / "r"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["split"] == "validation"
    assert cli.main(["resume", str(tmp_path / "r"), "--quiet"]) == 0
    assert cli.main(["status", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'}: no run store found (expected run.sqlite)\n"


def test_ctrl_c_stops_cleanly_and_the_run_resumes(experiment, tmp_path, capsys, monkeypatch):
    data = yaml.safe_load(experiment.read_text())
    data.update(fitness={"python": "fitness.py:score"}, heldout=None, budget={"evaluations": 5})
    (tmp_path / "fitness.py").write_text(
        "import os\n"
        "def score(model, tokenizer):\n"
        "    calls = int(os.environ.get('CLI_TEST_CALLS', '0')) + 1\n"
        "    os.environ['CLI_TEST_CALLS'] = str(calls)\n"
        "    if calls == 3:\n"
        "        raise KeyboardInterrupt\n"
        "    return {'x': float(model.lm_head.weight.detach().double().sum())}\n"
    )
    experiment.write_text(yaml.safe_dump(data))
    run = tmp_path / "r"
    monkeypatch.setenv("CLI_TEST_CALLS", "0")  # the fitness counts its calls here; restored after the test
    assert cli.main(["run", str(experiment), "--run-dir", str(run), "--quiet"]) == 130
    assert capsys.readouterr().err == f"stopped after 2 results; continue with `evomerge resume {run}`\ninterrupted\n"
    with RunStore.open_reader(run) as store:
        assert (store.count(), len(store.results()), store.counts()["running"]) == (3, 2, 1)
    assert cli.main(["resume", str(run), "--quiet"]) == 0
    with RunStore.open_reader(run) as store:
        assert [r.ticket for r in store.results()] == [0, 1, 2, 3, 4] and all(r.ok for r in store.results())


def test_space_prints_genes_and_the_decoded_recipe(experiment, pico_family, capsys):
    assert cli.main(["space", str(experiment), "--genome", "random", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    header, rest = out.split("recipe (random genome):\n")
    genes = [line.split(" = ") for line in header.splitlines()[2:]]
    layers = 2  # the pico family's depth
    assert header.startswith(f"dimension: {2 * (layers + 1)}\ngenes:\n") and len(genes) == 2 * (layers + 1)
    values = np.random.default_rng(4).random(len(genes))
    assert [float(v) for _, v in genes] == pytest.approx(values, abs=5e-4)
    recipe = recipe_from_dict(yaml.safe_load(rest))
    assert recipe.method == "task_arithmetic" and recipe.models["a"] == str(pico_family["expert_1"])
    assert recipe.model_parameters["a"]["weight"] == pytest.approx(2.0 * values[0])  # weight in [0, 2]

    genome = ",".join(["1"] * len(genes))
    assert cli.main(["space", str(experiment), "--genome", genome, "--recipe-only"]) == 0
    recipe = recipe_from_dict(yaml.safe_load(capsys.readouterr().out.split("recipe (")[1].split(":\n", 1)[1]))
    assert recipe.model_parameters == {"a": {"weight": 2.0}, "b": {"weight": 2.0}}

    assert cli.main(["space", str(experiment), "--genome", "1,2"]) == 2
    assert capsys.readouterr().err == f"error: --genome: expected {len(genes)} numbers in [0, 1], got 2 value(s) '1,2'\n"
    assert cli.main(["space", str(experiment), "--genome", "x"]) == 2
    assert "--genome: expected 'init', 'random' or" in capsys.readouterr().err


# -- what --overwrite may delete --------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): what must survive a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _callable(experiment: Path, **changes) -> Path:
    data = yaml.safe_load(experiment.read_text())
    data.update(fitness={"python": "fitness.py:score"}, heldout=None, budget={"evaluations": 3}, **changes)
    (experiment.parent / "fitness.py").write_text(
        "def score(model, tokenizer):\n    return {'x': float(model.lm_head.weight.detach().double().sum())}\n"
    )
    experiment.write_text(yaml.safe_dump(data))
    return experiment


def test_overwrite_refuses_a_folder_that_is_not_a_run(experiment, tmp_path, capsys):
    """A thesis and a src/ tree named as the run directory (by --run-dir or by run_dir:) are not
    touched: one line, exit 2, not even a lock file; nor is a folder whose run.sqlite is not ours."""
    user = tmp_path / "thesis"
    (user / "src" / "pkg").mkdir(parents=True)
    (user / "thesis.tex").write_text("\\chapter{Results}\n")
    (user / "src" / "pkg" / "main.py").write_text("print('years of work')\n")
    (user / "src" / "notes.md").write_text("todo\n")
    before = _files(user)
    refusal = (
        f"error: {user}: not an evomerge run (no run.sqlite) and not empty; --overwrite only replaces a run, "
        "so nothing was deleted: choose a new run directory\n"
    )
    _callable(experiment)
    assert cli.main(["run", str(experiment), "--run-dir", str(user), "--overwrite", "--quiet"]) == 2
    assert capsys.readouterr().err == refusal
    assert _files(user) == before and sorted(p.name for p in user.iterdir()) == ["src", "thesis.tex"]

    _callable(experiment, run_dir="thesis")
    assert cli.main(["run", str(experiment), "--overwrite", "--quiet"]) == 2
    assert capsys.readouterr().err == refusal
    assert _files(user) == before

    (user / "run.sqlite").write_text("my own database\n")
    before = _files(user)
    assert cli.main(["run", str(experiment), "--overwrite", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: {user / 'run.sqlite'}: not an evomerge run store (file is not a database); "
        "--overwrite only replaces an evomerge run, so nothing was deleted\n"
    )
    assert _files(user) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["run", str(experiment), "--run-dir", str(empty), "--overwrite", "--quiet"]) == 0
    with RunStore.open_reader(empty) as store:
        assert store.count() == 3


def test_overwrite_replaces_only_what_a_run_wrote(experiment, tmp_path, capsys):
    """User files beside a run (and inside its report folder) survive --overwrite; every file the
    old run, its report and its status wrote is replaced by the new run's."""
    from evomerge.inspection.report import write_report

    _callable(experiment)
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    assert cli.main(["run", str(experiment), "--run-dir", str(run), "--quiet"]) == 0
    write_report(run)
    assert (run / "report" / "index.html").is_file() and list((run / "report").glob("*.png"))
    user = {"notes.txt": b"what I tried\n", "data/x.csv": b"1,2\n", "report/mine.md": b"my reading of it\n"}
    for name, content in user.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(content)
    with RunStore.open_reader(run) as store:
        first_created = store.metadata["created"]

    assert cli.main(["run", str(experiment), "--run-dir", str(run), "--overwrite", "--seed", "1", "--quiet"]) == 0
    assert cli.main(["run", str(experiment), "--run-dir", str(fresh), "--seed", "1", "--quiet"]) == 0
    after = _files(run)
    assert {name: after[name] for name in user} == user
    assert set(after) == set(user) | set(_files(fresh))  # the old report's page and figures are gone
    with RunStore.open_reader(run) as store:
        assert store.metadata["created"] > first_created and store.metadata["experiment"]["seed"] == 1


def test_builtin_task_offline_without_its_dataset_is_refused_before_the_run_dir(
    experiment, tmp_path, capsys, monkeypatch
):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    data = yaml.safe_load(experiment.read_text())
    data["fitness"]["tasks"] = [{"task": "arc_easy", "metric": "acc"}]
    experiment.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    assert cli.main(["run", str(experiment), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: fitness task 'arc_easy': dataset allenai/ai2_arc (ARC-Easy) is not in the local")
    assert "HF_DATASETS_OFFLINE=1" in err and "\n" not in err
    assert not run.exists()
