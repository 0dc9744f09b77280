"""Summing kept task-vector entries, with or without TIES sign consensus, in one fixed arithmetic.

mergekit's convention: the election runs on the *weighted* (sparsified) deltas, the elected sign is
the sign of their sum with 0 counting as +, and a delta agrees when its own sign equals the elected
one (so a zero delta never agrees and never counts in a normalising divisor).

``combine`` is written with elementwise operations that each round once (no ``addcmul``/``alpha``,
whose fused multiply-add depends on how the kernel was compiled), and every product by a 0/1 mask
is exact. So its result is the same bit for bit whether it runs eagerly chunk by chunk, on a
gathered subset, or compiled into one fused kernel (``fused``), on CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def elect_sign(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """+1 where Σ deltas ≥ 0, else −1 (float32, the deltas' shape)."""
    total = torch.stack(list(weighted_deltas)).sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(torch.float32)


def agreement(weighted_delta: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """True where ``weighted_delta`` is nonzero and has the elected ``sign``."""
    return weighted_delta * sign > 0


def combine(
    base: torch.Tensor,
    values: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    scalars: torch.Tensor,
    consensus: bool,
    normalize: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ₀ plus the kept deltas dᵢ = (valuesᵢ·cᵢ)·maskᵢ, summed plainly or by sign consensus.

    ``scalars`` is float32: ``[c₀ … cₖ₋₁, w₀ … wₖ₋₁, factor]`` with cᵢ the coefficient of source i
    and wᵢ its weight in a normalising divisor; ``masks`` are 0/1 (None: keep all).

    - plain: ``((θ₀ + d₀) + d₁) + …`` (cᵢ already hold λ, rescales and any divisor);
    - consensus: with T = Σ dᵢ, A = Σ |dᵢ| and e = copysign(1, T), the agreeing sum is (T + e·A)/2
      — the explicit sum up to rounding in the last bit — and θ₀ + factor·that, divided by the
      agreeing weights Σ wᵢ[sign dᵢ = e] (0 → 1, mergekit's rule) with ``normalize``.
    """
    k = len(values)
    kept = []
    for i, (v, m) in enumerate(zip(values, masks)):
        d = v * scalars[i]
        kept.append(d if m is None else d * m)
    if not consensus:
        total = base
        for d in kept[:-1]:
            total = total + d
        return torch.add(total, kept[-1], out=out) if out is not None else total + kept[-1]
    total, spread = kept[0], kept[0].abs()
    for d in kept[1:]:
        total = total + d
        spread = spread + d.abs()
    agreeing = torch.copysign(spread, total) + total  # twice the agreeing sum
    factor = scalars[2 * k]
    if not normalize:
        delta = agreeing * (factor * 0.5)
    else:
        positive = negative = None
        for i, d in enumerate(kept):
            w = scalars[k + i]
            p, n = (d > 0).to(torch.float32) * w, (d < 0).to(torch.float32) * w
            positive = p if positive is None else positive + p
            negative = n if negative is None else negative + n
        # T < 0 rather than signbit(T): T = −0 only when every dᵢ is ±0, where both sums are 0
        divisor = torch.where(total < 0, negative, positive)
        divisor = torch.where(divisor == 0, 1.0, divisor)
        delta = ((agreeing * 0.5) / divisor) * factor
    return torch.add(base, delta, out=out) if out is not None else base + delta
