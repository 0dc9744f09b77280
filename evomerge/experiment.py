"""The experiment file: models + search space + strategy + fitness + budget + executor, validated once.

Example (``experiments/demo.yaml``)::

    name: demo
    seed: 0
    zoo: {spec: default}                 # optional: `run` builds the zoo first if missing or outdated
    models:                              # name -> folder (relative to this file), zoo:<model>,
      base: zoo:base                     #   org/name[@revision] (Hugging Face), or model+adapter (LoRA)
      skill: zoo:skill_add_a
      lang: zoo:lang_qa_b
    base: base
    search_space: ../search_spaces/task-arithmetic-per-layer.yaml   # or an inline mapping
    strategy: {name: cmaes, settings: {sigma0: 0.25}}
    objectives: [fitness]                # optional; the weighted aggregate by default
    fitness:                             # a fitness kind: lm-eval tasks, or {python: file.py:fn} (evomerge.fitness.kinds)
      include_path: ../fitness
      limit: 100
      tasks: [{task: zoo_add_b}]
    heldout: {limit: null}               # optional: the same fitness on the test split, at the end
    budget: {evaluations: 200, minutes: null}
    executor: {kind: local, device: cpu, dtype: float32}   # a registered executor and its settings (evomerge.runtime)
    checkpoint_every: 10
    run_dir: null                        # default: runs/<name> under the current directory

An experiment may instead have ``stages:`` (a parameter-space stage whose best joins the pool of a
data-flow stage, as Sakana staged PS → DFS): each stage is a run of its own, its fields override
the experiment's, and ``promote`` exports picks of it into the run directory as new models of the
pool (``evomerge.run.stages``)::

    stages:
      - {name: ps, search_space: ..., strategy: ..., budget: ..., promote: [{name: ps_best}]}
      - {name: dfs, models: [ps_best, lang], search_space: {kind: dataflow}, budget: ...}

Every mistake is a one-line ``ConfigError`` naming the field (unknown keys with a did-you-mean).
``load_experiment`` also resolves every path (relative to the experiment file; ``zoo:`` models
against the zoo folder; hub ids into the Hugging Face cache, pinned to the commit they resolved to)
and inlines the search space, so the resolved form that is snapshotted into the run directory needs
nothing but itself to resume, with exactly the weights the run started with.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)

from evomerge.errors import ConfigError, ModelError
from evomerge.fitness.kinds import (  # noqa: F401  (CallableFitnessConfig: re-exported)
    CallableFitnessConfig,
    FitnessConfig,
    dump_fitness,
    parse_fitness,
)
from evomerge.fitness.spec import AGGREGATE, FitnessSpec
from evomerge.pool.sources import Reference, ResolvedSource, resolve_source
from evomerge.runtime.registry import ExecutorSettings, parse_executor
from evomerge.validation import PathText, read_yaml, validate

ZOO_ENV = "EVOMERGE_ZOO"
DEFAULT_ZOO_DIR = ".cache/zoo"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PYTHON_REF = re.compile(r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$")
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="a run seed: every strategy's generator takes 0 to 2³²−1")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZooConfig(_Strict):
    """The zoo the models come from: ``run`` builds it first if missing or outdated (cached by the
    spec's hash, so a built zoo costs nothing); other commands only check that it is ready."""

    spec: PathText = Field(default="default", description="zoo spec YAML (relative to the experiment) or 'default'")
    dir: PathText | None = Field(default=None, description=f"zoo folder; default ${ZOO_ENV} or {DEFAULT_ZOO_DIR}")


class StrategyConfig(_Strict):
    name: str = Field(min_length=1)
    seed: Seed | None = Field(default=None, description="default: the experiment's seed")
    settings: dict[str, Any] = Field(default_factory=dict)


class BudgetConfig(_Strict):
    """When to stop asking for candidates: after ``evaluations`` candidates and/or ``minutes`` of driver time."""

    evaluations: int | None = Field(default=None, ge=1)
    minutes: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.evaluations is None and self.minutes is None:
            raise ValueError("expected evaluations and/or minutes")
        return self


def _folder_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"expected letters, digits, '.', '_' or '-' (a folder name), got {value!r}")
    return value


class PromoteConfig(_Strict):
    """A candidate of a stage that joins the pool of the next stages as model ``name``."""

    name: str = Field(description="the model's name in later stages")
    pick: str = Field(default="best", description="'best' (first objective) or front preferences 'a=0.7,b=0.3'")

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return _folder_name(value)


STAGE_FIELDS = ("base", "search_space", "strategy", "objectives", "heldout", "budget", "checkpoint_every")
"""Experiment fields a stage overrides (``fitness`` is merged key by key; ``models`` selects from the pool)."""


