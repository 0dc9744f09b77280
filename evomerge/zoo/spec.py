"""The zoo spec: a user-editable YAML of sizes, skills, steps, learning rates and seeds.

Validated by pydantic with unknown keys rejected; any mistake becomes a one-line ``ConfigError``
naming the field. ``spec_hash`` fingerprints the validated spec together with ``ZOO_FORMAT`` (bumped
whenever the generators or training code change what a spec produces), and is the zoo cache key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.validation import read_yaml
from evomerge.zoo.corpus import MIXTURE_SOURCES, TEXT_SOURCES
from evomerge.zoo.tasks import TASK_NAMES

ZOO_FORMAT = 2
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_SEED = 2**32 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Llama size and the language-aligned embedding construction."""

    layers: int = Field(6, ge=1, le=32)
    hidden: int = Field(128, ge=8, le=1024)
    heads: int = Field(4, ge=1, le=64)
    ffn: int = Field(512, ge=8, le=8192)
    max_positions: int = Field(64, ge=32, le=4096)
    embed_std: float = Field(0.1, gt=0, allow_inf_nan=False)
    offset_norm: float = Field(0.5, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelSpec:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


class TrainSpec(_Strict):
    """Optimisation settings of one training run."""

    steps: int = Field(ge=1, le=10_000_000)
    lr: float = Field(gt=0, le=1)
    batch_size: int = Field(64, ge=1, le=65_536)
    warmup: int = Field(50, ge=1, le=10_000_000)
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)


class BaseSpec(TrainSpec):
    """The base model's pretraining run and its data mixture (source name -> sampling weight)."""

    mixture: dict[str, float]
    codeswitch_prob: float = Field(0.35, ge=0, le=1)

    @field_validator("mixture")
    @classmethod
    def _known_sources(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in v.items():
            if k not in MIXTURE_SOURCES:
                raise ValueError(f"unknown source {k!r}; expected one of {', '.join(TEXT_SOURCES)} or a task name "
                                 f"({', '.join(TASK_NAMES)})")
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"weight of {k!r} must be a number >= 0, got {w}")
        if not any(w > 0 for w in v.values()):
            raise ValueError("needs at least one source with a positive weight")
        return v


class ExpertSpec(TrainSpec):
    """An expert fine-tuned from the base on ``tasks``, with a ``replay`` share of the base mixture."""

    name: str
    tasks: list[str] = Field(min_length=1)
    replay: float = Field(0.5, ge=0, lt=1)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not _NAME.match(v) or v == "base":
            raise ValueError(f"expected a lowercase folder name other than 'base' ([a-z][a-z0-9_]*), got {v!r}")
        return v

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        return [_check_task(t) for t in v]


class EvalSpec(_Strict):
    """Which tasks every model is scored on, and the held-out set sizes."""

    tasks: list[str] = Field(min_length=1)
    n_validation: int = Field(300, ge=1, le=100_000)
    n_test: int = Field(500, ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        return [_check_task(t) for t in v]


class SettingSpec(_Strict):
    """A merge setting: which experts are merged, and what the merge is scored on."""

    name: str
    description: str = ""
    experts: list[str] = Field(min_length=2)
    tasks: list[str] = Field(min_length=1)
    target: str | None = None

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        return [_check_task(t) for t in v]


class ZooSpec(_Strict):
    """The whole zoo: one base, its experts, the evaluation and the merge settings."""

    seed: int = Field(0, ge=0, le=MAX_SEED)
    threads: int = Field(2, ge=1, le=256)
    workers: int = Field(
        1, ge=1, le=64,
        description="processes that fine-tune the experts side by side once the base is trained (each with "
        "`threads` threads); the weights do not depend on it, so it is not part of the spec's hash",
    )
    kernels: Literal["portable", "native"] = Field(
        "portable",
        description="portable: train in a child process on float kernels every x86-64 CPU has, so the weights "
        "are the same on every machine; native: this process's fastest kernels (weights vary with the CPU)",
    )
    max_operand: int = Field(99, ge=9, le=9999)
    model: ModelSpec = ModelSpec()
    base: BaseSpec
    experts: list[ExpertSpec] = Field(min_length=1)
    eval: EvalSpec
    settings: list[SettingSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_refs(self) -> ZooSpec:
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique, repeated: {', '.join(dupes)}")
        for s in self.settings:
            for e in s.experts:
                if e not in names:
                    raise ValueError(f"setting {s.name!r} names unknown expert {e!r}; experts: {', '.join(names)}")
            for t in [*s.tasks, *([s.target] if s.target else [])]:
                if t not in self.eval.tasks:
                    raise ValueError(f"setting {s.name!r} uses task {t!r}, which is not in eval.tasks")
        return self


def _check_task(name: str) -> str:
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    return name


def _one_line(err: ValidationError, source: str) -> ConfigError:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    where = f"{loc}: " if loc else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return ConfigError(f"{source}: {where}{msg}")


def parse_spec(data: Any, source: str = "zoo spec") -> ZooSpec:
    """Validate a spec given as a mapping; raise a one-line ``ConfigError`` on the first problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ZooSpec.model_validate(data)
    except ValidationError as err:
        raise _one_line(err, source) from None


def load_spec(path: str | Path) -> ZooSpec:
    """Read and validate a zoo spec YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: zoo spec file not found")
    return parse_spec(read_yaml(p), str(p))


def spec_hash(spec: ZooSpec) -> str:
    """The cache key of a spec: a hash of its canonical JSON and the zoo format version."""
    canon = json.dumps({"format": ZOO_FORMAT, "spec": spec.model_dump(mode="json", exclude={"workers"})}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]
