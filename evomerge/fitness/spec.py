"""The fitness spec: which lm-eval tasks score a candidate, and how.

Example (the ``fitness:`` section of an experiment)::

    include_path: fitness/            # folder(s) of lm-eval task YAML
    split: validation                 # search on validation; held-out reports use test
    limit: 200                        # a deterministic random subset of each task ...
    seed: 0                           # ... drawn with this seed (null: the first `limit` docs)
    batch_size: 32
    num_fewshot: 0
    dtype: float32
    tasks:
      - {task: arith_lang_b, metric: exact_match, weight: 2.0}
      - {task: lang_b_cloze, weight: 1.0}

Unknown keys are errors. A field that changes *what is measured* is part of ``describe()`` and so of
the cache key; ``batch_size`` and ``device`` only change how fast it is measured and are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.validation import PathText, validate

Split = Literal["validation", "test"]
DType = Literal["float32", "float16", "bfloat16"]

AGGREGATE = "fitness"
"""Name of the weighted aggregate objective; no task objective may use it."""


class TaskSpec(BaseModel):
    """One lm-eval task: its objective name, weight in the aggregate and metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, description="lm-eval task name, found in include_path")
    name: str | None = Field(default=None, description="objective name; defaults to the task name")
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    metric: str | None = Field(
        default=None,
        description="metric the task reports, optionally 'metric,filter'; defaults to its first metric",
    )
    limit: int | None = Field(default=None, ge=1, description="overrides the spec-wide limit")
    num_fewshot: int | None = Field(default=None, ge=0, description="overrides the spec-wide num_fewshot")

    @property
    def objective(self) -> str:
        return self.name or self.task


class FitnessSpec(BaseModel):
    """Everything that defines an lm-eval fitness; validated once, then frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[TaskSpec] = Field(min_length=1)
    include_path: list[PathText] = Field(min_length=1, description="folder(s) holding the task YAML")
    split: Split = "validation"
    limit: int | None = Field(default=None, ge=1, description="examples per task; null = all")
    seed: int | None = Field(default=0, description="subset seed; null = the first `limit` examples")
    batch_size: int = Field(default=32, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0, description="null = the task's own setting")
    apply_chat_template: bool = False
    device: str | None = Field(default=None, description="where the model must be; null = wherever it is")
    dtype: DType | None = Field(default=None, description="the model's dtype; null = whatever it is")

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, Path)) else value

    @field_validator("include_path")
    @classmethod
    def _strings(cls, value: list[Any]) -> list[str]:
        return [str(v) for v in value]

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError(f"expected a torch device such as cpu, cuda or cuda:1, got {value!r}") from None
        return value

    @field_validator("tasks")
    @classmethod
    def _unique_objectives(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        seen: set[str] = set()
        first_of: dict[str, TaskSpec] = {}
        for i, task in enumerate(tasks):
            first = first_of.setdefault(task.task, task)
            if (first.limit, first.num_fewshot) != (task.limit, task.num_fewshot):
                raise ValueError(
                    f"task '{task.task}' is listed twice with different limit/num_fewshot (tasks[{i}]); "
                    "one task is evaluated once, then scored by each listed metric"
                )
            name = task.objective
            if name == AGGREGATE:
                raise ValueError(
                    f"the objective name '{AGGREGATE}' (tasks[{i}]) is reserved for the weighted aggregate"
                )
            if name in seen:
                raise ValueError(f"objective '{name}' appears twice (tasks[{i}]); give one of them a distinct 'name'")
            seen.add(name)
        if sum(task.weight for task in tasks) <= 0:
            raise ValueError("at least one task needs a weight > 0")
        return tasks


def parse_fitness_spec(data: Any, source: str = "fitness") -> FitnessSpec:
    """Validate a mapping as a ``FitnessSpec``; any problem is a one-line ``ConfigError``."""
    if isinstance(data, FitnessSpec):
        return data
    return validate(FitnessSpec, data, source)
