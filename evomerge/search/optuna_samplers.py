"""Optuna samplers (TPE, NSGA-II/III, GP, CMA-ES, random) behind the ask/tell interface.

The study lives in memory and is driven with Optuna's ask-and-tell API: one ``FloatDistribution``
per gene, every objective maximized. Our run store, not Optuna's storage, is the source of truth
(Optuna's SQLite storage is far slower per trial: see ``evomerge/store/__init__.py``).

Corners first: with several objectives (or when ``references`` says so) the layout's reference
genomes — each source alone, the base, the uniform merge — are enqueued as the study's first
trials (``Study.enqueue_trial``), so the front includes or dominates every source. The queue is
rebuilt with every new study, so a restore replays them like any trial.

Checkpoint = data only: every trial's genome, values and state, and the order of the tells (how
many trials had been asked at each). A restore builds a fresh sampler from the seed and replays
that history through ``ask``/``tell`` exactly as it happened, verifying every re-asked genome bit
for bit. The sampler's hidden state — its RNG, caches such as GP's last kernel fit, the CMA-ES
sampler's optimizer (which Optuna itself keeps as a pickle in trial attributes) — is thereby
re-derived, never loaded: a checkpoint holds no pickle, so a crafted run directory cannot make
``resume`` run code through it. The price is that a restore costs what the sampler spent on its
asks so far (``benchmarks/optuna_restore.py``).

``lag: k`` tells the study a result only once k later trials have been asked, so trial t is
sampled from the results of trials before t − k (the rest are running trials, as the sampler sees
in-flight trials anyway): the same in every run, which lets a reproducible run keep k + 1 workers
busy with any sampler.

Cost: samplers re-read the whole history on every ask and Optuna handles each gene as a separate
parameter, so the per-candidate overhead grows with genes × trials (benchmarks/driver_overhead.py).
Optuna suits spaces of tens of genes; CMA-ES (sep) the large ones.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import numpy as np
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.search.base import ReferenceKind, Strategy, StrategySettings, references_field
from evomerge.search.layout import GenomeLayout
from evomerge.search.registry import register_strategy
from evomerge.search.types import Evaluation, Proposal

SAMPLERS = {
    "tpe": "TPESampler",
    "nsga2": "NSGAIISampler",
    "nsga3": "NSGAIIISampler",
    "gp": "GPSampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
}
SINGLE_OBJECTIVE = {"cmaes"}

SettingValue = bool | int | float | str | None | list[float]
CHECKPOINT_FORMAT = 2


@register_strategy("optuna")
class OptunaSearch(Strategy):
    """An Optuna sampler on an in-memory study.

    A failed candidate is told with ``failure_value`` (or else the worst values seen so far) as a
    completed trial, so the sampler learns to avoid the region; before any success it is told as
    a failed trial, which Optuna's samplers ignore.
    """

    class Settings(StrategySettings):
        sampler: Literal["tpe", "nsga2", "nsga3", "gp", "random", "cmaes"] = "tpe"
        sampler_settings: dict[str, SettingValue] = Field(
            default_factory=dict, description="keyword arguments of the Optuna sampler (not seed)"
        )
        failure_value: float | None = Field(None, allow_inf_nan=False, description="objective for a failed candidate")
        lag: int = Field(0, ge=0, le=1_000_000, description="trial t is sampled knowing the results of trials before t - lag only")
        references: list[ReferenceKind] | None = references_field()

    def __init__(self, layout: GenomeLayout | int, **kwargs: Any) -> None:
        super().__init__(layout, **kwargs)
        s = self.settings
        if s.sampler in SINGLE_OBJECTIVE and self.n_objectives > 1:
            raise ConfigError(
                f"strategy.settings.sampler: '{s.sampler}' optimizes one objective, the fitness has {self.n_objectives}"
            )
        if "seed" in s.sampler_settings:
            raise ConfigError("strategy.settings.sampler_settings.seed: set the run's seed instead")
        width = len(str(self.dimension - 1))
        self._names = [f"g{i:0{width}d}" for i in range(self.dimension)]
        optuna = _library()
        self._distributions = {
            name: optuna.distributions.FloatDistribution(float(low), float(high))
            for name, (low, high) in zip(self._names, self.bounds)
        }
        self._references = self.start_references(s.references)
        self._study = self._new_study(self._new_sampler())
        self._told: list[int] = []
        self._asked_before: list[int] = []

    def _new_sampler(self) -> Any:
        optuna = _library()
        cls = getattr(optuna.samplers, SAMPLERS[self.settings.sampler])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return cls(seed=self.seed, **self.settings.sampler_settings)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"strategy.settings.sampler_settings: {cls.__name__}: {err}") from None

    def _new_study(self, sampler: Any) -> Any:
        """A study whose first trials are the references (see the module docstring)."""
        optuna = _library()
        study = optuna.create_study(sampler=sampler, directions=["maximize"] * self.n_objectives)
        for reference in self._references:
            study.enqueue_trial({name: float(v) for name, v in zip(self._names, reference.genome)})
        return study

    def determined(self) -> bool:
        """The random sampler ignores results; every other one may read all the study's trials, so
        trial t is fixed once every trial before t − lag is told (those after it are running)."""
        return self.settings.sampler == "random" or super().determined()

    def _horizon(self) -> int:
        return self._next_ticket - self.settings.lag

    def _propose(self, ticket: int) -> Proposal:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _library().exceptions.ExperimentalWarning)
            trial = self._study.ask(self._distributions)
        if trial.number != ticket:
            raise RuntimeError(f"optuna trial number {trial.number} does not match ticket {ticket}")
        params = trial.params
        genome = np.array([params[name] for name in self._names], dtype=np.float64)
        if ticket < len(self._references):
            reference = self._references[ticket]
            if genome.tobytes() != reference.genome.tobytes():
                raise RuntimeError(f"optuna trial {ticket} is not the enqueued reference {reference.name}")
            return Proposal(ticket, genome, info={"reference": reference.name})
        return Proposal(ticket, genome)

    def _observe(self, proposal: Proposal, evaluation: Evaluation) -> None:
        values = evaluation.objectives if not evaluation.failed else self._penalty()
        self._tell(proposal.ticket, None if values is None else [float(v) for v in values])
        self._told.append(proposal.ticket)
        self._asked_before.append(self._next_ticket)

    def _tell(self, ticket: int, values: list[float] | None) -> None:
        """A completed trial with ``values``, or a failed one (None), as Optuna's samplers see it."""
        optuna = _library()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if values is None:
                self._study.tell(ticket, state=optuna.trial.TrialState.FAIL)
            else:
                self._study.tell(ticket, values=values)

    def _penalty(self) -> np.ndarray | None:
        if self.settings.failure_value is not None:
            return np.full(self.n_objectives, self.settings.failure_value)
        return self.worst_seen()

    def _state(self) -> dict[str, Any]:
        trials = [t for t in self._study.get_trials(deepcopy=False) if t.number < self._next_ticket]  # not enqueued ones
        params = np.array([[t.params[name] for name in self._names] for t in trials], dtype=np.float64)
        values = np.full((len(trials), self.n_objectives), np.nan)
        for i, t in enumerate(trials):
            if t.values is not None:
                values[i] = t.values
        return {
            "format": CHECKPOINT_FORMAT,
            "params": params.reshape(len(trials), self.dimension),
            "values": values,
            "failed": [t.state.name == "FAIL" for t in trials],
            "told": list(self._told),
            "asked_before": list(self._asked_before),
        }

    def _load(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                "checkpoint: an Optuna sampler saved by an older evomerge (as a pickle, which is never loaded "
                "because unpickling runs code); finish the run with the evomerge that started it"
            )
        params, values, failed = state["params"], state["values"], state["failed"]
        self._study = self._new_study(self._new_sampler())
        self._told, self._asked_before = [], []
        asked = 0
        for ticket, before in zip(state["told"], state["asked_before"]):
            for number in range(asked, int(before)):
                self._reask(number, params[number])
            asked = max(asked, int(before))
            self._tell(int(ticket), None if failed[ticket] else [float(v) for v in values[ticket]])
            self._told.append(int(ticket))
            self._asked_before.append(int(before))
        for number in range(asked, len(params)):
            self._reask(number, params[number])

    def _reask(self, number: int, genome: np.ndarray) -> None:
        """Ask trial ``number`` again while restoring; it must propose ``genome`` bit for bit."""
        again = self._propose(number).genome
        if again.tobytes() != np.asarray(genome, dtype=np.float64).tobytes():
            raise ConfigError(
                f"checkpoint: the Optuna sampler re-proposed trial {number} differently from the checkpoint; "
                "the strategy settings or the Optuna version changed since the run started"
            )


@functools.cache
def _library() -> Any:
    """``optuna``, imported on first use with its per-trial INFO logging silenced (the driver logs)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna
