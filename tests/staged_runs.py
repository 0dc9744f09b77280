"""Helpers of the staged-run kill tests (``test_stages``, ``test_nested_map``): what a stage recorded,
and a run killed from inside in a forked child (the test's fitness sends SIGKILL at its
``<PREFIX>KILL_AT``-th call, counted in ``<PREFIX>CALLS``)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import torch

from evomerge.run import resume_run, start_run
from evomerge.store import RunStore


def records(stage: Path) -> tuple[list, list]:
    """Candidates (their recipes but the model folders, which name the run directory) and results."""
    with RunStore.open_reader(stage) as store:
        candidates = [(c.ticket, {k: v for k, v in c.recipe.items() if k != "models"}) for c in store.candidates()]
        results = [(r.ticket, r.ok, repr(r.evaluation.objectives.tolist()), r.error) for r in store.results("validation")]
    return candidates, results


def _child(path: str, run: str, resume: bool, kill_at: int, prefix: str) -> None:
    os.environ[f"{prefix}KILL_AT"] = str(kill_at)
    os.environ[f"{prefix}CALLS"] = "0"
    torch.set_num_threads(1)
    if resume:
        resume_run(run, progress=False)
    else:
        start_run(path, run_dir=run, progress=False)


def killed(path: Path, run: Path, *, resume: bool, kill_at: int, prefix: str, timeout: float = 180) -> bool:
    """Start (or resume) the run in a forked child; whether the child died of SIGKILL."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(str(path), str(run), resume, kill_at, prefix))
    process.start()
    process.join(timeout)
    return process.exitcode == -signal.SIGKILL
