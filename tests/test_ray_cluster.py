"""Joining an existing Ray cluster: ``ray start --head`` on loopback, ``evomerge run --ray-address auto``
attaches to it (in a subprocess, as a user would), then the cluster is stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
FITNESS = """
def quality(model, tokenizer):
    return {"quality": float(model.lm_head.weight.detach().double().sum())}
"""


@pytest.fixture
def cluster(tmp_path):
    if not RAY.is_file() and shutil.which("ray") is None:
        pytest.skip("the ray command is not installed")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(RAY if RAY.is_file() else shutil.which("ray"))
    started = subprocess.run(
        [ray, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6391", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_a_run_attaches_to_a_running_cluster(cluster, tmp_path, pico_family):
    (tmp_path / "fitness.py").write_text(FITNESS)
    data = {
        "name": "joined",
        "models": {"base": str(pico_family["base"]), "a": str(pico_family["expert_1"]), "b": str(pico_family["expert_2"])},
        "base": "base",
        "search_space": str(REPO / "search_spaces" / "task-arithmetic-per-layer.yaml"),
        "strategy": {"name": "random"},
        "fitness": {"python": "fitness.py:quality"},
        "budget": {"evaluations": 4},
        "executor": {"kind": "ray", "address": "auto", "threads": 1},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    env = {**cluster, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(tmp_path / "exp.yaml"), "--run-dir", str(run), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    status = subprocess.run([sys.executable, "-m", "evomerge.cli", "status", str(run), "--json"],
                            env=env, capture_output=True, text=True, timeout=120)
    data = json.loads(status.stdout)
    assert (data["executor"], data["evaluations"], data["failed"]) == ("ray", 4, 0)
    (worker,) = data["workers"]  # the cluster has one CPU: one worker slot
    assert worker["node"] not in ("", "?") and worker["evaluations"] == 4 + 5 and worker["failures"] == 0  # + the summary: best, a, b, base, average