class StageConfig(_Strict):
    """One stage of a staged experiment: a run of its own over (part of) the growing pool."""

    name: str
    models: list[str] | None = Field(default=None, description="pool models of this stage; default: the whole pool")
    base: str | None = None
    search_space: str | dict[str, Any] | None = None
    strategy: StrategyConfig | None = None
    objectives: list[str] | None = None
    fitness: dict[str, Any] | None = Field(default=None, description="overrides of the experiment's fitness")
    heldout: bool | dict[str, Any] | None = None
    budget: BudgetConfig | None = None
    checkpoint_every: int | None = Field(default=None, ge=1)
    promote: list[PromoteConfig] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _stage_name(cls, value: str) -> str:
        return _folder_name(value)


class ExperimentFile(_Strict):
    """The YAML form of an experiment (before paths are resolved)."""

    name: str
    seed: Seed = 0
    zoo: ZooConfig | None = None
    models: dict[str, Reference] = Field(
        description="name -> folder, zoo:<model>, org/name[@revision], model+adapter or {model: ..., lora: ...}"
    )
    base: str | None = None
    search_space: PathText | dict[str, Any] | None = None
    strategy: StrategyConfig | None = None
    objectives: list[str] = Field(default_factory=lambda: [AGGREGATE], min_length=1)
    fitness: dict[str, Any]
    heldout: bool | dict[str, Any] | None = Field(
        default=None, description="true, or overrides of the fitness for the held-out evaluation (split: test)"
    )
    budget: BudgetConfig | None = None
    executor: dict[str, Any] = Field(default_factory=dict, description="kind (local, ray, ...) and that executor's settings")
    checkpoint_every: int = Field(default=10, ge=1)
    run_dir: PathText | None = None
    stages: list[StageConfig] | None = Field(default=None, min_length=1, description="runs in order over a growing pool")

    @field_validator("name")
    @classmethod
    def _run_name(cls, value: str) -> str:
        return _folder_name(value)

    @model_validator(mode="after")
    def _complete(self) -> ExperimentFile:
        """Without stages, search_space, strategy and budget are required; with stages, every stage
        has them (its own or the experiment's) and names only models of the pool at its turn."""
        if self.stages is None:
            for field in ("search_space", "strategy", "budget"):
                if getattr(self, field) is None:
                    raise ValueError(f"{field}: required field is missing (or give stages:)")
            return self
        pool, seen = list(self.models), set()
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if stage.name in seen:
                raise ValueError(f"{where}.name: '{stage.name}' appears twice")
            seen.add(stage.name)
            for field in ("search_space", "strategy", "budget"):
                if getattr(stage, field) is None and getattr(self, field) is None:
                    raise ValueError(f"{where}.{field}: required (in the stage or the experiment)")
            for name in stage.models or []:
                if name not in pool:
                    raise ValueError(f"{where}.models: '{name}' is not in the pool at this stage ({', '.join(pool)})")
            if stage.base is not None and stage.base not in (stage.models or pool):
                raise ValueError(f"{where}.base: '{stage.base}' is not one of the stage's models")
            for k, promotion in enumerate(stage.promote):
                if promotion.name in pool:
                    raise ValueError(f"{where}.promote[{k}].name: '{promotion.name}' is already a model of the pool")
                pool.append(promotion.name)
        return self

    def stage_file(self, index: int, models: dict[str, Reference], source: str = "experiment") -> ExperimentFile:
        """Stage ``index`` as a plain experiment over ``models`` (the pool at its turn): the stage's
        fields over the experiment's, the fitness merged key by key, named ``<name>-<stage>``."""
        stage = self.stages[index] if self.stages else None
        if stage is None:
            raise ValueError("not a staged experiment")
        data = self.model_dump(mode="json", exclude={"stages"}, exclude_unset=True)
        for field in STAGE_FIELDS:
            if field in stage.model_fields_set:
                data[field] = stage.model_dump(mode="json", include={field})[field]
        if stage.fitness:
            data["fitness"] = {**self.fitness, **stage.fitness}
        names = stage.models or list(models)
        data["models"] = {name: models[name] for name in names}
        if "base" not in stage.model_fields_set and self.base not in names:
            data["base"] = None
        data["name"] = f"{self.name}-{stage.name}"
        return validate(ExperimentFile, data, f"{source}: stages[{index}] ({stage.name})")

    @field_validator("models")
    @classmethod
    def _two_or_more(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) < 2:
            raise ValueError(f"expected at least 2 models (a base and a source, or two sources), got {len(value)}")
        return value

    @field_validator("base")
    @classmethod
    def _base_is_a_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        models = info.data.get("models")
        if value is not None and models is not None and value not in models:
            raise ValueError(f"'{value}' is not one of the models ({', '.join(models)})")
        return value

    @field_validator("search_space", mode="before")
    @classmethod
    def _path_or_mapping(cls, value: Any) -> Any:
        if not isinstance(value, (str, dict)):
            raise ValueError(f"expected a search-space file path or an inline mapping, got {type(value).__name__}")
        return value

    @field_validator("heldout", mode="before")
    @classmethod
    def _flag_or_mapping(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (bool, dict)):
            raise ValueError(f"expected true, false or a mapping of fitness overrides, got {value!r}")
        return value

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            if name in value[:i]:
                raise ValueError(f"'{name}' appears twice")
        return value


