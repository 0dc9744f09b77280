"""The exported best of a data-flow run scores in the lm-eval CLI exactly what the run recorded.

A tiny two-layer zoo is built; a short data-flow search over its two experts (scaled paths, layers
repeated) is scored by lm-eval in memory on the assembled models; its best path is exported (the
scales folded into the weights, layers in path order) and ``python -m lm_eval`` scores the folder as
a plain Hugging Face model on the same held-out split. The accuracy must equal the held-out score
the run recorded for that candidate, and so must every per-example verdict.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from test_zoo import tiny_spec

from evomerge.inspection.export_candidate import export_candidate
from evomerge.recipe import recipe_from_dict
from evomerge.run import start_run
from evomerge.store import RunStore
from evomerge.zoo.build import build_zoo

N_TEST = 24


def test_the_exported_dfs_best_scores_in_the_lm_eval_cli_what_the_run_recorded(tmp_path: Path) -> None:
    run = {"lr": 0.01, "batch_size": 16, "warmup": 1}
    spec = tiny_spec(
        model={"layers": 2, "hidden": 32, "heads": 2, "ffn": 64},
        experts=[{**run, "name": "skill", "tasks": ["add_a"], "steps": 60}, {**run, "name": "lang", "tasks": ["qa_b"], "steps": 10}],
        eval={"tasks": ["add_a", "add_b"], "n_validation": 8, "n_test": N_TEST},
    )
    zoo = tmp_path / "zoo"
    build_zoo(spec, zoo)
    experiment = {
        "name": "dfs-cli",
        "seed": 0,
        "models": {"skill": str(zoo / "skill"), "lang": str(zoo / "lang")},
        "search_space": {"kind": "dataflow", "repeats": 2, "scaling": "slot", "scale_range": [0.5, 2.0], "max_layers": 6},
        "strategy": {"name": "cmaes", "settings": {"sigma0": 0.3, "popsize": 4}},
        "fitness": {
            "include_path": str(zoo / "fitness"),
            "batch_size": 8,
            "tasks": [{"task": "zoo_add_a_mc", "metric": "acc"}, {"task": "zoo_add_a", "metric": "exact_match"}],
        },
        "heldout": {"limit": None},
        "budget": {"evaluations": 8},
        "executor": {"threads": 1},
    }
    path = tmp_path / "dfs-cli.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    summary = start_run(path, run_dir=tmp_path / "run", progress=False)
    best = summary["best"]["candidate"]
    with RunStore.open_reader(tmp_path / "run") as store:
        recipe = recipe_from_dict(store.candidate(best).recipe)
        (heldout,) = [r for r in store.results("test") if r.ticket == best and r.ok]
    assert recipe.scaled and len(recipe.hops) != 2  # a scaled path that is not an expert's own layer list
    folder, _, _ = export_candidate(tmp_path / "run", tmp_path / "best", candidate=best, progress=False)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
        "--include_path", str(zoo / "fitness"), "--tasks", "zoo_add_a_mc,zoo_add_a", "--device", "cpu",
        "--batch_size", "8", "--log_samples", "--output_path", str(tmp_path / "lm_eval"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (results_file,) = glob.glob(str(tmp_path / "lm_eval" / "*" / "results_*.json"))
    results = json.loads(Path(results_file).read_text())["results"]
    recorded = dict(zip(heldout.evaluation.example_ids, heldout.evaluation.per_example.tolist()))
    for task, metric in (("zoo_add_a_mc", "acc"), ("zoo_add_a", "exact_match")):
        assert results[task][f"{metric},none"] == summary["rows"][0]["objectives"][task]
        (samples_file,) = glob.glob(str(tmp_path / "lm_eval" / "*" / f"samples_{task}_2*.jsonl"))
        samples = sorted((json.loads(line) for line in Path(samples_file).read_text().splitlines()), key=lambda s: s["doc_id"])
        assert [float(s[metric]) for s in samples] == [recorded[f"{task}:{i}"] for i in range(N_TEST)]
    correct = sum(recorded[f"zoo_add_a_mc:{i}"] for i in range(N_TEST))
    assert 0 < correct < N_TEST  # right and wrong choices: a comparison with teeth
