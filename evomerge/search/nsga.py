"""A vectorised NSGA-III on cheap functions of the unit box: the front of MAP's surrogates.

Deb & Jain, "An Evolutionary Many-Objective Optimization Algorithm Using Reference-Point-Based
Nondominated Sorting Approach, Part I" (IEEE TEVC 18(4), 2014). MAP optimizes its quadratic
surrogates with DEAP's NSGA-III (μ = λ = 100, SBX and polynomial mutation with η = 20); the
surrogates cost microseconds for a whole population, so here every generation is a few numpy
array operations and 100 generations take a fraction of a second. Maximization throughout (the
run store's convention). Randomness comes only from the ``rng`` passed in.

Example::

    >>> import numpy as np
    >>> f = lambda x: np.stack([-(x[:, 0] - 0.2) ** 2 - x[:, 1] ** 2, -(x[:, 0] - 0.8) ** 2 - x[:, 1] ** 2], axis=1)
    >>> genomes, values = nsga3(f, 2, 2, np.random.default_rng(0), population=40, generations=60)
    >>> bool(np.all((genomes[:, 0] > 0.15) & (genomes[:, 0] < 0.85) & (genomes[:, 1] < 0.05)))
    True
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import numpy as np


def dominance_ranks(values: np.ndarray) -> np.ndarray:
    """Non-domination rank of each row (0 = non-dominated; higher is better in every column)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    ge = np.ones((n, n), dtype=bool)
    gt = np.zeros((n, n), dtype=bool)
    for k in range(values.shape[1]):  # one column at a time: far faster than reducing a short last axis
        ge &= values[:, None, k] >= values[None, :, k]
        gt |= values[:, None, k] > values[None, :, k]
    dominates = ge & gt  # dominates[i, j]: i dominates j
    remaining = dominates.sum(axis=0)
    ranks = np.full(n, -1)
    left = np.ones(n, dtype=bool)
    rank = 0
    while left.any():
        layer = left & (remaining == 0)
        ranks[layer] = rank
        left &= ~layer
        remaining = remaining - dominates[layer].sum(axis=0)
        rank += 1
    return ranks


def reference_directions(n_objectives: int, population: int) -> np.ndarray:
    """Das–Dennis points on the unit simplex, as many as fit in ``population`` (§V: H partitions)."""
    if n_objectives == 1:
        return np.ones((1, 1))
    partitions = 1
    while math.comb(partitions + 1 + n_objectives - 1, n_objectives - 1) <= population:
        partitions += 1
    points = []
    for bars in itertools.combinations(range(partitions + n_objectives - 1), n_objectives - 1):
        edges = np.array([-1, *bars, partitions + n_objectives - 1])
        points.append((np.diff(edges) - 1) / partitions)
    return np.array(points)


def sbx(parents: np.ndarray, rng: np.random.Generator, eta: float, probability: float) -> np.ndarray:
    """Simulated binary crossover of consecutive pairs, bounded to [0, 1] (Deb & Agrawal 1995)."""
    a, b = parents[0::2], parents[1::2]
    u = rng.random(a.shape)
    beta = np.where(u <= 0.5, (2.0 * u) ** (1.0 / (eta + 1.0)), (1.0 / (2.0 * (1.0 - u))) ** (1.0 / (eta + 1.0)))
    cross = (rng.random(len(a)) < probability)[:, None] & (rng.random(a.shape) < 0.5)
    c1 = np.where(cross, 0.5 * ((1 + beta) * a + (1 - beta) * b), a)
    c2 = np.where(cross, 0.5 * ((1 - beta) * a + (1 + beta) * b), b)
    return np.clip(np.vstack([c1, c2]), 0.0, 1.0)


def polynomial_mutation(x: np.ndarray, rng: np.random.Generator, eta: float) -> np.ndarray:
    """Bounded polynomial mutation of each gene with probability 1/d (Deb & Goyal 1996)."""
    mutate = rng.random(x.shape) < 1.0 / x.shape[1]
    u = rng.random(x.shape)
    low, high = x, 1.0 - x
    left = (2 * u + (1 - 2 * u) * (1 - low) ** (eta + 1)) ** (1 / (eta + 1)) - 1
    right = 1 - (2 * (1 - u) + 2 * (u - 0.5) * (1 - high) ** (eta + 1)) ** (1 / (eta + 1))
    delta = np.where(u < 0.5, left, right)
    return np.clip(np.where(mutate, x + delta, x), 0.0, 1.0)