class Experiment(BaseModel):
    """A resolved experiment: absolute paths, inline search space, parsed fitness; what a run snapshots."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    seed: Seed
    models: dict[str, str] = Field(description="name -> pinned reference (absolute folder, org/name@<commit>, model+adapter)")
    origins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> what the reference was written as and resolved to (hub ids, commits)"
    )
    base: str | None
    search_space: dict[str, Any]
    strategy: StrategyConfig
    objectives: list[str]
    fitness: SerializeAsAny[FitnessConfig]
    heldout: SerializeAsAny[FitnessConfig] | None
    budget: BudgetConfig
    executor: SerializeAsAny[ExecutorSettings]
    checkpoint_every: int
    run_dir: str
    source: str = Field(description="the experiment file this was loaded from")

    @property
    def strategy_seed(self) -> int:
        return self.strategy.seed if self.strategy.seed is not None else self.seed

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready form, restored exactly by ``Experiment.from_snapshot``."""
        data = self.model_dump(mode="json")
        data["fitness"] = dump_fitness(self.fitness)
        data["heldout"] = None if self.heldout is None else dump_fitness(self.heldout)
        return data

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], source: str) -> Experiment:
        """The experiment a run directory was started with (its paths are already absolute)."""
        data = dict(data)
        data["fitness"] = parse_fitness(data["fitness"], source, "fitness")
        if data.get("heldout") is not None:
            data["heldout"] = parse_fitness(data["heldout"], source, "heldout")
        data["executor"] = parse_executor(data.get("executor"), source)
        return validate(cls, data, source)


def load_experiment(
    path: str | Path,
    *,
    run_dir: str | Path | None = None,
    budget: int | None = None,
    seed: int | None = None,
) -> Experiment:
    """Read, validate and resolve an experiment file, applying command-line overrides.

    ``seed`` replaces the experiment's seed and the strategy's (the search follows the command
    line); ``budget`` replaces ``budget.evaluations``; ``run_dir`` the run directory. Loading has
    no side effects: with a ``zoo`` section the zoo must already be built from its spec (else a
    one-line error says how to build it); ``prepare_zoo`` builds it, as ``evomerge run`` does.
    """
    spec, here, source = _read(path)
    if spec.stages is not None:
        raise ConfigError(f"{source}: has stages; run it with `evomerge run` (each stage is a run under RUN_DIR/stages/)")
    return resolve_experiment(spec, here, source, run_dir=_run_dir(run_dir, spec, here), budget=budget, seed=seed)


def resolve_experiment(
    spec: ExperimentFile, here: Path, source: str, *, run_dir: Path, budget: int | None = None, seed: int | None = None
) -> Experiment:
    """A validated experiment file (without stages) resolved against its folder ``here``: what
    ``load_experiment`` returns, and what each stage of a staged experiment becomes."""
    strategy = spec.strategy if seed is None else spec.strategy.model_copy(update={"seed": None})
    budget_config = spec.budget if budget is None else _budget(spec.budget, budget, source)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{source}: --seed: expected an integer from 0 to {MAX_SEED}, got {seed}")
    fitness, objectives, heldout, search_space = _resolved_parts(spec, here, source)
    sources = resolve_sources(spec, here, source)
    return Experiment(
        name=spec.name,
        seed=spec.seed if seed is None else seed,
        models={name: resolved.ref for name, resolved in sources.items()},
        origins={name: {"written": spec.models[name], **resolved.record()} for name, resolved in sources.items()},
        base=spec.base,
        search_space=search_space,
        strategy=strategy,
        objectives=objectives,
        fitness=fitness,
        heldout=heldout,
        budget=budget_config,
        executor=parse_executor(spec.executor, source),
        checkpoint_every=spec.checkpoint_every,
        run_dir=str(run_dir),
        source=source,
    )


