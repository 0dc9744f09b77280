"""Natural niches (M2N2): a population of merges that compete for examples and mate by attraction.

Abrantes, Lange, Tang: "Competition and Attraction Improve Model Fusion" (GECCO 2025,
arXiv 2508.16204), and its reference code (SakanaAI/natural_niches: ``update_archive``,
``sample_parents``, ``crossover``). Three mechanisms, named as in the paper's abstract:

1. *Dynamic merging boundaries*: a child is a split-point crossover of two members (the space
   derives it; see ``evomerge.spaces.split_point``).
2. *Resource competition*: each example is a resource of capacity 1 shared by the members that
   solve it, so a member's fitness counts what few others can do and the archive keeps niches.
3. *Attraction*: the second parent is chosen for solving what the first one fails, where few
   others succeed.

Steady state: one child at a time enters the archive or is dropped, so results may arrive in any
order and several children may be in flight. Scores are per-example vectors with ids (all tasks
concatenated); the archive starts from the space's reference models (the sources). ``lag: k``
breeds each child from the archive without the last k results before it (the seeds always count),
so that a reproducible run (which breeds only from results it has) keeps k + 1 workers busy.

Example::

    >>> import numpy as np
    >>> from evomerge.search import Evaluation, build_strategy
    >>> from evomerge.search.layout import GenomeLayout, Reference
    >>> layout = GenomeLayout.box(2, ["split", "ratio"], [Reference("a", "source"), Reference("b", "source")])
    >>> nn = build_strategy("natural_niches", layout, seed=0, settings={"archive_size": 4})
    >>> ids = ("t:0", "t:1", "t:2")
    >>> for scores in ([1, 0, 0], [0, 1, 1]):
    ...     p = nn.ask()
    ...     nn.tell(Evaluation(p.ticket, np.array([np.mean(scores)]), per_example=np.array(scores, float), example_ids=ids))
    >>> child = nn.ask()
    >>> sorted(child.parents)
    [0, 1]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.search.base import Strategy, StrategySettings
from evomerge.search.layout import REFERENCE_KINDS, GenomeLayout
from evomerge.search.registry import register_strategy
from evomerge.search.types import Evaluation, Proposal


def shared_fitness(scores: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Resource competition over a (members × examples) score matrix.

    Returns (f, s̃): z_j = (Σ_k s_kj)^α with zeros replaced by 1, s̃_ij = s_ij / z_j, f_i = Σ_j s̃_ij.
    """
    z = scores.sum(axis=0) ** alpha  # §"resource competition": capacity of example j shared by its solvers
    z = np.where(z > 0, z, 1.0)  # reference code: an example nobody solves divides by 1
    shared = scores / z[None, :]
    return shared.sum(axis=1), shared


def parent_a_probabilities(fitness: np.ndarray) -> np.ndarray:
    """P(A = i) ∝ f_i; uniform when every member's fitness is 0."""
    total = fitness.sum()
    return fitness / total if total > 0 else np.full(fitness.size, 1.0 / fitness.size)


def parent_b_probabilities(shared: np.ndarray, a: int) -> np.ndarray:
    """P(B = k | A = a) ∝ Σ_j max(0, s̃_kj − s̃_aj); uniform over the others when that is 0 everywhere.

    (The reference code divides by zero in that case: no member solves an example A fails.)
    """
    attraction = np.maximum(0.0, shared - shared[a]).sum(axis=1)  # §"attraction"
    if attraction.sum() > 0:
        return attraction / attraction.sum()
    uniform = np.full(len(shared), 1.0 / (len(shared) - 1))
    uniform[a] = 0.0
    return uniform


