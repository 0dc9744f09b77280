"""TIES sign consensus: elect a sign per entry and keep only the deltas that agree with it.

mergekit's convention: the election runs on the *weighted* (sparsified) deltas, the elected sign is
the sign of their sum with 0 counting as +, and a delta agrees when its own sign equals the elected
one (so a zero delta never agrees and never counts in a normalising divisor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.chunking import Scratch

_TINY = torch.finfo(torch.float32).tiny


def elect_sign(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """+1 where Σ deltas ≥ 0, else −1 (float32, the deltas' shape)."""
    total = torch.stack(list(weighted_deltas)).sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(torch.float32)


def agreement(weighted_delta: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """True where ``weighted_delta`` is nonzero and has the elected ``sign``."""
    return weighted_delta * sign > 0


def consensus_merge(
    values: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    coefs: Sequence[float],
    weights: Sequence[float],
    normalize: bool,
    base: torch.Tensor,
    factor: float,
    out: torch.Tensor,
    scratch: Scratch,
) -> torch.Tensor:
    """``out`` = base + factor · (Σ agreeing cᵢdᵢ, ÷ Σ agreeing wᵢ with ``normalize``, 0 → 1).

    Fused sign election for one cache-sized chunk. Each source gives its kept delta as
    ``values·mask`` (mask optional, see ``Sparsifier``), a coefficient cᵢ (weight × rescale,
    nonzero) and its weight wᵢ. With T = Σ cᵢdᵢ and e = ±1 the elected sign (copysign(1, T);
    T = −0.0 only arises when every delta is zero, where either sign gives the same result), cᵢdᵢ
    agrees iff cᵢdᵢe > 0. Since relu(x) = (|x| + x)/2, the agreeing sum is (T + e·Σ|cᵢdᵢ|)/2 —
    the explicit sum up to rounding of the last bit. Normalising also needs which deltas agree:
    e·Σ cᵢ·maskᵢ·pos(valuesᵢ·e) with pos = max(·, 0) for cᵢ > 0 and min(·, 0) for cᵢ < 0, and
    sign(pos(·)) ∈ {0, sign cᵢ} gives the agreeing weights. Only float operations on scratch
    buffers: on CPU several times faster than boolean masks.
    """
    total = scratch.get("consensus.total", out)
    acc = scratch.get("consensus.sum", out)
    part = scratch.get("consensus.part", out)
    zeros = scratch.filled(0.0, out)

    def accumulate(into: torch.Tensor, first: bool, v: torch.Tensor, m: torch.Tensor | None, c: float) -> None:
        # into (+)= c·v·m in one operation
        start = zeros if first else into
        if m is None:
            torch.add(start, v, alpha=c, out=into)
        else:
            torch.addcmul(start, v, m, value=c, out=into)

    for k, (v, m, c) in enumerate(zip(values, masks, coefs)):
        accumulate(total, k == 0, v, m, c)
    if not normalize:
        for k, (v, m, c) in enumerate(zip(values, masks, coefs)):
            accumulate(acc, k == 0, torch.abs(v, out=part), m, abs(c))
        torch.copysign(acc, total, out=acc)
        return torch.add(base, total.add_(acc), alpha=factor / 2, out=out)
    sign = torch.copysign(scratch.filled(1.0, out), total, out=scratch.get("consensus.sign", out))
    divisor = scratch.get("consensus.divisor", out)
    for k, (v, m, c, w) in enumerate(zip(values, masks, coefs, weights)):
        torch.mul(v, sign, out=part)
        if c > 0:
            part.clamp_min_(0.0)
        else:
            part.clamp_max_(0.0)
        accumulate(acc, k == 0, part, m, c)
        accumulate(divisor, k == 0, part.sign_(), m, abs(w))
    acc.mul_(sign)
    if all(w >= _TINY for w in weights):
        # Σ agreeing weights is 0 only where nothing agrees and the sum is 0 anyway.
        divisor.clamp_min_(_TINY)
    else:
        torch.abs(divisor, out=part).sign_().neg_().add_(1.0)
        divisor.add_(part)
    return torch.addcdiv(base, acc, divisor, value=factor, out=out)
