"""A plain Python function as the fitness (non-LLM experiments, tests, custom scorers).

``fn(model, tokenizer)`` returns either a mapping ``{objective: value}`` or a pair
``(objectives, per_example)`` where ``per_example[objective]`` is a sequence of scores (doc id =
position) or a mapping ``{doc_id: score}``. The result has the same shape as lm-eval's; its timings
hold only ``total``, since the function's forward passes are not visible from here.

The fitness is identified (for the fitness cache and ``resume``'s check) by the function's name,
the SHA-256 of the *whole file* of the module that defines it — so a constant or helper in that
file counts — and an optional ``version`` string. Helpers imported from other modules are the
user's responsibility: bump ``version`` when they change what the function measures.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.fitness.base import Fitness
from evomerge.fitness.racing import Bar
from evomerge.fitness.result import Direction, ExampleScores, FitnessResult, finalize

FitnessFn = Callable[[Any, Any], Any]


class CallableFitness(Fitness):
    """Wraps ``fn``; objectives are maximized and weighted 1 unless told otherwise."""

    def __init__(
        self,
        fn: FitnessFn,
        *,
        weights: Mapping[str, float] | None = None,
        directions: Mapping[str, Direction] | None = None,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"fitness: expected a callable fn(model, tokenizer), got {type(fn).__name__}")
        for objective, direction in (directions or {}).items():
            if direction not in ("maximize", "minimize"):
                raise ConfigError(f"fitness.directions.{objective}: expected maximize or minimize, got {direction!r}")
        for objective, weight in (weights or {}).items():
            is_number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not is_number or not weight >= 0 or math.isinf(weight):
                raise ConfigError(f"fitness.weights.{objective}: expected a finite number >= 0, got {weight!r}")
        self._fn = fn
        self._weights = dict(weights) if weights is not None else None
        self._directions = dict(directions or {})
        self._name = name or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        self._module_sha = _module_digest(fn)
        self._version = version

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "callable",
            "name": self._name,
            "module_sha256": self._module_sha,
            "version": self._version,
            "weights": self._weights,
            "directions": self._directions,
        }

    def evaluate(self, model: Any, tokenizer: Any, bar: Bar | None = None) -> FitnessResult:
        """Calls ``fn`` once; a function's scores arrive all at once, so ``bar`` cannot stop it early."""
        start = time.perf_counter()
        output = self._fn(model, tokenizer)
        elapsed = time.perf_counter() - start
        objectives, raw_examples = _split_output(output, self._name)
        unknown = (set(self._weights or {}) | set(self._directions)) - set(objectives)
        if unknown:
            raise ConfigError(
                f"fitness {self._name}: weights/directions name {sorted(unknown)} but fn returned {sorted(objectives)}"
            )
        directions: dict[str, Direction] = {k: self._directions.get(k, "maximize") for k in objectives}
        weights = self._weights if self._weights is not None else {k: 1.0 for k in objectives}
        per_example = {
            k: _example_scores(v, f"fitness {self._name}: per-example '{k}'") for k, v in raw_examples.items()
        }
        return finalize(
            objectives,
            directions,
            weights,
            per_example,
            timings={"total": elapsed},
            n_examples={k: len(v.scores) for k, v in per_example.items()},
        )


def _split_output(output: Any, where: str) -> tuple[dict[str, float], Mapping[str, Any]]:
    if isinstance(output, tuple) and len(output) == 2:
        objectives, examples = output
    else:
        objectives, examples = output, {}
    if not isinstance(objectives, Mapping) or not objectives:
        got = type(objectives).__name__
        raise ConfigError(f"fitness {where}: fn must return a non-empty mapping of objectives, got {got}")
    if not isinstance(examples, Mapping):
        raise ConfigError(f"fitness {where}: per-example scores must be a mapping, got {type(examples).__name__}")
    values: dict[str, float] = {}
    for key, value in objectives.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"fitness {where}: objective {key!r} must map a name to a number, got {value!r}")
        values[key] = float(value)
    return values, examples


def _example_scores(raw: Sequence[float] | Mapping[int, float], where: str) -> ExampleScores:
    pairs = sorted(raw.items()) if isinstance(raw, Mapping) else list(enumerate(raw))
    try:
        return ExampleScores(tuple(int(i) for i, _ in pairs), tuple(float(s) for _, s in pairs))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: expected numbers keyed by distinct doc ids ({err})") from None


def _module_digest(fn: FitnessFn) -> str:
    """SHA-256 of the file of the module defining ``fn`` (its own source if it has no file)."""
    target = fn.__func__ if inspect.ismethod(fn) else fn
    if not inspect.isfunction(target):
        target = getattr(type(fn), "__call__", None)
    filename = (getattr(target, "__globals__", None) or {}).get("__file__")
    if isinstance(filename, str) and Path(filename).is_file():
        return hashlib.sha256(Path(filename).read_bytes()).hexdigest()
    try:
        source = inspect.getsource(target if target is not None else fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        source = repr(code.co_code + repr(code.co_consts).encode()) if code is not None else repr(fn)
    return hashlib.sha256(source.encode()).hexdigest()


def load_callable(reference: str, where: str = "fitness.python") -> tuple[Callable[..., Any], str]:
    """Import ``module:function`` or ``/path/file.py:function``; returns it and a path-free name."""
    module_name, function = reference.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"{where}: file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"evomerge_fitness_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as err:
            text = str(err).strip().splitlines()
            raise ConfigError(f"{where}: importing {path} failed: {type(err).__name__}" + (f": {text[0]}" if text else "")) from None
        name = f"{path.name}:{function}"
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"{where}: cannot import module '{module_name}' ({err})") from None
        name = reference
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"{where}: '{function}' is not a function of {module_name}")
    return fn, name
