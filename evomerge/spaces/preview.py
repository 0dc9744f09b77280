"""The search space of an experiment, and genomes given on the command line (``evomerge space``)."""

from __future__ import annotations

import numpy as np

from evomerge.errors import ConfigError
from evomerge.experiment import Experiment
from evomerge.spaces.base import PoolInfo, SearchSpace, build_space


def experiment_space(experiment: Experiment) -> SearchSpace:
    """The experiment's space over its pool (the pool is opened for its headers: layers and tensors)."""
    from evomerge.pool import ModelPool

    with ModelPool.open(experiment.models, experiment.base) as pool:
        pool_info = PoolInfo(experiment.models, experiment.base, pool.layer_map.num_layers, pool.parameter_order())
    return build_space(experiment.search_space, pool_info, f"{experiment.source}: search_space")


def parse_genome(text: str, space: SearchSpace, seed: int = 0) -> np.ndarray:
    """``init`` (the space's starting point), ``random`` (seeded, uniform in the box) or d numbers in [0, 1]."""
    if text == "init":
        return space.initial_genome()
    if text == "random":
        return np.random.default_rng(seed).random(space.dimension)
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--genome: expected 'init', 'random' or {space.dimension} numbers in [0, 1], got '{text}'") from None
    genome = np.asarray(values)
    if genome.shape != (space.dimension,) or not np.all((genome >= 0) & (genome <= 1)):
        raise ConfigError(f"--genome: expected {space.dimension} numbers in [0, 1], got {len(values)} value(s) '{text}'")
    return genome
