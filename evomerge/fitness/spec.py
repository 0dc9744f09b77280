"""The fitness spec: which lm-eval tasks score a candidate, and how.

Example (the ``fitness:`` section of an experiment)::

    include_path: fitness/            # folder(s) of lm-eval task YAML (optional: lm-eval's own tasks
                                      # by name, e.g. gsm8k, arc_easy or the group mmlu, are found too)
    split: validation                 # search on validation; held-out reports use test
    limit: 200                        # a deterministic random subset of each task ...
    seed: 0                           # ... drawn with this seed (null: the first `limit` docs)
    batch_size: 32
    num_fewshot: 0                    # as lm-eval's --num_fewshot (a task whose YAML says 0 keeps 0)
    apply_chat_template: false        # lm-eval's prompt options, passed as its CLI passes them
    fewshot_as_multiturn: null        # null: follows apply_chat_template
    system_instruction: null
    gen_kwargs: {max_gen_toks: 64}    # updates every generate_until task's generation_kwargs
    racing: {chunk: 25, confidence: 0.95}   # off by default: stop candidates that cannot win
    dtype: float32
    tasks:
      - {task: arith_lang_b, metric: exact_match, weight: 2.0}
      - {task: gsm8k, metric: "exact_match,strict-match", num_fewshot: 5, splits: {validation: train}}

Unknown keys are errors. A field that changes *what is measured* is part of ``describe()`` and so of
the cache key; ``batch_size`` and ``device`` only change how fast it is measured and are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from evomerge.validation import PathText, validate

Split = Literal["validation", "test"]
DType = Literal["float32", "float16", "bfloat16"]
GenKwargs = dict[str, Any]

# Keys that would make generation stochastic: a search compares candidates on deterministic scores.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p")

AGGREGATE = "fitness"
"""Name of the weighted aggregate objective; no task objective may use it."""


class RacingSpec(BaseModel):
    """Score candidates in chunks and stop one that cannot beat the incumbent (see ``fitness.racing``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk: int = Field(default=25, ge=1, description="examples scored between two checks")
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0, description="joint confidence of the bounds")


class TaskSpec(BaseModel):
    """One lm-eval task: its objective name, weight in the aggregate and metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, description="lm-eval task or group name: include_path first, then lm-eval's own")
    name: str | None = Field(default=None, description="objective name; defaults to the task name")
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    metric: str | None = Field(
        default=None,
        description="metric the task reports, optionally 'metric,filter'; defaults to its first metric",
    )
    limit: int | None = Field(default=None, ge=1, description="overrides the spec-wide limit")
    num_fewshot: int | None = Field(
        default=None, ge=0, description="this task's few-shot count, whatever its YAML or the spec-wide value say"
    )
    gen_kwargs: GenKwargs | None = Field(
        default=None, description="updates this task's generation_kwargs after the spec-wide gen_kwargs"
    )
    splits: dict[Split, str] | None = Field(
        default=None,
        description="the dataset split each evomerge split reads, e.g. {validation: train} for a task "
        "whose YAML names no validation_split; default: its validation_split / test_split",
    )

    @property
    def objective(self) -> str:
        return self.name or self.task

    @field_validator("gen_kwargs", mode="before")
    @classmethod
    def _parse_gen_kwargs(cls, value: Any) -> Any:
        return _gen_kwargs(value)

    @field_validator("splits")
    @classmethod
    def _split_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, name in (value or {}).items():
            if not name:
                raise ValueError(f"{key}: expected a dataset split name, got {name!r}")
        return value


class FitnessSpec(BaseModel):
    """Everything that defines an lm-eval fitness; validated once, then frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[TaskSpec] = Field(min_length=1)
    include_path: list[PathText] = Field(
        default_factory=list, description="folder(s) of task YAML, searched before lm-eval's own tasks"
    )
    split: Split = "validation"
    limit: int | None = Field(default=None, ge=1, description="examples per task; null = all")
    seed: int | None = Field(default=0, description="subset seed; null = the first `limit` examples")
    batch_size: int = Field(default=32, ge=1)
    num_fewshot: int | None = Field(
        default=None, ge=0, description="as lm-eval's --num_fewshot: null = each task's own; a YAML 0 stays 0"
    )
    apply_chat_template: bool = Field(default=False, description="render prompts with the tokenizer's chat template")
    fewshot_as_multiturn: bool | None = Field(
        default=None, description="few-shot examples as chat turns; null = apply_chat_template's value"
    )
    system_instruction: str | None = Field(default=None, description="prepended to every prompt (a system turn in chat)")
    gen_kwargs: GenKwargs | None = Field(
        default=None,
        description="updates every generate_until task's generation_kwargs (lm-eval's --gen_kwargs), "
        "as a mapping or 'key=value,...'; decoding stays greedy",
    )
    racing: RacingSpec | None = Field(
        default=None, description="score in chunks and stop hopeless candidates early; null = off"
    )
    device: str | None = Field(default=None, description="where the model must be; null = wherever it is")
    dtype: DType | None = Field(default=None, description="the model's dtype; null = whatever it is")

    @field_validator("gen_kwargs", mode="before")
    @classmethod
    def _parse_gen_kwargs(cls, value: Any) -> Any:
        return _gen_kwargs(value)

    @field_validator("fewshot_as_multiturn")
    @classmethod
    def _multiturn_needs_chat(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and not info.data.get("apply_chat_template"):
            raise ValueError("true needs apply_chat_template: true (as in lm-eval)")
        return value

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
            if _evaluation_settings(first) != _evaluation_settings(task):
                raise ValueError(
                    f"task '{task.task}' is listed twice with different limit/num_fewshot/gen_kwargs/splits "
                    f"(tasks[{i}]); one task is evaluated once, then scored by each listed metric"
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

    @property
    def multiturn(self) -> bool:
        """lm-eval's rule: few-shot examples become chat turns by default when a chat template is applied."""
        return self.apply_chat_template if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn


def _evaluation_settings(task: TaskSpec) -> tuple[Any, ...]:
    """What decides how a task is evaluated (as opposed to how its results are scored)."""
    return (task.limit, task.num_fewshot, task.gen_kwargs, task.splits)


def _gen_kwargs(value: Any) -> Any:
    """lm-eval's ``key=value,...`` string or a mapping; sampling settings are refused (greedy search)."""
    if value is None:
        return None
    if isinstance(value, str):
        from lm_eval.utils import simple_parse_args_string

        try:
            value = simple_parse_args_string(value)
        except ValueError:
            raise ValueError(f"expected a mapping or 'key=value,...', got {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping or 'key=value,...', got {value!r}")
    if value.get("do_sample") not in (None, False):
        raise ValueError("do_sample: a search compares candidates on deterministic scores; decoding is greedy")
    sampling = sorted(k for k in set(value) & set(_SAMPLING_KEYS) if not (k == "temperature" and value[k] == 0))
    if sampling:
        raise ValueError(f"{sampling[0]}: a sampling setting; decoding is greedy (do_sample false)")
    max_tokens = value.get("max_gen_toks")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_gen_toks: expected an integer >= 1, got {max_tokens!r}")
    return value


def parse_fitness_spec(data: Any, source: str = "fitness") -> FitnessSpec:
    """Validate a mapping as a ``FitnessSpec``; any problem is a one-line ``ConfigError``."""
    if isinstance(data, FitnessSpec):
        return data
    return validate(FitnessSpec, data, source)
