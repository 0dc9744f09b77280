"""MAP: the trade-off front of merges from one quadratic surrogate per objective.

Li et al., "Low-compute Model Merging with Amortized Pareto Fronts via Quadratic Approximation"
(arXiv 2406.07529; code luli-git/MAP). Evaluate a design of merges (the corners — each source
alone, the base, the uniform merge —, points on the diagonal, random points), fit one quadratic per
objective (``evomerge.search.surrogate``), find the surrogates' Pareto front with NSGA-III
(``evomerge.search.nsga``: it costs no evaluation), evaluate the front points nothing evaluated
yet is near, refit on every successful evaluation, repeat. Where d ≤ 6, part of each batch is drawn
by "Bayesian MAP"'s bin acquisition, so the surrogate improves where it fits worst.

Batches: proposals come in batches (batch 0 = the design), and batch k is computed once every
proposal of the batches before it has been told, from those results sorted by ticket, with a
generator seeded by (seed, k). A batch's content therefore depends only on the results told before
it — never on the order they arrived in — and a run resumed from any checkpoint proposes the same
batches. ``can_ask`` is False while a batch is exhausted and some of its results are still out.

Departures from the reference code, each for a reason:

* the space is any of ours (not only global task-arithmetic coefficients), in the unit box;
  hyperspherical angles are taken from the box's low corner (the base, for task arithmetic
  weights from 0), and an acquisition point's radius is a fraction ``radius`` ~ U(0.2, 1.0) of
  the ray's length inside the box (MAP: an absolute radius in [0.2, 0.8], which in our boxes
  never reaches the far side, where weights above 1 live: on the zoo's pair that region holds
  the best trade-offs);
* an acquisition bin with no evaluated point scores as the worst-fitted one (MAP: −∞, so an
  unexplored region is never sampled), residuals are divided by each objective's observed range
  (objectives of different scales weigh alike) and bin scores by their maximum before the
  softmax (the temperature 0.07 then means the same for every metric), and each bootstrap
  resample drops its own 20 % of a bin's points (the reference code's mask shrinks cumulatively);
* the fit is least squares with a sigmoid link for bounded metrics (``link: auto``) rather than
  ``scipy.optimize.curve_fit``, and the front uses Das–Dennis reference directions as many as the
  population (MAP: 2 layers, a handful of directions).

When the budget cannot fit a quadratic, the strategy refuses to start and says so with the numbers;
``quadratic: diagonal`` (squares and linear terms, 2d+1 coefficients, no interactions) is the
documented fallback for spaces with more genes.

Example::

    >>> import numpy as np
    >>> from evomerge.search import Evaluation, build_strategy
    >>> from evomerge.search.layout import GenomeLayout, Reference
    >>> refs = [Reference("a", "source", np.array([1.0, 0.0])), Reference("b", "source", np.array([0.0, 1.0]))]
    >>> search = build_strategy("map", GenomeLayout.box(2, None, refs), n_objectives=2, seed=0,
    ...                         settings={"batch_size": 4, "link": "identity"})
    >>> def score(x):  # two quadratics: the surrogates are exact once fitted
    ...     return np.array([1 - (x[0] - 0.8) ** 2 - 0.2 * x[1] ** 2, 1 - (x[1] - 0.8) ** 2 - 0.2 * x[0] ** 2])
    >>> for _ in range(16):  # the design (2 per coefficient: 12 points), then one batch of 4
    ...     p = search.ask()
    ...     search.tell(Evaluation(p.ticket, score(p.genome)))
    ...     if p.ticket in (0, 1, 2, 15):
    ...         print(p.ticket, p.info["role"], p.info.get("reference"))
    0 reference a
    1 reference b
    2 isotropic None
    15 acquisition None
    >>> p.info["batch"], np.allclose(p.info["predicted"], score(p.genome), atol=1e-6)
    (1, True)
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import ConfigError
from evomerge.search.base import ReferenceKind, Strategy, StrategySettings
from evomerge.search.layout import GenomeLayout
from evomerge.search.nsga import dominance_ranks, nsga3
from evomerge.search.registry import register_strategy
from evomerge.search.surrogate import Kind, Quadratic, fit_quadratic, link_for, n_coefficients, r_squared
from evomerge.search.types import Evaluation, Proposal

MAX_ACQUISITION_GENES = 6
"""Bayesian MAP bins hyperspherical angles; beyond 6 genes the bins outnumber any budget (MAP: "d > 6 unsupported")."""
FRONT_POINTS_STORED = 40
"""The predicted front stored with each proposal is thinned to this many points."""
DIGITS = 6


def angles(x: np.ndarray) -> np.ndarray:
    """Hyperspherical angles φ_0 … φ_{d−2} ∈ [0, π/2] of points in the positive orthant (n × d → n × (d−1))."""
    x = np.atleast_2d(x)
    tail = np.sqrt(np.cumsum((x**2)[:, ::-1], axis=1)[:, ::-1])  # ‖x_k:‖ for each k
    return np.arctan2(tail[:, 1:], x[:, :-1])


def directions(phi: np.ndarray) -> np.ndarray:
    """Unit vectors of hyperspherical angles (the inverse of ``angles`` at radius 1)."""
    phi = np.atleast_2d(phi)
    n = len(phi)
    sines = np.hstack([np.ones((n, 1)), np.cumprod(np.sin(phi), axis=1)])
    cosines = np.hstack([np.cos(phi), np.ones((n, 1))])
    return sines * cosines


def bins_per_angle(dimension: int) -> int:
    """MAP's ``get_sample_n_bins``: 4 bins per angle below 4 genes, 2 up to 6."""
    return 4 if dimension < 4 else 2


