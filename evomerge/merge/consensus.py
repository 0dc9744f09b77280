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

    Fused sign election for one cache-sized chunk, with float operations only (on CPU several
    times faster than boolean masks). Each source gives its kept delta dᵢ as ``values·mask`` (mask
    optional, see ``Sparsifier``), a coefficient cᵢ (weight × rescale, nonzero) and its weight wᵢ.
    With T = Σ cᵢdᵢ, e = copysign(1, T) the elected sign and sᵢ = sign(cᵢdᵢ), a delta agrees iff
    sᵢ = e, i.e. [agreeᵢ] = (sᵢ² + e·sᵢ)/2. Hence

        Σ agreeing cᵢdᵢ = (T + e·A)/2         with A = Σ |cᵢdᵢ| = Σ cᵢdᵢ·sᵢ
        Σ agreeing wᵢ   = (Σ wᵢsᵢ² + e·Σ wᵢsᵢ)/2

    — the explicit sums up to rounding in the last bit. T = −0.0 only arises when every delta is
    zero, where either sign gives the same result.
    """
    total = scratch.get("consensus.total", out)
    spread = scratch.get("consensus.spread", out)
    sign = scratch.get("consensus.sign", out)
    zeros = scratch.filled(0.0, out)

    def accumulate(into: torch.Tensor, first: bool, a: torch.Tensor, b: torch.Tensor | None, c: float) -> None:
        # into (+)= c·a·b in one operation
        start = zeros if first else into
        if b is None:
            torch.add(start, a, alpha=c, out=into)
        else:
            torch.addcmul(start, a, b, value=c, out=into)

    if normalize:
        nonzero = scratch.get("consensus.nonzero", out)
        signed = scratch.get("consensus.signed", out)
    for k, (v, m, c, w) in enumerate(zip(values, masks, coefs, weights)):
        first = k == 0
        accumulate(total, first, v, m, c)
        if not normalize:
            accumulate(spread, first, torch.abs(v, out=sign), m, abs(c))
            continue
        torch.sign(v, out=sign)
        if m is not None:
            sign.mul_(m)
        accumulate(spread, first, v, sign, abs(c))
        accumulate(nonzero, first, sign, sign, w)
        accumulate(signed, first, sign, None, w if c > 0 else -w)
    if not normalize:
        agreeing = torch.copysign(spread, total, out=spread).add_(total)  # T + e·A: twice the agreeing sum
        return torch.add(base, agreeing, alpha=factor / 2, out=out)
    elected = torch.copysign(scratch.filled(1.0, out), total, out=sign)
    agreeing = torch.addcmul(total, elected, spread, out=spread)  # twice the agreeing sum
    divisor = torch.addcmul(nonzero, elected, signed, out=nonzero)  # twice the agreeing weights
    if all(w >= _TINY for w in weights):
        # Σ agreeing weights is 0 only where nothing agrees and the sum is 0 anyway.
        divisor.clamp_min_(_TINY)
    else:
        # a zero divisor becomes 2 (i.e. Σ agreeing weights 0 → 1, mergekit's rule)
        divisor.add_(torch.abs(divisor, out=total).sign_().sub_(1.0).mul_(-2.0))
    return torch.addcdiv(base, agreeing, divisor, value=factor, out=out)
