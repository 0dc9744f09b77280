"""A LoRA adapter as a merge source vs the same model merged densely beforehand (peft's merge_and_unload).

Builds (once, cached under .cache/bench/lora) a ~100 M-parameter float32 Llama base, a rank-16 peft
LoRA adapter on every attention and MLP projection (random factors), and peft's merged model saved
as a dense folder. Then

1. reads every tensor of the pool's LoRA source (base + ΔW, computed on read) and of the dense folder,
   and prints the time ratio;
2. runs ``evomerge merge`` of a linear recipe (base 0.5 + expert 0.5, the expert as ``base+adapter``
   or as the dense folder) in fresh processes and prints the wall-time ratio and the peak memory the
   LoRA source adds (its peak minus the dense run's: the LoRA source should add about one tensor's ΔW,
   not a model);
3. compares the exports (bit-identical up to ΔW blocks: a tensor over 2²⁰ entries forms ΔW in
   row blocks, whose products BLAS may round a last bit differently from peft's one product).

    python benchmarks/lora_source.py [--hidden 768] [--layers 10] [--rank 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from evomerge.io import TensorIndex
from evomerge.pool import ModelPool
from evomerge.zoo.pico import build_pico

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare(work: Path, hidden: int, layers: int, rank: int) -> tuple[Path, Path, Path]:
    """(base, adapter, dense) folders, built once."""
    base, adapter, dense = work / "base", work / f"adapter-r{rank}", work / f"dense-r{rank}"
    if not (base / "config.json").is_file():
        build_pico(base, "llama", hidden=hidden, layers=layers, vocab_size=32000)
    if not (dense / "config.json").is_file():
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in lora.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        lora.save_pretrained(adapter)
        lora.merge_and_unload().save_pretrained(dense)
    return base, adapter, dense


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``cmd`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def read_all(pool: ModelPool, model: str) -> float:
    start = time.perf_counter()
    for name in pool.tensor_names:
        pool.tensor(model, name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    work = ROOT / ".cache" / "bench" / "lora" / f"llama-{args.hidden}x{args.layers}"
    base, adapter, dense = prepare(work, args.hidden, args.layers, args.rank)
    with ModelPool.open({"base": base, "lora": f"{base}+{adapter}", "dense": dense}, "base") as pool:
        params = pool.num_parameters
        read_all(pool, "dense"), read_all(pool, "lora")  # warm the page cache
        dense_s = min(read_all(pool, "dense") for _ in range(3))
        lora_s = min(read_all(pool, "lora") for _ in range(3))
    print(f"{params / 1e6:.0f} M parameters, rank-{args.rank} LoRA on {len(TARGETS)} projections x {args.layers} layers")
    print(f"read every tensor: dense {dense_s:.2f} s, LoRA source {lora_s:.2f} s ({lora_s / dense_s:.1f}x)")
    results = {}
    for kind, expert in (("dense", str(dense)), ("lora", f"{base}+{adapter}")):
        recipe = work / f"linear-{kind}.yaml"
        recipe.write_text(yaml.safe_dump({"models": {"base": str(base), "expert": expert}, "method": "linear",
                                          "model_parameters": {"base": {"weight": 0.5}, "expert": {"weight": 0.5}}}))
        results[kind] = run([str(BIN / "evomerge"), "merge", str(recipe), "--out", str(work / f"out-{kind}"), "--overwrite", "--quiet"])
    (dense_t, dense_mb), (lora_t, lora_mb) = results["dense"], results["lora"]
    print(f"evomerge merge (linear, 2 models): dense {dense_t:.1f} s / {dense_mb:.0f} MB peak, "
          f"LoRA source {lora_t:.1f} s / {lora_mb:.0f} MB peak ({lora_t / dense_t:.2f}x time, {lora_mb - dense_mb:+.0f} MB)")
    with TensorIndex.open(work / "out-dense") as a, TensorIndex.open(work / "out-lora") as b:
        differ = [n for n in a.names if not torch.equal(a.get(n), b.get(n))]
        worst = max(((a.get(n) - b.get(n)).abs().max().item() for n in differ), default=0.0)
    print(f"exports: {len(a.names) - len(differ)}/{len(a.names)} tensors bit-identical, largest difference {worst:.2e}")


if __name__ == "__main__":
    main()
