"""Sparsification of task vectors: magnitude (TIES trim), Bernoulli (DARE), breadcrumbs, DELLA.

Every method is a *streamed* ``Sparsifier``: built once per tensor (thresholds, random keys), then
fed consecutive chunks, so the task-vector pipeline fuses trimming with election and summation
chunk by chunk. The module-level functions (``magnitude``, ``bernoulli``, …) are the same math on a
whole tensor.

Conventions (mergekit's where it has one; deliberate departures noted):

- Magnitude and breadcrumbs keep a window of *ranks* of |x|. Ranks follow the stable ascending
  order (equal magnitudes rank by flat index), so the kept set has exactly the requested size even
  when magnitudes tie — common for deltas of bf16 checkpoints — and is deterministic.
- ``magnitude`` keeps ``max(1, int(density·N))`` entries for density in (0, 1), like mergekit;
  density 0 keeps nothing, density 1 everything.
- ``breadcrumbs`` keeps ranks ``[n_bot, n_bot + int(density·N))`` with
  ``n_bot = max(0, N − int(density·N) − int(gamma·N))``: the largest ``gamma·N`` entries go first,
  then the smallest; when both do not fit, the outlier cut shrinks. A tiny tensor with
  ``gamma·N < 1`` loses no outliers (older mergekit zeroed such tensors).
- ``bernoulli`` (DARE) keeps each entry with probability ``density`` and, with ``rescale``, divides
  kept entries by exactly ``density`` (mergekit ≥ 0.1 matches L1 norms instead; the exact factor is
  the paper's unbiased one).
- ``della`` keeps the entry of ascending magnitude rank r with probability
  ``density − ε + 2ε·r/(N−1)`` (ε is a half-width as in mergekit, but ranks span the whole tensor,
  not rows) and, with ``rescale``, divides each kept entry by its own keep probability.
- With ``rescale``, magnitude and breadcrumbs scale the kept entries so their L1 norm matches the
  whole tensor's (mergekit's ``rescale``), unless either norm is below 1e-7.

Randomness: one ``torch.rand`` float32 uniform u per entry, in flat order, from the given generator
(u lies on the 2⁻²⁴ grid); an entry is kept iff u < p. Keys are stored as −⌊u·2²⁴⌋ so that
``key > −⌈p·2²⁴⌉`` is the exact test, written as a float 0/1 mask by one comparison with a float
``out`` (on CPU several times faster than producing a bool tensor, and one pass instead of the
two of an add and a clamp). The keys of a tensor are drawn whole before merging
and can be cached across candidates with the same seed. The magnitude window is a float mask too.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from evomerge.errors import ConfigError
from evomerge.merge.chunking import Scratch, chunk_size, flat, for_chunks, spans, split

_L1_EPS = 1e-7
_GRID = 2.0**24


def keep_count(n: int, density: float) -> int:
    """How many of ``n`` entries magnitude trimming keeps at ``density`` (mergekit's rule)."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def magnitude_ranks(n: int, density: float) -> tuple[int, int]:
    """The rank window [lo, hi) that magnitude trimming keeps: the ``keep_count`` largest."""
    return n - keep_count(n, density), n


def breadcrumbs_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """The rank window [lo, hi) that breadcrumbs keeps (see the module docstring)."""
    if density >= 1:
        return 0, n
    target = int(density * n) if density > 0 else 0
    n_bot = max(0, n - target - int(gamma * n))
    return n_bot, n_bot + target


@dataclass(frozen=True)
class RankWindow:
    """Keep the entries whose rank in the stable ascending order of |x| lies in [lo, hi).

    That is: every entry with ``low_value <= |x| <= high_value`` (the magnitudes at ranks lo and
    hi−1) except ``drop``, the sorted flat indices of the entries equal to a boundary value whose
    rank falls outside the window (only nonzero ones: a zero contributes nothing either way).
    """

    n: int
    lo: int
    hi: int
    low_value: float = 0.0
    high_value: float = 0.0
    drop: torch.Tensor | None = None

    @property
    def keeps_all(self) -> bool:
        return self.lo <= 0 and self.hi >= self.n

    @property
    def keeps_none(self) -> bool:
        return self.hi <= self.lo


def _trivial(n: int, lo: int, hi: int) -> bool:
    return hi <= lo or (lo <= 0 and hi >= n)


def _join(parts: list[torch.Tensor]) -> torch.Tensor | None:
    parts = [p.to(torch.int64) for p in parts if p.numel()]
    if not parts:
        return None
    return torch.sort(torch.cat(parts)).values if len(parts) > 1 else parts[0]


def window_from_sorted(sorted_abs: torch.Tensor, order: torch.Tensor, lo: int, hi: int) -> RankWindow:
    """The window from |x| sorted ascending and the stable sort's ``order``: O(log N + dropped)."""
    n = sorted_abs.numel()
    if _trivial(n, lo, hi):
        return RankWindow(n, lo, hi)
    low = float(sorted_abs[lo])
    high = float(sorted_abs[hi - 1])
    parts = []
    if low != 0:
        start = int(torch.searchsorted(sorted_abs, sorted_abs[lo : lo + 1], right=False))
        parts.append(order[start:lo])
    if high != 0:
        end = int(torch.searchsorted(sorted_abs, sorted_abs[hi - 1 : hi], right=True))
        parts.append(order[hi:end])
    return RankWindow(n, lo, hi, low, high, _join(parts))


def window_from_values(mag: torch.Tensor, lo: int, hi: int) -> RankWindow:
    """The same window from unsorted 1-D magnitudes: selections and counts, O(N)."""
    n = mag.numel()
    if _trivial(n, lo, hi):
        return RankWindow(n, lo, hi)
    low = float(mag.kthvalue(lo + 1).values)
    high = float(mag.kthvalue(hi).values)
    parts = []
    if low != 0:
        below = int((mag < low).sum())
        parts.append(torch.nonzero(mag == low).squeeze(1)[: lo - below])
    if high != 0:
        below = int((mag < high).sum())
        parts.append(torch.nonzero(mag == high).squeeze(1)[hi - below :])
    return RankWindow(n, lo, hi, low, high, _join(parts))


BlockPass = Callable[[], Iterator[tuple[int, torch.Tensor]]]
_HIGH_BINS = 1 << 15  # |x| is non-negative: its float32 bit pattern is below 2³¹, and ordered like |x|
_LOW_BINS = 1 << 16


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    return torch.abs(x).view(torch.int32)


def _bin_of_rank(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the entry of ascending ``rank``, entries in the bins before it)."""
    cumulative = counts.cumsum(0)
    index = int(torch.searchsorted(cumulative, torch.tensor([rank], device=counts.device), right=True))
    return index, int(cumulative[index - 1]) if index else 0


def window_from_blocks(blocks: BlockPass, n: int, lo: int, hi: int) -> RankWindow:
    """The window of ``window_from_values`` from three streamed passes over blocks of x (not |x|).

    An exact radix selection on the bit patterns of |x|: a histogram of their high 16 bits finds the
    bin of ranks lo and hi−1, a histogram of the low 16 bits inside those bins the values; a last
    pass collects the dropped boundary ties in flat order. Only one block is in memory at a time.
    """
    if _trivial(n, lo, hi):
        return RankWindow(n, lo, hi)
    high_counts: torch.Tensor | None = None
    for _, x in blocks():
        counts = torch.bincount(_magnitude_bits(x) >> 16, minlength=_HIGH_BINS)
        high_counts = counts if high_counts is None else high_counts.add_(counts)
    assert high_counts is not None
    targets = {rank: _bin_of_rank(high_counts, rank) for rank in (lo, hi - 1)}
    low_counts = {high: torch.zeros(_LOW_BINS, dtype=torch.int64, device=high_counts.device) for high, _ in targets.values()}
    for _, x in blocks():
        bits = _magnitude_bits(x)
        high_bits = bits >> 16
        for high, counts in low_counts.items():
            counts.add_(torch.bincount(bits[high_bits == high] & 0xFFFF, minlength=_LOW_BINS))
    values: dict[int, tuple[int, int]] = {}
    for rank, (high, before) in targets.items():
        low, within = _bin_of_rank(low_counts[high], rank - before)
        values[rank] = ((high << 16) | low, before + within)
    (low_bits, below_low), (high_bits_value, below_high) = values[lo], values[hi - 1]
    low_value, high_value = _bits_to_float(low_bits), _bits_to_float(high_bits_value)
    # drop: the first lo − below_low entries equal to the low value, and every entry equal to the
    # high value after the first hi − below_high (zeros contribute nothing either way)
    low_left = lo - below_low if low_value != 0 else 0
    high_skip = hi - below_high
    parts: list[torch.Tensor] = []
    for offset, x in blocks():
        if low_left <= 0 and high_value == 0:
            break
        bits = _magnitude_bits(x)
        if low_left > 0:
            found = torch.nonzero(bits == low_bits).squeeze(1)[:low_left]
            low_left -= found.numel()
            parts.append(found + offset)
        if high_value != 0:
            found = torch.nonzero(bits == high_bits_value).squeeze(1)
            skipped = min(high_skip, found.numel())
            high_skip -= skipped
            parts.append(found[skipped:] + offset)
    return RankWindow(n, lo, hi, low_value, high_value, _join(parts))


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def sort_magnitudes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|x| ascending, int32 stable order): the order statistics a search caches per task vector.

    Sorts the bit patterns of |x| as int32 — ordered exactly like the floats, NaN last, and ~4×
    faster to sort on CPU (radix sort).
    """
    values, order = torch.sort(_magnitude_bits(x), stable=True)
    return values.view(torch.float32), order.to(torch.int32)


@dataclass(frozen=True)
class MaskRule:
    """A sparsifier's mask as a fused kernel recomputes it entry by entry.

    ``bernoulli``: keys > low. ``window``: low < |x| <= high, except ``drop`` (sorted flat indices
    of the whole tensor) — exceptions a kernel leaves to a second, gathered pass.
    """

    kind: str
    low: float
    high: float = math.inf
    keys: torch.Tensor | None = None
    drop: torch.Tensor | None = None


KEEP_EVERYTHING = MaskRule("window", -1.0)


def rule_mask(rule_kind: str, x: torch.Tensor, keys: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The 0/1 float mask of a ``MaskRule`` from its bounds (shared by fused kernels and their fix-ups)."""
    if rule_kind == "bernoulli":
        return (keys > low).to(torch.float32)
    magnitude = x.abs()
    return (magnitude > low).to(torch.float32) * (magnitude <= high).to(torch.float32)


class Sparsifier(ABC):
    """Sparsifies one flat tensor chunk by chunk (in any chunk order).

    ``apply`` returns ``(values, mask)``: the kept entries are ``values·mask`` with a 0/1 float
    ``mask`` (None: keep all), left as a pair so ``consensus.combine`` multiplies them exactly.
    Both are the chunk itself or buffers of the caller's ``Scratch``, valid until the next call
    with it. ``scale`` is a scalar rescale that callers fold into their coefficient. ``rule`` says
    how a fused kernel computes the same mask (None: it cannot).
    """

    scale: float = 1.0

    @abstractmethod
    def apply(
        self, index: int, start: int, x: torch.Tensor, scratch: Scratch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, mask) of ``x``, chunk ``index`` of the flat tensor, starting at entry ``start``."""

    def rule(self) -> MaskRule | None:
        return None

    def kept(self, index: int, start: int, x: torch.Tensor, scratch: Scratch) -> torch.Tensor:
        """The kept entries of the chunk as one tensor (before ``scale``)."""
        values, mask = self.apply(index, start, x, scratch)
        return values if mask is None else torch.mul(values, mask)


class KeepAll(Sparsifier):
    """Density 1: the identity."""

    def apply(
        self, index: int, start: int, x: torch.Tensor, scratch: Scratch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x, None

    def rule(self) -> MaskRule:
        return KEEP_EVERYTHING


class KeepWindow(Sparsifier):
    """Keep a ``RankWindow`` of magnitudes (magnitude trimming, breadcrumbs): low < |x| <= high."""

    def __init__(self, window: RankWindow, scale: float = 1.0):
        self.window = window
        self.scale = scale
        if window.keeps_none:
            self._low, self._high = math.inf, math.inf
        else:
            # just below low_value, so that |x| > low keeps |x| >= low_value
            self._low = (
                float(torch.nextafter(torch.tensor(window.low_value), torch.tensor(0.0)))
                if window.lo > 0 and window.low_value > 0
                else -1.0
            )
            self._high = window.high_value if window.hi < window.n else math.inf
        self._drop = window.drop.tolist() if window.drop is not None else []

    def rule(self) -> MaskRule:
        if self.window.keeps_all:
            return KEEP_EVERYTHING
        return MaskRule("window", self._low, self._high, drop=self.window.drop)

    def apply(
        self, index: int, start: int, x: torch.Tensor, scratch: Scratch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.window.keeps_all:
            return x, None
        mask = scratch.get((id(self), 0), x)
        magnitude = torch.abs(x, out=scratch.get((id(self), 1), x))
        torch.gt(magnitude, self._low, out=mask)
        if self._high < math.inf:
            mask.mul_(torch.le(magnitude, self._high, out=magnitude))
        first = bisect.bisect_left(self._drop, start)
        last = bisect.bisect_left(self._drop, start + x.numel())
        if last > first:
            mask.index_fill_(0, self.window.drop[first:last] - start, 0.0)
        return x, mask


def random_keys(generator: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    """Random keys −⌊u·2²⁴⌋ (u = ``torch.rand`` from ``generator``) for ``n`` entries, as float32.

    Drawn chunk by chunk in order, so the stream is the same whether or not it is cached.
    """
    keys = torch.empty(n, dtype=torch.float32, device=device)
    for start, stop in spans(n, device):
        torch.rand(stop - start, generator=generator, device=device, out=keys[start:stop])
    return keys.mul_(_GRID).floor_().neg_()


def key_threshold(p: float) -> float:
    """−⌈p·2²⁴⌉: a key beats it exactly when its uniform u < p."""
    return -float(math.ceil(p * _GRID))


def keep_mask(keys: torch.Tensor, p: float | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Exact 0/1 float mask of u < p from keys −⌊u·2²⁴⌋ (``p`` a scalar or per-entry float32)."""
    if isinstance(p, torch.Tensor):
        threshold = torch.mul(p, -_GRID, out=out).floor_()  # −⌈p·2²⁴⌉
        return torch.gt(keys, threshold, out=out)
    return torch.gt(keys, key_threshold(p), out=out)


class KeepBernoulli(Sparsifier):
    """DARE: keep each entry with probability ``density``; ``scale`` = 1/density when rescaling."""

    def __init__(self, keys: torch.Tensor, density: float, rescale: bool):
        self.all_keys = keys
        self.keys = split(keys)
        self.density = density
        self.scale = 1.0 / density if rescale and density > 0 else 1.0

    def rule(self) -> MaskRule:
        return MaskRule("bernoulli", key_threshold(self.density), keys=self.all_keys)

    def apply(
        self, index: int, start: int, x: torch.Tensor, scratch: Scratch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x, keep_mask(self.keys[index], self.density, scratch.get((id(self), 0), x))


def della_ranks(mag: torch.Tensor) -> torch.Tensor:
    """Each entry's rank (int32) in the stable ascending order of the 1-D magnitudes ``mag``."""
    order = torch.argsort(mag.view(torch.int32), stable=True)  # non-negative floats sort like their bits
    ranks = torch.empty(mag.numel(), dtype=torch.int32, device=mag.device)
    ranks[order] = torch.arange(mag.numel(), dtype=torch.int32, device=mag.device)
    return ranks


def check_della(density: float, epsilon: float, where: str) -> None:
    """Keep probabilities density ± epsilon must lie in (0, 1]; else a one-line ``ConfigError``."""
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon <= 1):
        raise ConfigError(
            f"{where}: epsilon {epsilon} with density {density} gives keep probabilities outside (0, 1]; "
            f"expected epsilon < density and density + epsilon <= 1"
        )


class KeepDella(Sparsifier):
    """DELLA MagPrune: rank-dependent keep probability, per-entry rescale by 1/probability."""

    def __init__(self, keys: torch.Tensor, density: float, epsilon: float, ranks: torch.Tensor, rescale: bool):
        self.keys = split(keys)
        self.ranks = split(ranks)
        n = ranks.numel()
        self.low = density - epsilon if n > 1 else density
        self.step = 2 * epsilon / (n - 1) if n > 1 else 0.0
        self.rescale = rescale

    def apply(
        self, index: int, start: int, x: torch.Tensor, scratch: Scratch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.ranks[index].to(torch.float64).mul_(self.step).add_(self.low).to(torch.float32)
        mask = keep_mask(self.keys[index], p, scratch.get((id(self), 0), x))
        return (torch.div(x, p, out=scratch.get((id(self), 1), x)) if self.rescale else x), mask


def l1_rescale(x: torch.Tensor, window: RankWindow) -> float:
    """mergekit's L1 rescale for a kept window of the flat tensor ``x``: ‖x‖₁ / ‖kept‖₁."""
    return l1_rescale_from_blocks(lambda: iter([(0, x)]), x.numel(), x.device, window)


def l1_rescale_from_blocks(blocks: BlockPass, n: int, device: torch.device, window: RankWindow) -> float:
    """``l1_rescale`` from one streamed pass over blocks of x (partial sums per global chunk)."""
    keep = KeepWindow(window)
    size = chunk_size(device)
    chunks = -(-n // size)
    before = torch.zeros(chunks, dtype=torch.float64, device=device)
    after = torch.zeros(chunks, dtype=torch.float64, device=device)
    for offset, x in blocks():
        first = offset // size

        def body(index: int, start: int, stop: int, scratch: Scratch) -> None:
            chunk = x[start:stop]
            before[first + index] = chunk.abs().sum(dtype=torch.float64)
            kept = keep.kept(first + index, offset + start, chunk, scratch)
            after[first + index] = kept.abs().sum(dtype=torch.float64)

        for_chunks(x.numel(), device, body)
    total_before, total_after = float(before.sum()), float(after.sum())
    if total_before < _L1_EPS or total_after < _L1_EPS:
        return 1.0
    return total_before / total_after


def _run(t: torch.Tensor, sparsifier: Sparsifier) -> torch.Tensor:
    x = flat(t)
    result = torch.empty_like(x)

    def body(index: int, start: int, stop: int, scratch: Scratch) -> None:
        torch.mul(sparsifier.kept(index, start, x[start:stop], scratch), sparsifier.scale, out=result[start:stop])

    for_chunks(x.numel(), x.device, body)
    return result.view(t.shape)


def _windowed(t: torch.Tensor, lo: int, hi: int, rescale: bool) -> torch.Tensor:
    x = flat(t)
    window = window_from_values(x.abs(), lo, hi)
    scale = l1_rescale(x, window) if rescale and not window.keeps_all else 1.0
    return _run(t, KeepWindow(window, scale))


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError(f"{name}: expected a value in [0, 1], got {value!r}")


def magnitude(t: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the ``keep_count(N, density)`` largest |t| (ties by flat index), zero the rest."""
    _check_fraction("density", density)
    return _windowed(t, *magnitude_ranks(t.numel(), density), rescale)


def breadcrumbs(t: torch.Tensor, density: float, gamma: float, *, rescale: bool = False) -> torch.Tensor:
    """Drop the ``gamma·N`` largest |t|, then the smallest, keeping ``int(density·N)`` entries."""
    _check_fraction("density", density)
    _check_fraction("gamma", gamma)
    return _windowed(t, *breadcrumbs_ranks(t.numel(), density, gamma), rescale)


def bernoulli(t: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (÷ density when ``rescale``)."""
    _check_fraction("density", density)
    if density >= 1:
        return flat(t).clone().view(t.shape)
    return _run(t, KeepBernoulli(random_keys(generator, t.numel(), t.device), density, rescale))


def della(
    t: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """DELLA MagPrune: larger |t| are kept more often; kept entries ÷ their keep probability."""
    _check_fraction("density", density)
    check_della(density, epsilon, "della")
    if density >= 1:
        return flat(t).clone().view(t.shape)
    if density <= 0:
        return torch.zeros(t.shape, dtype=torch.float32, device=t.device)
    ranks = della_ranks(flat(t).abs())
    return _run(t, KeepDella(random_keys(generator, t.numel(), t.device), density, epsilon, ranks, rescale))
