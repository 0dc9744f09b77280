"""Optuna samplers (TPE, NSGA-II/III, GP, CMA-ES, random) behind the ask/tell interface.

The study lives in memory and is driven with Optuna's ask-and-tell API: one ``FloatDistribution``
per gene, every objective maximized. Our run store, not Optuna's storage, is the source of truth
(Optuna's SQLite storage measured 0.1 s per trial at 10 genes and 5-13 s at 968 here).

Checkpoint = the trial history (params, values, states, system attributes, which the genetic
samplers use for generations and parent caches) + the study's system attributes + the sampler
object. The sampler is kept as a pickle because Optuna exposes neither its RNG state nor its
warm-start caches (GP keeps the last fitted kernel parameters), and without them a restored
sampler would propose different points than an uninterrupted one. Restore re-adds the trials with
``study.add_trial(create_trial(...))`` in trial-number order, so ticket = trial number survives.

Cost: samplers re-read the whole history on every ask and Optuna handles each gene as a separate
parameter, so the per-candidate overhead grows with genes × trials (benchmarks/driver_overhead.py):
TPE took 0.3-0.5 s per candidate at 968 genes, and 17 → 62 ms at 20 genes as the history grew
from 100 to 1,000 trials. Optuna suits spaces of tens of genes; CMA-ES (sep) the large ones.
Restoring a checkpoint re-adds every trial, also O(genes × trials).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import numpy as np
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.search.layout import GenomeLayout
from evomerge.search.base import Strategy, StrategySettings
from evomerge.search.registry import register_strategy
from evomerge.search.serialize import decode_pickle, encode_pickle
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
        self._study = self._new_study(self._new_sampler())

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
        optuna = _library()
        return optuna.create_study(sampler=sampler, directions=["maximize"] * self.n_objectives)

    def _propose(self, ticket: int) -> Proposal:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _library().exceptions.ExperimentalWarning)
            trial = self._study.ask(self._distributions)
        if trial.number != ticket:
            raise RuntimeError(f"optuna trial number {trial.number} does not match ticket {ticket}")
        params = trial.params
        return Proposal(ticket, np.array([params[name] for name in self._names], dtype=np.float64))

    def _observe(self, proposal: Proposal, evaluation: Evaluation) -> None:
        optuna = _library()
        values = evaluation.objectives if not evaluation.failed else self._penalty()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if values is None:
                self._study.tell(proposal.ticket, state=optuna.trial.TrialState.FAIL)
            else:
                self._study.tell(proposal.ticket, values=[float(v) for v in values])

    def _penalty(self) -> np.ndarray | None:
        if self.settings.failure_value is not None:
            return np.full(self.n_objectives, self.settings.failure_value)
        return self.worst_seen()

    def _state(self) -> dict[str, Any]:
        trials = self._study.get_trials(deepcopy=False)
        params = np.array([[t.params[name] for name in self._names] for t in trials], dtype=np.float64)
        values = np.full((len(trials), self.n_objectives), np.nan)
        for i, t in enumerate(trials):
            if t.values is not None:
                values[i] = t.values
        storage = self._study._storage
        return {
            "params": params.reshape(len(trials), self.dimension),
            "values": values,
            "states": [t.state.name for t in trials],
            "system_attrs": [t.system_attrs for t in trials],
            "study_system_attrs": storage.get_study_system_attrs(self._study._study_id),
            "sampler": encode_pickle(self._study.sampler),
        }

    def _load(self, state: dict[str, Any]) -> None:
        optuna = _library()
        study = self._new_study(decode_pickle(state["sampler"]))
        for key, value in state["study_system_attrs"].items():
            study._storage.set_study_system_attr(study._study_id, key, value)
        for row, values, name, attrs in zip(state["params"], state["values"], state["states"], state["system_attrs"]):
            trial_state = optuna.trial.TrialState[name]
            study.add_trial(
                optuna.trial.create_trial(
                    state=trial_state,
                    params={n: float(v) for n, v in zip(self._names, row)},
                    distributions=self._distributions,
                    values=[float(v) for v in values] if trial_state == optuna.trial.TrialState.COMPLETE else None,
                    system_attrs=attrs,
                )
            )
        self._study = study


@functools.cache
def _library() -> Any:
    """``optuna``, imported on first use with its per-trial INFO logging silenced (the driver logs)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna
