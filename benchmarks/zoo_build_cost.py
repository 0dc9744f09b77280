"""What does a portable zoo build cost? CPU seconds per training step, pinned kernels vs this CPU's own.

A portable build (``kernels: portable``, the default) trains on ATen's plain C++ kernels and MKL's
AVX2 branch so its weights are the same on every x86-64 CPU; a native build uses the CPU's fastest
tier. Each tier trains the default spec's base model for ``--steps`` steps (its batch size, one
thread) in a fresh process, as a build does, and reports the process's CPU time — not wall time, so
the ratio holds on a shared machine — and a hash of the weights (equal hashes = identical weights).

    python benchmarks/zoo_build_cost.py [--steps 40] [--spec evomerge/zoo/default.yaml]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.zoo.portable import PORTABLE_ENV  # noqa: E402


def job(spec_path: str, steps: int) -> dict:
    """Train the spec's base for ``steps`` steps here; CPU seconds and the weights' hash."""
    import torch

    from evomerge.zoo.corpus import base_sequence
    from evomerge.zoo.model import build_base_model, llama_config
    from evomerge.zoo.spec import load_spec
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import TrainConfig, train

    spec = load_spec(spec_path)
    torch.set_num_threads(spec.threads)
    m = spec.model
    config = llama_config(layers=m.layers, hidden=m.hidden, heads=m.heads, ffn=m.ffn, max_positions=m.max_positions,
                          tokenizer_vocab=len(build_tokenizer()))
    model = build_base_model(config, seed=spec.seed, embed_std=m.embed_std, offset_norm=m.offset_norm)
    b = spec.base
    cfg = TrainConfig(steps, b.lr, b.batch_size, b.warmup, b.weight_decay, spec.seed)
    mixture = dict(spec.base.mixture)
    started = time.process_time()
    train(model, lambda rng: base_sequence(rng, spec.max_operand, mixture, spec.base.codeswitch_prob), cfg, label="base", progress=None)
    cpu = time.process_time() - started
    digest = hashlib.sha256()
    for _, tensor in sorted(model.state_dict().items()):
        digest.update(tensor.numpy().tobytes())
    return {"tier": torch.backends.cpu.get_cpu_capability(), "cpu_seconds": cpu, "hash": digest.hexdigest()[:16]}


def run(env: dict[str, str], spec: str, steps: int) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    done = subprocess.run([sys.executable, __file__, "--job", spec, str(steps)], env=clean | env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="base training steps per tier")
    parser.add_argument("--spec", default=str(REPO / "evomerge" / "zoo" / "default.yaml"))
    parser.add_argument("--job", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(job(args.job[0], int(args.job[1]))))
        return
    portable = run(PORTABLE_ENV, args.spec, args.steps)
    native = run({}, args.spec, args.steps)
    print(f"{args.steps} base training steps of {Path(args.spec).name}, CPU seconds (one thread):")
    print(f"  portable (ATen default + MKL AVX2): {portable['cpu_seconds']:6.1f} s  weights {portable['hash']}")
    print(f"  native ({native['tier']}):{' ' * max(0, 22 - len(native['tier']))}{native['cpu_seconds']:6.1f} s  weights {native['hash']}")
    print(f"  portable / native: {portable['cpu_seconds'] / native['cpu_seconds']:.2f}x")


if __name__ == "__main__":
    main()
