"""The task-vector family as one per-tensor pipeline.

    τᵢ = θᵢ − θ₀ → sparsify (none | magnitude | bernoulli | breadcrumbs | della) → × weightᵢ
      → consensus (none | sign election) → Σ (÷ Σ weights with ``normalize``) → × λ
      → × LiNeS (α + β·ℓ/(L−1); α outside the blocks) → + θ₀

Task arithmetic, TIES, DARE, breadcrumbs, DELLA and LiNeS are settings of this pipeline, registered
under mergekit's names with mergekit's parameter names and defaults, so a mergekit config means
the same here. Normalising divides by Σ weights (a scalar; |Σ| < 1e-8 → 1) without consensus, and by
the per-entry Σ weights of agreeing entries (0 → 1) with it — mergekit's rules.

All passes run on one cache-sized chunk at a time (see ``chunking``). With a cache attached, task
vectors, sorted magnitudes and DELLA ranks are computed once per tensor and reused by every later
candidate; so are DARE/DELLA random keys for the recipe's seed. The cached and uncached paths
compute identical kept sets and give identical results.

Every setting but DELLA (whose keep probabilities need every entry's rank) also merges block by
block: ``prepare_task_vectors`` finds each magnitude window and L1 rescale in streamed passes and
starts one random stream per DARE source that the blocks then continue, so the blocks together
give exactly the whole-tensor result.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from evomerge.errors import ConfigError
from evomerge.merge.chunking import Scratch, chunk_size, finish, flat, for_chunks, output_for, split
from evomerge.merge.consensus import combine
from evomerge.merge.fused import fused_merge
from evomerge.merge.registry import (
    MemoryCost,
    ParamDef,
    Params,
    TensorInputs,
    TensorStream,
    register_operator,
)
from evomerge.merge.sparsify import (
    KeepAll,
    KeepBernoulli,
    KeepDella,
    KeepWindow,
    RankWindow,
    Sparsifier,
    breadcrumbs_ranks,
    check_della,
    della_ranks,
    l1_rescale,
    l1_rescale_from_blocks,
    magnitude_ranks,
    random_keys,
    sort_magnitudes,
    window_from_blocks,
    window_from_sorted,
    window_from_values,
)

SPARSIFY_METHODS = ("none", "magnitude", "bernoulli", "breadcrumbs", "della")
BLOCK_CHUNKS = 8
"""Chunks per block of the streamed selection (as the export's blocks)."""


@dataclass(frozen=True)
class TaskVectorMethod:
    """One setting of the pipeline: how to sparsify, whether to elect signs, and the defaults."""

    sparsify: str = "none"
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False
    lines: bool = False


def merge_task_vectors(
    inputs: TensorInputs, params: Params, out: torch.Tensor | None, method: TaskVectorMethod
) -> torch.Tensor:
    """θ₀ + λ·LiNeS(ℓ)·merge(sparsified weighted τᵢ) for one tensor."""
    if inputs.base is None:
        raise ConfigError(f"tensor {inputs.name}: this merge method needs a base model")
    base = flat(inputs.base)
    weights = [float(w) for w in params.source_values("weight")]
    factor = float(params.shared["lambda"])
    if method.lines:
        factor *= float(params.shared["alpha"]) + float(params.shared["beta"]) * inputs.layer_fraction
    normalize = bool(params.shared["normalize"])
    result, dest = output_for(inputs.base, out)
    # A zero weight contributes nothing, not even to the election or the divisor.
    active = [i for i, w in enumerate(weights) if w != 0]
    taus = [flat(inputs.task_vector(i)) for i in active]
    sparsifiers = [_sparsifier(inputs, params, method, i, tau) for i, tau in zip(active, taus)]
    if not active:
        dest.copy_(base)
        return finish(result, out)
    if method.consensus:
        coefs = [weights[i] * s.scale for i, s in zip(active, sparsifiers)]
    else:
        divisor = sum(weights) if normalize else 1.0
        if abs(divisor) < 1e-8:
            divisor = 1.0
        coefs = [weights[i] * factor * s.scale / divisor for i, s in zip(active, sparsifiers)]
    scalars = torch.tensor(coefs + [weights[i] for i in active] + [factor], dtype=torch.float32, device=base.device)
    offset = inputs.offset
    if not fused_merge(base, taus, sparsifiers, scalars, offset, method.consensus, normalize, dest):
        tau_chunks = [split(tau) for tau in taus]
        base_chunks, dest_chunks = split(base), split(dest)

        def body(index: int, start: int, stop: int, scratch: Scratch) -> None:
            kept = [s.apply(index, offset + start, tau[index], scratch) for s, tau in zip(sparsifiers, tau_chunks)]
            combine(
                base_chunks[index],
                [v for v, _ in kept],
                [m for _, m in kept],
                scalars,
                method.consensus,
                normalize,
                out=dest_chunks[index],
                scratch=scratch,
            )

        for_chunks(base.numel(), base.device, body)
    return finish(result, out)


def _random_keys(inputs: TensorInputs, i: int, n: int) -> torch.Tensor:
    """Random keys of source ``i``; with a cache, drawn once per seed and kept for later candidates.

    A block continues the stream its ``prepare`` started, where the previous block stopped.
    """
    if inputs.stats is not None:
        return random_keys(inputs.stats[f"generator{i}"], n, inputs.sources[i].device)
    key = f"random_keys{i}"
    if inputs.cache is not None and inputs.cache.get(key, (None,))[0] == inputs.seed:
        return inputs.cache[key][1]
    keys = random_keys(inputs.generator(i), n, inputs.sources[i].device)
    if inputs.cache is not None:
        inputs.cache[key] = (inputs.seed, keys)
    return keys


def _sparsifier(
    inputs: TensorInputs, params: Params, method: TaskVectorMethod, i: int, tau: torch.Tensor
) -> Sparsifier:
    if method.sparsify == "none":
        return KeepAll()
    values = params.per_source[i]
    density = float(values["density"])
    rescale = bool(params.shared["rescale"])
    n = tau.numel()
    if method.sparsify == "della":
        check_della(density, float(values["epsilon"]), f"tensor {inputs.name}: model '{inputs.source_names[i]}'")
    if density >= 1:
        return KeepAll()
    if method.sparsify == "bernoulli":
        return KeepBernoulli(_random_keys(inputs, i, n), density, rescale)
    if method.sparsify == "della":
        if density <= 0:
            return KeepWindow(RankWindow(n, 0, 0))
        ranks = inputs.cached(f"della_ranks{i}", lambda: della_ranks(tau.abs()))
        return KeepDella(_random_keys(inputs, i, n), density, float(values["epsilon"]), ranks, rescale)
    if inputs.stats is not None:
        window, scale = inputs.stats[f"window{i}"]
        return KeepWindow(window, scale)
    lo, hi = _window_ranks(method, values, n, density)
    if inputs.cache is not None:
        sorted_abs, order = inputs.cached(f"sorted_abs{i}", lambda: sort_magnitudes(tau))
        window = window_from_sorted(sorted_abs, order, lo, hi)
    elif n <= BLOCK_CHUNKS * chunk_size(tau.device):  # small: selection on a copy costs less than histograms
        window = window_from_values(tau.abs(), lo, hi)
    else:  # streamed selection: no copy of a large tensor (a memory plan may have left no room for one)
        window = window_from_blocks(functools.partial(_blocks, tau), n, lo, hi)
    scale = l1_rescale(tau, window) if rescale and not window.keeps_all else 1.0
    return KeepWindow(window, scale)


def _blocks(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """A flat tensor as consecutive views of ``block_size`` entries (a ``TensorStream`` pass)."""
    step = BLOCK_CHUNKS * chunk_size(x.device)
    return ((start, x[start : start + step]) for start in range(0, x.numel(), step))


def _window_ranks(method: TaskVectorMethod, values: dict, n: int, density: float) -> tuple[int, int]:
    if method.sparsify == "magnitude":
        return magnitude_ranks(n, density)
    return breadcrumbs_ranks(n, density, float(values["gamma"]))


def prepare_task_vectors(
    inputs: TensorInputs, params: Params, stream: TensorStream, method: TaskVectorMethod
) -> dict[str, object]:
    """Whole-tensor statistics for blockwise merging: magnitude windows and rescales, random streams."""
    stats: dict[str, object] = {}
    if method.sparsify == "none":
        return stats
    rescale = bool(params.shared["rescale"])
    n = stream.numel
    for i, values in enumerate(params.per_source):
        density = float(values["density"])
        if float(values["weight"]) == 0 or density >= 1:
            continue
        if method.sparsify == "bernoulli":
            stats[f"generator{i}"] = inputs.generator(i, stream.device)
            continue
        blocks = functools.partial(stream.task_vector_blocks, i)
        window = window_from_blocks(blocks, n, *_window_ranks(method, values, n, density))
        scale = l1_rescale_from_blocks(blocks, n, stream.device, window) if rescale and not window.keeps_all else 1.0
        stats[f"window{i}"] = (window, scale)
    return stats


_WEIGHT = ParamDef(1.0, doc="per-model weight wᵢ of its task vector")
_DENSITY = ParamDef(1.0, low=0.0, high=1.0, doc="fraction of each task vector kept")
_GAMMA = ParamDef(0.01, low=0.0, high=1.0, doc="fraction of largest-magnitude outliers dropped (breadcrumbs)")
_EPSILON = ParamDef(0.15, low=0.0, high=1.0, doc="half-width of DELLA's keep probabilities around density")
_LAMBDA = ParamDef(1.0, doc="global scale λ of the merged task vector")


def _register(name: str, method: TaskVectorMethod, doc: str) -> None:
    shared = {"lambda": _LAMBDA, "normalize": ParamDef(method.normalize, kind=bool)}
    per_source = {"weight": _WEIGHT}
    if method.sparsify != "none":
        shared["rescale"] = ParamDef(method.rescale, kind=bool)
        per_source["density"] = _DENSITY
    if method.sparsify == "breadcrumbs":
        per_source["gamma"] = _GAMMA
    if method.sparsify == "della":
        per_source["epsilon"] = _EPSILON
    if method.lines:
        shared["alpha"] = ParamDef(1.0, doc="LiNeS scale of tensors outside the blocks and of block 0")
        shared["beta"] = ParamDef(0.0, doc="LiNeS increase of the scale from block 0 to the last block")

    def operator(inputs: TensorInputs, params: Params, out: torch.Tensor | None) -> torch.Tensor:
        return merge_task_vectors(inputs, params, out, method)

    def prepare(inputs: TensorInputs, params: Params, stream: TensorStream) -> dict[str, object]:
        return prepare_task_vectors(inputs, params, stream, method)

    operator.__doc__ = doc
    operator.__name__ = name
    stochastic = method.sparsify in ("bernoulli", "della")
    blockwise = method.sparsify != "della"
    # per source: the task vector (4 bytes/entry); sorted magnitudes and their order (8) for a
    # magnitude window, random keys (4) for DARE, keys and ranks (8) for DELLA. Sorting scratch
    # while a cache entry is built: |τ|, int64 indices, the sort's own buffers (measured ~20).
    # Without a cache a magnitude window is found by streamed selection (no per-entry memory).
    extra = {"none": (0, 0, 0), "magnitude": (8, 20, 0), "breadcrumbs": (8, 20, 0), "bernoulli": (4, 0, 4), "della": (8, 20, 8)}
    cached, fill, uncached = extra[method.sparsify]
    memory = MemoryCost(cache_per_source=4 + cached, fill=fill, work_per_source=4 + uncached, work=0)
    register_operator(
        name,
        shared=shared,
        per_source=per_source,
        needs_base=True,
        stochastic=stochastic,
        blockwise=blockwise,
        prepare=prepare if blockwise else None,
        memory=memory,
    )(operator)


for _name, _method, _doc in (
    ("task_arithmetic", TaskVectorMethod(), "Task arithmetic: θ₀ + λ Σ wᵢτᵢ."),
    (
        "ties",
        TaskVectorMethod("magnitude", consensus=True, normalize=True),
        "TIES: per-tensor magnitude trim, sign election, disjoint mean.",
    ),
    (
        "dare_ties",
        TaskVectorMethod("bernoulli", consensus=True, rescale=True),
        "DARE-TIES: random drop with 1/density rescale, then sign election (sum).",
    ),
    (
        "dare_linear",
        TaskVectorMethod("bernoulli", rescale=True),
        "DARE: random drop with 1/density rescale, then task arithmetic.",
    ),
    (
        "breadcrumbs",
        TaskVectorMethod("breadcrumbs"),
        "Model breadcrumbs: drop outliers and small entries, then task arithmetic.",
    ),
    (
        "breadcrumbs_ties",
        TaskVectorMethod("breadcrumbs", consensus=True),
        "Model breadcrumbs with TIES sign election.",
    ),
    (
        "della",
        TaskVectorMethod("della", consensus=True, normalize=True, rescale=True),
        "DELLA: magnitude-ranked random drop, sign election, disjoint mean.",
    ),
    (
        "della_linear",
        TaskVectorMethod("della", rescale=True),
        "DELLA without sign election.",
    ),
    (
        "lines",
        TaskVectorMethod(lines=True),
        "Task arithmetic with LiNeS layer scaling α + β·ℓ/(L−1).",
    ),
):
    _register(_name, _method, _doc)
