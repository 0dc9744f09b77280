"""The ask/tell strategy interface every search algorithm implements.

The executor is asynchronous: it may ``ask`` several proposals before any is told, and
evaluations come back in any order. A strategy therefore keeps the proposals it has handed out
(``outstanding``) and never assumes generations; algorithms that do (CMA-ES) assemble them
internally. Resume is exact: ``state_dict``/``load_state_dict`` round-trip everything including the
RNG, and ``replay`` re-applies the asks and tells a run store recorded after a checkpoint.

Reproducible runs (``executor: {reproducible: true}``): the driver tells results in ticket order
and asks only while ``determined()`` holds — the next proposal would be the same if every
outstanding result were told first. Then a run with any number of workers, finishing in any
order, makes exactly the proposals of a one-worker run (ask 0, tell 0, ask 1, ...). Each strategy
states its rule: random search always; CMA-ES within its current generation; a strategy whose
proposals depend on every earlier result only with nothing outstanding, unless its proposals are
made from older results alone (``_horizon``: natural niches' and Optuna's ``lag`` setting).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.search.layout import REFERENCE_KINDS, GenomeLayout, Reference
from evomerge.search.serialize import decode, encode
from evomerge.search.types import Evaluation, Proposal

STATE_FORMAT = 1


class StrategySettings(BaseModel):
    """A strategy's own settings (the ``strategy.settings`` block of an experiment); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ReferenceKind = Literal["source", "base", "uniform"]


def references_field() -> Any:
    """The ``references`` setting of strategies that evaluate the reference models first."""
    return Field(
        None,
        description="reference models evaluated first (kinds: source, base, uniform); "
        "null: all of them with several objectives, none with one",
    )


