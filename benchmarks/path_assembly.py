"""How long does assembling a data-flow candidate take, and what memory does it add?

A path is assembled from the resident source layers by reference: shallow per-hop clones (cached
by model, layer and position) in a layer list, the shell's config set to the path's length. This
benchmark decodes random genomes of a data-flow space over the zoo's cross-lingual pair (or any two
models), assembles each path, and reports per candidate: the time of ``apply`` (first sight of
each clone, then warm), the parameter bytes the assembled model holds that the sources do not (0
means every weight is shared), and the Python heap allocated per apply (tracemalloc). It also
times one forward pass, for scale, and the parameter-recipe merge of the same models (what a
candidate costs in a parameter-space search).

    python benchmarks/path_assembly.py [--models zoo:skill_add_a,zoo:lang_qa_b] [--candidates 200]

Target: <= 5 ms per candidate on the zoo.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from evomerge.materialize import PathAssembler, ResidentMerger
from evomerge.pool import ModelPool
from evomerge.recipe import Recipe
from evomerge.spaces import PoolInfo, build_space


def zoo_folder(ref: str) -> str:
    """``zoo:<model>`` against $EVOMERGE_ZOO or .cache/zoo; anything else is a folder."""
    if not ref.startswith("zoo:"):
        return ref
    from evomerge.zoo.index import ZooIndex

    zoo = Path(os.environ.get("EVOMERGE_ZOO") or ".cache/zoo").resolve()
    return str(zoo / ZooIndex.load(zoo / "zoo.json").model(ref[4:]).folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="zoo:skill_add_a,zoo:lang_qa_b", help="two or more models (zoo:<name> or folders)")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="r: the layers of all models are laid out r times")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    refs = args.models.split(",")
    models = {f"m{i}": zoo_folder(ref) for i, ref in enumerate(refs)}
    rng = np.random.default_rng(0)
    with ModelPool.open(models) as pool:
        info = PoolInfo(models, None, pool.layer_map.num_layers, pool.parameter_order())
        space = build_space({"kind": "dataflow", "repeats": args.repeats, "scaling": "slot"}, info)
        paths = [space.decode(rng.random(space.dimension)) for _ in range(args.candidates)]
        paths = [p for p in paths if p.hops]
        start = time.perf_counter()
        assembler = PathAssembler.load(pool)
        load = time.perf_counter() - start
        source_ptrs = {p.data_ptr() for m in assembler.sources.values() for p in m.parameters()}
        source_bytes = sum(p.numel() * p.element_size() for m in assembler.sources.values() for p in m.parameters())
        cold, warm, extra, heap = [], [], [], []
        for label, times in (("cold", cold), ("warm", warm)):
            for path in paths:
                tracemalloc.start()
                start = time.perf_counter()
                assembler.apply(path)
                times.append(time.perf_counter() - start)
                allocated = tracemalloc.get_traced_memory()[0]
                tracemalloc.stop()
                if label == "warm":
                    heap.append(allocated)
                    model = assembler.model
                    extra.append(sum(p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() not in source_ptrs))
        ids = torch.randint(4, assembler.sources["m0"].config.vocab_size, (8, 32))
        with torch.no_grad():
            assembler.apply(paths[0])
            start = time.perf_counter()
            assembler.model(ids)
            forward = time.perf_counter() - start
        assembler.close()
        merger = ResidentMerger.load(pool)
        recipe = Recipe(models=models, method="linear", model_parameters={m: {"weight": 1 / len(models)} for m in models})
        merges = []
        for _ in range(5):
            start = time.perf_counter()
            merger.apply(recipe)
            merges.append(time.perf_counter() - start)
    hops = [len(p.hops) for p in paths]
    print(f"{len(models)} models, {info.num_layers} layers each, {source_bytes / 1e6:.1f} MB of weights resident; loaded in {load:.2f} s")
    print(f"{len(paths)} random paths of {min(hops)}-{max(hops)} hops (median {statistics.median(hops):.0f})")
    print(f"assembly per candidate: first sight {1e3 * statistics.median(cold):.3f} ms (median), warm {1e3 * statistics.median(warm):.3f} ms (median), {1e3 * float(np.percentile(warm, 95)):.3f} ms (95th percentile)")
    print(f"parameter bytes not shared with the sources: {max(extra)} (max over candidates)")
    print(f"Python heap per warm apply: {statistics.median(heap) / 1e3:.1f} kB (median)")
    print(f"for scale: one forward pass (8 x 32 tokens) {1e3 * forward:.1f} ms; a parameter-space merge {1e3 * statistics.median(merges):.1f} ms")
    print(f"ratio warm assembly / 5 ms target: {statistics.median(warm) / 5e-3:.3f}")


if __name__ == "__main__":
    main()