class NicheArchive:
    """The archive's update rule alone (reference code: ``update_archive``).

    It depends only on the order results are told, not on the strategy's random draws, so
    ``status`` and reports rebuild the archive of any run from its stored results.
    """

    def __init__(self, size: int, alpha: float) -> None:
        self.size = size
        self.alpha = alpha
        self.members: list[int] = []
        self.scores = np.zeros((0, 0))

    def add(self, ticket: int, scores: np.ndarray) -> bool:
        """Offer a child; returns whether it entered the archive."""
        if len(self.members) < self.size:  # empty slots (score 0) lose to any child
            self.members.append(ticket)
            self.scores = scores[None, :] if self.scores.size == 0 else np.vstack([self.scores, scores])
            return True
        fitness, _ = shared_fitness(np.vstack([self.scores, scores]), self.alpha)  # over archive ∪ {child}
        worst = int(np.argmin(fitness))  # the child replaces the worst member; a worst child is dropped
        if worst == len(self.members):
            return False
        self.members[worst] = ticket
        self.scores[worst] = scores
        return True

    def fitness(self) -> np.ndarray:
        return shared_fitness(self.scores, self.alpha)[0] if self.members else np.zeros(0)


@register_strategy("natural_niches")
class NaturalNiches(Strategy):
    """M2N2 over a space that derives children from parents (``kind: split_point``).

    Ablations (the paper's, re-runnable from an experiment file): ``alpha: 0`` removes competition
    (raw accuracy as fitness), ``attraction: false`` draws both parents ∝ fitness (with
    replacement, as the reference code's GA), ``split_point: false`` uses one ratio for the whole
    vector, ``crossover: false`` re-evaluates a copy of parent A.
    """

    breeds = True

    class Settings(StrategySettings):
        archive_size: int = Field(20, ge=2, le=100_000, description="members kept in the archive")
        alpha: float = Field(1.0, ge=0.0, description="competition exponent: z_j^alpha divides example j's score")
        attraction: bool = Field(True, description="choose parent B by attraction to A (else ∝ fitness)")
        split_point: bool = Field(True, description="crossover with a random split point (else one ratio everywhere)")
        crossover: bool = Field(True, description="make children by crossover (else a copy of parent A)")
        lag: int = Field(
            0, ge=0, le=1_000_000, description="breed child t from the results of candidates before t - lag (seeds always count)"
        )
        seeds: list[str] = Field(
            default_factory=lambda: ["source"],
            min_length=1,
            description=f"reference kinds the archive starts from: {', '.join(REFERENCE_KINDS)}",
        )

    def __init__(self, layout: GenomeLayout | int, **kwargs: Any) -> None:
        super().__init__(layout, **kwargs)
        s = self.settings
        for kind in s.seeds:
            if kind not in REFERENCE_KINDS:
                raise ConfigError(f"strategy.settings.seeds: unknown kind {kind!r}; expected {', '.join(REFERENCE_KINDS)}")
        seeds = [r.name for r in self.layout.references_of(s.seeds)]
        if len(seeds) < 2:
            raise ConfigError(
                f"strategy natural_niches: the search space expresses {len(seeds)} seed model(s) of kinds "
                f"{s.seeds}; the archive needs at least 2 (use search_space kind: split_point)"
            )
        if self.n_objectives != 1:
            raise ConfigError(
                f"strategy natural_niches: ranks by one objective (the per-example scores), the fitness has {self.n_objectives}"
            )
        self._seeds = seeds
        self._asked_seeds = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._archive = NicheArchive(s.archive_size, s.alpha)
        self._ids: tuple[str, ...] | None = None

    @property
    def archive(self) -> list[tuple[int, float]]:
        """(ticket, shared fitness) of every member, in archive slot order."""
        return list(zip(self._archive.members, self._archive.fitness().tolist()))

    @classmethod
    def summarize(
        cls, settings: StrategySettings, told: list[Evaluation], parents: dict[int, tuple[int, ...]]
    ) -> dict[str, Any] | None:
        """The archive rebuilt from the run's results: members, fitness, accuracy, coverage, lineage."""
        assert isinstance(settings, cls.Settings)
        archive = NicheArchive(settings.archive_size, settings.alpha)
        for evaluation in told:
            if not evaluation.failed and evaluation.per_example is not None:
                archive.add(evaluation.ticket, np.asarray(evaluation.per_example, dtype=np.float64).reshape(-1))
        if not archive.members:
            return None
        depth: dict[int, int] = {}

        def generation(ticket: int) -> int:
            if ticket not in depth:
                depth[ticket] = 1 + max((generation(p) for p in parents.get(ticket, ())), default=-1)
            return depth[ticket]

        members = [
            {
                "candidate": ticket,
                "fitness": round(float(f), 6),
                "accuracy": round(float(row.mean()), 6),
                "parents": list(parents.get(ticket, ())),
                "generation": generation(ticket),
            }
            for ticket, f, row in zip(archive.members, archive.fitness(), archive.scores)
        ]
        coverage = float(archive.scores.max(axis=0).mean())
        return {"archive": {"members": members, "coverage": round(coverage, 6), "examples": int(archive.scores.shape[1])}}

    def can_ask(self) -> bool:
        """Seeds first; children once two members exist (a single survivor has no one to mate with)."""
        return self._asked_seeds < len(self._seeds) or len(self._archive.members) >= 2

    def determined(self) -> bool:
        """Seeds always (they are the references); a child once every result below the horizon is told."""
        return self._asked_seeds < len(self._seeds) or super().determined()

    def _horizon(self) -> int:
        """Child t sees the results before t − lag, and every seed's."""
        return max(self._next_ticket - self.settings.lag, len(self._seeds))

    def _propose(self, ticket: int) -> Proposal:
        if self._asked_seeds < len(self._seeds):
            name = self._seeds[self._asked_seeds]
            self._asked_seeds += 1
            reference = self.layout.reference(name)
            return Proposal(ticket, reference.genome, info={"reference": name})
        members = self._archive.members
        if len(members) < 2:
            raise ConfigError(
                f"strategy natural_niches: only {len(members)} seed model(s) were evaluated successfully; "
                "the archive needs 2 to breed (see the failed candidates with `evomerge status`)"
            )
        a, b = self._parents()
        if not self.settings.crossover:
            return Proposal(ticket, None, parents=(members[a],))
        split = float(self._rng.random()) if self.settings.split_point else 1.0  # §"dynamic merging boundaries"
        ratio = float(self._rng.random())  # w ~ U(0, 1); t = w before the split, 1 − w after
        genome = np.array([split, ratio])
        return Proposal(ticket, genome, parents=(members[a], members[b]))

    def _parents(self) -> tuple[int, int]:
        """Archive slots of parents A and B (reference code: ``sample_parents``)."""
        fitness, shared = shared_fitness(self._archive.scores, self.settings.alpha)
        n = len(self._archive.members)
        p = parent_a_probabilities(fitness)
        if not self.settings.attraction:
            a, b = self._rng.choice(n, size=2, p=p)  # GA: both ∝ fitness, with replacement
            return int(a), int(b)
        a = int(self._rng.choice(n, p=p))  # parent A ∝ f_i
        return a, int(self._rng.choice(n, p=parent_b_probabilities(shared, a)))

    def _observe(self, proposal: Proposal, evaluation: Evaluation) -> None:
        if evaluation.failed:
            return
        self._archive.add(evaluation.ticket, self._checked_scores(evaluation))

    def _checked_scores(self, evaluation: Evaluation) -> np.ndarray:
        if evaluation.per_example is None or evaluation.example_ids is None:
            raise ConfigError(
                "strategy natural_niches: needs per-example scores with example ids; the fitness returned none "
                f"for candidate {evaluation.ticket}"
            )
        ids = tuple(evaluation.example_ids)
        if self._ids is None:
            self._ids = ids
        elif ids != self._ids:
            raise ConfigError(
                f"strategy natural_niches: candidate {evaluation.ticket} was scored on other examples than the archive "
                f"({len(ids)} vs {len(self._ids)}); every candidate must see the same examples"
            )
        return np.asarray(evaluation.per_example, dtype=np.float64).reshape(-1)

    def _state(self) -> dict[str, Any]:
        return {
            "rng": self._rng.bit_generator.state,
            "asked_seeds": self._asked_seeds,
            "members": list(self._archive.members),
            "scores": self._archive.scores,
            "ids": None if self._ids is None else list(self._ids),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._asked_seeds = int(state["asked_seeds"])
        self._archive.members = [int(t) for t in state["members"]]
        self._archive.scores = np.asarray(state["scores"], dtype=np.float64)
        self._ids = None if state["ids"] is None else tuple(state["ids"])
