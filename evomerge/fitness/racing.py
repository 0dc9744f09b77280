"""Racing: stop scoring a candidate as soon as it cannot beat the incumbent (or reach the front).

A candidate's examples are scored in chunks, in one fixed seeded order (the same for every
candidate, so any prefix is a simple random sample of the evaluation set). After each chunk, each
task's full-set score is bounded from the examples scored so far, and the optimistic end of those
bounds is compared with the ``Bar``: the incumbent's objective (one objective) or the current
front (several). A candidate whose optimistic vector falls short of the incumbent, or is dominated
by a front member, stops; its result is the *estimate* (the mean of the examples it was scored on)
together with how many examples that took (``Estimate``). This is F-Race's idea (Birattari et al.,
GECCO 2002) with an explicit finite-population bound in place of its rank test, because the
evaluation set is finite and fixed.

The bound (``score_bounds``) is Wilson's score interval (with continuity correction) for a mean of
[0, 1] scores, with the sample size inflated by the finite-population correction of sampling
without replacement:
``Var(mean of n of N) = σ²/n · (N - n)/(N - 1)``, so ``m = n (N - 1)/(N - n)``, and ``m → ∞`` (the
bound closes on the exact score) when every example is scored. Wilson's interval stays honest at
0 or 1 correct (a normal interval would collapse to a point), the continuity correction near them; for scores in [0, 1] that are not
0/1, σ² ≤ μ(1 - μ), so it is conservative. Several tasks are bounded jointly by Bonferroni: each at
``1 - (1 - confidence)/k``. The weighted aggregate's bound is the weighted sum of its tasks' bounds.

Example::

    >>> bar = Bar(("fitness",), ((0.5,),))
    >>> low, high = score_bounds([1.0] * 5 + [0.0] * 20, total=100, z=z_value(0.95, 1))
    >>> round(high, 3), bar.out_of_reach([high])
    (0.352, True)
    >>> low, high = score_bounds([1.0] * 10 + [0.0] * 15, total=100, z=z_value(0.95, 1))
    >>> bar.out_of_reach([high])
    False
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A result from a raced evaluation that stopped early: ``examples`` of ``total`` were scored."""

    examples: int
    total: int

    @property
    def saved(self) -> int:
        return self.total - self.examples


@dataclass(frozen=True)
class Bar:
    """What a candidate must still be able to reach, in the maximize convention.

    ``front`` holds one vector per point (over ``objectives``): with one objective, the incumbent's
    value; with several, the non-dominated complete results.
    """

    objectives: tuple[str, ...]
    front: tuple[tuple[float, ...], ...]

    def out_of_reach(self, optimistic: Sequence[float]) -> bool:
        """Whether even ``optimistic`` (the candidate's upper bounds) cannot beat the incumbent or
        reach the front: strictly below it (one objective), or dominated by a front point."""
        best = np.asarray(optimistic, dtype=float)
        for point in self.front:
            target = np.asarray(point, dtype=float)
            if len(self.objectives) == 1 and best[0] < target[0]:
                return True
            if len(self.objectives) > 1 and bool(np.all(target >= best)) and bool(np.any(target > best)):
                return True
        return False


class Incumbents:
    """The non-dominated complete results so far (the incumbent, with one objective), kept
    incrementally by the driver, and the ``Bar`` they set for the next candidate."""

    def __init__(self, objectives: Sequence[str]) -> None:
        self.objectives = tuple(objectives)
        self._front: list[tuple[float, ...]] = []

    def add(self, values: Sequence[float]) -> None:
        """A complete, successful result (maximize convention)."""
        point = tuple(float(v) for v in values)
        if any(_dominates(p, point) or p == point for p in self._front):
            return
        self._front = [p for p in self._front if not _dominates(point, p)] + [point]

    def bar(self) -> Bar | None:
        """None until a first complete result exists (the first candidates are scored in full)."""
        return Bar(self.objectives, tuple(self._front)) if self._front else None


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def race_order(n_examples: int, seed: int | None) -> list[int]:
    """The fixed order examples are scored in: a permutation seeded by ``seed`` (0 when null)."""
    order = list(range(n_examples))
    random.Random(f"racing:{seed or 0}").shuffle(order)
    return order


def z_value(confidence: float, tests: int) -> float:
    """The one-sided normal quantile for ``tests`` bounds holding jointly at ``confidence`` (Bonferroni)."""
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / max(1, tests))


def score_bounds(
    scores: Sequence[float], total: int, z: float, weights: Sequence[float] | None = None
) -> tuple[float, float]:
    """Bounds on the (weighted) mean of all ``total`` examples' scores from the ``scores`` seen.

    ``weights`` (one per score seen, each example's share of the full-set mean; uniform ``1/total``
    by default) allow a group whose tasks are averaged without regard to their size. Scores are
    assumed in [0, 1]; a score outside widens the range to include it.
    """
    values = np.asarray(scores, dtype=float)
    lo, hi = min(0.0, float(values.min(initial=0.0))), max(1.0, float(values.max(initial=1.0)))
    if values.size == 0:
        return lo, hi
    share = np.full(values.size, 1.0 / total) if weights is None else np.asarray(weights, dtype=float)
    seen = float(share.sum())
    if seen >= 1.0 - 1e-12:
        exact = float(np.dot(share, values))
        return exact, exact
    p = float(np.dot(share, (values - lo) / (hi - lo))) / seen
    n = seen**2 / float(np.dot(share, share))  # Kish's effective sample size (n when uniform)
    population = n / seen
    m = n * (population - 1.0) / (population - n) if population - 1.0 > 0 else n
    low, high = _wilson(p, m, z)
    return lo + (hi - lo) * low, lo + (hi - lo) * high


def _wilson(p: float, m: float, z: float) -> tuple[float, float]:
    """Wilson's score interval with continuity correction for a proportion ``p`` from an
    (effective) sample of ``m`` (Newcombe 1998, method 4): without the correction the interval
    misses more often than it claims when ``m p`` or ``m (1 - p)`` is small."""
    z2 = z * z
    denominator = 2.0 * (m + z2)
    low = 0.0
    if p > 0.0:
        root = z2 - 2.0 - 1.0 / m + 4.0 * p * (m * (1.0 - p) + 1.0)
        low = (2.0 * m * p + z2 - 1.0 - z * math.sqrt(max(root, 0.0))) / denominator
    high = 1.0
    if p < 1.0:
        root = z2 + 2.0 - 1.0 / m + 4.0 * p * (m * (1.0 - p) - 1.0)
        high = (2.0 * m * p + z2 + 1.0 + z * math.sqrt(max(root, 0.0))) / denominator
    return max(0.0, min(low, p)), min(1.0, max(high, p))
