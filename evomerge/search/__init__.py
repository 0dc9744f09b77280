"""Search strategies behind one ask/tell interface, registered by name.

``build_strategy("cmaes", layout, n_objectives=1, seed=0, settings={...})`` makes one (``layout``: the
space's ``GenomeLayout``, or a number of genes for a plain box); every
strategy is seeded, asynchronous (ask ahead, tell in any order) and exactly checkpointable
(``state_dict`` / ``load_state_dict`` / ``replay``). Third-party libraries (cmaes, optuna) are
imported on first use so that reading a run store stays fast.
"""

from evomerge.search import cma_es as _cma_es  # noqa: F401  (registers "cmaes")
from evomerge.search import map_surrogate as _map_surrogate  # noqa: F401  (registers "map")
from evomerge.search import natural_niches as _natural_niches  # noqa: F401  (registers "natural_niches")
from evomerge.search import optuna_samplers as _optuna_samplers  # noqa: F401  (registers "optuna")
from evomerge.search import random_search as _random_search  # noqa: F401  (registers "random")
from evomerge.search.base import Strategy, StrategySettings
from evomerge.search.registry import (
    STRATEGIES,
    build_strategy,
    get_strategy,
    register_strategy,
)
from evomerge.search.types import Evaluation, Proposal

__all__ = [
    "STRATEGIES",
    "Evaluation",
    "Proposal",
    "Strategy",
    "StrategySettings",
    "build_strategy",
    "get_strategy",
    "register_strategy",
]
