"""Memory plans: the arithmetic from shapes, the placement a plan picks, its refusals, the CLI, and
the plan against the peak resident memory a worker really reaches (measured in a fresh process)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge import cli
from evomerge.fitness.workload import Workload
from evomerge.plan import Capacity, evaluation_bytes, operators_of, plan_worker, read_pool_shape
from evomerge.plan.capacity import device_available
from evomerge.plan.memory import RESERVE
from evomerge.plan.report import plan_file
from evomerge.plan.shapes import Dimensions

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3


def recipe(family: dict[str, Path], method: str, **shared: object) -> dict:
    per_source = {"weight": 0.7} if method == "linear" else {"weight": 0.7, "density": 0.5}
    return {"models": {k: str(v) for k, v in family.items()}, "base": "base", "method": method, "parameters": shared,
            "model_parameters": {"expert_1": per_source, "expert_2": {**per_source, "weight": 0.4}}}


@pytest.fixture(scope="module")
def bf16_family(make_pico_family) -> dict[str, Path]:
    return make_pico_family("llama", 2, dtype=torch.bfloat16, hidden=64, layers=3)


def plan_for(family, method="ties", placement="auto", device="cpu", dtype="float32", capacity=None, cache=None, workloads=()):
    shape = read_pool_shape({k: str(v) for k, v in family.items()}, "base")
    operators, sources = operators_of(recipe(family, method), shape)
    capacity = capacity or Capacity(None, 64 * GiB, "host", "test")
    plan = plan_worker(shape, device=device, dtype=dtype, placement=placement, cache_memory=cache, operators=operators,
                       sources=sources, workloads=list(workloads), capacity=capacity)
    return plan, shape


def test_parts_are_the_shapes_arithmetic(bf16_family):
    resident, shape = plan_for(bf16_family, placement="resident")
    params = sum(math.prod(t.shape) for t in shape.tensors)
    assert params == shape.parameters() and len(shape.names) == 3
    assert resident.part("sources").bytes == 3 * 4 * params  # float32, every model
    assert resident.part("staging").bytes == 0  # a float32 model is written in place
    assert resident.part("merged").bytes == shape.skeleton["float32"]
    # TIES caches per source: task vector 4 + sorted magnitudes 4 + their order 4 bytes per entry
    assert resident.part("caches").bytes == 2 * 12 * params and resident.cached_tensors == len(shape.tensors)
    largest = max(math.prod(t.shape) for t in shape.tensors)
    assert resident.part("merge_work").bytes == 20 * largest  # the sort's scratch while a cache fills
    compact, _ = plan_for(bf16_family, placement="compact", dtype="bfloat16")
    assert compact.part("sources").bytes == 3 * 2 * params  # stored bfloat16
    assert compact.part("staging").bytes == 4 * largest * (3 + 1)  # a float32 buffer per model and the output
    assert compact.part("merged").bytes == shape.skeleton["bfloat16"] < shape.skeleton["float32"]
    streamed, _ = plan_for(bf16_family, placement="streamed", device="cuda", dtype="bfloat16",
                           capacity=Capacity(80 * GiB, 64 * GiB, "test", "test"))
    assert streamed.part("sources").where == "host" and streamed.part("sources").bytes == compact.part("sources").bytes
    assert streamed.total("device") == sum(p.bytes for p in streamed.parts if p.where == "device")
    assert streamed.part("staging").bytes == 4 * largest * 4 + 2 * largest  # + the stored bytes crossing the bus


def test_bounded_caches_are_admitted_in_merge_order(bf16_family):
    full, shape = plan_for(bf16_family)
    budget = full.part("caches").bytes // 3
    bounded, _ = plan_for(bf16_family, cache=budget)
    assert 0 < bounded.part("caches").bytes <= budget < full.part("caches").bytes
    taken = 0
    for tensor in shape.tensors:  # admitted while the next one fits, never skipping ahead
        if taken + 24 * tensor.numel > budget:
            break
        taken += 24 * tensor.numel
    assert bounded.part("caches").bytes >= taken
    assert bounded.cache_wanted == full.part("caches").bytes
    # an uncached TIES tensor holds its task vectors while it merges (4 bytes per source)
    largest = max(t.numel for t in shape.tensors)
    assert bounded.part("merge_work").bytes == max(20 * largest, 2 * 4 * largest)


def test_evaluation_is_kv_cache_plus_one_layer_plus_logits():
    dims = Dimensions(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=32000, max_positions=None)
    generate = Workload(batch_size=32, prompt_tokens=1024, new_tokens=256)
    kv = 2 * 32 * 32 * 8 * 128 * 1280 * 2
    mlp = 3 * 32 * 1024 * 14336 * 2
    stream = 2 * 32 * 1024 * 4096 * 2
    logits = 32 * 32000 * 2 * 2 + 32 * 32000 * 4
    assert evaluation_bytes(dims, generate, 2, "cuda") == kv + stream + mlp + logits
    scoring = Workload(batch_size=8, prompt_tokens=512, all_logits=True)
    assert evaluation_bytes(dims, scoring, 2, "cuda") - evaluation_bytes(dims, scoring.model_copy(update={"all_logits": False}), 2, "cuda") \
        == 8 * 511 * 32000 * 2 * 2 - 8 * 32000 * 4
    # off CUDA attention builds every head's scores in float32
    assert evaluation_bytes(dims, scoring, 2, "cpu") - evaluation_bytes(dims, scoring, 2, "cuda") >= 8 * 32 * 512 * 512 * 4 - mlp


def test_the_plan_keeps_sources_on_the_device_with_the_most_caches(bf16_family):
    def plan(room, **kw):
        return plan_for(bf16_family, device="cuda", capacity=Capacity(room, 64 * GiB, "test", "test"), **kw)[0]

    roomy = plan(64 * GiB)
    assert roomy.placement == "resident" and roomy.chosen_by == "plan"  # every cache fits either way: no conversions
    need = {name: alt["device_bytes"] for name, alt in roomy.alternatives.items()}
    assert need["resident"] > need["compact"] > need["streamed"]
    # resident fits with fewer caches than compact: compact
    squeezed = plan(int((need["compact"] + need["resident"]) / 2 / (1 - RESERVE)))
    assert squeezed.placement == "compact" and squeezed.cache_budget >= squeezed.cache_wanted
    # neither resident nor compact fits even without caches: streamed
    bare = {name: alt["device_bytes"] for name, alt in plan_for(bf16_family, device="cuda", cache=0)[0].alternatives.items()}
    room = int((bare["streamed"] + bare["compact"]) / 2 / (1 - RESERVE))
    streamed = plan(room)
    assert streamed.placement == "streamed" and streamed.fits
    named = plan(room, placement="compact")
    assert not named.fits and named.chosen_by == "experiment"
    assert "compact placement needs" in named.problem and named.problem.endswith("executor.placement: streamed would fit")


def test_refusals_name_the_part_and_what_would_fit(bf16_family):
    plan, _ = plan_for(bf16_family, capacity=Capacity(None, 200 * 1024**2, "host", "test"))
    assert not plan.fits and "\n" not in plan.problem
    assert plan.problem.startswith("the worker does not fit the host: streamed placement needs")
    assert "the largest part is runtime" in plan.problem and "--host-memory" in plan.problem
    small, _ = plan_for(bf16_family, cache=64 * GiB, capacity=Capacity(None, 2 * GiB, "host", "test"))
    assert small.fits  # the pico's caches are small whatever the budget
    batch = Workload(batch_size=4096, prompt_tokens=128, new_tokens=0)
    big, _ = plan_for(bf16_family, placement="resident", capacity=Capacity(None, int(1.5 * GiB), "host", "test"), workloads=[batch])
    assert not big.fits and "the largest part is evaluation" in big.problem and "fitness batch_size" in big.problem


def test_nvidia_smi_answers_for_the_visible_device(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\ncase "$*" in *--id=3*) echo 81559 ;; *) echo 1 ;; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert device_available("cuda:1") == 81559 * 1024**2  # torch's cuda:1 is physical GPU 3
    assert device_available("cpu") is None


def test_a_7b_experiment_is_planned_from_configs_alone():
    report = plan_file(REPO / "experiments" / "mistral-7b.yaml", device_memory=80 * GiB, host_memory=1024 * GiB)
    params = 7_241_732_096  # Mistral-7B's parameters
    assert report["config_only"] == ["base", "math", "code"] and report["tensors"] == 291
    assert all(m["parameters"] == params and m["stored_bytes"] == 2 * params for m in report["models"].values())
    parts = {p["part"]: p for p in report["parts"]}
    assert parts["merged"]["bytes"] == 2 * params + 2 * 64 * 4  # bfloat16 weights + rotary frequencies (2 float32 buffers)
    assert report["placement"] == "compact" and report["fits"]
    assert report["placements"]["resident"]["fits"] is False  # 4 × 3 × 7.2 B bytes of float32 alone exceed 80 GB
    assert report["caches"]["wanted"] == 2 * 12 * params
    on_h200 = plan_file(REPO / "experiments" / "mistral-7b.yaml", device_memory=141 * GiB, host_memory=1024 * GiB)
    assert on_h200["caches"]["budget"] > report["caches"]["budget"]


def test_cli_plan_prints_json_and_a_table(bf16_family, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(bf16_family, "dare_ties")))
    assert cli.main(["plan", str(path), "--json", "--host-memory", "8GB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "recipe" and report["host_available"] == 8 * GiB and report["host_available_from"] == "--host-memory"
    assert [p["part"] for p in report["parts"]] == ["sources", "staging", "merged", "caches", "merge_work", "evaluation", "runtime"]
    assert report["host_bytes"] == sum(p["bytes"] for p in report["parts"])
    assert cli.main(["plan", str(path), "--host-memory", "100MB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "operator caches" in out


def test_run_refuses_a_plan_that_does_not_fit_before_creating_anything(pico_family, tmp_path, capsys, monkeypatch):
    (tmp_path / "fitness.py").write_text("def score(model, tokenizer):\n    return {'x': 1.0}\n")
    experiment = {
        "name": "t", "models": {k: str(v) for k, v in pico_family.items()}, "base": "base",
        "search_space": str(REPO / "search_spaces" / "ties-per-layer.yaml"), "strategy": {"name": "random"},
        "fitness": {"python": "fitness.py:score"}, "budget": {"evaluations": 2},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    monkeypatch.setattr("evomerge.plan.capacity.host_available", lambda: 300 * 1024**2)
    assert cli.main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: executor: the worker does not fit the host")
    assert "the largest part is runtime" in err and "available (--host-memory" in err
    assert not (tmp_path / "run").exists()


# -- the plan against measured peak memory ------------------------------------------------------


def probe(family: dict[str, Path], method: str, executor: dict, fitness: dict, fused: str = "off") -> dict:
    """Run ``tests/plan_probe.py``: a worker started and two candidates merged and scored in a fresh
    process (fused kernels off unless asked: compiling them takes a minute here; what they cost is
    one constant of the plan, ``COMPILER_HOST``, checked by one probe)."""
    first = recipe(family, method)
    second = json.loads(json.dumps(first))
    second["model_parameters"]["expert_1"]["weight"] = 0.5
    job = {"models": first["models"], "base": "base", "recipes": [first, second], "fitness": fitness,
           "executor": {"threads": 1, **executor}}
    env = {**os.environ, "EVOMERGE_FUSED_KERNELS": fused}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "plan_probe.py")], input=json.dumps(job),
                         capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["errors"] == []
    return result


def lm_fitness(batch: int, *tasks: str) -> dict:
    return {"include_path": [str(REPO / "fitness")], "limit": 32, "batch_size": batch, "tasks": [{"task": t} for t in tasks]}


@pytest.fixture(scope="module")
def family_100m(make_pico_family) -> dict[str, Path]:
    """A base and two experts of 113 M parameters (hidden 768, 12 layers, 32,000 tokens), bfloat16 on disk."""
    return make_pico_family("llama", 2, dtype=torch.bfloat16, hidden=768, layers=12, vocab_size=32000)


def test_plan_of_a_pico_worker_is_its_peak_memory(pico_family):
    result = probe(pico_family, "ties", {"device": "cpu", "dtype": "float32"}, lm_fitness(32, "zoo_add_b"))
    assert result["plan"]["host_bytes"] == pytest.approx(result["peak"], rel=0.15)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "executor", "fitness", "fused"), [
    ("ties", {"placement": "compact", "dtype": "bfloat16", "cache_memory": "800MB"}, lm_fitness(32, "zoo_add_b"), "off"),
    ("dare_ties", {"placement": "resident", "dtype": "float32"}, lm_fitness(32, "zoo_add_b"), "auto"),
    ("linear", {"placement": "streamed", "dtype": "bfloat16"}, lm_fitness(100, "zoo_add_b_mc", "zoo_qa_b"), "off"),
], ids=["ties-compact-bounded-caches", "dare_ties-resident-fused", "linear-streamed-scoring"])
def test_plan_of_a_100m_worker_is_its_peak_memory(family_100m, method, executor, fitness, fused):
    result = probe(family_100m, method, {"device": "cpu", **executor}, fitness, fused)
    plan = result["plan"]
    assert plan["placement"] == executor["placement"]
    assert plan["host_bytes"] == pytest.approx(result["peak"], rel=0.15)
    # what the worker holds beyond the libraries is what the plan counts beyond them
    runtime = next(p["bytes"] for p in plan["parts"] if p["part"] == "runtime")
    assert plan["host_bytes"] - runtime == pytest.approx(result["peak"] - result["imported"], rel=0.15)
    caches = next(p["bytes"] for p in plan["parts"] if p["part"] == "caches")
    assert result["cache_nbytes"] <= caches
