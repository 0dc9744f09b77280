"""Sign-consensus merges as one compiled CPU kernel per merge structure (torch.compile, Inductor).

Eager PyTorch makes one pass per operation: a DARE-TIES merge of three sources is ~20 passes per
cache-sized chunk (5.3× the memory-bandwidth ideal), TIES ~35 (11×). Compiled, masks, sums and the
election run in one loop that reads each input once (1.9× and 3×). Plain sums (task arithmetic,
DARE linear) are one multiply-add per source and stay eager.

The kernel computes masks from ``MaskRule``s and calls ``consensus.combine``, whose consensus
arithmetic rounds the same way in any form; Inductor compiles with ``-ffp-contract=off``, so the
fused result equals the eager result bit for bit. That is what lets a worker use it, an export fall back to eager, and both
still agree; tests check it. Entries a rule cannot express in-kernel (a magnitude window's tied
boundary entries, ``MaskRule.drop``) are recomputed on a gathered subset afterwards.

Used only inside ``repeated_merges()`` — the resident merger of a search worker, which merges the
same tensors thousands of times — on CPU, for tensors of at least ``MIN_NUMEL`` entries (1 MiB of
float32; test-sized models never pay for a compile). A one-off export stays eager: it is bound by
reading the files, and importing and compiling cost it 8 s and ~110 MB (TIES, 106 M); being
bit-identical, it still writes exactly the tensors the search scored.
``EVOMERGE_FUSED_KERNELS=off`` turns it off; a failed compile (no C++ compiler, say) logs one
warning and falls back to eager for the rest of the process.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from evomerge.merge.consensus import combine
from evomerge.merge.sparsify import KEEP_EVERYTHING, MaskRule, Sparsifier, rule_mask

MIN_NUMEL = 1 << 18
ENV = "EVOMERGE_FUSED_KERNELS"
_log = logging.getLogger(__name__)
_broken: list[str] = []
_repeated: ContextVar[bool] = ContextVar("evomerge_repeated_merges", default=False)


@contextmanager
def repeated_merges() -> Iterator[None]:
    """Mark the merges inside as repeated many times (a search worker's): worth compiled kernels."""
    token = _repeated.set(True)
    try:
        yield
    finally:
        _repeated.reset(token)


def switched_on() -> bool:
    """Whether ``EVOMERGE_FUSED_KERNELS`` allows fused kernels (anything but off, 0, false)."""
    return os.environ.get(ENV, "auto").lower() not in ("off", "0", "false")


def enabled(device: torch.device) -> bool:
    """Whether merges on ``device`` use fused kernels here (repeated, CPU, not off, compiling works)."""
    return _repeated.get() and device.type == "cpu" and switched_on() and not _broken


def _masks(
    kinds: Sequence[str], taus: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], bounds: torch.Tensor
) -> list[torch.Tensor]:
    return [rule_mask(kind, tau, key, bounds[i, 0], bounds[i, 1]) for i, (kind, tau, key) in enumerate(zip(kinds, taus, keys))]


@functools.cache
def _kernel(kinds: tuple[str, ...], normalize: bool) -> Callable[..., None]:
    """The compiled kernel for one structure: ``kernel(dest, base, *taus, *keys, scalars, bounds)``."""
    k = len(kinds)

    def kernel(dest: torch.Tensor, base: torch.Tensor, *rest: torch.Tensor) -> None:
        taus, keys, (scalars, bounds) = rest[:k], rest[k : 2 * k], rest[2 * k :]
        dest.copy_(combine(base, taus, _masks(kinds, taus, keys, bounds), scalars, True, normalize))

    # one code object per structure, so each keeps its own compiled-graph cache entry
    kernel.__code__ = kernel.__code__.replace(co_name=f"fused_{'_'.join(kinds)}_{int(normalize)}")
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def _uniform(rules: list[MaskRule], taus: Sequence[torch.Tensor]) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    """Kinds and keys per source; a keep-everything source takes its neighbours' kind (fewer kernels)."""
    bernoulli = any(rule.kind == "bernoulli" for rule in rules)
    kinds, keys = [], []
    for rule, tau in zip(rules, taus):
        if rule is KEEP_EVERYTHING and bernoulli:
            kinds.append("bernoulli")
            keys.append(tau)  # every finite τ beats −∞
        else:
            kinds.append(rule.kind)
            keys.append(rule.keys if rule.keys is not None else tau)
    return tuple(kinds), keys


def fused_merge(
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    sparsifiers: Sequence[Sparsifier],
    scalars: torch.Tensor,
    offset: int,
    consensus: bool,
    normalize: bool,
    dest: torch.Tensor,
) -> bool:
    """Merge flat ``taus`` (entries ``offset``… of their tensor) into ``dest`` if a fused kernel can.

    Returns False, having written nothing meaningful, when the eager path must do it.
    """
    n = base.numel()
    if not consensus or n < MIN_NUMEL or not enabled(base.device):
        return False
    rules = [s.rule() for s in sparsifiers]
    if any(rule is None for rule in rules):
        return False
    kinds, keys = _uniform(rules, taus)
    low = [-torch.inf if rule is KEEP_EVERYTHING and kind == "bernoulli" else rule.low for rule, kind in zip(rules, kinds)]
    bounds = torch.tensor([[lo, rule.high] for lo, rule in zip(low, rules)], dtype=torch.float32)
    try:
        _kernel(kinds, normalize)(dest, base, *taus, *keys, scalars, bounds)
    except Exception as error:  # noqa: BLE001 - any compile failure means: use eager
        _broken.append(f"{type(error).__name__}: {error}".splitlines()[0])
        _log.warning("fused merge kernels unavailable, merging eagerly (%s)", _broken[0])
        return False
    _recompute_dropped(base, taus, keys, kinds, rules, bounds, scalars, offset, normalize, dest)
    return True


def _recompute_dropped(
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    kinds: tuple[str, ...],
    rules: list[MaskRule],
    bounds: torch.Tensor,
    scalars: torch.Tensor,
    offset: int,
    normalize: bool,
    dest: torch.Tensor,
) -> None:
    """Redo the entries some window drops (tied boundary values) with exact masks, on a gathered subset."""
    n = base.numel()
    inside = []
    for rule in rules:
        drop = rule.drop
        if drop is not None:
            lo, hi = torch.searchsorted(drop, torch.tensor([offset, offset + n], dtype=drop.dtype)).tolist()
            inside.append(drop[lo:hi] - offset)
        else:
            inside.append(None)
    present = [d for d in inside if d is not None and d.numel()]
    if not present:
        return
    positions = torch.unique(torch.cat(present))
    sub_taus = [tau[positions] for tau in taus]
    masks = _masks(kinds, sub_taus, [key[positions] for key in keys], bounds)
    for mask, drop in zip(masks, inside):
        if drop is not None and drop.numel():
            mask[torch.searchsorted(positions, drop)] = 0.0
    dest[positions] = combine(base[positions], sub_taus, masks, scalars, True, normalize)
