"""How close in-place merging gets to memory bandwidth.

Builds random float32 tensors shaped like a small Llama (hidden 768, vocabulary 32000, tied
embeddings, as many blocks as fit ``--params``), ``--sources`` fine-tuned variants plus the base,
and times in-place materialization as a search worker does it: every tensor is written into a
preallocated ``out`` buffer and each tensor keeps its cache dict across repetitions (task vectors,
sorted magnitudes and DARE keys are computed by the first repetition, reported as "cold", and the
best of the following ones is "seconds"). Each method's time is
compared with the ideal = (bytes read + bytes written) ÷ copy bandwidth, where the bandwidth is
measured in the same run with ``dst.copy_(src)`` over the same tensors (whole, or chunk by chunk
through the operators' chunk runner, whichever is faster). On CPU the task-vector methods run as
fused compiled kernels (``evomerge.merge.fused``); ``EVOMERGE_FUSED_KERNELS=off`` measures the eager
chunked path instead.

    python benchmarks/merge_speed.py [--params 100e6] [--sources 3] [--repeats 3] [--threads N]

Ideal and measured times share the machine with whatever else runs on it; on a loaded machine
compare ``--threads 1`` runs, which are the least disturbed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from evomerge.merge import TensorInputs, get_operator
from evomerge.merge.chunking import for_chunks
from evomerge.merge.fused import repeated_merges

HIDDEN = 768
FFN = 2048
VOCAB = 32000

# method -> (shared parameters, per-source parameters, tensors read per element, target ratio)
METHODS: dict[str, tuple[dict, dict, str, float]] = {
    "linear": ({}, {"weight": 1.0}, "sources", 2.0),
    "task_arithmetic": ({"lambda": 0.8}, {"weight": 1.0}, "base+tv", 2.0),
    "ties": ({}, {"weight": 1.0, "density": 0.5}, "base+tv", 8.0),
    "dare_ties": ({}, {"weight": 1.0, "density": 0.5}, "base+tv", 4.0),
}


def llama_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama with tied embeddings and about ``params`` parameters."""
    per_block = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN
    blocks = max(1, round((params - VOCAB * HIDDEN - HIDDEN) / per_block))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(blocks):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.mlp.gate_proj.weight"] = (FFN, HIDDEN)
        shapes[f"{p}.mlp.up_proj.weight"] = (FFN, HIDDEN)
        shapes[f"{p}.mlp.down_proj.weight"] = (HIDDEN, FFN)
        shapes[f"{p}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def chunked_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    def body(index: int, start: int, stop: int, scratch: object) -> None:
        dst[start:stop].copy_(src[start:stop])

    for_chunks(src.numel(), src.device, body)


def timed(fn: Callable[[], None], repeats: int) -> float:
    """Best wall time of ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="approximate parameter count")
    parser.add_argument("--sources", type=int, default=3, help="number of fine-tuned models")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shapes = llama_shapes(args.params)
    source_names = [f"m{i}" for i in range(args.sources)]
    base = {name: torch.randn(shape) for name, shape in shapes.items()}
    sources = {
        name: [b + 0.01 * torch.randn(b.shape) for _ in source_names] for name, b in base.items()
    }
    outs = {name: torch.empty(shape) for name, shape in shapes.items()}
    numel = sum(b.numel() for b in base.values())
    num_layers = 1 + max(layer for name in shapes if (layer := layer_of(name)) is not None)
    print(f"{len(shapes)} tensors, {numel / 1e6:.1f} M parameters, {args.sources} sources + base, "
          f"{torch.get_num_threads()} threads")

    def copy_all() -> None:
        for name, b in base.items():
            outs[name].copy_(b)

    def copy_chunked() -> None:
        # the same copy through the operators' chunk runner; the faster of the two sets the ideal
        for name, b in base.items():
            chunked_copy(b.view(-1), outs[name].view(-1))

    copy_all()
    copy_seconds = min(timed(copy_all, args.repeats + 2), timed(copy_chunked, args.repeats + 2))
    bandwidth = 2 * 4 * numel / copy_seconds
    print(f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s ({copy_seconds:.3f} s per copy of the model)")

    print(f"{'method':<16} {'cold s':>8} {'seconds':>8} {'ideal s':>8} {'ratio':>6} {'target':>7}")
    for method in args.methods.split(","):
        shared, per_source, reads, target = METHODS[method]
        spec = get_operator(method)
        params = spec.resolve(shared, [per_source] * args.sources, method)
        caches: dict[str, dict] = {name: {} for name in shapes}

        def merge_all() -> None:
            with repeated_merges():  # as a search worker's resident merger does
                merge_tensors()

        def merge_tensors() -> None:
            for name in shapes:
                inputs = TensorInputs(
                    name=name,
                    base=base[name],
                    sources=sources[name],
                    source_names=source_names,
                    layer=layer_of(name),
                    num_layers=num_layers,
                    seed=1,
                    cache=caches[name],
                )
                spec.fn(inputs, params, outs[name])

        cold = timed(merge_all, 1)
        seconds = timed(merge_all, args.repeats)
        tensors_read = args.sources if reads == "sources" else args.sources + 1
        ideal = (tensors_read + 1) * 4 * numel / bandwidth
        ratio = seconds / ideal
        verdict = "PASS" if ratio <= target else "MISS"
        print(f"{method:<16} {cold:8.3f} {seconds:8.3f} {ideal:8.3f} {ratio:6.2f} {target:6.1f}x {verdict}")
        caches.clear()


if __name__ == "__main__":
    main()
