"""``zoo.json``: what a built zoo contains — models, their training data and scores, merge settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskEntry(_Frozen):
    """A zoo task and its lm-eval task name (``--include_path <zoo>/fitness``)."""

    name: str
    lm_eval_task: str
    description: str


class SettingEntry(_Frozen):
    """A merge setting: the experts to merge and the tasks that score the merge."""

    name: str
    description: str
    experts: list[str]
    tasks: list[str]
    target: str | None


class ModelEntry(_Frozen):
    """One model: folder (relative to the zoo), role, what it was trained on, exact-match scores in %."""

    name: str
    folder: str
    role: Literal["base", "expert"]
    trained_on: str
    parent: str | None
    params: int
    train_steps: int
    train_seconds: float
    final_loss: float
    scores: dict[str, dict[str, float]]


class ZooIndex(_Frozen):
    """The content of ``zoo.json``."""

    spec_hash: str
    build_seconds: float
    threads: int
    tasks: list[TaskEntry]
    lm_eval_tasks: list[str]
    settings: list[SettingEntry]
    models: list[ModelEntry]

    def model(self, name: str) -> ModelEntry:
        """The entry of model ``name``; ``ConfigError`` if the zoo has no such model."""
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"zoo: no model {name!r}; models: {', '.join(m.name for m in self.models)}")

    def save(self, path: str | Path) -> None:
        """Write as indented JSON."""
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ZooIndex:
        """Read ``zoo.json``; a missing or malformed file is a one-line ``ConfigError``."""
        p = Path(path)
        try:
            return cls.model_validate_json(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: zoo index not found (run `evomerge zoo build`)") from None
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "(top level)"
            raise ConfigError(f"{p}: {where}: {first['msg']}") from None
