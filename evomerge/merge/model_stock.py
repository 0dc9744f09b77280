"""Model Stock (Jang et al.): move from the base towards the sources' average by their agreement.

Per tensor (or per row with ``filter_wise``, as mergekit offers): c = mean over pairs of
cos(τᵢ, τⱼ), t = N·c / (1 + (N−1)·c), θ = θ₀ + t·mean(τᵢ) = t·mean(θᵢ) + (1−t)·θ₀. mergekit's
conventions: cosines use norms clamped at 1e-6 and are clipped to [−1, 1]; at the singularity
|1 + (N−1)c| < 1e-6 the base is kept (t = 0). The default reproduces mergekit exactly, so its
configs mean the same here; ``clamp: true`` clips t to [0, 1], because anti-correlated task vectors
(c < 0) otherwise extrapolate away from the sources or, past the singularity, far beyond them.
The per-tensor form is blockwise (a streamed Gram matrix gives c); ``filter_wise`` merges whole
tensors.
"""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError
from evomerge.merge.chunking import finish, flat, output_for
from evomerge.merge.interpolation import dot_products, gram_from_blocks, weighted_sum
from evomerge.merge.registry import (
    ParamDef,
    Params,
    TensorInputs,
    TensorStream,
    lockstep,
    register_operator,
)

_NORM_FLOOR = 1e-6
_SINGULAR = 1e-6


def interpolation_factor(cos: torch.Tensor, n: int, clamp: bool) -> torch.Tensor:
    """t = N·c / (1 + (N−1)·c) (float64), 0 at the singularity, optionally clipped to [0, 1]."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return t.clamp(0.0, 1.0) if clamp else t


def mean_pairwise_cosine(rows: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i < j of the row-wise cosine of 2-D tensors (float64, one value per row)."""
    norms = [torch.linalg.vector_norm(r, dim=-1, dtype=torch.float64) for r in rows]
    cosines = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            dot = torch.linalg.vecdot(rows[i], rows[j]).to(torch.float64)
            cosines.append((dot / (norms[i] * norms[j]).clamp_min(_NORM_FLOOR)).clamp(-1.0, 1.0))
    return torch.stack(cosines).mean(dim=0)


def _global_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Whole-tensor mean pairwise cosine (float64) from the task vectors' Gram matrix."""
    norms = gram.diagonal().sqrt()
    k = gram.shape[0]
    cosines = [
        (gram[i, j] / (norms[i] * norms[j]).clamp_min(_NORM_FLOOR)).clamp(-1.0, 1.0)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    return torch.stack(cosines).mean().reshape(1)


def _prepare(inputs: TensorInputs, params: Params, stream: TensorStream) -> dict[str, object]:
    k = len(inputs.source_names)
    gram = gram_from_blocks(lockstep(*(stream.task_vector_blocks(i) for i in range(k))), stream.numel, stream.device)
    return {"t": float(interpolation_factor(_global_cosine(gram), k, bool(params.shared["clamp"])))}


@register_operator(
    "model_stock",
    shared={
        "filter_wise": ParamDef(False, kind=bool, doc="one factor per row (last dimension) instead of per tensor"),
        "clamp": ParamDef(False, kind=bool, doc="clip the interpolation factor to [0, 1]"),
    },
    needs_base=True,
    min_sources=2,
    blockwise=lambda params: not params.shared["filter_wise"],  # rows may straddle blocks
    prepare=_prepare,
)
def model_stock(inputs: TensorInputs, params: Params, out: torch.Tensor | None) -> torch.Tensor:
    """Model Stock: θ₀ + t·mean(τᵢ) with t from the task vectors' mean pairwise cosine."""
    n = len(inputs.sources)
    if n < 2:
        raise ConfigError(f"tensor {inputs.name}: model_stock needs at least 2 models besides the base, got {n}")
    if inputs.base is None:
        raise ConfigError(f"tensor {inputs.name}: model_stock needs a base model")
    clamp = bool(params.shared["clamp"])
    result, dest = output_for(inputs.base, out)
    taus = [inputs.task_vector(i) for i in range(n)]
    if params.shared["filter_wise"] and inputs.base.dim() > 1:
        width = inputs.base.shape[-1]
        rows = [t.reshape(-1, width) for t in taus]
        t = interpolation_factor(mean_pairwise_cosine(rows), n, clamp).to(torch.float32).unsqueeze(-1)
        grid = dest.view(-1, width)
        torch.add(rows[0], rows[1], out=grid)
        for r in rows[2:]:
            grid.add_(r)
        grid.mul_(t / n).add_(flat(inputs.base).view(-1, width))
        return finish(result, out)
    flat_taus = [flat(x) for x in taus]
    if inputs.stats is not None:
        t = inputs.stats["t"]
    else:
        t = float(interpolation_factor(_global_cosine(dot_products(flat_taus)), n, clamp))
    weighted_sum([flat(inputs.base), *flat_taus], [1.0] + [t / n] * n, dest)
    return finish(result, out)