class Strategy(ABC):
    """A seeded, checkpointable ask/tell search strategy.

    Subclasses implement ``_propose`` (make the proposal for a ticket), ``_observe`` (learn from a
    sanitized evaluation of one of their proposals), ``_state`` and ``_load``. The base class owns
    tickets, the outstanding proposals, failure bookkeeping (the worst value seen per objective, the
    default penalty for a failed candidate) and the checks that a checkpoint fits this strategy.

    ``layout`` tells the strategy what its genes are (names, models, layers), where to start and
    which references (each source alone, the base, the uniform merge) the space can express; an
    int is a plain box of that many genes. ``budget`` is the number of evaluations the run may
    spend, when the experiment sets one (a strategy that cannot work within it says so at once;
    none may let it change its proposals, so that a run's prefix is a shorter run). ``can_ask`` lets a strategy whose next proposal depends
    on results still out (a population seeded from its first evaluations) make the driver wait.

    A told result reaches ``_observe`` once its ticket is below ``_horizon()`` (by default at
    once); until then it waits, in tell order, and the next proposal cannot see it.
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[StrategySettings]] = StrategySettings
    breeds: ClassVar[bool] = False
    """Whether proposals are derived from parents (the search space must ``derive``)."""

    def __init__(
        self,
        layout: GenomeLayout | int,
        *,
        n_objectives: int = 1,
        seed: int = 0,
        bounds: np.ndarray | None = None,
        settings: StrategySettings | None = None,
        budget: int | None = None,
    ) -> None:
        layout = GenomeLayout.box(layout) if isinstance(layout, int) else layout
        if layout.dimension < 1:
            raise ConfigError(f"strategy {self.name}: the search space has {layout.dimension} genes; expected at least 1")
        if n_objectives < 1:
            raise ConfigError(f"strategy {self.name}: expected at least 1 objective, got {n_objectives}")
        self.layout = layout
        self.dimension = layout.dimension
        self.n_objectives = int(n_objectives)
        self.seed = int(seed)
        self.settings = settings if settings is not None else self.Settings()
        self.bounds = _check_bounds(bounds, self.dimension, self.name)
        self.budget = budget
        self._next_ticket = 0
        self._outstanding: dict[int, Proposal] = {}
        self._unseen: list[tuple[Proposal, Evaluation]] = []
        self._worst = np.full(self.n_objectives, np.inf)

    @property
    def outstanding(self) -> list[Proposal]:
        """Proposals asked and not yet told, in ask order."""
        return list(self._outstanding.values())

    def can_ask(self) -> bool:
        """Whether ``ask`` can propose now; False only while the next proposal needs results still out."""
        return True

    def determined(self) -> bool:
        """Whether the next proposal is fixed by the results told so far: telling the outstanding
        results first (in ticket order) would change neither it nor the state after those tells.

        The driver of a reproducible run asks only then (see the module docstring). The default
        suits a strategy whose proposals see every result below ``_horizon()``: all of those told.
        """
        horizon = self._horizon()
        return all(ticket >= horizon for ticket in self._outstanding)

    def ask(self) -> Proposal:
        """The next proposal; may be called again before earlier proposals are told (see ``can_ask``)."""
        proposal = self._propose(self._next_ticket)
        if proposal.ticket != self._next_ticket:
            raise RuntimeError(f"strategy {self.name} returned ticket {proposal.ticket}, expected {self._next_ticket}")
        self._next_ticket += 1
        self._outstanding[proposal.ticket] = proposal
        self._see()
        return proposal

    def tell(self, evaluation: Evaluation) -> None:
        """Learn from the evaluation of an outstanding proposal (any order; failures included)."""
        proposal = self._outstanding.get(evaluation.ticket)
        if proposal is None:
            raise ValueError(f"tell: ticket {evaluation.ticket} was never asked or was already told")
        evaluation = evaluation.sanitized()
        if not evaluation.failed and evaluation.objectives.shape != (self.n_objectives,):
            got = evaluation.objectives.size
            raise ValueError(f"tell: ticket {evaluation.ticket} has {got} objectives, expected {self.n_objectives}")
        del self._outstanding[evaluation.ticket]
        self._unseen.append((proposal, evaluation))
        self._see()

    def _horizon(self) -> int:
        """Proposal ``_next_ticket`` is made from the results of the tickets below this (non-decreasing
        as tickets advance); the default, every earlier ticket, lets each result through when told."""
        return self._next_ticket

    def _see(self) -> None:
        """Pass the told results below the horizon to ``_observe``, in the order they were told."""
        horizon = self._horizon()
        ready = [item for item in self._unseen if item[0].ticket < horizon]
        if not ready:
            return
        self._unseen = [item for item in self._unseen if item[0].ticket >= horizon]
        for proposal, evaluation in ready:
            if not evaluation.failed:
                self._worst = np.minimum(self._worst, evaluation.objectives)
            self._observe(proposal, evaluation)

    def replay(self, events: Iterable[Proposal | Evaluation]) -> None:
        """Re-apply recorded asks and tells in their original order, verifying every re-asked proposal.

        After ``load_state_dict(checkpoint)``, replaying the events a run store recorded after that
        checkpoint brings the strategy to exactly the state it had when the run stopped. A re-asked
        proposal that differs from the recorded one means the strategy, its settings or a library
        changed since the run started, and resuming would silently fork the run: that is an error.
        """
        for event in events:
            if isinstance(event, Proposal):
                again = self.ask()
                if not again.same_as(event):
                    raise ConfigError(
                        f"resume: strategy {self.name} re-proposed ticket {event.ticket} differently from the run "
                        "store; the strategy, its settings or a library version changed since the run started"
                    )
            else:
                self.tell(event)

    @classmethod
    def summarize(
        cls, settings: StrategySettings, told: list[Evaluation], parents: dict[int, tuple[int, ...]]
    ) -> dict[str, Any] | None:
        """Strategy-specific state for ``status`` and reports, rebuilt from a run's records alone.

        ``told``: the validation results in the order they were told; ``parents``: each candidate's
        parents. None when the strategy has nothing to add (the default).
        """
        return None

    def start_references(self, kinds: list[str] | None) -> list[Reference]:
        """The references to evaluate first: those of ``kinds`` (None: every kind when there are several
        objectives — a front must include or dominate each source — and none for one objective) whose
        genome lies in this strategy's box, without repeating a genome."""
        if kinds is None:
            kinds = list(REFERENCE_KINDS) if self.n_objectives > 1 else []
        chosen: list[Reference] = []
        seen: set[bytes] = set()
        for reference in self.layout.references_of(kinds):
            genome = reference.genome
            if genome is None or not np.all((genome >= self.bounds[:, 0]) & (genome <= self.bounds[:, 1])):
                continue
            key = np.asarray(genome, dtype=np.float64).tobytes()
            if key not in seen:
                seen.add(key)
                chosen.append(Reference(reference.name, reference.kind, np.asarray(genome, dtype=np.float64).copy()))
        return chosen

    def worst_seen(self) -> np.ndarray | None:
        """Per objective, the worst (lowest) value told so far; None before any success."""
        return None if np.isinf(self._worst).any() else self._worst.copy()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as JSON-serializable data."""
        return encode(
            {
                "strategy": self.name,
                "format": STATE_FORMAT,
                "dimension": self.dimension,
                "n_objectives": self.n_objectives,
                "seed": self.seed,
                "settings": self.settings.model_dump(mode="json"),
                "bounds": self.bounds,
                "next_ticket": self._next_ticket,
                "outstanding": [_proposal_to_data(p) for p in self._outstanding.values()],
                "unseen": [[_proposal_to_data(p), _evaluation_to_data(e)] for p, e in self._unseen],
                "worst": self._worst,
                "impl": self._state(),
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; a checkpoint of another strategy or configuration is a one-line error."""
        state = decode(dict(state))
        expected = {
            "strategy": self.name,
            "format": STATE_FORMAT,
            "dimension": self.dimension,
            "n_objectives": self.n_objectives,
            "seed": self.seed,
            "settings": self.settings.model_dump(mode="json"),
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ConfigError(
                    f"checkpoint: {key} is {state.get(key)!r} but this run's strategy has {value!r}; "
                    "resume with the experiment the run was started with"
                )
        if not np.array_equal(state["bounds"], self.bounds):
            raise ConfigError("checkpoint: the gene bounds differ from this run's; resume with the original experiment")
        self._next_ticket = int(state["next_ticket"])
        self._outstanding = {p.ticket: p for p in map(_proposal_from_data, state["outstanding"])}
        self._unseen = [(_proposal_from_data(p), _evaluation_from_data(e)) for p, e in state.get("unseen", [])]
        self._worst = np.asarray(state["worst"], dtype=np.float64)
        self._load(state["impl"])

    @abstractmethod
    def _propose(self, ticket: int) -> Proposal:
        """The proposal for ``ticket`` (the strategy's RNG advances; nothing else is recorded here)."""

    @abstractmethod
    def _observe(self, proposal: Proposal, evaluation: Evaluation) -> None:
        """Learn from ``evaluation`` (sanitized: non-finite objectives are marked failed)."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The subclass's state (numpy arrays and scalars allowed: the base class encodes them)."""

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None:
        """Restore ``_state()`` (already decoded)."""


def _check_bounds(bounds: np.ndarray | None, dimension: int, name: str) -> np.ndarray:
    if bounds is None:
        return np.tile(np.array([0.0, 1.0]), (dimension, 1))
    array = np.asarray(bounds, dtype=np.float64)
    if array.shape != (dimension, 2) or not np.all(np.isfinite(array)) or not np.all(array[:, 0] < array[:, 1]):
        raise ConfigError(
            f"strategy {name}: bounds must be {dimension} finite (low, high) pairs with low < high, "
            f"got shape {array.shape}"
        )
    return array


def _proposal_to_data(proposal: Proposal) -> dict[str, Any]:
    return {
        "ticket": proposal.ticket,
        "genome": proposal.genome,
        "parents": list(proposal.parents),
        "info": proposal.info,
    }


def _proposal_from_data(data: Mapping[str, Any]) -> Proposal:
    return Proposal(int(data["ticket"]), data["genome"], tuple(data["parents"]), dict(data["info"]))


def _evaluation_to_data(evaluation: Evaluation) -> dict[str, Any]:
    ids = evaluation.example_ids
    return {"ticket": evaluation.ticket, "objectives": evaluation.objectives, "failed": evaluation.failed,
            "per_example": evaluation.per_example, "example_ids": None if ids is None else list(ids)}


def _evaluation_from_data(data: Mapping[str, Any]) -> Evaluation:
    ids = data["example_ids"]
    return Evaluation(int(data["ticket"]), data["objectives"], bool(data["failed"]), data["per_example"],
                      None if ids is None else tuple(ids))
