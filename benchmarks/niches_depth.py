"""Does a natural-niches child get slower to merge as its lineage deepens?

A child is a blend: per-position weights of the sources over the canonical parameter order, one
segment per cut its ancestors made. This benchmark breeds a lineage ``--depth`` generations deep
(each child a split-point SLERP crossover of the previous one and a random earlier member, as an
archive would), then times the resident in-place merge of a first-generation child and of the
deepest one (median of ``--repeats``), and the space's derivation of a child (the SLERP angle
from the sources' Gram matrices, including the one-time pass that computes them).

    python benchmarks/niches_depth.py [--hidden 512] [--layers 8] [--depth 200] [--repeats 5]

Target: the deepest child merges in <= 2x the time of a first-generation child.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evomerge.materialize import ResidentMerger
from evomerge.pool import ModelPool
from evomerge.spaces import PoolInfo, build_space
from evomerge.zoo.pico import build_pico_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--depth", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        family = build_pico_family(
            Path(tmp), "llama", args.sources, hidden=args.hidden, layers=args.layers, vocab_size=args.vocab
        )
        models = {name: str(path) for name, path in family.items() if name != "base"}
        with ModelPool.open(models) as pool:
            info = PoolInfo(models, None, pool.layer_map.num_layers, pool.parameter_order())
            size = sum(n for _, n in info.tensors)
            print(f"{len(models)} sources of {size / 1e6:.1f} M floating parameters, {len(info.tensors)} tensors")
            space = build_space({"kind": "split_point", "interpolation": "slerp"}, info)
            seeds = [space.reference(name) for name in models]
            start = time.perf_counter()
            first = space.derive(rng.random(2), seeds[:2])
            print(f"first derivation (computes the sources' Gram matrices): {time.perf_counter() - start:.2f} s")
            members, derive_times = list(seeds) + [first], []
            child = first
            for _ in range(args.depth - 1):
                mate = members[int(rng.integers(len(members)))]
                start = time.perf_counter()
                child = space.derive(rng.random(2), [child, mate])
                derive_times.append(time.perf_counter() - start)
                members.append(child)
            print(
                f"derivation per child: median {statistics.median(derive_times) * 1e3:.1f} ms, "
                f"max {max(derive_times) * 1e3:.1f} ms; deepest child: {len(child.segments)} segments"
            )
            merger = ResidentMerger.load(pool)
            timings = {}
            # a first-generation child of two seeds uses two sources; one bred with the uniform merge
            # uses all of them, as a deep child does: the fair baseline for the cost of depth alone
            every = space.derive(rng.random(2), [seeds[0], space.reference("uniform")])
            cases = (("generation 1", first), ("generation 1, all sources", every), (f"generation {args.depth}", child))
            for label, blend in cases:
                merger.apply(blend)  # warm
                runs = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    merger.apply(blend)
                    runs.append(time.perf_counter() - start)
                timings[label] = statistics.median(runs)
                print(f"merge {label:>26}: {len(blend.segments):4d} segments, median {timings[label] * 1e3:.1f} ms")
            deep = timings[f"generation {args.depth}"]
            print(f"ratio deepest / first generation: {deep / timings['generation 1']:.2f}x (target <= 2x); "
                  f"vs a first-generation child of all sources: {deep / timings['generation 1, all sources']:.2f}x")


if __name__ == "__main__":
    main()
