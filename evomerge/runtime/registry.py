"""The executor registry: a new executor is one module and one decorator, like a strategy.

    @register_executor("slurm")
    class SlurmExecutor(Executor):
        class Settings(ExecutorSettings):
            partition: str = "gpu"

        @classmethod
        def start(cls, spec: WorkerSpec, settings: Settings) -> SlurmExecutor: ...

An experiment's ``executor:`` block is validated against the ``Settings`` of the executor its
``kind`` names. Every executor's settings extend ``ExecutorSettings``, the settings all executors
share (where and how each worker merges: device, dtype, threads, placement, cache memory), so a
setting common to every executor is one field there. A key that belongs to another executor, or to
none, is a one-line error naming it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import ConfigError
from evomerge.sizes import parse_size
from evomerge.validation import describe_validation_error

if TYPE_CHECKING:
    from evomerge.runtime.base import Executor

Placement = Literal["auto", "resident", "compact", "streamed"]
PLACEMENTS: tuple[str, ...] = ("resident", "compact", "streamed")


class ExecutorSettings(BaseModel):
    """Settings every executor has: how each of its workers holds the models and merges.

    ``placement``: where the source models live (``evomerge plan`` explains the choice) —
    ``resident``: float32 on the device (no conversion per candidate; 4 bytes per parameter per
    model); ``compact``: their stored dtype on the device, converted per tensor; ``streamed``:
    their stored dtype in host memory (pinned on CUDA), copied to the device tensor by tensor.
    ``auto`` takes the first of these that fits. ``cache_memory`` bounds the operators' per-tensor
    caches (task vectors, sorted magnitudes, random keys): ``auto`` = what the device has left.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(default="local", description="the registered executor: local, ray, ...")
    device: str = Field(default="cpu", description="torch device of each worker's model")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    threads: int | None = Field(default=None, ge=1, le=1024, description="torch intra-op threads; null = torch's default")
    reproducible: bool = Field(
        default=False,
        description="results told in ticket order, proposals only once determined: any number of workers gives the local run",
    )
    placement: Placement = Field(default="auto", description="auto, resident, compact or streamed")
    cache_memory: str | int = Field(default="auto", description="'auto' or a size such as 20GB (0: no caches)")

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"expected a torch device such as cpu, cuda or cuda:1, got {value!r}") from None
        return value

    @field_validator("cache_memory")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        if value == "auto":
            return value
        try:
            parse_size(value)
        except ValueError as err:
            raise ValueError(f"expected 'auto' or {str(err).removeprefix('expected ')}") from None
        return value

    @property
    def cache_bytes(self) -> int | None:
        """The cache budget in bytes; None for ``auto``."""
        return None if self.cache_memory == "auto" else parse_size(self.cache_memory)


E = TypeVar("E", bound="type[Executor]")

EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(name: str) -> Callable[[E], E]:
    """Register an ``Executor`` subclass under ``name`` (sets its ``name``; its ``Settings`` must
    extend ``ExecutorSettings``)."""

    def wrap(cls: E) -> E:
        if name in EXECUTORS:
            raise ValueError(f"executor '{name}' is registered twice")
        if not issubclass(cls.Settings, ExecutorSettings):
            raise TypeError(f"executor '{name}': Settings must extend ExecutorSettings")
        cls.name = name
        EXECUTORS[name] = cls
        return cls

    return wrap


def get_executor(name: str, where: str = "executor.kind") -> type[Executor]:
    """The executor class registered as ``name``, or a one-line error with a did-you-mean."""
    if name not in EXECUTORS:
        hint = difflib.get_close_matches(str(name), list(EXECUTORS), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{where}: unknown executor '{name}'{suggestion}; known: {', '.join(sorted(EXECUTORS))}")
    return EXECUTORS[name]


def parse_executor(data: Mapping[str, Any] | ExecutorSettings | None, source: str) -> ExecutorSettings:
    """The ``executor:`` block as the ``Settings`` of the executor its ``kind`` names (default local)."""
    if isinstance(data, ExecutorSettings):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: executor: expected a mapping, got {type(data).__name__}")
    kind = data.get("kind", "local")
    if not isinstance(kind, str):
        raise ConfigError(f"{source}: executor.kind: expected the name of an executor, got {kind!r}")
    settings = get_executor(kind, f"{source}: executor.kind").Settings
    fields = list(settings.model_fields)
    for key in data:
        if key in fields:
            continue
        owners = [name for name, cls in sorted(EXECUTORS.items()) if key in cls.Settings.model_fields]
        if owners:
            names = " and ".join(f"'{owner}'" for owner in owners)
            raise ConfigError(f"{source}: executor.{key}: a setting of executor {names}, not of '{kind}' (the executor's kind)")
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: executor.{key}: unknown key{hint}; expected one of: {', '.join(fields)}")
    try:
        return settings.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(f"{source}: executor.{describe_validation_error(err, settings)}") from None


def with_kind(settings: ExecutorSettings, kind: str, **updates: Any) -> ExecutorSettings:
    """``settings`` moved to executor ``kind`` (every setting that kind has kept), with ``updates`` applied."""
    target = get_executor(kind).Settings
    kept = settings.model_dump(include=set(target.model_fields), exclude_unset=False)
    return parse_executor({**kept, "kind": kind, **updates}, "executor")
