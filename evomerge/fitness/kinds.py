"""Fitness kinds, registered by name like strategies and executors: a new kind is one file.

    @register_fitness("my_scorer", marker="my_scorer")
    class MyScorer(FitnessKind):
        class Settings(BaseModel):          # the experiment's fitness: block (extra keys forbidden)
            my_scorer: str
        @classmethod
        def build(cls, settings, where): ...   # -> a Fitness

An experiment's ``fitness:`` block names its kind with ``kind:``; without it, the kind whose
``marker`` key the block holds (``python`` for a Python callable), else ``lm_eval``. ``workloads``
tells ``evomerge plan`` what an evaluation asks of memory.
"""

from __future__ import annotations

import difflib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import ConfigError
from evomerge.fitness.spec import FitnessSpec
from evomerge.fitness.workload import Workload
from evomerge.validation import describe_validation_error, path_text

DEFAULT_KIND = "lm_eval"
FitnessConfig = BaseModel
"""A parsed ``fitness:`` block: the ``Settings`` of a registered kind."""
_PYTHON_REF = re.compile(r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$")


class FitnessKind(ABC):
    """A registered kind of fitness: its settings model, how to build it, what it asks of memory."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel]]
    marker: ClassVar[str | None] = None
    """A key whose presence in a ``fitness:`` block without ``kind`` selects this kind."""

    @classmethod
    @abstractmethod
    def build(cls, settings: Any, where: str) -> Any:
        """The ``Fitness`` the settings describe (``where`` prefixes one-line errors)."""

    @classmethod
    def workloads(cls, settings: Any, tokenizer: Any) -> list[Workload]:
        """The largest batches an evaluation runs (``tokenizer`` may be None); [] = weights only."""
        return []

    @classmethod
    def dump(cls, settings: Any) -> dict[str, Any]:
        """The settings as JSON-ready data, with ``kind`` (snapshotted into run directories)."""
        return {"kind": cls.name, **settings.model_dump(mode="json")}


K = TypeVar("K", bound=type[FitnessKind])

FITNESS_KINDS: dict[str, type[FitnessKind]] = {}


def register_fitness(name: str, *, marker: str | None = None) -> Callable[[K], K]:
    """Register a ``FitnessKind`` under ``name``; ``marker`` is the key that implies it."""

    def wrap(cls: K) -> K:
        if name in FITNESS_KINDS:
            raise ValueError(f"fitness kind '{name}' is registered twice")
        cls.name = name
        cls.marker = marker
        FITNESS_KINDS[name] = cls
        return cls

    return wrap


def fitness_kind(settings: Any) -> type[FitnessKind]:
    """The registered kind whose settings ``settings`` are."""
    for kind in FITNESS_KINDS.values():
        if isinstance(settings, kind.Settings):
            return kind
    raise TypeError(f"no fitness kind has settings of type {type(settings).__name__}")


def parse_fitness(data: Any, source: str, field: str = "fitness") -> Any:
    """A ``fitness:`` mapping validated as the settings of its kind; one-line errors naming the field."""
    if isinstance(data, BaseModel):
        fitness_kind(data)
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {field}: expected a mapping")
    data = dict(data)
    name = data.pop("kind", None)
    if name is None:
        name = _implied_kind(data)
    if name not in FITNESS_KINDS:
        hint = difflib.get_close_matches(str(name), list(FITNESS_KINDS), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{source}: {field}.kind: unknown fitness kind '{name}'{suggestion}; known: {', '.join(sorted(FITNESS_KINDS))}")
    model = FITNESS_KINDS[name].Settings
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {field}.{describe_validation_error(err, model)}") from None


def _implied_kind(data: Mapping[str, Any]) -> str:
    """The kind a block without ``kind`` means: the one whose marker key it holds, else the default."""
    return next((kind.name for kind in FITNESS_KINDS.values() if kind.marker and kind.marker in data), DEFAULT_KIND)


def build_fitness(settings: Any, where: str = "fitness") -> Any:
    """The ``Fitness`` of parsed settings of any registered kind."""
    return fitness_kind(settings).build(settings, where)


def dump_fitness(settings: Any) -> dict[str, Any]:
    """The settings as data ``parse_fitness`` reads back; ``kind`` only when the keys do not imply it."""
    data = fitness_kind(settings).dump(settings)
    if _implied_kind(data) == data["kind"]:
        del data["kind"]
    return data


@register_fitness("lm_eval")
class LmEvalKind(FitnessKind):
    """lm-eval tasks scored on the resident model (``evomerge.fitness.lm_eval_fitness``)."""

    Settings = FitnessSpec

    @classmethod
    def build(cls, settings: FitnessSpec, where: str) -> Any:
        from evomerge.fitness.lm_eval_fitness import LmEvalFitness

        return LmEvalFitness(settings)

    @classmethod
    def workloads(cls, settings: FitnessSpec, tokenizer: Any) -> list[Workload]:
        from evomerge.fitness.workload import lm_eval_workloads

        return lm_eval_workloads(settings, tokenizer)


class CallableFitnessConfig(BaseModel):
    """A Python function ``fn(model, tokenizer)`` as the fitness (tests, non-LLM scorers).

    It is identified by its name, its module file's content and ``version``: bump ``version`` when
    a helper it imports from another module changes what it measures. ``workload``: the largest
    batch the function runs, for ``evomerge plan`` (without it the plan counts the weights only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    python: str = Field(description="'package.module:function' or 'path/to/file.py:function'")
    weights: dict[str, float] | None = None
    directions: dict[str, Literal["maximize", "minimize"]] | None = None
    version: str | None = Field(default=None, description="your version of the function and what it imports")
    workload: Workload | None = Field(default=None, description="the largest batch the function runs (for the plan)")

    @field_validator("python")
    @classmethod
    def _reference(cls, value: str) -> str:
        if not _PYTHON_REF.match(value):
            raise ValueError(f"expected 'module:function' or 'file.py:function', got {value!r}")
        path_text(value.rsplit(":", 1)[0])
        return value


@register_fitness("python", marker="python")
class PythonKind(FitnessKind):
    """A Python callable (``evomerge.fitness.callable_fitness``)."""

    Settings = CallableFitnessConfig

    @classmethod
    def build(cls, settings: CallableFitnessConfig, where: str) -> Any:
        from evomerge.fitness.callable_fitness import CallableFitness, load_callable

        fn, name = load_callable(settings.python, f"{where}.python")
        return CallableFitness(fn, weights=settings.weights, directions=settings.directions, name=name, version=settings.version)

    @classmethod
    def workloads(cls, settings: CallableFitnessConfig, tokenizer: Any) -> list[Workload]:
        return [settings.workload] if settings.workload is not None else []

    @classmethod
    def dump(cls, settings: CallableFitnessConfig) -> dict[str, Any]:
        return {"kind": cls.name, **settings.model_dump(mode="json", exclude_none=True)}
