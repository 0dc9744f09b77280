"""The real driver, SIGKILLed between each pair of its steps and resumed, ends exactly where an
uninterrupted run ends: the same candidates, genomes, recipes, results and summary, bit for bit.

Every kill happens in a child process (``tests/driver_kill.py`` arms it): after an ask, after the
candidate is stored, after it is dispatched, after a result is committed, before the strategy is
told, inside a checkpoint's transaction, after a checkpoint, and while ``summary.json`` is being
replaced. Each strategy runs with three slots completing out of ask order (the executor of
``driver_kill.OutOfOrderExecutor``), so a resume re-queues several in-flight candidates; one run
is killed and resumed as ``evomerge`` command lines in fresh interpreters, on the local executor.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import driver_kill
import pytest
import torch
import yaml

from evomerge.run import resume_run, start_run
from evomerge.run import session as session_module
from evomerge.store import RunStore
from evomerge.store.files import SUMMARY_FILE

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"
GLOBAL_SPACE = REPO / "search_spaces" / "task-arithmetic-global.yaml"
BUDGET = 18
SLOTS = 3
CHECKPOINT_EVERY = 3
STRATEGIES = {
    "cmaes": {"name": "cmaes", "settings": {"sigma0": 0.4, "popsize": 5}},
    "random": {"name": "random"},
    "optuna-tpe": {"name": "optuna", "settings": {"sampler": "tpe", "sampler_settings": {"n_startup_trials": 5}}},
    "map": {"name": "map", "settings": {"design_points": 8, "batch_size": 4, "generations": 20}},
}
SPACES = {"map": GLOBAL_SPACE}  # MAP's quadratic needs few genes: one weight per source
# One chain of kills on one run directory, each resumed child dying at the n-th pass of its step,
# with what the store's last event may then be (None: a kill the store cannot see).
RESULT = ("result", "result, checkpoint due")
KILLS = [
    ("asked", 4, None),
    ("stored", 2, ("candidate pending",)),
    ("dispatched", 3, ("candidate running",)),
    ("recorded", 2, RESULT),
    ("telling", 2, RESULT),
    ("checkpointing", 1, ("result, checkpoint due",)),
    ("checkpointed", 1, ("result, checkpointed",)),
    ("summarizing", 1, None),
]
# Features of the merged pico model; over the space's box some candidates raise, some give NaN.
FITNESS = """
import math


def quality(model, tokenizer):
    layers = model.model.layers
    x0 = float(layers[0].mlp.up_proj.weight.detach().double().sum())
    x1 = float(layers[1].mlp.up_proj.weight.detach().double().sum())
    h = float(model.lm_head.weight.detach().double().sum())
    if x0 > -2.41:
        raise ValueError("diverged")
    value = math.nan if x1 > 0.09 else -100.0 * ((x0 + 2.47) ** 2 + (x1 - 0.05) ** 2 + (h - 0.47) ** 2)
    return {"quality": value}, {"quality": [x0, x1, h]}


def heldout(model, tokenizer):
    layers = model.model.layers
    return {"quality": float(layers[1].mlp.up_proj.weight.detach().double().sum())}