def prepare_zoo(path: str | Path) -> None:
    """Build the zoo of the experiment file's ``zoo`` section if it is missing or was built from
    another spec (``evomerge run`` does this before ``load_experiment``). The rest of the file is
    validated first, so a mistake is reported before a long build; the build refuses a folder that
    is neither empty nor a zoo."""
    spec, here, source = _read(path)
    if spec.zoo is None:
        return
    for part in _parts(spec, source):
        _resolved_parts(part, here, source)
    _build_zoo(spec.zoo, zoo_folder(spec.zoo, here), here, source)


PROMOTED = "promoted:"
"""Prefix of the placeholder reference a promoted model has while it does not exist yet."""


def _parts(spec: ExperimentFile, source: str) -> list[ExperimentFile]:
    """The experiment, or each stage as an experiment (models promoted by earlier stages as placeholders)."""
    if spec.stages is None:
        return [spec]
    pool: dict[str, Any] = dict(spec.models)
    parts = []
    for i, stage in enumerate(spec.stages):
        parts.append(spec.stage_file(i, pool, source))
        pool.update({p.name: f"{PROMOTED}{p.name}" for p in stage.promote})
    return parts


def check_experiment_file(path: str | Path) -> tuple[ExperimentFile, Path, str]:
    """Read and validate an experiment file (every stage of a staged one, its fitness, objectives
    and search spaces) without resolving its models; returns it, its folder and its name."""
    spec, here, source = _read(path)
    for part in _parts(spec, source):
        _resolved_parts(part, here, source)
    return spec, here, source


def _read(path: str | Path) -> tuple[ExperimentFile, Path, str]:
    path = Path(path)
    source = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    spec = validate(ExperimentFile, data, source)
    parse_executor(spec.executor, source)
    return spec, path.resolve().parent, source


def _resolved_parts(
    spec: ExperimentFile, here: Path, source: str
) -> tuple[FitnessConfig, list[str], FitnessConfig | None, dict[str, Any]]:
    """Fitness, objectives, held-out fitness and the inlined search space, checked."""
    fitness = parse_fitness(_resolve_fitness_paths(spec.fitness, here), source, "fitness")
    if parse_executor(spec.executor, source).reproducible and getattr(fitness, "racing", None) is not None:
        raise ConfigError(
            f"{source}: fitness.racing: not available with executor.reproducible: true (the bar a candidate "
            "races against depends on which results have arrived); drop one of them"
        )
    objectives = _checked_objectives(spec.objectives, fitness, source)
    heldout = _heldout(spec.heldout, spec.fitness, here, source)
    return fitness, objectives, heldout, inline_space(spec.search_space, here, source)


def _budget(config: BudgetConfig, evaluations: int, source: str) -> BudgetConfig:
    if evaluations < 1:
        raise ConfigError(f"{source}: --budget: expected at least 1 evaluation, got {evaluations}")
    return config.model_copy(update={"evaluations": evaluations})


def run_dir_of(override: str | Path | None, spec: ExperimentFile, here: Path) -> Path:
    """The run directory: ``--run-dir``, else the file's ``run_dir``, else runs/<name>."""
    return _run_dir(override, spec, here)


def _run_dir(override: str | Path | None, spec: ExperimentFile, here: Path) -> Path:
    """``--run-dir`` (relative to the current directory), else ``run_dir`` (relative to the file), else runs/<name>."""
    if override is not None:
        return Path(override).expanduser().resolve()
    if spec.run_dir is not None:
        return (here / Path(spec.run_dir).expanduser()).resolve()
    return (Path.cwd() / "runs" / spec.name).resolve()


def _resolve_fitness_paths(data: dict[str, Any], here: Path) -> dict[str, Any]:
    """Make ``include_path`` folders and a ``file.py:fn`` reference absolute (relative to the experiment)."""
    data = dict(data)
    include = data.get("include_path")
    if isinstance(include, (str, list)):
        folders = [include] if isinstance(include, str) else include
        data["include_path"] = [str((here / str(f)).resolve()) if isinstance(f, str) else f for f in folders]
    python = data.get("python")
    if isinstance(python, str) and _PYTHON_REF.match(python):
        module, function = python.rsplit(":", 1)
        if module.endswith(".py"):
            data["python"] = f"{(here / module).resolve()}:{function}"
    return data


