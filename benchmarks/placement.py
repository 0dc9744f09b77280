"""Per-candidate merge time and peak memory of each placement, on a ~1B-parameter family.

Builds a random Llama family in a temporary folder — a base and two fine-tuned sources of 1.1 B
parameters (TinyLlama's shape: hidden 2048, 22 layers, MLP 5632, 4 KV heads, 32,000 tokens),
bfloat16 on disk, written tensor by tensor (never a whole model in memory) — then, for each
placement and method, starts a fresh process that loads a ``ResidentMerger`` as a search worker
does (bfloat16 live model, the placement, the cache budget the worker's memory plan gives it, or
none with ``--uncached``) and merges candidates that change every tensor: the first fills caches
("cold"), the best of the next ones is the per-candidate time (the least disturbed by other
processes on a shared machine). A configuration the plan says does not fit is not run. It prints

- the time as a ratio to the copy-bandwidth ideal: the bytes a merge cannot avoid moving (each input
  read once in its stored bfloat16, the output written once in bfloat16) at the copy bandwidth
  measured in the same process (float32 ``copy_`` of 256 MiB buffers: bytes read + written);
- the peak resident memory of the process (``ru_maxrss``) beside what ``evomerge plan`` predicts.

On a CPU the device is the host, so ``compact`` and ``streamed`` are the same code and memory; on a
GPU ``streamed`` adds the copy of every input over PCIe. The README projects 7B × 3 on H100/H200
from these ratios.

    python benchmarks/placement.py [--params 1.1e9] [--methods linear,ties,dare_ties] [--keep DIR]

Needs ~7 GB of disk and, for the resident placement, ~20 GB of memory (the float32 sources of three
1.1 B models are 13 GB); ``--params 0.3e9`` is a quicker look. Run it with ``nice`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
PLACEMENTS = ("resident", "compact")


def llama_config(params: float) -> dict:
    head_dim = HIDDEN // HEADS
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim + 3 * HIDDEN * FFN + 2 * HIDDEN
    layers = max(1, round((params - 2 * VOCAB * HIDDEN) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }


def build_family(root: Path, params: float) -> dict[str, str]:
    """A base (N(0, 0.02²) entries, norms 1) and two sources (base + N(0, 0.002²)), bfloat16, tensor by tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.io.safetensors_writer import ShardedSafetensorsWriter
    from evomerge.merge.registry import seed_for
    from evomerge.zoo.pico import pico_tokenizer

    config = llama_config(params)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root))
    layout = [(name, tuple(t.shape), torch.bfloat16) for name, t in meta.state_dict().items()]
    (root / "config.json").unlink()
    models = {}
    for i, model in enumerate(("base", "math", "code")):
        folder = root / model
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        pico_tokenizer(VOCAB).save_pretrained(folder)
        with ShardedSafetensorsWriter(folder, layout, max_shard_bytes=2 * 1024**3) as writer:
            for name, shape, _ in layout:
                gen = torch.Generator().manual_seed(seed_for(0, "base", name))
                value = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
                if i:
                    noise = torch.Generator().manual_seed(seed_for(i, model, name))
                    value += torch.randn(shape, generator=noise) * 0.002
                writer.write(name, value.to(torch.bfloat16))
        models[model] = str(folder)
    return models


def candidate(models: dict[str, str], method: str, k: int) -> dict:
    """Candidate ``k``: weights that change with k, so every tensor is merged again."""
    weights = (0.6 + 0.1 * (k % 3), 0.3 + 0.1 * (k % 2))
    if method == "linear":
        per_source = [{"weight": w} for w in weights]
        return {"models": {m: models[m] for m in ("math", "code")}, "method": "linear",
                "model_parameters": dict(zip(("math", "code"), per_source)), "dtype": "bfloat16"}
    per_source = [{"weight": w, "density": d} for w, d in zip(weights, (0.5, 0.6))]
    return {"models": models, "base": "base", "method": method, "seed": 0,
            "model_parameters": dict(zip(("math", "code"), per_source)), "dtype": "bfloat16"}


