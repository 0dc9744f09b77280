"""Summing kept task-vector entries, with or without TIES sign consensus, in one fixed arithmetic.

mergekit's convention: the election runs on the *weighted* (sparsified) deltas, the elected sign is
the sign of their sum with 0 counting as +, and a delta agrees when its own sign equals the elected
one (so a zero delta never agrees and never counts in a normalising divisor).

``combine``'s consensus path is written with operations that each round once, and every product
inside an ``addcmul``/``alpha`` (where a fused multiply-add may or may not be used, depending on how
the kernel was compiled) is exact, being by a 0/1 mask. So its result is the same bit for bit
whether it runs eagerly chunk by chunk, on a gathered subset, or compiled into one fused kernel
(``fused``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from evomerge.merge.chunking import Scratch


def _accumulate(
    acc: torch.Tensor | None,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    w: float | torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """acc + (x·mask)·w where that product is exact (a 0/1 ``mask``, or ``w`` only on a 0/1 ``x``).

    Then the fused multiply-add inside ``addcmul``/``alpha`` (buffered, eager) rounds exactly like
    the separate operations of the functional form (``out`` None: compiled kernels, subsets).
    """
    if out is None:
        term = x if mask is None else x * mask
        term = term if w is None else term * w
        return term if acc is None else acc + term
    value = 1.0 if w is None else float(w)
    if acc is None:
        product = torch.mul(x, mask if mask is not None else value, out=out)
        return product.mul_(value) if mask is not None and w is not None else product
    if mask is None:
        return torch.add(acc, x, alpha=value, out=out)
    return torch.addcmul(acc, x, mask, value=value, out=out)


def combine(
    base: torch.Tensor,
    values: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    scalars: torch.Tensor,
    consensus: bool,
    normalize: bool,
    out: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """θ₀ plus the kept deltas dᵢ = (valuesᵢ·cᵢ)·maskᵢ, summed plainly or by sign consensus.

    ``scalars`` is float32: ``[c₀ … cₖ₋₁, w₀ … wₖ₋₁, factor]`` with cᵢ the coefficient of source i
    and wᵢ its weight in a normalising divisor; ``masks`` are 0/1 (None: keep all).

    - plain: ``((θ₀ + d₀) + d₁) + …`` (cᵢ already hold λ, rescales and any divisor), each step one
      ``add``/``addcmul`` (eager only);
    - consensus: with T = Σ dᵢ, A = Σ |dᵢ| and e = copysign(1, T), the agreeing sum is (T + e·A)/2
      — the explicit sum up to rounding in the last bit — and θ₀ + factor·that, divided by the
      agreeing weights Σ wᵢ[sign dᵢ = e] (0 → 1, mergekit's rule) with ``normalize``.

    With ``scratch`` (eager, chunk by chunk) intermediates live in reused buffers; without it
    (inside a compiled kernel, or on a gathered subset) the same operations allocate.
    """
    k = len(values)
    s: Sequence[float] | torch.Tensor = scalars.tolist() if scratch is not None or not consensus else scalars

    def buf(key: str) -> torch.Tensor | None:
        return scratch.get(("combine", key), base) if scratch is not None else None

    if not consensus:
        # one multiply-add per source: never fused (eager is already within 2× of the bandwidth
        # ideal), so its rounding need not match a kernel's
        acc = base
        for i, (v, m) in enumerate(zip(values, masks)):
            o = out if i == k - 1 else buf("total")
            acc = torch.add(acc, v, alpha=s[i], out=o) if m is None else torch.addcmul(acc, v, m, value=s[i], out=o)
        return acc
    total: torch.Tensor | None = None
    spread: torch.Tensor | None = None
    positive: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    for i, (v, m) in enumerate(zip(values, masks)):
        d = torch.mul(v, s[i], out=buf("d"))
        total = _accumulate(total, d, m, None, buf("total"))
        spread = _accumulate(spread, torch.abs(d, out=buf("abs")), m, None, buf("spread"))
        if normalize:
            w = s[k + i]
            positive = _accumulate(positive, _flag(torch.gt, d, buf("flag")), m, w, buf("positive"))
            negative = _accumulate(negative, _flag(torch.lt, d, buf("flag")), m, w, buf("negative"))
    assert total is not None and spread is not None
    agreeing = torch.copysign(spread, total, out=buf("spread"))
    agreeing = torch.add(agreeing, total, out=buf("spread"))  # twice the agreeing sum
    factor = s[2 * k]
    if not normalize:
        delta = torch.mul(agreeing, factor * 0.5, out=buf("spread"))
    else:
        assert positive is not None and negative is not None
        # positive·(1 − f) + negative·f with f = [T < 0], then 0 → 1: a select as exact 0/1
        # products (torch.where is ~20× slower on CPU). T < 0 rather than signbit(T) (which
        # Inductor does not vectorise): T = −0 only when every dᵢ is ±0, where both sums are 0.
        elected_negative = _flag(torch.lt, total, buf("flag"))
        divisor = torch.mul(positive, torch.sub(1.0, elected_negative, out=buf("abs")), out=buf("positive"))
        divisor = _accumulate(divisor, negative, elected_negative, None, buf("positive"))
        divisor = torch.add(divisor, _flag(torch.eq, divisor, buf("flag")), out=buf("positive"))
        delta = torch.mul(agreeing, 0.5, out=buf("spread"))
        delta = torch.div(delta, divisor, out=buf("spread"))
        delta = torch.mul(delta, factor, out=buf("spread"))
    return torch.add(base, delta, out=out)


def _flag(compare: Callable[..., torch.Tensor], d: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """1.0 where ``compare(d, 0)`` else 0.0 (a float ``out`` is faster than a bool on CPU)."""
    return compare(d, 0, out=out) if out is not None else compare(d, 0).to(torch.float32)
