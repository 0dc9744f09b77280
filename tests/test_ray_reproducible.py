"""Reproducible mode on Ray: for every strategy, two workers whose evaluations take 1x-4x a unit (so
results arrive out of ticket order), the driver SIGKILLed and resumed and a worker process SIGKILLed
mid-run end with exactly the local run's candidates, results and summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from reproducible_runs import (
    REPO,
    RUNS,
    arrival,
    contents,
    delays,
    experiment_file,
    kill_worker_on_call,
    local_runs,
    write_runs,
)

from evomerge.run import resume_run

UNIT = 0.04
"""Seconds of the shortest evaluation: enough to order completions, little for the suite."""


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module; a driver in another process joins it by address."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pico_family) -> Path:
    folder = tmp_path_factory.mktemp("ray-reproducible")
    write_runs(folder, pico_family)
    return folder


@pytest.fixture(scope="module")
def references(folder) -> dict[str, tuple[list, list, dict | None]]:
    return local_runs(folder)


@pytest.fixture
def paced(folder, references):
    """Delays on; the worker-kill plan is the test's; both off afterwards (the folder is shared)."""
    delays(folder, UNIT)
    yield folder
    delays(folder, None)
    kill_worker_on_call(folder, None)


def restarts(run: Path) -> int:
    return sum(w["restarts"] for w in json.loads((run / "workers.json").read_text())["workers"])


@pytest.mark.parametrize("name", list(RUNS))
def test_killed_workers_and_a_killed_driver_on_ray_give_the_local_run(name, ray_address, paced, references):
    """``evomerge run`` in a child process joined to the Ray instance is SIGKILLed after its 6th
    recorded result; resumed here on two workers, it loses a worker at its 4th evaluation (the
    worker is replaced and the candidate re-run), and ends with the local run."""
    run = paced / "ray" / name
    argv = ["run", str(experiment_file(paced, name, kind="ray", workers=2)), "--run-dir", str(run),
            "--ray-address", ray_address, "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    child = subprocess.run([sys.executable, str(REPO / "tests" / "driver_kill.py"), "recorded", "6", "1", "--", *argv],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, f"exit {child.returncode}: {child.stderr[-2000:]}"
    assert len(arrival(run)) == 6

    kill_worker_on_call(paced, 4)
    resume_run(run, progress=False, ray_address=ray_address)
    assert restarts(run) == 1  # this session's killed worker was replaced and its candidate re-run
    assert contents(run) == references[name]
    order = arrival(run)
    assert order != sorted(order) or name == "optuna-tpe", "the results should arrive out of ticket order"
