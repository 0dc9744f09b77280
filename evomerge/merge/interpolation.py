"""Weight-space interpolation: linear (model soup) and SLERP.

Semantics follow mergekit so configs and parity tests agree: ``linear`` merges the sources (not
the base) as Σ wᵢθᵢ, divided by Σ wᵢ when ``normalize`` (the default); ``slerp`` interpolates from
the base (v₀, t = 0) to the one source (v₁, t = 1) along the great circle through the two flattened
tensors, falling back to lerp when they are nearly collinear (|cos| > 0.9995). Both are blockwise:
SLERP's angle comes from a streamed Gram matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from evomerge.errors import ConfigError
from evomerge.merge.chunking import (
    Scratch,
    chunk_size,
    finish,
    flat,
    for_chunks,
    output_for,
    split,
)
from evomerge.merge.registry import (
    MemoryCost,
    ParamDef,
    Params,
    TensorInputs,
    TensorStream,
    lockstep,
    register_operator,
)

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def weighted_sum(tensors: list[torch.Tensor], coefs: list[float], dest: torch.Tensor) -> None:
    """``dest`` = Σ coefᵢ·tensorᵢ over flat tensors, chunk by chunk; zero coefficients are skipped."""
    terms = [(t, c) for t, c in zip(tensors, coefs) if c != 0]
    if not terms:
        dest.zero_()
        return

    parts = [(split(t), c) for t, c in terms]
    dest_chunks = split(dest)

    def body(index: int, start: int, stop: int, scratch: Scratch) -> None:
        o = dest_chunks[index]
        first, c0 = parts[0]
        torch.mul(first[index], c0, out=o)
        for t, c in parts[1:]:
            o.add_(t[index], alpha=c)

    for_chunks(dest.numel(), dest.device, body)


def dot_products(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The Gram matrix ⟨xᵢ, xⱼ⟩ (float64) of flat tensors, from per-chunk partial sums."""
    return gram_from_blocks(iter([(0, tensors)]), tensors[0].numel(), tensors[0].device)


def gram_from_blocks(blocks: Iterator[tuple[int, list[torch.Tensor]]], n: int, device: torch.device) -> torch.Tensor:
    """``dot_products`` of tensors given as consecutive blocks (offsets at chunk multiples).

    One partial Gram matrix per global chunk, summed at the end: the same numbers in the same
    order whatever the blocks, so a blockwise merge gets exactly the whole-tensor factors.
    """
    size = chunk_size(device)
    partial: torch.Tensor | None = None
    for offset, xs in blocks:
        if partial is None:
            partial = torch.zeros(-(-n // size), len(xs), len(xs), dtype=torch.float64, device=device)
        first = offset // size
        target = partial

        def body(index: int, start: int, stop: int, scratch: Scratch) -> None:
            block = torch.stack([x[start:stop] for x in xs])
            target[first + index] = (block @ block.T).to(torch.float64)

        for_chunks(xs[0].numel(), device, body)
    assert partial is not None, "no blocks"
    return partial.sum(dim=0).cpu()


@register_operator(
    "linear",
    shared={"normalize": ParamDef(True, kind=bool, doc="divide by the sum of the weights")},
    per_source={"weight": ParamDef(1.0, doc="weight of each model")},
    blockwise=True,
    memory=MemoryCost(work_per_source=0, work=0),
)
def linear(inputs: TensorInputs, params: Params, out: torch.Tensor | None) -> torch.Tensor:
    """Linear / model soup: Σ wᵢθᵢ (÷ Σ wᵢ when normalize)."""
    weights = [float(w) for w in params.source_values("weight")]
    coefs = weights
    if params.shared["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise ConfigError(
                f"tensor {inputs.name}: linear weights {weights} sum to 0 with normalize: true; "
                "change the weights or set normalize: false"
            )
        coefs = [w / total for w in weights]
    result, dest = output_for(inputs.sources[0], out)
    weighted_sum([flat(s) for s in inputs.sources], coefs, dest)
    return finish(result, out)


def slerp_coefficients(t: float, gram: torch.Tensor) -> tuple[float, float]:
    """(a, b) with slerp(t, v0, v1) = a·v0 + b·v1 from the Gram matrix of (v0, v1) (mergekit's
    normalisation and lerp fallback)."""
    norm0, norm1 = math.sqrt(float(gram[0, 0])), math.sqrt(float(gram[1, 1]))
    norm0 = norm0 if norm0 > NORM_EPS else 1.0
    norm1 = norm1 if norm1 > NORM_EPS else 1.0
    dot = min(1.0, max(-1.0, float(gram[0, 1]) / (norm0 * norm1)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _slerp_prepare(inputs: TensorInputs, params: Params, stream: TensorStream) -> dict[str, object]:
    gram = gram_from_blocks(lockstep(stream.blocks(None), stream.blocks(0)), stream.numel, stream.device)
    return {"coefficients": slerp_coefficients(float(params.shared["t"]), gram)}


@register_operator(
    "slerp",
    shared={"t": ParamDef(None, required=True, doc="position from the base (0) to the other model (1)")},
    needs_base=True,
    min_sources=1,
    max_sources=1,
    blockwise=True,
    prepare=_slerp_prepare,
)
def slerp(inputs: TensorInputs, params: Params, out: torch.Tensor | None) -> torch.Tensor:
    """Spherical interpolation between the base (t = 0) and one other model (t = 1)."""
    if inputs.base is None or len(inputs.sources) != 1:
        raise ConfigError(f"tensor {inputs.name}: slerp needs a base model and exactly one other model")
    v0, v1 = flat(inputs.base), flat(inputs.sources[0])
    if inputs.stats is not None:
        a, b = inputs.stats["coefficients"]
    else:
        a, b = slerp_coefficients(float(params.shared["t"]), dot_products([v0, v1]))
    result, dest = output_for(inputs.base, out)
    weighted_sum([v0, v1], [a, b], dest)
    return finish(result, out)
