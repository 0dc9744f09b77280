"""Exact, JSON-safe encoding of strategy state.

A checkpoint must restore a strategy *bit for bit*: a resumed run re-asks the proposals recorded
after the checkpoint and compares them with the stored genomes exactly. Hence arrays are encoded as
base64 of their raw little-endian bytes (with dtype and shape) rather than as lists of floats: it is
exact for every value including NaN and ±inf (which JSON cannot represent), about 2.5× smaller,
and an order of magnitude faster to encode than a float list for a 1,000-gene covariance. Numpy
scalars keep their dtype and non-finite Python floats get a tagged form, so ``decode(encode(x))``
reproduces ``x`` exactly and ``json.dumps(encode(x), allow_nan=False)`` always succeeds.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

_ARRAY = "__ndarray__"
_SCALAR = "__npscalar__"
_FLOAT = "__float__"


def encode(value: Any) -> Any:
    """``value`` as JSON-safe data (dicts with str keys, lists, str, int, finite float, bool, None)."""
    if value is None or isinstance(value, (bool, str, int)) and not isinstance(value, np.generic):
        return value
    if isinstance(value, np.ndarray):
        array = _little_endian(value)
        return {_ARRAY: _b64(array), "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, np.generic):
        array = _little_endian(np.asarray(value))
        return {_SCALAR: _b64(array), "dtype": array.dtype.str}
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings, got {key!r}")
            out[key] = encode(item)
        return out
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    raise TypeError(f"cannot encode {type(value).__name__} in a strategy state")


def decode(data: Any) -> Any:
    """The inverse of ``encode``."""
    if isinstance(data, list):
        return [decode(item) for item in data]
    if not isinstance(data, dict):
        return data
    if _ARRAY in data:
        raw = base64.b64decode(data[_ARRAY])
        return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()
    if _SCALAR in data:
        return np.frombuffer(base64.b64decode(data[_SCALAR]), dtype=np.dtype(data["dtype"]))[0]
    if _FLOAT in data:
        return float(data[_FLOAT])
    return {key: decode(item) for key, item in data.items()}


def _little_endian(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


def random_state_to_dict(rng: np.random.RandomState) -> dict[str, Any]:
    """A legacy ``RandomState``'s full state (key, position, cached Gaussian) as encodable data."""
    return dict(rng.get_state(legacy=False))


def random_state_from_dict(state: Mapping[str, Any]) -> np.random.RandomState:
    rng = np.random.RandomState()
    rng.set_state(dict(state))
    return rng
