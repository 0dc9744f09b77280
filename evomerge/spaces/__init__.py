"""Search spaces (registered by ``kind``): what a strategy's proposals stand for, as recipes."""

from pathlib import Path

from evomerge.spaces import dataflow as _dataflow  # noqa: F401  (registers "dataflow")
from evomerge.spaces import parameter as _parameter  # noqa: F401  (registers "parameter")
from evomerge.spaces import split_point as _split_point  # noqa: F401  (registers "split_point")
from evomerge.spaces.base import (
    SPACES,
    PoolInfo,
    SearchSpace,
    build_space,
    register_space,
    space_blueprint,
)
from evomerge.validation import read_yaml


def load_space(path: str | Path, pool: PoolInfo) -> SearchSpace:
    """Build the search space defined in a YAML file (under ``search_spaces/``)."""
    return build_space(read_yaml(path), pool, str(path))


__all__ = ["SPACES", "PoolInfo", "SearchSpace", "build_space", "load_space", "register_space", "space_blueprint"]
