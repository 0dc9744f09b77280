"""lm-eval tasks built once per evaluator and reused for every candidate.

A ``ResidentTask`` is lm-eval's ``ConfigurableTask`` with changes that matter in a search loop: its
evaluation documents are a fixed, materialized subset (iterating them costs nothing and the subset
is the same for every candidate), its requests (prompts) are built once and only have their
responses cleared before the next candidate, and its documents' rendered targets are kept. Prompts
and targets depend on the data and the tokenizer's chat template, never on the weights, so reuse
cannot return stale scores.

``load_tasks`` finds each task or group by name (``TaskCatalog``: ``include_path``, then lm-eval's
built-in tasks), selects the split, resolves data files relative to the YAML's folder, applies the
spec's few-shot and generation settings as lm-eval's ``simple_evaluate`` would, checks the metric,
and draws the subset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import numbers
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lm_eval.api.group import Group
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from evomerge.errors import ConfigError, DatasetError
from evomerge.fitness.catalog import TaskCatalog, dataset_error
from evomerge.fitness.result import Direction, ExampleScores
from evomerge.fitness.runtime import dropped, no_dataset_progress_bars, silenced
from evomerge.fitness.spec import FitnessSpec, TaskSpec

_DEFAULT_FEWSHOT_SEED = 1234
_TASK_LOGGER = "lm_eval.api.task"
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


class ResidentTask(ConfigurableTask):
    """A ConfigurableTask whose eval documents and requests are fixed once and then reused."""

    _subset: list[dict[str, Any]] | None = None
    _built_key: tuple[Any, ...] | None = None
    _active: frozenset[int] | None = None

    @property
    def eval_docs(self) -> Any:
        return super().eval_docs if self._subset is None else self._subset

    @property
    def n_docs(self) -> int:
        return len(self.eval_docs)

    def fix_subset(self, doc_ids: Sequence[int]) -> None:
        """From now on evaluate exactly these documents of the eval split, in this order."""
        docs = super().eval_docs
        self._subset = [docs[i] for i in doc_ids]
        self._targets: dict[int, tuple[dict[str, Any], Any]] = {}
        self._built_key = None

    def activate(self, positions: Sequence[int] | None) -> None:
        """Evaluate only these positions of the subset (racing scores a chunk at a time); None: all.

        The prompts stay built for every document: lm-eval then sees only the active documents'
        requests, filters, scores and samples (doc ids stay positions in the whole subset).
        """
        self._active = None if positions is None else frozenset(positions)

    @property
    def instances(self) -> list[Instance]:
        if self._active is None:
            return self._instances
        return [instance for instance in self._instances if instance.doc_id in self._active]

    def doc_iterator(
        self, *, rank: int = 0, limit: int | None = None, world_size: int = 1, samples: list[int] | None = None
    ) -> Any:
        if self._active is None:
            return super().doc_iterator(rank=rank, limit=limit, world_size=world_size, samples=samples)
        return ((i, doc) for i, doc in enumerate(self.eval_docs) if i in self._active)

    def apply_filters(self) -> Any:
        if self._active is None:
            return super().apply_filters()
        everything = self._instances
        self._instances = self.instances
        try:
            return super().apply_filters()
        finally:
            self._instances = everything

    def doc_to_target(self, doc: Any, doc_to_target: Any = None) -> Any:
        """lm-eval renders each target twice per candidate (scoring, sample log); the subset's
        documents are fixed objects, so their rendered targets are kept (a list is copied out)."""
        if doc_to_target is not None or self._subset is None:
            return super().doc_to_target(doc, doc_to_target)
        hit = self._targets.get(id(doc))
        if hit is None or hit[0] is not doc:
            hit = self._targets[id(doc)] = (doc, super().doc_to_target(doc))
        return list(hit[1]) if isinstance(hit[1], list) else hit[1]

    def build_all_requests(
        self,
        *,
        limit: int | None = None,
        samples: list[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        cache_requests: bool = False,
        rewrite_requests_cache: bool = False,
        system_instruction: str | None = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        chat_template: Any = None,
        tokenizer_name: str = "",
    ) -> None:
        """Build the requests on first use (same steps as lm-eval, without its disk cache or progress
        bar); on later calls with the same prompt-shaping arguments, only clear the responses."""
        template_owner = id(getattr(chat_template, "__self__", chat_template)) if apply_chat_template else None
        key = (
            limit,
            tuple(samples) if samples else None,
            rank,
            world_size,
            system_instruction,
            apply_chat_template,
            fewshot_as_multiturn,
            tokenizer_name,
            template_owner,
            self.config.num_fewshot,
        )
        if key == self._built_key and self._instances:
            for instance in self._instances:
                instance.resps = []
                instance.filtered_resps = {}
            return
        instances: list[Instance] = []
        for doc_id, doc in super().doc_iterator(rank=rank, limit=limit, samples=samples, world_size=world_size):
            context = self.fewshot_context(
                doc,
                num_fewshot=self.config.num_fewshot or 0,
                system_instruction=system_instruction,
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=fewshot_as_multiturn,
                chat_template=chat_template,
                gen_prefix=self.doc_to_prefix(doc),
            )
            built = self.construct_requests(
                doc=doc,
                ctx=context,
                metadata=(self.config["task"], doc_id, self.config.repeats),
                apply_chat_template=apply_chat_template,
                chat_template=chat_template,
            )
            instances.extend(built if isinstance(built, list) else [built])
        if not instances:
            raise ConfigError(f"fitness task '{self.config.task}': no documents to evaluate")
        self._instances = instances
        self._built_key = key


@dataclass(frozen=True)
class Leaf:
    """One lm-eval task evaluated on a fixed subset of its split.

    ``offset`` shifts its doc ids in the objective's per-example ids, so the members of a group
    keep distinct ids (member k's ids start after the full splits of members 0..k-1).
    """

    task: ResidentTask
    doc_ids: tuple[int, ...]
    offset: int
    digest: dict[str, str]

    @property
    def name(self) -> str:
        return str(self.task.config.task)


@dataclass(frozen=True)
class PreparedTask:
    """An objective ready to evaluate: a task or a group (its leaves, aggregated as lm-eval does),
    which lm-eval result key is scored, and in which direction (lm-eval's ``higher_is_better``)."""

    spec: TaskSpec
    leaves: tuple[Leaf, ...]
    groups: tuple[Group, ...]
    metric: str
    filter: str
    direction: Direction
    group_digest: str | None = None

    @property
    def name(self) -> str:
        return self.spec.task

    @property
    def result_key(self) -> str:
        return f"{self.metric},{self.filter}"

    @property
    def is_group(self) -> bool:
        return bool(self.groups)

    @property
    def task(self) -> ResidentTask:
        """The one lm-eval task of a plain (non-group) objective."""
        if self.is_group:
            raise AttributeError(f"'{self.name}' is a group of {len(self.leaves)} tasks")
        return self.leaves[0].task

    @property
    def n_examples(self) -> int:
        return sum(len(leaf.doc_ids) for leaf in self.leaves)

    @property
    def example_ids(self) -> tuple[int, ...]:
        """Every example's id: its doc's index in the full split, plus its task's offset in a group."""
        return tuple(sorted(leaf.offset + i for leaf in self.leaves for i in leaf.doc_ids))

    def example_scores(self, samples: Mapping[str, list[dict[str, Any]]]) -> ExampleScores | None:
        """The objective's metric and filter per example of lm-eval's logged ``samples`` (those of
        the documents evaluated), keyed by ``example_ids``.

        ``None`` for corpus-level metrics whose per-document value is not one number (perplexity, BLEU).
        """
        pairs = []
        for leaf in self.leaves:
            for sample in samples.get(leaf.name, ()):
                if sample["filter"] != self.filter or self.metric not in sample:
                    continue
                value = sample[self.metric]
                if isinstance(value, bool):
                    value = float(value)
                if not isinstance(value, numbers.Real):
                    return None
                pairs.append((leaf.offset + leaf.doc_ids[sample["doc_id"]], float(value)))
        pairs.sort()
        return ExampleScores(tuple(i for i, _ in pairs), tuple(s for _, s in pairs))


def build_catalog(include_path: Sequence[str], base_dir: Path | None = None) -> TaskCatalog:
    """Where task names are looked up: ``include_path`` (milliseconds), then lm-eval's own (once, ~8 s)."""
    return TaskCatalog(include_path, base_dir)


def load_tasks(spec: FitnessSpec, catalog: TaskCatalog) -> list[PreparedTask]:
    """Build, configure and subsample every task of ``spec`` (once per evaluator).

    A task listed several times (one objective per metric) is built and evaluated once; a task may
    not also be a member of a listed group (lm-eval refuses the same duplicate).
    """
    prepared: list[PreparedTask] = []
    built: dict[str, PreparedTask] = {}
    owner: dict[str, str] = {}
    for i, task_spec in enumerate(spec.tasks):
        same = built.get(task_spec.task)
        if same is None:
            built[task_spec.task] = same = _prepare(spec, task_spec, catalog)
            for leaf in same.leaves:
                other = owner.setdefault(leaf.name, task_spec.task)
                if other != task_spec.task:
                    raise ConfigError(
                        f"fitness: tasks[{i}]: '{task_spec.task}' evaluates task '{leaf.name}', which '{other}' "
                        "evaluates too; list each task once"
                    )
            prepared.append(same)
            continue
        metric, filter_name, direction = _select_metric(same.leaves, same.groups, task_spec)
        prepared.append(replace(same, spec=task_spec, metric=metric, filter=filter_name, direction=direction))
    return prepared


def _prepare(spec: FitnessSpec, task_spec: TaskSpec, catalog: TaskCatalog) -> PreparedTask:
    def make(config: dict[str, Any], yaml_path: Path | None) -> ResidentTask:
        return _make_task(config, yaml_path, spec.split, task_spec)

    tasks, groups, group_files = catalog.build(task_spec.task, make)
    leaves: list[Leaf] = []
    offset = 0
    for task in tasks:
        _make_deterministic(task, spec, task_spec)
        n_docs = task.n_docs
        doc_ids = _draw_subset(n_docs, task_spec.limit or spec.limit, spec.seed, task.config.task)
        task.fix_subset(doc_ids)
        source = Path(str(task.config.metadata.get("config_source")))
        digest = {"config_sha256": _yaml_digest(source), "docs_sha256": _docs_digest(task)}
        leaves.append(Leaf(task, doc_ids, offset, digest))
        offset += n_docs
    metric, filter_name, direction = _select_metric(leaves, groups, task_spec)
    group_digest = _files_digest(group_files) if groups else None
    return PreparedTask(task_spec, tuple(leaves), tuple(groups), metric, filter_name, direction, group_digest)


def _make_task(config: dict[str, Any], yaml_path: Path | None, split: str, task_spec: TaskSpec) -> ResidentTask:
    """Point the config at the chosen split and at data files found relative to its YAML, then load it."""
    name = str(config["task"])
    where = f"fitness task '{name}'" + (f" ({yaml_path})" if yaml_path else "")
    config["metadata"] = config["metadata"] if isinstance(config.get("metadata"), dict) else {}
    _select_split(config, split, task_spec.splits, where)
    data_files = _resolve_data(config, where, yaml_path.parent) if yaml_path is not None else []
    try:
        # lm-eval tells CLI users of custom_dataset tasks about --metadata: not applicable here.
        with no_dataset_progress_bars(), silenced("datasets", logging.CRITICAL), dropped(_TASK_LOGGER, "--metadata"):
            return ResidentTask(config=config)
    except Exception as err:  # noqa: BLE001 - datasets/lm-eval raise many types for bad data
        detail = _first_line(_root_cause(err))
        if data_files or config.get("custom_dataset"):
            files = ", ".join(p.name for p in data_files) or config.get("dataset_path")
            raise DatasetError(f"{where}: cannot load its data ({files}): {detail}") from None
        raise dataset_error(name, config, err, detail) from None


def _select_split(config: dict[str, Any], split: str, splits: Mapping[str, str] | None, where: str) -> None:
    """lm-eval evaluates ``test_split`` if set, else ``validation_split``: point it at the chosen one."""
    chosen = (splits or {}).get(split) or config.get(f"{split}_split")
    if not chosen:
        other = "test" if split == "validation" else "validation"
        named = [f"{key} {config[key]}" for key in _SPLIT_KEYS if config.get(key)]
        known = f" (its YAML names {', '.join(named)})" if named else ""
        raise ConfigError(
            f"{where}: has no {split}_split{known}; name the dataset split to use "
            f"(e.g. splits: {{{split}: train}}) or use split: {other}"
        )
    config["test_split"] = chosen


def _resolve_data(config: dict[str, Any], where: str, folder: Path) -> list[Path]:
    """Make relative data paths relative to the YAML's folder (then the working directory) and check
    they exist, so a run works from any directory and a missing file names itself."""
    kwargs = config.get("dataset_kwargs") or {}
    found: list[Path] = []

    def resolve(raw: Any, field: str) -> str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: {field}: expected a file path, got {raw!r}")
        for base in (folder, Path.cwd()):
            candidate = base / Path(raw).expanduser()
            matches = [Path(m) for m in sorted(glob.glob(str(candidate))) if Path(m).is_file()]
            if matches:
                found.extend(matches)
                return str(candidate)
        raise ConfigError(f"{where}: {field}: data file '{raw}' not found (looked in {folder} and {Path.cwd()})")

    files = kwargs.get("data_files")
    if isinstance(files, str):
        kwargs["data_files"] = resolve(files, "dataset_kwargs.data_files")
    elif isinstance(files, list):
        kwargs["data_files"] = [resolve(f, f"dataset_kwargs.data_files[{i}]") for i, f in enumerate(files)]
    elif isinstance(files, dict):
        kwargs["data_files"] = {
            split: [resolve(f, f"dataset_kwargs.data_files.{split}[{i}]") for i, f in enumerate(value)]
            if isinstance(value, list)
            else resolve(value, f"dataset_kwargs.data_files.{split}")
            for split, value in files.items()
        }
    elif files is not None:
        raise ConfigError(f"{where}: dataset_kwargs.data_files: expected a path, a list or a mapping, got {files!r}")
    path = config.get("dataset_path")
    if isinstance(path, str) and (folder / path).exists():
        config["dataset_path"] = str((folder / path).resolve())
    if kwargs:
        config["dataset_kwargs"] = kwargs
    return found


def _select_metric(
    leaves: Sequence[Leaf], groups: Sequence[Group], task_spec: TaskSpec
) -> tuple[str, str, Direction]:
    """Check the requested ``metric[,filter]`` against what the task (or group) reports; default to
    its first. A group reports what its ``aggregate_metric_list`` aggregates; directions come from
    lm-eval's ``higher_is_better`` of the (member) tasks."""
    name = task_spec.task
    if groups:
        reported = _group_metrics(groups[0], leaves, name)
    else:
        task = leaves[0].task
        filters = _filters(task)
        reported = [(m, f) for m in task.higher_is_better() for f in filters]
        if not reported:
            raise ConfigError(f"fitness task '{name}': reports no metrics; add a metric_list to its YAML")
    requested = task_spec.metric or reported[0][0]
    metric, _, filter_name = requested.partition(",")
    filter_name = filter_name or next((f for m, f in reported if m == metric), "")
    if (metric, filter_name) not in reported:
        available = [m for m in dict.fromkeys(m for m, _ in reported)]
        available += [f"{m},{f}" for m, f in reported if len({f for _, f in reported}) > 1]
        raise ConfigError(
            f"fitness task '{name}': metric '{requested}' is not reported; available metrics: {', '.join(available)}"
        )
    directions = {leaf.task.higher_is_better().get(metric) for leaf in leaves} - {None}
    if len(directions) != 1:
        raise ConfigError(f"fitness task '{name}': its tasks disagree on whether higher '{metric}' is better")
    return metric, filter_name, ("maximize" if directions.pop() else "minimize")


def _group_metrics(group: Group, leaves: Sequence[Leaf], name: str) -> list[tuple[str, str]]:
    """(metric, filter) pairs a group aggregates, with filters discovered from its tasks as lm-eval does."""
    if not group.aggregate_metric_list:
        raise ConfigError(
            f"fitness task '{name}': is a group without an aggregate_metric_list (no score of its own); "
            "list its tasks individually"
        )
    pairs: list[tuple[str, str]] = []
    for aggregate in group.aggregate_metric_list:
        filters = aggregate.filter_list or sorted(
            {f for leaf in leaves if aggregate.metric in leaf.task.higher_is_better() for f in _filters(leaf.task)}
        )
        pairs += [(aggregate.metric, f) for f in filters if (aggregate.metric, f) not in pairs]
    return pairs


def _filters(task: ResidentTask) -> list[str]:
    return [f["name"] for f in task.config.filter_list] if task.config.filter_list else ["none"]


def _make_deterministic(task: ResidentTask, spec: FitnessSpec, task_spec: TaskSpec) -> None:
    """Few-shot count and seed as lm-eval's ``simple_evaluate`` sets them (a per-task count always
    wins), one response per request, and greedy generation with the spec's ``gen_kwargs`` applied."""
    own = task.config.num_fewshot
    if task_spec.num_fewshot is not None:
        shots = task_spec.num_fewshot
    elif spec.num_fewshot is not None and own != 0:
        shots = spec.num_fewshot
    else:
        shots = own or 0
    task.set_config("num_fewshot", shots)
    task.set_fewshot_seed(seed=spec.seed if spec.seed is not None else _DEFAULT_FEWSHOT_SEED)
    task.set_config("repeats", 1)
    if task.OUTPUT_TYPE == "generate_until":
        kwargs = dict(task.config.generation_kwargs or {})
        kwargs.update(spec.gen_kwargs or {})
        kwargs.update(task_spec.gen_kwargs or {})
        kwargs = {k: v for k, v in kwargs.items() if k not in _SAMPLING_KEYS}
        kwargs.update(do_sample=False, temperature=0.0)
        task.set_config("generation_kwargs", kwargs)


def _draw_subset(n_docs: int, limit: int | None, seed: int | None, name: str) -> tuple[int, ...]:
    """All docs, the first ``limit`` (seed null), or a seeded random subset in ascending order.

    The generator is seeded from (seed, task name), so tasks get independent subsets and a subset
    never changes with the order of tasks in the spec.
    """
    if limit is None or limit >= n_docs:
        return tuple(range(n_docs))
    if seed is None:
        return tuple(range(limit))
    return tuple(sorted(random.Random(f"{seed}:{name}").sample(range(n_docs), limit)))


def _files_digest(paths: Sequence[Path]) -> str:
    """Hash of several YAML files (a group's and its subgroups'), each with what it includes."""
    return hashlib.sha256("".join(_yaml_digest(p) for p in paths).encode()).hexdigest()


def _yaml_digest(path: Path) -> str:
    """Hash of the YAML, the YAML it includes and the Python files its ``!function`` tags name, as
    bytes (paths do not enter the hash, so a moved checkout keeps its cache keys)."""
    h = hashlib.sha256()
    pending, seen = [path.resolve()], set()
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.add(current)
        h.update(current.read_bytes())
        if current.suffix == ".py":
            continue
        config = load_yaml(current, resolve_func=False, recursive=False)
        includes = config.get("include") or []
        includes = includes if isinstance(includes, list) else [includes]
        pending += [(current.parent / inc).resolve() for inc in includes]
        pending += sorted(_function_files(config, current.parent))
    return h.hexdigest()


def _function_files(value: Any, folder: Path) -> set[Path]:
    """Unresolved ``!function utils.fn`` tags load as '<folder>/utils.fn': the files they point to."""
    if isinstance(value, dict):
        return set().union(*(_function_files(v, folder) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_function_files(v, folder) for v in value))
    if isinstance(value, str) and value.startswith(f"{folder}/"):
        module = Path(value.rpartition(".")[0] + ".py")
        return {module.resolve()} if module.is_file() else set()
    return set()


def _docs_digest(task: ResidentTask) -> str:
    """Hash of the documents evaluated (and of the few-shot pool when shots are drawn): content, not
    files, so data from ``data_files``, a ``custom_dataset`` function or ``process_docs`` all count."""
    h = hashlib.sha256()
    pools = [task.eval_docs]
    sampler = getattr(task, "sampler", None)
    if task.config.num_fewshot and sampler is not None:
        pools.append(sampler.df)
    for pool in pools:
        for doc in pool:
            h.update(json.dumps(doc, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _root_cause(err: BaseException) -> BaseException:
    """datasets wraps the useful error (which row, what is wrong) in a generic one."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