def copy_bandwidth() -> float:
    """Bytes per second of a warm float32 copy (read + write), best of 5."""
    src, dst = torch.randn(64 * 1024**2), torch.empty(64 * 1024**2)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def measure(job: dict) -> dict:
    """In this (fresh) process: load the merger as a worker would, merge candidates, report."""
    from evomerge.materialize import ResidentMerger
    from evomerge.plan import Capacity, operators_of, plan_worker, pool_shape
    from evomerge.pool import ModelPool
    from evomerge.recipe import recipe_from_dict

    torch.set_num_threads(job["threads"])
    models = job["models"]
    recipes = [candidate(models, job["method"], k) for k in range(job["candidates"])]
    pool = ModelPool.open(models, "base" if job["method"] != "linear" else None)
    shape = pool_shape(pool)
    operators, sources = operators_of(recipes[0], shape)
    cache = None if job["cache"] == "auto" else int(job["cache"])
    plan = plan_worker(shape, device="cpu", dtype="bfloat16", placement=job["placement"], cache_memory=cache,
                       operators=operators, sources=sources, workloads=[],
                       capacity=Capacity(None, job["memory"], "host", "--memory"))
    if not plan.fits:  # never load what the plan says does not fit: the machine is shared
        return {"refused": plan.problem}
    start = time.perf_counter()
    merger = ResidentMerger.load(pool, dtype=torch.bfloat16, placement=job["placement"], cache_bytes=plan.cache_budget)
    load = time.perf_counter() - start
    times = []
    for recipe in recipes:
        parsed = recipe_from_dict(recipe, "bench")
        start = time.perf_counter()
        merger.apply(parsed)
        times.append(time.perf_counter() - start)
        assert merger.last_apply["unchanged"] == 0
    params = shape.parameters()
    inputs = 2 if job["method"] == "linear" else 3
    return {
        "load": load, "cold": times[0], "warm": min(times[1:]), "bandwidth": copy_bandwidth(),
        "ideal_bytes": (inputs * 2 + 2) * params, "params": params,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "plan": plan.total("host"), "cached": f"{plan.cached_tensors}/{plan.tensors}",
        "cache_bytes": merger.cache_nbytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1.1e9, help="parameters per model (default 1.1e9)")
    parser.add_argument("--methods", default="linear,ties,dare_ties")
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument("--candidates", type=int, default=3, help="candidates merged per configuration (first: cold; best of the rest)")
    parser.add_argument("--uncached", action="store_true", help="also merge TIES and DARE-TIES without caches (slow on a CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", default=None, help="memory the plans may use, e.g. 18GB (default: 75%% of what is available now)")
    parser.add_argument("--keep", default=None, help="build (or reuse) the family in this folder and keep it")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return

    from evomerge.plan.capacity import host_available
    from evomerge.sizes import parse_size

    memory = parse_size(args.memory) if args.memory else int(0.75 * host_available())  # leave the others room
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="evomerge-placement-"))
    try:
        if (root / "code" / "config.json").is_file():
            models = {m: str(root / m) for m in ("base", "math", "code")}
        else:
            start = time.perf_counter()
            models = build_family(root, args.params)
            print(f"built the family in {time.perf_counter() - start:.0f} s: {root}")
        print(f"plans may use {memory / 1024**3:.1f} GiB")
        last: dict = {}
        print(f"{'method':<10} {'placement':<9} {'caches':<7} {'cached':>7} {'cold s':>7} {'s/cand':>7} {'ideal s':>7} "
              f"{'ratio':>6} {'peak GiB':>8} {'plan GiB':>8}", flush=True)
        for method in args.methods.split(","):
            for placement in args.placements.split(","):
                for cache in ("auto", "0") if method != "linear" and args.uncached else ("auto",):
                    job = {"models": models, "method": method, "placement": placement, "cache": cache,
                           "candidates": args.candidates, "threads": args.threads, "memory": memory}
                    out = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True)
                    if out.returncode:
                        print(f"{method:<10} {placement:<9} {cache:<7} failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    if "refused" not in r:
                        last = r
                    if "refused" in r:
                        print(f"{method:<10} {placement:<9} {cache:<7} not run, the plan says: {r['refused']}", flush=True)
                        continue
                    ideal = r["ideal_bytes"] / r["bandwidth"]
                    print(f"{method:<10} {placement:<9} {cache:<7} {r['cached']:>7} {r['cold']:7.2f} {r['warm']:7.2f} {ideal:7.3f} "
                          f"{r['warm'] / ideal:6.1f} {r['peak'] / 1024**3:8.2f} {r['plan'] / 1024**3:8.2f}", flush=True)
        load = os.getloadavg()[0]
        print(f"params per model {last['params'] / 1e9:.2f} B; copy bandwidth {last['bandwidth'] / 1e9:.1f} GB/s; "
              f"{os.cpu_count()} CPUs, {args.threads} threads; load average {load:.1f} at the end")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