"""


def write_experiment(folder: Path, family: dict[str, Path], strategy: dict) -> Path:
    (folder / "fitness.py").write_text(FITNESS)
    data = {
        "name": "kills",
        "seed": 4,
        "models": {"base": str(family["base"]), "a": str(family["expert_1"]), "b": str(family["expert_2"])},
        "base": "base",
        "search_space": str(SPACES.get(strategy["name"], SPACE)),
        "strategy": strategy,
        "fitness": {"python": "fitness.py:quality"},
        "heldout": {"python": "fitness.py:heldout"},
        "budget": {"evaluations": BUDGET},
        "checkpoint_every": CHECKPOINT_EVERY,
    }
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def contents(run: Path) -> tuple[list, list, dict | None]:
    """Everything a run records that must not depend on crashes (no timings, no wall-clock times)."""
    with RunStore.open_reader(run) as store:
        candidates = [
            (c.seq, c.ticket, c.proposal.genome.tobytes(), c.proposal.parents, c.proposal.info, c.recipe, c.recipe_hash, c.status)
            for c in store.candidates()
        ]
        results = [
            (r.seq, r.ticket, r.split, r.evaluation.objectives.tobytes(), r.ok, r.error, r.cached_from, r.fitness_hash,
             None if r.evaluation.per_example is None else r.evaluation.per_example.tobytes())
            for split in ("validation", "test")
            for r in store.results(split)
        ]
        summary = store.summary
    return candidates, results, None if summary is None else {k: v for k, v in summary.items() if k != "elapsed_seconds"}


def last_event(run: Path) -> str:
    """What the store's last event says about where the driver was (what a kill there must leave)."""
    with RunStore.open_reader(run) as store:
        last = store.last_seq
        candidate = max(store.candidates(), key=lambda c: c.seq)
        checkpoint = store.latest_checkpoint()
        n_results = len(store.results())
    if candidate.seq == last:
        return "candidate " + candidate.status
    if checkpoint is not None and checkpoint.seq == last:
        return "result, checkpointed"
    return "result" + (", checkpoint due" if n_results % CHECKPOINT_EVERY == 0 else "")


def _child(step: str, n: int, argv: list[str]) -> None:
    torch.set_num_threads(1)
    driver_kill.arm(step, n)
    from evomerge import cli

    sys.exit(cli.main(argv))


def killed_at(step: str, n: int, argv: list[str]) -> bool:
    """Run the command line in a forked child armed to die at the n-th ``step``; True if it did."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(step, n, argv))
    process.start()
    process.join(120)
    return process.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_the_driver_killed_between_any_two_steps_resumes_to_the_uninterrupted_run(
    strategy, tmp_path, pico_family, monkeypatch
):
    monkeypatch.setattr(session_module, "build_executor", driver_kill.out_of_order(SLOTS))
    experiment = write_experiment(tmp_path, pico_family, STRATEGIES[strategy])
    start_run(experiment, run_dir=tmp_path / "reference", progress=False)
    reference = contents(tmp_path / "reference")
    candidates, results, summary = reference
    assert len(candidates) == BUDGET and len(results) == BUDGET + 1 and summary is not None
    assert {r[4] for r in results} == {True, False}, "the fitness should fail on some candidates"
    assert [r[1] for r in results[:BUDGET]] != sorted(r[1] for r in results[:BUDGET]), "completions out of ask order"

    run = tmp_path / "killed"
    argv = ["run", str(experiment), "--run-dir", str(run), "--quiet"]
    for step, n, left in KILLS:
        assert killed_at(step, n, argv), f"the driver was not killed at {step} #{n}"
        assert not (run / SUMMARY_FILE).exists(), f"the run ended before the kill at {step}"
        assert left is None or last_event(run) in left, f"killed at {step}: the store ends with {last_event(run)}"
        argv = ["resume", str(run), "--quiet"]
    assert contents(run)[1:] == reference[1:]  # killed while summary.json replaced: only the file is missing

    summary_data = resume_run(run, progress=False)
    assert contents(run) == reference
    assert json.loads((run / SUMMARY_FILE).read_text()) == summary_data
    assert {k: v for k, v in summary_data.items() if k != "elapsed_seconds"} == summary


def test_the_command_line_killed_and_resumed_in_fresh_processes(tmp_path, pico_family):
    """The same on the local executor (one slot), each session a new ``evomerge`` process."""
    experiment = write_experiment(tmp_path, pico_family, STRATEGIES["cmaes"])
    start_run(experiment, run_dir=tmp_path / "reference", progress=False)
    run = tmp_path / "killed"
    argv = ["run", str(experiment), "--run-dir", str(run), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    child = subprocess.run(
        [sys.executable, str(REPO / "tests" / "driver_kill.py"), "checkpointing", "2", "1", "--", *argv],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, f"exit {child.returncode}: {child.stderr}"
    assert last_event(run) == "result, checkpoint due"
    finished = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "resume", str(run), "--quiet"], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    assert contents(run) == contents(tmp_path / "reference")
