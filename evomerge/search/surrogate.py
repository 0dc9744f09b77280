"""Quadratic response surfaces: the per-objective surrogates of MAP (arXiv 2406.07529, §3.2).

A merge's score as a function of its coefficients is smooth near the sources (a second-order Taylor
expansion around the base: M̃_n(c) = ½ cᵀA_n c + b_nᵀc + e_n), so a quadratic — squares, pairwise
cross terms, linear terms and a constant, (d+1)(d+2)/2 coefficients in d genes —
fitted on a few dozen evaluated merges predicts the rest of the space. Bounded metrics (accuracy,
exact match) saturate, so they are fitted through a sigmoid link: y ≈ low + (high − low)·σ(q(x)),
as MAP's code does for accuracy. Fitting is least squares: linear for the identity link, and
Levenberg–Marquardt (damped Gauss–Newton, numpy only) for the sigmoid link, started from the
linear fit of the clipped logits. Everything here is a pure function of its inputs: the same
points in the same order give the same coefficients bit for bit.

Example::

    >>> import numpy as np
    >>> x = np.random.default_rng(0).random((12, 2))
    >>> y = 1.0 - (x[:, 0] - 0.3) ** 2 - 2 * x[:, 0] * x[:, 1]
    >>> model = fit_quadratic(x, y)
    >>> bool(np.allclose(model.predict(np.array([[0.5, 0.5]])), 1.0 - 0.04 - 0.5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Kind = Literal["full", "diagonal"]
Link = Literal["identity", "sigmoid"]
LOGIT_CLIP = 0.01
"""The linear start of a sigmoid fit regresses logit(clip(t, 0.01, 0.99)): finite for 0/1 scores."""
MAX_ITERATIONS = 200


def n_coefficients(dimension: int, kind: Kind = "full") -> int:
    """(d+1)(d+2)/2 for a full quadratic, 2d+1 for a diagonal one (no cross terms)."""
    return (dimension + 1) * (dimension + 2) // 2 if kind == "full" else 2 * dimension + 1


def quadratic_features(x: np.ndarray, kind: Kind = "full") -> np.ndarray:
    """The design matrix [x_i², x_i·x_j (i < j), x_i, 1] of n points (n × d → n × coefficients)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    n, d = x.shape
    parts = [x**2]
    if kind == "full":
        i, j = np.triu_indices(d, k=1)
        parts.append(x[:, i] * x[:, j])
    parts += [x, np.ones((n, 1))]
    return np.hstack(parts)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) without overflow warnings for large |z|."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    ez = np.exp(z[~positive])
    out[~positive] = ez / (1.0 + ez)
    return out


@dataclass(frozen=True)
class Quadratic:
    """A fitted surrogate: ``predict(x) = low + (high − low)·σ(φ(x)·β)`` (sigmoid link) or ``φ(x)·β``."""

    coefficients: np.ndarray
    kind: Kind = "full"
    link: Link = "identity"
    low: float = 0.0
    high: float = 1.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = quadratic_features(x, self.kind) @ self.coefficients
        if self.link == "identity":
            return z
        return self.low + (self.high - self.low) * sigmoid(z)


def link_for(y: np.ndarray) -> tuple[Link, float, float]:
    """The ``auto`` link of an objective's observed values: a sigmoid onto [0, 1] when every value lies
    there (an accuracy), onto [−1, 0] for a negated one (a minimized rate), else the identity."""
    y = np.asarray(y, dtype=np.float64)
    if y.size and y.min() >= 0.0 and y.max() <= 1.0:
        return "sigmoid", 0.0, 1.0
    if y.size and y.min() >= -1.0 and y.max() <= 0.0:
        return "sigmoid", -1.0, 0.0
    return "identity", 0.0, 1.0


def fit_quadratic(
    x: np.ndarray, y: np.ndarray, *, kind: Kind = "full", link: Link = "identity", low: float = 0.0, high: float = 1.0
) -> Quadratic:
    """Least-squares quadratic through (x, y); with ``link="sigmoid"``, y must lie in [low, high]."""
    phi = quadratic_features(x, kind)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if link == "identity":
        return Quadratic(np.linalg.lstsq(phi, y, rcond=None)[0], kind, link, low, high)
    if y.min() < low or y.max() > high:
        raise ValueError(f"sigmoid link: values must lie in [{low}, {high}], got [{y.min()}, {y.max()}]")
    target = (y - low) / (high - low)
    clipped = np.clip(target, LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    beta = np.linalg.lstsq(phi, np.log(clipped / (1.0 - clipped)), rcond=None)[0]
    return Quadratic(_levenberg_marquardt(phi, target, beta), kind, link, low, high)


def _levenberg_marquardt(phi: np.ndarray, target: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Minimize Σ (σ(φβ) − t)² from ``beta``: damped Gauss–Newton steps, λ adapted per step."""
    def loss(b: np.ndarray) -> float:
        return float(np.sum((sigmoid(phi @ b) - target) ** 2))

    current = loss(beta)
    damping = 1e-3
    for _ in range(MAX_ITERATIONS):
        s = sigmoid(phi @ beta)
        jacobian = phi * (s * (1.0 - s))[:, None]
        gradient = jacobian.T @ (s - target)
        normal = jacobian.T @ jacobian
        scale = np.diag(normal).copy() + 1e-12
        try:
            step = np.linalg.solve(normal + damping * np.diag(scale), -gradient)
        except np.linalg.LinAlgError:
            damping *= 10.0
            continue
        trial = loss(beta + step)
        if trial < current:
            improvement = current - trial
            beta, current = beta + step, trial
            damping = max(damping / 3.0, 1e-12)
            if improvement <= 1e-15 * max(current, 1e-30) or current < 1e-30:
                break
        else:
            damping *= 4.0
            if damping > 1e12:
                break
    return beta


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 − SS_res / SS_tot (NaN when y is constant)."""
    y = np.asarray(y, dtype=np.float64)
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((y - np.asarray(predicted, dtype=np.float64)) ** 2)) / total
