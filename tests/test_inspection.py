"""Inspecting runs: Pareto ranks and hypervolume, ``front``, ``report``, ``compare``, ``export`` and
``evaluate`` on finished, live and stopped two-objective runs over pico models."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from evomerge import cli
from evomerge.errors import ConfigError
from evomerge.inspection import RunView, hypervolume, nondominated_ranks, pareto_front
from evomerge.inspection.compare import compare_runs
from evomerge.inspection.evaluate import evaluate_candidates
from evomerge.inspection.export_candidate import (
    MERGEKIT_FILE,
    export_candidate,
    parse_preferences,
)
from evomerge.inspection.report import write_report
from evomerge.recipe import recipe_from_dict
from evomerge.recipe.mergekit_config import recipe_from_mergekit
from evomerge.recipe.mergekit_export import recipe_to_mergekit
from evomerge.run import start_run
from evomerge.status import SUMMARY_FILE, run_status
from evomerge.store import DB_NAME, RunStore, StoreError
from evomerge.store.lock import RunLock

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"

# Two conflicting objectives of the merged pico model (float64 sums of weights), and a held-out
# variant; every call is counted in a file so tests can tell evaluations from cache hits.
FITNESS = """
import os

def _count():
    with open(os.environ["INSPECTION_CALLS"], "a") as f:
        f.write("x")

def _features(model):
    layers = model.model.layers
    return float(layers[0].mlp.up_proj.weight.detach().double().sum()), float(model.lm_head.weight.detach().double().sum())

def two(model, tokenizer):
    _count()
    x, h = _features(model)
    return {"left": -abs(x + 2.45), "right": -abs(h - 0.40)}

def two_test(model, tokenizer):
    _count()
    if os.path.exists(os.environ.get("INSPECTION_HELDOUT_FAILS", "")):
        raise MemoryError("CUDA out of memory (a transient failure)")
    x, h = _features(model)
    return {"left": -abs(x + 2.40), "right": -abs(h - 0.45)}
