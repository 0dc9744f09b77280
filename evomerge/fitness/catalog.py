"""Finding lm-eval tasks by name and building them as resident tasks.

A name is looked up in the ``include_path`` folders first (a TaskManager over them alone indexes
in milliseconds, so the zoo's tasks cost nothing), then among lm-eval's built-in tasks, groups and
tags. Indexing the built-in tasks reads ~15 000 YAML files (~8 s), so it happens only when a name is
not found locally, and once per process (a worker builds its validation and held-out fitness from
the same index).

Tasks and groups are built by lm-eval's own ``TaskFactory`` (so a group gets the members,
overrides and aggregation lm-eval gives it) with one change: each leaf task is a ``ResidentTask``
whose split and data paths are set by the caller before its dataset is loaded. A dataset that
cannot be loaded is a one-line ``DatasetError`` naming the task and the dataset; offline with no
cached copy, it also names ``HF_DATASETS_OFFLINE``.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.group import Group
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory
from lm_eval.tasks._index import Entry, Kind

from evomerge.errors import ConfigError, DatasetError

ConfigHook = Callable[[dict[str, Any], Path | None], Any]
"""Turns a leaf task's raw config (and its YAML's path) into a built task."""

_TRUE = {"1", "on", "true", "yes"}


class TaskCatalog:
    """Task, group and tag names from ``include_path`` first, then from lm-eval's built-in tasks."""

    def __init__(self, include_path: Sequence[str], base_dir: Path | None = None) -> None:
        self.roots = tuple(str(_resolve_dir(p, base_dir)) for p in include_path)
        self._local = TaskManager(include_path=list(self.roots), include_defaults=False) if self.roots else None

    def entry(self, name: str) -> tuple[Entry, dict[str, Entry]]:
        """The index entry of ``name`` and the registry its members resolve in."""
        if self._local is not None:
            local = self._local.task_index
            found = local.get(name)
            if found is not None and _members_known(found, local):
                return found, local
        full = full_task_manager(self.roots).task_index
        found = full.get(name)
        if found is None:
            raise ConfigError(self._not_found(name, full))
        return found, full

    def build(self, name: str, make_task: ConfigHook) -> tuple[list[ConfigurableTask], list[Group], list[Path]]:
        """Build ``name``: its leaf tasks (each through ``make_task``) and, for a group, its groups
        (the outermost first) and their YAML files. A tag or a Python-class task is refused: neither
        has one score."""
        entry, registry = self.entry(name)
        if entry.kind is Kind.TAG:
            members = ", ".join(sorted(entry.tags)[:5]) + (", ..." if len(entry.tags) > 5 else "")
            raise ConfigError(
                f"fitness task '{name}': is a tag of {len(entry.tags)} tasks ({members}) with no aggregate score; "
                "list its tasks individually or use a group"
            )
        factory = _ResidentFactory(make_task)
        built = factory.build(entry, registry=registry)
        if isinstance(built, Group):
            leaves = built.get_all_tasks()
            inline = [t.config.task for t in leaves if type(t) is ConfigurableTask]
            if inline:
                raise ConfigError(f"fitness task '{name}': group defines task '{inline[0]}' inline; not supported")
            groups = [built, *built.get_all_groups()]
            files = [Path(registry[g.name].yaml_path) for g in groups if g.name in registry and registry[g.name].yaml_path]
            return leaves, groups, files
        return [built], [], []

    def _not_found(self, name: str, index: dict[str, Entry]) -> str:
        where = f"include_path {list(self.roots)}" if self.roots else "include_path (none given)"
        close = difflib.get_close_matches(name, list(index), n=5, cutoff=0.6)
        local = sorted(self._local.all_subtasks) if self._local is not None else []
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        known = f" (tasks there: {', '.join(local)})" if local else ""
        return (
            f"fitness task '{name}': not found in {where}{known} nor among lm-eval's "
            f"{len(index)} built-in tasks, groups and tags{hint}"
        )


@functools.lru_cache(maxsize=4)
def full_task_manager(roots: tuple[str, ...] = ()) -> TaskManager:
    """lm-eval's built-in tasks plus the folders ``roots`` (which take precedence): built once per
    process and folder set."""
    return TaskManager(include_path=list(roots) or None, include_defaults=True)


def _members_known(entry: Entry, index: dict[str, Entry]) -> bool:
    """Whether a group's members (recursively) are all in ``index``; a task always is."""
    if entry.kind is not Kind.GROUP:
        return True
    pending, seen = [entry], set()
    while pending:
        current = pending.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        members = (current.cfg or {}).get("task") or []
        for member in members if isinstance(members, list) else [members]:
            name = member if isinstance(member, str) else (member.get("task") or member.get("group"))
            inline = isinstance(member, dict) and "group" in member and member["group"] not in index
            if inline:
                continue
            child = index.get(name) if isinstance(name, str) else None
            if child is None:
                return False
            if child.kind is Kind.GROUP:
                pending.append(child)
    return True


class _ResidentFactory(TaskFactory):
    """lm-eval's factory with each leaf task made by ``make_task`` (a ``ResidentTask``)."""

    def __init__(self, make_task: ConfigHook) -> None:
        super().__init__(meta=None)
        self._make_task = make_task

    def _build_task(self, entry: Entry, overrides: dict[str, Any] | None) -> Any:
        if entry.kind is Kind.PY_TASK:
            raise ConfigError(f"fitness task '{entry.name}': is a Python-class task; only YAML tasks are supported")
        config = self._load_full_config(entry, overrides)
        for key in ("tag", "group", "task_list"):
            config.pop(key, None)
        return self._make_task(config, Path(entry.yaml_path) if entry.yaml_path else None)


def offline() -> bool:
    """Whether datasets may not download (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    import datasets

    from_env = any(os.environ.get(key, "").strip().lower() in _TRUE for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return from_env or bool(datasets.config.HF_HUB_OFFLINE)


def dataset_error(name: str, config: dict[str, Any], err: BaseException, detail: str) -> DatasetError:
    """The one-line error for a dataset ``name``'s task could not load; ``detail`` is the root cause."""
    path = config.get("dataset_path")
    dataset = f"{path}" + (f" ({config['dataset_name']})" if config.get("dataset_name") else "")
    hub = isinstance(path, str) and not Path(path).exists() and not (config.get("dataset_kwargs") or {}).get("data_files")
    unreachable = _unreachable(err)
    if hub and unreachable and offline():
        return DatasetError(
            f"fitness task '{name}': dataset {dataset} is not in the local datasets cache and HF_DATASETS_OFFLINE=1 "
            "forbids downloading it; load it once with network access or point HF_DATASETS_CACHE at a cache that holds it"
        )
    if hub and unreachable:
        return DatasetError(
            f"fitness task '{name}': dataset {dataset} cannot be downloaded ({detail}); with no network, "
            "set HF_DATASETS_OFFLINE=1 to use cached copies only"
        )
    return DatasetError(f"fitness task '{name}': cannot load dataset {dataset}: {detail}")


def _unreachable(err: BaseException) -> bool:
    """A hub download that failed for want of network (or because offline mode forbade it)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{type(current).__name__}: {current}"
        if isinstance(current, ConnectionError) or "OfflineModeIsEnabled" in text or "is not cached" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def _resolve_dir(raw: str, base_dir: Path | None) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_dir():
        raise ConfigError(f"fitness.include_path: folder '{raw}' not found (resolved to {path.resolve()})")
    return path.resolve()
