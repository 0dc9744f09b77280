"""Pareto ranks and hypervolume in the store's maximize convention, on Optuna's implementations.

Optuna (a project dependency) has a fast non-dominated sort and an exact hypervolume (WFG), both
for minimization and both private; they are wrapped here alone so an Optuna change is one file.
"""

from __future__ import annotations

import numpy as np
from optuna._hypervolume import compute_hypervolume
from optuna.study._multi_objective import _fast_non_domination_rank


def nondominated_ranks(values: np.ndarray) -> np.ndarray:
    """Rank 0 for the non-dominated rows of ``values`` (n × m, higher is better), 1 for the next layer…"""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"values: expected an n × m array, got shape {values.shape}")
    if len(values) == 0:
        return np.zeros(0, dtype=int)
    return np.asarray(_fast_non_domination_rank(-values), dtype=int)


def hypervolume(values: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``values`` (higher is better) and bounded below by ``reference``.

    Points not strictly better than the reference in every objective add nothing.
    """
    values = np.asarray(values, dtype=float)
    reference = np.asarray(reference, dtype=float)
    if len(values) == 0:
        return 0.0
    inside = values[np.all(values > reference, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(-inside, -reference, assume_pareto=False))


def reference_point(values: np.ndarray) -> np.ndarray:
    """A reference below every point: the per-objective minimum less 10 % of the range (or 1)."""
    values = np.asarray(values, dtype=float)
    low, high = values.min(axis=0), values.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return low - 0.1 * span