def bin_of(phi: np.ndarray, per_angle: int) -> np.ndarray:
    """The flat index of each point's bin (angles cut into ``per_angle`` equal parts of [0, π/2])."""
    cells = np.clip(np.floor(phi / (np.pi / 2) * per_angle).astype(int), 0, per_angle - 1)
    return np.ravel_multi_index(cells.T, (per_angle,) * phi.shape[1]) if phi.shape[1] else np.zeros(len(phi), int)


def bin_scores(
    bins: np.ndarray, errors: np.ndarray, n_bins: int, rng: np.random.Generator, *, std_weight: float, drop: float, resamples: int
) -> np.ndarray:
    """Per bin: mean squared error of its points + ``std_weight`` × the std of that mean over
    ``resamples`` resamples that each drop a share ``drop`` of the bin's points (Bayesian MAP's
    acquisition). An empty bin scores as the worst-fitted one."""
    scores = np.full(n_bins, np.nan)
    for b in range(n_bins):
        members = errors[bins == b]
        if members.size == 0:
            continue
        keep = members.size - int(drop * members.size)
        means = [members[rng.permutation(members.size)[:keep]].mean() for _ in range(resamples)]
        scores[b] = members.mean() + std_weight * float(np.std(means))
    filled = scores[np.isfinite(scores)]
    return np.where(np.isfinite(scores), scores, filled.max() if filled.size else 1.0)


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of scores scaled to a maximum of 1 (so ``temperature`` does not depend on the metric's scale)."""
    top = scores.max()
    scaled = scores / top if top > 0 else np.zeros_like(scores)
    e = np.exp((scaled - scaled.max()) / temperature)
    return e / e.sum()


def ray_length(u: np.ndarray) -> np.ndarray:
    """How far each unit direction (in the positive orthant) runs from the origin inside [0, 1]^d."""
    with np.errstate(divide="ignore"):
        return np.min(np.where(u > 1e-12, 1.0 / np.maximum(u, 1e-300), np.inf), axis=1)


def latin_hypercube(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points in [0, 1]^d, one per stratum of every gene (a random design that covers each axis)."""
    strata = np.stack([rng.permutation(n) for _ in range(d)], axis=1)
    return (strata + rng.random((n, d))) / n


def thin(values: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` rows, evenly spaced along the (sorted) front, both ends kept."""
    if len(values) <= limit:
        return values
    return values[np.unique(np.linspace(0, len(values) - 1, limit).round().astype(int))]


def fit_surrogates(x: np.ndarray, y: np.ndarray, *, kind: Kind = "full", link: str = "auto") -> list[Quadratic]:
    """One quadratic per column of ``y`` (n × m) on the points ``x`` (n × d), by least squares.

    ``link``: ``auto`` (a sigmoid for a column within [0, 1] or [−1, 0], else none), ``sigmoid``
    (such a column is required) or ``identity``.
    """
    models = []
    for k in range(y.shape[1]):
        chosen, low, high = link_for(y[:, k])
        if link == "identity":
            chosen = "identity"
        elif link == "sigmoid" and chosen != "sigmoid":
            raise ConfigError(
                f"strategy.settings.link: objective {k} has values outside [0, 1] and [-1, 0] "
                f"({y[:, k].min():.4g} to {y[:, k].max():.4g}); use link: auto or identity"
            )
        models.append(fit_quadratic(x, y[:, k], kind=kind, link=chosen, low=low, high=high))
    return models


def predict(models: list[Quadratic], x: np.ndarray) -> np.ndarray:
    """Every surrogate's prediction at the points ``x`` (n × d → n × m)."""
    return np.column_stack([m.predict(x) for m in models])


@register_strategy("map")
class MapSearch(Strategy):
    """MAP's adaptive loop on one quadratic surrogate per objective (see the module docstring)."""

    class Settings(StrategySettings):
        quadratic: Literal["full", "diagonal"] = Field(
            "full", description="full: squares, cross terms, linear, constant; diagonal: no cross terms (2d+1 coefficients)"
        )
        design_points: int | None = Field(
            None, ge=1, le=1_000_000, description="evaluations before the first fit (corners included); null: 2 per coefficient"
        )
        isotropic: float = Field(0.2, ge=0.0, le=1.0, description="share of the design's other points on the diagonal")
        batch_size: int = Field(6, ge=1, le=100_000, description="proposals per refit")
        acquisition: float = Field(
            0.5, ge=0.0, le=1.0, description=f"share of a batch drawn by bin acquisition (up to {MAX_ACQUISITION_GENES} genes)"
        )
        link: Literal["auto", "sigmoid", "identity"] = Field(
            "auto", description="auto: a sigmoid for objectives within [0, 1] (or [-1, 0]), else identity"
        )
        population: int = Field(100, ge=4, le=100_000, description="NSGA-III population on the surrogates")
        generations: int = Field(100, ge=1, le=100_000, description="NSGA-III generations on the surrogates")
        temperature: float = Field(0.07, gt=0.0, description="softmax temperature of the bin acquisition")
        std_weight: float = Field(0.5, ge=0.0, description="weight of the bootstrap std in a bin's score")
        bootstrap: int = Field(30, ge=1, le=10_000, description="resamples of a bin's errors")
        drop: float = Field(0.2, ge=0.0, lt=1.0, description="share of a bin's points each resample leaves out")
        radius: tuple[float, float] = Field((0.2, 1.0), description="acquisition radius, as a fraction of the ray inside the box")
        min_distance: float = Field(
            0.01, ge=0.0, description="front points nearer than this (RMS per gene, unit box) to an evaluated genome are skipped"
        )
        references: list[ReferenceKind] = Field(
            default_factory=lambda: ["source", "base", "uniform"], description="reference models in the design"
        )

        @model_validator(mode="after")
        def _radius(self) -> MapSearch.Settings:
            low, high = self.radius
            if not 0.0 <= low < high <= 1.0:
                raise ValueError(f"radius: expected 0 <= low < high <= 1, got [{low}, {high}]")
            return self

    def __init__(self, layout: GenomeLayout | int, **kwargs: Any) -> None:
        super().__init__(layout, **kwargs)
        s = self.settings
        d = self.dimension
        self.coefficients = n_coefficients(d, s.quadratic)
        self.design_size = s.design_points if s.design_points is not None else 2 * self.coefficients
        fallback = f"; or quadratic: diagonal ({n_coefficients(d, 'diagonal')} coefficients)" if s.quadratic == "full" else ""
        if self.budget is not None and self.budget < self.coefficients:
            raise ConfigError(
                f"strategy map: a {s.quadratic} quadratic in {d} genes has {self.coefficients} coefficients"
                f"{' ((d+1)(d+2)/2)' if s.quadratic == 'full' else ' (2d+1)'} but the budget is {self.budget} evaluations; "
                f"use a space with fewer genes (search_spaces/task-arithmetic-global.yaml){fallback}"
            )
        if self.design_size < self.coefficients:
            raise ConfigError(
                f"strategy.settings.design_points: {self.design_size} points cannot fit the {self.coefficients} "
                f"coefficients of a {s.quadratic} quadratic in {d} genes"
            )
        if self.budget is not None and self.budget < self.design_size:
            raise ConfigError(
                f"strategy map: the design of {self.design_size} points (2 per coefficient of a {s.quadratic} quadratic in "
                f"{d} genes) exceeds the budget of {self.budget} evaluations; set strategy.settings.design_points between "
                f"{self.coefficients} and {self.budget}{fallback}"
            )
        self._references = self.start_references(list(s.references))
        self._batch = 0
        self._queue: list[tuple[np.ndarray, dict[str, Any]]] = []
        self._observed: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    @property
    def batch(self) -> int:
        """How many batches have been computed (1 once the design is out)."""
        return self._batch

    def can_ask(self) -> bool:
        """While the current batch lasts, and once every earlier proposal has been told."""
        return bool(self._queue) or not self._outstanding

    def determined(self) -> bool:
        """A batch is fixed once computed, and the next one is computed from every result sorted by
        ticket: so whenever ``ask`` may be called, its proposal no longer depends on arrival order."""
        return self.can_ask()

    def surrogates(self) -> list[Quadratic] | None:
        """The quadratics fitted on every successful result so far (None before there are enough)."""
        x, y = self._data()
        return self._fit(x, y) if len(x) >= self.coefficients else None

    def _propose(self, ticket: int) -> Proposal:
        if not self._queue:
            self._queue = self._next_batch()
        genome, info = self._queue.pop(0)
        return Proposal(ticket, genome, info=info)

    def _observe(self, proposal: Proposal, evaluation: Evaluation) -> None:
        values = None if evaluation.failed else evaluation.objectives.copy()
        self._observed[proposal.ticket] = (np.asarray(proposal.genome, dtype=np.float64), values)

    # -- batches ---------------------------------------------------------------------------------

    def _next_batch(self) -> list[tuple[np.ndarray, dict[str, Any]]]:
        batch = self._batch
        self._batch += 1
        rng = np.random.default_rng([self.seed, batch])  # a batch's draws depend on (seed, batch) alone
        if batch == 0:
            return self._design(rng)
        x, y = self._data()
        if len(x) < self.coefficients:  # failures left too few points to fit: more design points
            points = latin_hypercube(self.settings.batch_size, self.dimension, rng)
            return [(self._box(p), {"batch": batch, "role": "design"}) for p in points]
        return self._surrogate_batch(batch, x, y, rng)

    def _design(self, rng: np.random.Generator) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Corners first, then the diagonal, then a Latin hypercube (MAP's ``generate_combined_points``)."""
        s = self.settings
        # Fig. 1, step 2: sample scaling coefficients — the one-hot corners, the diagonal, random points
        out = [(r.genome.copy(), {"batch": 0, "role": "reference", "reference": r.name}) for r in self._references]
        rest = max(0, self.design_size - len(out))
        n_iso = int(round(s.isotropic * rest))
        t = (np.arange(n_iso) + rng.random(n_iso)) / max(n_iso, 1)
        out += [(self._box(np.full(self.dimension, v)), {"batch": 0, "role": "isotropic"}) for v in t]
        out += [(self._box(p), {"batch": 0, "role": "design"}) for p in latin_hypercube(rest - n_iso, self.dimension, rng)]
        return out

    def _surrogate_batch(
        self, batch: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> list[tuple[np.ndarray, dict[str, Any]]]:
        s = self.settings
        models = self._fit(x, y)  # Fig. 1, step 3: one quadratic M̃_n(c) per objective, on every result so far

        def surrogate(points: np.ndarray) -> np.ndarray:
            return predict(models, points)

        fitted = surrogate(x)
        seeds = x[np.argsort(dominance_ranks(y), kind="stable")][: s.population // 2]  # the real front seeds NSGA-III
        front_x, front_y = nsga3(  # step 4: the amortized front, NSGA-III on the surrogates alone
            surrogate, self.dimension, self.n_objectives, rng, population=s.population, generations=s.generations, initial=seeds
        )
        acquire = 1 < self.dimension <= MAX_ACQUISITION_GENES
        n_acquire = int(round(s.acquisition * s.batch_size)) if acquire else 0
        chosen = self._front_points(front_x, front_y, fitted, x, s.batch_size - n_acquire)  # "MAP real": verify the prediction
        n_acquire = s.batch_size - len(chosen) if acquire else 0
        roles = ["front"] * len(chosen)
        points = [front_x[i] for i in chosen]
        if n_acquire:
            points += list(self._acquire(x, y, fitted, n_acquire, rng))
            roles += ["acquisition"] * n_acquire
        if not points:  # nothing new on the front and no acquisition: keep exploring
            points, roles = list(latin_hypercube(s.batch_size, self.dimension, rng)), ["design"] * s.batch_size
        stored = thin(front_y, FRONT_POINTS_STORED)
        common = {
            "batch": batch,
            "front": [[round(float(v), DIGITS) for v in row] for row in stored],
            "fit_r2": [_json_float(r_squared(y[:, k], fitted[:, k])) for k in range(self.n_objectives)],
        }
        predicted = surrogate(np.array(points))
        return [
            (self._box(np.asarray(p, dtype=np.float64)), {**common, "role": role, "predicted": [round(float(v), DIGITS) for v in pred]})
            for p, role, pred in zip(points, roles, predicted)
        ]

    def _front_points(self, front_x: np.ndarray, front_y: np.ndarray, fitted: np.ndarray, x: np.ndarray, count: int) -> list[int]:
        """Up to ``count`` front points no evaluated genome is near, each the one farthest (in predicted
        objective space, scaled by the front's range) from the predictions already covered."""
        if count <= 0:
            return []
        distance = np.sqrt(np.mean((front_x[:, None, :] - x[None, :, :]) ** 2, axis=2)).min(axis=1)
        novel = [i for i in range(len(front_x)) if distance[i] > self.settings.min_distance]
        span = np.ptp(front_y, axis=0)
        scale = np.where(span > 0, span, 1.0)
        covered = fitted / scale
        chosen: list[int] = []
        while novel and len(chosen) < count:
            candidates = front_y[novel] / scale
            gaps = np.sqrt(((candidates[:, None, :] - covered[None, :, :]) ** 2).sum(axis=2)).min(axis=1)
            pick = novel.pop(int(np.argmax(gaps)))
            chosen.append(pick)
            covered = np.vstack([covered, front_y[pick] / scale])
            near = np.sqrt(np.mean((front_x[novel] - front_x[pick]) ** 2, axis=1)) <= self.settings.min_distance
            novel = [i for i, close in zip(novel, near) if not close]
        return chosen

    def _acquire(self, x: np.ndarray, y: np.ndarray, fitted: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """Bayesian MAP: bins of angles scored by the surrogates' error there, sampled by softmax."""
        s = self.settings
        span = np.ptp(y, axis=0)  # Bayesian MAP: squared surrogate error of each evaluated point
        errors = np.mean(((fitted - y) / np.where(span > 0, span, 1.0)) ** 2, axis=1)
        per_angle = bins_per_angle(self.dimension)
        n_bins = per_angle ** (self.dimension - 1)
        scores = bin_scores(
            bin_of(angles(x), per_angle), errors, n_bins, rng, std_weight=s.std_weight, drop=s.drop, resamples=s.bootstrap
        )
        picked = rng.choice(n_bins, size=count, p=softmax(scores, s.temperature))  # bins ∝ softmax(score / T)
        cells = np.array(np.unravel_index(picked, (per_angle,) * (self.dimension - 1))).T
        width = np.pi / 2 / per_angle
        phi = (cells + rng.random(cells.shape)) * width  # uniform within the bin
        u = directions(phi)
        radius = rng.uniform(*s.radius, size=count) * ray_length(u)
        return np.clip(u * radius[:, None], 0.0, 1.0)

    # -- fitting ---------------------------------------------------------------------------------

    def _box(self, unit: np.ndarray) -> np.ndarray:
        """A point of the unit box (where the surrogates live) in this strategy's bounds."""
        low, high = self.bounds[:, 0], self.bounds[:, 1]
        return unit if np.all(low == 0.0) and np.all(high == 1.0) else low + unit * (high - low)

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        """Every successful result in unit-box coordinates, sorted by ticket (the fit must not depend
        on arrival order)."""
        ok = [(t, g, v) for t, (g, v) in sorted(self._observed.items()) if v is not None]
        low, span = self.bounds[:, 0], self.bounds[:, 1] - self.bounds[:, 0]
        x = (np.array([g for _, g, _ in ok], dtype=np.float64).reshape(len(ok), self.dimension) - low) / span
        y = np.array([v for _, _, v in ok], dtype=np.float64).reshape(len(ok), self.n_objectives)
        return x, y

    def _fit(self, x: np.ndarray, y: np.ndarray) -> list[Quadratic]:
        return fit_surrogates(x, y, kind=self.settings.quadratic, link=self.settings.link)

    # -- state -----------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        tickets = sorted(self._observed)
        return {
            "batch": self._batch,
            "queue": [{"genome": g, "info": info} for g, info in self._queue],
            "tickets": tickets,
            "genomes": np.array([self._observed[t][0] for t in tickets], dtype=np.float64).reshape(len(tickets), self.dimension),
            "values": np.array(
                [self._observed[t][1] if self._observed[t][1] is not None else np.full(self.n_objectives, np.nan) for t in tickets],
                dtype=np.float64,
            ).reshape(len(tickets), self.n_objectives),
            "failed": [self._observed[t][1] is None for t in tickets],
        }

    def _load(self, state: dict[str, Any]) -> None:
        self._batch = int(state["batch"])
        self._queue = [(np.asarray(item["genome"], dtype=np.float64), dict(item["info"])) for item in state["queue"]]
        self._observed = {
            int(t): (g.copy(), None if failed else v.copy())
            for t, g, v, failed in zip(state["tickets"], state["genomes"], state["values"], state["failed"])
        }


def _json_float(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), DIGITS)