def _heldout(
    heldout: bool | dict[str, Any] | None, fitness: dict[str, Any], here: Path, source: str
) -> FitnessConfig | None:
    """The held-out fitness: the search fitness with ``heldout``'s overrides (lm-eval: split test)."""
    if heldout is None or heldout is False:
        return None
    overrides = {} if heldout is True else dict(heldout)
    merged = {**fitness, **overrides}
    if "python" not in merged:
        merged = {**fitness, "split": "test", **overrides}
    return parse_fitness(_resolve_fitness_paths(merged, here), source, "heldout")


def _checked_objectives(objectives: list[str], fitness: FitnessConfig, source: str) -> list[str]:
    """lm-eval objectives are known up front (task objectives + the aggregate); check the names."""
    if isinstance(fitness, FitnessSpec):
        known = [task.objective for task in fitness.tasks] + [AGGREGATE]
        for i, name in enumerate(objectives):
            if name not in known:
                raise ConfigError(f"{source}: objectives[{i}]: '{name}' is not an objective of the fitness; known: {', '.join(known)}")
    return objectives


def inline_space(space: str | dict[str, Any], here: Path, source: str) -> dict[str, Any]:
    if isinstance(space, dict):
        return space
    path = (here / Path(space).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError(f"{source}: search_space: file not found: {path}")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# -- models and the zoo ---------------------------------------------------------------------------


def zoo_folder(config: ZooConfig | None, here: Path) -> Path:
    """The zoo folder: the experiment's ``zoo.dir``, else ``$EVOMERGE_ZOO``, else .cache/zoo (current directory)."""
    if config is not None and config.dir is not None:
        return (here / Path(config.dir).expanduser()).resolve()
    return Path(os.environ.get(ZOO_ENV) or DEFAULT_ZOO_DIR).expanduser().resolve()


def resolve_sources(spec: ExperimentFile, here: Path, source: str) -> dict[str, ResolvedSource]:
    """Every model reference resolved (zoo built first if asked; hub ids fetched or found in the cache)."""
    zoo = zoo_folder(spec.zoo, here)
    if spec.zoo is not None:
        _check_zoo_ready(spec.zoo, zoo, here, source)
    index: list[Any] = []

    def lookup(name: str) -> Callable[[str], Path]:
        def zoo_model(model: str) -> Path:
            if not index:
                index.append(_zoo_index(zoo))
            return _zoo_model(zoo, index[0], name, model, spec.zoo is None, source)

        return zoo_model

    return {
        name: resolve_source(text, roots=[here], zoo=lookup(name), where=f"{source}: models.{name}")
        for name, text in spec.models.items()
    }


def _zoo_spec(config: ZooConfig, here: Path, source: str) -> Path:
    path = Path(__file__).parent / "zoo" / "default.yaml" if config.spec == "default" else here / config.spec
    if not path.is_file():
        raise ConfigError(f"{source}: zoo.spec: file not found: {path}")
    return path


def _build_zoo(config: ZooConfig, zoo: Path, here: Path, source: str) -> None:
    """Build (or reuse) the zoo; imported here so that experiments without a zoo never load its code."""
    from evomerge.zoo import build as zoo_build

    zoo_build.build_zoo(_zoo_spec(config, here, source), zoo)


def _check_zoo_ready(config: ZooConfig, zoo: Path, here: Path, source: str) -> None:
    """A one-line error saying how to build the zoo, unless it is built from the section's spec."""
    from evomerge.zoo.folder import INDEX_FILE, cached_index
    from evomerge.zoo.spec import load_spec, spec_hash

    spec_path = _zoo_spec(config, here, source)
    if cached_index(zoo, spec_hash(load_spec(spec_path))) is not None:
        return
    state = "missing" if not (zoo / INDEX_FILE).is_file() else "built from another spec or incomplete"
    command = f"evomerge zoo build --out {zoo}" + ("" if config.spec == "default" else f" --spec {spec_path}")
    raise ConfigError(f"{source}: zoo: {zoo} is {state}; build it with `{command}` (`evomerge run` builds it too)")


def _zoo_index(zoo: Path) -> Any:
    from evomerge.zoo.index import ZooIndex

    path = zoo / "zoo.json"
    return ZooIndex.load(path) if path.is_file() else None


def _zoo_model(zoo: Path, index: Any, name: str, model: str, hint_build: bool, source: str) -> Path:
    try:
        folder = zoo / (index.model(model).folder if index is not None else model)
    except ConfigError as err:
        raise ModelError(f"{source}: models.{name}: {err} (in {zoo})") from None
    if not folder.is_dir():
        how = "run `evomerge zoo build` or add a zoo: section" if hint_build else "the zoo build did not produce it"
        raise ModelError(f"{source}: models.{name}: zoo model '{model}' not found in {zoo} ({how})")
    return folder