def select(values: np.ndarray, count: int, directions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``count`` rows kept by NSGA-III environmental selection (§IV-A to §IV-E)."""
    ranks = dominance_ranks(values)
    order = np.cumsum(np.bincount(ranks))
    last = int(np.searchsorted(order, count))  # the front F_l that does not fit whole
    if last >= len(order) or order[last] == count:
        return np.flatnonzero(ranks <= min(last, len(order) - 1))
    kept = np.flatnonzero(ranks < last)
    candidates = np.flatnonzero(ranks == last)
    considered = np.concatenate([kept, candidates])
    normalized = _normalize(-values[considered])  # §IV-C, as minimization
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    projection = normalized @ unit.T
    distance = np.linalg.norm(normalized[:, None, :] - projection[:, :, None] * unit[None, :, :], axis=2)
    niche = distance.argmin(axis=1)  # §IV-D: association with the nearest reference line
    gap = distance[np.arange(len(considered)), niche]
    counts = np.bincount(niche[: len(kept)], minlength=len(directions)).astype(float)
    waiting: dict[int, list[int]] = {}  # niche → its F_l members, nearest first
    for i in sorted(range(len(kept), len(considered)), key=lambda i: (gap[i], i)):
        waiting.setdefault(int(niche[i]), []).append(i)
    ties = rng.permutation(len(directions))  # random tie-break among niches of equal count
    heap = [(counts[j], ties[j], j) for j in waiting]
    heapq.heapify(heap)
    chosen: list[int] = []
    while len(chosen) < count - len(kept):  # §IV-E: niche-preservation, least crowded niche first
        _, tie, j = heapq.heappop(heap)
        members = waiting[j]
        pick = members.pop(0 if counts[j] == 0 else int(rng.integers(len(members))))
        chosen.append(pick)
        counts[j] += 1
        if members:
            heapq.heappush(heap, (counts[j], tie, j))
    return np.concatenate([kept, considered[chosen]]).astype(int)


def _normalize(costs: np.ndarray) -> np.ndarray:
    """Translate by the ideal point and divide by the hyperplane intercepts of the extreme points;
    the nadir of the population where the hyperplane is degenerate (§IV-C)."""
    translated = costs - costs.min(axis=0)
    m = costs.shape[1]
    weights = np.full((m, m), 1e-6) + np.eye(m) * (1 - 1e-6)
    asf = np.max(translated[None, :, :] / weights[:, None, :], axis=2)  # m × n achievement scalarizing values
    extremes = translated[asf.argmin(axis=1)]
    nadir = translated.max(axis=0)
    try:
        intercepts = 1.0 / np.linalg.solve(extremes, np.ones(m))
        if not np.all(np.isfinite(intercepts)) or np.any(intercepts <= 1e-10):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        intercepts = nadir
    intercepts = np.where(intercepts > 1e-10, intercepts, 1.0)
    return translated / intercepts


def nsga3(
    evaluate: Callable[[np.ndarray], np.ndarray],
    dimension: int,
    n_objectives: int,
    rng: np.random.Generator,
    *,
    population: int = 100,
    generations: int = 100,
    eta_crossover: float = 20.0,
    eta_mutation: float = 20.0,
    crossover: float = 0.9,
    initial: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Maximize the columns of ``evaluate`` (n × d → n × m) over [0, 1]^d.

    ``initial`` rows seed the first population (the rest is uniform). Returns the distinct
    non-dominated genomes of the last population and their values, sorted by the first objective.
    """
    directions = reference_directions(n_objectives, population)
    size = population + population % 2
    start = rng.random((size, dimension))
    if initial is not None and len(initial):
        seeds = np.asarray(initial, dtype=np.float64)[:size]
        start[: len(seeds)] = np.clip(seeds, 0.0, 1.0)
    genomes, values = start, np.asarray(evaluate(start), dtype=np.float64)
    for _ in range(generations):
        parents = genomes[rng.permutation(size)]
        children = polynomial_mutation(sbx(parents, rng, eta_crossover, crossover), rng, eta_mutation)
        merged = np.vstack([genomes, children])
        merged_values = np.vstack([values, np.asarray(evaluate(children), dtype=np.float64)])
        keep = select(merged_values, size, directions, rng)
        genomes, values = merged[keep], merged_values[keep]
    front = dominance_ranks(values) == 0
    genomes, index = np.unique(genomes[front], axis=0, return_index=True)
    values = values[front][index]
    order = np.argsort(values[:, 0], kind="stable")
    return genomes[order], values[order]