"""


# --- Pareto ranks and hypervolume ----------------------------------------------------------


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a >= b) and np.any(a > b))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25))
def test_a_dominated_point_is_never_on_the_front(points):
    values = np.array(points, dtype=float)
    ranks = nondominated_ranks(values)
    for i, rank in enumerate(ranks):
        dominated = any(_dominates(values[j], values[i]) for j in range(len(values)))
        assert (rank == 0) == (not dominated)
        if rank > 0:  # something of the previous layer dominates it
            assert any(_dominates(values[j], values[i]) for j in np.flatnonzero(ranks == rank - 1))


def test_hypervolume_of_known_sets():
    assert hypervolume(np.array([[1.0, 2.0], [2.0, 1.0]]), np.zeros(2)) == pytest.approx(3.0)  # 2 + 2 - 1
    assert hypervolume(np.array([[1.0, 2.0, 3.0]]), np.zeros(3)) == pytest.approx(6.0)
    assert hypervolume(np.array([[3.0, 3.0], [1.0, 1.0]]), np.array([1.0, 0.0])) == pytest.approx(6.0)  # a dominated point adds nothing
    assert hypervolume(np.array([[0.5, -1.0]]), np.zeros(2)) == 0.0  # below the reference


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 5), st.floats(0.1, 5)), min_size=1, max_size=12))
def test_hypervolume_equals_a_grid_count(points):
    values = np.array(points)
    grid = np.linspace(0.0, 5.0, 201)[:-1] + 0.0125
    xs, ys = np.meshgrid(grid, grid)
    covered = np.zeros_like(xs, dtype=bool)
    for x, y in values:
        covered |= (xs <= x) & (ys <= y)
    assert hypervolume(values, np.zeros(2)) == pytest.approx(covered.mean() * 25.0, abs=0.13)


# --- runs to inspect -----------------------------------------------------------------------


@pytest.fixture
def calls(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "calls.txt"
    path.write_text("")
    monkeypatch.setenv("INSPECTION_CALLS", str(path))
    return path


@pytest.fixture
def make_run(tmp_path, pico_family, calls):
    (tmp_path / "fitness.py").write_text(FITNESS)

    def make(name: str = "run", *, seed: int = 0, budget: int = 16, strategy: dict | None = None, **changes) -> Path:
        data = {
            "name": "inspect",
            "seed": seed,
            "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
            "base": "base",
            "search_space": str(SPACE),
            "strategy": strategy or {"name": "random"},
            "objectives": ["left", "right"],
            "fitness": {"python": "fitness.py:two"},
            "heldout": {"python": "fitness.py:two_test"},
            "budget": {"evaluations": budget},
        }
        data.update(changes)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        start_run(path, run_dir=tmp_path / name, progress=False)
        return tmp_path / name

    return make


def test_front_lists_exactly_the_non_dominated_candidates(make_run, capsys):
    run = make_run()
    view = RunView.load(run)
    assert view.state == "finished" and view.objectives == ["left", "right"]
    results = view.ok_results()
    values = view.values(results, view.objectives)
    front = pareto_front(view)
    on_front = {m.candidate for m in front}
    for record, value in zip(results, values):
        dominated = any(_dominates(other, value) for other in values)
        assert (record.ticket in on_front) == (not dominated)
    assert [m.objectives["left"] for m in front] == sorted((m.objectives["left"] for m in front), reverse=True)
    assert all(m.summary.startswith("task_arithmetic, 2 rules; weight: a ") for m in front)

    assert cli.main(["front", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "finished" and [m["candidate"] for m in data["front"]] == [m.candidate for m in front]
    assert cli.main(["front", str(run), "--objectives", "left"]) == 0
    out = capsys.readouterr().out
    best = max(results, key=lambda r: r.evaluation.objectives[0])
    assert out.splitlines()[1].lstrip().startswith(f"#{best.ticket} ")
    assert cli.main(["front", str(run), "--objectives", "middle"]) == 2
    assert capsys.readouterr().err == "error: --objectives: 'middle' is not an objective of this run (left, right)\n"


def test_front_and_report_on_a_live_and_on_a_stopped_run(make_run):
    run = make_run()
    (run / SUMMARY_FILE).rename(run / "summary.moved")
    with sqlite3.connect(run / DB_NAME) as raw:  # the run as it was before its end
        raw.execute("DELETE FROM meta WHERE key = 'summary'")
    lock = RunLock.acquire(run)  # what a live driver holds
    try:
        assert RunView.load(run).state == "running" and pareto_front(run)
        assert "This run is in progress" in write_report(run).read_text()
    finally:
        lock.release()
    assert RunView.load(run).state == "stopped"
    page = write_report(run, run / "stopped-report").read_text()
    assert "stopped before its budget (crashed or interrupted)" in page and f"evomerge resume {run}" in page


def test_report_is_self_contained_with_its_figures(make_run, capsys):
    run = make_run()
    assert cli.main(["report", str(run)]) == 0
    index = run / "report" / "index.html"
    assert capsys.readouterr().out == f"wrote {index}\n"
    page = index.read_text()
    for name in ("front", "progress", "recipe"):
        png = (run / "report" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert page.count('src="data:image/png;base64,') == 3 and "http://" not in page and "https://" not in page
    view = RunView.load(run)
    chosen = pareto_front(view)[0]
    assert f"Chosen recipe (candidate {chosen.candidate})" in page
    assert f"<td>{chosen.objectives['left']:.4g}</td>" in page  # numbers come from the store
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert f"<td>{summary['rows'][0]['label']}</td>" in page  # the held-out table of sources vs the best merge


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="chromium is not installed")
def test_report_renders_in_headless_chromium(make_run, tmp_path):
    run = make_run()
    index = write_report(run)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}", "--window-size=1200,2400",
         "--enable-logging=stderr", "--v=0", index.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and shot.stat().st_size > 20000
    assert "Uncaught" not in done.stderr and "CONSOLE(" not in done.stderr


def test_compare_draws_every_run_and_refuses_other_objectives(make_run, tmp_path, capsys):
    first, second = make_run("r1", seed=1), make_run("r2", seed=2, strategy={"name": "optuna", "settings": {"sampler": "nsga2"}})
    out, rows = compare_runs([first, second], tmp_path / "cmp.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [r["run"] for r in rows] == ["inspect (random)", "inspect (optuna)"]
    for run, row in zip((first, second), rows):
        view = RunView.load(run)
        assert row["best"] == max(r.evaluation.objectives[0] for r in view.ok_results())
        assert row["hypervolume"] > 0
    assert cli.main(["compare", str(first), str(first), "--out", str(tmp_path / "same.png")]) == 0
    assert "r1 (random): best" in capsys.readouterr().out  # same name twice: told apart by folder
    other = make_run("r3", objectives=["left"])
    with pytest.raises(ConfigError, match="objectives \\['left'\\] differ"):
        compare_runs([first, other], tmp_path / "x.png")


def test_export_best_and_pick_round_trip(make_run, tmp_path, capsys, calls):
    run = make_run()
    view = RunView.load(run)
    best = max(view.ok_results(), key=lambda r: r.evaluation.objectives[0])
    assert cli.main(["export", str(run), "--best", "--out", str(tmp_path / "best"), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote candidate {best.ticket} to {tmp_path / 'best'} (no mergekit.yaml: ")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    namespace: dict = {}
    exec(FITNESS, namespace)
    assert list(namespace["two"](model, None).values()) == best.evaluation.objectives.tolist()  # the recorded scores
    card = (tmp_path / "best" / "README.md").read_text()
    assert f"Candidate {best.ticket} of run `inspect`" in card and f"| left | {best.evaluation.objectives[0]:.4g} |" in card
    assert recipe_from_dict(yaml.safe_load((tmp_path / "best" / "recipe.yaml").read_text())).model_parameters
    assert not (tmp_path / "best" / MERGEKIT_FILE).exists()

    front = pareto_front(view)
    right_first = max(front, key=lambda m: m.objectives["right"])
    _, ticket, _ = export_candidate(run, tmp_path / "pick", pick="left=0,right=1", progress=False)
    assert ticket == right_first.candidate
    _, ticket, _ = export_candidate(run, tmp_path / "pick2", pick="left=1", progress=False)
    assert ticket == front[0].candidate

    for args, message in [
        (["--pick", "left=x"], "--pick: expected objective=weight pairs like 'a=0.7,b=0.3' (weights ≥ 0), got 'left=x'"),
        (["--pick", "up=1"], "--pick: 'up' is not an objective of this run (left, right)"),
        (["--candidate", "999"], f"--candidate: no candidate 999 in {run} (candidates: 0–15)"),
        (["--best"], f"{tmp_path / 'best'}: output folder already exists (pass --overwrite to replace it)"),
    ]:
        assert cli.main(["export", str(run), *args, "--out", str(tmp_path / "best"), "--quiet"]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert parse_preferences("left=0.7, right=0.3", ["left", "right"]) == {"left": 0.7, "right": 0.3}


def test_mergekit_yaml_is_written_when_mergekit_computes_the_same(pico_family, tmp_path):
    models = {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])}
    recipe = recipe_from_dict({"models": models, "base": "base", "method": "ties", "parameters": {"lambda": 0.8},
                               "model_parameters": {"a": {"weight": [0.2, 0.9], "density": 0.5}, "b": {"weight": 0.6, "density": 0.7}}})
    config = recipe_to_mergekit(recipe)
    assert config == {
        "merge_method": "ties", "base_model": models["base"],
        "models": [{"model": models["a"], "parameters": {"weight": [0.2, 0.9], "density": 0.5}},
                   {"model": models["b"], "parameters": {"weight": 0.6, "density": 0.7}}],
        "parameters": {"lambda": 0.8},
    }
    back = recipe_from_mergekit(config, "mergekit.yaml")
    assert (back.method, back.parameters, back.source_names) == ("ties", {"lambda": 0.8}, ["expert_1", "expert_2"])
    assert [back.model_parameters[n] for n in back.source_names] == [recipe.model_parameters["a"], recipe.model_parameters["b"]]
    with pytest.raises(ConfigError, match="mergekit's 'dare_ties' would not reproduce these tensors"):
        recipe_to_mergekit(recipe.model_copy(update={"method": "dare_ties"}))
    with pytest.raises(ConfigError, match="mergekit cannot express the recipe's 1 per-layer/per-module rules"):
        recipe_to_mergekit(recipe_from_dict({**recipe.model_dump(), "rules": [{"layers": [0], "parameters": {"lambda": 1.0}}]}))


def test_evaluate_scores_the_front_once_and_stores_it(make_run, calls, capsys):
    run = make_run(heldout=None)
    with pytest.raises(ConfigError, match="the experiment has no held-out fitness"):
        evaluate_candidates(run, front=True)
    run = make_run("with-heldout")
    before = len(calls.read_text())
    front = pareto_front(run)
    fresh = [m.candidate for m in front if m.heldout is None]
    assert cli.main(["evaluate", str(run), "--front"]) == 0
    assert capsys.readouterr().out.endswith(f"{len(front)} candidate(s) scored on the test split\n")
    assert len(calls.read_text()) - before == len(fresh)  # only those not scored yet
    scored = {m.candidate: m.heldout for m in pareto_front(run)}
    assert all(v is not None for v in scored.values())
    assert evaluate_candidates(run, front=True) == scored and len(calls.read_text()) - before == len(fresh)
    with RunStore.open_reader(run) as store:
        tests = store.results("test")
    assert sorted(r.ticket for r in tests) == sorted(scored) and all(r.fitness_hash for r in tests)
    lock = RunLock.acquire(run)
    try:
        with pytest.raises(StoreError, match="run is in use by another evomerge process"):
            evaluate_candidates(run, candidates=[0])
    finally:
        lock.release()
    assert cli.main(["evaluate", str(run)]) == 2
    assert capsys.readouterr().err == "error: evaluate: give --front and/or --candidate ID\n"


def test_a_failed_heldout_evaluation_is_retried(make_run, tmp_path, calls, capsys, monkeypatch):
    """A held-out evaluation that failed (say, out of memory) stays recorded, and the next
    ``evaluate`` — or the end-of-run summary of a resumed run — scores the candidate again."""
    from evomerge.run import resume_run

    flag = tmp_path / "heldout-fails"
    monkeypatch.setenv("INSPECTION_HELDOUT_FAILS", str(flag))
    flag.touch()

    def killed(self, summary):  # the driver dies after the held-out failure, before the summary is stored
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunStore, "save_summary", killed)
        with pytest.raises(KeyboardInterrupt):
            make_run(budget=6)
    run = tmp_path / "run"
    with RunStore.open_reader(run) as store:
        best = store.best().ticket
        ((failed_at_end,),) = [store.results("test")]
    assert failed_at_end.ticket == best and not failed_at_end.ok
    assert failed_at_end.error == "MemoryError: CUDA out of memory (a transient failure)"
    other = next(t for t in range(6) if t != best)
    assert evaluate_candidates(run, candidates=[other]) == {other: None}

    flag.unlink()
    summary = resume_run(run, progress=False)
    with RunStore.open_reader(run) as store:
        tests = [(r.ticket, r.ok) for r in store.results("test")]
    assert tests == [(best, False), (other, False), (best, True)]
    assert summary["rows"][0]["error"] is None and run_status(run)["best"]["heldout"] is not None

    before = len(calls.read_text())
    assert cli.main(["evaluate", str(run), "--candidate", str(other), "--candidate", str(best)]) == 0
    assert len(calls.read_text()) - before == 1  # only the failed one is scored again
    with RunStore.open_reader(run) as store:
        tests = [(r.ticket, r.ok) for r in store.results("test")]
    assert tests == [(best, False), (other, False), (best, True), (other, True)]
    assert RunView.load(run).heldout(other) is not None


def test_exported_candidate_scores_the_same_in_the_lm_eval_cli(pico_family, tmp_path):
    from test_cli_run import write_task

    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks")
    data = {
        "name": "lm",
        "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
        "base": "base",
        "search_space": str(SPACE),
        "strategy": {"name": "random"},
        "fitness": {"include_path": "tasks", "tasks": [{"task": "pico_mc", "metric": "acc"}], "batch_size": 8},
        "heldout": True,
        "budget": {"evaluations": 6},
    }
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    run = tmp_path / "run"
    start_run(tmp_path / "lm.yaml", run_dir=run, progress=False)
    folder, ticket, _ = export_candidate(run, tmp_path / "model", best=True, progress=False)
    view = RunView.load(run)
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["best"]["candidate"] == ticket and view.objectives == ["fitness"]
    recorded = summary["rows"][0]["objectives"]["pico_mc"]  # the test split, scored at the end of the run
    assert view.heldout(ticket) == {"fitness": recorded}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
        "--include_path", str(tmp_path / "tasks"), "--tasks", "pico_mc", "--device", "cpu", "--batch_size", "8",
        "--output_path", str(tmp_path / "lm_eval"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (results_file,) = (tmp_path / "lm_eval").rglob("results_*.json")
    assert json.loads(results_file.read_text())["results"]["pico_mc"]["acc,none"] == pytest.approx(recorded, abs=1e-12)


def test_log_to_trackers_replays_the_run_or_says_what_is_missing(make_run, tmp_path, monkeypatch, capsys):
    import sys
    import types

    from evomerge.inspection.trackers import log_to, tracker_rows

    run = make_run()
    view = RunView.load(run)
    rows = list(tracker_rows(view))
    records = view.ok_results()
    assert [step for step, _ in rows] == list(range(1, len(records) + 1))
    last = rows[-1][1]
    assert last["best/left"] == max(r.evaluation.objectives[0] for r in records)
    assert last["hypervolume"] >= rows[0][1]["hypervolume"] > 0

    scalars: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, name, value, step):
            scalars.append((name, value, step))

        def close(self):
            scalars.append(("closed", 0.0, 0))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert log_to("tensorboard", run) == str(run / "tracker" / "tensorboard")
    assert ("best/right", last["best/right"], len(rows)) in scalars and scalars[-1][0] == "closed"

    logged: list[tuple[dict, int]] = []
    fake_run = types.SimpleNamespace(log=lambda data, step: logged.append((data, step)), finish=lambda: None, url=None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: fake_run))
    log_to("wandb", run)
    assert logged == [(scalars_, step) for step, scalars_ in rows]

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert cli.main(["report", str(run), "--log-to", "wandb"]) == 2
    assert capsys.readouterr().err == "error: --log-to wandb: the 'wandb' package is not installed (pip install wandb)\n"
